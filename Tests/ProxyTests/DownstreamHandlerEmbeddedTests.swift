import Foundation
import Logging
import NIOCore
import NIOEmbedded
import NIOHTTP1
import Testing
import TrellisPolicy

@testable import Proxy

/// The HTTP/1 listener's real pipeline (``DownstreamHandler`` with its parser, its timers and the
/// middleware chain) on an `EmbeddedChannel`: the bytes a client would see, with the loop's time
/// advanced instead of slept through.
@Suite struct DownstreamHandlerEmbeddedTests {
    /// A listener whose only virtual host is `known`: requests for any other host are answered by
    /// the proxy itself (404 `no_route`), so nothing leaves the channel.
    private func makeChannel(
        limits: ConnectionLimits = .init()
    ) throws -> (EmbeddedChannel, EmbeddedEventLoop, LoopContext) {
        let config = gatewayConfig(
            virtualHosts: [
                VirtualHost(
                    name: "known",
                    domains: ["known"],
                    routes: [
                        Route(name: "all", match: RouteMatch(), action: RouteAction(clusters: [.init(name: "alpha")]))
                    ]
                )
            ],
            clusters: [
                ClusterConfig(name: "alpha", endpoints: [Endpoint(address: SocketEndpoint(host: "127.0.0.1", port: 9))])
            ],
            limits: limits
        )
        let stats = ProxyStats()
        let snapshot = try ProxySnapshot(config, stats: stats)
        let loop = EmbeddedEventLoop()
        var logger = Logger(label: "test.embedded")
        logger.logLevel = .critical
        let context = LoopContext(
            eventLoop: loop,
            store: ProxyConfigStore(snapshot),
            factories: StandardMiddleware.chain,
            stats: stats,
            logger: logger
        )
        let channel = EmbeddedChannel(loop: loop)
        try ProxyServer.installHTTP(
            channel.pipeline.syncOperations,
            listener: config.listeners[0],
            loop: context,
            stats: stats,
            lookup: nil
        )
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 40000)).wait()
        return (channel, loop, context)
    }

    /// Everything the channel wrote so far, as text.
    private func written(_ channel: EmbeddedChannel) throws -> String {
        var text = ""
        while let buffer = try channel.readOutbound(as: ByteBuffer.self) {
            text += String(buffer: buffer)
        }
        return text
    }

    private func statusLines(_ text: String) -> [String] {
        text.split(whereSeparator: \.isNewline).filter { $0.hasPrefix("HTTP/1.") }.map(String.init)
    }

    /// Counts the flushes the loop asks of it; may write again while flushed.
    private final class CountingFlush: BatchedFlush {
        var flushQueued = false
        var flushes = 0
        var onFlush: (() -> Void)?
        func flushNow() {
            flushes += 1
            let next = onFlush
            onFlush = nil
            next?()
        }
    }

    @Test func aConnectionWrittenSeveralTimesInOneLoopIterationIsFlushedOnceAfterIt() throws {
        let (channel, loop, context) = try makeChannel()
        defer { _ = try? channel.finish() }
        let a = CountingFlush()
        let b = CountingFlush()
        for _ in 0..<3 { context.flushSoon(a) }
        context.flushSoon(b)
        #expect(a.flushes == 0 && b.flushes == 0, "nothing is flushed before the iteration's events are handled")
        loop.run()
        #expect(a.flushes == 1)
        #expect(b.flushes == 1)
        // Written again while being flushed: flushed again in the next batch, not lost.
        a.onFlush = { context.flushSoon(a) }
        context.flushSoon(a)
        loop.run()
        #expect(a.flushes == 3)
        loop.run()
        #expect(a.flushes == 3)
        #expect(!a.flushQueued && !b.flushQueued)
    }

    @Test func pipelinedRequestsAreAnsweredInOrderAndAMalformedOneInItsTurn() throws {
        let (channel, loop, _) = try makeChannel()
        defer { _ = try? channel.finish() }
        let requests =
            "GET /one HTTP/1.1\r\nhost: nowhere-1\r\n\r\n"
            + "GET /two HTTP/1.1\r\nhost: nowhere-2\r\n\r\n"
            + "GET /three HTTP/1.1\r\nho st: x\r\n\r\n"
        try channel.writeInbound(ByteBuffer(string: requests))
        loop.run()
        let text = try written(channel)
        #expect(
            statusLines(text) == ["HTTP/1.1 404 Not Found", "HTTP/1.1 404 Not Found", "HTTP/1.1 400 Bad Request"],
            "\(text)"
        )
        #expect(text.components(separatedBy: "x-trellis-error: no_route").count == 3)
        #expect(text.hasSuffix("bad_request\n"))
        #expect(text.lowercased().components(separatedBy: "connection: close").count == 2, "only the last closes")
        #expect(!channel.isActive, "the connection ends after the malformed request's answer")
    }

    @Test func aRequestSentInPiecesIsAnsweredOnceWhole() throws {
        let (channel, loop, _) = try makeChannel()
        defer { _ = try? channel.finish() }
        try channel.writeInbound(ByteBuffer(string: "POST /up HTTP/1.1\r\nhost: nowhere\r\ncontent-"))
        try channel.writeInbound(ByteBuffer(string: "length: 5\r\n\r\nab"))
        loop.run()
        let early = try written(channel)
        // The answer may go before the body ends; with a body to skip, the connection then closes.
        #expect(statusLines(early) == ["HTTP/1.1 404 Not Found"], "\(early)")
        #expect(early.lowercased().contains("connection: close"))
        #expect(!channel.isActive)
    }

    @Test func drainClosesAnIdleConnectionOnceQuietWithoutSleeping() throws {
        let (channel, loop, context) = try makeChannel()
        defer { _ = try? channel.finish() }
        try channel.writeInbound(ByteBuffer(string: "GET / HTTP/1.1\r\nhost: nowhere\r\n\r\n"))
        loop.run()
        let first = try written(channel)
        #expect(statusLines(first) == ["HTTP/1.1 404 Not Found"])
        #expect(!first.lowercased().contains("connection: close"))
        #expect(context.activity.httpConnections == 1)

        // Just answered: a client pool may be sending the next request; the drain waits.
        #expect(context.startDraining() == 0)
        loop.advanceTime(by: .milliseconds(500))
        #expect(channel.isActive, "half the quiet period")
        loop.advanceTime(by: .milliseconds(600))
        #expect(!channel.isActive, "closed by the drain's sweep once quiet for a second")
        #expect(try written(channel).isEmpty, "nothing more was sent")
        #expect(context.activity.httpConnections == 0)
        context.stopDraining()
    }

    @Test func aRequestDuringTheDrainIsAnsweredWithConnectionClose() throws {
        let (channel, loop, context) = try makeChannel()
        defer { _ = try? channel.finish() }
        #expect(context.startDraining() == 0, "opened just now")
        try channel.writeInbound(ByteBuffer(string: "GET / HTTP/1.1\r\nhost: nowhere\r\n\r\n"))
        loop.run()
        let text = try written(channel)
        #expect(statusLines(text) == ["HTTP/1.1 404 Not Found"])
        #expect(text.lowercased().contains("connection: close"))
        #expect(!channel.isActive)
        context.stopDraining()
    }

    @Test func anIncompleteHeadGets408AfterTheHeaderTimeout() throws {
        let (channel, loop, _) = try makeChannel(
            limits: ConnectionLimits(requestHeaderTimeout: .seconds(2), idleTimeout: .seconds(60))
        )
        defer { _ = try? channel.finish() }
        try channel.writeInbound(ByteBuffer(string: "GET / HTTP/1.1\r\nhost: now"))
        loop.advanceTime(by: .milliseconds(1900))
        #expect(channel.isActive)
        #expect(try written(channel).isEmpty)
        loop.advanceTime(by: .milliseconds(200))
        let text = try written(channel)
        #expect(statusLines(text) == ["HTTP/1.1 408 Request Timeout"], "\(text)")
        #expect(text.contains("x-trellis-error: request_timeout"))
        #expect(!channel.isActive)
    }

    @Test func anIdleKeepAliveConnectionClosesAfterTheIdleTimeout() throws {
        let (channel, loop, _) = try makeChannel(
            limits: ConnectionLimits(requestHeaderTimeout: .seconds(2), idleTimeout: .seconds(30))
        )
        defer { _ = try? channel.finish() }
        try channel.writeInbound(ByteBuffer(string: "GET / HTTP/1.1\r\nhost: nowhere\r\n\r\n"))
        loop.run()
        #expect(statusLines(try written(channel)) == ["HTTP/1.1 404 Not Found"])
        loop.advanceTime(by: .seconds(29))
        #expect(channel.isActive)
        loop.advanceTime(by: .seconds(2))
        #expect(!channel.isActive, "idle for the idle timeout")
        #expect(try written(channel).isEmpty, "closed without a response")
    }
}
