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

    public func run(_ command: String, _ arguments: [String], input: String? = nil) throws(IPTablesError) -> Output {
        var argv = [command] + arguments
        if let netns { argv = ["ip", "netns", "exec", netns] + argv }
        guard let executable = which(argv[0]) else { throw IPTablesError("\(argv[0]): command not found") }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = Array(argv.dropFirst())
        let stdout = Pipe()
        let stderr = Pipe()
        let stdin = Pipe()
        process.standardOutput = stdout
        process.standardError = stderr
        process.standardInput = stdin
        do {
            try process.run()
        } catch {
            throw IPTablesError("\(argv.joined(separator: " ")): \(error)")
        }
        if let input { stdin.fileHandleForWriting.write(Data(input.utf8)) }
        try? stdin.fileHandleForWriting.close()
        let out = stdout.fileHandleForReading.readDataToEndOfFile()
        let err = stderr.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return Output(
            status: process.terminationStatus,
            stdout: String(decoding: out, as: UTF8.self),
            stderr: String(decoding: err, as: UTF8.self)
        )
    }
}
