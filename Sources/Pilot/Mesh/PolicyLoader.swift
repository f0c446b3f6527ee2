import SwiftProtobuf
import TrellisConfig
import TrellisPolicy
import XDS

/// Reads one entry of `policies:` in mesh.yaml into the xDS fields pilot sends (``ServicePolicy``).
/// Each concept is read by the decoder the gateway file uses too (TrellisPolicy), so a key means
/// the same, with the same bounds and defaults, in both files; then ``PolicyEncoding`` writes it
/// as the Envoy fields a Trellis agent and an Envoy sidecar both honour.
enum PolicyLoader {
    static let keys: Set<String> = [
        "connect_timeout", "circuit_breakers", "outlier_detection", "health_check", "timeout", "retry_policy",
        "rate_limit", "fault", "lb_policy", "ring_hash", "overprovisioning_factor",
    ]

    static func policy(_ node: ConfigNode) throws(ConfigFileError) -> ServicePolicy {
        let keys = try node.mapping(allowed: Self.keys.union(["service"]))
        var policy = ServicePolicy()
        if keys["lb_policy"] != nil || keys["ring_hash"] != nil {
            let balancing = PolicyEncoding.loadBalancing(try LoadBalancingPolicy.decode(keys, in: node))
            policy.cluster.lbPolicy = balancing.policy
            if let ring = balancing.ring { policy.cluster.ringHashLbConfig = ring }
            policy.route.hashPolicy = balancing.hash
        }
        if let n = keys["overprovisioning_factor"] {
            policy.overprovisioningFactor = try n.int(in: PolicyBounds.overprovisioning)
        }
        if let n = keys["connect_timeout"] {
            let timeout = try n.duration(atMost: PolicyBounds.maxConnectTimeout)
            policy.cluster.connectTimeout = Translator.protobufDuration(timeout)
        }
        if let n = keys["circuit_breakers"] {
            policy.cluster.circuitBreakers = PolicyEncoding.circuitBreakers(try CircuitBreakers.decode(n))
        }
        if let n = keys["outlier_detection"] {
            policy.cluster.outlierDetection = PolicyEncoding.outlierDetection(try OutlierDetection.decode(n))
        }
        if let n = keys["health_check"] {
            policy.cluster.healthChecks = [PolicyEncoding.healthCheck(try HealthCheck.decode(n))]
        }
        if let n = keys["timeout"] {
            policy.route.timeout = Translator.protobufDuration(try n.requestTimeout())
        }
        if let n = keys["retry_policy"] {
            let retry = try RetryPolicy.decode(n)
            policy.route.retryPolicy = PolicyEncoding.retryPolicy(retry)
            policy.retryNonIdempotent = retry.retryNonIdempotent
            // The budget is the cluster's (Envoy's field): the agent applies its default budget
            // when none is sent, so it is always sent, and Envoy then budgets retries the same way.
            if policy.cluster.circuitBreakers.thresholds.isEmpty {
                policy.cluster.circuitBreakers.thresholds = [PolicyEncoding.thresholds(CircuitBreakers())]
            }
            policy.cluster.circuitBreakers.thresholds[0].retryBudget = PolicyEncoding.retryBudget(retry)
        }
        do {
            if let n = keys["rate_limit"] {
                let limit = try RateLimit.decode(n)
                guard limit.key == .all else {
                    throw n.error(
                        "per: client_address and per: header are gateway-only: pilot sends one bucket shared by a route's requests"
                    )
                }
                policy.perFilter[ServicePolicy.rateLimitFilter] = try Google_Protobuf_Any(
                    message: PolicyEncoding.rateLimit(limit)
                )
            }
            if let n = keys["fault"] {
                policy.perFilter[ServicePolicy.faultFilter] = try Google_Protobuf_Any(
                    message: PolicyEncoding.fault(try FaultInjection.decode(n))
                )
            }
        } catch let error as ConfigFileError {
            throw error
        } catch {
            throw node.error("cannot encode the policy: \(error)")
        }
        return policy
    }
}

/// The policy model (TrellisPolicy) as Envoy's xDS fields.
enum PolicyEncoding {
    private static func uint32(_ value: Int) -> Google_Protobuf_UInt32Value {
        Google_Protobuf_UInt32Value(UInt32(value))
    }

    /// Percent (0...100, fractional allowed) as parts per million.
    private static func fraction(_ percent: Double) -> Envoy_Type_V3_FractionalPercent {
        var f = Envoy_Type_V3_FractionalPercent()
        f.denominator = .million
        f.numerator = UInt32((percent * 10_000).rounded())
        return f
    }

    /// A balancing policy as Envoy's cluster fields, and the hash policy every route to the
    /// service carries for a ring hash (Envoy hashes what the route says). Round robin and weighted
    /// are both Envoy's round robin, which weights endpoints by their `load_balancing_weight`.
    static func loadBalancing(
        _ policy: LoadBalancingPolicy
    ) -> (
        policy: Envoy_Config_Cluster_V3_Cluster.LbPolicy, ring: Envoy_Config_Cluster_V3_Cluster.RingHashLbConfig?,
        hash: [Envoy_Config_Route_V3_RouteAction.HashPolicy]
    ) {
        switch policy {
        case .roundRobin, .weighted: return (.roundRobin, nil, [])
        case .leastRequest: return (.leastRequest, nil, [])
        case .random: return (.random, nil, [])
        case .ringHash(let key, let size):
            var ring = Envoy_Config_Cluster_V3_Cluster.RingHashLbConfig()
            ring.minimumRingSize = .init(UInt64(size))
            var hash = Envoy_Config_Route_V3_RouteAction.HashPolicy()
            switch key {
            case .header(let name): hash.header.headerName = name
            case .cookie(let name): hash.cookie.name = name
            case .sourceAddress: hash.connectionProperties.sourceIp = true
            }
            return (.ringHash, ring, [hash])
        }
    }

    static func thresholds(_ limits: CircuitBreakers) -> Envoy_Config_Cluster_V3_CircuitBreakers.Thresholds {
        var t = Envoy_Config_Cluster_V3_CircuitBreakers.Thresholds()
        t.maxConnections = uint32(limits.maxConnections)
        t.maxPendingRequests = uint32(limits.maxPendingRequests)
        t.maxRequests = uint32(limits.maxRequests)
        t.maxRetries = uint32(limits.maxRetries)
        return t
    }

    static func circuitBreakers(_ limits: CircuitBreakers) -> Envoy_Config_Cluster_V3_CircuitBreakers {
        var breakers = Envoy_Config_Cluster_V3_CircuitBreakers()
        breakers.thresholds = [thresholds(limits)]
        return breakers
    }

    static func outlierDetection(_ policy: OutlierDetection) -> Envoy_Config_Cluster_V3_OutlierDetection {
        var o = Envoy_Config_Cluster_V3_OutlierDetection()
        o.consecutive5Xx = uint32(policy.consecutiveErrors)
        o.interval = Translator.protobufDuration(policy.interval)
        o.baseEjectionTime = Translator.protobufDuration(policy.baseEjectionTime)
        o.maxEjectionTime = Translator.protobufDuration(policy.maxEjectionTime)
        o.maxEjectionPercent = uint32(policy.maxEjectionPercent)
        // Failures of every origin count together, as the agent counts them; gateway failures are
        // 5xx too, so their own counter stays off.
        o.enforcingConsecutive5Xx = .init(100)
        o.enforcingConsecutiveGatewayFailure = .init(0)
        if let rate = policy.successRate {
            o.enforcingSuccessRate = .init(100)
            o.successRateMinimumHosts = uint32(rate.minimumHosts)
            o.successRateRequestVolume = uint32(rate.requestVolume)
            o.successRateStdevFactor = .init(UInt32((rate.stdevFactor * 1000).rounded()))
        } else {
            o.enforcingSuccessRate = .init(0)
        }
        return o
    }

    static func healthCheck(_ policy: HealthCheck) -> Envoy_Config_Core_V3_HealthCheck {
        var check = Envoy_Config_Core_V3_HealthCheck()
        switch policy.kind {
        case .http(let path, let host, let statuses):
            var probe = Envoy_Config_Core_V3_HealthCheck.HttpHealthCheck()
            probe.path = path
            if let host { probe.host = host }
            // Envoy's ranges end before their end.
            probe.expectedStatuses = statuses.map { r in
                var range = Envoy_Type_V3_Int64Range()
                range.start = Int64(r.lowerBound)
                range.end = Int64(r.upperBound + 1)
                return range
            }
            check.httpHealthCheck = probe
        case .tcp:
            check.tcpHealthCheck = .init()
        }
        check.interval = Translator.protobufDuration(policy.interval)
        check.timeout = Translator.protobufDuration(policy.timeout)
        check.healthyThreshold = uint32(policy.healthyThreshold)
        check.unhealthyThreshold = uint32(policy.unhealthyThreshold)
        return check
    }

    static func retryPolicy(_ policy: RetryPolicy) -> Envoy_Config_Route_V3_RetryPolicy {
        var retry = Envoy_Config_Route_V3_RetryPolicy()
        // In the model's declaration order, so that equal policies encode equally.
        retry.retryOn = RetryPolicy.Condition.allCases.filter(policy.retryOn.contains).map(\.rawValue)
            .joined(separator: ",")
        retry.numRetries = uint32(policy.numRetries)
        retry.retriableStatusCodes = policy.retriableStatusCodes.map { UInt32($0) }
        if let perTry = policy.perTryTimeout { retry.perTryTimeout = Translator.protobufDuration(perTry) }
        retry.retryBackOff.baseInterval = Translator.protobufDuration(policy.backoffBase)
        retry.retryBackOff.maxInterval = Translator.protobufDuration(policy.backoffMax)
        return retry
    }

    /// What a route carries that Envoy has no field for: retrying non-idempotent requests (route
    /// metadata `trellis`, read by the agent, ignored by Envoy).
    static func routeMetadata(_ policy: ServicePolicy) -> [String: Google_Protobuf_Struct] {
        guard policy.retryNonIdempotent else { return [:] }
        return [
            "trellis": Google_Protobuf_Struct(fields: ["retry_non_idempotent": Google_Protobuf_Value(boolValue: true)])
        ]
    }

    static func retryBudget(_ policy: RetryPolicy) -> Envoy_Config_Cluster_V3_CircuitBreakers.Thresholds.RetryBudget {
        var budget = Envoy_Config_Cluster_V3_CircuitBreakers.Thresholds.RetryBudget()
        budget.budgetPercent.value = policy.budgetPercent
        budget.minRetryConcurrency = uint32(policy.minRetryConcurrency)
        return budget
    }

    /// One shared bucket for the route (the agent's `per: all`): `max_tokens` is the burst, and
    /// the rate is `tokens_per_fill` per `fill_interval`, the shortest interval that makes the
    /// count whole (0.5/s: 1 per 2 s; the decoder refused rates no interval fits).
    static func rateLimit(_ limit: RateLimit) -> Envoy_Extensions_Filters_Http_LocalRatelimit_V3_LocalRateLimit {
        let (seconds, tokens) = RateLimit.fillInterval(for: limit.requestsPerSecond) ?? (1, 1)
        var bucket = Envoy_Extensions_Filters_Http_LocalRatelimit_V3_LocalRateLimit()
        bucket.statPrefix = "trellis_rate_limit"
        bucket.tokenBucket.maxTokens = UInt32(limit.burst)
        bucket.tokenBucket.tokensPerFill = .init(UInt32(tokens))
        bucket.tokenBucket.fillInterval = .init(seconds: Int64(seconds))
        var everything = Envoy_Config_Core_V3_RuntimeFractionalPercent()
        everything.defaultValue.numerator = 100
        everything.defaultValue.denominator = .hundred
        bucket.filterEnabled = everything
        bucket.filterEnforced = everything
        return bucket
    }

    static func fault(_ policy: FaultInjection) -> Envoy_Extensions_Filters_Http_Fault_V3_HTTPFault {
        var fault = Envoy_Extensions_Filters_Http_Fault_V3_HTTPFault()
        if let delay = policy.delay {
            fault.delay.fixedDelay = Translator.protobufDuration(delay)
            fault.delay.percentage = fraction(policy.delayPercent)
        }
        if let status = policy.abortStatus {
            fault.abort.httpStatus = UInt32(status)
            fault.abort.percentage = fraction(policy.abortPercent)
        }
        return fault
    }
}
