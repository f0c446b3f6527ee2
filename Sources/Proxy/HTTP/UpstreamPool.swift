import Atomics
import CoreMetrics
import NIOCore
import NIOHTTP1
import NIOPosix
import TrellisPolicy

/// The keep-alive connections of one event loop towards every upstream endpoint. Only that loop
/// touches it; requests never wait for another loop.
final class UpstreamPool {
    private let eventLoop: any EventLoop
    /// The idle HTTP/1 connections per endpoint. A stack is an object, so that taking from it
    /// is a lookup (no `modify` access, which allocated its coroutine frame, and no copy of the
    /// array) and giving back needs none (a connection keeps the stack it came for).
    private var idle: [String: IdleStack] = [:]
    /// The stacks last looked up, by endpoint object, in eight slots chosen by the object's
    /// address: a request to an endpoint seen recently finds its stack without hashing the
    /// endpoint's key. A slot holds its endpoint, so no other object takes that address while
    /// the slot names it; a stack the sweep dropped is looked up again.
    private var recent = [(endpoint: ClusterRuntime.EndpointRuntime, stack: IdleStack)?](repeating: nil, count: 8)
    /// HTTP/2 connections per endpoint, busy or idle (streams are multiplexed on them).
    private var multiplexed: [String: [HTTP2UpstreamConnection]] = [:]
    private var sweeper: RepeatedTask?
    /// Every upstream socket gets the agent's mark (which the capture rules let through).
    private let connector: UpstreamConnector

    /// The loop's buffers for request heads (see ``HeadBufferRing``).
    let heads: HeadBufferRing

    init(eventLoop: any EventLoop, mark: UInt32? = nil, heads: HeadBufferRing) {
        self.heads = heads
        self.eventLoop = eventLoop
        self.connector = UpstreamConnector(mark: mark)
    }

    var idleCount: Int { idle.values.reduce(0) { $0 + $1.connections.count } }

    /// Starts the sweeper that closes connections idle for longer than their cluster allows.
    func startSweeping(every interval: TimeAmount = .seconds(1)) {
        let bound = NIOLoopBound(self, eventLoop: eventLoop)
        sweeper = eventLoop.scheduleRepeatedTask(initialDelay: interval, delay: interval) { _ in
            bound.value.sweep()
        }
    }

    func shutdown() {
        sweeper?.cancel()
        for stack in idle.values {
            stack.isListed = false
            for c in stack.connections { c.close() }
            stack.connections.removeAll()
        }
        idle.removeAll()
        for i in recent.indices { recent[i] = nil }
        for connections in multiplexed.values { for c in connections { c.close() } }
        multiplexed.removeAll()
    }

    /// Hands the exchange an idle connection to the endpoint at once, or a new one when it is
    /// connected (`attach`), or the reason it could not connect (`connectFailed`). `fresh`: a new
    /// connection whatever is idle (a request whose reused connection just closed under it).
    func acquire(
        endpoint: ClusterRuntime.EndpointRuntime,
        cluster: ClusterRuntime,
        for exchange: ProxyExchange,
        fresh: Bool = false
    ) {
        switch cluster.config.upstreamProtocol {
        case .http2:
            acquireStream(endpoint: endpoint, cluster: cluster, for: exchange, fresh: fresh)
            return
        case .downstream where exchange.request.head.version.major == 2:
            acquireStream(endpoint: endpoint, cluster: cluster, for: exchange, fresh: fresh)
            return
        case .http1, .downstream:
            break
        }
        let stack = idleStack(endpoint)
        if !fresh && !stack.connections.isEmpty {
            let idleTimeout = cluster.poolIdleTimeout
            let now = NIODeadline.now()
            while let candidate = stack.connections.popLast() {
                if candidate.isActive && now - candidate.idleSince < idleTimeout {
                    exchange.attach(candidate, try: exchange.currentTry)
                    return
                }
                candidate.close()
            }
        }
        connect(endpoint: endpoint, cluster: cluster, for: exchange, stack: stack)
    }

    /// Circuit breakers: a request that would wait for yet another connection attempt, or open a
    /// connection beyond the cluster's limit, fails now instead of piling up. True when both
    /// slots (pending, connection) were taken.
    private func admitConnection(_ cluster: ClusterRuntime, for exchange: ProxyExchange) -> Bool {
        let load = cluster.load
        guard ClusterLoad.acquire(load.pending, limit: cluster.limits.maxPendingRequests) else {
            cluster.stats.overflowPending.increment()
            exchange.overflow(
                .overflow(
                    "cluster '\(cluster.config.name)': max_pending_requests \(cluster.limits.maxPendingRequests)"
                )
            )
            return false
        }
        guard ClusterLoad.acquire(load.connections, limit: cluster.limits.maxConnections) else {
            load.pending.wrappingDecrement(ordering: .relaxed)
            cluster.stats.overflowConnections.increment()
            exchange.overflow(
                .overflow("cluster '\(cluster.config.name)': max_connections \(cluster.limits.maxConnections)")
            )
            return false
        }
        return true
    }

    /// A client bootstrap for one connection to the cluster's endpoints.
    private func bootstrap(_ cluster: ClusterRuntime) -> ClientBootstrap {
        connector.bootstrap(on: eventLoop, connectTimeout: TimeAmount(truncating: cluster.config.connectTimeout))
    }

    private func connect(
        _ bootstrap: ClientBootstrap,
        to endpoint: ClusterRuntime.EndpointRuntime
    ) -> EventLoopFuture<any Channel> {
        UpstreamConnector.connect(
            bootstrap,
            to: endpoint.socketAddress,
            host: endpoint.config.address.host,
            port: endpoint.config.address.port
        )
    }

    /// The idle stack of an endpoint, from the recent slots when there.
    private func idleStack(_ endpoint: ClusterRuntime.EndpointRuntime) -> IdleStack {
        let address = UInt(bitPattern: ObjectIdentifier(endpoint))
        let slot = Int(truncatingIfNeeded: (address &* 0x9E37_79B9_7F4A_7C15) &>> 61)
        if let entry = recent[slot], entry.endpoint === endpoint, entry.stack.isListed { return entry.stack }
        let stack = idleStack(endpoint.key)
        recent[slot] = (endpoint, stack)
        return stack
    }

    /// The idle stack of an endpoint key (made, and listed, on first use).
    private func idleStack(_ key: String) -> IdleStack {
        if let stack = idle[key] { return stack }
        let stack = IdleStack(key: key)
        idle[key] = stack
        return stack
    }

    private func connect(
        endpoint: ClusterRuntime.EndpointRuntime,
        cluster: ClusterRuntime,
        for exchange: ProxyExchange,
        stack: IdleStack
    ) {
        guard admitConnection(cluster, for: exchange) else { return }
        let load = cluster.load
        let connection = UpstreamConnection(
            idleStack: stack,
            maxRequests: cluster.config.pool.maxRequestsPerConnection,
            maxIdle: cluster.config.pool.maxIdlePerEndpoint,
            idleTimeout: cluster.poolIdleTimeout,
            heads: heads
        )
        connection.accounting.load = load
        connection.pool = self
        let handlerBox = NIOLoopBound(connection, eventLoop: eventLoop)
        let bootstrap = bootstrap(cluster)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    // The connection writes requests and reads responses (HTTP1ResponseParser) itself.
                    try channel.pipeline.syncOperations.addHandler(handlerBox.value)
                }
            }
        let started = NIODeadline.now()
        let future = connect(bootstrap, to: endpoint)
        let attempt = exchange.currentTry
        future.assumeIsolated().whenComplete { result in
            load.pending.wrappingDecrement(ordering: .relaxed)
            switch result {
            case .success:
                connection.accounting.opened(cluster.stats, after: NIODeadline.now() - started)
                exchange.attach(connection, try: attempt)
            case .failure(let error):
                connection.releaseLoad()
                exchange.connectFailed(error, try: attempt)
            }
        }
    }

    // MARK: HTTP/2

    /// A stream on an HTTP/2 connection to the endpoint with room for one (the first connection
    /// opened is filled first), or on a new connection. `fresh`: on a new connection.
    private func acquireStream(
        endpoint: ClusterRuntime.EndpointRuntime,
        cluster: ClusterRuntime,
        for exchange: ProxyExchange,
        fresh: Bool
    ) {
        if !fresh, let connection = multiplexed[endpoint.key]?.first(where: { $0.available > 0 }) {
            exchange.attach(connection.makeStream(), try: exchange.currentTry)
            return
        }
        guard admitConnection(cluster, for: exchange) else { return }
        let load = cluster.load
        let connection = HTTP2UpstreamConnection(
            poolKey: endpoint.key,
            idleTimeout: cluster.poolIdleTimeout
        )
        connection.accounting.load = load
        connection.pool = self
        multiplexed[endpoint.key, default: []].append(connection)
        let handlerBox = NIOLoopBound(connection, eventLoop: eventLoop)
        let bootstrap = bootstrap(cluster).channelInitializer { channel in
            channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(handlerBox.value) }
        }
        let attempt = exchange.currentTry
        let started = NIODeadline.now()
        connect(bootstrap, to: endpoint).assumeIsolated().whenComplete { result in
            load.pending.wrappingDecrement(ordering: .relaxed)
            switch result {
            case .success:
                connection.accounting.opened(cluster.stats, after: NIODeadline.now() - started)
                exchange.attach(connection.makeStream(), try: attempt)
            case .failure(let error):
                connection.releaseLoad()
                self.remove(connection)
                exchange.connectFailed(error, try: attempt)
            }
        }
    }

    /// Forgets an HTTP/2 connection that closed or is going away.
    func remove(_ connection: HTTP2UpstreamConnection) {
        guard var list = multiplexed[connection.poolKey], let i = list.firstIndex(where: { $0 === connection }) else {
            return
        }
        list.remove(at: i)
        multiplexed[connection.poolKey] = list.isEmpty ? nil : list
    }

    /// Takes a connection back after an exchange; closes it instead when it cannot be reused or
    /// the endpoint already has its fill of idle connections.
    func release(_ connection: UpstreamConnection, maxIdle: Int, idleTimeout: TimeAmount) {
        connection.exchange = nil
        guard connection.canBeReused else {
            connection.close()
            return
        }
        var stack = connection.idleStack
        if !stack.isListed {
            // The sweep dropped the endpoint's stack while this connection was busy.
            stack = idleStack(stack.key)
            connection.idleStack = stack
        }
        guard stack.connections.count < maxIdle else {
            connection.close()
            return
        }
        connection.idleSince = .now()
        connection.idleLimit = idleTimeout
        stack.connections.append(connection)
    }

    /// Forgets a connection that closed.
    func remove(_ connection: UpstreamConnection) {
        let stack = connection.idleStack
        guard let i = stack.connections.firstIndex(where: { $0 === connection }) else { return }
        stack.connections.remove(at: i)
    }

    private func sweep() {
        let now = NIODeadline.now()
        for (key, list) in multiplexed {
            let keep = list.filter { c in
                if !c.isActive && c.isIdle { return false }
                if c.isIdle && now - c.idleSince >= c.idleTimeout {
                    c.close()
                    return false
                }
                return true
            }
            multiplexed[key] = keep.isEmpty ? nil : keep
        }
        for (key, stack) in idle {
            var expired: [UpstreamConnection] = []
            stack.connections.removeAll { c in
                if !c.isActive { return true }
                if let limit = c.idleLimit, now - c.idleSince >= limit {
                    expired.append(c)
                    return true
                }
                return false
            }
            // Closed once out of the stack: a close may call back into ``remove(_:)`` at once.
            for c in expired { c.close() }
            if stack.connections.isEmpty {
                stack.isListed = false
                idle[key] = nil
            }
        }
    }
}

/// The idle connections of one loop to one endpoint, most recently used last.
final class IdleStack {
    let key: String
    var connections: [UpstreamConnection] = []
    /// Whether the pool still lists it (the sweep drops empty stacks; a busy connection whose
    /// stack was dropped goes back to the endpoint's new one).
    var isListed = true

    init(key: String) {
        self.key = key
    }
}

@available(*, unavailable)
extension IdleStack: Sendable {}

@available(*, unavailable)
extension UpstreamPool: Sendable {}

/// What an upstream connection counts in while it lives: its cluster's connection count (the
/// `max_connections` breaker) from the moment it is opened, and the cluster's active-connection
/// metric once established. Released once, however the connection ended.
struct UpstreamConnectionAccounting {
    var load: ClusterLoad?
    private var stats: ClusterStats?

    mutating func opened(_ stats: ClusterStats, after elapsed: TimeAmount) {
        stats.connectionOpened(nanoseconds: elapsed.nanoseconds)
        self.stats = stats
    }

    mutating func release() {
        if let load {
            self.load = nil
            load.connections.wrappingDecrement(ordering: .relaxed)
        }
        if let stats {
            self.stats = nil
            stats.connectionsActive.decrement()
        }
    }
}
