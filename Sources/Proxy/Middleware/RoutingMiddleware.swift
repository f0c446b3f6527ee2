import NIOHTTP1

/// Matches the request to a virtual host and route, and picks one of the route's clusters by
/// weight. No match: 404 `no_route`.
public final class RoutingMiddleware: ProxyMiddleware {
    public struct Factory: ProxyMiddlewareFactory {
        public init() {}
        public func makeMiddleware(_ snapshot: ProxySnapshot, _ loop: LoopResources) -> any ProxyMiddleware {
            RoutingMiddleware(snapshot: snapshot, loop: loop)
        }
    }

    private let snapshot: ProxySnapshot
    private let loop: LoopResources

    init(snapshot: ProxySnapshot, loop: LoopResources) {
        self.snapshot = snapshot
        self.loop = loop
    }

    /// The table of the listener that asked last: a loop mostly serves one or two listeners, and
    /// comparing a name is cheaper than hashing it.
    private var lastListener: String?
    private var lastTable: RouteTable?

    private func table(_ listener: String) -> RouteTable? {
        if let lastTable, listener == lastListener { return lastTable }
        let table = snapshot.routeTables[listener]
        lastListener = listener
        lastTable = table
        return table
    }

    /// Nothing to do when a request ends.
    public var observesCompletion: Bool { false }

    public func onRequest(_ request: RequestContext) -> ProxyError? {
        guard var table = table(request.listenerName) else {
            return .noRoute("listener '\(request.listenerName)' has no routes")
        }
        if !snapshot.portRouteTables.isEmpty, let port = request.originalDestination?.port,
            let byPort = snapshot.portRouteTables[request.listenerName]?[port]
        {
            table = byPort
        }
        guard let route = table.route(for: request) else {
            return .noRoute("host '\(request.host ?? "")' path '\(request.head.uri)'")
        }
        let target = route.target
        request.routeTarget = target
        request.timeout = target.timeout
        request.cluster = snapshot.clusters[target.pickCluster(using: &loop.rng)]
        return nil
    }
}
