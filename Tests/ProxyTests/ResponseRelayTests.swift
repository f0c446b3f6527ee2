import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import Testing
import TrellisPolicy

@testable import Proxy

/// Responses relayed as bytes through a real proxy, from an upstream that answers with exact
/// bytes: the client's framing, the upstream's field lines, trailers, and responses the proxy
/// cannot frame.
@Suite struct ResponseRelayTests {
    let group = MultiThreadedEventLoopGroup.singleton

    private func proxy(to upstream: ScriptedUpstream) async throws -> ProxyHarness {
        try await ProxyHarness.start(
            gatewayConfig(
                virtualHosts: catchAll("alpha"),
                clusters: [
                    ClusterConfig(
                        name: "alpha",
                        endpoints: [Endpoint(address: SocketEndpoint(host: "127.0.0.1", port: upstream.port))]
                    )
                ]
            ),
            group: group
        )
    }

    @Test func aChunkedResponseWithTrailersReachesTheClientChunkedAndTheConnectionLives() async throws {
        let upstream = try await ScriptedUpstream.start(group: group) { _ in
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Up: One  Two\r\nConnection: keep-alive\r\n\r\n"
                    + "5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
                false
            )
        }
        defer { Task { await upstream.stop() } }
        let proxy = try await proxy(to: upstream)
        defer { Task { await proxy.stop() } }
        let client = try await RawClient.connect(port: proxy.port, group: group)
        defer { Task { await client.close() } }
        try await client.send("GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        let first = try await client.readUntil("\r\n0\r\nX-Trailer: t\r\n\r\n")
        #expect(first.hasPrefix("HTTP/1.1 200 OK\r\n"), "\(first)")
        #expect(first.contains("\r\nX-Up: One  Two\r\n"), "field line copied as received: \(first)")
        #expect(first.contains("\r\ntransfer-encoding: chunked\r\n"))
        #expect(!first.lowercased().contains("connection:"), "hop-by-hop dropped: \(first)")
        #expect(first.hasSuffix("\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"), "\(first)")
        // Framed right: the same connection carries the next request.
        try await client.send("GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        let both = try await client.readUntil("X-Trailer: t", count: 2)
        #expect(both.components(separatedBy: "HTTP/1.1 200 OK").count == 3)
    }

    @Test func aBodyEndedByTheUpstreamsCloseIsChunkedForAnHTTP11ClientAndClosesAnHTTP10One() async throws {
        let upstream = try await ScriptedUpstream.start(group: group) { _ in
            ("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end", true)
        }
        defer { Task { await upstream.stop() } }
        let proxy = try await proxy(to: upstream)
        defer { Task { await proxy.stop() } }
        let client = try await RawClient.connect(port: proxy.port, group: group)
        defer { Task { await client.close() } }
        try await client.send("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        let text = try await client.readUntil("\r\n0\r\n\r\n")
        #expect(text.contains("\r\ntransfer-encoding: chunked\r\n"), "\(text)")
        #expect(text.hasSuffix("\r\n\r\nd\r\nuntil the end\r\n0\r\n\r\n"), "\(text)")
        try await client.send("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        #expect(
            try await client.readUntil("until the end", count: 2).components(separatedBy: "until the end").count == 3
        )

        let old = try await RawClient.connect(port: proxy.port, group: group)
        defer { Task { await old.close() } }
        try await old.send("GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        let (oldText, closed) = try await old.readUntilClose()
        #expect(closed)
        #expect(oldText.hasPrefix("HTTP/1.0 200 OK\r\n") && oldText.hasSuffix("\r\n\r\nuntil the end"), "\(oldText)")
        #expect(oldText.contains("\r\nconnection: close\r\n") && !oldText.contains("chunked"))
    }

    @Test func aResponseTheProxyCannotFrameIs502AndItsConnectionIsNotReused() async throws {
        let answers: NIOLockedValueBox<Int> = .init(0)
        let upstream = try await ScriptedUpstream.start(group: group) { _ in
            let n = answers.withLockedValue {
                $0 += 1
                return $0
            }
            // The first answer could be read two ways (smuggling); the second is sound.
            return n == 1
                ? ("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", false)
                : ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false)
        }
        defer { Task { await upstream.stop() } }
        let proxy = try await proxy(to: upstream)
        defer { Task { await proxy.stop() } }
        let bad = try await TestHTTPClient.get(port: proxy.port, "/", group: group)
        #expect(bad.status == .badGateway)
        #expect(bad.body == "upstream_protocol_error\n")
        #expect(try await proxy.metric("trellis_errors_total{token=\"upstream_protocol_error\"}", group: group) == 1)
        let good = try await TestHTTPClient.get(port: proxy.port, "/", group: group)
        #expect(good.status == .ok && good.body == "ok")
        #expect(upstream.connections == 2, "the connection that spoke ambiguously was closed")
    }
}

/// An upstream that answers each request head (requests without bodies) with the bytes its
/// script returns for the answer's number on the connection, closing after it when told to.
final class ScriptedUpstream: Sendable {
    typealias Script = @Sendable (Int) -> (response: String, close: Bool)
    private let channel: any Channel
    private let accepted: NIOLockedValueBox<Int>
    var port: Int { channel.localAddress!.port! }
    var connections: Int { accepted.withLockedValue { $0 } }

    static func start(group: any EventLoopGroup, script: @escaping Script) async throws -> ScriptedUpstream {
        let accepted = NIOLockedValueBox(0)
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                accepted.withLockedValue { $0 += 1 }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(Answerer(script: script))
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        return ScriptedUpstream(channel: channel, accepted: accepted)
    }

    private init(channel: any Channel, accepted: NIOLockedValueBox<Int>) {
        self.channel = channel
        self.accepted = accepted
    }

    func stop() async {
        try? await channel.close()
    }

    private final class Answerer: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer
        let script: Script
        var received = ""
        var answered = 0

        init(script: @escaping Script) { self.script = script }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var buffer = unwrapInboundIn(data)
            received += buffer.readString(length: buffer.readableBytes) ?? ""
            while let end = received.range(of: "\r\n\r\n") {
                received = String(received[end.upperBound...])
                answered += 1
                let (response, close) = script(answered)
                let write = context.writeAndFlush(wrapOutboundOut(context.channel.allocator.buffer(string: response)))
                if close {
                    let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
                    write.whenComplete { _ in bound.value.close(promise: nil) }
                    return
                }
            }
        }
    }
}
