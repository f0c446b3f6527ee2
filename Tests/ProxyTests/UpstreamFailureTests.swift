import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Testing
import TrellisPolicy

@testable import Proxy

#if canImport(Glibc)
import Glibc
#endif

/// What the client sees when the upstream is slow, absent or misbehaves.
@Suite struct UpstreamFailureTests {
    let group = MultiThreadedEventLoopGroup.singleton

    @Test func expiredRouteTimeoutIs504AndTheProxyKeepsServing() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        defer { Task { await a.stop() } }
        let proxy = try await ProxyHarness.start(
            gatewayConfig(
                virtualHosts: catchAll("alpha", timeout: .seconds(1)),
                clusters: [ClusterConfig(name: "alpha", endpoints: [endpoint(a)])]
            ),
            group: group
        )
        defer { Task { await proxy.stop() } }
        let started = ContinuousClock.now
        let slow = try await TestHTTPClient.get(port: proxy.port, "/delay/10000", group: group)
        #expect(slow.status == .gatewayTimeout)
        #expect(slow.body == "timeout\n")
        #expect(slow.headers.first(name: "x-trellis-error") == "timeout")
        // Well before the upstream's 10 s answer (generous: other suites share these 2 cores).
        #expect(ContinuousClock.now - started < .seconds(5))
        // A quick answer within the timeout (1 s, not less: the other suites load these 2 cores).
        #expect(try await TestHTTPClient.get(port: proxy.port, "/delay/10", group: group).status == .ok)
        #expect(try await proxy.metric("trellis_errors_total{token=\"timeout\"}", group: group) == 1)
        // The timed-out upstream request was abandoned: its connection was closed, not pooled.
        let deadline = ContinuousClock.now + .seconds(2)
        while a.abortedRequests == 0 && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(10)) }
        #expect(a.abortedRequests == 1)
    }

    @Test func refusedConnectionIs503UpstreamConnectFailure() async throws {
        // A port held by a bound socket that does not listen: connections to it are refused, and
        // no other test can take it meanwhile (a port released after use could be handed out
        // again by the kernel to a parallel test's server).
        let holder = try RefusingPort()
        defer { holder.close() }
        let port = holder.port
        let proxy = try await ProxyHarness.start(
            gatewayConfig(
                virtualHosts: catchAll("gone"),
                clusters: [
                    ClusterConfig(name: "gone", endpoints: [Endpoint(address: .init(host: "127.0.0.1", port: port))])
                ]
            ),
            group: group
        )
        defer { Task { await proxy.stop() } }
        let r = try await TestHTTPClient.get(port: proxy.port, "/", group: group)
        #expect(r.status == .serviceUnavailable)
        #expect(r.body == "upstream_connect_failure\n")
        #expect(try await proxy.metric("trellis_upstream_connect_failures_total{cluster=\"gone\"}", group: group) == 1)
        #expect(try await proxy.metric("trellis_errors_total{token=\"upstream_connect_failure\"}", group: group) == 1)
    }

    @Test func unansweredConnectIsCutAtTheConnectTimeout() async throws {
        // A listener whose accept queue is full: further SYNs get no answer, so connect hangs.
        let blackhole = try BlackholeListener()
        defer { blackhole.close() }
        let fillers = try await blackhole.fillAcceptQueue(group: group)
        defer { Task { for f in fillers { try? await f.close() } } }
        let proxy = try await ProxyHarness.start(
            gatewayConfig(
                virtualHosts: catchAll("hole"),
                clusters: [
                    ClusterConfig(
                        name: "hole",
                        endpoints: [Endpoint(address: .init(host: "127.0.0.1", port: blackhole.port))],
                        connectTimeout: .milliseconds(250)
                    )
                ]
            ),
            group: group
        )
        defer { Task { await proxy.stop() } }
        let started = ContinuousClock.now
        let r = try await TestHTTPClient.get(port: proxy.port, "/", group: group)
        let elapsed = ContinuousClock.now - started
        #expect(r.status == .serviceUnavailable)
        #expect(r.body == "upstream_connect_failure\n")
        #expect(elapsed >= .milliseconds(200) && elapsed < .seconds(5), "took \(elapsed)")
    }

    @Test func upstreamClosingWithoutAnswerIs503UpstreamReset() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        defer { Task { await a.stop() } }
        let proxy = try await ProxyHarness.start(forwardingTo: a, group: group)
        defer { Task { await proxy.stop() } }
        let client = try await TestHTTPClient.connect(port: proxy.port, group: group)
        defer { Task { await client.close() } }
        let r = try await client.request(.GET, "/close")
        #expect(r.status == .serviceUnavailable)
        #expect(r.body == "upstream_reset\n")
        // The client's connection survives (the request was complete) and works again.
        #expect(try await client.request(.GET, "/").body == "alpha")
    }

    /// The keep-alive race: the upstream closes a pooled connection as the next request arrives
    /// on it. That request is sent again on a new connection (no retry policy needed) when it is
    /// idempotent, and counted; a POST whose body was all sent is not (the upstream may have
    /// acted on it): 503 upstream_reset.
    @Test func aRequestOnAReusedConnectionThatClosesIsSentAgainOnANewOne() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        defer { Task { await a.stop() } }
        let proxy = try await ProxyHarness.start(forwardingTo: a, group: group)
        defer { Task { await proxy.stop() } }
        let client = try await TestHTTPClient.connect(port: proxy.port, group: group)
        defer { Task { await client.close() } }
        a.closingReusedConnections()
        for i in 0..<3 {
            let r = try await client.request(.GET, "/")
            #expect(r.status == .ok && r.body == "alpha", "request \(i): \(r.status) \(r.body)")
        }
        // Requests 2 and 3 met a reused connection that closed; each went again on a new one.
        let metric = #"trellis_upstream_stale_connection_retries_total{cluster="alpha"}"#
        #expect(try await proxy.metric(metric, group: group) == 2)
        #expect(try await proxy.metric("trellis_errors_total{token=\"upstream_reset\"}", group: group) == 0)
        #expect(a.connections == 3)

        let post = try await client.request(.POST, "/", body: "order=1")
        #expect(post.status == .serviceUnavailable && post.body == "upstream_reset\n")
        #expect(try await proxy.metric(metric, group: group) == 2)
    }

    @Test func anUpstreamThatSaidConnectionCloseIsNotReused() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        defer { Task { await a.stop() } }
        let proxy = try await ProxyHarness.start(forwardingTo: a, group: group)
        defer { Task { await proxy.stop() } }
        let client = try await TestHTTPClient.connect(port: proxy.port, group: group)
        defer { Task { await client.close() } }
        for _ in 0..<3 {
            let r = try await client.request(.GET, "/last")
            #expect(r.status == .ok)
            // The client's own connection stays open: `Connection: close` was the upstream's.
            #expect(r.headers.first(name: "connection") == nil)
            #expect(try await client.request(.GET, "/").body == "alpha")
        }
        #expect(a.connections >= 4)
        #expect(try await proxy.metric("trellis_errors_total{token=\"upstream_reset\"}", group: group) == 0)
    }

    @Test func headResponsesHaveNoBodyAndDoNotDesynchronizeTheConnection() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        defer { Task { await a.stop() } }
        let proxy = try await ProxyHarness.start(forwardingTo: a, group: group)
        defer { Task { await proxy.stop() } }
        let raw = try await RawClient.connect(port: proxy.port, group: group)
        defer { Task { await raw.close() } }
        try await raw.send("HEAD / HTTP/1.1\r\nhost: a\r\n\r\nGET /status/202 HTTP/1.1\r\nhost: a\r\n\r\n")
        // "alpha" three times: the x-upstream header of each response, then the GET's body (the
        // first response alone already carries it once).
        let text = try await raw.readUntil("alpha", count: 3)
        let responses = text.components(separatedBy: "HTTP/1.1 ").dropFirst()
        #expect(responses.count == 2, "\(text)")
        #expect(responses.first?.hasPrefix("200 OK") == true)
        #expect(responses.first?.lowercased().contains("content-length: 5") == true)
        #expect(responses.first?.hasSuffix("\r\n\r\n") == true, "HEAD response carried a body: \(text)")
        #expect(responses.last?.hasPrefix("202 Accepted") == true)
        #expect(responses.last?.hasSuffix("alpha") == true)
    }

    @Test func http10ClientsGetHTTP10AndAClose() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        defer { Task { await a.stop() } }
        let proxy = try await ProxyHarness.start(forwardingTo: a, group: group)
        defer { Task { await proxy.stop() } }
        let raw = try await RawClient.connect(port: proxy.port, group: group)
        defer { Task { await raw.close() } }
        try await raw.send("GET / HTTP/1.0\r\n\r\n")
        let (text, closed) = try await raw.readUntilClose()
        #expect(text.hasPrefix("HTTP/1.0 200 OK\r\n"), "\(text)")
        #expect(text.lowercased().contains("connection: close"))
        #expect(text.hasSuffix("alpha"))
        #expect(closed)
        // Upstream side the request went out as HTTP/1.1, keep-alive.
        #expect(a.requests.last?.version == .http1_1)
    }

    @Test func upstreamStatusCodesPassThroughAndAreCountedByClass() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        defer { Task { await a.stop() } }
        let proxy = try await ProxyHarness.start(forwardingTo: a, group: group)
        defer { Task { await proxy.stop() } }
        let client = try await TestHTTPClient.connect(port: proxy.port, group: group)
        defer { Task { await client.close() } }
        #expect(try await client.request(.GET, "/status/503").status == .serviceUnavailable)
        #expect(try await client.request(.GET, "/status/404").status == .notFound)
        #expect(try await client.request(.GET, "/status/204").status == .noContent)
        #expect(
            try await proxy.metric("trellis_upstream_requests_total{cluster=\"alpha\",class=\"5xx\"}", group: group)
                == 1
        )
        #expect(
            try await proxy.metric("trellis_upstream_requests_total{cluster=\"alpha\",class=\"4xx\"}", group: group)
                == 1
        )
        #expect(
            try await proxy.metric("trellis_upstream_requests_total{cluster=\"alpha\",class=\"2xx\"}", group: group)
                == 1
        )
        // Upstream 5xx are the upstream's answers, not proxy errors.
        #expect(try await proxy.metric("trellis_errors_total{token=\"upstream_reset\"}", group: group) == 0)
    }

    @Test func keepAliveConnectionsToTheUpstreamAreReused() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        defer { Task { await a.stop() } }
        let proxy = try await ProxyHarness.start(forwardingTo: a, group: group)
        defer { Task { await proxy.stop() } }
        for _ in 0..<5 {
            // A fresh downstream connection each time: the upstream side still reuses its pool.
            #expect(try await TestHTTPClient.get(port: proxy.port, "/", group: group).status == .ok)
        }
        #expect(a.connections <= 2, "upstream saw \(a.connections) connections for 5 sequential requests")
    }
}

/// A loopback TCP port bound and not listening: connecting to it is refused, while it is held.
struct RefusingPort {
    let fd: Int32
    let port: Int

    init() throws {
        let socketFD = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard socketFD >= 0 else { throw POSIXError(.EMFILE) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(socketFD, $0, length) }
        }
        guard bound == 0 else {
            Glibc.close(socketFD)
            throw POSIXError(.EADDRINUSE)
        }
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(socketFD, $0, &length) }
        }
        fd = socketFD
        port = Int(UInt16(bigEndian: address.sin_port))
    }

    func close() { Glibc.close(fd) }
}
