public import Foundation
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Helpers for tests that run real peers (Envoy, Python servers, curl) on loopback.
public enum Peers {
    public static func which(_ name: String) -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
        for dir in path.split(separator: ":").map(String.init)
        where FileManager.default.isExecutableFile(atPath: "\(dir)/\(name)") {
            return "\(dir)/\(name)"
        }
        return nil
    }

    public static var envoyMissing: Bool { which("envoy") == nil }

    /// Debian's python3 with PyPI grpcio importable (scripts/bootstrap.sh installs it).
    public static var grpcioMissing: Bool {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", "-c", "import grpc, grpc_health.v1.health_pb2"]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        guard (try? process.run()) != nil else { return true }
        process.waitUntilExit()
        return process.terminationStatus != 0
    }

    /// Whether nothing listens on these TCP ports (any address).
    public static func portsFree(_ ports: [Int]) -> Bool {
        ports.allSatisfy { port in
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            defer { close(fd) }
            var addr = sockaddr_in()
            addr.sin_family = sa_family_t(AF_INET)
            addr.sin_addr.s_addr = 0
            addr.sin_port = in_port_t(UInt16(port).bigEndian)
            return withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            } == 0
        }
    }

    /// The resident size of process `pid` (this process when nil), in bytes, from
    /// `/proc/PID/status`; 0 when unreadable.
    public static func residentBytes(pid: Int32? = nil) -> Int {
        let path = "/proc/\(pid.map { "\($0)" } ?? "self")/status"
        guard let status = try? String(contentsOfFile: path, encoding: .utf8) else { return 0 }
        for line in status.split(separator: "\n") where line.hasPrefix("VmRSS:") {
            return (Int(line.split(separator: " ").dropFirst().first ?? "0") ?? 0) * 1024
        }
        return 0
    }

    /// A loopback port for a server a test starts by number (pilot, Envoy, Python), that nothing
    /// listens on now. Taken from 20000–29999, outside the kernel's range for port 0 (32768 and
    /// up): the proxy binds port 0 with `SO_REUSEPORT`, and a later `SO_REUSEPORT` bind of the same
    /// number (Envoy's listeners) would share it and mix two tests' connections. Each call in a
    /// process gets a different number.
    public static func freePort() -> Int {
        nextPort.withLock { next in
            for _ in 0..<10_000 {
                let port = 20_000 + next % 10_000
                next += 1
                if portsFree([port]) { return port }
            }
            return 0
        }
    }

    private static let nextPort = Mutex(Int(getpid()) * 37 % 10_000)

    /// A child process killed (SIGKILL: a child of the test process may inherit a mask that blocks
    /// SIGTERM) and reaped when the value is stopped.
    public final class Child: @unchecked Sendable {
        public let process = Process()

        public init(_ arguments: [String], environment: [String: String]? = nil, output: URL? = nil) throws {
            process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            process.arguments = arguments
            if let environment {
                process.environment = ProcessInfo.processInfo.environment.merging(environment) { _, new in new }
            }
            if let output {
                FileManager.default.createFile(atPath: output.path, contents: nil)
                let handle = try FileHandle(forWritingTo: output)
                process.standardOutput = handle
                process.standardError = handle
            } else {
                process.standardOutput = FileHandle.nullDevice
                process.standardError = FileHandle.nullDevice
            }
            try process.run()
        }

        public func stop() {
            guard process.isRunning else { return }
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }

        deinit { stop() }
    }

    /// Python's http.server serving one file `hello` whose contents are `body`.
    public static func pythonHTTPServer(port: Int, body: String, root: URL) throws -> Child {
        let dir = root.appendingPathComponent("upstream-\(port)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        try body.write(to: dir.appendingPathComponent("hello"), atomically: true, encoding: .utf8)
        return try Child(["python3", "-m", "http.server", "\(port)", "--bind", "127.0.0.1", "--directory", dir.path])
    }

    /// An HTTP request through curl: the status (0 when there was no answer) and the body. Waits
    /// without blocking a thread (tests share a small cooperative pool with the servers they test).
    public static func http(
        _ method: String,
        _ url: String,
        body: String? = nil,
        headers: [String] = []
    ) async -> (status: Int, body: String) {
        let bodyFile = FileManager.default.temporaryDirectory.appendingPathComponent(
            "trellis-curl-\(UUID().uuidString)"
        )
        defer { try? FileManager.default.removeItem(at: bodyFile) }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/curl")
        var arguments = ["-s", "--max-time", "3", "-X", method, "-o", bodyFile.path, "-w", "%{http_code}", url]
        for header in headers { arguments += ["-H", header] }
        if let body { arguments += ["-H", "content-type: application/json", "--data-binary", body] }
        process.arguments = arguments
        let out = Pipe()
        process.standardOutput = out
        process.standardError = FileHandle.nullDevice
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            process.terminationHandler = { _ in done.resume() }
            if (try? process.run()) == nil {
                process.terminationHandler = nil
                done.resume()
            }
        }
        let status = Int(String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)) ?? 0
        let text = (try? String(contentsOf: bodyFile, encoding: .utf8)) ?? ""
        return (status, text)
    }

    /// Runs a command to its end without blocking a thread: exit status (or the terminating signal
    /// as 128+N), standard output and standard error (through files: a pipe read would block).
    public static func command(_ arguments: [String]) async -> (status: Int32, stdout: String, stderr: String) {
        let base = FileManager.default.temporaryDirectory.appendingPathComponent("trellis-cmd-\(UUID().uuidString)")
        let outURL = base.appendingPathExtension("out")
        let errURL = base.appendingPathExtension("err")
        defer {
            try? FileManager.default.removeItem(at: outURL)
            try? FileManager.default.removeItem(at: errURL)
        }
        FileManager.default.createFile(atPath: outURL.path, contents: nil)
        FileManager.default.createFile(atPath: errURL.path, contents: nil)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = arguments
        guard let out = try? FileHandle(forWritingTo: outURL), let err = try? FileHandle(forWritingTo: errURL) else {
            return (127, "", "cannot create output files")
        }
        process.standardOutput = out
        process.standardError = err
        let started = await withCheckedContinuation { (done: CheckedContinuation<Bool, Never>) in
            process.terminationHandler = { _ in done.resume(returning: true) }
            do {
                try process.run()
            } catch {
                process.terminationHandler = nil
                done.resume(returning: false)
            }
        }
        try? out.close()
        try? err.close()
        let o = (try? String(contentsOf: outURL, encoding: .utf8)) ?? ""
        let e = (try? String(contentsOf: errURL, encoding: .utf8)) ?? ""
        guard started else { return (127, o, "cannot start \(arguments.first ?? "")") }
        let status =
            process.terminationReason == .uncaughtSignal ? 128 + process.terminationStatus : process.terminationStatus
        return (status, o, e)
    }

    /// Polls `condition` every 50 ms until it holds or `timeout` passes; returns whether it held.
    public static func eventually(within timeout: Duration, _ condition: () async throws -> Bool) async rethrows -> Bool
    {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if try await condition() { return true }
            try? await Task.sleep(for: .milliseconds(50))
        }
        return try await condition()
    }

    public static func temporaryDirectory(_ name: String) throws -> URL {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent(
            "trellis-\(name)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        )
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        return dir
    }
}
