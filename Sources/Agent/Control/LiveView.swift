/// `trellis-agent status --watch`: a table of the agent's traffic, refreshed every second, computed
/// from two scrapes of its metrics (docs/metrics.md) — rates from counter deltas, p50/p99 from the
/// histogram buckets' deltas, as Prometheus's `rate` and `histogram_quantile` would.
public enum LiveView {
    /// One sample of the Prometheus text format.
    public struct Sample: Sendable, Hashable {
        public var name: String
        public var labels: [String: String]
        public var value: Double
    }

    /// Parses the Prometheus text format (comments skipped; a line that does not parse is skipped).
    public static func parse(_ text: String) -> [Sample] {
        var samples: [Sample] = []
        for line in text.split(separator: "\n") where !line.hasPrefix("#") && !line.isEmpty {
            if let sample = parseLine(Substring(line)) { samples.append(sample) }
        }
        return samples
    }

    private static func parseLine(_ line: Substring) -> Sample? {
        var labels: [String: String] = [:]
        var rest: Substring
        let name: Substring
        if let brace = line.firstIndex(of: "{") {
            name = line[..<brace]
            var i = line.index(after: brace)
            while i < line.endIndex, line[i] != "}" {
                guard let eq = line[i...].firstIndex(of: "="), line.index(after: eq) < line.endIndex,
                    line[line.index(after: eq)] == "\""
                else { return nil }
                let key = String(line[i..<eq])
                var value = ""
                var j = line.index(eq, offsetBy: 2)
                while j < line.endIndex, line[j] != "\"" {
                    if line[j] == "\\", line.index(after: j) < line.endIndex {
                        j = line.index(after: j)
                        value.append(line[j] == "n" ? "\n" : line[j])
                    } else {
                        value.append(line[j])
                    }
                    j = line.index(after: j)
                }
                guard j < line.endIndex else { return nil }
                labels[key] = value
                i = line.index(after: j)
                if i < line.endIndex, line[i] == "," { i = line.index(after: i) }
            }
            guard i < line.endIndex else { return nil }
            rest = line[line.index(after: i)...]
        } else {
            guard let space = line.firstIndex(of: " ") else { return nil }
            name = line[..<space]
            rest = line[space...]
        }
        let fields = rest.split(separator: " ")
        guard let first = fields.first, let value = Double(first) else { return nil }
        return Sample(name: String(name), labels: labels, value: value)
    }

    /// One destination's row.
    public struct Row: Sendable, Equatable {
        public var cluster: String
        public var rps: Double
        /// The share of answered requests that were not 5xx, nil when none were answered.
        public var successRate: Double?
        public var p50: Double?
        public var p99: Double?
        public var activeConnections: Int
        public var ejections: Int
        /// The proxy's own refusals and failures per second, and the most frequent token.
        public var errorsPerSecond: Double
        public var topError: String?
    }

    /// The rows for every cluster seen in `current`, busiest first, from what changed since
    /// `previous` over `seconds`.
    public static func rows(previous: [Sample], current: [Sample], seconds: Double) -> [Row] {
        let before = Dictionary(previous.map { (Key($0), $0.value) }, uniquingKeysWith: { a, _ in a })
        func delta(_ s: Sample) -> Double { max(0, s.value - (before[Key(s)] ?? 0)) }
        var clusters: [String: Row] = [:]
        var answered: [String: (all: Double, failed: Double)] = [:]
        var buckets: [String: [(le: Double, count: Double)]] = [:]
        var errors: [String: [String: Double]] = [:]
        func row(_ name: String) -> Row {
            clusters[name]
                ?? Row(
                    cluster: name,
                    rps: 0,
                    successRate: nil,
                    p50: nil,
                    p99: nil,
                    activeConnections: 0,
                    ejections: 0,
                    errorsPerSecond: 0,
                    topError: nil
                )
        }
        for s in current where s.name.hasPrefix("trellis_upstream_") || s.name == "trellis_outlier_ejections_total" {
            guard let cluster = s.labels["cluster"] else { continue }
            var r = row(cluster)
            switch s.name {
            case "trellis_upstream_requests_total":
                let d = delta(s)
                answered[cluster, default: (0, 0)].all += d
                if s.labels["class"] == "5xx" { answered[cluster, default: (0, 0)].failed += d }
            case "trellis_upstream_request_duration_seconds_bucket":
                guard let le = s.labels["le"].flatMap({ $0 == "+Inf" ? Double.infinity : Double($0) }) else { break }
                buckets[cluster, default: []].append((le, delta(s)))
            case "trellis_upstream_connections_active":
                r.activeConnections = Int(s.value)
            case "trellis_outlier_ejections_total":
                r.ejections += Int(s.value)
            case "trellis_upstream_errors_total":
                errors[cluster, default: [:]][s.labels["token"] ?? "?", default: 0] += delta(s)
            default:
                break
            }
            clusters[cluster] = r
        }
        let window = max(seconds, 0.001)
        for (cluster, counts) in answered {
            clusters[cluster]?.rps = counts.all / window
            clusters[cluster]?.successRate = counts.all > 0 ? 1 - counts.failed / counts.all : nil
        }
        for (cluster, list) in buckets {
            let sorted = list.sorted { $0.le < $1.le }
            clusters[cluster]?.p50 = quantile(0.5, sorted)
            clusters[cluster]?.p99 = quantile(0.99, sorted)
        }
        for (cluster, tokens) in errors {
            let total = tokens.values.reduce(0, +)
            clusters[cluster]?.errorsPerSecond = total / window
            clusters[cluster]?.topError = total > 0 ? tokens.max { $0.value < $1.value }?.key : nil
        }
        return clusters.values.sorted { ($0.rps, $1.cluster) > ($1.rps, $0.cluster) }
    }

    /// `histogram_quantile` over cumulative bucket counts (sorted by bound): linear within the
    /// bucket the rank falls in; the highest finite bound when it falls in `+Inf`.
    static func quantile(_ q: Double, _ buckets: [(le: Double, count: Double)]) -> Double? {
        guard let total = buckets.last?.count, total > 0 else { return nil }
        let rank = q * total
        var lowerBound = 0.0
        var lowerCount = 0.0
        for (le, count) in buckets {
            if count >= rank {
                if le.isInfinite { return lowerBound }
                let inBucket = count - lowerCount
                return inBucket > 0 ? lowerBound + (le - lowerBound) * (rank - lowerCount) / inBucket : le
            }
            lowerBound = le
            lowerCount = count
        }
        return lowerBound
    }

    /// A counter's rate between the scrapes, summed over the samples `matching` selects.
    public static func rate(
        _ name: String,
        previous: [Sample],
        current: [Sample],
        seconds: Double,
        matching: (([String: String]) -> Bool)? = nil
    ) -> Double {
        let before = Dictionary(previous.map { (Key($0), $0.value) }, uniquingKeysWith: { a, _ in a })
        var sum = 0.0
        for s in current where s.name == name && (matching?(s.labels) ?? true) {
            sum += max(0, s.value - (before[Key(s)] ?? 0))
        }
        return sum / max(seconds, 0.001)
    }

    /// The sum of a metric's current values (a gauge, or a counter's total).
    public static func value(
        _ name: String,
        _ samples: [Sample],
        matching: (([String: String]) -> Bool)? = nil
    )
        -> Double
    {
        samples.filter { $0.name == name && (matching?($0.labels) ?? true) }.reduce(0) { $0 + $1.value }
    }

    private struct Key: Hashable {
        var name: String
        var labels: [String: String]
        init(_ s: Sample) {
            name = s.name
            labels = s.labels
        }
    }

    /// The screen: a header (`title`, then `summary` lines) and the table, at most `limit` rows.
    public static func render(title: String, summary: [String], rows: [Row], limit: Int = 30) -> String {
        func cell(_ text: String, _ width: Int, left: Bool = false) -> String {
            let t = text.count > width ? String(text.prefix(width - 1)) + "…" : text
            let pad = String(repeating: " ", count: max(0, width - t.count))
            return left ? t + pad : pad + t
        }
        func ms(_ seconds: Double?) -> String {
            guard let seconds else { return "-" }
            let value = seconds * 1000
            return value >= 100 ? String(Int(value.rounded())) : String(Double(Int(value * 10)) / 10)
        }
        func percent(_ share: Double?) -> String {
            guard let share else { return "-" }
            return String(Double(Int(share * 1000)) / 10) + "%"
        }
        var lines = [title] + summary + [""]
        lines.append(
            cell("SERVICE (cluster)", 34, left: true) + cell("RPS", 9) + cell("SUCCESS", 9) + cell("P50 ms", 8)
                + cell("P99 ms", 8) + cell("CONNS", 7) + cell("EJECT", 7) + "  " + "ERRORS/s"
        )
        for r in rows.prefix(limit) {
            let errors =
                r.errorsPerSecond > 0
                ? String(Double(Int(r.errorsPerSecond * 10)) / 10) + (r.topError.map { " \($0)" } ?? "") : "-"
            lines.append(
                cell(r.cluster, 34, left: true) + cell(String(Double(Int(r.rps * 10)) / 10), 9)
                    + cell(percent(r.successRate), 9) + cell(ms(r.p50), 8) + cell(ms(r.p99), 8)
                    + cell(String(r.activeConnections), 7) + cell(String(r.ejections), 7) + "  " + errors
            )
        }
        if rows.isEmpty { lines.append("(no upstream traffic yet)") }
        if rows.count > limit { lines.append("… \(rows.count - limit) more") }
        return lines.joined(separator: "\n") + "\n"
    }
}
