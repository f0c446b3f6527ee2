import CoreMetrics
import NIOCore
import NIOHTTP1

/// The server side of one HTTP/2 connection (h2c with prior knowledge, chosen by the sniffer on
/// the client preface): every stream is one ``ProxyExchange`` through the same middleware chain,
/// routing, balancing and resilience as an HTTP/1 request. The protocol itself is
/// ``HTTP2Session``'s; this handler moves bytes between it and the socket and streams between it
/// and the exchanges.
final class HTTP2DownstreamHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let loop: LoopContext
    let accessLog: Bool
    /// The listener, and once it opened the connection's addresses: what its requests share.
    private var connection: ClientConnection
    let session: HTTP2Session
    private var streams: [Int32: HTTP2DownstreamStream] = [:]
    private var context: ChannelHandlerContext?
    private let lookup: OriginalDestinationLookup?
    private let idleTimeout: TimeAmount
    private var idleTimer: Scheduled<Void>?
    private var writeScheduled = false
    private var closing = false
    var isDraining = false
    /// When drain began: GOAWAY with the last stream follows one quiet period after the notice.
    private var drainStarted: NIODeadline?
    private var finalGoAwaySent = false

    init(
        loop: LoopContext,
        listenerName: String,
        accessLog: Bool,
        direction: TrafficDirection? = nil,
        settings: HTTP2Session.Settings,
        idleTimeout: TimeAmount,
        originalDestination lookup: OriginalDestinationLookup?
    ) {
        self.loop = loop
        self.accessLog = accessLog
        // The listener's metrics looked up once per connection.
        self.connection = ClientConnection(
            listenerName: listenerName,
            direction: direction,
            listenerStats: loop.stats.listener(listenerName)
        )
        self.idleTimeout = idleTimeout
        self.lookup = lookup
        self.session = HTTP2Session(role: .server, settings: settings)
    }

    var isChannelWritable: Bool { context?.channel.isWritable ?? false }

    // MARK: Channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        if context.channel.isActive { opened(context) }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    func channelActive(context: ChannelHandlerContext) {
        opened(context)
        context.fireChannelActive()
    }

    private var isOpen = false

    private func opened(_ context: ChannelHandlerContext) {
        guard !isOpen else { return }
        isOpen = true
        connection = connection.opened(context.channel, originalDestination: lookup)
        loop.opened(self)
        loop.stats.activeConnections.increment()
        loop.stats.totalConnections.increment()
        if loop.draining { startDrain() }
        armIdleTimer()
        // The server's SETTINGS go first (RFC 9113 §3.4).
        writeOutput()
    }

    func channelInactive(context: ChannelHandlerContext) {
        if isOpen {
            isOpen = false
            loop.closed(self)
            loop.stats.activeConnections.decrement()
        }
        idleTimer?.cancel()
        let open = streams
        streams.removeAll()
        for stream in open.values { stream.exchange?.downstreamClosed() }
        context.fireChannelInactive()
    }

    /// The streams of the current read that were closed in it too (see ``channelRead``).
    private var resetOnArrival: Set<Int32> = []

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let bytes = unwrapInboundIn(data)
        let events: [HTTP2Session.Event]
        do {
            events = try session.receive(bytes)
        } catch {
            fail(error)
            return
        }
        // Streams opened and closed in this one read (rapid reset, CVE-2023-44487): their
        // requests are counted but never started, so a reset costs the upstream nothing.
        resetOnArrival.removeAll()
        for case .closed(let id, _) in events where streams[id] == nil { resetOnArrival.insert(id) }
        for event in events { handle(event) }
        // Frames go out once per batch of reads (channelReadComplete), not once per read.
        outputReady()
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        // Only the streams that received something in this batch flush their upstream.
        for id in session.takeTouched() { streams[id]?.exchange?.downstreamReadComplete() }
        writeOutput()
        context.fireChannelReadComplete()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            writeOutput()
            for stream in streams.values where stream.isWritable { stream.exchange?.downstreamBecameWritable() }
        }
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    /// A protocol violation or flood: the GOAWAY libnghttp2 queued goes out, then the connection
    /// closes; the exchanges of its streams end as if their clients had left.
    private func fail(_ error: HTTP2Session.Failure) {
        loop.stats.record(.badRequest("HTTP/2: \(error)"))
        writeOutput()
        closeConnection()
    }

    private func closeConnection() {
        guard !closing, let context else { return }
        closing = true
        context.close(promise: nil)
    }

    // MARK: Session events

    private func handle(_ event: HTTP2Session.Event) {
        switch event {
        case .headers(let id, let block):
            if let stream = streams[id] {
                // Trailers end the request.
                stream.exchange?.requestEnd(HTTP2DownstreamStream.trailers(block))
            } else if resetOnArrival.contains(id) {
                loop.stats.downstreamRequests.increment()
                loop.stats.record(.clientDisconnect("HTTP/2 stream reset in the read that opened it"))
            } else {
                openStream(id, block)
            }
        case .data(let id, let buffer):
            guard let stream = streams[id], let exchange = stream.exchange else {
                session.consume(stream: id, bytes: buffer.readableBytes)
                return
            }
            exchange.requestBody(buffer)
            if exchange.holdsDownstreamReads {
                stream.owed += buffer.readableBytes
            } else {
                session.consume(stream: id, bytes: buffer.readableBytes)
            }
        case .endStream(let id):
            streams[id]?.exchange?.requestEnd(nil)
        case .closed(let id, _):
            guard let stream = streams.removeValue(forKey: id) else { return }
            // Reset by the client, or ended before the exchange finished: the client left.
            if let exchange = stream.exchange, !exchange.isFinished { exchange.downstreamClosed() }
            stream.exchange = nil
            if streams.isEmpty {
                armIdleTimer()
                if isDraining && finalGoAwaySent { closeWhenDone() }
            }
        case .goAway, .remoteSettings:
            break
        }
    }

    private func openStream(_ id: Int32, _ block: HTTP2Session.HeaderBlock) {
        idleTimer?.cancel()
        idleTimer = nil
        let stream = HTTP2DownstreamStream(connection: self, id: id)
        stream.isGRPC = block.first("content-type")?.hasPrefix("application/grpc") ?? false
        streams[id] = stream
        loop.stats.downstreamRequests.increment()
        if block.oversized {
            stream.respondWithError(
                .headerTooLarge("HTTP/2 header list over \(session.settings.maxHeaderListSize) bytes"),
                requestEnded: true,
                requestHasBody: false
            )
            return
        }
        guard let head = HTTP2DownstreamStream.requestHead(block) else {
            // libnghttp2 checked the pseudo-headers; CONNECT (no :path) is what remains.
            stream.respondWithError(
                .badRequest("HTTP/2 request without :method and :path (CONNECT is not proxied)"),
                requestEnded: true,
                requestHasBody: false
            )
            return
        }
        let chain = loop.currentChain()
        let request = RequestContext(
            head: RequestHead(head),
            connection: connection,
            startTime: .now(),
            readsTraceFields: loop.tracing != nil
        )
        let exchange = ProxyExchange(downstream: stream, loop: loop, request: request, chain: chain)
        stream.exchange = exchange
        exchange.start()
        if block.endStream { exchange.requestEnd(nil) }
    }

    // MARK: Output

    /// Frames are ready in the session: write them after the current batch of events.
    func outputReady() {
        guard !writeScheduled, let context else { return }
        writeScheduled = true
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        context.eventLoop.execute { bound.value.writeOutput() }
    }

    /// Writes what the session has ready, as far as the socket takes it.
    func writeOutput() {
        writeScheduled = false
        guard let context, !closing, context.channel.isWritable || !context.channel.isActive else { return }
        var buffer = context.channel.allocator.buffer(capacity: 0)
        do {
            try session.produce(into: &buffer)
        } catch {
            closeConnection()
            return
        }
        if buffer.readableBytes > 0 { context.writeAndFlush(wrapOutboundOut(buffer), promise: nil) }
        for id in session.drained { streams[id]?.exchange?.downstreamBecameWritable() }
        for event in session.takeEvents() { handle(event) }
        if !session.wantsRead && !session.wantsWrite { closeConnection() }
    }

    // MARK: Timers and drain

    private func armIdleTimer() {
        idleTimer?.cancel()
        guard let context, streams.isEmpty else { return }
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        idleTimer = context.eventLoop.scheduleTask(in: idleTimeout) {
            let handler = bound.value
            guard handler.streams.isEmpty else { return }
            handler.session.goAway()
            handler.writeOutput()
            handler.closeConnection()
        }
    }

    private func startDrain() {
        guard !isDraining else { return }
        isDraining = true
        drainStarted = .now()
        session.announceShutdown()
        outputReady()
    }

    private func closeWhenDone() {
        writeOutput()
        closeConnection()
    }
}

extension HTTP2DownstreamHandler: DownstreamConnection {
    var isBusy: Bool { !streams.isEmpty }
    var requestsInFlight: Int { streams.count }

    /// Drain: GOAWAY with the highest stream id at once (the client opens no more streams), then
    /// after one quiet period GOAWAY with the last stream processed; the connection closes when its
    /// last stream has finished.
    func drain(quiet: TimeAmount) -> Bool {
        startDrain()
        if !finalGoAwaySent, let started = drainStarted, started + quiet <= .now() {
            finalGoAwaySent = true
            session.goAway()
            outputReady()
        }
        guard finalGoAwaySent, streams.isEmpty, !closing else { return false }
        closeWhenDone()
        return true
    }

    func stopDrain() {
        // A GOAWAY cannot be taken back: the client reconnects for new streams.
        isDraining = false
    }
}

@available(*, unavailable)
extension HTTP2DownstreamHandler: Sendable {}
