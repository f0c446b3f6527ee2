import Atomics
import NIOCore
import Testing
import TrellisPolicy

@testable import Proxy

/// Outlier ejection over time, with the clock as an argument: how long an endpoint stays out, how
/// the time grows for an endpoint ejected again and decays while it behaves, and its cap.
@Suite struct OutlierDetectorTests {
    private let second: UInt64 = 1_000_000_000

    private func cluster(_ policy: OutlierDetection) throws -> ClusterRuntime {
        let endpoints = (1...2).map { Endpoint(address: SocketEndpoint(host: "127.0.0.1", port: 9000 + $0)) }
        let config = gatewayConfig(
            virtualHosts: catchAll("pool"),
            clusters: [ClusterConfig(name: "pool", endpoints: endpoints, outlierDetection: policy)]
        )
        return try ProxySnapshot(config, stats: ProxyStats()).clusters[0]
    }

    @Test func anEndpointEjectedAgainStaysOutLongerUpToTheCap() throws {
        let policy = OutlierDetection(
            consecutiveErrors: 2,
            interval: .seconds(60),
            baseEjectionTime: .seconds(1),
            maxEjectionTime: .seconds(4),
            maxEjectionPercent: 50
        )
        let cluster = try cluster(policy)
        let detector = try #require(cluster.outlier)
        let bad = cluster.outlierRecords[1]
        var now = 100 * second
        func fail() { detector.finished(bad, failed: true, cluster: cluster, policy: policy, now: now) }

        fail()
        #expect(!bad.isEjected(now: now), "one error of the two it takes")
        detector.finished(bad, failed: false, cluster: cluster, policy: policy, now: now)
        fail()
        #expect(!bad.isEjected(now: now), "a success in between starts the count again")
        fail()
        #expect(bad.isEjected(now: now), "two consecutive errors")
        #expect(bad.isEjected(now: now + second - 1) && !bad.isEjected(now: now + second), "out for the base time")
        #expect(cluster.isAvailable(0, now: now + second / 2), "the other endpoint still serves")

        // Back, and failing again at once: out for twice the base time, three, four times, then the cap.
        for multiplier: UInt64 in [2, 3, 4, 4] {
            now = bad.ejectedUntil.load(ordering: .relaxed)
            fail()
            fail()
            let out = bad.ejectedUntil.load(ordering: .relaxed) - now
            #expect(out == multiplier * second, "ejected for \(out / second) s, expected \(multiplier) s")
        }

        // Behaving for three intervals after the last ejection ended: the multiplier decays by three.
        now = bad.ejectedUntil.load(ordering: .relaxed) + 3 * 60 * second
        fail()
        fail()
        let out = bad.ejectedUntil.load(ordering: .relaxed) - now
        #expect(out == 3 * second, "5 ejections - 3 decayed + 1 = 3 × base, got \(out / second) s")
    }

    @Test func noMoreThanTheMaximumShareIsOutAtOnce() throws {
        let policy = OutlierDetection(consecutiveErrors: 1, baseEjectionTime: .seconds(30), maxEjectionPercent: 50)
        let cluster = try cluster(policy)
        let detector = try #require(cluster.outlier)
        let now = 100 * second
        for record in cluster.outlierRecords {
            detector.finished(record, failed: true, cluster: cluster, policy: policy, now: now)
        }
        let out = cluster.outlierRecords.filter { $0.isEjected(now: now) }.count
        #expect(out == 1, "half of two endpoints")
        #expect(cluster.outlierRecords.allSatisfy { !$0.isEjected(now: now + 30 * second) })
    }
}
