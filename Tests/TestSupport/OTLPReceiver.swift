public import Foundation

/// A real OTLP/gRPC trace receiver (Tests/Fixtures/otlp/receiver.py: grpcio and PyPI
/// opentelemetry-proto) on a loopback port; the spans it got, as the JSON objects it printed.
public final class OTLPReceiver: Sendable {
    public let port: Int
    private let child: Peers.Child
    private let output: URL

    /// Whether python3 can import the receiver's packages (scripts/bootstrap.sh installs them).
    public static var missing: Bool {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = [
            "python3", "-c", "import grpc, opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc",
        ]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        guard (try? process.run()) != nil else { return true }
        process.waitUntilExit()
        return process.terminationStatus != 0
    }

    static let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/otlp/receiver.py").path

    /// Starts the receiver and waits (up to 10 s) until it listens; `delayMs` answers each export
    /// that much later, `reject` answers it as a partial success rejecting up to that many of its
    /// spans, `fail` refuses the first that many exports with the gRPC status `failCode` (a name:
    /// `UNAVAILABLE`, `INVALID_ARGUMENT`...). With `namespace`, it runs there (`ip netns exec`), on `host`.
    public init(
        port: Int = Peers.freePort(),
        host: String = "127.0.0.1",
        namespace: String? = nil,
        delayMs: Int = 0,
        reject: Int = 0,
        fail: Int = 0,
        failCode: String = "UNAVAILABLE"
    ) async throws {
        self.port = port
        output = FileManager.default.temporaryDirectory.appendingPathComponent("otlp-\(getpid())-\(port).jsonl")
        let command = [
            "python3", Self.script, "--host", host, "--port", "\(port)", "--delay-ms", "\(delayMs)", "--seconds", "600",
            "--reject", "\(reject)", "--fail", "\(fail)", "--fail-code", failCode,
        ]
        child = try Peers.Child((namespace.map { ["ip", "netns", "exec", $0] } ?? []) + command, output: output)
        let listening = await Peers.eventually(within: .seconds(10)) { self.text.contains("listening \(port)") }
        guard listening else {
            child.stop()
            throw ReceiverError(output: text)
        }
    }

    /// Exports refused so far (`fail`).
    public var refused: Int { text.split(separator: "\n").count { $0.hasPrefix("refused export") } }

    private var text: String { (try? String(contentsOf: output, encoding: .utf8)) ?? "" }

    /// Every span received so far.
    public var spans: [[String: Any]] {
        text.split(separator: "\n").compactMap { line in
            guard line.hasPrefix("{") else { return nil }
            return try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]
        }
    }

    /// The spans received (those `matching`) once there are at least `count` (waiting up to `timeout`).
    public func spans(
        atLeast count: Int,
        within timeout: Duration = .seconds(10),
        matching: ([String: Any]) -> Bool = { _ in true }
    ) async -> [[String: Any]] {
        _ = await Peers.eventually(within: timeout) { self.spans.count(where: matching) >= count }
        return spans.filter(matching)
    }

    public func stop() {
        child.stop()
        try? FileManager.default.removeItem(at: output)
    }

    public struct ReceiverError: Error, CustomStringConvertible {
        public let output: String
        public var description: String { "the OTLP receiver did not start: \(output)" }
    }
}
