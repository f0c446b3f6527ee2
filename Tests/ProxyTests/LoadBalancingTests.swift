import NIOCore
import NIOHTTP1
import NIOPosix
import Testing
import TrellisPolicy

@testable import Proxy

/// Each load-balancing policy, observed through real requests to real upstreams.
@Suite struct LoadBalancingTests {
    let group = MultiThreadedEventLoopGroup.singleton

    private func run(
        policy: LoadBalancingPolicy,
        weights: [Int] = [1, 1, 1],
        health: [Endpoint.Health] = [.healthy, .healthy, .healthy],
        requests: Int,
        headers: @escaping (Int) -> [(String, String)] = { _ in [] }
    ) async throws -> [String: Int] {
        var started: [TestUpstream] = []
        for name in ["u0", "u1", "u2"] { started.append(try await TestUpstream.start(name: name, group: group)) }
        let upstreams = started
        defer { Task { for u in upstreams { await u.stop() } } }
        let endpoints = upstreams.indices.map { endpoint(upstreams[$0], weight: weights[$0], health: health[$0]) }
        let proxy = try await ProxyHarness.start(
            gatewayConfig(
                virtualHosts: catchAll("c"),
                clusters: [ClusterConfig(name: "c", loadBalancing: policy, endpoints: endpoints)]
            ),
            group: group
        )
        defer { Task { await proxy.stop() } }
        let client = try await TestHTTPClient.connect(port: proxy.port, group: group)
        defer { Task { await client.close() } }
        var counts: [String: Int] = [:]
        for i in 0..<requests {
            let r = try await client.request(.GET, "/", headers: headers(i))
            counts[
                r.status == .ok ? r.body : "\(r.status.code) \(r.headers.first(name: "x-trellis-error") ?? "")",
                default: 0
            ] += 1
        }
        return counts
    }

    @Test func roundRobinVisitsEachEndpointInTurn() async throws {
        let counts = try await run(policy: .roundRobin, requests: 30)
        #expect(counts == ["u0": 10, "u1": 10, "u2": 10])
    }

    @Test func weightedFollowsEndpointWeights() async throws {
        let counts = try await run(policy: .weighted, weights: [5, 3, 2], requests: 100)
        #expect(counts == ["u0": 50, "u1": 30, "u2": 20])
    }

    @Test func randomSpreadsOverAllEndpoints() async throws {
        let counts = try await run(policy: .random, requests: 300)
        // Each expects 100 (σ ≈ 8.2); the bounds are ~6σ wide.
        for name in ["u0", "u1", "u2"] { #expect((50...150).contains(counts[name, default: 0]), "\(counts)") }
    }

    @Test func leastRequestSpreadsOverAllEndpoints() async throws {
        let counts = try await run(policy: .leastRequest, requests: 300)
        for name in ["u0", "u1", "u2"] { #expect((50...150).contains(counts[name, default: 0]), "\(counts)") }
    }

    @Test func ringHashKeepsAHeaderValueOnOneEndpoint() async throws {
        // 20 users, 10 requests each: every user sees exactly one endpoint, and users spread.
        var perUser: [String: Set<String>] = [:]
        var started: [TestUpstream] = []
        for name in ["u0", "u1", "u2"] { started.append(try await TestUpstream.start(name: name, group: group)) }
        let upstreams = started
        defer { Task { for u in upstreams { await u.stop() } } }
        let proxy = try await ProxyHarness.start(
            gatewayConfig(
                virtualHosts: catchAll("c"),
                clusters: [
                    ClusterConfig(
                        name: "c",
                        loadBalancing: .ringHash(.header("x-user"), minimumRingSize: 1024),
                        endpoints: upstreams.map { endpoint($0) }
                    )
                ]
            ),
            group: group
        )
        defer { Task { await proxy.stop() } }
        let client = try await TestHTTPClient.connect(port: proxy.port, group: group)
        defer { Task { await client.close() } }
        for round in 0..<10 {
            for user in 0..<20 {
                let r = try await client.request(.GET, "/\(round)", headers: [("x-user", "user-\(user)")])
                perUser["user-\(user)", default: []].insert(r.body)
            }
        }
        #expect(perUser.values.allSatisfy { $0.count == 1 }, "\(perUser)")
        #expect(Set(perUser.values.flatMap { $0 }).count >= 2)
    }

    @Test func unhealthyAndDrainingEndpointsGetNoRequests() async throws {
        let counts = try await run(policy: .roundRobin, health: [.healthy, .unhealthy, .draining], requests: 12)
        #expect(counts == ["u0": 12])
    }

    @Test func noHealthyEndpointIs503() async throws {
        let counts = try await run(policy: .roundRobin, health: [.unhealthy, .unhealthy, .draining], requests: 3)
        #expect(counts == ["503 no_healthy_upstream": 3])
    }
}

/// The balancer alone, without sockets.
@Suite struct LoadBalancerUnitTests {
    private func cluster(
        _ policy: LoadBalancingPolicy,
        weights: [Int],
        health: [Endpoint.Health]? = nil,
        priorities: [Int]? = nil,
        overprovisioning: Int? = nil
    ) -> ClusterRuntime {
        let endpoints = weights.indices.map { i in
            Endpoint(
                address: .init(host: "127.0.0.1", port: 9000 + i),
                weight: weights[i],
                health: health?[i] ?? .healthy,
                priority: priorities?[i] ?? 0
            )
        }
        var config = ClusterConfig(name: "c", loadBalancing: policy, endpoints: endpoints)
        config.overprovisioningFactor = overprovisioning
        let stats = ProxyStats()
        return ClusterRuntime(
            index: 0,
            config: config,
            stats: stats.cluster("unit"),
            load: stats.resilience.load(cluster: "unit")
        )
    }

    @Test func leastRequestPrefersTheLessLoadedOfTwo() {
        var rng = FastRandom(seed: 7)
        let balancer = LoadBalancer(cluster: cluster(.leastRequest, weights: [1, 1]), rng: &rng)
        for _ in 0..<10 { balancer.requestStarted(endpoint: 0) }
        for _ in 0..<50 { #expect(balancer.pick(fields: RequestFields(HTTPHeaders()), clientIP: nil, rng: &rng) == 1) }
    }

    @Test func ringHashMovesOnlyTheKeysOfARemovedEndpoint() {
        var rng = FastRandom(seed: 1)
        let all = LoadBalancer(
            cluster: cluster(.ringHash(.header("k"), minimumRingSize: 1024), weights: [1, 1, 1, 1]),
            rng: &rng
        )
        let oneDown = LoadBalancer(
            cluster: cluster(
                .ringHash(.header("k"), minimumRingSize: 1024),
                weights: [1, 1, 1, 1],
                health: [.healthy, .healthy, .healthy, .unhealthy]
            ),
            rng: &rng
        )
        var moved = 0
        for key in 0..<1000 {
            let headers = HTTPHeaders([("k", "key-\(key)")])
            let before = all.pick(fields: RequestFields(headers), clientIP: nil, rng: &rng)!
            let after = oneDown.pick(fields: RequestFields(headers), clientIP: nil, rng: &rng)!
            #expect(after != 3)
            if before != 3 && before != after { moved += 1 }
        }
        #expect(moved == 0)
    }

    @Test func ringHashOnACookieOrTheSourceAddressKeepsEachKeyOnOneEndpoint() {
        var rng = FastRandom(seed: 3)
        let byCookie = LoadBalancer(
            cluster: cluster(.ringHash(.cookie("session"), minimumRingSize: 1024), weights: [1, 1, 1, 1]),
            rng: &rng
        )
        let bySource = LoadBalancer(
            cluster: cluster(.ringHash(.sourceAddress, minimumRingSize: 1024), weights: [1, 1, 1, 1]),
            rng: &rng
        )
        var cookieEndpoints: Set<Int> = []
        var sourceEndpoints: Set<Int> = []
        for key in 0..<200 {
            let headers = HTTPHeaders([("cookie", "theme=dark; session=s-\(key); x=1")])
            let first = byCookie.pick(fields: RequestFields(headers), clientIP: nil, rng: &rng)!
            for _ in 0..<5 { #expect(byCookie.pick(fields: RequestFields(headers), clientIP: nil, rng: &rng) == first) }
            cookieEndpoints.insert(first)
            let ip = "10.0.\(key / 250).\(key % 250)"
            let source = bySource.pick(fields: RequestFields(HTTPHeaders()), clientIP: ip, rng: &rng)!
            for _ in 0..<5 {
                #expect(bySource.pick(fields: RequestFields(HTTPHeaders()), clientIP: ip, rng: &rng) == source)
            }
            sourceEndpoints.insert(source)
        }
        #expect(cookieEndpoints.count == 4 && sourceEndpoints.count == 4, "keys spread over every endpoint")
        #expect(LoadBalancer.cookie("session", in: HTTPHeaders([("Cookie", "a=1;session=xyz")])) == "xyz")
        #expect(LoadBalancer.cookie("session", in: HTTPHeaders([("cookie", "sessionx=1; a=session")])) == nil)
    }

    /// Locality failover as Envoy does it: the first priority (the client's zone) takes everything
    /// while enough of it is healthy, a level at half health keeps 70 % (1.4 × 50 %) and spills the
    /// rest to the next, and a level with nothing healthy sends all to the next.
    @Test(arguments: [LoadBalancingPolicy.roundRobin, .leastRequest, .random, .weighted])
    func prioritiesFailOverInEnvoysProportions(policy: LoadBalancingPolicy) {
        func share(_ health: [Endpoint.Health]) -> (level0: Int, level1: Int) {
            var rng = FastRandom(seed: 11)
            let balancer = LoadBalancer(
                cluster: cluster(policy, weights: [1, 1, 1, 1], health: health, priorities: [0, 0, 1, 1]),
                rng: &rng
            )
            var counts = (0, 0)
            for _ in 0..<10_000 {
                let pick = balancer.pick(fields: RequestFields(HTTPHeaders()), clientIP: nil, rng: &rng)!
                if pick < 2 { counts.0 += 1 } else { counts.1 += 1 }
            }
            return counts
        }
        let all = share([.healthy, .healthy, .healthy, .healthy])
        #expect(all.level0 == 10_000, "everything to the first level: \(all)")
        let half = share([.healthy, .unhealthy, .healthy, .healthy])
        #expect((6_700...7_300).contains(half.level0), "70 % stays: \(half)")
        let none = share([.unhealthy, .draining, .healthy, .healthy])
        #expect(none.level1 == 10_000, "all to the next level: \(none)")
    }

    /// `overprovisioning_factor: 100`: a level at half health keeps half.
    @Test func theOverprovisioningFactorSetsHowMuchALevelKeeps() {
        var rng = FastRandom(seed: 5)
        let balancer = LoadBalancer(
            cluster: cluster(
                .roundRobin,
                weights: [1, 1, 1, 1],
                health: [.healthy, .unhealthy, .healthy, .healthy],
                priorities: [0, 0, 1, 1],
                overprovisioning: 100
            ),
            rng: &rng
        )
        var first = 0
        for _ in 0..<10_000 where balancer.pick(fields: RequestFields(HTTPHeaders()), clientIP: nil, rng: &rng)! < 2 {
            first += 1
        }
        #expect((4_700...5_300).contains(first), "\(first) of 10000 stayed")
    }
}
