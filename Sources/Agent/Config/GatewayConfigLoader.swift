public import Proxy
public import TrellisConfig
import Yams

/// The gateway file: a ``ProxyConfig`` plus where the admin endpoint listens. See
/// `examples/gateway.yaml` for every key, documented.
public struct GatewayFile: Sendable {
    public var proxy: ProxyConfig
    public var adminAddress: SocketEndpoint
    /// `SO_MARK` for upstream sockets (`upstream_mark`), so capture rules let them through.
    public var upstreamMark: UInt32?

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
        let top = try root.mapping(allowed: ["admin", "listeners", "clusters", "upstream_mark"])
        var admin = SocketEndpoint(host: "127.0.0.1", port: 15000)
        if let adminNode = top["admin"] {
            let keys = try adminNode.mapping(allowed: ["address"])
            if let address = keys["address"] {
                let (host, port) = try address.endpoint(portRange: 0...65535)
                admin = SocketEndpoint(host: host, port: port)
            }
        }
        var listeners: [ListenerConfig] = []
        for node in try top.required("listeners", in: root).sequence() { listeners.append(try listener(node)) }
        var clusters: [ClusterConfig] = []
        for node in try top.required("clusters", in: root).sequence() { clusters.append(try cluster(node)) }
        var file = GatewayFile(
            proxy: ProxyConfig(version: version, listeners: listeners, clusters: clusters),
            adminAddress: admin
        )
        if let n = top["upstream_mark"] {
            let text = try n.nonEmptyString()
            let value = text.hasPrefix("0x") ? UInt32(text.dropFirst(2), radix: 16) : UInt32(text)
            guard let value, value != 0 else {
                throw n.error("expected a non-zero 32-bit mark such as 0x1000, got '\(text)'")
            }
            file.upstreamMark = value
        }
        return file
    }

    private static func listener(_ node: ConfigNode) throws(ConfigFileError) -> ListenerConfig {
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
            accessLog: try keys["access_log"]?.bool() ?? false,
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
        let matchNode = try keys.required("match", in: node)
        let m = try matchNode.mapping(allowed: ["prefix", "path", "regex", "methods", "headers"])
        let pathKeys = ["prefix", "path", "regex"].filter { m[$0] != nil }
        guard pathKeys.count == 1 else {
            throw matchNode.error("expected exactly one of prefix, path (exact) or regex, got \(pathKeys.count)")
        }
        let path: PathMatch
        if let p = m["prefix"] {
            path = .prefix(try p.nonEmptyString())
        } else if let p = m["path"] {
            path = .exact(try p.nonEmptyString())
        } else {
            path = .regex(try m["regex"]!.nonEmptyString())
        }
        var headers: [HeaderMatch] = []
        if let list = m["headers"] {
            for h in try list.sequence() {
                let hk = try h.mapping(allowed: ["name", "exact", "present", "regex", "invert"])
                let kinds = ["exact", "present", "regex"].filter { hk[$0] != nil }
                guard kinds.count == 1 else {
                    throw h.error("expected exactly one of exact, present or regex, got \(kinds.count)")
                }
                let kind: HeaderMatch.Kind
                if let v = hk["exact"] {
                    kind = .exact(try v.string())
                } else if let v = hk["regex"] {
                    kind = .regex(try v.nonEmptyString())
                } else {
                    guard try hk["present"]!.bool() else {
                        throw hk["present"]!.error("expected true (use invert: true to require absence)")
                    }
                    kind = .present
                }
                headers.append(
                    HeaderMatch(
                        name: try hk.required("name", in: h).nonEmptyString(),
                        kind: kind,
                        invert: try hk["invert"]?.bool() ?? false
                    )
                )
            }
        }
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
                        weight: try ik.required("weight", in: item).int(in: 1...1_000_000)
                    )
                )
            }
        default:
            throw actionNode.error("expected exactly one of cluster or clusters")
        }
        var timeout: Duration? = .seconds(15)
        if let t = a["timeout"] {
            if case .scalar(let s) = t.node, s.string == "none" {
                timeout = nil
            } else {
                timeout = try t.duration()
            }
        }
        return Route(
            name: try keys.required("name", in: node).nonEmptyString(),
            match: RouteMatch(path: path, methods: try m["methods"]?.stringList() ?? [], headers: headers),
            action: RouteAction(
                clusters: targets,
                timeout: timeout,
                rateLimit: try a["rate_limit"].map(rateLimit),
                retryPolicy: try a["retry_policy"].map(retryPolicy),
                fault: try a["fault"].map(fault)
            )
        )
    }

    /// `{requests_per_second: 100, burst: 200, per: all | client_address | header, header: x-api-key}`.
    static func rateLimit(_ node: ConfigNode) throws(ConfigFileError) -> RateLimit {
        let keys = try node.mapping(allowed: ["requests_per_second", "burst", "per", "header"])
        let rate = try keys.required("requests_per_second", in: node).number(
            above: 0,
            atMost: RateLimit.maxRequestsPerSecond
        )
        // By default a burst of one second's worth.
        let burst = try keys["burst"]?.int(in: 1...RateLimit.maxBurst) ?? max(1, Int(rate.rounded(.up)))
        var key = RateLimit.Key.all
        let per = try keys["per"]?.nonEmptyString() ?? "all"
        switch per {
        case "all": key = .all
        case "client_address": key = .clientAddress
        case "header":
            let headerNode = try keys.required("header", in: node)
            let name = try headerNode.nonEmptyString()
            guard name.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F && $0 != UInt8(ascii: ":") }) else {
                throw headerNode.error("expected a header name, got '\(name)'")
            }
            key = .header(name.lowercased())
        default:
            throw keys["per"]!.error("expected one of all, client_address, header, got '\(per)'")
        }
        if per != "header", let h = keys["header"] { throw h.error("header is only used with per: header") }
        return RateLimit(requestsPerSecond: rate, burst: burst, key: key)
    }

    /// `{http: {path: /healthz, host: name, expected_statuses: [200, "200-299"]} | tcp: {},
    /// interval: 5s, timeout: 1s, healthy_threshold: 2, unhealthy_threshold: 3}`.
    static func healthCheck(_ node: ConfigNode) throws(ConfigFileError) -> Proxy.HealthCheck {
        let keys = try node.mapping(allowed: [
            "http", "tcp", "interval", "timeout", "healthy_threshold", "unhealthy_threshold",
        ])
        let kind: Proxy.HealthCheck.Kind
        switch (keys["http"], keys["tcp"]) {
        case (let http?, nil):
            let h = try http.mapping(allowed: ["path", "host", "expected_statuses"])
            let pathNode = try h.required("path", in: http)
            let path = try pathNode.nonEmptyString()
            guard path.hasPrefix("/") else { throw pathNode.error("expected a path starting with '/', got '\(path)'") }
            let statuses = try h["expected_statuses"]?.statusRanges() ?? [200...399]
            kind = .http(path: path, host: try h["host"]?.nonEmptyString(), expectedStatuses: statuses)
        case (nil, let tcp?):
            _ = try tcp.mapping(allowed: [])
            kind = .tcp
        default:
            throw node.error("expected exactly one of http or tcp")
        }
        var check = Proxy.HealthCheck(kind: kind)
        func duration(_ key: String) throws(ConfigFileError) -> Duration? {
            guard let n = keys[key] else { return nil }
            let d = try n.duration()
            guard d > .zero, d <= .seconds(3600) else { throw n.error("expected a duration above 0 and at most 1h") }
            return d
        }
        if let d = try duration("interval") { check.interval = d }
        if let d = try duration("timeout") { check.timeout = d }
        if check.timeout > check.interval {
            throw (keys["timeout"] ?? node).error("expected a timeout no longer than the interval")
        }
        if let n = keys["healthy_threshold"] { check.healthyThreshold = try n.int(in: 1...100) }
        if let n = keys["unhealthy_threshold"] { check.unhealthyThreshold = try n.int(in: 1...100) }
        return check
    }

    /// `{consecutive_errors: 5, interval: 10s, base_ejection_time: 30s, max_ejection_time: 300s,
    /// max_ejection_percent: 10, success_rate: {minimum_hosts: 5, request_volume: 100,
    /// stdev_factor: 1.9}}`; keys not given keep these defaults, no `success_rate`: not judged.
    static func outlierDetection(_ node: ConfigNode) throws(ConfigFileError) -> OutlierDetection {
        let keys = try node.mapping(allowed: [
            "consecutive_errors", "interval", "base_ejection_time", "max_ejection_time", "max_ejection_percent",
            "success_rate",
        ])
        var o = OutlierDetection()
        func duration(_ key: String) throws(ConfigFileError) -> Duration? {
            guard let n = keys[key] else { return nil }
            let d = try n.duration()
            guard d > .zero, d <= .seconds(86_400) else { throw n.error("expected a duration above 0 and at most 24h") }
            return d
        }
        if let n = keys["consecutive_errors"] { o.consecutiveErrors = try n.int(in: 1...1_000_000) }
        if let d = try duration("interval") { o.interval = d }
        if let d = try duration("base_ejection_time") { o.baseEjectionTime = d }
        if let d = try duration("max_ejection_time") { o.maxEjectionTime = d }
        if let n = keys["max_ejection_percent"] { o.maxEjectionPercent = try n.int(in: 0...100) }
        if let rateNode = keys["success_rate"] {
            let r = try rateNode.mapping(allowed: ["minimum_hosts", "request_volume", "stdev_factor"])
            var rate = OutlierDetection.SuccessRate()
            if let n = r["minimum_hosts"] { rate.minimumHosts = try n.int(in: 1...10_000) }
            if let n = r["request_volume"] { rate.requestVolume = try n.int(in: 1...1_000_000) }
            if let n = r["stdev_factor"] { rate.stdevFactor = try n.number(above: 0, atMost: 100) }
            o.successRate = rate
        }
        return o
    }

    /// `{delay: 2s, delay_percent: 10, abort_status: 503, abort_percent: 5}`.
    static func fault(_ node: ConfigNode) throws(ConfigFileError) -> FaultInjection {
        let keys = try node.mapping(allowed: ["delay", "delay_percent", "abort_status", "abort_percent"])
        var f = FaultInjection()
        func percent(_ key: String) throws(ConfigFileError) -> Double { try keys[key]?.percentage() ?? 100 }
        if let n = keys["delay"] {
            let d = try n.duration()
            guard d > .zero, d <= .seconds(3600) else { throw n.error("expected a duration above 0 and at most 1h") }
            f.delay = d
            f.delayPercent = try percent("delay_percent")
        } else if let n = keys["delay_percent"] {
            throw n.error("delay_percent needs a delay")
        }
        if let n = keys["abort_status"] {
            f.abortStatus = try n.int(in: 200...599)
            f.abortPercent = try percent("abort_percent")
        } else if let n = keys["abort_percent"] {
            throw n.error("abort_percent needs an abort_status")
        }
        guard f.delay != nil || f.abortStatus != nil else { throw node.error("expected a delay or an abort_status") }
        return f
    }

    /// `{retry_on: [connect-failure, reset, gateway-error, 5xx, retriable-status-codes],
    /// num_retries: 1, retriable_status_codes: [409], per_try_timeout: 1s,
    /// backoff: {base: 25ms, max: 250ms}, retry_non_idempotent: false,
    /// budget: {percent: 20, min_concurrency: 3}}`.
    static func retryPolicy(_ node: ConfigNode) throws(ConfigFileError) -> RetryPolicy {
        let keys = try node.mapping(allowed: [
            "retry_on", "num_retries", "retriable_status_codes", "per_try_timeout", "backoff", "retry_non_idempotent",
            "budget",
        ])
        var p = RetryPolicy()
        if let list = keys["retry_on"] {
            var conditions: Set<RetryPolicy.Condition> = []
            for item in try list.sequence() {
                let name = try item.nonEmptyString()
                guard let condition = RetryPolicy.Condition(rawValue: name) else {
                    let names = RetryPolicy.Condition.allCases.map(\.rawValue).joined(separator: ", ")
                    throw item.error("expected one of \(names), got '\(name)'")
                }
                conditions.insert(condition)
            }
            guard !conditions.isEmpty else { throw list.error("expected at least one condition") }
            p.retryOn = conditions
        }
        if let n = keys["num_retries"] { p.numRetries = try n.int(in: 0...10) }
        if let list = keys["retriable_status_codes"] {
            p.retriableStatusCodes = try list.sequence().map { (item) throws(ConfigFileError) -> Int in
                try item.int(in: 100...599)
            }
        }
        if p.retryOn.contains(.retriableStatusCodes) && p.retriableStatusCodes.isEmpty {
            throw (keys["retry_on"] ?? node).error("retriable-status-codes needs retriable_status_codes")
        }
        if let n = keys["per_try_timeout"] {
            let d = try n.duration()
            guard d > .zero else { throw n.error("expected a positive duration") }
            p.perTryTimeout = d
        }
        if let b = keys["backoff"] {
            let bk = try b.mapping(allowed: ["base", "max"])
            if let n = bk["base"] { p.backoffBase = try n.duration() }
            if let n = bk["max"] { p.backoffMax = try n.duration() }
            guard p.backoffBase > .zero, p.backoffMax >= p.backoffBase, p.backoffMax <= .seconds(60) else {
                throw b.error("expected 0 < base <= max <= 60s")
            }
        }
        if let n = keys["retry_non_idempotent"] { p.retryNonIdempotent = try n.bool() }
        if let b = keys["budget"] {
            let bk = try b.mapping(allowed: ["percent", "min_concurrency"])
            if let n = bk["percent"] { p.budgetPercent = try n.number(above: 0, atMost: 100) }
            if let n = bk["min_concurrency"] { p.minRetryConcurrency = try n.int(in: 0...1_000_000) }
        }
        return p
    }

    /// `{max_connections, max_pending_requests, max_requests, max_retries}`, each 0...1000000;
    /// those not given keep their defaults.
    static func circuitBreakers(_ node: ConfigNode) throws(ConfigFileError) -> CircuitBreakers {
        let keys = try node.mapping(allowed: ["max_connections", "max_pending_requests", "max_requests", "max_retries"])
        var limits = CircuitBreakers()
        let range = 0...CircuitBreakers.maxLimit
        if let n = keys["max_connections"] { limits.maxConnections = try n.int(in: range) }
        if let n = keys["max_pending_requests"] { limits.maxPendingRequests = try n.int(in: range) }
        if let n = keys["max_requests"] { limits.maxRequests = try n.int(in: range) }
        if let n = keys["max_retries"] { limits.maxRetries = try n.int(in: range) }
        return limits
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
        var policy = LoadBalancingPolicy.roundRobin
        if let p = keys["lb_policy"] {
            let name = try p.nonEmptyString()
            switch name {
            case "round_robin": policy = .roundRobin
            case "least_request": policy = .leastRequest
            case "random": policy = .random
            case "weighted": policy = .weighted
            case "ring_hash":
                let ringNode = try keys.required("ring_hash", in: node)
                let r = try ringNode.mapping(allowed: ["header", "minimum_ring_size"])
                policy = .ringHash(
                    header: try r.required("header", in: ringNode).nonEmptyString(),
                    minimumRingSize: try r["minimum_ring_size"]?.int(in: 1...8_388_608) ?? 1024
                )
            default:
                throw p.error("expected one of \(LoadBalancingPolicy.names.joined(separator: ", ")), got '\(name)'")
            }
        }
        if let ring = keys["ring_hash"], try keys["lb_policy"]?.string() != "ring_hash" {
            throw ring.error("ring_hash settings given but lb_policy is not ring_hash")
        }
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
                    weight: try ek["weight"]?.int(in: 1...1_000_000) ?? 1,
                    health: health
                )
            )
        }
        return ClusterConfig(
            name: try keys.required("name", in: node).nonEmptyString(),
            loadBalancing: policy,
            endpoints: endpoints,
            connectTimeout: try keys["connect_timeout"]?.duration() ?? .seconds(1),
            pool: pool,
            originalDestination: originalDestination,
            circuitBreakers: try keys["circuit_breakers"].map(circuitBreakers),
            rateLimit: try keys["rate_limit"].map(rateLimit),
            outlierDetection: try keys["outlier_detection"].map(outlierDetection),
            healthCheck: try keys["health_check"].map(healthCheck),
            upstreamProtocol: upstreamProtocol
        )
    }
}
