public import SwiftProtobuf
import TrellisConfig
public import XDS

/// One xDS resource, packed, with its version: a digest of its bytes, so equal resources have
/// equal versions on every pilot and across restarts.
public struct XDSResource: Sendable, Hashable {
    /// A resource another one names: a route configuration, a cluster, an endpoint assignment.
    public struct Reference: Sendable, Hashable {
        public var typeURL: String
        public var name: String
        public init(_ typeURL: String, _ name: String) {
            self.typeURL = typeURL
            self.name = name
        }
    }

    public var name: String
    public var any: Google_Protobuf_Any
    public var version: String
    /// What this resource names, recorded by the translator as it builds it.
    public var references: [Reference]

    public init(name: String, message: some SwiftProtobuf.Message, references: [Reference] = []) throws {
        self.name = name
        self.references = references
        // Packed from its bytes: an `Any` made with `init(message:)` keeps the message and encodes
        // it again each time a response carrying it is serialized (once per node per push).
        var any = Google_Protobuf_Any()
        any.typeURL = "type.googleapis.com/\(type(of: message).protoMessageName)"
        any.value = try message.serializedBytes(partial: false)
        self.any = any
        var hash = FNV1a()
        hash.combine(any.typeURL.utf8)
        hash.combine(any.value)
        self.version = hash.hex
    }

    public init(name: String, any: Google_Protobuf_Any, references: [Reference] = []) {
        self.name = name
        self.references = references
        self.any = any
        var hash = FNV1a()
        hash.combine(any.typeURL.utf8)
        hash.combine(any.value)
        self.version = hash.hex
    }
}

/// The resources of one type a node is served, with the type's version (a digest of every
/// resource's name and version).
public struct TypeSnapshot: Sendable, Equatable {
    public var version: String
    public var resources: [String: XDSResource]

    public init(_ resources: [XDSResource]) {
        var byName: [String: XDSResource] = [:]
        byName.reserveCapacity(resources.count)
        for resource in resources { byName[resource.name] = resource }
        self.resources = byName
        version = Self.digest(byName.values)
    }

    /// `base` plus a node's own resources: the version is a digest of the base's version and
    /// what was added, so equal versions still mean equal contents, without rehashing the base.
    public init(base: TypeSnapshot, adding extra: [XDSResource]) {
        var byName = base.resources
        for resource in extra { byName[resource.name] = resource }
        resources = byName
        var hash = FNV1a()
        hash.combine(base.version)
        hash.combine(CollectionOfOne(1))
        hash.combine(Self.digest(extra))
        version = hash.hex
    }

    private static func digest(_ resources: some Collection<XDSResource>) -> String {
        var hash = FNV1a()
        for resource in resources.sorted(by: { $0.name < $1.name }) {
            hash.combine(resource.name)
            hash.combine(CollectionOfOne(0))
            hash.combine(resource.version)
            hash.combine(CollectionOfOne(0))
        }
        return hash.hex
    }

    public static let empty = TypeSnapshot([])

    public static func == (a: Self, b: Self) -> Bool { a.version == b.version }
}

/// Everything one node is served: a consistent set (every referenced cluster, route and endpoint
/// assignment exists) of the four types.
public struct NodeSnapshot: Sendable, Equatable {
    public var types: [String: TypeSnapshot]
    /// What a sidecar's node-specific types were built from (the shared bases' versions and its
    /// inbound listener's), so the next push can reuse them when only shared types changed. Not
    /// part of equality.
    var origin = ""

    public init(_ resources: [String: [XDSResource]]) {
        types = resources.mapValues(TypeSnapshot.init)
    }

    public init(types: [String: TypeSnapshot]) {
        self.types = types
    }

    public static func == (a: Self, b: Self) -> Bool { a.types == b.types }

    public static let empty = NodeSnapshot([:])

    public subscript(typeURL: String) -> TypeSnapshot { types[typeURL] ?? .empty }

    /// The references recorded by the translator that the snapshot cannot satisfy (the seed's
    /// `snapshot.Consistent()`); empty when the snapshot is consistent. Dictionary look-ups only.
    public func danglingReferences() -> [String] {
        var problems: [String] = []
        for (typeURL, snapshot) in types {
            for resource in snapshot.resources.values {
                for reference in resource.references where self[reference.typeURL].resources[reference.name] == nil {
                    problems.append(
                        "\(Self.kind(typeURL)) \(resource.name) names missing \(Self.kind(reference.typeURL)) \(reference.name)"
                    )
                }
            }
        }
        return problems.sorted()
    }

    static func kind(_ typeURL: String) -> String {
        switch typeURL {
        case TypeURL.listener: "listener"
        case TypeURL.routeConfiguration: "route configuration"
        case TypeURL.cluster: "cluster"
        case TypeURL.clusterLoadAssignment: "endpoint assignment"
        default: typeURL
        }
    }

    /// The same check made by decoding the resources themselves (listeners → route
    /// configurations, routes and TCP proxies → clusters, EDS clusters → endpoint assignments):
    /// slower, independent of what the translator recorded; tests use it to check the recording.
    public func danglingReferencesByDecoding() -> [String] {
        var problems: [String] = []
        let clusters = self[TypeURL.cluster].resources
        let routes = self[TypeURL.routeConfiguration].resources
        let assignments = self[TypeURL.clusterLoadAssignment].resources
        for (name, resource) in self[TypeURL.listener].resources {
            guard let listener = try? Envoy_Config_Listener_V3_Listener(unpackingAny: resource.any) else {
                problems.append("listener \(name) does not unpack")
                continue
            }
            var chains = listener.filterChains
            if listener.hasDefaultFilterChain { chains.append(listener.defaultFilterChain) }
            var managers: [Envoy_Extensions_Filters_Network_HttpConnectionManager_V3_HttpConnectionManager] = []
            if listener.hasApiListener,
                let hcm = try? Envoy_Extensions_Filters_Network_HttpConnectionManager_V3_HttpConnectionManager(
                    unpackingAny: listener.apiListener.apiListener
                )
            {
                managers.append(hcm)
            }
            for filter in chains.flatMap(\.filters) {
                if let hcm = try? Envoy_Extensions_Filters_Network_HttpConnectionManager_V3_HttpConnectionManager(
                    unpackingAny: filter.typedConfig
                ) {
                    managers.append(hcm)
                } else if let tcp = try? Envoy_Extensions_Filters_Network_TcpProxy_V3_TcpProxy(
                    unpackingAny: filter.typedConfig
                ),
                    clusters[tcp.cluster] == nil
                {
                    problems.append("listener \(name): TCP proxy to missing cluster \(tcp.cluster)")
                }
            }
            for hcm in managers {
                if case .rds(let rds)? = hcm.routeSpecifier, routes[rds.routeConfigName] == nil {
                    problems.append("listener \(name): missing route configuration \(rds.routeConfigName)")
                }
                if case .routeConfig(let inline)? = hcm.routeSpecifier {
                    problems += Self.missingClusters(inline, clusters, owner: "listener \(name)")
                }
            }
        }
        for (name, resource) in routes {
            guard let config = try? Envoy_Config_Route_V3_RouteConfiguration(unpackingAny: resource.any) else {
                problems.append("route configuration \(name) does not unpack")
                continue
            }
            problems += Self.missingClusters(config, clusters, owner: "route configuration \(name)")
        }
        for (name, resource) in clusters {
            guard let cluster = try? Envoy_Config_Cluster_V3_Cluster(unpackingAny: resource.any) else {
                problems.append("cluster \(name) does not unpack")
                continue
            }
            if case .type(.eds)? = cluster.clusterDiscoveryType, assignments[name] == nil {
                problems.append("cluster \(name): missing endpoint assignment")
            }
        }
        return problems.sorted()
    }

    private static func missingClusters(
        _ config: Envoy_Config_Route_V3_RouteConfiguration,
        _ clusters: [String: XDSResource],
        owner: String
    ) -> [String] {
        var problems: [String] = []
        for route in config.virtualHosts.flatMap(\.routes) {
            guard case .route? = route.action else { continue }
            var names: [String] = []
            switch route.route.clusterSpecifier {
            case .cluster(let name)?: names = [name]
            case .weightedClusters(let weighted)?: names = weighted.clusters.map(\.name)
            default: break
            }
            for name in names where clusters[name] == nil {
                problems.append("\(owner): route to missing cluster \(name)")
            }
        }
        return problems
    }
}
