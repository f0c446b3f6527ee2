public import TrellisConfig
import TrellisValues

// One YAML decoder per policy concept, used by every file that names the concept: the gateway file
// (clusters and routes), mesh.yaml's `policies:` (which pilot then encodes as xDS) and, through
// pilot, every agent. The keys, bounds and defaults are therefore the same everywhere, and an
// error names the file, line and key path wherever it is found. See examples/gateway.yaml and
// examples/mesh.yaml for the keys, documented.

/// Bounds shared by the decoders.
public enum PolicyBounds {
    /// `connect_timeout`: above 0, at most a minute.
    public static let maxConnectTimeout = Duration.seconds(60)
    /// A route's request timeout and a policy's `timeout`: at most a day.
    public static let maxRequestTimeout = Duration.seconds(86_400)
    /// `per_try_timeout`, health-check intervals and timeouts, fault delays: at most an hour.
    public static let maxShortTimeout = Duration.seconds(3600)
    /// Outlier detection's interval and ejection times: at most a day.
    public static let maxEjectionTime = Duration.seconds(86_400)
    /// The fill intervals a rate may be sent with over xDS (a whole number of tokens per fill, as
    /// Envoy's token bucket needs): the divisors of 1000 s, so any rate with at most 3 decimals.
    public static let rateFillIntervals = [1, 2, 4, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000]
    /// Locality failover (`overprovisioning_factor`, percent): a priority level keeps this times
    /// its available share of the traffic (Envoy's default 140: a zone at 71 % health still takes
    /// it all); 100 spills as soon as anything fails.
    public static let overprovisioning = 100...1000
    public static let defaultOverprovisioning = 140
}

extension ConfigNode {
    /// A duration above 0 and at most `limit`.
    public func duration(atMost limit: Duration) throws(ConfigFileError) -> Duration {
        let d = try duration()
        guard d > .zero, d <= limit else {
            throw error("expected a duration above 0 and at most \(Self.largestUnit(limit))")
        }
        return d
    }

    /// A route's request timeout (the gateway file's routes, mesh.yaml's rules and policies): a
    /// duration above 0 and at most 24h, or `none` for no limit (returned as `.zero`, which xDS
    /// also uses for "no timeout").
    public func requestTimeout() throws(ConfigFileError) -> Duration {
        if isScalar, (try? string()) == "none" { return .zero }
        return try duration(atMost: PolicyBounds.maxRequestTimeout)
    }

    /// `limit` in the largest whole unit, as a person writes a bound: 1h, 24h, 60s.
    private static func largestUnit(_ limit: Duration) -> String {
        let (seconds, attoseconds) = limit.components
        guard attoseconds == 0, seconds > 0 else { return DurationText.format(limit) }
        if seconds % 3600 == 0 { return "\(seconds / 3600)h" }
        if seconds % 60 == 0 && seconds > 60 { return "\(seconds / 60)m" }
        return "\(seconds)s"
    }
}

extension RateLimit {
    /// `{requests_per_second: 100, burst: 200, per: all | client_address | header, header: x-api-key}`.
    /// The rate has at most 3 decimals (0.5, 2.25: a whole number of requests per fill interval,
    /// see ``PolicyBounds/rateFillIntervals``); the burst defaults to one second's worth.
    public static func decode(_ node: ConfigNode) throws(ConfigFileError) -> RateLimit {
        let keys = try node.mapping(allowed: ["requests_per_second", "burst", "per", "header"])
        let rateNode = try keys.required("requests_per_second", in: node)
        let rate = try rateNode.number(above: 0, atMost: RateLimit.maxRequestsPerSecond)
        guard fillInterval(for: rate) != nil else {
            throw rateNode.error("expected a rate with at most 3 decimals (e.g. 0.5 or 2.25), got \(rate)")
        }
        let burst = try keys["burst"]?.int(in: 1...RateLimit.maxBurst) ?? max(1, Int(rate.rounded(.up)))
        var key = RateLimit.Key.all
        let per = try keys["per"]?.nonEmptyString() ?? "all"
        switch per {
        case "all": key = .all
        case "client_address": key = .clientAddress
        case "header":
            let headerNode = try keys.required("header", in: node)
            let name = try headerNode.nonEmptyString()
            guard HTTPToken.isToken(name) else { throw headerNode.error("expected a header name, got '\(name)'") }
            key = .header(name.lowercased())
        default:
            throw keys["per"]!.error("expected one of all, client_address, header, got '\(per)'")
        }
        if per != "header", let h = keys["header"] { throw h.error("header is only used with per: header") }
        return RateLimit(requestsPerSecond: rate, burst: burst, key: key)
    }

    /// The shortest fill interval of ``PolicyBounds/rateFillIntervals`` in which `rate` gives a
    /// whole number of tokens (at least one), with that number; nil when none does.
    public static func fillInterval(for rate: Double) -> (seconds: Int, tokens: Int)? {
        for seconds in PolicyBounds.rateFillIntervals {
            let tokens = rate * Double(seconds)
            if abs(tokens - tokens.rounded()) < 1e-6 && tokens.rounded() >= 1 {
                return (seconds, Int(tokens.rounded()))
            }
        }
        return nil
    }
}

extension HealthCheck {
    /// The shortest probe interval any file may ask for.
    public static let minInterval = Duration.milliseconds(100)

    /// `{http: {path: /healthz, host: name, expected_statuses: [200, "200-299"]} | tcp: {},
    /// interval: 5s, timeout: 1s, healthy_threshold: 2, unhealthy_threshold: 3}`, in the gateway
    /// file's clusters, mesh.yaml's policies and agent.yaml's services alike; `http: /healthz` and
    /// `tcp: true` are short for `http: {path: /healthz}` and `tcp: {}`.
    public static func decode(_ node: ConfigNode) throws(ConfigFileError) -> HealthCheck {
        let keys = try node.mapping(allowed: [
            "http", "tcp", "interval", "timeout", "healthy_threshold", "unhealthy_threshold",
        ])
        let kind: HealthCheck.Kind
        switch (keys["http"], keys["tcp"]) {
        case (let http?, nil):
            let pathNode: ConfigNode
            var host: String?
            var statuses: [ClosedRange<Int>] = [200...399]
            if http.isScalar {
                pathNode = http
            } else {
                let h = try http.mapping(allowed: ["path", "host", "expected_statuses"])
                pathNode = try h.required("path", in: http)
                host = try h["host"]?.nonEmptyString()
                if let list = h["expected_statuses"] { statuses = try list.statusRanges() }
            }
            let path = try pathNode.nonEmptyString()
            guard path.hasPrefix("/") else { throw pathNode.error("expected a path starting with '/', got '\(path)'") }
            kind = .http(path: path, host: host, expectedStatuses: statuses)
        case (nil, let tcp?):
            if tcp.isScalar {
                guard try tcp.bool() else { throw tcp.error("expected true or {} (leave tcp out for no TCP check)") }
            } else {
                _ = try tcp.mapping(allowed: [])
            }
            kind = .tcp
        default:
            throw node.error("expected exactly one of http or tcp")
        }
        var check = HealthCheck(kind: kind)
        if let n = keys["interval"] {
            check.interval = try n.duration(atMost: PolicyBounds.maxShortTimeout)
            guard check.interval >= minInterval else { throw n.error("expected an interval of at least 100ms") }
        }
        if let n = keys["timeout"] { check.timeout = try n.duration(atMost: PolicyBounds.maxShortTimeout) }
        if check.timeout > check.interval {
            throw (keys["timeout"] ?? node).error("expected a timeout no longer than the interval")
        }
        if let n = keys["healthy_threshold"] { check.healthyThreshold = try n.int(in: 1...100) }
        if let n = keys["unhealthy_threshold"] { check.unhealthyThreshold = try n.int(in: 1...100) }
        return check
    }
}

extension OutlierDetection {
    /// `{consecutive_errors: 5, interval: 10s, base_ejection_time: 30s, max_ejection_time: 300s,
    /// max_ejection_percent: 10, success_rate: {minimum_hosts: 5, request_volume: 100,
    /// stdev_factor: 1.9}}`; keys not given keep these defaults, no `success_rate`: not judged.
    public static func decode(_ node: ConfigNode) throws(ConfigFileError) -> OutlierDetection {
        let keys = try node.mapping(allowed: [
            "consecutive_errors", "interval", "base_ejection_time", "max_ejection_time", "max_ejection_percent",
            "success_rate",
        ])
        var o = OutlierDetection()
        let limit = PolicyBounds.maxEjectionTime
        if let n = keys["consecutive_errors"] { o.consecutiveErrors = try n.int(in: 1...1_000_000) }
        if let n = keys["interval"] { o.interval = try n.duration(atMost: limit) }
        if let n = keys["base_ejection_time"] { o.baseEjectionTime = try n.duration(atMost: limit) }
        if let n = keys["max_ejection_time"] { o.maxEjectionTime = try n.duration(atMost: limit) }
        if o.baseEjectionTime > o.maxEjectionTime {
            throw (keys["max_ejection_time"] ?? keys["base_ejection_time"] ?? node).error(
                "expected base_ejection_time no longer than max_ejection_time"
            )
        }
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
}

extension FaultInjection {
    /// `{delay: 2s, delay_percent: 10, abort_status: 503, abort_percent: 5}`.
    public static func decode(_ node: ConfigNode) throws(ConfigFileError) -> FaultInjection {
        let keys = try node.mapping(allowed: ["delay", "delay_percent", "abort_status", "abort_percent"])
        var f = FaultInjection()
        func percent(_ key: String) throws(ConfigFileError) -> Double { try keys[key]?.percentage() ?? 100 }
        if let n = keys["delay"] {
            f.delay = try n.duration(atMost: PolicyBounds.maxShortTimeout)
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
}

extension RetryPolicy {
    /// `{retry_on: [connect-failure, reset, gateway-error, 5xx, retriable-status-codes],
    /// num_retries: 1, retriable_status_codes: [409], per_try_timeout: 1s,
    /// backoff: {base: 25ms, max: 250ms}, retry_non_idempotent: false,
    /// budget: {percent: 20, min_concurrency: 3}}`.
    public static func decode(_ node: ConfigNode) throws(ConfigFileError) -> RetryPolicy {
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
        if let n = keys["per_try_timeout"] { p.perTryTimeout = try n.duration(atMost: PolicyBounds.maxShortTimeout) }
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
}

extension CircuitBreakers {
    /// `{max_connections, max_pending_requests, max_requests, max_retries}`, each 0...1000000;
    /// those not given keep their defaults (Envoy's: 1024, 1024, 1024, 3).
    public static func decode(_ node: ConfigNode) throws(ConfigFileError) -> CircuitBreakers {
        let keys = try node.mapping(allowed: ["max_connections", "max_pending_requests", "max_requests", "max_retries"])
        var limits = CircuitBreakers()
        let range = 0...CircuitBreakers.maxLimit
        if let n = keys["max_connections"] { limits.maxConnections = try n.int(in: range) }
        if let n = keys["max_pending_requests"] { limits.maxPendingRequests = try n.int(in: range) }
        if let n = keys["max_requests"] { limits.maxRequests = try n.int(in: range) }
        if let n = keys["max_retries"] { limits.maxRetries = try n.int(in: range) }
        return limits
    }
}

/// RFC 9110 tokens: header names and methods.
public enum HTTPToken {
    public static func isToken(_ s: String) -> Bool {
        guard !s.isEmpty else { return false }
        return s.utf8.allSatisfy { c in
            switch c {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                UInt8(ascii: "0")...UInt8(ascii: "9"):
                return true
            default:
                return "!#$%&'*+-.^_`|~".utf8.contains(c)
            }
        }
    }
}
