public import CoreMetrics
import NIOConcurrencyHelpers
import NIOHTTP1

/// The data path's metrics, created once with bounded label sets (cluster, listener, response
/// class, token). docs/metrics.md lists them all, with what each answers.
///
/// Names (Prometheus): `trellis_upstream_requests_total{cluster,class}`,
/// `trellis_upstream_errors_total{cluster,token}`, `trellis_upstream_connect_failures_total{cluster}`,
/// `trellis_upstream_request_duration_seconds{cluster}` (histogram),
/// `trellis_upstream_connect_duration_seconds{cluster}` (histogram),
/// `trellis_upstream_connections_active{cluster}`, `trellis_upstream_connections_total{cluster}`,
/// `trellis_upstream_sent_bytes_total{cluster}`, `trellis_upstream_received_bytes_total{cluster}`,
/// `trellis_downstream_request_duration_seconds{listener}` (histogram),
/// `trellis_downstream_responses_total{listener,class}`,
/// `trellis_downstream_received_bytes_total{listener}`, `trellis_downstream_sent_bytes_total{listener}`,
/// `trellis_downstream_connections_active`, `trellis_downstream_connections_total`,
/// `trellis_downstream_requests_total`, `trellis_errors_total{token}`,
/// `trellis_sniffed_connections_total{protocol}` (`http1`, `http2`, `tcp`),
/// `trellis_tcp_relay_failures_total{reason}` (`no_original_destination`, `connect`),
/// `trellis_rate_limited_total{scope}` (`route <name>`, `cluster <name>`),
/// `trellis_upstream_overflow_total{cluster,limit}` (`max_connections`, `max_pending_requests`,
/// `max_requests`, `max_retries`), `trellis_upstream_stale_connection_retries_total{cluster}`.
///
/// It also holds what must outlive a configuration snapshot besides metrics: the rate-limit
/// buckets and the clusters' load counters (``ResilienceState``).
public final class ProxyStats: Sendable {
    let factory: any MetricsFactory
    let resilience: ResilienceState
    private let clusters = NIOLockedValueBox<[String: ClusterStats]>([:])
    private let listeners = NIOLockedValueBox<[String: ListenerStats]>([:])
    let activeConnections: Meter
    let totalConnections: Counter
    let downstreamRequests: Counter
    private let errors: [String: Counter]
    let sniffedHTTP: Counter
    let sniffedHTTP2: Counter
    let sniffedTCP: Counter
    let relayNoDestination: Counter
    let relayConnectFailures: Counter

    public init(factory: any MetricsFactory = MetricsSystem.factory) {
        self.factory = factory
        self.resilience = ResilienceState(factory: factory)
        self.activeConnections = Meter(label: "trellis_downstream_connections_active", factory: factory)
        self.totalConnections = Counter(label: "trellis_downstream_connections_total", factory: factory)
        self.downstreamRequests = Counter(label: "trellis_downstream_requests_total", factory: factory)
        var errors: [String: Counter] = [:]
        for token in ProxyError.allTokens {
            errors[token] = Counter(label: "trellis_errors_total", dimensions: [("token", token)], factory: factory)
        }
        self.errors = errors
        sniffedHTTP = Counter(
            label: "trellis_sniffed_connections_total",
            dimensions: [("protocol", "http1")],
            factory: factory
        )
        sniffedHTTP2 = Counter(
            label: "trellis_sniffed_connections_total",
            dimensions: [("protocol", "http2")],
            factory: factory
        )
        sniffedTCP = Counter(
            label: "trellis_sniffed_connections_total",
            dimensions: [("protocol", "tcp")],
            factory: factory
        )
        relayNoDestination = Counter(
            label: "trellis_tcp_relay_failures_total",
            dimensions: [("reason", "no_original_destination")],
            factory: factory
        )
        relayConnectFailures = Counter(
            label: "trellis_tcp_relay_failures_total",
            dimensions: [("reason", "connect")],
            factory: factory
        )
    }

    func record(_ error: ProxyError) {
        errors[error.token]?.increment()
    }

    /// The stats of one listener, created on first use and kept across snapshots.
    func listener(_ name: String) -> ListenerStats {
        listeners.withLockedValue { all in
            if let existing = all[name] { return existing }
            let stats = ListenerStats(name: name, factory: factory)
            all[name] = stats
            return stats
        }
    }

    /// The stats of one cluster, created on first use and kept across snapshots.
    func cluster(_ name: String) -> ClusterStats {
        clusters.withLockedValue { all in
            if let existing = all[name] { return existing }
            let stats = ClusterStats(name: name, factory: factory)
            all[name] = stats
            return stats
        }
    }
}

/// What one listener's clients saw: how long their requests took, the statuses they got, the
/// body bytes each way.
final class ListenerStats: Sendable {
    /// `trellis_downstream_request_duration_seconds{listener}`: from the request head to the end
    /// of the response (or the client leaving), whatever answered.
    let duration: Timer
    /// `trellis_downstream_responses_total{listener, class}`.
    private let responses: StatusClassCounters
    let receivedBytes: Counter
    let sentBytes: Counter

    init(name: String, factory: any MetricsFactory) {
        duration = Timer(
            label: "trellis_downstream_request_duration_seconds",
            dimensions: [("listener", name)],
            preferredDisplayUnit: .seconds,
            factory: factory
        )
        responses = StatusClassCounters("trellis_downstream_responses_total", ("listener", name), factory: factory)
        receivedBytes = Counter(
            label: "trellis_downstream_received_bytes_total",
            dimensions: [("listener", name)],
            factory: factory
        )
        sentBytes = Counter(
            label: "trellis_downstream_sent_bytes_total",
            dimensions: [("listener", name)],
            factory: factory
        )
    }

    func recordResponse(_ status: HTTPResponseStatus) { responses.record(status) }

    /// A finished request's figures, in one call from the data path.
    func finished(status: HTTPResponseStatus?, nanoseconds: Int64, received: Int, sent: Int) {
        duration.recordNanoseconds(nanoseconds)
        if let status { responses.record(status) }
        receivedBytes.increment(by: received)
        sentBytes.increment(by: sent)
    }
}

/// One counter per status class (`class`: `1xx`…`5xx`) next to a listener or cluster label.
struct StatusClassCounters: Sendable {
    /// Indexed by status class: 1xx…5xx at 0…4.
    private let counters: [Counter]

    init(_ label: String, _ dimension: (String, String), factory: any MetricsFactory) {
        counters = (1...5).map { c in
            Counter(label: label, dimensions: [dimension, ("class", "\(c)xx")], factory: factory)
        }
    }

    func record(_ status: HTTPResponseStatus) {
        let cls = Int(status.code / 100)
        if (1...5).contains(cls) { counters[cls - 1].increment() }
    }
}

final class ClusterStats: Sendable {
    /// `trellis_upstream_requests_total{cluster, class}`.
    private let requests: StatusClassCounters
    let connectFailures: Counter
    let duration: Timer
    let overflowConnections: Counter
    let overflowPending: Counter
    let overflowRequests: Counter
    let overflowRetries: Counter
    /// `trellis_upstream_retries_total{cluster}`: tries after the first.
    let retries: Counter
    /// `trellis_upstream_stale_connection_retries_total{cluster}`: requests sent again on a new
    /// connection because a reused keep-alive connection closed before any response byte.
    let staleConnectionRetries: Counter
    /// `trellis_upstream_grpc_responses_total{cluster, grpc_status}`: gRPC calls by the status
    /// their caller got (the upstream's, or the one Trellis answered with), made on first use.
    private let grpcResponses: NIOLockedValueBox<[Int: Counter]>
    /// `trellis_upstream_errors_total{cluster, token}`: requests to the cluster the proxy refused or
    /// failed, by error token, made on first use.
    private let errors: NIOLockedValueBox<[String: Counter]>
    /// `trellis_upstream_connect_duration_seconds{cluster}`: how long new connections took.
    let connectDuration: Timer
    /// `trellis_upstream_connections_active{cluster}` and `_total`: connections established.
    let connectionsActive: Meter
    let connectionsTotal: Counter
    /// `trellis_upstream_sent_bytes_total{cluster}`, `trellis_upstream_received_bytes_total{cluster}`:
    /// request and response body bytes.
    let sentBytes: Counter
    let receivedBytes: Counter
    private let name: String
    private let factory: any MetricsFactory

    static let grpcStatusNames = [
        "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
        "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
        "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
    ]

    func recordGRPC(_ status: Int) {
        let code = Self.grpcStatusNames.indices.contains(status) ? status : -1
        let counter = grpcResponses.withLockedValue { counters in
            if let counter = counters[code] { return counter }
            let counter = Counter(
                label: "trellis_upstream_grpc_responses_total",
                dimensions: [("cluster", name), ("grpc_status", code < 0 ? "OTHER" : Self.grpcStatusNames[code])],
                factory: factory
            )
            counters[code] = counter
            return counter
        }
        counter.increment()
    }

    func recordError(_ token: String) {
        let counter = errors.withLockedValue { counters in
            if let counter = counters[token] { return counter }
            let counter = Counter(
                label: "trellis_upstream_errors_total",
                dimensions: [("cluster", name), ("token", token)],
                factory: factory
            )
            counters[token] = counter
            return counter
        }
        counter.increment()
    }

    /// A connection to the cluster was established after `nanoseconds`.
    func connectionOpened(nanoseconds: Int64) {
        connectDuration.recordNanoseconds(nanoseconds)
        connectionsTotal.increment()
        connectionsActive.increment()
    }

    init(name: String, factory: any MetricsFactory) {
        self.name = name
        self.factory = factory
        grpcResponses = NIOLockedValueBox([:])
        errors = NIOLockedValueBox([:])
        connectDuration = Timer(
            label: "trellis_upstream_connect_duration_seconds",
            dimensions: [("cluster", name)],
            preferredDisplayUnit: .seconds,
            factory: factory
        )
        connectionsActive = Meter(
            label: "trellis_upstream_connections_active",
            dimensions: [("cluster", name)],
            factory: factory
        )
        connectionsTotal = Counter(
            label: "trellis_upstream_connections_total",
            dimensions: [("cluster", name)],
            factory: factory
        )
        sentBytes = Counter(
            label: "trellis_upstream_sent_bytes_total",
            dimensions: [("cluster", name)],
            factory: factory
        )
        receivedBytes = Counter(
            label: "trellis_upstream_received_bytes_total",
            dimensions: [("cluster", name)],
            factory: factory
        )
        func overflow(_ limit: String) -> Counter {
            Counter(
                label: "trellis_upstream_overflow_total",
                dimensions: [("cluster", name), ("limit", limit)],
                factory: factory
            )
        }
        overflowConnections = overflow("max_connections")
        overflowPending = overflow("max_pending_requests")
        overflowRequests = overflow("max_requests")
        overflowRetries = overflow("max_retries")
        retries = Counter(label: "trellis_upstream_retries_total", dimensions: [("cluster", name)], factory: factory)
        staleConnectionRetries = Counter(
            label: "trellis_upstream_stale_connection_retries_total",
            dimensions: [("cluster", name)],
            factory: factory
        )
        requests = StatusClassCounters("trellis_upstream_requests_total", ("cluster", name), factory: factory)
        connectFailures = Counter(
            label: "trellis_upstream_connect_failures_total",
            dimensions: [("cluster", name)],
            factory: factory
        )
        duration = Timer(
            label: "trellis_upstream_request_duration_seconds",
            dimensions: [("cluster", name)],
            preferredDisplayUnit: .seconds,
            factory: factory
        )
    }

    func recordResponse(_ status: HTTPResponseStatus) { requests.record(status) }

    /// A finished request's figures, in one call from the data path: the status it got (nil when
    /// no endpoint answered it and Trellis did), its gRPC status, its duration when it reached an
    /// endpoint, the error token, and the body bytes each way.
    func finished(
        status: HTTPResponseStatus?,
        grpcStatus: Int?,
        upstreamNanoseconds: Int64?,
        error: String?,
        sent: Int,
        received: Int
    ) {
        if let status { requests.record(status) }
        if let grpcStatus { recordGRPC(grpcStatus) }
        if let upstreamNanoseconds { duration.recordNanoseconds(upstreamNanoseconds) }
        if let error { recordError(error) }
        sentBytes.increment(by: sent)
        receivedBytes.increment(by: received)
    }
}
