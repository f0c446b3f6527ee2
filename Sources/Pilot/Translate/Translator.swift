import SwiftProtobuf
import TrellisPolicy
public import XDS

/// Registry → xDS resources, per node role (docs/architecture.md, "xDS roles"). The parts that do
/// not depend on the node are built once per registry version (``Shared``); a node's snapshot
/// picks from them and adds its own (a sidecar's inbound listener).
public enum Translator {
    public static let outboundPort = 15001
    public static let inboundPort = 15006
    public static let passthroughCluster = "PassthroughCluster"
    public static let inboundPassthroughCluster = "InboundPassthroughCluster"
    /// Inbound traffic is forwarded to the local app from this address (docs/architecture.md).
    public static let inboundSourceAddress = "127.0.0.6"

    /// A service's cluster, or one of its subsets' (`outbound|8080|v2|orders`, Istio's naming).
    public static func clusterName(_ service: ServiceKey, subset: String? = nil) -> String {
        "outbound|\(service.port)|\(subset ?? "")|\(service.name)"
    }
    static func inboundClusterName(port: Int) -> String { "inbound|\(port)||" }
    static func gatewayRouteName(_ gateway: String, port: Int) -> String { "gateway|\(gateway)|\(port)" }

    typealias HCM = Envoy_Extensions_Filters_Network_HttpConnectionManager_V3_HttpConnectionManager
    typealias Ref = XDSResource.Reference

    /// What every node of a role shares, for one registry version: built and checked for
    /// consistency once, so a push to a thousand nodes costs one translation plus, per sidecar,
    /// its inbound listener.
    public struct Shared: Sendable {
        public var view: RegistryView
        var clusters: [XDSResource] = []
        var proxylessClusters: [XDSResource] = []
        var assignments: [XDSResource] = []
        var sidecarListeners: [XDSResource] = []
        var sidecarRoutes: [XDSResource] = []
        var passthrough: [XDSResource] = []
        var proxylessListeners: [XDSResource] = []
        var proxylessRoutes: [XDSResource] = []
        var gatewayResources: [String: (listeners: [XDSResource], routes: [XDSResource])] = [:]
        /// Each node's own instances (a sidecar serves them inbound).
        var instancesByNode: [String: [Instance]] = [:]
        /// Finished snapshots: the sidecar types every sidecar shares, each gateway's, the
        /// proxyless one.
        var sidecarShared: [String: TypeSnapshot] = [:]
        var sidecarListenerBase = TypeSnapshot.empty
        var sidecarClusterBase = TypeSnapshot.empty
        var gateways: [String: NodeSnapshot] = [:]
        var proxyless = NodeSnapshot.empty
        var emptyGateway = NodeSnapshot.empty
        /// Problems met while translating (e.g. a Host name used by two services); the resources
        /// were built without the offending part.
        public var warnings: [String] = []
        /// Dangling references in the shared parts (none unless the translator has a bug); nodes
        /// are then not updated.
        public var problems: [String] = []
    }

    /// Per service, what was translated last time: a service whose instances did not change is not
    /// encoded again (a push for one instance among ten thousand re-encodes one assignment).
    public struct Cache: Sendable {
        var services: [RegistryView.Service: (cluster: XDSResource, assignment: XDSResource)] = [:]
        /// The policy each cached cluster was made with.
        var policies: [ServiceKey: ServicePolicy] = [:]
        /// Per sidecar node: its own instances and the inbound parts built from them.
        var inbound: [String: (instances: [Instance], listener: XDSResource, clusters: [XDSResource])] = [:]
        /// Per client locality (region and zone): the endpoints with priorities relative to it, for
        /// the shared endpoints of that version (built when a node there first asks).
        var localityEDS: [Locality: (version: String, snapshot: TypeSnapshot)] = [:]
        public init() {}
    }

    public static func shared(_ view: RegistryView) throws -> Shared {
        var cache = Cache()
        return try shared(view, cache: &cache)
    }

    public static func shared(_ view: RegistryView, cache: inout Cache) throws -> Shared {
        var shared = Shared(view: view)
        var services: [RegistryView.Service: (cluster: XDSResource, assignment: XDSResource)] = [:]
        for service in view.services {
            let policy = view.mesh.policies[service.key]
            let cached = cache.policies[service.key] == policy ? cache.services[service] : nil
            let translated =
                try cached
                ?? (
                    cluster: try edsCluster(service, proxyless: false, policy: policy),
                    assignment: try assignment(service, overprovisioning: policy?.overprovisioningFactor)
                )
            services[service] = translated
            shared.clusters.append(translated.cluster)
            shared.assignments.append(translated.assignment)
            if service.serviceProtocol == .grpc {
                shared.proxylessClusters.append(try edsCluster(service, proxyless: true))
                let (listener, routes) = try proxylessListener(service, view: view)
                shared.proxylessListeners.append(listener)
                shared.proxylessRoutes.append(routes)
            }
            for instance in service.instances where !instance.node.isEmpty {
                shared.instancesByNode[instance.node, default: []].append(instance)
            }
        }
        cache.services = services
        cache.policies = view.mesh.policies
        // Subsets: a cluster and an assignment each, with the service's policy and the instances
        // whose labels match (not cached: they follow the mesh file and the instances alike).
        let subsets = view.mesh.subsets
        for service in view.services {
            for subset in subsets[service.key] ?? [] {
                let policy = view.mesh.policies[service.key]
                shared.clusters.append(try edsCluster(service, proxyless: false, policy: policy, subset: subset))
                shared.assignments.append(
                    try assignment(service, subset: subset, overprovisioning: policy?.overprovisioningFactor)
                )
            }
        }
        shared.passthrough = try passthroughClusters()
        try sidecarOutbound(view, into: &shared)
        for gateway in view.mesh.gateways {
            shared.gatewayResources[gateway.name] = try gatewayResources(gateway, policies: view.mesh)
        }

        // Finish and check the shared snapshots once.
        let eds = TypeSnapshot(shared.assignments)
        shared.sidecarShared = [
            TypeURL.routeConfiguration: TypeSnapshot(shared.sidecarRoutes), TypeURL.clusterLoadAssignment: eds,
        ]
        shared.sidecarListenerBase = TypeSnapshot(shared.sidecarListeners)
        shared.sidecarClusterBase = TypeSnapshot(shared.clusters + shared.passthrough)
        let sidecarBase = NodeSnapshot(
            types: shared.sidecarShared.merging(
                [TypeURL.listener: shared.sidecarListenerBase, TypeURL.cluster: shared.sidecarClusterBase]
            ) { a, _ in a }
        )
        shared.problems += sidecarBase.danglingReferences()
        let cds = TypeSnapshot(shared.clusters)
        for (name, resources) in shared.gatewayResources {
            let snapshot = NodeSnapshot(types: [
                TypeURL.listener: TypeSnapshot(resources.listeners),
                TypeURL.routeConfiguration: TypeSnapshot(resources.routes),
                TypeURL.cluster: cds,
                TypeURL.clusterLoadAssignment: eds,
            ])
            shared.problems += snapshot.danglingReferences()
            shared.gateways[name] = snapshot
        }
        shared.emptyGateway = NodeSnapshot(types: [
            TypeURL.listener: .empty, TypeURL.routeConfiguration: .empty, TypeURL.cluster: cds,
            TypeURL.clusterLoadAssignment: eds,
        ])
        let proxylessNames = Set(shared.proxylessClusters.map(\.name))
        shared.proxyless = NodeSnapshot([
            TypeURL.listener: shared.proxylessListeners,
            TypeURL.routeConfiguration: shared.proxylessRoutes,
            TypeURL.cluster: shared.proxylessClusters,
            TypeURL.clusterLoadAssignment: shared.assignments.filter { proxylessNames.contains($0.name) },
        ])
        shared.problems += shared.proxyless.danglingReferences()
        return shared
    }

    /// The node's snapshot. Gateways whose name mesh.yaml does not (yet) declare get no listeners.
    /// A sidecar's own part (its inbound listener and clusters) is checked here; the shared parts
    /// were checked in ``shared(_:)``.
    public static func snapshot(for node: NodeInfo, shared: Shared) throws -> NodeSnapshot {
        var cache = Cache()
        return try snapshot(for: node, shared: shared, cache: &cache, previous: nil)
    }

    /// - Parameters:
    ///   - cache: the node's inbound parts are reused while its own instances stay the same.
    ///   - previous: the node's last snapshot; its listener and cluster types are reused when they
    ///     were built from the same bases and inbound listener (a push that changed only endpoints
    ///     or routes costs a dictionary update per node).
    public static func snapshot(
        for node: NodeInfo,
        shared: Shared,
        cache: inout Cache,
        previous: NodeSnapshot?
    ) throws -> NodeSnapshot {
        var snapshot = try roleSnapshot(for: node, shared: shared, cache: &cache, previous: previous)
        // A node that says where it runs gets its own zone's endpoints first, then its region's,
        // then the rest (EDS priorities: Envoy, gRPC and the agent fail over in that order).
        if !node.locality.region.isEmpty || !node.locality.zone.isEmpty,
            let eds = snapshot.types[TypeURL.clusterLoadAssignment]
        {
            let client = Locality(region: node.locality.region, zone: node.locality.zone)
            let full = try localityEDS(for: client, shared: shared, cache: &cache)
            snapshot.types[TypeURL.clusterLoadAssignment] =
                eds.resources.count == full.resources.count
                ? full : TypeSnapshot(eds.resources.keys.compactMap { full.resources[$0] })
        }
        return snapshot
    }

    /// Every assignment of `shared` with priorities for a client in `client` (region and zone),
    /// built once per shared version and locality.
    static func localityEDS(for client: Locality, shared: Shared, cache: inout Cache) throws -> TypeSnapshot {
        let base = shared.sidecarShared[TypeURL.clusterLoadAssignment] ?? .empty
        if let cached = cache.localityEDS[client], cached.version == base.version { return cached.snapshot }
        var resources: [XDSResource] = []
        let subsets = shared.view.mesh.subsets
        for service in shared.view.services {
            let zones = Set(service.instances.map { Locality(region: $0.locality.region, zone: $0.locality.zone) })
            for subset in [nil] + (subsets[service.key] ?? []).map(Optional.some) {
                // A service whose instances all share one zone has the same priorities for everyone.
                if zones.count <= 1, let same = base.resources[clusterName(service.key, subset: subset?.name)] {
                    resources.append(same)
                } else {
                    resources.append(
                        try assignment(
                            service,
                            subset: subset,
                            client: client,
                            overprovisioning: shared.view.mesh.policies[service.key]?.overprovisioningFactor
                        )
                    )
                }
            }
        }
        let snapshot = TypeSnapshot(resources)
        cache.localityEDS[client] = (base.version, snapshot)
        return snapshot
    }

    private static func roleSnapshot(
        for node: NodeInfo,
        shared: Shared,
        cache: inout Cache,
        previous: NodeSnapshot?
    ) throws -> NodeSnapshot {
        switch node.role {
        case .sidecar:
            let own = shared.instancesByNode[node.id] ?? []
            let inbound: (instances: [Instance], listener: XDSResource, clusters: [XDSResource])
            if let cached = cache.inbound[node.id], cached.instances == own {
                inbound = cached
            } else {
                let (listener, clusters) = try self.inbound(own)
                inbound = (own, listener, clusters)
                cache.inbound[node.id] = inbound
            }
            let origin =
                "\(shared.sidecarListenerBase.version)/\(shared.sidecarClusterBase.version)/\(inbound.listener.version)"
            var types = shared.sidecarShared
            if let previous, previous.origin == origin, let lds = previous.types[TypeURL.listener],
                let cds = previous.types[TypeURL.cluster]
            {
                types[TypeURL.listener] = lds
                types[TypeURL.cluster] = cds
            } else {
                let cds = TypeSnapshot(base: shared.sidecarClusterBase, adding: inbound.clusters)
                let missing = inbound.listener.references.filter { cds.resources[$0.name] == nil }
                guard missing.isEmpty else {
                    throw InconsistentSnapshot(
                        problems: missing.map { "listener virtualInbound names missing cluster \($0.name)" }
                    )
                }
                types[TypeURL.listener] = TypeSnapshot(base: shared.sidecarListenerBase, adding: [inbound.listener])
                types[TypeURL.cluster] = cds
            }
            var snapshot = NodeSnapshot(types: types)
            snapshot.origin = origin
            return snapshot
        case .gateway(let name):
            return shared.gateways[name] ?? shared.emptyGateway
        case .proxyless:
            return shared.proxyless
        }
    }

    /// Drops what was kept for nodes that are gone.
    public static func forget(_ node: String, cache: inout Cache) {
        cache.inbound[node] = nil
    }

    public struct InconsistentSnapshot: Error, CustomStringConvertible {
        public var problems: [String]
        public var description: String { problems.joined(separator: "; ") }
    }

    // MARK: Clusters and endpoints

    static func adsSource() -> Envoy_Config_Core_V3_ConfigSource {
        var source = Envoy_Config_Core_V3_ConfigSource()
        source.ads = Envoy_Config_Core_V3_AggregatedConfigSource()
        source.resourceApiVersion = .v3
        return source
    }

    static func edsCluster(
        _ service: RegistryView.Service,
        proxyless: Bool,
        policy: ServicePolicy? = nil,
        subset: MeshConfig.Subset? = nil
    ) throws -> XDSResource {
        let name = clusterName(service.key, subset: subset?.name)
        var cluster = Envoy_Config_Cluster_V3_Cluster()
        cluster.name = name
        cluster.type = .eds
        cluster.edsClusterConfig.edsConfig = adsSource()
        cluster.lbPolicy = .roundRobin
        if !proxyless {
            cluster.connectTimeout = .init(seconds: 1)
            if service.serviceProtocol.usesHTTP2Upstream {
                var options = Envoy_Extensions_Upstreams_Http_V3_HttpProtocolOptions()
                options.explicitHTTPConfig.http2ProtocolOptions = Envoy_Config_Core_V3_Http2ProtocolOptions()
                cluster.typedExtensionProtocolOptions["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"] =
                    try Google_Protobuf_Any(message: options)
            }
            // mesh.yaml's policy: connect timeout, circuit breakers, outlier detection, health checks.
            // (Merging merges sub-messages field by field: a set connect timeout replaces ours whole.)
            if let policy {
                if policy.cluster.hasConnectTimeout { cluster.clearConnectTimeout() }
                try cluster.merge(serializedBytes: try policy.cluster.serializedBytes() as [UInt8])
            }
        }
        return try XDSResource(name: name, message: cluster, references: [Ref(TypeURL.clusterLoadAssignment, name)])
    }

    static func socketAddress(_ host: String, _ port: Int) -> Envoy_Config_Core_V3_Address {
        var address = Envoy_Config_Core_V3_Address()
        address.socketAddress.address = host
        address.socketAddress.portValue = UInt32(port)
        return address
    }

    /// Endpoints grouped by locality (gRPC ignores endpoints without one, and localities of
    /// weight 0), with health: only `healthy` instances take new traffic. For a `client` locality,
    /// each group has a priority: 0 for the client's zone, then its region, then the rest
    /// (numbered without gaps, as Envoy requires: with nothing in the client's zone, its region's
    /// instances are priority 0).
    static func assignment(
        _ service: RegistryView.Service,
        subset: MeshConfig.Subset? = nil,
        client: Locality? = nil,
        overprovisioning: Int? = nil
    ) throws -> XDSResource {
        let name = clusterName(service.key, subset: subset?.name)
        var groups: [Locality: [Instance]] = [:]
        for instance in service.instances where subset?.contains(instance) ?? true {
            groups[instance.locality, default: []].append(instance)
        }
        func distance(_ locality: Locality) -> Int {
            guard let client else { return 0 }
            if locality.region == client.region && locality.zone == client.zone { return 0 }
            return locality.region == client.region ? 1 : 2
        }
        let present = Set(groups.keys.map(distance)).sorted()
        var assignment = Envoy_Config_Endpoint_V3_ClusterLoadAssignment()
        assignment.clusterName = name
        if let overprovisioning { assignment.policy.overprovisioningFactor = .init(UInt32(overprovisioning)) }
        for locality in groups.keys.sorted(by: { ($0.region, $0.zone, $0.subzone) < ($1.region, $1.zone, $1.subzone) })
        {
            var group = Envoy_Config_Endpoint_V3_LocalityLbEndpoints()
            group.priority = UInt32(present.firstIndex(of: distance(locality)) ?? 0)
            group.locality.region = locality.region
            group.locality.zone = locality.zone
            group.locality.subZone = locality.subzone
            var weight = 0
            for instance in groups[locality]! {
                var endpoint = Envoy_Config_Endpoint_V3_LbEndpoint()
                endpoint.endpoint.address = socketAddress(instance.key.address, instance.key.port)
                endpoint.healthStatus =
                    switch instance.status {
                    case .healthy: .healthy
                    case .unhealthy: .unhealthy
                    case .draining: .draining
                    }
                endpoint.loadBalancingWeight = .init(UInt32(instance.weight))
                weight += instance.weight
                group.lbEndpoints.append(endpoint)
            }
            group.loadBalancingWeight = .init(UInt32(weight))
            assignment.endpoints.append(group)
        }
        return try XDSResource(name: name, message: assignment)
    }

    static func passthroughClusters() throws -> [XDSResource] {
        var outbound = Envoy_Config_Cluster_V3_Cluster()
        outbound.name = passthroughCluster
        outbound.type = .originalDst
        outbound.lbPolicy = .clusterProvided
        outbound.connectTimeout = .init(seconds: 1)
        var inbound = outbound
        inbound.name = inboundPassthroughCluster
        inbound.upstreamBindConfig.sourceAddress = socketAddress(inboundSourceAddress, 0).socketAddress
        return [
            try XDSResource(name: passthroughCluster, message: outbound),
            try XDSResource(name: inboundPassthroughCluster, message: inbound),
        ]
    }

    // MARK: Filters

    static func router() throws -> Envoy_Extensions_Filters_Network_HttpConnectionManager_V3_HttpFilter {
        var filter = Envoy_Extensions_Filters_Network_HttpConnectionManager_V3_HttpFilter()
        filter.name = "envoy.filters.http.router"
        filter.typedConfig = try Google_Protobuf_Any(message: Envoy_Extensions_Filters_Http_Router_V3_Router())
        return filter
    }

    /// The HTTP filters that routes' policies configure (`typed_per_filter_config`), in their
    /// order before the router, when any policy of the mesh uses them; disabled unless a route
    /// says otherwise.
    static func policyFilters(
        _ mesh: MeshConfig
    ) throws -> [Envoy_Extensions_Filters_Network_HttpConnectionManager_V3_HttpFilter] {
        let used = Set(mesh.policies.values.flatMap(\.perFilter.keys))
        var filters: [Envoy_Extensions_Filters_Network_HttpConnectionManager_V3_HttpFilter] = []
        if used.contains(ServicePolicy.rateLimitFilter) {
            var filter = Envoy_Extensions_Filters_Network_HttpConnectionManager_V3_HttpFilter()
            filter.name = ServicePolicy.rateLimitFilter
            var limit = Envoy_Extensions_Filters_Http_LocalRatelimit_V3_LocalRateLimit()
            limit.statPrefix = "trellis_rate_limit"
            filter.typedConfig = try Google_Protobuf_Any(message: limit)
            filters.append(filter)
        }
        if used.contains(ServicePolicy.faultFilter) {
            var filter = Envoy_Extensions_Filters_Network_HttpConnectionManager_V3_HttpFilter()
            filter.name = ServicePolicy.faultFilter
            filter.typedConfig = try Google_Protobuf_Any(message: Envoy_Extensions_Filters_Http_Fault_V3_HTTPFault())
            filters.append(filter)
        }
        return filters
    }

    static func hcm(statPrefix: String, rds: String) throws -> HCM {
        var hcm = HCM()
        hcm.statPrefix = statPrefix
        hcm.rds.configSource = adsSource()
        hcm.rds.routeConfigName = rds
        hcm.httpFilters = [try router()]
        return hcm
    }

    static func networkFilter(
        _ name: String,
        _ message: some SwiftProtobuf.Message
    ) throws -> Envoy_Config_Listener_V3_Filter {
        var filter = Envoy_Config_Listener_V3_Filter()
        filter.name = name
        filter.typedConfig = try Google_Protobuf_Any(message: message)
        return filter
    }

    static func hcmFilter(_ hcm: HCM) throws -> Envoy_Config_Listener_V3_Filter {
        try networkFilter("envoy.filters.network.http_connection_manager", hcm)
    }

    static func tcpProxyFilter(cluster: String, statPrefix: String) throws -> Envoy_Config_Listener_V3_Filter {
        var tcp = Envoy_Extensions_Filters_Network_TcpProxy_V3_TcpProxy()
        tcp.statPrefix = statPrefix
        tcp.cluster = cluster
        return try networkFilter("envoy.filters.network.tcp_proxy", tcp)
    }

    // MARK: Routes

    static func routeMatch(_ rule: RouteRule) -> Envoy_Config_Route_V3_RouteMatch {
        var match = Envoy_Config_Route_V3_RouteMatch()
        switch rule.match.path {
        case .prefix(let p): match.prefix = p
        case .exact(let p): match.path = p
        case .regex(let r): match.safeRegex.regex = r
        }
        // Envoy has no methods field: a `:method` header matcher, exact for one method, an
        // alternation for several (the agent reads either back as methods).
        if !rule.match.methods.isEmpty {
            var m = Envoy_Config_Route_V3_HeaderMatcher()
            m.name = ":method"
            if rule.match.methods.count == 1 {
                m.stringMatch.exact = rule.match.methods[0]
            } else {
                m.stringMatch.safeRegex.regex = rule.match.methods.joined(separator: "|")
            }
            match.headers.append(m)
        }
        for header in rule.match.headers {
            var m = Envoy_Config_Route_V3_HeaderMatcher()
            m.name = header.name
            m.invertMatch = header.invert
            switch header.kind {
            case .exact(let v): m.stringMatch.exact = v
            case .regex(let r): m.stringMatch.safeRegex.regex = r
            case .present: m.presentMatch = true
            }
            match.headers.append(m)
        }
        return match
    }

    static func route(
        _ rule: RouteRule,
        name: String,
        policies: [ServiceKey: ServicePolicy] = [:]
    ) -> (Envoy_Config_Route_V3_Route, [Ref]) {
        var route = Envoy_Config_Route_V3_Route()
        route.name = name
        route.match = routeMatch(rule)
        if rule.destinations.count == 1 {
            route.route.cluster = clusterName(rule.destinations[0].service, subset: rule.destinations[0].subset)
        } else {
            var weighted = Envoy_Config_Route_V3_WeightedCluster()
            for destination in rule.destinations {
                var w = Envoy_Config_Route_V3_WeightedCluster.ClusterWeight()
                w.name = clusterName(destination.service, subset: destination.subset)
                w.weight = .init(UInt32(destination.weight))
                weighted.clusters.append(w)
            }
            route.route.weightedClusters = weighted
        }
        // The destination's policy (when every destination has the same one): timeout, retries,
        // rate limit, faults. The rule's own timeout wins.
        let applied = Set(rule.destinations.map { policies[$0.service] })
        if applied.count == 1, let policy = applied.first!, !policy.isEmptyForRoutes {
            if policy.route.hasTimeout { route.route.timeout = policy.route.timeout }
            if policy.route.hasRetryPolicy { route.route.retryPolicy = policy.route.retryPolicy }
            route.route.hashPolicy = policy.route.hashPolicy
            route.typedPerFilterConfig = policy.perFilter
            route.metadata.filterMetadata.merge(PolicyEncoding.routeMetadata(policy)) { $1 }
        }
        if let timeout = rule.timeout { route.route.timeout = protobufDuration(timeout) }
        return (route, rule.destinations.map { Ref(TypeURL.cluster, clusterName($0.service, subset: $0.subset)) })
    }

    static func protobufDuration(_ d: Duration) -> Google_Protobuf_Duration {
        let (seconds, attoseconds) = d.components
        return .init(seconds: seconds, nanos: Int32(attoseconds / 1_000_000_000))
    }

    static func defaultRoute(
        to service: ServiceKey,
        policies: [ServiceKey: ServicePolicy] = [:]
    ) -> (Envoy_Config_Route_V3_Route, [Ref]) {
        route(RouteRule(destinations: [.init(service: service, weight: 1)]), name: "default", policies: policies)
    }

    // MARK: Sidecar outbound

    /// The virtual outbound listener (15001, `use_original_dst`, passthrough by default), one
    /// listener per service port (`bind_to_port: false`): HTTP ports route by Host through RDS
    /// (unknown hosts pass through to the original destination); TCP ports match the
    /// destination address against the service's instances.
    static func sidecarOutbound(_ view: RegistryView, into shared: inout Shared) throws {
        var byPort: [Int: [RegistryView.Service]] = [:]
        for service in view.services { byPort[service.key.port, default: []].append(service) }
        var listeners: [XDSResource] = []
        for port in byPort.keys.sorted() {
            let services = byPort[port]!
            let listenerName = "0.0.0.0_\(port)"
            var listener = Envoy_Config_Listener_V3_Listener()
            listener.name = listenerName
            listener.address = socketAddress("0.0.0.0", port)
            listener.bindToPort = .init(false)
            var refs: [Ref] = [Ref(TypeURL.cluster, passthroughCluster)]
            let http = services.filter { $0.serviceProtocol.isHTTP }
            let tcp = services.filter { !$0.serviceProtocol.isHTTP }
            for service in tcp {
                let addresses = service.instances.map(\.key.address)
                guard !addresses.isEmpty else { continue }
                var chain = Envoy_Config_Listener_V3_FilterChain()
                chain.name = clusterName(service.key)
                for address in Set(addresses).sorted() {
                    var range = Envoy_Config_Core_V3_CidrRange()
                    range.addressPrefix = address
                    range.prefixLen = .init(address.contains(":") ? 128 : 32)
                    chain.filterChainMatch.prefixRanges.append(range)
                }
                chain.filters = [
                    try tcpProxyFilter(cluster: clusterName(service.key), statPrefix: clusterName(service.key))
                ]
                listener.filterChains.append(chain)
                refs.append(Ref(TypeURL.cluster, clusterName(service.key)))
            }
            var fallback = Envoy_Config_Listener_V3_FilterChain()
            fallback.name = "passthrough"
            if !http.isEmpty {
                let routeName = "\(port)"
                fallback.name = "http"
                var outbound = try hcm(statPrefix: "outbound_\(listenerName)", rds: routeName)
                outbound.httpFilters = try policyFilters(view.mesh) + outbound.httpFilters
                fallback.filters = [try hcmFilter(outbound)]
                refs.append(Ref(TypeURL.routeConfiguration, routeName))
                shared.sidecarRoutes.append(try sidecarRoutes(port: port, http, view: view, warnings: &shared.warnings))
            } else {
                fallback.filters = [try tcpProxyFilter(cluster: passthroughCluster, statPrefix: passthroughCluster)]
            }
            listener.defaultFilterChain = fallback
            listeners.append(try XDSResource(name: listenerName, message: listener, references: refs))
        }
        var virtual = Envoy_Config_Listener_V3_Listener()
        virtual.name = "virtualOutbound"
        virtual.address = socketAddress("0.0.0.0", outboundPort)
        virtual.useOriginalDst = .init(true)
        var passthrough = Envoy_Config_Listener_V3_FilterChain()
        passthrough.name = "passthrough"
        passthrough.filters = [try tcpProxyFilter(cluster: passthroughCluster, statPrefix: passthroughCluster)]
        virtual.defaultFilterChain = passthrough
        listeners.append(
            try XDSResource(
                name: "virtualOutbound",
                message: virtual,
                references: [Ref(TypeURL.cluster, passthroughCluster)]
            )
        )
        shared.sidecarListeners = listeners
    }

    static func sidecarRoutes(
        port: Int,
        _ services: [RegistryView.Service],
        view: RegistryView,
        warnings: inout [String]
    ) throws -> XDSResource {
        var config = Envoy_Config_Route_V3_RouteConfiguration()
        config.name = "\(port)"
        var refs: [Ref] = []
        var taken: Set<String> = []
        for service in services {
            var vhost = Envoy_Config_Route_V3_VirtualHost()
            vhost.name = "\(service.key)"
            let names = [service.key.name] + service.hosts
            for domain in names.flatMap({ [$0, "\($0):\(port)"] }) {
                if taken.insert(domain.lowercased()).inserted {
                    vhost.domains.append(domain)
                } else {
                    warnings.append(
                        "host '\(domain)' of \(service.key) is already a host of another service on port \(port); ignored"
                    )
                }
            }
            guard !vhost.domains.isEmpty else { continue }
            if let rules = view.mesh.serviceRoutes[service.key] {
                for (i, rule) in rules.enumerated() {
                    let (route, r) = route(rule, name: "rule-\(i)", policies: view.mesh.policies)
                    vhost.routes.append(route)
                    refs += r
                }
            }
            let (fallback, r) = defaultRoute(to: service.key, policies: view.mesh.policies)
            vhost.routes.append(fallback)
            refs += r
            config.virtualHosts.append(vhost)
        }
        var any = Envoy_Config_Route_V3_VirtualHost()
        any.name = "allow_any"
        any.domains = ["*"]
        var passthrough = Envoy_Config_Route_V3_Route()
        passthrough.name = "passthrough"
        passthrough.match.prefix = "/"
        passthrough.route.cluster = passthroughCluster
        any.routes = [passthrough]
        config.virtualHosts.append(any)
        refs.append(Ref(TypeURL.cluster, passthroughCluster))
        return try XDSResource(name: config.name, message: config, references: refs)
    }

    // MARK: Sidecar inbound

    /// The inbound listener (15006): the original destination is restored by the `original_dst`
    /// listener filter, a filter chain per local instance port sends to 127.0.0.1:port from
    /// 127.0.0.6, anything else passes through to its original destination.
    static func inbound(_ own: [Instance]) throws -> (XDSResource, [XDSResource]) {
        var listener = Envoy_Config_Listener_V3_Listener()
        listener.name = "virtualInbound"
        listener.address = socketAddress("0.0.0.0", inboundPort)
        var originalDst = Envoy_Config_Listener_V3_ListenerFilter()
        originalDst.name = "envoy.filters.listener.original_dst"
        originalDst.typedConfig = try Google_Protobuf_Any(
            message: Envoy_Extensions_Filters_Listener_OriginalDst_V3_OriginalDst()
        )
        listener.listenerFilters = [originalDst]
        var clusters: [XDSResource] = []
        var refs: [Ref] = [Ref(TypeURL.cluster, inboundPassthroughCluster)]
        var ports: Set<Int> = []
        for instance in own.sorted(by: { $0.key < $1.key }) where ports.insert(instance.key.port).inserted {
            let port = instance.key.port
            let name = inboundClusterName(port: port)
            var cluster = Envoy_Config_Cluster_V3_Cluster()
            cluster.name = name
            cluster.type = .static
            cluster.connectTimeout = .init(seconds: 1)
            cluster.upstreamBindConfig.sourceAddress = socketAddress(inboundSourceAddress, 0).socketAddress
            var endpoint = Envoy_Config_Endpoint_V3_LbEndpoint()
            endpoint.endpoint.address = socketAddress("127.0.0.1", port)
            var group = Envoy_Config_Endpoint_V3_LocalityLbEndpoints()
            group.lbEndpoints = [endpoint]
            cluster.loadAssignment.clusterName = name
            cluster.loadAssignment.endpoints = [group]
            if instance.serviceProtocol.usesHTTP2Upstream {
                var options = Envoy_Extensions_Upstreams_Http_V3_HttpProtocolOptions()
                options.explicitHTTPConfig.http2ProtocolOptions = Envoy_Config_Core_V3_Http2ProtocolOptions()
                cluster.typedExtensionProtocolOptions["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"] =
                    try Google_Protobuf_Any(message: options)
            }
            clusters.append(try XDSResource(name: name, message: cluster))
            refs.append(Ref(TypeURL.cluster, name))

            var chain = Envoy_Config_Listener_V3_FilterChain()
            chain.name = name
            chain.filterChainMatch.destinationPort = .init(UInt32(port))
            if instance.serviceProtocol.isHTTP {
                var hcm = HCM()
                hcm.statPrefix = name
                hcm.httpFilters = [try router()]
                var vhost = Envoy_Config_Route_V3_VirtualHost()
                vhost.name = name
                vhost.domains = ["*"]
                var route = Envoy_Config_Route_V3_Route()
                route.match.prefix = "/"
                route.route.cluster = name
                vhost.routes = [route]
                hcm.routeConfig.name = name
                hcm.routeConfig.virtualHosts = [vhost]
                chain.filters = [try hcmFilter(hcm)]
            } else {
                chain.filters = [try tcpProxyFilter(cluster: name, statPrefix: name)]
            }
            listener.filterChains.append(chain)
        }
        var passthrough = Envoy_Config_Listener_V3_FilterChain()
        passthrough.name = "inbound-passthrough"
        passthrough.filters = [
            try tcpProxyFilter(cluster: inboundPassthroughCluster, statPrefix: inboundPassthroughCluster)
        ]
        listener.defaultFilterChain = passthrough
        return (try XDSResource(name: listener.name, message: listener, references: refs), clusters)
    }

    // MARK: Proxyless gRPC

    /// `name:port` API listener (HTTP connection manager with RDS and the router) and its route
    /// configuration.
    static func proxylessListener(
        _ service: RegistryView.Service,
        view: RegistryView
    ) throws -> (XDSResource, XDSResource) {
        let name = "\(service.key)"
        var listener = Envoy_Config_Listener_V3_Listener()
        listener.name = name
        listener.apiListener.apiListener = try Google_Protobuf_Any(message: try hcm(statPrefix: name, rds: name))
        var config = Envoy_Config_Route_V3_RouteConfiguration()
        config.name = name
        var vhost = Envoy_Config_Route_V3_VirtualHost()
        vhost.name = name
        vhost.domains = [name, service.key.name]
        var refs: [Ref] = []
        for (i, rule) in (view.mesh.serviceRoutes[service.key] ?? []).enumerated() {
            let (route, r) = route(rule, name: "rule-\(i)")
            vhost.routes.append(route)
            refs += r
        }
        var (fallback, r) = defaultRoute(to: service.key)
        fallback.match.prefix = ""
        vhost.routes.append(fallback)
        refs += r
        config.virtualHosts = [vhost]
        return (
            try XDSResource(name: name, message: listener, references: [Ref(TypeURL.routeConfiguration, name)]),
            try XDSResource(name: name, message: config, references: refs)
        )
    }

    // MARK: Gateways

    /// A bound listener per gateway port with its route configuration: a virtual host per Host
    /// name; a rule applies to every host it matches (exactly, by `*.suffix`, or all hosts), in
    /// file order.
    /// A gateway's listeners and route tables; routes to a service carry its `policies:` entry
    /// (timeout, retries, rate limit, faults), as the sidecars' routes do.
    static func gatewayResources(
        _ gateway: MeshConfig.Gateway,
        policies mesh: MeshConfig = .empty
    ) throws -> (listeners: [XDSResource], routes: [XDSResource]) {
        var listeners: [XDSResource] = []
        var routes: [XDSResource] = []
        for l in gateway.listeners {
            let routeName = gatewayRouteName(gateway.name, port: l.port)
            var listener = Envoy_Config_Listener_V3_Listener()
            listener.name = "gateway_\(gateway.name)_\(l.port)"
            listener.address = socketAddress("0.0.0.0", l.port)
            var chain = Envoy_Config_Listener_V3_FilterChain()
            var manager = try hcm(statPrefix: listener.name, rds: routeName)
            manager.httpFilters = try policyFilters(mesh) + manager.httpFilters
            chain.filters = [try hcmFilter(manager)]
            listener.filterChains = [chain]
            listeners.append(
                try XDSResource(
                    name: listener.name,
                    message: listener,
                    references: [Ref(TypeURL.routeConfiguration, routeName)]
                )
            )

            var domains: [String] = []
            for host in l.routes.flatMap(\.hosts) where !domains.contains(host.lowercased()) {
                domains.append(host.lowercased())
            }
            if !domains.contains("*") { domains.append("*") }
            var config = Envoy_Config_Route_V3_RouteConfiguration()
            config.name = routeName
            var refs: [Ref] = []
            for domain in domains {
                var vhost = Envoy_Config_Route_V3_VirtualHost()
                vhost.name = domain
                vhost.domains = [domain]
                for (i, rule) in l.routes.enumerated() where applies(rule, to: domain) {
                    let (route, r) = route(rule, name: "route-\(i)", policies: mesh.policies)
                    vhost.routes.append(route)
                    refs += r
                }
                config.virtualHosts.append(vhost)
            }
            routes.append(try XDSResource(name: routeName, message: config, references: refs))
        }
        return (listeners, routes)
    }

    /// Whether a rule's hosts cover every request a virtual host for `domain` receives.
    static func applies(_ rule: RouteRule, to domain: String) -> Bool {
        if rule.hosts.isEmpty { return true }
        return rule.hosts.contains { host in
            let host = host.lowercased()
            if host == "*" || host == domain { return true }
            if host.hasPrefix("*.") {
                let suffix = host.dropFirst(1)
                return domain.hasSuffix(suffix) && domain != "*"
            }
            return false
        }
    }
}
