/// A consistent-hash ring over a cluster's endpoints (Ketama style): each endpoint owns a number
/// of points proportional to its weight. Built once per snapshot, shared read-only by all loops.
struct HashRing: Sendable {
    private let points: [UInt64]
    private let owners: [Int]

    init(endpoints: [Endpoint], minimumSize: Int) {
        guard !endpoints.isEmpty else {
            points = []
            owners = []
            return
        }
        let totalWeight = endpoints.reduce(0) { $0 + $1.weight }
        let scale = max(1.0, Double(minimumSize) / Double(totalWeight))
        var entries: [(UInt64, Int)] = []
        entries.reserveCapacity(max(minimumSize, totalWeight))
        for (index, endpoint) in endpoints.enumerated() {
            let count = max(1, Int((Double(endpoint.weight) * scale).rounded()))
            let key = endpoint.address.description
            for replica in 0..<count {
                entries.append((StableHash.hash("\(key)_\(replica)".utf8), index))
            }
        }
        entries.sort { $0.0 < $1.0 }
        points = entries.map(\.0)
        owners = entries.map(\.1)
    }

    var isEmpty: Bool { points.isEmpty }
    var size: Int { points.count }

    /// The first endpoint clockwise from `hash` for which `accept` holds, or `nil`.
    func lookup(_ hash: UInt64, accept: (Int) -> Bool) -> Int? {
        guard !points.isEmpty else { return nil }
        // first point >= hash
        var lo = 0
        var hi = points.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if points[mid] < hash { lo = mid + 1 } else { hi = mid }
        }
        var tried = 0
        var i = lo == points.count ? 0 : lo
        while tried < points.count {
            let owner = owners[i]
            if accept(owner) { return owner }
            tried += 1
            i += 1
            if i == points.count { i = 0 }
        }
        return nil
    }
}
