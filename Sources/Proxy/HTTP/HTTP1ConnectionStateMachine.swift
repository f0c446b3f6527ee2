import NIOCore
import NIOHTTP1

/// The life of one HTTP/1 client connection, as a value: which request is being served, the
/// pipelined requests waiting their turn, whether reads are held, keep-alive and drain.
/// ``DownstreamHandler`` feeds it the connection's events and carries out the actions it returns
/// (start an exchange, write the end of a response, read, close); it owns no resource and reads
/// no clock (times are arguments), so every transition is tested without a socket.
struct HTTP1ConnectionStateMachine {
    /// The request being served (its exchange exists while the connection is `serving`).
    struct Request: Equatable {
        var version: HTTPVersion
        /// Whether the client asked for keep-alive (`Connection`, and the version's default).
        var clientWantsKeepAlive: Bool
        /// Whether the connection stays open after this response (settled by the response head).
        var keepAlive: Bool
        /// Whether the request has been read whole.
        var ended = false
        /// A HEAD request: its response has no body, whatever its head announces.
        var isHEAD = false
    }

    enum State: Equatable {
        /// Waiting for a request since the given time.
        case idle(since: NIODeadline)
        case serving(Request)
        /// The connection ends: nothing more is read, started or written.
        case closing
    }

    private(set) var state: State
    /// Parts of pipelined requests that wait for the current response to finish.
    private var queued = CircularBuffer<RequestPart>()
    /// A parse error in a pipelined request, answered once the responses before it are done.
    private var pendingError: ProxyError?
    /// A read was asked for and not passed on (back-pressure); resumed by ``resumeReading(exchangeHoldsReads:)``.
    private(set) var readHeld = false
    /// Drain: responses say `Connection: close` and an idle connection closes once quiet.
    private(set) var draining: Bool

    init(now: NIODeadline, draining: Bool) {
        state = .idle(since: now)
        self.draining = draining
    }

    /// Whether a request is being served or waits its turn (drain leaves the connection open).
    var isBusy: Bool {
        if case .serving = state { return true }
        return !queued.isEmpty || pendingError != nil
    }

    var isClosing: Bool { state == .closing }

    /// Since when the connection has waited for a request (nil while one is served or it closes).
    var idleSince: NIODeadline? {
        if case .idle(let since) = state { return since }
        return nil
    }

    /// The version of the request being served (HTTP/1.1 otherwise).
    var requestVersion: HTTPVersion {
        if case .serving(let request) = state { return request.version }
        return .http1_1
    }

    /// Whether the request being served is a HEAD.
    var requestIsHEAD: Bool {
        if case .serving(let request) = state { return request.isHEAD }
        return false
    }

    // MARK: Request parts

    enum PartAction: Equatable {
        /// Start an exchange for this head (already in origin form, see ``normalizedHead(_:)``).
        case startExchange(RequestHead)
        case forwardBody(ByteBuffer)
        case forwardEnd(HTTPHeaders?)
        /// Answer with this error and close (the head cannot be served).
        case reject(ProxyError)
        /// Nothing to do now: the part waits its turn, or belongs to a request already answered.
        case none
    }

    /// A request part from the parser (``HTTP1RequestParser``).
    mutating func received(_ part: RequestPart) -> PartAction {
        if state == .closing { return .none }
        // Pipelining: parts that arrive after the current request ended belong to the next
        // request; they wait (and reads pause) until the current response is complete.
        if !queued.isEmpty || isServingEndedRequest {
            queued.append(part)
            return .none
        }
        return process(part)
    }

    private var isServingEndedRequest: Bool {
        if case .serving(let request) = state { return request.ended }
        return false
    }

    private mutating func process(_ part: RequestPart) -> PartAction {
        switch (part, state) {
        case (_, .closing):
            return .none
        case (.head(let received), .idle):
            guard let head = Self.normalizedHead(received) else {
                return .reject(
                    .badRequest("absolute-form request target without a host: '\(received.uri.prefix(200))'")
                )
            }
            let keepAlive = head.keepAlive
            state = .serving(
                Request(
                    version: head.version,
                    clientWantsKeepAlive: keepAlive,
                    keepAlive: keepAlive,
                    isHEAD: head.method.isHEAD
                )
            )
            return .startExchange(head)
        case (.head, .serving):
            // The parser delivers a head only after the previous request's end.
            return .reject(.badRequest("a request head before the previous request ended"))
        case (.body(let buffer), .serving(let request)) where !request.ended:
            return .forwardBody(buffer)
        case (.end(let trailers), .serving(var request)) where !request.ended:
            request.ended = true
            state = .serving(request)
            return .forwardEnd(trailers)
        case (.body, _), (.end, _):
            // The rest of a request that was answered early (a local error before its end, on a
            // connection kept open because the request had no body to skip).
            return .none
        }
    }

    /// The next pipelined part or deferred error that can run now, after a response ended; nil
    /// when none can (the queue is empty, the connection closes, or the request being served was
    /// read whole and the next one must wait for its response).
    mutating func nextQueued() -> PartAction? {
        while !queued.isEmpty {
            if state == .closing || isServingEndedRequest { return nil }
            let action = process(queued.removeFirst())
            if action != .none { return action }
        }
        if let error = pendingError, state != .closing {
            if case .serving = state { return nil }
            pendingError = nil
            return .reject(error)
        }
        return nil
    }

    /// `head` with an absolute-form target (`http://alt.example/x`) turned into what an origin
    /// server expects: `Host: alt.example` (the received Host is ignored, RFC 9112 §3.2.2) and the
    /// origin-form target `/x`. Other targets are returned as they are; nil for an absolute-form
    /// target without a host.
    static func normalizedHead(_ head: RequestHead) -> RequestHead? {
        guard head.uri.utf8.first != UInt8(ascii: "/"), let scheme = head.uri.firstRange(of: "://") else { return head }
        let rest = head.uri[scheme.upperBound...]
        let end = rest.firstIndex { $0 == "/" || $0 == "?" || $0 == "#" } ?? rest.endIndex
        var authority = rest[..<end]
        if let at = authority.lastIndex(of: "@") { authority = authority[authority.index(after: at)...] }
        guard !authority.isEmpty else { return nil }
        var normalized = head
        var headers = head.fields.headers
        headers.replaceOrAdd(name: "host", value: String(authority))
        normalized.fields = RequestFields(headers)
        let target = rest[end...]
        normalized.uri = target.hasPrefix("/") ? String(target) : "/" + target
        return normalized
    }

    // MARK: Reads

    /// The channel asks for a read: pass it on (true) or hold it (false) while a pipelined request
    /// waits, an error waits its turn, or the exchange cannot take more of the request body.
    mutating func readRequested(exchangeHoldsReads: Bool) -> Bool {
        if !queued.isEmpty || pendingError != nil || (isServingUnendedRequest && exchangeHoldsReads) {
            readHeld = true
            return false
        }
        return true
    }

    private var isServingUnendedRequest: Bool {
        if case .serving(let request) = state { return !request.ended }
        return false
    }

    /// The exchange can take more: read again if a read was held for it (true).
    mutating func resumeReading(exchangeHoldsReads: Bool) -> Bool {
        guard readHeld, queued.isEmpty, pendingError == nil, case .serving = state, !exchangeHoldsReads else {
            return false
        }
        readHeld = false
        return true
    }

    /// After a response ended and the queue ran: read again if a read was held (true).
    mutating func resumeReadingAfterResponse(exchangeHoldsReads: Bool) -> Bool {
        guard readHeld, queued.isEmpty, state != .closing else { return false }
        if case .serving = state, exchangeHoldsReads { return false }
        readHeld = false
        return true
    }

    // MARK: Responses

    /// The upstream's response head is about to be sent: whether the connection stays open after
    /// it. A request still sending its body when the response starts leaves the connection
    /// unframed; an HTTP/1.0 response without a length ends with the connection.
    mutating func responseHead(requestEnded: Bool, hasContentLength: Bool) -> Bool {
        guard case .serving(var request) = state else { return false }
        var keepAlive = request.clientWantsKeepAlive && requestEnded && !draining
        if request.version == .http1_0 && !hasContentLength { keepAlive = false }
        request.keepAlive = keepAlive
        state = .serving(request)
        return keepAlive
    }

    /// A local error answers the request being served: whether the connection stays open after
    /// it. Answering before the request ended is safe for keep-alive only when the request has no
    /// body to skip; otherwise the connection is closed rather than guessing where the next
    /// request starts.
    mutating func errorResponse(requestEnded: Bool, requestHasBody: Bool) -> Bool {
        guard case .serving(var request) = state else { return false }
        request.keepAlive = (requestEnded || !requestHasBody) && request.clientWantsKeepAlive && !draining
        state = .serving(request)
        return request.keepAlive
    }

    enum EndAction: Equatable {
        /// Write the end and keep the connection for the next request.
        case keepOpen
        /// Write the end, flush, then close.
        case close
        /// The connection is already closing: write nothing.
        case none
    }

    /// The response is complete. Draining closes the connection after it even if its head said
    /// keep-alive (the drain began after the head was sent); so does a rejection (`close`: a
    /// request that could not be parsed or served, after which the stream cannot be trusted).
    mutating func responseEnded(now: NIODeadline, close: Bool = false) -> EndAction {
        switch state {
        case .closing:
            return .none
        case .serving(let request) where request.keepAlive && !draining && !close:
            state = .idle(since: now)
            return .keepOpen
        case .serving, .idle:
            state = .closing
            return .close
        }
    }

    // MARK: Errors, drain, close

    enum ParseErrorAction: Equatable {
        /// The client went away mid-request: nobody is left to answer. Close (and tell the exchange).
        case closeQuietly
        /// Mid-request (a bad chunk size, say): the exchange answers if it still can, then close.
        case failExchange(ProxyError)
        /// Answer with this error and close.
        case reject(ProxyError)
        /// A later pipelined request is malformed: it is answered in its turn.
        case deferred
        /// The connection is already closing.
        case none
    }

    mutating func parseError(_ proxyError: ProxyError, channelActive: Bool) -> ParseErrorAction {
        if state == .closing { return .none }
        if !channelActive {
            state = .closing
            return .closeQuietly
        }
        if isServingUnendedRequest && queued.isEmpty { return .failExchange(proxyError) }
        if isBusy {
            pendingError = pendingError ?? proxyError
            return .deferred
        }
        return .reject(proxyError)
    }

    /// Marks the connection draining; true when it should close now: it has waited for a request
    /// for at least `quiet`. A connection that just finished a response is the one a client's pool
    /// hands out next: closing it at once would race with the request already on its way (the
    /// keep-alive race), so it closes on a later call once quiet long enough.
    mutating func drain(quiet: TimeAmount, now: NIODeadline) -> Bool {
        draining = true
        guard !isBusy, case .idle(let since) = state, since + quiet <= now else { return false }
        state = .closing
        return true
    }

    mutating func stopDrain() {
        draining = false
    }

    /// The connection ends without a further response; false when it was already ending.
    mutating func abort() -> Bool {
        guard state != .closing else { return false }
        state = .closing
        return true
    }

    /// The channel closed; true when a request was being served (its exchange must hear it).
    mutating func closed() -> Bool {
        defer { state = .closing }
        if case .serving = state { return true }
        return false
    }
}
