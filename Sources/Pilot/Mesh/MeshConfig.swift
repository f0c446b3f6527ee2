public import TrellisPolicy

/// `/etc/trellis/mesh.yaml`: static services (with or without instances), the mesh's gateways and
/// the routing rules sidecars apply per destination service. See `examples/mesh.yaml`.
public struct MeshConfig: Sendable, Hashable {
    public var services: [StaticService]
    public var gateways: [Gateway]
    /// Routing rules for traffic to a service from inside the mesh, by destination service.
    public var serviceRoutes: [ServiceKey: [RouteRule]]
    /// Resilience settings for traffic to a service, by destination service.
    public var policies: [ServiceKey: ServicePolicy]

    public init(
        services: [StaticService] = [],
        gateways: [Gateway] = [],
        serviceRoutes: [ServiceKey: [RouteRule]] = [:],
        policies: [ServiceKey: ServicePolicy] = [:]
    ) {
        self.services = services
        self.gateways = gateways
        self.serviceRoutes = serviceRoutes
        self.policies = policies
    }

    public static let empty = MeshConfig()

    /// A service declared in the file; agents may add instances to it.
    public struct StaticService: Sendable, Hashable {
        public var key: ServiceKey
        public var serviceProtocol: ServiceProtocol
        /// Extra Host names (besides `name` and `name:port`) its virtual host answers to.
        public var hosts: [String]
        public var instances: [Instance]
        /// Named groups of its instances, by labels, that routes may send to (canaries, versions).
        public var subsets: [Subset]

        public init(
            key: ServiceKey,
            serviceProtocol: ServiceProtocol = .http,
            hosts: [String] = [],
            instances: [Instance] = [],
            subsets: [Subset] = []
        ) {
            self.key = key
            self.serviceProtocol = serviceProtocol
            self.hosts = hosts
            self.instances = instances
            self.subsets = subsets
        }
    }

    /// The instances of a service whose labels include all of `labels` (registered by agents,
    /// from the CMDB or in this file alike): served as a cluster of its own,
    /// `outbound|port|name|service`, which routes send a share of the traffic to.
    public struct Subset: Sendable, Hashable {
        public var name: String
        public var labels: [String: String]

        public init(name: String, labels: [String: String]) {
            self.name = name
            self.labels = labels
        }

        public func contains(_ instance: Instance) -> Bool {
            labels.allSatisfy { instance.labels[$0.key] == $0.value }
        }
    }

    /// Each declared service's subsets.
    public var subsets: [ServiceKey: [Subset]] {
        Dictionary(services.filter { !$0.subsets.isEmpty }.map { ($0.key, $0.subsets) }) { a, _ in a }
    }

    /// A gateway: listeners bound on ports of the gateway machines, routing to services.
    public struct Gateway: Sendable, Hashable {
        public var name: String
        public var listeners: [GatewayListener]

        public init(name: String, listeners: [GatewayListener]) {
            self.name = name
            self.listeners = listeners
        }
    }

    public struct GatewayListener: Sendable, Hashable {
        public var port: Int
        public var routes: [RouteRule]

        public init(port: Int, routes: [RouteRule]) {
            self.port = port
            self.routes = routes
        }
    }
}

/// One routing rule: what it matches and where it sends.
public struct RouteRule: Sendable, Hashable {
    public struct WeightedDestination: Sendable, Hashable {
        public var service: ServiceKey
        /// One of the service's subsets; nil: all its instances.
        public var subset: String?
        public var weight: Int

        public init(service: ServiceKey, subset: String? = nil, weight: Int) {
            self.service = service
            self.subset = subset
            self.weight = weight
        }
    }

    /// Host names (gateways only; `*` or `*.suffix` allowed). Empty: any host.
    public var hosts: [String]
    /// Path, methods and headers (the vocabulary the gateway file uses: ``RouteMatch``).
    public var match: RouteMatch
    public var destinations: [WeightedDestination]
    /// The rule's request timeout; `.zero`: none (`timeout: none`); nil: the policy's or Envoy's.
    public var timeout: Duration?

    public init(
        hosts: [String] = [],
        match: RouteMatch = RouteMatch(),
        destinations: [WeightedDestination],
        timeout: Duration? = nil
    ) {
        self.hosts = hosts
        self.match = match
        self.destinations = destinations
        self.timeout = timeout
    }
}
