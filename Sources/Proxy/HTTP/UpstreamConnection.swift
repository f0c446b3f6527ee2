import Atomics
import NIOCore
import NIOHTTP1

/// One keep-alive HTTP/1.1 connection to an upstream endpoint, owned by the event loop it was
/// opened on. It reads the responses of the exchange it serves with ``HTTP1ResponseParser`` (their
/// heads stay bytes) and hands the exchange their parts; otherwise it sits idle in that loop's
/// ``UpstreamPool``.
final class UpstreamConnection: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// The idle connections of its endpoint in its loop's pool, where it goes back after an exchange.
    var idleStack: IdleStack
    let maxRequests: Int?
    /// The cluster's pool settings when the connection was made: idle connections kept per
    /// endpoint, and how long one may stay idle.
    let maxIdle: Int
    let idleTimeout: TimeAmount
    private(set) var context: ChannelHandlerContext?
    /// The channel's allocator, read once (each read through the channel retains and releases it).
    private var allocator = ByteBufferAllocator()
    /// The exchange being served; `nil` while idle.
    var exchange: ProxyExchange?
    weak var pool: UpstreamPool?
    private(set) var requestsServed = 0
    var idleSince: NIODeadline = .now()
    var idleLimit: TimeAmount?
    private var readHeld = false
    private var parser = HTTP1ResponseParser()
    /// Whether the current request's body goes in chunks.
    private var chunkedRequest = false
    private(set) var isClosed = false
    /// What this connection counts in (`max_connections`, the connection metrics), until it is gone.
    var accounting = UpstreamConnectionAccounting()

    /// The loop's buffers for request heads.
    private let heads: HeadBufferRing

    init(idleStack: IdleStack, maxRequests: Int?, maxIdle: Int, idleTimeout: TimeAmount, heads: HeadBufferRing) {
        self.heads = heads
        self.idleStack = idleStack
        self.maxRequests = maxRequests
        self.maxIdle = maxIdle
        self.idleTimeout = idleTimeout
    }

    /// Whether the channel is connected, as its events said: asked three times per request (the
    /// exchange, the pool's release and its next acquire), and reading it through the channel
    /// retained and released the pipeline and the channel each time.
    private var connected = false
    var isActive: Bool { connected && !isClosed }
    /// The channel's writability as its last change said (asked several times per request:
    /// reading it through the channel retains and releases the pipeline and the channel).
    private var writable = true
    var isWritable: Bool { context != nil && writable }

    /// Whether it may go back to the pool after the current exchange.
    var canBeReused: Bool {
        guard isActive else { return false }
        if let maxRequests, requestsServed >= maxRequests { return false }
        return true
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        allocator = context.channel.allocator
        connected = context.channel.isActive
    }

    func channelActive(context: ChannelHandlerContext) {
        connected = true
        context.fireChannelActive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        connected = false
        releaseLoad()
    }

    /// No longer counts as a connection of its cluster (once, however it ended).
    func releaseLoad() { accounting.release() }

    /// Writes a request part as bytes: the head straight from the client's decoded head and the
    /// proxy's additions, bodies as they come or in chunks.
    func send(_ part: UpstreamRequestPart) {
        guard let context else { return }
        switch part {
        case .head(let head):
            requestsServed += 1
            parser.requestIsHEAD = head.head.method.isHEAD
            var buffer = heads.buffer(capacity: HeaderRewriting.http1RequestCapacity(head))
            chunkedRequest = HeaderRewriting.writeHTTP1Request(head, into: &buffer)
            heads.recycle(buffer)
            context.write(wrapOutboundOut(buffer), promise: nil)
        case .body(let buffer):
            if chunkedRequest {
                guard buffer.readableBytes > 0 else { break }
                let size = HeaderRewriting.chunkSizeLine(buffer.readableBytes, allocator)
                context.write(wrapOutboundOut(size), promise: nil)
                context.write(wrapOutboundOut(buffer), promise: nil)
                context.write(wrapOutboundOut(HeaderRewriting.lineEnd), promise: nil)
            } else {
                context.write(wrapOutboundOut(buffer), promise: nil)
            }
        case .end(let trailers):
            if chunkedRequest {
                chunkedRequest = false
                var last = allocator.buffer(capacity: 5)
                HeaderRewriting.writeLastChunk(trailers, into: &last)
                context.write(wrapOutboundOut(last), promise: nil)
            }
        }
    }

    var flushQueued = false

    func flushNow() {
        context?.flush()
    }

    /// Flushes after the loop's current batch of I/O events.
    func flushSoon(_ loop: LoopContext) {
        loop.flushSoon(self)
    }

    func close() {
        guard !isClosed else { return }
        isClosed = true
        context?.close(promise: nil)
    }

    /// Lets reads through again (after the downstream became writable).
    func resumeReading() {
        guard readHeld, let context else { return }
        readHeld = false
        context.read()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var input = unwrapInboundIn(data)
        do {
            // One part at a time: handing one on may end the exchange, return this connection
            // to its pool and start the next request on it before the next part is read.
            while !isClosed, let part = try parser.next(&input) {
                guard let exchange else {
                    // An idle connection must not speak; whatever it sent cannot be framed.
                    close()
                    return
                }
                exchange.upstreamResponse(part)
            }
        } catch {
            exchange?.upstreamClosed(error: error)
            close()
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        exchange?.upstreamReadComplete()
    }

    func read(context: ChannelHandlerContext) {
        if let exchange, !exchange.downstreamWritable {
            readHeld = true
        } else {
            context.read()
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        writable = context.channel.isWritable
        if writable { exchange?.upstreamBecameWritable() }
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        isClosed = true
        writable = false
        pool?.remove(self)
        if let exchange {
            // A body that lasts until the connection's end ends now; anything else is cut short.
            do {
                if let end = try parser.inputClosed() {
                    exchange.upstreamResponse(end)
                } else {
                    exchange.upstreamClosed(error: nil)
                }
            } catch {
                exchange.upstreamClosed(error: error)
            }
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        exchange?.upstreamClosed(error: error)
        close()
    }
}

extension UpstreamConnection: UpstreamStream, BatchedFlush {
    /// Asked before the exchange sends its head: requests this connection carried before.
    var isReused: Bool { requestsServed > 0 }

    func release(reusable: Bool) {
        exchange = nil
        if reusable, let pool {
            pool.release(self, maxIdle: maxIdle, idleTimeout: idleTimeout)
        } else {
            close()
        }
    }
}

@available(*, unavailable)
extension UpstreamConnection: Sendable {}
