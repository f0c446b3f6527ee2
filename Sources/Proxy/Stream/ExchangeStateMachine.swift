/// The life of one exchange's tries, as a value: which try is under way, whether it reached an
/// upstream, whether the response started, whether the request was already sent again after a
/// stale connection. ``ProxyExchange`` owns the resources (buffers, timers, the upstream stream)
/// and asks this what each event means; every transition is tested without a socket.
struct ExchangeStateMachine: Equatable, Sendable {
    enum Phase: Equatable, Sendable {
        /// Waiting for a connection (or the injected delay) for the current try.
        case connecting
        /// The current try's connection carries the request.
        case streaming
        /// The current try failed; the next starts after the back-off.
        case backingOff
        case finished
    }

    private(set) var phase = Phase.connecting
    /// The try under way (1 for the first).
    private(set) var tries = 1
    /// The current try got a connection, so the upstream may have seen the request.
    private(set) var attached = false
    /// The current try's connection carried requests before (the keep-alive race is possible).
    private(set) var reused = false
    /// Some of the response went to the client: no more retries, a failure now aborts.
    private(set) var responseStarted = false
    /// The request was sent again once on a new connection after its reused one closed.
    private(set) var staleRetried = false

    /// The current try (again) waits for a connection.
    mutating func tryStarted() {
        guard phase != .finished else { return }
        phase = .connecting
        attached = false
        reused = false
    }

    /// Whether an event about try `attempt`'s connecting concerns the current try.
    func isConnecting(attempt: Int) -> Bool { phase == .connecting && attempt == tries }

    enum Connected: Equatable, Sendable {
        /// Send the request on it.
        case send
        /// An abandoned try's connection (timed out, client gone): give it back unused.
        case giveBack
    }

    mutating func connected(attempt: Int, reused: Bool) -> Connected {
        guard isConnecting(attempt: attempt) else { return .giveBack }
        phase = .streaming
        attached = true
        self.reused = reused
        return .send
    }

    /// The response head went to the client.
    mutating func responseForwarded() {
        responseStarted = true
    }

    /// Whether the request may go once more on a new connection after its reused connection
    /// closed before any response byte (the keep-alive race); the caller adds what it knows of
    /// the request (kept whole; idempotent, or not fully sent).
    var maySendAgain: Bool { phase == .streaming && reused && !staleRetried && !responseStarted }

    mutating func sendingAgain() {
        staleRetried = true
        phase = .connecting
        attached = false
        reused = false
    }

    /// The inputs of the retry decision for the current try.
    func retryDecision(requestRetained: Bool, idempotent: Bool) -> RetryDecision {
        RetryDecision(
            tries: tries,
            responseStarted: responseStarted,
            requestRetained: requestRetained,
            attached: attached,
            idempotent: idempotent
        )
    }

    /// A retry was granted: the next try waits out the back-off. Returns its retry number (1 for
    /// the first retry), for the back-off's ceiling.
    mutating func retrying() -> Int {
        tries += 1
        phase = .backingOff
        attached = false
        reused = false
        return tries - 1
    }

    /// Whether the back-off that ended is still this exchange's (nothing ended it meanwhile).
    var isBackingOff: Bool { phase == .backingOff }

    /// Whether try `attempt`'s per-try timeout still matters.
    func perTryTimeoutApplies(attempt: Int) -> Bool {
        attempt == tries && !responseStarted && (phase == .connecting || phase == .streaming)
    }

    /// Ends the exchange; false when it had already ended.
    @discardableResult
    mutating func finish() -> Bool {
        guard phase != .finished else { return false }
        phase = .finished
        return true
    }
}
