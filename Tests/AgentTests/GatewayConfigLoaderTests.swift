import Foundation
import GatewayConfig
import Testing
import TrellisConfig
import TrellisPolicy

@testable import Agent
@testable import Proxy

/// The gateway YAML format: the shipped examples load, and every kind of mistake is reported with
/// the file, line and key path, never guessed around.
@Suite struct GatewayConfigLoaderTests {
    static let examples = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("examples")

    private func load(_ name: String) throws -> GatewayFile {
        let url = Self.examples.appendingPathComponent(name)
        return try GatewayConfigLoader.parse(yaml: try String(contentsOf: url, encoding: .utf8), file: name)
    }

    private func errors(_ yaml: String) -> [String] {
        do {
            _ = try GatewayConfigLoader.parse(yaml: yaml, file: "gw.yaml")
            return []
        } catch {
            return error.errors.map(\.description)
        }
    }

    @Test func theShippedExamplesLoadAndCompile() throws {
        let simple = try load("gateway.yaml")
        #expect(simple.proxy.listeners.map(\.address) == [SocketEndpoint(host: "127.0.0.1", port: 18084)])
        #expect(simple.proxy.clusters[0].endpoints.map(\.address) == [SocketEndpoint(host: "127.0.0.1", port: 18080)])
        #expect(simple.adminAddress == SocketEndpoint(host: "127.0.0.1", port: 15000))
        _ = try ProxySnapshot(simple.proxy, stats: ProxyStats())

        let rich = try load("gateway-routes.yaml")
        let policies = Dictionary(uniqueKeysWithValues: rich.proxy.clusters.map { ($0.name, $0.loadBalancing) })
        #expect(policies["users-v1"] == .roundRobin)
        #expect(policies["users-v2"] == .leastRequest)
        #expect(policies["auth"] == .random)
        #expect(policies["static"] == .weighted)
        #expect(policies["sessions"] == .ringHash(.header("x-session-id"), minimumRingSize: 1024))
        #expect(rich.proxy.clusters.first { $0.name == "sessions" }?.endpoints.last?.address.host == "::1")
        #expect(rich.proxy.clusters.first { $0.name == "auth" }?.connectTimeout == .milliseconds(250))
        #expect(rich.proxy.clusters.first { $0.name == "auth" }?.upstreamProtocol == .http2)
        #expect(rich.proxy.clusters.first { $0.name == "static" }?.upstreamProtocol == .http1)
        _ = try ProxySnapshot(rich.proxy, stats: ProxyStats())
    }

    private let valid = """
        listeners:
          - name: l
            address: 127.0.0.1:0
            virtual_hosts:
              - name: all
                domains: ["*"]
                routes:
                  - name: r
                    match: {prefix: /}
                    route: {cluster: c}
        clusters:
          - name: c
            endpoints:
              - address: 127.0.0.1:18080
        """

    @Test func aValidMinimalFileHasNoErrors() {
        #expect(errors(valid) == [])
    }

    @Test func unknownKeysAreRejectedWithTheirPath() {
        let yaml = valid.replacingOccurrences(of: "    endpoints:", with: "    lb_polcy: random\n    endpoints:")
        let found = errors(yaml)
        #expect(found.count == 1)
        #expect(found.first?.hasPrefix("gw.yaml:13:") == true, "\(found)")
        #expect(found.first?.contains("clusters[0].lb_polcy: unknown key 'lb_polcy'") == true, "\(found)")
    }

    /// Errors found after loading, by the model's validation, carry the line of the value too; a
    /// key given twice names the key and its line.
    @Test func everyErrorNamesItsLine() {
        let missing = errors(valid.replacingOccurrences(of: "route: {cluster: c}", with: "route: {cluster: nope}"))
        #expect(
            missing.contains { $0.hasPrefix("gw.yaml:10:") && $0.contains("route.clusters[0].name: no cluster named") },
            "\(missing)"
        )
        let twice = errors(valid.replacingOccurrences(of: "  - name: c\n", with: "  - name: c\n    name: d\n"))
        #expect(twice.contains { $0.contains("'name' given twice in one mapping at line") }, "\(twice)")
    }

    @Test func theAccessLogBlockTurnsEveryListenerOnUnlessOneSaysNo() throws {
        let two = valid.replacingOccurrences(
            of: "clusters:",
            with: """
                  - name: quiet
                    address: 127.0.0.1:0
                    access_log: false
                    virtual_hosts: [{name: q, domains: ["*"], routes: [{name: q, match: {prefix: /}, route: {cluster: c}}]}]
                clusters:
                """
        )
        let logged = try GatewayConfigLoader.parse(
            yaml: "access_log: {output: /var/log/trellis/access.log, sample_rate: 0.01}\n" + two,
            file: "gw.yaml"
        )
        #expect(logged.accessLog == AccessLogSettings(output: .file("/var/log/trellis/access.log"), sampleRate: 0.01))
        #expect(logged.proxy.listeners.map(\.accessLog) == [true, false])
        // Without the block nothing logs; `access_log: true` on a listener alone writes to stdout.
        let none = try GatewayConfigLoader.parse(yaml: two, file: "gw.yaml")
        #expect(none.accessLog == nil)
        #expect(none.proxy.listeners.map(\.accessLog) == [false, false])
        let one = try GatewayConfigLoader.parse(
            yaml: two.replacingOccurrences(of: "access_log: false", with: "access_log: true"),
            file: "gw.yaml"
        )
        #expect(one.accessLog == AccessLogSettings(output: .stdout, sampleRate: 1))
        #expect(one.proxy.listeners.map(\.accessLog) == [false, true])
        #expect(try GatewayConfigLoader.parse(yaml: "access_log: false\n" + valid, file: "gw.yaml").accessLog == nil)
    }

    @Test func badAccessLogSettingsNameTheKey() {
        let cases: [(String, String)] = [
            (
                "access_log: {output: logs/access.log}",
                "gw.yaml:1:22: access_log.output: expected stdout, stderr or an absolute file path, got 'logs/access.log'"
            ),
            (
                "access_log: {output: /var/log/trellis/}",
                "access_log.output: expected stdout, stderr or an absolute file path, got '/var/log/trellis/'"
            ),
            ("access_log: {sample_rate: 2}", "access_log.sample_rate: expected a number above 0 and at most 1, got 2"),
            ("access_log: {sample_rate: 10%}", "access_log.sample_rate: expected a number above 0 and at most 1"),
            (
                "access_log: {sample: 0.1}",
                "access_log.sample: unknown key 'sample'; expected one of output, sample_rate"
            ),
            ("access_log: sometimes", "access_log: expected true or false, got 'sometimes'"),
        ]
        for (line, expected) in cases {
            let found = errors(line + "\n" + valid)
            #expect(found.count == 1 && found[0].contains(expected), "for \(line): \(found)")
        }
    }

    @Test func wrongValuesNameTheKeyAndWhatWasExpected() {
        let cases: [(String, String, String)] = [
            ("lb_policy: round_robin", "lb_policy: fastest", "clusters[0].lb_policy: expected one of round_robin"),
            (
                "lb_policy: round_robin", "protocol: http3",
                "clusters[0].protocol: expected one of http1, http2, downstream"
            ),
            (
                "address: 127.0.0.1:18080", "address: 127.0.0.1:99999",
                "clusters[0].endpoints[0].address: expected host:port"
            ),
            ("address: 127.0.0.1:18080", "address: localhost", "clusters[0].endpoints[0].address: expected host:port"),
            ("{cluster: c}", "{cluster: c, timeout: soon}", "route.timeout: expected a duration"),
            ("{cluster: c}", "{cluster: missing}", "route.clusters[0].name: no cluster named 'missing'"),
            ("{prefix: /}", "{prefix: /, regex: '/x'}", "routes[0].match: expected at most one of prefix, path"),
            ("{prefix: /}", "{regex: '(['}", "routes[0].match.regex: not a valid regular expression"),
            // The same rules as mesh.yaml's (one decoder): RE2 patterns, paths from '/'.
            ("{prefix: /}", "{regex: '/(?!admin).*'}", "routes[0].match.regex: '(?!' is not supported (RE2"),
            ("{prefix: /}", "{prefix: api}", "routes[0].match.prefix: expected a path starting with '/'"),
            ("{prefix: /}", "{prefix: /, methods: ['GE T']}", "routes[0].match.methods[0]: expected a method name"),
            ("domains: [\"*\"]", "domains: [\"*.*\"]", "domains[0]: expected 'name', '*.suffix' or '*'"),
            // A NUL in a host would be cut where the socket layer reads it: refused, shown escaped.
            (
                "address: 127.0.0.1:18080", #"address: "127.0.0.1\0junk:18080""#,
                #"clusters[0].endpoints[0].address: expected a host name or IP address of printable characters, got '127.0.0.1\0junk'"#
            ),
        ]
        for (from, to, expected) in cases {
            var yaml = valid.replacingOccurrences(of: from, with: to)
            if from == "lb_policy: round_robin" {
                yaml = valid.replacingOccurrences(of: "    endpoints:", with: "    \(to)\n    endpoints:")
            }
            let found = errors(yaml)
            #expect(found.contains { $0.contains(expected) }, "for \(to): \(found)")
        }
    }

    @Test func rateLimitsAndCircuitBreakersLoadWithTheirDefaults() throws {
        let yaml = valid.replacingOccurrences(
            of: "route: {cluster: c}",
            with: "route: {cluster: c, rate_limit: {requests_per_second: 2.5, per: header, header: X-Api-Key}}"
        ).replacingOccurrences(
            of: "    endpoints:",
            with: "    circuit_breakers: {max_requests: 10}\n    rate_limit: {requests_per_second: 100}\n    endpoints:"
        )
        let file = try GatewayConfigLoader.parse(yaml: yaml, file: "gw.yaml")
        let route = file.proxy.listeners[0].virtualHosts[0].routes[0]
        #expect(route.action.rateLimit == RateLimit(requestsPerSecond: 2.5, burst: 3, key: .header("x-api-key")))
        let cluster = file.proxy.clusters[0]
        #expect(cluster.rateLimit == RateLimit(requestsPerSecond: 100, burst: 100, key: .all))
        #expect(
            cluster.circuitBreakers == CircuitBreakers(maxConnections: 1024, maxPendingRequests: 1024, maxRequests: 10)
        )
        _ = try ProxySnapshot(file.proxy, stats: ProxyStats())
    }

    @Test func badRateLimitsAndCircuitBreakersNameTheKey() {
        let route = "route: {cluster: c}"
        let cases: [(String, String)] = [
            (
                "route: {cluster: c, rate_limit: {requests_per_second: 0}}",
                "route.rate_limit.requests_per_second: expected a number above 0"
            ),
            (
                "route: {cluster: c, rate_limit: {requests_per_second: fast}}",
                "route.rate_limit.requests_per_second: expected a number"
            ),
            (
                "route: {cluster: c, rate_limit: {requests_per_second: 5, burst: 0}}",
                "route.rate_limit.burst: expected an integer in 1...10000000"
            ),
            (
                "route: {cluster: c, rate_limit: {requests_per_second: 5, per: ip}}",
                "route.rate_limit.per: expected one of all, client_address, header, got 'ip'"
            ),
            (
                "route: {cluster: c, rate_limit: {requests_per_second: 5, per: header}}",
                "route.rate_limit: missing required key 'header'"
            ),
            (
                "route: {cluster: c, rate_limit: {requests_per_second: 5, header: x}}",
                "route.rate_limit.header: header is only used with per: header"
            ),
            ("route: {cluster: c, rate_limit: {rps: 5}}", "route.rate_limit.rps: unknown key 'rps'"),
        ]
        for (to, expected) in cases {
            let found = errors(valid.replacingOccurrences(of: route, with: to))
            #expect(found.contains { $0.contains(expected) }, "for \(to): \(found)")
        }
        let breakers: [(String, String)] = [
            (
                "circuit_breakers: {max_requests: -1}",
                "clusters[0].circuit_breakers.max_requests: expected an integer in 0...1000000"
            ),
            ("circuit_breakers: {max_conns: 1}", "clusters[0].circuit_breakers.max_conns: unknown key"),
        ]
        for (to, expected) in breakers {
            let found = errors(valid.replacingOccurrences(of: "    endpoints:", with: "    \(to)\n    endpoints:"))
            #expect(found.contains { $0.contains(expected) }, "for \(to): \(found)")
        }
    }

    @Test func retryPoliciesAndOutlierDetectionLoad() throws {
        let yaml = valid.replacingOccurrences(
            of: "route: {cluster: c}",
            with: """
                route:
                                  cluster: c
                                  retry_policy:
                                    retry_on: [5xx, retriable-status-codes]
                                    num_retries: 2
                                    retriable_status_codes: [409]
                                    per_try_timeout: 500ms
                                    backoff: {base: 10ms, max: 100ms}
                                    budget: {percent: 50}
                """
        ).replacingOccurrences(
            of: "    endpoints:",
            with: "    outlier_detection: {consecutive_errors: 3, success_rate: {request_volume: 20}}\n    endpoints:"
        )
        let file = try GatewayConfigLoader.parse(yaml: yaml, file: "gw.yaml")
        let retry = try #require(file.proxy.listeners[0].virtualHosts[0].routes[0].action.retryPolicy)
        #expect(retry.retryOn == [.serverError, .retriableStatusCodes])
        #expect(retry.numRetries == 2)
        #expect(retry.retriableStatusCodes == [409])
        #expect(retry.perTryTimeout == .milliseconds(500))
        #expect(retry.backoffBase == .milliseconds(10) && retry.backoffMax == .milliseconds(100))
        #expect(retry.budgetPercent == 50 && retry.minRetryConcurrency == 3)
        let outlier = try #require(file.proxy.clusters[0].outlierDetection)
        #expect(outlier.consecutiveErrors == 3)
        #expect(outlier.successRate == .init(minimumHosts: 5, requestVolume: 20, stdevFactor: 1.9))
        #expect(outlier.baseEjectionTime == .seconds(30))
        _ = try ProxySnapshot(file.proxy, stats: ProxyStats())
    }

    @Test func badRetryPoliciesAndOutlierDetectionNameTheKey() {
        let route = "route: {cluster: c}"
        let cases: [(String, String)] = [
            (
                "route: {cluster: c, retry_policy: {retry_on: [sometimes]}}",
                "route.retry_policy.retry_on[0]: expected one of connect-failure"
            ),
            (
                "route: {cluster: c, retry_policy: {retry_on: []}}",
                "route.retry_policy.retry_on: expected at least one condition"
            ),
            (
                "route: {cluster: c, retry_policy: {num_retries: 11}}",
                "route.retry_policy.num_retries: expected an integer in 0...10"
            ),
            (
                "route: {cluster: c, retry_policy: {retry_on: [retriable-status-codes]}}",
                "retriable-status-codes needs retriable_status_codes"
            ),
            (
                "route: {cluster: c, retry_policy: {retriable_status_codes: [700]}}",
                "route.retry_policy.retriable_status_codes[0]: expected an integer in 100...599"
            ),
            (
                "route: {cluster: c, retry_policy: {backoff: {base: 1s, max: 10ms}}}",
                "route.retry_policy.backoff: expected 0 < base <= max <= 60s"
            ),
            (
                "route: {cluster: c, retry_policy: {per_try_timeout: 0s}}",
                "route.retry_policy.per_try_timeout: expected a duration above 0 and at most 1h"
            ),
            // The same bound as in mesh.yaml (one decoder, TrellisPolicy).
            (
                "route: {cluster: c, retry_policy: {per_try_timeout: 2h}}",
                "route.retry_policy.per_try_timeout: expected a duration above 0 and at most 1h"
            ),
            (
                "route: {cluster: c, rate_limit: {requests_per_second: 0.0001}}",
                "route.rate_limit.requests_per_second: expected a rate with at most 3 decimals"
            ),
        ]
        let faults: [(String, String)] = [
            ("route: {cluster: c, fault: {}}", "route.fault: expected a delay or an abort_status"),
            (
                "route: {cluster: c, fault: {abort_status: 99}}",
                "route.fault.abort_status: expected an integer in 200...599"
            ),
            (
                "route: {cluster: c, fault: {abort_percent: 5}}",
                "route.fault.abort_percent: abort_percent needs an abort_status"
            ),
            (
                "route: {cluster: c, fault: {delay: 1s, delay_percent: 150}}",
                "route.fault.delay_percent: expected a number above 0 and at most 100"
            ),
        ]
        for (to, expected) in cases + faults {
            let found = errors(valid.replacingOccurrences(of: route, with: to))
            #expect(found.contains { $0.contains(expected) }, "for \(to): \(found)")
        }
        let outliers: [(String, String)] = [
            (
                "outlier_detection: {consecutive_errors: 0}",
                "clusters[0].outlier_detection.consecutive_errors: expected an integer in 1...1000000"
            ),
            (
                "outlier_detection: {max_ejection_percent: 101}",
                "clusters[0].outlier_detection.max_ejection_percent: expected an integer in 0...100"
            ),
            (
                "outlier_detection: {base_ejection_time: 0s}",
                "clusters[0].outlier_detection.base_ejection_time: expected a duration above 0"
            ),
            (
                "outlier_detection: {success_rate: {stdev: 2}}",
                "clusters[0].outlier_detection.success_rate.stdev: unknown key"
            ),
        ]
        for (to, expected) in outliers {
            let found = errors(valid.replacingOccurrences(of: "    endpoints:", with: "    \(to)\n    endpoints:"))
            #expect(found.contains { $0.contains(expected) }, "for \(to): \(found)")
        }
    }

    @Test func healthChecksLoadAndBadOnesNameTheKey() throws {
        let good = valid.replacingOccurrences(
            of: "    endpoints:",
            with:
                "    health_check: {http: {path: /healthz, expected_statuses: [200, \"300-302\"]}, interval: 2s, unhealthy_threshold: 1}\n    endpoints:"
        )
        let file = try GatewayConfigLoader.parse(yaml: good, file: "gw.yaml")
        let check = try #require(file.proxy.clusters[0].healthCheck)
        #expect(check.kind == .http(path: "/healthz", host: nil, expectedStatuses: [200...200, 300...302]))
        #expect(check.interval == .seconds(2) && check.timeout == .seconds(1))
        #expect(check.unhealthyThreshold == 1 && check.healthyThreshold == 2)
        let cases: [(String, String)] = [
            ("health_check: {interval: 1s}", "clusters[0].health_check: expected exactly one of http or tcp"),
            (
                "health_check: {http: {path: healthz}}",
                "clusters[0].health_check.http.path: expected a path starting with '/'"
            ),
            (
                "health_check: {http: {path: /h, expected_statuses: [\"299-200\"]}}",
                "expected a status (200) or a range (200-299)"
            ),
            (
                "health_check: {tcp: {}, interval: 1s, timeout: 2s}",
                "clusters[0].health_check.timeout: expected a timeout no longer than the interval"
            ),
            ("health_check: {tcp: {port: 1}}", "clusters[0].health_check.tcp.port: unknown key"),
        ]
        for (to, expected) in cases {
            let found = errors(valid.replacingOccurrences(of: "    endpoints:", with: "    \(to)\n    endpoints:"))
            #expect(found.contains { $0.contains(expected) }, "for \(to): \(found)")
        }
    }

    @Test func headerLimitAboveTheParserCeilingIsRejected() {
        let yaml = valid.replacingOccurrences(
            of: "    address: 127.0.0.1:0",
            with: "    address: 127.0.0.1:0\n    limits: {max_request_header_bytes: 100000}"
        )
        #expect(
            errors(yaml).contains {
                $0.contains("listeners[0].limits.max_request_header_bytes: expected an integer in 1024...81920")
            }
        )
    }

    @Test func brokenYAMLSaysWhereItBroke() {
        let found = errors("listeners: [\n  - oops")
        #expect(found.count == 1)
        #expect(found[0].hasPrefix("gw.yaml: not valid YAML:"), "\(found)")
        #expect(found[0].contains("line"), "\(found)")
    }

    @Test func anEmptyFileIsAnError() {
        #expect(errors("") == ["gw.yaml: the file is empty; expected a YAML mapping"])
    }

    @Test func missingRequiredKeysAreNamed() {
        let found = errors("listeners: []\n")
        #expect(found.contains { $0.contains("missing required key 'clusters'") }, "\(found)")
    }

    @Test func allSemanticProblemsAreReportedTogether() {
        let yaml =
            valid.replacingOccurrences(of: "{cluster: c}", with: "{cluster: nope}")
            + "\n  - name: c\n    endpoints: [{address: 127.0.0.1:18081}]\n"
        let found = errors(yaml)
        #expect(found.count == 2, "\(found)")
    }
}
