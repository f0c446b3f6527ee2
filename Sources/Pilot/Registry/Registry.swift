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
public actor Registry {
    private let store: any RegistryStore
    private let logger: Logger
    private let now: @Sendable () -> Double
    private var agentInstances: [InstanceKey: Instance] = [:]
    private var mesh: MeshConfig = .empty
    private var machines: [String: MachineMetadata] = [:]
    private(set) var version = 1
    private var watchers: [Int: AsyncStream<Int>.Continuation] = [:]
    private var nextWatcher = 0

    /// Loads the stored registrations. A lease that would have run out while pilot was down is
    /// given one more full TTL from now, since its agent could not renew it.
    public init(
        store: any RegistryStore,
        logger: Logger,
        now: @escaping @Sendable () -> Double = { Date().timeIntervalSince1970 }
    ) throws {
        self.store = store
        self.logger = logger
        self.now = now
        let start = now()
        for var instance in try store.loadInstances() {
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
    public func register(_ registration: Registration) throws(RegistryError) -> (instance: Instance, created: Bool) {
        var instance = registration.instance
        instance.source = .agent
        instance.leaseTTL = registration.ttl
        instance.leaseExpiresAt = now() + registration.ttl.seconds
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
        try persist(upserts: [instance])
        agentInstances[instance.key] = instance
        changed()
        return (instance, created)
    }

    /// Extends an instance's lease by its TTL.
    public func renew(_ key: InstanceKey) throws(RegistryError) -> Instance {
        guard var instance = agentInstances[key] else {
            throw RegistryError(
                .notFound,
                "instance \(key) is not registered (its lease may have run out); register it again"
            )
        }
        instance.leaseExpiresAt = now() + (instance.leaseTTL?.seconds ?? 0)
        try persist(upserts: [instance])
        agentInstances[key] = instance  // no version change: what xDS serves is the same
        return instance
    }

    public func deregister(_ key: InstanceKey) throws(RegistryError) {
        guard agentInstances[key] != nil else { throw RegistryError(.notFound, "instance \(key) is not registered") }
        try persist(deletions: [key])
        agentInstances[key] = nil
        changed()
    }

    /// Sets an instance's status (health from the agent's checks, or draining).
    public func setStatus(_ key: InstanceKey, _ status: InstanceStatus) throws(RegistryError) -> Instance {
        guard var instance = agentInstances[key] else {
            throw RegistryError(.notFound, "instance \(key) is not registered")
        }
        guard instance.status != status else { return instance }
        instance.status = status
        try persist(upserts: [instance])
        agentInstances[key] = instance
        changed()
        return instance
    }

    /// Sets the status of every instance a node registered (`trellis-agent drain`).
    public func setStatus(node: String, _ status: InstanceStatus) throws(RegistryError) -> [Instance] {
        var updated = agentInstances.values.filter { $0.node == node && $0.status != status }
        guard !updated.isEmpty else {
            return agentInstances.values.filter { $0.node == node }.sorted { $0.key < $1.key }
        }
        for i in updated.indices { updated[i].status = status }
        try persist(upserts: updated)
        for instance in updated { agentInstances[instance.key] = instance }
        changed()
        return agentInstances.values.filter { $0.node == node }.sorted { $0.key < $1.key }
    }

    /// Removes the instances whose lease ran out; returns their keys.
    @discardableResult
    public func expireLeases() -> [InstanceKey] {
        let t = now()
        let expired = agentInstances.values.filter { ($0.leaseExpiresAt ?? .infinity) < t }.map(\.key).sorted()
        guard !expired.isEmpty else { return [] }
        do {
            try persist(deletions: expired)
        } catch {
            logger.error("could not remove expired leases; will retry", metadata: ["error": "\(error)"])
            return []
        }
        for key in expired { agentInstances[key] = nil }
        logger.info("leases expired", metadata: ["instances": "\(expired.map(\.description).joined(separator: ", "))"])
        changed()
        return expired
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

    /// Replaces the machine metadata (by node id) merged into instances.
    public func setMachines(_ new: [String: MachineMetadata]) {
        guard new != machines else { return }
        machines = new
        changed()
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

    private func persist(upserts: [Instance] = [], deletions: [InstanceKey] = []) throws(RegistryError) {
        do {
            try store.write(upserts: upserts, deletions: deletions)
        } catch {
            logger.error("registry store write failed", metadata: ["error": "\(error)"])
            throw RegistryError(.unavailable, "the registry store could not be written; nothing was changed (\(error))")
        }
    }

    private func changed() {
        version += 1
        for watcher in watchers.values { watcher.yield(version) }
    }
}

extension Duration {
    var seconds: Double { Double(components.seconds) + Double(components.attoseconds) * 1e-18 }
}
