import Foundation
import GatewayConfig
import Proxy
import SwiftProtobuf
import Testing
import TrellisConfig
import TrellisPolicy
import TrellisTestSupport
import XDS

@testable import Agent
@testable import Pilot

/// One vocabulary, checked end to end: a policy read by the shared decoder (the gateway file and
/// mesh.yaml use the same one), written by pilot as xDS and read back by the agent's translator is
/// the policy it was — every field of every concept, with values away from the defaults.
@Suite struct PolicyRoundTripTests {
    private func node(_ yaml: String) throws -> ConfigNode {
        try ConfigNode.root(yaml: yaml, file: "policy.yaml")
    }

    @Test(arguments: [
        "{}",
        "{max_connections: 7, max_pending_requests: 0, max_requests: 1000000, max_retries: 9}",
    ])
    func circuitBreakers(yaml: String) throws {
        let model = try CircuitBreakers.decode(node(yaml))
        let (back, _) = try XDSTranslator.circuitBreakers(PolicyEncoding.circuitBreakers(model), cluster: "c")
        #expect(back == model)
    }

    @Test(arguments: [
        "{}",
        """
        {consecutive_errors: 3, interval: 1500ms, base_ejection_time: 2s, max_ejection_time: 90s,
         max_ejection_percent: 35, success_rate: {minimum_hosts: 4, request_volume: 60, stdev_factor: 2.5}}
        """,
    ])
    func outlierDetection(yaml: String) throws {
        let model = try OutlierDetection.decode(node(yaml))
        let back = try XDSTranslator.outlierDetection(PolicyEncoding.outlierDetection(model), cluster: "c")
        #expect(back == model)
    }

    @Test(arguments: [
        "{tcp: {}}",
        "{http: {path: /healthz}}",
        """
        {http: {path: /ready, host: probe.local, expected_statuses: [200, "202-204", 418]}, interval: 3s,
         timeout: 750ms, healthy_threshold: 4, unhealthy_threshold: 6}
        """,
    ])
    func healthCheck(yaml: String) throws {
        let model = try HealthCheck.decode(node(yaml))
        let back = try XDSTranslator.healthCheck([PolicyEncoding.healthCheck(model)], cluster: "c")
        #expect(back == model)
    }

    @Test(arguments: [
        "{}",
        """
        {retry_on: [connect-failure, reset, gateway-error, 5xx, retriable-status-codes, cancelled,
         deadline-exceeded, internal, resource-exhausted, unavailable], num_retries: 4,
         retriable_status_codes: [409, 429], per_try_timeout: 800ms, backoff: {base: 5ms, max: 2s},
         retry_non_idempotent: true, budget: {percent: 12.5, min_concurrency: 7}}
        """,
        "{retry_on: [unavailable], num_retries: 0}",
    ])
    func retryPolicy(yaml: String) throws {
        let model = try RetryPolicy.decode(node(yaml))
        var policy = ServicePolicy()
        policy.retryNonIdempotent = model.retryNonIdempotent
        var route = Envoy_Config_Route_V3_Route()
        route.metadata.filterMetadata = PolicyEncoding.routeMetadata(policy)
        var back = try XDSTranslator.retryPolicy(PolicyEncoding.retryPolicy(model), route: route, in: "r")
        // The budget travels on the cluster (Envoy's field), as pilot sends it.
        var breakers = PolicyEncoding.circuitBreakers(CircuitBreakers())
        breakers.thresholds[0].retryBudget = PolicyEncoding.retryBudget(model)
        let budget = try #require(try XDSTranslator.circuitBreakers(breakers, cluster: "c").1)
        back.budgetPercent = budget.budgetPercent.value
        back.minRetryConcurrency = Int(budget.minRetryConcurrency.value)
        #expect(back == model)
    }

    @Test(arguments: [
        "{requests_per_second: 100}",
        "{requests_per_second: 0.5, burst: 3}",
        "{requests_per_second: 2.25, burst: 10}",
        "{requests_per_second: 0.001}",
    ])
    func rateLimit(yaml: String) throws {
        let model = try RateLimit.decode(node(yaml))
        let any = try Google_Protobuf_Any(message: PolicyEncoding.rateLimit(model))
        let back = try XDSTranslator.rateLimit(any, in: "r")
        #expect(abs(back.requestsPerSecond - model.requestsPerSecond) < 1e-9, "\(back) vs \(model)")
        #expect(back.burst == model.burst && back.key == model.key)
    }

    @Test(arguments: [
        "{delay: 250ms}",
        "{abort_status: 503}",
        "{delay: 2s, delay_percent: 12.5, abort_status: 418, abort_percent: 0.001}",
    ])
    func fault(yaml: String) throws {
        let model = try FaultInjection.decode(node(yaml))
        let any = try Google_Protobuf_Any(message: PolicyEncoding.fault(model))
        let back = try XDSTranslator.fault(any, in: "r")
        #expect(back == model)
    }

    @Test(arguments: [
        "{}",
        "{prefix: /api/v2}",
        "{path: /exact, methods: [POST]}",
        """
        {regex: "/v[0-9]+/orders/.*", methods: [GET, HEAD, OPTIONS],
         headers: [{name: X-Canary, exact: "1"}, {name: x-debug, present: true, invert: true},
                   {name: x-tenant, regex: "t-[a-z]+"}]}
        """,
    ])
    func routeMatch(yaml: String) throws {
        let model = try RouteMatch.decode(node(yaml))
        var route = Envoy_Config_Route_V3_Route()
        route.match = Translator.routeMatch(RouteRule(match: model, destinations: []))
        route.route.cluster = "c"
        let back = try XDSTranslator.route(route, name: "r", in: "r", clusters: ["c"]).match
        #expect(back == model)
    }

    @Test(arguments: [
        "{lb_policy: least_request}",
        "{lb_policy: random}",
        "{lb_policy: round_robin}",
        "{lb_policy: ring_hash, ring_hash: {header: X-User}}",
        "{lb_policy: ring_hash, ring_hash: {cookie: session, minimum_ring_size: 4096}}",
        "{lb_policy: ring_hash, ring_hash: {source_address: true, minimum_ring_size: 64}}",
    ])
    func loadBalancing(yaml: String) throws {
        let root = try node(yaml)
        let model = try LoadBalancingPolicy.decode(try root.mapping(allowed: ["lb_policy", "ring_hash"]), in: root)
        let encoded = PolicyEncoding.loadBalancing(model)
        var cluster = Envoy_Config_Cluster_V3_Cluster()
        cluster.name = "c"
        cluster.type = .static
        cluster.lbPolicy = encoded.policy
        if let ring = encoded.ring { cluster.ringHashLbConfig = ring }
        // The hash policy travels on the routes to the cluster, as pilot sends it.
        var route = Envoy_Config_Route_V3_Route()
        route.route.cluster = "c"
        route.route.hashPolicy = encoded.hash
        var table = Envoy_Config_Route_V3_RouteConfiguration()
        table.virtualHosts = [.with { $0.routes = [route] }]
        let keys = try XDSTranslator.hashKeys([table])
        let back = try XDSTranslator.cluster(cluster, endpoints: [:], hashKey: keys["c"]).loadBalancing
        #expect(back == model)
    }

    /// agent.yaml's short forms are the same check as the gateway file's and mesh.yaml's long ones.
    @Test func healthChecksHaveOneShapeEverywhere() throws {
        #expect(try HealthCheck.decode(node("{http: /h}")) == HealthCheck.decode(node("{http: {path: /h}}")))
        #expect(try HealthCheck.decode(node("{tcp: true}")) == HealthCheck.decode(node("{tcp: {}}")))
        let errors: [(String, String)] = [
            ("{tcp: false}", "policy.yaml:1:7: tcp: expected true or {}"),
            ("{http: /h, interval: 50ms}", "interval: expected an interval of at least 100ms"),
            ("{http: h}", "http: expected a path starting with '/', got 'h'"),
            ("{http: {path: /h, expected_statuses: [700]}}", "http.expected_statuses"),
        ]
        for (yaml, expected) in errors {
            #expect(throws: ConfigFileError.self) { try HealthCheck.decode(node(yaml)) }
            do {
                _ = try HealthCheck.decode(node(yaml))
            } catch {
                #expect("\(error)".contains(expected), "\(yaml): \(error)")
            }
        }
    }

    /// The agent's own probe of a local service honours the check's expected statuses and host,
    /// as a cluster's checks do (it used to accept 2xx only and ignore both).
    @Test func theAgentsProbeHonoursExpectedStatuses() async throws {
        let dir = try Peers.temporaryDirectory("probe")
        defer { try? FileManager.default.removeItem(at: dir) }
        let port = Peers.freePort()
        let app = try Peers.pythonHTTPServer(port: port, body: "ok", root: dir)
        defer { app.stop() }
        let good = HealthCheck(kind: .http(path: "/hello", host: "probe.local", expectedStatuses: [200...399]))
        #expect(await Peers.eventually(within: .seconds(5)) { await HealthProbe.check(good, port: port) })
        let missing = HealthCheck(kind: .http(path: "/missing", host: nil, expectedStatuses: [200...399]))
        #expect(!(await HealthProbe.check(missing, port: port)), "404 is not healthy by default")
        let expected404 = HealthCheck(kind: .http(path: "/missing", host: nil, expectedStatuses: [404...404]))
        // Eventually: a probe that times out (the Python server beside the other suites in CI) is
        // a failed probe too.
        #expect(
            await Peers.eventually(within: .seconds(10)) { await HealthProbe.check(expected404, port: port) },
            "404 listed as expected"
        )
    }

    /// The gateway file and mesh.yaml read one policy the same way: same model, same errors.
    @Test func theGatewayFileAndMeshYamlShareOneDecoder() throws {
        let retry = "{retry_on: [5xx], num_retries: 3, per_try_timeout: 2h}"
        let gateway = Self.gatewayErrors(route: "retry_policy: \(retry)")
        let mesh = Self.meshErrors(policy: "retry_policy: \(retry)")
        let expected = "retry_policy.per_try_timeout: expected a duration above 0 and at most 1h"
        #expect(gateway.contains { $0.contains(expected) }, "\(gateway)")
        #expect(mesh.contains { $0.contains(expected) }, "\(mesh)")
        // A request timeout: at most a day, or none, in both files.
        let tooLong = "timeout: expected a duration above 0 and at most 24h"
        #expect(Self.gatewayErrors(route: "timeout: 25h").contains { $0.contains(tooLong) })
        #expect(Self.meshErrors(policy: "timeout: 25h").contains { $0.contains(tooLong) })
        #expect(Self.gatewayErrors(route: "timeout: none").isEmpty)
        let none = try MeshConfigLoader.parse(
            yaml: "services:\n  - {name: a, port: 80}\npolicies:\n  - {service: a:80, timeout: none}\n",
            file: "mesh.yaml"
        )
        let timeout = try #require(none.policies.values.first?.route.timeout)
        #expect(timeout.seconds == 0 && timeout.nanos == 0, "Envoy's 'no timeout'")
    }

    private static func gatewayErrors(route extra: String) -> [String] {
        let yaml = """
            listeners:
              - name: l
                address: 127.0.0.1:0
                virtual_hosts:
                  - name: all
                    domains: ["*"]
                    routes:
                      - name: r
                        match: {prefix: /}
                        route: {cluster: c, \(extra)}
            clusters:
              - name: c
                endpoints: [{address: 127.0.0.1:18080}]
            """
        do {
            _ = try GatewayConfigLoader.parse(yaml: yaml, file: "gw.yaml")
            return []
        } catch {
            return error.errors.map(\.description)
        }
    }

    private static func meshErrors(policy: String) -> [String] {
        let yaml = "services:\n  - {name: a, port: 80}\npolicies:\n  - {service: a:80, \(policy)}\n"
        do {
            _ = try MeshConfigLoader.parse(yaml: yaml, file: "mesh.yaml")
            return []
        } catch {
            return error.errors.map(\.description)
        }
    }
}
