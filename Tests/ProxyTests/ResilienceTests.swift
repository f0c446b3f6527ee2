import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import Testing
import TrellisPolicy
import TrellisTestSupport

@testable import Proxy

/// Rate limits and circuit breakers, seen from the client and the upstream.
@Suite struct ResilienceTests {
    let group = MultiThreadedEventLoopGroup.singleton

    private func limitedRoute(_ cluster: String, _ limit: RateLimit?) -> [VirtualHost] {
        [
            VirtualHost(
                name: "all",
                domains: ["*"],
                routes: [
                    Route(
                        name: "all",
                        match: RouteMatch(),
                        action: RouteAction(clusters: [.init(name: cluster)], timeout: .seconds(10), rateLimit: limit)
                    )
                ]
            )
        ]
    }

    /// `count` GET requests over `connections` keep-alive connections at once, as fast as they go.
    private func flood(
        port: Int,
        _ path: String,
        count: Int,
        connections: Int,
        headers: [(String, String)] = []
    )
        async throws -> [TestResponse]
    {
        try await withThrowingTaskGroup(of: [TestResponse].self) { tasks in
            for c in 0..<connections {
                tasks.addTask {
                    let client = try await TestHTTPClient.connect(port: port, group: group)
                    var responses: [TestResponse] = []
                    for _ in stride(from: c, to: count, by: connections) {
                        responses.append(try await client.request(.GET, path, headers: headers))
                    }
                    await client.close()
                    return responses
                }
            }
            var all: [TestResponse] = []
            for try await part in tasks { all += part }
            return all
        }
    }

    @Test func aBurstOfTenTimesTheLimitGets429sAndTheUpstreamSeesOnlyTheLimit() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        defer { Task { await a.stop() } }
        let limit = RateLimit(requestsPerSecond: 20, burst: 20)
        let proxy = try await ProxyHarness.start(
            gatewayConfig(
                virtualHosts: limitedRoute("alpha", limit),
                clusters: [ClusterConfig(name: "alpha", endpoints: [endpoint(a)])]
            ),
            group: group
        )
        defer { Task { await proxy.stop() } }
        let started = ContinuousClock.now
        let responses = try await flood(port: proxy.port, "/", count: 200, connections: 8)
        let elapsed = ContinuousClock.now - started
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        let passed = responses.filter { $0.status == .ok }.count
        let limited = responses.filter { $0.status == .tooManyRequests }
        #expect(passed + limited.count == 200, "every request is answered, either way")
        // The bucket's 20, plus what refilled while the flood lasted; nothing more reached alpha.
        #expect(passed >= 20)
        #expect(Double(passed) <= 20 + 20 * seconds + 1, "passed \(passed) in \(seconds) s")
        #expect(a.requestCount == passed)
        for r in limited {
            #expect(r.body == "rate_limited\n")
            #expect(r.headers.first(name: "x-trellis-error") == "rate_limited")
            #expect(Int(r.headers.first(name: "retry-after") ?? "") ?? 0 >= 1)
        }
        #expect(
            try await proxy.metric("trellis_rate_limited_total{scope=\"route test/all/all\"}", group: group)
                == Double(limited.count)
        )
        #expect(
            try await proxy.metric("trellis_errors_total{token=\"rate_limited\"}", group: group)
                == Double(limited.count)
        )
    }

    /// Over three seconds at about three times the rate, from connections spread over several
    /// event loops, the requests let through stay within the configured rate.
    @Test func theRateHoldsAcrossEventLoops() async throws {
        let loops = MultiThreadedEventLoopGroup(numberOfThreads: 4)
        let a = try await TestUpstream.start(name: "alpha", group: group)
        defer { Task { await a.stop() } }
        let config = alphaGateway(a, rateLimit: RateLimit(requestsPerSecond: 50, burst: 10))
        try await withProxy(config, loops: loops) { proxy in try await measureRate(proxy, upstream: a) }
    }

    /// A gateway sending every request to cluster `alpha`: `upstream`, with these limits.
    private func alphaGateway(
        _ upstream: TestUpstream,
        rateLimit: RateLimit? = nil,
        circuitBreakers: CircuitBreakers? = nil
    ) -> ProxyConfig {
        gatewayConfig(
            virtualHosts: catchAll("alpha"),
            clusters: [
                ClusterConfig(
                    name: "alpha",
                    endpoints: [endpoint(upstream)],
                    circuitBreakers: circuitBreakers,
                    rateLimit: rateLimit
                )
            ]
        )
    }

    /// Runs `body` with a proxy on its own event loops, then stops the proxy before the loops (a
    /// deferred Task could race them), whether `body` returned or threw.
    private func withProxy(
        _ config: ProxyConfig,
        loops: MultiThreadedEventLoopGroup,
        _ body: (ProxyHarness) async throws -> Void
    ) async throws {
        let proxy = try await ProxyHarness.start(config, group: loops)
        do {
            try await body(proxy)
        } catch {
            await proxy.stop()
            try await loops.shutdownGracefully()
            throw error
        }
        await proxy.stop()
        try await loops.shutdownGracefully()
    }

    private func measureRate(_ proxy: ProxyHarness, upstream a: TestUpstream) async throws {
        let started = ContinuousClock.now
        let deadline = started + .seconds(3)
        let (passed, sends) = try await withThrowingTaskGroup(of: (Int, [ContinuousClock.Instant]).self) { tasks in
            for _ in 0..<6 {
                tasks.addTask {
                    let client = try await TestHTTPClient.connect(port: proxy.port, group: group)
                    var ok = 0
                    var sends: [ContinuousClock.Instant] = []
                    // ~25 requests per second per connection: 150/s in all, three times the rate.
                    while ContinuousClock.now < deadline {
                        sends.append(.now)
                        if try await client.request(.GET, "/").status == .ok { ok += 1 }
                        try await Task.sleep(for: .milliseconds(40))
                    }
                    await client.close()
                    return (ok, sends)
                }
            }
            return try await tasks.reduce((0, [])) { ($0.0 + $1.0, $0.1 + $1.1) }
        }
        let sent = sends.count
        let elapsed = ContinuousClock.now - started
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        let allowed = 10 + 50 * seconds
        #expect(Double(passed) <= allowed + 1, "passed \(passed), allowed \(allowed)")
        // And not much less than an exact bucket lets through at the times the requests were sent
        // (a client stalled by a loaded machine leaves gaps in which a full bucket loses tokens;
        // the proxy sees each request a little after it was sent, hence the margin).
        let expected = Self.passedByExactBucket(sends.sorted(), since: started, perSecond: 50, burst: 10)
        #expect(
            Double(passed) >= 0.85 * Double(expected) - 2,
            "passed \(passed) of \(sent), an exact bucket passes \(expected)"
        )
        #expect(a.requestCount == passed)
        if Double(sent) > allowed + 1 {
            #expect(try await proxy.metric("trellis_rate_limited_total{scope=\"cluster alpha\"}", group: group) > 0)
        }
    }

    /// How many of the requests arriving at `arrivals` a token bucket, full at `start`, lets through.
    private static func passedByExactBucket(
        _ arrivals: [ContinuousClock.Instant],
        since start: ContinuousClock.Instant,
        perSecond rate: Double,
        burst: Double
    ) -> Int {
        var tokens = burst
        var last = start
        var passed = 0
        for at in arrivals where at >= start {
            let gap = at - last
            let seconds = Double(gap.components.seconds) + Double(gap.components.attoseconds) / 1e18
            tokens = min(burst, tokens + seconds * rate)
            last = at
            if tokens >= 1 {
                tokens -= 1
                passed += 1
            }
        }
        return passed
    }

    @Test func aLimitPerHeaderValueGivesEachValueItsOwnBucket() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        defer { Task { await a.stop() } }
        let limit = RateLimit(requestsPerSecond: 0.1, burst: 2, key: .header("x-api-key"))
        let proxy = try await ProxyHarness.start(
            gatewayConfig(
                virtualHosts: limitedRoute("alpha", limit),
                clusters: [ClusterConfig(name: "alpha", endpoints: [endpoint(a)])]
            ),
            group: group
        )
        defer { Task { await proxy.stop() } }
        func statuses(_ key: String?, _ n: Int) async throws -> [UInt] {
            var result: [UInt] = []
            for _ in 0..<n {
                let headers = key.map { [("x-api-key", $0)] } ?? []
                result.append(
                    try await TestHTTPClient.get(port: proxy.port, "/", headers: headers, group: group).status.code
                )
            }
            return result
        }
        #expect(try await statuses("tenant-a", 3) == [200, 200, 429])
        #expect(try await statuses("tenant-b", 2) == [200, 200])
        // Without the header: one shared bucket, limited like any other key.
        #expect(try await statuses(nil, 3) == [200, 200, 429])
        let refused = try await TestHTTPClient.get(
            port: proxy.port,
            "/",
            headers: [("x-api-key", "tenant-a")],
            group: group
        )
        // One token every 10 s: the client is told to come back in up to 10 s.
        let retryAfter = Int(refused.headers.first(name: "retry-after") ?? "") ?? 0
        #expect((1...10).contains(retryAfter), "retry-after \(retryAfter)")
    }

    /// A reload that keeps a limit keeps its bucket (a reload is not a way around the limit);
    /// a reload that changes it starts a fresh one.
    @Test func aReloadKeepsTheBucketOfAnUnchangedLimit() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        defer { Task { await a.stop() } }
        func config(_ version: String, burst: Int) -> ProxyConfig {
            var c = gatewayConfig(
                virtualHosts: limitedRoute("alpha", RateLimit(requestsPerSecond: 0.01, burst: burst)),
                clusters: [ClusterConfig(name: "alpha", endpoints: [endpoint(a)])]
            )
            c.version = version
            return c
        }
        let proxy = try await ProxyHarness.start(config("1", burst: 1), group: group)
        defer { Task { await proxy.stop() } }
        #expect(try await TestHTTPClient.get(port: proxy.port, "/", group: group).status == .ok)
        #expect(try await TestHTTPClient.get(port: proxy.port, "/", group: group).status == .tooManyRequests)
        try await proxy.apply(config("2", burst: 1))
        #expect(try await TestHTTPClient.get(port: proxy.port, "/", group: group).status == .tooManyRequests)
        try await proxy.apply(config("3", burst: 2))
        #expect(try await TestHTTPClient.get(port: proxy.port, "/", group: group).status == .ok)
        #expect(try await TestHTTPClient.get(port: proxy.port, "/", group: group).status == .ok)
        #expect(try await TestHTTPClient.get(port: proxy.port, "/", group: group).status == .tooManyRequests)
    }

    @Test func requestsBeyondMaxRequestsOverflowAtOnceAndTheSlotsComeBack() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        defer { Task { await a.stop() } }
        let proxy = try await ProxyHarness.start(
            alphaGateway(a, circuitBreakers: CircuitBreakers(maxRequests: 2)),
            group: group
        )
        defer { Task { await proxy.stop() } }
        let slow = (0..<2).map { _ in
            Task { try await TestHTTPClient.get(port: proxy.port, "/delay/1500", group: group).status }
        }
        #expect(await Peers.eventually(within: .seconds(3)) { a.requestCount == 2 })
        let started = ContinuousClock.now
        let third = try await TestHTTPClient.get(port: proxy.port, "/", group: group)
        #expect(third.status == .serviceUnavailable)
        #expect(third.body == "overflow\n")
        #expect(ContinuousClock.now - started < .milliseconds(1000), "answered at once, not after the slow ones")
        for task in slow { #expect(try await task.value == .ok) }
        // The slow requests gave their slots back.
        #expect(try await TestHTTPClient.get(port: proxy.port, "/", group: group).status == .ok)
        #expect(
            try await proxy.metric(
                "trellis_upstream_overflow_total{cluster=\"alpha\",limit=\"max_requests\"}",
                group: group
            ) == 1
        )
        #expect(a.requestCount == 3)
    }

    /// Idle connections are kept per endpoint address: round robin over three endpoints reuses
    /// one connection to each, and so do the endpoints of a new configuration with the same
    /// addresses (new objects for the same keys).
    @Test func pooledConnectionsAreKeptPerEndpointAcrossConfigurations() async throws {
        let loop = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        var upstreams: [TestUpstream] = []
        for name in ["alpha", "beta", "gamma"] {
            upstreams.append(try await TestUpstream.start(name: name, group: group))
        }
        defer { for u in upstreams { Task { await u.stop() } } }
        let config = { (lb: LoadBalancingPolicy) in
            gatewayConfig(
                virtualHosts: catchAll("all"),
                clusters: [ClusterConfig(name: "all", loadBalancing: lb, endpoints: upstreams.map { endpoint($0) })]
            )
        }
        try await withProxy(config(.roundRobin), loops: loop) { proxy in
            for _ in 0..<9 { #expect(try await TestHTTPClient.get(port: proxy.port, "/", group: group).status == .ok) }
            #expect(upstreams.map(\.requestCount) == [3, 3, 3])
            try await proxy.apply(config(.random))
            for _ in 0..<30 { #expect(try await TestHTTPClient.get(port: proxy.port, "/", group: group).status == .ok) }
            #expect(upstreams.map(\.requestCount).reduce(0, +) == 39)
            #expect(upstreams.map(\.connections) == [1, 1, 1])
        }
    }

    /// Pools are per event loop, the limit is for the whole proxy: on one loop, the one
    /// connection allowed serves every request in turn.
    @Test func connectionsBeyondMaxConnectionsOverflowAndPooledOnesAreReused() async throws {
        let loop = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let a = try await TestUpstream.start(name: "alpha", group: group)
        defer { Task { await a.stop() } }
        let config = alphaGateway(a, circuitBreakers: CircuitBreakers(maxConnections: 1))
        try await withProxy(config, loops: loop) { proxy in
            let slow = Task { try await TestHTTPClient.get(port: proxy.port, "/delay/1000", group: group).status }
            #expect(await Peers.eventually(within: .seconds(3)) { a.requestCount == 1 })
            let second = try await TestHTTPClient.get(port: proxy.port, "/", group: group)
            #expect(second.status == .serviceUnavailable)
            #expect(second.body == "overflow\n")
            #expect(try await slow.value == .ok)
            // The one connection went back to the pool; the next requests reuse it.
            for _ in 0..<3 {
                #expect(try await TestHTTPClient.get(port: proxy.port, "/", group: group).status == .ok)
            }
            #expect(a.connections == 1)
            #expect(
                try await proxy.metric(
                    "trellis_upstream_overflow_total{cluster=\"alpha\",limit=\"max_connections\"}",
                    group: group
                ) == 1
            )
        }
    }

    @Test func noPendingRequestsAllowedMeansNoNewConnection() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        defer { Task { await a.stop() } }
        let proxy = try await ProxyHarness.start(
            alphaGateway(a, circuitBreakers: CircuitBreakers(maxPendingRequests: 0)),
            group: group
        )
        defer { Task { await proxy.stop() } }
        let r = try await TestHTTPClient.get(port: proxy.port, "/", group: group)
        #expect(r.status == .serviceUnavailable)
        #expect(r.body == "overflow\n")
        #expect(a.connections == 0)
        #expect(
            try await proxy.metric(
                "trellis_upstream_overflow_total{cluster=\"alpha\",limit=\"max_pending_requests\"}",
                group: group
            ) == 1
        )
    }

    /// The cascading failure the mesh exists to stop: a caller with a fixed pool of workers calls
    /// a slow dependency and a healthy one. Unprotected, the slow calls hold every worker and the
    /// healthy service's calls starve; with a circuit breaker and a timeout on the slow one, its
    /// calls fail fast and the healthy calls keep flowing.
    @Test func aSlowDependencyNoLongerDragsTheCallerDownOnceBreakerAndTimeoutAreSet() async throws {
        let slow = try await TestUpstream.start(name: "slow", group: group)
        let fast = try await TestUpstream.start(name: "fast", group: group)
        defer {
            Task {
                await slow.stop()
                await fast.stop()
            }
        }
        func config(protected: Bool) -> ProxyConfig {
            gatewayConfig(
                virtualHosts: [
                    VirtualHost(
                        name: "slow",
                        domains: ["slow"],
                        routes: [
                            Route(
                                name: "slow",
                                match: RouteMatch(),
                                action: RouteAction(
                                    clusters: [.init(name: "slow")],
                                    timeout: protected ? .milliseconds(300) : .seconds(30)
                                )
                            )
                        ]
                    ),
                    VirtualHost(
                        name: "fast",
                        domains: ["fast"],
                        routes: [
                            Route(
                                name: "fast",
                                match: RouteMatch(),
                                action: RouteAction(clusters: [.init(name: "fast")])
                            )
                        ]
                    ),
                ],
                clusters: [
                    ClusterConfig(
                        name: "slow",
                        endpoints: [endpoint(slow)],
                        circuitBreakers: protected ? CircuitBreakers(maxRequests: 2) : nil
                    ),
                    ClusterConfig(name: "fast", endpoints: [endpoint(fast)]),
                ]
            )
        }
        /// 8 workers for 3 s, each calling slow then fast in turn; returns the fast calls that succeeded.
        func run(_ port: Int) async throws -> Int {
            let deadline = ContinuousClock.now + .seconds(3)
            return try await withThrowingTaskGroup(of: Int.self) { workers in
                for _ in 0..<8 {
                    workers.addTask {
                        var ok = 0
                        while ContinuousClock.now < deadline {
                            _ = try? await TestHTTPClient.get(port: port, "/delay/5000", host: "slow", group: group)
                            if ContinuousClock.now >= deadline { break }
                            let r = try await TestHTTPClient.get(port: port, "/", host: "fast", group: group)
                            if r.status == .ok { ok += 1 }
                        }
                        return ok
                    }
                }
                return try await workers.reduce(0, +)
            }
        }
        let unprotected = try await ProxyHarness.start(config(protected: false), group: group)
        // Workers stuck on 5 s answers: each gets at most one fast call in (after its first slow one).
        let starved = try await run(unprotected.port)
        await unprotected.stop()
        let protected = try await ProxyHarness.start(config(protected: true), group: group)
        defer { Task { await protected.stop() } }
        let flowing = try await run(protected.port)
        #expect(starved == 0, "unprotected: \(starved) fast calls")
        #expect(flowing >= 30, "protected: \(flowing) fast calls")
        #expect(
            try await protected.metric(
                "trellis_upstream_overflow_total{cluster=\"slow\",limit=\"max_requests\"}",
                group: group
            ) > 0
        )
    }
}

/// Outlier detection: failing endpoints leave the load balancer for a while, then come back.
@Suite struct OutlierDetectionTests {
    let group = MultiThreadedEventLoopGroup.singleton

    private func config(_ endpoints: [Endpoint], _ outlier: OutlierDetection) -> ProxyConfig {
        gatewayConfig(
            virtualHosts: catchAll("pool"),
            clusters: [ClusterConfig(name: "pool", endpoints: endpoints, outlierDetection: outlier)]
        )
    }

    @Test func anEndpointAnswering5xxIsEjected() async throws {
        let good = try await TestUpstream.start(name: "good", group: group)
        let bad = try await TestUpstream.start(name: "bad", group: group)
        defer {
            Task {
                await good.stop()
                await bad.stop()
            }
        }
        bad.failing(with: 503)
        let proxy = try await ProxyHarness.start(
            config(
                [endpoint(good), endpoint(bad)],
                OutlierDetection(consecutiveErrors: 3, baseEjectionTime: .seconds(60), maxEjectionPercent: 50)
            ),
            group: group
        )
        defer { Task { await proxy.stop() } }
        var statuses: [UInt] = []
        for _ in 0..<30 {
            statuses.append(try await TestHTTPClient.get(port: proxy.port, "/", group: group).status.code)
        }
        // Three 503s in a row from 'bad' eject it; every later request goes to 'good'.
        #expect(statuses.filter { $0 == 503 }.count == 3, "\(statuses)")
        #expect(Array(statuses.suffix(20)).allSatisfy { $0 == 200 }, "\(statuses)")
        #expect(bad.requestCount == 3)
        #expect(
            try await proxy.metric(
                "trellis_outlier_ejections_total{cluster=\"pool\",reason=\"consecutive_errors\"}",
                group: group
            ) == 1
        )
        let dump = try await TestHTTPClient.get(port: proxy.adminPort, "/config_dump", group: group).body
        #expect(dump.contains("\"outlier_ejections\""), "\(dump.prefix(200))")
        #expect(dump.contains("\"endpoint\" : \"127.0.0.1:\(bad.port)\""))
    }

    @Test func anEjectedEndpointComesBackAfterTheEjectionTime() async throws {
        let good = try await TestUpstream.start(name: "good", group: group)
        let bad = try await TestUpstream.start(name: "bad", group: group)
        defer {
            Task {
                await good.stop()
                await bad.stop()
            }
        }
        bad.failing(with: 503)
        let proxy = try await ProxyHarness.start(
            config(
                [endpoint(good), endpoint(bad)],
                OutlierDetection(consecutiveErrors: 1, baseEjectionTime: .seconds(1), maxEjectionPercent: 50)
            ),
            group: group
        )
        defer { Task { await proxy.stop() } }
        for _ in 0..<20 where bad.requestCount == 0 {
            _ = try await TestHTTPClient.get(port: proxy.port, "/", group: group)
        }
        let ejected = try await TestHTTPClient.get(port: proxy.adminPort, "/config_dump", group: group).body
        #expect(ejected.contains("\"endpoint\" : \"127.0.0.1:\(bad.port)\""))
        // Healed: once its ejection is over it gets requests again, and is listed no more.
        bad.failing(with: nil)
        let hit = bad.requestCount
        #expect(
            await Peers.eventually(within: .seconds(10)) {
                _ = try? await TestHTTPClient.get(port: proxy.port, "/", group: group)
                return bad.requestCount > hit
            }
        )
        let after = try await TestHTTPClient.get(port: proxy.adminPort, "/config_dump", group: group).body
        #expect(!after.contains("127.0.0.1:\(bad.port)\""))
    }

    @Test func atMostTheMaximumShareOfEndpointsIsOut() async throws {
        let upstreams = try await withThrowingTaskGroup(of: TestUpstream.self) { g in
            for i in 0..<4 { g.addTask { try await TestUpstream.start(name: "u\(i)", group: group) } }
            return try await g.reduce(into: []) { $0.append($1) }
        }
        defer { Task { for u in upstreams { await u.stop() } } }
        for u in upstreams { u.failing(with: 500) }
        let proxy = try await ProxyHarness.start(
            config(
                upstreams.map { endpoint($0) },
                OutlierDetection(
                    consecutiveErrors: 1,
                    interval: .seconds(60),
                    baseEjectionTime: .seconds(30),
                    maxEjectionPercent: 50
                )
            ),
            group: group
        )
        defer { Task { await proxy.stop() } }
        for _ in 0..<20 { _ = try await TestHTTPClient.get(port: proxy.port, "/", group: group) }
        // All four fail, but only half of them may be out at once.
        let ejected = try await proxy.metric(
            "trellis_outlier_ejections_total{cluster=\"pool\",reason=\"consecutive_errors\"}",
            group: group
        )
        #expect(ejected == 2)
        let dump = try await TestHTTPClient.get(port: proxy.adminPort, "/config_dump", group: group).body
        #expect(dump.components(separatedBy: "\"seconds_left\"").count - 1 == 2, "\(dump)")
    }

    @Test func anEndpointFarBelowItsPeersSuccessRateIsEjected() async throws {
        let upstreams = try await withThrowingTaskGroup(of: TestUpstream.self) { g in
            for i in 0..<5 { g.addTask { try await TestUpstream.start(name: "u\(i)", group: group) } }
            return try await g.reduce(into: []) { $0.append($1) }
        }
        defer { Task { for u in upstreams { await u.stop() } } }
        let proxy = try await ProxyHarness.start(
            config(
                upstreams.map { endpoint($0) },
                OutlierDetection(
                    consecutiveErrors: 1_000,
                    interval: .seconds(1),
                    baseEjectionTime: .seconds(30),
                    maxEjectionPercent: 20,
                    successRate: .init(minimumHosts: 5, requestVolume: 4, stdevFactor: 1.5)
                )
            ),
            group: group
        )
        defer { Task { await proxy.stop() } }
        // u0 fails about half of its requests (never 1000 in a row): only its rate gives it away.
        let client = try await TestHTTPClient.connect(port: proxy.port, group: group)
        // Bounded by time; the metric is read every 10 requests, so that on a loaded machine the
        // requests (not the metric renderings) fill each 1 s interval's volume.
        let deadline = ContinuousClock.now + .seconds(20)
        var n = 0
        while ContinuousClock.now < deadline {
            upstreams[0].failing(with: n % 2 == 0 ? 500 : nil)
            _ = try await client.request(.GET, "/")
            n += 1
            if n % 10 == 0,
                try await proxy.metric(
                    "trellis_outlier_ejections_total{cluster=\"pool\",reason=\"success_rate\"}",
                    group: group
                ) == 1
            {
                break
            }
        }
        await client.close()
        #expect(
            try await proxy.metric(
                "trellis_outlier_ejections_total{cluster=\"pool\",reason=\"success_rate\"}",
                group: group
            ) == 1
        )
        let dump = try await TestHTTPClient.get(port: proxy.adminPort, "/config_dump", group: group).body
        #expect(dump.contains("\"endpoint\" : \"127.0.0.1:\(upstreams[0].port)\""), "\(dump)")
    }
}

/// Retries: what the client sees when tries fail, and what the upstreams see.
@Suite struct RetryTests {
    let group = MultiThreadedEventLoopGroup.singleton

    private func config(
        _ endpoints: [Endpoint],
        retry: RetryPolicy?,
        timeout: Duration = .seconds(10),
        breakers: CircuitBreakers? = nil
    ) -> ProxyConfig {
        gatewayConfig(
            virtualHosts: [
                VirtualHost(
                    name: "all",
                    domains: ["*"],
                    routes: [
                        Route(
                            name: "all",
                            match: RouteMatch(),
                            action: RouteAction(clusters: [.init(name: "pool")], timeout: timeout, retryPolicy: retry)
                        )
                    ]
                )
            ],
            clusters: [ClusterConfig(name: "pool", endpoints: endpoints, circuitBreakers: breakers)]
        )
    }

    /// One request at a time on one connection: each request's tries follow each other.
    private func statuses(
        _ proxy: ProxyHarness,
        _ n: Int,
        method: HTTPMethod = .GET,
        path: String = "/"
    ) async throws
        -> [UInt]
    {
        let client = try await TestHTTPClient.connect(port: proxy.port, group: group)
        var result: [UInt] = []
        for _ in 0..<n { result.append(try await client.request(method, path).status.code) }
        await client.close()
        return result
    }

    @Test func retriesMakeAThirtyPercentFailingUpstreamLookHealthy() async throws {
        let flaky = try await TestUpstream.start(name: "flaky", group: group)
        defer { Task { await flaky.stop() } }
        flaky.failing(with: 503, whenCountIn: [0, 3, 6])
        // Without retries the client sees the failures…
        let bare = try await ProxyHarness.start(config([endpoint(flaky)], retry: nil), group: group)
        let seen = try await statuses(bare, 100)
        await bare.stop()
        #expect(seen.filter { $0 == 503 }.count == 30)
        // …with one retry on gateway errors it sees none, for 30 % more upstream requests.
        let before = flaky.requestCount
        let proxy = try await ProxyHarness.start(
            config([endpoint(flaky)], retry: RetryPolicy(retryOn: [.gatewayError], numRetries: 1)),
            group: group
        )
        defer { Task { await proxy.stop() } }
        let healed = try await statuses(proxy, 100)
        #expect(healed.allSatisfy { $0 == 200 }, "\(healed)")
        // 30 % of the upstream's requests fail, retries included: 100 / 0.7 ≈ 143 in all.
        let retries = try await proxy.metric("trellis_upstream_retries_total{cluster=\"pool\"}", group: group)
        #expect(flaky.requestCount - before == 100 + Int(retries))
        #expect((40...45).contains(Int(retries)), "\(retries) retries")
    }

    @Test func aRetryGoesToAnotherEndpointAndExhaustedRetriesPassTheAnswerOn() async throws {
        let good = try await TestUpstream.start(name: "good", group: group)
        let bad = try await TestUpstream.start(name: "bad", group: group)
        defer {
            Task {
                await good.stop()
                await bad.stop()
            }
        }
        bad.failing(with: 502)
        let proxy = try await ProxyHarness.start(
            config([endpoint(good), endpoint(bad)], retry: RetryPolicy(numRetries: 1)),
            group: group
        )
        defer { Task { await proxy.stop() } }
        let result = try await statuses(proxy, 20)
        #expect(result.allSatisfy { $0 == 200 }, "\(result)")
        #expect(good.requestCount == 20, "every request ends on the good one, tried there once")
        #expect(bad.requestCount > 0)
        // Both failing: the retry fails too, and the client gets the upstream's own answer.
        good.failing(with: 503)
        let failing = try await TestHTTPClient.get(port: proxy.port, "/", group: group)
        #expect(failing.status == .serviceUnavailable || failing.status == .badGateway)
        #expect(failing.headers.first(name: "x-trellis-error") == nil, "the upstream's answer, not the proxy's")
    }

    @Test func aRefusedConnectionIsRetriedEvenForAPost() async throws {
        let good = try await TestUpstream.start(name: "good", group: group)
        // A port that refuses connections and that nothing else (the harness's admin listener on
        // port 0) can take meanwhile: a stopped server's port once went to it.
        let gone = try BlackholeListener(listening: false)
        defer { gone.close() }
        defer { Task { await good.stop() } }
        let proxy = try await ProxyHarness.start(
            config(
                [Endpoint(address: .init(host: "127.0.0.1", port: gone.port)), endpoint(good)],
                retry: RetryPolicy(retryOn: [.connectFailure], numRetries: 1)
            ),
            group: group
        )
        defer { Task { await proxy.stop() } }
        let client = try await TestHTTPClient.connect(port: proxy.port, group: group)
        for _ in 0..<10 {
            let r = try await client.request(.POST, "/count", body: "hello")
            #expect(r.status == .ok)
            #expect(r.body == "5", "the body reached the upstream whole")
        }
        await client.close()
        #expect(good.requestCount == 10)
        #expect(try await proxy.metric("trellis_upstream_retries_total{cluster=\"pool\"}", group: group) > 0)
    }

    @Test func aPostThatReachedTheUpstreamIsRetriedOnlyWhenTheRouteSaysSo() async throws {
        let up = try await TestUpstream.start(name: "up", group: group)
        defer { Task { await up.stop() } }
        up.failing(with: 503, whenCountIn: [0, 2, 4, 6, 8])
        let strict = try await ProxyHarness.start(config([endpoint(up)], retry: RetryPolicy()), group: group)
        let first = try await statuses(strict, 2, method: .POST, path: "/count")
        await strict.stop()
        #expect(first == [503, 200], "the POST that failed was not sent again")
        #expect(up.requestCount == 2)
        var lenient = RetryPolicy()
        lenient.retryNonIdempotent = true
        let proxy = try await ProxyHarness.start(config([endpoint(up)], retry: lenient), group: group)
        defer { Task { await proxy.stop() } }
        let second = try await statuses(proxy, 2, method: .POST, path: "/count")
        #expect(second == [200, 200])
        #expect(up.requestCount == 6, "each POST failed once and was sent again")
    }

    @Test func aSlowTryIsAbandonedAtThePerTryTimeoutAndRetriedElsewhere() async throws {
        let slow = try await TestUpstream.start(name: "slow", group: group)
        let quick = try await TestUpstream.start(name: "quick", group: group)
        defer {
            Task {
                await slow.stop()
                await quick.stop()
            }
        }
        slow.delaying(6000)
        var policy = RetryPolicy(retryOn: [.gatewayError], numRetries: 1)
        policy.perTryTimeout = .seconds(1)  // not less: a loaded 2-core CI machine
        let proxy = try await ProxyHarness.start(
            config([endpoint(slow), endpoint(quick)], retry: policy, timeout: .seconds(4)),
            group: group
        )
        defer { Task { await proxy.stop() } }
        for _ in 0..<4 {
            let started = ContinuousClock.now
            let r = try await TestHTTPClient.get(port: proxy.port, "/", group: group)
            #expect(r.status == .ok)
            #expect(r.body == "quick")
            #expect(ContinuousClock.now - started < .seconds(3), "did not wait for the slow one's 6 s")
        }
        // Both slow: the try and its retry time out; the client gets 504 within the route timeout.
        quick.delaying(6000)
        let late = try await TestHTTPClient.get(port: proxy.port, "/", group: group)
        #expect(late.status == .gatewayTimeout)
        #expect(late.body == "timeout\n")
    }

    @Test func retriesStayWithinTheCircuitBreaker() async throws {
        let up = try await TestUpstream.start(name: "up", group: group)
        defer { Task { await up.stop() } }
        up.failing(with: 503)
        let proxy = try await ProxyHarness.start(
            config([endpoint(up)], retry: RetryPolicy(numRetries: 3), breakers: CircuitBreakers(maxRetries: 0)),
            group: group
        )
        defer { Task { await proxy.stop() } }
        #expect(try await statuses(proxy, 3) == [503, 503, 503])
        #expect(up.requestCount == 3, "no retry was allowed")
        #expect(
            try await proxy.metric(
                "trellis_upstream_overflow_total{cluster=\"pool\",limit=\"max_retries\"}",
                group: group
            ) == 3
        )
    }
}

/// Faults injected on purpose by a route.
@Suite struct FaultInjectionTests {
    let group = MultiThreadedEventLoopGroup.singleton

    private func config(
        _ upstream: TestUpstream,
        _ fault: FaultInjection,
        timeout: Duration = .seconds(5)
    ) -> ProxyConfig {
        gatewayConfig(
            virtualHosts: [
                VirtualHost(
                    name: "all",
                    domains: ["*"],
                    routes: [
                        Route(
                            name: "all",
                            match: RouteMatch(),
                            action: RouteAction(clusters: [.init(name: "alpha")], timeout: timeout, fault: fault)
                        )
                    ]
                )
            ],
            clusters: [ClusterConfig(name: "alpha", endpoints: [endpoint(upstream)])]
        )
    }

    @Test func abortsTheGivenShareWithTheGivenStatus() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        defer { Task { await a.stop() } }
        let proxy = try await ProxyHarness.start(
            config(a, FaultInjection(abortStatus: 418, abortPercent: 50)),
            group: group
        )
        defer { Task { await proxy.stop() } }
        let client = try await TestHTTPClient.connect(port: proxy.port, group: group)
        var aborted = 0
        for _ in 0..<200 {
            let r = try await client.request(.GET, "/")
            if r.status.code == 418 {
                aborted += 1
                #expect(r.body == "fault_abort\n")
            } else {
                #expect(r.status == .ok)
            }
        }
        await client.close()
        // 50 % of 200: 100 expected; 65...135 holds with overwhelming probability.
        #expect((65...135).contains(aborted), "\(aborted) aborted")
        #expect(a.requestCount == 200 - aborted, "aborted requests never reach the upstream")
        #expect(try await proxy.metric("trellis_errors_total{token=\"fault_abort\"}", group: group) == Double(aborted))
    }

    @Test func delaysRequestsWithinTheRouteTimeout() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        defer { Task { await a.stop() } }
        let proxy = try await ProxyHarness.start(
            config(a, FaultInjection(delay: .milliseconds(400), delayPercent: 100)),
            group: group
        )
        defer { Task { await proxy.stop() } }
        let started = ContinuousClock.now
        let r = try await TestHTTPClient.get(port: proxy.port, "/", group: group)
        #expect(r.status == .ok)
        #expect(ContinuousClock.now - started >= .milliseconds(400))
        // A delay longer than the route's timeout: the client gets 504 and the upstream nothing.
        try await proxy.apply(
            config(a, FaultInjection(delay: .seconds(2), delayPercent: 100), timeout: .milliseconds(300))
        )
        let late = try await TestHTTPClient.get(port: proxy.port, "/", group: group)
        #expect(late.status == .gatewayTimeout)
        try await Task.sleep(for: .seconds(2))
        #expect(a.requestCount == 1)
    }
}

/// Active health checks: probes take failing endpoints out and bring them back.
@Suite struct HealthCheckTests {
    let group = MultiThreadedEventLoopGroup.singleton

    private func config(_ endpoints: [Endpoint], _ check: HealthCheck) -> ProxyConfig {
        gatewayConfig(
            virtualHosts: catchAll("pool"),
            clusters: [ClusterConfig(name: "pool", endpoints: endpoints, healthCheck: check)]
        )
    }

    @Test func anEndpointFailingItsHTTPCheckLeavesAndComesBack() async throws {
        let good = try await TestUpstream.start(name: "good", group: group)
        let sick = try await TestUpstream.start(name: "sick", group: group)
        defer {
            Task {
                await good.stop()
                await sick.stop()
            }
        }
        let check = HealthCheck(
            kind: .http(path: "/healthz", host: nil, expectedStatuses: [200...299]),
            // Not shorter: on a loaded 2-core machine a probe of the good one may take a while,
            // and with both out the balancer would use them anyway (panic mode).
            interval: .milliseconds(500),
            timeout: .milliseconds(500),
            healthyThreshold: 2,
            unhealthyThreshold: 2
        )
        let proxy = try await ProxyHarness.start(config([endpoint(good), endpoint(sick)], check), group: group)
        defer { Task { await proxy.stop() } }
        // Probes reach the endpoints with the path and the cluster's name as Host.
        #expect(await Peers.eventually(within: .seconds(10)) { sick.requests.contains { $0.uri == "/healthz" } })
        #expect(sick.requests.first { $0.uri == "/healthz" }?.headers.first(name: "host") == "pool")
        sick.failing(with: 500)
        #expect(
            await Peers.eventually(within: .seconds(10)) {
                (try? await TestHTTPClient.get(port: proxy.adminPort, "/config_dump", group: group).body)?
                    .contains("\"127.0.0.1:\(sick.port)\"") == true
            }
        )
        // Out: every request goes to the good one.
        for _ in 0..<10 {
            let r = try await TestHTTPClient.get(port: proxy.port, "/", group: group)
            #expect(r.body == "good")
        }
        #expect(
            try await proxy.metric("trellis_health_checks_total{cluster=\"pool\",result=\"failure\"}", group: group)
                >= 2
        )
        // Healthy again: back in.
        sick.failing(with: nil)
        #expect(
            await Peers.eventually(within: .seconds(10)) {
                (try? await TestHTTPClient.get(port: proxy.port, "/", group: group).body) == "sick"
            }
        )
    }

    @Test func aTCPCheckNoticesAnEndpointThatStoppedListening() async throws {
        let good = try await TestUpstream.start(name: "good", group: group)
        let gone = try await TestUpstream.start(name: "gone", group: group)
        defer { Task { await good.stop() } }
        let check = HealthCheck(
            kind: .tcp,
            interval: .milliseconds(500),
            timeout: .milliseconds(500),
            unhealthyThreshold: 2
        )
        let proxy = try await ProxyHarness.start(config([endpoint(good), endpoint(gone)], check), group: group)
        defer { Task { await proxy.stop() } }
        await gone.stop()
        #expect(
            await Peers.eventually(within: .seconds(10)) {
                (try? await TestHTTPClient.get(port: proxy.adminPort, "/config_dump", group: group).body)?
                    .contains("\"127.0.0.1:\(gone.port)\"") == true
            }
        )
        // No request is sent to the dead endpoint any more: no connect failure reaches a client.
        for _ in 0..<10 {
            #expect(try await TestHTTPClient.get(port: proxy.port, "/", group: group).status == .ok)
        }
    }
}
