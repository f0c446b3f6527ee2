import TrellisValues
public import Yams

/// A node of a YAML configuration file with its key path, read with strict types: a wrong type,
/// an out-of-range value or an unknown key is an error naming the file, line, key path and what
/// was expected, never a silent default.
public struct ConfigNode {
    public let node: Node
    public let path: String
    public let file: String

    public static func root(yaml: String, file: String) throws(ConfigFileError) -> ConfigNode {
        let refusal: (line: Int, message: String)? =
            switch AliasBudget.check(yaml) {
            case .fits, .unparsable: nil
            case .tooLarge(let line):
                (line, "its aliases would expand it beyond \(AliasBudget.maxNodes) nodes (an alias bomb); refused")
            case .tooDeep(let line): (line, "collections nest deeper than \(AliasBudget.maxDepth) levels; refused")
            }
        if let refusal {
            throw ConfigFileError(file: file, position: "\(refusal.line)", path: "", message: refusal.message)
        }
        do {
            guard let node = try Yams.compose(yaml: yaml) else {
                throw ConfigFileError(file: file, path: "", message: "the file is empty; expected a YAML mapping")
            }
            return ConfigNode(node: node, path: "", file: file)
        } catch let error as ConfigFileError {
            throw error
        } catch let error as YamlError {
            throw ConfigFileError(file: file, path: "", message: "not valid YAML: \(Self.describe(error))")
        } catch {
            throw ConfigFileError(file: file, path: "", message: "not valid YAML: \(error)")
        }
    }

    private static func describe(_ error: YamlError) -> String {
        switch error {
        case .scanner(_, let problem, let mark, _), .parser(_, let problem, let mark, _),
            .composer(_, let problem, let mark, _):
            return "\(problem) at line \(mark.line), column \(mark.column)"
        case .duplicatedKeysInMapping(let duplicates, let context):
            let keys = duplicates.map { "'\($0)'" }.joined(separator: ", ")
            return "\(keys) given twice in one mapping at line \(context.mark.line), column \(context.mark.column)"
        default:
            return "\(error)"
        }
    }

    /// Where the value at `keyPath` (as errors spell it: `clusters[0].endpoints[1].address`) is
    /// in the file, or where its nearest enclosing value is: for errors found after loading, by
    /// the model's own validation, which knows the key path but not the line.
    public func position(of keyPath: String) -> String? {
        var current = node
        var best = node.mark
        for part in keyPath.split(separator: ".", omittingEmptySubsequences: true) {
            var name = Substring(part)
            var indices: [Int] = []
            while name.hasSuffix("]"), let open = name.lastIndex(of: "["),
                let index = Int(name[name.index(after: open)..<name.index(before: name.endIndex)])
            {
                indices.insert(index, at: 0)
                name = name[..<open]
            }
            if !name.isEmpty {
                guard case .mapping(let mapping) = current,
                    let value = mapping.first(where: { $0.key.scalar?.string == String(name) })?.value
                else { return best?.description }
                current = value
                best = value.mark ?? best
            }
            for index in indices {
                guard case .sequence(let sequence) = current, sequence.indices.contains(index) else {
                    return best?.description
                }
                current = sequence[index]
                best = current.mark ?? best
            }
        }
        return best?.description
    }

    public func error(_ message: String) -> ConfigFileError {
        ConfigFileError(file: file, position: node.mark?.description, path: path, message: message)
    }

    private func child(_ node: Node, key: String) -> ConfigNode {
        ConfigNode(node: node, path: path.isEmpty ? key : "\(path).\(key)", file: file)
    }

    /// Whether the node is a scalar (for keys that take a short scalar form or a mapping).
    public var isScalar: Bool {
        if case .scalar = node { return true }
        return false
    }

    private var kind: String {
        switch node {
        case .scalar(let s): return "'\(s.string)'"
        case .mapping: return "a mapping"
        case .sequence: return "a list"
        case .alias: return "an alias"
        }
    }

    // MARK: Mappings

    /// The entries of a mapping, after checking that every key is one of `allowed`.
    public func mapping(allowed: Set<String>) throws(ConfigFileError) -> [String: ConfigNode] {
        guard case .mapping(let mapping) = node else { throw error("expected a mapping, got \(kind)") }
        var result: [String: ConfigNode] = [:]
        for (keyNode, valueNode) in mapping {
            guard case .scalar(let key) = keyNode else { throw error("expected string keys") }
            guard allowed.contains(key.string) else {
                throw child(valueNode, key: key.string).error(
                    "unknown key '\(key.string)'; expected one of \(allowed.sorted().joined(separator: ", "))"
                )
            }
            result[key.string] = child(valueNode, key: key.string)
        }
        return result
    }

    // MARK: Scalars

    private var scalar: Node.Scalar? {
        if case .scalar(let s) = node { return s }
        return nil
    }

    public func string() throws(ConfigFileError) -> String {
        guard let s = scalar else { throw error("expected a string, got \(kind)") }
        if s.style == .plain && ["", "~", "null", "Null", "NULL"].contains(s.string) {
            throw error("expected a string, got nothing (null)")
        }
        return s.string
    }

    public func nonEmptyString() throws(ConfigFileError) -> String {
        let s = try string()
        if s.isEmpty { throw error("expected a non-empty string") }
        return s
    }

    public func int(in range: ClosedRange<Int>) throws(ConfigFileError) -> Int {
        guard let s = scalar, s.style == .plain, let value = Int(s.string) else {
            throw error("expected an integer in \(range.lowerBound)...\(range.upperBound), got \(kind)")
        }
        guard range.contains(value) else {
            throw error("expected an integer in \(range.lowerBound)...\(range.upperBound), got \(value)")
        }
        return value
    }

    /// A plain decimal number (`100`, `0.5`) in `range`, bounds included unless said otherwise.
    public func number(above lower: Double, atMost upper: Double) throws(ConfigFileError) -> Double {
        let expected = "expected a number above \(Self.format(lower)) and at most \(Self.format(upper))"
        guard let s = scalar, s.style == .plain, let value = Double(s.string), value.isFinite else {
            throw error("\(expected), got \(kind)")
        }
        guard value > lower, value <= upper else { throw error("\(expected), got \(s.string)") }
        return value
    }

    /// A percentage: 0, or a number above 0 and at most 100 (`0.5`, `25`).
    public func percentage() throws(ConfigFileError) -> Double {
        if let s = scalar, s.style == .plain, s.string == "0" { return 0 }
        return try number(above: 0, atMost: 100)
    }

    /// A list of HTTP statuses, each a status (`200`) or a range (`"200-299"`), within 100...599.
    public func statusRanges() throws(ConfigFileError) -> [ClosedRange<Int>] {
        var ranges: [ClosedRange<Int>] = []
        for item in try sequence() {
            let text = try item.string()
            let parts = text.split(separator: "-", maxSplits: 1).map { Int($0.filter { $0 != " " }) }
            guard parts.allSatisfy({ $0 != nil && (100...599).contains($0!) }),
                parts.count == 1 || parts[0]! <= parts[1]!
            else {
                throw item.error("expected a status (200) or a range (200-299) within 100...599, got '\(text)'")
            }
            ranges.append(parts[0]!...(parts.count == 2 ? parts[1]! : parts[0]!))
        }
        guard !ranges.isEmpty else { throw error("expected at least one status") }
        return ranges
    }

    private static func format(_ value: Double) -> String {
        value == value.rounded() && abs(value) < 1e15 ? "\(Int(value))" : "\(value)"
    }

    public func bool() throws(ConfigFileError) -> Bool {
        guard let s = scalar, s.style == .plain else { throw error("expected true or false, got \(kind)") }
        switch s.string {
        case "true": return true
        case "false": return false
        default: throw error("expected true or false, got '\(s.string)'")
        }
    }

    /// `250ms`, `10s`, `1.5s`, `2m`, `1h`.
    public func duration() throws(ConfigFileError) -> Duration {
        guard let s = scalar?.string else { throw error("\(DurationText.expected), got \(kind)") }
        guard let duration = DurationText.parse(s) else { throw error("\(DurationText.expected), got '\(s)'") }
        return duration
    }

    /// `host:port`, `[v6]:port`.
    public func endpoint(portRange: ClosedRange<Int> = 1...65535) throws(ConfigFileError) -> (host: String, port: Int) {
        let expected = "expected host:port (IPv6 as [addr]:port)"
        guard let s = scalar?.string else { throw error("\(expected), got \(kind)") }
        let host: Substring
        let portText: Substring
        if s.hasPrefix("[") {
            guard let close = s.firstIndex(of: "]"), s[s.index(after: close)...].hasPrefix(":") else {
                throw error("\(expected), got '\(s)'")
            }
            host = s[s.index(after: s.startIndex)..<close]
            portText = s[s.index(close, offsetBy: 2)...]
        } else {
            guard let colon = s.lastIndex(of: ":"), s.firstIndex(of: ":") == colon else {
                throw error("\(expected), got '\(s)'")
            }
            host = s[..<colon]
            portText = s[s.index(after: colon)...]
        }
        guard !host.isEmpty, let port = Int(portText), portRange.contains(port) else {
            throw error("\(expected) with a port in \(portRange.lowerBound)...\(portRange.upperBound), got '\(s)'")
        }
        return (String(host), port)
    }

    // MARK: Sequences

    public func sequence() throws(ConfigFileError) -> [ConfigNode] {
        guard case .sequence(let seq) = node else { throw error("expected a list, got \(kind)") }
        return seq.enumerated().map { i, n in ConfigNode(node: n, path: "\(path)[\(i)]", file: file) }
    }

    /// A mapping of strings to strings (labels, metadata).
    public func stringMap() throws(ConfigFileError) -> [String: String] {
        guard case .mapping(let mapping) = node else { throw error("expected a mapping of strings, got \(kind)") }
        var result: [String: String] = [:]
        for (keyNode, valueNode) in mapping {
            guard case .scalar(let key) = keyNode, !key.string.isEmpty else {
                throw error("expected non-empty string keys")
            }
            result[key.string] = try child(valueNode, key: key.string).string()
        }
        return result
    }

    /// A packet mark (`SO_MARK`, iptables `--mark`): a non-zero 32-bit value, decimal or `0x` hex.
    public func mark() throws(ConfigFileError) -> UInt32 {
        let text = try nonEmptyString()
        let value = text.hasPrefix("0x") ? UInt32(text.dropFirst(2), radix: 16) : UInt32(text)
        guard let value, value != 0 else {
            throw error("expected a non-zero 32-bit mark such as 0x1000, got '\(text)'")
        }
        return value
    }

    public func stringList() throws(ConfigFileError) -> [String] {
        var result: [String] = []
        for item in try sequence() { result.append(try item.nonEmptyString()) }
        return result
    }
}

extension Dictionary where Key == String, Value == ConfigNode {
    public func required(_ key: String, in parent: ConfigNode) throws(ConfigFileError) -> ConfigNode {
        guard let value = self[key] else { throw parent.error("missing required key '\(key)'") }
        return value
    }
}
