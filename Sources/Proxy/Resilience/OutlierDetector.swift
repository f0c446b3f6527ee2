import Atomics
import CoreMetrics
import NIOConcurrencyHelpers
import NIOCore
import TrellisPolicy

/// One endpoint's record, shared by the event loops and kept across snapshots (by address).
final class EndpointRecord: Sendable {
    let address: String
    let consecutiveErrors = ManagedAtomic<Int>(0)
    /// Uptime nanoseconds until which the endpoint gets no requests; 0 when never ejected.
    let ejectedUntil = ManagedAtomic<UInt64>(0)
    /// Requests and failures in the current success-rate interval.
    let requests = ManagedAtomic<Int>(0)
    let failures = ManagedAtomic<Int>(0)
    /// Guarded by the detector's lock: recent ejections (the time multiplier) and when the last
    /// one ended.
    let history = NIOLockedValueBox<(ejections: Int, lastEnd: UInt64)>((0, 0))

    init(address: String) {
        self.address = address
    }

    @inline(__always)
    func isEjected(now: UInt64) -> Bool {
        ejectedUntil.load(ordering: .relaxed) > now
    }
}

/// A cluster's outlier detection: counts each endpoint's failures as requests finish and takes
/// endpoints out of load balancing as ``OutlierDetection`` says. Shared by the loops; the hot
/// path is one or two relaxed atomic operations per request, the lock only taken to eject.
final class OutlierDetector: Sendable {
    let cluster: String
    private let records = NIOLockedValueBox<[String: EndpointRecord]>([:])
    private let lock = NIOLock()
    /// Uptime nanoseconds of the next success-rate judgement.
    private let nextJudgement = ManagedAtomic<UInt64>(0)
    let byErrors: Counter
    let bySuccessRate: Counter

    init(cluster: String, factory: any MetricsFactory) {
        self.cluster = cluster
        byErrors = Counter(
            label: "trellis_outlier_ejections_total",
            dimensions: [("cluster", cluster), ("reason", "consecutive_errors")],
            factory: factory
        )
        bySuccessRate = Counter(
            label: "trellis_outlier_ejections_total",
            dimensions: [("cluster", cluster), ("reason", "success_rate")],
            factory: factory
        )
    }

    /// The record of the endpoint at `address` (the same object for as long as the detector lives).
    func record(_ address: String) -> EndpointRecord {
        records.withLockedValue { all in
            if let existing = all[address] { return existing }
            let fresh = EndpointRecord(address: address)
            all[address] = fresh
            return fresh
        }
    }

    /// Forgets the records of endpoints not in `addresses`.
    func retain(_ addresses: Set<String>) {
        records.withLockedValue { all in all = all.filter { addresses.contains($0.key) } }
    }

    /// Called when a request to an endpoint of `cluster` finished.
    func finished(
        _ record: EndpointRecord,
        failed: Bool,
        cluster: ClusterRuntime,
        policy: OutlierDetection,
        now: UInt64
    ) {
        if policy.successRate != nil {
            record.requests.wrappingIncrement(ordering: .relaxed)
            if failed { record.failures.wrappingIncrement(ordering: .relaxed) }
        }
        if failed {
            let n = record.consecutiveErrors.wrappingIncrementThenLoad(ordering: .relaxed)
            if n >= policy.consecutiveErrors {
                record.consecutiveErrors.store(0, ordering: .relaxed)
                if eject([record], cluster: cluster, policy: policy, now: now) > 0 { byErrors.increment() }
            }
        } else if record.consecutiveErrors.load(ordering: .relaxed) != 0 {
            record.consecutiveErrors.store(0, ordering: .relaxed)
        }
        if let rate = policy.successRate { judgeIfDue(rate, cluster: cluster, policy: policy, now: now) }
    }

    /// Ejects those of `candidates` that are not out yet, as far as the maximum allows; returns
    /// how many it ejected.
    @discardableResult
    private func eject(
        _ candidates: [EndpointRecord],
        cluster: ClusterRuntime,
        policy: OutlierDetection,
        now: UInt64
    ) -> Int {
        lock.withLock {
            let all = cluster.outlierRecords
            var out = all.filter { $0.isEjected(now: now) }.count
            let allowed = max(1, all.count * policy.maxEjectionPercent / 100)
            let interval = UInt64(TimeAmount(truncating: policy.interval).nanoseconds)
            var ejected = 0
            for record in candidates where !record.isEjected(now: now) && out < allowed {
                let until = record.history.withLockedValue { history -> UInt64 in
                    // The multiplier decays by one for each interval spent back in service.
                    if history.lastEnd > 0, now > history.lastEnd, interval > 0 {
                        history.ejections = max(0, history.ejections - Int((now - history.lastEnd) / interval))
                    }
                    history.ejections += 1
                    let base = UInt64(TimeAmount(truncating: policy.baseEjectionTime).nanoseconds)
                    let cap = max(base, UInt64(TimeAmount(truncating: policy.maxEjectionTime).nanoseconds))
                    let until = now + min(base * UInt64(history.ejections), cap)
                    history.lastEnd = until
                    return until
                }
                record.ejectedUntil.store(until, ordering: .relaxed)
                out += 1
                ejected += 1
            }
            return ejected
        }
    }

    private func judgeIfDue(
        _ rate: OutlierDetection.SuccessRate,
        cluster: ClusterRuntime,
        policy: OutlierDetection,
        now: UInt64
    ) {
        let due = nextJudgement.load(ordering: .relaxed)
        let interval = UInt64(TimeAmount(truncating: policy.interval).nanoseconds)
        if due == 0 {
            _ = nextJudgement.compareExchange(expected: 0, desired: now + interval, ordering: .relaxed)
            return
        }
        guard now >= due,
            nextJudgement.compareExchange(expected: due, desired: now + interval, ordering: .relaxed).exchanged
        else { return }
        // Judge the endpoints in service with enough requests; start the next interval afresh.
        var judged: [(record: EndpointRecord, rate: Double)] = []
        for record in cluster.outlierRecords {
            let requests = record.requests.exchange(0, ordering: .relaxed)
            let failures = record.failures.exchange(0, ordering: .relaxed)
            guard !record.isEjected(now: now), requests >= rate.requestVolume else { continue }
            judged.append((record, Double(requests - failures) / Double(requests)))
        }
        guard judged.count >= rate.minimumHosts else { return }
        let mean = judged.map(\.rate).reduce(0, +) / Double(judged.count)
        let variance = judged.map { ($0.rate - mean) * ($0.rate - mean) }.reduce(0, +) / Double(judged.count)
        let threshold = mean - rate.stdevFactor * variance.squareRoot()
        let outliers = judged.filter { $0.rate < threshold }.sorted { $0.rate < $1.rate }.map(\.record)
        guard !outliers.isEmpty else { return }
        let n = eject(outliers, cluster: cluster, policy: policy, now: now)
        if n > 0 { bySuccessRate.increment(by: Int64(n)) }
    }
}
