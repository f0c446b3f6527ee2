public import Logging
import NIOConcurrencyHelpers
public import NIOCore
import NIOHTTP1
import NIOPosix
public import ServiceLifecycle

#if canImport(Glibc)
import Glibc
#endif

/// The data path: binds each listener of the current ``ProxyConfig`` on every event loop of the
/// group (one `SO_REUSEPORT` socket per loop, so a connection stays on the loop that accepted it)
/// and serves HTTP/1.1 through the middleware chain.
public final class ProxyServer: Service, Sendable {
    public let store: ProxyConfigStore
    public let stats: ProxyStats
    private let group: any EventLoopGroup
    private let logger: Logger
    private let contexts: [ObjectIdentifier: NIOLoopBound<LoopContext>]
    private let originalDestination: OriginalDestinationLookup?
    private let upstreamMark: UInt32?
    private let state = NIOLockedValueBox<State>(.init())
    private let healthChecker: HealthChecker

    private struct State {
        /// Bound channels per listener name.
        var listeners: [String: (config: ListenerConfig, channels: [any Channel])] = [:]
        var stopped = false
        var draining = false
    }

    /// - Parameters:
    ///   - group: one event loop per core is the intended shape.
    ///   - middleware: the chain, in order; ``StandardMiddleware/chain`` by default.
    ///   - originalDestination: for ``TransparentMode`` listeners, where a redirected connection was
    ///     going (the agent injects the capture rules' lookup).
    ///   - upstreamMark: `SO_MARK` on every upstream socket (HTTP and relayed TCP): the agent's mark,
    ///     so that the capture rules do not take its own connections again.
    ///   - accessLog: where listeners with ``ListenerConfig/accessLog`` write their lines; without
    ///     one they write none.
    ///   - tracing: the tracer and sampling of requests' spans; without it nothing is traced and
    ///     trace headers pass through untouched.
    public init(
        snapshot: ProxySnapshot,
        stats: ProxyStats,
        group: any EventLoopGroup,
        middleware: [any ProxyMiddlewareFactory] = StandardMiddleware.chain,
        originalDestination: OriginalDestinationLookup? = nil,
        upstreamMark: UInt32? = nil,
        accessLog: AccessLog? = nil,
        tracing: ProxyTracing? = nil,
        logger: Logger
    ) throws {
        self.originalDestination = originalDestination
        self.upstreamMark = upstreamMark
        self.store = ProxyConfigStore(snapshot)
        self.stats = stats
        self.group = group
        self.logger = logger
        self.healthChecker = HealthChecker(group: group, mark: upstreamMark, logger: logger, stats: stats)
        var contexts: [ObjectIdentifier: NIOLoopBound<LoopContext>] = [:]
        for loop in group.makeIterator() {
            let store = self.store
            contexts[ObjectIdentifier(loop)] = try loop.submit {
                let context = LoopContext(
                    eventLoop: loop,
                    store: store,
                    factories: middleware,
                    stats: stats,
                    logger: logger,
                    upstreamMark: upstreamMark,
                    accessLog: accessLog,
                    tracing: tracing
                )
                context.pool.startSweeping()
                return NIOLoopBound(context, eventLoop: loop)
            }.wait()
        }
        self.contexts = contexts
    }

    /// Binds every listener of the current snapshot. Returns the bound addresses by listener name
    /// (useful with port 0).
    @discardableResult
    public func start() async throws -> [String: SocketAddress] {
        try await reconcileListeners(with: store.snapshot.config)
        healthChecker.update(store.snapshot)
        return boundAddresses
    }

    /// The local address of each listener's first socket.
    public var boundAddresses: [String: SocketAddress] {
        state.withLockedValue { state in
            state.listeners.compactMapValues { $0.channels.first?.localAddress }
        }
    }

    /// Every distinct local address of each listener (one per configured address).
    public var allBoundAddresses: [String: [SocketAddress]] {
        state.withLockedValue { state in
            state.listeners.mapValues { entry in
                var seen = Set<String>()
                return entry.channels.compactMap(\.localAddress).filter { seen.insert("\($0)").inserted }
            }
        }
    }

    /// Swaps in a new snapshot: every loop uses it from its next request; open connections stay.
    /// Listeners added or removed by the snapshot are bound or closed.
    public func apply(_ snapshot: ProxySnapshot) async throws {
        store.apply(snapshot)
        stats.resilience.prune(keeping: snapshot)
        healthChecker.update(snapshot)
        try await reconcileListeners(with: snapshot.config)
        logger.info("applied configuration", metadata: ["config.version": "\(snapshot.config.version)"])
    }

    public func run() async throws {
        try await start()
        try? await gracefulShutdown()
        await shutdown()
    }

    /// Closes every listener and the pools' idle connections.
    public func shutdown() async {
        healthChecker.shutdown()
        let channels = state.withLockedValue { state in
            state.stopped = true
            defer { state.listeners.removeAll() }
            return state.listeners.values.flatMap(\.channels)
        }
        for channel in channels { try? await channel.close() }
        for (_, bound) in contexts {
            try? await bound.eventLoop.submit {
                bound.value.pool.shutdown()
                bound.value.deadlines.shutdown()
                bound.value.accessLog?.flush()
            }.get()
        }
    }

    // MARK: Drain

    /// Starts draining on every loop: idle HTTP connections are closed, each busy one answers its
    /// current request with `Connection: close` and closes, and connections accepted from now on
    /// do the same. Listeners stay open (a captured connection must still be served). Returns the
    /// activity right after, with the number of idle connections closed.
    @discardableResult
    public func startDraining() async -> ProxyActivity {
        var closed = 0
        for (_, bound) in contexts {
            closed += (try? await bound.eventLoop.submit { bound.value.startDraining() }.get()) ?? 0
        }
        state.withLockedValue { $0.draining = true }
        var activity = await activity()
        activity.idleClosed = closed
        return activity
    }

    /// Stops draining: connections accepted from now on are kept alive again.
    public func stopDraining() async {
        state.withLockedValue { $0.draining = false }
        for (_, bound) in contexts {
            try? await bound.eventLoop.submit { bound.value.stopDraining() }.get()
        }
    }

    public var isDraining: Bool { state.withLockedValue { $0.draining } }

    /// Open connections and in-flight requests, summed over the loops.
    public func activity() async -> ProxyActivity {
        var total = ProxyActivity()
        for (_, bound) in contexts {
            if let one = try? await bound.eventLoop.submit({ bound.value.activity }).get() {
                total.httpConnections += one.httpConnections
                total.requestsInFlight += one.requestsInFlight
                total.tcpRelays += one.tcpRelays
            }
        }
        return total
    }

    private func reconcileListeners(with config: ProxyConfig) async throws {
        let existing = state.withLockedValue { $0.listeners }
        let wanted = Dictionary(uniqueKeysWithValues: config.listeners.map { ($0.name, $0) })
        // Only what the sockets and their pipelines were made from needs a new bind; routes
        // come from the snapshot on each request, so a route change keeps the listener as it is
        // (rebinding would refuse the connections that arrive in between).
        for (name, entry) in existing where wanted[name].map({ !$0.bindsLike(entry.config) }) ?? true {
            for channel in entry.channels { try? await channel.close() }
            state.withLockedValue { _ = $0.listeners.removeValue(forKey: name) }
        }
        for listener in config.listeners {
            let current = state.withLockedValue { $0.listeners[listener.name] }
            if let current {
                state.withLockedValue { $0.listeners[listener.name] = (listener, current.channels) }
                continue
            }
            let channels = try await bind(listener)
            state.withLockedValue { $0.listeners[listener.name] = (listener, channels) }
            logger.info(
                "listening",
                metadata: [
                    "listener.name": "\(listener.name)",
                    "listener.address": "\(channels.first?.localAddress.map { "\($0)" } ?? "-")",
                ]
            )
        }
    }

    /// One socket per event loop for each of the listener's addresses.
    private func bind(_ listener: ListenerConfig) async throws -> [any Channel] {
        var channels: [any Channel] = []
        let addresses = listener.addresses
        let families = Set(addresses.map { $0.host.contains(":") })
        do {
            for address in addresses {
                var port = address.port
                // Both families on one listener: the IPv6 sockets take IPv6 only.
                let v6only = families.count > 1 && address.host.contains(":")
                for loop in group.makeIterator() {
                    var bootstrap = makeBootstrap(listener, loop: loop)
                    if v6only {
                        bootstrap = bootstrap.serverChannelOption(
                            ChannelOptions.Types.SocketOption(level: .ipv6, name: .ipv6_v6only),
                            value: 1
                        )
                    }
                    let channel = try await bootstrap.bind(to: try SocketAddress.listening(address.host, port)).get()
                    // With port 0 the first bind picks the port; the other loops share it.
                    if port == 0 { port = channel.localAddress?.port ?? 0 }
                    channels.append(channel)
                }
            }
        } catch {
            for channel in channels { try? await channel.close() }
            throw error
        }
        return channels
    }

    private func makeBootstrap(_ listener: ListenerConfig, loop: any EventLoop) -> ServerBootstrap {
        let contexts = self.contexts
        let stats = self.stats
        return ServerBootstrap(group: loop, childGroup: loop)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(.socketOption(.init(rawValue: SO_REUSEPORT)), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.maxMessagesPerRead, value: 16)
            .childChannelInitializer { [originalDestination, upstreamMark] channel in
                channel.eventLoop.makeCompletedFuture {
                    guard let loopContext = contexts[ObjectIdentifier(channel.eventLoop)]?.value else {
                        throw ChannelError.ioOnClosedChannel
                    }
                    var lookup = listener.transparent == nil ? nil : originalDestination
                    if let original = lookup, let forward = listener.transparent?.forwardTo, !forward.isEmpty {
                        // Same port, another address of the same family (the inbound listener:
                        // the local program on 127.0.0.1 or ::1).
                        let v4 = forward.first { !$0.contains(":") }
                        let v6 = forward.first { $0.contains(":") }
                        lookup = { channel in
                            original(channel).flatMap { address in
                                guard let port = address.port else { return address }
                                let host = address.protocol == .inet6 ? v6 : v4
                                guard let host else { return address }
                                return try? SocketAddress(ipAddress: host, port: port)
                            }
                        }
                    }
                    let install = { (pipeline: ChannelPipeline.SynchronousOperations) throws in
                        try Self.installHTTP(
                            pipeline,
                            listener: listener,
                            loop: loopContext,
                            stats: stats,
                            lookup: lookup
                        )
                    }
                    let installHTTP2 = { (pipeline: ChannelPipeline.SynchronousOperations) throws in
                        try pipeline.addHandler(
                            HTTP2DownstreamHandler(
                                loop: loopContext,
                                listenerName: listener.name,
                                accessLog: listener.accessLog,
                                direction: listener.trafficDirection,
                                settings: HTTP2Session.Settings(),
                                idleTimeout: TimeAmount(truncating: listener.limits.idleTimeout),
                                originalDestination: lookup
                            )
                        )
                    }
                    guard let transparent = listener.transparent else {
                        // A gateway listener: HTTP/1, or h2c with prior knowledge.
                        try channel.pipeline.syncOperations.addHandler(
                            ProtocolSniffer(
                                timeout: TimeAmount(truncating: listener.limits.idleTimeout),
                                installHTTP: { context in try install(context.pipeline.syncOperations) },
                                installHTTP2: { context in try installHTTP2(context.pipeline.syncOperations) },
                                relay: nil,
                                speaksHTTP2: true,
                                stats: stats
                            )
                        )
                        return
                    }
                    try channel.pipeline.syncOperations.addHandler(
                        ProtocolSniffer(
                            timeout: TimeAmount(truncating: transparent.sniffTimeout),
                            installHTTP: { context in try install(context.pipeline.syncOperations) },
                            installHTTP2: { context in try installHTTP2(context.pipeline.syncOperations) },
                            relay: TCPRelay.Starter(
                                lookup: lookup,
                                mark: upstreamMark,
                                stats: stats,
                                loop: loopContext,
                                listener: listener.name,
                                accessLog: listener.accessLog
                            ),
                            speaksHTTP2: true,
                            stats: stats
                        )
                    )
                }
            }
    }

    /// The HTTP/1.1 pipeline: one handler, the downstream handler (and so the middleware), which
    /// keeps the connection's timers (``ConnectionTimeouts``), parses requests itself
    /// (``HTTP1RequestParser``), queues pipelined ones (reads do not stop and restart, two
    /// `epoll_ctl` calls, around every request) and writes responses as bytes (an HTTP/1
    /// upstream's head is relayed as it was received, checked by ``HTTP1ResponseParser``).
    static func installHTTP(
        _ sync: ChannelPipeline.SynchronousOperations,
        listener: ListenerConfig,
        loop loopContext: LoopContext,
        stats: ProxyStats,
        lookup: OriginalDestinationLookup?
    ) throws {
        let limits = listener.limits
        let timeouts = ConnectionTimeouts(
            headerTimeout: limits.requestHeaderTimeout,
            idleTimeout: limits.idleTimeout,
            onTimeout: { stats.record($0) }
        )
        try sync.addHandler(
            DownstreamHandler(
                loop: loopContext,
                listenerName: listener.name,
                accessLog: listener.accessLog,
                direction: listener.trafficDirection,
                timeouts: timeouts,
                maxRequestHeadBytes: limits.maxRequestHeaderBytes,
                originalDestination: lookup
            )
        )
    }
}

/// What the data path is doing: open HTTP connections, requests being served, relayed TCP
/// connections; `idleClosed` is set by ``ProxyServer/startDraining()``.
public struct ProxyActivity: Sendable, Equatable, Codable {
    public var httpConnections = 0
    public var requestsInFlight = 0
    public var tcpRelays = 0
    public var idleClosed = 0

    public init(httpConnections: Int = 0, requestsInFlight: Int = 0, tcpRelays: Int = 0, idleClosed: Int = 0) {
        self.httpConnections = httpConnections
        self.requestsInFlight = requestsInFlight
        self.tcpRelays = tcpRelays
        self.idleClosed = idleClosed
    }

    enum CodingKeys: String, CodingKey {
        case httpConnections = "http_connections", requestsInFlight = "requests_in_flight"
        case tcpRelays = "tcp_relays", idleClosed = "idle_closed"
    }

    /// Nothing left to wait for.
    public var isQuiet: Bool { requestsInFlight == 0 && tcpRelays == 0 }
}

extension SocketAddress {
    /// The address a listener binds: an IP literal is read as such (no resolver: `getaddrinfo`
    /// refuses `::` with `AI_ADDRCONFIG` while a fresh interface's IPv6 addresses are still
    /// tentative, which failed an agent started right after its network came up); a name is
    /// resolved.
    static func listening(_ host: String, _ port: Int) throws -> SocketAddress {
        if let literal = try? SocketAddress(ipAddress: host, port: port) { return literal }
        return try SocketAddress.makeAddressResolvingHost(host, port: port)
    }
}
