import CoreMetrics
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import NIOCore
import ServiceLifecycle
import Tracing
import TrellisConfig

/// Sends the spans of a ``SpanQueue`` to an OTLP/gRPC collector
/// (`opentelemetry.proto.collector.trace.v1.TraceService/Export`), one batch at a time: when a
/// full batch (512) waits, else every `scheduleDelay` (5 s, OpenTelemetry's default for a batch
/// span processor: an export costs ~1 million instructions whatever it holds, so at 1 % sampling
/// an export a second was a share of the core worth measuring). Each export is given
/// `exportTimeout`. A batch that fails with one of the codes OTLP calls transient (unavailable,
/// deadline exceeded, aborted, cancelled, out of range, data loss: a collector restarting, slow
/// or not reachable yet) is kept and sent again first at the next export, up to ``maxTries``
/// tries in all (so a collector away for ~10 s loses nothing); any other failure, or the last
/// try, drops it. While a batch is kept nothing else is sent, and the queue goes on filling up
/// to its capacity: a dead collector never grows memory.
///
/// Counted in `trellis_tracing_spans_total{result}`: `exported`, `failed` (the export failed for
/// good or the collector rejected the span), `dropped` (the queue was full).
struct OTLPExporter: Service {
    let queue: SpanQueue
    let collector: SocketEndpointTarget
    /// The resource's attributes (`service.name` and the others), in this order.
    let resource: [(String, SpanAttribute)]
    /// Sent with every export (agent.yaml `tracing.headers`, e.g. a collector's token).
    let metadata: Metadata
    let scheduleDelay: Duration
    let exportTimeout: Duration
    /// How long the last export may take once a graceful shutdown starts.
    let flushDeadline: Duration
    let logger: Logger
    /// Where the gRPC connection runs (the exporter's own thread, see ``BackgroundExecutor``).
    let eventLoopGroup: any EventLoopGroup

    static let method = MethodDescriptor(
        fullyQualifiedService: "opentelemetry.proto.collector.trace.v1.TraceService",
        method: "Export"
    )
    static let scope = (name: "trellis", version: TrellisVersion.current)

    private let exported: Counter
    private let failed: Counter
    private let dropped: Counter

    init(
        queue: SpanQueue,
        collector: SocketEndpointTarget,
        resource: [(String, String)],
        headers: [String: String] = [:],
        scheduleDelay: Duration = .seconds(5),
        exportTimeout: Duration = .seconds(5),
        flushDeadline: Duration = .seconds(2),
        logger: Logger,
        eventLoopGroup: any EventLoopGroup,
        metrics: any MetricsFactory = MetricsSystem.factory
    ) {
        self.queue = queue
        self.collector = collector
        self.resource = resource.map { ($0.0, .string($0.1)) }
        var metadata = Metadata()
        for (name, value) in headers.sorted(by: { $0.key < $1.key }) { metadata.addString(value, forKey: name) }
        self.metadata = metadata
        self.scheduleDelay = scheduleDelay
        self.exportTimeout = exportTimeout
        self.flushDeadline = flushDeadline
        self.logger = logger
        self.eventLoopGroup = eventLoopGroup
        func spans(_ result: String) -> Counter {
            Counter(label: "trellis_tracing_spans_total", dimensions: [("result", result)], factory: metrics)
        }
        (exported, failed, dropped) = (spans("exported"), spans("failed"), spans("dropped"))
    }

    func run() async throws {
        var config = HTTP2ClientTransport.Posix.Config.defaults
        config.backoff = .init(initial: .milliseconds(200), max: .seconds(5), multiplier: 1.6, jitter: 0.2)
        let client = GRPCClient(
            transport: try HTTP2ClientTransport.Posix(
                target: collector.target,
                transportSecurity: .plaintext,
                config: config,
                eventLoopGroup: eventLoopGroup
            )
        )
        let (queue, delay) = (queue, scheduleDelay)
        await withDiscardingTaskGroup { group in
            group.addTask { try? await client.runConnections() }
            group.addTask {
                while (try? await Task.sleep(for: delay)) != nil { queue.wakeExporter() }
            }
            var state = FailureState()
            await withGracefulShutdownHandler {
                for await _ in queue.wakeups { await sendAll(client, timeout: exportTimeout, state: &state) }
            } onGracefulShutdown: {
                queue.finish()
            }
            // What ended before the shutdown (the proxies stop first), within the deadline.
            await sendAll(client, timeout: flushDeadline, state: &state, until: .now + flushDeadline, final: true)
            client.beginGracefulShutdown()
            group.cancelAll()
        }
    }

    /// Tries of one batch, the first included, when each fails with a transient code.
    static let maxTries = 3

    /// Whether the last export failed (so that a collector that stays down is logged once), and
    /// the batch kept for the next export after a transient failure.
    struct FailureState {
        var failing = false
        var kept: [OTLPSpan] = []
        /// Tries `kept` has had.
        var keptTries = 0
    }

    /// Sends the batch kept from a transient failure, then batches until the queue is empty (or
    /// `deadline` passes, or an export fails). `final` (the flush at shutdown) keeps nothing.
    func sendAll(
        _ client: GRPCClient<HTTP2ClientTransport.Posix>,
        timeout: Duration,
        state: inout FailureState,
        until deadline: ContinuousClock.Instant? = nil,
        final: Bool = false
    ) async {
        var delivered = true
        if !state.kept.isEmpty {
            let (batch, tries) = (state.kept, state.keptTries)
            (state.kept, state.keptTries) = ([], 0)
            delivered = await send(batch, client, timeout: timeout, state: &state, tries: tries, final: final)
        }
        while delivered || final, deadline.map({ .now < $0 }) ?? true {
            let batch = queue.take()
            guard !batch.isEmpty else { break }
            delivered = await send(batch, client, timeout: timeout, state: &state, final: final)
        }
        let lost = queue.takeDropped()
        if lost > 0 {
            dropped.increment(by: lost)
            logger.warning(
                "tracing: spans dropped, the export queue was full",
                metadata: ["spans": "\(lost)", "queue.capacity": "\(queue.capacity)"]
            )
        }
    }

    /// Exports `batch`, which had `tries` before; whether the collector answered. A batch that
    /// failed with a transient code and has tries left is kept in `state` (unless `final`).
    @discardableResult
    func send(
        _ batch: [OTLPSpan],
        _ client: GRPCClient<HTTP2ClientTransport.Posix>,
        timeout: Duration,
        state: inout FailureState,
        tries: Int = 0,
        final: Bool = false
    ) async -> Bool {
        let request = OTLPTraceExport.request(
            resource: resource,
            scope: Self.scope,
            spans: batch.map(\.data)
        )
        var options = CallOptions.defaults
        options.timeout = timeout
        do {
            let response = try await client.unary(
                request: ClientRequest(message: request, metadata: metadata),
                descriptor: Self.method,
                serializer: ExportRequestSerializer(),
                deserializer: ExportResponseDeserializer(),
                options: options
            ) { try $0.message }
            let rejected = Int(clamping: max(0, min(response.rejectedSpans, Int64(batch.count))))
            exported.increment(by: batch.count - rejected)
            if rejected > 0 {
                failed.increment(by: rejected)
                logger.warning(
                    "tracing: the collector rejected spans",
                    metadata: ["spans": "\(rejected)", "collector.message": "\(response.errorMessage)"]
                )
            }
            if state.failing {
                state.failing = false
                logger.info("tracing: exporting to the collector again", metadata: ["collector": "\(collector)"])
            }
            return true
        } catch {
            let keep = !final && tries + 1 < Self.maxTries && Self.isTransient(error)
            if keep {
                (state.kept, state.keptTries) = (batch, tries + 1)
            } else {
                failed.increment(by: batch.count)
            }
            // Once per outage; each further failure is logged at debug (and a dropped batch counted).
            logger.log(
                level: state.failing ? .debug : .warning,
                keep
                    ? "tracing: could not export spans; they are sent again with the next export"
                    : "tracing: could not export spans; they are dropped",
                metadata: [
                    "spans": "\(batch.count)", "collector": "\(collector)", "error": "\(error)",
                    "tries": "\(tries + 1)",
                ]
            )
            state.failing = true
            return false
        }
    }

    /// The gRPC codes OTLP/gRPC retries (the specification's "retryable" list; resource exhausted
    /// only with a retry delay from the server, which a collector rarely sends: not retried).
    static func isTransient(_ error: any Error) -> Bool {
        guard let error = error as? RPCError else { return false }
        switch error.code {
        case .unavailable, .deadlineExceeded, .aborted, .cancelled, .outOfRange, .dataLoss: return true
        default: return false
        }
    }
}

/// The collector's address as grpc-swift's target.
struct SocketEndpointTarget: Sendable, CustomStringConvertible {
    let host: String
    let port: Int

    var target: any ResolvableTarget {
        if host.contains(":") { return .ipv6(host: host, port: port) }
        if host.split(separator: ".").count == 4, host.allSatisfy({ $0.isNumber || $0 == "." }) {
            return .ipv4(host: host, port: port)
        }
        return .dns(host: host, port: port)
    }

    var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

/// An export request is written by ``OTLPTraceExport`` already: its bytes are the message.
struct ExportRequestSerializer: MessageSerializer {
    func serialize<Bytes: GRPCContiguousBytes>(_ message: [UInt8]) throws -> Bytes { Bytes(message) }
}

struct ExportResponseDeserializer: MessageDeserializer {
    func deserialize<Bytes: GRPCContiguousBytes>(_ bytes: Bytes) throws -> OTLPTraceExport.Response {
        try bytes.withUnsafeBytes { try OTLPTraceExport.response($0) }
    }
}
