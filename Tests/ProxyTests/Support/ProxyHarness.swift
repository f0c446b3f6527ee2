import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Prometheus
import TrellisPolicy
import TrellisRuntime

@testable import Proxy

/// A proxy running in the test process on loopback port 0, with its own Prometheus registry and
/// admin endpoint.
final class ProxyHarness: Sendable {
    let server: ProxyServer
    let stats: ProxyStats
    let registry: PrometheusCollectorRegistry
    let port: Int
    let adminPort: Int
    private let adminChannel: any Channel

    static func start(
        _ config: ProxyConfig,
        group: any EventLoopGroup,
        logger: Logger? = nil,
        originalDestination: OriginalDestinationLookup? = nil,
        accessLog: AccessLogFile? = nil,
        tracing: ProxyTracing? = nil,
        registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry(),
        middleware: [any ProxyMiddlewareFactory] = StandardMiddleware.chain
    ) async throws -> ProxyHarness {
        // The executables' factory: timers are its own histograms, rendered after the registry.
        let metrics = TrellisMetricsFactory(registry: registry)
        let stats = ProxyStats(factory: metrics)
        let snapshot = try ProxySnapshot(config, stats: stats)
        let logger =
            logger
            ?? {
                var quiet = Logger(label: "test.proxy")
                quiet.logLevel = .warning
                return quiet
            }()
        let server = try ProxyServer(
            snapshot: snapshot,
            stats: stats,
            group: group,
            middleware: middleware,
            originalDestination: originalDestination,
            accessLog: accessLog?.sink,
            tracing: tracing,
            logger: logger
        )
        let bound = try await server.start()
        let admin = AdminServer(
            port: 0,
            group: group,
            proxy: server,
            renderMetrics: metrics.text,
            logger: logger
        )
        let adminChannel = try await admin.bind()
        return ProxyHarness(
            server: server,
            stats: stats,
            registry: registry,
            port: bound[config.listeners[0].name]!.port!,
            adminPort: adminChannel.localAddress!.port!,
            adminChannel: adminChannel
        )
    }

    /// A proxy that sends every request to `upstream` (cluster `alpha`).
    static func start(forwardingTo upstream: TestUpstream, group: any EventLoopGroup) async throws -> ProxyHarness {
        try await start(
            gatewayConfig(
                virtualHosts: catchAll("alpha"),
                clusters: [ClusterConfig(name: "alpha", endpoints: [endpoint(upstream)])]
            ),
            group: group
        )
    }

    private init(
        server: ProxyServer,
        stats: ProxyStats,
        registry: PrometheusCollectorRegistry,
        port: Int,
        adminPort: Int,
        adminChannel: any Channel
    ) {
        self.server = server
        self.stats = stats
        self.registry = registry
        self.port = port
        self.adminPort = adminPort
        self.adminChannel = adminChannel
    }

    func apply(_ config: ProxyConfig) async throws {
        try await server.apply(try ProxySnapshot(config, stats: stats))
    }

    func stop() async {
        try? await adminChannel.close()
        await server.shutdown()
    }

    /// The value of one metric sample from `/stats/prometheus`, e.g.
    /// `trellis_errors_total{token="no_route"}`; 0 when absent.
    func metric(_ sample: String, group: any EventLoopGroup) async throws -> Double {
        let response = try await TestHTTPClient.get(port: adminPort, "/stats/prometheus", group: group)
        for line in response.body.split(separator: "\n") where line.hasPrefix(sample + " ") {
            return Double(line.dropFirst(sample.count + 1)) ?? .nan
        }
        return 0
    }
}

/// A one-listener gateway configuration on loopback port 0.
func gatewayConfig(
    virtualHosts: [VirtualHost],
    clusters: [ClusterConfig],
    limits: ConnectionLimits = .init(),
    accessLog: Bool = false
) -> ProxyConfig {
    ProxyConfig(
        version: "test",
        listeners: [
            ListenerConfig(
                name: "test",
                address: SocketEndpoint(host: "127.0.0.1", port: 0),
                virtualHosts: virtualHosts,
                limits: limits,
                accessLog: accessLog
            )
        ],
        clusters: clusters
    )
}

func endpoint(_ upstream: TestUpstream, weight: Int = 1, health: Endpoint.Health = .healthy) -> Endpoint {
    Endpoint(address: SocketEndpoint(host: "127.0.0.1", port: upstream.port), weight: weight, health: health)
}

func catchAll(_ cluster: String, timeout: Duration? = .seconds(5)) -> [VirtualHost] {
    [
        VirtualHost(
            name: "all",
            domains: ["*"],
            routes: [
                Route(
                    name: "all",
                    match: RouteMatch(),
                    action: RouteAction(clusters: [.init(name: cluster)], timeout: timeout)
                )
            ]
        )
    ]
}
