import GRPCCore
import GRPCNIOTransportHTTP2
public import Hummingbird
public import Logging
public import ServiceLifecycle
import TrellisPolicy

/// The whole control plane in one `Service`: the registry over its store, the snapshot generator,
/// the xDS server (gRPC, :15010), the HTTP API (:15014) and the lease sweeper. The executable adds
/// what reads files (mesh.yaml) and polls (the CMDB) and feeds them to ``registry``.
public struct PilotServer: Service {
    public struct Configuration: Sendable {
        public var xdsHost = "0.0.0.0"
        public var xdsPort = PilotPorts.xds
        public var httpHost = "0.0.0.0"
        public var httpPort = PilotPorts.http
        /// Registry changes within this window are pushed together.
        public var debounce: Duration = .milliseconds(100)
        /// How often expired leases are looked for.
        public var leaseSweepInterval: Duration = .seconds(1)
        /// Concurrent xDS streams per HTTP/2 connection, advertised (``PilotServer/maxConcurrentStreams``;
        /// tests lower it to exercise the limit without a thousand streams).
        public var maxConcurrentStreams = PilotServer.maxConcurrentStreams

        public init() {}
    }

    public let registry: Registry
    public let cache = SnapshotCache()
    public let sync: SyncStatus
    public let generator: SnapshotGenerator
    let configuration: Configuration
    let logger: Logger
    let metrics: PilotMetrics
    let metricsText: @Sendable () -> String

    public init(
        configuration: Configuration,
        store: any RegistryStore,
        logger: Logger,
        metrics: PilotMetrics = .init(),
        metricsText: @escaping @Sendable () -> String = { "" }
    ) async throws {
        self.metrics = metrics
        self.sync = SyncStatus(metrics: metrics)
        self.configuration = configuration
        self.logger = logger
        self.metricsText = metricsText
        registry = try await Registry(store: store, logger: logger)
        generator = SnapshotGenerator(
            registry: registry,
            cache: cache,
            logger: logger,
            debounce: configuration.debounce
        )
    }

    /// Concurrent xDS streams per HTTP/2 connection. A gRPC proxyless client multiplexes one watch
    /// per resource name and kind on one channel, and a node keeps its ADS stream for its life:
    /// the limit is set well above that, and bounds what one connection can hold.
    public static let maxConcurrentStreams = 1024

    public func run() async throws {
        let ads = AggregatedDiscoveryService(
            cache: cache,
            sync: sync,
            source: generator,
            logger: logger,
            metrics: metrics
        )
        // The stream limit is advertised, so that a client queues streams beyond it instead of
        // having its whole connection torn down at the 101st (NIOHTTP2's unadvertised default).
        var transportConfig = HTTP2ServerTransport.Posix.Config.defaults
        transportConfig.http2.maxConcurrentStreams = configuration.maxConcurrentStreams
        let grpc = GRPCServer(
            transport: HTTP2ServerTransport.Posix(
                address: .ipv4(host: configuration.xdsHost, port: configuration.xdsPort),
                transportSecurity: .plaintext,
                config: transportConfig
            ),
            services: ads.services
        )
        let api = PilotHTTPAPI(
            registry: registry,
            cache: cache,
            sync: sync,
            generator: generator,
            logger: logger,
            metrics: metrics,
            metricsText: metricsText
        )
        let app = Application(
            router: api.router(),
            configuration: .init(
                address: .hostname(configuration.httpHost, port: configuration.httpPort),
                serverName: "trellis-pilot"
            ),
            logger: logger
        )
        let instances = await registry.instances().count
        logger.info(
            "pilot starting",
            metadata: [
                "xds": "\(configuration.xdsHost):\(configuration.xdsPort)",
                "http": "\(configuration.httpHost):\(configuration.httpPort)", "instances": "\(instances)",
            ]
        )
        try await withThrowingDiscardingTaskGroup { outer in
            // The HTTP server ends by itself on a graceful shutdown (answering what is in flight).
            outer.addTask { try await Self.untilCancelled { try await app.run() } }
            // xDS streams never end by themselves: on shutdown they are cancelled.
            try await withThrowingDiscardingTaskGroup { group in
                group.addTask { try await Self.untilCancelled { try await grpc.serve() } }
                group.addTask { await generator.run() }
                group.addTask { await registry.follow() }  // a shared store's changes (etcd)
                group.addTask {
                    while !Task.isCancelled {
                        try? await Task.sleep(for: configuration.leaseSweepInterval)
                        let expired = await registry.expireLeases()
                        if !expired.isEmpty { metrics.leasesExpired(expired.count) }
                    }
                }
                try? await gracefulShutdown()  // returns on shutdown, throws when cancelled
                logger.info("pilot stopping")
                grpc.beginGracefulShutdown()
                // The listener closes first, but a connection it accepted just before still waits
                // in the server's queue until the serve loop takes it; cancelling that loop at once
                // drops such a connection, which NIO traps on ("Deinited NIOAsyncWriter without
                // calling finish()", swift-nio#2813; seen once in CI as an agent reconnected while
                // a test's pilot stopped). The loop gets a moment to take what was accepted; the
                // open xDS streams, which never end by themselves, are then cancelled.
                try? await Task.sleep(for: .milliseconds(250))
                group.cancelAll()
            }
        }
    }

    private static func untilCancelled(_ body: () async throws -> Void) async throws {
        do {
            try await body()
        } catch {
            if !Task.isCancelled { throw error }
        }
    }
}
