import CoreMetrics
import Prometheus
import Testing
import TrellisRuntime

/// The executables' metrics factory: its timers are Trellis's lock-free histograms, and what
/// `/metrics` shows of them must read exactly as swift-prometheus's own histograms would.
@Suite struct MetricsFactoryTests {
    /// The lines of `text` that belong to the metric `name`.
    private static func lines(_ text: String, _ name: String) -> [String] {
        text.split(separator: "\n").map(String.init).filter { $0.hasPrefix(name) || $0 == "# TYPE \(name) histogram" }
    }

    @Test func timersReadAsSwiftPrometheusHistograms() {
        let ours = TrellisMetricsFactory()
        let reference = PrometheusCollectorRegistry()
        let theirs = PrometheusMetricsFactory(registry: reference)
        let labels = [("cluster", #"a "quoted" \ name"#), ("class", "2xx")]
        let a = Timer(label: "trellis_test_duration_seconds", dimensions: labels, factory: ours)
        let b = Timer(label: "trellis_test_duration_seconds", dimensions: labels, factory: theirs)
        // On a bound, between bounds, past the last one, zero.
        let samples: [Int64] = [
            0, 1_000_000, 5_000_000, 7_000_000, 30_000_000, 250_000_000, 2_000_000_000, 20_000_000_000,
        ]
        for (i, ns) in samples.enumerated() {
            for _ in 0...i {
                a.recordNanoseconds(ns)
                b.recordNanoseconds(ns)
            }
        }
        var buffer: [UInt8] = []
        reference.emit(into: &buffer)
        let expected = Self.lines(String(decoding: buffer, as: UTF8.self), "trellis_test_duration_seconds")
        let got = Self.lines(ours.text(), "trellis_test_duration_seconds")
        #expect(expected.count == 15, "\(expected)")  // TYPE, 11 bounds, +Inf, sum, count
        #expect(got == expected)
    }

    /// Two owners of one label set count into one series (as the registry's metrics do); another
    /// label set is another series under the same TYPE line.
    @Test func oneSeriesPerLabelSet() {
        let factory = TrellisMetricsFactory()
        Timer(label: "trellis_t_seconds", dimensions: [("l", "x")], factory: factory).recordNanoseconds(1)
        Timer(label: "trellis_t_seconds", dimensions: [("l", "x")], factory: factory).recordNanoseconds(1)
        Timer(label: "trellis_t_seconds", dimensions: [("l", "y")], factory: factory).recordNanoseconds(1)
        let text = factory.text()
        #expect(text.contains("trellis_t_seconds_count{l=\"x\"} 2\n"), "\(text)")
        #expect(text.contains("trellis_t_seconds_count{l=\"y\"} 1\n"), "\(text)")
        #expect(text.split(separator: "\n").filter { $0 == "# TYPE trellis_t_seconds histogram" }.count == 1, "\(text)")
    }

    /// A clock that stepped back gives a negative duration: counted as zero, not subtracted from
    /// the sum.
    @Test func negativeDurationCountsAsZero() {
        let factory = TrellisMetricsFactory()
        let timer = Timer(label: "trellis_n_seconds", dimensions: [], factory: factory)
        timer.recordNanoseconds(-5_000_000)
        timer.recordNanoseconds(3_000_000)
        let text = factory.text()
        #expect(text.contains("trellis_n_seconds_bucket{le=\"0.005\"} 2\n"), "\(text)")
        #expect(text.contains("trellis_n_seconds_sum 0.003\n"), "\(text)")
        #expect(text.contains("trellis_n_seconds_count 2\n"), "\(text)")
    }

    /// Observations from several threads at once are all counted.
    @Test func concurrentObservationsAreAllCounted() async {
        let factory = TrellisMetricsFactory()
        let timer = Timer(label: "trellis_c_seconds", dimensions: [], factory: factory)
        await withTaskGroup(of: Void.self) { group in
            for t in 0..<4 {
                group.addTask {
                    for i in 0..<10_000 { timer.recordNanoseconds(Int64((t * 10_000 + i) % 7) * 1_000_000) }
                }
            }
        }
        let text = factory.text()
        #expect(text.contains("trellis_c_seconds_count 40000\n"), "\(text)")
        #expect(text.contains("trellis_c_seconds_bucket{le=\"+Inf\"} 40000\n"), "\(text)")
    }

    /// Counters and gauges are the registry's, in the same text.
    @Test func otherMetricsAreTheRegistrys() {
        let factory = TrellisMetricsFactory()
        Counter(label: "trellis_k_total", dimensions: [("a", "b")], factory: factory).increment(by: 3)
        var buffer: [UInt8] = []
        factory.registry.emit(into: &buffer)
        #expect(String(decoding: buffer, as: UTF8.self).contains("trellis_k_total{a=\"b\"} 3\n"))
        #expect(factory.text().contains("trellis_k_total{a=\"b\"} 3\n"))
    }
}
