import NIOCore
import NIOHTTP1
import NIOPosix
import Testing
import TrellisPolicy

@testable import Proxy

/// A capture listener (``TransparentMode``): the protocol of each connection is sniffed; HTTP/1
/// goes through routing, anything else — and a client that waits for the server to speak — is
/// relayed as TCP to the original destination the injected lookup gives.
@Suite struct TransparentListenerTests {
    let group = MultiThreadedEventLoopGroup.singleton

    /// A real TCP server: sends `banner` on connect, answers each read with `echo:<bytes>`, and on
    /// the client's half-close sends `bye` and closes.
    final class EchoServer: Sendable {
        let channel: any Channel
        var port: Int { channel.localAddress!.port! }

        init(banner: String?, group: any EventLoopGroup) async throws {
            channel = try await ServerBootstrap(group: group)
                .childChannelOption(.allowRemoteHalfClosure, value: true)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(Echo(banner: banner))
                    }
                }
                .bind(host: "127.0.0.1", port: 0).get()
        }

        func close() async { try? await channel.close() }

        final class Echo: ChannelInboundHandler, Sendable {
            typealias InboundIn = ByteBuffer
            typealias OutboundOut = ByteBuffer
            let banner: String?
            init(banner: String?) { self.banner = banner }

            func channelActive(context: ChannelHandlerContext) {
                if let banner { context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: banner)), promise: nil) }
                context.fireChannelActive()
            }

            func channelRead(context: ChannelHandlerContext, data: NIOAny) {
                var reply = ByteBuffer(string: "echo:")
                var bytes = unwrapInboundIn(data)
                reply.writeBuffer(&bytes)
                context.writeAndFlush(wrapOutboundOut(reply), promise: nil)
            }

            func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
                if case ChannelEvent.inputClosed = event {
                    context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: "bye")), promise: nil)
                    context.close(promise: nil)
                }
            }
        }
    }

    /// A capture listener whose HTTP traffic goes to `http` (cluster `alpha`) and whose original
    /// destination is `destination` for every connection. The sniff timeout is long by default so
    /// that a loaded machine's slow client is not taken for a server-speaks-first one (it would be
    /// relayed as TCP: correct, but not what those tests check).
    func start(
        http: TestUpstream,
        destination: SocketAddress?,
        sniff: Duration = .seconds(5)
    ) async throws -> ProxyHarness {
        var config = gatewayConfig(
            virtualHosts: catchAll("alpha"),
            clusters: [ClusterConfig(name: "alpha", endpoints: [endpoint(http)])]
        )
        config.listeners[0].transparent = TransparentMode(sniffTimeout: sniff)
        return try await ProxyHarness.start(config, group: group, originalDestination: { _ in destination })
    }

    @Test func firstBytesDecideTheProtocol() {
        func classify(_ text: String) -> ProtocolSniffer.Decision {
            ProtocolSniffer.classify(ByteBuffer(string: text).readableBytesView)
        }
        #expect(classify("GET / HTTP/1.1\r\n") == .http1)
        #expect(classify("M-SEARCH * HTTP/1.1\r\n") == .http1)
        #expect(classify("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") == .http2)
        #expect(classify("PRI * HTTP/2.0\r\n") == .undecided)
        #expect(classify("PRI * HTTP/1.1\r\n\r\n") == .tcp)
        #expect(classify("\u{16}\u{03}\u{01}\u{02}") == .tcp)  // a TLS ClientHello
        #expect(classify("get / HTTP/1.1") == .tcp)
        #expect(classify("GE") == .undecided)
        #expect(classify(" GET") == .tcp)
    }

    @Test func nonHTTPBytesAreRelayedToTheOriginalDestinationBothWaysWithHalfClose() async throws {
        let http = try await TestUpstream.start(name: "http", group: group)
        let echo = try await EchoServer(banner: nil, group: group)
        let proxy = try await start(http: http, destination: echo.channel.localAddress)
        defer {
            Task {
                await proxy.stop(); await echo.close(); await http.stop()
            }
        }

        let client = try await RawClient.connect(port: proxy.port, group: group)
        try await client.send("\u{16}\u{03}\u{01}hello")
        #expect(try await client.readUntil("hello").hasSuffix("echo:\u{16}\u{03}\u{01}hello"))
        try await client.send("again")
        #expect(try await client.readUntil("again").hasSuffix("echo:again"))
        // The client half-closes: the server sees it, answers, closes; the client gets all of it.
        try await client.shutdownOutput()
        let (text, closed) = try await client.readUntilClose()
        #expect(closed && text.hasSuffix("bye"))
        #expect(try await proxy.metric(#"trellis_sniffed_connections_total{protocol="tcp"}"#, group: group) == 1)
    }

    @Test func aServerThatSpeaksFirstIsNotStalled() async throws {
        let http = try await TestUpstream.start(name: "http", group: group)
        let smtp = try await EchoServer(banner: "220 mail ready\r\n", group: group)
        let proxy = try await start(http: http, destination: smtp.channel.localAddress, sniff: .milliseconds(150))
        defer {
            Task {
                await proxy.stop(); await smtp.close(); await http.stop()
            }
        }

        let client = try await RawClient.connect(port: proxy.port, group: group)
        let start = ContinuousClock.now
        #expect(try await client.readUntil("ready\r\n") == "220 mail ready\r\n")
        #expect(ContinuousClock.now - start < .seconds(2))
        try await client.send("EHLO me\r\n")
        #expect(try await client.readUntil("EHLO").hasSuffix("echo:EHLO me\r\n"))
        await client.close()
    }

    @Test func httpOnTheSameListenerIsRoutedNotRelayed() async throws {
        let http = try await TestUpstream.start(name: "http", group: group)
        let echo = try await EchoServer(banner: nil, group: group)
        let proxy = try await start(http: http, destination: echo.channel.localAddress)
        defer {
            Task {
                await proxy.stop(); await echo.close(); await http.stop()
            }
        }

        let response = try await TestHTTPClient.get(port: proxy.port, "/hello", group: group)
        #expect(response.status == .ok)
        #expect(response.body.contains("http"))
        #expect(!response.body.contains("echo:"))
        #expect(try await proxy.metric(#"trellis_sniffed_connections_total{protocol="http1"}"#, group: group) == 1)
        #expect(try await proxy.metric("trellis_downstream_connections_active", group: group) <= 1)
    }

    @Test func withoutAnOriginalDestinationOrWithAnUnreachableOneTheConnectionIsClosedAndCounted() async throws {
        let http = try await TestUpstream.start(name: "http", group: group)
        let unknown = try await start(http: http, destination: nil)
        let client = try await RawClient.connect(port: unknown.port, group: group)
        try await client.send("\u{0}binary")
        #expect(try await client.readUntilClose().closed)
        #expect(
            try await unknown.metric(
                #"trellis_tcp_relay_failures_total{reason="no_original_destination"}"#,
                group: group
            ) == 1
        )
        await unknown.stop()

        // A port nothing listens on.
        let closed = try await EchoServer(banner: nil, group: group)
        let address = closed.channel.localAddress
        await closed.close()
        let refused = try await start(http: http, destination: address)
        let second = try await RawClient.connect(port: refused.port, group: group)
        try await second.send("\u{0}binary")
        #expect(try await second.readUntilClose().closed)
        #expect(try await refused.metric(#"trellis_tcp_relay_failures_total{reason="connect"}"#, group: group) == 1)
        await refused.stop()
        await http.stop()
    }

    /// HTTP for a known service is routed to its cluster; HTTP for any other host passes through to
    /// where the client was going, so nothing a legacy client did before breaks.
    /// `forward_to` (the agent's inbound listener): the original destination's address is replaced,
    /// its port kept, for relayed TCP and passed-through HTTP alike. The lookup says 127.0.0.2,
    /// where nothing listens; the servers listen on 127.0.0.1 only.
    @Test func forwardToReplacesTheOriginalAddressAndKeepsThePort() async throws {
        let echo = try await EchoServer(banner: nil, group: group)
        let origin = try await TestUpstream.start(name: "origin", group: group)
        func listener(port: Int, forwardTo: [String]) async throws -> ProxyHarness {
            var config = gatewayConfig(
                virtualHosts: [
                    VirtualHost(
                        name: "allow_any",
                        domains: ["*"],
                        routes: [
                            Route(
                                name: "passthrough",
                                match: RouteMatch(),
                                action: RouteAction(clusters: [.init(name: "passthrough")], timeout: .seconds(5))
                            )
                        ]
                    )
                ],
                clusters: [ClusterConfig(name: "passthrough", endpoints: [], originalDestination: true)]
            )
            config.listeners[0].transparent = TransparentMode(sniffTimeout: .seconds(5), forwardTo: forwardTo)
            let elsewhere = try SocketAddress(ipAddress: "127.0.0.2", port: port)
            return try await ProxyHarness.start(config, group: group, originalDestination: { _ in elsewhere })
        }
        let tcp = try await listener(port: echo.port, forwardTo: ["127.0.0.1"])
        let http = try await listener(port: origin.port, forwardTo: ["127.0.0.1"])
        let unchanged = try await listener(port: origin.port, forwardTo: [])
        defer {
            Task {
                await tcp.stop(); await http.stop(); await unchanged.stop(); await echo.close(); await origin.stop()
            }
        }
        let client = try await RawClient.connect(port: tcp.port, group: group)
        try await client.send("\u{16}\u{03}\u{01}hi")
        #expect(try await client.readUntil("hi").hasSuffix("echo:\u{16}\u{03}\u{01}hi"))
        await client.close()
        let answer = try await TestHTTPClient.get(port: http.port, "/", host: "orders:8080", group: group)
        #expect(answer.status == .ok && answer.body == "origin", "\(answer.status) \(answer.body)")
        // Without forward_to the connection goes to 127.0.0.2, where nothing listens.
        let refused = try await TestHTTPClient.get(port: unchanged.port, "/", host: "orders:8080", group: group)
        #expect(refused.status == .serviceUnavailable, "\(refused.status) \(refused.body)")

        var invalid = gatewayConfig(
            virtualHosts: catchAll("alpha"),
            clusters: [ClusterConfig(name: "alpha", endpoints: [])]
        )
        invalid.listeners[0].transparent = TransparentMode(forwardTo: ["localhost"])
        #expect(invalid.validationErrors().contains { $0.path == "listeners[0].transparent.forward_to[0]" })
    }

    @Test func httpToAnUnknownHostPassesThroughToTheOriginalDestination() async throws {
        let known = try await TestUpstream.start(name: "known", group: group)
        let origin = try await TestUpstream.start(name: "origin", group: group)
        let route = { (cluster: String) in
            [
                Route(
                    name: cluster,
                    match: RouteMatch(),
                    action: RouteAction(clusters: [.init(name: cluster)], timeout: .seconds(5))
                )
            ]
        }
        var config = gatewayConfig(
            virtualHosts: [
                VirtualHost(name: "known", domains: ["known.example"], routes: route("known")),
                VirtualHost(name: "allow_any", domains: ["*"], routes: route("passthrough")),
            ],
            clusters: [
                ClusterConfig(name: "known", endpoints: [endpoint(known)]),
                ClusterConfig(name: "passthrough", endpoints: [], originalDestination: true),
            ]
        )
        config.listeners[0].transparent = TransparentMode(sniffTimeout: .seconds(5))
        let destination = try SocketAddress(ipAddress: "127.0.0.1", port: origin.port)
        let proxy = try await ProxyHarness.start(config, group: group, originalDestination: { _ in destination })
        defer {
            Task {
                await proxy.stop(); await known.stop(); await origin.stop()
            }
        }

        let toKnown = try await TestHTTPClient.get(port: proxy.port, "/", host: "known.example", group: group)
        #expect(
            toKnown.status == .ok && toKnown.body == "known",
            "\(toKnown.status) \(toKnown.body) \(toKnown.headers)"
        )
        let elsewhere = try await TestHTTPClient.get(port: proxy.port, "/", host: "legacy.internal:8080", group: group)
        #expect(elsewhere.status == .ok && elsewhere.body == "origin", "\(elsewhere.status) \(elsewhere.body)")

        // A passthrough cluster on a listener that is not a capture listener has nowhere to go.
        config.listeners[0].transparent = nil
        let plain = try await ProxyHarness.start(config, group: group, originalDestination: { _ in destination })
        let refused = try await TestHTTPClient.get(port: plain.port, "/", host: "legacy.internal", group: group)
        #expect(
            refused.status == .serviceUnavailable && refused.body.contains("no_healthy_upstream"),
            "\(refused.body)"
        )
        await plain.stop()

        // A passthrough cluster with endpoints of its own is refused.
        var invalid = config
        invalid.clusters[1].endpoints = [endpoint(origin)]
        #expect(invalid.validationErrors().contains { $0.path == "clusters[1].endpoints" })
    }
}
