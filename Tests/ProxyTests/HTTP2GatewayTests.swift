import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import Testing
import TrellisPolicy
import TrellisTestSupport

@testable import Proxy

/// h2c with prior knowledge on a gateway listener, driven by curl (libnghttp2 underneath): each
/// stream is routed by `:authority` and path, balanced, and answered by HTTP/1 upstreams through
/// the same middleware as HTTP/1 requests.
@Suite struct HTTP2GatewayTests {
    let group = MultiThreadedEventLoopGroup.singleton

    static let curlMissing = Peers.which("curl") == nil || Peers.which("nghttp") == nil

    /// `curl --http2-prior-knowledge` with `arguments`; stdout (bodies, then `-w` lines).
    private func curl(_ arguments: [String]) async -> (status: Int32, stdout: String, stderr: String) {
        await Peers.command(["curl", "-s", "--http2-prior-knowledge", "--max-time", "10"] + arguments)
    }

    private func config(_ a: TestUpstream, _ b: TestUpstream) -> ProxyConfig {
        gatewayConfig(
            virtualHosts: [
                VirtualHost(
                    name: "beta",
                    domains: ["beta.example"],
                    routes: [Route(name: "b", match: RouteMatch(), action: .init(clusters: [.init(name: "beta")]))]
                ),
                VirtualHost(
                    name: "rest",
                    domains: ["*"],
                    routes: [
                        Route(
                            name: "retried",
                            match: RouteMatch(path: .prefix("/retried")),
                            action: .init(
                                clusters: [.init(name: "alpha")],
                                retryPolicy: RetryPolicy(retryOn: [.serverError], numRetries: 2)
                            )
                        ),
                        Route(
                            name: "a",
                            match: RouteMatch(path: .prefix("/")),
                            action: .init(clusters: [.init(name: "alpha")])
                        ),
                    ]
                ),
            ],
            clusters: [
                ClusterConfig(name: "alpha", endpoints: [endpoint(a)]),
                ClusterConfig(name: "beta", endpoints: [endpoint(b)]),
            ]
        )
    }

    @Test(.enabled(if: !curlMissing, "needs curl and nghttp (nghttp2-client): run scripts/bootstrap.sh"))
    func streamsAreRoutedByAuthorityAndPath() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        let b = try await TestUpstream.start(name: "beta", group: group)
        let proxy = try await ProxyHarness.start(config(a, b), group: group)
        defer {
            Task {
                await proxy.stop(); await a.stop(); await b.stop()
            }
        }
        let base = "http://127.0.0.1:\(proxy.port)"
        // Three streams on one connection (nghttp multiplexes; curl 7.88's -Z fails to, against
        // any server).
        let out = await Peers.command(["nghttp", "-s", "\(base)/one", "\(base)/two", "\(base)/three"])
        #expect(out.status == 0, "\(out)")
        #expect(out.stdout.components(separatedBy: "alpha").count - 1 == 3, "\(out.stdout)")
        let codes = out.stdout.split(separator: "\n").filter { $0.contains(" 200 ") && $0.contains(" /") }
        #expect(codes.count == 3, "\(out.stdout)")
        // Another host: another virtual host, another cluster.
        let beta = await curl(["-w", " %{http_version} %{http_code}", "-H", "host: beta.example", "\(base)/x"])
        #expect(beta.stdout == "beta 2 200", "\(beta)")
        #expect(try await proxy.metric("trellis_sniffed_connections_total{protocol=\"http2\"}", group: group) == 2)
        #expect(
            try await proxy.metric("trellis_upstream_requests_total{cluster=\"alpha\",class=\"2xx\"}", group: group)
                == 3
        )
        #expect(a.requestCount == 3)
        #expect(a.requests.allSatisfy { $0.version == .http1_1 && $0.headers["host"] == ["127.0.0.1:\(proxy.port)"] })
    }

    @Test(.enabled(if: !curlMissing, "needs curl and nghttp (nghttp2-client): run scripts/bootstrap.sh"))
    func aRequestBodyAndALargeResponseCrossUnderFlowControl() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        let b = try await TestUpstream.start(name: "beta", group: group)
        let proxy = try await ProxyHarness.start(config(a, b), group: group)
        defer {
            Task {
                await proxy.stop(); await a.stop(); await b.stop()
            }
        }
        let base = "http://127.0.0.1:\(proxy.port)"
        // 1 MiB up (no content-length: chunked to the HTTP/1 upstream), counted by the upstream.
        let body = FileManager.default.temporaryDirectory.appendingPathComponent("trellis-h2-body-\(getpid())")
        try Data(repeating: 0x61, count: 1 << 20).write(to: body)
        defer { try? FileManager.default.removeItem(at: body) }
        let up = await curl([
            "-X", "POST", "-H", "transfer-encoding:", "--data-binary", "@\(body.path)", "\(base)/count",
        ])
        #expect(up.stdout == "\(1 << 20)", "\(up)")
        // 8 MiB down: larger than every window, so it crosses only as the client reads.
        let down = await curl(["-o", "/dev/null", "-w", "%{http_code} %{size_download}", "\(base)/bytes/\(8 << 20)"])
        #expect(down.stdout == "200 \(8 << 20)", "\(down)")
    }

    @Test(.enabled(if: !curlMissing, "needs curl and nghttp (nghttp2-client): run scripts/bootstrap.sh"))
    func proxyErrorsAndRetriesApplyToStreams() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        let b = try await TestUpstream.start(name: "beta", group: group)
        let proxy = try await ProxyHarness.start(config(a, b), group: group)
        defer {
            Task {
                await proxy.stop(); await a.stop(); await b.stop()
            }
        }
        let base = "http://127.0.0.1:\(proxy.port)"
        // The route's retry policy retries a 503 from the upstream, for an HTTP/2 caller too.
        a.failing(with: 503, whenCountIn: [0])
        let retried = await curl(["-w", " %{http_code}", "\(base)/retried"])
        #expect(retried.stdout == "alpha 200", "\(retried)")
        #expect(try await proxy.metric("trellis_upstream_retries_total{cluster=\"alpha\"}", group: group) >= 1)
        a.failing(with: nil)

        // A dead upstream: the proxy's own error, token in the header and the body.
        await b.stop()
        let dead = await curl(["-D", "-", "-H", "host: beta.example", "\(base)/x"])
        #expect(dead.stdout.hasPrefix("HTTP/2 503"), "\(dead)")
        #expect(dead.stdout.contains("x-trellis-error: upstream_connect_failure"), "\(dead)")
    }
}
