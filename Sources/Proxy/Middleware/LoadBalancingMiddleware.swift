import NIOCore
import NIOHTTP1

/// Picks a healthy endpoint of the routed cluster with the cluster's policy. None healthy: 503
/// `no_healthy_upstream`.
public final class LoadBalancingMiddleware: ProxyMiddleware {
    public struct Factory: ProxyMiddlewareFactory {
        public init() {}
        public func makeMiddleware(_ snapshot: ProxySnapshot, _ loop: LoopResources) -> any ProxyMiddleware {
            LoadBalancingMiddleware(loop: loop)
        }
    }

    private let loop: LoopResources

    init(loop: LoopResources) {
        self.loop = loop
    }

    public func onRequest(_ request: RequestContext) -> ProxyError? {
        guard let cluster = request.cluster else { return nil }
        if cluster.config.originalDestination {
            guard let destination = request.originalDestination else {
                return .noHealthyUpstream(
                    "cluster '\(cluster.config.name)': the connection has no original destination"
                )
            }
            request.endpoint = destination
            request.passthroughEndpoint = ClusterRuntime.EndpointRuntime(
                config: Endpoint(address: destination),
                socketAddress: try? SocketAddress(ipAddress: destination.host, port: destination.port),
                key: "original|\(destination)"
            )
            return nil
        }
        let balancer = loop.balancers[cluster.index]
        // Ejected and failing endpoints are skipped; if every pick lands on one (all out, or a
        // hash that maps there), the request goes anyway rather than failing (panic mode).
        let picked =
            cluster.checksAvailability
            ? balancer.pickInService(fields: request.head.fields, clientIP: request.clientIP, rng: &loop.rng).last
            : balancer.pick(fields: request.head.fields, clientIP: request.clientIP, rng: &loop.rng)
        guard let index = picked else {
            return .noHealthyUpstream("cluster '\(cluster.config.name)'")
        }
        request.balancer = balancer
        request.endpointIndex = index
        request.endpoint = cluster.endpoints[index].config.address
        balancer.requestStarted(endpoint: index)
        return nil
    }

    public func onComplete(_ request: RequestContext) {
        if let balancer = request.balancer, let index = request.endpointIndex {
            balancer.requestFinished(endpoint: index)
        }
    }
}
