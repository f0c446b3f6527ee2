import NIOCore
import NIOHTTP1
import NIOPosix
import Testing

@testable import Proxy

/// What the client sees when the upstream is slow, absent or misbehaves.
@Suite struct UpstreamFailureTests {
    let group = MultiThreadedEventLoopGroup.singleton

    @Test func expiredRouteTimeoutIs504AndTheProxyKeepsServing() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        defer { Task { await a.stop() } }
        let proxy = try await ProxyHarness.start(
            gatewayConfig(
                virtualHosts: catchAll("alpha", timeout: .milliseconds(200)),
                clusters: [ClusterConfig(name: "alpha", endpoints: [endpoint(a)])]
            ),
            group: group
        )
        defer { Task { await proxy.stop() } }
        let started = ContinuousClock.now
        let slow = try await TestHTTPClient.get(port: proxy.port, "/delay/2000", group: group)
        #expect(slow.status == .gatewayTimeout)
        #expect(slow.body == "timeout\n")
        #expect(slow.headers.first(name: "x-trellis-error") == "timeout")
        #expect(ContinuousClock.now - started < .seconds(1.5))
        #expect(try await TestHTTPClient.get(port: proxy.port, "/delay/10", group: group).status == .ok)
        #expect(try await proxy.metric("trellis_errors_total{token=\"timeout\"}", group: group) == 1)
    }

    @Test func refusedConnectionIs503UpstreamConnectFailure() async throws {
        // A port that was just bound and released: nothing listens there.
        let probe = try await TestUpstream.start(name: "gone", group: group)
        let port = probe.port
        await probe.stop()
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

    @Test func upstreamClosingWithoutAnswerIs503UpstreamReset() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        defer { Task { await a.stop() } }
        let proxy = try await ProxyHarness.start(
            gatewayConfig(
                virtualHosts: catchAll("alpha"),
                clusters: [ClusterConfig(name: "alpha", endpoints: [endpoint(a)])]
            ),
            group: group
        )
        defer { Task { await proxy.stop() } }
        let client = try await TestHTTPClient.connect(port: proxy.port, group: group)
        defer { Task { await client.close() } }
        let r = try await client.request(.GET, "/close")
        #expect(r.status == .serviceUnavailable)
        #expect(r.body == "upstream_reset\n")
        // The client's connection survives (the request was complete) and works again.
        #expect(try await client.request(.GET, "/").body == "alpha")
    }

    @Test func upstreamStatusCodesPassThroughAndAreCountedByClass() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        defer { Task { await a.stop() } }
        let proxy = try await ProxyHarness.start(
            gatewayConfig(
                virtualHosts: catchAll("alpha"),
                clusters: [ClusterConfig(name: "alpha", endpoints: [endpoint(a)])]
            ),
            group: group
        )
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
        let proxy = try await ProxyHarness.start(
            gatewayConfig(
                virtualHosts: catchAll("alpha"),
                clusters: [ClusterConfig(name: "alpha", endpoints: [endpoint(a)])]
            ),
            group: group
        )
        defer { Task { await proxy.stop() } }
        for _ in 0..<5 {
            // A fresh downstream connection each time: the upstream side still reuses its pool.
            #expect(try await TestHTTPClient.get(port: proxy.port, "/", group: group).status == .ok)
        }
        #expect(a.connections <= 2, "upstream saw \(a.connections) connections for 5 sequential requests")
    }
}
