import NIOCore
import TrellisPolicy

/// The two timers of a downstream HTTP/1 connection, kept by its ``DownstreamHandler`` (not a
/// handler of its own: a pipeline hop on every read and read-complete cost more than the timers):
/// - a connection with no request in progress is closed after the idle timeout;
/// - once the first byte of a request arrives, its whole head must arrive within the header
///   timeout, or the client gets `408` (`request_timeout`) and the connection is closed.
final class ConnectionTimeouts {
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
        self.headerTimeout = TimeAmount(truncating: headerTimeout)
        self.idleTimeout = TimeAmount(truncating: idleTimeout)
        self.onTimeout = onTimeout
    }

    /// The connection is open (`now`: its loop's clock, an embedded loop's in tests).
    func opened(context: ChannelHandlerContext, now: NIODeadline) {
        apply(state.connectionOpened(), now: now)
        armIfNeeded(context: context)
    }

    func closed() {
        cancelTimer()
        apply(state.closed(), now: nil)
    }

    /// Bytes arrived: a request may have begun (its head timer starts).
    func bytesReceived(now: @autoclosure () -> NIODeadline) {
        apply(state.bytesReceived(), now: now())
    }

    /// Once the read was parsed: only a head still incomplete needs the (shorter) header timer.
    func readParsed(context: ChannelHandlerContext) {
        armIfNeeded(context: context)
    }

    func requestHeadReceived() {
        apply(state.headReceived(), now: nil)
    }

    func responseCompleted(context: ChannelHandlerContext, now: NIODeadline) {
        apply(state.responseCompleted(), now: now)
        armIfNeeded(context: context)
    }

    private func apply(_ action: ConnectionTimeoutStateMachine.TimerAction, now: @autoclosure () -> NIODeadline?) {
        switch action {
        case .none: return
        case .cancel: deadline = nil
        case .idle: deadline = (now() ?? .now()) + idleTimeout
        case .header: deadline = (now() ?? .now()) + headerTimeout
        }
    }

    private func armIfNeeded(context: ChannelHandlerContext) {
        guard let deadline else { return }
        if let firesAt = timerFiresAt, firesAt <= deadline { return }
        cancelTimer()
        schedule(at: deadline, context: context)
    }

    private func schedule(at when: NIODeadline, context: ChannelHandlerContext) {
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        timerFiresAt = when
        timer = context.eventLoop.scheduleTask(deadline: when) {
            let (timeouts, context) = bound.value
            timeouts.fire(context: context)
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
            context.writeAndFlush(NIOAny(buffer)).whenComplete { _ in contextBound.value.close(promise: nil) }
        case .ignore:
            return
        }
    }
}

@available(*, unavailable)
extension ConnectionTimeouts: Sendable {}

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
    /// The duration in whole nanoseconds (towards zero; clamped past ±292 years). From
    /// `attoseconds`, not `components` as NIO's own `TimeAmount(_:)` does (which also clamps past
    /// either end to the largest amount): the request path converts a route's timeout for
    /// every request, and `components` costs three times as much (a 128-bit division into
    /// seconds, then the multiplication back).
    init(truncating duration: Duration) {
        self = .nanoseconds(Int64(clamping: duration.attoseconds / 1_000_000_000))
    }
}
