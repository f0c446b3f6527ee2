import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import Testing
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
        let proxy = try await ProxyHarness.start(
            gatewayConfig(
                virtualHosts: catchAll("alpha"),
                clusters: [
                    ClusterConfig(
                        name: "alpha",
                        endpoints: [endpoint(a)],
                        rateLimit: RateLimit(requestsPerSecond: 50, burst: 10)
                    )
                ]
            ),
            group: loops
        )
        // The proxy stops before its loops do (a deferred Task could race them).
        do {
            try await measureRate(proxy, upstream: a)
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
        let passed = try await withThrowingTaskGroup(of: Int.self) { tasks in
            for _ in 0..<6 {
                tasks.addTask {
                    let client = try await TestHTTPClient.connect(port: proxy.port, group: group)
                    var ok = 0
                    // ~25 requests per second per connection: 150/s in all, three times the rate.
                    while ContinuousClock.now < deadline {
                        if try await client.request(.GET, "/").status == .ok { ok += 1 }
                        try await Task.sleep(for: .milliseconds(40))
                    }
                    await client.close()
                    return ok
                }
            }
            return try await tasks.reduce(0, +)
        }
        let elapsed = ContinuousClock.now - started
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        let allowed = 10 + 50 * seconds
        #expect(Double(passed) <= allowed + 1, "passed \(passed), allowed \(allowed)")
        #expect(Double(passed) >= 0.9 * 50 * 3, "passed \(passed): the limit let too little through")
        #expect(a.requestCount == passed)
        #expect(
            try await proxy.metric("trellis_rate_limited_total{scope=\"cluster alpha\"}", group: group) > 0
        )
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
            gatewayConfig(
                virtualHosts: catchAll("alpha"),
                clusters: [
                    ClusterConfig(
                        name: "alpha",
                        endpoints: [endpoint(a)],
                        circuitBreakers: CircuitBreakers(maxRequests: 2)
                    )
                ]
            ),
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

    /// Pools are per event loop, the limit is for the whole proxy: on one loop, the one
    /// connection allowed serves every request in turn.
    @Test func connectionsBeyondMaxConnectionsOverflowAndPooledOnesAreReused() async throws {
        let loop = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let a = try await TestUpstream.start(name: "alpha", group: group)
        defer { Task { await a.stop() } }
        let proxy = try await ProxyHarness.start(
            gatewayConfig(
                virtualHosts: catchAll("alpha"),
                clusters: [
                    ClusterConfig(
                        name: "alpha",
                        endpoints: [endpoint(a)],
                        circuitBreakers: CircuitBreakers(maxConnections: 1)
                    )
                ]
            ),
            group: loop
        )
        do {
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
        } catch {
            await proxy.stop()
            try await loop.shutdownGracefully()
            throw error
        }
        await proxy.stop()
        try await loop.shutdownGracefully()
    }

    @Test func noPendingRequestsAllowedMeansNoNewConnection() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        defer { Task { await a.stop() } }
        let proxy = try await ProxyHarness.start(
            gatewayConfig(
                virtualHosts: catchAll("alpha"),
                clusters: [
                    ClusterConfig(
                        name: "alpha",
                        endpoints: [endpoint(a)],
                        circuitBreakers: CircuitBreakers(maxPendingRequests: 0)
                    )
                ]
            ),
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
