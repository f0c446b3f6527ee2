/// mesh.yaml texts shared by the pilot, agent and Envoy tests.
public enum MeshFixtures {
    /// A service `orders:8080` with every policy setting, and a rule matching on methods (sent as
    /// a `:method` header matcher) and headers.
    public static let policies = """
        services:
          - {name: orders, port: 8080, subsets: [{name: v1, labels: {version: v1}}]}
        routes:
          - service: orders:8080
            rules:
              - match: {prefix: /v2, methods: [GET, HEAD], headers: [{name: x-tenant, regex: "t-[a-z]+"}]}
                to: orders:8080
              - match: {path: /submit, methods: [POST]}
                to: orders:8080
              - match: {prefix: /v1}
                to: [{service: orders:8080, subset: v1, weight: 1}]
        policies:
          - service: orders:8080
            connect_timeout: 250ms
            lb_policy: ring_hash
            ring_hash: {header: x-user, minimum_ring_size: 2048}
            overprovisioning_factor: 200
            circuit_breakers: {max_requests: 50, max_retries: 5}
            outlier_detection: {consecutive_errors: 4, base_ejection_time: 10s, success_rate: {request_volume: 20}}
            health_check: {http: {path: /healthz, expected_statuses: ["200-204"]}, interval: 2s, timeout: 500ms}
            timeout: 3s
            retry_policy:
              retry_on: [connect-failure, 5xx, unavailable]
              num_retries: 2
              per_try_timeout: 1s
              backoff: {base: 10ms, max: 100ms}
              retry_non_idempotent: true
              budget: {percent: 30, min_concurrency: 2}
            rate_limit: {requests_per_second: 0.5, burst: 2}
            fault: {abort_status: 418, abort_percent: 0.001}
        """
}
