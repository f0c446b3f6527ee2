import FoundationEssentials
public import Hummingbird
public import Logging
import NIOCore
import SwiftProtobuf
import TrellisConfig
import TrellisPolicy
import XDS

/// Pilot's HTTP API on :15014 (Hummingbird): agent registration with leases, drain and health
/// status, listings, `/healthz`, `/readyz`, `/metrics`, `/debug/configz` and `/debug/syncz`. Bodies are JSON;
/// a bad request gets a 4xx with `{"error": token, "message": "key: what was expected"}` and changes
/// nothing. The reference is docs/pilot-api.md.
public struct PilotHTTPAPI: Sendable {
    let registry: Registry
    let cache: SnapshotCache
    let sync: SyncStatus
    let generator: SnapshotGenerator?
    let metricsText: @Sendable () -> String
    let logger: Logger
    let metrics: PilotMetrics

    /// Default lease when a registration names none, and the allowed range.
    public static let defaultTTL = 30
    public static let ttlRange = 5...3600
    static let maxBody = 64 * 1024

    public init(
        registry: Registry,
        cache: SnapshotCache,
        sync: SyncStatus,
        generator: SnapshotGenerator?,
        logger: Logger,
        metrics: PilotMetrics = .init(),
        metricsText: @escaping @Sendable () -> String = { "" }
    ) {
        self.metrics = metrics
        self.registry = registry
        self.cache = cache
        self.sync = sync
        self.generator = generator
        self.logger = logger
        self.metricsText = metricsText
        Self.registerAnyTypes()
    }

    public func router() -> Router<BasicRequestContext> {
        let router = Router(context: BasicRequestContext.self)
        router.get("/healthz") { _, _ in Self.json(200, ["status": "ok"]) }
        // Ready: the registry's store can serve (a shared store has quorum). A pilot that is not
        // ready still serves xDS from its last snapshot; registrations fail with 503 meanwhile.
        router.get("/readyz") { _, _ in
            if let reason = await registry.storeUnavailable() {
                return Self.json(503, ["status": "not ready", "reason": reason])
            }
            return Self.json(200, ["status": "ready"])
        }
        router.get("/metrics") { _, _ in
            var headers = HTTPFields()
            headers[.contentType] = "text/plain; version=0.0.4"
            return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(string: metricsText())))
        }
        router.post("/v1/instances") { request, _ in
            await handle {
                var request = request
                let body = try await Self.body(&request)
                let registration = try Self.registration(body)
                let (instance, created) = try await registry.register(registration)
                logger.info(
                    "instance registered",
                    metadata: ["instance": "\(instance.key)", "node": "\(instance.node)"]
                )
                return Self.json(created ? 201 : 200, InstanceJSON(instance))
            }
        }
        router.get("/v1/instances") { request, _ in
            await handle {
                let service = request.uri.queryParameters["service"].map(String.init)
                return Self.json(200, await registry.instances(service: service).map(InstanceJSON.init))
            }
        }
        router.put("/v1/instances/:service/:address/:port/lease") { _, context in
            await handle {
                Self.json(200, InstanceJSON(try await registry.renew(try Self.key(context))))
            }
        }
        router.delete("/v1/instances/:service/:address/:port") { _, context in
            await handle {
                let key = try Self.key(context)
                try await registry.deregister(key)
                logger.info("instance deregistered", metadata: ["instance": "\(key)"])
                return Response(status: .noContent)
            }
        }
        router.put("/v1/instances/:service/:address/:port/status") { request, context in
            await handle {
                var request = request
                let key = try Self.key(context)
                let status = try Self.status(try await Self.body(&request))
                return Self.json(200, InstanceJSON(try await registry.setStatus(key, status)))
            }
        }
        router.put("/v1/nodes/:node/status") { request, context in
            await handle {
                var request = request
                let node = try Self.parameter(context, "node")
                guard Names.isValidNodeID(node) else { throw APIError.invalid("node", "not a valid node id") }
                let status = try Self.status(try await Self.body(&request))
                let instances = try await registry.setStatus(node: node, status)
                logger.info("node status set", metadata: ["node": "\(node)", "status": "\(status.rawValue)"])
                return Self.json(200, instances.map(InstanceJSON.init))
            }
        }
        router.get("/v1/services") { _, _ in
            let view = await registry.view()
            return Self.json(200, view.services.map(ServiceJSON.init))
        }
        router.get("/debug/syncz") { _, _ in
            var nodes: [SyncJSON] = []
            for node in await sync.connectedNodes {
                let status = await sync.status(node: node)
                nodes.append(SyncJSON(node: node, status: status))
            }
            return Self.json(200, nodes)
        }
        router.get("/debug/configz") { request, _ in
            let only = request.uri.queryParameters["node"].map(String.init)
            var parts: [String] = []
            for node in await cache.nodes where only == nil || only == node {
                guard let snapshot = await cache.snapshot(node) else { continue }
                parts.append("\(Self.quote(node)):\(Self.configJSON(snapshot))")
            }
            var headers = HTTPFields()
            headers[.contentType] = "application/json"
            let warnings = await generator?.warnings ?? []
            let text =
                "{\"nodes\":{\(parts.joined(separator: ","))},\"warnings\":[\(warnings.map(Self.quote).joined(separator: ","))]}"
            return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(string: text)))
        }
        return router
    }

    /// Runs a handler; an error becomes its JSON answer, and is counted.
    private func handle(_ body: () async throws -> Response) async -> Response {
        do {
            return try await body()
        } catch let error as APIError {
            metrics.apiError(error.status)
            return Self.json(error.status, error)
        } catch let error as RegistryError {
            let apiError = APIError(error)
            metrics.apiError(apiError.status)
            return Self.json(apiError.status, apiError)
        } catch {
            metrics.apiError(500)
            logger.error("API handler failed", metadata: ["error": "\(error)"])
            return Self.json(500, APIError(500, "internal", "\(error)"))
        }
    }

    // MARK: Reading requests

    static func body(_ request: inout Request) async throws(APIError) -> JSONValue {
        let buffer: ByteBuffer
        do {
            buffer = try await request.collectBody(upTo: maxBody)
        } catch {
            throw APIError(413, "body_too_large", "the body is larger than \(maxBody) bytes")
        }
        guard buffer.readableBytes > 0 else { throw APIError(400, "invalid_request", "body: expected a JSON object") }
        return try JSONValue.parse(Array(buffer.readableBytesView))
    }

    /// A path parameter, percent-decoded (a node id `vm#1` arrives as `vm%231`); one that does not
    /// decode is refused.
    static func parameter(_ context: BasicRequestContext, _ name: String) throws(APIError) -> String {
        let raw = context.parameters.get(name) ?? ""
        guard let decoded = percentDecoded(raw) else {
            throw APIError.invalid(name, "not valid percent-encoding: '\(raw.prefix(80))'")
        }
        return decoded
    }

    /// `%XX` sequences decoded; nil for a malformed escape or bytes that are not UTF-8.
    static func percentDecoded(_ text: String) -> String? {
        guard text.utf8.contains(UInt8(ascii: "%")) else { return text }
        func hex(_ c: UInt8) -> UInt8? {
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): c - UInt8(ascii: "A") + 10
            default: nil
            }
        }
        let bytes = Array(text.utf8)
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count)
        var i = 0
        while i < bytes.count {
            if bytes[i] == UInt8(ascii: "%") {
                guard i + 2 < bytes.count, let high = hex(bytes[i + 1]), let low = hex(bytes[i + 2]) else { return nil }
                out.append(high << 4 | low)
                i += 3
            } else {
                out.append(bytes[i])
                i += 1
            }
        }
        return String(validating: out, as: UTF8.self)
    }

    static func key(_ context: BasicRequestContext) throws(APIError) -> InstanceKey {
        let service = try parameter(context, "service")
        let address = try parameter(context, "address")
        let portText = try parameter(context, "port")
        guard Names.isValidServiceName(service) else { throw APIError.invalid("service", "not a valid service name") }
        guard Names.isIPAddress(address) else { throw APIError.invalid("address", "expected an IPv4 or IPv6 address") }
        guard let port = Int(portText), (1...65535).contains(port) else {
            throw APIError.invalid("port", "expected an integer in 1...65535, got '\(portText.prefix(20))'")
        }
        return InstanceKey(service: service, address: address, port: port)
    }

    static func status(_ body: JSONValue) throws(APIError) -> InstanceStatus {
        let fields = try JSONFields(body, allowed: ["status"])
        let text = try fields.string("status", required: true)!
        guard let status = InstanceStatus(rawValue: text) else {
            throw APIError.invalid("status", "expected healthy, unhealthy or draining, got \"\(text.prefix(40))\"")
        }
        return status
    }

    /// `{"service", "address", "port", "service_port"?, "protocol"?, "node", "region"?, "zone"?,
    /// "subzone"?, "labels"?, "weight"?, "status"?, "ttl_seconds"?}`.
    static func registration(_ body: JSONValue) throws(APIError) -> Registry.Registration {
        let f = try JSONFields(
            body,
            allowed: [
                "service", "address", "port", "service_port", "protocol", "node", "region", "zone", "subzone", "labels",
                "weight", "status", "ttl_seconds",
            ]
        )
        let service = try f.string("service", required: true)!
        guard Names.isValidServiceName(service) else {
            throw APIError.invalid(
                "service",
                "expected lowercase letters, digits, '-' and '.' (1 to 63, starting and ending alphanumeric), got \"\(service.prefix(80))\""
            )
        }
        let address = try f.string("address", required: true)!
        guard Names.isIPAddress(address) else {
            throw APIError.invalid("address", "expected an IPv4 or IPv6 address, got \"\(address.prefix(80))\"")
        }
        let port = try f.int("port", in: 1...65535, required: true)!
        let servicePort = try f.int("service_port", in: 1...65535) ?? port
        var serviceProtocol = ServiceProtocol.http
        if let text = try f.string("protocol") {
            guard let value = ServiceProtocol(rawValue: text) else {
                throw APIError.invalid("protocol", "\(ServiceProtocol.expected), got \"\(text.prefix(40))\"")
            }
            serviceProtocol = value
        }
        let node = try f.string("node", required: true)!
        guard Names.isValidNodeID(node) else {
            throw APIError.invalid("node", "expected printable ASCII without spaces or '/', 1 to 253 bytes")
        }
        let labels = try f.stringMap("labels") ?? [:]
        for key in labels.keys where !Names.isValidLabelKey(key) {
            throw APIError.invalid(
                "labels.\(key.prefix(63))",
                "label keys are letters, digits, '-', '_', '.', '/' (1 to 63)"
            )
        }
        var status = InstanceStatus.healthy
        if let text = try f.string("status") {
            guard let value = InstanceStatus(rawValue: text) else {
                throw APIError.invalid("status", "expected healthy, unhealthy or draining, got \"\(text.prefix(40))\"")
            }
            status = value
        }
        let ttl = try f.int("ttl_seconds", in: ttlRange) ?? defaultTTL
        let instance = Instance(
            key: InstanceKey(service: service, address: address, port: port),
            servicePort: servicePort,
            serviceProtocol: serviceProtocol,
            node: node,
            locality: Locality(
                region: try f.string("region") ?? "",
                zone: try f.string("zone") ?? "",
                subzone: try f.string("subzone") ?? ""
            ),
            labels: labels,
            weight: try f.int("weight", in: EndpointWeights.range) ?? 1,
            status: status
        )
        return .init(instance: instance, ttl: .seconds(ttl))
    }

    // MARK: Writing responses

    static func json(_ status: Int, _ value: some Encodable) -> Response {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let data = (try? encoder.encode(value)) ?? Data("{}".utf8)
        var headers = HTTPFields()
        headers[.contentType] = "application/json"
        return Response(
            status: HTTPResponse.Status(code: status),
            headers: headers,
            body: .init(byteBuffer: ByteBuffer(bytes: data))
        )
    }

    static func quote(_ s: String) -> String {
        let data = (try? JSONEncoder().encode(s)) ?? Data("\"\"".utf8)
        return String(decoding: data, as: UTF8.self)
    }

    /// A node's snapshot as JSON: per type, its version and each resource decoded.
    static func configJSON(_ snapshot: NodeSnapshot) -> String {
        var types: [String] = []
        for (typeURL, typeSnapshot) in snapshot.types.sorted(by: { $0.key < $1.key }) {
            let resources = typeSnapshot.resources.keys.sorted().map { name -> String in
                let resource = typeSnapshot.resources[name]!
                let body = (try? resource.any.jsonString()) ?? "null"
                return "{\"name\":\(quote(name)),\"version\":\(quote(resource.version)),\"resource\":\(body)}"
            }
            types.append(
                "\(quote(typeURL)):{\"version\":\(quote(typeSnapshot.version)),\"resources\":[\(resources.joined(separator: ","))]}"
            )
        }
        return "{\(types.joined(separator: ","))}"
    }

    /// Nested `Any` fields (filters' typed configs) render as JSON only for registered types.
    static func registerAnyTypes() {
        let types: [any SwiftProtobuf.Message.Type] = [
            Envoy_Config_Listener_V3_Listener.self, Envoy_Config_Route_V3_RouteConfiguration.self,
            Envoy_Config_Cluster_V3_Cluster.self, Envoy_Config_Endpoint_V3_ClusterLoadAssignment.self,
            Envoy_Extensions_Filters_Network_HttpConnectionManager_V3_HttpConnectionManager.self,
            Envoy_Extensions_Filters_Http_Router_V3_Router.self,
            Envoy_Extensions_Filters_Network_TcpProxy_V3_TcpProxy.self,
            Envoy_Extensions_Filters_Listener_OriginalDst_V3_OriginalDst.self,
            Envoy_Extensions_Upstreams_Http_V3_HttpProtocolOptions.self,
        ]
        for type in types { _ = Google_Protobuf_Any.register(messageType: type) }
    }
}

// MARK: - JSON shapes

struct InstanceJSON: Encodable {
    var service: String
    var address: String
    var port: Int
    var service_port: Int
    var `protocol`: String
    var node: String
    var region: String
    var zone: String
    var subzone: String
    var labels: [String: String]
    var weight: Int
    var status: String
    var source: String
    var lease_ttl_seconds: Double?
    var lease_expires_at: Double?

    init(_ i: Instance) {
        service = i.key.service
        address = i.key.address
        port = i.key.port
        service_port = i.servicePort
        self.protocol = i.serviceProtocol.rawValue
        node = i.node
        region = i.locality.region
        zone = i.locality.zone
        subzone = i.locality.subzone
        labels = i.labels
        weight = i.weight
        status = i.status.rawValue
        source = i.source.rawValue
        lease_ttl_seconds = i.leaseTTL?.seconds
        lease_expires_at = i.leaseExpiresAt
    }
}

struct ServiceJSON: Encodable {
    var name: String
    var port: Int
    var `protocol`: String
    var hosts: [String]
    var instances: [String: Int]

    init(_ s: RegistryView.Service) {
        name = s.key.name
        port = s.key.port
        self.protocol = s.serviceProtocol.rawValue
        hosts = s.hosts
        var counts = ["healthy": 0, "unhealthy": 0, "draining": 0]
        for i in s.instances { counts[i.status.rawValue, default: 0] += 1 }
        instances = counts
    }
}

struct SyncJSON: Encodable {
    struct TypeJSON: Encodable {
        var sent_version: String?
        var sent_nonce: String?
        var acked_version: String?
        var last_nack: String?
    }
    var node: String
    var types: [String: TypeJSON]

    init(node: String, status: [String: SyncStatus.TypeStatus]) {
        self.node = node
        types = status.mapValues {
            TypeJSON(
                sent_version: $0.sentVersion,
                sent_nonce: $0.sentNonce,
                acked_version: $0.ackedVersion,
                last_nack: $0.lastNack
            )
        }
    }
}
