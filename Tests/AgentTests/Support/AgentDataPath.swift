import Foundation
import Logging
import NIOCore
import NIOPosix
import Proxy
import TrellisPolicy
import TrellisTestSupport

@testable import Agent

/// The agent's data path fed by a running pilot, in the test process: its outbound listener on a
/// loopback port (every connection taken as going to port 8080) and its xDS client. Requests are
/// sent with curl, `Host` naming the service.
final class AgentDataPath: Sendable {
    let proxy: ProxyServer
    let client: XDSClient
    let outboundPort: Int
    private let group: MultiThreadedEventLoopGroup
    private let running: Task<Void, any Error>

    convenience init(
        pilot: PilotHarness,
        node: String = "vm-client",
        locality: Locality = Locality(),
        xdsProtocol: XDSClient.XDSProtocol = .delta,
        maxEndpoints: Int = XDSClient.defaultMaxEndpoints
    ) async throws {
        try await self.init(
            xdsPort: pilot.xdsPort,
            node: node,
            locality: locality,
            xdsProtocol: xdsProtocol,
            maxEndpoints: maxEndpoints
        )
    }

    /// `xdsPort`: pilot's on loopback (it need not be running yet). `persistPath`: where the
    /// client saves the last configuration and reads it back at start.
    init(
        xdsPort: Int,
        node: String = "vm-client",
        locality: Locality = Locality(),
        xdsProtocol: XDSClient.XDSProtocol = .delta,
        maxEndpoints: Int = XDSClient.defaultMaxEndpoints,
        persistPath: String? = nil
    ) async throws {
        outboundPort = Peers.freePort()
        let stats = ProxyStats()
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let base = XDSClientTests.base(outboundPort: outboundPort)
        let proxy = try ProxyServer(
            snapshot: try ProxySnapshot(base, stats: stats),
            stats: stats,
            group: group,
            originalDestination: { _ in try? SocketAddress(ipAddress: "127.0.0.1", port: 8080) },
            logger: .quiet
        )
        self.proxy = proxy
        try await proxy.start()
        let client = XDSClient(
            pilots: [HostPort(host: "127.0.0.1", port: xdsPort)],
            node: node,
            base: base,
            persistPath: persistPath,
            protocol: xdsProtocol,
            maxEndpoints: maxEndpoints,
            locality: locality,
            logger: .quiet
        ) { config in try await proxy.apply(try ProxySnapshot(config, stats: stats)) }
        self.client = client
        running = Task { try await client.run() }
    }

    /// The cluster of the current configuration named `name`.
    func cluster(_ name: String) -> ClusterConfig? {
        proxy.store.snapshot.config.clusters.first { $0.name == name }
    }

    /// The bodies of `count` requests for `/hello` to `host` on one keep-alive connection (curl's
    /// URL range), concatenated; `headers` as curl's `-H` values; `parallel` connections at once.
    func get(_ count: Int, host: String, headers: [String] = [], parallel: Int = 1) async -> String {
        var arguments = ["curl", "-s", "-H", "Host: \(host)"] + headers.flatMap { ["-H", $0] }
        if parallel > 1 { arguments += ["--parallel", "--parallel-max", "\(parallel)"] }
        arguments.append("http://127.0.0.1:\(outboundPort)/hello?n=[1-\(count)]")
        return await Peers.command(arguments).stdout
    }

    /// Stops the xDS client (waiting for it to finish) and the proxy.
    func stop() async {
        running.cancel()
        _ = await running.result
        await proxy.shutdown()
        try? await group.shutdownGracefully()
    }
}
