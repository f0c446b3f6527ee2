import CoreMetrics
public import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#endif

/// Where a redirected connection was going (the agent passes the capture rules' `SO_ORIGINAL_DST`
/// lookup; the proxy knows nothing of iptables). Nil: not redirected, or not known.
public typealias OriginalDestinationLookup = @Sendable (any Channel) -> SocketAddress?

/// First handler of a capture listener's connection: looks at the client's first bytes and
/// decides, once, what the connection is. An HTTP/1 request line installs the HTTP pipeline
/// (routing, balancing, the middleware chain); anything else — the HTTP/2 preface included, until
/// the proxy speaks it — and a client silent for `sniffTimeout` (a server-speaks-first protocol)
/// is relayed as TCP to its original destination. The bytes read while deciding are passed on.
final class ProtocolSniffer: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer

    enum Decision {
        case http1
        case tcp
        case undecided
    }

    private let timeout: TimeAmount
    private let installHTTP: (ChannelHandlerContext) throws -> Void
    private let relay: TCPRelay.Starter
    private let stats: ProxyStats
    private var buffered: ByteBuffer?
    private var timer: Scheduled<Void>?
    private var decided = false
    private var decision = Decision.undecided

    init(
        timeout: TimeAmount,
        installHTTP: @escaping (ChannelHandlerContext) throws -> Void,
        relay: TCPRelay.Starter,
        stats: ProxyStats
    ) {
        self.stats = stats
        self.timeout = timeout
        self.installHTTP = installHTTP
        self.relay = relay
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { arm(context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        arm(context)
        context.fireChannelActive()
    }

    private func arm(_ context: ChannelHandlerContext) {
        guard timer == nil else { return }
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        timer = context.eventLoop.scheduleTask(in: timeout) {
            let (sniffer, context) = loopBound.value
            // Nothing (or too little to tell) arrived: the server speaks first, or it is not HTTP.
            sniffer.decide(.tcp, context: context)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        if decided {
            if decision == .tcp {
                relay.pending(&bytes)  // arrived while the relay is connecting: kept for it
            } else {
                context.fireChannelRead(data)
            }
            return
        }
        if buffered == nil {
            buffered = bytes
        } else {
            buffered!.writeBuffer(&bytes)
        }
        let decision = Self.classify(buffered!.readableBytesView)
        if decision != .undecided { decide(decision, context: context) }
    }

    func channelInactive(context: ChannelHandlerContext) {
        timer?.cancel()
        relay.downstreamClosed()
        context.fireChannelInactive()
    }

    private func decide(_ decision: Decision, context: ChannelHandlerContext) {
        guard !decided else { return }
        decided = true
        self.decision = decision
        timer?.cancel()
        timer = nil
        switch decision {
        case .http1, .undecided:
            do {
                try installHTTP(context)
            } catch {
                context.close(promise: nil)
                return
            }
            stats.sniffedHTTP.increment()
            let bytes = buffered
            buffered = nil
            if let bytes {
                context.fireChannelRead(wrapInboundOut(bytes))
                context.fireChannelReadComplete()
            }
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        case .tcp:
            relay.start(context: context, sniffer: self, initial: buffered)
            buffered = nil
        }
    }

    typealias InboundOut = ByteBuffer

    /// What the first bytes say. An HTTP/1 request line is an uppercase method token then a space;
    /// the HTTP/2 preface starts `PRI * HTTP/2.0`. Until 8 bytes (or a space) are seen, undecided.
    static func classify(_ bytes: ByteBufferView) -> Decision {
        var length = 0
        for byte in bytes {
            if byte == UInt8(ascii: " ") {
                guard length > 0 else { return .tcp }
                let method = bytes.prefix(length)
                // "PRI" is the HTTP/2 preface's: not HTTP/1.
                if method.elementsEqual("PRI".utf8) { return .tcp }
                return .http1
            }
            guard byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z") || byte == UInt8(ascii: "-") else {
                return .tcp
            }
            length += 1
            if length > 16 { return .tcp }  // no method is that long
        }
        return .undecided
    }
}
