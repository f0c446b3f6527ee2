import Foundation
import Interceptor
import NIOCore
import NIOPosix
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The agent's capture path for real: `trellis-agent` (the binary) runs in "VM A" with a capture
/// listener on :15001 whose only route is a passthrough cluster, the capture rules send A's
/// outbound connections to it, and an unmodified client (curl, a bash TCP client) reaches VM B
/// exactly as before — through the proxy, which sniffs HTTP/1 from raw TCP.
@Suite(.serialized, .disabled(if: NetnsLab.unavailableReason != nil, "\(NetnsLab.unavailableReason ?? "")"))
struct AgentPathNetnsTests {
    static var binary: String {
        URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent(
            "trellis-agent"
        ).path
    }

    /// Answers every read with `echo:<bytes>`.
    final class Echo: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var reply = ByteBuffer(string: "echo:")
            var bytes = unwrapInboundIn(data)
            reply.writeBuffer(&bytes)
            context.writeAndFlush(wrapOutboundOut(reply), promise: nil)
        }
    }

    @Test func capturedHTTPAndTCPPassThroughTheAgentToTheirOriginalDestination() async throws {
        let lab = try NetnsLab(subnet: 9)
        defer { lab.destroy() }
        let groupB = try lab.eventLoopGroup(in: lab.b)
        defer { groupB.shutdownGracefully { _ in } }
        let http = try await CaptureNetnsTests.listen(groupB, host: "::", port: 8080, name: "server-b")
        let loop = groupB.next()
        let echo = try await loop.flatSubmit {
            ServerBootstrap(group: loop)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(Echo()) }
                }
                .bind(host: "0.0.0.0", port: 9000)
        }.get()
        defer {
            http.close(promise: nil)
            echo.close(promise: nil)
        }

        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("trellis-agent-path-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let config = dir.appendingPathComponent("capture.yaml")
        try """
        admin: {address: 127.0.0.1:15000}
        upstream_mark: 0x1000
        listeners:
          - name: outbound
            address: 0.0.0.0:15001
            transparent: {sniff_timeout: 5s}
            virtual_hosts:
              - {name: allow_any, domains: ["*"], routes: [{name: passthrough, match: {prefix: /}, route: {cluster: passthrough}}]}
        clusters:
          - {name: passthrough, original_destination: true}
        """.write(to: config, atomically: true, encoding: .utf8)
        let agent = Process()
        agent.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        agent.arguments = [
            "ip", "netns", "exec", lab.a, Self.binary, "gateway", "--config", config.path, "--event-loops", "1",
        ]
        agent.standardOutput = FileHandle.nullDevice
        agent.standardError = FileHandle.nullDevice
        try agent.run()
        defer {
            kill(agent.processIdentifier, SIGKILL)
            agent.waitUntilExit()
        }
        var ready = false
        for _ in 0..<100 where !ready {
            ready =
                (try? lab.exec(lab.a, ["curl", "-s", "--max-time", "1", "http://127.0.0.1:15000/ready"]))?.status == 0
            if !ready { try await Task.sleep(for: .milliseconds(100)) }
        }
        #expect(ready, "the agent did not start in \(lab.a)")

        let capture = try lab.capture(in: lab.a)
        try capture.apply(try RuleSet(CaptureConfig()))
        defer { try? capture.remove() }

        // HTTP: the client's request arrives at B as before (B sees no original destination: it
        // was reached directly, by the agent).
        let answer = try lab.exec(lab.a, ["curl", "-s", "--max-time", "5", "http://\(lab.bAddress):8080/"])
        #expect(
            answer.status == 0 && answer.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "server-b direct"
        )
        // Raw TCP (not HTTP): relayed both ways.
        let tcp = try lab.exec(
            lab.a,
            ["bash", "-c", "exec 3<>/dev/tcp/\(lab.bAddress)/9000; printf 'ping' >&3; timeout 3 head -c 9 <&3"]
        )
        #expect(tcp.stdout == "echo:ping", "\(tcp)")

        // Both went through the agent.
        let metrics = try lab.exec(lab.a, ["curl", "-s", "--max-time", "2", "http://127.0.0.1:15000/stats/prometheus"])
            .stdout
        #expect(metrics.contains(#"trellis_sniffed_connections_total{protocol="http1"} 1"#), "\(metrics)")
        #expect(metrics.contains(#"trellis_sniffed_connections_total{protocol="tcp"} 1"#))
        #expect(metrics.contains(#"trellis_upstream_requests_total{cluster="passthrough",class="2xx"} 1"#))
    }

    /// `trellis-agent run`: it binds its listeners, then installs the capture rules itself; a plain
    /// client's request goes through it; SIGTERM removes every rule it installed and exits 0.
    @Test func runInstallsItsRulesOnlyOnceListeningAndRemovesThemOnSIGTERM() async throws {
        let lab = try NetnsLab(subnet: 10)
        defer { lab.destroy() }
        let groupB = try lab.eventLoopGroup(in: lab.b)
        defer { groupB.shutdownGracefully { _ in } }
        let http = try await CaptureNetnsTests.listen(groupB, host: "::", port: 8080, name: "server-b")
        defer { http.close(promise: nil) }

        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("trellis-agent-run-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let config = dir.appendingPathComponent("agent.yaml")
        try "capture: {inbound_ports: [9]}\n".write(to: config, atomically: true, encoding: .utf8)
        let before = try lab.exec(lab.a, ["iptables-save"]).stdout
        #expect(!before.contains("TRELLIS"))

        let log = dir.appendingPathComponent("agent.log")
        FileManager.default.createFile(atPath: log.path, contents: nil)
        let agent = Process()
        agent.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        agent.arguments = [
            "ip", "netns", "exec", lab.a, Self.binary, "run", "--config", config.path, "--event-loops", "1",
            "--control-socket", dir.appendingPathComponent("agent.sock").path,
        ]
        let handle = try FileHandle(forWritingTo: log)
        agent.standardOutput = handle
        agent.standardError = handle
        try agent.run()
        defer {
            if agent.isRunning {
                kill(agent.processIdentifier, SIGKILL)
                agent.waitUntilExit()
            }
            _ = try? lab.capture(in: lab.a).remove()
        }
        var installed = false
        for _ in 0..<100 where !installed {
            installed = (try? lab.exec(lab.a, ["iptables-save"]).stdout.contains("TRELLIS_OUTPUT")) ?? false
            if !installed { try await Task.sleep(for: .milliseconds(100)) }
        }
        #expect(installed, "\((try? String(contentsOf: log, encoding: .utf8)) ?? "")")
        // The listeners were up before the rules: the first request is served.
        let answer = try lab.exec(lab.a, ["curl", "-s", "--max-time", "5", "http://\(lab.bAddress):8080/"])
        #expect(answer.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "server-b direct")
        let metrics = try lab.exec(lab.a, ["curl", "-s", "--max-time", "2", "http://127.0.0.1:15000/stats/prometheus"])
            .stdout
        #expect(metrics.contains(#"trellis_sniffed_connections_total{protocol="http1"} 1"#), "\(metrics)")

        kill(agent.processIdentifier, SIGTERM)
        var exited = false
        for _ in 0..<100 where !exited {
            exited = !agent.isRunning
            if !exited { try await Task.sleep(for: .milliseconds(100)) }
        }
        #expect(exited && agent.terminationStatus == 0, "\((try? String(contentsOf: log, encoding: .utf8)) ?? "")")
        let after = try lab.exec(lab.a, ["iptables-save"]).stdout
        #expect(!after.contains("TRELLIS"), "\(after)")
        // Without the agent, traffic goes direct again.
        let direct = try lab.exec(lab.a, ["curl", "-s", "--max-time", "5", "http://\(lab.bAddress):8080/"])
        #expect(direct.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "server-b direct")
    }
}
