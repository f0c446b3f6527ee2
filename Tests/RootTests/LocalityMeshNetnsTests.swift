import Foundation
import Testing
import TrellisTestSupport

/// Locality across the mesh (issue 16): pilot in the hub, VM A (a plain curl client) and VM B in
/// zone-a, VM C in zone-b, each agent saying where it runs in agent.yaml (`locality:`). A's agent
/// sends `orders` to B, its own zone; when B's agent drains (`trellis-agent drain`), to C; back to
/// B after `trellis-agent undrain`; and when B's server dies, to C without a failed request (the
/// first failure — B's agent answers 503, its local server gone — ejects B, and mesh.yaml's retry
/// sends the request again, to C).
@Suite(.serialized, .disabled(if: NetnsLab.unavailableReason != nil, "\(NetnsLab.unavailableReason ?? "")"))
struct LocalityMeshNetnsTests {
    @Test func aClientPrefersItsZoneFailsOverAndReturnsAcrossAgents() async throws {
        let lab = try await MeshLab(subnet: 25, vms: ["vm-a", "vm-b", "vm-c"])
        defer { lab.destroy() }
        let dir = try Peers.temporaryDirectory("locality-mesh")
        defer { try? FileManager.default.removeItem(at: dir) }
        // VM A finds `orders` by name; any instance's address will do (the agent routes by Host).
        let hosts = try NetnsHosts(ns: lab.ns("vm-a"), names: [(lab.ip("vm-c"), "orders")])
        defer { hosts.remove() }
        try """
        services:
          - {name: orders, port: 8080}
        policies:
          - service: orders:8080
            outlier_detection: {consecutive_errors: 1, base_ejection_time: 60s, max_ejection_percent: 100}
            retry_policy: {retry_on: [connect-failure, reset, gateway-error], num_retries: 2}
        """.write(to: dir.appendingPathComponent("mesh.yaml"), atomically: true, encoding: .utf8)
        let pilot = try lab.startPilot(dir: dir)
        defer { pilot.stop() }
        let servers = try lab.startServers([("vm-b", "vm-b"), ("vm-c", "vm-c")])
        defer { servers.forEach { $0.stop() } }
        let service = "[{name: orders, port: 8080, health_check: {http: /, interval: 1s}}]"
        let agents = try lab.startAgents(
            dir: dir,
            [
                ("vm-b", service, "locality: {region: eu, zone: zone-a}\n"),
                ("vm-c", service, "locality: {region: eu, zone: zone-b}\n"),
                ("vm-a", "[]", "locality: {region: eu, zone: zone-a}\n"),
            ]
        )
        defer { agents.values.forEach { $0.child.stop() } }
        #expect(
            await lab.healthyInstances("orders", count: 2, containing: #""zone":"zone-b""#),
            "both servers registered healthy, with their zones"
        )
        /// Which servers answered 20 requests from A.
        func servedBy() async -> Set<String> {
            let out = await lab.exec("vm-a", ["curl", "-s", "--max-time", "20", "http://orders:8080/?n=[1-20]"]).stdout
            return Set(out.split(separator: "\n").map(String.init))
        }
        // Until A's agent has pilot's endpoints, requests pass through to C (the address A dialed).
        var last: Set<String> = []
        #expect(
            await Peers.eventually(within: .seconds(20)) {
                last = await servedBy()
                return last == ["vm-b"]
            },
            "A's own zone: \(last)"
        )

        // B drains: A's agent sends everything to C, in the other zone; B comes back: to B again.
        let drain = await agents["vm-b"]!.ctl("drain", "--deadline", "5s")
        #expect(drain.status == 0, "\(drain)")
        #expect(await Peers.eventually(within: .seconds(10)) { await servedBy() == ["vm-c"] }, "failed over")
        let undrain = await agents["vm-b"]!.ctl("undrain")
        #expect(undrain.status == 0, "\(undrain)")
        #expect(await Peers.eventually(within: .seconds(10)) { await servedBy() == ["vm-b"] }, "came back")

        // B's server dies: the first failure ejects it and is tried again in zone-b; nothing fails.
        servers[0].stop()
        let codes = await lab.exec(
            "vm-a",
            [
                "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}\n", "--max-time", "20",
                "http://orders:8080/?n=[1-20]",
            ]
        ).stdout
        #expect(codes == String(repeating: "200\n", count: 20), "\(codes)")
        #expect(await servedBy() == ["vm-c"])
        // Proven by A's metrics: the retry that went to zone-b, and B's ejection.
        let metrics = await lab.exec("vm-a", ["curl", "-s", "http://127.0.0.1:15000/stats/prometheus"]).stdout
        #expect(
            SafeByDefaultNetnsTests.value(metrics, #"trellis_upstream_retries_total{cluster="outbound|8080||orders"}"#)
                >= 1
        )
    }
}
