import Foundation
import Testing
import TrellisTestSupport

#if canImport(Glibc)
import Glibc
#endif

/// Several pilots with the real binaries: a 3-member etcd cluster and two `trellis-pilot`s in
/// the hub namespace, a real `trellis-agent` on each VM given both pilots. Pilot 1, which both
/// agents use, is SIGKILLed while VM A's plain curl keeps reaching the unmodified server on VM B
/// (by a name that only pilot's routes lead there): both agents move to pilot 2, VM B's lease is
/// renewed there, nothing is refused, and a drain made afterwards reaches VM A through pilot 2.
@Suite(.serialized, .disabled(if: NetnsLab.unavailableReason != nil, "\(NetnsLab.unavailableReason ?? "")"))
struct PilotHANetnsTests {
    @Test(.enabled(if: EtcdCluster.missing == nil, "needs etcd (Debian's etcd-server): run scripts/bootstrap.sh"))
    func agentsMoveToTheOtherPilotAndTrafficGoesOn() async throws {
        let lab = try await MeshLab(subnet: 36, vms: ["vm-a", "vm-b"])
        defer { lab.destroy() }
        let dir = try Peers.temporaryDirectory("pilot-ha")
        defer { try? FileManager.default.removeItem(at: dir) }
        let pilot1 = lab.pilotIP
        let pilot2 = "\(lab.net).253"
        try await MeshLab.sh("ip", "-n", lab.hub, "addr", "add", "\(pilot2)/24", "dev", "br0")
        let b = lab.ip("vm-b")
        // `orders` is an address where nothing answers: only the route from pilot (by the Host
        // header) leads VM A's request to VM B.
        let hosts = try NetnsHosts(ns: lab.ns("vm-a"), names: [("\(lab.net).77", "orders")])
        defer { hosts.remove() }

        let cluster = try await EtcdCluster(namespace: lab.hub)
        defer { cluster.stop() }
        try
            "store: {backend: etcd, etcd: {endpoints: [\(cluster.endpoints.joined(separator: ", "))], call_timeout: 5s}}\n"
            .write(to: dir.appendingPathComponent("pilot.yaml"), atomically: true, encoding: .utf8)
        func startPilot(_ ip: String, _ name: String) throws -> Peers.Child {
            try Peers.Child(
                [
                    "ip", "netns", "exec", lab.hub, MeshEndToEndTests.pilotBinary, "serve", "--config",
                    dir.appendingPathComponent("pilot.yaml").path, "--mesh",
                    dir.appendingPathComponent("mesh.yaml").path,
                    "--xds-address", "\(ip):15010", "--http-address", "\(ip):15014",
                ],
                output: dir.appendingPathComponent("\(name).log")
            )
        }
        let one = try startPilot(pilot1, "pilot-1")
        defer { one.stop() }
        let two = try startPilot(pilot2, "pilot-2")
        defer { two.stop() }
        for ip in [pilot1, pilot2] {
            #expect(
                await Peers.eventually(within: .seconds(20)) {
                    await lab.exec("hub", ["curl", "-sf", "http://\(ip):15014/readyz"]).status == 0
                },
                "pilot on \(ip) ready"
            )
        }

        let server = try Peers.Child([
            "ip", "netns", "exec", lab.ns("vm-b"), "python3", AgentDrainNetnsTests.server, "--host", "0.0.0.0",
            "--port",
            "8080", "--name", "orders",
        ])
        defer { server.stop() }
        // Each agent knows both pilots, and starts on pilot 1.
        func yaml(_ vm: String, first: String, second: String, services: String) -> String {
            MeshEndToEndTests.agentYAML(lab, vm: vm, services: services, stateDir: dir.path).replacingOccurrences(
                of: "pilot: {api: \(lab.pilotIP):15014, xds: \(lab.pilotIP):15010}",
                with: "pilot: {api: [\(first):15014, \(second):15014], xds: [\(first):15010, \(second):15010]}"
            )
        }
        let agentB = try MeshEndToEndTests.Agent(
            lab: lab,
            vm: "vm-b",
            dir: dir,
            yaml: yaml("vm-b", first: pilot1, second: pilot2, services: "[{name: orders, port: 8080, protocol: http}]")
        )
        let agentA = try MeshEndToEndTests.Agent(
            lab: lab,
            vm: "vm-a",
            dir: dir,
            yaml: yaml("vm-a", first: pilot1, second: pilot2, services: "[]")
        )
        defer {
            agentA.child.stop()
            agentB.child.stop()
        }
        func curl() async -> String {
            await lab.exec("vm-a", ["curl", "-s", "--max-time", "5", "http://orders:8080/"]).stdout
        }
        func code() async -> String {
            await lab.exec(
                "vm-a",
                ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", "http://orders:8080/"]
            )
            .stdout
        }
        func status(_ agent: MeshEndToEndTests.Agent) async -> String { await agent.ctl("status", "--json").stdout }
        #expect(await Peers.eventually(within: .seconds(30)) { await curl() == "orders\n" }, "\(agentA.output)")
        #expect(await status(agentA).contains("\(pilot1):15010"), "VM A's xDS is on pilot 1")
        #expect(await status(agentB).contains("\(pilot1):15014"), "VM B registers through pilot 1")

        // Pilot 1 dies. Both agents move to pilot 2 within seconds; requests keep working.
        kill(one.process.processIdentifier, SIGKILL)
        var failures: [String] = []
        let began = ContinuousClock.now
        var moved = (a: false, b: false)
        while ContinuousClock.now - began < .seconds(15) {  // longer than VM B's 10 s lease
            let answer = await curl()
            if answer != "orders\n" { failures.append(answer) }
            if !moved.a { moved.a = await status(agentA).contains("\(pilot2):15010") }
            if !moved.b { moved.b = await status(agentB).contains("\(pilot2):15014") }
            try await Task.sleep(for: .milliseconds(200))
        }
        let (statusA, statusB) = (await status(agentA), await status(agentB))
        #expect(moved.a, "VM A's xDS moved to pilot 2: \(statusA)")
        #expect(moved.b, "VM B's registration moved to pilot 2: \(statusB)")
        #expect(failures.isEmpty, "every request answered while pilot 1 was gone: \(failures)")
        let listed = await lab.exec("hub", ["curl", "-s", "http://\(pilot2):15014/v1/instances?service=orders"]).stdout
        #expect(listed.contains(#""status":"healthy""#) && listed.contains(b), "VM B's lease lives on: \(listed)")
        let log = (try? String(contentsOf: dir.appendingPathComponent("pilot-2.log"), encoding: .utf8)) ?? ""
        #expect(!log.contains("instances removed"), "no instance expired or flapped: \(log.suffix(1000))")

        // A change after the failover goes through pilot 2 both ways: VM B drains, VM A's agent
        // stops sending it requests (no healthy instance left: 503), VM B undrains, back to 200.
        #expect(await agentB.ctl("drain", "--deadline", "1s").status == 0)
        #expect(await Peers.eventually(within: .seconds(10)) { await code() == "503" }, "the drain reached VM A")
        #expect(await agentB.ctl("undrain").status == 0)
        #expect(await Peers.eventually(within: .seconds(10)) { await curl() == "orders\n" }, "and the undrain")
    }
}
