import Atomics
import CoreMetrics
import NIOCore
import TrellisPolicy

/// Local rate limits: the route's, then the cluster's. A request over either is answered at once
/// with 429 `rate_limited` and `Retry-After`; nothing waits.
public final class RateLimitMiddleware: ProxyMiddleware {
    public struct Factory: ProxyMiddlewareFactory {
        public init() {}
        public func makeMiddleware(_ snapshot: ProxySnapshot, _ loop: LoopResources) -> any ProxyMiddleware {
            RateLimitMiddleware()
        }
    }

    /// Nothing to do when a request ends.
    public var observesCompletion: Bool { false }

    public func onRequest(_ request: RequestContext) -> ProxyError? {
        let route = request.routeRateLimiter
        let cluster = request.cluster?.rateLimiter
        if route == nil && cluster == nil { return nil }
        let now = NIODeadline.now().uptimeNanoseconds
        // The route's limit first, then the cluster's (no array built per request).
        return refusal(route, request, now) ?? refusal(cluster, request, now)
    }

    private func refusal(_ limiter: RateLimiter?, _ request: RequestContext, _ now: UInt64) -> ProxyError? {
        guard let limiter, let wait = limiter.check(request, now: now) else { return nil }
        limiter.rejected.increment()
        // Whole seconds, rounded up (RFC 9110 §10.2.3): never 0, which would invite a retry now.
        let seconds = Int((wait + 999_999_999) / 1_000_000_000)
        return .rateLimited(
            "\(limiter.scope): \(limiter.limit.requestsPerSecond)/s, burst \(limiter.limit.burst)",
            retryAfter: max(1, seconds)
        )
    }
}

/// The cluster's `max_requests` circuit breaker: a request beyond it gets 503 `overflow` at
/// once. (`max_connections` and `max_pending_requests` are enforced where connections are made,
/// in the upstream pool.)
public final class CircuitBreakerMiddleware: ProxyMiddleware {
    public struct Factory: ProxyMiddlewareFactory {
        public init() {}
        public func makeMiddleware(_ snapshot: ProxySnapshot, _ loop: LoopResources) -> any ProxyMiddleware {
            CircuitBreakerMiddleware()
        }
    }

    public func onRequest(_ request: RequestContext) -> ProxyError? {
        guard let cluster = request.cluster else { return nil }
        guard ClusterLoad.acquire(cluster.load.requests, limit: cluster.limits.maxRequests) else {
            cluster.stats.overflowRequests.increment()
            return .overflow("cluster '\(cluster.config.name)': max_requests \(cluster.limits.maxRequests)")
        }
        request.heldRequestSlot = cluster.load
        return nil
    }

    public func onComplete(_ request: RequestContext) {
        if let load = request.heldRequestSlot {
            request.heldRequestSlot = nil
            load.requests.wrappingDecrement(ordering: .relaxed)
        }
    }
}

/// The route's fault injection: aborts a share of its requests with a status, delays a share
/// (the delay itself happens in the exchange, before the request goes upstream).
public final class FaultInjectionMiddleware: ProxyMiddleware {
    public struct Factory: ProxyMiddlewareFactory {
        public init() {}
        public func makeMiddleware(_ snapshot: ProxySnapshot, _ loop: LoopResources) -> any ProxyMiddleware {
            FaultInjectionMiddleware(loop: loop)
        }
    }

    private let loop: LoopResources

    init(loop: LoopResources) {
        self.loop = loop
    }

    /// Nothing to do when a request ends.
    public var observesCompletion: Bool { false }

    public func onRequest(_ request: RequestContext) -> ProxyError? {
        guard let fault = request.fault else { return nil }
        if let status = fault.abortStatus, fault.abortPercent > 0,
            Double.random(in: 0..<100, using: &loop.rng) < fault.abortPercent
        {
            return .faultAbort(status: status, "route '\(request.routeName ?? "-")'")
        }
        if let delay = fault.delay, fault.delayPercent > 0,
            Double.random(in: 0..<100, using: &loop.rng) < fault.delayPercent
        {
            request.faultDelay = delay
        }
        return nil
    }
}
