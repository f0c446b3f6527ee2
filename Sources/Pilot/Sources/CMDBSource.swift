import FoundationEssentials
public import Logging
public import ServiceLifecycle
import TrellisConfig
import TrellisHTTP
import TrellisPolicy

/// Polls a CMDB's HTTP JSON endpoint for machine metadata and merges it into the registry: the
/// region, zone and labels of each machine, matched to instances by node id (= hostname). A
/// failed poll or a malformed document keeps the last good metadata. Schema (docs/pilot-api.md):
///
/// ```json
/// {"machines": [{"hostname": "vm-a", "region": "eu-west", "zone": "eu-west-1a", "subzone": "",
///                "labels": {"team": "billing"}}]}
/// ```
public struct CMDBSource: Service {
    let url: String
    let target: HTTPClient.URL
    let interval: Duration
    let timeout: Duration
    let registry: Registry
    let logger: Logger
    let metrics: PilotMetrics

    public init(
        url: String,
        interval: Duration,
        timeout: Duration = .seconds(5),
        registry: Registry,
        logger: Logger,
        metrics: PilotMetrics = .init()
    ) throws {
        self.metrics = metrics
        self.target = try HTTPClient.URL(url)
        self.url = url
        self.interval = interval
        self.timeout = timeout
        self.registry = registry
        self.logger = logger
    }

    public func run() async throws {
        while !Task.isCancelled {
            await pollOnce()
            try? await Task.sleep(for: interval)
        }
    }

    /// One poll; returns whether the metadata was taken.
    @discardableResult
    public func pollOnce() async -> Bool {
        do {
            let response = try await HTTPClient().request("GET", target, timeout: timeout)
            guard response.status == 200 else { throw HTTPClient.Failure("HTTP status \(response.status)") }
            let machines = try Self.parse(response.body)
            await registry.setMachines(machines)
            metrics.cmdbPoll(ok: true)
            return true
        } catch {
            metrics.cmdbPoll(ok: false)
            logger.warning(
                "CMDB poll failed; keeping the last metadata",
                metadata: ["url": "\(url)", "error": "\(error)"]
            )
            return false
        }
    }

    /// The document → metadata by hostname; any problem refuses the whole document.
    static func parse(_ body: [UInt8]) throws -> [String: MachineMetadata] {
        let root: JSONFields
        do throws(APIError) {
            root = try JSONFields(try JSONValue.parse(body), allowed: ["machines"])
        } catch {
            throw HTTPClient.Failure(error.message)
        }
        guard case .array(let list)? = root.fields["machines"] else {
            throw HTTPClient.Failure("machines: expected a list")
        }
        var result: [String: MachineMetadata] = [:]
        for (i, item) in list.enumerated() {
            do throws(APIError) {
                let f = try JSONFields(
                    item,
                    path: "machines[\(i)]",
                    allowed: ["hostname", "region", "zone", "subzone", "labels"]
                )
                let hostname = try f.string("hostname", required: true)!
                guard Names.isValidNodeID(hostname) else {
                    throw APIError.invalid("machines[\(i)].hostname", "not a valid node id")
                }
                guard result[hostname] == nil else {
                    throw APIError.invalid("machines[\(i)].hostname", "'\(hostname)' is listed twice")
                }
                let labels = try f.stringMap("labels") ?? [:]
                for key in labels.keys where !Names.isValidLabelKey(key) {
                    throw APIError.invalid("machines[\(i)].labels.\(key)", "not a valid label key")
                }
                result[hostname] = MachineMetadata(
                    locality: Locality(
                        region: try f.string("region") ?? "",
                        zone: try f.string("zone") ?? "",
                        subzone: try f.string("subzone") ?? ""
                    ),
                    labels: labels
                )
            } catch {
                throw HTTPClient.Failure(error.message)
            }
        }
        return result
    }
}
