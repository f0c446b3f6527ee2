import Foundation
import Pilot
import Proxy
import Testing
import TrellisTestSupport

@testable import Agent

/// mesh.yaml's balancing policies through the real pilot and the agent's data path.
@Suite struct BalancingThroughPilotTests {
    /// The keep-alive test server with per-instance names and delays.
    static let server = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/http/slow_server.py").path

    /// Pilot with `orders:8080` under the policy `policy` (a mesh.yaml policy entry's keys) and one
    /// registered instance per port, and the agent's data path once it has them all.
    private func withOrders(
        policy: String,
        ports: [Int],
        _ body: (PilotHarness, AgentDataPath) async throws -> Void
    ) async throws {
        let yaml = """
            services:
              - {name: orders, port: 8080}
            policies:
              - {service: orders:8080, \(policy)}
            """
        let mesh = try MeshConfigLoader.parse(yaml: yaml, file: "mesh.yaml")
        try await PilotHarness.run(store: try SQLiteRegistryStore(), mesh: mesh) { pilot in
            for (i, port) in ports.enumerated() {
                let registration =
                    #"{"service": "orders", "address": "127.0.0.1", "port": \#(port), "service_port": 8080, "node": "vm-\#(i)"}"#
                #expect(await pilot.register(registration) == 201)
            }
            let agent = try await AgentDataPath(pilot: pilot)
            #expect(
                await Peers.eventually(within: .seconds(5)) {
                    agent.cluster("outbound|8080||orders")?.endpoints.count == ports.count
                }
            )
            try await body(pilot, agent)
            await agent.stop()
        }
    }

    /// Ring hash on a header: each key stays on one instance, and when one of N instances leaves,
    /// its keys (about 1/N) move and few others do: the ring keeps its minimum size, so each
    /// survivor gains points (256 → 342 of 1,024 here), which take some keys from other survivors,
    /// as Envoy's ring does.
    @Test func ringHashKeepsEachKeyOnOneInstanceAndMovesOnlyTheLeaversKeys() async throws {
        let dir = try Peers.temporaryDirectory("ring-hash")
        defer { try? FileManager.default.removeItem(at: dir) }
        let ports = (0..<4).map { _ in Peers.freePort() }
        let apps = try ports.enumerated().map { i, port in
            try Peers.pythonHTTPServer(port: port, body: "i\(i)", root: dir)
        }
        defer { for app in apps { app.stop() } }
        try await withOrders(policy: "lb_policy: ring_hash, ring_hash: {header: x-user}", ports: ports) {
            pilot,
            agent in
            let keys = (0..<120).map { "user-\($0)" }
            /// Which instance answered each key, asked `times` times in a row (nil when they differ).
            func owners(times: Int = 2) async -> [String: String?] {
                var arguments = ["curl"]
                for key in keys {
                    for _ in 0..<times {
                        arguments += [
                            "-s", "-H", "Host: orders:8080", "-H", "x-user: \(key)",
                            "http://127.0.0.1:\(agent.outboundPort)/hello", "--next",
                        ]
                    }
                }
                arguments.removeLast()
                let out = await Peers.command(arguments).stdout
                let answers = stride(from: 0, to: out.count, by: 2).map { i -> String in
                    let start = out.index(out.startIndex, offsetBy: i)
                    return String(out[start..<out.index(start, offsetBy: 2, limitedBy: out.endIndex)!])
                }
                var result: [String: String?] = [:]
                for (k, key) in keys.enumerated() {
                    let mine = answers[(k * times)..<min(answers.count, (k + 1) * times)]
                    result[key] = Set(mine).count == 1 ? mine.first : nil
                }
                return result
            }
            let before = await owners()
            #expect(before.values.allSatisfy { $0 != nil }, "every key answered by one instance each time")
            let spread = Dictionary(grouping: before.values.compactMap { $0 }, by: { $0 }).mapValues(\.count)
            #expect(spread.count == 4, "keys over every instance: \(spread)")

            // i3 leaves: only its keys move.
            #expect(await pilot.deregister(service: "orders", address: "127.0.0.1", port: ports[3]) == 204)
            #expect(
                await Peers.eventually(within: .seconds(5)) {
                    agent.cluster("outbound|8080||orders")?.endpoints.count == 3
                }
            )
            let after = await owners()
            let moved = keys.filter { after[$0]! != before[$0]! }
            let onLeaver = keys.filter { before[$0]! == "i3" }
            let others = Set(moved).subtracting(onLeaver)
            #expect(Set(onLeaver).isSubset(of: Set(moved)), "every key of i3 moved")
            #expect(
                others.count <= keys.count / 4,
                "\(others.count) keys moved between the instances that stayed (modulo hashing: about 2/3)"
            )
            #expect((12...60).contains(onLeaver.count), "about a quarter of 120 keys were on i3: \(onLeaver.count)")
            print(
                "ring hash through the agent: \(spread); i3 left: its \(onLeaver.count) keys moved, and \(others.count) others"
            )
        }
    }

    /// Least request: a slowed instance gets fewer of the concurrent requests than its share.
    /// Slowed by 250 ms: on a machine loaded by the other suites the fast instance (Python too)
    /// can take tens of milliseconds, and at 100 ms the slowed one got 78 of 300 once in CI.
    @Test func leastRequestSendsLessToASlowedInstance() async throws {
        let ports = [Peers.freePort(), Peers.freePort()]
        let server = Self.server
        let fast = try Peers.Child([
            "python3", server, "--host", "127.0.0.1", "--port", "\(ports[0])", "--name", "fast",
        ])
        defer { fast.stop() }
        let slow = try Peers.Child([
            "python3", server, "--host", "127.0.0.1", "--port", "\(ports[1])", "--name", "slow", "--delay-ms", "250",
        ])
        defer { slow.stop() }
        try await withOrders(policy: "lb_policy: least_request", ports: ports) { _, agent in
            #expect(
                await Peers.eventually(within: .seconds(5)) { await agent.get(2, host: "orders:8080").contains("fast") }
            )
            let out = await agent.get(300, host: "orders:8080", parallel: 10)
            let toFast = out.components(separatedBy: "fast\n").count - 1
            let toSlow = out.components(separatedBy: "slow\n").count - 1
            print("least request through the agent: fast \(toFast), slow \(toSlow) of 300")
            #expect(toFast + toSlow == 300, "every request answered")
            #expect(toSlow < 75, "the slowed instance got \(toSlow) of 300 (round robin would give it 150)")
        }
    }
}
