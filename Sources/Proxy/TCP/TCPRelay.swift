import CoreMetrics
import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#endif

/// Relays a downstream connection as raw bytes to its original destination: connects from the same
/// event loop (with the agent's mark, so the capture rules do not take it again), passes on what
/// was read while deciding and connecting, then glues the two channels with back-pressure both
/// ways and half-closes each side when the other does.
enum TCPRelay {
    /// One connection's relay: created with the sniffer, started once it decides TCP.
    final class Starter {
        private let lookup: OriginalDestinationLookup?
        private let mark: UInt32?
        private let stats: ProxyStats
        private let loop: LoopContext?
        private var pendingBytes: ByteBuffer?
        private var upstream: (any Channel)?
        private var closed = false
        /// The listener's name, for its access-log line (written when `log` is set).
        private let listener: String
        private let log: LoopAccessLog?
        private var started = NIODeadline.now()
        private var destination: SocketAddress?
        private var connectNanos: Int64?
        private var counters: RelayCounters?

        init(
            lookup: OriginalDestinationLookup?,
            mark: UInt32?,
            stats: ProxyStats,
            loop: LoopContext? = nil,
            listener: String = "",
            accessLog: Bool = false
        ) {
            self.loop = loop
            self.listener = listener
            self.log = accessLog ? loop?.accessLog : nil
            self.lookup = lookup
            self.mark = mark
            self.stats = stats
        }

        func pending(_ bytes: inout ByteBuffer) {
            if pendingBytes == nil { pendingBytes = bytes } else { pendingBytes!.writeBuffer(&bytes) }
        }

        func downstreamClosed() {
            closed = true
            upstream?.close(promise: nil)
        }

        func start(context: ChannelHandlerContext, sniffer: ProtocolSniffer, initial: ByteBuffer?) {
            let downstream = context.channel
            if log != nil {
                // The connection's line is written when its downstream side closes, however it ended.
                let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
                let source = downstream.remoteAddress
                downstream.closeFuture.whenComplete { _ in bound.value.logClosed(source: source) }
            }
            guard let destination = lookup?(downstream) else {
                stats.relayNoDestination.increment()
                failure = "no_original_destination"
                context.close(promise: nil)
                return
            }
            self.destination = destination
            stats.sniffedTCP.increment()
            pendingBytes = initial
            // Hold reads until the upstream is there; what arrives meanwhile is kept.
            downstream.setOption(.autoRead, value: false).whenComplete { _ in }
            let bootstrap = UpstreamConnector(mark: mark)
                .bootstrap(on: context.eventLoop, connectTimeout: UpstreamConnector.relayConnectTimeout)
                .channelOption(.allowRemoteHalfClosure, value: true)
            let loopBound = NIOLoopBound((self, context, sniffer), eventLoop: context.eventLoop)
            bootstrap.connect(to: destination).whenComplete { result in
                let (starter, context, sniffer) = loopBound.value
                switch result {
                case .failure:
                    starter.stats.relayConnectFailures.increment()
                    starter.failure = ProxyError.upstreamConnectFailure().token
                    context.close(promise: nil)
                case .success(let upstream):
                    guard !starter.closed else {
                        upstream.close(promise: nil)
                        return
                    }
                    starter.upstream = upstream
                    if starter.log != nil { starter.connectNanos = (NIODeadline.now() - starter.started).nanoseconds }
                    starter.glue(downstream: context, sniffer: sniffer, upstream: upstream)
                }
            }
        }

        private func glue(downstream context: ChannelHandlerContext, sniffer: ProtocolSniffer, upstream: any Channel) {
            let downstream = context.channel
            if log != nil { counters = RelayCounters() }
            let (toUpstream, toDownstream) = GlueHandler.pair(counters: counters)
            do {
                try upstream.pipeline.syncOperations.addHandler(toDownstream)
                try downstream.pipeline.syncOperations.addHandler(toUpstream, position: .after(sniffer))
            } catch {
                upstream.close(promise: nil)
                context.close(promise: nil)
                return
            }
            _ = downstream.setOption(.allowRemoteHalfClosure, value: true)
            if let loop {
                // Counted while the downstream side is open (drain reports and waits for them).
                loop.activeRelays += 1
                let bound = NIOLoopBound(loop, eventLoop: context.eventLoop)
                downstream.closeFuture.whenComplete { _ in bound.value.activeRelays -= 1 }
            }
            if var bytes = pendingBytes, bytes.readableBytes > 0 {
                pendingBytes = nil
                counters?.bytesIn += bytes.readableBytes
                upstream.writeAndFlush(NIOAny(bytes.readSlice(length: bytes.readableBytes)!), promise: nil)
            }
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
            _ = downstream.setOption(.autoRead, value: true)
        }

        /// Why the relay failed, as an access-log error token.
        private var failure: String?

        private func logClosed(source: SocketAddress?) {
            // `log` is the loop's access log: set only with a loop.
            guard let log, let loop, log.sampled(failed: failure != nil, rng: &loop.resources.rng) else { return }
            var record = AccessLogRecord(listener: listener, elapsed: NIODeadline.now() - started)
            record.protocol = "tcp"
            record.error = failure
            record.source = source
            record.endpoint = destination.map(AccessLogRecord.address)
            record.originalDestination = record.endpoint
            record.upstreamConnectNanos = connectNanos
            record.bytesIn = counters?.bytesIn ?? 0
            record.bytesOut = counters?.bytesOut ?? 0
            log.append(record)
        }
    }
}

/// Bytes relayed each way on one connection (for its access-log line).
final class RelayCounters {
    /// From the client to the destination.
    var bytesIn = 0
    /// From the destination to the client.
    var bytesOut = 0
}

/// One side of a pair: what its channel reads is written to the partner's channel; when the
/// partner cannot take more, this side stops reading; a half-close is passed on.
final class GlueHandler: ChannelDuplexHandler, RemovableChannelHandler {
    /// A socket channel reads bytes.
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = NIOAny
    typealias OutboundOut = NIOAny

    private var partner: GlueHandler?
    /// Counts what this side reads, when the access log wants it; `downstream` tells the direction.
    private var counters: RelayCounters?
    private var isDownstream = false
    private var context: ChannelHandlerContext?
    private var pendingRead = false

    /// The handler for the downstream channel, then the one for the upstream channel.
    static func pair(counters: RelayCounters? = nil) -> (GlueHandler, GlueHandler) {
        let a = GlueHandler()
        let b = GlueHandler()
        a.partner = b
        b.partner = a
        a.counters = counters
        b.counters = counters
        a.isDownstream = true
        return (a, b)
    }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        partner = nil
    }

    private func partnerWrite(_ data: NIOAny) { context?.write(data, promise: nil) }
    private func partnerFlush() { context?.flush() }
    private func partnerWriteEOF() { context?.close(mode: .output, promise: nil) }
    private func partnerCloseFull() { context?.close(promise: nil) }
    private var partnerWritable: Bool { context?.channel.isWritable ?? false }

    private func partnerBecameWritable() {
        if pendingRead {
            pendingRead = false
            context?.read()
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if let counters {
            let bytes = unwrapInboundIn(data)
            if isDownstream {
                counters.bytesIn += bytes.readableBytes
            } else {
                counters.bytesOut += bytes.readableBytes
            }
        }
        partner?.partnerWrite(data)
    }
    func channelReadComplete(context: ChannelHandlerContext) { partner?.partnerFlush() }
    func channelInactive(context: ChannelHandlerContext) { partner?.partnerCloseFull() }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, case .inputClosed = event {
            partner?.partnerWriteEOF()
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { partner?.partnerBecameWritable() }
        context.fireChannelWritabilityChanged()
    }

    func read(context: ChannelHandlerContext) {
        if partner?.partnerWritable ?? false {
            context.read()
        } else {
            pendingRead = true
        }
    }
}
