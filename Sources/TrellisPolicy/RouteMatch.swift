public import TrellisConfig

/// The conditions of a route; all must hold.
public struct RouteMatch: Sendable, Hashable, Codable {
    public var path: PathMatch
    /// Methods accepted (`GET`, `POST`, …); empty accepts any.
    public var methods: [String]
    public var headers: [HeaderMatch]

    public init(path: PathMatch = .prefix("/"), methods: [String] = [], headers: [HeaderMatch] = []) {
        self.path = path
        self.methods = methods
        self.headers = headers
    }
}

/// How a route matches the request path (the part of the target before `?`).
public enum PathMatch: Sendable, Hashable, Codable {
    case prefix(String)
    case exact(String)
    /// A regular expression that must match the whole path.
    case regex(String)
}

/// A condition on one request header. Names are case-insensitive.
public struct HeaderMatch: Sendable, Hashable, Codable {
    public enum Kind: Sendable, Hashable, Codable {
        case exact(String)
        case present
        /// A regular expression that must match the whole value.
        case regex(String)
    }

    public var name: String
    public var kind: Kind
    /// Inverts the match: the route applies when the condition does not hold.
    public var invert: Bool

    public init(name: String, kind: Kind, invert: Bool = false) {
        self.name = name
        self.kind = kind
        self.invert = invert
    }
}

extension RouteMatch {
    /// A route's `match:` — `{prefix: /api | path: /exact | regex: "/v[0-9]+/.*", methods: [GET],
    /// headers: [{name: x-canary, exact: "1" | present: true | regex: "...", invert: false}]}` —
    /// in the gateway file and mesh.yaml alike. At most one path key (none: `prefix: /`); paths
    /// start with '/'; patterns are RE2 (Envoy's and gRPC's dialect: no lookaround or
    /// backreferences); header names are tokens, kept lowercase.
    public static func decode(_ node: ConfigNode) throws(ConfigFileError) -> RouteMatch {
        let m = try node.mapping(allowed: ["prefix", "path", "regex", "methods", "headers"])
        let pathKeys = ["prefix", "path", "regex"].filter { m[$0] != nil }
        guard pathKeys.count <= 1 else {
            throw node.error("expected at most one of prefix, path (exact) or regex, got \(pathKeys.count)")
        }
        var match = RouteMatch()
        if let p = m["prefix"] {
            match.path = .prefix(try p.pathStartingWithSlash())
        } else if let p = m["path"] {
            match.path = .exact(try p.pathStartingWithSlash())
        } else if let p = m["regex"] {
            match.path = .regex(try p.portableRegex())
        }
        if let list = m["methods"] {
            for item in try list.sequence() {
                let method = try item.nonEmptyString()
                guard HTTPToken.isToken(method) else { throw item.error("expected a method name, got '\(method)'") }
                match.methods.append(method)
            }
        }
        for h in try m["headers"]?.sequence() ?? [] {
            let hk = try h.mapping(allowed: ["name", "exact", "present", "regex", "invert"])
            let kinds = ["exact", "present", "regex"].filter { hk[$0] != nil }
            guard kinds.count == 1 else {
                throw h.error("expected exactly one of exact, present or regex, got \(kinds.count)")
            }
            let kind: HeaderMatch.Kind
            if let v = hk["exact"] {
                kind = .exact(try v.string())
            } else if let v = hk["regex"] {
                kind = .regex(try v.portableRegex())
            } else {
                guard try hk["present"]!.bool() else {
                    throw hk["present"]!.error("expected true (use invert: true to require absence)")
                }
                kind = .present
            }
            let nameNode = try hk.required("name", in: h)
            let name = try nameNode.nonEmptyString()
            guard HTTPToken.isToken(name) else { throw nameNode.error("expected a header name, got '\(name)'") }
            match.headers.append(
                HeaderMatch(name: name.lowercased(), kind: kind, invert: try hk["invert"]?.bool() ?? false)
            )
        }
        return match
    }
}

extension ConfigNode {
    /// A path: non-empty, starting with '/'.
    func pathStartingWithSlash() throws(ConfigFileError) -> String {
        let path = try nonEmptyString()
        guard path.hasPrefix("/") else { throw error("expected a path starting with '/', got '\(path)'") }
        return path
    }

    /// A regular expression both Swift and RE2 (Envoy, gRPC) read the same way: Swift's `Regex`
    /// accepts a superset, so this catches malformed patterns, and backreferences and lookaround
    /// (which RE2 refuses) are refused by hand.
    public func portableRegex() throws(ConfigFileError) -> String {
        let pattern = try nonEmptyString()
        do {
            _ = try Regex(pattern)
        } catch {
            throw self.error("not a valid regular expression: \(error)")
        }
        for unsupported in ["(?=", "(?!", "(?<=", "(?<!", "\\1", "\\2"] where pattern.contains(unsupported) {
            throw self.error("'\(unsupported)' is not supported (RE2 syntax: no lookaround or backreferences)")
        }
        return pattern
    }
}

/// A route's weighted destinations (clusters in the gateway file, services in mesh.yaml): each
/// weight in 1...1,000,000; a request picks one in proportion.
public enum WeightedDestinations {
    public static let weights = 1...1_000_000
}

/// An endpoint's (an instance's) weight within its cluster: 1...128, Envoy's range for
/// `load_balancing_weight`, in the gateway file, mesh.yaml, agent.yaml and pilot's API alike.
public enum EndpointWeights {
    public static let range = 1...128
}
