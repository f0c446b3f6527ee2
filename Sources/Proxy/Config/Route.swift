public import TrellisPolicy

/// A route: what a request must look like, and where it goes. The first matching route wins.
public struct Route: Sendable, Hashable, Codable {
    public var name: String
    public var match: RouteMatch
    public var action: RouteAction

    public init(name: String, match: RouteMatch, action: RouteAction) {
        self.name = name
        self.match = match
        self.action = action
    }
}

/// Where a matched request goes.
public struct RouteAction: Sendable, Hashable, Codable {
    /// One or more clusters; a request picks one at random in proportion to the weights.
    public var clusters: [WeightedCluster]
    /// The whole exchange (connect, request, response) must finish within this time, or the
    /// client gets 504 `timeout`. `nil` means no limit.
    public var timeout: Duration?
    /// A rate limit on the requests this route matches.
    public var rateLimit: RateLimit?
    /// Retries of failed tries; `nil`: none.
    public var retryPolicy: RetryPolicy?
    /// Delays and aborts injected on purpose; `nil`: none.
    public var fault: FaultInjection?

    public init(
        clusters: [WeightedCluster],
        timeout: Duration? = .seconds(15),
        rateLimit: RateLimit? = nil,
        retryPolicy: RetryPolicy? = nil,
        fault: FaultInjection? = nil
    ) {
        self.fault = fault
        self.clusters = clusters
        self.timeout = timeout
        self.rateLimit = rateLimit
        self.retryPolicy = retryPolicy
    }

    enum CodingKeys: String, CodingKey {
        case clusters, timeout
        case rateLimit = "rate_limit"
        case retryPolicy = "retry_policy"
        case fault
    }
}

public struct WeightedCluster: Sendable, Hashable, Codable {
    public var name: String
    public var weight: Int

    public init(name: String, weight: Int = 1) {
        self.name = name
        self.weight = weight
    }
}
