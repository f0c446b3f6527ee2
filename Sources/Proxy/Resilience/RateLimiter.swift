import Atomics
import CoreMetrics
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import TrellisPolicy

/// A token bucket shared by every event loop, kept as one atomic word: the generic cell rate
/// algorithm stores the time at which the bucket will be full again ("theoretical arrival
/// time"). Taking a token is one compare-and-swap; a refused request takes nothing, so a flood
/// does not starve the requests that fit in the rate.
final class TokenBucket: Sendable {
    /// Nanoseconds (on the uptime clock) at which the bucket is full again.
    private let tat = ManagedAtomic<UInt64>(0)
    /// Nanoseconds per token.
    let interval: UInt64
    /// How far ahead of now `tat` may run: `burst - 1` tokens.
    let tolerance: UInt64

    init(_ limit: RateLimit) {
        let interval = max(1, UInt64((1e9 / limit.requestsPerSecond).rounded()))
        self.interval = interval
        self.tolerance = interval * UInt64(max(0, limit.burst - 1))
    }

    /// Takes a token: `nil` when there was one, else the nanoseconds until there is.
    func take(now: UInt64) -> UInt64? {
        var current = tat.load(ordering: .relaxed)
        while true {
            let base = max(current, now)
            if base - now > tolerance { return base - now - tolerance }
            let (exchanged, original) = tat.compareExchange(
                expected: current,
                desired: base + interval,
                ordering: .relaxed
            )
            if exchanged { return nil }
            current = original
        }
    }

    /// Whether the bucket is full (no request took from it for a while).
    func isFull(now: UInt64) -> Bool { tat.load(ordering: .relaxed) <= now }
}

/// One configured rate limit of a route or a cluster, with its bucket or buckets.
final class RateLimiter: Sendable {
    /// Per-key buckets kept at most; beyond, new keys share one overflow bucket (limited
    /// together, never unlimited) until idle keys are swept out.
    static let maxKeys = 16_384

    let limit: RateLimit
    /// What it limits, for metrics and logs: `route <name>` or `cluster <name>`.
    let scope: String
    /// `trellis_rate_limited_total{scope}`.
    let rejected: Counter
    private let shared: TokenBucket
    private let keyed: NIOLockedValueBox<[String: TokenBucket]>

    init(_ limit: RateLimit, scope: String, factory: any MetricsFactory) {
        self.limit = limit
        self.scope = scope
        self.rejected = Counter(label: "trellis_rate_limited_total", dimensions: [("scope", scope)], factory: factory)
        self.shared = TokenBucket(limit)
        self.keyed = NIOLockedValueBox([:])
    }

    /// `nil` when the request may go on; else how long until it could (nanoseconds).
    func check(_ request: RequestContext, now: UInt64) -> UInt64? {
        switch limit.key {
        case .all:
            return shared.take(now: now)
        case .clientAddress:
            return bucket(for: request.clientIP ?? "").take(now: now)
        case .header(let name):
            return bucket(for: request.head.fields.first(name: name) ?? "").take(now: now)
        }
    }

    private func bucket(for key: String) -> TokenBucket {
        keyed.withLockedValue { buckets in
            if let bucket = buckets[key] { return bucket }
            if buckets.count >= Self.maxKeys {
                let now = NIODeadline.now().uptimeNanoseconds
                buckets = buckets.filter { !$0.value.isFull(now: now) }
                if buckets.count >= Self.maxKeys { return shared }
            }
            let bucket = TokenBucket(limit)
            buckets[key] = bucket
            return bucket
        }
    }

    /// Keys with a bucket of their own (for `/config_dump` and tests).
    var keyCount: Int { keyed.withLockedValue { $0.count } }
}

/// Per-cluster counters the circuit breakers compare with their limits; shared by the loops.
final class ClusterLoad: Sendable {
    let connections = ManagedAtomic<Int>(0)
    let pending = ManagedAtomic<Int>(0)
    let requests = ManagedAtomic<Int>(0)
    let retries = ManagedAtomic<Int>(0)

    /// Takes one unit of `counter` unless it is at `limit`.
    static func acquire(_ counter: ManagedAtomic<Int>, limit: Int) -> Bool {
        if counter.loadThenWrappingIncrement(ordering: .relaxed) >= limit {
            counter.wrappingDecrement(ordering: .relaxed)
            return false
        }
        return true
    }
}

/// What outlives a configuration snapshot: rate-limit buckets (a reload that leaves a limit as
/// it was must not refill its bucket) and cluster load counters (requests in flight finish on
/// the counters they started with). Owned by the server, through ``ProxyStats``.
public final class ResilienceState: Sendable {
    private let factory: any MetricsFactory
    private let limiters = NIOLockedValueBox<[String: RateLimiter]>([:])
    private let loads = NIOLockedValueBox<[String: ClusterLoad]>([:])
    private let detectors = NIOLockedValueBox<[String: OutlierDetector]>([:])
    private let health = NIOLockedValueBox<[String: [String: EndpointHealth]]>([:])

    init(factory: any MetricsFactory) {
        self.factory = factory
    }

    /// The limiter of `scope`, the same object as before when its limit did not change.
    func limiter(scope: String, _ limit: RateLimit) -> RateLimiter {
        limiters.withLockedValue { all in
            if let existing = all[scope], existing.limit == limit { return existing }
            let fresh = RateLimiter(limit, scope: scope, factory: factory)
            all[scope] = fresh
            return fresh
        }
    }

    /// The cluster's outlier detector: its endpoints' records outlive snapshots.
    func detector(cluster: String) -> OutlierDetector {
        detectors.withLockedValue { all in
            if let existing = all[cluster] { return existing }
            let fresh = OutlierDetector(cluster: cluster, factory: factory)
            all[cluster] = fresh
            return fresh
        }
    }

    /// The active health record of an endpoint of a cluster.
    func health(cluster: String, endpoint: String) -> EndpointHealth {
        health.withLockedValue { all in
            if let existing = all[cluster]?[endpoint] { return existing }
            let fresh = EndpointHealth(address: endpoint)
            all[cluster, default: [:]][endpoint] = fresh
            return fresh
        }
    }

    /// Forgets what belongs to clusters and endpoints no longer in `snapshot` (called when it is
    /// applied; objects still used by requests in flight live on until they finish).
    func prune(keeping snapshot: ProxySnapshot) {
        var endpoints: [String: Set<String>] = [:]
        for cluster in snapshot.clusters { endpoints[cluster.config.name] = Set(cluster.endpoints.map(\.key)) }
        health.withLockedValue { all in
            var kept: [String: [String: EndpointHealth]] = [:]
            for (cluster, records) in all {
                guard let current = endpoints[cluster] else { continue }
                kept[cluster] = records.filter { current.contains($0.key) }
            }
            all = kept
        }
        detectors.withLockedValue { all in
            all = all.filter { endpoints[$0.key] != nil }
            for (cluster, detector) in all { detector.retain(endpoints[cluster]!) }
        }
        loads.withLockedValue { all in all = all.filter { endpoints[$0.key] != nil } }
        let scopes = Set(snapshot.clusters.compactMap { $0.rateLimiter?.scope })
            .union(snapshot.routeLimiterScopes)
        limiters.withLockedValue { all in all = all.filter { scopes.contains($0.key) } }
    }

    func load(cluster: String) -> ClusterLoad {
        loads.withLockedValue { all in
            if let existing = all[cluster] { return existing }
            let fresh = ClusterLoad()
            all[cluster] = fresh
            return fresh
        }
    }
}
