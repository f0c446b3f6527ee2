import Foundation
import Interceptor
import Testing
import TrellisTestSupport

#if canImport(Glibc)
import Glibc
#endif

/// The promise to an operator: installing the agent never takes a machine off the network. The
/// real binary in namespaces, a legacy client opening a new connection for every request
/// (`Fixtures/net/connect_loop.py`), and what it notices: IPv6 served like IPv4 (outbound and
/// inbound, HTTP and raw TCP), no signal that refuses a connection, the installed default's gate
/// failing open when the agent is killed, SIGHUP reloading agent.yaml (and refusing a bad one).
@Suite(.serialized, .disabled(if: NetnsLab.unavailableReason != nil, "\(NetnsLab.unavailableReason ?? "")"))
struct SafeByDefaultNetnsTests {
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures")
    static let repository = fixtures.deletingLastPathComponent().deletingLastPathComponent()
    static let loop = fixtures.appendingPathComponent("net/connect_loop.py").path
    static let echo = fixtures.appendingPathComponent("net/echo_server.py").path
    static let http = fixtures.appendingPathComponent("http/slow_server.py").path

    /// One `trellis-agent run` in namespace `ns`, with its own control socket and log.
    final class Agent: Sendable {
        let child: Peers.Child
        let ns: String
        let socket: String
        let log: URL

        init(ns: String, dir: URL, config: URL, name: String) throws {
            self.ns = ns
            socket = dir.appendingPathComponent("\(name).sock").path
            log = dir.appendingPathComponent("\(name).log")
            child = try Peers.Child(
                [
                    "ip", "netns", "exec", ns, AgentPathNetnsTests.binary, "run", "--config", config.path,
                    "--event-loops", "1", "--control-socket", socket,
                ],
                output: log
            )
        }

        var output: String { (try? String(contentsOf: log, encoding: .utf8)) ?? "" }
        var pid: Int32 { child.process.processIdentifier }
        var running: Bool { child.process.isRunning }

        func ctl(_ arguments: String...) async -> (status: Int32, stdout: String, stderr: String) {
            await Peers.command([AgentPathNetnsTests.binary] + arguments + ["--socket", socket])
        }

        /// Ready: the control socket answers and the rules are in the kernel.
        func ready() async -> Bool {
            await Peers.eventually(within: .seconds(20)) {
                guard await ctl("status").status == 0 else { return false }
                return await SafeByDefaultNetnsTests.save(ns).contains("TRELLIS_OUTPUT")
            }
        }

        func metrics() async -> String {
            await Peers.command([
                "ip", "netns", "exec", ns, "curl", "-s", "--max-time", "2", "http://127.0.0.1:15000/stats/prometheus",
            ]).stdout
        }

        func exited(within timeout: Duration) async -> Bool {
            await Peers.eventually(within: timeout) { !child.process.isRunning }
        }
    }

    /// What `connect_loop.py` printed.
    struct LoopResult: Decodable {
        struct PerTarget: Decodable {
            var ok: Int
            var failed: Int
        }
        var ok: Int
        var failed: Int
        var targets: [String: PerTarget]
        var errors: [String]
        var refused: Int { errors.filter { $0.contains("ConnectionRefused") }.count }
    }

    /// A client loop in namespace `ns` until `stop()`: one new connection per request.
    final class ClientLoop: Sendable {
        let stopFile: URL
        let task: Task<(status: Int32, stdout: String, stderr: String), Never>

        /// `minEach`: the loop ends by itself once every target answered that many times (or
        /// after `seconds`); otherwise it runs until ``stop()``.
        init(
            ns: String,
            dir: URL,
            targets: [String],
            intervalMilliseconds: Int = 20,
            minEach: Int? = nil,
            seconds: Int = 60
        ) {
            stopFile = dir.appendingPathComponent("stop-\(UUID().uuidString)")
            let arguments =
                ["ip", "netns", "exec", ns, "python3", SafeByDefaultNetnsTests.loop, "--seconds", "\(seconds)"]
                + ["--interval-ms", "\(intervalMilliseconds)", "--stop-file", stopFile.path]
                + (minEach.map { ["--min-each", "\($0)"] } ?? [])
                + targets.flatMap { ["--target", $0] }
            task = Task { await Peers.command(arguments) }
        }

        func stop() async throws -> LoopResult {
            _ = FileManager.default.createFile(atPath: stopFile.path, contents: nil)
            return try await result()
        }

        /// The loop's result once it ended by itself.
        func result() async throws -> LoopResult {
            let out = await task.value
            guard let line = out.stdout.split(separator: "\n").last,
                let result = try? JSONDecoder().decode(LoopResult.self, from: Data(line.utf8))
            else {
                throw LabError("connect_loop.py: exit \(out.status): \(out.stdout) \(out.stderr)")
            }
            return result
        }
    }

    static func save(_ ns: String) async -> String {
        let v4 = await Peers.command(["ip", "netns", "exec", ns, "iptables-save"]).stdout
        let v6 = await Peers.command(["ip", "netns", "exec", ns, "ip6tables-save"]).stdout
        return MeshLab.meaningful(v4 + v6)
    }

    /// The value of one metric line (`name{labels}`), 0 when absent.
    static func value(_ metrics: String, _ series: String) -> Double {
        for line in metrics.split(separator: "\n") where line.hasPrefix(series + " ") {
            return Double(line.dropFirst(series.count + 1)) ?? 0
        }
        return 0
    }

    /// The installed default agent.yaml (init/agent.yaml), as the package puts it on a machine,
    /// with its access log in `dir` instead of /var/log/trellis (the test machine's).
    static func installedDefault(into dir: URL) throws -> URL {
        let installed = try String(
            contentsOf: repository.appendingPathComponent("init/agent.yaml"),
            encoding: .utf8
        )
        let text = installed.replacingOccurrences(
            of: "/var/log/trellis/access.log",
            with: dir.appendingPathComponent("access.log").path
        )
        guard text != installed else { throw CocoaError(.fileReadCorruptFile) }
        let file = dir.appendingPathComponent("agent.yaml")
        try ("node: vm-a\n" + text).write(to: file, atomically: true, encoding: .utf8)
        return file
    }

    // MARK: IPv6

    /// Finding 1 of issue 13: with the defaults (ip6tables capture on), every redirected IPv6
    /// connection was refused (the agent listened on 0.0.0.0 only). Now IPv4 and IPv6, HTTP and
    /// raw TCP, cross an agent on each side (outbound on A, inbound on B to ::1 / 127.0.0.1), under
    /// a mixed client load, with nothing refused.
    @Test func ipv6IsCapturedAndServedLikeIPv4OnBothSides() async throws {
        let lab = try NetnsLab(subnet: 31)
        defer { lab.destroy() }
        let dir = try Peers.temporaryDirectory("ipv6")
        defer { try? FileManager.default.removeItem(at: dir) }
        let server = try Peers.Child(
            [
                "ip", "netns", "exec", lab.b, "python3", Self.http, "--host", "::", "--port", "8080", "--name",
                "legacy-b",
            ]
        )
        defer { server.stop() }
        let echo = try Peers.Child(["ip", "netns", "exec", lab.b, "python3", Self.echo, "--port", "9000"])
        defer { echo.stop() }

        let configA = dir.appendingPathComponent("a.yaml")
        try "node: vm-a\n".write(to: configA, atomically: true, encoding: .utf8)
        let configB = dir.appendingPathComponent("b.yaml")
        try "node: vm-b\n".write(to: configB, atomically: true, encoding: .utf8)
        let agentA = try Agent(ns: lab.a, dir: dir, config: configA, name: "a")
        defer { agentA.child.stop() }
        let agentB = try Agent(ns: lab.b, dir: dir, config: configB, name: "b")
        defer { agentB.child.stop() }
        defer {
            _ = try? lab.capture(in: lab.a).remove()
            _ = try? lab.capture(in: lab.b).remove()
        }
        #expect(await agentA.ready(), "\(agentA.output)")
        #expect(await agentB.ready(), "\(agentB.output)")
        let rulesA = await Self.save(lab.a)
        #expect(rulesA.contains("-A TRELLIS_OUTPUT -d ::1/128 -j RETURN"), "ip6tables rules installed: \(rulesA)")

        let status = await agentA.ctl("status")
        #expect(status.stdout.contains("outbound   [::]:15001"), "\(status.stdout)")
        #expect(status.stdout.contains("inbound    [::]:15006"), "\(status.stdout)")

        // curl as a user would run it: IPv6 by literal address.
        let curl6 = await Peers.command([
            "ip", "netns", "exec", lab.a, "curl", "-s", "--max-time", "5", "http://[\(lab.bAddress6)]:8080/",
        ])
        #expect(curl6.status == 0 && curl6.stdout == "legacy-b\n", "curl exit \(curl6.status): \(curl6.stdout)")

        let targets = [
            "http:\(lab.bAddress):8080", "http:[\(lab.bAddress6)]:8080",
            "tcp:\(lab.bAddress):9000", "tcp:[\(lab.bAddress6)]:9000",
        ]
        // Until each target answered 20 times (at most 30 s: a loaded machine runs the loop slower).
        let load = ClientLoop(ns: lab.a, dir: dir, targets: targets, intervalMilliseconds: 5, minEach: 20, seconds: 30)
        let result = try await load.result()
        #expect(result.failed == 0, "\(result.errors)")
        for target in targets {
            #expect((result.targets[target]?.ok ?? 0) >= 20, "\(target): \(String(describing: result.targets[target]))")
        }
        let httpOK = Double(result.targets[targets[0]]!.ok + result.targets[targets[1]]!.ok + 1)
        let tcpOK = Double(result.targets[targets[2]]!.ok + result.targets[targets[3]]!.ok)
        // Both agents saw every request and every TCP connection: A as outbound, B as inbound
        // (forwarded to loopback). A keeps its connections to B alive, so B counts requests.
        for (name, metrics) in [("A", await agentA.metrics()), ("B", await agentB.metrics())] {
            let requests = Self.value(metrics, "trellis_downstream_requests_total")
            let tcp = Self.value(metrics, #"trellis_sniffed_connections_total{protocol="tcp"}"#)
            #expect(requests == httpOK, "agent \(name): \(requests) HTTP requests served, \(httpOK) answered")
            #expect(tcp == tcpOK, "agent \(name): \(tcp) TCP connections relayed, \(tcpOK) answered")
        }
    }

    /// HTTP routed by pilot over IPv6: VM B's agent registers `orders` at its IPv6 address, VM A
    /// finds `orders` by name (an IPv6 address in its hosts file), and A's agent routes the
    /// captured IPv6 connection by Host to pilot's cluster, whose IPv6 endpoint B's agent takes
    /// inbound and forwards to the legacy server on ::1.
    @Test func httpRoutedByPilotCrossesTwoAgentsOverIPv6() async throws {
        let lab = try NetnsLab(subnet: 34)
        defer { lab.destroy() }
        let dir = try Peers.temporaryDirectory("ipv6-pilot")
        defer { try? FileManager.default.removeItem(at: dir) }
        let hosts = try NetnsHosts(ns: lab.a, names: [(lab.bAddress6, "orders")])
        defer { hosts.remove() }
        // Pilot on VM B's IPv4 address (its ports are never captured).
        let pilot = try Peers.Child(
            [
                "ip", "netns", "exec", lab.b, MeshEndToEndTests.pilotBinary, "serve", "--store",
                dir.appendingPathComponent("pilot.db").path, "--mesh", dir.appendingPathComponent("mesh.yaml").path,
                "--xds-address", "\(lab.bAddress):15010", "--http-address", "\(lab.bAddress):15014",
            ],
            output: dir.appendingPathComponent("pilot.log")
        )
        defer { pilot.stop() }
        let server = try Peers.Child(
            [
                "ip", "netns", "exec", lab.b, "python3", Self.http, "--host", "::", "--port", "8080", "--name",
                "orders-b",
            ]
        )
        defer { server.stop() }
        let pilotAddress = "pilot: {api: \(lab.bAddress):15014, xds: \(lab.bAddress):15010}"
        let configA = dir.appendingPathComponent("a.yaml")
        try "node: vm-a\n\(pilotAddress)\nstate_dir: \(dir.path)/a\n".write(
            to: configA,
            atomically: true,
            encoding: .utf8
        )
        let configB = dir.appendingPathComponent("b.yaml")
        try """
        node: vm-b
        \(pilotAddress)
        register: {address: "\(lab.bAddress6)", ttl: 10s}
        services: [{name: orders, port: 8080, protocol: http, health_check: {http: /, interval: 1s}}]
        state_dir: \(dir.path)/b

        """.write(to: configB, atomically: true, encoding: .utf8)
        let agentB = try Agent(ns: lab.b, dir: dir, config: configB, name: "b")
        defer { agentB.child.stop() }
        let agentA = try Agent(ns: lab.a, dir: dir, config: configA, name: "a")
        defer { agentA.child.stop() }
        defer {
            _ = try? lab.capture(in: lab.a).remove()
            _ = try? lab.capture(in: lab.b).remove()
        }
        #expect(await agentA.ready(), "\(agentA.output)")
        #expect(await agentB.ready(), "\(agentB.output)")
        let cluster = #"cluster="outbound|8080||orders""#
        #expect(
            await Peers.eventually(within: .seconds(20)) {
                let answer = await Peers.command([
                    "ip", "netns", "exec", lab.a, "curl", "-s", "--max-time", "3", "http://orders:8080/",
                ]).stdout
                // Routed by pilot's cluster (not passed through): its 2xx count moved. B registers
                // once its health check passes, so the first answers may be passthrough ones.
                let metrics = await agentA.metrics()
                return answer == "orders-b\n"
                    && Self.value(metrics, "trellis_upstream_requests_total{\(cluster),class=\"2xx\"}") >= 1
            },
            "A: \(agentA.output)\nB: \(agentB.output)"
        )
        for _ in 0..<10 {
            let answer = await Peers.command([
                "ip", "netns", "exec", lab.a, "curl", "-s", "-6", "--max-time", "3", "http://orders:8080/",
            ])
            #expect(answer.stdout == "orders-b\n", "\(answer)")
        }
        let metricsA = await agentA.metrics()
        let routed = Self.value(metricsA, "trellis_upstream_requests_total{\(cluster),class=\"2xx\"}")
        #expect(routed >= 11, "A routed by pilot's cluster: \(metricsA)")
        let inbound = Self.value(await agentB.metrics(), "trellis_downstream_requests_total")
        #expect(inbound >= 10, "B took them inbound over IPv6")
        let status = await agentB.ctl("status")
        #expect(status.stdout.contains("orders port 8080 (service port 8080): registered, healthy"), "\(status.stdout)")
    }

    // MARK: Signals and the fail-open default

    /// Findings 2 and 3 of issue 13: SIGHUP used to kill the agent and leave its rules (every new
    /// connection refused), and without a gate a killed agent left the rules pointing at nothing.
    /// With the installed default configuration, each signal is sent to an agent while a client
    /// opens new connections (IPv4 and IPv6); none is refused. SIGKILL leaves the rules but the
    /// gate fails open; a restarted agent (what systemd's Restart= does) takes over again.
    @Test func noSignalRefusesAConnectionWithTheInstalledDefault() async throws {
        let lab = try NetnsLab(subnet: 32)
        defer { lab.destroy() }
        let dir = try Peers.temporaryDirectory("signals")
        defer { try? FileManager.default.removeItem(at: dir) }
        let server = try Peers.Child(
            [
                "ip", "netns", "exec", lab.b, "python3", Self.http, "--host", "::", "--port", "8080", "--name",
                "legacy-b",
            ]
        )
        defer { server.stop() }
        let config = try Self.installedDefault(into: dir)
        let check = await Peers.command([AgentPathNetnsTests.binary, "check", "--config", config.path])
        #expect(check.status == 0 && check.stdout.contains("gate on"), "\(check.stdout)\(check.stderr)")
        let before = await Self.save(lab.a)
        defer { _ = try? lab.capture(in: lab.a).remove() }
        let targets = ["http:\(lab.bAddress):8080", "http:[\(lab.bAddress6)]:8080"]
        #expect(
            await Peers.eventually(within: .seconds(10)) {
                await Peers.command([
                    "ip", "netns", "exec", lab.a, "curl", "-s", "--max-time", "2", "http://\(lab.bAddress):8080/",
                ]).stdout == "legacy-b\n"
            }
        )

        var generation = 0
        func start() async throws -> Agent {
            generation += 1
            let agent = try Agent(ns: lab.a, dir: dir, config: config, name: "agent\(generation)")
            #expect(await agent.ready(), "\(agent.output)")
            return agent
        }
        /// Sends `signal` in the middle of a client loop; returns what the client saw.
        func underLoad(_ signal: Int32, to agent: Agent) async throws -> LoopResult {
            let load = ClientLoop(ns: lab.a, dir: dir, targets: targets)
            try await Task.sleep(for: .milliseconds(1500))
            kill(agent.pid, signal)
            try await Task.sleep(for: .milliseconds(2500))
            return try await load.stop()
        }

        // SIGHUP and SIGUSR2: the agent stays, its rules stay, it keeps capturing.
        var agent = try await start()
        defer { agent.child.stop() }
        for signal in [SIGHUP, SIGUSR2] {
            let captured = Self.value(await agent.metrics(), #"trellis_gate_connections_total{decision="captured"}"#)
            let result = try await underLoad(signal, to: agent)
            #expect(result.failed == 0 && result.ok > 50, "signal \(signal): \(result.ok) ok, \(result.errors)")
            #expect(agent.running, "signal \(signal) ended the agent: \(agent.output)")
            #expect(await Self.save(lab.a).contains("TRELLIS_OUTPUT"))
            let now = Self.value(await agent.metrics(), #"trellis_gate_connections_total{decision="captured"}"#)
            #expect(
                now >= captured + Double(result.ok),
                "still capturing after signal \(signal): \(captured) -> \(now)"
            )
        }
        #expect(agent.output.contains("SIGHUP: reloading the configuration"), "\(agent.output)")

        // SIGINT, SIGQUIT, SIGTERM: drained, rules removed, exit 0 — and no connection refused.
        for signal in [SIGINT, SIGQUIT, SIGTERM] {
            let result = try await underLoad(signal, to: agent)
            #expect(result.failed == 0 && result.ok > 50, "signal \(signal): \(result.ok) ok, \(result.errors)")
            #expect(await agent.exited(within: .seconds(40)), "signal \(signal): \(agent.output)")
            #expect(agent.child.process.terminationStatus == 0, "signal \(signal): \(agent.output)")
            #expect(await Self.save(lab.a) == before, "signal \(signal) left rules behind")
            agent = try await start()
        }

        // SIGKILL: nothing can run, the rules stay, and the gate lets every new connection through.
        let killed = try await underLoad(SIGKILL, to: agent)
        #expect(await agent.exited(within: .seconds(5)))
        #expect(killed.refused == 0, "\(killed.errors)")
        // A request in flight through the killed process may be cut; none after it fails.
        #expect(killed.failed <= 1 && killed.ok > 50, "\(killed.ok) ok, \(killed.errors)")
        #expect(await Self.save(lab.a).contains("TRELLIS_GATE_OUT"), "the killed agent's rules are still there")
        let afterKill = ClientLoop(ns: lab.a, dir: dir, targets: targets)
        try await Task.sleep(for: .seconds(2))
        let bypassed = try await afterKill.stop()
        #expect(bypassed.failed == 0 && bypassed.ok > 30, "with no agent: \(bypassed.errors)")

        // The restart takes over the left rules, under load, with nothing refused.
        let restartLoad = ClientLoop(ns: lab.a, dir: dir, targets: targets)
        try await Task.sleep(for: .milliseconds(500))
        agent = try await start()
        try await Task.sleep(for: .seconds(2))
        let restarted = try await restartLoad.stop()
        #expect(restarted.failed == 0, "\(restarted.errors)")
        let captured = Self.value(await agent.metrics(), #"trellis_gate_connections_total{decision="captured"}"#)
        #expect(captured > 10, "the restarted agent captures again: \(captured)")
        kill(agent.pid, SIGTERM)
        #expect(await agent.exited(within: .seconds(40)))
        #expect(await Self.save(lab.a) == before)
    }

    // MARK: Reload

    /// SIGHUP and `trellis-agent reload` apply a changed agent.yaml (capture rules replaced in one
    /// transaction, the drain deadline), refuse an invalid file with its file:line and key path
    /// (counted; the running rules stay), and refuse a change only a restart can apply.
    @Test func reloadAppliesAGoodFileAndRefusesABadOne() async throws {
        let lab = try NetnsLab(subnet: 33)
        defer { lab.destroy() }
        let dir = try Peers.temporaryDirectory("reload")
        defer { try? FileManager.default.removeItem(at: dir) }
        let config = dir.appendingPathComponent("agent.yaml")
        try "node: vm-a\ncapture: {inbound_ports: [9]}\n".write(to: config, atomically: true, encoding: .utf8)
        let agent = try Agent(ns: lab.a, dir: dir, config: config, name: "agent")
        defer {
            agent.child.stop()
            _ = try? lab.capture(in: lab.a).remove()
        }
        #expect(await agent.ready(), "\(agent.output)")
        #expect(!(await Self.save(lab.a).contains("--dport 9099 -j RETURN")))

        // A good change, by SIGHUP.
        try "node: vm-a\ndrain_deadline: 7s\ncapture: {inbound_ports: [9], exclude_ports: [9099]}\n".write(
            to: config,
            atomically: true,
            encoding: .utf8
        )
        kill(agent.pid, SIGHUP)
        #expect(
            await Peers.eventually(within: .seconds(10)) {
                await Self.save(lab.a).contains("-A TRELLIS_OUTPUT -p tcp -m tcp --dport 9099 -j RETURN")
            },
            "\(agent.output)"
        )
        #expect(agent.running)
        #expect(Self.value(await agent.metrics(), #"trellis_agent_reloads_total{result="applied"}"#) == 1)
        let status = await agent.ctl("status")
        #expect(status.stdout.contains("capture: installed"), "\(status.stdout)")

        // A bad file: refused with where and what, counted, the rules as they were.
        let rulesBefore = await Self.save(lab.a)
        try "node: vm-a\ncapture:\n  inbound_ports: [9]\n  exclude_ports: [0]\nlisteners: []\n".write(
            to: config,
            atomically: true,
            encoding: .utf8
        )
        let refused = await agent.ctl("reload")
        #expect(refused.status == 1, "\(refused.stdout)\(refused.stderr)")
        #expect(refused.stderr.contains("\(config.path):5"), "\(refused.stderr)")
        #expect(refused.stderr.contains("listeners"), "\(refused.stderr)")
        #expect(await Self.save(lab.a) == rulesBefore)
        #expect(Self.value(await agent.metrics(), #"trellis_agent_reloads_total{result="refused"}"#) == 1)
        kill(agent.pid, SIGHUP)
        #expect(
            await Peers.eventually(within: .seconds(5)) {
                Self.value(await agent.metrics(), #"trellis_agent_reloads_total{result="refused"}"#) == 2
            }
        )
        let rulesAfter = await Self.save(lab.a)
        #expect(agent.running && rulesAfter == rulesBefore)
        let check = await Peers.command([AgentPathNetnsTests.binary, "check", "--config", config.path])
        #expect(check.status != 0 && check.stderr.contains("listeners"), "\(check.stderr)")

        // A change only a restart can apply: refused, said so.
        try "node: vm-other\ncapture: {inbound_ports: [9], exclude_ports: [9099]}\n".write(
            to: config,
            atomically: true,
            encoding: .utf8
        )
        let restartOnly = await agent.ctl("reload")
        #expect(restartOnly.status == 1 && restartOnly.stderr.contains("node: changed"), "\(restartOnly.stderr)")

        // The configured drain deadline is what a plain `drain` and a stop wait for.
        try "node: vm-a\ndrain_deadline: 7s\ncapture: {inbound_ports: [9], exclude_ports: [9099]}\n".write(
            to: config,
            atomically: true,
            encoding: .utf8
        )
        #expect(await agent.ctl("reload").status == 0)
        let drain = await agent.ctl("drain")
        #expect(drain.status == 0 && drain.stdout.contains("draining (deadline 7s)"), "\(drain.stdout)")
    }
}
