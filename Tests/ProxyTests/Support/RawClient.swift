import Foundation
import NIOCore
import NIOPosix

/// A TCP client that sends exact bytes and collects what comes back, for malformed-input tests.
final class RawClient: Sendable {
    private let channel: any Channel
    private let collector: Collector

    static func connect(port: Int, group: any EventLoopGroup) async throws -> RawClient {
        let collector = Collector()
        let channel = try await ClientBootstrap(group: group)
            .channelOption(.allowRemoteHalfClosure, value: true)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(collector) }
            }
            .connect(host: "127.0.0.1", port: port).get()
        return RawClient(channel: channel, collector: collector)
    }

    private init(channel: any Channel, collector: Collector) {
        self.channel = channel
        self.collector = collector
    }

    func send(_ text: String) async throws {
        try await channel.writeAndFlush(channel.allocator.buffer(string: text))
    }

    func send(_ bytes: ByteBuffer) async throws {
        try await channel.writeAndFlush(bytes)
    }

    /// Half-closes: no more bytes from this side, reading goes on.
    func shutdownOutput() async throws {
        try await channel.close(mode: .output)
    }

    func close() async {
        try? await channel.close()
    }

    /// Waits until the server closes the connection (or `timeout`), then returns all it sent and
    /// whether it closed.
    func readUntilClose(timeout: TimeAmount = .seconds(5)) async throws -> (text: String, closed: Bool) {
        let deadline = NIODeadline.now() + timeout
        while NIODeadline.now() < deadline {
            let (text, closed) = try await channel.eventLoop.submit { (self.collector.text, self.collector.isClosed) }
                .get()
            if closed { return (text, true) }
            try await Task.sleep(for: .milliseconds(10))
        }
        return (try await channel.eventLoop.submit { self.collector.text }.get(), false)
    }

    /// Waits until at least `count` occurrences of `marker` arrived (or `timeout`).
    func readUntil(_ marker: String, count: Int = 1, timeout: TimeAmount = .seconds(5)) async throws -> String {
        let deadline = NIODeadline.now() + timeout
        while NIODeadline.now() < deadline {
            let text = try await channel.eventLoop.submit { self.collector.text }.get()
            if text.components(separatedBy: marker).count - 1 >= count { return text }
            try await Task.sleep(for: .milliseconds(10))
        }
        return try await channel.eventLoop.submit { self.collector.text }.get()
    }

    private final class Collector: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer
        var text = ""
        var isClosed = false

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var buffer = unwrapInboundIn(data)
            text += buffer.readString(length: buffer.readableBytes) ?? ""
        }

        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if case ChannelEvent.inputClosed = event { isClosed = true }
            context.fireUserInboundEventTriggered(event)
        }

        func channelInactive(context: ChannelHandlerContext) {
            isClosed = true
            context.fireChannelInactive()
        }
    }
}
