import Foundation
import Testing
import TrellisTestSupport

/// gRPC across the mesh with nothing changed in the programs (issue 15): pilot in the hub, VM A a
/// grpcio client, VMs B and C grpcio servers registered as `greeter` (protocol grpc), an agent on
/// each. A's agent captures the h2c connection, routes each call by `:authority` to pilot's
/// cluster and balances the calls (streams) over B and C; their agents take them inbound and hand
/// them to the local server over h2c. Unary, 1 MiB, server and bidirectional streaming, a server
/// error with its status and message, and a deadline all arrive as the client expects; mesh.yaml's
/// retry policy (`retry_on: [unavailable]`) and rate limit apply to the calls.
@Suite(
    .serialized,
    .disabled(if: NetnsLab.unavailableReason != nil, "\(NetnsLab.unavailableReason ?? "")"),
    .disabled(if: Peers.grpcioMissing, "needs PyPI grpcio: run scripts/bootstrap.sh")
)
struct GRPCMeshNetnsTests {
    static let echo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/grpc/echo.py").path

    @Test func grpcCallsCrossTwoAgentsBalancedOverPilotsInstances() async throws {
        let lab = try await MeshLab(subnet: 17, vms: ["vm-a", "vm-b", "vm-c"])
        defer { lab.destroy() }
        let dir = try Peers.temporaryDirectory("grpc-mesh")
        defer { try? FileManager.default.removeItem(at: dir) }
        let hosts = try NetnsHosts(ns: lab.ns("vm-a"), names: [(lab.ip("vm-b"), "greeter")])
        defer { hosts.remove() }
        try """
        services:
          - {name: greeter, port: 50051, protocol: grpc}
        policies:
          - service: greeter:50051
            retry_policy: {retry_on: [unavailable], num_retries: 2}
            rate_limit: {requests_per_second: 1, burst: 60}
        """.write(to: dir.appendingPathComponent("mesh.yaml"), atomically: true, encoding: .utf8)
        let pilot = try lab.startPilot(dir: dir)
        defer { pilot.stop() }
        var servers: [Peers.Child] = []
        defer { servers.forEach { $0.stop() } }
        for vm in ["vm-b", "vm-c"] {
            servers.append(
                try Peers.Child(
                    ["ip", "netns", "exec", lab.ns(vm), "python3", Self.echo, "server", "50051", vm],
                    output: dir.appendingPathComponent("server-\(vm).log")
                )
            )
        }
        let service = "[{name: greeter, port: 50051, protocol: grpc, health_check: {tcp: true, interval: 1s}}]"
        let agents = try lab.startAgents(dir: dir, [("vm-b", service, ""), ("vm-c", service, ""), ("vm-a", "[]", "")])
        defer { agents.values.forEach { $0.child.stop() } }
        #expect(await lab.healthyInstances("greeter", count: 2), "both servers registered healthy")
        // Until A's agent has pilot's cluster for greeter, calls pass through to B alone.
        var result: [String: Any] = [:]
        var last = ""
        let balanced = await Peers.eventually(within: .seconds(20)) {
            let out = await lab.exec("vm-a", ["python3", Self.echo, "client", "greeter:50051", "20"])
            last = out.stdout + out.stderr
            result = (try? JSONSerialization.jsonObject(with: Data(out.stdout.utf8)) as? [String: Any]) ?? [:]
            let unary = result["unary"] as? [String: Int] ?? [:]
            return (unary["vm-b"] ?? 0) > 0 && (unary["vm-c"] ?? 0) > 0
        }
        #expect(balanced, "calls balanced over B and C: \(last)")
        #expect((result["unary"] as? [String: Int])?.values.reduce(0, +) == 20, "\(last)")
        #expect(result["wrong"] == nil, "\(last)")
        #expect(result["large"] as? Int == (1 << 20) + 5, "1 MiB each way: \(last)")
        #expect((result["stream"] as? [String])?.count == 5, "\(last)")
        #expect((result["chat"] as? [String])?.map { $0.suffix(1) } == ["a", "b", "c", "d", "e"], "\(last)")
        #expect(result["fail"] as? [String] == ["UNAVAILABLE", "down for maintenance"], "\(last)")
        #expect(result["slow"] as? String == "DEADLINE_EXCEEDED", "\(last)")

        // mesh.yaml's retry policy: each server fails every other Flaky call with UNAVAILABLE, A's
        // agent tries again, the client sees OK every time.
        let flaky = await lab.exec("vm-a", ["python3", Self.echo, "call", "greeter:50051", "Flaky", "6"])
        #expect(!flaky.stdout.contains("UNAVAILABLE") && flaky.stdout.contains("OK"), "\(flaky)")
        // Its rate limit (burst 60, then 1/s): a burst of calls past it gets RESOURCE_EXHAUSTED
        // with the token, from A's agent.
        let burst = await lab.exec("vm-a", ["python3", Self.echo, "call", "greeter:50051", "Unary", "60"])
        #expect(burst.stdout.contains(#"["RESOURCE_EXHAUSTED", "rate_limited"]"#), "\(burst)")

        // Proven by the agents' metrics: A sniffed HTTP/2 and sent the calls to pilot's cluster;
        // B and C each served some inbound.
        let metricsA = await lab.exec("vm-a", ["curl", "-s", "http://127.0.0.1:15000/stats/prometheus"]).stdout
        #expect(SafeByDefaultNetnsTests.value(metricsA, #"trellis_sniffed_connections_total{protocol="http2"}"#) >= 1)
        #expect(SafeByDefaultNetnsTests.value(metricsA, #"trellis_sniffed_connections_total{protocol="tcp"}"#) == 0)
        #expect(
            SafeByDefaultNetnsTests.value(
                metricsA,
                #"trellis_upstream_requests_total{cluster="outbound|50051||greeter",class="2xx"}"#
            ) >= 20,
            "\(metricsA.split(separator: "\n").filter { $0.contains("upstream_requests_total") })"
        )
        #expect(
            SafeByDefaultNetnsTests.value(
                metricsA,
                #"trellis_upstream_retries_total{cluster="outbound|50051||greeter"}"#
            )
                >= 3,
            "the Flaky calls were retried by A"
        )
        #expect(SafeByDefaultNetnsTests.value(metricsA, #"trellis_errors_total{token="rate_limited"}"#) >= 1)
        for vm in ["vm-b", "vm-c"] {
            let metrics = await lab.exec(vm, ["curl", "-s", "http://127.0.0.1:15000/stats/prometheus"]).stdout
            #expect(SafeByDefaultNetnsTests.value(metrics, "trellis_downstream_requests_total") > 0, "\(vm)")
        }
    }
}
