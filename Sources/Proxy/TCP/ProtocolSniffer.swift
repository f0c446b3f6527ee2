import CoreMetrics
public import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#endif

/// Where a redirected connection was going (the agent passes the capture rules' `SO_ORIGINAL_DST`
/// lookup; the proxy knows nothing of iptables). Nil: not redirected, or not known.
public typealias OriginalDestinationLookup = @Sendable (any Channel) -> SocketAddress?

/// First handler of every HTTP listener's connection: looks at the client's first bytes and
/// decides, once, what the connection is. An HTTP/1 request line installs the HTTP/1 pipeline, the
/// HTTP/2 client preface (h2c with prior knowledge) the HTTP/2 one; both lead to the same routing,
/// balancing and middleware. On a capture listener anything else, and a client silent for
/// `sniffTimeout` (a server-speaks-first protocol), is relayed as TCP to its original destination;
/// on a gateway listener (no relay) it goes to the HTTP/1 parser, which answers garbage with 400.
/// The bytes read while deciding are passed on.
final class ProtocolSniffer: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer

    enum Decision {
        case http1
        case http2
        case tcp
        case undecided
    }

    /// The HTTP/2 client connection preface (RFC 9113 §3.4).
    static let preface = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)

    private let timeout: TimeAmount
    private let installHTTP: (ChannelHandlerContext) throws -> Void
    private let installHTTP2: (ChannelHandlerContext) throws -> Void
    private let relay: TCPRelay.Starter?
    /// Whether the HTTP/2 preface installs the HTTP/2 pipeline (otherwise it is relayed as TCP).
    private let speaksHTTP2: Bool
    private let stats: ProxyStats
    private var buffered: ByteBuffer?
    private var timer: Scheduled<Void>?
    private var decided = false
    private var decision = Decision.undecided

    init(
        timeout: TimeAmount,
        installHTTP: @escaping (ChannelHandlerContext) throws -> Void,
        installHTTP2: @escaping (ChannelHandlerContext) throws -> Void,
        relay: TCPRelay.Starter?,
        speaksHTTP2: Bool,
        stats: ProxyStats
    ) {
        self.speaksHTTP2 = speaksHTTP2
        self.stats = stats
        self.timeout = timeout
        self.installHTTP = installHTTP
        self.installHTTP2 = installHTTP2
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
            guard sniffer.relay != nil else {
                // A gateway listener's client that sent nothing within its idle timeout.
                context.close(promise: nil)
                return
            }
            // Nothing (or too little to tell) arrived: the server speaks first, or it is not HTTP.
            sniffer.decide(.tcp, context: context)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        if decided {
            if decision == .tcp, let relay {
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
        relay?.downstreamClosed()
        context.fireChannelInactive()
    }

    private func decide(_ decision: Decision, context: ChannelHandlerContext) {
        guard !decided else { return }
        decided = true
        // Without a relay (a gateway listener) whatever is not HTTP/2 goes to the HTTP/1 parser.
        var decision = decision == .http2 && !speaksHTTP2 ? .tcp : decision
        if decision == .tcp && relay == nil { decision = .http1 }
        self.decision = decision
        timer?.cancel()
        timer = nil
        switch decision {
        case .http1, .http2, .undecided:
            do {
                if decision == .http2 { try installHTTP2(context) } else { try installHTTP(context) }
            } catch {
                context.close(promise: nil)
                return
            }
            if decision == .http2 { stats.sniffedHTTP2.increment() } else { stats.sniffedHTTP.increment() }
            let bytes = buffered
            buffered = nil
            if let bytes {
                context.fireChannelRead(wrapInboundOut(bytes))
                context.fireChannelReadComplete()
            }
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        case .tcp:
            relay?.start(context: context, sniffer: self, initial: buffered)
            buffered = nil
        }
    }

    typealias InboundOut = ByteBuffer

    /// What the first bytes say. An HTTP/1 request line is an uppercase method token then a space;
    /// the HTTP/2 preface is 24 fixed bytes starting `PRI * HTTP/2.0`. Until a space is seen (or the
    /// whole preface, after `PRI `), undecided.
    static func classify(_ bytes: ByteBufferView) -> Decision {
        var length = 0
        for byte in bytes {
            if byte == UInt8(ascii: " ") {
                guard length > 0 else { return .tcp }
                let method = bytes.prefix(length)
                // "PRI" begins the HTTP/2 preface: all of it, or it is neither protocol.
                if method.elementsEqual("PRI".utf8) {
                    let seen = bytes.prefix(preface.count)
                    guard seen.elementsEqual(preface.prefix(seen.count)) else { return .tcp }
                    return seen.count == preface.count ? .http2 : .undecided
                }
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
