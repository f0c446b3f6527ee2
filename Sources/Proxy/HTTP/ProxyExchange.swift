import CoreMetrics
import Logging
import NIOCore
import NIOHTTP1

/// One request's trip through the proxy: the middleware chain, then the upstream exchange with
/// bodies streamed both ways under back-pressure, the route timeout, and the final accounting.
/// Lives on the downstream connection's event loop, like its upstream connection.
final class ProxyExchange {
    private enum State {
        /// Waiting for an upstream connection; body parts are held in `pending`.
        case connecting
        /// Upstream attached; parts flow through.
        case streaming(UpstreamConnection)
        case finished
    }

    private let downstream: DownstreamHandler
    private let loop: LoopContext
    let request: RequestContext
    private let chain: [any ProxyMiddleware]
    private let requestVersion: HTTPVersion
    private let clientWantsKeepAlive: Bool
    private var state: State = .connecting
    private var pending: [HTTPClientRequestPart] = []
    private var requestEnded = false
    private var responseHeadSent = false
    private var upstreamKeepAlive = false
    /// The slot of this exchange in its loop's ``RequestDeadlines``, while it has one.
    private var deadlineSlot: Int?

    init(downstream: DownstreamHandler, loop: LoopContext, request: RequestContext, chain: [any ProxyMiddleware]) {
        self.downstream = downstream
        self.loop = loop
        self.request = request
        self.chain = chain
        self.requestVersion = request.head.version
        self.clientWantsKeepAlive = request.head.isKeepAlive
    }

    var downstreamWritable: Bool { downstream.isWritable }

    /// Whether the request announced a body (`content-length` above 0, or chunked).
    private var requestHasBody: Bool {
        let headers = request.head.headers
        if headers.contains(name: "transfer-encoding") { return true }
        if let length = headers.first(name: "content-length") { return length != "0" }
        return false
    }

    /// Whether the downstream handler should stop reading the request for now.
    var holdsDownstreamReads: Bool {
        switch state {
        case .connecting: return true
        case .streaming(let upstream): return !upstream.isWritable
        case .finished: return false
        }
    }

    // MARK: Request side

    func start() {
        for middleware in chain {
            if let error = middleware.onRequest(request) {
                respondLocally(error)
                return
            }
        }
        guard let cluster = request.cluster,
            let endpoint = request.passthroughEndpoint ?? request.endpointIndex.map({ cluster.endpoints[$0] })
        else {
            respondLocally(.noRoute("no middleware chose an upstream"))
            return
        }
        if let timeout = request.timeout {
            deadlineSlot = loop.deadlines.register(self, timeout: TimeAmount(timeout), now: request.startTime)
        }
        let upstreamHead = HeaderRewriting.upstreamRequest(request.head, clientIP: request.clientIP)
        pending.append(.head(upstreamHead))
        loop.pool.acquire(endpoint: endpoint, cluster: cluster, for: self)
    }

    /// A circuit breaker refused the connection this exchange needed.
    func overflow(_ error: ProxyError) {
        guard case .connecting = state else { return }
        respondLocally(error)
    }

    /// Connecting to the endpoint failed.
    func connectFailed(_ error: any Error) {
        guard case .connecting = state else { return }
        request.cluster?.stats.connectFailures.increment()
        respondLocally(.upstreamConnectFailure("\(request.endpoint.map(\.description) ?? "-"): \(error)"))
    }

    /// An upstream connection is ready for this exchange.
    func attach(_ connection: UpstreamConnection) {
        guard case .connecting = state else {
            // Timed out or the client left while connecting: the fresh connection is still good.
            releaseOrClose(connection, reusable: true)
            return
        }
        state = .streaming(connection)
        connection.exchange = self
        for part in pending { connection.send(part, flush: false) }
        pending.removeAll()
        connection.flushSoon(loop)
        downstream.resumeReadingIfHeld()
    }

    func requestBody(_ buffer: ByteBuffer) {
        request.requestBytes += buffer.readableBytes
        switch state {
        case .connecting: pending.append(.body(.byteBuffer(buffer)))
        case .streaming(let upstream): upstream.send(.body(.byteBuffer(buffer)), flush: false)
        case .finished: break  // answered early; the rest of the body is dropped
        }
    }

    func requestEnd(_ trailers: HTTPHeaders?) {
        requestEnded = true
        switch state {
        case .connecting: pending.append(.end(trailers))
        case .streaming(let upstream):
            upstream.send(.end(trailers), flush: false)
            upstream.flushSoon(loop)
        case .finished: break
        }
    }

    func downstreamReadComplete() {
        if case .streaming(let upstream) = state { upstream.flush() }
    }

    func upstreamBecameWritable() {
        downstream.resumeReadingIfHeld()
    }

    func downstreamBecameWritable() {
        if case .streaming(let upstream) = state { upstream.resumeReading() }
    }

    // MARK: Response side

    func upstreamResponse(_ part: HTTPClientResponsePart) {
        guard case .streaming(let upstream) = state else { return }
        switch part {
        case .head(let head) where head.status.code < 200 && head.status != .switchingProtocols:
            // 100 Continue and friends go straight through; the final head follows.
            downstream.write(.head(HTTPResponseHead(version: requestVersion, status: head.status)), flush: true)
        case .head(let head):
            upstreamKeepAlive = head.isKeepAlive
            let keepAlive = downstreamKeepAlive(responseHead: head)
            let out = HeaderRewriting.downstreamResponse(head, requestVersion: requestVersion, keepAlive: keepAlive)
            request.responseStatus = head.status
            responseHeadSent = true
            downstream.keepAlive = keepAlive
            downstream.write(.head(out), flush: false)
        case .body(let buffer):
            request.responseBytes += buffer.readableBytes
            downstream.write(.body(.byteBuffer(buffer)), flush: false)
        case .end(let trailers):
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
        guard case .streaming(let upstream) = state else { return }
        if responseHeadSent {
            // The response is cut short; the client must see the connection end, not a shorter body.
            finish(upstream: upstream, reusable: false)
            downstream.abort()
        } else if error is HTTPParserError {
            respondLocally(.upstreamProtocolError("\(request.endpoint.map(\.description) ?? "-"): \(error!)"))
        } else {
            respondLocally(
                .upstreamReset("\(request.endpoint.map(\.description) ?? "-"): \(error.map { "\($0)" } ?? "closed")")
            )
        }
    }

    private func downstreamKeepAlive(responseHead: HTTPResponseHead) -> Bool {
        // A request still sending its body when the response starts leaves the connection unframed.
        guard clientWantsKeepAlive, requestEnded, !downstream.isDraining else { return false }
        if requestVersion == .http1_0 && !responseHead.headers.contains(name: "content-length") { return false }
        return true
    }

    // MARK: Ending

    /// Answers the request with a proxy error (if nothing was sent yet) and ends the exchange.
    func respondLocally(_ error: ProxyError) {
        if case .finished = state { return }
        let upstream: UpstreamConnection?
        if case .streaming(let u) = state { upstream = u } else { upstream = nil }
        request.error = error
        loop.stats.record(error)
        if responseHeadSent {
            if let upstream { finish(upstream: upstream, reusable: false) } else { finishAccounting() }
            downstream.abort()
            return
        }
        request.responseStatus = error.status
        if let upstream { finish(upstream: upstream, reusable: false) } else { finishAccounting() }
        // Answering before the request ended is safe for keep-alive only when the request has no
        // body to skip; otherwise the connection is closed rather than guessing where the next
        // request starts.
        let keepAlive = (requestEnded || !requestHasBody) && clientWantsKeepAlive && !downstream.isDraining
        downstream.sendError(error, keepAlive: keepAlive, version: requestVersion)
    }

    var isFinished: Bool {
        if case .finished = state { return true }
        return false
    }

    /// Called by ``RequestDeadlines`` when the route's timeout expired first.
    func deadlineExpired() {
        if case .finished = state { return }
        respondLocally(.timeout("route '\(request.routeName ?? "-")' after \(request.timeout.map { "\($0)" } ?? "-")"))
    }

    /// The client went away.
    func downstreamClosed() {
        if case .finished = state { return }
        let error = ProxyError.clientDisconnect("after \(request.requestBytes) request bytes")
        request.error = error
        request.responseStatus = error.status
        loop.stats.record(error)
        if case .streaming(let upstream) = state {
            finish(upstream: upstream, reusable: false)
        } else {
            finishAccounting()
        }
    }

    private func finish(upstream: UpstreamConnection, reusable: Bool) {
        upstream.exchange = nil
        releaseOrClose(upstream, reusable: reusable)
        finishAccounting()
    }

    private func releaseOrClose(_ connection: UpstreamConnection, reusable: Bool) {
        if reusable, let cluster = request.cluster {
            loop.pool.release(
                connection,
                maxIdle: cluster.config.pool.maxIdlePerEndpoint,
                idleTimeout: TimeAmount(cluster.config.pool.idleTimeout)
            )
        } else {
            connection.exchange = nil
            connection.close()
        }
    }

    private func finishAccounting() {
        state = .finished
        pending.removeAll()
        if let slot = deadlineSlot {
            deadlineSlot = nil
            loop.deadlines.release(slot)
        }
        let elapsed = NIODeadline.now() - request.startTime
        if let cluster = request.cluster {
            if let status = request.responseStatus, request.error == nil || request.endpointIndex != nil {
                cluster.stats.recordResponse(status)
            }
            if request.endpointIndex != nil { cluster.stats.duration.recordNanoseconds(elapsed.nanoseconds) }
        }
        for middleware in chain { middleware.onComplete(request) }
        if downstream.accessLog { logAccess(elapsed: elapsed) }
    }

    private func logAccess(elapsed: TimeAmount) {
        let r = request
        loop.accessLogger.info(
            "\"\(r.head.method.rawValue) \(r.head.uri) HTTP/\(requestVersion.major).\(requestVersion.minor)\" \(r.responseStatus?.code ?? 0) \(r.error?.token ?? "-")",
            metadata: [
                "http.status": "\(r.responseStatus?.code ?? 0)",
                "trellis.token": "\(r.error?.token ?? "-")",
                "trellis.listener": "\(r.listenerName)",
                "trellis.route": "\(r.routeName ?? "-")",
                "upstream.cluster": "\(r.clusterName ?? "-")",
                "upstream.endpoint": "\(r.endpoint?.description ?? "-")",
                "downstream.address": "\(r.remoteAddress?.description ?? "-")",
                "http.request_bytes": "\(r.requestBytes)",
                "http.response_bytes": "\(r.responseBytes)",
                "duration_ms": "\(Double(elapsed.nanoseconds) / 1e6)",
            ]
        )
    }
}

@available(*, unavailable)
extension ProxyExchange: Sendable {}
