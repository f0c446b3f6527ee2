/// An immutable snapshot of everything the data path needs: listeners, routes, clusters, endpoints
/// and policies.
///
/// A new snapshot is built whole (from a static file in gateway mode, later from xDS), validated,
/// and swapped in atomically through ``ProxyConfigStore``; a listener picks it up on its next
/// request, and open connections are never dropped by a swap.
public struct ProxyConfig: Sendable, Hashable, Codable {
    /// A label for this snapshot (a file digest, an xDS version); shown in `/config_dump`.
    public var version: String
    public var listeners: [ListenerConfig]
    public var clusters: [ClusterConfig]

    public init(version: String = "0", listeners: [ListenerConfig] = [], clusters: [ClusterConfig] = []) {
        self.version = version
        self.listeners = listeners
        self.clusters = clusters
    }
}
