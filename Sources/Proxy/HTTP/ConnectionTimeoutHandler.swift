import NIOCore
import TrellisPolicy

/// Sits in front of the HTTP decoder of a downstream connection and enforces two timers:
/// - a connection with no request in progress is closed after the idle timeout;
/// - once the first byte of a request arrives, its whole head must arrive within the header
///   timeout, or the client gets `408` (`request_timeout`) and the connection is closed.
///
/// The ``DownstreamHandler`` of the same channel tells it directly (same event loop, no pipeline
/// event) when a head has been parsed and when a response has been completed.
final class ConnectionTimeoutHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private var state = ConnectionTimeoutStateMachine()
    /// When the current phase (idle or reading a head) expires; `nil` while a request is served.
    private var deadline: NIODeadline?
    /// The one timer of this connection and when it fires. It is not moved on every request: when
    /// it fires early it re-arms for the current deadline, so a busy keep-alive connection costs
    /// no timer work per request.
    private var timer: Scheduled<Void>?
    private var timerFiresAt: NIODeadline?
    private let headerTimeout: TimeAmount
    private let idleTimeout: TimeAmount
    private let onTimeout: (ProxyError) -> Void

    init(headerTimeout: Duration, idleTimeout: Duration, onTimeout: @escaping (ProxyError) -> Void) {
        self.headerTimeout = TimeAmount(headerTimeout)
        self.idleTimeout = TimeAmount(idleTimeout)
        self.onTimeout = onTimeout
    }

    func channelActive(context: ChannelHandlerContext) {
        apply(state.connectionOpened())
        armIfNeeded(context: context)
        context.fireChannelActive()
    }

    private var context: ChannelHandlerContext?

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        if context.channel.isActive {
            apply(state.connectionOpened())
            armIfNeeded(context: context)
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        cancelTimer()
    }

    func channelInactive(context: ChannelHandlerContext) {
        cancelTimer()
        apply(state.closed())
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        apply(state.bytesReceived())
        context.fireChannelRead(data)
        // Most heads arrive whole in one read and are parsed inside fireChannelRead; only a head
        // still incomplete afterwards needs the (shorter) header timer.
        armIfNeeded(context: context)
    }

    func requestHeadReceived() {
        apply(state.headReceived())
    }

    func responseCompleted() {
        apply(state.responseCompleted())
        if let context { armIfNeeded(context: context) }
    }

    private func apply(_ action: ConnectionTimeoutStateMachine.TimerAction) {
        // The loop's clock (an embedded loop's in tests).
        let now = context?.eventLoop.now ?? .now()
        switch action {
        case .none: return
        case .cancel: deadline = nil
        case .idle: deadline = now + idleTimeout
        case .header: deadline = now + headerTimeout
        }
    }

    private func armIfNeeded(context: ChannelHandlerContext) {
        guard let deadline else { return }
        if let firesAt = timerFiresAt, firesAt <= deadline { return }
        cancelTimer()
        schedule(at: deadline, context: context)
    }

    private func schedule(at when: NIODeadline, context: ChannelHandlerContext) {
        let loopBound = NIOLoopBound(self, eventLoop: context.eventLoop)
        let contextBound = NIOLoopBound(context, eventLoop: context.eventLoop)
        timerFiresAt = when
        timer = context.eventLoop.scheduleTask(deadline: when) {
            loopBound.value.fire(context: contextBound.value)
        }
    }

    private func cancelTimer() {
        timer?.cancel()
        timer = nil
        timerFiresAt = nil
    }

    private func fire(context: ChannelHandlerContext) {
        timer = nil
        timerFiresAt = nil
        guard let deadline else { return }
        if context.eventLoop.now < deadline {
            schedule(at: deadline, context: context)
            return
        }
        switch state.timerFired() {
        case .closeIdle:
            context.close(promise: nil)
        case .respond408:
            let error = ProxyError.requestTimeout("request head not complete after \(headerTimeout)")
            onTimeout(error)
            let body = "\(error.token)\n"
            var buffer = context.channel.allocator.buffer(capacity: 160)
            buffer.writeString(
                "HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: \(body.utf8.count)\r\n"
                    + "x-trellis-error: \(error.token)\r\nconnection: close\r\n\r\n\(body)"
            )
            let contextBound = NIOLoopBound(context, eventLoop: context.eventLoop)
            context.writeAndFlush(wrapOutboundOut(buffer)).whenComplete { _ in contextBound.value.close(promise: nil) }
        case .ignore:
            return
        }
    }
}

@available(*, unavailable)
extension ConnectionTimeoutHandler: Sendable {}

/// Which timer a downstream connection runs: idle (no request), header (a request started, head
/// incomplete), or none (a request is being served).
struct ConnectionTimeoutStateMachine {
    enum State { case idle, readingHead, active, closed }
    enum TimerAction: Equatable { case none, cancel, idle, header }
    enum FireAction: Equatable { case closeIdle, respond408, ignore }

    private(set) var state: State = .idle

    mutating func connectionOpened() -> TimerAction {
        state = .idle
        return .idle
    }

    mutating func bytesReceived() -> TimerAction {
        guard state == .idle else { return .none }
        state = .readingHead
        return .header
    }

    mutating func headReceived() -> TimerAction {
        guard state == .idle || state == .readingHead else { return .none }
        state = .active
        return .cancel
    }

    mutating func responseCompleted() -> TimerAction {
        guard state == .active else { return .none }
        state = .idle
        return .idle
    }

    mutating func closed() -> TimerAction {
        state = .closed
        return .cancel
    }

    mutating func timerFired() -> FireAction {
        switch state {
        case .idle:
            state = .closed
            return .closeIdle
        case .readingHead:
            state = .closed
            return .respond408
        case .active, .closed:
            return .ignore
        }
    }
}

extension TimeAmount {
    init(_ duration: Duration) {
        let (seconds, attoseconds) = duration.components
        self = .nanoseconds(seconds * 1_000_000_000 + attoseconds / 1_000_000_000)
    }
}
