import SwiftProtobuf
import TrellisConfig
import XDS

/// Reads one entry of `policies:` in mesh.yaml into the xDS fields pilot sends (``ServicePolicy``).
/// The keys, ranges and defaults are those of the gateway YAML's cluster and route settings, so
/// that a policy means the same to a Trellis agent and to an Envoy sidecar.
enum PolicyLoader {
    static let keys: Set<String> = [
        "connect_timeout", "circuit_breakers", "outlier_detection", "health_check", "timeout", "retry_policy",
        "rate_limit", "fault",
    ]

    static func policy(_ node: ConfigNode) throws(ConfigFileError) -> ServicePolicy {
        let keys = try node.mapping(allowed: Self.keys.union(["service"]))
        var policy = ServicePolicy()
        if let n = keys["connect_timeout"] {
            policy.cluster.connectTimeout = try duration(n, atMost: .seconds(60))
        }
        if let n = keys["circuit_breakers"] { policy.cluster.circuitBreakers = try circuitBreakers(n) }
        if let n = keys["outlier_detection"] { policy.cluster.outlierDetection = try outlierDetection(n) }
        if let n = keys["health_check"] { policy.cluster.healthChecks = [try healthCheck(n)] }
        if let n = keys["timeout"] { policy.route.timeout = try duration(n, atMost: .seconds(86_400)) }
        if let n = keys["retry_policy"] {
            let (retry, nonIdempotent, budget) = try retryPolicy(n)
            policy.route.retryPolicy = retry
            policy.retryNonIdempotent = nonIdempotent
            if let budget {
                if policy.cluster.circuitBreakers.thresholds.isEmpty {
                    policy.cluster.circuitBreakers.thresholds = [.init()]
                }
                policy.cluster.circuitBreakers.thresholds[0].retryBudget = budget
            }
        }
        do {
            if let n = keys["rate_limit"] {
                policy.perFilter[ServicePolicy.rateLimitFilter] = try Google_Protobuf_Any(message: try rateLimit(n))
            }
            if let n = keys["fault"] {
                policy.perFilter[ServicePolicy.faultFilter] = try Google_Protobuf_Any(message: try fault(n))
            }
        } catch let error as ConfigFileError {
            throw error
        } catch {
            throw node.error("cannot encode the policy: \(error)")
        }
        return policy
    }

    private static func duration(
        _ node: ConfigNode,
        atMost limit: Duration
    ) throws(ConfigFileError)
        -> Google_Protobuf_Duration
    {
        let d = try node.duration()
        guard d > .zero, d <= limit else { throw node.error("expected a duration above 0 and at most \(limit)") }
        return Translator.protobufDuration(d)
    }

    private static func uint32(
        _ node: ConfigNode,
        _ range: ClosedRange<Int>
    ) throws(ConfigFileError)
        -> Google_Protobuf_UInt32Value
    {
        Google_Protobuf_UInt32Value(UInt32(try node.int(in: range)))
    }

    /// Percent (0...100, fractional allowed) as parts per million.
    private static func fraction(_ node: ConfigNode?) throws(ConfigFileError) -> Envoy_Type_V3_FractionalPercent {
        var f = Envoy_Type_V3_FractionalPercent()
        f.denominator = .million
        guard let node else {
            f.numerator = 1_000_000
            return f
        }
        f.numerator = UInt32((try node.percentage() * 10_000).rounded())
        return f
    }

    private static func circuitBreakers(
        _ node: ConfigNode
    ) throws(ConfigFileError) -> Envoy_Config_Cluster_V3_CircuitBreakers {
        let keys = try node.mapping(allowed: ["max_connections", "max_pending_requests", "max_requests", "max_retries"])
        // Envoy's defaults, which the agent shares, for the limits not given.
        var t = Envoy_Config_Cluster_V3_CircuitBreakers.Thresholds()
        let range = 0...1_000_000
        t.maxConnections =
            try keys["max_connections"].map { n throws(ConfigFileError) in try uint32(n, range) } ?? .init(1024)
        t.maxPendingRequests =
            try keys["max_pending_requests"].map { n throws(ConfigFileError) in try uint32(n, range) } ?? .init(1024)
        t.maxRequests =
            try keys["max_requests"].map { n throws(ConfigFileError) in try uint32(n, range) } ?? .init(1024)
        t.maxRetries = try keys["max_retries"].map { n throws(ConfigFileError) in try uint32(n, range) } ?? .init(3)
        var breakers = Envoy_Config_Cluster_V3_CircuitBreakers()
        breakers.thresholds = [t]
        return breakers
    }

    private static func outlierDetection(
        _ node: ConfigNode
    ) throws(ConfigFileError)
        -> Envoy_Config_Cluster_V3_OutlierDetection
    {
        let keys = try node.mapping(allowed: [
            "consecutive_errors", "interval", "base_ejection_time", "max_ejection_time", "max_ejection_percent",
            "success_rate",
        ])
        var o = Envoy_Config_Cluster_V3_OutlierDetection()
        o.consecutive5Xx =
            try keys["consecutive_errors"].map { n throws(ConfigFileError) in try uint32(n, 1...1_000_000) } ?? .init(5)
        o.interval =
            try keys["interval"].map { n throws(ConfigFileError) in try duration(n, atMost: .seconds(86_400)) }
            ?? .init(seconds: 10)
        o.baseEjectionTime =
            try keys["base_ejection_time"].map { n throws(ConfigFileError) in try duration(n, atMost: .seconds(86_400))
            }
            ?? .init(seconds: 30)
        o.maxEjectionTime =
            try keys["max_ejection_time"].map { n throws(ConfigFileError) in try duration(n, atMost: .seconds(86_400)) }
            ?? .init(seconds: 300)
        o.maxEjectionPercent =
            try keys["max_ejection_percent"].map { n throws(ConfigFileError) in try uint32(n, 0...100) } ?? .init(10)
        // Failures of every origin count together, as the agent counts them; gateway failures are
        // 5xx too, so their own counter stays off.
        o.enforcingConsecutive5Xx = .init(100)
        o.enforcingConsecutiveGatewayFailure = .init(0)
        if let rateNode = keys["success_rate"] {
            let r = try rateNode.mapping(allowed: ["minimum_hosts", "request_volume", "stdev_factor"])
            o.enforcingSuccessRate = .init(100)
            o.successRateMinimumHosts =
                try r["minimum_hosts"].map { n throws(ConfigFileError) in try uint32(n, 1...10_000) } ?? .init(5)
            o.successRateRequestVolume =
                try r["request_volume"].map { n throws(ConfigFileError) in try uint32(n, 1...1_000_000) } ?? .init(100)
            let factor =
                try r["stdev_factor"].map { n throws(ConfigFileError) in try n.number(above: 0, atMost: 100) } ?? 1.9
            o.successRateStdevFactor = .init(UInt32((factor * 1000).rounded()))
        } else {
            o.enforcingSuccessRate = .init(0)
        }
        return o
    }

    private static func healthCheck(_ node: ConfigNode) throws(ConfigFileError) -> Envoy_Config_Core_V3_HealthCheck {
        let keys = try node.mapping(allowed: [
            "http", "tcp", "interval", "timeout", "healthy_threshold", "unhealthy_threshold",
        ])
        var check = Envoy_Config_Core_V3_HealthCheck()
        switch (keys["http"], keys["tcp"]) {
        case (let http?, nil):
            let h = try http.mapping(allowed: ["path", "host", "expected_statuses"])
            let pathNode = try h.required("path", in: http)
            let path = try pathNode.nonEmptyString()
            guard path.hasPrefix("/") else { throw pathNode.error("expected a path starting with '/', got '\(path)'") }
            var probe = Envoy_Config_Core_V3_HealthCheck.HttpHealthCheck()
            probe.path = path
            if let host = h["host"] { probe.host = try host.nonEmptyString() }
            let ranges = try h["expected_statuses"]?.statusRanges() ?? [200...399]
            // Envoy's ranges end before their end.
            probe.expectedStatuses = ranges.map { r in
                var range = Envoy_Type_V3_Int64Range()
                range.start = Int64(r.lowerBound)
                range.end = Int64(r.upperBound + 1)
                return range
            }
            check.httpHealthCheck = probe
        case (nil, let tcp?):
            _ = try tcp.mapping(allowed: [])
            check.tcpHealthCheck = .init()
        default:
            throw node.error("expected exactly one of http or tcp")
        }
        check.interval =
            try keys["interval"].map { n throws(ConfigFileError) in try duration(n, atMost: .seconds(3600)) }
            ?? .init(seconds: 5)
        check.timeout =
            try keys["timeout"].map { n throws(ConfigFileError) in try duration(n, atMost: .seconds(3600)) }
            ?? .init(seconds: 1)
        if check.timeout.seconds * 1_000_000_000 + Int64(check.timeout.nanos)
            > check.interval.seconds * 1_000_000_000 + Int64(check.interval.nanos)
        {
            throw (keys["timeout"] ?? node).error("expected a timeout no longer than the interval")
        }
        check.healthyThreshold =
            try keys["healthy_threshold"].map { n throws(ConfigFileError) in try uint32(n, 1...100) } ?? .init(2)
        check.unhealthyThreshold =
            try keys["unhealthy_threshold"].map { n throws(ConfigFileError) in try uint32(n, 1...100) } ?? .init(3)
        return check
    }

    static let retryConditions = [
        "connect-failure", "reset", "gateway-error", "5xx", "retriable-status-codes",
        // gRPC statuses (Envoy's x-envoy-retry-grpc-on names)
        "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable",
    ]

    private static func retryPolicy(
        _ node: ConfigNode
    ) throws(ConfigFileError) -> (
        Envoy_Config_Route_V3_RetryPolicy, Bool, Envoy_Config_Cluster_V3_CircuitBreakers.Thresholds.RetryBudget?
    ) {
        let keys = try node.mapping(allowed: [
            "retry_on", "num_retries", "retriable_status_codes", "per_try_timeout", "backoff", "retry_non_idempotent",
            "budget",
        ])
        var retry = Envoy_Config_Route_V3_RetryPolicy()
        var conditions = ["connect-failure", "reset", "gateway-error"]
        if let list = keys["retry_on"] {
            conditions = []
            for item in try list.sequence() {
                let name = try item.nonEmptyString()
                guard retryConditions.contains(name) else {
                    throw item.error("expected one of \(retryConditions.joined(separator: ", ")), got '\(name)'")
                }
                if !conditions.contains(name) { conditions.append(name) }
            }
            guard !conditions.isEmpty else { throw list.error("expected at least one condition") }
        }
        retry.retryOn = conditions.joined(separator: ",")
        retry.numRetries =
            try keys["num_retries"].map { n throws(ConfigFileError) in try uint32(n, 0...10) } ?? .init(1)
        if let list = keys["retriable_status_codes"] {
            for item in try list.sequence() { retry.retriableStatusCodes.append(UInt32(try item.int(in: 100...599))) }
        }
        if conditions.contains("retriable-status-codes") && retry.retriableStatusCodes.isEmpty {
            throw (keys["retry_on"] ?? node).error("retriable-status-codes needs retriable_status_codes")
        }
        if let n = keys["per_try_timeout"] { retry.perTryTimeout = try duration(n, atMost: .seconds(3600)) }
        if let b = keys["backoff"] {
            let bk = try b.mapping(allowed: ["base", "max"])
            let base = try bk["base"]?.duration() ?? .milliseconds(25)
            let max = try bk["max"]?.duration() ?? .milliseconds(250)
            guard base > .zero, max >= base, max <= .seconds(60) else {
                throw b.error("expected 0 < base <= max <= 60s")
            }
            retry.retryBackOff.baseInterval = Translator.protobufDuration(base)
            retry.retryBackOff.maxInterval = Translator.protobufDuration(max)
        }
        let nonIdempotent = try keys["retry_non_idempotent"]?.bool() ?? false
        var budget: Envoy_Config_Cluster_V3_CircuitBreakers.Thresholds.RetryBudget?
        if let b = keys["budget"] {
            let bk = try b.mapping(allowed: ["percent", "min_concurrency"])
            var value = Envoy_Config_Cluster_V3_CircuitBreakers.Thresholds.RetryBudget()
            value.budgetPercent.value = try bk["percent"]?.number(above: 0, atMost: 100) ?? 20
            value.minRetryConcurrency =
                try bk["min_concurrency"].map { n throws(ConfigFileError) in try uint32(n, 0...1_000_000) } ?? .init(3)
            budget = value
        }
        return (retry, nonIdempotent, budget)
    }

    /// One shared bucket for the route (the agent's `per: all`): `max_tokens` is the burst, and
    /// the rate is `tokens_per_fill` per `fill_interval`, the shortest whole number of seconds
    /// that makes the count whole (0.5/s: 1 per 2 s).
    private static func rateLimit(
        _ node: ConfigNode
    ) throws(ConfigFileError)
        -> Envoy_Extensions_Filters_Http_LocalRatelimit_V3_LocalRateLimit
    {
        let keys = try node.mapping(allowed: ["requests_per_second", "burst"])
        let rateNode = try keys.required("requests_per_second", in: node)
        let rate = try rateNode.number(above: 0, atMost: 10_000_000)
        guard
            let seconds = [1, 2, 4, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000].first(where: { s in
                let tokens = rate * Double(s)
                return abs(tokens - tokens.rounded()) < 1e-6 && tokens.rounded() >= 1
            })
        else {
            throw rateNode.error("expected a rate with at most 3 decimals (e.g. 0.5 or 2.25), got \(rate)")
        }
        let burst = try keys["burst"]?.int(in: 1...10_000_000) ?? max(1, Int(rate.rounded(.up)))
        var limit = Envoy_Extensions_Filters_Http_LocalRatelimit_V3_LocalRateLimit()
        limit.statPrefix = "trellis_rate_limit"
        limit.tokenBucket.maxTokens = UInt32(burst)
        limit.tokenBucket.tokensPerFill = .init(UInt32((rate * Double(seconds)).rounded()))
        limit.tokenBucket.fillInterval = .init(seconds: Int64(seconds))
        var everything = Envoy_Config_Core_V3_RuntimeFractionalPercent()
        everything.defaultValue.numerator = 100
        everything.defaultValue.denominator = .hundred
        limit.filterEnabled = everything
        limit.filterEnforced = everything
        return limit
    }

    private static func fault(
        _ node: ConfigNode
    ) throws(ConfigFileError) -> Envoy_Extensions_Filters_Http_Fault_V3_HTTPFault {
        let keys = try node.mapping(allowed: ["delay", "delay_percent", "abort_status", "abort_percent"])
        var fault = Envoy_Extensions_Filters_Http_Fault_V3_HTTPFault()
        if let n = keys["delay"] {
            fault.delay.fixedDelay = try duration(n, atMost: .seconds(3600))
            fault.delay.percentage = try fraction(keys["delay_percent"])
        } else if let n = keys["delay_percent"] {
            throw n.error("delay_percent needs a delay")
        }
        if let n = keys["abort_status"] {
            fault.abort.httpStatus = UInt32(try n.int(in: 200...599))
            fault.abort.percentage = try fraction(keys["abort_percent"])
        } else if let n = keys["abort_percent"] {
            throw n.error("abort_percent needs an abort_status")
        }
        guard fault.hasDelay || fault.hasAbort else { throw node.error("expected a delay or an abort_status") }
        return fault
    }
}
