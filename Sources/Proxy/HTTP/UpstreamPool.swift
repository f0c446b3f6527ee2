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
    private var idle: [String: [UpstreamConnection]] = [:]
    /// HTTP/2 connections per endpoint, busy or idle (streams are multiplexed on them).
    private var multiplexed: [String: [HTTP2UpstreamConnection]] = [:]
    private var sweeper: RepeatedTask?
    /// Every upstream socket gets the agent's mark (which the capture rules let through).
    private let connector: UpstreamConnector

    init(eventLoop: any EventLoop, mark: UInt32? = nil) {
        self.eventLoop = eventLoop
        self.connector = UpstreamConnector(mark: mark)
    }

    var idleCount: Int { idle.values.reduce(0) { $0 + $1.count } }

    /// Starts the sweeper that closes connections idle for longer than their cluster allows.
    func startSweeping(every interval: TimeAmount = .seconds(1)) {
        let bound = NIOLoopBound(self, eventLoop: eventLoop)
        sweeper = eventLoop.scheduleRepeatedTask(initialDelay: interval, delay: interval) { _ in
            bound.value.sweep()
        }
    }

    func shutdown() {
        sweeper?.cancel()
        for connections in idle.values { for c in connections { c.close() } }
        idle.removeAll()
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
        let idleTimeout = TimeAmount(cluster.config.pool.idleTimeout)
        let now = NIODeadline.now()
        // In place (`idle[key]?.popLast()`): a copy of the stack taken out and put back would
        // be a second reference, and the pop would copy every connection in it.
        while !fresh, let candidate = idle[endpoint.key]?.popLast() {
            if candidate.isActive && now - candidate.idleSince < idleTimeout {
                exchange.attach(candidate, try: exchange.currentTry)
                return
            }
            candidate.close()
        }
        connect(endpoint: endpoint, cluster: cluster, for: exchange)
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
        connector.bootstrap(on: eventLoop, connectTimeout: TimeAmount(cluster.config.connectTimeout))
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

    private func connect(endpoint: ClusterRuntime.EndpointRuntime, cluster: ClusterRuntime, for exchange: ProxyExchange)
    {
        guard admitConnection(cluster, for: exchange) else { return }
        let load = cluster.load
        let connection = UpstreamConnection(
            poolKey: endpoint.key,
            maxRequests: cluster.config.pool.maxRequestsPerConnection,
            maxIdle: cluster.config.pool.maxIdlePerEndpoint,
            idleTimeout: TimeAmount(cluster.config.pool.idleTimeout)
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
            idleTimeout: TimeAmount(cluster.config.pool.idleTimeout)
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
        guard (idle[connection.poolKey]?.count ?? 0) < maxIdle else {
            connection.close()
            return
        }
        connection.idleSince = .now()
        connection.idleLimit = idleTimeout
        idle[connection.poolKey, default: []].append(connection)  // in place, as in `acquire`
    }

    /// Forgets a connection that closed.
    func remove(_ connection: UpstreamConnection) {
        guard let i = idle[connection.poolKey]?.firstIndex(where: { $0 === connection }) else { return }
        idle[connection.poolKey]?.remove(at: i)
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
            let keep = stack.filter { c in
                if !c.isActive { return false }
                if let limit = c.idleLimit, now - c.idleSince >= limit {
                    c.close()
                    return false
                }
                return true
            }
            idle[key] = keep.isEmpty ? nil : keep
        }
    }
}

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
