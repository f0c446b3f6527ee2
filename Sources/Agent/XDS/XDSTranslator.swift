import FoundationEssentials
public import Proxy
import SwiftProtobuf
import TrellisPolicy
public import XDS

/// The resources a node holds, by name, as pilot sent them (decoded).
public struct XDSResources: Sendable, Equatable {
    public var listeners: [String: Envoy_Config_Listener_V3_Listener] = [:]
    public var routes: [String: Envoy_Config_Route_V3_RouteConfiguration] = [:]
    public var clusters: [String: Envoy_Config_Cluster_V3_Cluster] = [:]
    public var endpoints: [String: Envoy_Config_Endpoint_V3_ClusterLoadAssignment] = [:]
    /// A version of each resource as received (`<type>/<name>`): pilot's per-resource version,
    /// else a digest of the bytes received. What makes the agent's configuration version without
    /// encoding every resource again.
    public var received: [String: String] = [:]

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
        let hashKeys = try hashKeys(resources.routes.values)
        for name in resources.clusters.keys.sorted() {
            let cluster = try self.cluster(
                resources.clusters[name]!,
                endpoints: resources.endpoints,
                hashKey: hashKeys[name]
            )
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
        // Envoy keeps the retry budget on the cluster (circuit breaker thresholds); the agent's
        // retry policies carry it: each route retrying to a cluster takes that cluster's budget.
        var budgets: [String: (percent: Double, minConcurrency: Int)] = [:]
        for (name, cluster) in resources.clusters where cluster.hasCircuitBreakers {
            if let budget = try circuitBreakers(cluster.circuitBreakers, cluster: name).1 {
                budgets[name] = (
                    budget.hasBudgetPercent ? budget.budgetPercent.value : 20,
                    budget.hasMinRetryConcurrency ? Int(budget.minRetryConcurrency.value) : 3
                )
            }
        }
        if !budgets.isEmpty {
            for port in ports.keys {
                for h in ports[port]!.indices {
                    for r in ports[port]![h].routes.indices {
                        let action = ports[port]![h].routes[r].action
                        guard action.retryPolicy != nil,
                            let budget = action.clusters.first.flatMap({ budgets[$0.name] })
                        else { continue }
                        ports[port]![h].routes[r].action.retryPolicy!.budgetPercent = budget.percent
                        ports[port]![h].routes[r].action.retryPolicy!.minRetryConcurrency = budget.minConcurrency
                    }
                }
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

    /// What the routes to each cluster hash for a ring hash (Envoy keeps the hash policy on the
    /// route, the agent on the cluster): the first hash policy of a route whose single cluster
    /// it is. Pilot gives every route to a service the same one.
    static func hashKeys(
        _ tables: some Sequence<Envoy_Config_Route_V3_RouteConfiguration>
    ) throws(Failure) -> [String: LoadBalancingPolicy.HashKey] {
        var keys: [String: LoadBalancingPolicy.HashKey] = [:]
        for table in tables {
            for host in table.virtualHosts {
                for route in host.routes {
                    guard case .route(let action)? = route.action,
                        case .cluster(let cluster)? = action.clusterSpecifier,
                        keys[cluster] == nil, let policy = action.hashPolicy.first
                    else { continue }
                    switch policy.policySpecifier {
                    case .header(let h)?: keys[cluster] = .header(h.headerName.lowercased())
                    case .cookie(let c)?: keys[cluster] = .cookie(c.name)
                    case .connectionProperties(let p)? where p.sourceIp: keys[cluster] = .sourceAddress
                    default:
                        throw Failure(
                            "route '\(route.name)': only header, cookie and source-IP hash policies are supported"
                        )
                    }
                }
            }
        }
        return keys
    }

    static func cluster(
        _ cluster: Envoy_Config_Cluster_V3_Cluster,
        endpoints: [String: Envoy_Config_Endpoint_V3_ClusterLoadAssignment],
        hashKey: LoadBalancingPolicy.HashKey? = nil
    ) throws(Failure) -> ClusterConfig {
        let name = cluster.name
        var result = ClusterConfig(name: name, endpoints: [])
        if cluster.hasConnectTimeout {
            let timeout = duration(cluster.connectTimeout)
            guard timeout > .zero else { throw Failure("cluster '\(name)': connect_timeout must be positive") }
            result.connectTimeout = timeout
        }
        if cluster.hasCircuitBreakers {
            result.circuitBreakers = try circuitBreakers(cluster.circuitBreakers, cluster: name).0
        }
        if cluster.hasOutlierDetection {
            result.outlierDetection = try outlierDetection(cluster.outlierDetection, cluster: name)
        }
        result.healthCheck = try healthCheck(cluster.healthChecks, cluster: name)
        switch cluster.lbPolicy {
        case .roundRobin: result.loadBalancing = .roundRobin
        case .leastRequest: result.loadBalancing = .leastRequest
        case .random: result.loadBalancing = .random
        case .ringHash:
            let size =
                cluster.ringHashLbConfig.hasMinimumRingSize
                ? Int(clamping: cluster.ringHashLbConfig.minimumRingSize.value) : LoadBalancingPolicy.defaultRingSize
            guard LoadBalancingPolicy.ringSizes.contains(size) else {
                throw Failure("cluster '\(name)': minimum_ring_size \(size) is outside 1...8388608")
            }
            // Without a hash policy on its routes Envoy hashes a random value per request.
            result.loadBalancing = hashKey.map { .ringHash($0, minimumRingSize: size) } ?? .random
        case .clusterProvided where cluster.type == .originalDst: break
        default: throw Failure("cluster '\(name)': lb_policy \(cluster.lbPolicy) is not supported")
        }
        result.upstreamProtocol = try upstreamProtocol(cluster)
        switch cluster.type {
        case .originalDst:
            result.originalDestination = true
        case .eds:
            let service = cluster.edsClusterConfig.serviceName.isEmpty ? name : cluster.edsClusterConfig.serviceName
            if let assignment = endpoints[service] {
                result.endpoints = try self.endpoints(assignment, cluster: name)
                if assignment.policy.hasOverprovisioningFactor {
                    let factor = Int(assignment.policy.overprovisioningFactor.value)
                    guard PolicyBounds.overprovisioning.contains(factor) else {
                        throw Failure("cluster '\(name)': overprovisioning_factor \(factor) is outside 100...1000")
                    }
                    result.overprovisioningFactor = factor
                }
            }
        case .static:
            result.endpoints = try self.endpoints(cluster.loadAssignment, cluster: name)
        default:
            throw Failure(
                "cluster '\(name)': discovery type \(cluster.type) is not supported (EDS, STATIC, ORIGINAL_DST are)"
            )
        }
        // Envoy's round robin follows the endpoints' weights (instance weights from pilot).
        if result.loadBalancing == .roundRobin, Set(result.endpoints.map(\.weight)).count > 1 {
            result.loadBalancing = .weighted
        }
        return result
    }

    /// The cluster's HTTP protocol options (`typed_extension_protocol_options`, Envoy's key
    /// `envoy.extensions.upstreams.http.v3.HttpProtocolOptions`): explicit HTTP/2, or the
    /// downstream's protocol; HTTP/1.1 otherwise (and for `auto_config`, which picks by ALPN, so
    /// HTTP/1.1 without TLS). A passthrough cluster without options follows the downstream.
    static func upstreamProtocol(_ cluster: Envoy_Config_Cluster_V3_Cluster) throws(Failure) -> UpstreamProtocol {
        let key = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        guard let any = cluster.typedExtensionProtocolOptions[key] else {
            return cluster.type == .originalDst ? .downstream : .http1
        }
        let options: Envoy_Extensions_Upstreams_Http_V3_HttpProtocolOptions
        do {
            options = try Envoy_Extensions_Upstreams_Http_V3_HttpProtocolOptions(unpackingAny: any)
        } catch {
            throw Failure("cluster '\(cluster.name)': \(key) does not decode: \(error)")
        }
        switch options.upstreamProtocolOptions {
        case .explicitHTTPConfig(let explicit):
            if case .http2ProtocolOptions = explicit.protocolConfig { return .http2 }
            return .http1
        case .useDownstreamProtocolConfig: return .downstream
        case .autoConfig, nil: return .http1
        }
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
                guard EndpointWeights.range.contains(weight) else {
                    throw Failure(
                        "cluster '\(cluster)': endpoint \(socket.address):\(socket.portValue) weight \(weight) is outside 1...128"
                    )
                }
                guard group.priority <= Endpoint.maxPriority else {
                    throw Failure("cluster '\(cluster)': priority \(group.priority) is above \(Endpoint.maxPriority)")
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
                        health: health,
                        priority: Int(group.priority)
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
            if header.name == ":method" {
                // Methods (Envoy has no field for them): exactly one, or an alternation of tokens.
                let methods: [String]
                switch kind {
                case .exact(let v): methods = [v]
                case .regex(let r): methods = r.split(separator: "|", omittingEmptySubsequences: false).map(String.init)
                case .present: methods = []
                }
                guard match.methods.isEmpty, !header.invertMatch, !methods.isEmpty,
                    methods.allSatisfy(HTTPToken.isToken)
                else {
                    throw Failure(
                        "\(where_): one ':method' match is supported: one method or an alternation of methods (GET|POST), not inverted"
                    )
                }
                match.methods += methods
                continue
            }
            match.headers.append(HeaderMatch(name: header.name.lowercased(), kind: kind, invert: header.invertMatch))
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
            let d = duration(action.timeout)
            timeout = d == .zero ? nil : d  // Envoy: 0 disables the timeout
        }
        var result = RouteAction(clusters: targets, timeout: timeout)
        if action.hasRetryPolicy {
            result.retryPolicy = try retryPolicy(action.retryPolicy, route: route, in: where_)
        }
        for (filter, config) in route.typedPerFilterConfig.sorted(by: { $0.key < $1.key }) {
            switch filter {
            case "envoy.filters.http.local_ratelimit": result.rateLimit = try rateLimit(config, in: where_)
            case "envoy.filters.http.fault": result.fault = try fault(config, in: where_)
            default: throw Failure("\(where_): per-route settings of filter '\(filter)' are not supported")
            }
        }
        return Route(name: name, match: match, action: result)
    }

    // MARK: Policies

    static func duration(_ d: Google_Protobuf_Duration) -> Duration {
        .seconds(d.seconds) + .nanoseconds(Int64(d.nanos))
    }

    static func retryPolicy(
        _ policy: Envoy_Config_Route_V3_RetryPolicy,
        route: Envoy_Config_Route_V3_Route,
        in where_: String
    ) throws(Failure) -> RetryPolicy {
        var result = RetryPolicy(retryOn: [])
        for token in policy.retryOn.split(separator: ",").map({ String($0.filter { $0 != " " }) }) {
            guard let condition = RetryPolicy.Condition(rawValue: token) else {
                let known = RetryPolicy.Condition.allCases.map(\.rawValue).joined(separator: ", ")
                throw Failure("\(where_): retry_on '\(token)' is not supported (\(known) are)")
            }
            result.retryOn.insert(condition)
        }
        guard !result.retryOn.isEmpty else { throw Failure("\(where_): retry_policy has no retry_on condition") }
        result.numRetries = policy.hasNumRetries ? Int(policy.numRetries.value) : 1
        guard result.numRetries <= 10 else {
            throw Failure("\(where_): num_retries \(result.numRetries) is above the agent's maximum of 10")
        }
        result.retriableStatusCodes = policy.retriableStatusCodes.map(Int.init)
        if policy.hasPerTryTimeout { result.perTryTimeout = duration(policy.perTryTimeout) }
        if policy.hasRetryBackOff {
            if policy.retryBackOff.hasBaseInterval { result.backoffBase = duration(policy.retryBackOff.baseInterval) }
            if policy.retryBackOff.hasMaxInterval {
                result.backoffMax = duration(policy.retryBackOff.maxInterval)
            } else {
                result.backoffMax = result.backoffBase * 10  // Envoy's default
            }
        }
        if !policy.retryHostPredicate.isEmpty || policy.hasRateLimitedRetryBackOff || !policy.retriableHeaders.isEmpty {
            throw Failure(
                "\(where_): retry host predicates, rate-limited back-off and retriable headers are not supported"
            )
        }
        result.retryNonIdempotent =
            route.metadata.filterMetadata["trellis"]?.fields["retry_non_idempotent"]?.boolValue ?? false
        return result
    }

    static func rateLimit(_ any: Google_Protobuf_Any, in where_: String) throws(Failure) -> RateLimit {
        let limit: Envoy_Extensions_Filters_Http_LocalRatelimit_V3_LocalRateLimit
        do {
            limit = try .init(unpackingAny: any)
        } catch {
            throw Failure("\(where_): local_ratelimit settings are not a LocalRateLimit (\(any.typeURL))")
        }
        guard limit.descriptors.isEmpty else {
            throw Failure("\(where_): local_ratelimit descriptors are not supported (one bucket per route)")
        }
        let bucket = limit.tokenBucket
        let interval = duration(bucket.fillInterval)
        let perFill = bucket.hasTokensPerFill ? Double(bucket.tokensPerFill.value) : 1
        guard limit.hasTokenBucket, bucket.maxTokens > 0, interval > .zero, perFill > 0 else {
            throw Failure("\(where_): local_ratelimit needs a token bucket with max_tokens and a fill interval")
        }
        let seconds = Double(interval.components.seconds) + Double(interval.components.attoseconds) / 1e18
        let enabled = !limit.hasFilterEnabled || limit.filterEnabled.defaultValue.numerator > 0
        guard enabled else { throw Failure("\(where_): a disabled local_ratelimit is not supported") }
        return RateLimit(requestsPerSecond: perFill / seconds, burst: Int(bucket.maxTokens))
    }

    static func percent(_ f: Envoy_Type_V3_FractionalPercent) -> Double {
        let scale: Double =
            switch f.denominator {
            case .hundred: 1
            case .tenThousand: 100
            case .million: 10_000
            default: 1
            }
        return min(100, Double(f.numerator) / scale)
    }

    static func fault(_ any: Google_Protobuf_Any, in where_: String) throws(Failure) -> FaultInjection {
        let config: Envoy_Extensions_Filters_Http_Fault_V3_HTTPFault
        do {
            config = try .init(unpackingAny: any)
        } catch {
            throw Failure("\(where_): fault settings are not an HTTPFault (\(any.typeURL))")
        }
        var result = FaultInjection()
        if config.hasDelay {
            guard case .fixedDelay(let d)? = config.delay.faultDelaySecifier else {
                throw Failure("\(where_): only fixed fault delays are supported")
            }
            result.delay = duration(d)
            result.delayPercent = config.delay.hasPercentage ? percent(config.delay.percentage) : 100
        }
        if config.hasAbort {
            guard case .httpStatus(let status)? = config.abort.errorType else {
                throw Failure("\(where_): only HTTP status fault aborts are supported")
            }
            result.abortStatus = Int(status)
            result.abortPercent = config.abort.hasPercentage ? percent(config.abort.percentage) : 100
        }
        return result
    }

    static func circuitBreakers(
        _ breakers: Envoy_Config_Cluster_V3_CircuitBreakers,
        cluster: String
    ) throws(Failure)
        -> (CircuitBreakers, Envoy_Config_Cluster_V3_CircuitBreakers.Thresholds.RetryBudget?)
    {
        guard let t = breakers.thresholds.first(where: { $0.priority == .default }) else {
            return (CircuitBreakers(), nil)
        }
        var limits = CircuitBreakers()
        if t.hasMaxConnections { limits.maxConnections = Int(t.maxConnections.value) }
        if t.hasMaxPendingRequests { limits.maxPendingRequests = Int(t.maxPendingRequests.value) }
        if t.hasMaxRequests { limits.maxRequests = Int(t.maxRequests.value) }
        if t.hasMaxRetries { limits.maxRetries = Int(t.maxRetries.value) }
        for value in [limits.maxConnections, limits.maxPendingRequests, limits.maxRequests, limits.maxRetries]
        where value > CircuitBreakers.maxLimit {
            throw Failure("cluster '\(cluster)': circuit breaker limit \(value) is above \(CircuitBreakers.maxLimit)")
        }
        return (limits, t.hasRetryBudget ? t.retryBudget : nil)
    }

    static func outlierDetection(
        _ o: Envoy_Config_Cluster_V3_OutlierDetection,
        cluster: String
    ) throws(Failure)
        -> OutlierDetection
    {
        var result = OutlierDetection()
        if o.hasConsecutive5Xx { result.consecutiveErrors = max(1, Int(o.consecutive5Xx.value)) }
        if o.hasInterval { result.interval = duration(o.interval) }
        if o.hasBaseEjectionTime { result.baseEjectionTime = duration(o.baseEjectionTime) }
        if o.hasMaxEjectionTime { result.maxEjectionTime = duration(o.maxEjectionTime) }
        if o.hasMaxEjectionPercent { result.maxEjectionPercent = min(100, Int(o.maxEjectionPercent.value)) }
        // Envoy judges success rates unless told not to.
        let successRate = !o.hasEnforcingSuccessRate || o.enforcingSuccessRate.value > 0
        if successRate {
            result.successRate = .init(
                minimumHosts: o.hasSuccessRateMinimumHosts ? Int(o.successRateMinimumHosts.value) : 5,
                requestVolume: o.hasSuccessRateRequestVolume ? Int(o.successRateRequestVolume.value) : 100,
                stdevFactor: o.hasSuccessRateStdevFactor ? Double(o.successRateStdevFactor.value) / 1000 : 1.9
            )
        }
        if o.hasEnforcingConsecutive5Xx && o.enforcingConsecutive5Xx.value == 0 {
            result.consecutiveErrors = 1_000_000  // not enforced: in effect never
        }
        if o.splitExternalLocalOriginErrors {
            throw Failure("cluster '\(cluster)': outlier detection split_external_local_origin_errors is not supported")
        }
        return result
    }

    static func healthCheck(
        _ checks: [Envoy_Config_Core_V3_HealthCheck],
        cluster: String
    ) throws(Failure)
        -> TrellisPolicy.HealthCheck?
    {
        guard let check = checks.first else { return nil }
        guard checks.count == 1 else { throw Failure("cluster '\(cluster)': only one health check is supported") }
        let kind: TrellisPolicy.HealthCheck.Kind
        switch check.healthChecker {
        case .httpHealthCheck(let http)?:
            let statuses =
                http.expectedStatuses.isEmpty
                ? [200...299]  // Envoy's default
                : http.expectedStatuses.map { Int($0.start)...Int($0.end - 1) }
            kind = .http(path: http.path, host: http.host.isEmpty ? nil : http.host, expectedStatuses: statuses)
        case .tcpHealthCheck(let tcp)?:
            guard !tcp.hasSend && tcp.receive.isEmpty else {
                throw Failure("cluster '\(cluster)': TCP health checks with payloads are not supported")
            }
            kind = .tcp
        default:
            throw Failure("cluster '\(cluster)': only HTTP and TCP health checks are supported")
        }
        return TrellisPolicy.HealthCheck(
            kind: kind,
            interval: duration(check.interval),
            timeout: duration(check.timeout),
            healthyThreshold: Int(check.healthyThreshold.value),
            unhealthyThreshold: Int(check.unhealthyThreshold.value)
        )
    }
}
