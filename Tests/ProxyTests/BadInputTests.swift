import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import Testing
import TrellisPolicy

@testable import Proxy

/// Malformed and hostile requests: each gets the right status or a clean close, is counted, and
/// the proxy keeps serving everyone else.
@Suite struct BadInputTests {
    let group = MultiThreadedEventLoopGroup.singleton

    private func withProxy(
        limits: ConnectionLimits = .init(),
        _ body: (ProxyHarness, TestUpstream) async throws -> Void
    ) async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        let proxy = try await ProxyHarness.start(
            gatewayConfig(
                virtualHosts: catchAll("alpha"),
                clusters: [ClusterConfig(name: "alpha", endpoints: [endpoint(a)])],
                limits: limits
            ),
            group: group
        )
        do {
            try await body(proxy, a)
            // Whatever happened before, a well-formed request still works.
            #expect(try await TestHTTPClient.get(port: proxy.port, "/", group: group).body == "alpha")
        } catch {
            await proxy.stop()
            await a.stop()
            throw error
        }
        await proxy.stop()
        await a.stop()
    }

    /// Sends `request` raw and returns the status line and whether the server closed.
    private func exchange(
        _ proxy: ProxyHarness,
        _ request: String
    ) async throws -> (statusLine: String, body: String, closed: Bool) {
        let raw = try await RawClient.connect(port: proxy.port, group: group)
        defer { Task { await raw.close() } }
        try await raw.send(request)
        let (text, closed) = try await raw.readUntilClose(timeout: .seconds(5))
        let statusLine = text.components(separatedBy: "\r\n").first ?? ""
        let body = text.components(separatedBy: "\r\n\r\n").dropFirst().joined(separator: "\r\n\r\n")
        return (statusLine, body, closed)
    }

    /// RFC 9112 §3.2.2: an absolute-form target's authority wins over the Host header, for the
    /// route and for what the upstream receives (Host replaced, origin-form target).
    @Test func absoluteFormTargetsAreRoutedByTheirAuthority() async throws {
        let good = try await TestUpstream.start(name: "good", group: group)
        let alt = try await TestUpstream.start(name: "alt", group: group)
        func host(_ name: String, _ cluster: String) -> VirtualHost {
            VirtualHost(
                name: name,
                domains: [name],
                routes: [
                    Route(name: name, match: RouteMatch(), action: RouteAction(clusters: [.init(name: cluster)]))
                ]
            )
        }
        let proxy = try await ProxyHarness.start(
            gatewayConfig(
                virtualHosts: [host("good.example", "good"), host("alt.example", "alt")],
                clusters: [
                    ClusterConfig(name: "good", endpoints: [endpoint(good)]),
                    ClusterConfig(name: "alt", endpoints: [endpoint(alt)]),
                ]
            ),
            group: group
        )
        defer {
            Task {
                await proxy.stop()
                await good.stop()
                await alt.stop()
            }
        }
        let r = try await exchange(
            proxy,
            "GET http://alt.example/x?y=1 HTTP/1.1\r\nHost: good.example\r\nConnection: close\r\n\r\n"
        )
        #expect(r.statusLine == "HTTP/1.1 200 OK" && r.body == "alt", "\(r)")
        #expect(good.requestCount == 0)
        let seen = try #require(alt.requests.first)
        #expect(seen.uri == "/x?y=1")
        #expect(seen.headers["host"] == ["alt.example"])
        let empty = try await exchange(proxy, "GET http:///x HTTP/1.1\r\nHost: good.example\r\n\r\n")
        #expect(empty.statusLine == "HTTP/1.1 400 Bad Request" && empty.closed, "\(empty)")
        #expect(good.requestCount == 0 && alt.requestCount == 1)
    }

    @Test func malformedRequestLineIs400() async throws {
        try await withProxy { proxy, upstream in
            let r = try await exchange(proxy, "GARBAGE\u{1} / NOPE\r\n\r\n")
            #expect(r.statusLine == "HTTP/1.1 400 Bad Request")
            #expect(r.body == "bad_request\n")
            #expect(r.closed)
            #expect(upstream.requestCount == 0)
            #expect(try await proxy.metric("trellis_errors_total{token=\"bad_request\"}", group: group) == 1)
        }
    }

    @Test func oversizedHeadersAre431() async throws {
        try await withProxy(limits: ConnectionLimits(maxRequestHeaderBytes: 4096)) { proxy, upstream in
            let big = String(repeating: "a", count: 8000)
            let r = try await exchange(proxy, "GET / HTTP/1.1\r\nhost: a\r\nx-big: \(big)\r\n\r\n")
            #expect(r.statusLine == "HTTP/1.1 431 Request Header Fields Too Large")
            #expect(r.body == "header_too_large\n")
            #expect(upstream.requestCount == 0)
            #expect(try await proxy.metric("trellis_errors_total{token=\"header_too_large\"}", group: group) == 1)
            // Just under the limit passes.
            let fits = String(repeating: "a", count: 3000)
            let ok = try await exchange(
                proxy,
                "GET / HTTP/1.1\r\nhost: a\r\nx-big: \(fits)\r\nconnection: close\r\n\r\n"
            )
            #expect(ok.statusLine == "HTTP/1.1 200 OK")
        }
    }

    @Test func defaultHeaderLimitIs60KiB() async throws {
        try await withProxy { proxy, _ in
            let big = String(repeating: "b", count: 62 * 1024)
            let r = try await exchange(proxy, "GET / HTTP/1.1\r\nhost: a\r\nx-big: \(big)\r\n\r\n")
            #expect(r.statusLine == "HTTP/1.1 431 Request Header Fields Too Large")
        }
    }

    @Test func badContentLengthIs400() async throws {
        try await withProxy { proxy, upstream in
            let r = try await exchange(proxy, "POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 12abc\r\n\r\nhello")
            #expect(r.statusLine == "HTTP/1.1 400 Bad Request")
            #expect(upstream.requestCount == 0)
        }
    }

    @Test func duplicateConflictingContentLengthIs400() async throws {
        try await withProxy { proxy, upstream in
            let r = try await exchange(
                proxy,
                "POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!"
            )
            #expect(r.statusLine == "HTTP/1.1 400 Bad Request")
            #expect(upstream.requestCount == 0)
        }
    }

    @Test func contentLengthWithTransferEncodingIsRejectedAsSmuggling() async throws {
        try await withProxy { proxy, upstream in
            // The classic CL.TE smuggling attempt: a proxy and a server that disagree on framing.
            let r = try await exchange(
                proxy,
                "POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 6\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: a\r\n\r\n"
            )
            #expect(r.statusLine == "HTTP/1.1 400 Bad Request")
            #expect(r.closed)
            #expect(!upstream.requests.contains { $0.uri == "/smuggled" })
        }
    }

    @Test func invalidChunkSizeIs400() async throws {
        try await withProxy { proxy, upstream in
            let r = try await exchange(
                proxy,
                "POST /count HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
            )
            #expect(r.statusLine == "HTTP/1.1 400 Bad Request")
            #expect(r.closed)
            #expect(try await proxy.metric("trellis_errors_total{token=\"bad_request\"}", group: group) == 1)
            _ = upstream
        }
    }

    @Test func stalledRequestHeadGets408() async throws {
        try await withProxy(limits: ConnectionLimits(requestHeaderTimeout: .milliseconds(300))) { proxy, upstream in
            let started = ContinuousClock.now
            let r = try await exchange(proxy, "GET / HTTP/1.1\r\nhost: a\r\nx-half: ")
            #expect(r.statusLine == "HTTP/1.1 408 Request Timeout")
            #expect(r.body == "request_timeout\n")
            #expect(r.closed)
            #expect(ContinuousClock.now - started < .seconds(5))
            #expect(upstream.requestCount == 0)
            #expect(try await proxy.metric("trellis_errors_total{token=\"request_timeout\"}", group: group) == 1)
        }
    }

    @Test func idleKeepAliveConnectionIsClosedQuietly() async throws {
        // 1 s rather than less: the closing check of `withProxy` opens a fresh connection on this
        // same listener, and on a loaded 2-core machine its request must not lose that race.
        try await withProxy(limits: ConnectionLimits(idleTimeout: .seconds(1))) { proxy, _ in
            let raw = try await RawClient.connect(port: proxy.port, group: group)
            defer { Task { await raw.close() } }
            let (text, closed) = try await raw.readUntilClose(timeout: .seconds(5))
            #expect(closed)
            #expect(text.isEmpty)
        }
    }

    @Test func clientDisconnectingMidBodyAbortsTheUpstreamRequest() async throws {
        try await withProxy { proxy, upstream in
            let raw = try await RawClient.connect(port: proxy.port, group: group)
            try await raw.send("POST /count HTTP/1.1\r\nhost: a\r\ncontent-length: 1000000\r\n\r\n")
            try await raw.send(String(repeating: "x", count: 10_000))
            // Wait until the upstream has the request head, then vanish.
            let deadline = ContinuousClock.now + .seconds(5)
            while upstream.requestCount == 0 && ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(10))
            }
            await raw.close()
            // Its own deadline: the wait above may have used most of the first on a loaded machine.
            let abortDeadline = ContinuousClock.now + .seconds(5)
            while upstream.abortedRequests == 0 && ContinuousClock.now < abortDeadline {
                try await Task.sleep(for: .milliseconds(10))
            }
            #expect(upstream.abortedRequests == 1)
            #expect(try await proxy.metric("trellis_errors_total{token=\"client_disconnect\"}", group: group) == 1)
        }
    }
}
