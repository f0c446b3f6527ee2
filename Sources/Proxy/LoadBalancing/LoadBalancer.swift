import NIOCore
import NIOHTTP1
import TrellisPolicy

/// The per-event-loop state of one cluster's load balancer. It lives on one event loop and is
/// touched only there, so it needs no lock; it is rebuilt when a new snapshot arrives.
final class LoadBalancer {
    let cluster: ClusterRuntime
    private var cursor: Int
    /// Smooth weighted round robin: current weight per healthy endpoint.
    private var currentWeights: [Int]
    /// Requests in flight from this loop, per endpoint index.
    private(set) var active: [Int]

    init<G: RandomNumberGenerator>(cluster: ClusterRuntime, rng: inout G) {
        self.cluster = cluster
        // Start each loop at a different place so that loops do not march in step.
        self.cursor = cluster.healthy.isEmpty ? 0 : Int.random(in: 0..<cluster.healthy.count, using: &rng)
        self.currentWeights = Array(repeating: 0, count: cluster.healthy.count)
        self.active = Array(repeating: 0, count: cluster.endpoints.count)
    }

    /// Picks an endpoint index for a request (its headers and client address, for a ring hash),
    /// or `nil` when no endpoint is healthy.
    func pick<G: RandomNumberGenerator>(headers: HTTPHeaders, clientIP: String?, rng: inout G) -> Int? {
        let healthy = cluster.healthy
        guard !healthy.isEmpty else { return nil }
        if healthy.count == 1 { return healthy[0] }
        switch cluster.config.loadBalancing {
        case .roundRobin:
            cursor = cursor &+ 1
            if cursor >= healthy.count { cursor = 0 }
            return healthy[cursor]
        case .random:
            return healthy[Int.random(in: 0..<healthy.count, using: &rng)]
        case .leastRequest:
            let a = Int.random(in: 0..<healthy.count, using: &rng)
            var b = Int.random(in: 0..<(healthy.count - 1), using: &rng)
            if b >= a { b += 1 }
            return active[healthy[a]] <= active[healthy[b]] ? healthy[a] : healthy[b]
        case .weighted:
            var best = 0
            var total = 0
            for i in 0..<healthy.count {
                let w = cluster.endpoints[healthy[i]].config.weight
                currentWeights[i] += w
                total += w
                if currentWeights[i] > currentWeights[best] { best = i }
            }
            currentWeights[best] -= total
            return healthy[best]
        case .ringHash(let key, _):
            let value: String? =
                switch key {
                case .header(let name): headers.first(name: name)
                case .cookie(let name): Self.cookie(name, in: headers)
                case .sourceAddress: clientIP
                }
            guard let value, let ring = cluster.ring else {
                return healthy[Int.random(in: 0..<healthy.count, using: &rng)]
            }
            let endpoints = cluster.endpoints
            return ring.lookup(StableHash.hash(value.utf8)) { endpoints[$0].config.health == .healthy }
        }
    }

    /// The value of cookie `name` in the request's `Cookie` headers (`a=1; b=2`), if any.
    static func cookie(_ name: String, in headers: HTTPHeaders) -> String? {
        for header in headers[canonicalForm: "cookie"] {
            for pair in header.split(separator: ";") {
                let trimmed = pair.trimmingASCIIWhitespace()
                guard let eq = trimmed.firstIndex(of: "="), trimmed[..<eq] == name else { continue }
                return String(trimmed[trimmed.index(after: eq)...])
            }
        }
        return nil
    }

    /// Picks an endpoint in service (not ejected by outlier detection, not failing its health
    /// checks) other than `avoiding`, trying up to twice as many picks as there are healthy
    /// endpoints. `last` is the last pick made, for a caller that goes on anyway when every pick
    /// landed on one out of service (Envoy's panic mode); both `nil` when none is healthy.
    func pickInService<G: RandomNumberGenerator>(
        headers: HTTPHeaders,
        clientIP: String?,
        rng: inout G,
        avoiding: Int? = nil
    ) -> (inService: Int?, last: Int?) {
        let now = NIODeadline.now().uptimeNanoseconds
        var last: Int?
        for _ in 0...(cluster.healthy.count * 2) {
            guard let index = pick(headers: headers, clientIP: clientIP, rng: &rng) else { break }
            last = index
            if index != avoiding && cluster.isAvailable(index, now: now) { return (index, index) }
        }
        return (nil, last)
    }

    func requestStarted(endpoint: Int) { active[endpoint] += 1 }
    func requestFinished(endpoint: Int) { active[endpoint] -= 1 }
}
