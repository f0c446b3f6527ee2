import Foundation
import Logging
import Synchronization
import Testing
import TrellisHTTP
import TrellisPolicy
import TrellisTestSupport

@testable import Pilot

/// The registry over a real SQLite store: leases, restarts, conflicts, and all-or-nothing writes.
struct RegistryTests {
    /// A wall clock the test moves by hand.
    final class ManualClock: Sendable {
        let seconds = Mutex(1_000.0)
        func advance(_ by: Double) { seconds.withLock { $0 += by } }
        var now: @Sendable () -> Double { { self.seconds.withLock { $0 } } }
    }

    static func registration(
        _ port: Int,
        node: String = "vm-a",
        ttl: Int = 10,
        protocol p: ServiceProtocol = .http
    ) -> Registry.Registration {
        .init(
            instance: Instance(
                key: InstanceKey(service: "orders", address: "10.0.0.1", port: port),
                serviceProtocol: p,
                node: node
            ),
            ttl: .seconds(ttl)
        )
    }

    @Test func aLeaseThatIsNotRenewedRunsOutAndIsRemovedFromTheStore() async throws {
        let clock = ManualClock()
        let store = try SQLiteRegistryStore()
        let registry = try await Registry(store: store, logger: .quiet, now: clock.now)
        _ = try await registry.register(Self.registration(8080, ttl: 10))
        _ = try await registry.register(Self.registration(8081, ttl: 10))
        clock.advance(8)
        _ = try await registry.renew(InstanceKey(service: "orders", address: "10.0.0.1", port: 8080))
        clock.advance(4)  // 8081's lease ran out at 10; 8080's runs to 18
        #expect(await registry.expireLeases() == [InstanceKey(service: "orders", address: "10.0.0.1", port: 8081)])
        #expect(try store.loadInstances().map(\.key.port) == [8080])
        clock.advance(7)
        #expect(await registry.expireLeases().map(\.port) == [8080])
        #expect(await registry.instances().isEmpty)
        #expect(try store.loadInstances().isEmpty)
        // Renewing what expired tells the agent to register again.
        await #expect(
            throws: RegistryError(
                .notFound,
                "instance orders/10.0.0.1:8080 is not registered (its lease may have run out); register it again"
            )
        ) {
            _ = try await registry.renew(InstanceKey(service: "orders", address: "10.0.0.1", port: 8080))
        }
    }

    @Test func aRestartedPilotKeepsEveryRegistrationAndResumesTheirLeases() async throws {
        let dir = try Peers.temporaryDirectory("registry")
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = dir.appendingPathComponent("pilot.db").path
        let clock = ManualClock()
        do {
            let registry = try await Registry(
                store: try SQLiteRegistryStore(path: path),
                logger: .quiet,
                now: clock.now
            )
            _ = try await registry.register(Self.registration(8080, ttl: 10))
            var drained = Self.registration(8081, node: "vm-b", ttl: 10)
            drained.instance.labels = ["version": "v2"]
            _ = try await registry.register(drained)
            _ = try await registry.setStatus(node: "vm-b", .draining)
        }
        #expect(try SQLiteRegistryStore(path: path).journalMode() == "wal")
        // Pilot was down for longer than the leases: each gets a full TTL from the restart.
        clock.advance(60)
        let registry = try await Registry(store: try SQLiteRegistryStore(path: path), logger: .quiet, now: clock.now)
        let instances = await registry.instances()
        #expect(instances.map(\.key.port) == [8080, 8081])
        #expect(
            instances[1].status == .draining && instances[1].labels == ["version": "v2"] && instances[1].node == "vm-b"
        )
        #expect(await registry.expireLeases().isEmpty)
        clock.advance(11)
        #expect(await registry.expireLeases().count == 2)
    }

    @Test func conflictsAreRefusedAndChangeNothing() async throws {
        let registry = try await Registry(store: try SQLiteRegistryStore(), logger: .quiet)
        _ = try await registry.register(Self.registration(8080, node: "vm-a"))
        let version = await registry.version
        // The same instance from another node.
        await #expect(throws: RegistryError.self) {
            _ = try await registry.register(Self.registration(8080, node: "vm-b"))
        }
        // The same service:port with another protocol.
        var grpc = Self.registration(8081, protocol: .grpc)
        grpc.instance.servicePort = 8080
        await #expect(throws: RegistryError.self) { _ = try await registry.register(grpc) }
        #expect(await registry.version == version)
        // Re-registration from the same node is an update, and does not undo a drain.
        _ = try await registry.setStatus(InstanceKey(service: "orders", address: "10.0.0.1", port: 8080), .draining)
        let (again, created) = try await registry.register(Self.registration(8080, node: "vm-a"))
        #expect(!created && again.status == .draining)
        // mesh.yaml declaring the registered instance statically is refused; the old mesh stays.
        let mesh = try MeshConfigLoader.parse(
            yaml: "services:\n  - name: orders\n    port: 8080\n    instances: [{address: 10.0.0.1}]\n",
            file: "mesh.yaml"
        )
        await #expect(throws: RegistryError.self) { try await registry.applyMesh(mesh) }
        #expect(await registry.view().mesh == .empty)
    }

    /// A store that fails every write, as a full disk would.
    struct FailingStore: RegistryStore {
        func loadInstances() throws -> [Instance] { [] }
        func write(upserts: [Instance], deletions: [InstanceKey]) throws {
            throw RegistryStoreError(operation: "write", underlying: "disk full")
        }
    }

    @Test func aFailedStoreWriteLeavesTheRegistryAsItWas() async throws {
        let registry = try await Registry(store: FailingStore(), logger: .quiet)
        let version = await registry.version
        await #expect(throws: RegistryError.self) { _ = try await registry.register(Self.registration(8080)) }
        #expect(await registry.instances().isEmpty)
        #expect(await registry.version == version)
    }

    @Test func cmdbMetadataIsMergedIntoTheInstancesOfEachMachine() async throws {
        let registry = try await Registry(store: try SQLiteRegistryStore(), logger: .quiet)
        var own = Self.registration(8080)
        own.instance.labels = ["team": "orders-team"]
        _ = try await registry.register(own)
        let machines = try CMDBSource.parse(
            Array(
                #"{"machines": [{"hostname": "vm-a", "region": "eu", "zone": "eu-1a", "labels": {"team": "ops", "rack": "r7"}}]}"#
                    .utf8
            )
        )
        await registry.setMachines(machines)
        let instance = try #require(await registry.instances().first)
        #expect(instance.locality == Locality(region: "eu", zone: "eu-1a"))
        #expect(instance.labels == ["team": "orders-team", "rack": "r7"])  // the registration's own label wins
        // A malformed document is refused whole, with the key that is wrong.
        #expect(throws: HTTPClient.Failure.self) {
            try CMDBSource.parse(Array(#"{"machines": [{"hostname": "vm-b"}, {"hostname": 7}]}"#.utf8))
        }
        do {
            _ = try CMDBSource.parse(Array(#"{"machines": [{"hostname": "vm-b", "zone": 3}]}"#.utf8))
        } catch {
            #expect("\(error)".contains("machines[0].zone"))
        }
    }
}
