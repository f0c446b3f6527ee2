import Foundation
import Interceptor
import Testing
import TrellisTestSupport

#if canImport(Glibc)
import Glibc
#endif

/// The README's commands on a fresh machine, run the way a user runs them: a new user with sudo
/// rights (NOPASSWD, in /etc/sudoers.d) whose Swift toolchain is on its own PATH only (its
/// ~/.profile; sudo's secure_path does not have it), a clone of this checkout in its home (with the
/// working tree's changes), and `bash scripts/bootstrap.sh` as that user: the PyPI packages go into
/// the clone's `.venv` (Debian's python3), owned by the user and usable by nobody, and nothing in
/// the clone is root's. Then the privilege plumbing of scripts/test.sh and scripts/demo.sh up to
/// their build (`TRELLIS_SETUP_ONLY=1`): through sudo, root finds the user's swift and the clone's
/// envoy and python3. No Swift build in the clone; the pip downloads need PyPI. The user, its home
/// and its sudoers file are removed at the end, also on failure.
@Suite(.disabled(if: FreshMachine.unavailableReason != nil, "\(FreshMachine.unavailableReason ?? "")"))
struct FreshMachineTests {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()

    /// Runs a command, killed (with every process it started) after `seconds`.
    static func run(_ seconds: Int, _ arguments: String...) async -> (status: Int32, stdout: String, stderr: String) {
        await Peers.command(["timeout", "--kill-after=10", "\(seconds)"] + arguments)
    }

    @Test func theREADMECommandsWorkForASudoerWhoseToolchainIsOnItsOwnPATHOnly() async throws {
        let user = "trellis-fresh-\(getpid() % 100_000)-\(UInt16.random(in: 0...UInt16.max))"
        try #require(getpwnam(user) == nil, "a user \(user) exists")
        let sudoers = "/etc/sudoers.d/\(user)"
        defer {
            try? FileManager.default.removeItem(atPath: sudoers)
            _ = try? CommandRunner().run("userdel", ["--force", "--remove", user], timeout: .seconds(60))
        }
        let created = await Self.run(60, "useradd", "--create-home", "--shell", "/bin/bash", user)
        try #require(created.status == 0, "\(created)")
        guard let entry = getpwnam(user) else {
            Issue.record("useradd made no user \(user)")
            return
        }
        let home = String(cString: entry.pointee.pw_dir)
        let (uid, gid) = (entry.pointee.pw_uid, entry.pointee.pw_gid)
        // Reachable by other users whatever HOME_MODE says: tests run Python from the clone as nobody.
        chmod(home, 0o755)
        try "\(user) ALL=(ALL:ALL) NOPASSWD: ALL\n".write(toFile: sudoers, atomically: false, encoding: .utf8)
        chmod(sudoers, 0o440)
        let valid = await Self.run(30, "visudo", "--check", "--file", sudoers)
        try #require(valid.status == 0, "\(valid)")

        // The toolchain on this user's PATH only: its ~/.profile, read by its login shell.
        let toolchain = try #require(FreshMachine.toolchain)
        let profile = "\(home)/.profile"
        let skeleton = (try? String(contentsOfFile: profile, encoding: .utf8)) ?? ""
        try (skeleton + "\n# The Swift toolchain\nexport PATH=\"\(toolchain):$PATH\"\n").write(
            toFile: profile,
            atomically: false,
            encoding: .utf8
        )
        chown(profile, uid, gid)
        func asUser(_ seconds: Int, _ script: String) async -> (status: Int32, stdout: String, stderr: String) {
            await Self.run(seconds, "su", "--login", user, "--command", script)
        }
        let login = await asUser(60, "command -v swift")
        try #require(login.status == 0 && login.stdout.contains(toolchain), "the user's shell finds swift: \(login)")
        // The hard case: sudo works for the user, but sudo alone (secure_path) has no swift.
        let throughSudo = await asUser(60, "sudo -n sh -c 'command -v swift || echo none'")
        try #require(throughSudo.status == 0, "the user has sudo: \(throughSudo)")
        let secure = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        if !secure.contains(toolchain) {
            #expect(throughSudo.stdout == "none\n", "sudo's secure_path has no swift: \(throughSudo)")
        }

        // A clone of the repository under test in the user's home: its last commit, then the
        // working tree's changed and new files (not the ignored ones: .build, .venv) over it, and
        // the files it deleted removed.
        let clone = "\(home)/trellis"
        let cloned = await Self.run(
            300,
            "git",
            "-c",
            "safe.directory=*",
            "clone",
            "--quiet",
            "--no-hardlinks",
            Self.repository.path,
            clone
        )
        try #require(cloned.status == 0, "\(cloned)")
        let overlay = await Self.run(
            300,
            "sh",
            "-c",
            """
            cd "$1" || exit 1
            git -c safe.directory='*' ls-files -z --cached --others --exclude-standard |
                tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$2" || exit 1
            git -c safe.directory='*' ls-files -z --deleted | (cd "$2" && xargs -0 -r rm -f)
            """,
            "overlay",
            Self.repository.path,
            clone
        )
        try #require(overlay.status == 0, "\(overlay)")
        let owned = await Self.run(120, "chown", "-R", "\(user):", clone)
        try #require(owned.status == 0, "\(owned)")
        func ownedByRoot() async -> [Substring] {
            await Self.run(120, "find", clone, "-uid", "0").stdout.split(separator: "\n")
        }

        // The README's set-up step, as the user: Debian packages (through sudo, when missing), the
        // PyPI packages into .venv.
        let bootstrap = await asUser(1200, "cd ~/trellis && bash scripts/bootstrap.sh")
        #expect(bootstrap.status == 0 && bootstrap.stdout.contains("bootstrap: ok"), "\(bootstrap)")
        let grpc = await asUser(60, "cd ~/trellis && .venv/bin/python3 -c 'import grpc, grpc_health.v1.health_pb2'")
        #expect(grpc.status == 0, "\(grpc)")
        let envoy = await asUser(120, "cd ~/trellis && .venv/bin/envoy --version")
        #expect(envoy.status == 0 && envoy.stdout.contains("version:"), "\(envoy)")
        let config = (try? String(contentsOfFile: "\(clone)/.venv/pyvenv.cfg", encoding: .utf8)) ?? ""
        #expect(config.contains("home = /usr/bin\n"), "made from Debian's /usr/bin/python3: \(config)")
        let venv = try? FileManager.default.attributesOfItem(atPath: "\(clone)/.venv")
        #expect(venv?[.ownerAccountName] as? String == user, "\(String(describing: venv))")
        let nobody = await Self.run(
            60,
            "runuser",
            "-u",
            "nobody",
            "--",
            "\(clone)/.venv/bin/python3",
            "-c",
            "import grpc"
        )
        #expect(nobody.status == 0, "an unprivileged user runs .venv's python3: \(nobody)")
        let afterBootstrap = await ownedByRoot()
        #expect(afterBootstrap.isEmpty, "owned by root: \(afterBootstrap.prefix(20))")

        // test.sh and demo.sh as the README says, up to their build: sudo with the user's PATH kept
        // finds the user's swift and the clone's envoy and python3.
        for script in ["test", "demo"] {
            let setup = await asUser(900, "cd ~/trellis && TRELLIS_SETUP_ONLY=1 bash scripts/\(script).sh")
            #expect(
                setup.status == 0 && setup.stdout.contains("\(script): set up; stopping before the build"),
                "\(setup)"
            )
            #expect(setup.stdout.contains("\(script): as \(user): swift \(toolchain)/swift"), "\(setup.stdout)")
            #expect(
                setup.stdout.contains(
                    "\(script): as root: swift \(toolchain)/swift, envoy \(clone)/.venv/bin/envoy, "
                        + "python3 \(clone)/.venv/bin/python3"
                ),
                "\(setup.stdout)"
            )
            #expect(!setup.stderr.contains("warning: user nobody"), "\(setup.stderr)")
        }
        let afterSetup = await ownedByRoot()
        #expect(afterSetup.isEmpty, "owned by root: \(afterSetup.prefix(20))")

        // Without sudo rights the test script stops at once, saying what to do.
        try FileManager.default.removeItem(atPath: sudoers)
        let refused = await asUser(60, "cd ~/trellis && TRELLIS_SETUP_ONLY=1 bash scripts/test.sh </dev/null")
        #expect(
            refused.status == 1 && refused.stderr.contains("test: the test runs need root")
                && !refused.stdout.contains("bootstrap"),
            "\(refused)"
        )
    }
}

/// What the fresh-machine test needs of this machine.
enum FreshMachine {
    /// The Swift toolchain's directory: where this process finds `swift` on its PATH.
    static var toolchain: String? {
        Peers.which("swift").map { URL(fileURLWithPath: $0).deletingLastPathComponent().path }
    }

    /// Why this test cannot run here, or nil.
    static var unavailableReason: String? {
        if geteuid() != 0 { return "needs root (creates a user and a sudoers.d file); CI runs as root" }
        for tool in ["useradd", "userdel", "sudo", "visudo", "git", "su", "runuser", "timeout", "tar", "find"]
        where CommandRunner().which(tool) == nil {
            return "needs \(tool): run scripts/bootstrap.sh"
        }
        if toolchain == nil { return "needs swift on PATH (its directory goes on the test user's PATH)" }
        if !FileManager.default.fileExists(atPath: FreshMachineTests.repository.appendingPathComponent(".git").path) {
            return "\(FreshMachineTests.repository.path) is not a git checkout"
        }
        return nil
    }
}
