/// Durations as people write them in configuration files and on command lines: `250ms`, `10s`,
/// `1.5s`, `2m`, `1h` (also `us`). One parser for agent.yaml, mesh.yaml, gateway files and flags.
public enum DurationText {
    public static let expected = "expected a duration such as 250ms, 10s or 2m"

    /// The duration, or nil when `text` is not one (or is negative, or longer than ~31 years).
    public static func parse(_ text: String) -> Duration? {
        let units: [(String, Double)] = [("ms", 1e-3), ("us", 1e-6), ("s", 1), ("m", 60), ("h", 3600)]
        for (suffix, scale) in units where text.hasSuffix(suffix) {
            guard let number = Double(text.dropLast(suffix.count)), number.isFinite, number >= 0 else { return nil }
            let nanos = (number * scale * 1e9).rounded()
            guard nanos < 1e18 else { return nil }
            return .nanoseconds(Int64(nanos))
        }
        return nil
    }
}
