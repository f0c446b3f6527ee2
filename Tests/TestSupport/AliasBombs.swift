/// YAML "billion laughs" documents for the loaders' tests: each level lists ten aliases of the
/// level below, and the last level is used as a mapping key (the case that hung every loader).
public enum AliasBombs {
    public static func levels(_ n: Int) -> String {
        var text = "l0: &l0 [" + Array(repeating: "lol", count: 10).joined(separator: ", ") + "]\n"
        for level in 1..<n {
            text += "l\(level): &l\(level) [" + Array(repeating: "*l\(level - 1)", count: 10).joined(separator: ", ")
            text += "]\n"
        }
        return text + "? *l\(n - 1)\n: 1\n"
    }

    /// 10^10 nodes once expanded.
    public static let tenLevels = levels(10)
}
