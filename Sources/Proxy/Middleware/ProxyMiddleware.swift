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
final class MiddlewareChain {
    let all: [any ProxyMiddleware]
    let completing: [any ProxyMiddleware]

    init(_ all: [any ProxyMiddleware]) {
        self.all = all
        self.completing = all.filter(\.observesCompletion)
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
