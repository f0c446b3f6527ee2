import Logging
import SwiftProtobuf
import Testing
import TrellisPolicy
import TrellisTestSupport
import XDS

@testable import Pilot

/// Translation per role: what each node kind is served, decoded back from the packed resources.
struct TranslatorTests {
    static func instance(
        _ service: String,
        _ address: String,
        _ port: Int,
        node: String = "vm-a",
        protocol p: ServiceProtocol = .http,
        zone: String = "",
        status: InstanceStatus = .healthy
    ) -> Instance {
        Instance(
            key: InstanceKey(service: service, address: address, port: port),
            serviceProtocol: p,
            node: node,
            locality: Locality(region: "r1", zone: zone),
            status: status
        )
    }

    static func view(_ instances: [Instance], mesh: MeshConfig = .empty) async throws -> RegistryView {
        let registry = try await Registry(store: try SQLiteRegistryStore(), logger: .quiet)
        try await registry.applyMesh(mesh)
        for instance in instances {
            _ = try await registry.register(.init(instance: instance, ttl: .seconds(30)))
        }
        return await registry.view()
    }

    static func decode<M: SwiftProtobuf.Message>(
        _ type: M.Type,
        _ snapshot: NodeSnapshot,
        _ typeURL: String,
        _ name: String
    ) throws -> M {
        let resource = try #require(snapshot[typeURL].resources[name], "\(name) missing from \(typeURL)")
        return try M(unpackingAny: resource.any)
    }

    @Test func sidecarGetsVirtualListenersPerPortRoutesAndItsOwnInboundListener() async throws {
        let view = try await Self.view([
            Self.instance("orders", "10.0.0.1", 8080, node: "vm-a"),
            Self.instance("orders", "10.0.0.2", 8080, node: "vm-b", status: .draining),
            Self.instance("billing", "10.0.0.3", 9000, node: "vm-b", protocol: .tcp),
        ])
        let shared = try Translator.shared(view)
        let snapshot = try Translator.snapshot(for: NodeInfo(id: "vm-a", role: .sidecar), shared: shared)
        #expect(snapshot.danglingReferences().isEmpty)
        #expect(snapshot.danglingReferencesByDecoding().isEmpty)

        let outbound = try Self.decode(
            Envoy_Config_Listener_V3_Listener.self,
            snapshot,
            TypeURL.listener,
            "virtualOutbound"
        )
        #expect(outbound.address.socketAddress.portValue == 15001)
        #expect(outbound.useOriginalDst.value)
        let http = try Self.decode(Envoy_Config_Listener_V3_Listener.self, snapshot, TypeURL.listener, "0.0.0.0_8080")
        #expect(http.bindToPort.value == false)
        let routes = try Self.decode(
            Envoy_Config_Route_V3_RouteConfiguration.self,
            snapshot,
            TypeURL.routeConfiguration,
            "8080"
        )
        #expect(routes.virtualHosts.map(\.name) == ["orders:8080", "allow_any"])
        #expect(routes.virtualHosts[0].domains == ["orders", "orders:8080"])
        #expect(routes.virtualHosts[0].routes.last?.route.cluster == "outbound|8080||orders")
        #expect(routes.virtualHosts[1].routes[0].route.cluster == Translator.passthroughCluster)

        // TCP: matched by the instances' addresses, tunnelled to the cluster.
        let tcp = try Self.decode(Envoy_Config_Listener_V3_Listener.self, snapshot, TypeURL.listener, "0.0.0.0_9000")
        #expect(tcp.filterChains.first?.filterChainMatch.prefixRanges.map(\.addressPrefix) == ["10.0.0.3"])

        // Inbound: vm-a's own instance only, sent to 127.0.0.1 from 127.0.0.6.
        let inbound = try Self.decode(
            Envoy_Config_Listener_V3_Listener.self,
            snapshot,
            TypeURL.listener,
            "virtualInbound"
        )
        #expect(inbound.address.socketAddress.portValue == 15006)
        #expect(inbound.filterChains.map(\.filterChainMatch.destinationPort.value) == [8080])
        #expect(inbound.listenerFilters.map(\.name) == ["envoy.filters.listener.original_dst"])
        let local = try Self.decode(Envoy_Config_Cluster_V3_Cluster.self, snapshot, TypeURL.cluster, "inbound|8080||")
        #expect(local.loadAssignment.endpoints[0].lbEndpoints[0].endpoint.address.socketAddress.address == "127.0.0.1")
        #expect(local.upstreamBindConfig.sourceAddress.address == "127.0.0.6")

        // EDS: the draining instance is marked DRAINING.
        let assignment = try Self.decode(
            Envoy_Config_Endpoint_V3_ClusterLoadAssignment.self,
            snapshot,
            TypeURL.clusterLoadAssignment,
            "outbound|8080||orders"
        )
        let endpoints = assignment.endpoints.flatMap(\.lbEndpoints)
        #expect(endpoints.map(\.endpoint.address.socketAddress.address) == ["10.0.0.1", "10.0.0.2"])
        #expect(endpoints.map(\.healthStatus) == [.healthy, .draining])

        // vm-b's inbound listener has its own ports, not vm-a's.
        let other = try Translator.snapshot(for: NodeInfo(id: "vm-b", role: .sidecar), shared: shared)
        let otherInbound = try Self.decode(
            Envoy_Config_Listener_V3_Listener.self,
            other,
            TypeURL.listener,
            "virtualInbound"
        )
        #expect(Set(otherInbound.filterChains.map(\.filterChainMatch.destinationPort.value)) == [8080, 9000])
    }

    @Test func proxylessGRPCGetsAPIListenersAndEndpointsWithLocalities() async throws {
        let view = try await Self.view([
            Self.instance("greeter", "10.0.0.1", 50051, protocol: .grpc, zone: "z1"),
            Self.instance("greeter", "10.0.0.2", 50051, node: "vm-b", protocol: .grpc, zone: "z2", status: .unhealthy),
            Self.instance("web", "10.0.0.3", 8080),
        ])
        let snapshot = try Translator.snapshot(
            for: NodeInfo(id: "client", role: .proxyless),
            shared: try Translator.shared(view)
        )
        #expect(snapshot.danglingReferencesByDecoding().isEmpty)
        #expect(snapshot[TypeURL.listener].resources.keys.sorted() == ["greeter:50051"])
        let listener = try Self.decode(
            Envoy_Config_Listener_V3_Listener.self,
            snapshot,
            TypeURL.listener,
            "greeter:50051"
        )
        let hcm = try Envoy_Extensions_Filters_Network_HttpConnectionManager_V3_HttpConnectionManager(
            unpackingAny: listener.apiListener.apiListener
        )
        #expect(hcm.rds.routeConfigName == "greeter:50051")
        #expect(hcm.httpFilters.last?.name == "envoy.filters.http.router")
        let assignment = try Self.decode(
            Envoy_Config_Endpoint_V3_ClusterLoadAssignment.self,
            snapshot,
            TypeURL.clusterLoadAssignment,
            "outbound|50051||greeter"
        )
        #expect(assignment.endpoints.map(\.locality.zone) == ["z1", "z2"])
        #expect(assignment.endpoints.allSatisfy { $0.hasLocality && $0.loadBalancingWeight.value > 0 })
        #expect(assignment.endpoints[1].lbEndpoints[0].healthStatus == .unhealthy)
        // HTTP services are not served to gRPC clients.
        #expect(snapshot[TypeURL.cluster].resources.keys.sorted() == ["outbound|50051||greeter"])
    }

    @Test func gatewayRoutesByHostPathAndHeaderInFileOrder() async throws {
        let yaml = """
            services:
              - {name: orders, port: 8080}
              - {name: web, port: 8080}
            gateways:
              - name: edge
                listeners:
                  - port: 8000
                    routes:
                      - hosts: ["*.example.com"]
                        match: {prefix: /orders, headers: [{name: X-Canary, exact: "1"}]}
                        to: [{service: orders:8080, weight: 90}, {service: web:8080, weight: 10}]
                      - hosts: [api.example.com]
                        match: {prefix: /orders}
                        to: orders:8080
                        timeout: 2s
                      - to: web:8080
            """
        let mesh = try MeshConfigLoader.parse(yaml: yaml, file: "mesh.yaml")
        let view = try await Self.view([Self.instance("orders", "10.0.0.1", 8080)], mesh: mesh)
        let shared = try Translator.shared(view)
        let snapshot = try Translator.snapshot(for: NodeInfo(id: "gw", role: .gateway("edge")), shared: shared)
        #expect(snapshot.danglingReferencesByDecoding().isEmpty)
        let listener = try Self.decode(
            Envoy_Config_Listener_V3_Listener.self,
            snapshot,
            TypeURL.listener,
            "gateway_edge_8000"
        )
        #expect(listener.address.socketAddress.portValue == 8000)
        #expect(!listener.hasBindToPort || listener.bindToPort.value)
        let routes = try Self.decode(
            Envoy_Config_Route_V3_RouteConfiguration.self,
            snapshot,
            TypeURL.routeConfiguration,
            "gateway|edge|8000"
        )
        let byDomain = Dictionary(uniqueKeysWithValues: routes.virtualHosts.map { ($0.domains[0], $0.routes) })
        #expect(Set(byDomain.keys) == ["*.example.com", "api.example.com", "*"])
        #expect(byDomain["api.example.com"]?.map(\.name) == ["route-0", "route-1", "route-2"])
        #expect(byDomain["*.example.com"]?.map(\.name) == ["route-0", "route-2"])
        #expect(byDomain["*"]?.map(\.name) == ["route-2"])
        let canary = byDomain["api.example.com"]![0]
        #expect(canary.match.headers[0].name == "x-canary")
        #expect(canary.route.weightedClusters.clusters.map(\.weight.value) == [90, 10])
        #expect(byDomain["api.example.com"]![1].route.timeout.seconds == 2)
        #expect(!byDomain["api.example.com"]![1].route.hasRetryPolicy, "no policy for orders here")
        // A gateway that mesh.yaml does not declare gets no listeners (and no dangling reference).
        let unknown = try Translator.snapshot(for: NodeInfo(id: "gw2", role: .gateway("nope")), shared: shared)
        #expect(unknown[TypeURL.listener].resources.isEmpty)
    }

    @Test func resourceVersionsAreDigestsSoAnUnchangedViewChangesNothing() async throws {
        let a = try await Translator.shared(try await Self.view([Self.instance("orders", "10.0.0.1", 8080)]))
        let b = try await Translator.shared(try await Self.view([Self.instance("orders", "10.0.0.1", 8080)]))
        let node = NodeInfo(id: "vm-x", role: .sidecar)
        #expect(try Translator.snapshot(for: node, shared: a) == Translator.snapshot(for: node, shared: b))
        let c = try await Translator.shared(
            try await Self.view([Self.instance("orders", "10.0.0.1", 8080), Self.instance("orders", "10.0.0.9", 8080)])
        )
        let changed = try Translator.snapshot(for: node, shared: c)
        let before = try Translator.snapshot(for: node, shared: a)
        // Only the endpoint assignment changed.
        #expect(changed[TypeURL.clusterLoadAssignment].version != before[TypeURL.clusterLoadAssignment].version)
        #expect(changed[TypeURL.cluster].version == before[TypeURL.cluster].version)
        #expect(changed[TypeURL.listener].version == before[TypeURL.listener].version)
    }

    @Test func nodeRoleComesFromMetadataOrTheUserAgent() async throws {
        var node = Envoy_Config_Core_V3_Node()
        node.id = "gw-1"
        node.metadata.fields[NodeInfo.roleKey] = Google_Protobuf_Value(stringValue: "gateway")
        #expect(throws: NodeInfo.Invalid.self) { try NodeInfo(node) }
        node.metadata.fields[NodeInfo.gatewayKey] = Google_Protobuf_Value(stringValue: "edge")
        #expect(try NodeInfo(node).role == .gateway("edge"))
        var grpc = Envoy_Config_Core_V3_Node()
        grpc.id = "client-1"
        grpc.userAgentName = "gRPC Python"
        #expect(try NodeInfo(grpc).role == .proxyless)
        grpc.metadata.fields[NodeInfo.roleKey] = Google_Protobuf_Value(stringValue: "mesh-thing")
        #expect(throws: NodeInfo.Invalid.self) { try NodeInfo(grpc) }
        #expect(throws: NodeInfo.Invalid.self) { try NodeInfo(Envoy_Config_Core_V3_Node()) }
    }

    /// A service's policy goes on every route to it, the gateways' too; its cluster carries the
    /// cluster part for everyone.
    @Test func subsetsAreClustersOfTheirLabelledInstancesAndRoutesSplitOverThem() async throws {
        let yaml = """
            services:
              - name: orders
                port: 8080
                subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2, track: canary}}]
            routes:
              - service: orders:8080
                rules:
                  - to: [{service: orders:8080, subset: v1, weight: 90}, {service: orders:8080, subset: v2, weight: 10}]
            policies:
              - {service: orders:8080, lb_policy: least_request}
            """
        let mesh = try MeshConfigLoader.parse(yaml: yaml, file: "mesh.yaml")
        var v1 = Self.instance("orders", "10.0.0.1", 8080)
        v1.labels = ["version": "v1"]
        var v2 = Self.instance("orders", "10.0.0.2", 8080)
        v2.labels = ["version": "v2", "track": "canary"]
        var v2Only = Self.instance("orders", "10.0.0.3", 8080)
        v2Only.labels = ["version": "v2"]  // not on the canary track: in no subset but the whole service
        let view = try await Self.view([v1, v2, v2Only], mesh: mesh)
        let sidecar = try Translator.snapshot(
            for: NodeInfo(id: "vm-z", role: .sidecar),
            shared: try Translator.shared(view)
        )
        func addresses(_ name: String) throws -> [String] {
            try Self.decode(
                Envoy_Config_Endpoint_V3_ClusterLoadAssignment.self,
                sidecar,
                TypeURL.clusterLoadAssignment,
                name
            )
            .endpoints.flatMap(\.lbEndpoints).map(\.endpoint.address.socketAddress.address).sorted()
        }
        #expect(try addresses("outbound|8080||orders") == ["10.0.0.1", "10.0.0.2", "10.0.0.3"])
        #expect(try addresses("outbound|8080|v1|orders") == ["10.0.0.1"])
        #expect(try addresses("outbound|8080|v2|orders") == ["10.0.0.2"])
        // The subset's cluster has the service's policy.
        let cluster = try Self.decode(
            Envoy_Config_Cluster_V3_Cluster.self,
            sidecar,
            TypeURL.cluster,
            "outbound|8080|v2|orders"
        )
        #expect(cluster.lbPolicy == .leastRequest && cluster.type == .eds)
        let route = try #require(
            try Self.decode(Envoy_Config_Route_V3_RouteConfiguration.self, sidecar, TypeURL.routeConfiguration, "8080")
                .virtualHosts.first { $0.domains.contains("orders") }?.routes.first
        )
        #expect(
            route.route.weightedClusters.clusters.map(\.name) == ["outbound|8080|v1|orders", "outbound|8080|v2|orders"]
        )
        #expect(route.route.weightedClusters.clusters.map(\.weight.value) == [90, 10])
        #expect(sidecar.danglingReferences().isEmpty)
    }

    @Test func aNodeWithALocalityGetsItsZoneFirstThenItsRegionThenTheRest() async throws {
        let mesh = try MeshConfigLoader.parse(yaml: "services:\n  - {name: orders, port: 8080}\n", file: "mesh.yaml")
        var far = Self.instance("orders", "10.0.0.3", 8080, zone: "z3")
        far.locality = Locality(region: "r2", zone: "z3")
        let view = try await Self.view(
            [
                Self.instance("orders", "10.0.0.1", 8080, zone: "z1"),
                Self.instance("orders", "10.0.0.2", 8080, zone: "z2"), far,
            ],
            mesh: mesh
        )
        let shared = try Translator.shared(view)
        func priorities(_ locality: Locality, role: NodeRole = .sidecar) throws -> [String: UInt32] {
            let node = try Translator.snapshot(
                for: NodeInfo(id: "vm-x", role: role, locality: locality),
                shared: shared
            )
            let assignment = try Self.decode(
                Envoy_Config_Endpoint_V3_ClusterLoadAssignment.self,
                node,
                TypeURL.clusterLoadAssignment,
                "outbound|8080||orders"
            )
            var out: [String: UInt32] = [:]
            for group in assignment.endpoints { out[group.locality.zone] = group.priority }
            return out
        }
        #expect(try priorities(Locality(region: "r1", zone: "z2")) == ["z2": 0, "z1": 1, "z3": 2])
        #expect(try priorities(Locality(region: "r2", zone: "z3")) == ["z3": 0, "z1": 1, "z2": 1])
        // Nothing in the client's zone: its region first, numbered without a gap.
        #expect(try priorities(Locality(region: "r1", zone: "z9")) == ["z1": 0, "z2": 0, "z3": 1])
        #expect(try priorities(Locality()) == ["z1": 0, "z2": 0, "z3": 0], "no locality: one priority")
        #expect(try priorities(Locality(region: "r1", zone: "z2"), role: .gateway("edge"))["z1"] == 1)
    }

    @Test func aServicePolicyReachesSidecarAndGatewayRoutesAndTheCluster() async throws {
        let yaml =
            MeshFixtures.policies + """

                gateways:
                  - name: edge
                    listeners:
                      - port: 8000
                        routes:
                          - {match: {prefix: /orders}, to: orders:8080}
                """
        let mesh = try MeshConfigLoader.parse(yaml: yaml, file: "mesh.yaml")
        let view = try await Self.view([Self.instance("orders", "10.0.0.1", 8080)], mesh: mesh)
        let shared = try Translator.shared(view)
        let gateway = try Translator.snapshot(for: NodeInfo(id: "gw", role: .gateway("edge")), shared: shared)
        let sidecar = try Translator.snapshot(for: NodeInfo(id: "vm-z", role: .sidecar), shared: shared)
        let gatewayRoute = try Self.decode(
            Envoy_Config_Route_V3_RouteConfiguration.self,
            gateway,
            TypeURL.routeConfiguration,
            "gateway|edge|8000"
        ).virtualHosts[0].routes[0]
        let sidecarRoute = try #require(
            try Self.decode(Envoy_Config_Route_V3_RouteConfiguration.self, sidecar, TypeURL.routeConfiguration, "8080")
                .virtualHosts.first { $0.domains.contains("orders") }?.routes.last
        )
        for route in [gatewayRoute, sidecarRoute] {
            #expect(route.route.retryPolicy.retryOn == "connect-failure,5xx,unavailable")
            #expect(route.route.retryPolicy.numRetries.value == 2)
            #expect(route.route.timeout.seconds == 3)
            #expect(Set(route.typedPerFilterConfig.keys) == [ServicePolicy.rateLimitFilter, ServicePolicy.faultFilter])
            #expect(route.metadata.filterMetadata["trellis"]?.fields["retry_non_idempotent"]?.boolValue == true)
        }
        let limit = try Envoy_Extensions_Filters_Http_LocalRatelimit_V3_LocalRateLimit(
            unpackingAny: gatewayRoute.typedPerFilterConfig[ServicePolicy.rateLimitFilter]!
        )
        // 0.5 requests per second: one token every 2 s, a bucket of 2.
        #expect(limit.tokenBucket.maxTokens == 2 && limit.tokenBucket.tokensPerFill.value == 1)
        #expect(limit.tokenBucket.fillInterval.seconds == 2)
        let listener = try Self.decode(
            Envoy_Config_Listener_V3_Listener.self,
            gateway,
            TypeURL.listener,
            "gateway_edge_8000"
        )
        let manager = try Envoy_Extensions_Filters_Network_HttpConnectionManager_V3_HttpConnectionManager(
            unpackingAny: listener.filterChains[0].filters[0].typedConfig
        )
        #expect(
            manager.httpFilters.map(\.name) == [
                ServicePolicy.rateLimitFilter, ServicePolicy.faultFilter, "envoy.filters.http.router",
            ]
        )
        let cluster = try Self.decode(
            Envoy_Config_Cluster_V3_Cluster.self,
            gateway,
            TypeURL.cluster,
            "outbound|8080||orders"
        )
        #expect(cluster.connectTimeout.nanos == 250_000_000 && cluster.connectTimeout.seconds == 0)
        #expect(cluster.circuitBreakers.thresholds[0].maxRequests.value == 50)
        #expect(cluster.circuitBreakers.thresholds[0].retryBudget.budgetPercent.value == 30)
        #expect(cluster.outlierDetection.consecutive5Xx.value == 4)
        #expect(cluster.outlierDetection.successRateRequestVolume.value == 20)
        #expect(cluster.healthChecks[0].httpHealthCheck.expectedStatuses.map { [$0.start, $0.end] } == [[200, 205]])
    }
}
