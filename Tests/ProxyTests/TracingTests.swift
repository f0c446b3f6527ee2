import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import ServiceLifecycle
import Testing
import TrellisPolicy
import TrellisTestSupport

@testable import Proxy
@testable import TrellisTracing

/// Distributed traces as a collector receives them: two proxies in a row (A's listener outbound,
/// as the agent's on the calling machine; B's inbound, as the agent's on the serving one) export
/// their spans over OTLP/gRPC, through the exporter the executables use (TrellisTracing's `OTLPTracer`), to a real
/// receiver (grpcio with PyPI opentelemetry-proto).
@Suite(.disabled(if: OTLPReceiver.missing, "needs PyPI grpcio and opentelemetry-proto: run scripts/bootstrap.sh"))
struct TracingTests {
    let group = MultiThreadedEventLoopGroup.singleton

    static let logger: Logger = {
        var logger = Logger(label: "test.tracing")
        logger.logLevel = .error
        return logger
    }()

    /// Runs `body` with a tracer exporting to `port`, then stops the exporter (which sends what
    /// it still holds).
    func withTracer<T>(
        port: Int,
        service: String,
        sampleRate: Double,
        _ body: (ProxyTracing) async throws -> T
    ) async throws -> T {
        let settings = TracingSettings(
            collectorHost: "127.0.0.1",
            collectorPort: port,
            sampleRate: sampleRate,
            serviceName: service
        )
        let (tracing, exporter) = try TracingBackend.make(
            settings,
            defaultServiceName: "trellis-test",
            node: service + "-node",
            logger: Self.logger
        )
        let services = ServiceGroup(services: [exporter], logger: Self.logger)
        let running = Task { try await services.run() }
        do {
            let result = try await body(tracing)
            await services.triggerGracefulShutdown()
            try await running.value
            return result
        } catch {
            await services.triggerGracefulShutdown()
            _ = try? await running.value
            throw error
        }
    }

    /// A gateway listener sending everything to `upstream` (cluster `orders`).
    static func toOrders(_ upstream: TestUpstream) -> ProxyConfig {
        gatewayConfig(
            virtualHosts: catchAll("orders"),
            clusters: [ClusterConfig(name: "orders", endpoints: [endpoint(upstream)])]
        )
    }

    /// upstream ← B (inbound) ← A (outbound); `body` gets A's port and the upstream.
    func withTwoProxies<T>(
        receiver: Int,
        sampleRate: Double,
        _ body: (Int, TestUpstream) async throws -> T
    ) async throws -> T {
        let upstream = try await TestUpstream.start(name: "orders", group: group)
        defer { Task { await upstream.stop() } }
        return try await withTracer(port: receiver, service: "vm-b", sampleRate: sampleRate) { tracingB in
            try await withTracer(port: receiver, service: "vm-a", sampleRate: sampleRate) { tracingA in
                var configB = gatewayConfig(
                    virtualHosts: catchAll("inbound|8080||orders"),
                    clusters: [ClusterConfig(name: "inbound|8080||orders", endpoints: [endpoint(upstream)])]
                )
                configB.listeners[0].trafficDirection = .inbound
                let b = try await ProxyHarness.start(configB, group: group, tracing: tracingB)
                defer { Task { await b.stop() } }
                var configA = gatewayConfig(
                    virtualHosts: catchAll("outbound|8080||orders"),
                    clusters: [
                        ClusterConfig(
                            name: "outbound|8080||orders",
                            endpoints: [Endpoint(address: SocketEndpoint(host: "127.0.0.1", port: b.port))]
                        )
                    ]
                )
                configA.listeners[0].trafficDirection = .outbound
                let a = try await ProxyHarness.start(configA, group: group, tracing: tracingA)
                defer { Task { await a.stop() } }
                let result = try await body(a.port, upstream)
                // The proxies stop before their exporters, as in the agent: requests still in
                // flight end their spans as they close.
                await a.stop()
                await b.stop()
                return result
            }
        }
    }

    @Test func aRequestThroughTwoProxiesGetsAClientAndAServerSpanInTheCallersTrace() async throws {
        let receiver = try await OTLPReceiver()
        defer { receiver.stop() }
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        let callerSpan = "00f067aa0ba902b7"
        let received = try await withTwoProxies(receiver: receiver.port, sampleRate: 0.01) { port, upstream in
            let client = try await TestHTTPClient.connect(port: port, group: group)
            defer { Task { await client.close() } }
            let ok = try await client.request(
                .GET,
                "/orders/42?full=1",
                host: "orders:8080",
                headers: [("traceparent", "00-\(trace)-\(callerSpan)-01"), ("user-agent", "legacy/1.0")]
            )
            #expect(ok.status == .ok)
            // A sampled caller's trace is recorded whatever the rate for new traces (1 %).
            let failed = try await client.request(
                .GET,
                "/status/503",
                host: "orders:8080",
                headers: [("traceparent", "00-\(trace)-\(callerSpan)-01")]
            )
            #expect(failed.status == .serviceUnavailable)
            return upstream.requests.map { $0.headers.first(name: "traceparent") }
        }
        let spans = await receiver.spans(atLeast: 4)
        try #require(spans.count == 4, "\(spans)")
        func span(_ service: String, path: String) -> [String: Any]? {
            spans.first {
                $0["service"] as? String == service
                    && ($0["attributes"] as? [String: Any])?["url.path"] as? String == path
            }
        }
        let a = try #require(span("vm-a", path: "/orders/42"))
        let b = try #require(span("vm-b", path: "/orders/42"))
        #expect(a["kind"] as? String == "CLIENT" && b["kind"] as? String == "SERVER")
        #expect(a["trace_id"] as? String == trace && b["trace_id"] as? String == trace)
        #expect(a["parent_span_id"] as? String == callerSpan, "A's span is a child of the caller's")
        #expect(b["parent_span_id"] as? String == a["span_id"] as? String, "B's is a child of A's")
        // The server got B's span as its parent (W3C, sampled).
        #expect(received.first == "00-\(trace)-\(b["span_id"] as? String ?? "?")-01")
        #expect(a["name"] as? String == "GET orders" && a["status"] as? String == "UNSET")
        let attributes = try #require(b["attributes"] as? [String: Any])
        #expect(attributes["http.request.method"] as? String == "GET")
        #expect(attributes["http.response.status_code"] as? Int == 200)
        #expect(attributes["url.query"] as? String == "full=1")
        #expect(attributes["server.address"] as? String == "orders" && attributes["server.port"] as? Int == 8080)
        #expect(attributes["user_agent.original"] as? String == "legacy/1.0")
        #expect(attributes["trellis.cluster"] as? String == "inbound|8080||orders")
        #expect(attributes["peer.service"] as? String == "orders")
        #expect((attributes["trellis.request_id"] as? String)?.count == 36)
        #expect(b["instance"] as? String == "vm-b-node")
        // A 5xx is an error on both spans, with its status as error.type.
        let failedA = try #require(span("vm-a", path: "/status/503"))
        let failedB = try #require(span("vm-b", path: "/status/503"))
        for failed in [failedA, failedB] {
            #expect(failed["status"] as? String == "ERROR")
            #expect((failed["attributes"] as? [String: Any])?["error.type"] as? String == "503")
        }
    }

    @Test func aRequestWithoutATraceStartsOneAndB3IsRead() async throws {
        let receiver = try await OTLPReceiver()
        defer { receiver.stop() }
        try await withTwoProxies(receiver: receiver.port, sampleRate: 1) { port, _ in
            let client = try await TestHTTPClient.connect(port: port, group: group)
            defer { Task { await client.close() } }
            #expect(try await client.request(.GET, "/fresh", host: "orders:8080").status == .ok)
            let b3 = [("X-B3-TraceId", "a3ce929d0e0e4736"), ("X-B3-SpanId", "00f067aa0ba902b7"), ("X-B3-Sampled", "1")]
            #expect(try await client.request(.GET, "/b3", host: "orders:8080", headers: b3).status == .ok)
            #expect(
                try await client.request(
                    .GET,
                    "/b3-single",
                    host: "orders:8080",
                    headers: [("b3", "a3ce929d0e0e4736a3ce929d0e0e4736-00f067aa0ba902b8-1")]
                )
                .status == .ok
            )
        }
        let spans = await receiver.spans(atLeast: 6)
        try #require(spans.count == 6, "\(spans)")
        func pair(_ path: String) -> (a: [String: Any], b: [String: Any])? {
            let both = spans.filter { ($0["attributes"] as? [String: Any])?["url.path"] as? String == path }
            guard let a = both.first(where: { $0["service"] as? String == "vm-a" }),
                let b = both.first(where: { $0["service"] as? String == "vm-b" })
            else { return nil }
            return (a, b)
        }
        let fresh = try #require(pair("/fresh"))
        #expect(fresh.a["parent_span_id"] as? String == "", "a root span: the request came without a trace")
        #expect(fresh.b["parent_span_id"] as? String == fresh.a["span_id"] as? String)
        #expect(fresh.a["trace_id"] as? String == fresh.b["trace_id"] as? String)
        let b3 = try #require(pair("/b3"))
        #expect(b3.a["trace_id"] as? String == "0000000000000000a3ce929d0e0e4736")
        #expect(b3.a["parent_span_id"] as? String == "00f067aa0ba902b7")
        let single = try #require(pair("/b3-single"))
        #expect(single.a["trace_id"] as? String == "a3ce929d0e0e4736a3ce929d0e0e4736")
        #expect(single.a["parent_span_id"] as? String == "00f067aa0ba902b8")
        #expect(single.b["parent_span_id"] as? String == single.a["span_id"] as? String)
    }

    @Test func anUnsampledTraceIsPassedOnAndNotRecorded() async throws {
        let receiver = try await OTLPReceiver()
        defer { receiver.stop() }
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
        let received = try await withTwoProxies(receiver: receiver.port, sampleRate: 0) { port, upstream in
            let client = try await TestHTTPClient.connect(port: port, group: group)
            defer { Task { await client.close() } }
            _ = try await client.request(.GET, "/a", host: "orders:8080", headers: [("traceparent", unsampled)])
            _ = try await client.request(.GET, "/b", host: "orders:8080")
            return upstream.requests.map { $0.headers[canonicalForm: "traceparent"].map(String.init) }
        }
        // The caller's decision goes on unchanged; a request without a trace gets a new,
        // unsampled one, so every later hop agrees not to record it.
        #expect(received[0] == [unsampled])
        let made = try #require(received[1].first)
        #expect(received[1].count == 1)
        #expect(made.wholeMatch(of: /00-[0-9a-f]{32}-[0-9a-f]{16}-00/) != nil, "\(made)")
        try await Task.sleep(for: .milliseconds(300))
        #expect(receiver.spans.isEmpty, "\(receiver.spans)")
    }

    /// An exporter that stopped (here: shut down) stops the recording, never the proxy: requests
    /// are still served and their trace context passed on as it came.
    @Test func whenTheExporterStopsRequestsGoOnUnrecorded() async throws {
        let receiver = try await OTLPReceiver()
        defer { receiver.stop() }
        let upstream = try await TestUpstream.start(name: "orders", group: group)
        defer { Task { await upstream.stop() } }
        let settings = TracingSettings(collectorHost: "127.0.0.1", collectorPort: receiver.port, sampleRate: 1)
        let (tracing, exporter) = try TracingBackend.make(
            settings,
            defaultServiceName: "gw",
            node: "n",
            logger: Self.logger
        )
        let services = ServiceGroup(services: [exporter], logger: Self.logger)
        let running = Task { try await services.run() }
        let proxy = try await ProxyHarness.start(
            Self.toOrders(upstream),
            group: group,
            tracing: tracing
        )
        defer { Task { await proxy.stop() } }
        let client = try await TestHTTPClient.connect(port: proxy.port, group: group)
        defer { Task { await client.close() } }
        #expect(try await client.request(.GET, "/recorded").status == .ok)
        #expect(await receiver.spans(atLeast: 1, within: .seconds(20)).count == 1)
        await services.triggerGracefulShutdown()
        try await running.value
        let sampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        #expect(try await client.request(.GET, "/after", headers: [("traceparent", sampled)]).status == .ok)
        #expect(upstream.requests.last?.headers.first(name: "traceparent") == sampled)
        try await Task.sleep(for: .milliseconds(300))
        #expect(receiver.spans.count == 1)
    }

    /// The access log names the trace and this proxy's span.
    @Test func theAccessLogCarriesTheTraceAndSpanIds() async throws {
        let receiver = try await OTLPReceiver()
        defer { receiver.stop() }
        let upstream = try await TestUpstream.start(name: "orders", group: group)
        defer { Task { await upstream.stop() } }
        let log = try AccessLogFile()
        defer { Task { await log.remove() } }
        try await withTracer(port: receiver.port, service: "gw", sampleRate: 1) { tracing in
            let proxy = try await ProxyHarness.start(
                gatewayConfig(
                    virtualHosts: catchAll("orders"),
                    clusters: [ClusterConfig(name: "orders", endpoints: [endpoint(upstream)])],
                    accessLog: true
                ),
                group: group,
                accessLog: log,
                tracing: tracing
            )
            defer { Task { await proxy.stop() } }
            #expect(try await TestHTTPClient.get(port: proxy.port, "/logged", group: group).status == .ok)
            await proxy.stop()  // before the exporter, as in the agent
        }
        let span = try #require(await receiver.spans(atLeast: 1).first)
        let line = try #require(try await log.lines(atLeast: 1).first)
        #expect(line["trace_id"] as? String == span["trace_id"] as? String)
        #expect(line["span_id"] as? String == span["span_id"] as? String)
        #expect(span["kind"] as? String == "SERVER", "a gateway listener records server spans")
    }

    /// A collector that is down costs the data path nothing it waits for: every request is
    /// answered at once while the exporter's connection attempts fail (and its queue stays
    /// bounded: 2,048 spans, the rest dropped).
    @Test func aDeadCollectorDoesNotHoldRequests() async throws {
        let upstream = try await TestUpstream.start(name: "orders", group: group)
        defer { Task { await upstream.stop() } }
        let dead = Peers.freePort()
        try await withTracer(port: dead, service: "gw", sampleRate: 1) { tracing in
            let proxy = try await ProxyHarness.start(
                Self.toOrders(upstream),
                group: group,
                tracing: tracing
            )
            defer { Task { await proxy.stop() } }
            let client = try await TestHTTPClient.connect(port: proxy.port, group: group)
            defer { Task { await client.close() } }
            var slowest = Duration.zero
            for i in 0..<1000 {
                let started = ContinuousClock.now
                #expect(try await client.request(.GET, "/\(i)").status == .ok)
                slowest = max(slowest, ContinuousClock.now - started)
            }
            // Exports time out after seconds; a request that waited for one would show it.
            #expect(slowest < .seconds(1), "\(slowest)")
        }
    }
}

/// The span exporter's task and its gRPC connection run on a thread of their own, scheduled as a
/// batch thread: woken to encode and send a batch, it never preempts the event loop.
@Suite struct ExporterThreadTests {
    @Test func theExportersTasksRunOnABatchThread() async throws {
        let executor = BackgroundExecutor(logger: Logger(label: "test.exporter-thread"))
        defer { executor.shutdown() }
        let policy = await withTaskExecutorPreference(executor) { sched_getscheduler(0) }
        #expect(policy == 3, "SCHED_BATCH")
        #expect(sched_getscheduler(0) == 0, "the caller's thread is left as it was (SCHED_OTHER)")
    }
}
