public import SwiftProtobuf
public import XDS

/// How sidecars treat traffic to one service (`policies:` in mesh.yaml), kept as the xDS fields
/// pilot sends: what goes on the service's cluster, and what goes on every route to it.
public struct ServicePolicy: Sendable, Hashable {
    /// Only the policy fields are set (connect timeout, circuit breakers, outlier detection,
    /// health checks); merged onto the cluster pilot generates.
    public var cluster: Envoy_Config_Cluster_V3_Cluster
    /// Timeout and retry policy for routes to the service.
    public var route: Envoy_Config_Route_V3_RouteAction
    /// Per-route filter settings (`envoy.filters.http.local_ratelimit`, `envoy.filters.http.fault`).
    public var perFilter: [String: Google_Protobuf_Any]
    /// Retrying requests that are not idempotent (no Envoy field: route metadata `trellis`).
    public var retryNonIdempotent: Bool
    /// Locality failover: the service's assignments' `policy.overprovisioning_factor`.
    public var overprovisioningFactor: Int?

    public init(
        cluster: Envoy_Config_Cluster_V3_Cluster = .init(),
        route: Envoy_Config_Route_V3_RouteAction = .init(),
        perFilter: [String: Google_Protobuf_Any] = [:],
        retryNonIdempotent: Bool = false
    ) {
        self.cluster = cluster
        self.route = route
        self.perFilter = perFilter
        self.retryNonIdempotent = retryNonIdempotent
    }

    /// Whether nothing of it goes on routes.
    var isEmptyForRoutes: Bool {
        !route.hasTimeout && !route.hasRetryPolicy && route.hashPolicy.isEmpty && perFilter.isEmpty
            && !retryNonIdempotent
    }

    public static let rateLimitFilter = "envoy.filters.http.local_ratelimit"
    public static let faultFilter = "envoy.filters.http.fault"
}
