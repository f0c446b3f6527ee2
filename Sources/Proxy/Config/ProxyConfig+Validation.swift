import NIOCore
import TrellisPolicy

extension ProxyConfig {
    /// Checks every invariant the data path relies on; returns all problems found, in document
    /// order. An empty array means the snapshot can be applied.
    public func validationErrors() -> [ProxyConfigError] {
        var errors: [ProxyConfigError] = []
        func fail(_ path: String, _ message: String) { errors.append(.init(path: path, message: message)) }

        func checkRateLimit(_ limit: RateLimit, path: String) {
            if !(limit.requestsPerSecond > 0 && limit.requestsPerSecond <= RateLimit.maxRequestsPerSecond) {
                fail(
                    "\(path).requests_per_second",
                    "expected a rate above 0 and at most \(Int(RateLimit.maxRequestsPerSecond)), got \(limit.requestsPerSecond)"
                )
            }
            if !(1...RateLimit.maxBurst).contains(limit.burst) {
                fail("\(path).burst", "expected 1...\(RateLimit.maxBurst), got \(limit.burst)")
            }
            if case .header(let name) = limit.key, !HTTPToken.isToken(name) {
                fail("\(path).key", "expected a header name, got '\(name)'")
            }
        }

        var clusterNames = Set<String>()
        for (ci, cluster) in clusters.enumerated() {
            let path = "clusters[\(ci)]"
            if cluster.name.isEmpty { fail("\(path).name", "expected a non-empty name") }
            if !clusterNames.insert(cluster.name).inserted {
                fail("\(path).name", "duplicate cluster name '\(cluster.name)'")
            }
            if cluster.connectTimeout <= .zero { fail("\(path).connect_timeout", "expected a positive duration") }
            if cluster.pool.maxIdlePerEndpoint < 0 {
                fail("\(path).pool.max_idle_per_endpoint", "expected 0 or more")
            }
            if cluster.pool.idleTimeout <= .zero { fail("\(path).pool.idle_timeout", "expected a positive duration") }
            if let max = cluster.pool.maxRequestsPerConnection, max < 1 {
                fail("\(path).pool.max_requests_per_connection", "expected 1 or more")
            }
            if case .ringHash(let key, let size) = cluster.loadBalancing {
                switch key {
                case .header(let name) where !HTTPToken.isToken(name):
                    fail("\(path).ring_hash.header", "expected a header name")
                case .cookie(let name) where !HTTPToken.isToken(name):
                    fail("\(path).ring_hash.cookie", "expected a cookie name")
                default: break
                }
                if !LoadBalancingPolicy.ringSizes.contains(size) {
                    fail("\(path).ring_hash.minimum_ring_size", "expected 1...8388608, got \(size)")
                }
            }
            if let limits = cluster.circuitBreakers {
                let max = CircuitBreakers.maxLimit
                for (key, value) in [
                    ("max_connections", limits.maxConnections), ("max_pending_requests", limits.maxPendingRequests),
                    ("max_requests", limits.maxRequests), ("max_retries", limits.maxRetries),
                ] where value < 0 || value > max {
                    fail("\(path).circuit_breakers.\(key)", "expected 0...\(max), got \(value)")
                }
            }
            if let limit = cluster.rateLimit { checkRateLimit(limit, path: "\(path).rate_limit") }
            if let check = cluster.healthCheck {
                let hpath = "\(path).health_check"
                if check.interval <= .zero || check.interval > .seconds(3600) {
                    fail("\(hpath).interval", "expected a duration above 0 and at most 1h")
                }
                if check.timeout <= .zero || check.timeout > check.interval {
                    fail("\(hpath).timeout", "expected a duration above 0 and at most the interval")
                }
                for (key, value) in [
                    ("healthy_threshold", check.healthyThreshold), ("unhealthy_threshold", check.unhealthyThreshold),
                ] where !(1...100).contains(value) {
                    fail("\(hpath).\(key)", "expected 1...100, got \(value)")
                }
                if case .http(let p, _, let statuses) = check.kind {
                    if !p.hasPrefix("/") { fail("\(hpath).http.path", "expected a path starting with '/', got '\(p)'") }
                    if statuses.isEmpty || statuses.contains(where: { $0.lowerBound < 100 || $0.upperBound > 599 }) {
                        fail("\(hpath).http.expected_statuses", "expected statuses in 100...599")
                    }
                }
                if cluster.originalDestination {
                    fail("\(hpath)", "a passthrough (original_destination) cluster has no endpoints to check")
                }
            }
            if let outlier = cluster.outlierDetection {
                let opath = "\(path).outlier_detection"
                if !(1...1_000_000).contains(outlier.consecutiveErrors) {
                    fail("\(opath).consecutive_errors", "expected 1...1000000, got \(outlier.consecutiveErrors)")
                }
                for (key, value) in [
                    ("interval", outlier.interval), ("base_ejection_time", outlier.baseEjectionTime),
                    ("max_ejection_time", outlier.maxEjectionTime),
                ] where value <= .zero || value > .seconds(86_400) {
                    fail("\(opath).\(key)", "expected a duration above 0 and at most 24h")
                }
                if !(0...100).contains(outlier.maxEjectionPercent) {
                    fail("\(opath).max_ejection_percent", "expected 0...100, got \(outlier.maxEjectionPercent)")
                }
                if let rate = outlier.successRate {
                    if !(1...10_000).contains(rate.minimumHosts) {
                        fail("\(opath).success_rate.minimum_hosts", "expected 1...10000, got \(rate.minimumHosts)")
                    }
                    if !(1...1_000_000).contains(rate.requestVolume) {
                        fail("\(opath).success_rate.request_volume", "expected 1...1000000, got \(rate.requestVolume)")
                    }
                    if !(rate.stdevFactor > 0 && rate.stdevFactor <= 100) {
                        fail("\(opath).success_rate.stdev_factor", "expected a number above 0 and at most 100")
                    }
                }
            }
            if cluster.originalDestination && !cluster.endpoints.isEmpty {
                fail("\(path).endpoints", "a passthrough (original_destination) cluster has no endpoints of its own")
            }
            for (ei, endpoint) in cluster.endpoints.enumerated() {
                // The path is spelled out only for a problem (clusters can hold 100,000 endpoints).
                if endpoint.address.host.isEmpty || !endpoint.address.host.utf8.allSatisfy({ $0 > 32 && $0 < 127 }) {
                    // A NUL would cut the name where the socket layer reads it.
                    fail(
                        "\(path).endpoints[\(ei)].address",
                        "expected a host name or IP address of printable characters, got '\(Self.shown(endpoint.address.host))'"
                    )
                }
                if !(1...65535).contains(endpoint.address.port) {
                    fail(
                        "\(path).endpoints[\(ei)].address",
                        "expected a port in 1...65535, got \(endpoint.address.port)"
                    )
                }
                if !EndpointWeights.range.contains(endpoint.weight) {
                    fail("\(path).endpoints[\(ei)].weight", "expected 1...128, got \(endpoint.weight)")
                }
            }
        }

        var listenerNames = Set<String>()
        var bound = Set<SocketEndpoint>()
        func checkVirtualHosts(_ virtualHosts: [VirtualHost], path: String) {
            var domains = Set<String>()
            for (vi, vhost) in virtualHosts.enumerated() {
                let vpath = "\(path)[\(vi)]"
                if vhost.domains.isEmpty { fail("\(vpath).domains", "expected at least one domain") }
                for (di, domain) in vhost.domains.enumerated() {
                    if let problem = DomainPattern.problem(with: domain) {
                        fail("\(vpath).domains[\(di)]", problem)
                    } else if !domains.insert(domain.lowercased()).inserted {
                        fail("\(vpath).domains[\(di)]", "domain '\(domain)' is already used by another virtual host")
                    }
                }
                for (ri, route) in vhost.routes.enumerated() {
                    let rpath = "\(vpath).routes[\(ri)]"
                    switch route.match.path {
                    case .prefix(let p), .exact(let p):
                        if !p.hasPrefix("/") {
                            fail("\(rpath).match.path", "expected a path starting with '/', got '\(p)'")
                        }
                    case .regex(let r):
                        if let problem = CompiledRegex.problem(with: r) { fail("\(rpath).match.regex", problem) }
                    }
                    for (mi, method) in route.match.methods.enumerated() where !HTTPToken.isToken(method) {
                        fail("\(rpath).match.methods[\(mi)]", "expected an HTTP method token, got '\(method)'")
                    }
                    for (hi, header) in route.match.headers.enumerated() {
                        let hpath = "\(rpath).match.headers[\(hi)]"
                        if !HTTPToken.isToken(header.name) {
                            fail("\(hpath).name", "expected a header name, got '\(header.name)'")
                        }
                        if case .regex(let r) = header.kind, let problem = CompiledRegex.problem(with: r) {
                            fail("\(hpath).regex", problem)
                        }
                    }
                    if route.action.clusters.isEmpty {
                        fail("\(rpath).route.clusters", "expected at least one cluster")
                    }
                    for (wi, target) in route.action.clusters.enumerated() {
                        if !clusterNames.contains(target.name) {
                            fail("\(rpath).route.clusters[\(wi)].name", "no cluster named '\(target.name)'")
                        }
                        if !WeightedDestinations.weights.contains(target.weight) {
                            fail("\(rpath).route.clusters[\(wi)].weight", "expected 1...1000000, got \(target.weight)")
                        }
                    }
                    if let timeout = route.action.timeout, timeout <= .zero {
                        fail("\(rpath).route.timeout", "expected a positive duration")
                    }
                    if let limit = route.action.rateLimit { checkRateLimit(limit, path: "\(rpath).route.rate_limit") }
                    if let fault = route.action.fault {
                        let fpath = "\(rpath).route.fault"
                        for (key, value) in [
                            ("delay_percent", fault.delayPercent), ("abort_percent", fault.abortPercent),
                        ]
                        where !(value >= 0 && value <= 100) {
                            fail("\(fpath).\(key)", "expected a percentage in 0...100, got \(value)")
                        }
                        if let d = fault.delay, d <= .zero || d > .seconds(3600) {
                            fail("\(fpath).delay", "expected a duration above 0 and at most 1h")
                        }
                        if let status = fault.abortStatus, !(200...599).contains(status) {
                            fail("\(fpath).abort_status", "expected a status in 200...599, got \(status)")
                        }
                        if fault.delay == nil && fault.abortStatus == nil {
                            fail(fpath, "expected a delay or an abort_status")
                        }
                    }
                    if let retry = route.action.retryPolicy {
                        let ppath = "\(rpath).route.retry_policy"
                        if retry.retryOn.isEmpty { fail("\(ppath).retry_on", "expected at least one condition") }
                        if !(0...10).contains(retry.numRetries) {
                            fail("\(ppath).num_retries", "expected 0...10, got \(retry.numRetries)")
                        }
                        for code in retry.retriableStatusCodes where !(100...599).contains(code) {
                            fail("\(ppath).retriable_status_codes", "expected statuses in 100...599, got \(code)")
                        }
                        if let t = retry.perTryTimeout, t <= .zero {
                            fail("\(ppath).per_try_timeout", "expected a positive duration")
                        }
                        if !(retry.backoffBase > .zero && retry.backoffMax >= retry.backoffBase
                            && retry.backoffMax <= .seconds(60))
                        {
                            fail("\(ppath).backoff", "expected 0 < base <= max <= 60s")
                        }
                        if !(retry.budgetPercent > 0 && retry.budgetPercent <= 100) {
                            fail("\(ppath).budget.percent", "expected a number above 0 and at most 100")
                        }
                        if retry.minRetryConcurrency < 0 {
                            fail("\(ppath).budget.min_concurrency", "expected 0 or more")
                        }
                    }
                }
            }
        }
        for (li, listener) in listeners.enumerated() {
            let path = "listeners[\(li)]"
            if listener.name.isEmpty { fail("\(path).name", "expected a non-empty name") }
            if !listenerNames.insert(listener.name).inserted {
                fail("\(path).name", "duplicate listener name '\(listener.name)'")
            }
            if !(0...65535).contains(listener.address.port) {
                fail("\(path).address", "expected a port in 0...65535, got \(listener.address.port)")
            }
            if listener.address.port != 0 && !bound.insert(listener.address).inserted {
                fail("\(path).address", "another listener already binds \(listener.address)")
            }
            let limits = listener.limits
            if limits.maxRequestHeaderBytes < 1024 || limits.maxRequestHeaderBytes > ConnectionLimits.maxHeaderCeiling {
                fail(
                    "\(path).limits.max_request_header_bytes",
                    "expected 1024...\(ConnectionLimits.maxHeaderCeiling), got \(limits.maxRequestHeaderBytes)"
                )
            }
            if limits.requestHeaderTimeout <= .zero {
                fail("\(path).limits.request_header_timeout", "expected a positive duration")
            }
            if limits.idleTimeout <= .zero { fail("\(path).limits.idle_timeout", "expected a positive duration") }
            if let transparent = listener.transparent,
                transparent.sniffTimeout <= .zero || transparent.sniffTimeout > .seconds(10)
            {
                fail("\(path).transparent.sniff_timeout", "expected a duration above 0 and at most 10s")
            }
            var families: [String: Int] = [:]
            for (k, host) in (listener.transparent?.forwardTo ?? []).enumerated() {
                guard let parsed = try? SocketAddress(ipAddress: host, port: 0) else {
                    fail(
                        "\(path).transparent.forward_to[\(k)]",
                        "expected an IP address such as 127.0.0.1 or ::1, got '\(host)'"
                    )
                    continue
                }
                let family = parsed.protocol == .inet6 ? "IPv6" : "IPv4"
                if let first = families[family] {
                    fail(
                        "\(path).transparent.forward_to[\(k)]",
                        "a second \(family) address ('\(host)'; forward_to[\(first)] is one); expected at most one per family"
                    )
                }
                families[family] = families[family] ?? k
            }
            for (k, extra) in listener.additionalAddresses.enumerated() {
                let epath = "\(path).additional_addresses[\(k)]"
                if !(0...65535).contains(extra.port) { fail(epath, "expected a port in 0...65535, got \(extra.port)") }
                if extra.port != 0 && !bound.insert(extra).inserted {
                    fail(epath, "another listener already binds \(extra)")
                }
            }
            if listener.virtualHosts.isEmpty { fail("\(path).virtual_hosts", "expected at least one virtual host") }

            checkVirtualHosts(listener.virtualHosts, path: "\(path).virtual_hosts")
            if !listener.portVirtualHosts.isEmpty && listener.transparent == nil {
                fail("\(path).port_virtual_hosts", "only a transparent listener knows each connection's original port")
            }
            for port in listener.portVirtualHosts.keys.sorted() {
                let vpath = "\(path).port_virtual_hosts[\(port)]"
                if !(1...65535).contains(port) { fail(vpath, "expected a port in 1...65535, got \(port)") }
                if listener.portVirtualHosts[port]!.isEmpty { fail(vpath, "expected at least one virtual host") }
                checkVirtualHosts(listener.portVirtualHosts[port]!, path: vpath)
            }
        }
        return errors
    }

    /// A value as an error message shows it: control bytes escaped (a NUL shown as \0).
    static func shown(_ text: String) -> String {
        var out = ""
        for scalar in text.unicodeScalars {
            out += scalar.value < 32 || scalar.value == 127 ? scalar.escaped(asASCII: true) : String(scalar)
        }
        return out
    }
}
