import CoreMetrics
import Logging
import NIOCore
import NIOHTTP1

/// The end of a downstream connection's pipeline: turns each request into a ``ProxyExchange``
/// and writes back what the exchange produces. Holds reads (back-pressure) while the exchange
/// cannot take more of the request body.
final class DownstreamHandler: ChannelDuplexHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    private let loop: LoopContext
    private let listenerName: String
    let accessLog: Bool
    private var context: ChannelHandlerContext?
    private var exchange: ProxyExchange?
    private var readHeld = false
    private var closing = false
    /// Whether the current exchange's request has been read whole.
    private var currentRequestEnded = false
    /// Parts of pipelined requests waiting for the current response to finish.
    private var queued = CircularBuffer<HTTPServerRequestPart>()
    /// A parse error in a pipelined request, answered once the responses before it are done.
    private var pendingError: ProxyError?
    /// Whether the connection stays open after the current response.
    var keepAlive = true
    /// The current request's version and whether it asked for keep-alive.
    private var requestVersion = HTTPVersion.http1_1
    private var clientWantsKeepAlive = true
    var isDraining = false
    /// Since when the connection has waited for a request (nil while one is being served).
    private(set) var idleSince: NIODeadline?

    /// The timers of this connection (same channel, same loop).
    private let timeouts: ConnectionTimeoutHandler?

    /// Where a captured connection was going (looked up once, when it opened).
    private var originalDestination: SocketEndpoint?
    private let lookup: OriginalDestinationLookup?

    init(
        loop: LoopContext,
        listenerName: String,
        accessLog: Bool,
        timeouts: ConnectionTimeoutHandler?,
        originalDestination lookup: OriginalDestinationLookup? = nil
    ) {
        self.lookup = lookup
        self.loop = loop
        self.timeouts = timeouts
        self.listenerName = listenerName
        self.accessLog = accessLog
    }

    var isWritable: Bool { context?.channel.isWritable ?? false }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        // Added after the protocol was sniffed: the channel is already active.
        if context.channel.isActive { opened(context) }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    private var remoteAddress: SocketAddress?
    private var clientIP: String?

    func channelActive(context: ChannelHandlerContext) {
        opened(context)
        context.fireChannelActive()
    }

    private func opened(_ context: ChannelHandlerContext) {
        if let lookup, let address = lookup(context.channel), let ip = address.ipAddress, let port = address.port {
            originalDestination = SocketEndpoint(host: ip, port: port)
        }
        remoteAddress = context.channel.remoteAddress
        clientIP = remoteAddress?.ipAddress
        isDraining = loop.draining
        idleSince = .now()
        loop.opened(self)
        loop.stats.activeConnections.increment()
        loop.stats.totalConnections.increment()
    }

    func channelInactive(context: ChannelHandlerContext) {
        loop.closed(self)
        loop.stats.activeConnections.decrement()
        exchange?.downstreamClosed()
        exchange = nil
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let part = unwrapInboundIn(data)
        // Pipelining: parts that arrive after the current request ended belong to the next
        // request; they wait (and reads pause) until the current response is complete.
        if !queued.isEmpty || (exchange != nil && currentRequestEnded) {
            queued.append(part)
            return
        }
        process(part, context: context)
    }

    private func process(_ part: HTTPServerRequestPart, context: ChannelHandlerContext) {
        switch part {
        case .head(let received):
            // RFC 9112 §3.2.2: an absolute-form target's authority replaces Host, for routing and
            // upstream alike.
            guard let head = Self.authorityFromTarget(received) else {
                timeouts?.requestHeadReceived()
                let target = received.uri.prefix(200)
                rejectMalformed(.badRequest("absolute-form request target without a host: '\(target)'"))
                return
            }
            timeouts?.requestHeadReceived()
            idleSince = nil
            loop.stats.downstreamRequests.increment()
            keepAlive = head.isKeepAlive
            clientWantsKeepAlive = keepAlive
            requestVersion = head.version
            currentRequestEnded = false
            let (_, chain) = loop.current()
            let request = RequestContext(
                head: head,
                listenerName: listenerName,
                remoteAddress: remoteAddress,
                clientIP: clientIP,
                startTime: .now(),
                originalDestination: originalDestination
            )
            let exchange = ProxyExchange(downstream: self, loop: loop, request: request, chain: chain)
            self.exchange = exchange
            exchange.start()
        case .body(let buffer):
            exchange?.requestBody(buffer)
        case .end(let trailers):
            currentRequestEnded = true
            exchange?.requestEnd(trailers)
        }
    }

    /// Runs the parts of pipelined requests that waited for the previous response.
    private func processQueued(context: ChannelHandlerContext) {
        while !queued.isEmpty && !closing && (exchange == nil || !currentRequestEnded) {
            process(queued.removeFirst(), context: context)
        }
        if queued.isEmpty, let error = pendingError, exchange == nil, !closing {
            pendingError = nil
            rejectMalformed(error)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        exchange?.downstreamReadComplete()
        context.fireChannelReadComplete()
    }

    func read(context: ChannelHandlerContext) {
        if !queued.isEmpty || pendingError != nil {
            readHeld = true
        } else if let exchange, !currentRequestEnded, exchange.holdsDownstreamReads {
            readHeld = true
        } else {
            context.read()
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { exchange?.downstreamBecameWritable() }
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard let parserError = error as? HTTPParserError else {
            // I/O errors (reset by peer…): the connection is gone.
            context.close(promise: nil)
            return
        }
        if parserError == .invalidEOFState || !context.channel.isActive {
            // The client went away in the middle of a request: nobody is left to answer.
            exchange?.downstreamClosed()
            exchange = nil
            context.close(promise: nil)
            return
        }
        let proxyError: ProxyError =
            switch parserError {
            case .headerOverflow: .headerTooLarge("\(parserError)")
            default: .badRequest("\(parserError)")
            }
        if let exchange, !currentRequestEnded, queued.isEmpty {
            // Mid-request (a bad chunk size, say): the exchange answers if it still can.
            exchange.respondLocally(proxyError)
            abort()
        } else if exchange != nil || !queued.isEmpty {
            // A later pipelined request is malformed: answer it in its turn.
            pendingError = pendingError ?? proxyError
        } else {
            rejectMalformed(proxyError)
        }
    }

    /// `head` with an absolute-form target (`http://alt.example/x`) turned into what an origin
    /// server expects: `Host: alt.example` (the received Host is ignored, RFC 9112 §3.2.2) and the
    /// origin-form target `/x`. Other targets are returned as they are; nil for an absolute-form
    /// target without a host.
    static func authorityFromTarget(_ head: HTTPRequestHead) -> HTTPRequestHead? {
        guard !head.uri.hasPrefix("/"), let scheme = head.uri.firstRange(of: "://") else { return head }
        let rest = head.uri[scheme.upperBound...]
        let end = rest.firstIndex { $0 == "/" || $0 == "?" || $0 == "#" } ?? rest.endIndex
        var authority = rest[..<end]
        if let at = authority.lastIndex(of: "@") { authority = authority[authority.index(after: at)...] }
        guard !authority.isEmpty else { return nil }
        var normalized = head
        normalized.headers.replaceOrAdd(name: "host", value: String(authority))
        let target = rest[end...]
        normalized.uri = target.hasPrefix("/") ? String(target) : "/" + target
        return normalized
    }

    private func rejectMalformed(_ proxyError: ProxyError) {
        loop.stats.record(proxyError)
        if accessLog {
            loop.accessLogger.info(
                "malformed request \(proxyError.status.code) \(proxyError.token)",
                metadata: [
                    "http.status": "\(proxyError.status.code)", "trellis.token": "\(proxyError.token)",
                    "trellis.listener": "\(listenerName)", "error": "\(proxyError.detail)",
                ]
            )
        }
        sendError(proxyError, keepAlive: false, version: .http1_1)
    }

    // MARK: Drain

    /// Whether a request is being served or waits its turn.
    var isBusy: Bool { exchange != nil || !queued.isEmpty || pendingError != nil }

    /// Marks the connection draining: closed now when it has been idle for `quiet` (returns true);
    /// otherwise its current or next response says `Connection: close` (if not sent yet) and the
    /// connection closes after it, or a later call closes it once it has been quiet long enough.
    /// A connection that just finished a response is the one a client's pool hands out next:
    /// closing it at once would race with the request already on its way (the keep-alive race).
    func drain(quiet: TimeAmount) -> Bool {
        isDraining = true
        guard !isBusy, !closing, let context, let idleSince, idleSince + quiet <= .now() else { return false }
        closing = true
        context.close(promise: nil)
        return true
    }

    // MARK: Called by the exchange

    func write(_ part: HTTPServerResponsePart, flush: Bool) {
        guard let context, !closing else { return }
        if flush {
            context.writeAndFlush(wrapOutboundOut(part), promise: nil)
        } else {
            context.write(wrapOutboundOut(part), promise: nil)
        }
    }

    func flush() {
        context?.flush()
    }

    func resumeReadingIfHeld() {
        guard readHeld, queued.isEmpty, pendingError == nil, let context, let exchange, !exchange.holdsDownstreamReads
        else { return }
        readHeld = false
        context.read()
    }

    /// The response is complete.
    func responseEnded(_ trailers: HTTPHeaders?) {
        guard let context, !closing else { return }
        exchange = nil
        // Draining: the connection ends with this response, even if its head said keep-alive
        // (the drain began after the head was sent).
        let keepAlive = self.keepAlive && !isDraining
        timeouts?.responseCompleted()
        if keepAlive {
            idleSince = .now()
            context.write(wrapOutboundOut(.end(trailers)), promise: nil)
            loop.flushSoon(context)
        } else {
            closing = true
            let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
            context.writeAndFlush(wrapOutboundOut(.end(trailers))).whenComplete { _ in
                bound.value.close(promise: nil)
            }
        }
        processQueued(context: context)
        if readHeld && queued.isEmpty && !closing && (exchange == nil || !(exchange!.holdsDownstreamReads)) {
            readHeld = false
            context.read()
        }
    }

    /// Answers with a proxy error: status, `x-trellis-error`, and the token as the body.
    func sendError(_ error: ProxyError, keepAlive: Bool, version: HTTPVersion) {
        guard let context, !closing else { return }
        self.keepAlive = keepAlive
        var headers = HTTPHeaders()
        let body = "\(error.token)\n"
        headers.add(name: "content-type", value: "text/plain")
        headers.add(name: "content-length", value: "\(body.utf8.count)")
        headers.add(name: "x-trellis-error", value: error.token)
        if let seconds = error.retryAfter { headers.add(name: "retry-after", value: "\(seconds)") }
        if !keepAlive { headers.add(name: "connection", value: "close") }
        let head = HTTPResponseHead(
            version: version.major == 1 ? version : .http1_1,
            status: error.status,
            headers: headers
        )
        context.write(wrapOutboundOut(.head(head)), promise: nil)
        var buffer = context.channel.allocator.buffer(capacity: body.utf8.count)
        buffer.writeString(body)
        context.write(wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
        responseEnded(nil)
    }

    /// Ends the connection without a further response (a response already started, or cannot).
    func abort() {
        guard let context, !closing else { return }
        closing = true
        exchange = nil
        context.close(promise: nil)
    }
}

@available(*, unavailable)
extension DownstreamHandler: Sendable {}

extension DownstreamHandler: DownstreamConnection {
    var requestsInFlight: Int { isBusy ? 1 : 0 }

    func stopDrain() {
        isDraining = false
    }
}

extension DownstreamHandler: DownstreamStream {
    func informational(_ head: HTTPResponseHead) {
        write(.head(HTTPResponseHead(version: requestVersion, status: head.status)), flush: true)
    }

    func responseHead(_ head: HTTPResponseHead, requestEnded: Bool) {
        // A request still sending its body when the response starts leaves the connection
        // unframed; an HTTP/1.0 response without a length ends with the connection.
        var keepAlive = clientWantsKeepAlive && requestEnded && !isDraining
        if requestVersion == .http1_0 && !head.headers.contains(name: "content-length") { keepAlive = false }
        self.keepAlive = keepAlive
        let out = HeaderRewriting.downstreamResponse(head, requestVersion: requestVersion, keepAlive: keepAlive)
        write(.head(out), flush: false)
    }

    func responseBody(_ buffer: ByteBuffer) {
        write(.body(.byteBuffer(buffer)), flush: false)
    }

    func respondWithError(_ error: ProxyError, requestEnded: Bool, requestHasBody: Bool) {
        // Answering before the request ended is safe for keep-alive only when the request has no
        // body to skip; otherwise the connection is closed rather than guessing where the next
        // request starts.
        let keepAlive = (requestEnded || !requestHasBody) && clientWantsKeepAlive && !isDraining
        sendError(error, keepAlive: keepAlive, version: requestVersion)
    }
}
