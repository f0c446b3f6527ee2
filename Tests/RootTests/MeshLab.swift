import Foundation
import TrellisTestSupport

/// A small fleet in network namespaces: a hub namespace holding a bridge (and pilot, on
/// `<net>.254`) and one namespace per "VM", each with `eth0` on the bridge. Every address is
/// inside these namespaces; `destroy()` removes them all.
final class MeshLab: Sendable {
    let tag: String
    let hub: String
    let net: String
    let pilotIP: String
    /// VM name → (namespace, address).
    let vms: [String: (ns: String, ip: String)]

    init(subnet: Int, vms names: [String]) async throws {
        tag = "\(getpid() % 10000)\(subnet)"
        hub = "trellis-hub-\(tag)"
        net = "10.78.\(subnet)"
        pilotIP = "\(net).254"
        var vms: [String: (ns: String, ip: String)] = [:]
        for (i, name) in names.enumerated() { vms[name] = ("trellis-\(name)-\(tag)", "\(net).\(i + 1)") }
        self.vms = vms
        do {
            try await Self.sh("ip", "netns", "add", hub)
            try await Self.sh("ip", "-n", hub, "link", "set", "lo", "up")
            try await Self.sh("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
            try await Self.sh("ip", "-n", hub, "addr", "add", "\(pilotIP)/24", "dev", "br0")
            try await Self.sh("ip", "-n", hub, "link", "set", "br0", "up")
            for (i, name) in names.enumerated() {
                let (ns, ip) = vms[name]!
                let inside = "tm\(tag)v\(i)"
                let outside = "tm\(tag)h\(i)"
                try await Self.sh("ip", "netns", "add", ns)
                try await Self.sh("ip", "-n", ns, "link", "set", "lo", "up")
                try await Self.sh(
                    "ip",
                    "link",
                    "add",
                    inside,
                    "netns",
                    ns,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    outside,
                    "netns",
                    hub
                )
                try await Self.sh("ip", "-n", ns, "link", "set", inside, "name", "eth0")
                try await Self.sh("ip", "-n", ns, "addr", "add", "\(ip)/24", "dev", "eth0")
                try await Self.sh("ip", "-n", ns, "link", "set", "eth0", "up")
                try await Self.sh("ip", "-n", hub, "link", "set", outside, "master", "br0", "up")
            }
        } catch {
            destroy()
            throw error
        }
    }

    func ns(_ vm: String) -> String { vms[vm]!.ns }
    func ip(_ vm: String) -> String { vms[vm]!.ip }

    /// The real pilot in the hub, on `pilotIP` (xDS :15010, HTTP API :15014), with its store and
    /// the mesh file `dir/mesh.yaml` in `dir` and its log in `dir/pilot.log`.
    func startPilot(dir: URL) throws -> Peers.Child {
        try Peers.Child(
            [
                "ip", "netns", "exec", hub, MeshEndToEndTests.pilotBinary, "serve", "--store",
                dir.appendingPathComponent("pilot.db").path, "--mesh", dir.appendingPathComponent("mesh.yaml").path,
                "--xds-address", "\(pilotIP):15010", "--http-address", "\(pilotIP):15014",
            ],
            output: dir.appendingPathComponent("pilot.log")
        )
    }

    /// The test HTTP server (Fixtures/http/slow_server.py) on port 8080 of each VM, answering
    /// with the given name.
    func startServers(_ servers: [(vm: String, name: String)]) throws -> [Peers.Child] {
        try servers.map { vm, name in
            try Peers.Child([
                "ip", "netns", "exec", ns(vm), "python3", AgentDrainNetnsTests.server, "--host", "0.0.0.0", "--port",
                "8080", "--name", name,
            ])
        }
    }

    /// An agent on each VM (`trellis-agent run`, pilot in the hub) registering agent.yaml's
    /// `services` value, with `extra` top-level lines appended to its agent.yaml.
    func startAgents(
        dir: URL,
        _ agents: [(vm: String, services: String, extra: String)]
    ) throws -> [String: MeshEndToEndTests.Agent] {
        var started: [String: MeshEndToEndTests.Agent] = [:]
        for (vm, services, extra) in agents {
            started[vm] = try MeshEndToEndTests.Agent(
                lab: self,
                vm: vm,
                dir: dir,
                yaml: MeshEndToEndTests.agentYAML(self, vm: vm, services: services, stateDir: dir.path) + extra
            )
        }
        return started
    }

    /// Whether pilot lists `count` healthy instances of `service` (and its listing contains
    /// `containing`, when given) within `timeout`.
    func healthyInstances(
        _ service: String,
        count: Int,
        containing: String? = nil,
        within timeout: Duration = .seconds(20)
    ) async -> Bool {
        let url = "http://\(pilotIP):15014/v1/instances?service=\(service)"
        return await Peers.eventually(within: timeout) {
            let listed = await self.exec("hub", ["curl", "-s", url]).stdout
            return listed.components(separatedBy: #""status":"healthy""#).count == count + 1
                && containing.map(listed.contains) ?? true
        }
    }

    /// Runs a command inside a VM (or the hub).
    func exec(_ vm: String, _ arguments: [String]) async -> (status: Int32, stdout: String, stderr: String) {
        let ns = vm == "hub" ? hub : self.ns(vm)
        return await Peers.command(["ip", "netns", "exec", ns] + arguments)
    }

    /// `iptables-save` of a VM as rules and chains: counters and comments dropped, and a table
    /// holding nothing (built-in chains with ACCEPT policies, no rule) left out — with the nft back
    /// end such a table stays once a program has used it, and it filters nothing.
    func rules(_ vm: String) async -> String {
        Self.meaningful(await exec(vm, ["iptables-save"]).stdout)
    }

    static func meaningful(_ save: String) -> String {
        var out: [String] = []
        var table: [String] = []
        for line in save.split(separator: "\n").map(String.init) where !line.hasPrefix("#") {
            let plain = line.replacingOccurrences(of: #"\[\d+:\d+\]"#, with: "", options: .regularExpression)
            if plain.hasPrefix("*") {
                table = [plain]
            } else if plain == "COMMIT" {
                let empty = table.dropFirst().allSatisfy { $0.hasPrefix(":") && $0.hasSuffix(" ACCEPT ") }
                if !empty { out += table + [plain] }
                table = []
            } else {
                table.append(plain)
            }
        }
        return out.joined(separator: "\n")
    }

    func destroy() {
        for ns in vms.values.map(\.ns) + [hub] {
            _ = try? Process.run(URL(fileURLWithPath: "/usr/bin/env"), arguments: ["ip", "netns", "del", ns])
                .waitUntilExit()
        }
    }

    @discardableResult
    static func sh(_ arguments: String...) async throws -> String {
        let r = await Peers.command(arguments)
        guard r.status == 0 else {
            throw LabError("\(arguments.joined(separator: " ")): exit \(r.status): \(r.stderr)")
        }
        return r.stdout
    }
}
