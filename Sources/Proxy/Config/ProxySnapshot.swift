public import Atomics

/// A validated ``ProxyConfig`` compiled for the hot path (route tables, hash rings, cluster
/// indexes). Immutable and shared by all event loops; a loop reads the current one with a single
/// atomic load.
public final class ProxySnapshot: Sendable, AtomicReference {
    public let config: ProxyConfig
    let routeTables: [String: RouteTable]
    /// Per original destination port, by listener (only listeners that have such tables).
    let portRouteTables: [String: [Int: RouteTable]]
    let clusters: [ClusterRuntime]
    let clusterIndex: [String: Int]

    /// Validates and compiles `config`. Throws every ``ProxyConfigError`` found; nothing is
    /// applied from an invalid configuration.
    public init(_ config: ProxyConfig, stats: ProxyStats) throws(ProxyConfigErrors) {
        let errors = config.validationErrors()
        guard errors.isEmpty else { throw ProxyConfigErrors(errors: errors) }
        var clusterIndex: [String: Int] = [:]
        var clusters: [ClusterRuntime] = []
        for (i, cluster) in config.clusters.enumerated() {
            clusterIndex[cluster.name] = i
            clusters.append(
                ClusterRuntime(
                    index: i,
                    config: cluster,
                    stats: stats.cluster(cluster.name),
                    load: stats.resilience.load(cluster: cluster.name),
                    rateLimiter: cluster.rateLimit.map {
                        stats.resilience.limiter(scope: "cluster \(cluster.name)", $0)
                    },
                    outlier: cluster.outlierDetection.map { _ in stats.resilience.detector(cluster: cluster.name) },
                    health: cluster.healthCheck.map { _ in
                        cluster.endpoints.map {
                            stats.resilience.health(cluster: cluster.name, endpoint: $0.address.description)
                        }
                    }
                )
            )
        }
        var tables: [String: RouteTable] = [:]
        var portTables: [String: [Int: RouteTable]] = [:]
        for (li, listener) in config.listeners.enumerated() {
            do {
                tables[listener.name] = try RouteTable(
                    listener.virtualHosts,
                    clusterIndex: clusterIndex,
                    scope: listener.name,
                    limiter: stats.resilience.limiter
                )
                for (port, hosts) in listener.portVirtualHosts {
                    portTables[listener.name, default: [:]][port] = try RouteTable(
                        hosts,
                        clusterIndex: clusterIndex,
                        scope: "\(listener.name):\(port)",
                        limiter: stats.resilience.limiter
                    )
                }
            } catch {
                throw ProxyConfigErrors(errors: [.init(path: "listeners[\(li)]", message: "\(error)")])
            }
        }
        self.config = config
        self.clusters = clusters
        self.clusterIndex = clusterIndex
        self.routeTables = tables
        self.portRouteTables = portTables
    }

    /// The scopes of the routes' rate limits.
    var routeLimiterScopes: Set<String> {
        var scopes = Set<String>()
        for table in Array(routeTables.values) + portRouteTables.values.flatMap(\.values) {
            for host in table.virtualHosts {
                for route in host.routes { if let limiter = route.target.rateLimiter { scopes.insert(limiter.scope) } }
            }
        }
        return scopes
    }
}

/// All the problems found in one configuration.
public struct ProxyConfigErrors: Error, CustomStringConvertible {
    public var errors: [ProxyConfigError]
    public init(errors: [ProxyConfigError]) { self.errors = errors }
    public var description: String { errors.map(\.description).joined(separator: "\n") }
}
