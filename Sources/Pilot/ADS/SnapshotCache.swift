/// Each connected node's current snapshot. Setting a snapshot that differs from the node's
/// current one wakes only that node's streams: a registry change reaches the nodes whose view it
/// changed and no others.
public actor SnapshotCache {
    private var snapshots: [String: NodeSnapshot] = [:]
    private var watchers: [String: [Int: AsyncStream<Void>.Continuation]] = [:]
    private var nextWatcher = 0

    public init() {}

    /// Sets `node`'s snapshot; returns whether it changed.
    @discardableResult
    public func set(_ node: String, _ snapshot: NodeSnapshot) -> Bool {
        guard snapshots[node] != snapshot else { return false }
        snapshots[node] = snapshot
        for watcher in watchers[node, default: [:]].values { watcher.yield() }
        return true
    }

    /// Sets several nodes' snapshots at once; returns how many changed.
    @discardableResult
    public func set(_ batch: [(node: String, snapshot: NodeSnapshot)]) -> Int {
        var changed = 0
        for (node, snapshot) in batch where set(node, snapshot) { changed += 1 }
        return changed
    }

    public func snapshot(_ node: String) -> NodeSnapshot? { snapshots[node] }

    /// Several nodes' snapshots in one call.
    public func snapshots(_ nodes: some Sequence<String>) -> [String: NodeSnapshot] {
        var result: [String: NodeSnapshot] = [:]
        for node in nodes { result[node] = snapshots[node] }
        return result
    }

    public var nodes: [String] { snapshots.keys.sorted() }

    /// Forgets a node that has no stream left.
    public func remove(_ node: String) {
        guard watchers[node, default: [:]].isEmpty else { return }
        snapshots[node] = nil
    }

    /// A stream that yields after each change of `node`'s snapshot.
    func watch(_ node: String) -> (id: Int, changes: AsyncStream<Void>) {
        let id = nextWatcher
        nextWatcher += 1
        let (stream, continuation) = AsyncStream<Void>.makeStream(bufferingPolicy: .bufferingNewest(1))
        watchers[node, default: [:]][id] = continuation
        return (id, stream)
    }

    func unwatch(_ node: String, _ id: Int) {
        watchers[node]?.removeValue(forKey: id)?.finish()
        if watchers[node]?.isEmpty == true { watchers[node] = nil }
    }
}

/// Who computes a node's snapshot when it connects (and keeps it current while it stays).
public protocol NodeSnapshotSource: Sendable {
    /// A stream of `node` opened; its snapshot must be in the cache when this returns.
    func nodeConnected(_ node: NodeInfo) async
    /// A stream of the node closed.
    func nodeDisconnected(_ node: NodeInfo) async
}

/// Serves every node the same snapshot (tests; a fixed bootstrap).
public struct StaticSnapshotSource: NodeSnapshotSource {
    let cache: SnapshotCache
    let snapshot: NodeSnapshot

    public init(cache: SnapshotCache, snapshot: NodeSnapshot) {
        self.cache = cache
        self.snapshot = snapshot
    }

    public func nodeConnected(_ node: NodeInfo) async {
        if await cache.snapshot(node.id) == nil { await cache.set(node.id, snapshot) }
    }

    public func nodeDisconnected(_ node: NodeInfo) async {}
}
