public import Foundation
public import Logging
public import Pilot
public import Prometheus
import ServiceLifecycle
import Testing

/// A whole pilot (registry over a real SQLite store, xDS server, HTTP API) started in-process on
/// free loopback ports, and stopped at the end of `body`, also when it throws.
public struct PilotHarness {
    public let server: PilotServer
    public let xdsPort: Int
    public let httpPort: Int
    /// This pilot's own metrics (also served on its /metrics).
    public let prometheus: PrometheusCollectorRegistry

    public var api: String { "http://127.0.0.1:\(httpPort)" }

    public static func run<T: Sendable>(
        store: any RegistryStore,
        mesh: MeshConfig = .empty,
        xdsPort: Int = Peers.freePort(),
        httpPort: Int = Peers.freePort(),
        debounce: Duration = .milliseconds(50),
        leaseSweepInterval: Duration = .milliseconds(200),
        maxConcurrentStreams: Int = PilotServer.maxConcurrentStreams,
        _ body: (PilotHarness) async throws -> T
    ) async throws -> T {
        var configuration = PilotServer.Configuration()
        configuration.xdsHost = "127.0.0.1"
        configuration.xdsPort = xdsPort
        configuration.httpHost = "127.0.0.1"
        configuration.httpPort = httpPort
        configuration.debounce = debounce
        configuration.leaseSweepInterval = leaseSweepInterval
        configuration.maxConcurrentStreams = maxConcurrentStreams
        var logger = Logger(label: "test.pilot")
        logger.logLevel = .critical
        let prometheus = PrometheusCollectorRegistry()
        let server = try await PilotServer(
            configuration: configuration,
            store: store,
            logger: logger,
            metrics: PilotMetrics(factory: PrometheusMetricsFactory(registry: prometheus)),
            metricsText: {
                var buffer: [UInt8] = []
                prometheus.emit(into: &buffer)
                return String(decoding: buffer, as: UTF8.self)
            }
        )
        try await server.registry.applyMesh(mesh)
        let harness = PilotHarness(server: server, xdsPort: xdsPort, httpPort: httpPort, prometheus: prometheus)
        // Stopped by a graceful shutdown, as SIGTERM stops trellis-pilot: cancelling its task
        // instead can drop a connection the HTTP server accepted but had not started serving,
        // which NIO traps on ("Deinited NIOAsyncWriter without calling finish()").
        let services = ServiceGroup(
            configuration: .init(services: [.init(service: server)], gracefulShutdownSignals: [], logger: logger)
        )
        let task = Task { try await services.run() }
        func stop() async {
            await services.triggerGracefulShutdown()
            _ = try? await task.value
        }
        let up = await Peers.eventually(within: .seconds(10)) {
            await Peers.http("GET", "\(harness.api)/healthz").status == 200
        }
        guard up else {
            await stop()
            throw HarnessError(description: "pilot did not start on \(httpPort)")
        }
        do {
            let result = try await body(harness)
            await stop()
            return result
        } catch {
            await stop()
            throw error
        }
    }

    /// The value of one sample line of /metrics (`name{labels}`), or nil.
    public func metric(_ sample: String) async -> Double? {
        let text = await Peers.http("GET", "\(api)/metrics").body
        for line in text.split(separator: "\n") where line.hasPrefix(sample + " ") {
            return Double(line.split(separator: " ").last ?? "")
        }
        return nil
    }

    public struct HarnessError: Error, CustomStringConvertible {
        public var description: String
    }

    /// Registers an instance through the HTTP API; returns the status.
    @discardableResult
    public func register(_ json: String) async -> Int {
        await Peers.http("POST", "\(api)/v1/instances", body: json).status
    }

    @discardableResult
    public func deregister(service: String, address: String, port: Int) async -> Int {
        await Peers.http("DELETE", "\(api)/v1/instances/\(service)/\(address)/\(port)").status
    }
}

/// An Envoy bootstrap with only an ADS cluster pointing at pilot (or, with `moreADSPorts`, at
/// several pilots: Envoy's gRPC stream goes to another when one fails).
public enum EnvoyBootstrap {
    public static func yaml(
        nodeID: String,
        adsPort: Int,
        adminPort: Int,
        apiType: String,
        metadata: [String: String] = [:],
        locality: (region: String, zone: String)? = nil,
        adsHost: String = "127.0.0.1",
        moreADSPorts: [Int] = []
    ) -> String {
        let meta = metadata.map { "\"\($0.key)\": \"\($0.value)\"" }.joined(separator: ", ")
        let place = locality.map { ", locality: {region: \($0.region), zone: \($0.zone)}" } ?? ""
        return """
            node: {id: \(nodeID), cluster: trellis-test\(place), metadata: {\(meta)}}
            admin: {address: {socket_address: {address: 127.0.0.1, port_value: \(adminPort)}}}
            dynamic_resources:
              ads_config:
                api_type: \(apiType)
                transport_api_version: V3
                grpc_services: [{envoy_grpc: {cluster_name: xds}}]
                set_node_on_first_message_only: true
              cds_config: {ads: {}, resource_api_version: V3}
              lds_config: {ads: {}, resource_api_version: V3}
            static_resources:
              clusters:
              - name: xds
                type: STATIC
                connect_timeout: 1s
                typed_extension_protocol_options:
                  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
                    "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
                    explicit_http_config: {http2_protocol_options: {}}
                load_assignment:
                  cluster_name: xds
                  endpoints: [{lb_endpoints: [\(([adsPort] + moreADSPorts).map { "{endpoint: {address: {socket_address: {address: \(adsHost), port_value: \($0)}}}}" }.joined(separator: ", "))]}]
            """
    }

    public static func start(
        in dir: URL,
        nodeID: String,
        adsPort: Int,
        apiType: String,
        metadata: [String: String] = [:],
        locality: (region: String, zone: String)? = nil
    ) throws -> (Peers.Child, adminPort: Int) {
        let adminPort = Peers.freePort()
        let file = dir.appendingPathComponent("envoy-\(nodeID).yaml")
        try yaml(
            nodeID: nodeID,
            adsPort: adsPort,
            adminPort: adminPort,
            apiType: apiType,
            metadata: metadata,
            locality: locality
        )
        .write(to: file, atomically: true, encoding: .utf8)
        let child = try Peers.Child(
            [
                "envoy", "-c", file.path, "--disable-hot-restart", "-l", "error", "--base-id",
                "\(Int.random(in: 1000...60000))",
            ],
            output: dir.appendingPathComponent("envoy-\(nodeID).log")
        )
        return (child, adminPort)
    }
}

extension Logger {
    /// A logger for tests: only critical messages.
    public static var quiet: Logger {
        var logger = Logger(label: "test.pilot")
        logger.logLevel = .critical
        return logger
    }
}
