import Atomics
public import CoreMetrics
public import Logging
import NIOConcurrencyHelpers
public import NIOCore
import NIOPosix
public import TrellisPolicy

#if canImport(Glibc)
import Glibc
#endif

/// The access log's output: one JSON line per request or relayed TCP connection (the fields are
/// documented in docs/observability.md). The event loops batch their lines (``LoopAccessLog``) and
/// hand each batch to one writer thread, so the data path never waits for a disk or a pipe. What
/// waits is bounded (``maxQueuedBytes``): past it a batch is dropped and counted
/// (`trellis_access_log_dropped_lines_total`), never queued without end.
public final class AccessLog: Sendable {
    public let settings: AccessLogSettings
    /// Bytes handed to the writer and not yet written, at most.
    static let maxQueuedBytes = 8 << 20
    private let writer: NIOThreadPool
    /// The descriptor written to; swapped by ``reopen()``.
    private let descriptor: NIOLockedValueBox<CInt>
    private let queuedBytes = ManagedAtomic(0)
    private let failing = ManagedAtomic(false)
    private let logger: Logger
    let linesWritten: Counter
    let linesDropped: Counter

    /// Opens the output (a file is created if missing, mode 0640, and appended to).
    /// - Throws: ``AccessLogError`` naming the file and the system's reason.
    public init(
        _ settings: AccessLogSettings,
        logger: Logger,
        factory: any MetricsFactory = MetricsSystem.factory
    ) throws(AccessLogError) {
        self.settings = settings
        self.logger = logger
        self.descriptor = NIOLockedValueBox(try Self.open(settings.output))
        self.linesWritten = Counter(label: "trellis_access_log_lines_total", factory: factory)
        self.linesDropped = Counter(label: "trellis_access_log_dropped_lines_total", factory: factory)
        self.writer = NIOThreadPool(numberOfThreads: 1)
        writer.start()
    }

    private static func open(_ output: AccessLogSettings.Output) throws(AccessLogError) -> CInt {
        switch output {
        case .stdout: return STDOUT_FILENO
        case .stderr: return STDERR_FILENO
        case .file(let path):
            // Its folder is made when missing (as the package's /var/log/trellis would be).
            createFolders(of: path)
            let fd = Glibc.open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o640)
            guard fd >= 0 else {
                throw AccessLogError(
                    "access_log.output: cannot open '\(path)' for appending: \(String(cString: strerror(errno)))"
                )
            }
            return fd
        }
    }

    /// Makes the folders above `path` that do not exist (mode 0750); a failure shows when the
    /// file itself cannot be opened.
    private static func createFolders(of path: String) {
        var folder = ""
        for part in path.split(separator: "/").dropLast() {
            folder += "/" + part
            if access(folder, F_OK) != 0 { _ = mkdir(folder, 0o750) }
        }
    }

    /// Opens the file again (logrotate moved it away) and writes there from the next batch on; on
    /// failure the current file stays in use. Standard output and error are left as they are.
    public func reopen() throws(AccessLogError) {
        guard case .file = settings.output else { return }
        let fresh = try Self.open(settings.output)
        let old = descriptor.withLockedValue { fd in
            defer { fd = fresh }
            return fd
        }
        close(old)
    }

    /// Writes what was handed over before this call, then stops the writer.
    public func shutdown() async {
        try? await writer.runIfActive {}
        try? await writer.shutdownGracefully()
        if case .file = settings.output { close(descriptor.withLockedValue { $0 }) }
    }

    /// Hands one batch of complete lines to the writer, or drops it when the writer is too far
    /// behind.
    func submit(_ batch: ByteBuffer, lines: Int) {
        let size = batch.readableBytes
        if queuedBytes.loadThenWrappingIncrement(by: size, ordering: .relaxed) + size > Self.maxQueuedBytes {
            queuedBytes.wrappingDecrement(by: size, ordering: .relaxed)
            linesDropped.increment(by: lines)
            return
        }
        writer.submit { _ in
            // Run also when cancelled (the pool shutting down): the lines are written either way.
            self.write(batch, lines: lines)
            self.queuedBytes.wrappingDecrement(by: size, ordering: .relaxed)
        }
    }

    private func write(_ batch: ByteBuffer, lines: Int) {
        let error: CInt? = descriptor.withLockedValue { fd in
            batch.withUnsafeReadableBytes { bytes -> CInt? in
                var offset = 0
                while offset < bytes.count {
                    let n = Glibc.write(fd, bytes.baseAddress! + offset, bytes.count - offset)
                    if n < 0 {
                        if errno == EINTR { continue }
                        return errno
                    }
                    offset += n
                }
                return nil
            }
        }
        if let error {
            linesDropped.increment(by: lines)
            // Said once when writing starts failing (a full disk, a closed pipe), once when it recovers.
            if !failing.exchange(true, ordering: .relaxed) {
                logger.error(
                    "access log: writing failed; lines are dropped until it works again",
                    metadata: [
                        "access_log.output": "\(settings.output)", "error": "\(String(cString: strerror(error)))",
                    ]
                )
            }
        } else {
            linesWritten.increment(by: lines)
            if failing.exchange(false, ordering: .relaxed) {
                logger.notice("access log: writing works again", metadata: ["access_log.output": "\(settings.output)"])
            }
        }
    }
}

public struct AccessLogError: Error, CustomStringConvertible, Sendable {
    public let description: String
    init(_ description: String) { self.description = description }
}

/// One event loop's access-log lines, gathered and handed to the writer in batches: every
/// ``flushDelay`` after the first line of a batch, or as soon as 64 KiB are waiting. Each batch
/// wakes the writer's thread, so a sampled log (a line every few milliseconds) costs a wake-up
/// per ``flushDelay``, not one per line. The proxy writes what is waiting when it shuts down.
final class LoopAccessLog {
    let sink: AccessLog
    private let eventLoop: any EventLoop
    private var buffer: ByteBuffer
    private var lines = 0
    private var flushScheduled = false
    static let batchBytes = 64 * 1024
    /// What ``buffer`` holds while a line is being written (never written to).
    private static let placeholder = ByteBuffer()
    /// How long a line may wait for its batch.
    static let flushDelay = TimeAmount.milliseconds(100)

    /// The sink's, read once (its settings are a struct of strings: a copy per request).
    private let sampleRate: Double

    init(sink: AccessLog, eventLoop: any EventLoop) {
        self.sink = sink
        self.sampleRate = sink.settings.sampleRate
        self.eventLoop = eventLoop
        self.buffer = ByteBufferAllocator().buffer(capacity: 4096)
    }

    /// Whether to log a request that ended this way: every refused or failed one (an error token or
    /// a 5xx), and the configured share of the others.
    func sampled(failed: Bool, rng: inout FastRandom) -> Bool {
        let rate = sampleRate
        if failed || rate >= 1 { return true }
        if rate <= 0 { return false }
        return Double(rng.next() >> 11) * 0x1p-53 < rate
    }

    func append(_ record: AccessLogRecord) {
        // The line takes the batch's storage while it writes: the only reference, so nothing is
        // copied (handed over while this class still held it, every line copied the batch so
        // far, ~20,000 instructions a line).
        var taken = Self.placeholder
        swap(&taken, &buffer)
        var line = JSONLine(buffer: consume taken)
        record.write(to: &line)
        line.end()
        buffer = line.buffer
        lines += 1
        if buffer.readableBytes >= Self.batchBytes {
            flush()
        } else if !flushScheduled {
            flushScheduled = true
            let bound = NIOLoopBound(self, eventLoop: eventLoop)
            eventLoop.scheduleTask(in: Self.flushDelay) {
                bound.value.flushScheduled = false
                bound.value.flush()
            }
        }
    }

    /// Hands what is waiting to the writer now (a scheduled flush finds nothing and does nothing).
    func flush() {
        guard lines > 0 else { return }
        sink.submit(buffer, lines: lines)
        buffer = ByteBufferAllocator().buffer(capacity: 4096)
        lines = 0
    }
}

@available(*, unavailable)
extension LoopAccessLog: Sendable {}

/// One access-log line: every field is always written, `null` when unknown, in this order.
struct AccessLogRecord {
    var started: timespec
    var listener: String
    var `protocol`: String?
    var method: String?
    var authority: String?
    var path: String?
    var status: Int?
    var grpcStatus: Int?
    var error: String?
    var requestID: String?
    var traceID: String?
    var spanID: String?
    var source: SocketAddress?
    var sourceIdentity: String?
    var service: String?
    var cluster: String?
    var route: String?
    var endpoint: String?
    var originalDestination: String?
    var retries: Int?
    var upstreamConnectNanos: Int64?
    var firstByteNanos: Int64?
    var durationNanos: Int64
    var bytesIn: Int?
    var bytesOut: Int?
    var userAgent: String?

    /// A line for something that began `elapsed` ago and ends now.
    init(listener: String, elapsed: TimeAmount) {
        self.started = .wallClock(before: elapsed)
        self.listener = listener
        self.durationNanos = elapsed.nanoseconds
    }

    func write(to line: inout JSONLine) {
        line.time("time", started)
        line.field("listener", listener)
        line.field("protocol", `protocol`)
        line.field("method", method)
        line.field("authority", authority)
        line.field("path", path)
        line.field("status", status)
        line.field("grpc_status", grpcStatus)
        line.field("error", error)
        line.field("request_id", requestID)
        line.field("trace_id", traceID)
        line.field("span_id", spanID)
        line.field("source", source.map(Self.address))
        line.field("source_identity", sourceIdentity)
        line.field("service", service)
        line.field("cluster", cluster)
        line.field("route", route)
        line.field("endpoint", endpoint)
        line.field("original_destination", originalDestination)
        line.field("retries", retries)
        line.milliseconds("upstream_connect_ms", upstreamConnectNanos)
        line.milliseconds("ttfb_ms", firstByteNanos)
        line.milliseconds("duration_ms", durationNanos)
        line.field("bytes_in", bytesIn)
        line.field("bytes_out", bytesOut)
        line.field("user_agent", userAgent)
    }

    /// `10.0.0.1:5000`, `[::1]:5000`.
    static func address(_ address: SocketAddress) -> String {
        guard let ip = address.ipAddress, let port = address.port else { return address.description }
        return address.protocol == .inet6 ? "[\(ip)]:\(port)" : "\(ip):\(port)"
    }

    /// The destination service of a cluster: the last part of a mesh cluster name
    /// (`outbound|8080|v2|orders` → `orders`), a gateway cluster's own name.
    static func service(_ cluster: String) -> String? {
        // On the UTF-8 view: `String.lastIndex(of:)` walks back by grapheme clusters (~2,800
        // instructions for an outbound cluster's name).
        let utf8 = cluster.utf8
        guard let bar = utf8.lastIndex(of: UInt8(ascii: "|")) else { return cluster }
        let name = utf8[utf8.index(after: bar)...]
        return name.isEmpty ? nil : String(Substring(name))
    }
}

/// A JSON object written straight into a buffer, one field at a time, in a fixed order.
///
/// Each field is one write into the buffer's memory, sized for its worst case (every byte of a
/// string escaped as `\u00XX`): written piece by piece through `ByteBuffer`'s integer and string
/// writers, a line cost ~50,000 instructions.
struct JSONLine {
    private(set) var buffer: ByteBuffer
    private var first = true

    init(buffer: ByteBuffer) {
        self.buffer = buffer
        self.buffer.writeInteger(UInt8(ascii: "{"))
    }

    mutating func end() {
        buffer.writeStaticString("}\n")
    }

    /// Writes `,"name":` then what `value` writes, in one reservation of `name`'s length plus
    /// `valueBytes`.
    private mutating func field(
        _ name: StaticString,
        valueBytes: Int,
        _ value: (inout Writer) -> Void
    ) {
        let comma = !first
        first = false
        buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: name.utf8CodeUnitCount + 4 + valueBytes) { raw in
            var w = Writer(base: raw.baseAddress!.assumingMemoryBound(to: UInt8.self))
            if comma { w.byte(UInt8(ascii: ",")) }
            w.byte(UInt8(ascii: "\""))
            w.bytes(UnsafeRawBufferPointer(start: name.utf8Start, count: name.utf8CodeUnitCount))
            w.byte(UInt8(ascii: "\""))
            w.byte(UInt8(ascii: ":"))
            value(&w)
            return w.count
        }
    }

    mutating func field(_ name: StaticString, _ value: String?) {
        guard let value else { return field(name, valueBytes: 4) { $0.null() } }
        value.withUTF8Bytes { bytes in
            field(name, valueBytes: bytes.count * 6 + 2) { w in
                w.byte(UInt8(ascii: "\""))
                var start = 0
                for i in 0..<bytes.count {
                    let byte = bytes[i]
                    guard byte < 0x20 || byte == UInt8(ascii: "\"") || byte == UInt8(ascii: "\\") else { continue }
                    w.bytes(UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(bytes)[start..<i]))
                    w.byte(UInt8(ascii: "\\"))
                    switch byte {
                    case UInt8(ascii: "\""), UInt8(ascii: "\\"): w.byte(byte)
                    case UInt8(ascii: "\n"): w.byte(UInt8(ascii: "n"))
                    case UInt8(ascii: "\r"): w.byte(UInt8(ascii: "r"))
                    case UInt8(ascii: "\t"): w.byte(UInt8(ascii: "t"))
                    default:
                        w.byte(UInt8(ascii: "u"))
                        w.digits(0, 2)
                        w.byte(Self.hex[Int(byte >> 4)])
                        w.byte(Self.hex[Int(byte & 0xf)])
                    }
                    start = i + 1
                }
                w.bytes(UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(bytes)[start...]))
                w.byte(UInt8(ascii: "\""))
            }
        }
    }

    mutating func field(_ name: StaticString, _ value: Int?) {
        guard let value else { return field(name, valueBytes: 4) { $0.null() } }
        field(name, valueBytes: 20) { $0.decimal(value) }
    }

    /// A duration in milliseconds with microsecond precision (`1.234`).
    mutating func milliseconds(_ name: StaticString, _ nanoseconds: Int64?) {
        guard let nanoseconds else { return field(name, valueBytes: 4) { $0.null() } }
        let micros = Int(max(0, nanoseconds) / 1000)
        field(name, valueBytes: 24) { w in
            w.decimal(micros / 1000)
            w.byte(UInt8(ascii: "."))
            w.digits(micros % 1000, 3)
        }
    }

    /// A wall-clock time as RFC 3339 in UTC with milliseconds (`2026-11-30T13:05:09.123Z`).
    mutating func time(_ name: StaticString, _ time: timespec) {
        var seconds = time.tv_sec
        var parts = tm()
        gmtime_r(&seconds, &parts)
        field(name, valueBytes: 40) { w in
            w.byte(UInt8(ascii: "\""))
            w.digits(Int(parts.tm_year) + 1900, 4)
            w.byte(UInt8(ascii: "-"))
            w.digits(Int(parts.tm_mon) + 1, 2)
            w.byte(UInt8(ascii: "-"))
            w.digits(Int(parts.tm_mday), 2)
            w.byte(UInt8(ascii: "T"))
            w.digits(Int(parts.tm_hour), 2)
            w.byte(UInt8(ascii: ":"))
            w.digits(Int(parts.tm_min), 2)
            w.byte(UInt8(ascii: ":"))
            w.digits(Int(parts.tm_sec), 2)
            w.byte(UInt8(ascii: "."))
            w.digits(time.tv_nsec / 1_000_000, 3)
            w.byte(UInt8(ascii: "Z"))
            w.byte(UInt8(ascii: "\""))
        }
    }

    /// Writes at a pointer into memory reserved for it.
    struct Writer {
        let base: UnsafeMutablePointer<UInt8>
        private(set) var count = 0

        init(base: UnsafeMutablePointer<UInt8>) { self.base = base }

        mutating func byte(_ b: UInt8) {
            base[count] = b
            count &+= 1
        }

        mutating func bytes(_ b: UnsafeRawBufferPointer) {
            guard let source = b.baseAddress, !b.isEmpty else { return }
            UnsafeMutableRawPointer(base + count).copyMemory(from: source, byteCount: b.count)
            count &+= b.count
        }

        mutating func null() {
            for b in "null".utf8 { byte(b) }
        }

        /// `value`'s last `count` decimal digits, zero-padded.
        mutating func digits(_ value: Int, _ count: Int) {
            var v = value
            var i = count - 1
            while i >= 0 {
                base[self.count + i] = UInt8(ascii: "0") &+ UInt8(truncatingIfNeeded: v % 10)
                v /= 10
                i -= 1
            }
            self.count &+= count
        }

        /// `value` in decimal (at most 20 bytes).
        mutating func decimal(_ value: Int) {
            if value < 0 { byte(UInt8(ascii: "-")) }
            var magnitude = value.magnitude
            var length = 1
            var rest = magnitude / 10
            while rest > 0 {
                length += 1
                rest /= 10
            }
            var i = length - 1
            repeat {
                base[count + i] = UInt8(ascii: "0") &+ UInt8(truncatingIfNeeded: magnitude % 10)
                magnitude /= 10
                i -= 1
            } while i >= 0
            count &+= length
        }
    }

    private static let hex: [UInt8] = Array("0123456789abcdef".utf8)
}

extension timespec {
    /// The wall-clock time `elapsed` before now.
    static func wallClock(before elapsed: TimeAmount) -> timespec {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let total = Int64(now.tv_sec) * 1_000_000_000 + Int64(now.tv_nsec) - max(0, elapsed.nanoseconds)
        return timespec(tv_sec: Int(total / 1_000_000_000), tv_nsec: Int(total % 1_000_000_000))
    }
}

/// A request id the proxy made for a request that came without one: a random (version 4) UUID,
/// kept as its two numbers and written straight into the upstream head; text only for a log
/// line or a span (a 36-byte `String` is an allocation per request).
struct RequestID: Equatable {
    let high: UInt64
    let low: UInt64

    static let length = 36

    static func make(_ rng: inout FastRandom) -> RequestID {
        RequestID(
            high: (rng.next() & 0xFFFF_FFFF_FFFF_0FFF) | 0x0000_0000_0000_4000,  // version 4
            low: (rng.next() & 0x3FFF_FFFF_FFFF_FFFF) | 0x8000_0000_0000_0000  // variant 10
        )
    }

    /// 8-4-4-4-12 hex digits into `out` (``length`` bytes).
    @inline(__always)
    func write(into out: UnsafeMutableBufferPointer<UInt8>) {
        HexText.write(high >> 32, 8, into: out, at: 0)
        out[8] = UInt8(ascii: "-")
        HexText.write(high >> 16, 4, into: out, at: 9)
        out[13] = UInt8(ascii: "-")
        HexText.write(high, 4, into: out, at: 14)
        out[18] = UInt8(ascii: "-")
        HexText.write(low >> 48, 4, into: out, at: 19)
        out[23] = UInt8(ascii: "-")
        HexText.write(low, 12, into: out, at: 24)
    }

    var text: String {
        String(unsafeUninitializedCapacity: Self.length) { out in
            write(into: out)
            return Self.length
        }
    }
}
