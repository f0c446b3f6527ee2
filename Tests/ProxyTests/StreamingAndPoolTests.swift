import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import Testing
import TrellisTestSupport

@testable import Proxy

/// Bodies are streamed, not buffered; upstream connections are pooled per loop within limits.
@Suite struct StreamingAndPoolTests {
    let group = MultiThreadedEventLoopGroup.singleton

    private static func residentBytes() -> Int { Peers.residentBytes() }

    @Test func aLargeUploadIsStreamedThroughWithFlatMemory() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        let proxy = try await ProxyHarness.start(
            gatewayConfig(
                virtualHosts: catchAll("alpha", timeout: .seconds(60)),
                clusters: [ClusterConfig(name: "alpha", endpoints: [endpoint(a)])]
            ),
            group: group
        )
        let raw = try await RawClient.connect(port: proxy.port, group: group)
        let total = 256 * 1024 * 1024
        let chunk = ByteBuffer(repeating: UInt8(ascii: "z"), count: 256 * 1024)
        try await raw.send("POST /count HTTP/1.1\r\nhost: a\r\ncontent-length: \(total)\r\n\r\n")
        // Prime allocator caches, then measure what the rest of the upload adds.
        for _ in 0..<16 { try await raw.send(chunk) }
        let before = Self.residentBytes()
        var peak = before
        for i in 16..<(total / chunk.readableBytes) {
            try await raw.send(chunk)
            if i % 64 == 0 { peak = max(peak, Self.residentBytes()) }
        }
        let text = try await raw.readUntil("\r\n\r\n\(total)")
        #expect(text.hasPrefix("HTTP/1.1 200 OK"))
        #expect(text.hasSuffix("\r\n\r\n\(total)"), "upstream counted: \(text.suffix(20))")
        // 256 MiB went through; the process (client, proxy and upstream together) grew far less.
        #expect(peak - before < 48 * 1024 * 1024, "RSS grew by \((peak - before) / 1024 / 1024) MiB")
        await raw.close()
        await proxy.stop()
        await a.stop()
    }

    @Test func aLargeResponseIsStreamedToASlowReaderWithFlatMemory() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        let proxy = try await ProxyHarness.start(
            gatewayConfig(
                virtualHosts: catchAll("alpha", timeout: .seconds(60)),
                clusters: [ClusterConfig(name: "alpha", endpoints: [endpoint(a)])]
            ),
            group: group
        )
        let total = 128 * 1024 * 1024
        let before = Self.residentBytes()
        let counter = try await ByteCounter.get(port: proxy.port, path: "/bytes/\(total)", group: group)
        // A slow reader: the proxy must stop reading from the upstream rather than buffer.
        var peak = before
        let deadline = ContinuousClock.now + .seconds(60)
        while try await counter.count() < total + 1 && ContinuousClock.now < deadline {
            try await counter.readSome()
            peak = max(peak, Self.residentBytes())
        }
        #expect(try await counter.bodyBytes() == total)
        #expect(peak - before < 48 * 1024 * 1024, "RSS grew by \((peak - before) / 1024 / 1024) MiB")
        await counter.close()
        await proxy.stop()
        await a.stop()
    }

    @Test func connectionsAreRetiredAfterMaxRequests() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        let proxy = try await ProxyHarness.start(
            gatewayConfig(
                virtualHosts: catchAll("alpha"),
                clusters: [
                    ClusterConfig(
                        name: "alpha",
                        endpoints: [endpoint(a)],
                        pool: PoolSettings(maxRequestsPerConnection: 2)
                    )
                ]
            ),
            group: group
        )
        let client = try await TestHTTPClient.connect(port: proxy.port, group: group)
        for _ in 0..<6 { #expect(try await client.request(.GET, "/").status == .ok) }
        #expect(a.connections == 3)
        await client.close()
        await proxy.stop()
        await a.stop()
    }

    @Test func idlePooledConnectionsExpire() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        let proxy = try await ProxyHarness.start(
            gatewayConfig(
                virtualHosts: catchAll("alpha"),
                clusters: [
                    ClusterConfig(
                        name: "alpha",
                        endpoints: [endpoint(a)],
                        pool: PoolSettings(idleTimeout: .milliseconds(1500))
                    )
                ]
            ),
            group: group
        )
        let client = try await TestHTTPClient.connect(port: proxy.port, group: group)
        #expect(try await client.request(.GET, "/").status == .ok)
        #expect(try await client.request(.GET, "/").status == .ok)
        #expect(a.connections == 1)
        try await Task.sleep(for: .milliseconds(2000))
        #expect(try await client.request(.GET, "/").status == .ok)
        #expect(a.connections == 2)
        await client.close()
        await proxy.stop()
        await a.stop()
    }

    @Test func zeroIdleConnectionsMeansNoReuse() async throws {
        let a = try await TestUpstream.start(name: "alpha", group: group)
        let proxy = try await ProxyHarness.start(
            gatewayConfig(
                virtualHosts: catchAll("alpha"),
                clusters: [
                    ClusterConfig(name: "alpha", endpoints: [endpoint(a)], pool: PoolSettings(maxIdlePerEndpoint: 0))
                ]
            ),
            group: group
        )
        let client = try await TestHTTPClient.connect(port: proxy.port, group: group)
        for _ in 0..<3 { #expect(try await client.request(.GET, "/").status == .ok) }
        #expect(a.connections == 3)
        await client.close()
        await proxy.stop()
        await a.stop()
    }
}
