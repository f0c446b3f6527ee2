import Atomics
import CoreMetrics
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import TrellisPolicy

/// One endpoint's active health, shared by the loops and kept across snapshots.
final class EndpointHealth: Sendable {
    let address: String
    /// Set after `unhealthyThreshold` failed probes, cleared after `healthyThreshold` good ones.
    let failing = ManagedAtomic<Bool>(false)
    /// Guarded by the prober: consecutive results of the current streak.
    let streak = NIOLockedValueBox<(successes: Int, failures: Int)>((0, 0))

    init(address: String) {
        self.address = address
    }
}

/// Probes the endpoints of every cluster that has a ``HealthCheck``, as the current snapshot
/// says: probes start for new endpoints and stop for gone ones when a snapshot is applied.
final class HealthChecker: Sendable {
    private struct Key: Hashable {
        let cluster: String
        let endpoint: String
    }

    private final class Probe: Sendable {
        let check: HealthCheck
        let task: NIOLockedValueBox<RepeatedTask?> = NIOLockedValueBox(nil)
        init(check: HealthCheck) { self.check = check }
    }

    private let group: any EventLoopGroup
    private let mark: UInt32?
    private let logger: Logger
    private let factory: any MetricsFactory
    private let resilience: ResilienceState
    private let probes = NIOLockedValueBox<[Key: Probe]>([:])
    private let stopped = ManagedAtomic<Bool>(false)

    init(group: any EventLoopGroup, mark: UInt32?, logger: Logger, stats: ProxyStats) {
        self.group = group
        self.mark = mark
        self.logger = logger
        self.factory = stats.factory
        self.resilience = stats.resilience
    }

    /// Starts and stops probes to match `snapshot`.
    func update(_ snapshot: ProxySnapshot) {
        guard !stopped.load(ordering: .relaxed) else { return }
        var wanted: [Key: (HealthCheck, ClusterRuntime.EndpointRuntime, ClusterRuntime)] = [:]
        for cluster in snapshot.clusters {
            guard let check = cluster.config.healthCheck else { continue }
            for endpoint in cluster.endpoints where endpoint.config.health != .draining {
                wanted[Key(cluster: cluster.config.name, endpoint: endpoint.key)] = (check, endpoint, cluster)
            }
        }
        let (toStop, toStart) = probes.withLockedValue { running -> ([Probe], [(Key, Probe)]) in
            var stop: [Probe] = []
            for (key, probe) in running where wanted[key]?.0 != probe.check {
                stop.append(probe)
                running.removeValue(forKey: key)
            }
            var start: [(Key, Probe)] = []
            for (key, value) in wanted where running[key] == nil {
                let probe = Probe(check: value.0)
                running[key] = probe
                start.append((key, probe))
            }
            return (stop, start)
        }
        for probe in toStop { probe.task.withLockedValue { $0?.cancel() } }
        for (key, probe) in toStart {
            let (check, endpoint, cluster) = wanted[key]!
            let record = resilience.health(cluster: key.cluster, endpoint: key.endpoint)
            let loop = group.next()
            let counters = (
                good: Counter(
                    label: "trellis_health_checks_total",
                    dimensions: [("cluster", key.cluster), ("result", "success")],
                    factory: factory
                ),
                bad: Counter(
                    label: "trellis_health_checks_total",
                    dimensions: [("cluster", key.cluster), ("result", "failure")],
                    factory: factory
                )
            )
            let target = endpoint.socketAddress
            let host = endpoint.config.address
            let clusterName = cluster.config.name
            // Spread the first probes over a tenth of the interval, then every interval.
            let jitter = Int64.random(in: 0...max(0, TimeAmount(truncating: check.interval).nanoseconds / 10))
            let task = loop.scheduleRepeatedAsyncTask(
                initialDelay: .nanoseconds(jitter),
                delay: TimeAmount(truncating: check.interval)
            ) { [weak self] _ -> EventLoopFuture<Void> in
                guard let self else { return loop.makeSucceededVoidFuture() }
                return self.probe(check, target: target, host: host, cluster: clusterName, on: loop).map { good in
                    self.report(good, record: record, check: check, cluster: clusterName, counters: counters)
                }
            }
            probe.task.withLockedValue { $0 = task }
        }
    }

    func shutdown() {
        stopped.store(true, ordering: .relaxed)
        let all = probes.withLockedValue { running in
            defer { running.removeAll() }
            return Array(running.values)
        }
        for probe in all { probe.task.withLockedValue { $0?.cancel() } }
    }

    private func report(
        _ good: Bool,
        record: EndpointHealth,
        check: HealthCheck,
        cluster: String,
        counters: (good: Counter, bad: Counter)
    ) {
        (good ? counters.good : counters.bad).increment()
        let change: Bool? = record.streak.withLockedValue { streak in
            if good {
                streak.successes += 1
                streak.failures = 0
                if record.failing.load(ordering: .relaxed) && streak.successes >= check.healthyThreshold {
                    record.failing.store(false, ordering: .relaxed)
                    return false
                }
            } else {
                streak.failures += 1
                streak.successes = 0
                if !record.failing.load(ordering: .relaxed) && streak.failures >= check.unhealthyThreshold {
                    record.failing.store(true, ordering: .relaxed)
                    return true
                }
            }
            return nil
        }
        if let failing = change {
            logger.notice(
                failing ? "endpoint failed its health checks" : "endpoint passes its health checks again",
                metadata: ["upstream.cluster": "\(cluster)", "upstream.endpoint": "\(record.address)"]
            )
        }
    }

    /// One probe: `true` when the endpoint answered as the check expects within its timeout.
    private func probe(
        _ check: HealthCheck,
        target: SocketAddress?,
        host: SocketEndpoint,
        cluster: String,
        on loop: any EventLoop
    ) -> EventLoopFuture<Bool> {
        let result = loop.makePromise(of: Bool.self)
        var bootstrap = UpstreamConnector(mark: mark).bootstrap(
            on: loop,
            connectTimeout: TimeAmount(truncating: check.timeout)
        )
        if case .http(let path, let hostHeader, let expected) = check.kind {
            bootstrap = bootstrap.channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    try channel.pipeline.syncOperations.addHandler(
                        StatusHandler(
                            path: path,
                            host: hostHeader ?? cluster,
                            expected: expected,
                            result: result
                        )
                    )
                }
            }
        }
        let connected = UpstreamConnector.connect(bootstrap, to: target, host: host.host, port: host.port)
        let deadline = loop.scheduleTask(in: TimeAmount(truncating: check.timeout)) { result.succeed(false) }
        connected.whenComplete { outcome in
            switch outcome {
            case .failure: result.succeed(false)
            case .success(let channel):
                if case .tcp = check.kind { result.succeed(true) }
                result.futureResult.whenComplete { _ in channel.close(promise: nil) }
            }
        }
        result.futureResult.whenComplete { _ in deadline.cancel() }
        return result.futureResult
    }

    /// Sends `GET path` once active and completes `result` with whether the status was expected.
    private final class StatusHandler: ChannelInboundHandler {
        typealias InboundIn = HTTPClientResponsePart
        typealias OutboundOut = HTTPClientRequestPart

        let path: String
        let host: String
        let expected: [ClosedRange<Int>]
        let result: EventLoopPromise<Bool>

        init(path: String, host: String, expected: [ClosedRange<Int>], result: EventLoopPromise<Bool>) {
            self.path = path
            self.host = host
            self.expected = expected
            self.result = result
        }

        func channelActive(context: ChannelHandlerContext) {
            var headers = HTTPHeaders()
            headers.add(name: "host", value: host)
            headers.add(name: "user-agent", value: "trellis-health-check")
            headers.add(name: "connection", value: "close")
            let head = HTTPRequestHead(version: .http1_1, method: .GET, uri: path, headers: headers)
            context.write(wrapOutboundOut(.head(head)), promise: nil)
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
            context.fireChannelActive()
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            if case .head(let head) = unwrapInboundIn(data) {
                let code = Int(head.status.code)
                result.succeed(expected.contains { $0.contains(code) })
            }
        }

        func channelInactive(context: ChannelHandlerContext) {
            result.succeed(false)  // no effect if already completed
            context.fireChannelInactive()
        }

        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            result.succeed(false)
            context.close(promise: nil)
        }
    }
}
