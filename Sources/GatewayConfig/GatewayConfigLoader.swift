public import Proxy
public import TrellisConfig
public import TrellisPolicy
import Yams

/// The gateway file: a ``ProxyConfig`` plus where the admin endpoint listens. See
/// `examples/gateway.yaml` for every key, documented.
public struct GatewayFile: Sendable {
    public var proxy: ProxyConfig
    public var adminAddress: SocketEndpoint
    /// `SO_MARK` for upstream sockets (`upstream_mark`), so capture rules let them through.
    public var upstreamMark: UInt32?
    /// The access log's output and sampling (`access_log`), when a listener logs. A listener logs
    /// when it says `access_log: true`, or when the file has a top-level `access_log` and the
    /// listener does not say `false`.
    public var accessLog: AccessLogSettings?
    /// Spans of every request, exported over OTLP/gRPC (`tracing`).
    public var tracing: TracingSettings?

    public init(proxy: ProxyConfig, adminAddress: SocketEndpoint = .init(host: "127.0.0.1", port: 15000)) {
        self.proxy = proxy
        self.adminAddress = adminAddress
    }
}

/// Reads the gateway YAML format into a validated ``GatewayFile``. Parsing only: the executable
/// reads the file and passes its text.
public enum GatewayConfigLoader {
    /// - Parameters:
    ///   - yaml: the file's contents.
    ///   - file: the file's name, for error messages.
    ///   - version: the snapshot's version label (the executable passes a digest of the file).
    /// - Throws: ``ConfigFileErrors`` listing every problem found.
    public static func parse(yaml: String, file: String, version: String = "1") throws(ConfigFileErrors) -> GatewayFile
    {
        let gateway: GatewayFile
        let root: ConfigNode
        do {
            root = try ConfigNode.root(yaml: yaml, file: file)
            gateway = try load(root, version: version)
        } catch {
            throw ConfigFileErrors([error])
        }
        let problems = gateway.proxy.validationErrors()
        guard problems.isEmpty else {
            throw ConfigFileErrors(
                problems.map {
                    ConfigFileError(
                        file: file,
                        position: root.position(of: $0.path),
                        path: $0.path,
                        message: $0.message
                    )
                }
            )
        }
        return gateway
    }

    private static func load(_ root: ConfigNode, version: String) throws(ConfigFileError) -> GatewayFile {
        let top = try root.mapping(allowed: [
            "admin", "listeners", "clusters", "upstream_mark", "access_log", "tracing",
        ])
        let accessLog = try top["access_log"].flatMap { (n) throws(ConfigFileError) in try AccessLogSettings.decode(n) }
        var admin = SocketEndpoint(host: "127.0.0.1", port: 15000)
        if let adminNode = top["admin"] {
            let keys = try adminNode.mapping(allowed: ["address"])
            if let address = keys["address"] {
                let (host, port) = try address.endpoint(portRange: 0...65535)
                admin = SocketEndpoint(host: host, port: port)
            }
        }
        var listeners: [ListenerConfig] = []
        for node in try top.required("listeners", in: root).sequence() {
            listeners.append(try listener(node, logsByDefault: accessLog != nil))
        }
        var clusters: [ClusterConfig] = []
        for node in try top.required("clusters", in: root).sequence() { clusters.append(try cluster(node)) }
        var file = GatewayFile(
            proxy: ProxyConfig(version: version, listeners: listeners, clusters: clusters),
            adminAddress: admin
        )
        if let n = top["upstream_mark"] { file.upstreamMark = try n.mark() }
        if let n = top["tracing"] { file.tracing = try TracingSettings.decode(n) }
        // `access_log: true` on a listener alone writes to standard output, every request.
        file.accessLog = accessLog ?? (listeners.contains { $0.accessLog } ? AccessLogSettings() : nil)
        return file
    }

    private static func listener(_ node: ConfigNode, logsByDefault: Bool) throws(ConfigFileError) -> ListenerConfig {
        let keys = try node.mapping(allowed: [
            "name", "address", "additional_addresses", "virtual_hosts", "limits", "access_log", "transparent",
        ])
        let (host, port) = try keys.required("address", in: node).endpoint(portRange: 0...65535)
        var additional: [SocketEndpoint] = []
        for item in try keys["additional_addresses"]?.sequence() ?? [] {
            let (h, p) = try item.endpoint(portRange: 0...65535)
            additional.append(SocketEndpoint(host: h, port: p))
        }
        var limits = ConnectionLimits()
        if let limitsNode = keys["limits"] {
            let l = try limitsNode.mapping(allowed: [
                "max_request_header_bytes", "request_header_timeout", "idle_timeout",
            ])
            if let n = l["max_request_header_bytes"] {
                limits.maxRequestHeaderBytes = try n.int(in: 1024...ConnectionLimits.maxHeaderCeiling)
            }
            if let n = l["request_header_timeout"] { limits.requestHeaderTimeout = try n.duration() }
            if let n = l["idle_timeout"] { limits.idleTimeout = try n.duration() }
        }
        var hosts: [VirtualHost] = []
        for vhost in try keys.required("virtual_hosts", in: node).sequence() { hosts.append(try virtualHost(vhost)) }
        return ListenerConfig(
            name: try keys.required("name", in: node).nonEmptyString(),
            address: SocketEndpoint(host: host, port: port),
            virtualHosts: hosts,
            limits: limits,
            accessLog: try keys["access_log"]?.bool() ?? logsByDefault,
            transparent: try keys["transparent"].map { (t) throws(ConfigFileError) -> TransparentMode in
                let tk = try t.mapping(allowed: ["sniff_timeout", "forward_to"])
                return TransparentMode(
                    sniffTimeout: try tk["sniff_timeout"]?.duration() ?? .seconds(1),
                    forwardTo: try tk["forward_to"].map { (f) throws(ConfigFileError) -> [String] in
                        if case .scalar = f.node { return [try f.nonEmptyString()] }
                        return try f.stringList()
                    } ?? []
                )
            },
            additionalAddresses: additional
        )
    }

    private static func virtualHost(_ node: ConfigNode) throws(ConfigFileError) -> VirtualHost {
        let keys = try node.mapping(allowed: ["name", "domains", "routes"])
        var routes: [Route] = []
        for route in try keys.required("routes", in: node).sequence() { routes.append(try self.route(route)) }
        return VirtualHost(
            name: try keys.required("name", in: node).nonEmptyString(),
            domains: try keys.required("domains", in: node).stringList(),
            routes: routes
        )
    }

    private static func route(_ node: ConfigNode) throws(ConfigFileError) -> Route {
        let keys = try node.mapping(allowed: ["name", "match", "route"])
        let match = try keys["match"].map(RouteMatch.decode) ?? RouteMatch()
        let actionNode = try keys.required("route", in: node)
        let a = try actionNode.mapping(allowed: [
            "cluster", "clusters", "timeout", "rate_limit", "retry_policy", "fault",
        ])
        var targets: [WeightedCluster] = []
        switch (a["cluster"], a["clusters"]) {
        case (let single?, nil):
            targets = [WeightedCluster(name: try single.nonEmptyString())]
        case (nil, let list?):
            for item in try list.sequence() {
                let ik = try item.mapping(allowed: ["name", "weight"])
                targets.append(
                    WeightedCluster(
                        name: try ik.required("name", in: item).nonEmptyString(),
                        weight: try ik.required("weight", in: item).int(in: WeightedDestinations.weights)
                    )
                )
            }
        default:
            throw actionNode.error("expected exactly one of cluster or clusters")
        }
        var timeout: Duration? = .seconds(15)
        if let t = a["timeout"] {
            let value = try t.requestTimeout()
            timeout = value == .zero ? nil : value
        }
        return Route(
            name: try keys.required("name", in: node).nonEmptyString(),
            match: match,
            action: RouteAction(
                clusters: targets,
                timeout: timeout,
                rateLimit: try a["rate_limit"].map(RateLimit.decode),
                retryPolicy: try a["retry_policy"].map(RetryPolicy.decode),
                fault: try a["fault"].map(FaultInjection.decode)
            )
        )
    }

    private static func cluster(_ node: ConfigNode) throws(ConfigFileError) -> ClusterConfig {
        let keys = try node.mapping(allowed: [
            "name", "lb_policy", "ring_hash", "endpoints", "connect_timeout", "pool", "original_destination",
            "circuit_breakers", "rate_limit", "outlier_detection", "health_check", "protocol",
        ])
        var upstreamProtocol = UpstreamProtocol.http1
        if let p = keys["protocol"] {
            let name = try p.nonEmptyString()
            guard let parsed = UpstreamProtocol(rawValue: name) else {
                let names = UpstreamProtocol.allCases.map(\.rawValue).joined(separator: ", ")
                throw p.error("expected one of \(names), got '\(name)'")
            }
            upstreamProtocol = parsed
        }
        let policy = try LoadBalancingPolicy.decode(keys, in: node)
        var pool = PoolSettings()
        if let poolNode = keys["pool"] {
            let pk = try poolNode.mapping(allowed: [
                "max_idle_per_endpoint", "idle_timeout", "max_requests_per_connection",
            ])
            if let n = pk["max_idle_per_endpoint"] { pool.maxIdlePerEndpoint = try n.int(in: 0...100_000) }
            if let n = pk["idle_timeout"] { pool.idleTimeout = try n.duration() }
            if let n = pk["max_requests_per_connection"] { pool.maxRequestsPerConnection = try n.int(in: 1...Int.max) }
        }
        var endpoints: [Endpoint] = []
        let originalDestination = try keys["original_destination"]?.bool() ?? false
        for e in try
            (originalDestination
            ? keys["endpoints"]?.sequence() ?? [] : keys.required("endpoints", in: node).sequence())
        {
            let ek = try e.mapping(allowed: ["address", "weight", "health"])
            let (host, port) = try ek.required("address", in: e).endpoint()
            var health = Endpoint.Health.healthy
            if let h = ek["health"] {
                let value = try h.nonEmptyString()
                guard let parsed = Endpoint.Health(rawValue: value) else {
                    throw h.error("expected one of healthy, unhealthy, draining, got '\(value)'")
                }
                health = parsed
            }
            endpoints.append(
                Endpoint(
                    address: SocketEndpoint(host: host, port: port),
                    weight: try ek["weight"]?.int(in: EndpointWeights.range) ?? 1,
                    health: health
                )
            )
        }
        return ClusterConfig(
            name: try keys.required("name", in: node).nonEmptyString(),
            loadBalancing: policy,
            endpoints: endpoints,
            connectTimeout: try keys["connect_timeout"]?.duration(atMost: PolicyBounds.maxConnectTimeout)
                ?? .seconds(1),
            pool: pool,
            originalDestination: originalDestination,
            circuitBreakers: try keys["circuit_breakers"].map(CircuitBreakers.decode),
            rateLimit: try keys["rate_limit"].map(RateLimit.decode),
            outlierDetection: try keys["outlier_detection"].map(OutlierDetection.decode),
            healthCheck: try keys["health_check"].map(TrellisPolicy.HealthCheck.decode),
            upstreamProtocol: upstreamProtocol
        )
    }
}
