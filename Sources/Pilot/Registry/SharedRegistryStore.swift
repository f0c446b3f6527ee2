/// A registry store that several pilots share (etcd). Unlike a local store, it is the registry's
/// source of truth: every pilot's registry follows its changes (``changes(after:)``), applies
/// its own writes only when they come back that way, keeps its instances' leases (an instance
/// whose lease runs out disappears from the store, and so from every pilot, once), and holds the
/// CMDB's machine metadata, written by the one pilot that polls it.
public protocol SharedRegistryStore: RegistryStore {
    /// Every stored instance with the revision of its last change, the machine metadata, and
    /// the store revision they were read at.
    func snapshot() async throws -> SharedSnapshot

    /// Writes upserts and deletions in one transaction, provided each key is still at the
    /// revision in `expected` (an upsert's key absent from it must not exist; a deletion's is
    /// deleted whatever it holds; nil: no conditions); returns the revision of the write. Throws ``RegistryStoreError`` with
    /// `conflict` when another pilot changed one of them first (nothing is written).
    func write(upserts: [Instance], deletions: [InstanceKey], expected: [InstanceKey: Int64]?) async throws -> Int64

    /// Renews the instance's lease for its whole TTL; false when the lease is gone (the instance
    /// with it).
    func renew(_ key: InstanceKey) async throws -> Bool

    /// Replaces the machine metadata; returns the revision of the write.
    func writeMachines(_ machines: [String: MachineMetadata]) async throws -> Int64

    /// Every change after `revision`, in order; a resync (after the store forgot old revisions)
    /// arrives as one ``SharedChange/reset(_:)``. Ends only when the task is cancelled.
    func changes(after revision: Int64) -> AsyncStream<[SharedChange]>

    /// Whether the store can serve a consistent read now (a quorum of etcd answers); the reason
    /// when it cannot.
    func readiness() async -> String?
}

public struct SharedSnapshot: Sendable {
    public var instances: [(instance: Instance, revision: Int64)]
    public var machines: [String: MachineMetadata]
    public var revision: Int64

    public init(
        instances: [(instance: Instance, revision: Int64)],
        machines: [String: MachineMetadata],
        revision: Int64
    ) {
        self.instances = instances
        self.machines = machines
        self.revision = revision
    }
}

/// One change a shared store reports, with the store revision it happened at.
public enum SharedChange: Sendable {
    case upsert(Instance, revision: Int64)
    case delete(InstanceKey, revision: Int64)
    case machines([String: MachineMetadata], revision: Int64)
    /// Everything, read again.
    case reset(SharedSnapshot)

    public var revision: Int64 {
        switch self {
        case .upsert(_, let r), .delete(_, let r), .machines(_, let r): r
        case .reset(let snapshot): snapshot.revision
        }
    }
}
