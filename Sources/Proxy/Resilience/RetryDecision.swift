import TrellisPolicy

/// Why a try failed, as a retry policy sees it.
enum TryFailure: Equatable, Sendable {
    /// Connecting to the endpoint was refused or timed out.
    case connectFailure
    /// The endpoint closed or reset the connection (or stream) before answering.
    case reset
    /// It answered with this HTTP status.
    case status(Int)
    /// It answered with this gRPC status in the response headers (trailers-only).
    case grpcStatus(Int)
    /// No response head within the per-try timeout.
    case perTryTimeout
}

/// Whether a failed try goes again: a pure function of the route's policy and what the exchange
/// knows, so that every rule is tested without a socket. The budget (``RetryBudget``) and the
/// back-off (``Backoff``) are the other two pure parts of a retry.
struct RetryDecision: Equatable, Sendable {
    /// Tries made so far (the first included).
    var tries: Int
    /// Some of the response already went to the client.
    var responseStarted: Bool
    /// The whole request is still at hand to send again.
    var requestRetained: Bool
    /// The failed try reached an upstream (so it may have been seen).
    var attached: Bool
    /// The method is idempotent (GET, HEAD, OPTIONS, PUT, DELETE, TRACE).
    var idempotent: Bool

    /// Whether the policy's conditions name this failure.
    static func wanted(_ policy: RetryPolicy, after failure: TryFailure) -> Bool {
        let on = policy.retryOn
        switch failure {
        case .connectFailure: return on.contains(.connectFailure) || on.contains(.serverError)
        case .reset: return on.contains(.reset) || on.contains(.serverError)
        case .status(let code): return policy.retries(status: code)
        case .grpcStatus(let code): return policy.retries(grpcStatus: code)
        case .perTryTimeout: return on.contains(.gatewayError) || on.contains(.serverError) || on.contains(.reset)
        }
    }

    /// Whether this exchange may try again after `failure` (the budget is checked after).
    func allows(_ policy: RetryPolicy, after failure: TryFailure) -> Bool {
        guard tries <= policy.numRetries, !responseStarted, requestRetained else { return false }
        guard Self.wanted(policy, after: failure) else { return false }
        // Not idempotent and possibly seen by the upstream: only if the route says so. Every gRPC
        // call is a POST: a gRPC status named in retry_on is that consent.
        if case .grpcStatus = failure { return true }
        return !attached || idempotent || policy.retryNonIdempotent
    }
}

/// How many retries a cluster may have in flight: `percent` of its requests in flight, at least
/// `minConcurrency`, never above its `max_retries` circuit breaker (Envoy's retry budget).
struct RetryBudget: Equatable, Sendable {
    var percent: Double
    var minConcurrency: Int
    var maxRetries: Int

    init(_ policy: RetryPolicy, maxRetries: Int) {
        self.percent = policy.budgetPercent
        self.minConcurrency = policy.minRetryConcurrency
        self.maxRetries = maxRetries
    }

    func limit(requestsInFlight: Int) -> Int {
        min(max(minConcurrency, Int(Double(requestsInFlight) * percent / 100)), maxRetries)
    }
}

/// Jittered exponential back-off between tries: before retry n (1 for the first), a random wait
/// in 0…min(base × 2^(n−1), max).
enum Backoff {
    static func ceiling(base: Duration, max: Duration, retry: Int) -> Duration {
        let baseNanos = base.components.seconds * 1_000_000_000 + base.components.attoseconds / 1_000_000_000
        let maxNanos = max.components.seconds * 1_000_000_000 + max.components.attoseconds / 1_000_000_000
        let shift = Swift.min(Swift.max(retry - 1, 0), 20)
        let (grown, overflow) = baseNanos.multipliedReportingOverflow(by: 1 << shift)
        return .nanoseconds(overflow ? maxNanos : Swift.min(grown, maxNanos))
    }
}
