import FoundationEssentials
public import Proxy
import SwiftProtobuf
public import XDS

/// The resources a node holds, by name, as pilot sent them (decoded).
public struct XDSResources: Sendable, Equatable {
    public var listeners: [String: Envoy_Config_Listener_V3_Listener] = [:]
    public var routes: [String: Envoy_Config_Route_V3_RouteConfiguration] = [:]
    public var clusters: [String: Envoy_Config_Cluster_V3_Cluster] = [:]
    public var endpoints: [String: Envoy_Config_Endpoint_V3_ClusterLoadAssignment] = [:]

    public init() {}

    /// Route configurations the listeners refer to (RDS names to subscribe).
    public var routeNames: Set<String> {
        var names: Set<String> = []
        for listener in listeners.values {
            for chain in listener.filterChains + (listener.hasDefaultFilterChain ? [listener.defaultFilterChain] : []) {
                for filter in chain.filters {
                    if let hcm = try? XDSTranslator.HCM(unpackingAny: filter.typedConfig),
                        case .rds(let rds)? =
                            hcm.routeSpecifier
                    {
                        names.insert(rds.routeConfigName)
                    }
                }
            }
        }
        return names
    }

    /// Clusters whose endpoints come from EDS (names to subscribe).
    public var edsClusterNames: Set<String> {
        Set(
            clusters.values.filter { $0.type == .eds }.map {
                $0.edsClusterConfig.serviceName.isEmpty ? $0.name : $0.edsClusterConfig.serviceName
            }
        )
    }

    /// Every route configuration and EDS assignment referred to is here.
    public var isComplete: Bool {
        routeNames.isSubset(of: routes.keys) && edsClusterNames.isSubset(of: endpoints.keys)
    }
}

/// xDS resources (the sidecar role, as pilot serves it: docs/architecture.md) → a ``ProxyConfig``
/// for the agent's two capture listeners. A pure function: the same resources always give the same
/// configuration, and anything the data path cannot honour is an error naming the resource,
/// never a silent default.
///
/// - `virtualOutbound` (`use_original_dst`) and the per-port listeners (`bind_to_port: false`):
///   each port whose default chain is the HTTP connection manager gets its RDS route configuration
///   as the outbound listener's virtual hosts for that original port; everything else passes
///   through to the original destination (TCP service chains match instance addresses, so the
///   original destination is one of the service's instances).
/// - The inbound listener stays the agent's own (forwarding to the local program per agent.yaml).
/// - EDS clusters with their endpoints (health, weight), `ORIGINAL_DST` clusters as passthrough.
public enum XDSTranslator {
    typealias HCM = Envoy_Extensions_Filters_Network_HttpConnectionManager_V3_HttpConnectionManager

    public struct Failure: Error, CustomStringConvertible, Equatable {
        public var description: String
        init(_ description: String) { self.description = description }
    }

    /// - Parameter base: the agent's own listeners (``AgentListeners/passthroughConfig``); the
    ///   resources add clusters and the outbound listener's per-port routes.
    public static func proxyConfig(
        _ resources: XDSResources,
        version: String,
        base: ProxyConfig = AgentListeners.passthroughConfig()
    ) throws(Failure) -> ProxyConfig {
        var config = base
        config.version = version
        var clusters: [ClusterConfig] = base.clusters.filter { resources.clusters[$0.name] == nil }
        var names = Set(clusters.map(\.name))
        for name in resources.clusters.keys.sorted() {
            let cluster = try self.cluster(resources.clusters[name]!, endpoints: resources.endpoints)
            names.insert(cluster.name)
            clusters.append(cluster)
        }
        config.clusters = clusters

        var ports: [Int: [VirtualHost]] = [:]
        for name in resources.listeners.keys.sorted() {
            let listener = resources.listeners[name]!
            let port = Int(listener.address.socketAddress.portValue)
            if listener.useOriginalDst.value || name == "virtualInbound" { continue }
            guard listener.hasBindToPort, !listener.bindToPort.value else {
                throw Failure("listener '\(name)': only per-port listeners (bind_to_port: false) are supported")
            }
            guard listener.hasDefaultFilterChain else { continue }
            for filter in listener.defaultFilterChain.filters {
                guard let hcm = try? HCM(unpackingAny: filter.typedConfig) else { continue }
                let table: Envoy_Config_Route_V3_RouteConfiguration
                switch hcm.routeSpecifier {
                case .rds(let rds)?:
                    guard let found = resources.routes[rds.routeConfigName] else {
                        throw Failure(
                            "listener '\(name)': route configuration '\(rds.routeConfigName)' was not received"
                        )
                    }
                    table = found
                case .routeConfig(let inline)?:
                    table = inline
                default:
                    throw Failure(
                        "listener '\(name)': the HTTP connection manager has neither RDS nor an inline route configuration"
                    )
                }
                ports[port] = try virtualHosts(table, clusters: names)
            }
        }
        if let outbound = config.listeners.firstIndex(where: { $0.name == "outbound" }) {
            config.listeners[outbound].portVirtualHosts = ports
        }
        // A route may name a cluster that is not (or no longer) there: pilot removes a service's
        // cluster and its routes in separate responses. As in Envoy, such a route answers 503
        // (`no_healthy_upstream`) until the routes catch up; it is not a reason to refuse.
        let named = Set(ports.values.flatMap { $0 }.flatMap(\.routes).flatMap(\.action.clusters).map(\.name))
        for missing in named.subtracting(names).sorted() {
            config.clusters.append(ClusterConfig(name: missing, endpoints: []))
        }
        let problems = config.validationErrors()
        guard problems.isEmpty else {
            throw Failure(problems.map { "\($0.path): \($0.message)" }.joined(separator: "; "))
        }
        return config
    }

    // MARK: Clusters

    static func cluster(
        _ cluster: Envoy_Config_Cluster_V3_Cluster,
        endpoints: [String: Envoy_Config_Endpoint_V3_ClusterLoadAssignment]
    ) throws(Failure) -> ClusterConfig {
        let name = cluster.name
        var result = ClusterConfig(name: name, endpoints: [])
        if cluster.hasConnectTimeout {
            let timeout =
                Duration.seconds(cluster.connectTimeout.seconds)
                + .nanoseconds(Int64(cluster.connectTimeout.nanos))
            guard timeout > .zero else { throw Failure("cluster '\(name)': connect_timeout must be positive") }
            result.connectTimeout = timeout
        }
        switch cluster.lbPolicy {
        case .roundRobin: result.loadBalancing = .roundRobin
        case .leastRequest: result.loadBalancing = .leastRequest
        case .random: result.loadBalancing = .random
        case .clusterProvided where cluster.type == .originalDst: break
        default: throw Failure("cluster '\(name)': lb_policy \(cluster.lbPolicy) is not supported")
        }
        switch cluster.type {
        case .originalDst:
            result.originalDestination = true
        case .eds:
            let service = cluster.edsClusterConfig.serviceName.isEmpty ? name : cluster.edsClusterConfig.serviceName
            if let assignment = endpoints[service] { result.endpoints = try self.endpoints(assignment, cluster: name) }
        case .static:
            result.endpoints = try self.endpoints(cluster.loadAssignment, cluster: name)
        default:
            throw Failure(
                "cluster '\(name)': discovery type \(cluster.type) is not supported (EDS, STATIC, ORIGINAL_DST are)"
            )
        }
        return result
    }

    static func endpoints(
        _ assignment: Envoy_Config_Endpoint_V3_ClusterLoadAssignment,
        cluster: String
    ) throws(Failure) -> [Endpoint] {
        var result: [Endpoint] = []
        for group in assignment.endpoints {
            for lb in group.lbEndpoints {
                let socket = lb.endpoint.address.socketAddress
                guard !socket.address.isEmpty, (1...65535).contains(Int(socket.portValue)) else {
                    throw Failure("cluster '\(cluster)': an endpoint has no address or port")
                }
                let weight = lb.hasLoadBalancingWeight ? Int(lb.loadBalancingWeight.value) : 1
                guard (1...1_000_000).contains(weight) else {
                    throw Failure(
                        "cluster '\(cluster)': endpoint \(socket.address):\(socket.portValue) weight \(weight) is outside 1...1000000"
                    )
                }
                let health: Endpoint.Health =
                    switch lb.healthStatus {
                    case .healthy, .unknown: .healthy
                    case .draining: .draining
                    default: .unhealthy
                    }
                result.append(
                    Endpoint(
                        address: SocketEndpoint(host: socket.address, port: Int(socket.portValue)),
                        weight: weight,
                        health: health
                    )
                )
            }
        }
        return result
    }

    // MARK: Routes

    static func virtualHosts(
        _ table: Envoy_Config_Route_V3_RouteConfiguration,
        clusters: Set<String>
    ) throws(Failure) -> [VirtualHost] {
        var hosts: [VirtualHost] = []
        for vhost in table.virtualHosts {
            let where_ = "route configuration '\(table.name)', virtual host '\(vhost.name)'"
            var routes: [Route] = []
            for (i, route) in vhost.routes.enumerated() {
                let name = route.name.isEmpty ? "route-\(i)" : route.name
                routes.append(try self.route(route, name: name, in: "\(where_), route '\(name)'", clusters: clusters))
            }
            hosts.append(VirtualHost(name: vhost.name, domains: vhost.domains, routes: routes))
        }
        return hosts
    }

    static func route(
        _ route: Envoy_Config_Route_V3_Route,
        name: String,
        in where_: String,
        clusters: Set<String>
    ) throws(Failure) -> Route {
        var match = RouteMatch()
        switch route.match.pathSpecifier {
        case .prefix(let p)?: match.path = .prefix(p.isEmpty ? "/" : p)
        case .path(let p)?: match.path = .exact(p)
        case .safeRegex(let r)?: match.path = .regex(r.regex)
        default: throw Failure("\(where_): only prefix, path and safe_regex path matches are supported")
        }
        if route.match.hasCaseSensitive && !route.match.caseSensitive.value {
            throw Failure("\(where_): case-insensitive path matching is not supported")
        }
        if !route.match.queryParameters.isEmpty {
            throw Failure("\(where_): query parameter matching is not supported")
        }
        for header in route.match.headers {
            let kind: HeaderMatch.Kind
            switch header.headerMatchSpecifier {
            case .exactMatch(let v)?: kind = .exact(v)
            case .safeRegexMatch(let r)?: kind = .regex(r.regex)
            case .presentMatch(true)?: kind = .present
            case .stringMatch(let m)? where !m.ignoreCase:
                switch m.matchPattern {
                case .exact(let v)?: kind = .exact(v)
                case .safeRegex(let r)?: kind = .regex(r.regex)
                default:
                    throw Failure(
                        "\(where_): header '\(header.name)': only exact and safe_regex string matches are supported"
                    )
                }
            default:
                throw Failure(
                    "\(where_): header '\(header.name)': only exact, safe_regex and present matches are supported"
                )
            }
            match.headers.append(HeaderMatch(name: header.name, kind: kind, invert: header.invertMatch))
        }
        guard case .route(let action)? = route.action else {
            throw Failure("\(where_): only route actions are supported (not redirect or direct_response)")
        }
        var targets: [WeightedCluster] = []
        switch action.clusterSpecifier {
        case .cluster(let c)?: targets = [WeightedCluster(name: c)]
        case .weightedClusters(let w)?:
            for c in w.clusters { targets.append(WeightedCluster(name: c.name, weight: Int(c.weight.value))) }
        default: throw Failure("\(where_): only cluster and weighted_clusters are supported")
        }
        var timeout: Duration? = .seconds(15)
        if action.hasTimeout {
            let d = Duration.seconds(action.timeout.seconds) + .nanoseconds(Int64(action.timeout.nanos))
            timeout = d == .zero ? nil : d  // Envoy: 0 disables the timeout
        }
        return Route(name: name, match: match, action: RouteAction(clusters: targets, timeout: timeout))
    }
}
