public import NIOCore
public import NIOHTTP1
import TrellisPolicy

/// Everything the middleware chain knows about one request. It lives on the event loop that
/// accepted the request and is never shared with another.
public final class RequestContext {
    /// The request head as it will be sent upstream, its fields as the client sent them
    /// (``RequestFields``: an HTTP/1 client's are relayed without being decoded).
    private(set) var head: RequestHead
    /// The request head as NIO's type, which a middleware may edit (its fields are decoded
    /// once it does, and the edited head is what goes upstream).
    public var decodedHead: HTTPRequestHead {
        get { head.decoded }
        set {
            head = RequestHead(newValue)
            host = head.fields.first("host")
            announcesBody = Self.announcesBody(head.fields)
        }
    }
    /// The `Host` field's value (the first), read once for routing, the log and the span.
    private(set) var host: String?
    /// Whether the request announced a body (`content-length` above 0, or a transfer coding).
    private(set) var announcesBody: Bool
    /// The connection the request came on (what its requests share).
    let connection: ClientConnection
    public var listenerName: String { connection.listenerName }
    public var remoteAddress: SocketAddress? { connection.remoteAddress }
    /// The client's IP address as text (for `X-Forwarded-For`), computed once per connection.
    public var clientIP: String? { connection.clientIP }
    public let startTime: NIODeadline
    /// Where the connection was going before it was captured (capture listeners only).
    public var originalDestination: SocketEndpoint? { connection.originalDestination }
    /// The listener's traffic direction (the agent's outbound listener records client spans).
    public var direction: TrafficDirection? { connection.direction }
    /// The listener's metrics.
    var listenerStats: ListenerStats? { connection.listenerStats }

    /// Set by routing: what the matched route does (one reference; its parts are read through it).
    var routeTarget: RouteTarget?
    public var routeName: String? { routeTarget?.routeName }
    /// Set by routing (the route's), shortened by a gRPC caller's own deadline.
    public internal(set) var timeout: Duration?
    /// The route's rate limit, if it has one.
    var routeRateLimiter: RateLimiter? { routeTarget?.rateLimiter }
    /// The route's retry policy, if it has one.
    var retryPolicy: RetryPolicy? { routeTarget?.retryPolicy }
    /// Whether the route has a retry policy (asked without copying the policy).
    var hasRetryPolicy: Bool { routeTarget?.hasRetryPolicy ?? false }
    /// The route's fault injection, if it has one.
    var fault: FaultInjection? { routeTarget?.fault }
    /// Set by fault injection: how long to hold the request before it goes upstream.
    var faultDelay: Duration?
    /// Set by the circuit breaker: the cluster load whose request count this request holds.
    var heldRequestSlot: ClusterLoad?
    /// Set by routing: the cluster picked among the route's weighted clusters.
    var cluster: ClusterRuntime?
    public var clusterName: String? { cluster?.config.name }
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
    /// `x-request-id`: the client's, or one the proxy made (and sent upstream) once the
    /// exchange started.
    public var requestID: String? { arrivedRequestID ?? generatedRequestID?.text }
    /// The id the proxy made, the request having none.
    var generatedRequestID: RequestID?
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
    /// The trace context (W3C, B3) the request arrived with: nil when it had none, an invalid one
    /// (a new trace starts), or this proxy does not trace.
    let arrivedTrace: TraceHeaders.Incoming?
    /// The `tracestate` that came with ``arrivedTrace`` (W3C), checked, when not empty.
    let arrivedTraceState: String?

    /// A request on its own connection (tests).
    convenience init(
        head: consuming RequestHead,
        listenerName: String,
        remoteAddress: SocketAddress?,
        clientIP: String?,
        startTime: NIODeadline,
        originalDestination: SocketEndpoint? = nil,
        direction: TrafficDirection? = nil,
        listenerStats: ListenerStats? = nil,
        readsTraceFields: Bool = true
    ) {
        self.init(
            head: head,
            connection: ClientConnection(
                listenerName: listenerName,
                direction: direction,
                listenerStats: listenerStats,
                remoteAddress: remoteAddress,
                clientIP: clientIP,
                originalDestination: originalDestination
            ),
            startTime: startTime,
            readsTraceFields: readsTraceFields
        )
    }

    /// `head` is consumed (taken over, not copied: a copy is a retain per string and buffer).
    init(
        head: consuming RequestHead,
        connection: ClientConnection,
        startTime: NIODeadline,
        readsTraceFields: Bool = true
    ) {
        self.connection = connection
        // What the exchange asks of the headers as they arrived, in one pass over them.
        var isGRPC = false
        var contentTypeSeen = false
        var requestIDSeen = false
        var trace = TraceHeaders.Fields()
        var arrivedRequestID: String?
        var host: String?
        var announcesBody = false
        head.fields.forEach { name, value in
            switch name.count {
            case 4:
                if host == nil && HeaderRewriting.equalsLowercase(name, "host") {
                    host = String(decoding: value, as: UTF8.self)
                    return
                }
            case 14:
                if HeaderRewriting.equalsLowercase(name, "content-length") {
                    if !(value.count == 1 && value[0] == UInt8(ascii: "0")) { announcesBody = true }
                    return
                }
            case 17:
                if HeaderRewriting.equalsLowercase(name, "transfer-encoding") {
                    announcesBody = true
                    return
                }
            default:
                break
            }
            if name.count == 12 {
                if !contentTypeSeen && HeaderRewriting.equalsLowercase(name, "content-type") {
                    contentTypeSeen = true
                    isGRPC = Self.hasPrefix(value, "application/grpc")
                    return
                }
                if !requestIDSeen && HeaderRewriting.equalsLowercase(name, "x-request-id") {
                    requestIDSeen = true
                    if !value.isEmpty { arrivedRequestID = String(decoding: value, as: UTF8.self) }
                    return
                }
            }
            if readsTraceFields && TraceHeaders.Fields.mayNote(length: name.count) { trace.note(name, value) }
        }
        self.arrivedRequestID = arrivedRequestID
        self.host = host
        self.announcesBody = announcesBody
        self.isGRPC = isGRPC
        if trace.any, let (incoming, state) = trace.context() {
            self.arrivedTrace = incoming
            self.arrivedTraceState = state
        } else {
            self.arrivedTrace = nil
            self.arrivedTraceState = nil
        }
        self.startTime = startTime
        self.head = head
    }
}

/// What every request on one downstream connection shares, made once when it opens: a request
/// holds one reference to it, not one per string and object in it.
final class ClientConnection {
    let listenerName: String
    /// The listener's traffic direction (the agent's outbound listener records client spans).
    let direction: TrafficDirection?
    /// The listener's metrics.
    let listenerStats: ListenerStats?
    let remoteAddress: SocketAddress?
    /// The client's IP address as text (for `X-Forwarded-For`).
    let clientIP: String?
    /// Where the connection was going before it was captured (capture listeners only).
    let originalDestination: SocketEndpoint?

    init(
        listenerName: String,
        direction: TrafficDirection?,
        listenerStats: ListenerStats?,
        remoteAddress: SocketAddress? = nil,
        clientIP: String? = nil,
        originalDestination: SocketEndpoint? = nil
    ) {
        self.listenerName = listenerName
        self.direction = direction
        self.listenerStats = listenerStats
        self.remoteAddress = remoteAddress
        self.clientIP = clientIP
        self.originalDestination = originalDestination
    }

    /// The same listener's, for `channel` once it is open: its peer's address and, with `lookup`
    /// (capture listeners), where the connection was going before it was captured.
    func opened(_ channel: any Channel, originalDestination lookup: OriginalDestinationLookup?) -> ClientConnection {
        var originalDestination: SocketEndpoint?
        if let lookup, let address = lookup(channel), let ip = address.ipAddress, let port = address.port {
            originalDestination = SocketEndpoint(host: ip, port: port)
        }
        let remoteAddress = channel.remoteAddress
        return ClientConnection(
            listenerName: listenerName,
            direction: direction,
            listenerStats: listenerStats,
            remoteAddress: remoteAddress,
            clientIP: remoteAddress?.ipAddress,
            originalDestination: originalDestination
        )
    }
}

@available(*, unavailable)
extension ClientConnection: Sendable {}

extension RequestContext {
    fileprivate static func announcesBody(_ fields: RequestFields) -> Bool {
        if fields.contains("transfer-encoding") { return true }
        if let length = fields.first("content-length") { return length != "0" }
        return false
    }

    fileprivate static func hasPrefix(_ bytes: UnsafeBufferPointer<UInt8>, _ prefix: StaticString) -> Bool {
        guard bytes.count >= prefix.utf8CodeUnitCount else { return false }
        let p = prefix.utf8Start
        for i in 0..<prefix.utf8CodeUnitCount where bytes[i] != p[i] { return false }
        return true
    }
}

@available(*, unavailable)
extension RequestContext: Sendable {}
