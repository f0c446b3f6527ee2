import Foundation
import Testing
import TrellisConfig
import TrellisTestSupport

@testable import Pilot

/// mesh.yaml: every mistake names the file, line, key path and what was expected.
struct MeshConfigTests {
    static func errors(_ yaml: String) -> [String] {
        do {
            _ = try MeshConfigLoader.parse(yaml: yaml, file: "mesh.yaml")
            return []
        } catch {
            return error.errors.map(\.description)
        }
    }

    @Test func theExampleFileLoads() throws {
        let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("examples/mesh.yaml")
        let mesh = try MeshConfigLoader.parse(yaml: try String(contentsOf: url, encoding: .utf8), file: url.path)
        #expect(mesh.services.count == 4 && mesh.gateways.count == 1 && mesh.serviceRoutes.count == 1)
    }

    @Test(arguments: [
        (
            "services:\n  - name: a\n    port: 80\nroutes:\n  - service: b:80\n    rules: []\n",
            "mesh.yaml:5:14: routes[0].service: service 'b:80' is not declared under services:"
        ),
        ("services:\n  - name: A_b\n    port: 80\n", "services[0].name: expected a service name"),
        ("services:\n  - name: a\n    port: 70000\n", "services[0].port: expected an integer in 1...65535, got 70000"),
        (
            "services:\n  - name: a\n    port: 80\n    protocol: udp\n",
            "services[0].protocol: expected one of http, http2, grpc, tcp, got 'udp'"
        ),
        (
            "services:\n  - name: a\n    port: 80\n    instances: [{address: db.local}]\n",
            "services[0].instances[0].address: expected an IPv4 or IPv6 address"
        ),
        (
            "services:\n  - name: a\n    port: 80\n    instances: [{address: \"10.0.0.1\\0junk\"}]\n",
            "services[0].instances[0].address: expected an IPv4 or IPv6 address"
        ),
        ("services:\n  - {name: a, port: 80}\n  - {name: a, port: 80}\n", "service 'a:80' is declared twice"),
        (
            "services:\n  - {name: a, port: 80}\ngateways:\n  - name: g\n    listeners:\n      - port: 81\n        routes:\n          - {to: a:80, match: {regex: \"(?=x)\"}}\n",
            "match.regex: '(?=' is not supported"
        ),
        (
            "services:\n  - {name: a, port: 80}\ngateways:\n  - name: g\n    listeners:\n      - port: 81\n        routes:\n          - {to: a:80, match: {prefix: nope}}\n",
            "match.prefix: expected a path starting with '/'"
        ),
        ("servics: []\n", "servics: unknown key 'servics'"),
        // Subsets: declared with labels, named by routes.
        (
            "services:\n  - {name: a, port: 80, subsets: [{name: v2, labels: {}}]}\n",
            "services[0].subsets[0].labels: expected at least one label"
        ),
        (
            "services:\n  - {name: a, port: 80, subsets: [{name: v2, labels: {v: 2}}, {name: v2, labels: {v: 3}}]}\n",
            "services[0].subsets[1].name: subset 'v2' is declared twice"
        ),
        (
            "services:\n  - {name: a, port: 80, subsets: [{name: v2, labels: {v: \"2\"}}]}\nroutes:\n  - service: a:80\n    rules:\n      - to: [{service: a:80, subset: v3, weight: 1}]\n",
            "routes[0].rules[0].to[0].subset: service 'a:80' has no subset 'v3'; it declares v2"
        ),
        (
            "services:\n  - {name: a, port: 80}\nroutes:\n  - service: a:80\n    rules:\n      - to: [{service: a:80, subset: v1, weight: 1}]\n",
            "service 'a:80' has no subset 'v1' (it declares none)"
        ),
    ])
    func badFilesAreRefusedWithWhereAndWhat(yaml: String, expected: String) {
        let errors = Self.errors(yaml)
        #expect(errors.contains { $0.contains(expected) }, "\(errors)")
    }

    @Test(arguments: [
        ("service: b:80, timeout: 1s", "policies[0].service: service 'b:80' is not declared under services:"),
        ("service: a:80, timeout: 0s", "policies[0].timeout: expected a duration above 0"),
        (
            "service: a:80, circuit_breakers: {max_requests: -1}",
            "policies[0].circuit_breakers.max_requests: expected an integer in 0...1000000"
        ),
        (
            "service: a:80, outlier_detection: {consecutive_errors: 0}",
            "policies[0].outlier_detection.consecutive_errors: expected an integer in 1...1000000"
        ),
        (
            "service: a:80, health_check: {interval: 1s}",
            "policies[0].health_check: expected exactly one of http or tcp"
        ),
        (
            "service: a:80, health_check: {tcp: {}, interval: 1s, timeout: 2s}",
            "policies[0].health_check.timeout: expected a timeout no longer than the interval"
        ),
        (
            "service: a:80, retry_policy: {retry_on: [sometimes]}",
            "policies[0].retry_policy.retry_on[0]: expected one of connect-failure"
        ),
        (
            "service: a:80, retry_policy: {num_retries: 11}",
            "policies[0].retry_policy.num_retries: expected an integer in 0...10"
        ),
        (
            "service: a:80, rate_limit: {requests_per_second: 0.0001}",
            "policies[0].rate_limit.requests_per_second: expected a rate with at most 3 decimals"
        ),
        (
            "service: a:80, rate_limit: {requests_per_second: 5, per: client_address}",
            "policies[0].rate_limit: per: client_address and per: header are gateway-only"
        ),
        (
            "service: a:80, fault: {abort_percent: 5}",
            "policies[0].fault.abort_percent: abort_percent needs an abort_status"
        ),
        ("service: a:80, retries: 3", "policies[0].retries: unknown key 'retries'"),
    ])
    func badPoliciesAreRefusedWithWhereAndWhat(policy: String, expected: String) {
        let errors = Self.errors("services:\n  - {name: a, port: 80}\npolicies:\n  - {\(policy)}\n")
        #expect(errors.contains { $0.contains(expected) }, "\(errors)")
    }

    @Test func aPolicyIsTwiceAnError() {
        let errors = Self.errors(
            "services:\n  - {name: a, port: 80}\npolicies:\n  - {service: a:80, timeout: 1s}\n  - {service: a:80, timeout: 2s}\n"
        )
        #expect(errors.contains { $0.contains("policies[1].service: a policy for 'a:80' is given twice") }, "\(errors)")
    }
}
