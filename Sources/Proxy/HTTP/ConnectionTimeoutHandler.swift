import NIOCore

/// Sits in front of the HTTP decoder of a downstream connection and enforces two timers:
/// - a connection with no request in progress is closed after the idle timeout;
/// - once the first byte of a request arrives, its whole head must arrive within the header
///   timeout, or the client gets `408` (`request_timeout`) and the connection is closed.
///
/// The ``DownstreamHandler`` tells it, with outbound user events, when a head has been parsed and
/// when a response has been completed.
final class ConnectionTimeoutHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    enum Event: Sendable {
        case requestHeadReceived
        case responseCompleted
    }

    private var state = ConnectionTimeoutStateMachine()
    private var timer: Scheduled<Void>?
    private let headerTimeout: TimeAmount
    private let idleTimeout: TimeAmount
    private let onTimeout: (ProxyError) -> Void

    init(headerTimeout: Duration, idleTimeout: Duration, onTimeout: @escaping (ProxyError) -> Void) {
        self.headerTimeout = TimeAmount(headerTimeout)
        self.idleTimeout = TimeAmount(idleTimeout)
        self.onTimeout = onTimeout
    }

    func channelActive(context: ChannelHandlerContext) {
        arm(context: context, for: state.connectionOpened())
        context.fireChannelActive()
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { arm(context: context, for: state.connectionOpened()) }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        timer?.cancel()
        timer = nil
    }

    func channelInactive(context: ChannelHandlerContext) {
        timer?.cancel()
        timer = nil
        _ = state.closed()
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        arm(context: context, for: state.bytesReceived())
        context.fireChannelRead(data)
    }

    func triggerUserOutboundEvent(context: ChannelHandlerContext, event: Any, promise: EventLoopPromise<Void>?) {
        guard let event = event as? Event else {
            context.triggerUserOutboundEvent(event, promise: promise)
            return
        }
        switch event {
        case .requestHeadReceived: arm(context: context, for: state.headReceived())
        case .responseCompleted: arm(context: context, for: state.responseCompleted())
        }
        promise?.succeed()
    }

    private func arm(context: ChannelHandlerContext, for action: ConnectionTimeoutStateMachine.TimerAction) {
        switch action {
        case .none:
            return
        case .cancel:
            timer?.cancel()
            timer = nil
        case .idle, .header:
            timer?.cancel()
            let isHeader = action == .header
            let generation = state.generation
            let amount = isHeader ? headerTimeout : idleTimeout
            let loopBound = NIOLoopBound(self, eventLoop: context.eventLoop)
            let contextBound = NIOLoopBound(context, eventLoop: context.eventLoop)
            timer = context.eventLoop.scheduleTask(in: amount) {
                loopBound.value.fire(context: contextBound.value, generation: generation)
            }
        }
    }

    private func fire(context: ChannelHandlerContext, generation: Int) {
        guard generation == state.generation else { return }
        timer = nil
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
    /// Bumped whenever a timer is (re)armed or cancelled, so a stale timer does nothing.
    private(set) var generation = 0

    mutating func connectionOpened() -> TimerAction {
        state = .idle
        generation += 1
        return .idle
    }

    mutating func bytesReceived() -> TimerAction {
        guard state == .idle else { return .none }
        state = .readingHead
        generation += 1
        return .header
    }

    mutating func headReceived() -> TimerAction {
        guard state == .idle || state == .readingHead else { return .none }
        state = .active
        generation += 1
        return .cancel
    }

    mutating func responseCompleted() -> TimerAction {
        guard state == .active else { return .none }
        state = .idle
        generation += 1
        return .idle
    }

    mutating func closed() -> TimerAction {
        state = .closed
        generation += 1
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
