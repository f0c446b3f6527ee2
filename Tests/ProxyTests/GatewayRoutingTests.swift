import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import Testing
import TrellisPolicy

@testable import Proxy

/// The gateway in front of two real upstream servers: routing by host, path, method and headers.
@Suite struct GatewayRoutingTests {
    let group = MultiThreadedEventLoopGroup.singleton

    @Test func routesByHostPathAndHeaderToTwoUpstreams() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        let b = try await TestUpstream.start(name: "beta", group: group)
        defer {
            Task {
                await a.stop(); await b.stop()
            }
        }
        let config = gatewayConfig(
            virtualHosts: [
                VirtualHost(
                    name: "api",
                    domains: ["api.example.com"],
                    routes: [
                        Route(
                            name: "beta-header",
                            match: RouteMatch(
                                path: .prefix("/"),
                                headers: [.init(name: "x-canary", kind: .exact("1"))]
                            ),
                            action: .init(clusters: [.init(name: "beta")])
                        ),
                        Route(
                            name: "beta-regex",
                            match: RouteMatch(path: .regex("/v[0-9]+/users/[0-9]+")),
                            action: .init(clusters: [.init(name: "beta")])
                        ),
                        Route(
                            name: "beta-exact-post",
                            match: RouteMatch(path: .exact("/submit"), methods: ["POST"]),
                            action: .init(clusters: [.init(name: "beta")])
                        ),
                        Route(
                            name: "alpha-rest",
                            match: RouteMatch(path: .prefix("/")),
                            action: .init(clusters: [.init(name: "alpha")])
                        ),
                    ]
                ),
                VirtualHost(
                    name: "wild",
                    domains: ["*.beta.test"],
                    routes: [Route(name: "b", match: RouteMatch(), action: .init(clusters: [.init(name: "beta")]))]
                ),
                VirtualHost(
                    name: "only-present",
                    domains: ["present.test"],
                    routes: [
                        Route(
                            name: "needs-auth",
                            match: RouteMatch(headers: [.init(name: "authorization", kind: .present)]),
                            action: .init(clusters: [.init(name: "alpha")])
                        )
                    ]
                ),
            ],
            clusters: [
                ClusterConfig(name: "alpha", endpoints: [endpoint(a)]),
                ClusterConfig(name: "beta", endpoints: [endpoint(b)]),
            ]
        )
        let proxy = try await ProxyHarness.start(config, group: group)
        defer { Task { await proxy.stop() } }
        let client = try await TestHTTPClient.connect(port: proxy.port, group: group)
        defer { Task { await client.close() } }

        func upstream(
            _ path: String,
            method: HTTPMethod = .GET,
            host: String,
            headers: [(String, String)] = []
        )
            async throws -> String
        {
            let r = try await client.request(
                method,
                path,
                host: host,
                headers: headers,
                body: method == .POST ? "x" : nil
            )
            return r.status == .ok ? r.body : "\(r.status.code) \(r.headers.first(name: "x-trellis-error") ?? "")"
        }

        #expect(try await upstream("/anything", host: "api.example.com") == "alpha")
        #expect(try await upstream("/anything", host: "API.example.com:8080") == "alpha")
        #expect(try await upstream("/anything", host: "api.example.com", headers: [("x-canary", "1")]) == "beta")
        #expect(try await upstream("/anything", host: "api.example.com", headers: [("x-canary", "2")]) == "alpha")
        #expect(try await upstream("/v2/users/42", host: "api.example.com") == "beta")
        #expect(try await upstream("/v2/users/42/extra", host: "api.example.com") == "alpha")
        #expect(try await upstream("/submit", method: .POST, host: "api.example.com") == "beta")
        #expect(try await upstream("/submit", host: "api.example.com") == "alpha")
        #expect(try await upstream("/submit?x=1", method: .POST, host: "api.example.com") == "beta")
        #expect(try await upstream("/", host: "x.beta.test") == "beta")
        #expect(try await upstream("/", host: "beta.test") == "404 no_route")
        #expect(try await upstream("/", host: "present.test", headers: [("authorization", "Bearer t")]) == "alpha")
        #expect(try await upstream("/", host: "present.test") == "404 no_route")
        #expect(try await upstream("/", host: "unknown.example.org") == "404 no_route")
        #expect(try await proxy.metric("trellis_errors_total{token=\"no_route\"}", group: group) == 3)
        #expect(
            try await proxy.metric("trellis_upstream_requests_total{cluster=\"beta\",class=\"2xx\"}", group: group) == 5
        )
    }

    @Test func weightedClustersSplitTraffic() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        let b = try await TestUpstream.start(name: "beta", group: group)
        defer {
            Task {
                await a.stop(); await b.stop()
            }
        }
        let config = gatewayConfig(
            virtualHosts: [
                VirtualHost(
                    name: "all",
                    domains: ["*"],
                    routes: [
                        Route(
                            name: "split",
                            match: RouteMatch(),
                            action: .init(clusters: [.init(name: "alpha", weight: 80), .init(name: "beta", weight: 20)])
                        )
                    ]
                )
            ],
            clusters: [
                ClusterConfig(name: "alpha", endpoints: [endpoint(a)]),
                ClusterConfig(name: "beta", endpoints: [endpoint(b)]),
            ]
        )
        let proxy = try await ProxyHarness.start(config, group: group)
        defer { Task { await proxy.stop() } }
        let client = try await TestHTTPClient.connect(port: proxy.port, group: group)
        defer { Task { await client.close() } }
        var counts: [String: Int] = [:]
        for _ in 0..<400 { counts[try await client.request(.GET, "/").body, default: 0] += 1 }
        // 80/20 of 400: expect 320 ± a generous binomial margin (σ = 8).
        #expect((280...360).contains(counts["alpha", default: 0]), "counts: \(counts)")
        #expect(counts["alpha", default: 0] + counts["beta", default: 0] == 400)
    }

    @Test func forwardsHeadersAsAProxyShould() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        defer { Task { await a.stop() } }
        let proxy = try await ProxyHarness.start(forwardingTo: a, group: group)
        defer { Task { await proxy.stop() } }
        let response = try await TestHTTPClient.get(
            port: proxy.port,
            "/h",
            host: "shop.example.com",
            headers: [
                ("connection", "keep-alive, x-private"), ("x-private", "secret"), ("keep-alive", "timeout=5"),
                ("x-forwarded-for", "203.0.113.9"), ("te", "trailers, deflate"), ("x-app", "kept"),
            ],
            group: group
        )
        #expect(response.status == .ok)
        // Response: hop-by-hop headers of the upstream removed, Via added, end-to-end kept.
        #expect(response.headers.first(name: "keep-alive") == nil)
        #expect(response.headers.first(name: "via") == "1.1 trellis")
        #expect(response.headers.first(name: "x-upstream") == "alpha")
        let seen = try #require(a.requests.last)
        #expect(seen.headers.first(name: "host") == "shop.example.com")
        #expect(seen.headers.first(name: "x-private") == nil)
        #expect(seen.headers.first(name: "keep-alive") == nil)
        // `te` is hop-by-hop, but `trailers` in it is passed on (gRPC needs it).
        #expect(seen.headers.first(name: "te") == "trailers")
        #expect(seen.headers.first(name: "x-app") == "kept")
        #expect(seen.headers.first(name: "x-forwarded-for") == "203.0.113.9, 127.0.0.1")
        #expect(seen.headers.first(name: "x-forwarded-proto") == "http")
        #expect(seen.headers.first(name: "via") == "1.1 trellis")
        #expect(seen.version == .http1_1)
    }

    @Test func pipelinedRequestsAreAnsweredInOrder() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        defer { Task { await a.stop() } }
        let proxy = try await ProxyHarness.start(forwardingTo: a, group: group)
        defer { Task { await proxy.stop() } }
        let raw = try await RawClient.connect(port: proxy.port, group: group)
        defer { Task { await raw.close() } }
        // The first request is slow and the second fast: responses must still come back in order.
        try await raw.send(
            "GET /delay/150 HTTP/1.1\r\nhost: a\r\n\r\nGET /status/201 HTTP/1.1\r\nhost: a\r\n\r\nGET /status/202 HTTP/1.1\r\nhost: a\r\n\r\n"
        )
        let text = try await raw.readUntil("HTTP/1.1 ", count: 3)
        // Bodies have no trailing newline, so a status line may follow a body directly.
        let statuses = text.components(separatedBy: "HTTP/1.1 ").dropFirst().map {
            "HTTP/1.1 " + ($0.components(separatedBy: "\r\n").first ?? "")
        }
        #expect(statuses == ["HTTP/1.1 200 OK", "HTTP/1.1 201 Created", "HTTP/1.1 202 Accepted"])
    }

    @Test func newSnapshotAppliesWithoutDroppingOpenConnections() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        let b = try await TestUpstream.start(name: "beta", group: group)
        defer {
            Task {
                await a.stop(); await b.stop()
            }
        }
        let clusters = [
            ClusterConfig(name: "alpha", endpoints: [endpoint(a)]),
            ClusterConfig(name: "beta", endpoints: [endpoint(b)]),
        ]
        let proxy = try await ProxyHarness.start(
            gatewayConfig(virtualHosts: catchAll("alpha"), clusters: clusters),
            group: group
        )
        defer { Task { await proxy.stop() } }
        let client = try await TestHTTPClient.connect(port: proxy.port, group: group)
        defer { Task { await client.close() } }
        #expect(try await client.request(.GET, "/").body == "alpha")
        let bound = proxy.server.boundAddresses
        try await proxy.apply(gatewayConfig(virtualHosts: catchAll("beta"), clusters: clusters))
        // Same keep-alive connection, next request: new routes.
        #expect(try await client.request(.GET, "/").body == "beta")
        #expect(client.isActive)
        // Routes changed, sockets did not: the listener was not bound again (with port 0 a new
        // bind would have another port, and connections arriving meanwhile would be refused).
        #expect(proxy.server.boundAddresses == bound)
        let fresh = try await TestHTTPClient.connect(port: proxy.port, group: group)
        #expect(try await fresh.request(.GET, "/").body == "beta")
        await fresh.close()
        // An invalid snapshot is refused whole and the running one stays.
        await #expect(throws: ProxyConfigErrors.self) {
            try await proxy.apply(gatewayConfig(virtualHosts: catchAll("missing"), clusters: clusters))
        }
        #expect(try await client.request(.GET, "/").body == "beta")
    }

    @Test func adminEndpointReportsReadinessAndConfig() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        defer { Task { await a.stop() } }
        let proxy = try await ProxyHarness.start(forwardingTo: a, group: group)
        defer { Task { await proxy.stop() } }
        let ready = try await TestHTTPClient.get(port: proxy.adminPort, "/ready", group: group)
        #expect(ready.status == .ok)
        let dump = try await TestHTTPClient.get(port: proxy.adminPort, "/config_dump", group: group)
        #expect(dump.status == .ok)
        #expect(dump.headers.first(name: "content-type") == "application/json")
        #expect(dump.body.contains("\"alpha\""))
        // Durations as the YAML writes them, not Swift's [seconds, attoseconds] pair.
        #expect(dump.body.contains("\"connect_timeout\" : \"1s\""))
        #expect(dump.body.contains("\"timeout\" : \"5s\""))
        _ = try await TestHTTPClient.get(port: proxy.port, "/", group: group)
        #expect(
            try await proxy.metric("trellis_upstream_requests_total{cluster=\"alpha\",class=\"2xx\"}", group: group)
                == 1
        )
        #expect(try await proxy.metric("trellis_downstream_connections_total", group: group) >= 1)
        let metrics = try await TestHTTPClient.get(port: proxy.adminPort, "/stats/prometheus", group: group)
        #expect(metrics.body.contains("trellis_upstream_request_duration_seconds_bucket{cluster=\"alpha\""))
        #expect(metrics.body.contains("trellis_downstream_connections_active"))
    }
}
