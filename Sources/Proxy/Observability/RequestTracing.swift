import Atomics
import NIOCore
import NIOHTTP1
public import Tracing
import W3CTraceContext

/// What the data path needs to trace requests: a tracer (the executable's, e.g. TrellisTracing's
/// OTLP exporter; the library never bootstraps one) and the share of new traces to record.
///
/// Sampling is decided here, before the tracer is asked for anything: a request that arrives
/// with a trace (W3C `traceparent`, or B3 single or multi headers) follows its caller's decision;
/// a new trace is recorded with probability `sampleRate`. A request that is not recorded costs no
/// span: its trace context is passed on (a new one is made when it came without), so the next hop
/// decides the same way and the access log still names the trace.
/// A class: the data path reads it on every request, and a copy of a struct holding an
/// existential, an atomic and two sets would be four retains and releases each time.
public final class ProxyTracing: Sendable {
    public let tracer: any Tracer
    public let sampleRate: Double
    /// Cleared by ``stop()``: from then on nothing is recorded (contexts are still passed on).
    private let recording = ManagedAtomic(true)
    /// Destinations whose requests are never traced: the collector itself, whose exports a
    /// capture listener may see (an agent run as root captures its own exporter's connection),
    /// so that exporting spans does not make more spans.
    public let untraced: Set<SocketEndpoint>
    /// Their ports, checked first (most requests go elsewhere).
    private let untracedPorts: Set<Int>

    public init(tracer: any Tracer, sampleRate: Double, untraced: Set<SocketEndpoint> = []) {
        self.tracer = tracer
        self.sampleRate = sampleRate
        self.untraced = untraced
        self.untracedPorts = Set(untraced.map(\.port))
    }

    /// Whether requests to `destination` (a captured connection's original destination) are traced.
    func traces(_ destination: SocketEndpoint?) -> Bool {
        guard let destination, untracedPorts.contains(destination.port) else { return true }
        return !untraced.contains(destination)
    }

    /// No more spans: the exporter behind the tracer stopped (a tracer nobody drains would keep
    /// every span it is handed).
    public func stop() { recording.store(false, ordering: .relaxed) }

    var isRecording: Bool { recording.load(ordering: .relaxed) }
}

/// One request's place in its trace: the span this proxy records for it (when sampled), and the
/// trace context sent upstream. A value kept in the request's context: an unrecorded request costs
/// no allocation here beyond the `traceparent` it sends; the ids are formatted for the access log
/// only when a line is written.
struct RequestTrace {
    /// The recorded span and the `tracestate` sent on, when there is either (nil for most requests
    /// that are not recorded). One optional reference, so that copying the value (the exchange and
    /// the request head sent upstream each hold one) is a retain at most, and the rest is plain
    /// integers.
    private let extra: TraceExtra?
    var span: (any Span)? { extra?.span }
    /// The ids sent upstream: the span's when recorded, else the caller's or new ones (plain
    /// integers, as every request carries them; a `TraceContext`, with its trace-state storage,
    /// is made only for a recorded span).
    let ids: TraceIDs
    /// Client on the agent's outbound listener, server everywhere else.
    let kind: SpanKind
    /// Whether the request's trace headers are replaced upstream; false for an unrecorded request
    /// that came with W3C headers, which go on untouched.
    let replacesHeaders: Bool

    init(span: (any Span)?, ids: TraceIDs, state: String?, kind: SpanKind, replacesHeaders: Bool) {
        self.extra = span == nil && state == nil ? nil : TraceExtra(span: span, state: state)
        self.ids = ids
        self.kind = kind
        self.replacesHeaders = replacesHeaders
    }

    /// The `traceparent` (and `tracestate`) sent upstream.
    var traceparent: String { TraceHeaders.traceparent(ids) }
    /// The `tracestate` sent with them, as the caller or the tracer wrote it.
    var tracestate: String? { extra?.state }
    /// For the access log: the trace's id, and this proxy's span id when it recorded one.
    var traceID: String { ids.traceIDHex }
    var spanID: String? { extra?.span == nil ? nil : ids.spanIDHex }

    /// Takes the caller's trace context (the request's ``RequestContext/arrivedTrace`` and
    /// ``RequestContext/arrivedTraceState``), decides sampling and, when sampled, starts the span
    /// (named after the method). Reads of the request only what the decision needs (a copy of
    /// its method or trace state is a retain).
    static func start(_ request: RequestContext, tracing: ProxyTracing, rng: inout FastRandom) -> RequestTrace {
        let incoming = request.arrivedTrace
        let kind: SpanKind = request.direction == .outbound ? .client : .server
        let sampled: Bool
        if !tracing.isRecording {
            sampled = false
        } else if let decided = incoming?.sampled {
            sampled = decided
        } else {
            sampled =
                tracing.sampleRate >= 1
                || (tracing.sampleRate > 0 && Double(rng.next() >> 11) * 0x1p-53 < tracing.sampleRate)
        }
        guard sampled else {
            // Not recorded: the caller's context goes on unchanged (its decision too, also when
            // this proxy stopped recording), or a new unsampled one.
            if let incoming {
                return RequestTrace(
                    span: nil,
                    ids: incoming.ids,
                    state: request.arrivedTraceState,
                    kind: kind,
                    replacesHeaders: !incoming.w3c
                )
            }
            return RequestTrace(span: nil, ids: .random(&rng), state: nil, kind: kind, replacesHeaders: true)
        }
        // The caller's context with the decision taken (a B3 caller may leave it to the receiver).
        let state = request.arrivedTraceState
        var parentContext = InstrumentationContext.topLevel
        if let incoming {
            var parent = incoming.ids
            parent.flags |= TraceIDs.sampledFlag
            let carrier = TraceCarrier(traceparent: TraceHeaders.traceparent(parent), tracestate: state)
            tracing.tracer.extract(carrier, into: &parentContext, using: TraceCarrier.Extract())
        }
        let span = tracing.tracer.startSpan(
            request.head.method.rawValue,
            context: parentContext,
            ofKind: kind,
            at: DefaultTracerClock.now
        )
        var outgoing = TraceCarrier()
        tracing.tracer.inject(span.context, into: &outgoing, using: TraceCarrier.Inject())
        // The tracer's own context, as it will be sent: the ids logged are the exported ones. A
        // tracer that does not speak W3C: the caller's context goes on, the span is still ended.
        if let sent = outgoing.traceparent.flatMap(TraceHeaders.ids(parsing:)) {
            return RequestTrace(span: span, ids: sent, state: outgoing.tracestate, kind: kind, replacesHeaders: true)
        }
        return RequestTrace(
            span: span,
            ids: incoming?.ids ?? .random(&rng),
            state: state,
            kind: kind,
            replacesHeaders: true
        )
    }

    /// Ends the span with what the request became (HTTP semantic conventions, plus Trellis's own
    /// `trellis.*` attributes), at this instant.
    ///
    /// The attributes are gathered as a list and handed over as one: a span that takes a list
    /// (``AttributeListSpan``, as TrellisTracing's do) keeps it as it is; any other gets
    /// `SpanAttributes` (a dictionary: a hash per key, ~11,000 instructions for the fifteen of a
    /// usual request). Each still costs the exporter two nested protobuf messages, so only what
    /// the conventions ask for is set: `network.protocol.name` is left out (it is `http`, which the conventions say not to
    /// repeat), `client.port` too (opt-in), and the error token is in `error.type` alone.
    func finish(_ r: RequestContext) {
        guard let span else { return }
        let now = DefaultTracerClock.now
        let status = r.responseStatus.map { Int64($0.code) }
        let method = r.head.method.rawValue
        let service =
            r.cluster?.config.originalDestination == true ? nil : r.clusterName.flatMap(AccessLogRecord.service)
        span.operationName = service.map { method + " " + $0 } ?? method
        var attributes = SpanAttributeList()
        attributes.list.reserveCapacity(Self.attributeCapacity)
        attributes.set("http.request.method", value: .string(method))
        let target = r.head.uri
        if let question = target.utf8.firstIndex(of: UInt8(ascii: "?")) {
            attributes.set("url.path", value: .string(String(target[..<question])))
            attributes.set("url.query", value: .string(String(target[target.utf8.index(after: question)...])))
        } else {
            attributes.set("url.path", value: .string(target))
        }
        attributes.set("url.scheme", value: .string("http"))
        if let authority = r.host {
            let (host, port) = Self.split(authority)
            attributes.set("server.address", value: .string(host))
            if let port { attributes.set("server.port", value: .int64(port)) }
        }
        attributes.set("network.protocol.version", value: .string(Self.protocolVersion(r.head.version)))
        if let status { attributes.set("http.response.status_code", value: .int64(status)) }
        if let agent = r.head.fields.first("user-agent") {
            attributes.set("user_agent.original", value: .string(agent))
        }
        if let ip = r.clientIP { attributes.set("client.address", value: .string(ip)) }
        if let endpoint = r.endpoint {
            attributes.set("network.peer.address", value: .string(endpoint.host))
            attributes.set("network.peer.port", value: .int64(Int64(endpoint.port)))
        }
        if let service { attributes.set("peer.service", value: .string(service)) }
        if r.isGRPC {
            attributes.set("rpc.system", value: .string("grpc"))
            if let grpc = r.error?.grpcStatus ?? r.grpcStatus {
                attributes.set("rpc.grpc.status_code", value: .int64(Int64(grpc)))
            }
        }
        let failed = r.error != nil || (status ?? 0) >= 500 || (kind == .client && (status ?? 0) >= 400)
        if let token = r.error?.token {
            attributes.set("error.type", value: .string(token))
        } else if failed, let status {
            attributes.set("error.type", value: .string(String(status)))
        }
        attributes.set("trellis.listener", value: .string(r.listenerName))
        if let route = r.routeName { attributes.set("trellis.route", value: .string(route)) }
        if let cluster = r.clusterName { attributes.set("trellis.cluster", value: .string(cluster)) }
        if let id = r.requestID { attributes.set("trellis.request_id", value: .string(id)) }
        if r.retries > 0 { attributes.set("trellis.retries", value: .int64(Int64(r.retries))) }
        if let span = span as? any AttributeListSpan {
            span.setAttributes(attributes.list)
        } else {
            var dictionary = SpanAttributes()
            for (key, value) in attributes.list { dictionary.set(key, value: value) }
            span.attributes = dictionary
        }
        if failed { span.setStatus(SpanStatus(code: .error, message: r.error?.token)) }
        span.end(at: now)
    }

    /// The most attributes ``finish(_:)`` sets (a retried gRPC request that failed, with a
    /// query).
    static let attributeCapacity = 21

    /// `1.1`, `1.0`, `2`: as OpenTelemetry writes `network.protocol.version` (and the access log, after `HTTP/`).
    static func protocolVersion(_ version: HTTPVersion) -> String {
        switch (version.major, version.minor) {
        case (1, 1): "1.1"
        case (1, 0): "1.0"
        case (2, _): "2"
        default: "\(version.major).\(version.minor)"
        }
    }

    /// `host:port`, `[v6]:port` or `host`; a port that is not a number is left in the host.
    private static func split(_ authority: String) -> (String, Int64?) {
        let utf8 = authority.utf8
        if utf8.first == UInt8(ascii: "["), let close = utf8.firstIndex(of: UInt8(ascii: "]")) {
            let host = String(authority[utf8.index(after: utf8.startIndex)..<close])
            let rest = utf8[utf8.index(after: close)...]
            guard rest.first == UInt8(ascii: ":") else { return (host, nil) }
            return (host, port(rest.dropFirst()))
        }
        if let colon = utf8.lastIndex(of: UInt8(ascii: ":")), let port = port(utf8[utf8.index(after: colon)...]) {
            return (String(authority[..<colon]), port)
        }
        return (authority, nil)
    }

    /// A decimal port (1 to 5 digits, at most 65535); nil otherwise.
    private static func port(_ digits: Substring.UTF8View) -> Int64? {
        guard !digits.isEmpty, digits.count <= 5 else { return nil }
        var value: Int64 = 0
        for c in digits {
            guard c >= UInt8(ascii: "0"), c <= UInt8(ascii: "9") else { return nil }
            value = value * 10 + Int64(c &- UInt8(ascii: "0"))
        }
        return value <= 65535 ? value : nil
    }
}

/// A span that takes its attributes as a list of distinct keys, kept in the order given, instead
/// of `SpanAttributes` (a dictionary, a hash of every key as it is set): what the data path
/// sets on every recorded span. TrellisTracing's spans are such spans.
public protocol AttributeListSpan: Span {
    /// Replaces the span's attributes with `list` (each key once).
    func setAttributes(_ list: [(key: String, value: SpanAttribute)])
}

/// The attributes ``RequestTrace/finish(_:)`` sets, in order.
struct SpanAttributeList {
    var list: [(key: String, value: SpanAttribute)] = []

    mutating func set(_ key: String, value: SpanAttribute) { list.append((key, value)) }
}

/// The trace headers of a request: W3C Trace Context first, else B3 (single `b3` or the
/// `x-b3-*` headers), read into one W3C context. An invalid header counts as absent (a new trace
/// starts), as the W3C specification asks.
enum TraceHeaders {
    /// The caller's context, and its sampling decision (nil: left to this proxy, as B3 allows).
    /// `w3c`: the context came in `traceparent` (else from B3 headers). Plain integers, copied
    /// without a retain: the caller's `tracestate` (rare) is kept beside it, in
    /// ``RequestContext/arrivedTraceState``.
    struct Incoming {
        var ids: TraceIDs
        var sampled: Bool?
        var w3c: Bool
    }

    /// The trace fields of a request, gathered while its headers are read once for other reasons
    /// too (``RequestContext`` does): W3C Trace Context first, else B3 (single `b3` or the
    /// `x-b3-*` headers). Plain values but for one optional reference to what is rarer
    /// (`tracestate`, B3), so that holding and copying it costs no retain for most requests.
    struct Fields {
        /// `traceparent`'s ids, read where it was received (no string made).
        private var parent: TraceIDs?
        /// A `traceparent` was received and is invalid.
        private var invalidParent = false
        /// `tracestate` and B3's fields, when any came.
        private var rare: Rare?
        /// Whether any trace field was seen (most requests of a new trace carry none).
        private(set) var any = false

        final class Rare {
            var state: String?
            var single: String?
            var trace: String?
            var span: String?
            var sampled: String?
            var debug = false
        }

        private mutating func rareFields() -> Rare {
            if let rare { return rare }
            let fields = Rare()
            rare = fields
            return fields
        }

        /// Whether a field name of `length` bytes may be a trace field (2, 10, 11 or 12): the
        /// others need no call to ``note(_:_:)``.
        @inline(__always)
        static func mayNote(length: Int) -> Bool {
            length < 16 && (1 &<< length) & 0b1_1100_0000_0100 != 0
        }

        /// Notes `name: value` if it is a trace field, comparing only names of the right length;
        /// a string is made of a trace field's value alone.
        mutating func note(_ name: UnsafeBufferPointer<UInt8>, _ value: UnsafeBufferPointer<UInt8>) {
            func text() -> String { String(decoding: value, as: UTF8.self) }
            switch name.count {
            case 2 where HeaderRewriting.equalsLowercase(name, "b3"):
                let b3 = rareFields()
                b3.single = b3.single ?? text()
            case 10:
                if HeaderRewriting.equalsLowercase(name, "tracestate") {
                    let rare = rareFields()
                    rare.state = rare.state.map { "\($0),\(text())" } ?? text()
                } else if HeaderRewriting.equalsLowercase(name, "x-b3-flags") {
                    rareFields().debug = value.count == 1 && value[0] == UInt8(ascii: "1")
                } else {
                    return
                }
            case 11:
                if HeaderRewriting.equalsLowercase(name, "traceparent") {
                    if parent == nil && !invalidParent {
                        parent = TraceHeaders.ids(parsing: value)
                        invalidParent = parent == nil
                    }
                } else if HeaderRewriting.equalsLowercase(name, "x-b3-spanid") {
                    let b3 = rareFields()
                    b3.span = b3.span ?? text()
                } else {
                    return
                }
            case 12:
                if HeaderRewriting.equalsLowercase(name, "x-b3-traceid") {
                    let b3 = rareFields()
                    b3.trace = b3.trace ?? text()
                } else if HeaderRewriting.equalsLowercase(name, "x-b3-sampled") {
                    let b3 = rareFields()
                    b3.sampled = b3.sampled ?? text()
                } else {
                    return
                }
            default: return
            }
            any = true
        }

        /// The caller's context from the fields noted, with its `tracestate` (W3C only); an
        /// invalid header counts as absent (a new trace starts), as the W3C specification asks.
        func context() -> (incoming: Incoming, state: String?)? {
            guard any else { return nil }
            if invalidParent { return nil }
            if let ids = parent {
                // A trace state is checked by the library (it alone parses its entries); a bad one
                // makes the whole context unusable, as it would there. The `traceparent` given to
                // it is the one received: a valid one is written back exactly from its ids.
                let state = rare?.state
                if let state, !state.isEmpty,
                    (try? TraceContext(
                        traceParentHeaderValue: TraceHeaders.traceparent(ids),
                        traceStateHeaderValue: state
                    )) == nil
                {
                    return nil
                }
                return (Incoming(ids: ids, sampled: ids.sampled, w3c: true), state?.isEmpty == false ? state : nil)
            }
            guard let b3 = rare else { return nil }
            if let single = b3.single {
                return TraceHeaders.b3Single(single).map {
                    (Incoming(ids: $0.ids, sampled: $0.sampled, w3c: false), nil)
                }
            }
            if let trace = b3.trace, let span = b3.span {
                return TraceHeaders.b3(trace: trace, span: span, sampled: b3.debug ? "1" : b3.sampled).map {
                    (Incoming(ids: $0.ids, sampled: $0.sampled, w3c: false), nil)
                }
            }
            return nil
        }
    }

    /// `00-{trace id}-{span id}-{flags}`, written in one allocation.
    static func traceparent(_ ids: TraceIDs) -> String {
        String(unsafeUninitializedCapacity: 55) { out in
            write(ids, into: out)
            return 55
        }
    }

    /// The length of a `traceparent` value.
    static let traceparentLength = 55

    /// Writes a `traceparent` value (``traceparentLength`` bytes) at the start of `out`.
    static func write(_ ids: TraceIDs, into out: UnsafeMutableBufferPointer<UInt8>) {
        out[0] = UInt8(ascii: "0")
        out[1] = UInt8(ascii: "0")
        out[2] = UInt8(ascii: "-")
        HexText.write(ids.high, 16, into: out, at: 3)
        HexText.write(ids.low, 16, into: out, at: 19)
        out[35] = UInt8(ascii: "-")
        HexText.write(ids.span, 16, into: out, at: 36)
        out[52] = UInt8(ascii: "-")
        HexText.write(UInt64(ids.flags), 2, into: out, at: 53)
    }

    /// A `traceparent` value (`00-{32 hex}-{16 hex}-{2 hex}`, lower-case, ids not all zero: W3C
    /// Trace Context level 1, the rules of `TraceContext(traceParentHeaderValue:)`) decoded in place,
    /// without copying the value.
    static func ids(parsing value: String) -> TraceIDs? {
        value.withUTF8Bytes(ids(parsing:))
    }

    static func ids(parsing p: UnsafeBufferPointer<UInt8>) -> TraceIDs? {
        guard p.count == 55, let base = p.baseAddress, p[0] == UInt8(ascii: "0"), p[1] == UInt8(ascii: "0"),
            p[2] == UInt8(ascii: "-"), p[35] == UInt8(ascii: "-"), p[52] == UInt8(ascii: "-"),
            let high = hex16(base + 3), let low = hex16(base + 19), let span = hex16(base + 36),
            let flags = hexValue(p, from: 53, digits: 2), high | low != 0, span != 0
        else { return nil }
        return TraceIDs(high: high, low: low, span: span, flags: UInt8(flags))
    }

    /// 16 lower-case hex digits at `p` as a number; nil on any other character.
    @inline(__always)
    static func hex16(_ p: UnsafePointer<UInt8>) -> UInt64? {
        guard let high = hex8(p), let low = hex8(p + 8) else { return nil }
        return UInt64(high) &<< 32 | UInt64(low)
    }

    /// 8 lower-case hex digits at `p`, decoded as one word: each byte's value is its low nibble,
    /// plus 9 for a letter (bit 6 set); every value must be below 16 and the digits written back
    /// from them must be the bytes read, which rules out anything but `0-9a-f`; then the nibbles
    /// are packed, the first character the most significant.
    @inline(__always)
    static func hex8(_ p: UnsafePointer<UInt8>) -> UInt32? {
        let ones: UInt64 = 0x0101_0101_0101_0101
        let w = UnsafeRawPointer(p).loadUnaligned(as: UInt64.self).littleEndian
        let nibbles = (w & (0x0F &* ones)) &+ ((w &>> 6) & ones) &* 9
        let letters = ((nibbles &+ 6 &* ones) &>> 4) & ones  // 1 where the value is 10 or more
        // Values above 15 are `g`–`o` (and others) written back as themselves: refused first.
        guard nibbles & (0xF0 &* ones) == 0, nibbles &+ 0x30 &* ones &+ letters &* 0x27 == w else { return nil }
        var x = nibbles.byteSwapped  // the first character in the top byte
        x = (x | x &>> 4) & 0x00FF_00FF_00FF_00FF
        x = (x | x &>> 8) & 0x0000_FFFF_0000_FFFF
        x = (x | x &>> 16) & 0x0000_0000_FFFF_FFFF
        return UInt32(truncatingIfNeeded: x)
    }

    /// The number written by `digits` lower-case hex digits of `text` from `offset`; nil on any
    /// other character.
    private static func hexValue(_ text: UnsafeBufferPointer<UInt8>, from offset: Int, digits: Int) -> UInt64? {
        var value: UInt64 = 0
        var i = offset
        let end = offset + digits
        while i < end {
            // Two unsigned comparisons, no range pattern (which was not specialized).
            let c = text[i]
            let digit = c &- UInt8(ascii: "0")
            let letter = c &- UInt8(ascii: "a")
            if digit < 10 {
                value = value &<< 4 | UInt64(digit)
            } else if letter < 6 {
                value = value &<< 4 | UInt64(letter &+ 10)
            } else {
                return nil
            }
            i &+= 1
        }
        return value
    }

    /// `b3: {traceid}-{spanid}[-{sampled}[-{parentspanid}]]`; a lone `0`/`1`/`d` carries only a
    /// decision and no ids (not a parent).
    static func b3Single(_ value: String) -> (ids: TraceIDs, sampled: Bool?)? {
        let parts = value.split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count >= 2 else { return nil }
        return b3(trace: String(parts[0]), span: String(parts[1]), sampled: parts.count > 2 ? String(parts[2]) : nil)
    }

    /// B3 ids as a W3C context: a 64-bit trace id is left-padded to 128 bits; sampled `1`/`d`/
    /// `true` → sampled, `0`/`false` → not, absent → this proxy decides (as for a new trace).
    static func b3(trace: String, span: String, sampled: String?) -> (ids: TraceIDs, sampled: Bool?)? {
        let trace = trace.lowercased()
        let span = span.lowercased()
        guard trace.count == 16 || trace.count == 32, span.count == 16,
            trace.allSatisfy(\.isHexDigit), span.allSatisfy(\.isHexDigit)
        else { return nil }
        let full = trace.count == 16 ? String(repeating: "0", count: 16) + trace : trace
        let decision = sampled.map { ["1", "d", "true"].contains($0.lowercased()) }
        guard let ids = ids(parsing: "00-\(full)-\(span)-00") else { return nil }
        return (ids, decision)
    }
}

/// A request's trace headers as a carrier for the tracer's propagator.
struct TraceCarrier: Sendable {
    var traceparent: String?
    var tracestate: String?

    struct Extract: Extractor {
        func extract(key: String, from carrier: TraceCarrier) -> String? {
            switch key {
            case "traceparent": carrier.traceparent
            case "tracestate": carrier.tracestate
            default: nil
            }
        }
    }

    struct Inject: Injector {
        func inject(_ value: String, forKey key: String, into carrier: inout TraceCarrier) {
            switch key {
            case "traceparent": carrier.traceparent = value
            case "tracestate": carrier.tracestate = value
            default: break
            }
        }
    }
}

/// A W3C trace context's ids and flags as plain integers: what the data path keeps for every
/// request (recorded or not), without the library's `TraceContext` and its trace-state storage.
struct TraceIDs: Sendable, Hashable {
    /// The 128-bit trace id, high and low halves (big-endian order in the header).
    var high: UInt64
    var low: UInt64
    var span: UInt64
    var flags: UInt8

    static let sampledFlag: UInt8 = 0x01

    var sampled: Bool { flags & Self.sampledFlag != 0 }

    /// New ids (never all zero), unsampled.
    static func random(_ rng: inout FastRandom) -> TraceIDs {
        TraceIDs(high: rng.next(), low: rng.next() | 1, span: rng.next() | 1, flags: 0)
    }

    init(high: UInt64, low: UInt64, span: UInt64, flags: UInt8) {
        self.high = high
        self.low = low
        self.span = span
        self.flags = flags
    }

    /// The trace id as 32 lower-case hex digits, and the span id as 16 (the access log's).
    var traceIDHex: String {
        String(unsafeUninitializedCapacity: 32) { out in
            HexText.write(high, 16, into: out, at: 0)
            HexText.write(low, 16, into: out, at: 16)
            return 32
        }
    }

    var spanIDHex: String {
        String(unsafeUninitializedCapacity: 16) { out in
            HexText.write(span, 16, into: out, at: 0)
            return 16
        }
    }
}

/// A recorded span and a trace state, held by reference (see ``RequestTrace``).
final class TraceExtra {
    let span: (any Span)?
    let state: String?
    init(span: (any Span)?, state: String?) {
        self.span = span
        self.state = state
    }
}

@available(*, unavailable)
extension TraceExtra: Sendable {}
