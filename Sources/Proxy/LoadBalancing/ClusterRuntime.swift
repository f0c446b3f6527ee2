import Atomics
import NIOCore
import TrellisPolicy

/// A cluster of the current snapshot, prepared for the hot path: endpoints with their socket
/// addresses resolved where they are literals, the healthy subset, and the hash ring.
final class ClusterRuntime: Sendable {
    /// A class: a request hands its endpoint to the pool and the exchange without copying the
    /// endpoint's fields (each copy was a retain per string and address).
    final class EndpointRuntime: Sendable {
        let config: Endpoint
        /// Pre-built for IP literals; `nil` for names, which are resolved at connect time.
        let socketAddress: SocketAddress?
        /// Identifies the endpoint in connection pools and in least-request counters.
        let key: String

        init(config: Endpoint, socketAddress: SocketAddress?, key: String) {
            self.config = config
            self.socketAddress = socketAddress
            self.key = key
        }
    }

    let index: Int
    let config: ClusterConfig
    let endpoints: [EndpointRuntime]
    /// Indexes into `endpoints` of those that may take new requests.
    let healthy: [Int]
    /// With endpoints of more than one priority: per priority, lowest first, all its endpoints
    /// and its healthy ones (failover: ``LoadBalancer`` picks a level first). Empty otherwise.
    let levels: [(all: [Int], healthy: [Int])]
    let ring: HashRing?
    let stats: ClusterStats
    /// Connections, pending and in-flight requests over all loops (kept across snapshots).
    let load: ClusterLoad
    /// The circuit breakers' limits: as configured, else the defaults, and no limit for a
    /// passthrough cluster (it stands for every destination the machine's programs dial).
    let limits: CircuitBreakers
    let rateLimiter: RateLimiter?
    /// With outlier detection: the detector and each endpoint's record, by endpoint index.
    let outlier: OutlierDetector?
    let outlierRecords: [EndpointRecord]
    /// With active health checks: each endpoint's record, by endpoint index.
    let healthRecords: [EndpointHealth]
    /// `config.pool.idleTimeout` for the loop's timers, converted once (the pool asks per request).
    let poolIdleTimeout: TimeAmount

    init(
        index: Int,
        config: ClusterConfig,
        stats: ClusterStats,
        load: ClusterLoad,
        rateLimiter: RateLimiter? = nil,
        outlier: OutlierDetector? = nil,
        health: [EndpointHealth]? = nil
    ) {
        self.healthRecords = health ?? []
        self.poolIdleTimeout = TimeAmount(truncating: config.pool.idleTimeout)
        self.index = index
        self.config = config
        self.load = load
        self.rateLimiter = rateLimiter
        if config.outlierDetection != nil, let outlier {
            self.outlier = outlier
            self.outlierRecords = config.endpoints.map { outlier.record($0.address.description) }
        } else {
            self.outlier = nil
            self.outlierRecords = []
        }
        let unlimited = CircuitBreakers.maxLimit
        self.limits =
            config.circuitBreakers
            ?? (config.originalDestination
                ? CircuitBreakers(
                    maxConnections: unlimited,
                    maxPendingRequests: unlimited,
                    maxRequests: unlimited,
                    maxRetries: unlimited
                ) : CircuitBreakers())
        self.endpoints = config.endpoints.map { endpoint in
            EndpointRuntime(
                config: endpoint,
                socketAddress: try? SocketAddress(ipAddress: endpoint.address.host, port: endpoint.address.port),
                key: endpoint.address.description
            )
        }
        self.healthy = config.endpoints.indices.filter { config.endpoints[$0].health == .healthy }
        let priorities = Set(config.endpoints.map(\.priority)).sorted()
        self.levels =
            priorities.count < 2
            ? []
            : priorities.map { priority in
                let all = config.endpoints.indices.filter { config.endpoints[$0].priority == priority }
                return (all, all.filter { config.endpoints[$0].health == .healthy })
            }
        if case .ringHash(_, let minimumSize) = config.loadBalancing {
            self.ring = HashRing(endpoints: config.endpoints, minimumSize: minimumSize)
        } else {
            self.ring = nil
        }
        self.stats = stats
    }

    /// Whether the endpoint at `index` may take a request now: not ejected by outlier detection
    /// and not failing its health checks.
    @inline(__always)
    func isAvailable(_ index: Int, now: UInt64) -> Bool {
        if !outlierRecords.isEmpty && outlierRecords[index].isEjected(now: now) { return false }
        if !healthRecords.isEmpty && healthRecords[index].failing.load(ordering: .relaxed) { return false }
        return true
    }

    var checksAvailability: Bool { !outlierRecords.isEmpty || !healthRecords.isEmpty }
}
