import Atomics
import CoreMetrics
import Logging
import NIOCore
import NIOHTTP1
import TrellisPolicy

/// One request's trip through the proxy: the middleware chain, then the upstream exchange with
/// bodies streamed both ways under back-pressure, retries, the route timeout, and the final
/// accounting. Lives on the downstream connection's event loop, like its upstream connection.
final class ProxyExchange {
    private let downstream: any DownstreamStream
    private let loop: LoopContext
    let request: RequestContext
    private let chain: MiddlewareChain
    /// Where the exchange's tries stand (pure: ``ExchangeStateMachine``).
    private var machine = ExchangeStateMachine()
    /// The current try's upstream, while it streams.
    private var upstream: (any UpstreamStream)?
    /// The head sent upstream (set by ``start()``), kept apart from the parts after it so that a
    /// request whose connection is ready at once (a GET on a kept-alive one) allocates no array.
    private var upstreamHead: UpstreamRequestHead?
    /// Whether the current try has yet to send ``upstreamHead``.
    private var headPending = false
    /// Parts after the head that came while connecting (or all of them again, for another try).
    private var pending = RequestParts()
    private var requestEnded = false
    private var upstreamKeepAlive = false
    /// The slot of this exchange in its loop's ``RequestDeadlines``, while it has one.
    private var deadlineSlot: Int?

    // Retries (only with a route retry policy).
    /// Every request part after the head so far, to send again (after the head) on the next try;
    /// `nil` when not kept, or once the body outgrew ``RetryPolicy/maxRetainedBodyBytes`` (then
    /// no retry).
    private var retained: RequestParts?
    private var retainedBytes = 0
    private var perTryTimer: Scheduled<Void>?
    private var backoffTimer: Scheduled<Void>?
    /// The cluster load whose retry count this exchange holds (one unit while retrying).
    private var retrySlot: ClusterLoad?
    /// When the current try began waiting for a connection (access log only).
    private var tryStartedAt: NIODeadline?
    /// Inside the pool's `acquire`: a connection attached now was idle in the pool.
    private var acquiring = false

    init(downstream: any DownstreamStream, loop: LoopContext, request: RequestContext, chain: MiddlewareChain) {
        self.downstream = downstream
        self.loop = loop
        self.request = request
        self.chain = chain
    }

    var downstreamWritable: Bool { downstream.isWritable }

    /// Whether the downstream handler should stop reading the request for now.
    var holdsDownstreamReads: Bool {
        switch machine.phase {
        case .connecting, .backingOff: return true
        case .streaming: return !(upstream?.isWritable ?? false)
        case .finished: return false
        }
    }

    // MARK: Request side

    func start() {
        // `x-request-id`: the client's, else a new one, sent upstream (also on a refusal's log line).
        if request.arrivedRequestID == nil { request.generatedRequestID = RequestID.make(&loop.resources.rng) }
        if let tracing = loop.tracing, tracing.traces(request.originalDestination) {
            request.trace = RequestTrace.start(request, tracing: tracing, rng: &loop.resources.rng)
        }
        if let error = chain.onRequest(request) {
            respondLocally(error)
            return
        }
        guard let cluster = request.cluster,
            let endpoint = request.passthroughEndpoint ?? request.endpointIndex.map({ cluster.endpoints[$0] })
        else {
            respondLocally(.noRoute("no middleware chose an upstream"))
            return
        }
        // A gRPC caller's own deadline (`grpc-timeout`) shortens the route's.
        if request.isGRPC, let text = request.head.fields.first("grpc-timeout"),
            let deadline = Self.grpcTimeout(text)
        {
            request.timeout = min(request.timeout ?? deadline, deadline)
        }
        if let timeout = request.timeout {
            deadlineSlot = loop.deadlines.register(
                self,
                timeout: TimeAmount(truncating: timeout),
                now: request.startTime
            )
        }
        upstreamHead = UpstreamRequestHead(request: request)
        headPending = true
        if request.hasRetryPolicy { retained = RequestParts() }
        if let delay = request.faultDelay {
            // Injected delay: the request waits (its body held as while connecting), within the
            // route's timeout, then goes upstream.
            let bound = NIOLoopBound(self, eventLoop: loop.eventLoop)
            loop.eventLoop.scheduleTask(in: TimeAmount(truncating: delay)) {
                let exchange = bound.value
                guard exchange.machine.phase == .connecting, !exchange.machine.attached else { return }
                exchange.startTry(endpoint: endpoint, cluster: cluster)
            }
            return
        }
        startTry(endpoint: endpoint, cluster: cluster)
    }

    private func startTry(endpoint: ClusterRuntime.EndpointRuntime, cluster: ClusterRuntime) {
        machine.tryStarted()
        if request.hasRetryPolicy, let perTry = request.retryPolicy?.perTryTimeout {
            let bound = NIOLoopBound(self, eventLoop: loop.eventLoop)
            let attempt = machine.tries
            perTryTimer = loop.eventLoop.scheduleTask(in: TimeAmount(truncating: perTry)) {
                bound.value.perTryTimedOut(attempt: attempt)
            }
        }
        // The access log's connect time: none for an idle pooled connection handed over at once
        // (no wait, no connect: 0, without reading the clock); otherwise from here to the
        // connection being ready.
        tryStartedAt = nil
        acquiring = true
        loop.pool.acquire(endpoint: endpoint, cluster: cluster, for: self)
        acquiring = false
        if downstream.accessLog && machine.phase == .connecting && !machine.attached { tryStartedAt = .now() }
    }

    /// A circuit breaker refused the connection this exchange needed.
    func overflow(_ error: ProxyError) {
        guard machine.phase == .connecting else { return }
        respondLocally(error)
    }

    /// The try under way (1 for the first), so that a connection finishing for an abandoned try
    /// is not taken for the current one's.
    var currentTry: Int { machine.tries }

    /// Connecting to the endpoint failed.
    func connectFailed(_ error: any Error, try attempt: Int) {
        guard machine.isConnecting(attempt: attempt) else { return }
        request.cluster?.stats.connectFailures.increment()
        let failure = ProxyError.upstreamConnectFailure("\(request.endpoint.map(\.description) ?? "-"): \(error)")
        if retry(after: .connectFailure, failure) { return }
        respondLocally(failure)
    }

    /// An upstream connection is ready for this exchange.
    func attach(_ connection: any UpstreamStream, try attempt: Int) {
        guard machine.connected(attempt: attempt, reused: connection.isReused) == .send else {
            // Timed out or the client left while connecting: the fresh connection is still good.
            releaseOrClose(connection, reusable: true)
            return
        }
        upstream = connection
        connection.exchange = self
        if acquiring {
            request.upstreamConnectNanos = 0
        } else if let tryStartedAt {
            request.upstreamConnectNanos = (NIODeadline.now() - tryStartedAt).nanoseconds
        }
        // A reused keep-alive connection may have been closed by the upstream a moment ago (its
        // idle timeout, a drain): keep what is sent, to send it again on a new connection.
        if machine.maySendAgain && retained == nil && retainedBytes == 0 {
            retained = pending
            retainedBytes = pending.bodyBytes
            if retainedBytes > RetryPolicy.maxRetainedBodyBytes { retained = nil }
        }
        if headPending, let head = upstreamHead {
            headPending = false
            connection.send(.head(head))
            guard upstream === connection else { return }
        }
        let parts = pending
        pending = RequestParts()
        for buffer in parts.bodies {
            connection.send(.body(buffer))
            // An HTTP/2 connection that refused the stream (a GOAWAY just in) fails the try at
            // once, and the request may already be on its way elsewhere.
            guard upstream === connection else { return }
        }
        if parts.ended {
            connection.send(.end(parts.trailers))
            guard upstream === connection else { return }
        }
        connection.flushSoon(loop)
        downstream.resumeReadingIfHeld()
    }

    func requestBody(_ buffer: ByteBuffer) {
        request.requestBytes += buffer.readableBytes
        if retained != nil { retain(body: buffer) }
        switch machine.phase {
        case .connecting: pending.bodies.append(buffer)
        case .streaming: upstream?.send(.body(buffer))
        case .backingOff, .finished: break  // kept in `retained` for the next try / answered early
        }
    }

    func requestEnd(_ trailers: HTTPHeaders?) {
        requestEnded = true
        retained?.end(trailers)
        switch machine.phase {
        case .connecting: pending.end(trailers)
        case .streaming:
            upstream?.send(.end(trailers))
            upstream?.flushSoon(loop)
        case .backingOff, .finished: break
        }
    }

    private func retain(body buffer: ByteBuffer) {
        retainedBytes += buffer.readableBytes
        if retainedBytes > RetryPolicy.maxRetainedBodyBytes {
            retained = nil
        } else {
            retained?.bodies.append(buffer)
        }
    }

    func downstreamReadComplete() {
        if machine.phase == .streaming { upstream?.flushSoon(loop) }
    }

    func upstreamBecameWritable() {
        downstream.resumeReadingIfHeld()
    }

    func downstreamBecameWritable() {
        if machine.phase == .streaming { upstream?.resumeReading() }
    }

    // MARK: Response side

    func upstreamResponse(_ part: UpstreamResponsePart) {
        guard machine.phase == .streaming, let upstream else { return }
        switch part {
        case .head(let head) where head.status.code < 200 && head.status != .switchingProtocols:
            // 100 Continue and friends go straight through; the final head follows.
            downstream.informational(head)
        case .head(let head):
            if request.isGRPC { request.grpcStatus = head.first(name: "grpc-status").flatMap { Int($0) } }
            if request.hasRetryPolicy, let policy = request.retryPolicy {
                let failure = ProxyError.upstreamReset("")  // not sent: the answer goes out if no retry
                if policy.retries(status: Int(head.status.code)) {
                    if retry(after: .status(Int(head.status.code)), failure) { return }
                } else if let grpc = request.grpcStatus, policy.retries(grpcStatus: grpc) {
                    if retry(after: .grpcStatus(grpc), failure) { return }
                }
            }
            cancelPerTryTimer()
            upstreamKeepAlive = head.keepAlive
            request.responseStatus = head.status
            if downstream.accessLog { request.firstByteNanos = (NIODeadline.now() - request.startTime).nanoseconds }
            machine.responseForwarded()
            downstream.responseHead(head, requestEnded: requestEnded)
        case .body(let buffer):
            request.responseBytes += buffer.readableBytes
            downstream.responseBody(buffer)
        case .end(let trailers):
            if request.isGRPC, let status = trailers?.first(name: "grpc-status").flatMap({ Int($0) }) {
                request.grpcStatus = status
            }
            // An upstream that said `Connection: close` (or spoke HTTP/1.0) is about to close.
            let reusable = requestEnded && upstreamKeepAlive && upstream.isActive
            finish(upstream: upstream, reusable: reusable)
            downstream.responseEnded(trailers)
        }
    }

    func upstreamReadComplete() {
        downstream.flush()
    }

    /// The upstream connection closed or failed while serving this exchange.
    func upstreamClosed(error: (any Error)?) {
        guard machine.phase == .streaming, let upstream else { return }
        if machine.responseStarted {
            // The response is cut short; the client must see the connection end, not a shorter body.
            finish(upstream: upstream, reusable: false)
            downstream.abort()
        } else if error is HTTPParserError || error is HTTP1ResponseParser.ParseError {
            respondLocally(.upstreamProtocolError("\(request.endpoint.map(\.description) ?? "-"): \(error!)"))
        } else {
            if sendAgainOnANewConnection(upstream) { return }
            let failure = ProxyError.upstreamReset(
                "\(request.endpoint.map(\.description) ?? "-"): \(error.map { "\($0)" } ?? "closed")"
            )
            if retry(after: .reset, failure) { return }
            respondLocally(failure)
        }
    }

    /// A reused keep-alive connection closed before any byte of the response: the upstream most
    /// likely closed it as idle while the request was on its way (the keep-alive race, which a
    /// draining peer makes frequent). The request goes again, once, on a new connection to the
    /// same endpoint — without a retry policy, outside the retry budget — if it is idempotent, or
    /// if the upstream cannot have had all of it (its end was not sent yet).
    private func sendAgainOnANewConnection(_ upstream: any UpstreamStream) -> Bool {
        guard machine.maySendAgain, let parts = retained, isIdempotent || !requestEnded,
            let cluster = request.cluster,
            let endpoint = request.passthroughEndpoint ?? request.endpointIndex.map({ cluster.endpoints[$0] })
        else { return false }
        machine.sendingAgain()
        request.retries += 1
        if downstream.accessLog { tryStartedAt = .now() }
        cluster.stats.staleConnectionRetries.increment()
        upstream.exchange = nil
        upstream.release(reusable: false)
        self.upstream = nil
        if !request.hasRetryPolicy {
            // Kept only for this: whatever arrives next goes to the new connection directly.
            retained = nil
        }
        headPending = true
        pending = parts
        loop.pool.acquire(endpoint: endpoint, cluster: cluster, for: self, fresh: true)
        return true
    }

    /// A `grpc-timeout` value (at most 8 digits and a unit: H, M, S, m, u, n) as a duration.
    static func grpcTimeout(_ text: String) -> Duration? {
        guard let unit = text.last, text.count >= 2, text.count <= 9,
            let value = Int64(text.dropLast()), value >= 0
        else { return nil }
        switch unit {
        case "H": return .seconds(value * 3600)
        case "M": return .seconds(value * 60)
        case "S": return .seconds(value)
        case "m": return .milliseconds(value)
        case "u": return .microseconds(value)
        case "n": return .nanoseconds(value)
        default: return nil
        }
    }

    // MARK: Retries

    private var isIdempotent: Bool {
        switch request.head.method {
        case .GET, .HEAD, .OPTIONS, .PUT, .DELETE, .TRACE: return true
        default: return false
        }
    }

    /// Starts another try after `failure` if the route's policy, the budget and the circuit
    /// breaker allow it; returns whether it did (otherwise the caller answers with `failure`).
    private func retry(after failure: TryFailure, _ error: ProxyError) -> Bool {
        guard request.hasRetryPolicy, let policy = request.retryPolicy, let cluster = request.cluster else {
            return false
        }
        let decision = machine.retryDecision(requestRetained: retained != nil, idempotent: isIdempotent)
        guard decision.allows(policy, after: failure) else { return false }
        if retrySlot == nil {
            let load = cluster.load
            let budget = RetryBudget(policy, maxRetries: cluster.limits.maxRetries)
            guard
                ClusterLoad.acquire(
                    load.retries,
                    limit: budget.limit(requestsInFlight: load.requests.load(ordering: .relaxed))
                )
            else {
                cluster.stats.overflowRetries.increment()
                return false
            }
            retrySlot = load
        }
        cluster.stats.retries.increment()
        reportTryFailure(cluster)
        cancelPerTryTimer()
        if machine.phase == .streaming, let upstream {
            upstream.exchange = nil
            upstream.release(reusable: false)
            self.upstream = nil
        }
        let retryNumber = machine.retrying()
        request.retries += 1
        pickAnotherEndpoint(cluster)
        let ceiling = TimeAmount(
            truncating: Backoff.ceiling(base: policy.backoffBase, max: policy.backoffMax, retry: retryNumber)
        )
        .nanoseconds
        let wait = TimeAmount.nanoseconds(ceiling > 0 ? Int64.random(in: 0...ceiling) : 0)
        let bound = NIOLoopBound(self, eventLoop: loop.eventLoop)
        backoffTimer = loop.eventLoop.scheduleTask(in: wait) { bound.value.tryAgain(error) }
        return true
    }

    private func tryAgain(_ error: ProxyError) {
        guard machine.isBackingOff else { return }
        backoffTimer = nil
        guard let parts = retained, let cluster = request.cluster,
            let endpoint = request.passthroughEndpoint ?? request.endpointIndex.map({ cluster.endpoints[$0] })
        else {
            respondLocally(error)
            return
        }
        headPending = true
        pending = parts
        startTry(endpoint: endpoint, cluster: cluster)
    }

    /// Another endpoint than the one that failed, when the cluster has one (ejected ones skipped).
    private func pickAnotherEndpoint(_ cluster: ClusterRuntime) {
        guard let balancer = request.balancer, let previous = request.endpointIndex, cluster.healthy.count > 1,
            let next = balancer.pickInService(
                fields: request.head.fields,
                clientIP: request.clientIP,
                rng: &loop.resources.rng,
                avoiding: previous
            ).inService
        else { return }
        balancer.requestFinished(endpoint: previous)
        balancer.requestStarted(endpoint: next)
        request.endpointIndex = next
        request.endpoint = cluster.endpoints[next].config.address
    }

    /// A failed try counts against its endpoint in outlier detection.
    private func reportTryFailure(_ cluster: ClusterRuntime) {
        guard let detector = cluster.outlier, let policy = cluster.config.outlierDetection,
            let index = request.endpointIndex
        else { return }
        detector.finished(
            cluster.outlierRecords[index],
            failed: true,
            cluster: cluster,
            policy: policy,
            now: NIODeadline.now().uptimeNanoseconds
        )
    }

    private func perTryTimedOut(attempt: Int) {
        guard machine.perTryTimeoutApplies(attempt: attempt) else { return }
        perTryTimer = nil
        let error = ProxyError.timeout("try \(attempt) of route '\(request.routeName ?? "-")'")
        if retry(after: .perTryTimeout, error) { return }
        respondLocally(error)
    }

    private func cancelPerTryTimer() {
        perTryTimer?.cancel()
        perTryTimer = nil
    }

    // MARK: Ending

    /// Answers the request with a proxy error (if nothing was sent yet) and ends the exchange.
    func respondLocally(_ error: ProxyError) {
        if machine.phase == .finished { return }
        let upstream = machine.phase == .streaming ? self.upstream : nil
        request.error = error
        loop.stats.record(error)
        if machine.responseStarted {
            if let upstream { finish(upstream: upstream, reusable: false) } else { finishAccounting() }
            downstream.abort()
            return
        }
        request.responseStatus = error.status
        if downstream.accessLog { request.firstByteNanos = (NIODeadline.now() - request.startTime).nanoseconds }
        if let upstream { finish(upstream: upstream, reusable: false) } else { finishAccounting() }
        downstream.respondWithError(error, requestEnded: requestEnded, requestHasBody: request.announcesBody)
    }

    var isFinished: Bool { machine.phase == .finished }

    /// Called by ``RequestDeadlines`` when the route's timeout expired first.
    func deadlineExpired() {
        if machine.phase == .finished { return }
        respondLocally(.timeout("route '\(request.routeName ?? "-")' after \(request.timeout.map { "\($0)" } ?? "-")"))
    }

    /// The client went away.
    func downstreamClosed() {
        if machine.phase == .finished { return }
        let error = ProxyError.clientDisconnect("after \(request.requestBytes) request bytes")
        request.error = error
        request.responseStatus = error.status
        loop.stats.record(error)
        if machine.phase == .streaming, let upstream {
            finish(upstream: upstream, reusable: false)
        } else {
            finishAccounting()
        }
    }

    private func finish(upstream: any UpstreamStream, reusable: Bool) {
        upstream.exchange = nil
        releaseOrClose(upstream, reusable: reusable)
        finishAccounting()
    }

    private func releaseOrClose(_ connection: any UpstreamStream, reusable: Bool) {
        connection.exchange = nil
        connection.release(reusable: reusable && request.cluster != nil)
    }

    private func finishAccounting() {
        machine.finish()
        upstream = nil
        headPending = false
        pending = RequestParts()
        retained = nil
        cancelPerTryTimer()
        backoffTimer?.cancel()
        backoffTimer = nil
        if let load = retrySlot {
            retrySlot = nil
            load.retries.wrappingDecrement(ordering: .relaxed)
        }
        if let slot = deadlineSlot {
            deadlineSlot = nil
            loop.deadlines.release(slot)
        }
        ExchangeCompletion.finished(request, completing: chain, accessLog: downstream.accessLog, loop: loop)
    }
}

@available(*, unavailable)
extension ProxyExchange: Sendable {}

/// A request's parts after its head, in order: its body's buffers, then its end (with trailers).
/// The end is a flag, not an element: a request without a body (most) needs no array.
struct RequestParts {
    var bodies: [ByteBuffer] = []
    private(set) var ended = false
    private(set) var trailers: HTTPHeaders?

    var bodyBytes: Int { bodies.reduce(0) { $0 + $1.readableBytes } }

    mutating func end(_ trailers: HTTPHeaders?) {
        ended = true
        self.trailers = trailers
    }
}
