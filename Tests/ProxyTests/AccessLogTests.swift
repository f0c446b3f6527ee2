import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus
import Testing
import TrellisPolicy
import TrellisTestSupport

@testable import Proxy

/// The access log as an operator reads it: a file of JSON lines, one per request or TCP
/// connection, with the fields docs/observability.md lists, the same error token as the response
/// and the metric, request ids sent upstream, sampling, and a file that can be rotated.
@Suite struct AccessLogTests {
    let group = MultiThreadedEventLoopGroup.singleton

    /// A gateway to upstream `alpha` that logs every request to a fresh file, and a client on it.
    final class LoggedProxy: Sendable {
        let upstream: TestUpstream
        let log: AccessLogFile
        let proxy: ProxyHarness
        let client: TestHTTPClient

        init(sampleRate: Double, group: any EventLoopGroup) async throws {
            upstream = try await TestUpstream.start(name: "alpha", group: group)
            log = try AccessLogFile(sampleRate: sampleRate)
            proxy = try await ProxyHarness.start(
                gatewayConfig(
                    virtualHosts: catchAll("alpha"),
                    clusters: [ClusterConfig(name: "alpha", endpoints: [endpoint(upstream)])],
                    accessLog: true
                ),
                group: group,
                accessLog: log
            )
            client = try await TestHTTPClient.connect(port: proxy.port, group: group)
        }

        func stop() async {
            await client.close()
            await proxy.stop()
            await upstream.stop()
            await log.remove()
        }
    }

    /// The field names of docs/observability.md's table, in its order.
    static func documentedFields() throws -> [String] {
        let docs = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent(
            "../../docs/observability.md"
        )
        let text = try String(contentsOf: docs, encoding: .utf8)
        let table = text.components(separatedBy: "### Fields")[1].components(separatedBy: "\n\n")[2]
        return table.split(separator: "\n").dropFirst(2).map { row in
            String(row.split(separator: "`")[1])
        }
    }

    /// Each line's keys, in the order written.
    static func keyOrder(_ text: String) -> [[String]] {
        text.split(separator: "\n").map { line in
            line.split(separator: "\"").enumerated().compactMap { i, part in
                // Keys are the quoted strings directly followed by a colon.
                i % 2 == 1 && line.contains("\"\(part)\":") && !part.contains(" ") ? String(part) : nil
            }
        }
    }

    @Test func oneLinePerRequestWithTheDocumentedFieldsAndTheResponsesErrorToken() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        let registry = PrometheusCollectorRegistry()
        let log = try AccessLogFile(factory: PrometheusMetricsFactory(registry: registry))
        let proxy = try await ProxyHarness.start(
            gatewayConfig(
                virtualHosts: [
                    VirtualHost(
                        name: "only",
                        domains: ["only.test"],
                        routes: [
                            // Only the request meant to be cut has a short timeout: on a loaded
                            // machine the others may take longer than it.
                            Route(
                                name: "slow",
                                match: RouteMatch(path: .prefix("/delay/")),
                                action: .init(clusters: [.init(name: "alpha")], timeout: .milliseconds(500))
                            ),
                            Route(name: "fine", match: RouteMatch(), action: .init(clusters: [.init(name: "alpha")])),
                        ]
                    )
                ],
                clusters: [ClusterConfig(name: "alpha", endpoints: [endpoint(a)])],
                accessLog: true
            ),
            group: group,
            accessLog: log,
            registry: registry
        )
        defer {
            Task {
                await proxy.stop(); await a.stop(); await log.remove()
            }
        }
        let client = try await TestHTTPClient.connect(port: proxy.port, group: group)
        defer { Task { await client.close() } }
        let ok = try await client.request(
            .GET,
            "/fine?x=1",
            host: "only.test",
            headers: [("user-agent", "tests/1.0 \"quoted\"")]
        )
        let missing = try await client.request(.GET, "/nowhere", host: "other.test")
        let slow = try await client.request(.GET, "/delay/2000", host: "only.test")
        #expect(ok.status == .ok)
        for (response, token) in [(missing, "no_route"), (slow, "timeout")] {
            #expect(response.body == "\(token)\n")
            #expect(response.headers.first(name: "x-trellis-error") == token)
            #expect(try await proxy.metric("trellis_errors_total{token=\"\(token)\"}", group: group) == 1)
        }
        let lines = try await log.lines(atLeast: 3)
        try #require(lines.count == 3)
        #expect(lines.map { $0["error"] as? String } == [nil, "no_route", "timeout"])
        #expect(lines.map { $0["status"] as? Int } == [200, 404, 504])
        let first = lines[0]
        #expect(first["listener"] as? String == "test")
        #expect(first["protocol"] as? String == "HTTP/1.1")
        #expect(first["method"] as? String == "GET")
        #expect(first["authority"] as? String == "only.test")
        #expect(first["path"] as? String == "/fine?x=1")
        #expect(first["cluster"] as? String == "alpha")
        #expect(first["service"] as? String == "alpha")
        #expect(first["route"] as? String == "fine")
        #expect(first["endpoint"] as? String == "127.0.0.1:\(a.port)")
        #expect(first["retries"] as? Int == 0)
        #expect(first["bytes_out"] as? Int == "alpha".utf8.count)
        #expect(first["user_agent"] as? String == "tests/1.0 \"quoted\"")
        #expect((first["source"] as? String)?.hasPrefix("127.0.0.1:") == true)
        #expect(first["error"] is NSNull)
        // Times: ttfb within the duration, the slow one cut at its route's 500 ms.
        let ttfb = try #require(first["ttfb_ms"] as? Double)
        let duration = try #require(first["duration_ms"] as? Double)
        #expect(ttfb > 0 && ttfb <= duration)
        let cut = try #require(lines[2]["duration_ms"] as? Double)
        #expect(cut >= 500 && cut < 1900)
        // Connect time: the first request opened its upstream connection; the slow one took it
        // idle from the pool, handed over at once (0: no wait, no connect).
        #expect(((first["upstream_connect_ms"] as? NSNumber)?.doubleValue ?? 0) > 0)
        #expect((lines[2]["upstream_connect_ms"] as? NSNumber)?.doubleValue == 0)
        let time = try #require(first["time"] as? String)
        let started = try #require(ISO8601DateFormatter.withMilliseconds.date(from: time))
        #expect(abs(started.timeIntervalSinceNow) < 60)
        // Every line has every documented field, in the documented order.
        let fields = try Self.documentedFields()
        #expect(fields.count == 26)
        for keys in Self.keyOrder(log.text) { #expect(keys == fields) }
        // The request id went upstream and is the one logged.
        let sent = try #require(a.requests.first?.headers.first(name: "x-request-id"))
        #expect(first["request_id"] as? String == sent)
        #expect(try await proxy.metric("trellis_access_log_lines_total", group: group) == 3)
    }

    @Test func aClientsRequestIdIsKeptAndAMissingOneIsMadeAsAUUID() async throws {
        let logged = try await LoggedProxy(sampleRate: 1, group: group)
        defer { Task { await logged.stop() } }
        let (a, log, client) = (logged.upstream, logged.log, logged.client)
        _ = try await client.request(.GET, "/a", headers: [("X-Request-Id", "from-the-client-1")])
        _ = try await client.request(.GET, "/b")
        _ = try await client.request(.GET, "/c")
        let upstream = a.requests.map { $0.headers[canonicalForm: "x-request-id"].map(String.init) }
        #expect(upstream[0] == ["from-the-client-1"])
        let made = try #require(upstream[1].first)
        #expect(upstream[1].count == 1)
        #expect(made.wholeMatch(of: /[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}/) != nil)
        #expect(upstream[2].first != made)
        let lines = try await log.lines(atLeast: 3)
        #expect(lines.map { $0["request_id"] as? String } == ["from-the-client-1", made, upstream[2].first])
    }

    @Test func samplingKeepsItsShareAndEveryFailure() async throws {
        let logged = try await LoggedProxy(sampleRate: 0, group: group)
        defer { Task { await logged.stop() } }
        let (log, client) = (logged.log, logged.client)
        for i in 0..<20 { _ = try await client.request(.GET, "/ok/\(i)") }
        #expect(try await client.request(.GET, "/status/503").status == .serviceUnavailable)
        for i in 0..<5 { _ = try await client.request(.GET, "/ok/again/\(i)") }
        let lines = try await log.lines(atLeast: 1)
        try await Task.sleep(for: .milliseconds(200))
        #expect(try AccessLogFile.read(log.path).count == 1)
        #expect(lines.first?["status"] as? Int == 503)
        #expect(lines.first?["path"] as? String == "/status/503")

        // At a share of 0.3, about 30 % of 400 requests (a binomial: 3.5 sigma is ±32).
        let some = try AccessLogFile(sampleRate: 0.3)
        defer { Task { await some.remove() } }
        var rng = FastRandom(seed: 42)
        let lineLog = LoopAccessLog(sink: some.sink, eventLoop: group.next())
        var kept = 0
        for _ in 0..<400 where lineLog.sampled(failed: false, rng: &rng) { kept += 1 }
        #expect((88...152).contains(kept))
        #expect((0..<50).allSatisfy { _ in lineLog.sampled(failed: true, rng: &rng) })
    }

    @Test func aRotatedFileIsReopenedAndNoLineIsLost() async throws {
        let logged = try await LoggedProxy(sampleRate: 1, group: group)
        defer { Task { await logged.stop() } }
        let (log, client) = (logged.log, logged.client)
        for i in 0..<3 { _ = try await client.request(.GET, "/before/\(i)") }
        #expect(try await log.lines(atLeast: 3).count == 3)
        // What logrotate does: move the file away, then signal (here: the call SIGUSR1 makes).
        let rotated = log.path + ".1"
        try FileManager.default.moveItem(atPath: log.path, toPath: rotated)
        try log.sink.reopen()
        for i in 0..<2 { _ = try await client.request(.GET, "/after/\(i)") }
        let after = try await log.lines(atLeast: 2)
        #expect(after.map { $0["path"] as? String } == ["/after/0", "/after/1"])
        #expect(
            try AccessLogFile.read(rotated).map { $0["path"] as? String } == ["/before/0", "/before/1", "/before/2"]
        )
    }

    @Test func aMissingFolderIsMadeAndAnImpossibleOneIsAClearErrorAtStart() async throws {
        let folder = NSTemporaryDirectory() + "trellis-access-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let log = try AccessLog(
            AccessLogSettings(output: .file(folder + "/log/trellis/access.log")),
            logger: .init(label: "test")
        )
        await log.shutdown()
        #expect(FileManager.default.fileExists(atPath: folder + "/log/trellis/access.log"))
        // A folder inside a file cannot be made.
        let file = folder + "/plain"
        FileManager.default.createFile(atPath: file, contents: Data())
        #expect {
            _ = try AccessLog(AccessLogSettings(output: .file(file + "/access.log")), logger: .init(label: "test"))
        } throws: { error in
            "\(error)" == "access_log.output: cannot open '\(file)/access.log' for appending: Not a directory"
        }
    }

    @Test(.enabled(if: !HTTP2GatewayTests.curlMissing, "needs curl (curl): run scripts/bootstrap.sh"))
    func anHTTP2StreamGetsItsLineLikeAnHTTP1Request() async throws {
        let logged = try await LoggedProxy(sampleRate: 1, group: group)
        defer { Task { await logged.stop() } }
        let out = await Peers.command([
            "curl", "-s", "--http2-prior-knowledge", "--max-time", "10", "-A", "curl-h2",
            "http://127.0.0.1:\(logged.proxy.port)/over/h2?q=1",
        ])
        #expect(out.stdout == "alpha", "\(out)")
        let line = try #require(try await logged.log.lines(atLeast: 1).first)
        #expect(line["protocol"] as? String == "HTTP/2")
        #expect(line["method"] as? String == "GET" && line["path"] as? String == "/over/h2?q=1")
        #expect(line["authority"] as? String == "127.0.0.1:\(logged.proxy.port)")
        #expect(line["status"] as? Int == 200 && line["bytes_out"] as? Int == 5)
        #expect(line["user_agent"] as? String == "curl-h2" && line["cluster"] as? String == "alpha")
    }

    @Test func aRelayedTCPConnectionGetsOneLineWithItsBytes() async throws {
        let http = try await TestUpstream.start(name: "http", group: group)
        let echo = try await TransparentListenerTests.EchoServer(banner: nil, group: group)
        let log = try AccessLogFile()
        var config = gatewayConfig(
            virtualHosts: catchAll("alpha"),
            clusters: [ClusterConfig(name: "alpha", endpoints: [endpoint(http)])],
            accessLog: true
        )
        config.listeners[0].transparent = TransparentMode(sniffTimeout: .seconds(5))
        let destination = echo.channel.localAddress
        let proxy = try await ProxyHarness.start(
            config,
            group: group,
            originalDestination: { _ in destination },
            accessLog: log
        )
        defer {
            Task {
                await proxy.stop(); await echo.close(); await http.stop(); await log.remove()
            }
        }
        let client = try await RawClient.connect(port: proxy.port, group: group)
        try await client.send("\u{16}\u{03}\u{01}hello")
        _ = try await client.readUntil("hello")
        try await client.shutdownOutput()
        _ = try await client.readUntilClose()
        let lines = try await log.lines(atLeast: 1)
        try #require(lines.count == 1)
        let line = lines[0]
        #expect(line["protocol"] as? String == "tcp")
        #expect(line["bytes_in"] as? Int == 8)  // the three TLS-like bytes and "hello"
        #expect(line["bytes_out"] as? Int == 13 + 3)  // "echo:" and the 8 bytes, then "bye"
        #expect(line["original_destination"] as? String == "127.0.0.1:\(echo.port)")
        #expect(line["error"] is NSNull)
        #expect(line["method"] is NSNull)
        #expect(line["upstream_connect_ms"] is Double)
    }
}

extension ISO8601DateFormatter {
    nonisolated(unsafe) static let withMilliseconds: ISO8601DateFormatter = {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return formatter
    }()
}

/// A line as the writer makes it, read back by a JSON parser: every kind of value, and strings
/// that must be escaped.
@Suite struct JSONLineTests {
    @Test func everyValueReadsBackAsWritten() throws {
        var line = JSONLine(buffer: ByteBuffer())
        let awkward = "quote \" backslash \\ newline \n tab \t cr \r bell \u{07} nul \u{00} é 😀"
        line.time("time", timespec(tv_sec: 1_764_594_309, tv_nsec: 123_999_999))
        line.field("text", awkward)
        line.field("empty", "")
        line.field("absent", nil as String?)
        line.field("zero", 0)
        line.field("negative", -42)
        line.field("largest", Int.max)
        line.field("smallest", Int.min)
        line.field("none", nil as Int?)
        line.milliseconds("ms", 1_234_567)
        line.milliseconds("long_ms", 98_765_432_100)
        line.milliseconds("no_ms", nil)
        line.end()
        let bytes = Data(line.buffer.readableBytesView)
        #expect(bytes.last == UInt8(ascii: "\n"), "one line")
        #expect(!bytes.dropLast().contains(UInt8(ascii: "\n")), "newlines inside values are escaped")
        let object = try #require(try JSONSerialization.jsonObject(with: bytes) as? [String: Any])
        #expect(object["time"] as? String == "2025-12-01T13:05:09.123Z")
        #expect(object["text"] as? String == awkward)
        #expect(object["empty"] as? String == "")
        #expect(object["absent"] is NSNull)
        #expect(object["zero"] as? Int == 0)
        #expect(object["negative"] as? Int == -42)
        #expect(object["largest"] as? Int == Int.max)
        #expect((object["smallest"] as? NSNumber)?.int64Value == Int64.min)
        #expect(object["none"] is NSNull)
        #expect((object["ms"] as? NSNumber)?.doubleValue == 1.234)
        #expect((object["long_ms"] as? NSNumber)?.doubleValue == 98765.432)
        #expect(object["no_ms"] is NSNull)
        let text = String(decoding: bytes, as: UTF8.self)
        #expect(text.hasPrefix(#"{"time":"#) && text.contains(#""ms":1.234,"#), "\(text)")
        #expect(text.contains(#"bell \u0007 nul \u0000"#), "\(text)")
    }
}
