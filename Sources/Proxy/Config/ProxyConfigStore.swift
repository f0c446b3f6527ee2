public import Atomics

/// Holds the current ``ProxySnapshot``. Writers swap a whole snapshot in; readers on the hot path
/// do one atomic load per request.
public final class ProxyConfigStore: Sendable {
    private let current: ManagedAtomic<ProxySnapshot>

    public init(_ snapshot: ProxySnapshot) {
        self.current = ManagedAtomic(snapshot)
    }

    public var snapshot: ProxySnapshot { current.load(ordering: .acquiring) }

    /// Makes `snapshot` current; requests already in flight finish on the one they started with.
    public func apply(_ snapshot: ProxySnapshot) {
        current.store(snapshot, ordering: .releasing)
    }
}
