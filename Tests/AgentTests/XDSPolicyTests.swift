import Foundation
import Logging
import NIOCore
import NIOPosix
import Pilot
import Proxy
import Testing
import TrellisPolicy
import TrellisTestSupport

@testable import Agent

/// mesh.yaml `policies:` through the real pilot and the agent's xDS client into the data path.
@Suite struct XDSPolicyTests {
    @Test func aPolicyInMeshYamlReachesTheAgentsDataPath() async throws {
        let dir = try Peers.temporaryDirectory("xds-policy")
        defer { try? FileManager.default.removeItem(at: dir) }
        let appPort = Peers.freePort()
        let app = try Peers.pythonHTTPServer(port: appPort, body: "orders-1", root: dir)
        try "ok".write(to: dir.appendingPathComponent("upstream-\(appPort)/healthz"), atomically: true, encoding: .utf8)
        defer { app.stop() }
        let mesh = try MeshConfigLoader.parse(yaml: MeshFixtures.policies, file: "mesh.yaml")
        try await PilotHarness.run(store: try SQLiteRegistryStore(), mesh: mesh) { pilot in
            let agent = try await AgentDataPath(pilot: pilot, node: "vm-a")
            let proxy = agent.proxy
            let outboundPort = agent.outboundPort
            _ = await pilot.register(
                #"{"service": "orders", "address": "127.0.0.1", "port": \#(appPort), "service_port": 8080, "node": "vm-b"}"#
            )
            #expect(
                await Peers.eventually(within: .seconds(5)) {
                    proxy.store.snapshot.config.clusters.contains {
                        $0.name == "outbound|8080||orders" && !$0.endpoints.isEmpty
                    }
                }
            )
            let config = proxy.store.snapshot.config
            let cluster = try #require(config.clusters.first { $0.name == "outbound|8080||orders" })
            #expect(cluster.connectTimeout == .milliseconds(250))
            #expect(cluster.loadBalancing == .ringHash(.header("x-user"), minimumRingSize: 2048))
            #expect(cluster.overprovisioningFactor == 200)
            #expect(cluster.circuitBreakers == CircuitBreakers(maxRequests: 50, maxRetries: 5))
            #expect(cluster.outlierDetection?.consecutiveErrors == 4)
            #expect(cluster.outlierDetection?.baseEjectionTime == .seconds(10))
            #expect(cluster.outlierDetection?.successRate?.requestVolume == 20)
            #expect(cluster.healthCheck?.kind == .http(path: "/healthz", host: nil, expectedStatuses: [200...204]))
            #expect(cluster.healthCheck?.interval == .seconds(2))
            let route = try #require(
                config.listeners.first { $0.name == "outbound" }?.portVirtualHosts[8080]?
                    .first { $0.domains.contains("orders") }?.routes.first
            )
            // The rules' matches as mesh.yaml wrote them (methods travel as a `:method` matcher).
            let routes = try #require(
                config.listeners.first { $0.name == "outbound" }?.portVirtualHosts[8080]?
                    .first { $0.domains.contains("orders") }?.routes
            )
            #expect(
                routes.map(\.match).prefix(2) == [
                    RouteMatch(
                        path: .prefix("/v2"),
                        methods: ["GET", "HEAD"],
                        headers: [HeaderMatch(name: "x-tenant", kind: .regex("t-[a-z]+"))]
                    ),
                    RouteMatch(path: .exact("/submit"), methods: ["POST"]),
                ]
            )
            #expect(route.action.timeout == .seconds(3))
            let retry = try #require(route.action.retryPolicy)
            #expect(retry.retryOn == [.connectFailure, .serverError, .unavailable])
            #expect(retry.numRetries == 2 && retry.perTryTimeout == .seconds(1))
            #expect(retry.backoffBase == .milliseconds(10) && retry.backoffMax == .milliseconds(100))
            #expect(retry.retryNonIdempotent)
            #expect(retry.budgetPercent == 30 && retry.minRetryConcurrency == 2)
            #expect(route.action.rateLimit == RateLimit(requestsPerSecond: 0.5, burst: 2))
            #expect(route.action.fault == FaultInjection(abortStatus: 418, abortPercent: 0.001))
            // The legacy server is up (asked directly, not through the agent and its rate limit).
            #expect(
                await Peers.eventually(within: .seconds(5)) {
                    await Peers.http("GET", "http://127.0.0.1:\(appPort)/healthz").status == 200
                }
            )
            // And the data path enforces it: two requests fit the bucket, the third is refused.
            let statuses = [
                await XDSClientTests.get(outboundPort, host: "orders:8080").status,
                await XDSClientTests.get(outboundPort, host: "orders:8080").status,
                await XDSClientTests.get(outboundPort, host: "orders:8080").status,
            ]
            #expect(statuses == [200, 200, 429], "\(statuses)")
            // Nothing was refused on the way.
            let sync = await pilot.server.sync.status(node: "vm-a")
            #expect(sync.values.allSatisfy { $0.lastNack == nil }, "\(sync)")
            await agent.stop()
        }
    }
}

/// A configuration the agent refuses, with the real pilot: the NACK and its reason show in
/// pilot's `/debug/syncz`, and the agent keeps serving what it had.
@Suite struct XDSRefusalTests {
    @Test func moreEndpointsThanTheAgentTakesAreNACKedAndTheOldConfigurationServes() async throws {
        let dir = try Peers.temporaryDirectory("xds-refusal")
        defer { try? FileManager.default.removeItem(at: dir) }
        let ports = [Peers.freePort(), Peers.freePort()]
        let apps = try ports.enumerated().map { i, port in
            try Peers.pythonHTTPServer(port: port, body: "orders-\(i + 1)", root: dir)
        }
        defer { for app in apps { app.stop() } }
        try await PilotHarness.run(store: try SQLiteRegistryStore()) { pilot in
            let agent = try await AgentDataPath(pilot: pilot, node: "vm-small", maxEndpoints: 2)
            let (client, outboundPort) = (agent.client, agent.outboundPort)
            func register(_ port: Int, _ node: String) async -> Int {
                await pilot.register(
                    #"{"service": "orders", "address": "127.0.0.1", "port": \#(port), "service_port": 8080, "node": "\#(node)"}"#
                )
            }
            #expect(await register(ports[0], "vm-b1") == 201)
            #expect(await register(ports[1], "vm-b2") == 201)
            var seen: Set<String> = []
            #expect(
                await Peers.eventually(within: .seconds(10)) {
                    seen.insert(await XDSClientTests.get(outboundPort, host: "orders:8080").body)
                    return seen.isSuperset(of: ["orders-1", "orders-2"])
                },
                "\(seen) \(client.current)"
            )
            let applied = client.current.appliedVersion
            // A third instance: three endpoints, above the agent's two.
            #expect(await register(Peers.freePort(), "vm-b3") == 201)
            #expect(
                await Peers.eventually(within: .seconds(10)) {
                    await Peers.http("GET", "\(pilot.api)/debug/syncz").body.contains("above this agent's limit of 2")
                }
            )
            let syncz = await Peers.http("GET", "\(pilot.api)/debug/syncz").body
            #expect(syncz.contains("vm-small") && syncz.contains("pilot.max_endpoints in agent.yaml"), "\(syncz)")
            #expect(
                client.current.lastNACK?.contains("3 endpoints in all") == true,
                "\(String(describing: client.current.lastNACK))"
            )
            #expect(client.current.appliedVersion == applied, "nothing of it applied")
            // Still served from the configuration it had: only the first two instances answer.
            for _ in 0..<6 {
                let body = await XDSClientTests.get(outboundPort, host: "orders:8080").body
                #expect(body == "orders-1" || body == "orders-2", "\(body)")
            }
            await agent.stop()
        }
    }
}
