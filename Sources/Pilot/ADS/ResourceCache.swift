public import SwiftProtobuf

/// The xDS resources pilot serves, per type URL, each type with its own version. A change bumps
/// the version of the types it touches and wakes every stream, which sends each subscribed node
/// what changed.
public actor ResourceCache {
    public struct Snapshot: Sendable {
        public var version: Int
        /// By resource name.
        public var resources: [String: Google_Protobuf_Any]
    }

    private var types: [String: Snapshot] = [:]
    private var watchers: [Int: AsyncStream<Void>.Continuation] = [:]
    private var nextWatcher = 0

    public init() {}

    /// Replaces every resource of `typeURL` (named by `name`); the version moves on only when
    /// something changed.
    public func set(_ typeURL: String, _ resources: [String: Google_Protobuf_Any]) {
        let current = types[typeURL]
        if let current, current.resources == resources { return }
        types[typeURL] = Snapshot(version: (current?.version ?? 0) + 1, resources: resources)
        for watcher in watchers.values { watcher.yield() }
    }

    public func snapshot(_ typeURL: String) -> Snapshot {
        types[typeURL] ?? Snapshot(version: 0, resources: [:])
    }

    /// A stream that yields after each change; it ends when `id` is unwatched.
    func watch() -> (id: Int, changes: AsyncStream<Void>) {
        let id = nextWatcher
        nextWatcher += 1
        let (stream, continuation) = AsyncStream<Void>.makeStream(bufferingPolicy: .bufferingNewest(1))
        watchers[id] = continuation
        return (id, stream)
    }

    func unwatch(_ id: Int) {
        watchers.removeValue(forKey: id)?.finish()
    }
}
