import Foundation
import NIOCore
import Testing
import TrellisValues

@testable import Proxy

/// Durations in the configuration's JSON read as the YAML writes them, and a configuration saved
/// by an older agent (Swift's `[seconds, attoseconds]` pairs) still loads.
@Suite struct DurationCodingTests {
    @Test(arguments: [
        (Duration.seconds(10), "10s"), (.milliseconds(1500), "1.5s"), (.milliseconds(250), "250ms"),
        (.milliseconds(1025), "1.025s"), (.microseconds(1500), "1500us"), (.nanoseconds(7), "7ns"),
        (.zero, "0s"), (.seconds(3600), "3600s"),
    ])
    func printedAsTheFilesWriteThem(duration: Duration, text: String) {
        #expect(DurationText.format(duration) == text)
        #expect(DurationText.parse(text) == duration)
    }

    @Test func everyParsedDurationPrintsBackToItself() {
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<2000 {
            let nanos = Int64.random(in: 0..<1_000_000_000_000_000, using: &generator)
            let duration = Duration.nanoseconds(nanos)
            #expect(DurationText.parse(DurationText.format(duration)) == duration)
        }
    }

    /// What the event loop's timers get for a configured duration: whole nanoseconds, towards
    /// zero, clamped where a `TimeAmount` ends.
    @Test(
        arguments: [
            (Duration.seconds(15), 15_000_000_000), (.milliseconds(1500), 1_500_000_000), (.nanoseconds(7), 7),
            (.zero, 0), (.nanoseconds(-3), -3), (.seconds(-2) - .nanoseconds(1), -2_000_000_001),
            (Duration(secondsComponent: 1, attosecondsComponent: 999_999_999), 1_000_000_000),
            (.seconds(Int64.max), Int64.max), (.seconds(Int64.min), Int64.min),
        ] as [(Duration, Int64)]
    )
    func timersGetWholeNanoseconds(duration: Duration, nanoseconds: Int64) {
        #expect(TimeAmount(truncating: duration).nanoseconds == nanoseconds)
    }

    @Test func configurationJSONCarriesDurationText() throws {
        let cluster = ClusterConfig(
            name: "orders",
            endpoints: [Endpoint(address: SocketEndpoint(host: "127.0.0.1", port: 8080))],
            connectTimeout: .milliseconds(1500)
        )
        let route = RouteAction(clusters: [.init(name: "orders")], timeout: .milliseconds(250))
        let clusterJSON = String(decoding: try JSONEncoder().encode(cluster), as: UTF8.self)
        #expect(clusterJSON.contains("\"connect_timeout\":\"1.5s\""))
        #expect(clusterJSON.contains("\"idle_timeout\":\"60s\""))
        let routeJSON = String(decoding: try JSONEncoder().encode(route), as: UTF8.self)
        #expect(routeJSON.contains("\"timeout\":\"250ms\""))
        #expect(try JSONDecoder().decode(ClusterConfig.self, from: Data(clusterJSON.utf8)) == cluster)
        #expect(try JSONDecoder().decode(RouteAction.self, from: Data(routeJSON.utf8)) == route)

        let none = RouteAction(clusters: [.init(name: "orders")], timeout: nil)
        let noneJSON = try JSONEncoder().encode(none)
        #expect(!String(decoding: noneJSON, as: UTF8.self).contains("timeout"))
        #expect(try JSONDecoder().decode(RouteAction.self, from: noneJSON) == none)
    }

    @Test func olderPairFormStillLoads() throws {
        let cluster = ClusterConfig(
            name: "orders",
            endpoints: [Endpoint(address: SocketEndpoint(host: "127.0.0.1", port: 8080))],
            connectTimeout: .milliseconds(1500)
        )
        // What agents up to 0.2.0 wrote: Swift's own encoding of Duration.
        let pair = String(decoding: try JSONEncoder().encode(Duration.milliseconds(1500)), as: UTF8.self)
        let idle = String(decoding: try JSONEncoder().encode(Duration.seconds(60)), as: UTF8.self)
        let older = String(decoding: try JSONEncoder().encode(cluster), as: UTF8.self)
            .replacingOccurrences(of: "\"1.5s\"", with: pair)
            .replacingOccurrences(of: "\"60s\"", with: idle)
        #expect(older.contains(pair))
        #expect(try JSONDecoder().decode(ClusterConfig.self, from: Data(older.utf8)) == cluster)
    }

    @Test func badDurationTextIsRefusedByName() throws {
        let bad = #"{"clusters":[{"name":"orders","weight":1}],"timeout":"soon"}"#
        #expect {
            try JSONDecoder().decode(RouteAction.self, from: Data(bad.utf8))
        } throws: { error in
            "\(error)".contains("timeout") && "\(error)".contains("got 'soon'")
        }
    }
}
