public import CoreMetrics

/// Pilot's metrics (swift-metrics; the executable bootstraps the Prometheus backend and tests pass
/// their own factory). Names are part of the user contract: dashboards and alerts use them.
public struct PilotMetrics: Sendable {
    let factory: any MetricsFactory

    public init(factory: any MetricsFactory = MetricsSystem.factory) {
        self.factory = factory
    }

    /// xDS responses sent, by type.
    func pushed(_ typeURL: String) {
        Counter(
            label: "trellis_pilot_xds_pushes_total",
            dimensions: [("type", Self.shortType(typeURL))],
            factory: factory
        ).increment()
    }

    /// From a response sent to the node's ACK of it, by type.
    func pushAcked(_ typeURL: String, after elapsed: Duration) {
        Timer(
            label: "trellis_pilot_xds_push_duration_seconds",
            dimensions: [("type", Self.shortType(typeURL))],
            preferredDisplayUnit: .seconds,
            factory: factory
        ).recordNanoseconds(
            Int64(elapsed.components.seconds) * 1_000_000_000 + elapsed.components.attoseconds / 1_000_000_000
        )
    }

    /// Configurations a node rejected (NACK), by type.
    func nacked(_ typeURL: String) {
        Counter(
            label: "trellis_pilot_xds_nacks_total",
            dimensions: [("type", Self.shortType(typeURL))],
            factory: factory
        ).increment()
    }

    /// Requests or streams refused, by reason (`no_node`, `invalid_node`, `unknown_type`,
    /// `too_many_names`, `malformed`).
    func rejected(_ reason: String) {
        Counter(label: "trellis_pilot_xds_rejected_total", dimensions: [("reason", reason)], factory: factory)
            .increment()
    }

    func connectedStreams(_ delta: Int) {
        Meter(label: "trellis_pilot_xds_connected_streams", factory: factory).increment(by: Double(delta))
    }

    /// A node snapshot refused because it was not consistent (a dangling reference).
    func inconsistent() {
        Counter(label: "trellis_pilot_xds_inconsistent_snapshots_total", factory: factory).increment()
    }

    /// One translation and push to every node.
    func translated(seconds: Double) {
        Timer(label: "trellis_pilot_xds_translate_seconds", factory: factory).recordNanoseconds(Int64(seconds * 1e9))
    }

    func nodes(_ count: Int) {
        Gauge(label: "trellis_pilot_xds_nodes", factory: factory).record(count)
    }

    func instances(_ count: Int) {
        Gauge(label: "trellis_pilot_registry_instances", factory: factory).record(count)
    }

    func leasesExpired(_ count: Int) {
        Counter(label: "trellis_pilot_registry_leases_expired_total", factory: factory).increment(by: count)
    }

    /// HTTP API requests refused, by status.
    func apiError(_ status: Int) {
        Counter(label: "trellis_pilot_api_errors_total", dimensions: [("status", "\(status)")], factory: factory)
            .increment()
    }

    func cmdbPoll(ok: Bool) {
        Counter(
            label: "trellis_pilot_cmdb_polls_total",
            dimensions: [("result", ok ? "ok" : "failed")],
            factory: factory
        ).increment()
    }

    static func shortType(_ typeURL: String) -> String {
        switch typeURL {
        case "type.googleapis.com/envoy.config.listener.v3.Listener": "lds"
        case "type.googleapis.com/envoy.config.route.v3.RouteConfiguration": "rds"
        case "type.googleapis.com/envoy.config.cluster.v3.Cluster": "cds"
        case "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment": "eds"
        default: "other"
        }
    }
}
