import Foundation
import Interceptor
import Testing
import TrellisTestSupport

#if canImport(Glibc)
import Glibc
#endif

/// The ways an operator installs the agent, run for real: the SysV script starting the agent as
/// an unprivileged user with two capabilities (in a namespace), reloading it and rotating its log,
/// `init/install.sh` / `init/uninstall.sh`, and the `.deb` installed, upgraded under a running
/// agent and purged with dpkg.
@Suite(.serialized, .disabled(if: NetnsLab.unavailableReason != nil, "\(NetnsLab.unavailableReason ?? "")"))
struct ServiceInstallTests {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()
    static var buildFolder: URL { URL(fileURLWithPath: AgentPathNetnsTests.binary).deletingLastPathComponent() }

    /// Why installing on this machine is not done here, or nil. The install and package tests
    /// create the `trellis` user and write to /etc, /usr/local/bin and dpkg's database; they refuse
    /// to run over an existing installation.
    static var hostInstallUnavailable: String? {
        if let reason = NetnsLab.unavailableReason { return reason }
        for tool in ["useradd", "dpkg-deb", "dpkg", "start-stop-daemon", "setpriv"] where Peers.which(tool) == nil {
            return "needs \(tool): run scripts/bootstrap.sh"
        }
        if getpwnam("trellis") != nil { return "a `trellis` user exists: this machine has Trellis installed" }
        for path in [
            "/etc/trellis", "/usr/local/bin/trellis-agent", "/usr/bin/trellis-agent", "/etc/init.d/trellis-agent",
        ]
        where FileManager.default.fileExists(atPath: path) {
            return "\(path) exists: this machine has Trellis installed"
        }
        return nil
    }

    static func sh(_ arguments: String...) async -> (status: Int32, stdout: String, stderr: String) {
        await Peers.command(arguments)
    }

    static func iptablesSave() async -> String {
        MeshLab.meaningful(await Peers.command(["iptables-save"]).stdout)
    }

    /// iptables and ip6tables rules of namespace `ns`, as rules and chains (see `MeshLab.meaningful`).
    static func rules(in ns: String) async -> String {
        let v4 = await Peers.command(["ip", "netns", "exec", ns, "iptables-save"]).stdout
        let v6 = await Peers.command(["ip", "netns", "exec", ns, "ip6tables-save"]).stdout
        return MeshLab.meaningful(v4 + v6)
    }

    /// The pid in a pid file, if the file is there.
    static func pid(inFile path: String) -> Int32? {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return nil }
        return Int32(text.trimmingCharacters(in: .whitespacesAndNewlines))
    }

    /// SIGKILL to `pid` if it is still a trellis-agent (not a process that reused the number).
    static func killAgent(_ pid: Int32?) {
        guard let pid, let cmdline = try? String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8),
            cmdline.contains("trellis-agent")
        else { return }
        kill(pid, SIGKILL)
    }

    /// The repository's SysV script (`init/trellis-agent`) driving a copy of the agent in namespace
    /// `ns` as `nobody` (CAP_NET_ADMIN and CAP_NET_RAW only), with its own defaults file, pid file,
    /// socket, configuration and log in `dir`. No DRAIN_DEADLINE: stop drains with the configured one.
    struct SysV {
        let ns: String
        let dir: URL
        let config: URL
        let defaults: URL
        let log: URL
        let pidFile: String

        init(ns: String, dir: URL, config text: String) throws {
            self.ns = ns
            self.dir = dir
            chmod(dir.path, 0o755)
            // A copy the unprivileged user can run, whatever the permissions of the build folder.
            let binary = dir.appendingPathComponent("trellis-agent")
            try FileManager.default.copyItem(atPath: AgentPathNetnsTests.binary, toPath: binary.path)
            config = dir.appendingPathComponent("agent.yaml")
            log = dir.appendingPathComponent("log/agent.log")
            defaults = dir.appendingPathComponent("trellis-agent.default")
            let run = dir.appendingPathComponent("run").path
            pidFile = "\(run)/agent.pid"
            try """
            DAEMON=\(binary.path)
            CONFIG=\(config.path)
            RUN_AS=nobody
            PIDFILE=\(pidFile)
            SOCKET=\(run)/agent.sock
            LOGFILE=\(log.path)
            """.write(to: defaults, atomically: true, encoding: .utf8)
            try write(text)
        }

        /// Replaces agent.yaml (readable by the agent's user, which reads it again on reload).
        func write(_ text: String) throws {
            try text.write(to: config, atomically: true, encoding: .utf8)
            chmod(config.path, 0o644)
        }

        /// `sh init/trellis-agent ACTION` inside the namespace.
        func callAsFunction(_ action: String) async -> (status: Int32, stdout: String, stderr: String) {
            await Peers.command([
                "env", "TRELLIS_DEFAULTS=\(defaults.path)", "ip", "netns", "exec", ns, "sh",
                ServiceInstallTests.repository.appendingPathComponent("init/trellis-agent").path, action,
            ])
        }

        var pid: Int32? { ServiceInstallTests.pid(inFile: pidFile) }
        var output: String { (try? String(contentsOf: log, encoding: .utf8)) ?? "" }
    }

    /// The SysV script: start (as `nobody` with CAP_NET_ADMIN and CAP_NET_RAW only), status,
    /// traffic through the agent, stop (drain, rules removed), status after.
    @Test func theSysVScriptStartsStopsAndReportsTheAgent() async throws {
        let lab = try NetnsLab(subnet: 14)
        defer { lab.destroy() }
        let dir = try Peers.temporaryDirectory("sysv")
        defer { try? FileManager.default.removeItem(at: dir) }
        chmod(dir.path, 0o755)
        // A copy the unprivileged user can run, whatever the permissions of the build folder.
        let binary = dir.appendingPathComponent("trellis-agent")
        try FileManager.default.copyItem(atPath: AgentPathNetnsTests.binary, toPath: binary.path)
        let server = try Peers.Child(
            [
                "ip", "netns", "exec", lab.b, "python3", AgentDrainNetnsTests.server, "--port", "8080", "--name",
                "legacy-b",
            ]
        )
        defer { server.stop() }
        let config = dir.appendingPathComponent("agent.yaml")
        try "node: vm-a\ncapture: {inbound_ports: [9]}\n".write(to: config, atomically: true, encoding: .utf8)
        chmod(config.path, 0o644)
        let run = dir.appendingPathComponent("run").path
        let defaults = dir.appendingPathComponent("trellis-agent.default")
        try """
        DAEMON=\(binary.path)
        CONFIG=\(config.path)
        RUN_AS=nobody
        PIDFILE=\(run)/agent.pid
        SOCKET=\(run)/agent.sock
        LOGFILE=\(dir.path)/log/agent.log
        DRAIN_DEADLINE=5s
        """.write(to: defaults, atomically: true, encoding: .utf8)
        let script = Self.repository.appendingPathComponent("init/trellis-agent").path
        func service(_ action: String) async -> (status: Int32, stdout: String, stderr: String) {
            await Peers.command([
                "env", "TRELLIS_DEFAULTS=\(defaults.path)", "ip", "netns", "exec", lab.a, "sh", script, action,
            ])
        }
        defer {
            if let pid = try? String(contentsOfFile: "\(run)/agent.pid", encoding: .utf8),
                let n = Int32(pid.trimmingCharacters(in: .whitespacesAndNewlines))
            {
                kill(n, SIGKILL)
            }
            _ = try? lab.capture(in: lab.a).remove()
        }

        let before = await service("status")
        #expect(before.status == 3 && before.stdout.contains("not running"), "\(before)")

        let start = await service("start")
        let log = (try? String(contentsOfFile: "\(dir.path)/log/agent.log", encoding: .utf8)) ?? ""
        #expect(start.status == 0 && start.stdout.contains("started (pid"), "\(start)\n\(log)")
        let pidText = (try? String(contentsOfFile: "\(run)/agent.pid", encoding: .utf8)) ?? ""
        let pid = pidText.trimmingCharacters(in: .whitespacesAndNewlines)
        // Not root: the service user, with the two capabilities and nothing else.
        let procStatus = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
        let uidLine = procStatus.split(separator: "\n").first { $0.hasPrefix("Uid:") } ?? ""
        #expect(uidLine.split(separator: "\t").dropFirst().allSatisfy { $0 == "65534" }, "\(uidLine)")
        let capLine = procStatus.split(separator: "\n").first { $0.hasPrefix("CapEff:") } ?? ""
        // CAP_NET_ADMIN is bit 12, CAP_NET_RAW bit 13.
        #expect(capLine.hasSuffix("0000000000003000"), "\(capLine)")
        let rules = await Peers.command(["ip", "netns", "exec", lab.a, "iptables-save"]).stdout
        #expect(rules.contains("TRELLIS_OUTPUT") && rules.contains("--uid-owner 65534"), "\(rules)")

        let status = await service("status")
        #expect(status.status == 0 && status.stdout.contains("is running (pid \(pid))"), "\(status)")
        #expect(
            status.stdout.contains("node vm-a: serving") && status.stdout.contains("capture: installed"),
            "\(status)"
        )

        let answer = await Peers.command([
            "ip", "netns", "exec", lab.a, "curl", "-s", "--max-time", "5", "http://\(lab.bAddress):8080/",
        ])
        #expect(answer.stdout == "legacy-b\n")
        let metrics = await Peers.command([
            "ip", "netns", "exec", lab.a, "curl", "-s", "--max-time", "5", "http://127.0.0.1:15000/stats/prometheus",
        ])
        #expect(metrics.stdout.contains(#"trellis_sniffed_connections_total{protocol="http1"} 1"#), "\(metrics.stdout)")

        let again = await service("start")
        #expect(again.status == 0 && again.stdout.contains("already running"), "\(again)")

        let stop = await service("stop")
        #expect(
            stop.status == 0 && stop.stdout.contains("result:       drained") && stop.stdout.contains("stopped"),
            "\(stop)"
        )
        #expect(kill(Int32(pid) ?? 0, 0) != 0, "the agent exited")
        let after = await Peers.command(["ip", "netns", "exec", lab.a, "iptables-save"]).stdout
        #expect(!after.contains("TRELLIS"), "\(after)")
        let stopped = await service("status")
        #expect(stopped.status == 3 && stopped.stdout.contains("not running"), "\(stopped)")
        let direct = await Peers.command([
            "ip", "netns", "exec", lab.a, "curl", "-s", "--max-time", "5", "http://\(lab.bAddress):8080/",
        ])
        #expect(direct.stdout == "legacy-b\n")
    }

    /// install.sh (without starting) and uninstall.sh, then uninstall.sh --purge, on this machine.
    @Test(.disabled(if: hostInstallUnavailable != nil, "\(hostInstallUnavailable ?? "")"))
    func installAndUninstallScripts() async throws {
        let rulesBefore = await Self.iptablesSave()
        let install = Self.repository.appendingPathComponent("init/install.sh").path
        let uninstall = Self.repository.appendingPathComponent("init/uninstall.sh").path
        defer {
            // Whatever the outcome, leave the machine as it was.
            _ = try? CommandRunner().run("bash", [uninstall, "--purge"])
        }
        let installed = await Self.sh("bash", install, "--bin-dir", Self.buildFolder.path, "--with-pilot", "--no-start")
        #expect(installed.status == 0, "\(installed)")
        #expect(installed.stdout.contains("created system user trellis"))
        #expect(FileManager.default.isExecutableFile(atPath: "/usr/local/bin/trellis-agent"))
        #expect(FileManager.default.isExecutableFile(atPath: "/usr/local/bin/trellis-pilot"))
        #expect(getpwnam("trellis") != nil)
        let config = try FileManager.default.attributesOfItem(atPath: "/etc/trellis/agent.yaml")
        #expect((config[.posixPermissions] as? Int) == 0o640)
        let state = try FileManager.default.attributesOfItem(atPath: "/var/lib/trellis")
        #expect((state[.ownerAccountName] as? String) == "trellis")
        let serviceFile =
            FileManager.default.fileExists(atPath: "/run/systemd/system")
            ? "/etc/systemd/system/trellis-agent.service" : "/etc/init.d/trellis-agent"
        #expect(FileManager.default.fileExists(atPath: serviceFile))
        if serviceFile == "/etc/init.d/trellis-agent" {
            // The SysV script logs to a file: its logrotate file comes with it.
            #expect(FileManager.default.fileExists(atPath: "/etc/logrotate.d/trellis-agent"))
        }
        #expect(await Self.iptablesSave() == rulesBefore, "not started: no rule installed")

        // The operator's edit survives a reinstall and an uninstall without --purge.
        try "# edited\ndrain_deadline: 5s\n".write(
            toFile: "/etc/trellis/agent.yaml",
            atomically: false,
            encoding: .utf8
        )
        let reinstalled = await Self.sh("bash", install, "--bin-dir", Self.buildFolder.path, "--no-start")
        #expect(reinstalled.status == 0 && reinstalled.stdout.contains("kept the existing /etc/trellis/agent.yaml"))
        let removed = await Self.sh("bash", uninstall)
        #expect(removed.status == 0, "\(removed)")
        #expect(!FileManager.default.fileExists(atPath: "/usr/local/bin/trellis-agent"))
        #expect(!FileManager.default.fileExists(atPath: serviceFile))
        #expect(
            (try? String(contentsOfFile: "/etc/trellis/agent.yaml", encoding: .utf8))?.hasPrefix("# edited") == true
        )
        #expect(getpwnam("trellis") != nil)

        let purged = await Self.sh("bash", uninstall, "--purge")
        #expect(purged.status == 0, "\(purged)")
        for path in [
            "/etc/trellis", "/var/lib/trellis", "/var/log/trellis", "/etc/default/trellis-agent",
            "/etc/logrotate.d/trellis-agent",
        ] {
            #expect(!FileManager.default.fileExists(atPath: path), "\(path) is left")
        }
        #expect(getpwnam("trellis") == nil)
        #expect(await Self.iptablesSave() == rulesBefore)
    }

    /// The .deb: built by scripts/package-deb.sh, installed with dpkg (user created, configuration
    /// as conffiles, enabled but not started: no rule), then purged with nothing left behind.
    @Test(.disabled(if: hostInstallUnavailable != nil, "\(hostInstallUnavailable ?? "")"))
    func theDebianPackageInstallsAndPurgesCleanly() async throws {
        let rulesBefore = await Self.iptablesSave()
        let out = try Peers.temporaryDirectory("deb")
        defer {
            _ = try? CommandRunner().run("dpkg", ["--purge", "trellis"])
            try? FileManager.default.removeItem(at: out)
        }
        let built = await Self.sh(
            "bash",
            Self.repository.appendingPathComponent("scripts/package-deb.sh").path,
            "--bin-dir",
            Self.buildFolder.path,
            "--version",
            "0.0.1~test",
            "--out",
            out.path,
            "--compress",
            "none"
        )
        #expect(built.status == 0, "\(built)")
        let deb = built.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(
            deb.hasSuffix(
                "trellis_0.0.1~test_\(await Self.sh("dpkg", "--print-architecture").stdout.trimmingCharacters(in: .whitespacesAndNewlines)).deb"
            )
        )
        let fields = await Self.sh("dpkg-deb", "--field", deb, "Package", "Depends")
        #expect(
            fields.stdout.contains("Package: trellis") && fields.stdout.contains("libnetfilter-queue1"),
            "\(fields)"
        )
        let contents = await Self.sh("dpkg-deb", "--contents", deb)
        for path in [
            "./usr/bin/trellis-agent", "./usr/bin/trellis-pilot", "./lib/systemd/system/trellis-agent.service",
            "./etc/init.d/trellis-agent", "./etc/trellis/agent.yaml", "./usr/share/doc/trellis/vm-quickstart.md",
            "./etc/logrotate.d/trellis-agent",
        ] {
            #expect(contents.stdout.contains(path), "\(path) missing from the package")
        }

        let installed = await Self.sh("dpkg", "-i", deb)
        #expect(installed.status == 0, "\(installed)")
        #expect(installed.stdout.contains("edit /etc/trellis/agent.yaml"), "\(installed.stdout)")
        let state = await Self.sh("dpkg-query", "-W", "-f=${Status} ${Conffiles}", "trellis")
        #expect(state.stdout.hasPrefix("install ok installed"), "\(state)")
        #expect(state.stdout.contains("/etc/trellis/agent.yaml") && state.stdout.contains("/etc/init.d/trellis-agent"))
        #expect(state.stdout.contains("/etc/logrotate.d/trellis-agent"), "the logrotate file is a conffile: \(state)")
        #expect(getpwnam("trellis") != nil)
        let unit = (try? String(contentsOfFile: "/lib/systemd/system/trellis-agent.service", encoding: .utf8)) ?? ""
        #expect(unit.contains("ExecStart=/usr/bin/trellis-agent run"))
        let version = await Self.sh("/usr/bin/trellis-agent", "--help")
        #expect(version.status == 0 && version.stdout.contains("trellis-agent"))
        #expect(await Self.iptablesSave() == rulesBefore, "installing starts nothing and adds no rule")
        #expect(
            await Self.sh("pgrep", "-f", "^/usr/bin/trellis-agent").status != 0,
            "the packaged agent was not started"
        )

        let purged = await Self.sh("dpkg", "--purge", "trellis")
        #expect(purged.status == 0, "\(purged)")
        for path in [
            "/usr/bin/trellis-agent", "/usr/bin/trellis-pilot", "/lib/systemd/system/trellis-agent.service",
            "/etc/init.d/trellis-agent", "/etc/default/trellis-agent", "/etc/trellis", "/var/lib/trellis",
            "/var/log/trellis", "/etc/systemd/system/trellis-agent.service",
            "/etc/systemd/system/multi-user.target.wants/trellis-agent.service", "/etc/logrotate.d/trellis-agent",
        ] {
            #expect(!FileManager.default.fileExists(atPath: path), "\(path) is left after purge")
        }
        let links = await Self.sh("sh", "-c", "ls /etc/rc*.d/ | grep -c trellis")
        #expect(links.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "0", "rc links left")
        #expect(getpwnam("trellis") == nil)
        #expect(await Self.sh("dpkg", "-s", "trellis").status != 0)
        #expect(await Self.iptablesSave() == rulesBefore)
    }

    /// The agent's systemd unit passes `systemd-analyze verify` (the binary in place of /usr/local/bin).
    @Test(.enabled(if: Peers.which("systemd-analyze") != nil, "needs systemd-analyze (Debian systemd)"))
    func theAgentUnitFileVerifies() async throws {
        let unit = Self.repository.appendingPathComponent("systemd/trellis-agent.service")
        let dir = try Peers.temporaryDirectory("agent-unit")
        defer { try? FileManager.default.removeItem(at: dir) }
        let text = try String(contentsOf: unit, encoding: .utf8)
        #expect(text.contains("Type=notify"))
        #expect(text.contains("ExecStart=/usr/local/bin/trellis-agent run --config /etc/trellis/agent.yaml"))
        #expect(text.contains("ExecStop=-/usr/local/bin/trellis-agent drain\n"), "drains with drain_deadline")
        #expect(!text.contains("--deadline"), "no fixed drain deadline: the agent's drain_deadline applies")
        #expect(text.contains("ExecReload=/usr/local/bin/trellis-agent reload\n"))
        #expect(text.contains("AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW"))
        let copy = dir.appendingPathComponent("trellis-agent.service")
        try text.replacingOccurrences(of: "/usr/local/bin/trellis-agent", with: AgentPathNetnsTests.binary)
            .write(to: copy, atomically: true, encoding: .utf8)
        let verify = await Peers.command(["systemd-analyze", "verify", copy.path])
        let ours = (verify.stdout + verify.stderr).split(separator: "\n").filter {
            $0.contains("trellis-agent.service")
        }
        #expect(verify.status == 0 && ours.isEmpty, "\(verify)")
    }

    // MARK: Upgrade, reload, log rotation (issue 13)

    /// Installing a newer .deb over a running agent: the package's maintainer scripts run inside
    /// namespace A (`ip netns exec A dpkg -i`), where the SysV script started the agent with a
    /// configuration that captures A's outbound connections (to a legacy server in B) through the
    /// fail-open gate. While B's package replaces A's, a client in A opens a new connection for
    /// every request: none fails. Afterwards the agent runs the new binary (postinst restarted it,
    /// as it was running) with its rules, and the new version is installed; purge then leaves
    /// iptables as they were before the install.
    @Test(.disabled(if: hostInstallUnavailable != nil, "\(hostInstallUnavailable ?? "")"))
    func upgradingThePackageUnderARunningAgentFailsNoConnection() async throws {
        let lab = try NetnsLab(subnet: 21)
        defer { lab.destroy() }
        let out = try Peers.temporaryDirectory("deb-upgrade")
        defer { try? FileManager.default.removeItem(at: out) }
        func inA(_ arguments: String...) async -> (status: Int32, stdout: String, stderr: String) {
            await Peers.command(["ip", "netns", "exec", lab.a] + arguments)
        }
        let pidFile = "/run/trellis/agent.pid"
        func agentLog() -> String { (try? String(contentsOfFile: "/var/log/trellis/agent.log", encoding: .utf8)) ?? "" }

        // Two packages of the same binaries, A < B.
        let versions = ["0.0.1~upgrade", "0.0.2~upgrade"]
        var debs: [String] = []
        for version in versions {
            let built = await Self.sh(
                "bash",
                Self.repository.appendingPathComponent("scripts/package-deb.sh").path,
                "--bin-dir",
                Self.buildFolder.path,
                "--version",
                version,
                "--out",
                out.path,
                "--compress",
                "none"
            )
            try #require(built.status == 0, "\(built)")
            debs.append(built.stdout.trimmingCharacters(in: .whitespacesAndNewlines))
        }

        let server = try Peers.Child(
            [
                "ip", "netns", "exec", lab.b, "python3", AgentDrainNetnsTests.server, "--port", "8080", "--name",
                "legacy-b",
            ]
        )
        defer { server.stop() }
        let hostRulesBefore = await Self.iptablesSave()
        let rulesBefore = await Self.rules(in: lab.a)
        defer {
            // Whatever happened: purged in A (its prerm stops the agent there), and no agent left.
            let pid = Self.pid(inFile: pidFile)
            _ = try? CommandRunner(netns: lab.a).run("dpkg", ["--purge", "trellis"], timeout: .seconds(120))
            Self.killAgent(pid)
        }

        // --force-confold: the operator's agent.yaml is kept without a question (B's is the same).
        let installed = await inA("dpkg", "-i", "--force-confdef", "--force-confold", debs[0])
        try #require(installed.status == 0, "\(installed)")
        #expect(await Self.rules(in: lab.a) == rulesBefore, "installing starts nothing")
        #expect(FileManager.default.fileExists(atPath: "/etc/logrotate.d/trellis-agent"))
        // Every outbound connection of A captured, through the gate; a short drain.
        try "node: vm-a\ndrain_deadline: 5s\ncapture: {inbound_ports: [9], gate: {queue: 15000, mark: 0x1}}\n".write(
            toFile: "/etc/trellis/agent.yaml",
            atomically: false,
            encoding: .utf8
        )
        #expect(await Self.sh("chown", "root:trellis", "/etc/trellis/agent.yaml").status == 0)
        chmod("/etc/trellis/agent.yaml", 0o640)
        let started = await inA("/etc/init.d/trellis-agent", "start")
        try #require(started.status == 0 && started.stdout.contains("started (pid"), "\(started)\n\(agentLog())")
        let oldPID = try #require(Self.pid(inFile: pidFile))
        let rulesRunning = await Self.rules(in: lab.a)
        #expect(rulesRunning.contains("TRELLIS_OUTPUT") && rulesRunning.contains("TRELLIS_GATE_OUT"), "\(rulesRunning)")
        #expect(
            await Peers.eventually(within: .seconds(10)) {
                await inA("curl", "-s", "--max-time", "2", "http://\(lab.bAddress):8080/").stdout == "legacy-b\n"
            },
            "\(agentLog())"
        )

        // The upgrade, under a client opening a new connection per request (bounded: 60 s at most).
        let load = SafeByDefaultNetnsTests.ClientLoop(ns: lab.a, dir: out, targets: ["http:\(lab.bAddress):8080"])
        try await Task.sleep(for: .seconds(1))
        let clock = ContinuousClock()
        let upgradeStart = clock.now
        let upgraded = await inA("dpkg", "-i", "--force-confdef", "--force-confold", debs[1])
        let upgradeTook = clock.now - upgradeStart
        // Connections through the restarted agent too.
        try await Task.sleep(for: .seconds(1))
        let result = try await load.stop()
        print("upgrade under load (\(upgradeTook)): \(result.ok) new connections answered, \(result.failed) failed")
        #expect(upgraded.status == 0, "\(upgraded)\n\(agentLog())")
        #expect(
            upgraded.stdout.contains("Stopping trellis-agent") && upgraded.stdout.contains("started (pid"),
            "postinst restarts the agent that was running: \(upgraded.stdout)"
        )
        #expect(upgradeTook < .seconds(50), "the client loop (60 s) covered the whole upgrade")
        #expect(result.failed == 0, "\(result.failed) new connections failed during the upgrade: \(result.errors)")
        #expect(result.ok >= 20, "the client ran during the upgrade: \(result.ok) answers")

        // After: the new version, running on the new binary, with its rules, capturing.
        let version = await Self.sh("dpkg-query", "-W", "-f=${Version}", "trellis")
        #expect(version.stdout == versions[1], "\(version)")
        let status = await inA("/etc/init.d/trellis-agent", "status")
        #expect(status.status == 0 && status.stdout.contains("capture: installed"), "\(status)\n\(agentLog())")
        let newPID = Self.pid(inFile: pidFile)
        #expect(newPID != nil && newPID != oldPID, "restarted: pid \(oldPID) -> \(String(describing: newPID))")
        if let newPID {
            // A process still running the replaced file shows "/usr/bin/trellis-agent (deleted)".
            let exe = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(newPID)/exe")
            #expect(exe == "/usr/bin/trellis-agent", "\(String(describing: exe))")
        }
        let rulesAfter = await Self.rules(in: lab.a)
        #expect(rulesAfter == rulesRunning, "the same rules as before the upgrade: \(rulesAfter)")
        #expect(await inA("curl", "-s", "--max-time", "5", "http://\(lab.bAddress):8080/").stdout == "legacy-b\n")
        let metrics = await inA("curl", "-s", "--max-time", "2", "http://127.0.0.1:15000/stats/prometheus").stdout
        let captured = SafeByDefaultNetnsTests.value(metrics, #"trellis_gate_connections_total{decision="captured"}"#)
        #expect(captured >= 1, "the new agent captures through the gate: \(metrics)")

        // Purge: stopped (drained, rules removed), everything gone, iptables as before the install.
        let purged = await inA("dpkg", "--purge", "trellis")
        #expect(purged.status == 0, "\(purged)")
        if let newPID { #expect(kill(newPID, 0) != 0, "the agent exited") }
        #expect(await Self.rules(in: lab.a) == rulesBefore)
        #expect(await Self.iptablesSave() == hostRulesBefore)
        for path in ["/etc/logrotate.d/trellis-agent", "/etc/trellis", "/var/log/trellis", "/usr/bin/trellis-agent"] {
            #expect(!FileManager.default.fileExists(atPath: path), "\(path) is left after purge")
        }
    }

    /// `/etc/init.d/trellis-agent reload`: a changed agent.yaml (one more inbound port excluded) is
    /// applied without a restart, exit 0; an invalid one is refused, non-zero, with the file, line
    /// and key, and the running rules stay; `force-reload` reloads; stop drains with the configured
    /// drain_deadline; reload with no agent says so (LSB 7).
    @Test func theSysVScriptReloadsTheConfigurationAndRefusesAnInvalidOne() async throws {
        let lab = try NetnsLab(subnet: 22)
        defer { lab.destroy() }
        let dir = try Peers.temporaryDirectory("sysv-reload")
        defer { try? FileManager.default.removeItem(at: dir) }
        let rulesBefore = await Self.rules(in: lab.a)
        let service = try SysV(
            ns: lab.a,
            dir: dir,
            config: "node: vm-a\ndrain_deadline: 5s\ncapture:\n  inbound_ports: \"*\"\n  inbound_exclude_ports: [22]\n"
        )
        defer {
            Self.killAgent(service.pid)
            _ = try? lab.capture(in: lab.a).remove()
        }
        let start = await service("start")
        try #require(start.status == 0 && start.stdout.contains("started (pid"), "\(start)\n\(service.output)")
        let pid = service.pid
        let excluded2222 = "-A TRELLIS_INBOUND -p tcp -m tcp --dport 2222 -j RETURN"
        let initial = await Self.rules(in: lab.a)
        #expect(initial.contains("-A TRELLIS_INBOUND -p tcp -m tcp --dport 22 -j RETURN"), "\(initial)")
        #expect(!initial.contains(excluded2222))

        // A good change: applied in place (same process), exit 0.
        try service.write(
            "node: vm-a\ndrain_deadline: 5s\ncapture:\n  inbound_ports: \"*\"\n  inbound_exclude_ports: [22, 2222]\n"
        )
        let reload = await service("reload")
        #expect(reload.status == 0, "\(reload)\n\(service.output)")
        let reloaded = await Self.rules(in: lab.a)
        #expect(reloaded.contains(excluded2222), "\(reloaded)")
        #expect(service.pid == pid, "reloaded, not restarted")

        // An invalid file (line 5: a port out of range): refused with where and what; nothing changes.
        try service.write(
            "node: vm-a\ndrain_deadline: 5s\ncapture:\n  inbound_ports: \"*\"\n  inbound_exclude_ports: [22, 2222, 70000]\n"
        )
        let refused = await service("reload")
        let said = refused.stdout + refused.stderr
        #expect(refused.status != 0, "\(refused)")
        #expect(said.contains("\(service.config.path):5:") && said.contains("inbound_exclude_ports"), "\(said)")
        #expect(await Self.rules(in: lab.a) == reloaded, "the running rules stay")
        let status = await service("status")
        #expect(status.status == 0 && status.stdout.contains("capture: installed"), "\(status)")
        #expect(service.pid == pid)

        // force-reload: a reload when running.
        try service.write(
            "node: vm-a\ndrain_deadline: 5s\ncapture:\n  inbound_ports: \"*\"\n  inbound_exclude_ports: [22]\n"
        )
        let force = await service("force-reload")
        #expect(force.status == 0, "\(force)")
        #expect(!(await Self.rules(in: lab.a)).contains(excluded2222))

        // stop: drained with the drain_deadline of agent.yaml (no DRAIN_DEADLINE in the defaults).
        let stop = await service("stop")
        #expect(stop.status == 0 && stop.stdout.contains("draining for up to 5s"), "\(stop)")
        #expect(stop.stdout.contains("draining (deadline 5s)"), "\(stop.stdout)")
        #expect(stop.stdout.contains("stopped"))
        #expect(await Self.rules(in: lab.a) == rulesBefore)
        let notRunning = await service("reload")
        #expect(notRunning.status == 7 && notRunning.stdout.contains("not running"), "\(notRunning)")
    }

    /// The logrotate file (init/trellis-agent.logrotate, as installed in /etc/logrotate.d, with the
    /// logs' and the SysV script's paths pointed at this test's) rotates the agent's log and its
    /// access log, and the agent writes to the new files (SIGUSR1 through `reopen-logs`); the next
    /// rotation compresses the previous log; with the agent stopped, rotation still succeeds quietly.
    @Test(.enabled(if: Peers.which("logrotate") != nil, "needs logrotate (Debian logrotate): run scripts/bootstrap.sh"))
    func logrotateRotatesTheSysVLogAndTheAgentWritesToTheNewFile() async throws {
        let lab = try NetnsLab(subnet: 23)
        defer { lab.destroy() }
        let dir = try Peers.temporaryDirectory("sysv-logrotate")
        defer { try? FileManager.default.removeItem(at: dir) }
        // Next to the agent's log, in the folder the SysV script gives the agent's user.
        let accessLog = dir.appendingPathComponent("log/access.log")
        let service = try SysV(
            ns: lab.a,
            dir: dir,
            config:
                "node: vm-a\ndrain_deadline: 5s\ncapture: {inbound_ports: [9]}\naccess_log: {output: \(accessLog.path)}\n"
        )
        defer {
            Self.killAgent(service.pid)
            _ = try? lab.capture(in: lab.a).remove()
        }
        // The installed file, with this test's log and script (a wrapper with this test's defaults).
        let wrapper = dir.appendingPathComponent("init-trellis-agent")
        try """
        #!/bin/sh
        exec env TRELLIS_DEFAULTS=\(service.defaults.path) sh \(Self.repository.appendingPathComponent("init/trellis-agent").path) "$@"

        """.write(to: wrapper, atomically: true, encoding: .utf8)
        chmod(wrapper.path, 0o755)
        let installed = try String(
            contentsOf: Self.repository.appendingPathComponent("init/trellis-agent.logrotate"),
            encoding: .utf8
        )
        #expect(
            installed.contains("/var/log/trellis/agent.log /var/log/trellis/access.log {")
                && installed.contains("/etc/init.d/trellis-agent reopen-logs")
        )
        let conf = dir.appendingPathComponent("logrotate.conf")
        // The test machine's systemd (if any) has no trellis-agent running: the SysV branch runs.
        try installed.replacingOccurrences(of: "/var/log/trellis/agent.log", with: service.log.path)
            .replacingOccurrences(of: "/var/log/trellis/access.log", with: accessLog.path)
            .replacingOccurrences(of: "/etc/init.d/trellis-agent", with: wrapper.path)
            .write(to: conf, atomically: true, encoding: .utf8)
        chmod(conf.path, 0o644)
        let state = dir.appendingPathComponent("logrotate.state").path
        func rotate() async -> (status: Int32, stdout: String, stderr: String) {
            await Peers.command(["logrotate", "-f", "-s", state, conf.path])
        }
        let debug = await Peers.command(["logrotate", "-d", "-s", state, conf.path])
        #expect(debug.status == 0, "\(debug.stderr)")

        let start = await service("start")
        try #require(start.status == 0, "\(start)\n\(service.output)")
        #expect(
            await Peers.eventually(within: .seconds(10)) { service.output.contains("agent running") },
            "\(service.output)"
        )
        let rotated = dir.appendingPathComponent("log/agent.log.1")
        func text(_ url: URL) -> String { (try? String(contentsOf: url, encoding: .utf8)) ?? "" }
        // A request from B to A's captured port 9 (nothing listens there): its access-log line.
        func request(_ path: String) async -> Bool {
            _ = try? lab.exec(lab.b, ["curl", "-s", "--max-time", "5", "http://\(lab.aAddress):9\(path)"])
            return await Peers.eventually(within: .seconds(5)) { text(accessLog).contains("\"path\":\"\(path)\"") }
        }
        #expect(await request("/before-rotation"), "\(text(accessLog))")

        let first = await rotate()
        #expect(first.status == 0, "\(first)")
        #expect(text(rotated).contains("agent running"), "the old log moved: \(text(rotated))")
        let owner = (try? FileManager.default.attributesOfItem(atPath: service.log.path))?[.ownerAccountID]
        #expect(
            (owner as? NSNumber)?.intValue == 65534,
            "a new log owned by the agent's user: \(String(describing: owner))"
        )
        // The agent reopens its log on SIGUSR1, asynchronously: something it logs after that (a reload)
        // lands in the new file.
        func logsToTheNewFile() async -> Bool {
            await Peers.eventually(within: .seconds(10)) {
                guard await service("reload").status == 0 else { return false }
                try? await Task.sleep(for: .milliseconds(200))
                return service.output.contains("configuration reloaded")
            }
        }
        #expect(await logsToTheNewFile(), "the agent writes to the new file: \(service.output)")
        // The access log moved too, and the next line goes to the new file.
        let accessRotated = dir.appendingPathComponent("log/access.log.1")
        #expect(text(accessRotated).contains("/before-rotation"), "\(text(accessRotated))")
        #expect(await request("/after-rotation"), "\(text(accessLog))")
        #expect(!text(accessLog).contains("/before-rotation") && !text(accessRotated).contains("/after-rotation"))

        // The next rotation compresses the previous log (delaycompress); the agent follows again.
        let second = await rotate()
        #expect(second.status == 0, "\(second)")
        #expect(FileManager.default.fileExists(atPath: dir.appendingPathComponent("log/agent.log.2.gz").path))
        #expect(text(rotated).contains("configuration reloaded"))
        #expect(await logsToTheNewFile(), "\(service.output)")

        // No agent: reopen-logs is quiet and succeeds, and so does a rotation.
        #expect(await service("stop").status == 0)
        let reopen = await service("reopen-logs")
        #expect(reopen.status == 0 && reopen.stdout.contains("not running") && reopen.stderr.isEmpty, "\(reopen)")
        let third = await rotate()
        #expect(third.status == 0 && third.stderr.isEmpty, "\(third)")
    }
}
