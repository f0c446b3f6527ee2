import Foundation
import NIOCore
import NIOPosix
import Testing
import TrellisTestSupport

@testable import Proxy

/// Drain: keep-alive connections idle for a second are closed at once, those used within the last
/// second once they have been quiet that long (a client may be reusing one right now: the
/// keep-alive race), a request in flight completes and its response says `Connection: close`,
/// connections accepted while draining are not kept alive, and undrain restores keep-alive.
@Suite struct DrainTests {
    let group = MultiThreadedEventLoopGroup.singleton

    @Test func drainClosesIdleConnectionsAndLetsInFlightRequestsFinish() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        let proxy = try await ProxyHarness.start(
            gatewayConfig(
                virtualHosts: catchAll("alpha"),
                clusters: [ClusterConfig(name: "alpha", endpoints: [endpoint(a)])]
            ),
            group: group
        )
        // A keep-alive connection answered once, nothing more. (How long a connection must have
        // been quiet before the drain closes it is checked with advanced time in
        // DownstreamHandlerEmbeddedTests.)
        let idle = try await RawClient.connect(port: proxy.port, group: group)
        try await idle.send("GET /one HTTP/1.1\r\nhost: a\r\n\r\n")
        let first = try await idle.readUntil("alpha", count: 2)
        #expect(first.hasPrefix("HTTP/1.1 200 OK"))
        #expect(!first.lowercased().contains("connection: close"))

        // A busy connection: a slow request in flight.
        let busy = try await RawClient.connect(port: proxy.port, group: group)
        try await busy.send("GET /delay/1500 HTTP/1.1\r\nhost: a\r\n\r\n")
        #expect(await Peers.eventually(within: .seconds(5)) { await proxy.server.activity().requestsInFlight == 1 })
        let before = await proxy.server.activity()
        #expect(before.httpConnections == 2)

        let started = await proxy.server.startDraining()
        #expect(started.requestsInFlight == 1)
        #expect(proxy.server.isDraining)

        // The idle one closes once it has been quiet for the drain's quiet period.
        let (idleText, idleClosed) = try await idle.readUntilClose(timeout: .seconds(3))
        #expect(idleClosed, "the idle connection was closed by the drain")
        #expect(idleText == first, "nothing more was sent on it")

        // The slow request completes, says Connection: close, and the connection ends.
        let (busyText, busyClosed) = try await busy.readUntilClose(timeout: .seconds(5))
        #expect(busyText.hasPrefix("HTTP/1.1 200 OK"), "\(busyText)")
        #expect(busyText.lowercased().contains("connection: close"))
        #expect(busyClosed)

        // A connection accepted while draining is served once, then closed.
        let late = try await RawClient.connect(port: proxy.port, group: group)
        try await late.send("GET /late HTTP/1.1\r\nhost: a\r\n\r\n")
        let (lateText, lateClosed) = try await late.readUntilClose(timeout: .seconds(5))
        #expect(lateText.hasPrefix("HTTP/1.1 200 OK"))
        #expect(lateText.lowercased().contains("connection: close"))
        #expect(lateClosed)

        let after = await proxy.server.activity()
        #expect(after.isQuiet)

        // Undrain: keep-alive again.
        await proxy.server.stopDraining()
        #expect(!proxy.server.isDraining)
        let again = try await RawClient.connect(port: proxy.port, group: group)
        try await again.send("GET /again HTTP/1.1\r\nhost: a\r\n\r\n")
        let againText = try await again.readUntil("alpha", count: 2)
        #expect(againText.hasPrefix("HTTP/1.1 200 OK"))
        #expect(!againText.lowercased().contains("connection: close"))
        try await again.send("GET /again2 HTTP/1.1\r\nhost: a\r\n\r\n")
        let both = try await again.readUntil("HTTP/1.1 200 OK", count: 2)
        #expect(both.components(separatedBy: "HTTP/1.1 200 OK").count == 3, "two answers on one connection: \(both)")

        for client in [idle, busy, late, again] { await client.close() }
        await proxy.stop()
        await a.stop()
    }

    /// Drain on an HTTP/2 connection: GOAWAY at once (no new streams), the stream in flight
    /// finishes with its response, then the connection closes.
    @Test(.enabled(if: !HTTP2AbuseTests.hpackMissing, "needs PyPI hpack: run scripts/bootstrap.sh"))
    func drainSendsGoAwayAndLetsTheOpenStreamFinish() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        let proxy = try await ProxyHarness.start(forwardingTo: a, group: group)
        let client = Task {
            await Peers.command(["python3", HTTP2AbuseTests.script, "slow_request", "127.0.0.1", "\(proxy.port)"])
        }
        // Drain once the slow request is in flight (however long the client took to start).
        #expect(await Peers.eventually(within: .seconds(5)) { await proxy.server.activity().requestsInFlight == 1 })
        let started = await proxy.server.startDraining()
        #expect(started.requestsInFlight == 1)
        let out = await client.value
        let outcome = try JSONDecoder().decode(HTTP2AbuseTests.Outcome.self, from: Data(out.stdout.utf8))
        #expect(outcome.goaway == [1, 0], "the last GOAWAY names the stream in flight: \(out)")
        #expect(outcome.statuses["1"] == "200", "\(out)")
        #expect(outcome.body["1"] == 5, "its whole body (alpha): \(out)")
        #expect(outcome.closed, "closed once the stream ended: \(out)")
        #expect((await proxy.server.activity()).isQuiet)
        await proxy.stop()
        await a.stop()
    }
}
