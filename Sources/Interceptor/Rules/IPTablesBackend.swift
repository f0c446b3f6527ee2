import Foundation

/// Which iptables implementation the host uses, and the commands of each family.
public enum IPTablesBackend: String, Sendable, Hashable {
    case nft
    case legacy

    public func save(_ family: RuleSet.Family) -> String {
        "\(family == .ipv4 ? "iptables" : "ip6tables")-\(rawValue)-save"
    }

    public func restore(_ family: RuleSet.Family) -> String {
        "\(family == .ipv4 ? "iptables" : "ip6tables")-\(rawValue)-restore"
    }

    /// Detects the back end in use: the one whose tables already hold rules (another tool's or
    /// ours); when neither or both do, the nft back end if present (Debian's default), else legacy.
    public static func detect(runner: CommandRunner = CommandRunner()) throws(IPTablesError) -> IPTablesBackend {
        let nft = runner.which("iptables-nft-save") != nil && runner.which("iptables-nft-restore") != nil
        let legacy = runner.which("iptables-legacy-save") != nil && runner.which("iptables-legacy-restore") != nil
        switch (nft, legacy) {
        case (false, false):
            throw IPTablesError(
                "neither the nft nor the legacy iptables back end is installed "
                    + "(looked for iptables-nft-save/-restore and iptables-legacy-save/-restore in PATH); "
                    + "install Debian's iptables package"
            )
        case (true, false): return .nft
        case (false, true): return .legacy
        case (true, true):
            let legacyRules = (try? runner.run("iptables-legacy-save", []))?.stdout.contains("\n-A ") ?? false
            let nftRules = (try? runner.run("iptables-nft-save", []))?.stdout.contains("\n-A ") ?? false
            return legacyRules && !nftRules ? .legacy : .nft
        }
    }
}

public struct IPTablesError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// Runs a command and collects its output. The only place the Interceptor starts processes.
public struct CommandRunner: Sendable {
    public struct Output: Sendable {
        public var status: Int32
        public var stdout: String
        public var stderr: String
    }

    /// Commands run inside this network namespace (`ip netns exec NAME …`) when set; for tests.
    public var netns: String?

    public init(netns: String? = nil) {
        self.netns = netns
    }

    public func which(_ command: String) -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/sbin:/usr/bin:/sbin:/bin"
        var dirs = path.split(separator: ":").map(String.init)
        dirs += ["/usr/sbin", "/sbin"]
        for dir in dirs {
            let candidate = "\(dir)/\(command)"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return nil
    }

    /// Runs `command` with `input` on its standard input and returns what it printed. The child is
    /// killed if it has not finished within `timeout`. Started with `posix_spawn` and read with
    /// `poll`: no run loop (Foundation's `Process` needs a loopback socket pair, and hangs when
    /// `lo` is down), and stdout, stderr and stdin are served together, so no pipe fills up.
    public func run(
        _ command: String,
        _ arguments: [String],
        input: String? = nil,
        timeout: Duration = .seconds(30)
    ) throws(IPTablesError) -> Output {
        var argv = [command] + arguments
        if let netns { argv = ["ip", "netns", "exec", netns] + argv }
        guard let executable = which(argv[0]) else { throw IPTablesError("\(argv[0]): command not found") }
        let shown = argv.joined(separator: " ")

        var pipes: [[Int32]] = [[-1, -1], [-1, -1], [-1, -1]]  // stdin, stdout, stderr
        for i in 0..<3 {
            guard pipe(&pipes[i]) == 0 else {
                for p in pipes.flatMap({ $0 }) where p >= 0 { close(p) }
                throw IPTablesError("\(shown): cannot create a pipe (errno \(errno))")
            }
        }
        // Not inherited by children spawned meanwhile on other threads (dup2 clears it in ours).
        for fd in pipes.flatMap({ $0 }) { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, pipes[0][0], 0)
        posix_spawn_file_actions_adddup2(&actions, pipes[1][1], 1)
        posix_spawn_file_actions_adddup2(&actions, pipes[2][1], 2)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        // The child starts with default signal handling and nothing blocked, whatever this
        // process has set up (the agent ignores SIGTERM/SIGINT to handle them itself).
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for signal in [SIGTERM, SIGINT, SIGHUP, SIGPIPE] { sigaddset(&defaults, signal) }
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setsigmask(&attributes, &empty)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))

        var pid: pid_t = 0
        let cArgs = argv.map { strdup($0) } + [nil]
        defer { for arg in cArgs { free(arg) } }
        let spawned = posix_spawn(&pid, executable, &actions, &attributes, cArgs, environ)
        close(pipes[0][0])
        close(pipes[1][1])
        close(pipes[2][1])
        guard spawned == 0 else {
            close(pipes[0][1])
            close(pipes[1][0])
            close(pipes[2][0])
            throw IPTablesError("\(shown): cannot start (\(String(cString: strerror(spawned))))")
        }

        var pending = Array((input ?? "").utf8)
        var stdinFD: Int32 = pipes[0][1]
        if pending.isEmpty {
            close(stdinFD)
            stdinFD = -1
        } else {
            _ = fcntl(stdinFD, F_SETFL, fcntl(stdinFD, F_GETFL) | O_NONBLOCK)
        }
        var outFD = pipes[1][0]
        var errFD = pipes[2][0]
        var out: [UInt8] = []
        var err: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        let deadline = ContinuousClock.now + timeout
        var timedOut = false
        while outFD >= 0 || errFD >= 0 || stdinFD >= 0 {
            let left = deadline - ContinuousClock.now
            if left <= .zero {
                timedOut = true
                break
            }
            var fds = [
                pollfd(fd: stdinFD, events: Int16(POLLOUT), revents: 0),
                pollfd(fd: outFD, events: Int16(POLLIN), revents: 0),
                pollfd(fd: errFD, events: Int16(POLLIN), revents: 0),
            ]
            let ms = Int32(
                min(left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000, 1000)
            )
            let ready = poll(&fds, 3, max(ms, 1))
            if ready < 0 && errno != EINTR { break }
            if ready <= 0 { continue }
            if stdinFD >= 0 && fds[0].revents != 0 {
                let written = pending.withUnsafeBytes { write(stdinFD, $0.baseAddress, $0.count) }
                if written > 0 { pending.removeFirst(written) }
                if pending.isEmpty || (written < 0 && errno != EAGAIN && errno != EINTR) {
                    close(stdinFD)
                    stdinFD = -1
                }
            }
            for (index, fd) in [(1, outFD), (2, errFD)] where fd >= 0 && fds[index].revents != 0 {
                let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if n > 0 {
                    if index == 1 { out += buffer[0..<n] } else { err += buffer[0..<n] }
                } else if n == 0 || (errno != EAGAIN && errno != EINTR) {
                    close(fd)
                    if index == 1 { outFD = -1 } else { errFD = -1 }
                }
            }
        }
        for fd in [stdinFD, outFD, errFD] where fd >= 0 { close(fd) }
        if timedOut { kill(pid, SIGKILL) }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        if timedOut { throw IPTablesError("\(shown): no answer within \(timeout); killed") }
        // WIFEXITED / WEXITSTATUS; a signal shows as 128 + its number, as in a shell.
        let code = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        return Output(
            status: code,
            stdout: String(decoding: out, as: UTF8.self),
            stderr: String(decoding: err, as: UTF8.self)
        )
    }
}
