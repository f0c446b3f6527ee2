import NIOCore
import NIOHTTP1

/// The client's side of one exchange, whatever the protocol: the current request of an HTTP/1
/// connection (``DownstreamHandler``) or one stream of an HTTP/2 connection
/// (``HTTP2DownstreamStream``). The exchange hands it the upstream's response in a neutral form
/// (``ResponseHead``: an HTTP/1 upstream's header block as received, or an HTTP/2 upstream's
/// decoded fields) and the stream writes it in its own protocol: the HTTP/1 head with the
/// upstream's field lines copied, keep-alive and framing; `:status` and frames for HTTP/2.
protocol DownstreamStream: AnyObject {
    /// Whether response bytes can be written without queueing more (else the exchange stops
    /// reading its upstream until ``ProxyExchange/downstreamBecameWritable()``).
    var isWritable: Bool { get }
    /// Whether this listener writes an access log line per request.
    var accessLog: Bool { get }
    /// Reads of the request were held for the exchange (its upstream was not writable): resume.
    func resumeReadingIfHeld()
    /// A 1xx response, passed on before the final one.
    func informational(_ head: ResponseHead)
    /// The upstream's final response head, to rewrite for this protocol and send.
    func responseHead(_ head: ResponseHead, requestEnded: Bool)
    func responseBody(_ buffer: ByteBuffer)
    /// The response is complete (with the upstream's trailers, if any).
    func responseEnded(_ trailers: HTTPHeaders?)
    func flush()
    /// Answers with a proxy error (nothing of a response was sent yet).
    func respondWithError(_ error: ProxyError, requestEnded: Bool, requestHasBody: Bool)
    /// The response was cut short after it started: the client must see it fail (HTTP/1 closes
    /// the connection, HTTP/2 resets the stream), never a shorter body taken for whole.
    func abort()
}
