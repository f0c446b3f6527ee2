import NIOCore
import NIOHTTP1

/// The upstream side of one exchange, whatever the protocol: a keep-alive HTTP/1 connection
/// (``UpstreamConnection``) or one stream of a multiplexed HTTP/2 connection
/// (``HTTP2UpstreamStream``). The exchange sends the request as NIO's HTTP/1 client parts and gets
/// the response back through ``ProxyExchange/upstreamResponse(_:)`` in the same form.
protocol UpstreamStream: AnyObject {
    /// The exchange served now; nil while idle.
    var exchange: ProxyExchange? { get set }
    /// Whether its connection carried requests before this one (a reused connection may have been
    /// closed by the upstream as the request went out: the keep-alive race).
    var isReused: Bool { get }
    var isActive: Bool { get }
    var isWritable: Bool { get }
    func send(_ part: HTTPClientRequestPart, flush: Bool)
    func flush()
    /// Flushes after the loop's current batch of I/O events.
    func flushSoon(_ loop: LoopContext)
    /// The downstream became writable: let response bytes come again.
    func resumeReading()
    /// Done with it: back to its pool when `reusable`, otherwise closed (HTTP/1) or reset if
    /// still open (HTTP/2; the connection and its other streams carry on).
    func release(reusable: Bool)
}
