public import Proxy
import Synchronization
public import Tracing
import W3CTraceContext

/// The tracer the executables give the data path: swift-distributed-tracing's `Tracer`, whose
/// ended spans wait in a bounded queue (``SpanQueue``) for ``OTLPExporter`` to send them over
/// OTLP/gRPC. It records every span it is asked to start (sampling is the data path's,
/// ``Proxy/ProxyTracing``) and propagates W3C Trace Context (`traceparent`, `tracestate`).
///
/// Why not swift-otel's tracer, which this replaced: every span started and ended there crossed
/// an `AsyncStream` to the tracer's task and again to its batch processor's, and its exporter
/// encoded each batch with swift-protobuf, which sizes a nested message once per message around
/// it. Measured with callgrind in the gateway, one recorded span cost ~210,000 instructions
/// (61,000 on the event loop, ~150,000 on the exporter's thread), two and a half times a whole
/// proxied request; its public API (`OTel.makeTracingBackend`) offers no other exporter. Here a
/// span is one object and a lock, ending it is an append to an array, and a batch is written in
/// one pass (``OTLPTraceExport``).
public final class OTLPTracer: Tracer {
    public typealias Span = OTLPSpan

    let queue: SpanQueue
    private let random = SplitMix64()

    init(queue: SpanQueue) { self.queue = queue }

    public func startSpan<Instant: TracerInstant>(
        _ operationName: String,
        context: @autoclosure () -> ServiceContext,
        ofKind kind: SpanKind,
        at instant: @autoclosure () -> Instant,
        function: String,
        file fileID: String,
        line: UInt
    ) -> OTLPSpan {
        var context = context()
        let parent = context[OTLPSpanContextKey.self]
        let ids = OTLPSpanContext(
            traceHigh: parent?.traceHigh ?? random.next(),
            traceLow: parent?.traceLow ?? random.next() | 1,
            spanID: random.next() | 1,
            flags: (parent?.flags ?? 0) | OTLPSpanContext.sampled,
            state: parent?.state,
            isRemote: false
        )
        context[OTLPSpanContextKey.self] = ids
        return OTLPSpan(
            name: operationName,
            kind: kind,
            context: context,
            ids: ids,
            parent: parent,
            start: instant().nanosecondsSinceEpoch,
            queue: queue
        )
    }

    /// Sends what the queue holds now rather than at the exporter's next turn.
    public func forceFlush() { queue.wakeExporter() }

    /// Reads `traceparent` and `tracestate`; an invalid header counts as absent (W3C Trace
    /// Context: a new trace starts), so `context` is then left as it was.
    public func extract<Carrier, Extract: Extractor>(
        _ carrier: Carrier,
        into context: inout ServiceContext,
        using extractor: Extract
    ) where Extract.Carrier == Carrier {
        guard let parent = extractor.extract(key: "traceparent", from: carrier),
            let trace = try? TraceContext(
                traceParentHeaderValue: parent,
                traceStateHeaderValue: extractor.extract(key: "tracestate", from: carrier)
            )
        else { return }
        context[OTLPSpanContextKey.self] = OTLPSpanContext(trace)
    }

    public func inject<Carrier, Inject: Injector>(
        _ context: ServiceContext,
        into carrier: inout Carrier,
        using injector: Inject
    ) where Inject.Carrier == Carrier {
        guard let span = context[OTLPSpanContextKey.self] else { return }
        injector.inject(span.traceparent, forKey: "traceparent", into: &carrier)
        if let state = span.state, !state.isEmpty { injector.inject(state, forKey: "tracestate", into: &carrier) }
    }
}

/// A span's place in its trace, as the service context carries it: ids as integers (the trace
/// id's two big-endian halves), the W3C flags and trace state, and whether it came from another
/// process.
struct OTLPSpanContext: Sendable, Hashable {
    var traceHigh: UInt64
    var traceLow: UInt64
    var spanID: UInt64
    var flags: UInt8
    var state: String?
    var isRemote: Bool

    static let sampled: UInt8 = 0x01

    init(traceHigh: UInt64, traceLow: UInt64, spanID: UInt64, flags: UInt8, state: String?, isRemote: Bool) {
        self.traceHigh = traceHigh
        self.traceLow = traceLow
        self.spanID = spanID
        self.flags = flags
        self.state = state
        self.isRemote = isRemote
    }

    /// A context received from another process.
    init(_ trace: TraceContext) {
        let (high, low) = withUnsafeBytes(of: trace.traceID.bytes) {
            (
                UInt64(bigEndian: $0.loadUnaligned(fromByteOffset: 0, as: UInt64.self)),
                UInt64(bigEndian: $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
            )
        }
        let span = withUnsafeBytes(of: trace.spanID.bytes) {
            UInt64(bigEndian: $0.loadUnaligned(as: UInt64.self))
        }
        self.init(
            traceHigh: high,
            traceLow: low,
            spanID: span,
            flags: trace.flags.rawValue,
            state: trace.traceStateHeaderValue,
            isRemote: true
        )
    }

    /// `00-{trace id}-{span id}-{flags}`.
    var traceparent: String {
        String(unsafeUninitializedCapacity: 55) { out in
            out[0] = UInt8(ascii: "0")
            out[1] = UInt8(ascii: "0")
            out[2] = UInt8(ascii: "-")
            HexText.write(traceHigh, 16, into: out, at: 3)
            HexText.write(traceLow, 16, into: out, at: 19)
            out[35] = UInt8(ascii: "-")
            HexText.write(spanID, 16, into: out, at: 36)
            out[52] = UInt8(ascii: "-")
            HexText.write(UInt64(flags), 2, into: out, at: 53)
            return 55
        }
    }

    /// OTLP's `flags` of a link to this context: the W3C flags, and that it is (or not) remote.
    var otlpFlags: UInt32 { UInt32(flags) | 0x100 | (isRemote ? 0x200 : 0) }
}

enum OTLPSpanContextKey: ServiceContextKey {
    typealias Value = OTLPSpanContext
    static var nameOverride: String? { "otlp-span-context" }
}

/// Random ids for spans and new traces from any thread: SplitMix64 over an atomic counter (one
/// relaxed add per id; `SystemRandomNumberGenerator` would be a `getrandom` system call each).
/// Ids need to be unique, not secret; the counter starts from the system's generator.
final class SplitMix64: Sendable {
    private let state = Atomic<UInt64>(UInt64.random(in: .min ... .max))

    func next() -> UInt64 {
        var z = state.wrappingAdd(0x9E37_79B9_7F4A_7C15, ordering: .relaxed).newValue
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// A span of ``OTLPTracer``: what is set on it is kept under a lock until it ends; then it is
/// queued for export as it is, and later changes are ignored (as OpenTelemetry specifies).
public final class OTLPSpan: AttributeListSpan {
    public let context: ServiceContext
    let ids: OTLPSpanContext
    let parent: OTLPSpanContext?
    let kind: SpanKind
    let start: UInt64
    private let queue: SpanQueue
    private let state: Mutex<State>

    struct State {
        var name: String
        /// Set as a list (``setAttributes(_:)``, the data path's way) or as `SpanAttributes`: the
        /// last one set is the span's.
        var list: [(key: String, value: SpanAttribute)] = []
        var attributes = SpanAttributes()
        var status: SpanStatus?
        var events: [SpanEvent] = []
        var links: [SpanLink] = []
        var end: UInt64?
    }

    init(
        name: String,
        kind: SpanKind,
        context: ServiceContext,
        ids: OTLPSpanContext,
        parent: OTLPSpanContext?,
        start: UInt64,
        queue: SpanQueue
    ) {
        self.context = context
        self.ids = ids
        self.parent = parent
        self.kind = kind
        self.start = start
        self.queue = queue
        self.state = Mutex(State(name: name))
    }

    public var operationName: String {
        get { state.withLock { $0.name } }
        set { state.withLock { if $0.end == nil { $0.name = newValue } } }
    }

    public var attributes: SpanAttributes {
        get {
            state.withLock { state in
                var attributes = state.attributes
                for (key, value) in state.list { attributes.set(key, value: value) }
                return attributes
            }
        }
        set {
            state.withLock { state in
                guard state.end == nil else { return }
                state.attributes = newValue
                state.list = []
            }
        }
    }

    public func setAttributes(_ list: [(key: String, value: SpanAttribute)]) {
        state.withLock { state in
            guard state.end == nil else { return }
            state.list = list
            state.attributes = SpanAttributes()
        }
    }

    public var isRecording: Bool { state.withLock { $0.end == nil } }

    /// An `ok` status is final; `unset` is never recorded (OpenTelemetry's rules).
    public func setStatus(_ status: SpanStatus) {
        state.withLock {
            guard $0.end == nil, $0.status?.code != .ok else { return }
            $0.status = status
        }
    }

    public func addEvent(_ event: SpanEvent) {
        state.withLock { if $0.end == nil { $0.events.append(event) } }
    }

    public func recordError<Instant: TracerInstant>(
        _ error: any Error,
        attributes: SpanAttributes,
        at instant: @autoclosure () -> Instant
    ) {
        var attributes = attributes
        attributes.set("exception.type", value: .string(String(reflecting: type(of: error))))
        attributes.set("exception.message", value: .string("\(error)"))
        addEvent(SpanEvent(name: "exception", at: instant(), attributes: attributes))
    }

    public func addLink(_ link: SpanLink) {
        state.withLock { if $0.end == nil { $0.links.append(link) } }
    }

    public func end<Instant: TracerInstant>(at instant: @autoclosure () -> Instant) {
        let end = instant().nanosecondsSinceEpoch
        let first = state.withLock { state -> Bool in
            guard state.end == nil else { return false }
            state.end = end
            return true
        }
        if first { queue.enqueue(self) }
    }

    /// What the exporter writes (read once the span has ended).
    var data: SpanData {
        state.withLock { s in
            SpanData(
                context: ids,
                parentSpanID: parent?.spanID ?? 0,
                parentIsRemote: parent?.isRemote ?? false,
                kind: kind,
                name: s.name,
                start: start,
                end: s.end ?? start,
                list: s.list,
                attributes: s.attributes,
                status: s.status,
                events: s.events,
                links: s.links
            )
        }
    }
}

/// An ended span as ``OTLPTraceExport`` writes it.
struct SpanData {
    var context: OTLPSpanContext
    var parentSpanID: UInt64
    var parentIsRemote: Bool
    var kind: SpanKind
    var name: String
    var start: UInt64
    var end: UInt64
    var list: [(key: String, value: SpanAttribute)]
    var attributes: SpanAttributes
    var status: SpanStatus?
    var events: [SpanEvent] = []
    var links: [SpanLink] = []
}

/// Ended spans waiting for the exporter: at most `capacity` (past that a span is dropped and
/// counted, so a collector that is down or slow costs memory once and never blocks the data path).
/// Adding one is a lock and an append; the exporter is woken only when a full batch is waiting
/// (else it comes by on its own schedule).
final class SpanQueue: Sendable {
    let capacity: Int
    let batchSize: Int
    private let state: Mutex<(spans: [OTLPSpan], dropped: Int)>
    let wakeups: AsyncStream<Void>
    private let wake: AsyncStream<Void>.Continuation

    init(capacity: Int, batchSize: Int) {
        self.capacity = capacity
        self.batchSize = batchSize
        self.state = Mutex(([], 0))
        (wakeups, wake) = AsyncStream.makeStream(bufferingPolicy: .bufferingNewest(1))
    }

    func enqueue(_ span: OTLPSpan) {
        let full = state.withLock { state -> Bool in
            guard state.spans.count < capacity else {
                state.dropped += 1
                return false
            }
            state.spans.append(span)
            return state.spans.count == batchSize
        }
        if full { wake.yield() }
    }

    /// Up to `batchSize` spans, the oldest first.
    func take() -> [OTLPSpan] {
        state.withLock { state in
            guard state.spans.count > batchSize else {
                defer { state.spans.removeAll(keepingCapacity: true) }
                return state.spans
            }
            defer { state.spans.removeFirst(batchSize) }
            return Array(state.spans.prefix(batchSize))
        }
    }

    /// Spans dropped since the last call (the queue was full).
    func takeDropped() -> Int {
        state.withLock { state in
            defer { state.dropped = 0 }
            return state.dropped
        }
    }

    var count: Int { state.withLock { $0.spans.count } }

    func wakeExporter() { wake.yield() }

    /// No more wake-ups: the exporter's loop ends.
    func finish() { wake.finish() }
}
