import Foundation
import Interceptor
import NIOCore
import NIOPosix
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
        let capture = Capture(
            backend: try IPTablesBackend.detect(runner: CommandRunner(netns: lab.a)),
            runner: CommandRunner(netns: lab.a)
        )
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
        let gate = try await groupA.next().submit { try NetfilterQueueGate(queue: 5, mark: 0x1) }.get()
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

        // The reader goes away (a crashed agent): traffic flows directly again.
        gate.stop()
        #expect(try curl(lab, url) == "server-b direct")
        try capture.remove()
    }
}
