import Etcd
import Foundation
import Logging
import Synchronization
import Testing
import TrellisPolicy
import TrellisTestSupport

@testable import Pilot

/// The registry on a real 3-member etcd cluster, as several pilots share it: each test's
/// registries stand for pilots (each with its own client), following the store.
@Suite(
    .serialized,
    .enabled(if: EtcdCluster.missing == nil, "needs etcd (Debian's etcd-server): run scripts/bootstrap.sh")
)
struct EtcdRegistryTests {
    static let logger = Logger(label: "test.etcd-registry")

    /// One pilot's view: its client, store and registry, with the client and the registry's
    /// change feed running until the body ends.
    struct PilotSide: Sendable {
        let client: EtcdClient
        let store: EtcdRegistryStore
        let registry: Registry
    }

    func withPilots<T: Sendable>(
        _ count: Int,
        on cluster: EtcdCluster,
        prefix: String = "/trellis/",
        _ body: @Sendable ([PilotSide]) async throws -> T
    ) async throws -> T {
        let clients = try (0..<count).map { _ in
            try EtcdClient(
                endpoints: cluster.endpoints.map { try EtcdEndpoint(parsing: $0) },
                callTimeout: .seconds(3),
                logger: Self.logger
            )
        }
        return try await withThrowingTaskGroup(of: Void.self) { group in
            for client in clients { group.addTask { try await client.run() } }
            defer { for client in clients { client.close() } }
            var sides: [PilotSide] = []
            for client in clients {
                let store = EtcdRegistryStore(client: client, prefix: prefix, logger: Self.logger)
                sides.append(
                    PilotSide(
                        client: client,
                        store: store,
                        registry: try await Registry(store: store, logger: Self.logger)
                    )
                )
            }
            let followers = sides.map { side in Task { await side.registry.follow() } }
            defer { for f in followers { f.cancel() } }
            return try await body(sides)
        }
    }

    static func registration(_ port: Int, node: String = "vm-a", ttl: Duration = .seconds(10)) -> Registry.Registration
    {
        .init(
            instance: Instance(key: InstanceKey(service: "orders", address: "10.0.0.1", port: port), node: node),
            ttl: ttl
        )
    }

    @Test func aRegistrationThroughOnePilotReachesTheOtherWithinASecond() async throws {
        let cluster = try await EtcdCluster()
        defer { cluster.stop() }
        try await withPilots(2, on: cluster) { pilots in
            let before = await pilots[1].registry.version
            let began = ContinuousClock.now
            let (instance, created) = try await pilots[0].registry.register(Self.registration(8080))
            #expect(created && instance.leaseExpiresAt != nil)
            #expect(
                await pilots[0].registry.instances().map(\.key.port) == [8080],
                "the writer sees its own write at once"
            )
            let seen = await Peers.eventually(within: .seconds(1)) { await pilots[1].registry.instances().count == 1 }
            #expect(seen, "pilot 2 saw it after \(ContinuousClock.now - began)")
            #expect(await pilots[1].registry.version > before, "and moved its version on (its nodes get a push)")

            // A status change and a deregistration through pilot 2 come back to pilot 1.
            let key = instance.key
            _ = try await pilots[1].registry.setStatus(key, .draining)
            #expect(
                await Peers.eventually(within: .seconds(1)) {
                    await pilots[0].registry.instances().first?.status == .draining
                }
            )
            // Re-registering through pilot 1 keeps the drain and the lease.
            let lease = try #require(try await pilots[0].client.get("/trellis/instances/orders/10.0.0.1/8080")?.lease)
            let (again, _) = try await pilots[0].registry.register(Self.registration(8080))
            #expect(again.status == .draining)
            #expect(try await pilots[0].client.get("/trellis/instances/orders/10.0.0.1/8080")?.lease == lease)
            try await pilots[1].registry.deregister(key)
            #expect(await Peers.eventually(within: .seconds(1)) { await pilots[0].registry.instances().isEmpty })
            #expect(try await pilots[0].client.timeToLive(lease) == nil, "its lease went with it")
        }
    }

    @Test func anInstanceWhoseLeaseRunsOutIsRemovedOnceEverywhereAndRenewalsWorkThroughAnyPilot() async throws {
        let cluster = try await EtcdCluster()
        defer { cluster.stop() }
        try await withPilots(2, on: cluster) { pilots in
            let deletes = Mutex(0)
            let start = try await pilots[0].client.revision()
            let counter = Task {
                for try await events in pilots[0].client.watch(prefix: "/trellis/instances/", from: start + 1) {
                    deletes.withLock { $0 += events.filter { if case .delete = $0 { true } else { false } }.count }
                }
            }
            defer { counter.cancel() }
            _ = try await pilots[0].registry.register(Self.registration(8080, ttl: .seconds(2)))
            _ = try await pilots[0].registry.register(Self.registration(8081, ttl: .seconds(2)))
            #expect(await Peers.eventually(within: .seconds(1)) { await pilots[1].registry.instances().count == 2 })
            // 8081's agent moved to pilot 2 and renews there; 8080's agent is gone.
            let key = InstanceKey(service: "orders", address: "10.0.0.1", port: 8081)
            for _ in 0..<5 {
                try await Task.sleep(for: .seconds(1))
                _ = try await pilots[1].registry.renew(key)
            }
            for pilot in pilots {
                #expect(
                    await pilot.registry.instances().map(\.key.port) == [8081],
                    "8080 expired; 8081 was renewed for 5 s"
                )
            }
            #expect(deletes.withLock { $0 } == 1, "etcd deleted the expired instance exactly once")
            await #expect(throws: RegistryError.self) {
                _ = try await pilots[0].registry.renew(InstanceKey(service: "orders", address: "10.0.0.1", port: 8080))
            }
            #expect(await pilots[0].registry.expireLeases().isEmpty, "a shared store's leases are etcd's")
        }
    }

    @Test func twoNodesCannotHoldOneInstanceAndMachinesReachEveryPilot() async throws {
        let cluster = try await EtcdCluster()
        defer { cluster.stop() }
        try await withPilots(2, on: cluster) { pilots in
            _ = try await pilots[0].registry.register(Self.registration(8080, node: "vm-a"))
            #expect(await Peers.eventually(within: .seconds(1)) { await pilots[1].registry.instances().count == 1 })
            do {
                _ = try await pilots[1].registry.register(Self.registration(8080, node: "vm-b"))
                Issue.record("a second node took the instance")
            } catch let error as RegistryError {
                #expect(error.kind == .conflict)
            }
            // Two pilots racing to create one instance: exactly one wins, the store decides.
            async let a = try? pilots[0].registry.register(Self.registration(9090, node: "vm-a"))
            async let b = try? pilots[1].registry.register(Self.registration(9090, node: "vm-b"))
            let winners = [await a, await b].compactMap { $0 }
            #expect(winners.count == 1)
            let winner = winners.first?.instance.node
            #expect(
                await Peers.eventually(within: .seconds(1)) {
                    let one = await pilots[0].registry.instances().first { $0.key.port == 9090 }?.node
                    let two = await pilots[1].registry.instances().first { $0.key.port == 9090 }?.node
                    return one == winner && two == winner
                }
            )

            await pilots[0].registry.setMachines([
                "vm-a": MachineMetadata(locality: Locality(region: "eu", zone: "eu-1"))
            ])
            let merged = await Peers.eventually(within: .seconds(1)) {
                await pilots[1].registry.instances().first { $0.key.port == 8080 }?.locality.zone == "eu-1"
            }
            #expect(merged, "pilot 2 merges the CMDB metadata pilot 1 polled")
        }
    }

    /// Quorum lost: each pilot keeps what it has, says it is not ready, refuses changes with 503's
    /// kind; quorum back: ready, and changes flow again.
    @Test func withoutQuorumPilotsKeepTheirSnapshotAndSayTheyAreNotReady() async throws {
        let cluster = try await EtcdCluster()
        defer { cluster.stop() }
        try await withPilots(2, on: cluster) { pilots in
            _ = try await pilots[0].registry.register(Self.registration(8080, ttl: .seconds(30)))
            #expect(await Peers.eventually(within: .seconds(1)) { await pilots[1].registry.instances().count == 1 })
            #expect(await pilots[0].registry.storeUnavailable() == nil)
            cluster.kill(2)
            _ = try await pilots[0].registry.register(Self.registration(8081, ttl: .seconds(30)))
            #expect(
                await Peers.eventually(within: .seconds(2)) { await pilots[1].registry.instances().count == 2 },
                "one member down: nothing changes"
            )
            cluster.kill(1)
            let reason = await pilots[1].registry.storeUnavailable()
            #expect(reason?.contains("etcd") == true, "\(reason ?? "ready")")
            #expect(await pilots[1].registry.instances().count == 2, "the last snapshot stays")
            do {
                _ = try await pilots[1].registry.register(Self.registration(8082))
                Issue.record("a registration succeeded without quorum")
            } catch let error as RegistryError {
                #expect(error.kind == .unavailable)
            }
            try cluster.start(1)
            #expect(await Peers.eventually(within: .seconds(20)) { await pilots[1].registry.storeUnavailable() == nil })
            _ = try await pilots[1].registry.register(Self.registration(8083))
            // (3 s was once too short beside the other suites in CI.)
            #expect(await Peers.eventually(within: .seconds(15)) { await pilots[0].registry.instances().count == 3 })
        }
    }

    /// A feed that would resume behind a compaction reads everything again (a reset) and goes on.
    @Test func aCompactedFeedResyncs() async throws {
        let cluster = try await EtcdCluster()
        defer { cluster.stop() }
        try await withPilots(1, on: cluster, prefix: "/other/") { pilots in
            let store = pilots[0].store
            let old = try await pilots[0].client.revision()
            _ = try await pilots[0].registry.register(Self.registration(8080))
            _ = try await pilots[0].registry.register(Self.registration(8081))
            let now = try await pilots[0].client.revision()
            #expect(await cluster.etcdctl(["compact", "\(now)"]).status == 0)
            var iterator = store.changes(after: old).makeAsyncIterator()
            let first = try #require(await iterator.next())
            guard case .reset(let snapshot) = first.first else {
                Issue.record("expected a reset, got \(first)")
                return
            }
            #expect(snapshot.instances.map(\.instance.key.port) == [8080, 8081])
            try await pilots[0].registry.deregister(InstanceKey(service: "orders", address: "10.0.0.1", port: 8080))
            let next = try #require(await iterator.next())
            guard case .delete(let key, _) = next.first else {
                Issue.record("expected the deletion, got \(next)")
                return
            }
            #expect(key.port == 8080)
        }
    }
}
