import Foundation
import Interceptor
import NIOCore
import NIOPosix
import Testing

/// Real iptables in namespaces this test creates: rules installed, verified and removed, and real
/// connections (curl) captured to listeners that read their original destination.
@Suite(
    .serialized,
    .disabled(if: NetnsLab.unavailableReason != nil, Comment(rawValue: NetnsLab.unavailableReason ?? ""))
)
struct CaptureNetnsTests {
    /// A server that answers each connection with `<name> <original destination>` (or
    /// `<name> direct` when the connection was not redirected), then closes.
    final class OriginalDestinationEcho: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer
        let name: String
        init(name: String) { self.name = name }

        func channelActive(context: ChannelHandlerContext) {
            let channel = context.channel
            let name = self.name
            OriginalDestination.of(channel).whenComplete { result in
                let text: String
                switch result {
                case .success(let address): text = "\(name) \(address.ipAddress ?? "?") \(address.port ?? 0)"
                case .failure(let error as OriginalDestination.Error) where error.isNotRedirected:
                    text = "\(name) direct"
                case .failure(let error): text = "\(name) error \(error)"
                }
                let body = text + "\n"
                let response =
                    "HTTP/1.1 200 OK\r\ncontent-length: \(body.utf8.count)\r\nconnection: close\r\n\r\n\(body)"
                channel.writeAndFlush(channel.allocator.buffer(string: response)).whenComplete { _ in
                    channel.close(promise: nil)
                }
            }
            context.fireChannelActive()
        }
    }

    /// Listens from the group's own thread: NIO creates the socket on the calling thread, and only
    /// that thread has joined the namespace.
    static func listen(_ group: any EventLoopGroup, host: String, port: Int, name: String) async throws -> any Channel {
        let loop = group.next()
        return try await loop.flatSubmit {
            ServerBootstrap(group: loop)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .serverChannelOption(.backlog, value: 4096)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(OriginalDestinationEcho(name: name))
                    }
                }
                .bind(host: host, port: port)
        }.get()
    }

    private func curl(_ lab: NetnsLab, from ns: String, _ url: String) throws -> String {
        let out = try lab.exec(ns, ["curl", "-s", "-g", "--max-time", "5", url])
        return out.status == 0 ? out.stdout.trimmingCharacters(in: .whitespacesAndNewlines) : "curl exit \(out.status)"
    }

    @Test func outboundConnectionsReachTheCaptureListenerWithTheirOriginalDestination() async throws {
        let lab = try NetnsLab(subnet: 1)
        defer { lab.destroy() }
        let groupA = try lab.eventLoopGroup(in: lab.a)
        let groupB = try lab.eventLoopGroup(in: lab.b)
        defer {
            groupA.shutdownGracefully { _ in }
            groupB.shutdownGracefully { _ in }
        }
        let capture = try lab.capture(in: lab.a)
        // VM A captures outbound; 15001 listens on both families.
        // "::" takes IPv4 connections too (dual stack).
        let outbound = try await Self.listen(groupA, host: "::", port: 15001, name: "outbound")
        // VM B serves 8080 itself (reached only when not captured).
        let server = try await Self.listen(groupB, host: "::", port: 8080, name: "server-b")
        defer {
            for c in [outbound, server] { c.close(promise: nil) }
        }
        #expect(try curl(lab, from: lab.a, "http://\(lab.bAddress):8080/") == "server-b direct")

        let rules = try RuleSet(CaptureConfig(excludedPorts: [9099]))
        try capture.apply(rules)
        #expect(try capture.verify(rules) == [])
        #expect(try curl(lab, from: lab.a, "http://\(lab.bAddress):8080/") == "outbound \(lab.bAddress) 8080")
        #expect(try curl(lab, from: lab.a, "http://[\(lab.bAddress6)]:8080/") == "outbound \(lab.bAddress6) 8080")
        // Excluded port: not captured (nothing listens on B:9099, so the connection is refused).
        #expect(try curl(lab, from: lab.a, "http://\(lab.bAddress):9099/") == "curl exit 7")

        try capture.remove()
        #expect(try curl(lab, from: lab.a, "http://\(lab.bAddress):8080/") == "server-b direct")

        // Excluded CIDRs go direct; with an include list, only those networks are captured.
        let excluding = try RuleSet(CaptureConfig(outboundExcludeCIDRs: [try CIDR("\(lab.bAddress)/32")]))
        try capture.apply(excluding)
        #expect(try curl(lab, from: lab.a, "http://\(lab.bAddress):8080/") == "server-b direct")
        #expect(try curl(lab, from: lab.a, "http://[\(lab.bAddress6)]:8080/") == "outbound \(lab.bAddress6) 8080")
        let including = try RuleSet(CaptureConfig(outboundIncludeCIDRs: [try CIDR("10.77.0.0/16")]))
        try capture.apply(including)
        #expect(try capture.verify(including) == [])
        #expect(try curl(lab, from: lab.a, "http://\(lab.bAddress):8080/") == "outbound \(lab.bAddress) 8080")
        #expect(try curl(lab, from: lab.a, "http://[\(lab.bAddress6)]:8080/") == "server-b direct")
        try capture.remove()
    }

    @Test func inboundConnectionsReachTheInboundListener() async throws {
        let lab = try NetnsLab(subnet: 2)
        defer { lab.destroy() }
        let groupB = try lab.eventLoopGroup(in: lab.b)
        defer { groupB.shutdownGracefully { _ in } }
        let capture = try lab.capture(in: lab.b)
        let inbound = try await Self.listen(groupB, host: "::", port: 15006, name: "inbound")
        let ssh = try await Self.listen(groupB, host: "::", port: 22, name: "sshd")
        defer {
            inbound.close(promise: nil)
            ssh.close(promise: nil)
        }
        try capture.apply(try RuleSet(CaptureConfig()))
        #expect(try curl(lab, from: lab.a, "http://\(lab.bAddress):9090/") == "inbound \(lab.bAddress) 9090")
        #expect(try curl(lab, from: lab.a, "http://[\(lab.bAddress6)]:9090/") == "inbound \(lab.bAddress6) 9090")
        // Port 22 is excluded by default.
        #expect(try curl(lab, from: lab.a, "http://\(lab.bAddress):22/") == "sshd direct")
        try capture.remove()
    }

    @Test func theAgentsOwnMarkedTrafficIsNotCapturedAgain() async throws {
        let lab = try NetnsLab(subnet: 3)
        defer { lab.destroy() }
        let groupA = try lab.eventLoopGroup(in: lab.a)
        let groupB = try lab.eventLoopGroup(in: lab.b)
        defer {
            groupA.shutdownGracefully { _ in }
            groupB.shutdownGracefully { _ in }
        }
        let capture = try lab.capture(in: lab.a)
        let outbound = try await Self.listen(groupA, host: "0.0.0.0", port: 15001, name: "outbound")
        let server = try await Self.listen(groupB, host: "0.0.0.0", port: 8080, name: "server-b")
        defer {
            outbound.close(promise: nil)
            server.close(promise: nil)
        }
        let config = CaptureConfig()
        try capture.apply(try RuleSet(config))
        // A socket carrying the agent's mark, as the agent's upstream connections do.
        let loopA = groupA.next()
        let mark = SocketOptionValue(config.agentMark)
        let target = lab.bAddress
        let collector = Collector()
        let channel = try await loopA.flatSubmit {
            ClientBootstrap(group: loopA)
                .channelOption(.socketOption(.init(rawValue: SO_MARK)), value: mark)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(collector) }
                }
                .connect(host: target, port: 8080)
        }.get()
        try await channel.closeFuture.get()
        let collected = try await channel.eventLoop.submit { collector.text }.get()
        #expect(collected.hasSuffix("server-b direct\n"), "\(collected)")
        try capture.remove()
    }

    /// Both back ends, explicitly: nft (Debian's default) and legacy.
    @Test(arguments: [IPTablesBackend.nft, .legacy])
    func removeLeavesOtherRulesAndTheSavedStateAsBefore(backend: IPTablesBackend) throws {
        let lab = try NetnsLab(subnet: backend == .nft ? 4 : 9)
        defer { lab.destroy() }
        let runner = CommandRunner(netns: lab.a)
        let capture = Capture(backend: backend, runner: runner)
        // A foreign tool's rules, in the same tables and built-in chains.
        let foreign =
            "*nat\n:FOREIGN - [0:0]\n-A OUTPUT -d 10.99.0.0/16 -j FOREIGN\n-A FOREIGN -p tcp -j RETURN\nCOMMIT\n"
        #expect(try runner.run(backend.restore(.ipv4), ["--noflush"], input: foreign).status == 0)
        // Rules and user chains, table by table (nft keeps a table's empty built-in chains once the
        // table was used; they carry no rule).
        func saved() throws -> [String] {
            var table = ""
            var lines: [String] = []
            for line in try runner.run(backend.save(.ipv4), []).stdout.split(separator: "\n") {
                if line.hasPrefix("*") { table = String(line) }
                if line.hasPrefix("-A ") || (line.hasPrefix(":") && line.contains(" - [")) {
                    lines.append("\(table) \(line)")
                }
            }
            return lines
        }
        let before = try saved()

        let gated = try RuleSet(CaptureConfig(gate: .init(queue: 3)))
        try capture.apply(gated)
        #expect(try capture.verify(gated) == [])
        // Applying again (or a changed set) replaces, never duplicates.
        let plain = try RuleSet(CaptureConfig(excludedPorts: [8443]))
        try capture.apply(plain)
        #expect(try capture.verify(plain) == [])
        #expect(try capture.verify(gated).contains { $0.hasPrefix("missing: [ipv4 mangle] chain TRELLIS_GATE_IN") })

        // A rule added behind Trellis's back is reported.
        #expect(
            try runner.run(
                "iptables-\(backend.rawValue)",
                ["-t", "nat", "-A", "TRELLIS_OUTPUT", "-p", "tcp", "--dport", "1234", "-j", "RETURN"]
            ).status == 0
        )
        #expect(
            try capture.verify(plain).contains {
                $0.contains("unexpected: [ipv4 nat] -A TRELLIS_OUTPUT -p tcp -m tcp --dport 1234 -j RETURN")
            }
        )

        try capture.remove()
        #expect(try saved() == before)
        #expect(try capture.verify(plain).contains { $0.hasPrefix("missing:") })
    }

    @Test(arguments: [IPTablesBackend.nft, .legacy])
    func aRejectedTransactionChangesNothing(backend: IPTablesBackend) throws {
        let lab = try NetnsLab(subnet: backend == .nft ? 5 : 10)
        defer { lab.destroy() }
        let runner = CommandRunner(netns: lab.a)
        let capture = Capture(backend: backend, runner: runner)
        let rules = try RuleSet(CaptureConfig())
        try capture.apply(rules)
        let before = try runner.run(backend.save(.ipv4), []).stdout.split(separator: "\n").filter { !$0.hasPrefix("#") }
        // A transaction with one bad line must leave everything as it was.
        let broken = capture.applyTransaction(rules, family: .ipv4, current: try capture.state(.ipv4))
            .replacingOccurrences(of: "--to-ports 15001", with: "--to-ports 99999")
        let out = try runner.run(backend.restore(.ipv4), ["--noflush"], input: broken)
        #expect(out.status != 0)
        let after = try runner.run(backend.save(.ipv4), []).stdout.split(separator: "\n").filter { !$0.hasPrefix("#") }
        #expect(after == before)
        #expect(try capture.verify(rules) == [])
        try capture.remove()
    }

    @Test func theRulesCommandInstallsVerifiesAndUninstalls() throws {
        let lab = try NetnsLab(subnet: 6)
        defer { lab.destroy() }
        let agent = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
            .appendingPathComponent("trellis-agent").path
        func run(_ args: String...) throws -> CommandRunner.Output { try lab.exec(lab.a, [agent, "rules"] + args) }
        func trellisLines() throws -> Int {
            try lab.exec(lab.a, ["iptables-save"]).stdout.split(separator: "\n").filter { $0.contains("TRELLIS") }.count
        }

        let install = try run("install")
        #expect(install.status == 0, "\(install.stderr)")
        #expect(try run("verify").stdout == "ok: the installed rules match\n")
        _ = try lab.exec(
            lab.a,
            ["iptables", "-t", "nat", "-A", "TRELLIS_OUTPUT", "-p", "tcp", "--dport", "7", "-j", "RETURN"]
        )
        let tampered = try run("verify")
        #expect(tampered.status == 1)
        #expect(tampered.stdout.contains("unexpected: [ipv4 nat] -A TRELLIS_OUTPUT -p tcp -m tcp --dport 7 -j RETURN"))
        #expect(try run("uninstall").status == 0)
        #expect(try trellisLines() == 0)

        // A configuration that would capture Trellis's own port: refused before any rule.
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("trellis-capture-\(getpid()).yaml")
        defer { try? FileManager.default.removeItem(at: file) }
        try "capture:\n  inbound_ports: [8080, 15001]\n".write(to: file, atomically: true, encoding: .utf8)
        let refused = try run("install", "--config", file.path)
        #expect(refused.status != 0)
        #expect(
            refused.stderr.contains("\(file.path):2:25: capture.inbound_ports[1]: port 15001 is Trellis's own")
                && !refused.stderr.contains("Usage:"),
            "\(refused.stderr)"
        )
        #expect(try trellisLines() == 0)
    }

    final class Collector: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer
        var text = ""
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var b = unwrapInboundIn(data)
            text += b.readString(length: b.readableBytes) ?? ""
        }
    }
}
