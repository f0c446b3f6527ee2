import Atomics
import NIOCore
import NIOHTTP1

/// One HTTP/2 connection (h2c, prior knowledge) to an upstream endpoint, owned by the event loop
/// that opened it: it multiplexes the streams of many exchanges, up to the endpoint's
/// `MAX_CONCURRENT_STREAMS` (the pool opens another connection past it), and sits in that loop's
/// ``UpstreamPool`` between them.
final class HTTP2UpstreamConnection: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// Streams assumed allowed before the endpoint's SETTINGS arrive, and the most used at once
    /// whatever it allows.
    static let initialStreamLimit = 100
    static let maxStreams = 1000

    let poolKey: String
    let session = HTTP2Session(role: .client)
    private(set) var context: ChannelHandlerContext?
    weak var pool: UpstreamPool?
    /// What this connection counts in (`max_connections`, the connection metrics), until it is gone.
    var accounting = UpstreamConnectionAccounting()
    private var streams: [Int32: HTTP2UpstreamStream] = [:]
    /// Streams handed to exchanges whose HEADERS are not submitted yet.
    private var unsubmitted = 0
    private(set) var streamsOpened = 0
    private var settingsReceived = false
    private(set) var isClosed = false
    private(set) var goingAway = false
    private var writeScheduled = false
    var idleSince = NIODeadline.now()
    let idleTimeout: TimeAmount

    init(poolKey: String, idleTimeout: TimeAmount) {
        self.poolKey = poolKey
        self.idleTimeout = idleTimeout
    }

    var isActive: Bool { !isClosed && (context?.channel.isActive ?? false) }
    var isChannelWritable: Bool { context?.channel.isWritable ?? false }
    var isIdle: Bool { streams.isEmpty && unsubmitted == 0 }

    /// Streams this connection can still open.
    var available: Int {
        guard isActive, !goingAway, session.acceptsRequests else { return 0 }
        let advertised = settingsReceived ? Int(session.remoteMaxConcurrentStreams) : Self.initialStreamLimit
        return max(0, min(advertised, Self.maxStreams) - streams.count - unsubmitted)
    }

    /// A stream for one exchange (its HEADERS go out with the request head).
    func makeStream() -> HTTP2UpstreamStream {
        unsubmitted += 1
        defer { streamsOpened += 1 }
        return HTTP2UpstreamStream(connection: self, reused: streamsOpened > 0)
    }

    /// Submits a stream's request head; false when the connection can take no more streams.
    func submit(_ stream: HTTP2UpstreamStream, headers: [(name: String, value: String)], endStream: Bool) -> Int32? {
        unsubmitted -= 1
        guard isActive, let id = session.request(headers: headers, endStream: endStream) else { return nil }
        streams[id] = stream
        outputReady()
        return id
    }

    /// A stream given up before its HEADERS were submitted.
    func abandonUnsubmitted() {
        unsubmitted -= 1
        if isIdle { becameIdle() }
    }

    func close() {
        guard !isClosed else { return }
        isClosed = true
        session.goAway()
        writeOutput()
        context?.close(promise: nil)
    }

    /// No longer counts as a connection of its cluster (once, however it ended).
    func releaseLoad() { accounting.release() }

    // MARK: Channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        releaseLoad()
    }

    func channelActive(context: ChannelHandlerContext) {
        // The client preface and SETTINGS.
        writeOutput()
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let events: [HTTP2Session.Event]
        do {
            events = try session.receive(unwrapInboundIn(data))
        } catch {
            writeOutput()
            close()
            return
        }
        for event in events { handle(event) }
        // Frames go out once per batch of reads (channelReadComplete), not once per read.
        outputReady()
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        // Only the streams that heard something in this batch flush their downstream.
        for id in session.takeTouched() { streams[id]?.exchange?.upstreamReadComplete() }
        writeOutput()
        context.fireChannelReadComplete()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            writeOutput()
            for stream in streams.values where stream.isWritable { stream.exchange?.upstreamBecameWritable() }
        }
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        isClosed = true
        pool?.remove(self)
        let open = streams
        streams.removeAll()
        for stream in open.values { stream.closed(error: HTTP2StreamError(code: 0, connectionClosed: true)) }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        close()
    }

    private func handle(_ event: HTTP2Session.Event) {
        switch event {
        case .headers(let id, let block): streams[id]?.receivedHeaders(block)
        case .data(let id, let buffer): streams[id]?.receivedData(buffer)
        case .endStream(let id): streams[id]?.receivedEnd()
        case .closed(let id, let error):
            guard let stream = streams.removeValue(forKey: id) else { return }
            stream.closed(error: HTTP2StreamError(code: error, connectionClosed: false))
            if isIdle { becameIdle() }
        case .goAway:
            // Streams above the last one the endpoint will process are closed by the session
            // (REFUSED_STREAM); those below finish. No new stream goes here.
            goingAway = true
            pool?.remove(self)
            if isIdle { close() }
        case .remoteSettings:
            settingsReceived = true
        }
    }

    private func becameIdle() {
        idleSince = .now()
        if goingAway { close() }
    }

    // MARK: Output

    func outputReady() {
        guard !writeScheduled, let context else { return }
        writeScheduled = true
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        context.eventLoop.execute { bound.value.writeOutput() }
    }

    func writeOutput() {
        writeScheduled = false
        guard let context, context.channel.isActive else { return }
        var buffer = context.channel.allocator.buffer(capacity: 0)
        do {
            try session.produce(into: &buffer)
        } catch {
            context.close(promise: nil)
            return
        }
        if buffer.readableBytes > 0 { context.writeAndFlush(wrapOutboundOut(buffer), promise: nil) }
        for id in session.drained { streams[id]?.exchange?.upstreamBecameWritable() }
        for event in session.takeEvents() { handle(event) }
    }
}

@available(*, unavailable)
extension HTTP2UpstreamConnection: Sendable {}

/// An upstream HTTP/2 stream ended before its response did: reset by the endpoint (`code`, e.g.
/// REFUSED_STREAM 7, which means the request was not processed), or its connection closed.
struct HTTP2StreamError: Error, CustomStringConvertible {
    let code: UInt32
    let connectionClosed: Bool

    var description: String {
        connectionClosed ? "HTTP/2 connection closed" : "HTTP/2 stream reset (error code \(code))"
    }
}

/// One stream of an upstream HTTP/2 connection, serving one exchange. The request head is held
/// until the first body part, the end, or a flush, so that a request without a body goes out as
/// one HEADERS frame with END_STREAM.
final class HTTP2UpstreamStream: UpstreamStream {
    unowned let connection: HTTP2UpstreamConnection
    private(set) var id: Int32?
    var exchange: ProxyExchange?
    let isReused: Bool
    private var head: UpstreamRequestHead?
    private var requestEnded = false
    private var responseEnded = false
    private var responseHeadSeen = false
    private var isClosed = false
    private var abandoned = false
    /// Response bytes passed on while the downstream could not take more: credited back (the
    /// endpoint's window reopened) when it can.
    private var owed = 0

    init(connection: HTTP2UpstreamConnection, reused: Bool) {
        self.connection = connection
        self.isReused = reused
    }

    private var session: HTTP2Session { connection.session }

    var isActive: Bool { !isClosed && connection.isActive }

    var isWritable: Bool {
        connection.isChannelWritable && (id.map { session.queuedBytes(stream: $0) } ?? 0) < HTTP2Session.highWater
    }

    func send(_ part: UpstreamRequestPart) {
        switch part {
        case .head(let requestHead):
            head = requestHead
        case .body(let buffer):
            guard let id = id ?? submitHead(endStream: false) else { return }
            session.send(stream: id, buffer)
        case .end(let trailers):
            requestEnded = true
            let trailerFields = trailers.map(HTTP2DownstreamStream.fields) ?? []
            if id == nil {
                guard let id = submitHead(endStream: trailerFields.isEmpty) else { return }
                if !trailerFields.isEmpty { session.end(stream: id, trailers: trailerFields) }
            } else if let id {
                session.end(stream: id, trailers: trailerFields)
            }
        }
    }

    func flush() {
        if id == nil && head != nil { _ = submitHead(endStream: false) }
        connection.outputReady()
    }

    func flushSoon(_ loop: LoopContext) {
        flush()
    }

    func resumeReading() {
        guard owed > 0, let id else { return }
        session.consume(stream: id, bytes: owed)
        owed = 0
        connection.outputReady()
    }

    func release(reusable: Bool) {
        exchange = nil
        if id == nil {
            if !abandoned {
                abandoned = true
                head = nil
                connection.abandonUnsubmitted()
            }
            return
        }
        if !isClosed && !(requestEnded && responseEnded), let id {
            session.reset(stream: id, code: 0x8)  // CANCEL
            connection.outputReady()
        }
    }

    /// Sends the HEADERS; nil (and the exchange told) when the connection cannot take the stream.
    private func submitHead(endStream: Bool) -> Int32? {
        guard let head, !abandoned else { return nil }
        self.head = nil
        let fields = HeaderRewriting.http2RequestFields(head)
        guard let id = connection.submit(self, headers: fields, endStream: endStream) else {
            isClosed = true
            exchange?.upstreamClosed(error: HTTP2StreamError(code: 7, connectionClosed: true))
            return nil
        }
        self.id = id
        return id
    }

    // MARK: Response

    func receivedHeaders(_ block: HTTP2Session.HeaderBlock) {
        guard let exchange else { return }
        if responseHeadSeen {
            responseEnded = true
            exchange.upstreamResponse(.end(HTTP2DownstreamStream.trailers(block)))
            return
        }
        guard let code = block.first(":status").flatMap(Int.init), (100...999).contains(code) else {
            exchange.upstreamClosed(error: HTTPParserError.invalidStatus)
            return
        }
        // nghttp2 has checked every name: the pairs go to `HTTPHeaders` at once, without
        // `HTTPHeaders.add`'s check of each.
        var fields: [(String, String)] = []
        fields.reserveCapacity(block.fields.count)
        for (name, value) in block.fields where name.utf8.first != UInt8(ascii: ":") {
            fields.append((name, value))
        }
        let headers = HTTPHeaders(fields)
        let head = HTTPResponseHead(
            version: HTTPVersion(major: 2, minor: 0),
            status: HTTPResponseStatus(statusCode: code),
            headers: headers
        )
        if code < 200 {
            exchange.upstreamResponse(.head(ResponseHead(head)))
            return
        }
        responseHeadSeen = true
        exchange.upstreamResponse(.head(ResponseHead(head)))
        if block.endStream {
            responseEnded = true
            self.exchange?.upstreamResponse(.end(nil))
        }
    }

    func receivedData(_ buffer: ByteBuffer) {
        guard let id else { return }
        guard let exchange else {
            session.consume(stream: id, bytes: buffer.readableBytes)
            return
        }
        if exchange.downstreamWritable {
            session.consume(stream: id, bytes: buffer.readableBytes)
        } else {
            owed += buffer.readableBytes
        }
        exchange.upstreamResponse(.body(buffer))
    }

    func receivedEnd() {
        responseEnded = true
        exchange?.upstreamResponse(.end(nil))
    }

    func closed(error: HTTP2StreamError) {
        isClosed = true
        guard let exchange, !responseEnded else { return }
        exchange.upstreamClosed(error: error)
    }
}

@available(*, unavailable)
extension HTTP2UpstreamStream: Sendable {}
