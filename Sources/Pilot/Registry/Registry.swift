public import FoundationEssentials
public import Logging
public import TrellisPolicy

/// Why the registry refused a change; the HTTP API maps each kind to its status code.
public struct RegistryError: Error, CustomStringConvertible, Sendable, Equatable {
    public enum Kind: String, Sendable {
        /// 400: the request itself is wrong.
        case invalid
        /// 404
        case notFound = "not_found"
        /// 409: it contradicts what the registry holds.
        case conflict
        /// 503: the store failed; nothing was changed.
        case unavailable
    }
    public var kind: Kind
    public var message: String

    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    public var description: String { message }
}

/// The registry's merged state at one moment: every service with its instances, and the mesh
/// configuration. Immutable; translation to xDS reads only this.
public struct RegistryView: Sendable {
    public struct Service: Sendable, Hashable {
        public var key: ServiceKey
        public var serviceProtocol: ServiceProtocol
        public var hosts: [String]
        /// Sorted by key.
        public var instances: [Instance]
    }

    public var version: Int
    /// Sorted by key.
    public var services: [Service]
    public var mesh: MeshConfig

    public func service(_ key: ServiceKey) -> Service? {
        services.first { $0.key == key }
    }
}

/// The service registry: agent registrations (leased, written through to the store before they
/// take effect), static services from mesh.yaml, and machine metadata from the CMDB. Every change
/// moves the version on and wakes the watchers (the xDS generator).
///
/// With a local store (SQLite) this registry is the only writer: a change is stored, then applied.
/// With a shared store (etcd, several pilots) the store is the truth: a change is stored, and
/// applied when the store's change feed (``follow()``) brings it back, as every other pilot's
/// changes and lease expiries are; the leases are the store's.
public actor Registry {
    private let store: any RegistryStore
    private let shared: (any SharedRegistryStore)?
    private let logger: Logger
    private let now: @Sendable () -> Double
    private var agentInstances: [InstanceKey: Instance] = [:]
    private var mesh: MeshConfig = .empty
    private var machines: [String: MachineMetadata] = [:]
    private(set) var version = 1
    private var watchers: [Int: AsyncStream<Int>.Continuation] = [:]
    private var nextWatcher = 0
    /// Shared store: each instance's revision there, and the revision applied so far.
    private var revisions: [InstanceKey: Int64] = [:]
    private var appliedRevision: Int64 = 0
    private var revisionWaiters: [Int: (revision: Int64, continuation: CheckedContinuation<Void, Never>)] = [:]
    private var nextRevisionWaiter = 0
    /// Changes to one service are made one at a time (each awaits its store write); changes to
    /// different services go on together (a shared store's round trips overlap).
    private var changingServices: Set<String> = []
    private var changingAll = false
    private var waitingToChange: [CheckedContinuation<Void, Never>] = []

    /// Loads the stored registrations. With a local store, a lease that would have run out while
    /// pilot was down is given one more full TTL from now, since its agent could not renew it.
    public init(
        store: any RegistryStore,
        logger: Logger,
        now: @escaping @Sendable () -> Double = { Date().timeIntervalSince1970 }
    ) async throws {
        self.store = store
        self.shared = store as? any SharedRegistryStore
        self.logger = logger
        self.now = now
        if let shared {
            let snapshot = try await shared.snapshot()
            _ = replace(with: snapshot)
            appliedRevision = snapshot.revision
            return
        }
        let start = now()
        for var instance in try await store.loadInstances() {
            if let ttl = instance.leaseTTL {
                instance.leaseExpiresAt = max(instance.leaseExpiresAt ?? 0, start + ttl.seconds)
            }
            agentInstances[instance.key] = instance
        }
    }

    // MARK: Agent registrations

    public struct Registration: Sendable, Hashable {
        public var instance: Instance
        public var ttl: Duration

        public init(instance: Instance, ttl: Duration) {
            self.instance = instance
            self.ttl = ttl
        }
    }

    /// Registers (or re-registers, from the same node) an instance with a lease. Returns the
    /// stored instance and whether it is new.
    public func register(
        _ registration: Registration
    ) async throws(RegistryError) -> (instance: Instance, created: Bool) {
        try await exclusive([registration.instance.key.service]) { () async throws(RegistryError) in
            try await registerNow(registration)
        }
    }

    private func registerNow(
        _ registration: Registration
    ) async throws(RegistryError) -> (instance: Instance, created: Bool) {
        var instance = registration.instance
        instance.source = .agent
        instance.leaseTTL = registration.ttl
        let leaseEnd = now() + registration.ttl.seconds
        instance.leaseExpiresAt = shared == nil ? leaseEnd : nil  // a shared store's leases are its own
        if let existing = agentInstances[instance.key], existing.node != instance.node {
            throw RegistryError(
                .conflict,
                "instance \(instance.key) is already registered by node '\(existing.node)'; deregister it there first"
            )
        }
        if staticInstances().contains(where: { $0.key == instance.key }) {
            throw RegistryError(
                .conflict,
                "instance \(instance.key) is declared in mesh.yaml; it cannot also be registered"
            )
        }
        try checkProtocol(of: instance)
        let created = agentInstances[instance.key] == nil
        if let existing = agentInstances[instance.key], existing.status == .draining, instance.status == .healthy {
            instance.status = .draining  // a re-registration does not undo a drain
        }
        try await commit(upserts: [instance])
        instance.leaseExpiresAt = leaseEnd
        return (instance, created)
    }

    /// Extends an instance's lease by its TTL.
    public func renew(_ key: InstanceKey) async throws(RegistryError) -> Instance {
        try await exclusive([key.service]) { () async throws(RegistryError) in
            guard var instance = agentInstances[key] else {
                throw RegistryError(
                    .notFound,
                    "instance \(key) is not registered (its lease may have run out); register it again"
                )
            }
            let leaseEnd = now() + (instance.leaseTTL?.seconds ?? 0)
            if let shared {
                let alive: Bool
                do {
                    alive = try await shared.renew(key)
                } catch {
                    logger.error("registry store lease renewal failed", metadata: ["error": "\(error)"])
                    throw RegistryError(.unavailable, "the registry store could not renew the lease (\(error))")
                }
                guard alive else {
                    throw RegistryError(.notFound, "instance \(key)'s lease ran out; register it again")
                }
            } else {
                instance.leaseExpiresAt = leaseEnd
                try await commit(upserts: [instance])  // no version change: what xDS serves is the same
            }
            instance.leaseExpiresAt = leaseEnd
            return instance
        }
    }

    public func deregister(_ key: InstanceKey) async throws(RegistryError) {
        try await exclusive([key.service]) { () async throws(RegistryError) in
            guard agentInstances[key] != nil else {
                throw RegistryError(.notFound, "instance \(key) is not registered")
            }
            try await commit(deletions: [key])
        }
    }

    /// Sets an instance's status (health from the agent's checks, or draining).
    public func setStatus(_ key: InstanceKey, _ status: InstanceStatus) async throws(RegistryError) -> Instance {
        try await exclusive([key.service]) { () async throws(RegistryError) in
            guard var instance = agentInstances[key] else {
                throw RegistryError(.notFound, "instance \(key) is not registered")
            }
            guard instance.status != status else { return instance }
            instance.status = status
            try await commit(upserts: [instance])
            return instance
        }
    }

    /// Sets the status of every instance a node registered (`trellis-agent drain`).
    public func setStatus(node: String, _ status: InstanceStatus) async throws(RegistryError) -> [Instance] {
        try await exclusive(nil) { () async throws(RegistryError) in
            var all = agentInstances.filter { $0.value.node == node }
            let updated = all.values.filter { $0.status != status }.map { instance in
                var i = instance
                i.status = status
                return i
            }
            if !updated.isEmpty {
                try await commit(upserts: updated)
                for instance in updated { all[instance.key] = instance }
            }
            return all.values.sorted { $0.key < $1.key }
        }
    }

    /// Removes the instances whose lease ran out (a local store's; a shared store expires its
    /// own); returns their keys.
    @discardableResult
    public func expireLeases() async -> [InstanceKey] {
        guard shared == nil else { return [] }
        return
            (try? await exclusive(nil) { () async throws(RegistryError) -> [InstanceKey] in
                let t = now()
                let expired = agentInstances.values.filter { ($0.leaseExpiresAt ?? .infinity) < t }.map(\.key).sorted()
                guard !expired.isEmpty else { return [] }
                do {
                    try await commit(deletions: expired)
                } catch {
                    logger.error("could not remove expired leases; will retry", metadata: ["error": "\(error)"])
                    return []
                }
                logger.info(
                    "leases expired",
                    metadata: ["instances": "\(expired.map(\.description).joined(separator: ", "))"]
                )
                return expired
            }) ?? []
    }

    // MARK: mesh.yaml and the CMDB

    /// Replaces the mesh configuration; refused (and nothing changes) when a static instance
    /// collides with a registered one or a service's protocol contradicts its registrations.
    public func applyMesh(_ new: MeshConfig) throws(RegistryError) {
        var problems: [String] = []
        for service in new.services {
            for instance in service.instances where agentInstances[instance.key] != nil {
                problems.append(
                    "instance \(instance.key) is already registered by node '\(agentInstances[instance.key]!.node)'"
                )
            }
            for instance in agentInstances.values
            where instance.service == service.key && instance.serviceProtocol != service.serviceProtocol {
                problems.append(
                    "service \(service.key) is declared \(service.serviceProtocol.rawValue) but \(instance.key) registered it as \(instance.serviceProtocol.rawValue)"
                )
                break
            }
        }
        guard problems.isEmpty else { throw RegistryError(.conflict, problems.joined(separator: "; ")) }
        guard new != mesh else { return }
        mesh = new
        changed()
    }

    /// Replaces the machine metadata (by node id) merged into instances. On a shared store it
    /// is written there (by the one pilot that polls the CMDB) and reaches every pilot from it.
    public func setMachines(_ new: [String: MachineMetadata]) async {
        guard new != machines else { return }
        guard let shared else {
            machines = new
            changed()
            return
        }
        do {
            let revision = try await shared.writeMachines(new)
            await caughtUp(to: revision)
        } catch {
            logger.error("could not store the CMDB's machine metadata; will retry", metadata: ["error": "\(error)"])
        }
    }

    // MARK: Reading

    public func instances(service: String? = nil) -> [Instance] {
        allInstances().filter { service == nil || $0.key.service == service }
    }

    public func view() -> RegistryView {
        var byService: [ServiceKey: RegistryView.Service] = [:]
        for service in mesh.services {
            byService[service.key] = .init(
                key: service.key,
                serviceProtocol: service.serviceProtocol,
                hosts: service.hosts,
                instances: []
            )
        }
        for instance in allInstances() {
            byService[
                instance.service,
                default: .init(
                    key: instance.service,
                    serviceProtocol: instance.serviceProtocol,
                    hosts: [],
                    instances: []
                )
            ]
            .instances.append(instance)
        }
        return RegistryView(version: version, services: byService.values.sorted { $0.key < $1.key }, mesh: mesh)
    }

    /// Yields the registry version after each change (the newest only, when the reader lags).
    public func watch() -> (id: Int, versions: AsyncStream<Int>) {
        let id = nextWatcher
        nextWatcher += 1
        let (stream, continuation) = AsyncStream<Int>.makeStream(bufferingPolicy: .bufferingNewest(1))
        watchers[id] = continuation
        continuation.yield(version)
        return (id, stream)
    }

    public func unwatch(_ id: Int) {
        watchers.removeValue(forKey: id)?.finish()
    }

    // MARK: Internals

    private func staticInstances() -> [Instance] { mesh.services.flatMap(\.instances) }

    /// Every instance with the CMDB's metadata merged in (the registration's own values win).
    private func allInstances() -> [Instance] {
        (Array(agentInstances.values) + staticInstances()).map { instance in
            guard let machine = machines[instance.node] else { return instance }
            var merged = instance
            if merged.locality.region.isEmpty { merged.locality.region = machine.locality.region }
            if merged.locality.zone.isEmpty { merged.locality.zone = machine.locality.zone }
            if merged.locality.subzone.isEmpty { merged.locality.subzone = machine.locality.subzone }
            merged.labels = machine.labels.merging(instance.labels) { _, own in own }
            return merged
        }.sorted { $0.key < $1.key }
    }

    private func checkProtocol(of instance: Instance) throws(RegistryError) {
        if let declared = mesh.services.first(where: { $0.key == instance.service }),
            declared.serviceProtocol != instance.serviceProtocol
        {
            throw RegistryError(
                .conflict,
                "service \(instance.service) is declared \(declared.serviceProtocol.rawValue) in mesh.yaml, not \(instance.serviceProtocol.rawValue)"
            )
        }
        if let other = agentInstances.values.first(where: {
            $0.service == instance.service && $0.key != instance.key && $0.serviceProtocol != instance.serviceProtocol
        }) {
            throw RegistryError(
                .conflict,
                "service \(instance.service) is registered as \(other.serviceProtocol.rawValue) by \(other.key), not \(instance.serviceProtocol.rawValue)"
            )
        }
    }

    /// Stores a change. A local store's is then applied here; a shared store's comes back
    /// through ``follow()``, which this waits for (up to 2 s: the write is durable either way).
    private func commit(upserts: [Instance] = [], deletions: [InstanceKey] = []) async throws(RegistryError) {
        if let shared {
            var expected: [InstanceKey: Int64] = [:]
            for key in upserts.map(\.key) + deletions { expected[key] = revisions[key] }
            let revision: Int64
            do {
                revision = try await shared.write(upserts: upserts, deletions: deletions, expected: expected)
            } catch let error as RegistryStoreError where error.conflict {
                throw RegistryError(.conflict, "\(error.underlying); try again")
            } catch {
                logger.error("registry store write failed", metadata: ["error": "\(error)"])
                throw RegistryError(
                    .unavailable,
                    "the registry store could not be written; nothing was changed (\(error))"
                )
            }
            await caughtUp(to: revision)
            return
        }
        do {
            try await store.write(upserts: upserts, deletions: deletions)
        } catch {
            logger.error("registry store write failed", metadata: ["error": "\(error)"])
            throw RegistryError(.unavailable, "the registry store could not be written; nothing was changed (\(error))")
        }
        var served = !deletions.isEmpty
        for instance in upserts {
            if let old = agentInstances[instance.key], Self.servedAlike(old, instance) {} else { served = true }
            agentInstances[instance.key] = instance
        }
        for key in deletions { agentInstances[key] = nil }
        if served { changed() }
    }

    /// Whether xDS serves the two alike (a renewal changes only the lease's end).
    private static func servedAlike(_ a: Instance, _ b: Instance) -> Bool {
        var a = a
        a.leaseExpiresAt = b.leaseExpiresAt
        return a == b
    }

    /// Runs `body` once no other change to `services` (nil: to any service) is in progress: a
    /// change awaits its store write, and another request must not decide on what that write is
    /// about to replace (a service's instances are checked against each other).
    private func exclusive<T>(
        _ services: Set<String>?,
        _ body: () async throws(RegistryError) -> T
    ) async throws(RegistryError) -> T {
        while changingAll || (services.map { !changingServices.isDisjoint(with: $0) } ?? !changingServices.isEmpty) {
            await withCheckedContinuation { waitingToChange.append($0) }
        }
        if let services { changingServices.formUnion(services) } else { changingAll = true }
        defer {
            if let services { changingServices.subtract(services) } else { changingAll = false }
            let woken = waitingToChange
            waitingToChange = []
            for waiter in woken { waiter.resume() }  // each checks again
        }
        return try await body()
    }

    // MARK: Following a shared store

    /// Applies the shared store's changes (this pilot's own writes, other pilots', lease expiries)
    /// as they come, until the task is cancelled. Nothing to do on a local store.
    public func follow() async {
        guard let shared else { return }
        for await batch in shared.changes(after: appliedRevision) { apply(batch) }
    }

    private func apply(_ batch: [SharedChange]) {
        var served = false
        var removed: [InstanceKey] = []
        for change in batch {
            switch change {
            case .upsert(let instance, let revision):
                if agentInstances[instance.key] != instance { served = true }
                agentInstances[instance.key] = instance
                revisions[instance.key] = revision
            case .delete(let key, _):
                if agentInstances.removeValue(forKey: key) != nil {
                    served = true
                    removed.append(key)
                }
                revisions[key] = nil
            case .machines(let new, _):
                if new != machines {
                    machines = new
                    served = true
                }
            case .reset(let snapshot):
                if replace(with: snapshot) { served = true }
            }
            appliedRevision = max(appliedRevision, change.revision)
        }
        if !removed.isEmpty {
            logger.info(
                "instances removed",
                metadata: ["instances": "\(removed.map(\.description).joined(separator: ", "))"]
            )
        }
        if served { changed() }
        for (id, waiter) in revisionWaiters where waiter.revision <= appliedRevision {
            revisionWaiters[id] = nil
            waiter.continuation.resume()
        }
    }

    /// Takes the shared store's whole state (at start, and after a resync); whether what xDS
    /// serves changed.
    private func replace(with snapshot: SharedSnapshot) -> Bool {
        let instances = Dictionary(snapshot.instances.map { ($0.instance.key, $0.instance) }) { _, new in new }
        let changed = instances != agentInstances || snapshot.machines != machines
        agentInstances = instances
        revisions = Dictionary(snapshot.instances.map { ($0.instance.key, $0.revision) }) { _, new in new }
        machines = snapshot.machines
        return changed
    }

    /// Waits until the change feed has applied `revision` (at most 2 s).
    private func caughtUp(to revision: Int64) async {
        guard appliedRevision < revision else { return }
        let id = nextRevisionWaiter
        nextRevisionWaiter += 1
        await withCheckedContinuation { continuation in
            revisionWaiters[id] = (revision, continuation)
            Task {
                try? await Task.sleep(for: .seconds(2))
                await self.releaseRevisionWaiter(id)
            }
        }
    }

    private func releaseRevisionWaiter(_ id: Int) {
        guard let waiter = revisionWaiters.removeValue(forKey: id) else { return }
        logger.warning(
            "the registry store's change feed has not brought a write back within 2 s; it applies once it does",
            metadata: ["revision": "\(waiter.revision)", "applied": "\(appliedRevision)"]
        )
        waiter.continuation.resume()
    }

    /// Why the store cannot serve now (a shared store without quorum), or nil when it can.
    public func storeUnavailable() async -> String? {
        await shared?.readiness()
    }

    private func changed() {
        version += 1
        for watcher in watchers.values { watcher.yield(version) }
    }
}

extension Duration {
    var seconds: Double { Double(components.seconds) + Double(components.attoseconds) * 1e-18 }
}
