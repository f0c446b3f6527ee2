import NIOCore

/// A cluster of the current snapshot, prepared for the hot path: endpoints with their socket
/// addresses resolved where they are literals, the healthy subset, and the hash ring.
final class ClusterRuntime: Sendable {
    struct EndpointRuntime: Sendable {
        let config: Endpoint
        /// Pre-built for IP literals; `nil` for names, which are resolved at connect time.
        let socketAddress: SocketAddress?
        /// Identifies the endpoint in connection pools and in least-request counters.
        let key: String
    }

    let index: Int
    let config: ClusterConfig
    let endpoints: [EndpointRuntime]
    /// Indexes into `endpoints` of those that may take new requests.
    let healthy: [Int]
    let ring: HashRing?
    let stats: ClusterStats

    init(index: Int, config: ClusterConfig, stats: ClusterStats) {
        self.index = index
        self.config = config
        self.endpoints = config.endpoints.map { endpoint in
            EndpointRuntime(
                config: endpoint,
                socketAddress: try? SocketAddress(ipAddress: endpoint.address.host, port: endpoint.address.port),
                key: endpoint.address.description
            )
        }
        self.healthy = config.endpoints.indices.filter { config.endpoints[$0].health == .healthy }
        if case .ringHash(_, let minimumSize) = config.loadBalancing {
            self.ring = HashRing(endpoints: config.endpoints, minimumSize: minimumSize)
        } else {
            self.ring = nil
        }
        self.stats = stats
    }
}
