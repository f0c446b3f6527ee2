import Foundation
import Interceptor
import NIOCore
import NIOPosix
import Prometheus
import Testing

/// The NFQUEUE gate with real netfilter: no reader means direct traffic (fail-open); the reader
/// decides capture or bypass per new connection.
@Suite(
    .serialized,
    .disabled(if: NetnsLab.unavailableReason != nil, Comment(rawValue: NetnsLab.unavailableReason ?? ""))
)
struct GateNetnsTests {
    private func curl(_ lab: NetnsLab, _ url: String) throws -> String {
        let out = try lab.exec(lab.a, ["curl", "-s", "-g", "--max-time", "5", url])
        return out.status == 0 ? out.stdout.trimmingCharacters(in: .whitespacesAndNewlines) : "curl exit \(out.status)"
    }

    @Test func theGateFailsOpenCapturesWhenToldAndBypassesWhenDraining() async throws {
        let lab = try NetnsLab(subnet: 7)
        defer { lab.destroy() }
        let groupA = try lab.eventLoopGroup(in: lab.a)
        let groupB = try lab.eventLoopGroup(in: lab.b)
        defer {
            groupA.shutdownGracefully { _ in }
            groupB.shutdownGracefully { _ in }
        }
        let capture = try lab.capture(in: lab.a)
        let outbound = try await CaptureNetnsTests.listen(groupA, host: "::", port: 15001, name: "outbound")
        let server = try await CaptureNetnsTests.listen(groupB, host: "::", port: 8080, name: "server-b")
        defer {
            outbound.close(promise: nil)
            server.close(promise: nil)
        }
        try capture.apply(try RuleSet(CaptureConfig(gate: .init(queue: 5, mark: 0x1))))
        let url = "http://\(lab.bAddress):8080/"

        // No reader: the kernel bypasses the queue and the connection goes direct.
        #expect(try curl(lab, url) == "server-b direct")

        // The reader's socket must live in namespace A: create it on A's thread.
        let registry = PrometheusCollectorRegistry()
        let factory = PrometheusMetricsFactory(registry: registry)
        let gate = try await groupA.next().submit { try NetfilterQueueGate(queue: 5, mark: 0x1, metrics: factory) }
            .get()
        gate.start()
        defer { gate.stop() }
        // Starting in bypass: still direct, and counted.
        #expect(try curl(lab, url) == "server-b direct")
        gate.setMode(.capture)
        #expect(try curl(lab, url) == "outbound \(lab.bAddress) 8080")
        #expect(try curl(lab, "http://[\(lab.bAddress6)]:8080/") == "outbound \(lab.bAddress6) 8080")
        gate.setMode(.bypass)
        #expect(try curl(lab, url) == "server-b direct")
        let counters = gate.counters
        #expect(counters.captured == 2, "\(counters)")
        #expect(counters.bypassed == 2, "\(counters)")
        #expect(counters.gated == 4)
        var buffer: [UInt8] = []
        registry.emit(into: &buffer)
        let exposition = String(decoding: buffer, as: UTF8.self)
        #expect(exposition.contains("trellis_gate_connections_total{decision=\"captured\"} 2"), "\(exposition)")
        #expect(exposition.contains("trellis_gate_connections_total{decision=\"bypassed\"} 2"), "\(exposition)")
        #expect(exposition.contains("trellis_gate_queue_overflows_total 0"), "\(exposition)")

        // The reader goes away (a crashed agent): traffic flows directly again.
        gate.stop()
        #expect(try curl(lab, url) == "server-b direct")
        try capture.remove()
    }

    @Test func aBurstOf10000NewConnectionsIsDecidedWithoutDrops() async throws {
        let lab = try NetnsLab(subnet: 8)
        defer { lab.destroy() }
        let groupA = try lab.eventLoopGroup(in: lab.a)
        defer { groupA.shutdownGracefully { _ in } }
        let capture = try lab.capture(in: lab.a)
        let outbound = try await CaptureNetnsTests.listen(groupA, host: "::", port: 15001, name: "outbound")
        defer { outbound.close(promise: nil) }
        try capture.apply(try RuleSet(CaptureConfig(gate: .init(queue: 6, mark: 0x1))))
        defer { try? capture.remove() }
        let gate = try await groupA.next().submit { try NetfilterQueueGate(queue: 6, mark: 0x1) }.get()
        gate.start()
        defer { gate.stop() }
        gate.setMode(.capture)

        // 10,000 connections, 500 at a time; each must be answered by the capture listener (a
        // dropped or bypassed SYN would fail or reach nothing, since nothing listens on B).
        let total = 10_000
        let batch = 500
        let target = lab.bAddress
        let loop = groupA.next()
        var captured = 0
        var failures: [String] = []
        for start in stride(from: 0, to: total, by: batch) {
            let results = try await loop.flatSubmit { () -> EventLoopFuture<[Result<String, any Error>]> in
                let futures = (start..<min(start + batch, total)).map { _ -> EventLoopFuture<String> in
                    let collector = CaptureNetnsTests.Collector()
                    return ClientBootstrap(group: loop)
                        .connectTimeout(.seconds(10))
                        .channelInitializer { channel in
                            channel.eventLoop.makeCompletedFuture {
                                try channel.pipeline.syncOperations.addHandler(collector)
                            }
                        }
                        .connect(host: target, port: 8080)
                        .flatMap { channel in channel.closeFuture.map { collector.text } }
                }
                return EventLoopFuture.whenAllComplete(futures, on: loop)
            }.get()
            for result in results {
                switch result {
                case .success(let text) where text.hasSuffix("outbound \(target) 8080\n"): captured += 1
                case .success(let text): failures.append(String(text.suffix(40)))
                case .failure(let error): failures.append("\(error)")
                }
            }
        }
        #expect(captured == total, "first failures: \(failures.prefix(3))")
        let counters = gate.counters
        #expect(counters.captured >= total, "\(counters)")
        #expect(counters.bypassed == 0)
    }
}
