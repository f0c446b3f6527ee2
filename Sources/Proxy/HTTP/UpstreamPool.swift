import Atomics
import CoreMetrics
import NIOCore
import NIOHTTP1
import NIOPosix

/// The keep-alive connections of one event loop towards every upstream endpoint. Only that loop
/// touches it; requests never wait for another loop.
final class UpstreamPool {
    private let eventLoop: any EventLoop
    private var idle: [String: [UpstreamConnection]] = [:]
    private var sweeper: RepeatedTask?
    /// `SO_MARK` for every upstream socket (the agent's mark, which the capture rules let through).
    private let mark: UInt32?

    init(eventLoop: any EventLoop, mark: UInt32? = nil) {
        self.eventLoop = eventLoop
        self.mark = mark
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
        let idleTimeout = TimeAmount(cluster.config.pool.idleTimeout)
        let now = NIODeadline.now()
        while !fresh, var stack = idle[endpoint.key], let candidate = stack.popLast() {
            idle[endpoint.key] = stack
            if candidate.isActive && now - candidate.idleSince < idleTimeout {
                exchange.attach(candidate, try: exchange.currentTry)
                return
            }
            candidate.close()
        }
        connect(endpoint: endpoint, cluster: cluster, for: exchange)
    }

    private func connect(endpoint: ClusterRuntime.EndpointRuntime, cluster: ClusterRuntime, for exchange: ProxyExchange)
    {
        // Circuit breakers: a request that would wait for yet another connection attempt, or
        // open a connection beyond the cluster's limit, fails now instead of piling up.
        let load = cluster.load
        guard ClusterLoad.acquire(load.pending, limit: cluster.limits.maxPendingRequests) else {
            cluster.stats.overflowPending.increment()
            exchange.overflow(
                .overflow(
                    "cluster '\(cluster.config.name)': max_pending_requests \(cluster.limits.maxPendingRequests)"
                )
            )
            return
        }
        guard ClusterLoad.acquire(load.connections, limit: cluster.limits.maxConnections) else {
            load.pending.wrappingDecrement(ordering: .relaxed)
            cluster.stats.overflowConnections.increment()
            exchange.overflow(
                .overflow("cluster '\(cluster.config.name)': max_connections \(cluster.limits.maxConnections)")
            )
            return
        }
        let connection = UpstreamConnection(
            poolKey: endpoint.key,
            maxRequests: cluster.config.pool.maxRequestsPerConnection
        )
        connection.load = load
        connection.pool = self
        let handlerBox = NIOLoopBound(connection, eventLoop: eventLoop)
        var bootstrap = ClientBootstrap(group: eventLoop)
            .connectTimeout(TimeAmount(cluster.config.connectTimeout))
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
        if let mark {
            bootstrap = bootstrap.channelOption(.socketOption(.init(rawValue: SO_MARK)), value: SocketOptionValue(mark))
        }
        bootstrap =
            bootstrap
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    // The decoder sits after the encoder so that it sees each request head (a
                    // response to HEAD has no body); 1xx responses are relayed, not dropped.
                    try channel.pipeline.syncOperations.addHandlers([
                        HTTPRequestEncoder(),
                        ByteToMessageHandler(
                            HTTPResponseDecoder(
                                leftOverBytesStrategy: .forwardBytes,
                                informationalResponseStrategy: .forward
                            )
                        ),
                        handlerBox.value,
                    ])
                }
            }
        let future: EventLoopFuture<any Channel>
        if let address = endpoint.socketAddress {
            future = bootstrap.connect(to: address)
        } else {
            future = bootstrap.connect(host: endpoint.config.address.host, port: endpoint.config.address.port)
        }
        let attempt = exchange.currentTry
        future.assumeIsolated().whenComplete { result in
            load.pending.wrappingDecrement(ordering: .relaxed)
            switch result {
            case .success: exchange.attach(connection, try: attempt)
            case .failure(let error):
                connection.releaseLoad()
                exchange.connectFailed(error, try: attempt)
            }
        }
    }

    /// Takes a connection back after an exchange; closes it instead when it cannot be reused or
    /// the endpoint already has its fill of idle connections.
    func release(_ connection: UpstreamConnection, maxIdle: Int, idleTimeout: TimeAmount) {
        connection.exchange = nil
        guard connection.canBeReused else {
            connection.close()
            return
        }
        var stack = idle[connection.poolKey, default: []]
        guard stack.count < maxIdle else {
            connection.close()
            return
        }
        connection.idleSince = .now()
        connection.idleLimit = idleTimeout
        stack.append(connection)
        idle[connection.poolKey] = stack
    }

    /// Forgets a connection that closed.
    func remove(_ connection: UpstreamConnection) {
        guard var stack = idle[connection.poolKey], let i = stack.firstIndex(where: { $0 === connection }) else {
            return
        }
        stack.remove(at: i)
        idle[connection.poolKey] = stack
    }

    private func sweep() {
        let now = NIODeadline.now()
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
