import Foundation
import Testing
import TrellisTestSupport

@testable import Pilot

/// Pilot's HTTP API (real Hummingbird server, real curl): bad requests get a 4xx naming what is
/// wrong, are counted, and change nothing.
@Suite(.serialized)
struct PilotAPITests {
    static let good = #"{"service": "orders", "address": "10.0.0.1", "port": 8080, "node": "vm-a"}"#

    @Test func badRegistrationsAreRefusedWithTheKeyAndWhatWasExpected() async throws {
        try await PilotHarness.run(store: try SQLiteRegistryStore()) { pilot in
            let cases: [(body: String, status: Int, message: String)] = [
                ("{not json", 400, "the body is not valid JSON"),
                ("[1, 2]", 400, "body: expected a JSON object, got a list"),
                (#"{"service": "orders", "address": "10.0.0.1", "port": 8080}"#, 400, "node: required"),
                (
                    #"{"service": "orders", "address": "10.0.0.1", "port": 70000, "node": "a"}"#, 400,
                    "port: expected an integer in 1...65535, got 70000"
                ),
                (
                    #"{"service": "orders", "address": "10.0.0.1", "port": "80", "node": "a"}"#, 400,
                    "port: expected an integer in 1...65535, got the string \"80\""
                ),
                (
                    #"{"service": "Orders!", "address": "10.0.0.1", "port": 80, "node": "a"}"#, 400,
                    "service: expected lowercase letters"
                ),
                (
                    #"{"service": "orders", "address": "db.internal", "port": 80, "node": "a"}"#, 400,
                    "address: expected an IPv4 or IPv6 address"
                ),
                (
                    #"{"service": "orders", "address": "10.0.0.1", "port": 80, "node": "a", "colour": "red"}"#, 400,
                    "colour: unknown key"
                ),
                // inet_pton stops at a NUL: the whole byte content is checked.
                (
                    #"{"service": "orders", "address": "10.0.0.1\u0000junk", "port": 80, "node": "a"}"#, 400,
                    "address: expected an IPv4 or IPv6 address"
                ),
                (
                    #"{"service": "orders", "address": "10.0.0.1", "port": 80, "node": "a", "ttl_seconds": 1}"#, 400,
                    "ttl_seconds: expected an integer in 5...3600"
                ),
                (
                    #"{"service": "orders", "address": "10.0.0.1", "port": 80, "node": "a", "protocol": "smtp"}"#, 400,
                    "protocol: expected one of http, http2, grpc, tcp"
                ),
                (
                    #"{"service": "orders", "address": "10.0.0.1", "port": 80, "node": "a", "labels": {"v": 2}}"#, 400,
                    "labels.v: expected a string"
                ),
                (
                    #"{"service": "orders", "address": "10.0.0.1", "port": 80, "node": "a", "status": "sleepy"}"#, 400,
                    "status: expected healthy, unhealthy or draining"
                ),
            ]
            for (body, status, message) in cases {
                let answer = await Peers.http("POST", "\(pilot.api)/v1/instances", body: body)
                #expect(answer.status == status, "\(body) → \(answer)")
                #expect(
                    answer.body.contains(message.replacingOccurrences(of: "\"", with: "\\\"")),
                    "\(body) → \(answer.body)"
                )
            }
            let huge =
                #"{"service": "orders", "address": "10.0.0.1", "port": 80, "node": "a", "labels": {"x": ""#
                + String(repeating: "y", count: 70_000) + #""}}"#
            #expect(await Peers.http("POST", "\(pilot.api)/v1/instances", body: huge).status == 413)

            // Nothing was written; the counter saw every refusal.
            #expect(await Peers.http("GET", "\(pilot.api)/v1/instances").body == "[]")
            #expect(await pilot.metric(#"trellis_pilot_api_errors_total{status="400"}"#) == Double(cases.count))

            // Conflicts and unknown instances.
            #expect(await pilot.register(Self.good) == 201)
            #expect(await pilot.register(Self.good) == 200)  // the same node again: an update
            let other = await Peers.http(
                "POST",
                "\(pilot.api)/v1/instances",
                body: Self.good.replacingOccurrences(of: "vm-a", with: "vm-b")
            )
            #expect(other.status == 409 && other.body.contains("already registered by node 'vm-a'"))
            #expect(await Peers.http("PUT", "\(pilot.api)/v1/instances/orders/10.0.0.1/9999/lease").status == 404)
            #expect(await Peers.http("DELETE", "\(pilot.api)/v1/instances/orders/10.0.0.1/9999").status == 404)
            #expect(await Peers.http("DELETE", "\(pilot.api)/v1/instances/orders/10.0.0.1/http").status == 400)
            let badStatus = await Peers.http(
                "PUT",
                "\(pilot.api)/v1/instances/orders/10.0.0.1/8080/status",
                body: #"{"status": "gone"}"#
            )
            #expect(
                badStatus.status == 400 && badStatus.body.contains("status: expected healthy, unhealthy or draining")
            )
            let listed = await Peers.http("GET", "\(pilot.api)/v1/instances").body
            #expect(
                listed.contains("\"node\":\"vm-a\"") && listed.contains("\"status\":\"healthy\"")
                    && !listed.contains("vm-b")
            )
        }
    }

    /// A node id that needs percent-encoding in a path (`rb-pct#1`) is decoded: its drain drains it.
    @Test func pathParametersArePercentDecoded() async throws {
        try await PilotHarness.run(store: try SQLiteRegistryStore()) { pilot in
            #expect(await pilot.register(Self.good.replacingOccurrences(of: "vm-a", with: "rb-pct#1")) == 201)
            let drained = await Peers.http(
                "PUT",
                "\(pilot.api)/v1/nodes/rb-pct%231/status",
                body: #"{"status": "draining"}"#
            )
            #expect(drained.status == 200 && drained.body.contains(#""status":"draining""#), "\(drained)")
            let bad = await Peers.http("PUT", "\(pilot.api)/v1/nodes/rb%2/status", body: #"{"status": "draining"}"#)
            #expect(bad.status == 400 && bad.body.contains("not valid percent-encoding"), "\(bad)")
            // A NUL smuggled into a path segment is refused, not cut.
            let nul = await Peers.http("DELETE", "\(pilot.api)/v1/instances/orders/10.0.0.1%00junk/8080")
            #expect(nul.status == 400, "\(nul)")
        }
    }

    @Test func drainingANodeDrainsEachOfItsInstances() async throws {
        try await PilotHarness.run(store: try SQLiteRegistryStore()) { pilot in
            #expect(await pilot.register(Self.good) == 201)
            #expect(await pilot.register(Self.good.replacingOccurrences(of: "8080", with: "8081")) == 201)
            #expect(
                await pilot.register(
                    Self.good.replacingOccurrences(of: "vm-a", with: "vm-b").replacingOccurrences(
                        of: "10.0.0.1",
                        with: "10.0.0.2"
                    )
                ) == 201
            )
            let drained = await Peers.http("PUT", "\(pilot.api)/v1/nodes/vm-a/status", body: #"{"status": "draining"}"#)
            #expect(drained.status == 200)
            #expect(drained.body.components(separatedBy: "\"status\":\"draining\"").count - 1 == 2)
            let services = await Peers.http("GET", "\(pilot.api)/v1/services").body
            // orders:8080 has vm-a's (draining) and vm-b's instance; orders:8081 only vm-a's.
            #expect(
                services.contains(#""instances":{"draining":1,"healthy":1,"unhealthy":0},"name":"orders","port":8080"#),
                "\(services)"
            )
            #expect(
                services.contains(#""instances":{"draining":1,"healthy":0,"unhealthy":0},"name":"orders","port":8081"#),
                "\(services)"
            )
        }
    }

    @Test func anAgentThatStopsRenewingIsRemoved() async throws {
        try await PilotHarness.run(store: try SQLiteRegistryStore(), leaseSweepInterval: .milliseconds(100)) { pilot in
            let short = Self.good.replacingOccurrences(of: "}", with: #", "ttl_seconds": 5}"#)
            #expect(await pilot.register(short) == 201)
            #expect(await pilot.register(Self.good.replacingOccurrences(of: "8080", with: "8081")) == 201)  // 30 s
            // Renewed twice, then left alone.
            for _ in 0..<2 {
                try await Task.sleep(for: .seconds(2))
                #expect(await Peers.http("PUT", "\(pilot.api)/v1/instances/orders/10.0.0.1/8080/lease").status == 200)
            }
            #expect(
                await Peers.eventually(within: .seconds(8)) {
                    await !Peers.http("GET", "\(pilot.api)/v1/instances").body.contains("\"port\":8080")
                }
            )
            #expect(await Peers.http("GET", "\(pilot.api)/v1/instances").body.contains("\"port\":8081"))
            #expect(await pilot.metric("trellis_pilot_registry_leases_expired_total") == 1)
        }
    }
}
