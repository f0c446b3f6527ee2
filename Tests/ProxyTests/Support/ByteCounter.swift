import NIOCore
import NIOHTTP1
import NIOPosix

/// An HTTP client that reads a response body only when asked (`readSome`), counting bytes and
/// keeping none: a slow reader, to check back-pressure.
final class ByteCounter: Sendable {
    private let channel: any Channel
    private let handler: NIOLoopBound<Handler>

    static func get(port: Int, path: String, group: any EventLoopGroup) async throws -> ByteCounter {
        let channel = try await ClientBootstrap(group: group)
            .channelOption(.autoRead, value: false)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    try channel.pipeline.syncOperations.addHandler(Handler())
                }
            }
            .connect(host: "127.0.0.1", port: port).get()
        let handler = try await channel.eventLoop.submit {
            NIOLoopBound(try channel.pipeline.syncOperations.handler(type: Handler.self), eventLoop: channel.eventLoop)
        }.get()
        let head = HTTPRequestHead(version: .http1_1, method: .GET, uri: path, headers: ["host": "a"])
        channel.write(HTTPClientRequestPart.head(head), promise: nil)
        try await channel.writeAndFlush(HTTPClientRequestPart.end(nil))
        return ByteCounter(channel: channel, handler: handler)
    }

    private init(channel: any Channel, handler: NIOLoopBound<Handler>) {
        self.channel = channel
        self.handler = handler
    }

    /// Body bytes so far, plus 1 once the response ended.
    func count() async throws -> Int {
        try await channel.eventLoop.submit { self.handler.value.bytes + (self.handler.value.ended ? 1 : 0) }.get()
    }

    func bodyBytes() async throws -> Int {
        try await channel.eventLoop.submit { self.handler.value.bytes }.get()
    }

    /// Reads once, then pauses a little.
    func readSome() async throws {
        channel.read()
        try await Task.sleep(for: .milliseconds(1))
    }

    func close() async {
        try? await channel.close()
    }

    private final class Handler: ChannelInboundHandler {
        typealias InboundIn = HTTPClientResponsePart
        var bytes = 0
        var ended = false

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head: break
            case .body(let buffer): bytes += buffer.readableBytes
            case .end: ended = true
            }
        }
    }
}
