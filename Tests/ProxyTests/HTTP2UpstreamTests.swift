import Foundation
import NIOCore
import NIOPosix
import Testing
import TrellisPolicy
import TrellisTestSupport

@testable import Proxy

/// Clusters spoken to in HTTP/2 (`protocol: http2`): real grpcio servers behind the gateway, called
/// by a real grpcio client (h2 → h2, streams multiplexed and balanced), and a real Envoy answering
/// h2c, reached by HTTP/1.1 and HTTP/2 clients alike (h1 → h2, h2 → h2).
@Suite(.serialized) struct HTTP2UpstreamTests {
    let group = MultiThreadedEventLoopGroup.singleton

    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures")
    static let echo = fixtures.appendingPathComponent("grpc/echo.py").path

    private func grpcServer(_ name: String) async throws -> (Peers.Child, Int) {
        let port = Peers.freePort()
        let child = try Peers.Child(["python3", Self.echo, "server", "\(port)", name])
        let up = await Peers.eventually(within: .seconds(15)) { !Peers.portsFree([port]) }
        #expect(up, "the grpcio server \(name) did not start")
        return (child, port)
    }

    private func h2Cluster(_ ports: [Int]) -> ProxyConfig {
        gatewayConfig(
            virtualHosts: catchAll("grpc", timeout: .seconds(10)),
            clusters: [
                ClusterConfig(
                    name: "grpc",
                    endpoints: ports.map { Endpoint(address: SocketEndpoint(host: "127.0.0.1", port: $0)) },
                    upstreamProtocol: .http2
                )
            ]
        )
    }

    @Test(.enabled(if: !Peers.grpcioMissing, "needs PyPI grpcio: run scripts/bootstrap.sh"))
    func grpcCallsCrossTheGatewayBalancedWithTrailersAndDeadlines() async throws {
        let (one, onePort) = try await grpcServer("one")
        let (two, twoPort) = try await grpcServer("two")
        defer {
            one.stop()
            two.stop()
        }
        let proxy = try await ProxyHarness.start(h2Cluster([onePort, twoPort]), group: group)
        defer { Task { await proxy.stop() } }
        let out = await Peers.command(["python3", Self.echo, "client", "127.0.0.1:\(proxy.port)", "20"])
        let result = try JSONSerialization.jsonObject(with: Data(out.stdout.utf8)) as? [String: Any] ?? [:]
        // Round robin over the two servers, every answer the echo of its own request.
        #expect(result["unary"] as? [String: Int] == ["one": 10, "two": 10], "\(out)")
        #expect(result["wrong"] == nil, "\(out)")
        #expect(result["large"] as? Int == (1 << 20) + 4, "1 MiB each way: \(out)")
        #expect((result["stream"] as? [String])?.count == 5, "\(out)")
        // The server's status and message arrive (trailers-only response kept whole).
        #expect(result["fail"] as? [String] == ["UNAVAILABLE", "down for maintenance"], "\(out)")
        #expect(result["slow"] as? String == "DEADLINE_EXCEEDED", "\(out)")
        // All on few connections: one per loop and endpoint at most.
        #expect(
            try await proxy.metric("trellis_upstream_requests_total{cluster=\"grpc\",class=\"2xx\"}", group: group)
                >= 23
        )
    }

    @Test(.enabled(if: !Peers.envoyMissing && !HTTP2GatewayTests.curlMissing, "needs envoy and curl"))
    func anEnvoyUpstreamSpeakingH2AnswersHTTP1AndHTTP2Clients() async throws {
        let dir = try Peers.temporaryDirectory("h2-envoy")
        defer { try? FileManager.default.removeItem(at: dir) }
        let port = Peers.freePort()
        let admin = Peers.freePort()
        let file = dir.appendingPathComponent("envoy.yaml")
        try """
        admin: {address: {socket_address: {address: 127.0.0.1, port_value: \(admin)}}}
        static_resources:
          listeners:
          - name: h2
            address: {socket_address: {address: 127.0.0.1, port_value: \(port)}}
            filter_chains:
            - filters:
              - name: envoy.filters.network.http_connection_manager
                typed_config:
                  "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                  stat_prefix: h2
                  codec_type: HTTP2
                  route_config:
                    virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes: [{match: {prefix: "/"}, direct_response: {status: 200, body: {inline_string: "from-envoy"}}}]
                  http_filters: [{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]
        """.write(to: file, atomically: true, encoding: .utf8)
        let envoy = try Peers.Child(
            [
                "envoy", "-c", file.path, "--disable-hot-restart", "-l", "error", "--base-id",
                "\(Int.random(in: 1000...60000))",
            ],
            output: dir.appendingPathComponent("envoy.log")
        )
        defer { envoy.stop() }
        #expect(await Peers.eventually(within: .seconds(20)) { !Peers.portsFree([port]) }, "envoy did not start")
        let proxy = try await ProxyHarness.start(h2Cluster([port]), group: group)
        defer { Task { await proxy.stop() } }
        let base = "http://127.0.0.1:\(proxy.port)"
        let h1 = await Peers.command([
            "curl", "-s", "--max-time", "10", "-w", " %{http_version} %{http_code}", "\(base)/a",
        ])
        #expect(h1.stdout == "from-envoy 1.1 200", "\(h1)")
        let h2 = await Peers.command([
            "curl", "-s", "--http2-prior-knowledge", "--max-time", "10", "-w", " %{http_version} %{http_code}",
            "\(base)/b",
        ])
        #expect(h2.stdout == "from-envoy 2 200", "\(h2)")
        // The stats of the Envoy upstream: the requests arrived over HTTP/2.
        let stats = await Peers.command([
            "curl", "-s", "http://127.0.0.1:\(admin)/stats?filter=downstream_cx_http2_total",
        ])
        #expect(stats.stdout.contains("http.h2.downstream_cx_http2_total: "), "\(stats)")
        #expect(!stats.stdout.contains("http.h2.downstream_cx_http2_total: 0"), "\(stats)")
    }

    /// For gRPC callers the proxy's own errors are gRPC statuses with the token as the message;
    /// `grpc-timeout` is the request's deadline; a route's `retry_on: [unavailable]` retries a
    /// trailers-only UNAVAILABLE; calls are counted by gRPC status.
    @Test(.enabled(if: !Peers.grpcioMissing, "needs PyPI grpcio: run scripts/bootstrap.sh"))
    func proxyErrorsAreGRPCStatusesAndGRPCRetriesAndDeadlinesApply() async throws {
        let (server, port) = try await grpcServer("one")
        defer { server.stop() }
        func route(
            _ name: String,
            _ prefix: String,
            cluster: String,
            retry: RetryPolicy? = nil,
            limit: RateLimit? = nil
        )
            -> Route
        {
            Route(
                name: name,
                match: RouteMatch(path: .prefix(prefix)),
                action: .init(
                    clusters: [.init(name: cluster)],
                    timeout: .seconds(10),
                    rateLimit: limit,
                    retryPolicy: retry
                )
            )
        }
        let config = gatewayConfig(
            virtualHosts: [
                VirtualHost(
                    name: "echo",
                    domains: ["echo"],
                    routes: [
                        route(
                            "flaky",
                            "/trellis.Echo/Flaky",
                            cluster: "grpc",
                            retry: RetryPolicy(retryOn: [.unavailable])
                        ),
                        route(
                            "limited",
                            "/trellis.Echo/Unary",
                            cluster: "grpc",
                            limit: RateLimit(requestsPerSecond: 0.1, burst: 1)
                        ),
                        route("rest", "/", cluster: "grpc"),
                    ]
                ),
                VirtualHost(
                    name: "empty",
                    domains: ["empty"],
                    routes: [route("none", "/", cluster: "empty")]
                ),
            ],
            clusters: [
                ClusterConfig(
                    name: "grpc",
                    endpoints: [Endpoint(address: SocketEndpoint(host: "127.0.0.1", port: port))],
                    upstreamProtocol: .http2
                ),
                ClusterConfig(name: "empty", endpoints: [], upstreamProtocol: .http2),
            ]
        )
        let proxy = try await ProxyHarness.start(config, group: group)
        defer { Task { await proxy.stop() } }
        let target = "127.0.0.1:\(proxy.port)"
        func calls(_ method: String, _ count: Int, authority: String, timeout: Double = 5) async -> [[String]] {
            let out = await Peers.command([
                "python3", Self.echo, "call", target, method, "\(count)", authority, "\(timeout)",
            ])
            return (try? JSONSerialization.jsonObject(with: Data(out.stdout.utf8)) as? [[String]]) ?? [
                ["no output", out.stderr]
            ]
        }
        // Every other call of Flaky fails with UNAVAILABLE: the route retries it, the caller sees OK.
        #expect(await calls("Flaky", 4, authority: "echo") == Array(repeating: ["OK", "one:flaky"], count: 4))
        #expect(try await proxy.metric("trellis_upstream_retries_total{cluster=\"grpc\"}", group: group) == 4)
        // The proxy's own errors, as gRPC statuses carrying the token.
        #expect(
            await calls("Unary", 2, authority: "echo") == [["OK", "one:c"], ["RESOURCE_EXHAUSTED", "rate_limited"]]
        )
        #expect(await calls("Unary", 1, authority: "empty") == [["UNAVAILABLE", "no_healthy_upstream"]])
        #expect(await calls("Unary", 1, authority: "nowhere") == [["UNIMPLEMENTED", "no_route"]])
        // A caller's grpc-timeout of 300 ms under the route's 10 s, from a client that does not
        // enforce it itself (curl): the proxy gives up at 300 ms with DEADLINE_EXCEEDED, while
        // the server would take 2 s.
        let frame = FileManager.default.temporaryDirectory.appendingPathComponent("trellis-grpc-\(getpid())")
        try Data([0, 0, 0, 0, 1, 0x7A]).write(to: frame)
        defer { try? FileManager.default.removeItem(at: frame) }
        let slow = await Peers.command([
            "curl", "-s", "--http2-prior-knowledge", "--max-time", "5", "-D", "-", "-o", "/dev/null",
            "-w", "%{time_total}", "-H", "content-type: application/grpc", "-H", "te: trailers",
            "-H", "grpc-timeout: 300m", "-H", "host: echo", "--data-binary", "@\(frame.path)",
            "http://\(target)/trellis.Echo/Slow",
        ])
        #expect(slow.stdout.contains("grpc-status: 4"), "\(slow)")
        #expect(slow.stdout.contains("grpc-message: timeout"), "\(slow)")
        let seconds = slow.stdout.firstMatch(of: /([0-9]+\.[0-9]+)\s*$/).flatMap { Double($0.1) } ?? 99
        #expect(seconds < 1.5, "answered at the caller's deadline, not the server's 2 s: \(slow)")
        #expect(try await proxy.metric("trellis_errors_total{token=\"timeout\"}", group: group) == 1)
        let series = "trellis_upstream_grpc_responses_total{cluster=\"grpc\",grpc_status="
        #expect(try await proxy.metric(series + "\"OK\"}", group: group) == 5)
        #expect(try await proxy.metric(series + "\"RESOURCE_EXHAUSTED\"}", group: group) == 1)
        #expect(try await proxy.metric(series + "\"DEADLINE_EXCEEDED\"}", group: group) == 1)
    }
}
