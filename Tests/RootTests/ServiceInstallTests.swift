import Foundation
import Interceptor
import Testing
import TrellisTestSupport

#if canImport(Glibc)
import Glibc
#endif

/// The ways an operator installs the agent, run for real: the SysV script starting the agent as
/// an unprivileged user with two capabilities (in a namespace), `init/install.sh` /
/// `init/uninstall.sh`, and the `.deb` installed and purged with dpkg.
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
        for path in ["/etc/trellis", "/var/lib/trellis", "/var/log/trellis", "/etc/default/trellis-agent"] {
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
        ] {
            #expect(contents.stdout.contains(path), "\(path) missing from the package")
        }

        let installed = await Self.sh("dpkg", "-i", deb)
        #expect(installed.status == 0, "\(installed)")
        #expect(installed.stdout.contains("edit /etc/trellis/agent.yaml"), "\(installed.stdout)")
        let state = await Self.sh("dpkg-query", "-W", "-f=${Status} ${Conffiles}", "trellis")
        #expect(state.stdout.hasPrefix("install ok installed"), "\(state)")
        #expect(state.stdout.contains("/etc/trellis/agent.yaml") && state.stdout.contains("/etc/init.d/trellis-agent"))
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
            "/etc/systemd/system/multi-user.target.wants/trellis-agent.service",
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
        #expect(text.contains("ExecStop=-/usr/local/bin/trellis-agent drain"))
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
}
