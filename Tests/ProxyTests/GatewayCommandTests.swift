import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import Testing
import TrellisTestSupport

#if canImport(Glibc)
import Glibc
#endif

/// `trellis-agent gateway` as an operator runs it: the real binary, its exit codes and messages,
/// SIGHUP reloads and SIGTERM.
@Suite(.serialized) struct GatewayCommandTests {
    let group = MultiThreadedEventLoopGroup.singleton

    /// The `trellis-agent` built next to this test bundle (`swift build --build-tests` builds both).
    static var binary: URL {
        URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent(
            "trellis-agent"
        )
    }

    static let examples = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("examples")

    struct Result {
        var status: Int32
        var stdout: String
        var stderr: String
    }

    private static func run(_ arguments: [String]) throws -> Result {
        let process = Process()
        process.executableURL = binary
        process.arguments = arguments
        let out = Pipe()
        let err = Pipe()
        process.standardOutput = out
        process.standardError = err
        try process.run()
        process.waitUntilExit()
        return Result(
            status: process.terminationStatus,
            stdout: String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self),
            stderr: String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        )
    }

    /// A loopback port that nothing listens on (outside the range port 0 binds use).
    private static func freePort() throws -> Int { Peers.freePort() }

    @Test func checkAcceptsTheShippedExamples() throws {
        for name in ["gateway.yaml", "gateway-routes.yaml"] {
            let path = Self.examples.appendingPathComponent(name).path
            let r = try Self.run(["gateway", "--config", path, "--check"])
            #expect(r.status == 0, "\(name): \(r.stderr)")
            #expect(r.stdout.contains("\(path): ok"))
        }
    }

    @Test func anInvalidFileFailsAtStartWithFileLineAndKeyPath() throws {
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("trellis-bad-\(getpid()).yaml")
        defer { try? FileManager.default.removeItem(at: file) }
        try """
        listeners:
          - name: l
            address: 127.0.0.1:0
            virtual_hosts: [{name: a, domains: ["*"], routes: [{name: r, match: {prefix: /}, route: {cluster: c}}]}]
        clusters:
          - name: c
            lb_policy: fastest
            endpoints: [{address: 127.0.0.1:1}]
        """.write(to: file, atomically: true, encoding: .utf8)
        let r = try Self.run(["gateway", "--config", file.path])
        #expect(r.status != 0)
        #expect(r.stderr.contains("\(file.path):7:"), "\(r.stderr)")
        #expect(r.stderr.contains("clusters[0].lb_policy: expected one of round_robin"), "\(r.stderr)")
        #expect(!r.stderr.contains("Fatal error"))
        #expect(!r.stderr.contains("Usage:"), "a configuration error is not a usage error: \(r.stderr)")
    }

    @Test func aMissingFileIsACleanError() throws {
        let r = try Self.run(["gateway", "--config", "/nonexistent/trellis.yaml"])
        #expect(r.status != 0)
        #expect(r.stderr.contains("/nonexistent/trellis.yaml: cannot read the file"), "\(r.stderr)")
    }

    @Test func badEventLoopCountIsRejected() throws {
        let path = Self.examples.appendingPathComponent("gateway.yaml").path
        let r = try Self.run(["gateway", "--config", path, "--event-loops", "0"])
        #expect(r.status != 0)
        #expect(r.stderr.contains("--event-loops: expected 1...1024, got 0"), "\(r.stderr)")
    }

    @Test func sighupReloadsTheFileAndAnInvalidOneIsRefused() async throws {
        let alpha = try await TestUpstream.start(name: "alpha", group: group)
        let beta = try await TestUpstream.start(name: "beta", group: group)
        let port = try Self.freePort()
        let admin = try Self.freePort()
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("trellis-reload-\(getpid()).yaml")
        func config(_ target: TestUpstream) -> String {
            """
            admin: {address: 127.0.0.1:\(admin)}
            listeners:
              - name: l
                address: 127.0.0.1:\(port)
                virtual_hosts: [{name: a, domains: ["*"], routes: [{name: r, match: {prefix: /}, route: {cluster: c}}]}]
            clusters:
              - {name: c, endpoints: [{address: 127.0.0.1:\(target.port)}]}
            """
        }
        try config(alpha).write(to: file, atomically: true, encoding: .utf8)
        let process = Process()
        process.executableURL = Self.binary
        process.arguments = ["gateway", "--config", file.path, "--event-loops", "1", "--log-level", "info"]
        let err = Pipe()
        process.standardError = err
        try process.run()
        defer {
            if process.isRunning { process.terminate() }
            try? FileManager.default.removeItem(at: file)
        }

        func body() async -> String {
            (try? await TestHTTPClient.get(port: port, "/", group: group).body) ?? "down"
        }
        func waitFor(_ expected: String) async throws -> Bool {
            let deadline = ContinuousClock.now + .seconds(10)
            while ContinuousClock.now < deadline {
                if await body() == expected { return true }
                try await Task.sleep(for: .milliseconds(50))
            }
            return false
        }

        #expect(try await waitFor("alpha"))
        let client = try await TestHTTPClient.connect(port: port, group: group)
        #expect(try await client.request(.GET, "/").body == "alpha")

        try config(beta).write(to: file, atomically: true, encoding: .utf8)
        kill(process.processIdentifier, SIGHUP)
        #expect(try await waitFor("beta"))
        // The keep-alive connection opened before the reload is still served, with the new routes.
        #expect(try await client.request(.GET, "/").body == "beta")

        try "clusters: [oops".write(to: file, atomically: true, encoding: .utf8)
        kill(process.processIdentifier, SIGHUP)
        try await Task.sleep(for: .milliseconds(300))
        #expect(await body() == "beta")

        // An alias bomb is refused at once, and the next good file still applies.
        try AliasBombs.tenLevels.write(to: file, atomically: true, encoding: .utf8)
        kill(process.processIdentifier, SIGHUP)
        try await Task.sleep(for: .milliseconds(300))
        #expect(await body() == "beta")
        try config(alpha).write(to: file, atomically: true, encoding: .utf8)
        kill(process.processIdentifier, SIGHUP)
        #expect(try await waitFor("alpha"), "a good file after the bomb applies")
        await client.close()

        process.terminate()  // SIGTERM: graceful shutdown
        let deadline = ContinuousClock.now + .seconds(10)
        while process.isRunning && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(20)) }
        #expect(!process.isRunning)
        #expect(process.terminationStatus == 0)
        let log = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(log.contains("reload rejected; the previous configuration stays"), "\(log)")
        #expect(log.contains("an alias bomb"), "\(log)")
        await alpha.stop()
        await beta.stop()
    }

    /// The gateway's access log as an operator runs it: JSON lines in the configured file, the
    /// file moved away and SIGUSR1 (what logrotate does) → the next lines in a new file; a reload
    /// that changes the access log is refused (it applies at start only); SIGTERM writes what was
    /// gathered before the process exits.
    @Test func theAccessLogFileIsReopenedOnSIGUSR1AndAReloadThatChangesItIsRefused() async throws {
        let alpha = try await TestUpstream.start(name: "alpha", group: group)
        let port = try Self.freePort()
        let admin = try Self.freePort()
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("trellis-gw-access-\(getpid())")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        let file = folder.appendingPathComponent("gateway.yaml")
        let logPath = folder.appendingPathComponent("access.log").path
        func config(sampleRate: String) -> String {
            """
            admin: {address: 127.0.0.1:\(admin)}
            access_log: {output: \(logPath), sample_rate: \(sampleRate)}
            listeners:
              - name: edge
                address: 127.0.0.1:\(port)
                virtual_hosts: [{name: a, domains: ["*"], routes: [{name: r, match: {prefix: /}, route: {cluster: c}}]}]
            clusters:
              - {name: c, endpoints: [{address: 127.0.0.1:\(alpha.port)}]}
            """
        }
        try config(sampleRate: "1").write(to: file, atomically: true, encoding: .utf8)
        let process = Process()
        process.executableURL = Self.binary
        process.arguments = ["gateway", "--config", file.path, "--event-loops", "1"]
        let err = Pipe()
        process.standardError = err
        try process.run()
        defer {
            if process.isRunning { process.terminate() }
            try? FileManager.default.removeItem(at: folder)
        }
        func paths(_ file: String) -> [String] {
            ((try? AccessLogFile.read(file)) ?? []).compactMap { $0["path"] as? String }
        }
        func waitForLines(_ count: Int, in file: String) async throws -> [String] {
            for _ in 0..<100 where paths(file).count < count { try await Task.sleep(for: .milliseconds(50)) }
            return paths(file)
        }
        var up = false
        for _ in 0..<200 where !up {
            up = (try? await TestHTTPClient.get(port: port, "/warm-up", group: group)) != nil
            if !up { try await Task.sleep(for: .milliseconds(50)) }
        }
        try #require(up)
        let client = try await TestHTTPClient.connect(port: port, group: group)
        for i in 0..<3 { #expect(try await client.request(.GET, "/one/\(i)").status == .ok) }
        #expect(try await waitForLines(4, in: logPath) == ["/warm-up", "/one/0", "/one/1", "/one/2"])

        try FileManager.default.moveItem(atPath: logPath, toPath: logPath + ".1")
        kill(process.processIdentifier, SIGUSR1)
        try await Task.sleep(for: .milliseconds(300))
        for i in 0..<2 { #expect(try await client.request(.GET, "/two/\(i)").status == .ok) }
        #expect(try await waitForLines(2, in: logPath) == ["/two/0", "/two/1"])
        #expect(paths(logPath + ".1").count == 4)

        try config(sampleRate: "0.5").write(to: file, atomically: true, encoding: .utf8)
        kill(process.processIdentifier, SIGHUP)
        try await Task.sleep(for: .milliseconds(300))
        #expect(try await client.request(.GET, "/three").status == .ok)
        await client.close()
        process.terminate()
        for _ in 0..<200 where process.isRunning { try await Task.sleep(for: .milliseconds(20)) }
        #expect(!process.isRunning && process.terminationStatus == 0)
        #expect(paths(logPath) == ["/two/0", "/two/1", "/three"])
        let log = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(log.contains("access_log: changed"), "\(log)")
        #expect(log.contains("SIGUSR1: access log reopened"), "\(log)")
        await alpha.stop()
    }

    /// With every request traced to a collector that is down, the gateway's memory stays bounded:
    /// the spans waiting for export are capped (2,048), the rest dropped, so 12,000 more requests
    /// after a warm-up leave its resident size within a few MiB, and every request is answered.
    @Test func aDeadCollectorLeavesTheMemoryBounded() async throws {
        let alpha = try await TestUpstream.start(name: "alpha", group: group)
        let port = try Self.freePort()
        let admin = try Self.freePort()
        let dead = try Self.freePort()
        let file = FileManager.default.temporaryDirectory.appendingPathComponent(
            "trellis-gw-dead-otlp-\(getpid()).yaml"
        )
        try """
        admin: {address: 127.0.0.1:\(admin)}
        tracing: {collector: 127.0.0.1:\(dead), sample_rate: 1}
        listeners:
          - name: edge
            address: 127.0.0.1:\(port)
            virtual_hosts: [{name: a, domains: ["*"], routes: [{name: r, match: {prefix: /}, route: {cluster: c}}]}]
        clusters:
          - {name: c, endpoints: [{address: 127.0.0.1:\(alpha.port)}]}
        """.write(to: file, atomically: true, encoding: .utf8)
        let process = Process()
        process.executableURL = Self.binary
        process.arguments = ["gateway", "--config", file.path, "--event-loops", "1", "--log-level", "error"]
        process.standardError = FileHandle.nullDevice
        try process.run()
        defer {
            if process.isRunning { process.terminate() }
            try? FileManager.default.removeItem(at: file)
        }
        var up = false
        for _ in 0..<200 where !up {
            up = (try? await TestHTTPClient.get(port: port, "/", group: group)) != nil
            if !up { try await Task.sleep(for: .milliseconds(50)) }
        }
        try #require(up)
        /// `count` requests on each of 4 keep-alive connections; how many were answered 200.
        func load(_ count: Int) async throws -> Int {
            try await withThrowingTaskGroup(of: Int.self) { tasks in
                for _ in 0..<4 {
                    tasks.addTask {
                        let client = try await TestHTTPClient.connect(port: port, group: group)
                        var ok = 0
                        for i in 0..<count where try await client.request(.GET, "/\(i)").status == .ok { ok += 1 }
                        await client.close()
                        return ok
                    }
                }
                return try await tasks.reduce(0, +)
            }
        }
        #expect(try await load(1000) == 4000)  // warm-up: the span queue fills to its bound
        let before = Peers.residentBytes(pid: process.processIdentifier)
        #expect(try await load(3000) == 12_000)
        let after = Peers.residentBytes(pid: process.processIdentifier)
        #expect(before > 0 && after - before < 8 << 20, "RSS \(before >> 20) MiB -> \(after >> 20) MiB")
        process.terminate()
        for _ in 0..<300 where process.isRunning { try await Task.sleep(for: .milliseconds(20)) }
        #expect(!process.isRunning && process.terminationStatus == 0)
        await alpha.stop()
    }

    /// After a burst of 2,000 connections that each sent half a request head, the gateway gives
    /// the memory they used back to the kernel within seconds (counted in
    /// `trellis_memory_returns_total`), instead of keeping its peak resident size for good.
    @Test func freedMemoryGoesBackAfterABurst() async throws {
        let port = try Self.freePort()
        let admin = try Self.freePort()
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("trellis-memory-\(getpid()).yaml")
        try """
        admin: {address: 127.0.0.1:\(admin)}
        listeners:
          - name: l
            address: 127.0.0.1:\(port)
            virtual_hosts: [{name: a, domains: ["*"], routes: [{name: r, match: {prefix: /}, route: {cluster: c}}]}]
        clusters:
          - {name: c, endpoints: [{address: 127.0.0.1:1}]}
        """.write(to: file, atomically: true, encoding: .utf8)
        let process = Process()
        process.executableURL = Self.binary
        process.arguments = ["gateway", "--config", file.path, "--event-loops", "2", "--log-level", "error"]
        try process.run()
        defer {
            if process.isRunning { process.terminate() }
            try? FileManager.default.removeItem(at: file)
        }
        func metric(_ name: String) async -> Double? {
            guard let text = try? await TestHTTPClient.get(port: admin, "/stats/prometheus", group: group).body else {
                return nil
            }
            let line = text.split(separator: "\n").first { $0.hasPrefix(name + " ") }
            return line.flatMap { Double($0.split(separator: " ")[1]) }
        }
        func residentMiB() -> Double { Double(Peers.residentBytes(pid: process.processIdentifier)) / 1_048_576 }
        #expect(await Peers.eventually(within: .seconds(10)) { await metric("trellis_memory_returns_total") == 0 })
        let before = residentMiB()

        // The 2,000 connections live in a child process: thousands of descriptors opened and
        // closed in this process would race Foundation's Process.run in other suites.
        let burst = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Fixtures/net/conn_burst.py").path
        let clientsDone = Task {
            await Peers.command(["python3", burst, "slowloris", "127.0.0.1", "\(port)", "2000", "6"])
        }
        #expect(
            await Peers.eventually(within: .seconds(20)) {
                await metric("trellis_downstream_connections_active") == 2000
            }
        )
        let peak = residentMiB()
        #expect(peak - before >= 10, "the burst grew the gateway by \(peak - before) MiB only: not a burst")
        let out = await clientsDone.value
        #expect(out.stdout.contains(#""opened": 2000"#), "\(out)")
        #expect(
            await Peers.eventually(within: .seconds(10)) { await metric("trellis_downstream_connections_active") == 0 }
        )
        // Checked every 5 s: within 15 s the memory has gone back.
        let returned = await Peers.eventually(within: .seconds(15)) {
            residentMiB() <= before + (peak - before) / 2
        }
        #expect(returned, "RSS \(before) MiB before, \(peak) at the peak, \(residentMiB()) after")
        #expect(await metric("trellis_memory_returns_total") ?? 0 >= 1)
    }

    /// An HTTP/2 client that asks for 256 MiB, opens its windows wide and then reads nothing: the
    /// gateway stops reading the upstream once the socket is full, so its memory stays flat.
    @Test(.enabled(if: !HTTP2AbuseTests.hpackMissing, "needs PyPI hpack: run scripts/bootstrap.sh"))
    func aNeverReadingHTTP2ClientDoesNotGrowTheGateway() async throws {
        let upstream = try await TestUpstream.start(name: "alpha", group: group)
        let port = try Self.freePort()
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("trellis-h2-slow-\(getpid()).yaml")
        try """
        listeners:
          - name: l
            address: 127.0.0.1:\(port)
            virtual_hosts: [{name: a, domains: ["*"], routes: [{name: r, match: {prefix: /}, route: {cluster: c, timeout: none}}]}]
        clusters:
          - {name: c, endpoints: [{address: 127.0.0.1:\(upstream.port)}]}
        """.write(to: file, atomically: true, encoding: .utf8)
        let process = Process()
        process.executableURL = Self.binary
        process.arguments = ["gateway", "--config", file.path, "--event-loops", "1", "--log-level", "error"]
        try process.run()
        defer {
            if process.isRunning { process.terminate() }
            try? FileManager.default.removeItem(at: file)
            Task { await upstream.stop() }
        }
        func residentMiB() -> Double { Double(Peers.residentBytes(pid: process.processIdentifier)) / 1_048_576 }
        #expect(await Peers.eventually(within: .seconds(10)) { !Peers.portsFree([port]) })
        let warm = await Peers.command([
            "curl", "-s", "--http2-prior-knowledge", "http://127.0.0.1:\(port)/bytes/1048576", "-o", "/dev/null",
        ])
        #expect(warm.status == 0)
        let before = residentMiB()
        let client = Task {
            await Peers.command(["python3", HTTP2AbuseTests.script, "never_reads", "127.0.0.1", "\(port)", "4"])
        }
        var peak = before
        for _ in 0..<35 {
            peak = max(peak, residentMiB())
            try await Task.sleep(for: .milliseconds(100))
        }
        let out = await client.value
        #expect(out.status == 0, "\(out)")
        #expect(peak - before < 24, "RSS \(before) MiB before, \(peak) MiB while the client read nothing")
    }
}
