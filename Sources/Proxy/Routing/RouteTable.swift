import NIOHTTP1
import TrellisPolicy

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A listener's virtual hosts and routes, compiled for matching on the hot path.
final class RouteTable: Sendable {
    /// A class: the route a request matched is handed on without copying its fields.
    final class CompiledRoute: Sendable {
        enum Path: Sendable {
            case prefix(String)
            case exact(String)
            case regex(CompiledRegex)
        }
        enum Header: Sendable {
            case exact(String)
            case present
            case regex(CompiledRegex)
        }

        let name: String
        /// The route's `Path`, kept as what the matcher reads: the prefix or exact path as bytes
        /// (empty for a regex), compared with the request's path bytes without a `String`
        /// operation.
        let pathBytes: [UInt8]
        /// Whether `path` is `.exact` (else a prefix, or a regex when `isRegex`).
        let exactPath: Bool
        /// Checked before `regex` is read: reading the optional copies the regex.
        let isRegex: Bool
        let regex: CompiledRegex?
        let methods: [String]
        let headers: [(name: String, kind: Header, invert: Bool)]
        let target: RouteTarget

        init(
            name: String,
            path: Path,
            methods: [String],
            headers: [(name: String, kind: Header, invert: Bool)],
            target: RouteTarget
        ) {
            self.name = name
            switch path {
            case .prefix(let p): (pathBytes, exactPath, isRegex, regex) = (Array(p.utf8), false, false, nil)
            case .exact(let p): (pathBytes, exactPath, isRegex, regex) = (Array(p.utf8), true, false, nil)
            case .regex(let r): (pathBytes, exactPath, isRegex, regex) = ([], false, true, r)
            }
            self.methods = methods
            self.headers = headers
            self.target = target
        }
    }

    struct CompiledVirtualHost: Sendable {
        let name: String
        let routes: [CompiledRoute]
    }

    private let exact: [String: Int]
    /// Longest suffix first.
    private let suffixes: [(suffix: String, host: Int)]
    private let wildcard: Int?
    let virtualHosts: [CompiledVirtualHost]

    /// `scope` names the table in rate-limit scopes (`route <scope>/<virtual host>/<route>`);
    /// `limiter` hands out the bucket of each scope (the same one across snapshots).
    init(
        _ virtualHosts: [VirtualHost],
        clusterIndex: [String: Int],
        scope: String = "",
        limiter: ((String, RateLimit) -> RateLimiter)? = nil
    ) throws {
        var exact: [String: Int] = [:]
        var suffixes: [(String, Int)] = []
        var wildcard: Int?
        var compiled: [CompiledVirtualHost] = []
        for (vi, vhost) in virtualHosts.enumerated() {
            for domain in vhost.domains {
                switch DomainPattern(domain) {
                case .exact(let name): exact[name] = vi
                case .suffix(let suffix): suffixes.append((suffix, vi))
                case .any: wildcard = vi
                }
            }
            let routes = try vhost.routes.map { route in
                let path: CompiledRoute.Path =
                    switch route.match.path {
                    case .prefix(let p): .prefix(p)
                    case .exact(let p): .exact(p)
                    case .regex(let r): .regex(try CompiledRegex(r))
                    }
                let headers = try route.match.headers.map { header in
                    let kind: CompiledRoute.Header =
                        switch header.kind {
                        case .exact(let v): .exact(v)
                        case .present: .present
                        case .regex(let r): .regex(try CompiledRegex(r))
                        }
                    return (name: header.name, kind: kind, invert: header.invert)
                }
                return CompiledRoute(
                    name: route.name,
                    path: path,
                    methods: route.match.methods.map { $0.uppercased() },
                    headers: headers,
                    target: RouteTarget(
                        route: route,
                        clusterIndex: clusterIndex,
                        rateLimiter: route.action.rateLimit.flatMap { limit in
                            limiter?("route \(scope)/\(vhost.name)/\(route.name)", limit)
                        }
                    )
                )
            }
            compiled.append(CompiledVirtualHost(name: vhost.name, routes: routes))
        }
        self.exact = exact
        self.suffixes = suffixes.sorted { $0.0.count > $1.0.count }
        self.wildcard = wildcard
        self.virtualHosts = compiled
    }

    /// The virtual host for a `Host` header value (port and case ignored), or `nil`.
    func virtualHost(for hostHeader: String?) -> CompiledVirtualHost? {
        if exact.isEmpty && suffixes.isEmpty {
            return wildcard.map { virtualHosts[$0] }
        }
        let host = Self.normalizedHost(hostHeader ?? "")
        if let index = exact[host] { return virtualHosts[index] }
        for (suffix, index) in suffixes where host.count > suffix.count && host.hasSuffix(suffix) {
            return virtualHosts[index]
        }
        if let wildcard { return virtualHosts[wildcard] }
        return nil
    }

    /// The first route of the matching virtual host that accepts this request, or `nil`. The
    /// path is compared as bytes where the target's are (no Unicode normalisation, as Envoy
    /// does); only what the routes ask about is read: the method's name for a route with
    /// methods, the fields (decoded) for one with field conditions.
    func route(for request: RequestContext) -> CompiledRoute? {
        guard let vhost = virtualHost(for: request.host) else { return nil }
        var target = request.head.uri
        // Absolute-form (`http://host/p`) and `*` are rare: their path is found as a string first.
        if target.utf8.first != UInt8(ascii: "/") { target = String(Self.path(of: target)) }
        return target.withUTF8 { bytes in
            let path = UnsafeBufferPointer(rebasing: bytes[..<Self.pathEnd(bytes)])
            var method: String?
            for route in vhost.routes where Self.matches(route, path) {
                if !route.methods.isEmpty {
                    let name = method ?? request.head.method.rawValue
                    method = name
                    if !route.methods.contains(name) { continue }
                }
                if !route.headers.isEmpty && !Self.matches(route.headers, request.head.fields.headers) { continue }
                return route
            }
            return nil
        }
    }

    /// Where an origin-form target's path ends: at `?`, `#` or the end.
    private static func pathEnd(_ b: UnsafeBufferPointer<UInt8>) -> Int {
        b.firstIndex { $0 == UInt8(ascii: "?") || $0 == UInt8(ascii: "#") } ?? b.count
    }

    private static func matches(_ route: CompiledRoute, _ path: UnsafeBufferPointer<UInt8>) -> Bool {
        if route.isRegex, let regex = route.regex {
            return regex.wholeMatch(Substring(String(decoding: path, as: UTF8.self)))
        }
        let n = route.pathBytes.count
        guard route.exactPath ? path.count == n : path.count >= n else { return false }
        return n == 0 || route.pathBytes.withUnsafeBufferPointer { memcmp($0.baseAddress!, path.baseAddress!, n) == 0 }
    }

    private static func matches(
        _ conditions: [(name: String, kind: CompiledRoute.Header, invert: Bool)],
        _ headers: HTTPHeaders
    ) -> Bool {
        for condition in conditions {
            let values = headers[condition.name]
            let holds: Bool
            switch condition.kind {
            case .present: holds = !values.isEmpty
            case .exact(let expected): holds = values.contains(expected)
            case .regex(let r): holds = values.contains { r.wholeMatch(Substring($0)) }
            }
            if holds == condition.invert { return false }
        }
        return true
    }

    /// The path of a request target: origin-form up to `?`/`#`; for absolute-form
    /// (`http://host/path`), the path part.
    static func path(of uri: String) -> Substring {
        let target = pathAndQuery(of: uri)
        // Bytes, not Characters: a target is ASCII, and no grapheme breaking is needed.
        if let end = target.utf8.firstIndex(where: { $0 == UInt8(ascii: "?") || $0 == UInt8(ascii: "#") }) {
            return target[..<end]
        }
        return target
    }

    /// Path and query of an absolute-form target (`http://host/p?q` → `/p?q`); an origin-form
    /// target is returned as it is.
    static func pathAndQuery(of uri: String) -> Substring {
        guard uri.utf8.first != UInt8(ascii: "/"), let scheme = uri.firstRange(of: "://") else { return Substring(uri) }
        let afterScheme = uri[scheme.upperBound...]
        return afterScheme.firstIndex(of: "/").map { afterScheme[$0...] } ?? "/"
    }

    static func normalizedHost(_ host: String) -> String {
        var h = Substring(host)
        if h.hasPrefix("[") {
            // [v6]:port
            if let close = h.firstIndex(of: "]") { h = h[h.startIndex...close] }
        } else if let colon = h.lastIndex(of: ":"), h.firstIndex(of: ":") == colon {
            h = h[..<colon]
        }
        if h.hasSuffix(".") { h = h.dropLast() }
        return h.lowercased()
    }
}

/// Where a matched route sends the request: one of its clusters, chosen by weight. A class: the
/// routing middleware reads several of its fields per request without copying them all.
final class RouteTarget: Sendable {
    let clusters: [(index: Int, weight: Int)]
    let totalWeight: Int
    let timeout: Duration?
    let routeName: String
    let rateLimiter: RateLimiter?
    let retryPolicy: RetryPolicy?
    /// Whether there is a retry policy (asked per request; reading the policy copies it).
    let hasRetryPolicy: Bool
    let fault: FaultInjection?

    init(route: Route, clusterIndex: [String: Int], rateLimiter: RateLimiter? = nil) {
        self.rateLimiter = rateLimiter
        self.retryPolicy = route.action.retryPolicy
        self.hasRetryPolicy = route.action.retryPolicy != nil
        self.fault = route.action.fault
        self.clusters = route.action.clusters.compactMap { target in
            clusterIndex[target.name].map { (index: $0, weight: target.weight) }
        }
        self.totalWeight = clusters.reduce(0) { $0 + $1.weight }
        self.timeout = route.action.timeout
        self.routeName = route.name
    }

    /// Picks a cluster index in proportion to the weights.
    func pickCluster<G: RandomNumberGenerator>(using rng: inout G) -> Int {
        if clusters.count == 1 { return clusters[0].index }
        var r = Int.random(in: 0..<totalWeight, using: &rng)
        for c in clusters {
            if r < c.weight { return c.index }
            r -= c.weight
        }
        return clusters[clusters.count - 1].index
    }
}
