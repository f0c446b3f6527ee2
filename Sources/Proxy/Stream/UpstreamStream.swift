import NIOCore
import NIOHTTP1

/// The upstream side of one exchange, whatever the protocol: a keep-alive HTTP/1 connection
/// (``UpstreamConnection``) or one stream of a multiplexed HTTP/2 connection
/// (``HTTP2UpstreamStream``). The exchange sends the request as ``UpstreamRequestPart``s and gets
/// the response back through ``ProxyExchange/upstreamResponse(_:)`` as ``UpstreamResponsePart``s.
protocol UpstreamStream: AnyObject {
    /// The exchange served now; nil while idle.
    var exchange: ProxyExchange? { get set }
    /// Whether its connection carried requests before this one (a reused connection may have been
    /// closed by the upstream as the request went out: the keep-alive race).
    var isReused: Bool { get }
    var isActive: Bool { get }
    var isWritable: Bool { get }
    /// Writes a part; it reaches the socket with ``flushSoon(_:)``.
    func send(_ part: UpstreamRequestPart)
    /// Flushes after the loop's current batch of I/O events (an HTTP/2 stream whose HEADERS wait
    /// for more of the request submits them now).
    func flushSoon(_ loop: LoopContext)
    /// The downstream became writable: let response bytes come again.
    func resumeReading()
    /// Done with it: back to its pool when `reusable`, otherwise closed (HTTP/1) or reset if
    /// still open (HTTP/2; the connection and its other streams carry on).
    func release(reusable: Bool)
}

/// One part of the request sent upstream, whatever the upstream speaks.
enum UpstreamRequestPart {
    case head(UpstreamRequestHead)
    case body(ByteBuffer)
    case end(HTTPHeaders?)
}

/// The head sent upstream for a client's request: the client's head (its fields as received), and what the proxy
/// adds or replaces (`X-Forwarded-*`, `Via`, a request id it made, its trace context), applied as
/// it is written — straight into an HTTP/1 connection's buffer
/// (``HeaderRewriting/writeHTTP1Request(_:into:)``), or as an HTTP/2 stream's fields
/// (``rewritten``).
struct UpstreamRequestHead {
    /// The request: its head (as the middleware left it), the client's address, its trace. A
    /// reference, so that each copy of a part (pending, retained for a retry, sent) is one retain.
    let request: RequestContext

    var head: RequestHead { request.head }
    /// An `x-request-id` the proxy made (the request had none).
    var requestID: RequestID? { request.generatedRequestID }
    var clientIP: String? { request.clientIP }
    var trace: RequestTrace? { request.trace }

    /// The head with the proxy's changes, as NIO's type (HTTP/2 upstreams, tests).
    var rewritten: HTTPRequestHead {
        HeaderRewriting.upstreamRequest(head.decoded, clientIP: clientIP, requestID: requestID?.text, trace: trace)
    }
}
