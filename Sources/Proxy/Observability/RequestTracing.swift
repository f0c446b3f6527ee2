import Atomics
import NIOCore
import NIOHTTP1
public import Tracing
import W3CTraceContext

/// What the data path needs to trace requests: a tracer (the executable's, e.g. swift-otel's
/// OTLP exporter; the library never bootstraps one) and the share of new traces to record.
///
/// Sampling is decided here, before the tracer is asked for anything: a request that arrives
/// with a trace (W3C `traceparent`, or B3 single or multi headers) follows its caller's decision;
/// a new trace is recorded with probability `sampleRate`. A request that is not recorded costs no
/// span: its trace context is passed on (a new one is made when it came without), so the next hop
/// decides the same way and the access log still names the trace.
public struct ProxyTracing: Sendable {
    public let tracer: any Tracer
    public let sampleRate: Double
    /// Cleared by ``stop()``: from then on nothing is recorded (contexts are still passed on).
    private let recording = ManagedAtomic(true)
    /// Destinations whose requests are never traced: the collector itself, whose exports a
    /// capture listener may see (an agent run as root captures its own exporter's connection),
    /// so that exporting spans does not make more spans.
    public let untraced: Set<SocketEndpoint>

    public init(tracer: any Tracer, sampleRate: Double, untraced: Set<SocketEndpoint> = []) {
        self.tracer = tracer
        self.sampleRate = sampleRate
        self.untraced = untraced
    }

    /// No more spans: the exporter behind the tracer stopped (a tracer nobody drains would keep
    /// every span it is handed).
    public func stop() { recording.store(false, ordering: .relaxed) }

    var isRecording: Bool { recording.load(ordering: .relaxed) }
}

/// One request's place in its trace: the span this proxy records for it (when sampled), and the
/// trace context sent upstream.
final class RequestTrace {
    /// The recorded span; nil when the trace is not sampled.
    let span: (any Span)?
    /// The `traceparent` (and `tracestate`) sent upstream.
    let traceparent: String
    let tracestate: String?
    /// For the access log: the trace's id, and this proxy's span id when it recorded one.
    let traceID: String
    let spanID: String?
    /// Client on the agent's outbound listener, server everywhere else.
    private let kind: SpanKind

    private init(
        span: (any Span)?,
        kind: SpanKind,
        traceparent: String,
        tracestate: String?,
        traceID: String,
        spanID: String?
    ) {
        self.span = span
        self.kind = kind
        self.traceparent = traceparent
        self.tracestate = tracestate
        self.traceID = traceID
        self.spanID = spanID
    }

    /// Reads the caller's trace context, decides sampling and, when sampled, starts the span.
    static func start(
        _ headers: HTTPHeaders,
        method: String,
        direction: TrafficDirection?,
        tracing: ProxyTracing,
        rng: inout FastRandom
    ) -> RequestTrace {
        let kind: SpanKind = direction == .outbound ? .client : .server
        let incoming = TraceHeaders.incoming(headers)
        let sampled =
            tracing.isRecording
            && (incoming?.sampled
                ?? (tracing.sampleRate >= 1
                    || (tracing.sampleRate > 0 && Double(rng.next() >> 11) * 0x1p-53 < tracing.sampleRate)))
        // The caller's context with the decision taken (a B3 caller may leave it to the receiver).
        let parent = incoming.map {
            TraceContext(
                traceID: $0.context.traceID,
                spanID: $0.context.spanID,
                flags: sampled ? .sampled : [],
                state: $0.context.state
            )
        }
        guard sampled else {
            // Not recorded: the caller's context goes on unchanged (its decision too, also when
            // this proxy stopped recording), or a new unsampled one.
            let context =
                incoming?.context
                ?? TraceContext(
                    traceID: .random(using: &rng),
                    spanID: .random(using: &rng),
                    flags: [],
                    state: TraceState()
                )
            return RequestTrace(
                span: nil,
                kind: kind,
                traceparent: context.traceParentHeaderValue,
                tracestate: context.traceStateHeaderValue,
                traceID: context.traceID.description,
                spanID: nil
            )
        }
        var context = InstrumentationContext.topLevel
        if let parent {
            let carrier = TraceCarrier(
                traceparent: parent.traceParentHeaderValue,
                tracestate: parent.traceStateHeaderValue
            )
            tracing.tracer.extract(carrier, into: &context, using: TraceCarrier.Extract())
        }
        let span = tracing.tracer.startSpan(method, context: context, ofKind: kind, at: DefaultTracerClock.now)
        var outgoing = TraceCarrier()
        tracing.tracer.inject(span.context, into: &outgoing, using: TraceCarrier.Inject())
        // The tracer's own context, as it will be sent: the ids logged are the exported ones.
        if let text = outgoing.traceparent, let own = try? TraceContext(traceParentHeaderValue: text) {
            return RequestTrace(
                span: span,
                kind: kind,
                traceparent: text,
                tracestate: outgoing.tracestate,
                traceID: own.traceID.description,
                spanID: own.spanID.description
            )
        }
        // A tracer that does not speak W3C: the caller's context goes on, the span is still ended.
        let fallback =
            parent
            ?? TraceContext(traceID: .random(using: &rng), spanID: .random(using: &rng), flags: [], state: TraceState())
        return RequestTrace(
            span: span,
            kind: kind,
            traceparent: fallback.traceParentHeaderValue,
            tracestate: fallback.traceStateHeaderValue,
            traceID: fallback.traceID.description,
            spanID: nil
        )
    }

    /// Ends the span with what the request became (HTTP semantic conventions, plus Trellis's own
    /// `trellis.*` attributes).
    func finish(_ r: RequestContext) {
        guard let span else { return }
        let status = r.responseStatus.map { Int($0.code) }
        let service =
            r.cluster?.config.originalDestination == true ? nil : r.clusterName.flatMap(AccessLogRecord.service)
        span.operationName = service.map { "\(r.head.method.rawValue) \($0)" } ?? r.head.method.rawValue
        var attributes = SpanAttributes()
        attributes["http.request.method"] = r.head.method.rawValue
        let target = r.head.uri
        if let question = target.firstIndex(of: "?") {
            attributes["url.path"] = String(target[..<question])
            attributes["url.query"] = String(target[target.index(after: question)...])
        } else {
            attributes["url.path"] = target
        }
        attributes["url.scheme"] = "http"
        if let authority = r.head.headers.first(name: "host") {
            let (host, port) = Self.split(authority)
            attributes["server.address"] = host
            if let port { attributes["server.port"] = port }
        }
        attributes["network.protocol.name"] = "http"
        attributes["network.protocol.version"] =
            r.head.version.major == 2 ? "2" : "\(r.head.version.major).\(r.head.version.minor)"
        if let status { attributes["http.response.status_code"] = status }
        if let agent = r.head.headers.first(name: "user-agent") { attributes["user_agent.original"] = agent }
        if let ip = r.clientIP { attributes["client.address"] = ip }
        if let port = r.remoteAddress?.port { attributes["client.port"] = port }
        if let endpoint = r.endpoint {
            attributes["network.peer.address"] = endpoint.host
            attributes["network.peer.port"] = endpoint.port
        }
        if let service { attributes["peer.service"] = service }
        if r.isGRPC {
            attributes["rpc.system"] = "grpc"
            if let grpc = r.error?.grpcStatus ?? r.grpcStatus { attributes["rpc.grpc.status_code"] = grpc }
        }
        let failed = r.error != nil || (status ?? 0) >= 500 || (kind == .client && (status ?? 0) >= 400)
        if let token = r.error?.token {
            attributes["error.type"] = token
            attributes["trellis.error"] = token
        } else if failed, let status {
            attributes["error.type"] = String(status)
        }
        attributes["trellis.listener"] = r.listenerName
        if let route = r.routeName { attributes["trellis.route"] = route }
        if let cluster = r.clusterName { attributes["trellis.cluster"] = cluster }
        if let id = r.requestID { attributes["trellis.request_id"] = id }
        if r.retries > 0 { attributes["trellis.retries"] = r.retries }
        span.attributes = attributes
        if failed { span.setStatus(SpanStatus(code: .error, message: r.error?.token)) }
        span.end()
    }

    /// `host:port`, `[v6]:port` or `host`.
    private static func split(_ authority: String) -> (String, Int?) {
        if authority.hasPrefix("["), let close = authority.firstIndex(of: "]") {
            let host = String(authority[authority.index(after: authority.startIndex)..<close])
            let rest = authority[authority.index(after: close)...]
            return (host, rest.hasPrefix(":") ? Int(rest.dropFirst()) : nil)
        }
        if let colon = authority.lastIndex(of: ":"), let port = Int(authority[authority.index(after: colon)...]) {
            return (String(authority[..<colon]), port)
        }
        return (authority, nil)
    }
}

@available(*, unavailable)
extension RequestTrace: Sendable {}

/// The trace headers of a request: W3C Trace Context first, else B3 (single `b3` or the
/// `x-b3-*` headers), read into one W3C context. An invalid header counts as absent (a new trace
/// starts), as the W3C specification asks.
enum TraceHeaders {
    /// The caller's context, and its sampling decision (nil: left to this proxy, as B3 allows).
    static func incoming(_ headers: HTTPHeaders) -> (context: TraceContext, sampled: Bool?)? {
        if let parent = headers.first(name: "traceparent") {
            guard
                let context = try? TraceContext(
                    traceParentHeaderValue: parent,
                    traceStateHeaderValue: headers.first(name: "tracestate")
                )
            else { return nil }
            return (context, context.flags.contains(.sampled))
        }
        if let single = headers.first(name: "b3") { return b3Single(single) }
        if let trace = headers.first(name: "x-b3-traceid"), let span = headers.first(name: "x-b3-spanid") {
            let sampled = headers.first(name: "x-b3-sampled")
            let debug = headers.first(name: "x-b3-flags") == "1"
            return b3(trace: trace, span: span, sampled: debug ? "1" : sampled)
        }
        return nil
    }

    /// `b3: {traceid}-{spanid}[-{sampled}[-{parentspanid}]]`; a lone `0`/`1`/`d` carries only a
    /// decision and no ids (not a parent).
    static func b3Single(_ value: String) -> (context: TraceContext, sampled: Bool?)? {
        let parts = value.split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count >= 2 else { return nil }
        return b3(trace: String(parts[0]), span: String(parts[1]), sampled: parts.count > 2 ? String(parts[2]) : nil)
    }

    /// B3 ids as a W3C context: a 64-bit trace id is left-padded to 128 bits; sampled `1`/`d`/
    /// `true` → sampled, `0`/`false` → not, absent → this proxy decides (as for a new trace).
    static func b3(trace: String, span: String, sampled: String?) -> (context: TraceContext, sampled: Bool?)? {
        let trace = trace.lowercased()
        let span = span.lowercased()
        guard trace.count == 16 || trace.count == 32, span.count == 16,
            trace.allSatisfy(\.isHexDigit), span.allSatisfy(\.isHexDigit)
        else { return nil }
        let full = trace.count == 16 ? String(repeating: "0", count: 16) + trace : trace
        let decision = sampled.map { ["1", "d", "true"].contains($0.lowercased()) }
        guard let context = try? TraceContext(traceParentHeaderValue: "00-\(full)-\(span)-00") else { return nil }
        return (context, decision)
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
