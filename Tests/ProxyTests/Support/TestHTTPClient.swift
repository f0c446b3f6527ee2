import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix

struct TestResponse: Sendable {
    var status: HTTPResponseStatus
    var headers: HTTPHeaders
    var body: String
}

/// A real HTTP/1.1 client over one keep-alive connection; requests are sent one after another.
final class TestHTTPClient: Sendable {
    private let channel: any Channel
    private let handler: NIOLoopBound<Handler>

    static func connect(port: Int, group: any EventLoopGroup) async throws -> TestHTTPClient {
        let channel = try await ClientBootstrap(group: group)
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
        return TestHTTPClient(channel: channel, handler: handler)
    }

    private init(channel: any Channel, handler: NIOLoopBound<Handler>) {
        self.channel = channel
        self.handler = handler
    }

    var isActive: Bool { channel.isActive }

    func request(
        _ method: HTTPMethod = .GET,
        _ path: String,
        host: String = "example.com",
        headers: [(String, String)] = [],
        body: String? = nil
    ) async throws -> TestResponse {
        var h = HTTPHeaders([("host", host)] + headers)
        if let body { h.replaceOrAdd(name: "content-length", value: "\(body.utf8.count)") }
        let head = HTTPRequestHead(version: .http1_1, method: method, uri: path, headers: h)
        let handler = self.handler
        let channel = self.channel
        return try await channel.eventLoop.flatSubmit {
            let promise = channel.eventLoop.makePromise(of: TestResponse.self)
            guard channel.isActive else {
                promise.fail(ChannelError.ioOnClosedChannel)
                return promise.futureResult
            }
            handler.value.pending.append(promise)
            channel.write(HTTPClientRequestPart.head(head), promise: nil)
            if let body {
                channel.write(
                    HTTPClientRequestPart.body(.byteBuffer(channel.allocator.buffer(string: body))),
                    promise: nil
                )
            }
            channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
            return promise.futureResult
        }.get()
    }

    func close() async {
        try? await channel.close()
    }

    /// One request on a fresh connection, closed afterwards.
    static func get(
        port: Int,
        _ path: String,
        host: String = "example.com",
        headers: [(String, String)] = [],
        group: any EventLoopGroup
    ) async throws -> TestResponse {
        let client = try await connect(port: port, group: group)
        defer { Task { await client.close() } }
        return try await client.request(.GET, path, host: host, headers: headers)
    }

    private final class Handler: ChannelInboundHandler {
        typealias InboundIn = HTTPClientResponsePart
        var pending: [EventLoopPromise<TestResponse>] = []
        var current: TestResponse?

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let head):
                current = TestResponse(status: head.status, headers: head.headers, body: "")
            case .body(var buffer):
                current?.body += buffer.readString(length: buffer.readableBytes) ?? ""
            case .end:
                if let current, !pending.isEmpty { pending.removeFirst().succeed(current) }
                current = nil
            }
        }

        func channelInactive(context: ChannelHandlerContext) {
            for p in pending { p.fail(ChannelError.ioOnClosedChannel) }
            pending.removeAll()
            context.fireChannelInactive()
        }

        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            for p in pending { p.fail(error) }
            pending.removeAll()
            context.close(promise: nil)
        }
    }
}
