import CoreMetrics
import NIOCore
import NIOHTTP1

/// The end of a downstream connection's pipeline: turns each request into a ``ProxyExchange``
/// and writes back what the exchange produces. What the connection's events mean — pipelining,
/// held reads, keep-alive, drain — is decided by ``HTTP1ConnectionStateMachine``; this class
/// carries out its actions on the channel. Responses are written as bytes: an HTTP/1 upstream's
/// field lines copied from its head (``HeaderRewriting/writeHTTP1Response``), bodies as they come,
/// in chunks when the client's connection needs them framed.
final class DownstreamHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let loop: LoopContext
    let accessLog: Bool
    /// The listener, and once it opened the connection's addresses: what its requests share.
    private var connection: ClientConnection
    private var context: ChannelHandlerContext?
    /// The channel's allocator, read once (each read through the channel retains and releases it).
    private var allocator = ByteBufferAllocator()
    private var machine: HTTP1ConnectionStateMachine
    /// Reads the requests from the connection's bytes.
    private var parser: HTTP1RequestParser
    /// The exchange of the request being served.
    private var exchange: ProxyExchange?
    /// Whether the current response's body goes in chunks (it has no length and the client speaks
    /// HTTP/1.1).
    private var chunkedResponse = false
    /// A response head not handed to the channel yet: it waits for the body's first part, so that
    /// a small response leaves in one `write` (not a `writev` of two buffers).
    private var unsentHead: ByteBuffer?
    /// The largest first body part copied behind its head.
    private static let coalescedBodyBytes = 2048

    /// The idle and request-head timers of this connection.
    private let timeouts: ConnectionTimeouts?

    /// Where a captured connection was going (looked up once, when it opened).
    private let lookup: OriginalDestinationLookup?

    init(
        loop: LoopContext,
        listenerName: String,
        accessLog: Bool,
        direction: TrafficDirection? = nil,
        timeouts: ConnectionTimeouts?,
        maxRequestHeadBytes: Int = ConnectionLimits().maxRequestHeaderBytes,
        originalDestination lookup: OriginalDestinationLookup? = nil
    ) {
        self.lookup = lookup
        self.loop = loop
        self.timeouts = timeouts
        self.accessLog = accessLog
        // The listener's metrics looked up once per connection.
        self.connection = ClientConnection(
            listenerName: listenerName,
            direction: direction,
            listenerStats: loop.stats.listener(listenerName)
        )
        self.machine = HTTP1ConnectionStateMachine(now: loop.eventLoop.now, draining: loop.draining)
        self.parser = HTTP1RequestParser(
            maxHeadBytes: maxRequestHeadBytes,
            index: loop.lineIndex,
            blocks: loop.fieldBlocks
        )
    }

    /// The channel's writability as its last change said (asked several times per request:
    /// reading it through the channel retains and releases the pipeline and the channel).
    private var writable = true
    var isWritable: Bool { context != nil && writable }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        allocator = context.channel.allocator
        // Added after the protocol was sniffed: the channel is already active.
        if context.channel.isActive { opened(context) }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        timeouts?.closed()
    }

    func channelActive(context: ChannelHandlerContext) {
        opened(context)
        context.fireChannelActive()
    }

    private func opened(_ context: ChannelHandlerContext) {
        connection = connection.opened(context.channel, originalDestination: lookup)
        let now = context.eventLoop.now
        machine = HTTP1ConnectionStateMachine(now: now, draining: loop.draining)
        timeouts?.opened(context: context, now: now)
        loop.opened(self)
        loop.stats.activeConnections.increment()
        loop.stats.totalConnections.increment()
    }

    func channelInactive(context: ChannelHandlerContext) {
        writable = false
        timeouts?.closed()
        loop.closed(self)
        loop.stats.activeConnections.decrement()
        if machine.closed() { exchange?.downstreamClosed() }
        exchange = nil
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var input = unwrapInboundIn(data)
        timeouts?.bytesReceived(now: context.eventLoop.now)
        // Most heads arrive whole in one read and are parsed here; only a head still incomplete
        // afterwards needs the (shorter) header timer.
        defer { timeouts?.readParsed(context: context) }
        while true {
            let part: RequestPart?
            do {
                part = try parser.next(&input)
            } catch {
                parseFailed(error, context: context)
                return
            }
            guard let part else { return }
            perform(machine.received(part))
        }
    }

    private func perform(_ action: HTTP1ConnectionStateMachine.PartAction) {
        switch action {
        case .startExchange(let head):
            timeouts?.requestHeadReceived()
            loop.stats.downstreamRequests.increment()
            let chain = loop.currentChain()
            let request = RequestContext(
                head: head,
                connection: connection,
                startTime: .now(),
                readsTraceFields: loop.tracing != nil
            )
            let exchange = ProxyExchange(downstream: self, loop: loop, request: request, chain: chain)
            self.exchange = exchange
            exchange.start()
        case .forwardBody(let buffer):
            exchange?.requestBody(buffer)
        case .forwardEnd(let trailers):
            exchange?.requestEnd(trailers)
        case .reject(let error):
            timeouts?.requestHeadReceived()
            reject(error)
        case .none:
            break
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        exchange?.downstreamReadComplete()
        context.fireChannelReadComplete()
    }

    func read(context: ChannelHandlerContext) {
        if machine.readRequested(exchangeHoldsReads: exchange?.holdsDownstreamReads ?? false) { context.read() }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        writable = context.channel.isWritable
        if writable { exchange?.downstreamBecameWritable() }
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // I/O errors (reset by peer…): the connection is gone.
        context.close(promise: nil)
    }

    /// A request that cannot be parsed: answered now, or in its turn behind those before it.
    private func parseFailed(_ error: any Error, context: ChannelHandlerContext) {
        let parseError = error as? HTTP1ParseError ?? HTTP1ParseError("\(error)")
        let proxyError: ProxyError =
            parseError.tooLarge ? .headerTooLarge(parseError.description) : .badRequest(parseError.description)
        switch machine.parseError(proxyError, channelActive: context.channel.isActive) {
        case .closeQuietly:
            exchange?.downstreamClosed()
            exchange = nil
            context.close(promise: nil)
        case .failExchange(let error):
            exchange?.respondLocally(error)
            abort()
        case .reject(let error):
            reject(error)
        case .deferred, .none:
            break
        }
    }

    /// Answers a request that cannot be parsed or served, and closes the connection.
    private func reject(_ proxyError: ProxyError) {
        loop.stats.record(proxyError)
        if accessLog, let log = loop.accessLog {
            // Refused before it could be parsed (malformed, headers too large or too slow).
            var record = AccessLogRecord(listener: connection.listenerName, elapsed: .zero)
            record.protocol = "HTTP/1.1"
            record.status = Int(proxyError.status.code)
            record.error = proxyError.token
            record.source = connection.remoteAddress
            record.originalDestination = connection.originalDestination?.description
            log.append(record)
        }
        writeError(proxyError, keepAlive: false, version: .http1_1, headRequest: false)
        finishResponse(nil, close: true)
    }

    // MARK: Drain

    /// Marks the connection draining: closed now when it has been idle for `quiet` (returns true);
    /// otherwise its current or next response says `Connection: close` (if not sent yet) and the
    /// connection closes after it, or a later call closes it once it has been quiet long enough.
    func drain(quiet: TimeAmount) -> Bool {
        guard let context, machine.drain(quiet: quiet, now: context.eventLoop.now) else { return false }
        context.close(promise: nil)
        return true
    }

    // MARK: Called by the exchange

    private func write(_ buffer: ByteBuffer) {
        guard let context, !machine.isClosing else { return }
        context.write(wrapOutboundOut(buffer), promise: nil)
    }

    /// Flushes after the loop's current batch of I/O events (a response head still waiting for
    /// its body goes out then, with what came of it).
    func flush() {
        loop.flushSoon(self)
    }

    var flushQueued = false

    func flushNow() {
        writeUnsentHead()
        context?.flush()
    }

    private func writeUnsentHead() {
        guard let head = unsentHead else { return }
        unsentHead = nil
        writeHead(head)
    }

    /// Writes a response head (with what was coalesced behind it), its buffer to be used again.
    private func writeHead(_ head: ByteBuffer) {
        loop.heads.recycle(head)
        write(head)
    }

    func resumeReadingIfHeld() {
        guard let exchange, machine.resumeReading(exchangeHoldsReads: exchange.holdsDownstreamReads) else { return }
        context?.read()
    }

    /// The response is complete.
    func responseEnded(_ trailers: HTTPHeaders?) {
        finishResponse(trailers, close: false)
    }

    private func finishResponse(_ trailers: HTTPHeaders?, close: Bool) {
        guard let context else { return }
        writeUnsentHead()  // before the machine says closing, when writes stop
        let now = context.eventLoop.now
        let action = machine.responseEnded(now: now, close: close)
        if action == .none { return }
        exchange = nil
        timeouts?.responseCompleted(context: context, now: now)
        // The last chunk (and the trailers) of a chunked body; most responses have a length and
        // allocate nothing here.
        var last: ByteBuffer?
        if chunkedResponse {
            chunkedResponse = false
            var buffer = allocator.buffer(capacity: 5)
            HeaderRewriting.writeLastChunk(trailers, into: &buffer)
            last = buffer
        }
        if action == .keepOpen {
            if let last { context.write(wrapOutboundOut(last), promise: nil) }
            loop.flushSoon(self)
        } else {
            // Closed once everything before it is written.
            let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
            let last = last ?? allocator.buffer(capacity: 0)
            context.writeAndFlush(wrapOutboundOut(last)).whenComplete { _ in
                bound.value.close(promise: nil)
            }
        }
        // The pipelined parts that waited for this response: the next request's head, and its
        // body up to its end (an exchange answering at once comes back here and goes on).
        while let next = machine.nextQueued() { perform(next) }
        if machine.resumeReadingAfterResponse(exchangeHoldsReads: exchange?.holdsDownstreamReads ?? false) {
            context.read()
        }
    }

    /// Writes a proxy error's head and body: status, `x-trellis-error`, and the token as the body
    /// (not to a HEAD request).
    private func writeError(_ error: ProxyError, keepAlive: Bool, version: HTTPVersion, headRequest: Bool) {
        guard let context, !machine.isClosing else { return }
        chunkedResponse = false
        var buffer = allocator.buffer(capacity: 192)
        buffer.writeStaticString(version == .http1_0 ? "HTTP/1.0 " : "HTTP/1.1 ")
        buffer.writeString("\(error.status.code) \(error.status.reasonPhrase)\r\n")
        buffer.writeStaticString("content-type: text/plain\r\ncontent-length: ")
        buffer.writeString("\(error.token.utf8.count + 1)\r\nx-trellis-error: \(error.token)\r\n")
        if let seconds = error.retryAfter { buffer.writeString("retry-after: \(seconds)\r\n") }
        if !keepAlive {
            buffer.writeStaticString("connection: close\r\n")
        } else if version == .http1_0 {
            buffer.writeStaticString("connection: keep-alive\r\n")
        }
        buffer.writeStaticString("\r\n")
        if !headRequest {
            buffer.writeString(error.token)
            buffer.writeStaticString("\n")
        }
        context.write(wrapOutboundOut(buffer), promise: nil)
    }

    /// Ends the connection without a further response (a response already started, or cannot).
    func abort() {
        guard let context, machine.abort() else { return }
        unsentHead = nil
        exchange = nil
        context.close(promise: nil)
    }
}

@available(*, unavailable)
extension DownstreamHandler: Sendable {}

extension DownstreamHandler: DownstreamConnection, BatchedFlush {
    var requestsInFlight: Int { machine.isBusy ? 1 : 0 }

    func stopDrain() {
        machine.stopDrain()
    }
}

extension DownstreamHandler: DownstreamStream {
    func informational(_ head: ResponseHead) {
        // An HTTP/1.0 client does not know 1xx responses (RFC 9110 §15.2).
        guard context != nil, machine.requestVersion != .http1_0 else { return }
        var buffer = allocator.buffer(capacity: 32)
        buffer.writeString("HTTP/1.1 \(head.status.code) \(head.status.reasonPhrase)\r\n\r\n")
        write(buffer)
        flush()
    }

    func responseHead(_ head: ResponseHead, requestEnded: Bool) {
        guard context != nil else { return }
        let keepAlive = machine.responseHead(requestEnded: requestEnded, hasContentLength: head.hasContentLength)
        let version = machine.requestVersion
        let hasBody = !machine.requestIsHEAD && head.status.mayHaveResponseBody
        chunkedResponse = hasBody && !head.hasContentLength && version == .http1_1
        // Room for a short body behind the head, as long as it announced: allocating the most
        // (2 KiB, 4 KiB once rounded) for every response was a malloc too large for the
        // allocator's per-thread cache, each time.
        var capacity = 160 + (hasBody ? min(head.contentLength ?? 0, Self.coalescedBodyBytes) : 0)
        if case .raw(let raw) = head.fields { capacity += HeaderRewriting.responseHeadBound(raw) }
        var buffer = loop.heads.buffer(capacity: capacity)
        HeaderRewriting.writeHTTP1Response(
            head,
            requestVersion: version,
            keepAlive: keepAlive,
            chunked: chunkedResponse,
            into: &buffer
        )
        writeUnsentHead()
        unsentHead = buffer
    }

    func responseBody(_ buffer: ByteBuffer) {
        guard chunkedResponse else {
            if var head = unsentHead {
                unsentHead = nil
                if buffer.readableBytes <= Self.coalescedBodyBytes {
                    head.writeImmutableBuffer(buffer)
                    writeHead(head)
                    return
                }
                writeHead(head)
            }
            write(buffer)
            return
        }
        writeUnsentHead()
        guard buffer.readableBytes > 0, context != nil else { return }
        write(HeaderRewriting.chunkSizeLine(buffer.readableBytes, allocator))
        write(buffer)
        write(HeaderRewriting.lineEnd)
    }

    func respondWithError(_ error: ProxyError, requestEnded: Bool, requestHasBody: Bool) {
        let keepAlive = machine.errorResponse(requestEnded: requestEnded, requestHasBody: requestHasBody)
        writeError(error, keepAlive: keepAlive, version: machine.requestVersion, headRequest: machine.requestIsHEAD)
        finishResponse(nil, close: false)
    }
}
