/// A virtual host's domain: an exact name, `*.suffix`, or `*`.
enum DomainPattern: Hashable, Sendable {
    case exact(String)
    /// Matches names that end in this suffix (which starts with `.`), with at least one character
    /// before it.
    case suffix(String)
    case any

    init(_ domain: String) {
        let lower = domain.lowercased()
        if lower == "*" {
            self = .any
        } else if lower.hasPrefix("*") {
            self = .suffix(String(lower.dropFirst()))
        } else {
            self = .exact(lower)
        }
    }

    static func problem(with domain: String) -> String? {
        if domain.isEmpty { return "expected a domain, got an empty string" }
        if domain == "*" { return nil }
        let body = domain.hasPrefix("*.") ? domain.dropFirst(2) : Substring(domain)
        if body.isEmpty || body.contains("*") {
            return "expected 'name', '*.suffix' or '*', got '\(domain)'"
        }
        if body.contains(where: { $0 == " " || $0 == "/" }) {
            return "expected a host name, got '\(domain)'"
        }
        return nil
    }
}
