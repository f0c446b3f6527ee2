/// A regular expression compiled once per configuration snapshot, matched against a whole string.
struct CompiledRegex: @unchecked Sendable {
    // `Regex` values are immutable once built; they are shared read-only across event loops.
    private let regex: Regex<AnyRegexOutput>
    let source: String

    init(_ source: String) throws {
        self.regex = try Regex(source)
        self.source = source
    }

    func wholeMatch(_ s: Substring) -> Bool {
        (try? regex.wholeMatch(in: s)) != nil
    }

    /// Why `source` is not a usable regular expression, or `nil` if it is.
    static func problem(with source: String) -> String? {
        do {
            _ = try Regex(source)
            return nil
        } catch {
            return "expected a regular expression, got '\(source)' (\(error))"
        }
    }
}
