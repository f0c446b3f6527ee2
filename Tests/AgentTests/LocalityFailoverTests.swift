import Foundation
import Pilot
import Proxy
import Testing
import TrellisPolicy
import TrellisTestSupport

@testable import Agent

/// Locality through the real pilot and the agent's data path: an agent in zone-a sends its
/// requests to zone-a's instance, fails over to zone-b's when zone-a's is drained or ejected, and
/// comes back when it returns.
@Suite struct LocalityFailoverTests {
    @Test func theAgentPrefersItsZoneFailsOverAndReturns() async throws {
        let dir = try Peers.temporaryDirectory("locality")
        defer { try? FileManager.default.removeItem(at: dir) }
        let ports = [Peers.freePort(), Peers.freePort()]
        var apps = try zip(ports, ["zone-a", "zone-b"]).map { port, zone in
            try Peers.pythonHTTPServer(port: port, body: zone, root: dir)
        }
        defer { for app in apps { app.stop() } }
        let yaml = """
            services:
              - {name: orders, port: 8080}
            policies:
              - service: orders:8080
                outlier_detection: {consecutive_errors: 1, base_ejection_time: 30s, max_ejection_percent: 100}
                retry_policy: {retry_on: [connect-failure], num_retries: 2}
            """
        let mesh = try MeshConfigLoader.parse(yaml: yaml, file: "mesh.yaml")
        try await PilotHarness.run(store: try SQLiteRegistryStore(), mesh: mesh) { pilot in
            for (port, zone) in zip(ports, ["zone-a", "zone-b"]) {
                let body = """
                    {"service": "orders", "address": "127.0.0.1", "port": \(port), "service_port": 8080, "node": "vm-\(zone)", "region": "eu", "zone": "\(zone)"}
                    """
                #expect(await pilot.register(body) == 201)
            }
            let agent = try await AgentDataPath(pilot: pilot, locality: Locality(region: "eu", zone: "zone-a"))
            #expect(
                await Peers.eventually(within: .seconds(5)) {
                    agent.cluster("outbound|8080||orders")?.endpoints.map(\.priority).sorted() == [0, 1]
                },
                "zone-a's instance first, zone-b's next"
            )
            func sample(_ count: Int = 20) async -> Set<String> {
                let out = await agent.get(count, host: "orders:8080")
                return Set(out.components(separatedBy: "zone-").dropFirst().map { "zone-" + $0 })
            }
            #expect(await sample() == ["zone-a"], "its own zone only")

            // Drained: the agent fails over to zone-b; back: it returns.
            let drain = "\(pilot.api)/v1/instances/orders/127.0.0.1/\(ports[0])/status"
            #expect(await Peers.http("PUT", drain, body: #"{"status": "draining"}"#).status == 200)
            #expect(await Peers.eventually(within: .seconds(5)) { await sample() == ["zone-b"] }, "failed over")
            #expect(await Peers.http("PUT", drain, body: #"{"status": "healthy"}"#).status == 200)
            #expect(await Peers.eventually(within: .seconds(5)) { await sample() == ["zone-a"] }, "came back")

            // Zone-a's server dies: the first failure ejects it (the try goes again, to zone-b), and
            // zone-b takes everything while zone-a is out; no request fails.
            apps[0].stop()
            apps.removeFirst()
            let after = await Peers.command([
                "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}\n", "-H", "Host: orders:8080",
                "http://127.0.0.1:\(agent.outboundPort)/hello?n=[1-20]",
            ])
            #expect(after.stdout == String(repeating: "200\n", count: 20), "\(after.stdout)")
            #expect(await sample() == ["zone-b"])
            await agent.stop()
        }
    }
}
