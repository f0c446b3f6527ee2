import NIOCore
import NIOHTTP1
import TrellisPolicy

/// The per-event-loop state of one cluster's load balancer. It lives on one event loop and is
/// touched only there, so it needs no lock; it is rebuilt when a new snapshot arrives.
final class LoadBalancer {
    let cluster: ClusterRuntime
    private var cursor: Int
    /// Smooth weighted round robin: current weight per endpoint (by endpoint index).
    private var currentWeights: [Int]
    /// Requests in flight from this loop, per endpoint index.
    private(set) var active: [Int]

    init<G: RandomNumberGenerator>(cluster: ClusterRuntime, rng: inout G) {
        self.cluster = cluster
        // Start each loop at a different place so that loops do not march in step.
        self.cursor = cluster.healthy.isEmpty ? 0 : Int.random(in: 0..<cluster.healthy.count, using: &rng)
        self.currentWeights = Array(repeating: 0, count: cluster.endpoints.count)
        self.active = Array(repeating: 0, count: cluster.endpoints.count)
    }

    /// Picks an endpoint index for a request (its headers and client address, for a ring hash),
    /// or `nil` when no endpoint is healthy. With priorities, a level is chosen first (Envoy's
    /// priority load: a level takes as much of the traffic as its available share of endpoints
    /// times the overprovisioning factor (1.4 by default) covers, the rest spills to the next), then an
    /// endpoint within it by the cluster's policy. `fields` are read only by a ring hash on a
    /// header or cookie (a copy of a request's fields is a retain per buffer in them).
    func pick<G: RandomNumberGenerator>(
        fields: @autoclosure () -> RequestFields,
        clientIP: @autoclosure () -> String?,
        rng: inout G
    ) -> Int? {
        if cluster.levels.isEmpty { return pick(among: cluster.healthy, level: nil, fields, clientIP, &rng) }
        let level = chooseLevel(rng: &rng)
        return pick(among: cluster.levels[level].healthy, level: level, fields, clientIP, &rng)
            ?? pick(among: cluster.healthy, level: nil, fields, clientIP, &rng)
    }

    private func chooseLevel<G: RandomNumberGenerator>(rng: inout G) -> Int {
        let now = cluster.checksAvailability ? NIODeadline.now().uptimeNanoseconds : 0
        let factor = cluster.config.overprovisioningFactor ?? PolicyBounds.defaultOverprovisioning
        var loads: [Int] = []
        var remaining = 100
        for level in cluster.levels {
            let available =
                cluster.checksAvailability
                ? level.healthy.reduce(0) { $0 + (cluster.isAvailable($1, now: now) ? 1 : 0) } : level.healthy.count
            let health = level.all.isEmpty ? 0 : min(100, available * factor / level.all.count)
            let load = min(health, remaining)
            loads.append(load)
            remaining -= load
        }
        // Not enough available anywhere: the loads are spread in proportion (Envoy normalizes);
        // nothing available at all: the first level with healthy endpoints (panic).
        let total = loads.reduce(0, +)
        guard total > 0 else { return cluster.levels.firstIndex { !$0.healthy.isEmpty } ?? 0 }
        var draw = Int.random(in: 0..<total, using: &rng)
        for (i, load) in loads.enumerated() {
            if draw < load { return i }
            draw -= load
        }
        return loads.count - 1
    }

    private func pick<G: RandomNumberGenerator>(
        among healthy: [Int],
        level: Int?,
        _ fields: () -> RequestFields,
        _ clientIP: () -> String?,
        _ rng: inout G
    ) -> Int? {
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
            var best = healthy[0]
            var total = 0
            for index in healthy {
                let w = cluster.endpoints[index].config.weight
                currentWeights[index] += w
                total += w
                if currentWeights[index] > currentWeights[best] { best = index }
            }
            currentWeights[best] -= total
            return best
        case .ringHash(let key, _):
            let value: String? =
                switch key {
                case .header(let name): fields().first(name: name)
                case .cookie(let name): Self.cookie(name, in: fields().headers)
                case .sourceAddress: clientIP()
                }
            guard let value, let ring = cluster.ring else {
                return healthy[Int.random(in: 0..<healthy.count, using: &rng)]
            }
            let endpoints = cluster.endpoints
            let priority = level.map { endpoints[cluster.levels[$0].all[0]].config.priority }
            return ring.lookup(StableHash.hash(value.utf8)) {
                endpoints[$0].config.health == .healthy
                    && (priority == nil || endpoints[$0].config.priority == priority)
            }
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
        fields: @autoclosure () -> RequestFields,
        clientIP: @autoclosure () -> String?,
        rng: inout G,
        avoiding: Int? = nil
    ) -> (inService: Int?, last: Int?) {
        let now = NIODeadline.now().uptimeNanoseconds
        var last: Int?
        for _ in 0...(cluster.healthy.count * 2) {
            guard let index = pick(fields: fields(), clientIP: clientIP(), rng: &rng) else { break }
            last = index
            if index != avoiding && cluster.isAvailable(index, now: now) { return (index, index) }
        }
        return (nil, last)
    }

    func requestStarted(endpoint: Int) { active[endpoint] += 1 }
    func requestFinished(endpoint: Int) { active[endpoint] -= 1 }
}
