import Etcd
import Foundation
import Logging
import Synchronization
import Testing
import TrellisTestSupport

/// The etcd v3 client against a real 3-member etcd cluster on loopback (Debian's etcd-server).
@Suite(
    .serialized,
    .enabled(if: EtcdCluster.missing == nil, "needs etcd (Debian's etcd-server): run scripts/bootstrap.sh")
)
struct EtcdClientTests {
    static let logger = Logger(label: "test.etcd")

    /// Runs `body` with a client of `cluster`'s members, its connections running meanwhile.
    func withClient<T: Sendable>(
        _ cluster: EtcdCluster,
        endpoints: [String]? = nil,
        _ body: @Sendable (EtcdClient) async throws -> T
    ) async throws -> T {
        let client = try EtcdClient(
            endpoints: try (endpoints ?? cluster.endpoints).map { try EtcdEndpoint(parsing: $0) },
            logger: Self.logger
        )
        return try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await client.run() }
            defer { client.close() }
            return try await body(client)
        }
    }

    @Test func endpointsAreParsedAndBadOnesNamed() throws {
        #expect(try EtcdEndpoint(parsing: "http://127.0.0.1:2379/") == EtcdEndpoint(host: "127.0.0.1", port: 2379))
        #expect(try EtcdEndpoint(parsing: "[::1]:2379") == EtcdEndpoint(host: "::1", port: 2379))
        #expect(try EtcdEndpoint(parsing: "etcd-1.internal:2379").host == "etcd-1.internal")
        for bad in ["127.0.0.1", "127.0.0.1:0", "::1:2379", "[::1]2379", ":2379", "h:99999"] {
            #expect(throws: EtcdError.self, "\(bad)") { try EtcdEndpoint(parsing: bad) }
            do {
                _ = try EtcdEndpoint(parsing: bad)
            } catch {
                #expect(error.description.contains("'\(bad)'") && error.description.contains("host:port"))
            }
        }
        #expect(throws: EtcdError.self) { try EtcdClient(endpoints: [], logger: Self.logger) }
    }

    @Test func keysTransactionsAndLeases() async throws {
        let cluster = try await EtcdCluster()
        defer { cluster.stop() }
        try await withClient(cluster) { etcd in
            let r1 = try await etcd.put("/t/a", Array("1".utf8))
            try await etcd.put("/t/b", Array("2".utf8))
            try await etcd.put("/u/c", Array("3".utf8))
            let a = try #require(try await etcd.get("/t/a"))
            #expect(a.value == Array("1".utf8) && a.modRevision == r1)
            let listed = try await etcd.list(prefix: "/t/")
            #expect(listed.values.map(\.key) == ["/t/a", "/t/b"])
            #expect(listed.revision >= r1 + 2)

            // A compare-and-set: the first succeeds, the second (stale revision) does not.
            var compare = Etcdserverpb_Compare()
            compare.key = Data("/t/a".utf8)
            compare.target = .mod
            compare.result = .equal
            compare.modRevision = r1
            var put = Etcdserverpb_RequestOp()
            put.requestPut.key = Data("/t/a".utf8)
            put.requestPut.value = Data("10".utf8)
            #expect(try await etcd.transaction("cas", compare: [compare], success: [put]).succeeded)
            #expect(try await etcd.transaction("cas", compare: [compare], success: [put]).succeeded == false)
            #expect(try await etcd.get("/t/a")?.value == Array("10".utf8))

            // A key on a lease lives while the lease is renewed and goes with it. The TTL leaves
            // room for a stalled machine: with 2 s, a put and a get that took a second each under
            // the parallel suites' load (etcd syncs each write) let the lease run out before its
            // first renewal.
            let lease = try await etcd.grantLease(ttl: 4)
            try await etcd.put("/t/leased", Array("x".utf8), lease: lease.id)
            #expect(try await etcd.get("/t/leased")?.lease == lease.id)
            for _ in 0..<6 {
                try await Task.sleep(for: .seconds(1))
                #expect(try await etcd.keepAlive(lease.id) != nil)
            }
            #expect(try await etcd.get("/t/leased") != nil, "renewed for 6 s, past its 4 s TTL")
            let gone = await Peers.eventually(within: .seconds(12)) { (try? await etcd.get("/t/leased")) == nil }
            #expect(gone, "not renewed: etcd deletes it")
            #expect(try await etcd.keepAlive(lease.id) == nil, "a lease that ran out is reported gone")
            #expect(try await etcd.timeToLive(lease.id) == nil)

            let revoked = try await etcd.grantLease(ttl: 30)
            try await etcd.put("/t/revoked", [1], lease: revoked.id)
            try await etcd.revoke(revoked.id)
            #expect(try await etcd.get("/t/revoked") == nil)
            try await etcd.revoke(revoked.id)  // twice: not an error

            #expect(try await etcd.delete("/t/", prefix: true) == 2)
            #expect(try await etcd.list(prefix: "/t/").values.isEmpty)
            #expect(try await etcd.get("/u/c") != nil, "outside the prefix")
        }
    }

    /// A watch sees every change exactly once, in order, while etcd's leader is killed (a leader
    /// change), comes back, and then the member the client is on is killed.
    @Test func watchesResumeOnAnotherMemberWithoutLossOrRepeat() async throws {
        let cluster = try await EtcdCluster()
        defer { cluster.stop() }
        try await withClient(cluster) { etcd in
            let start = try await etcd.revision()
            let seen = Mutex<[String]>([])
            let watcher = Task {
                for try await events in etcd.watch(prefix: "/w/", from: start + 1) {
                    seen.withLock { $0 += events.map { "\($0.key)@\($0.revision)" } }
                }
            }
            defer { watcher.cancel() }
            let status = await etcd.memberStatus()
            let leader = try #require(
                etcd.endpoints.firstIndex { status[$0].map { $0.leader == $0.header.memberID } ?? false }
            )
            var written: [String] = []
            for i in 0..<90 {
                if i == 20 { cluster.kill(leader) }
                if i == 40 {
                    try cluster.start(leader)
                    #expect(await Peers.eventually(within: .seconds(15)) { await cluster.healthyMembers() == 3 })
                }
                if i == 60 { cluster.kill(etcd.currentMember) }
                let revision = try await etcd.put("/w/\(i)", Array("\(i)".utf8))
                written.append("/w/\(i)@\(revision)")
            }
            let all = await Peers.eventually(within: .seconds(15)) { seen.withLock { $0.count } >= written.count }
            #expect(all, "the watch delivered \(seen.withLock { $0.count }) of \(written.count) changes")
            // Every written revision is seen, in order, and no revision twice. (A put whose
            // connection broke before its answer is retried: it may then be applied twice, at
            // two revisions, and the watch rightly shows both.)
            let got = seen.withLock { $0 }
            #expect(got.filter { written.contains($0) } == written)
            #expect(Set(got).count == got.count, "a revision was delivered twice: \(got)")
            #expect(got.allSatisfy { $0.hasPrefix("/w/") })
        }
    }

    @Test func aWatchBehindACompactionSaysSo() async throws {
        let cluster = try await EtcdCluster()
        defer { cluster.stop() }
        try await withClient(cluster) { etcd in
            let first = try await etcd.put("/c/k", [1])
            for i in 0..<5 { try await etcd.put("/c/k", [UInt8(i)]) }
            let last = try await etcd.revision()
            let compacted = await cluster.etcdctl(["compact", "\(last)"])
            #expect(compacted.status == 0, "\(compacted.stderr)")
            do {
                for try await _ in etcd.watch(prefix: "/c/", from: first) {}
                Issue.record("the watch ended without an error")
            } catch let error as EtcdWatchError {
                guard case .compacted(let requested, let through) = error else { return }
                #expect(requested == first && through == last)
            }
        }
    }

    /// With one member left of three, calls fail within their deadline with an error that says
    /// what was being done; once a second member is back, they work again.
    @Test func quorumLossFailsCallsInTimeAndRecovers() async throws {
        let cluster = try await EtcdCluster()
        defer { cluster.stop() }
        let client = try EtcdClient(
            endpoints: cluster.endpoints.map { try EtcdEndpoint(parsing: $0) },
            callTimeout: .seconds(3),
            logger: Self.logger
        )
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await client.run() }
            defer { client.close() }
            try await client.put("/q/a", [1])
            cluster.kill(1)
            cluster.kill(2)
            let began = ContinuousClock.now
            do {
                try await client.put("/q/b", [2])
                Issue.record("a write succeeded without quorum")
            } catch let error as EtcdError {
                #expect(error.description.contains("writing /q/b"), "\(error)")
            }
            #expect(ContinuousClock.now - began < .seconds(8), "failed within the call's deadline")
            try cluster.start(1)
            let back = await Peers.eventually(within: .seconds(20)) { (try? await client.put("/q/c", [3])) != nil }
            #expect(back, "writes work again once quorum is back")
            #expect(try await client.get("/q/a")?.value == [1], "nothing was lost")
        }
    }

    /// etcd with `--client-cert-auth`: the client with the CA and its certificate works; without
    /// its certificate, or trusting only the system's roots, it is refused with the operation named.
    @Test func tlsWithClientCertificates() async throws {
        let cluster = try await EtcdCluster(tls: true)
        defer { cluster.stop() }
        let files = try #require(cluster.tls)
        let endpoints = try cluster.endpoints.map { try EtcdEndpoint(parsing: "https://\($0)") }
        func attempt(_ tls: EtcdTLS) async throws -> Result<[UInt8]?, EtcdError> {
            let client = try EtcdClient(endpoints: endpoints, tls: tls, callTimeout: .seconds(2), logger: Self.logger)
            return try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await client.run() }
                defer { client.close() }
                do {
                    try await client.put("/tls/k", Array("v".utf8))
                    return .success(try await client.get("/tls/k")?.value)
                } catch let error as EtcdError {
                    return .failure(error)
                }
            }
        }
        let good = try await attempt(EtcdTLS(caFile: files.ca, certFile: files.cert, keyFile: files.key))
        #expect(try good.get() == Array("v".utf8))
        for (name, tls) in [
            ("no client certificate", EtcdTLS(caFile: files.ca)),
            ("the system's roots only", EtcdTLS(certFile: files.cert, keyFile: files.key)),
        ] {
            guard case .failure(let error) = try await attempt(tls) else {
                Issue.record("\(name): the call succeeded")
                continue
            }
            #expect(error.description.contains("writing /tls/k"), "\(name): \(error)")
        }
    }

    @Test func aLockIsHeldByOneAtATime() async throws {
        let cluster = try await EtcdCluster()
        defer { cluster.stop() }
        try await withClient(cluster) { etcd in
            let first = try await etcd.grantLease(ttl: 10)
            let second = try await etcd.grantLease(ttl: 10)
            let key = try await etcd.lock("/l/cmdb", lease: first.id)
            let waiting = Task { try await etcd.lock("/l/cmdb", lease: second.id) }
            try await Task.sleep(for: .milliseconds(500))
            #expect(try await etcd.list(prefix: "/l/cmdb").values.count == 2, "the second waits behind the first")
            try await etcd.unlock(key)
            let next = try await waiting.value
            #expect(next != key && next.hasPrefix("/l/cmdb/"))
        }
    }

    /// Two campaigners: one leads at a time; when it stops (its task cancelled, its lease
    /// revoked) the other takes over within seconds.
    @Test func oneLeaderAtATimeAndTheNextTakesOver() async throws {
        let cluster = try await EtcdCluster()
        defer { cluster.stop() }
        try await withClient(cluster) { etcd in
            final class Record: Sendable {
                let leading = Mutex<[String]>([])
                let overlaps = Mutex(0)
            }
            let record = Record()
            func campaigner(_ name: String) -> Task<Void, Never> {
                Task {
                    await etcd.lead(election: "/e/cmdb", value: name, ttl: 2) {
                        record.leading.withLock {
                            if !$0.isEmpty { record.overlaps.withLock { $0 += 1 } }
                            $0.append(name)
                        }
                        defer { record.leading.withLock { $0.removeAll { $0 == name } } }
                        while !Task.isCancelled { try await Task.sleep(for: .milliseconds(100)) }
                    }
                }
            }
            let a = campaigner("pilot-a")
            let b = campaigner("pilot-b")
            defer {
                a.cancel()
                b.cancel()
            }
            #expect(await Peers.eventually(within: .seconds(5)) { record.leading.withLock { $0.count } == 1 })
            let first = try #require(record.leading.withLock { $0.first })
            #expect(try await etcd.leader(election: "/e/cmdb") == first)
            try await Task.sleep(for: .seconds(3))
            #expect(record.leading.withLock { $0 } == [first], "the leader keeps its lease")
            (first == "pilot-a" ? a : b).cancel()
            let second = first == "pilot-a" ? "pilot-b" : "pilot-a"
            #expect(await Peers.eventually(within: .seconds(5)) { record.leading.withLock { $0 } == [second] })
            #expect(try await etcd.leader(election: "/e/cmdb") == second)
            #expect(record.overlaps.withLock { $0 } == 0)
        }
    }
}
