import Foundation
import NIOCore
import NIOPosix
import Testing
import TrellisTestSupport

@testable import Proxy

/// A raw HTTP/2 client breaking the protocol on purpose, one way per case (Fixtures/http2/
/// h2_abuse.py): floods and attacks close the offending connection, a bad stream is refused
/// while its connection goes on, and a new connection is served normally afterwards.
/// Runs in the heavy pass of scripts/test.sh, on event loops of its own: floods keep a loop busy.
@Suite(.serialized) struct HTTP2AbuseTests {
    static let loops = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    var group: MultiThreadedEventLoopGroup { Self.loops }

    static let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/http2/h2_abuse.py").path
    static let hpackMissing: Bool = {
        guard Peers.which("python3") != nil else { return true }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", "-c", "import hpack"]
        process.standardError = FileHandle.nullDevice
        guard (try? process.run()) != nil else { return true }
        process.waitUntilExit()
        return process.terminationStatus != 0
    }()

    struct Outcome: Decodable {
        var goaway: [UInt32]?
        var resets: [String: UInt32]
        var statuses: [String: String]
        var body: [String: Int]
        var closed: Bool
        var sent: Int
        var after: String?
        var body_before_window: Int?
    }

    @Test(
        .enabled(
            if: !hpackMissing && !HTTP2GatewayTests.curlMissing,
            "needs PyPI hpack and curl: run scripts/bootstrap.sh"
        ),
        arguments: [
            "rapid_reset", "continuation_flood", "settings_flood", "ping_flood", "too_many_streams", "hpack_bomb",
            "oversized_headers", "duplicate_pseudo", "missing_pseudo", "uppercase_header", "zero_window", "max_window",
        ]
    )
    func abuse(_ name: String) async throws {
        let upstream = try await TestUpstream.start(name: "alpha", group: group)
        let proxy = try await ProxyHarness.start(forwardingTo: upstream, group: group)
        defer {
            Task {
                await proxy.stop()
                await upstream.stop()
            }
        }
        let out = await Peers.command(["python3", Self.script, name, "127.0.0.1", "\(proxy.port)"])
        let outcome = try JSONDecoder().decode(Outcome.self, from: Data(out.stdout.utf8))
        let what = "\(name): \(out.stdout)\(out.stderr)"
        switch name {
        case "rapid_reset", "too_many_streams":
            // GOAWAY, then the connection ends (rapid reset: INTERNAL_ERROR; streams past the
            // acknowledged limit: PROTOCOL_ERROR).
            #expect(outcome.goaway != nil && outcome.closed, "\(what)")
            if name == "rapid_reset" {
                // A stream reset in the read that opened it never reaches the upstream (only a
                // pair split across two reads can): the attack does not become connections there.
                #expect(upstream.connections < 50, "upstream connections opened: \(upstream.connections)")
            }
        case "continuation_flood", "settings_flood", "ping_flood":
            #expect(outcome.closed, "\(what)")
            #expect(outcome.sent < 100_000 || name != "continuation_flood", "\(what)")
        case "hpack_bomb":
            // 64 MB of decoded header list from 16 KB: cut at the limit and answered 431.
            #expect(outcome.statuses["3"] == "431", "\(what)")
            #expect(outcome.after == "200", "\(what)")
        case "oversized_headers":
            #expect(outcome.statuses["1"] == "431", "\(what)")
            #expect(outcome.after == "200", "\(what)")
        case "duplicate_pseudo", "missing_pseudo", "uppercase_header":
            // The stream is refused with PROTOCOL_ERROR; the connection serves the next one.
            #expect(outcome.resets["1"] == 1, "\(what)")
            #expect(outcome.after == "200", "\(what)")
        case "zero_window":
            #expect(outcome.body_before_window == 0, "nothing sent into a zero window: \(what)")
            #expect(outcome.body["1"] == 1 << 20, "all of it once the window opened: \(what)")
            #expect(outcome.after == "200", "\(what)")
        case "max_window":
            #expect(outcome.body["1"] == 4 << 20, "\(what)")
        default:
            Issue.record("no expectation for \(name)")
        }
        // Whatever happened to that connection, a new one is served.
        let fresh = await Peers.command([
            "curl", "-s", "--http2-prior-knowledge", "--max-time", "5", "-w", " %{http_code}",
            "http://127.0.0.1:\(proxy.port)/",
        ])
        #expect(fresh.stdout == "alpha 200", "after \(name): \(fresh)")
    }

    /// Seeded random mutation of client traffic for a bounded time (10 s): the proxy answers a
    /// well-formed request after every tenth mangled connection and at the end. The seed is
    /// printed; `TRELLIS_FUZZ_SEED` replays one.
    @Test(.enabled(if: !hpackMissing, "needs PyPI hpack: run scripts/bootstrap.sh"))
    func randomlyMutatedConversationsNeverStopTheProxy() async throws {
        let upstream = try await TestUpstream.start(name: "alpha", group: group)
        let proxy = try await ProxyHarness.start(forwardingTo: upstream, group: group)
        defer {
            Task {
                await proxy.stop()
                await upstream.stop()
            }
        }
        let seed =
            ProcessInfo.processInfo.environment["TRELLIS_FUZZ_SEED"].flatMap { Int($0) }
            ?? Int.random(in: 0..<1_000_000)
        print("HTTP/2 fuzz seed: \(seed) (replay with TRELLIS_FUZZ_SEED=\(seed))")
        let fuzz = URL(fileURLWithPath: Self.script).deletingLastPathComponent().appendingPathComponent("h2_fuzz.py")
            .path
        let out = await Peers.command(["python3", fuzz, "127.0.0.1", "\(proxy.port)", "\(seed)", "10"])
        let report = (try? JSONSerialization.jsonObject(with: Data(out.stdout.utf8))) as? [String: Any] ?? [:]
        let rounds = report["rounds"] as? Int ?? 0
        #expect(rounds >= 50, "seed \(seed): \(out)")
        #expect((report["checks_failed"] as? [Any])?.isEmpty == true, "seed \(seed): \(out)")
        #expect(report["checks_ok"] as? Int ?? 0 >= rounds / 10, "seed \(seed): \(out)")
    }
}
