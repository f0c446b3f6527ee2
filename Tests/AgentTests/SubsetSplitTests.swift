import Foundation
import Pilot
import Proxy
import Testing
import TrellisTestSupport

@testable import Agent

/// mesh.yaml subsets through the real pilot, the agent's xDS client and its data path: a route
/// splits a service's traffic 90/10 over two subsets chosen by instance labels, and a header
/// sends a request to the canary subset.
@Suite struct SubsetSplitTests {
    @Test func aRouteSplitsOverSubsetsByWeightAndAHeaderPicksTheCanary() async throws {
        let dir = try Peers.temporaryDirectory("subsets")
        defer { try? FileManager.default.removeItem(at: dir) }
        let ports = [Peers.freePort(), Peers.freePort()]
        let apps = try zip(ports, ["v1", "v2"]).map { port, version in
            try Peers.pythonHTTPServer(port: port, body: version, root: dir)
        }
        defer { for app in apps { app.stop() } }
        let yaml = """
            services:
              - name: orders
                port: 8080
                instances:
                  - {address: 127.0.0.1, port: \(ports[0]), labels: {version: v1}}
                  - {address: 127.0.0.1, port: \(ports[1]), labels: {version: v2}}
                subsets:
                  - {name: v1, labels: {version: v1}}
                  - {name: v2, labels: {version: v2}}
            routes:
              - service: orders:8080
                rules:
                  - match: {headers: [{name: x-canary, exact: "1"}]}
                    to: [{service: orders:8080, subset: v2, weight: 1}]
                  - to:
                      - {service: orders:8080, subset: v1, weight: 90}
                      - {service: orders:8080, subset: v2, weight: 10}
            """
        let mesh = try MeshConfigLoader.parse(yaml: yaml, file: "mesh.yaml")
        try await PilotHarness.run(store: try SQLiteRegistryStore(), mesh: mesh) { pilot in
            let agent = try await AgentDataPath(pilot: pilot)
            #expect(
                await Peers.eventually(within: .seconds(5)) {
                    ["outbound|8080|v1|orders", "outbound|8080|v2|orders"].allSatisfy {
                        agent.cluster($0)?.endpoints.count == 1
                    }
                }
            )
            // Each subset's cluster holds its own instance only.
            #expect(agent.cluster("outbound|8080|v2|orders")?.endpoints.map(\.address.port) == [ports[1]])
            #expect(
                await Peers.eventually(within: .seconds(5)) {
                    let first = await Peers.http("GET", "http://127.0.0.1:\(ports[0])/hello").status
                    let second = await Peers.http("GET", "http://127.0.0.1:\(ports[1])/hello").status
                    return first == 200 && second == 200
                }
            )

            // 2,000 requests on one keep-alive connection (curl's URL range).
            let split = await agent.get(2000, host: "orders:8080")
            let v1 = split.components(separatedBy: "v1").count - 1
            let v2 = split.components(separatedBy: "v2").count - 1
            #expect(v1 + v2 == 2000, "every request answered: \(v1) + \(v2)")
            #expect(abs(v1 - 1800) <= 60, "90 % to v1 within ±3 % of the requests: \(v1) of 2000")
            print("subsets through the agent: v1 \(v1), v2 \(v2) of 2000")

            // The canary header: every request to v2.
            let canary = await agent.get(100, host: "orders:8080", headers: ["x-canary: 1"])
            #expect(canary == String(repeating: "v2", count: 100), "\(canary.prefix(300))")
            await agent.stop()
        }
    }
}
