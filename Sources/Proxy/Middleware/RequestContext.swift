public import NIOCore
public import NIOHTTP1
import TrellisPolicy

/// Everything the middleware chain knows about one request. It lives on the event loop that
/// accepted the request and is never shared with another.
public final class RequestContext {
    /// The request head as it will be sent upstream; middleware may edit it.
    public var head: HTTPRequestHead
    public let listenerName: String
    public let remoteAddress: SocketAddress?
    /// The client's IP address as text (for `X-Forwarded-For`), computed once per connection.
    public let clientIP: String?
    public let startTime: NIODeadline
    /// Where the connection was going before it was captured (capture listeners only).
    public let originalDestination: SocketEndpoint?
    /// The listener's traffic direction (the agent's outbound listener records client spans).
    public let direction: TrafficDirection?
    /// The listener's metrics.
    let listenerStats: ListenerStats?

    /// Set by routing.
    public internal(set) var routeName: String?
    public internal(set) var timeout: Duration?
    /// Set by routing: the route's rate limit, if it has one.
    var routeRateLimiter: RateLimiter?
    /// Set by routing: the route's retry policy, if it has one.
    var retryPolicy: RetryPolicy?
    /// Set by routing: the route's fault injection, if it has one.
    var fault: FaultInjection?
    /// Set by fault injection: how long to hold the request before it goes upstream.
    var faultDelay: Duration?
    /// Set by the circuit breaker: the cluster load whose request count this request holds.
    var heldRequestSlot: ClusterLoad?
    /// Set by routing: the cluster picked among the route's weighted clusters.
    public internal(set) var clusterName: String?
    var cluster: ClusterRuntime?
    var balancer: LoadBalancer?
    /// Set by load balancing.
    public internal(set) var endpoint: SocketEndpoint?
    var endpointIndex: Int?
    /// For a passthrough cluster: the original destination as an endpoint of its own.
    var passthroughEndpoint: ClusterRuntime.EndpointRuntime?

    /// A gRPC call (`content-type: application/grpc…` as the request arrived): its errors are
    /// gRPC statuses. Read once: the exchange, the metrics, the log and the span all ask.
    public let isGRPC: Bool
    /// The gRPC status the upstream answered with (response headers or trailers).
    public internal(set) var grpcStatus: Int?

    /// The final status sent (or 499 when the client went away).
    public internal(set) var responseStatus: HTTPResponseStatus?
    /// The error token when the proxy, not the upstream, decided the outcome.
    public internal(set) var error: ProxyError?
    public internal(set) var requestBytes = 0
    public internal(set) var responseBytes = 0
    /// `x-request-id`: the client's, or one the proxy made (and sent upstream).
    public internal(set) var requestID: String?
    /// Tries that followed the first one (route retries and a resend on a fresh connection).
    public internal(set) var retries = 0
    /// From the start of the try that was answered to its upstream connection being ready (pool
    /// wait and connect); recorded only when the access log is on.
    var upstreamConnectNanos: Int64?
    /// From the request's start to the response head (the upstream's or the proxy's own);
    /// recorded only when the access log is on.
    var firstByteNanos: Int64?
    /// The request's trace (tracing configured): its span and the context sent upstream.
    var trace: RequestTrace?
    /// The client's `x-request-id` (its first, when not empty), as the request arrived.
    private(set) var arrivedRequestID: String?
    /// The trace fields (W3C, B3) the request arrived with.
    let arrivedTraceFields: TraceHeaders.Fields

    init(
        head: HTTPRequestHead,
        listenerName: String,
        remoteAddress: SocketAddress?,
        clientIP: String?,
        startTime: NIODeadline,
        originalDestination: SocketEndpoint? = nil,
        direction: TrafficDirection? = nil,
        listenerStats: ListenerStats? = nil
    ) {
        self.direction = direction
        self.listenerStats = listenerStats
        self.originalDestination = originalDestination
        self.head = head
        // What the exchange asks of the headers as they arrived, in one pass over them.
        var isGRPC = false
        var contentTypeSeen = false
        var requestIDSeen = false
        var trace = TraceHeaders.Fields()
        for (name, value) in head.headers {
            if name.utf8.count == 12 {
                if !contentTypeSeen && name.equalsIgnoringASCIICase("content-type") {
                    contentTypeSeen = true
                    isGRPC = value.hasPrefix("application/grpc")
                    continue
                }
                if !requestIDSeen && name.equalsIgnoringASCIICase("x-request-id") {
                    requestIDSeen = true
                    if !value.isEmpty { arrivedRequestID = value }
                    continue
                }
            }
            trace.note(name, value)
        }
        self.isGRPC = isGRPC
        self.arrivedTraceFields = trace
        self.clientIP = clientIP
        self.listenerName = listenerName
        self.remoteAddress = remoteAddress
        self.startTime = startTime
    }
}

@available(*, unavailable)
extension RequestContext: Sendable {}
