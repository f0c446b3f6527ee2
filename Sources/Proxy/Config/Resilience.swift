/// A local rate limit: a token bucket holding at most `burst` requests, refilled at
/// `requestsPerSecond`. A request that finds it empty is answered at once with 429
/// `rate_limited` and a `Retry-After` header; it is never queued or delayed.
///
/// One bucket per route or cluster for the whole proxy (all event loops take from it, so the
/// configured rate holds however connections spread over the loops), or one per client address
/// or per value of a header (`key`).
public struct RateLimit: Sendable, Hashable, Codable {
    public enum Key: Sendable, Hashable, Codable {
        /// One bucket for every request.
        case all
        /// One bucket per client IP address.
        case clientAddress
        /// One bucket per value of this request header; requests without it share one bucket.
        case header(String)
    }

    public var requestsPerSecond: Double
    public var burst: Int
    public var key: Key

    public init(requestsPerSecond: Double, burst: Int, key: Key = .all) {
        self.requestsPerSecond = requestsPerSecond
        self.burst = burst
        self.key = key
    }

    public static let maxRequestsPerSecond: Double = 10_000_000
    public static let maxBurst = 10_000_000

    enum CodingKeys: String, CodingKey {
        case requestsPerSecond = "requests_per_second"
        case burst, key
    }
}

/// Limits on what one cluster may be asked for at once, over all event loops. A request beyond
/// any of them is answered at once with 503 `overflow` (it is never queued): a slow dependency
/// then costs its callers a fast error instead of their threads, sockets and memory.
public struct CircuitBreakers: Sendable, Hashable, Codable {
    /// Upstream connections open to the cluster (busy and pooled). A request that would need a
    /// new one beyond this, with no pooled connection free on its loop, overflows.
    public var maxConnections: Int
    /// Requests waiting for an upstream connection to be established.
    public var maxPendingRequests: Int
    /// Requests in flight to the cluster.
    public var maxRequests: Int
    /// Retries in flight to the cluster.
    public var maxRetries: Int

    /// Envoy's defaults.
    public init(
        maxConnections: Int = 1024,
        maxPendingRequests: Int = 1024,
        maxRequests: Int = 1024,
        maxRetries: Int = 3
    ) {
        self.maxConnections = maxConnections
        self.maxPendingRequests = maxPendingRequests
        self.maxRequests = maxRequests
        self.maxRetries = maxRetries
    }

    public static let maxLimit = 1_000_000

    enum CodingKeys: String, CodingKey {
        case maxConnections = "max_connections"
        case maxPendingRequests = "max_pending_requests"
        case maxRequests = "max_requests"
        case maxRetries = "max_retries"
    }
}
