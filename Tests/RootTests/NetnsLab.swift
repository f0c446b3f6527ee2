import Foundation
import Interceptor
import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#endif

/// Two "VMs" — network namespaces `a` and `b` joined by a veth pair, with addresses only inside
/// them (10.77.<n>.1/2, fd77:<n>::1/2) — and event loops whose thread lives inside one of them,
/// so that Swift servers can listen there. Everything is removed by `destroy()`.
final class NetnsLab: Sendable {
    let a: String
    let b: String
    let subnet: Int
    let aAddress: String
    let bAddress: String
    let aAddress6: String
    let bAddress6: String

    /// Why root tests cannot run here, or `nil` when they can.
    static var unavailableReason: String? {
        if geteuid() != 0 { return "needs root (network namespaces and iptables); CI runs as root" }
        if CommandRunner().which("ip") == nil { return "needs `ip` (Debian iproute2): run scripts/bootstrap.sh" }
        if CommandRunner().which("iptables-nft-restore") == nil
            && CommandRunner().which("iptables-legacy-restore") == nil
        {
            return "needs iptables: run scripts/bootstrap.sh"
        }
        if CommandRunner().which("curl") == nil { return "needs curl: run scripts/bootstrap.sh" }
        return nil
    }

    init(subnet: Int) throws {
        let tag = "\(getpid() % 10000)-\(subnet)"
        self.a = "trellis-a-\(tag)"
        self.b = "trellis-b-\(tag)"
        self.subnet = subnet
        self.aAddress = "10.77.\(subnet).1"
        self.bAddress = "10.77.\(subnet).2"
        self.aAddress6 = "fd77:\(subnet)::1"
        self.bAddress6 = "fd77:\(subnet)::2"
        let vethA = "tva\(tag)".replacingOccurrences(of: "-", with: "")
        let vethB = "tvb\(tag)".replacingOccurrences(of: "-", with: "")
        do {
            try sh("ip", "netns", "add", a)
            try sh("ip", "netns", "add", b)
            try sh("ip", "link", "add", vethA, "netns", a, "type", "veth", "peer", "name", vethB, "netns", b)
            for (ns, dev, v4, v6) in [(a, vethA, aAddress, aAddress6), (b, vethB, bAddress, bAddress6)] {
                try sh("ip", "-n", ns, "link", "set", "lo", "up")
                try sh("ip", "-n", ns, "addr", "add", "\(v4)/24", "dev", dev)
                try sh("ip", "-n", ns, "addr", "add", "\(v6)/64", "dev", dev, "nodad")
                try sh("ip", "-n", ns, "link", "set", dev, "up")
            }
        } catch {
            destroy()
            throw error
        }
    }

    func destroy() {
        _ = try? sh("ip", "netns", "del", a)
        _ = try? sh("ip", "netns", "del", b)
    }

    /// Runs a command in the host namespace; throws with its output when it fails.
    @discardableResult
    func sh(_ args: String...) throws -> String {
        let out = try CommandRunner().run(args[0], Array(args.dropFirst()))
        guard out.status == 0 else {
            throw LabError("\(args.joined(separator: " ")): exit \(out.status): \(out.stderr)")
        }
        return out.stdout
    }

    /// Runs a command inside namespace `ns`.
    func exec(_ ns: String, _ args: [String]) throws -> CommandRunner.Output {
        try CommandRunner(netns: ns).run(args[0], Array(args.dropFirst()))
    }

    /// Trellis's rules in namespace `ns`, with the back end found there.
    func capture(in ns: String) throws -> Capture {
        let runner = CommandRunner(netns: ns)
        return Capture(backend: try IPTablesBackend.detect(runner: runner), runner: runner)
    }

    /// A one-thread event loop group whose thread has joined namespace `ns`: sockets it opens live
    /// there.
    func eventLoopGroup(in ns: String) throws -> MultiThreadedEventLoopGroup {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let path = "/var/run/netns/\(ns)"
        try group.next().submit {
            let fd = open(path, O_RDONLY)
            guard fd >= 0 else { throw LabError("open \(path): errno \(errno)") }
            defer { close(fd) }
            guard Self.setns(fd) == 0 else { throw LabError("setns \(path): errno \(errno)") }
        }.wait()
        return group
    }
}

extension NetnsLab {
    /// setns(2) for network namespaces (glibc declares it only under _GNU_SOURCE, which the Glibc
    /// module does not define, so it is looked up by name).
    static func setns(_ fd: Int32) -> Int32 {
        typealias SetNS = @convention(c) (Int32, Int32) -> Int32
        guard let symbol = dlsym(nil, "setns") else { return -1 }
        let cloneNewNet: Int32 = 0x4000_0000
        return unsafeBitCast(symbol, to: SetNS.self)(fd, cloneNewNet)
    }
}

/// The hosts file `ip netns exec NS` shows programs in namespace `ns` (/etc/netns/NS/hosts, bind
/// mounted over /etc/hosts): how a legacy program finds a service by name. Removed by `remove()`.
struct NetnsHosts {
    let folder: URL

    init(ns: String, names: [(address: String, name: String)]) throws {
        folder = URL(fileURLWithPath: "/etc/netns/\(ns)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        let lines = ["127.0.0.1 localhost"] + names.map { "\($0.address) \($0.name)" }
        try (lines.joined(separator: "\n") + "\n").write(
            to: folder.appendingPathComponent("hosts"),
            atomically: true,
            encoding: .utf8
        )
    }

    func remove() { try? FileManager.default.removeItem(at: folder) }
}

struct LabError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
