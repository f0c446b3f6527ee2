public import TrellisConfig

/// How a request picks one of a cluster's (a service's) endpoints.
public enum LoadBalancingPolicy: Sendable, Hashable, Codable {
    /// Each endpoint in turn.
    case roundRobin
    /// Two endpoints at random; the one with fewer requests in flight (power of two choices).
    case leastRequest
    /// Uniformly at random.
    case random
    /// Smooth weighted round robin by endpoint weight (Envoy's round robin over weighted endpoints).
    case weighted
    /// Consistent hashing of a request key onto a ring: requests with the same key go to the same
    /// endpoint while it stays healthy, and an endpoint leaving moves only its own keys. Requests
    /// without the key are spread at random.
    case ringHash(HashKey, minimumRingSize: Int)

    /// What a ring hash hashes.
    public enum HashKey: Sendable, Hashable, Codable {
        /// A request header's value (name lowercase).
        case header(String)
        /// A cookie's value.
        case cookie(String)
        /// The client's IP address (the original source: the VM that sent the request).
        case sourceAddress
    }

    public static let names = ["round_robin", "least_request", "random", "weighted", "ring_hash"]
    public static let defaultRingSize = 1024
    /// Envoy's maximum ring size.
    public static let ringSizes = 1...8_388_608

    /// The `lb_policy:` and `ring_hash:` keys of a mapping (a gateway cluster, a mesh.yaml policy):
    /// `lb_policy: round_robin | least_request | random | weighted | ring_hash`, and with
    /// `ring_hash`, `ring_hash: {header: x-user | cookie: session | source_address: true,
    /// minimum_ring_size: 1024}` (exactly one key). Neither key: round robin.
    public static func decode(
        _ keys: [String: ConfigNode],
        in parent: ConfigNode
    ) throws(ConfigFileError) -> LoadBalancingPolicy {
        guard let p = keys["lb_policy"] else {
            if let ring = keys["ring_hash"] { throw ring.error("ring_hash settings need lb_policy: ring_hash") }
            return .roundRobin
        }
        let name = try p.nonEmptyString()
        if name != "ring_hash", let ring = keys["ring_hash"] {
            throw ring.error("ring_hash settings given but lb_policy is \(name)")
        }
        switch name {
        case "round_robin": return .roundRobin
        case "least_request": return .leastRequest
        case "random": return .random
        case "weighted": return .weighted
        case "ring_hash":
            let ringNode = try keys.required("ring_hash", in: parent)
            let r = try ringNode.mapping(allowed: ["header", "cookie", "source_address", "minimum_ring_size"])
            let given = ["header", "cookie", "source_address"].filter { r[$0] != nil }
            guard given.count == 1 else {
                throw ringNode.error("expected exactly one of header, cookie or source_address, got \(given.count)")
            }
            let key: HashKey
            if let h = r["header"] {
                let header = try h.nonEmptyString()
                guard HTTPToken.isToken(header) else { throw h.error("expected a header name, got '\(header)'") }
                key = .header(header.lowercased())
            } else if let c = r["cookie"] {
                let cookie = try c.nonEmptyString()
                guard HTTPToken.isToken(cookie) else { throw c.error("expected a cookie name, got '\(cookie)'") }
                key = .cookie(cookie)
            } else {
                guard try r["source_address"]!.bool() else {
                    throw r["source_address"]!.error("expected true (leave it out to hash something else)")
                }
                key = .sourceAddress
            }
            return .ringHash(key, minimumRingSize: try r["minimum_ring_size"]?.int(in: ringSizes) ?? defaultRingSize)
        default:
            throw p.error("expected one of \(names.joined(separator: ", ")), got '\(name)'")
        }
    }
}
