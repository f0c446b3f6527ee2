import NIOCore
import NIOPosix
public import TrellisHTTP
public import TrellisPolicy

/// One health check against a local program: an HTTP GET answered with an expected status (the
/// check's `expected_statuses`, 200-399 by default, as for a cluster's checks) within the
/// timeout, or a TCP connection accepted within it.
public enum HealthProbe {
    public static func check(
        _ check: HealthCheck,
        host: String = "127.0.0.1",
        port: Int,
        client: HTTPClient = HTTPClient()
    ) async -> Bool {
        switch check.kind {
        case .http(let path, let authority, let expected):
            let url = HTTPClient.URL(host: host, port: port, path: path)
            guard let response = try? await client.request("GET", url, authority: authority, timeout: check.timeout)
            else { return false }
            return expected.contains { $0.contains(response.status) }
        case .tcp:
            let millis = Int64(
                check.timeout.components.seconds * 1000 + check.timeout.components.attoseconds / 1_000_000_000_000_000
            )
            guard
                let channel = try? await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                    .connectTimeout(.milliseconds(max(1, millis)))
                    .connect(host: host, port: port).get()
            else { return false }
            try? await channel.close()
            return true
        }
    }
}

/// Consecutive results against the thresholds: a healthy service turns unhealthy after
/// `unhealthyThreshold` failures in a row, and back after `healthyThreshold` successes.
public struct HealthState: Sendable, Equatable {
    public private(set) var healthy: Bool
    private var streak = 0

    public init(healthy: Bool) { self.healthy = healthy }

    /// Records one result; returns whether `healthy` changed.
    public mutating func record(_ ok: Bool, _ check: HealthCheck) -> Bool {
        if ok == healthy {
            streak = 0
            return false
        }
        streak += 1
        guard streak >= (ok ? check.healthyThreshold : check.unhealthyThreshold) else { return false }
        healthy = ok
        streak = 0
        return true
    }
}
