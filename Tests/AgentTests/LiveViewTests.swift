import Agent
import Testing

/// `status --watch`'s arithmetic, on Prometheus text as the agent serves it: rates from counter
/// deltas, quantiles from bucket deltas (as `histogram_quantile` computes them), the table.
@Suite struct LiveViewTests {
    static let before = """
        # TYPE trellis_upstream_requests_total counter
        trellis_upstream_requests_total{cluster="outbound|8080||orders",class="2xx"} 100
        trellis_upstream_requests_total{cluster="outbound|8080||orders",class="5xx"} 10
        trellis_upstream_request_duration_seconds_bucket{cluster="outbound|8080||orders",le="0.005"} 50
        trellis_upstream_request_duration_seconds_bucket{cluster="outbound|8080||orders",le="0.01"} 100
        trellis_upstream_request_duration_seconds_bucket{cluster="outbound|8080||orders",le="0.1"} 110
        trellis_upstream_request_duration_seconds_bucket{cluster="outbound|8080||orders",le="+Inf"} 110
        trellis_upstream_requests_total{cluster="passthrough",class="2xx"} 7
        trellis_gate_connections_total{decision="captured"} 40
        """

    static let after = """
        # TYPE trellis_upstream_requests_total counter
        trellis_upstream_requests_total{cluster="outbound|8080||orders",class="2xx"} 280
        trellis_upstream_requests_total{cluster="outbound|8080||orders",class="5xx"} 30
        trellis_upstream_request_duration_seconds_bucket{cluster="outbound|8080||orders",le="0.005"} 150
        trellis_upstream_request_duration_seconds_bucket{cluster="outbound|8080||orders",le="0.01"} 280
        trellis_upstream_request_duration_seconds_bucket{cluster="outbound|8080||orders",le="0.1"} 310
        trellis_upstream_request_duration_seconds_bucket{cluster="outbound|8080||orders",le="+Inf"} 310
        trellis_upstream_connections_active{cluster="outbound|8080||orders"} 4
        trellis_outlier_ejections_total{cluster="outbound|8080||orders",reason="consecutive_errors"} 2
        trellis_upstream_errors_total{cluster="outbound|8080||orders",token="timeout"} 6
        trellis_upstream_errors_total{cluster="outbound|8080||orders",token="overflow"} 2
        trellis_upstream_requests_total{cluster="passthrough",class="2xx"} 9
        trellis_gate_connections_total{decision="captured"} 60
        trellis_label_escapes{cluster="a\\"b\\\\c"} 1
        """

    @Test func parsesTheTextFormatWithItsEscapes() {
        let samples = LiveView.parse(Self.after)
        #expect(samples.count == 13)
        #expect(samples.last?.labels["cluster"] == #"a"b\c"#)
        #expect(samples.first?.value == 280)
        #expect(LiveView.parse("garbage line\nname{unterminated=\"x 1\n").isEmpty)
    }

    @Test func ratesSuccessAndQuantilesComeFromTheDeltas() throws {
        let rows = LiveView.rows(previous: LiveView.parse(Self.before), current: LiveView.parse(Self.after), seconds: 2)
        #expect(rows.map(\.cluster) == ["outbound|8080||orders", "passthrough"], "busiest first")
        let orders = rows[0]
        #expect(orders.rps == 100)  // (180 + 20) / 2 s
        #expect(orders.successRate == 0.9)  // 20 of 200 were 5xx
        // 200 new observations: 100 ≤ 5 ms, 180 ≤ 10 ms, 200 ≤ 100 ms. p50 is the 100th: 5 ms.
        #expect(orders.p50 == 0.005)
        // p99 is the 198th: the 18th of the 20 in (10 ms, 100 ms] → 10 + 90 × 18/20 ms.
        let p99 = try #require(orders.p99)
        #expect(abs(p99 - 0.091) < 1e-9)
        #expect(orders.activeConnections == 4 && orders.ejections == 2)
        #expect(orders.errorsPerSecond == 4 && orders.topError == "timeout")
        #expect(rows[1].rps == 1 && rows[1].p50 == nil)
        let captured = LiveView.rate(
            "trellis_gate_connections_total",
            previous: LiveView.parse(Self.before),
            current: LiveView.parse(Self.after),
            seconds: 2
        ) { $0["decision"] == "captured" }
        #expect(captured == 10)
    }

    @Test func theTableShowsEachServiceOnOneLine() {
        let rows = LiveView.rows(previous: LiveView.parse(Self.before), current: LiveView.parse(Self.after), seconds: 2)
        let screen = LiveView.render(title: "trellis-agent vm-a: running", summary: ["capture: on"], rows: rows)
        let lines = screen.split(separator: "\n", omittingEmptySubsequences: false)
        #expect(lines[0] == "trellis-agent vm-a: running")
        #expect(lines[3].hasPrefix("SERVICE (cluster)"))
        #expect(lines[4].hasPrefix("outbound|8080||orders"))
        #expect(lines[4].contains(" 100.0 ") && lines[4].contains("90.0%") && lines[4].hasSuffix("4.0 timeout"))
        #expect(
            LiveView.render(title: "t", summary: [], rows: []).contains("(no upstream traffic yet)")
        )
    }
}
