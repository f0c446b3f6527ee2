public import Atomics

/// Holds the current ``ProxySnapshot``. Writers swap a whole snapshot in; readers on the hot path
/// load ``version`` (a plain integer) per request and the snapshot only when it changed: loading
/// a reference atomically is a double-word compare-and-swap and a retain.
public final class ProxyConfigStore: Sendable {
    private let current: ManagedAtomic<ProxySnapshot>
    private let applied = ManagedAtomic<Int>(0)

    public init(_ snapshot: ProxySnapshot) {
        self.current = ManagedAtomic(snapshot)
    }

    public var snapshot: ProxySnapshot { current.load(ordering: .acquiring) }

    /// How many snapshots were applied. A reader that sees a number has the snapshot it stands
    /// for (or a later one) when it loads ``snapshot`` next.
    public var version: Int { applied.load(ordering: .acquiring) }

    /// Makes `snapshot` current; requests already in flight finish on the one they started with.
    public func apply(_ snapshot: ProxySnapshot) {
        current.store(snapshot, ordering: .releasing)
        applied.wrappingIncrement(ordering: .releasing)
    }
}
