public import TrellisPolicy

/// A named group of endpoints serving one service, with how to pick among them and how to
/// connect to them.
public struct ClusterConfig: Sendable, Hashable, Codable {
    public var name: String
    public var loadBalancing: LoadBalancingPolicy
    public var endpoints: [Endpoint]
    public var connectTimeout: Duration
    public var pool: PoolSettings
    /// A passthrough cluster (Envoy's `ORIGINAL_DST`): no endpoints of its own; each request goes
    /// where its connection was going before the capture rules redirected it.
    public var originalDestination: Bool
    /// Limits on connections and requests in flight; `nil` means the defaults
    /// (``CircuitBreakers/init(maxConnections:maxPendingRequests:maxRequests:maxRetries:)``).
    public var circuitBreakers: CircuitBreakers?
    /// A rate limit on all requests sent to this cluster, whatever their route.
    public var rateLimit: RateLimit?
    /// Takes failing endpoints out of load balancing for a while; `nil`: off.
    public var outlierDetection: OutlierDetection?
    /// Probes the endpoints; those failing leave load balancing until they pass; `nil`: off.
    public var healthCheck: HealthCheck?
    /// How requests reach the endpoints.
    public var upstreamProtocol: UpstreamProtocol
    /// With endpoints of several priorities: a level keeps this percentage of its available share
    /// of the traffic before the rest spills to the next (Envoy's `overprovisioning_factor`);
    /// `nil`: Envoy's default, 140.
    public var overprovisioningFactor: Int?

    public init(
        name: String,
        loadBalancing: LoadBalancingPolicy = .roundRobin,
        endpoints: [Endpoint],
        connectTimeout: Duration = .seconds(1),
        pool: PoolSettings = .init(),
        originalDestination: Bool = false,
        circuitBreakers: CircuitBreakers? = nil,
        rateLimit: RateLimit? = nil,
        outlierDetection: OutlierDetection? = nil,
        healthCheck: HealthCheck? = nil,
        upstreamProtocol: UpstreamProtocol = .http1,
        overprovisioningFactor: Int? = nil
    ) {
        self.overprovisioningFactor = overprovisioningFactor
        self.upstreamProtocol = upstreamProtocol
        self.healthCheck = healthCheck
        self.outlierDetection = outlierDetection
        self.circuitBreakers = circuitBreakers
        self.rateLimit = rateLimit
        self.originalDestination = originalDestination
        self.name = name
        self.loadBalancing = loadBalancing
        self.endpoints = endpoints
        self.connectTimeout = connectTimeout
        self.pool = pool
    }

    enum CodingKeys: String, CodingKey {
        case name, endpoints, pool
        case originalDestination = "original_destination"
        case loadBalancing = "lb_policy"
        case connectTimeout = "connect_timeout"
        case circuitBreakers = "circuit_breakers"
        case rateLimit = "rate_limit"
        case outlierDetection = "outlier_detection"
        case healthCheck = "health_check"
        case upstreamProtocol = "protocol"
        case overprovisioningFactor = "overprovisioning_factor"
    }
}

/// The protocol a cluster's endpoints are spoken to in.
public enum UpstreamProtocol: String, Sendable, Hashable, Codable, CaseIterable {
    /// HTTP/1.1 on keep-alive connections.
    case http1
    /// HTTP/2 without TLS, with prior knowledge (h2c); streams multiplexed on few connections.
    /// gRPC servers need it.
    case http2
    /// The client's own protocol (Envoy's `USE_DOWNSTREAM_PROTOCOL`): what passthrough uses, since
    /// a client that spoke h2c to a destination knew the destination speaks it.
    case downstream
}

/// Keep-alive connection pooling towards a cluster's endpoints; each event loop has its own pool.
public struct PoolSettings: Sendable, Hashable, Codable {
    /// Idle connections kept per endpoint per event loop. The default keeps what the busiest
    /// moment needed (the cluster's `max_connections` bounds it), as Envoy does, until
    /// `idleTimeout`: a lower cap closes and reopens connections under a steady high concurrency.
    public var maxIdlePerEndpoint: Int
    /// An idle pooled connection is closed after this time.
    public var idleTimeout: Duration
    /// A connection is closed after serving this many requests; `nil` means no limit.
    public var maxRequestsPerConnection: Int?

    public init(
        maxIdlePerEndpoint: Int = 1024,
        idleTimeout: Duration = .seconds(60),
        maxRequestsPerConnection: Int? = nil
    ) {
        self.maxIdlePerEndpoint = maxIdlePerEndpoint
        self.idleTimeout = idleTimeout
        self.maxRequestsPerConnection = maxRequestsPerConnection
    }

    enum CodingKeys: String, CodingKey {
        case maxIdlePerEndpoint = "max_idle_per_endpoint"
        case idleTimeout = "idle_timeout"
        case maxRequestsPerConnection = "max_requests_per_connection"
    }
}

/// One upstream instance.
public struct Endpoint: Sendable, Hashable, Codable {
    public enum Health: String, Sendable, Hashable, Codable, CaseIterable {
        case healthy
        case unhealthy
        /// Finishing its work; gets no new requests.
        case draining
    }

    public var address: SocketEndpoint
    public var weight: Int
    public var health: Health
    /// Failover order (EDS priority): requests go to priority 0 while enough of it is available,
    /// and spill to the next as it fails (pilot numbers the client's zone 0, its region next).
    public var priority: Int

    public init(address: SocketEndpoint, weight: Int = 1, health: Health = .healthy, priority: Int = 0) {
        self.address = address
        self.weight = weight
        self.health = health
        self.priority = priority
    }

    /// The highest priority an endpoint may have.
    public static let maxPriority = 127

    enum CodingKeys: String, CodingKey {
        case address, weight, health, priority
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        address = try c.decode(SocketEndpoint.self, forKey: .address)
        weight = try c.decode(Int.self, forKey: .weight)
        health = try c.decode(Health.self, forKey: .health)
        // Configurations saved before priorities existed have none: all one level.
        priority = try c.decodeIfPresent(Int.self, forKey: .priority) ?? 0
    }
}
