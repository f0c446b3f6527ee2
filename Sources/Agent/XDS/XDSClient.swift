import FoundationEssentials
import GRPCCore
import GRPCNIOTransportHTTP2
public import Logging
public import Proxy
public import ServiceLifecycle
import SwiftProtobuf
import Synchronization
import XDS

/// The agent's xDS client: one incremental (Delta) ADS stream to pilot as a `sidecar` node.
/// Subscribes to every listener and cluster, then to the route configurations and EDS
/// assignments they name; turns the resources into a ``ProxyConfig`` (``XDSTranslator``) and
/// applies it through `apply` once everything referred to has arrived. A response that cannot be
/// translated is NACKed with the reason and nothing of it is kept: the last good configuration
/// keeps serving. A broken stream is re-opened after a jittered exponential back-off (0.5 s to
/// 30 s), subscribing again from scratch; pilot sends the current state.
public final class XDSClient: Service, Sendable {
    public typealias Apply = @Sendable (ProxyConfig) async throws -> Void

    /// What `status` shows about the control plane connection.
    public struct State: Sendable, Codable, Equatable {
        public var pilot: String
        /// `connecting`, `connected`, `disconnected: <why>`.
        public var connection = "connecting"
        public var appliedVersion: String?
        /// Last `system_version_info` per type URL (short names: lds, rds, cds, eds).
        public var versions: [String: String] = [:]
        public var lastNACK: String?
        public var updatesApplied = 0
        public var nacks = 0

        enum CodingKeys: String, CodingKey {
            case pilot, connection, appliedVersion = "applied_version", versions, lastNACK = "last_nack"
            case updatesApplied = "updates_applied", nacks
        }
    }

    private let host: String
    private let port: Int
    private let node: String
    private let base: ProxyConfig
    private let apply: Apply
    private let logger: Logger
    private let state: Mutex<State>

    public init(
        pilot host: String,
        port: Int,
        node: String,
        base: ProxyConfig,
        logger: Logger,
        apply: @escaping Apply
    ) {
        self.host = host
        self.port = port
        self.node = node
        self.base = base
        self.apply = apply
        self.logger = logger
        self.state = Mutex(State(pilot: host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"))
    }

    public var current: State { state.withLock { $0 } }

    static func short(_ typeURL: String) -> String {
        switch typeURL {
        case TypeURL.listener: "lds"
        case TypeURL.routeConfiguration: "rds"
        case TypeURL.cluster: "cds"
        case TypeURL.clusterLoadAssignment: "eds"
        default: typeURL
        }
    }

    public func run() async throws {
        await cancelWhenGracefulShutdown { await self.runUntilCancelled() }
    }

    private func runUntilCancelled() async {
        var backoff: Duration = .milliseconds(500)
        while !Task.isCancelled {
            let started = ContinuousClock.now
            do {
                let target: ResolvableTargets.IPv4OrDNS = Self.target(host: host, port: port)
                let transport = try HTTP2ClientTransport.Posix(target: target.resolvable, transportSecurity: .plaintext)
                try await withGRPCClient(transport: transport) { client in
                    let ads = Envoy_Service_Discovery_V3_AggregatedDiscoveryService.Client(wrapping: client)
                    try await self.stream(ads)
                }
                state.withLock { $0.connection = "disconnected: pilot closed the stream" }
            } catch {
                if Task.isCancelled { return }
                state.withLock { $0.connection = "disconnected: \(error)" }
                logger.warning("xDS stream to pilot failed; retrying", metadata: ["error": "\(error)"])
            }
            // A stream that lived a while starts the back-off over.
            if ContinuousClock.now - started > .seconds(30) { backoff = .milliseconds(500) }
            let jittered = backoff * Double.random(in: 0.5...1.0)
            try? await Task.sleep(for: jittered)
            backoff = min(backoff * 2, .seconds(30))
        }
    }

    enum ResolvableTargets {
        struct IPv4OrDNS {
            let resolvable: any ResolvableTarget
        }
    }

    static func target(host: String, port: Int) -> ResolvableTargets.IPv4OrDNS {
        if host.contains(":") { return .init(resolvable: .ipv6(address: host, port: port)) }
        if host.split(separator: ".").count == 4, host.allSatisfy({ $0.isNumber || $0 == "." }) {
            return .init(resolvable: .ipv4(address: host, port: port))
        }
        return .init(resolvable: .dns(host: host, port: port))
    }

    private var envoyNode: Envoy_Config_Core_V3_Node {
        var n = Envoy_Config_Core_V3_Node()
        n.id = node
        n.cluster = "trellis"
        n.userAgentName = "trellis-agent"
        n.metadata.fields["trellis.role"] = Google_Protobuf_Value(stringValue: "sidecar")
        return n
    }

    private func stream(
        _ ads: Envoy_Service_Discovery_V3_AggregatedDiscoveryService.Client<HTTP2ClientTransport.Posix>
    ) async throws {
        let (requests, sink) = AsyncStream<Envoy_Service_Discovery_V3_DeltaDiscoveryRequest>.makeStream()
        let node = envoyNode
        @Sendable func request(
            _ type: String,
            subscribe: [String] = [],
            unsubscribe: [String] = [],
            nonce: String = "",
            error: String? = nil
        ) -> Envoy_Service_Discovery_V3_DeltaDiscoveryRequest {
            Self.request(node: node, type, subscribe: subscribe, unsubscribe: unsubscribe, nonce: nonce, error: error)
        }
        // Wildcard subscriptions: every cluster and listener of this node.
        sink.yield(request(TypeURL.cluster))
        sink.yield(request(TypeURL.listener))
        state.withLock { $0.connection = "connected" }
        logger.info("xDS stream to pilot open", metadata: ["pilot": "\(host):\(port)"])
        try await ads.deltaAggregatedResources(
            requestProducer: { writer in
                for await r in requests { try await writer.write(r) }
            },
            onResponse: { response in
                var resources = XDSResources()
                var applied: String?
                for try await message in response.messages {
                    var next = resources
                    do {
                        try Self.merge(message, into: &next)
                    } catch {
                        self.nack(message, "\(error)", sink: sink, node: node)
                        continue
                    }
                    let type = Self.short(message.typeURL)
                    // Follow what listeners and clusters name.
                    let wantRoutes = next.routeNames
                    let wantEndpoints = next.edsClusterNames
                    let newRoutes = wantRoutes.subtracting(resources.routeNames)
                    let goneRoutes = resources.routeNames.subtracting(wantRoutes)
                    let newEndpoints = wantEndpoints.subtracting(resources.edsClusterNames)
                    let goneEndpoints = resources.edsClusterNames.subtracting(wantEndpoints)
                    for name in goneRoutes { next.routes.removeValue(forKey: name) }
                    for name in goneEndpoints { next.endpoints.removeValue(forKey: name) }

                    if next.isComplete {
                        let version = Self.version(of: next)
                        if version != applied {
                            do {
                                let config = try XDSTranslator.proxyConfig(
                                    next,
                                    version: version,
                                    base: self.base
                                )
                                try await self.apply(config)
                                applied = version
                                self.state.withLock {
                                    $0.appliedVersion = version
                                    $0.updatesApplied += 1
                                }
                            } catch {
                                self.nack(message, "\(error)", sink: sink, node: node)
                                continue
                            }
                        }
                    }
                    resources = next
                    self.state.withLock { $0.versions[type] = message.systemVersionInfo }
                    sink.yield(request(message.typeURL, nonce: message.nonce))
                    if !newRoutes.isEmpty || !goneRoutes.isEmpty {
                        sink.yield(
                            request(
                                TypeURL.routeConfiguration,
                                subscribe: newRoutes.sorted(),
                                unsubscribe: goneRoutes.sorted()
                            )
                        )
                    }
                    if !newEndpoints.isEmpty || !goneEndpoints.isEmpty {
                        sink.yield(
                            request(
                                TypeURL.clusterLoadAssignment,
                                subscribe: newEndpoints.sorted(),
                                unsubscribe: goneEndpoints.sorted()
                            )
                        )
                    }
                }
                sink.finish()
            }
        )
    }

    private func nack(
        _ message: Envoy_Service_Discovery_V3_DeltaDiscoveryResponse,
        _ reason: String,
        sink: AsyncStream<Envoy_Service_Discovery_V3_DeltaDiscoveryRequest>.Continuation,
        node: Envoy_Config_Core_V3_Node
    ) {
        state.withLock {
            $0.lastNACK = "\(Self.short(message.typeURL)) \(message.systemVersionInfo): \(reason)"
            $0.nacks += 1
        }
        logger.error(
            "configuration from pilot refused (NACK); the last good one keeps serving",
            metadata: ["xds.type": "\(Self.short(message.typeURL))", "error": "\(reason)"]
        )
        sink.yield(Self.request(node: node, message.typeURL, nonce: message.nonce, error: reason))
    }

    static func request(
        node: Envoy_Config_Core_V3_Node,
        _ type: String,
        subscribe: [String] = [],
        unsubscribe: [String] = [],
        nonce: String = "",
        error: String? = nil
    ) -> Envoy_Service_Discovery_V3_DeltaDiscoveryRequest {
        var r = Envoy_Service_Discovery_V3_DeltaDiscoveryRequest()
        r.node = node
        r.typeURL = type
        r.resourceNamesSubscribe = subscribe
        r.resourceNamesUnsubscribe = unsubscribe
        r.responseNonce = nonce
        if let error {
            r.errorDetail.code = 3  // INVALID_ARGUMENT
            r.errorDetail.message = error
        }
        return r
    }

    /// Adds, replaces and removes the response's resources; an undecodable one fails the whole
    /// response (nothing of it is kept).
    static func merge(
        _ message: Envoy_Service_Discovery_V3_DeltaDiscoveryResponse,
        into resources: inout XDSResources
    ) throws {
        func decode<M: SwiftProtobuf.Message>(_ type: M.Type, _ r: Envoy_Service_Discovery_V3_Resource) throws -> M {
            guard r.resource.typeURL == message.typeURL else {
                throw XDSTranslator.Failure(
                    "resource '\(r.name)' is a \(r.resource.typeURL), expected \(message.typeURL)"
                )
            }
            do {
                return try M(serializedBytes: r.resource.value)
            } catch {
                throw XDSTranslator.Failure("resource '\(r.name)' cannot be decoded: \(error)")
            }
        }
        switch message.typeURL {
        case TypeURL.listener:
            for r in message.resources {
                resources.listeners[r.name] = try decode(Envoy_Config_Listener_V3_Listener.self, r)
            }
            for name in message.removedResources { resources.listeners.removeValue(forKey: name) }
        case TypeURL.routeConfiguration:
            for r in message.resources {
                resources.routes[r.name] = try decode(Envoy_Config_Route_V3_RouteConfiguration.self, r)
            }
            for name in message.removedResources { resources.routes.removeValue(forKey: name) }
        case TypeURL.cluster:
            for r in message.resources {
                resources.clusters[r.name] = try decode(Envoy_Config_Cluster_V3_Cluster.self, r)
            }
            for name in message.removedResources { resources.clusters.removeValue(forKey: name) }
        case TypeURL.clusterLoadAssignment:
            for r in message.resources {
                resources.endpoints[r.name] = try decode(Envoy_Config_Endpoint_V3_ClusterLoadAssignment.self, r)
            }
            for name in message.removedResources { resources.endpoints.removeValue(forKey: name) }
        default:
            throw XDSTranslator.Failure("unknown type \(message.typeURL)")
        }
    }

    /// A digest of every resource: the same resources always give the same version.
    static func version(of resources: XDSResources) -> String {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        func add(_ bytes: [UInt8]) {
            for b in bytes {
                hash ^= UInt64(b)
                hash &*= 0x100_0000_01b3
            }
        }
        func addAll<M: SwiftProtobuf.Message>(_ map: [String: M]) {
            for key in map.keys.sorted() {
                add(Array(key.utf8))
                add((try? map[key]!.serializedBytes() as [UInt8]) ?? [])
            }
        }
        addAll(resources.listeners)
        addAll(resources.routes)
        addAll(resources.clusters)
        addAll(resources.endpoints)
        return "xds-" + String(hash, radix: 16)
    }
}
