import NIOCore
import NIOHTTP1

/// One stream of an HTTP/2 downstream connection, as its exchange sees it: the response goes out
/// as HEADERS, DATA and trailers on this stream; a response cut short resets the stream (the
/// connection and its other streams carry on).
final class HTTP2DownstreamStream: DownstreamStream {
    unowned let connection: HTTP2DownstreamHandler
    let id: Int32
    var exchange: ProxyExchange?
    /// Request bytes passed to the exchange and not yet credited back to the client (its
    /// upstream was not writable): the client's window stays closed by that much.
    var owed = 0
    private var responseStarted = false
    /// Set when the request head is a gRPC call's, for errors answered before an exchange exists.
    var isGRPC = false
    /// The response head, held until body bytes, the end or a flush: a response that ends at once
    /// goes out as one HEADERS frame with END_STREAM (gRPC's trailers-only form keeps its status).
    private var pendingHead: [(name: String, value: String)]?

    init(connection: HTTP2DownstreamHandler, id: Int32) {
        self.connection = connection
        self.id = id
    }

    private var session: HTTP2Session { connection.session }

    var isWritable: Bool {
        connection.isChannelWritable && session.queuedBytes(stream: id) < HTTP2Session.highWater
    }

    var accessLog: Bool { connection.accessLog }

    func resumeReadingIfHeld() {
        guard owed > 0 else { return }
        session.consume(stream: id, bytes: owed)
        owed = 0
        connection.outputReady()
    }

    func informational(_ head: ResponseHead) {
        // 101 has no meaning in HTTP/2 (RFC 9113 §8.6).
        guard head.status != .switchingProtocols else { return }
        session.informational(stream: id, headers: [(":status", String(head.status.code))])
        connection.outputReady()
    }

    func responseHead(_ head: ResponseHead, requestEnded: Bool) {
        responseStarted = true
        pendingHead = HeaderRewriting.http2Response(head)
    }

    private func sendHead(endStream: Bool) {
        guard let fields = pendingHead else { return }
        pendingHead = nil
        _ = session.respond(stream: id, headers: fields, endStream: endStream)
    }

    func responseBody(_ buffer: ByteBuffer) {
        sendHead(endStream: false)
        session.send(stream: id, buffer)
        if session.queuedBytes(stream: id) >= HTTP2Session.lowWater { connection.outputReady() }
    }

    func responseEnded(_ trailers: HTTPHeaders?) {
        let trailerFields = trailers.map(Self.fields) ?? []
        if pendingHead != nil && trailerFields.isEmpty {
            sendHead(endStream: true)
        } else {
            sendHead(endStream: false)
            session.end(stream: id, trailers: trailerFields)
        }
        connection.outputReady()
    }

    func flush() {
        sendHead(endStream: false)
        connection.outputReady()
    }

    func respondWithError(_ error: ProxyError, requestEnded: Bool, requestHasBody: Bool) {
        guard !responseStarted else {
            abort()
            return
        }
        responseStarted = true
        if exchange?.request.isGRPC ?? isGRPC {
            // gRPC callers get a status they understand, trailers-only, with the same token.
            var fields: [(name: String, value: String)] = [
                (":status", "200"), ("content-type", "application/grpc"),
                ("grpc-status", String(error.grpcStatus)), ("grpc-message", error.token),
                ("x-trellis-error", error.token),
            ]
            if let seconds = error.retryAfter { fields.append(("retry-after", String(seconds))) }
            _ = session.respond(stream: id, headers: fields, endStream: true)
            connection.outputReady()
            return
        }
        let body = "\(error.token)\n"
        var fields: [(name: String, value: String)] = [
            (":status", String(error.status.code)), ("content-type", "text/plain"),
            ("content-length", String(body.utf8.count)), ("x-trellis-error", error.token),
        ]
        if let seconds = error.retryAfter { fields.append(("retry-after", String(seconds))) }
        _ = session.respond(stream: id, headers: fields, endStream: false)
        session.send(stream: id, ByteBuffer(string: body))
        // Body bytes the client still sends are credited and dropped (the exchange is over).
        session.end(stream: id)
        connection.outputReady()
    }

    func abort() {
        session.reset(stream: id, code: 0x2)  // INTERNAL_ERROR
        connection.outputReady()
    }

    // MARK: Conversions

    /// The request as the exchange and the middleware see any request: `:authority` as `Host`
    /// (unless the request has one), `:path` as the target, cookies joined (RFC 9113 §8.2.3),
    /// version 2.0. Nil without `:method` or `:path` (CONNECT).
    static func requestHead(_ block: HTTP2Session.HeaderBlock) -> HTTPRequestHead? {
        var method: String?
        var path: String?
        var authority: String?
        // Collected as pairs and handed to `HTTPHeaders` at once: nghttp2 has checked every
        // name (lowercase token characters), so `HTTPHeaders.add`'s check of each is not repeated.
        var fields: [(String, String)] = []
        fields.reserveCapacity(block.fields.count + 2)
        var cookies: [String] = []
        var hasHost = false
        var hasLength = false
        for (name, value) in block.fields {
            if name.utf8.first == UInt8(ascii: ":") {
                switch name {
                case ":method": method = value
                case ":path": path = value
                case ":authority": authority = value
                default: break
                }
                continue
            }
            switch name {
            case "cookie": cookies.append(value)
            case "host":
                hasHost = true
                fields.append((name, value))
            case "content-length":
                hasLength = true
                fields.append((name, value))
            default: fields.append((name, value))
            }
        }
        guard let method, let path else { return nil }
        if !hasHost, let authority { fields.append(("host", authority)) }
        if !cookies.isEmpty { fields.append(("cookie", cookies.joined(separator: "; "))) }
        // A body of unknown length goes to an HTTP/1 upstream chunked.
        if !block.endStream && !hasLength { fields.append(("transfer-encoding", "chunked")) }
        let headers = HTTPHeaders(fields)
        return HTTPRequestHead(
            version: HTTPVersion(major: 2, minor: 0),
            method: HTTPMethod(rawValue: method),
            uri: path,
            headers: headers
        )
    }

    static func trailers(_ block: HTTP2Session.HeaderBlock) -> HTTPHeaders {
        var headers = HTTPHeaders()
        for (name, value) in block.fields where name.utf8.first != UInt8(ascii: ":") {
            headers.add(name: name, value: value)
        }
        return headers
    }

    /// Header fields for HTTP/2: names lowercase (RFC 9113 §8.2.1).
    static func fields(_ headers: HTTPHeaders) -> [(name: String, value: String)] {
        headers.map { ($0.name.asciiLowercased, $0.value) }
    }
}

@available(*, unavailable)
extension HTTP2DownstreamStream: Sendable {}
