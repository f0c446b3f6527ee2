public import NIOHTTP1

/// One step of the request path (routing, load balancing, rate limiting, …).
///
/// A middleware is built by its ``ProxyMiddlewareFactory`` for each configuration snapshot and
/// each event loop, so it may keep per-loop mutable state without locks; it is replaced whole
/// when a new snapshot arrives (the seed's `Reload`). The listener code knows only this protocol.
public protocol ProxyMiddleware: AnyObject {
    /// Called in chain order when a request head arrives. Return an error to answer the request
    /// with it and stop the chain.
    func onRequest(_ request: RequestContext) -> ProxyError?
    /// Called in chain order for every request that started, however it ended (also after an
    /// earlier middleware rejected it).
    func onComplete(_ request: RequestContext)
    /// Whether ``onComplete(_:)`` does anything: `true` unless a middleware says otherwise, so
    /// that one that implements it is never skipped; a middleware that leaves `onComplete` out
    /// may say `false` and is then not called when requests end (a call per middleware and
    /// request fewer).
    var observesCompletion: Bool { get }
}

extension ProxyMiddleware {
    public func onComplete(_ request: RequestContext) {}
    public var observesCompletion: Bool { true }
}

/// A loop's middleware built from one snapshot: all of them in chain order for requests, and
/// those that observe completion (``ProxyMiddleware/observesCompletion``) for their ends. A
/// request keeps the chain it started with, also when a newer snapshot arrives meanwhile.
///
/// The standard chain (``StandardMiddleware/chain``, what the agent and the gateway run) is
/// called through its concrete types: walking an array of existentials retains and releases
/// each middleware for each request, and hides their code from the optimizer. Any other chain
/// goes through ``all`` in order; both ways call the same middleware in the same order.
final class MiddlewareChain {
    let all: [any ProxyMiddleware]
    let completing: [any ProxyMiddleware]
    /// The standard chain's middleware, when ``all`` is exactly it (the same objects, which
    /// ``all`` keeps alive: unmanaged here, so that calling them retains nothing).
    private let standard: Standard?

    private struct Standard {
        let routing: Unmanaged<RoutingMiddleware>
        let rateLimit: Unmanaged<RateLimitMiddleware>
        let fault: Unmanaged<FaultInjectionMiddleware>
        let breaker: Unmanaged<CircuitBreakerMiddleware>
        let balancing: Unmanaged<LoadBalancingMiddleware>

        init?(_ all: [any ProxyMiddleware]) {
            guard all.count == 5, let routing = all[0] as? RoutingMiddleware,
                let rateLimit = all[1] as? RateLimitMiddleware, let fault = all[2] as? FaultInjectionMiddleware,
                let breaker = all[3] as? CircuitBreakerMiddleware, let balancing = all[4] as? LoadBalancingMiddleware
            else { return nil }
            self.routing = .passUnretained(routing)
            self.rateLimit = .passUnretained(rateLimit)
            self.fault = .passUnretained(fault)
            self.breaker = .passUnretained(breaker)
            self.balancing = .passUnretained(balancing)
        }
    }

    init(_ all: [any ProxyMiddleware]) {
        self.all = all
        self.completing = all.filter(\.observesCompletion)
        self.standard = Standard(all)
    }

    /// Whether the standard chain is called through its concrete types (for tests).
    var isStandard: Bool { standard != nil }

    /// Each middleware's ``ProxyMiddleware/onRequest(_:)`` in order, up to the first error.
    func onRequest(_ request: RequestContext) -> ProxyError? {
        if let standard {
            return withExtendedLifetime(self) {
                if let error = standard.routing._withUnsafeGuaranteedRef({ $0.onRequest(request) }) { return error }
                if let error = standard.rateLimit._withUnsafeGuaranteedRef({ $0.onRequest(request) }) { return error }
                if let error = standard.fault._withUnsafeGuaranteedRef({ $0.onRequest(request) }) { return error }
                if let error = standard.breaker._withUnsafeGuaranteedRef({ $0.onRequest(request) }) { return error }
                return standard.balancing._withUnsafeGuaranteedRef { $0.onRequest(request) }
            }
        }
        for middleware in all {
            if let error = middleware.onRequest(request) { return error }
        }
        return nil
    }

    /// ``ProxyMiddleware/onComplete(_:)`` of those that observe completion, in order.
    func onComplete(_ request: RequestContext) {
        if let standard {
            withExtendedLifetime(self) {
                standard.breaker._withUnsafeGuaranteedRef { $0.onComplete(request) }
                standard.balancing._withUnsafeGuaranteedRef { $0.onComplete(request) }
            }
            return
        }
        for middleware in completing { middleware.onComplete(request) }
    }
}

@available(*, unavailable)
extension MiddlewareChain: Sendable {}

/// Builds a middleware from a snapshot, once per event loop.
public protocol ProxyMiddlewareFactory: Sendable {
    func makeMiddleware(_ snapshot: ProxySnapshot, _ loop: LoopResources) -> any ProxyMiddleware
}

/// The per-event-loop resources a middleware may use.
public final class LoopResources {
    var rng = FastRandom()
    /// The load balancers of the current snapshot, by cluster index.
    var balancers: [LoadBalancer] = []

    init() {}
}

@available(*, unavailable)
extension LoopResources: Sendable {}

/// The standard chain: routing, rate limits, fault injection, circuit breaker, then load
/// balancing. (Retries, timeouts and outlier detection act on the upstream exchange itself.)
public enum StandardMiddleware {
    public static let chain: [any ProxyMiddlewareFactory] = [
        RoutingMiddleware.Factory(), RateLimitMiddleware.Factory(), FaultInjectionMiddleware.Factory(),
        CircuitBreakerMiddleware.Factory(), LoadBalancingMiddleware.Factory(),
    ]
}
