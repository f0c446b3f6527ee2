/// Durations as people write them in configuration files and on command lines: `250ms`, `10s`,
/// `1.5s`, `2m`, `1h` (also `us` and `ns`). One parser and one printer for agent.yaml, mesh.yaml,
/// gateway files, flags and what the programs show back (`/config_dump`, saved state).
public enum DurationText {
    public static let expected = "expected a duration such as 250ms, 10s or 2m"

    /// The duration, or nil when `text` is not one (or is negative, or longer than ~31 years).
    public static func parse(_ text: String) -> Duration? {
        let units: [(String, Double)] = [("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9), ("s", 1), ("m", 60), ("h", 3600)]
        for (suffix, scale) in units where text.hasSuffix(suffix) {
            guard let number = Double(text.dropLast(suffix.count)), number.isFinite, number >= 0 else { return nil }
            let nanos = (number * scale * 1e9).rounded()
            guard nanos < 1e18 else { return nil }
            return .nanoseconds(Int64(nanos))
        }
        return nil
    }

    /// `duration` as the files write it, exact to the nanosecond: whole seconds as `10s`, whole
    /// milliseconds as `250ms` or `1.5s`, then `us`, then `ns`; `parse(format(d)) == d` for every
    /// duration `parse` accepts. Negative durations (never configured) print with a minus sign.
    public static func format(_ duration: Duration) -> String {
        let (seconds, attoseconds) = duration.components
        let nanos = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        guard !nanos.overflow else { return "\(seconds)s" }
        let total = nanos.partialValue.addingReportingOverflow(attoseconds / 1_000_000_000)
        guard !total.overflow else { return "\(seconds)s" }
        let ns = total.partialValue
        if ns < 0 { return "-" + format(.nanoseconds(-ns)) }
        if ns % 1_000_000_000 == 0 { return "\(ns / 1_000_000_000)s" }
        if ns % 1_000_000 == 0 {
            let ms = ns / 1_000_000
            guard ms >= 1000 else { return "\(ms)ms" }
            var fraction = String(ms % 1000)
            fraction = String(repeating: "0", count: 3 - fraction.count) + fraction
            while fraction.hasSuffix("0") { fraction.removeLast() }
            return "\(ms / 1000).\(fraction)s"
        }
        if ns % 1000 == 0 { return "\(ns / 1000)us" }
        return "\(ns)ns"
    }
}
