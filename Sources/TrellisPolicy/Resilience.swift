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

/// Passive health checking: an endpoint that keeps failing is taken out of the load balancer for
/// a while, without waiting for an active check to notice.
///
/// An endpoint is ejected after `consecutiveErrors` failures in a row (5xx answers, refused or
/// reset connections, timeouts), or, with `successRate`, when its success rate over an interval
/// falls well below its peers'. It is out for `baseEjectionTime` times the number of times it was
/// ejected recently (capped by `maxEjectionTime`), then gets requests again. At most
/// `maxEjectionPercent` of the cluster's endpoints (at least one) are out at once.
public struct OutlierDetection: Sendable, Hashable, Codable {
    public struct SuccessRate: Sendable, Hashable, Codable {
        /// Endpoints with enough requests in the interval needed before any is judged.
        public var minimumHosts: Int
        /// Requests an endpoint needs in the interval to be judged.
        public var requestVolume: Int
        /// Ejected below mean − factor × standard deviation of the judged endpoints' rates.
        public var stdevFactor: Double

        public init(minimumHosts: Int = 5, requestVolume: Int = 100, stdevFactor: Double = 1.9) {
            self.minimumHosts = minimumHosts
            self.requestVolume = requestVolume
            self.stdevFactor = stdevFactor
        }

        enum CodingKeys: String, CodingKey {
            case minimumHosts = "minimum_hosts"
            case requestVolume = "request_volume"
            case stdevFactor = "stdev_factor"
        }
    }

    public var consecutiveErrors: Int
    /// How often success rates are judged, and how fast the ejection multiplier decays.
    public var interval: Duration
    public var baseEjectionTime: Duration
    public var maxEjectionTime: Duration
    public var maxEjectionPercent: Int
    public var successRate: SuccessRate?

    public init(
        consecutiveErrors: Int = 5,
        interval: Duration = .seconds(10),
        baseEjectionTime: Duration = .seconds(30),
        maxEjectionTime: Duration = .seconds(300),
        maxEjectionPercent: Int = 10,
        successRate: SuccessRate? = nil
    ) {
        self.consecutiveErrors = consecutiveErrors
        self.interval = interval
        self.baseEjectionTime = baseEjectionTime
        self.maxEjectionTime = maxEjectionTime
        self.maxEjectionPercent = maxEjectionPercent
        self.successRate = successRate
    }

    enum CodingKeys: String, CodingKey {
        case consecutiveErrors = "consecutive_errors"
        case interval
        case baseEjectionTime = "base_ejection_time"
        case maxEjectionTime = "max_ejection_time"
        case maxEjectionPercent = "max_ejection_percent"
        case successRate = "success_rate"
    }
}

/// When and how a route tries a request again, on another endpoint when there is one.
///
/// A retry happens only before any of the response went to the client, while the whole request
/// is still at hand (bodies up to ``RetryPolicy/maxRetainedBodyBytes`` are kept for it), within
/// the route's timeout, the cluster's `max_retries` circuit breaker and the retry budget (retries
/// in flight at most `budgetPercent` of the cluster's requests in flight, or
/// `minRetryConcurrency`). A request that is not idempotent (POST, PATCH, …) is retried only if
/// nothing of it reached an upstream (a refused connection), unless `retryNonIdempotent`.
public struct RetryPolicy: Sendable, Hashable, Codable {
    public enum Condition: String, Sendable, Hashable, Codable, CaseIterable {
        /// The connection to the endpoint was refused or timed out.
        case connectFailure = "connect-failure"
        /// The endpoint closed or reset the connection before answering.
        case reset
        /// 502, 503 or 504 from the endpoint, or the per-try timeout.
        case gatewayError = "gateway-error"
        /// Any 5xx from the endpoint, connect failures, resets and per-try timeouts.
        case serverError = "5xx"
        /// The statuses in `retriableStatusCodes`.
        case retriableStatusCodes = "retriable-status-codes"
        /// gRPC statuses in a response's headers (a trailers-only answer), as Envoy spells them.
        case cancelled
        case deadlineExceeded = "deadline-exceeded"
        case `internal`
        case resourceExhausted = "resource-exhausted"
        case unavailable

        /// The gRPC status code this condition retries, if it is a gRPC one.
        public var grpcStatus: Int? {
            switch self {
            case .cancelled: 1
            case .deadlineExceeded: 4
            case .internal: 13
            case .resourceExhausted: 8
            case .unavailable: 14
            default: nil
            }
        }
    }

    public var retryOn: Set<Condition>
    /// Retries after the first try.
    public var numRetries: Int
    public var retriableStatusCodes: [Int]
    /// Each try must get its response head within this time, or it is abandoned (and retried).
    public var perTryTimeout: Duration?
    /// Jittered exponential back-off between tries: a random wait up to base × 2^(retry − 1),
    /// at most `backoffMax`.
    public var backoffBase: Duration
    public var backoffMax: Duration
    public var retryNonIdempotent: Bool
    public var budgetPercent: Double
    public var minRetryConcurrency: Int

    public init(
        retryOn: Set<Condition> = [.connectFailure, .reset, .gatewayError],
        numRetries: Int = 1,
        retriableStatusCodes: [Int] = [],
        perTryTimeout: Duration? = nil,
        backoffBase: Duration = .milliseconds(25),
        backoffMax: Duration = .milliseconds(250),
        retryNonIdempotent: Bool = false,
        budgetPercent: Double = 20,
        minRetryConcurrency: Int = 3
    ) {
        self.retryOn = retryOn
        self.numRetries = numRetries
        self.retriableStatusCodes = retriableStatusCodes
        self.perTryTimeout = perTryTimeout
        self.backoffBase = backoffBase
        self.backoffMax = backoffMax
        self.retryNonIdempotent = retryNonIdempotent
        self.budgetPercent = budgetPercent
        self.minRetryConcurrency = minRetryConcurrency
    }

    /// Request bodies larger than this are streamed without a copy, and not retried.
    public static let maxRetainedBodyBytes = 64 * 1024

    enum CodingKeys: String, CodingKey {
        case retryOn = "retry_on"
        case numRetries = "num_retries"
        case retriableStatusCodes = "retriable_status_codes"
        case perTryTimeout = "per_try_timeout"
        case backoffBase = "backoff_base"
        case backoffMax = "backoff_max"
        case retryNonIdempotent = "retry_non_idempotent"
        case budgetPercent = "budget_percent"
        case minRetryConcurrency = "min_retry_concurrency"
    }

    /// Whether a gRPC answer with `grpcStatus` in its headers is to be retried.
    public func retries(grpcStatus: Int) -> Bool {
        retryOn.contains { $0.grpcStatus == grpcStatus }
    }

    /// Whether an answer with `status` is to be retried.
    public func retries(status: Int) -> Bool {
        if retryOn.contains(.serverError) && status >= 500 { return true }
        if retryOn.contains(.gatewayError) && (502...504).contains(status) { return true }
        return retryOn.contains(.retriableStatusCodes) && retriableStatusCodes.contains(status)
    }
}

/// Faults a route injects on purpose, so that its users can see how their callers cope: a delay
/// before the request goes upstream, or an answer with an error status instead of the upstream's.
/// Each applies to the given percentage of the route's requests, drawn independently.
public struct FaultInjection: Sendable, Hashable, Codable {
    public var delay: Duration?
    public var delayPercent: Double
    /// The status aborted requests get (body `fault_abort`).
    public var abortStatus: Int?
    public var abortPercent: Double

    public init(delay: Duration? = nil, delayPercent: Double = 0, abortStatus: Int? = nil, abortPercent: Double = 0) {
        self.delay = delay
        self.delayPercent = delayPercent
        self.abortStatus = abortStatus
        self.abortPercent = abortPercent
    }

    enum CodingKeys: String, CodingKey {
        case delay
        case delayPercent = "delay_percent"
        case abortStatus = "abort_status"
        case abortPercent = "abort_percent"
    }
}

/// Active health checking of a cluster's endpoints: each is probed every `interval`; after
/// `unhealthyThreshold` failed probes in a row it leaves the load balancer, after
/// `healthyThreshold` good ones it comes back. New endpoints start in and are probed at once.
public struct HealthCheck: Sendable, Hashable, Codable {
    public enum Kind: Sendable, Hashable, Codable {
        /// `GET path` (Host: `host`, else the cluster's name); good when the status is in
        /// `expectedStatuses` (default 200...399).
        case http(path: String, host: String?, expectedStatuses: [ClosedRange<Int>])
        /// Good when a TCP connection is accepted.
        case tcp
    }

    public var kind: Kind
    public var interval: Duration
    public var timeout: Duration
    public var healthyThreshold: Int
    public var unhealthyThreshold: Int

    public init(
        kind: Kind,
        interval: Duration = .seconds(5),
        timeout: Duration = .seconds(1),
        healthyThreshold: Int = 2,
        unhealthyThreshold: Int = 3
    ) {
        self.kind = kind
        self.interval = interval
        self.timeout = timeout
        self.healthyThreshold = healthyThreshold
        self.unhealthyThreshold = unhealthyThreshold
    }

    enum CodingKeys: String, CodingKey {
        case kind, interval, timeout
        case healthyThreshold = "healthy_threshold"
        case unhealthyThreshold = "unhealthy_threshold"
    }
}
