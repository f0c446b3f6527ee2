/// The xDS v3 resource type URLs Trellis serves and consumes.
public enum TypeURL {
    public static let cluster = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    public static let clusterLoadAssignment = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
    public static let listener = "type.googleapis.com/envoy.config.listener.v3.Listener"
    public static let routeConfiguration = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
}
