import CoreMetrics
import Foundation
import Logging
import NIOPosix
import ServiceLifecycle
import Testing
import Tracing
import TrellisPolicy
import TrellisRuntime
import TrellisTestSupport

@testable import Proxy
@testable import TrellisTracing

/// TrellisTracing's own tracer and OTLP/gRPC exporter, read back by a real collector (grpcio
/// with PyPI opentelemetry-proto's messages): what a span was given is what the collector gets.
@Suite(.disabled(if: OTLPReceiver.missing, "needs PyPI grpcio and opentelemetry-proto: run scripts/bootstrap.sh"))
struct OTLPTracerTests {
    static let logger: Logger = {
        var logger = Logger(label: "test.otlp")
        logger.logLevel = .error
        return logger
    }()

    /// Runs `body` with the executables' tracer exporting to `port`, then stops the exporter
    /// (which sends what it still holds).
    func withTracer<T>(
        port: Int,
        metrics: TrellisMetricsFactory = TrellisMetricsFactory(),
        headers: [String: String] = [:],
        _ body: (OTLPTracer) async throws -> T
    ) async throws -> T {
        let settings = TracingSettings(
            collectorHost: "127.0.0.1",
            collectorPort: port,
            sampleRate: 1,
            serviceName: "orders",
            headers: headers
        )
        let (tracing, exporter) = try TracingBackend.make(
            settings,
            defaultServiceName: "trellis-test",
            node: "vm-1",
            logger: Self.logger,
            metrics: metrics
        )
        let tracer = try #require(tracing.tracer as? OTLPTracer)
        return try await Self.running(exporter) { try await body(tracer) }
    }

    /// Runs `body` while `exporter` runs, then stops it (it sends what it still holds), also
    /// when `body` throws.
    static func running<T>(_ exporter: some Service, _ body: () async throws -> T) async throws -> T {
        let services = ServiceGroup(services: [exporter], logger: logger)
        let running = Task { try await services.run() }
        let result: T
        do {
            result = try await body()
        } catch {
            await services.triggerGracefulShutdown()
            _ = try? await running.value
            throw error
        }
        await services.triggerGracefulShutdown()
        try await running.value
        return result
    }

    struct Carrier: Sendable {
        var fields: [String: String] = [:]
    }
    struct Extract: Extractor {
        func extract(key: String, from carrier: Carrier) -> String? { carrier.fields[key] }
    }
    struct Inject: Injector {
        func inject(_ value: String, forKey key: String, into carrier: inout Carrier) { carrier.fields[key] = value }
    }

    @Test func everyPartOfASpanReachesTheCollectorAsSet() async throws {
        let receiver = try await OTLPReceiver()
        defer { receiver.stop() }
        // Longer than 16,383 bytes: its value, key-value and span lengths take three-byte varints.
        let long = String(repeating: "é-", count: 6000)
        let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        let token = ["authorization": "Bearer abc", "x-tenant": "shop"]
        let sent = try await withTracer(port: receiver.port, headers: token) { tracer in
            var parent = ServiceContext.topLevel
            tracer.extract(
                Carrier(fields: ["traceparent": caller, "tracestate": "rojo=00f067aa0ba902b7"]),
                into: &parent,
                using: Extract()
            )
            let span = tracer.startSpan("GET orders", context: parent, ofKind: .client)
            var attributes = SpanAttributes()
            attributes.set("text", value: .string("plain"))
            attributes.set("empty", value: .string(""))
            attributes.set("long", value: .string(long))
            attributes.set("negative", value: .int64(-42))
            attributes.set("zero", value: .int32(0))
            attributes.set("no", value: .bool(false))
            attributes.set("ratio", value: .double(0.25))
            attributes.set("names", value: .stringArray(["a", "b"]))
            attributes.set("ports", value: .int64Array([80, 443]))
            attributes.set("flags", value: .boolArray([true, false]))
            span.attributes = attributes
            span.addEvent(SpanEvent(name: "retry", attributes: ["attempt": 2]))
            span.recordError(TestError())
            var linked = ServiceContext.topLevel
            tracer.extract(
                Carrier(fields: ["traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"]),
                into: &linked,
                using: Extract()
            )
            span.addLink(SpanLink(context: linked, attributes: [:]))
            span.setStatus(SpanStatus(code: .error, message: "upstream_connect_failure"))
            var outgoing = Carrier()
            tracer.inject(span.context, into: &outgoing, using: Inject())
            span.end()
            span.operationName = "changed after the end"  // ignored
            return outgoing.fields
        }
        let got = try #require(await receiver.spans(atLeast: 1).first)
        #expect(got["name"] as? String == "GET orders")
        #expect(got["kind"] as? String == "CLIENT")
        #expect(got["trace_id"] as? String == "4bf92f3577b34da6a3ce929d0e0e4736")
        #expect(got["parent_span_id"] as? String == "00f067aa0ba902b7")
        #expect(got["trace_state"] as? String == "rojo=00f067aa0ba902b7")
        #expect(got["flags"] as? Int == 0x301, "sampled, with a parent in another process")
        let spanID = try #require(got["span_id"] as? String)
        #expect(sent["traceparent"] == "00-4bf92f3577b34da6a3ce929d0e0e4736-\(spanID)-01")
        #expect(sent["tracestate"] == "rojo=00f067aa0ba902b7")
        #expect(got["status"] as? String == "ERROR")
        #expect(got["status_message"] as? String == "upstream_connect_failure")
        let attributes = try #require(got["attributes"] as? [String: Any])
        #expect(attributes["text"] as? String == "plain")
        #expect(attributes["empty"] as? String == "")
        #expect(attributes["long"] as? String == long)
        #expect(attributes["negative"] as? Int == -42)
        #expect(attributes["zero"] as? Int == 0)
        #expect(attributes["no"] as? Bool == false)
        #expect(attributes["ratio"] as? Double == 0.25)
        #expect(attributes["names"] as? [String] == ["a", "b"])
        #expect(attributes["ports"] as? [Int] == [80, 443])
        #expect(attributes["flags"] as? [Bool] == [true, false])
        let events = try #require(got["events"] as? [[String: Any]])
        #expect(events.map { $0["name"] as? String } == ["retry", "exception"])
        #expect((events.first?["attributes"] as? [String: Any])?["attempt"] as? Int == 2)
        #expect((events.last?["attributes"] as? [String: Any])?["exception.message"] as? String == "the test's error")
        let links = try #require(got["links"] as? [[String: Any]])
        #expect(links.first?["trace_id"] as? String == "0af7651916cd43dd8448eb211c80319c")
        #expect(links.first?["span_id"] as? String == "b7ad6b7169203331")
        let resource = try #require(got["resource"] as? [String: Any])
        #expect(resource["service.name"] as? String == "orders")
        #expect(resource["service.instance.id"] as? String == "vm-1")
        #expect(got["scope"] as? String == "trellis")
        #expect(got["headers"] as? [String: String] == token, "agent.yaml's tracing.headers go with each export")
        #expect((got["duration_ms"] as? Double ?? -1) >= 0)
    }

    struct TestError: Error, CustomStringConvertible {
        var description: String { "the test's error" }
    }

    /// A span without a parent starts a trace of its own; its children share it.
    @Test func aNewTraceAndAChildSpan() async throws {
        let receiver = try await OTLPReceiver()
        defer { receiver.stop() }
        try await withTracer(port: receiver.port) { tracer in
            let root = tracer.startSpan("root", context: .topLevel, ofKind: .server)
            let child = tracer.startSpan("child", context: root.context, ofKind: .internal)
            child.end()
            root.end()
        }
        let spans = await receiver.spans(atLeast: 2)
        let root = try #require(spans.first { $0["name"] as? String == "root" })
        let child = try #require(spans.first { $0["name"] as? String == "child" })
        #expect(root["parent_span_id"] as? String == "")
        #expect((root["trace_id"] as? String)?.count == 32)
        #expect(child["trace_id"] as? String == root["trace_id"] as? String)
        #expect(child["parent_span_id"] as? String == root["span_id"] as? String)
        #expect(child["flags"] as? Int == 0x101, "sampled, its parent in this process")
        #expect(root["status"] as? String == "UNSET")
    }

    /// What the collector did not take is counted, never retried; what it took is counted too.
    @Test func rejectedSpansAreCounted() async throws {
        let receiver = try await OTLPReceiver(reject: 1)
        defer { receiver.stop() }
        let metrics = TrellisMetricsFactory()
        try await withTracer(port: receiver.port, metrics: metrics) { tracer in
            for i in 0..<3 { tracer.startSpan("op \(i)", context: .topLevel, ofKind: .server).end() }
        }
        #expect(receiver.spans.count == 3)
        let text = metrics.text()
        #expect(text.contains(#"trellis_tracing_spans_total{result="exported"} 2"#), "\(text)")
        #expect(text.contains(#"trellis_tracing_spans_total{result="failed"} 1"#), "\(text)")
    }
}

/// The exporter against a collector that refuses exports: what OTLP calls transient is sent
/// again, at most three times in all; anything else is dropped at once. Counted either way.
@Suite(.disabled(if: OTLPReceiver.missing, "needs PyPI grpcio and opentelemetry-proto: run scripts/bootstrap.sh"))
struct OTLPExportRetryTests {
    /// Runs `body` with an exporter that exports every 50 ms to `port`, then stops it.
    func withExporter(
        port: Int,
        metrics: TrellisMetricsFactory,
        _ body: (OTLPTracer) async throws -> Void
    )
        async throws
    {
        let queue = SpanQueue(capacity: 100, batchSize: 10)
        let exporter = OTLPExporter(
            queue: queue,
            collector: SocketEndpointTarget(host: "127.0.0.1", port: port),
            resource: [("service.name", "orders")],
            scheduleDelay: .milliseconds(50),
            logger: OTLPTracerTests.logger,
            eventLoopGroup: MultiThreadedEventLoopGroup.singleton,
            metrics: metrics
        )
        try await OTLPTracerTests.running(exporter) { try await body(OTLPTracer(queue: queue)) }
    }

    func names(_ spans: [[String: Any]]) -> [String] { spans.compactMap { $0["name"] as? String }.sorted() }

    @Test func aBatchRefusedAsUnavailableIsSentAgain() async throws {
        let receiver = try await OTLPReceiver(fail: 2)
        defer { receiver.stop() }
        let metrics = TrellisMetricsFactory()
        var received: [[String: Any]] = []
        try await withExporter(port: receiver.port, metrics: metrics) { tracer in
            for i in 0..<3 { tracer.startSpan("op \(i)", context: .topLevel, ofKind: .server).end() }
            received = await receiver.spans(atLeast: 3)
        }
        #expect(receiver.refused == 2)
        #expect(names(received) == ["op 0", "op 1", "op 2"], "each once, on the third try")
        let text = metrics.text()
        #expect(text.contains(#"trellis_tracing_spans_total{result="exported"} 3"#), "\(text)")
        #expect(text.contains(#"trellis_tracing_spans_total{result="failed"} 0"#), "\(text)")
    }

    /// Dropped after three tries when each is refused as unavailable (transient), after one when
    /// refused as an invalid argument (not transient); counted as failed either way.
    @Test(arguments: [(refusals: 3, code: "UNAVAILABLE"), (refusals: 1, code: "INVALID_ARGUMENT")])
    func aRefusedBatchIsDropped(refusals: Int, code: String) async throws {
        let receiver = try await OTLPReceiver(fail: refusals, failCode: code)
        defer { receiver.stop() }
        let metrics = TrellisMetricsFactory()
        try await withExporter(port: receiver.port, metrics: metrics) { tracer in
            for i in 0..<2 { tracer.startSpan("lost \(i)", context: .topLevel, ofKind: .server).end() }
            #expect(await Peers.eventually(within: .seconds(10)) { receiver.refused == refusals })
            // The next batch is the next span alone: the refused one is not tried again.
            tracer.startSpan("later", context: .topLevel, ofKind: .server).end()
            _ = await receiver.spans(atLeast: 1)
        }
        #expect(receiver.refused == refusals)
        #expect(names(receiver.spans) == ["later"])
        let text = metrics.text()
        #expect(text.contains(#"trellis_tracing_spans_total{result="failed"} 2"#), "\(text)")
        #expect(text.contains(#"trellis_tracing_spans_total{result="exported"} 1"#), "\(text)")
    }
}

/// The exporter's queue and the collector's answer, without a collector.
@Suite struct SpanQueueTests {
    @Test func aFullQueueDropsAndCountsNewSpans() async {
        let queue = SpanQueue(capacity: 3, batchSize: 2)
        let tracer = OTLPTracer(queue: queue)
        var wakeups = queue.wakeups.makeAsyncIterator()
        for i in 0..<5 { tracer.startSpan("op \(i)", context: .topLevel, ofKind: .server).end() }
        #expect(queue.count == 3)
        #expect(queue.takeDropped() == 2)
        #expect(queue.takeDropped() == 0, "counted once")
        #expect(await wakeups.next() != nil, "a full batch woke the exporter")
        #expect(queue.take().map { $0.data.name } == ["op 0", "op 1"])
        #expect(queue.take().map { $0.data.name } == ["op 2"])
        #expect(queue.take().isEmpty)
    }

    @Test func aSpanEndsOnce() {
        let queue = SpanQueue(capacity: 10, batchSize: 10)
        let span = OTLPTracer(queue: queue).startSpan("op", context: .topLevel, ofKind: .server)
        #expect(span.isRecording)
        span.end()
        span.end()
        span.attributes = ["late": "ignored"]
        #expect(!span.isRecording)
        #expect(queue.count == 1)
        #expect(span.data.attributes.get("late") == nil)
    }

    @Test func theCollectorsAnswerIsRead() throws {
        // partial_success { rejected_spans: 3, error_message: "bad" }, then an unknown field 7.
        let answer: [UInt8] = [0x0A, 0x07, 0x08, 0x03, 0x12, 0x03, 0x62, 0x61, 0x64, 0x38, 0x01]
        let response = try answer.withUnsafeBytes { try OTLPTraceExport.response($0) }
        #expect(response == OTLPTraceExport.Response(rejectedSpans: 3, errorMessage: "bad"))
        let empty = try [UInt8]().withUnsafeBytes { try OTLPTraceExport.response($0) }
        #expect(empty == OTLPTraceExport.Response())
        // A length past the end.
        let cut: [UInt8] = [0x0A, 0x07, 0x08]
        #expect(throws: OTLPTraceExport.MalformedResponse.self) {
            try cut.withUnsafeBytes { try OTLPTraceExport.response($0) }
        }
    }

    @Test func varintsOfEveryLength() {
        for value: UInt64 in [0, 1, 127, 128, 16383, 16384, 1 << 35, .max] {
            var w = ProtobufWriter()
            w.varint(value)
            #expect(w.bytes.count == ProtobufWriter.varintSize(value))
            let read = w.bytes.withUnsafeBytes { bytes -> UInt64? in
                var reader = ProtobufReader(bytes)
                return try? reader.varint()
            }
            #expect(read == value)
        }
    }
}
