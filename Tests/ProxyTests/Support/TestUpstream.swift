import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix

/// A real HTTP/1.1 server on loopback that the proxy forwards to in tests. It answers:
/// - `/delay/<ms>`: 200 after the delay;
/// - `/status/<code>`: that status;
/// - `/close`: closes the connection without answering;
/// - `/last`: answers with `connection: close`, then closes 20 ms later;
/// - `/count`: 200 with the number of body bytes received (streamed, never buffered);
/// - `/bytes/<n>`: 200 with `n` bytes of `x`, chunked, written in 64 KiB pieces as the socket drains;
/// - anything else: 200 with body `<name>`.
/// Every response carries `x-upstream: <name>`; the heads it received are kept for assertions.
/// ``failing(with:)`` makes it answer every request with one status until told otherwise;
/// ``failing(with:whenCountIn:)`` only requests whose number (0, 1, …, mod 10) is in a set;
/// ``delaying(_:)`` answers every request late.
final class TestUpstream: Sendable {
    enum Behavior: Sendable {
        case normal
        case status(Int)
        case statusFor(Int, Set<Int>)
        case delay(Int64)
        /// A request on a connection that already served one closes the connection unanswered:
        /// the keep-alive race (an idle connection closed as the next request arrives), every time.
        case closeReusedConnections
    }

    let name: String
    let port: Int
    private let failure: NIOLockedValueBox<Behavior>
    private let channel: any Channel
    private let received: NIOLockedValueBox<[HTTPRequestHead]>
    private let aborted: NIOLockedValueBox<Int>
    private let accepted: NIOLockedValueBox<Int>

    var requests: [HTTPRequestHead] { received.withLockedValue { $0 } }
    var requestCount: Int { received.withLockedValue { $0.count } }
    /// Requests whose connection closed before their end arrived.
    var abortedRequests: Int { aborted.withLockedValue { $0 } }
    /// Connections accepted so far.
    var connections: Int { accepted.withLockedValue { $0 } }

    /// From now on every request gets `status` (`nil`: back to normal).
    func failing(with status: Int?) { failure.withLockedValue { $0 = status.map { .status($0) } ?? .normal } }
    /// From now on the requests numbered n (counting all requests received, from 0) with
    /// n mod 10 in `share` get `status`; the others are answered as usual.
    func failing(with status: Int, whenCountIn share: Set<Int>) {
        failure.withLockedValue { $0 = .statusFor(status, share) }
    }
    /// From now on every request is answered (200) after `ms` milliseconds.
    func delaying(_ ms: Int64) { failure.withLockedValue { $0 = .delay(ms) } }
    /// From now on a request on a reused connection closes that connection unanswered.
    func closingReusedConnections() { failure.withLockedValue { $0 = .closeReusedConnections } }

    static func start(name: String, group: any EventLoopGroup) async throws -> TestUpstream {
        let received = NIOLockedValueBox<[HTTPRequestHead]>([])
        let aborted = NIOLockedValueBox<Int>(0)
        let accepted = NIOLockedValueBox<Int>(0)
        let failure = NIOLockedValueBox<Behavior>(.normal)
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                accepted.withLockedValue { $0 += 1 }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(
                        Handler(name: name, received: received, aborted: aborted, failure: failure)
                    )
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        return TestUpstream(
            name: name,
            channel: channel,
            received: received,
            aborted: aborted,
            accepted: accepted,
            failure: failure
        )
    }

    private init(
        name: String,
        channel: any Channel,
        received: NIOLockedValueBox<[HTTPRequestHead]>,
        aborted: NIOLockedValueBox<Int>,
        accepted: NIOLockedValueBox<Int>,
        failure: NIOLockedValueBox<Behavior>
    ) {
        self.failure = failure
        self.name = name
        self.channel = channel
        self.port = channel.localAddress!.port!
        self.received = received
        self.aborted = aborted
        self.accepted = accepted
    }

    func stop() async {
        try? await channel.close()
    }

    private final class Handler: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart

        let name: String
        let received: NIOLockedValueBox<[HTTPRequestHead]>
        let aborted: NIOLockedValueBox<Int>
        let failure: NIOLockedValueBox<Behavior>
        var head: HTTPRequestHead?
        var bodyBytes = 0
        /// A complete request whose response has not been written yet (e.g. `/delay`).
        var awaitingResponse = false
        /// Requests completed on this connection so far.
        var completed = 0

        init(
            name: String,
            received: NIOLockedValueBox<[HTTPRequestHead]>,
            aborted: NIOLockedValueBox<Int>,
            failure: NIOLockedValueBox<Behavior>
        ) {
            self.failure = failure
            self.name = name
            self.received = received
            self.aborted = aborted
        }

        func channelInactive(context: ChannelHandlerContext) {
            if head != nil || awaitingResponse { aborted.withLockedValue { $0 += 1 } }
            context.fireChannelInactive()
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let head):
                self.head = head
                bodyBytes = 0
                received.withLockedValue { $0.append(head) }
            case .body(let buffer):
                bodyBytes += buffer.readableBytes
            case .end:
                guard let head else { return }
                self.head = nil
                awaitingResponse = true
                defer { completed += 1 }
                let path = head.uri.split(separator: "?").first.map(String.init) ?? head.uri
                let number = received.withLockedValue { $0.count } - 1
                let behavior = failure.withLockedValue { $0 }
                var override: Int?
                switch behavior {
                case .normal: break
                case .closeReusedConnections:
                    if completed > 0 {
                        awaitingResponse = false
                        context.close(promise: nil)
                        return
                    }
                case .status(let status): override = status
                case .statusFor(let status, let share): if share.contains(number % 10) { override = status }
                case .delay(let ms):
                    let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
                    context.eventLoop.scheduleTask(in: .milliseconds(ms)) {
                        let (handler, context) = bound.value
                        handler.respond(context: context, head: head, status: .ok, body: handler.name)
                    }
                    return
                }
                if let status = override {
                    respond(context: context, head: head, status: .init(statusCode: status), body: name)
                } else if path == "/last" {
                    // Answers, says so, and closes: the connection must not be reused.
                    awaitingResponse = false
                    var headers = HTTPHeaders()
                    headers.add(name: "content-length", value: "\(name.utf8.count)")
                    headers.add(name: "connection", value: "close")
                    context.write(
                        wrapOutboundOut(.head(.init(version: head.version, status: .ok, headers: headers))),
                        promise: nil
                    )
                    context.write(
                        wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: name)))),
                        promise: nil
                    )
                    let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
                    context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in
                        bound.value.eventLoop.scheduleTask(in: .milliseconds(20)) { bound.value.close(promise: nil) }
                    }
                } else if path == "/close" {
                    awaitingResponse = false
                    context.close(promise: nil)
                } else if path.hasPrefix("/delay/"), let ms = Int64(path.dropFirst("/delay/".count)) {
                    let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
                    context.eventLoop.scheduleTask(in: .milliseconds(ms)) {
                        let (handler, context) = bound.value
                        handler.respond(context: context, head: head, status: .ok, body: handler.name)
                    }
                } else if path.hasPrefix("/status/"), let code = Int(path.dropFirst("/status/".count)) {
                    respond(context: context, head: head, status: .init(statusCode: code), body: name)
                } else if path.hasPrefix("/bytes/"), let count = Int(path.dropFirst("/bytes/".count)) {
                    streamBytes(context: context, head: head, count: count)
                } else if path == "/count" {
                    respond(context: context, head: head, status: .ok, body: "\(bodyBytes)")
                } else {
                    respond(context: context, head: head, status: .ok, body: name)
                }
            }
        }

        /// Writes `count` bytes chunked, 64 KiB at a time, waiting for each write before the next,
        /// so that nothing larger than one piece is ever buffered here.
        func streamBytes(context: ChannelHandlerContext, head: HTTPRequestHead, count: Int) {
            awaitingResponse = false
            var headers = HTTPHeaders()
            headers.add(name: "x-upstream", value: name)
            headers.add(name: "transfer-encoding", value: "chunked")
            context.write(
                wrapOutboundOut(.head(.init(version: head.version, status: .ok, headers: headers))),
                promise: nil
            )
            let piece = context.channel.allocator.buffer(repeating: UInt8(ascii: "x"), count: 64 * 1024)
            let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            func next(_ left: Int) {
                let (handler, context) = bound.value
                guard context.channel.isActive else { return }
                if left == 0 {
                    context.writeAndFlush(handler.wrapOutboundOut(.end(nil)), promise: nil)
                    return
                }
                let size = min(left, piece.readableBytes)
                context.writeAndFlush(handler.wrapOutboundOut(.body(.byteBuffer(piece.getSlice(at: 0, length: size)!))))
                    .assumeIsolated().whenSuccess { next(left - size) }
            }
            next(count)
        }

        func respond(context: ChannelHandlerContext, head: HTTPRequestHead, status: HTTPResponseStatus, body: String) {
            guard context.channel.isActive else { return }
            awaitingResponse = false
            var headers = HTTPHeaders()
            headers.add(name: "x-upstream", value: name)
            headers.add(name: "content-length", value: "\(body.utf8.count)")
            headers.add(name: "connection", value: "keep-alive")
            headers.add(name: "keep-alive", value: "timeout=60")
            context.write(
                wrapOutboundOut(.head(.init(version: head.version, status: status, headers: headers))),
                promise: nil
            )
            context.write(
                wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))),
                promise: nil
            )
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        }
    }
}
