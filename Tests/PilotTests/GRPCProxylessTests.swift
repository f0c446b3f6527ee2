import Foundation
import Testing
import TrellisTestSupport

@testable import Pilot

/// A stock gRPC proxyless client (PyPI grpcio, `xds:///` target, GRPC_XDS_BOOTSTRAP pointing at
/// pilot) calls a real grpcio health server registered through pilot's HTTP API.
@Suite(
    .serialized,
    .disabled(if: Peers.grpcioMissing, "needs PyPI grpcio and grpcio-health-checking: run scripts/bootstrap.sh")
)
struct GRPCProxylessTests {
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/grpc")

    static func bootstrap(xdsPort: Int) -> String {
        """
        {"xds_servers": [{"server_uri": "127.0.0.1:\(xdsPort)", "channel_creds": [{"type": "insecure"}],
                          "server_features": ["xds_v3"]}],
         "node": {"id": "grpc-client-1", "locality": {"zone": "z1"}, "metadata": {"trellis.role": "proxyless"}}}
        """
    }

    /// The client's last answer line.
    static func lastLine(_ file: URL) -> String { transitions(file).last ?? "" }

    /// The answers without repeats (`OK SERVING`, `ERR UNAVAILABLE`, ...).
    static func transitions(_ file: URL) -> [String] {
        let text = (try? String(contentsOf: file, encoding: .utf8)) ?? ""
        var result: [String] = []
        for line in text.split(separator: "\n").map(String.init) where line.hasPrefix("OK") || line.hasPrefix("ERR") {
            if result.last != line { result.append(line) }
        }
        return result
    }

    @Test func grpcClientFollowsRegistrationsAndSurvivesAPilotRestart() async throws {
        let dir = try Peers.temporaryDirectory("grpc-xds")
        defer { try? FileManager.default.removeItem(at: dir) }
        let serverPort = Peers.freePort()
        let server = try Peers.Child(
            ["python3", Self.fixtures.appendingPathComponent("health_server.py").path, "\(serverPort)"],
            output: dir.appendingPathComponent("server.log")
        )
        defer { server.stop() }
        let registration = """
            {"service": "greeter", "address": "127.0.0.1", "port": \(serverPort), "service_port": 50051,
             "protocol": "grpc", "node": "vm-grpc", "zone": "z1"}
            """

        let database = dir.appendingPathComponent("pilot.db").path
        let xdsPort = Peers.freePort()
        let httpPort = Peers.freePort()
        let bootstrap = dir.appendingPathComponent("xds-bootstrap.json")
        try Self.bootstrap(xdsPort: xdsPort).write(to: bootstrap, atomically: true, encoding: .utf8)
        let output = dir.appendingPathComponent("client.log")
        var client: Peers.Child?
        defer {
            client?.stop()
            print("grpcio client answers, in order:", Self.transitions(output))
        }

        try await PilotHarness.run(store: try SQLiteRegistryStore(path: database), xdsPort: xdsPort, httpPort: httpPort)
        { pilot in
            #expect(await pilot.register(registration) == 201)
            client = try Peers.Child(
                ["python3", Self.fixtures.appendingPathComponent("xds_health_client.py").path, "greeter:50051", "90"],
                environment: ["GRPC_XDS_BOOTSTRAP": bootstrap.path],
                output: output
            )
            #expect(
                await Peers.eventually(within: .seconds(20)) { Self.lastLine(output) == "OK SERVING" },
                "\(Self.lastLine(output))"
            )
            // Every type ACKed (an ACK may trail the first successful call a little), none NACKed.
            let acked = await Peers.eventually(within: .seconds(5)) {
                let status = await pilot.server.sync.status(node: "grpc-client-1")
                return status.count == 4 && status.values.allSatisfy { $0.ackedVersion != nil }
            }
            let status = await pilot.server.sync.status(node: "grpc-client-1")
            #expect(acked && status.values.allSatisfy { $0.lastNack == nil }, "\(status)")

            // The instance is removed: calls fail.
            #expect(await pilot.deregister(service: "greeter", address: "127.0.0.1", port: serverPort) == 204)
            #expect(
                await Peers.eventually(within: .seconds(5)) { Self.lastLine(output).hasPrefix("ERR") },
                "\(Self.lastLine(output))"
            )

            // It comes back: calls succeed again.
            #expect(await pilot.register(registration) == 201)
            #expect(
                await Peers.eventually(within: .seconds(5)) { Self.lastLine(output) == "OK SERVING" },
                "\(Self.lastLine(output))"
            )
        }
        // Pilot is down: the client keeps calling with what it has.
        try await Task.sleep(for: .milliseconds(500))
        #expect(Self.lastLine(output) == "OK SERVING")

        // Pilot restarts on the same store: the registration is there, the client reconnects and
        // follows changes again.
        try await PilotHarness.run(store: try SQLiteRegistryStore(path: database), xdsPort: xdsPort, httpPort: httpPort)
        { pilot in
            #expect(
                await Peers.eventually(within: .seconds(20)) {
                    await pilot.server.sync.connectedNodes.contains("grpc-client-1")
                }
            )
            #expect(Self.lastLine(output) == "OK SERVING")
            #expect(await pilot.deregister(service: "greeter", address: "127.0.0.1", port: serverPort) == 204)
            #expect(
                await Peers.eventually(within: .seconds(5)) { Self.lastLine(output).hasPrefix("ERR") },
                "\(Self.lastLine(output))"
            )
            #expect(await pilot.register(registration) == 201)
            #expect(
                await Peers.eventually(within: .seconds(5)) { Self.lastLine(output) == "OK SERVING" },
                "\(Self.lastLine(output))"
            )
        }
        // From the first answer on (before it, the client may time out while it resolves on a
        // loaded machine): served, removed, back, removed after the restart, back.
        #expect(
            Array(Self.transitions(output).drop { $0 != "OK SERVING" }) == [
                "OK SERVING", "ERR UNAVAILABLE", "OK SERVING", "ERR UNAVAILABLE", "OK SERVING",
            ]
        )
    }

    /// Locality, as the agent has it (AgentTests' LocalityFailoverTests): a proxyless client in
    /// zone-a calls zone-a's server, fails over to zone-b's while zone-a's is drained, and returns.
    @Test func aProxylessClientPrefersItsZoneAndFailsOverLikeTheAgent() async throws {
        let dir = try Peers.temporaryDirectory("grpc-locality")
        defer { try? FileManager.default.removeItem(at: dir) }
        let ports = [Peers.freePort(), Peers.freePort()]
        let echo = Self.fixtures.appendingPathComponent("echo.py").path
        let servers = try zip(ports, ["zone-a", "zone-b"]).map { port, zone in
            try Peers.Child(
                ["python3", echo, "server", "\(port)", zone],
                output: dir.appendingPathComponent("\(zone).log")
            )
        }
        defer { for server in servers { server.stop() } }
        let xdsPort = Peers.freePort()
        let bootstrap = dir.appendingPathComponent("xds-bootstrap.json")
        try """
        {"xds_servers": [{"server_uri": "127.0.0.1:\(xdsPort)", "channel_creds": [{"type": "insecure"}],
                          "server_features": ["xds_v3"]}],
         "node": {"id": "grpc-zone-a", "locality": {"region": "r", "zone": "zone-a"}, "metadata": {"trellis.role": "proxyless"}}}
        """.write(to: bootstrap, atomically: true, encoding: .utf8)
        try await PilotHarness.run(store: try SQLiteRegistryStore(), xdsPort: xdsPort) { pilot in
            for (port, zone) in zip(ports, ["zone-a", "zone-b"]) {
                let body = """
                    {"service": "greeter", "address": "127.0.0.1", "port": \(port), "service_port": 50051,
                     "protocol": "grpc", "node": "vm-\(zone)", "region": "r", "zone": "\(zone)"}
                    """
                #expect(await pilot.register(body) == 201)
            }
            /// Which servers answered 10 calls through the xDS channel.
            func answered() async -> Set<String> {
                let out = await Peers.command([
                    "env", "GRPC_XDS_BOOTSTRAP=\(bootstrap.path)", "python3", echo, "call", "xds:///greeter:50051",
                    "Unary", "10", "-", "5",
                ])
                let calls = (try? JSONSerialization.jsonObject(with: Data(out.stdout.utf8)) as? [[String]]) ?? []
                let servers = Set(calls.map { $0.first == "OK" ? String($0[1].prefix { $0 != ":" }) : $0.first ?? "?" })
                print("proxyless gRPC in zone-a, answered by:", servers.sorted())
                return servers
            }
            #expect(await Peers.eventually(within: .seconds(20)) { await answered() == ["zone-a"] }, "its own zone")
            let status = "\(pilot.api)/v1/instances/greeter/127.0.0.1/\(ports[0])/status"
            #expect(await Peers.http("PUT", status, body: #"{"status": "draining"}"#).status == 200)
            #expect(await Peers.eventually(within: .seconds(20)) { await answered() == ["zone-b"] }, "failed over")
            #expect(await Peers.http("PUT", status, body: #"{"status": "healthy"}"#).status == 200)
            #expect(await Peers.eventually(within: .seconds(20)) { await answered() == ["zone-a"] }, "came back")
        }
    }
}
