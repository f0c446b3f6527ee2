import Foundation
import Testing
import TrellisTestSupport

/// Canaries across the mesh with nothing changed in the programs (issue 16): pilot in the hub,
/// VM A a plain curl client, VMs B and C an unmodified HTTP server each, registered by their agents
/// as `orders` with the labels `version: v1` and `version: v2`. mesh.yaml declares the two subsets
/// and splits `orders` 90/10 over them, and sends `x-canary: 1` to v2. A's agent captures the
/// client's connection and splits as pilot says; B's and C's agents take the requests inbound.
@Suite(.serialized, .disabled(if: NetnsLab.unavailableReason != nil, "\(NetnsLab.unavailableReason ?? "")"))
struct SubsetMeshNetnsTests {
    /// orders:8080 in two subsets by `version`, split 90/10, `x-canary: 1` to v2 (also
    /// EnvoySidecarSubsetNetnsTests').
    static let meshYAML = """
        services:
          - name: orders
            port: 8080
            subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
        routes:
          - service: orders:8080
            rules:
              - match: {headers: [{name: x-canary, exact: "1"}]}
                to: [{service: orders:8080, subset: v2, weight: 1}]
              - to: [{service: orders:8080, subset: v1, weight: 90}, {service: orders:8080, subset: v2, weight: 10}]
        """

    /// agent.yaml's services for a server VM of `version`.
    static func service(_ version: String) -> String {
        "[{name: orders, port: 8080, labels: {version: \(version)}, health_check: {http: /, interval: 1s}}]"
    }

    @Test func aCanaryTakesItsShareAndTheHeaderAcrossThreeAgents() async throws {
        let lab = try await MeshLab(subnet: 24, vms: ["vm-a", "vm-b", "vm-c"])
        defer { lab.destroy() }
        let dir = try Peers.temporaryDirectory("subset-mesh")
        defer { try? FileManager.default.removeItem(at: dir) }
        // VM A finds `orders` by name, as a legacy client does; any instance's address will do.
        let hosts = try NetnsHosts(ns: lab.ns("vm-a"), names: [(lab.ip("vm-b"), "orders")])
        defer { hosts.remove() }
        try Self.meshYAML.write(to: dir.appendingPathComponent("mesh.yaml"), atomically: true, encoding: .utf8)
        let pilot = try lab.startPilot(dir: dir)
        defer { pilot.stop() }
        let servers = try lab.startServers([("vm-b", "v1"), ("vm-c", "v2")])
        defer { servers.forEach { $0.stop() } }
        let agents = try lab.startAgents(
            dir: dir,
            [("vm-b", Self.service("v1"), ""), ("vm-c", Self.service("v2"), ""), ("vm-a", "[]", "")]
        )
        defer { agents.values.forEach { $0.child.stop() } }
        #expect(await lab.healthyInstances("orders", count: 2), "both servers registered healthy")
        // Until A's agent has pilot's subsets, requests pass through to B (v1); then the canary
        // header reaches C (v2) every time.
        var canary = ""
        let routed = await Peers.eventually(within: .seconds(20)) {
            canary = await lab.exec(
                "vm-a",
                ["curl", "-s", "--max-time", "10", "-H", "x-canary: 1", "http://orders:8080/?n=[1-20]"]
            ).stdout
            return canary == String(repeating: "v2\n", count: 20)
        }
        #expect(routed, "x-canary: 1 goes to v2: \(canary.prefix(200))")

        // 2,000 requests on one keep-alive connection: 90 % to v1 within ±3 % of them.
        let split = await lab.exec("vm-a", ["curl", "-s", "--max-time", "60", "http://orders:8080/?n=[1-2000]"])
        let v1 = split.stdout.components(separatedBy: "v1\n").count - 1
        let v2 = split.stdout.components(separatedBy: "v2\n").count - 1
        print("subsets across three agents: v1 \(v1), v2 \(v2) of 2000")
        #expect(v1 + v2 == 2000, "every request answered: \(v1) + \(v2), curl exit \(split.status)")
        #expect(abs(v1 - 1800) <= 60, "\(v1) of 2000 to v1")

        // Proven by A's metrics: the requests went to the subsets' clusters.
        let metricsA = await lab.exec("vm-a", ["curl", "-s", "http://127.0.0.1:15000/stats/prometheus"]).stdout
        let toV1 = SafeByDefaultNetnsTests.value(
            metricsA,
            #"trellis_upstream_requests_total{cluster="outbound|8080|v1|orders",class="2xx"}"#
        )
        let toV2 = SafeByDefaultNetnsTests.value(
            metricsA,
            #"trellis_upstream_requests_total{cluster="outbound|8080|v2|orders",class="2xx"}"#
        )
        #expect(Int(toV1) == v1 && Int(toV2) >= v2 + 20, "metrics \(toV1) / \(toV2) vs answers \(v1) / \(v2) + 20")
    }
}
