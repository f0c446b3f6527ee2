import Atomics
public import CoreMetrics
public import Prometheus
import Synchronization

/// The executables' metrics factory: swift-prometheus's registry for counters, gauges and value
/// histograms, and ``AtomicDurationHistogram`` for Swift Metrics timers, whose text follows the
/// registry's in ``text()``, in the same format.
///
/// Why timers are not the registry's: swift-prometheus's `Histogram.record` takes a lock and
/// compares the value with every bucket bound as a `Duration` (a call each), about 700
/// instructions per observation; the data path records two durations per request (the
/// listener's and the cluster's), and the proxy's event loops would contend for the lock. An
/// ``AtomicDurationHistogram`` observation is a few integer comparisons and two relaxed atomic
/// adds.
public final class TrellisMetricsFactory: MetricsFactory {
    public let registry: PrometheusCollectorRegistry
    private let prometheus: PrometheusMetricsFactory
    /// The timers by name, then by their labels; every timer of a name has the same buckets.
    private let timers = Mutex<[String: [AtomicDurationHistogram]]>([:])

    public init(registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry()) {
        self.registry = registry
        self.prometheus = PrometheusMetricsFactory(registry: registry)
    }

    /// The buckets of every timer: swift-prometheus's defaults for duration histograms, so that
    /// the exported `le` values are those a dashboard built on it expects.
    public static var buckets: [Duration] {
        PrometheusMetricsFactory(registry: .init()).defaultDurationHistogramBuckets
    }

    public func makeCounter(label: String, dimensions: [(String, String)]) -> any CounterHandler {
        prometheus.makeCounter(label: label, dimensions: dimensions)
    }

    public func makeFloatingPointCounter(
        label: String,
        dimensions: [(String, String)]
    ) -> any FloatingPointCounterHandler {
        prometheus.makeFloatingPointCounter(label: label, dimensions: dimensions)
    }

    public func makeMeter(label: String, dimensions: [(String, String)]) -> any MeterHandler {
        prometheus.makeMeter(label: label, dimensions: dimensions)
    }

    public func makeRecorder(label: String, dimensions: [(String, String)], aggregate: Bool) -> any RecorderHandler {
        prometheus.makeRecorder(label: label, dimensions: dimensions, aggregate: aggregate)
    }

    /// The timer of this name and labels: the one made before when there is one (as the registry
    /// does for its metrics), so that two owners of a label set count into one series.
    public func makeTimer(label: String, dimensions: [(String, String)]) -> any TimerHandler {
        timers.withLock { all in
            if let existing = all[label]?.first(where: { $0.labels.elementsEqual(dimensions, by: ==) }) {
                return existing
            }
            let timer = AtomicDurationHistogram(name: label, labels: dimensions, buckets: Self.buckets)
            all[label, default: []].append(timer)
            return timer
        }
    }

    public func destroyCounter(_ handler: any CounterHandler) { prometheus.destroyCounter(handler) }
    public func destroyMeter(_ handler: any MeterHandler) { prometheus.destroyMeter(handler) }
    public func destroyFloatingPointCounter(_ handler: any FloatingPointCounterHandler) {
        prometheus.destroyFloatingPointCounter(handler)
    }
    public func destroyRecorder(_ handler: any RecorderHandler) { prometheus.destroyRecorder(handler) }

    public func destroyTimer(_ handler: any TimerHandler) {
        guard let timer = handler as? AtomicDurationHistogram else { return }
        timers.withLock { all in
            all[timer.name]?.removeAll { $0 === timer }
            if all[timer.name]?.isEmpty == true { all[timer.name] = nil }
        }
    }

    /// Every metric in the Prometheus text format: the registry's, then the timers (by name).
    @Sendable public func text() -> String {
        var buffer: [UInt8] = []
        registry.emit(into: &buffer)
        let families = timers.withLock { $0 }
        for name in families.keys.sorted() {
            buffer.append(contentsOf: "# TYPE \(name) histogram\n".utf8)
            for timer in families[name]! { timer.emit(into: &buffer) }
        }
        return String(decoding: buffer, as: UTF8.self)
    }
}

/// A duration histogram recorded without a lock: each observation adds one to its bucket (not
/// cumulative: the buckets are summed when emitted) and its nanoseconds to the sum, both relaxed
/// atomic adds. A reader may see an observation's bucket and not yet its sum; never a bucket count
/// above the total, since `+Inf` and `_count` are the sum of the buckets read.
/// (`@unchecked Sendable`: its cells are only touched through atomic operations.)
public final class AtomicDurationHistogram: TimerHandler, @unchecked Sendable {
    public let name: String
    public let labels: [(String, String)]
    /// Upper bounds in nanoseconds, ascending.
    private let bounds: [Int64]
    private let boundTexts: [String]
    private let prerenderedLabels: String
    /// `bounds.count + 1` bucket counts (the last one above every bound), then the sum.
    private let cells: UnsafeMutablePointer<UnsafeAtomic<Int>.Storage>

    public init(name: String, labels: [(String, String)], buckets: [Duration]) {
        self.name = name
        self.labels = labels
        let sorted = buckets.sorted()
        self.bounds = sorted.map { Self.nanoseconds($0) }
        self.boundTexts = sorted.map(\.bucketRepresentation)
        self.prerenderedLabels = labels.map { "\($0)=\"\(Self.escaped($1))\"" }.joined(separator: ",")
        let count = sorted.count + 2
        cells = .allocate(capacity: count)
        cells.initialize(repeating: .init(0), count: count)
    }

    deinit {
        cells.deinitialize(count: bounds.count + 2)
        cells.deallocate()
    }

    /// A negative duration (a clock stepped back) counts as zero.
    public func recordNanoseconds(_ duration: Int64) {
        let value = max(duration, 0)
        var i = 0
        while i < bounds.count && bounds[i] < value { i &+= 1 }
        UnsafeAtomic<Int>(at: cells + i).wrappingIncrement(ordering: .relaxed)
        UnsafeAtomic<Int>(at: cells + bounds.count + 1).wrappingIncrement(by: Int(value), ordering: .relaxed)
    }

    /// This histogram's lines in the Prometheus text format, as swift-prometheus writes them.
    func emit(into buffer: inout [UInt8]) {
        var total = 0
        let labels = prerenderedLabels.isEmpty ? "" : prerenderedLabels + ","
        for (i, bound) in boundTexts.enumerated() {
            total += UnsafeAtomic<Int>(at: cells + i).load(ordering: .relaxed)
            buffer.append(contentsOf: "\(name)_bucket{\(labels)le=\"\(bound)\"} \(total)\n".utf8)
        }
        total += UnsafeAtomic<Int>(at: cells + bounds.count).load(ordering: .relaxed)
        let sum = Duration.nanoseconds(UnsafeAtomic<Int>(at: cells + bounds.count + 1).load(ordering: .relaxed))
        let braced = prerenderedLabels.isEmpty ? "" : "{\(prerenderedLabels)}"
        buffer.append(contentsOf: "\(name)_bucket{\(labels)le=\"+Inf\"} \(total)\n".utf8)
        buffer.append(contentsOf: "\(name)_sum\(braced) \(sum.bucketRepresentation)\n".utf8)
        buffer.append(contentsOf: "\(name)_count\(braced) \(total)\n".utf8)
    }

    private static func nanoseconds(_ d: Duration) -> Int64 {
        let (seconds, attoseconds) = d.components
        return seconds * 1_000_000_000 + attoseconds / 1_000_000_000
    }

    /// A label value in the text format: backslash, double quote and line feed escaped.
    private static func escaped(_ value: String) -> String {
        var out = ""
        for c in value.unicodeScalars {
            switch c {
            case "\\": out += "\\\\"
            case "\"": out += "\\\""
            case "\n": out += "\\n"
            default: out.unicodeScalars.append(c)
            }
        }
        return out
    }
}
