import Foundation
import Logging
import Prometheus
import TrellisPolicy

@testable import Proxy

/// An access log writing to a fresh file in a temporary folder, and the lines it got, parsed.
final class AccessLogFile: Sendable {
    let folder: String
    let path: String
    let sink: AccessLog

    init(sampleRate: Double = 1, factory: PrometheusMetricsFactory? = nil) throws {
        folder = NSTemporaryDirectory() + "trellis-access-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        path = folder + "/access.log"
        var logger = Logger(label: "test.access")
        logger.logLevel = .warning
        let settings = AccessLogSettings(output: .file(path), sampleRate: sampleRate)
        sink =
            if let factory { try AccessLog(settings, logger: logger, factory: factory) } else {
                try AccessLog(settings, logger: logger)
            }
    }

    /// The lines of `file` (default: the log's path) as JSON objects, waiting (up to 5 s) until
    /// there are at least `count`.
    func lines(atLeast count: Int, in file: String? = nil) async throws -> [[String: Any]] {
        var parsed: [[String: Any]] = []
        for _ in 0..<100 {
            parsed = try Self.read(file ?? path)
            if parsed.count >= count { break }
            try await Task.sleep(for: .milliseconds(50))
        }
        return parsed
    }

    static func read(_ file: String) throws -> [[String: Any]] {
        guard let data = FileManager.default.contents(atPath: file) else { return [] }
        return try String(decoding: data, as: UTF8.self).split(separator: "\n").map { line in
            guard let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
                throw AccessLogFileError(line: String(line))
            }
            return object
        }
    }

    /// The raw text of the log (to check key order and formatting).
    var text: String { (try? String(contentsOfFile: path, encoding: .utf8)) ?? "" }

    func remove() async {
        await sink.shutdown()
        try? FileManager.default.removeItem(atPath: folder)
    }

    struct AccessLogFileError: Error { let line: String }
}
