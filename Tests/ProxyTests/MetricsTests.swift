import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import Testing
import TrellisPolicy

@testable import Proxy

/// The data path's metrics count exactly what was sent, per destination and per listener, and
/// docs/metrics.md lists every metric the code makes, with the naming conventions.
@Suite struct MetricsTests {
    let group = MultiThreadedEventLoopGroup.singleton

    @Test func countsMatchTheRequestsSentExactly() async throws {
        let alpha = try await TestUpstream.start(name: "alpha", group: group)
        defer { Task { await alpha.stop() } }
        let proxy = try await ProxyHarness.start(
            gatewayConfig(
                virtualHosts: [
                    VirtualHost(
                        name: "only",
                        domains: ["only.test"],
                        routes: [
                            // Only the requests meant to be cut have a short timeout: on a loaded
                            // machine the others may take longer than it.
                            Route(
                                name: "cut",
                                match: RouteMatch(path: .prefix("/delay/")),
                                action: .init(clusters: [.init(name: "alpha")], timeout: .milliseconds(300))
                            ),
                            Route(name: "r", match: RouteMatch(), action: .init(clusters: [.init(name: "alpha")])),
                        ]
                    )
                ],
                clusters: [ClusterConfig(name: "alpha", endpoints: [endpoint(alpha)])]
            ),
            group: group
        )
        defer { Task { await proxy.stop() } }
        let client = try await TestHTTPClient.connect(port: proxy.port, group: group)
        defer { Task { await client.close() } }
        // Each request cut by its route's timeout closes its upstream connection: two connections.
        for _ in 0..<2 { #expect(try await client.request(.GET, "/delay/2000", host: "only.test").status.code == 504) }
        for i in 0..<40 {
            #expect(try await client.request(.POST, "/ok/\(i)", host: "only.test", body: "0123456789").status == .ok)
        }
        for _ in 0..<5 { #expect(try await client.request(.GET, "/status/503", host: "only.test").status.code == 503) }
        for _ in 0..<3 { #expect(try await client.request(.GET, "/", host: "nowhere.test").status == .notFound) }
        func value(_ sample: String) async throws -> Double { try await proxy.metric(sample, group: group) }

        #expect(try await value(#"trellis_upstream_requests_total{cluster="alpha",class="2xx"}"#) == 40)
        // The upstream's five 503s, and the two 504s of requests cut by the route's timeout.
        #expect(try await value(#"trellis_upstream_requests_total{cluster="alpha",class="5xx"}"#) == 7)
        #expect(try await value(#"trellis_upstream_errors_total{cluster="alpha",token="timeout"}"#) == 2)
        #expect(try await value(#"trellis_errors_total{token="no_route"}"#) == 3)
        #expect(try await value(#"trellis_upstream_sent_bytes_total{cluster="alpha"}"#) == 400)
        #expect(try await value(#"trellis_upstream_received_bytes_total{cluster="alpha"}"#) == 40 * 5 + 5 * 5)
        #expect(try await value(#"trellis_downstream_responses_total{listener="test",class="2xx"}"#) == 40)
        #expect(try await value(#"trellis_downstream_responses_total{listener="test",class="4xx"}"#) == 3)
        #expect(try await value(#"trellis_downstream_responses_total{listener="test",class="5xx"}"#) == 7)
        #expect(try await value(#"trellis_downstream_request_duration_seconds_count{listener="test"}"#) == 50)
        #expect(try await value(#"trellis_downstream_received_bytes_total{listener="test"}"#) == 400)
        // Then one keep-alive connection carried the rest.
        let connections = try await value(#"trellis_upstream_connections_total{cluster="alpha"}"#)
        #expect(connections == 3)
        #expect(try await value(#"trellis_upstream_connect_duration_seconds_count{cluster="alpha"}"#) == connections)
        #expect(try await value(#"trellis_upstream_connections_active{cluster="alpha"}"#) == 1)
    }

    /// Every `trellis_` metric the code creates is in docs/metrics.md with the same type, and the
    /// reference names nothing the code does not make; counters end in `_total`, histograms in
    /// `_seconds`, nothing else in `_total`.
    @Test func docsMetricsListsEveryMetricWithItsType() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        var inCode: [String: String] = [:]
        // A metric is made by swift-metrics' types, or per status class by StatusClassCounters.
        let pattern =
            /(Counter|Gauge|Meter|Timer|Recorder|StatusClassCounters)\(\s*(?:label:\s*)?"(trellis_[a-z0-9_]+)"/
        let files = FileManager.default.enumerator(atPath: root.appendingPathComponent("Sources").path)!
        for case let file as String in files where file.hasSuffix(".swift") && !file.contains("Generated") {
            let text = try String(contentsOf: root.appendingPathComponent("Sources/\(file)"), encoding: .utf8)
            for match in text.matches(of: pattern) {
                let type =
                    switch match.output.1 {
                    case "Counter", "StatusClassCounters": "counter"
                    case "Timer", "Recorder": "histogram"
                    default: "gauge"
                    }
                inCode[String(match.output.2)] = type
            }
        }
        let docs = try String(contentsOf: root.appendingPathComponent("docs/metrics.md"), encoding: .utf8)
        var documented: [String: String] = [:]
        for line in docs.split(separator: "\n") where line.hasPrefix("| `trellis_") {
            let cells = line.split(separator: "|").map { $0.trimmingCharacters(in: .whitespaces) }
            documented[cells[0].trimmingCharacters(in: CharacterSet(charactersIn: "`"))] = cells[1]
        }
        #expect(inCode.count > 50, "\(inCode.count) metrics found in Sources")
        for (name, type) in inCode.sorted(by: { $0.key < $1.key }) {
            #expect(
                documented[name] == type,
                "\(name): \(type) in the code, \(documented[name] ?? "missing") in docs/metrics.md"
            )
            switch type {
            case "counter": #expect(name.hasSuffix("_total"), "\(name): a counter ends in _total")
            case "histogram": #expect(name.hasSuffix("_seconds"), "\(name): a duration ends in _seconds")
            default: #expect(!name.hasSuffix("_total"), "\(name): only counters end in _total")
            }
        }
        for name in documented.keys where inCode[name] == nil {
            Issue.record("\(name) is in docs/metrics.md but no longer in the code")
        }
    }

    /// The Grafana dashboard (docs/grafana/trellis-dashboard.json) is valid JSON and every metric
    /// its queries use is a documented one.
    @Test func theDashboardUsesOnlyDocumentedMetrics() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        let docs = try String(contentsOf: root.appendingPathComponent("docs/metrics.md"), encoding: .utf8)
        let data = try Data(contentsOf: root.appendingPathComponent("docs/grafana/trellis-dashboard.json"))
        let dashboard = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        let panels = try #require(dashboard["panels"] as? [[String: Any]])
        var used: Set<String> = []
        for panel in panels {
            for target in panel["targets"] as? [[String: Any]] ?? [] {
                let expr = try #require(target["expr"] as? String)
                for match in expr.matches(of: /trellis_[a-z0-9_]+/) {
                    var name = String(match.output)
                    for suffix in ["_bucket", "_sum", "_count"] where name.hasSuffix(suffix) {
                        name = String(name.dropLast(suffix.count))
                    }
                    used.insert(name)
                }
            }
        }
        #expect(used.count >= 20, "\(used.sorted())")
        for name in used.sorted() { #expect(docs.contains("| `\(name)` |"), "\(name) is not in docs/metrics.md") }
    }
}
