import NIOCore
import Testing

@testable import Proxy

/// The libnghttp2 session on its own: a client and a server session exchange bytes in memory, no
/// socket, so each property (framing, trailers, flow control, stream limits, floods) is checked
/// exactly and at once.
@Suite struct HTTP2SessionTests {
    typealias Fields = [(name: String, value: String)]

    /// Moves bytes both ways until neither side has anything to say (bounded); returns the events.
    private func pump(
        _ client: HTTP2Session,
        _ server: HTTP2Session,
        rounds: Int = 100
    ) throws -> (client: [HTTP2Session.Event], server: [HTTP2Session.Event]) {
        var clientEvents: [HTTP2Session.Event] = []
        var serverEvents: [HTTP2Session.Event] = []
        for _ in 0..<rounds {
            var toServer = ByteBuffer()
            var toClient = ByteBuffer()
            try client.produce(into: &toServer)
            clientEvents += client.takeEvents()
            if toServer.readableBytes > 0 { serverEvents += try server.receive(toServer) }
            try server.produce(into: &toClient)
            serverEvents += server.takeEvents()
            if toClient.readableBytes > 0 { clientEvents += try client.receive(toClient) }
            if toServer.readableBytes == 0 && toClient.readableBytes == 0 { break }
        }
        return (clientEvents, serverEvents)
    }

    private func request(path: String = "/", extra: Fields = []) -> Fields {
        [(":method", "POST"), (":scheme", "http"), (":authority", "orders"), (":path", path)] + extra
    }

    private func body(_ events: [HTTP2Session.Event], stream: Int32) -> Int {
        events.reduce(0) { sum, event in
            if case .data(let s, let buffer) = event, s == stream { return sum + buffer.readableBytes }
            return sum
        }
    }

    @Test func aRequestAndAResponseWithBodiesAndTrailers() throws {
        let client = HTTP2Session(role: .client)
        let server = HTTP2Session(role: .server)
        let id = try #require(
            client.request(headers: request(path: "/orders.Orders/Get", extra: [("te", "trailers")]), endStream: false)
        )
        client.send(stream: id, ByteBuffer(string: "hello"))
        client.end(stream: id)
        var (_, onServer) = try pump(client, server)
        let firstHeaders = onServer.first { if case .headers = $0 { return true } else { return false } }
        guard case .headers(let stream, let head) = firstHeaders else {
            Issue.record("no request headers: \(onServer)")
            return
        }
        #expect(stream == id)
        #expect(head.first(":path") == "/orders.Orders/Get")
        #expect(head.first(":authority") == "orders")
        #expect(head.first("te") == "trailers")
        #expect(!head.endStream)
        #expect(body(onServer, stream: id) == 5)
        #expect(onServer.contains { if case .endStream(id) = $0 { return true } else { return false } })

        #expect(
            server.respond(
                stream: id,
                headers: [(":status", "200"), ("content-type", "application/grpc")],
                endStream: false
            )
        )
        server.send(stream: id, ByteBuffer(string: "world!"))
        server.end(stream: id, trailers: [("grpc-status", "0"), ("grpc-message", "ok")])
        let (onClient, after) = try pump(client, server)
        onServer = after
        let blocks = onClient.compactMap { event -> HTTP2Session.HeaderBlock? in
            if case .headers(id, let block) = event { return block }
            return nil
        }
        #expect(blocks.count == 2, "a response head and trailers: \(onClient)")
        #expect(blocks.first?.first(":status") == "200")
        #expect(blocks.last?.first("grpc-status") == "0")
        #expect(blocks.last?.endStream == true)
        #expect(body(onClient, stream: id) == 6)
        #expect(onClient.contains { if case .closed(id, 0) = $0 { return true } else { return false } })
        #expect(onServer.contains { if case .closed(id, 0) = $0 { return true } else { return false } })
    }

    /// A peer can have at most one stream window of body unconsumed: the rest waits on its side
    /// until the receiver gives credit back.
    @Test func flowControlBoundsWhatAPeerCanSend() throws {
        var settings = HTTP2Session.Settings()
        settings.initialWindowSize = 64 * 1024
        let client = HTTP2Session(role: .client)
        let server = HTTP2Session(role: .server, settings: settings)
        // The SETTINGS exchange first, so the client knows the server's window.
        _ = try pump(client, server)
        let id = try #require(client.request(headers: request(), endStream: false))
        let total = 1024 * 1024
        client.send(stream: id, ByteBuffer(repeating: 7, count: total))
        client.end(stream: id)
        var received = body(try pump(client, server).server, stream: id)
        #expect(received <= 64 * 1024, "no more than the window arrives unconsumed")
        #expect(received > 0)
        #expect(client.queuedBytes(stream: id) == total - received)

        server.consume(stream: id, bytes: received)
        var rounds = 0
        while received < total && rounds < 100 {
            let more = body(try pump(client, server).server, stream: id)
            #expect(more <= 64 * 1024)
            received += more
            server.consume(stream: id, bytes: more)
            rounds += 1
        }
        #expect(received == total)
        #expect(client.queuedBytes(stream: id) == 0)
    }

    /// Requests past the server's advertised limit wait in the client session; the server never
    /// sees more streams at once than it allows.
    @Test func streamsPastTheLimitWaitOnTheClient() throws {
        var settings = HTTP2Session.Settings()
        settings.maxConcurrentStreams = 10
        let client = HTTP2Session(role: .client)
        let server = HTTP2Session(role: .server, settings: settings)
        _ = try pump(client, server)
        #expect(client.remoteMaxConcurrentStreams == 10)
        let ids = (0..<15).compactMap { _ in client.request(headers: request(), endStream: true) }
        #expect(ids.count == 15)
        let first = try pump(client, server).server.compactMap { event -> Int32? in
            if case .headers(let stream, _) = event { return stream }
            return nil
        }
        #expect(first.count == 10)
        for stream in first.prefix(3) {
            _ = server.respond(stream: stream, headers: [(":status", "204")], endStream: true)
        }
        let next = try pump(client, server).server.compactMap { event -> Int32? in
            if case .headers(let stream, _) = event { return stream }
            return nil
        }
        #expect(next.count == 3, "three answered, three more let in")
    }

    @Test func anOversizedHeaderBlockIsFlaggedAndCutOff() throws {
        var settings = HTTP2Session.Settings()
        settings.maxHeaderListSize = 1024
        let client = HTTP2Session(role: .client)
        let server = HTTP2Session(role: .server, settings: settings)
        _ = try pump(client, server)
        let id = try #require(
            client.request(headers: request(extra: [("x-big", String(repeating: "a", count: 4000))]), endStream: true)
        )
        let onServer = try pump(client, server).server
        let firstHeaders = onServer.first { if case .headers = $0 { return true } else { return false } }
        guard case .headers(id, let block) = firstHeaders else {
            Issue.record("no headers: \(onServer)")
            return
        }
        #expect(block.oversized)
        #expect(block.first("x-big") == nil, "the field past the limit was not kept")
    }

    @Test func aClientPrefaceThatIsNotHTTP2FailsTheSession() throws {
        let server = HTTP2Session(role: .server)
        #expect(throws: HTTP2Session.Failure.self) {
            _ = try server.receive(ByteBuffer(string: "GET / HTTP/1.1\r\nhost: a\r\n\r\nPRI * HTTP/2.0"))
        }
    }

    /// Drain: the shutdown notice and the final GOAWAY reach the client; it opens no new stream,
    /// while the stream in flight still completes.
    @Test func gracefulGoAwayLetsTheOpenStreamFinish() throws {
        let client = HTTP2Session(role: .client)
        let server = HTTP2Session(role: .server)
        let id = try #require(client.request(headers: request(), endStream: true))
        _ = try pump(client, server)
        server.announceShutdown()
        server.goAway()
        let onClient = try pump(client, server).client
        #expect(onClient.contains { if case .goAway(_, 0) = $0 { return true } else { return false } })
        #expect(!client.acceptsRequests)
        #expect(server.respond(stream: id, headers: [(":status", "200")], endStream: true))
        let done = try pump(client, server).client
        #expect(done.contains { if case .headers(id, _) = $0 { return true } else { return false } })
        #expect(done.contains { if case .closed(id, 0) = $0 { return true } else { return false } })
    }

    /// Rapid reset (CVE-2023-44487): a client that opens and cancels streams without end gets the
    /// connection closed once it passes the burst.
    @Test func rapidResetEndsTheConnection() throws {
        var settings = HTTP2Session.Settings()
        settings.resetBurst = 100
        settings.resetRate = 10
        let client = HTTP2Session(role: .client)
        let server = HTTP2Session(role: .server, settings: settings)
        _ = try pump(client, server)
        var failed = false
        var goAway = false
        for _ in 0..<50 where !failed && !goAway {
            do {
                // Each stream's HEADERS reach the server before its RST_STREAM.
                let ids = (0..<20).compactMap { _ in client.request(headers: request(), endStream: true) }
                var headers = ByteBuffer()
                try client.produce(into: &headers)
                _ = try server.receive(headers)
                for id in ids { client.reset(stream: id, code: 0x8) }
                let (onClient, _) = try pump(client, server)
                goAway = onClient.contains { if case .goAway = $0 { return true } else { return false } }
            } catch {
                failed = true
            }
        }
        #expect(failed || goAway, "a flood of resets ends the connection")
    }
}
