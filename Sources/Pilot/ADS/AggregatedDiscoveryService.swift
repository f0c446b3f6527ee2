import FoundationEssentials
public import GRPCCore
public import Logging
import SwiftProtobuf
import TrellisConfig
import TrellisPolicy
public import XDS

/// Pilot's xDS server: ADS (state of the world and incremental) and the per-type CDS/EDS/LDS/RDS
/// services, all served from each node's snapshot in the ``SnapshotCache``.
///
/// A stream's first request must carry a valid `node` (``NodeInfo``); the node's snapshot is
/// made by the ``NodeSnapshotSource`` before anything is sent. Requests subscribe (wildcard or by
/// name), ACK (`response_nonce` of the last response of that type, no error) or NACK (with
/// `error_detail`: the node keeps its last good version; the error is recorded in
/// ``SyncStatus`` and counted); requests with a stale nonce are ignored. A change of the node's
/// snapshot is pushed on every stream of that node, only for the types and (for RDS and EDS)
/// only the resources that changed.
public struct AggregatedDiscoveryService: Sendable {
    let cache: SnapshotCache
    let sync: SyncStatus
    let source: any NodeSnapshotSource
    let logger: Logger
    let metrics: PilotMetrics

    /// A stream subscribing to more names than this (of one type) is closed (resource exhausted).
    public static let maxNamesPerType = 65_536

    public init(
        cache: SnapshotCache,
        sync: SyncStatus,
        source: any NodeSnapshotSource,
        logger: Logger,
        metrics: PilotMetrics = .init()
    ) {
        self.metrics = metrics
        self.cache = cache
        self.sync = sync
        self.source = source
        self.logger = logger
    }

    /// The types pilot serves; a request for another type is ignored (and counted).
    static let servedTypes: Set<String> = [
        TypeURL.listener, TypeURL.routeConfiguration, TypeURL.cluster, TypeURL.clusterLoadAssignment,
    ]
    /// Types whose SotW responses carry every resource; for the others only what changed is sent.
    static let fullStateTypes: Set<String> = [TypeURL.listener, TypeURL.cluster]

    /// What wakes a stream: a message from the node, or a change of its snapshot.
    enum StreamEvent<Request: Sendable>: Sendable {
        case request(Request)
        case changed
    }

    /// The life of one stream, SotW or Delta alike: the first request names the node, whose
    /// snapshot is made and watched; the node's requests and its snapshot's changes are merged into
    /// one sequence handled by one loop (so per-stream state needs no lock); on the way out the
    /// watch ends and the node is forgotten once its last stream closed.
    private func runStream<Request: Sendable>(
        _ requests: RPCAsyncSequence<Request, any Error>,
        node nodeOf: @escaping @Sendable (Request) -> Envoy_Config_Core_V3_Node?,
        onEvent: (StreamEvent<Request>, _ node: NodeInfo, _ snapshot: NodeSnapshot) async throws -> Void
    ) async throws {
        let (events, sink) = AsyncStream<StreamEvent<Request>>.makeStream()
        var node: NodeInfo?
        var watchID: Int?
        metrics.connectedStreams(1)
        defer { metrics.connectedStreams(-1) }
        do {
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    defer { sink.finish() }
                    do {
                        for try await message in requests { sink.yield(.request(message)) }
                    } catch let error as RPCError where error.code == .invalidArgument {
                        metrics.rejected("malformed")  // a message that does not decode
                        throw error
                    }
                }
                for await event in events {
                    if node == nil {
                        guard case .request(let message) = event else { continue }
                        let info = try identify(nodeOf(message))
                        node = info
                        await source.nodeConnected(info)
                        let (id, changes) = await cache.watch(info.id)
                        watchID = id
                        group.addTask {
                            for await _ in changes { sink.yield(.changed) }
                        }
                    }
                    guard let node else { continue }
                    let snapshot = await cache.snapshot(node.id) ?? .empty
                    try await onEvent(event, node, snapshot)
                }
                group.cancelAll()
                try await group.waitForAll()  // the reader's error, if the node's side failed
            }
        } catch {
            await leave(node, watchID)
            if let rpc = error as? RPCError { throw rpc }
            if error is CancellationError { throw error }
            logger.info("xDS stream ended", metadata: ["xds.node": "\(node?.id ?? "?")", "error": "\(error)"])
            throw error
        }
        await leave(node, watchID)
    }

    private func leave(_ node: NodeInfo?, _ watchID: Int?) async {
        guard let node else { return }
        if let watchID { await cache.unwatch(node.id, watchID) }
        await sync.disconnected(node: node.id)
        await source.nodeDisconnected(node)
    }

    func identify(_ node: Envoy_Config_Core_V3_Node?) throws -> NodeInfo {
        guard let node, !node.id.isEmpty else {
            metrics.rejected("no_node")
            throw RPCError(code: .invalidArgument, message: "the first request of a stream must carry node.id")
        }
        do {
            return try NodeInfo(node)
        } catch {
            metrics.rejected("invalid_node")
            throw RPCError(code: .invalidArgument, message: "invalid node: \(error)")
        }
    }

    private func recordReply(node: String, typeURL: String, version: String?, error: Google_Rpc_Status?) async {
        if let error {
            metrics.nacked(typeURL)
            await sync.nacked(node: node, typeURL: typeURL, error: error.message)
            logger.warning(
                "configuration rejected (NACK)",
                metadata: ["xds.node": "\(node)", "xds.type": "\(typeURL)", "error": "\(error.message)"]
            )
        } else if let version {
            await sync.acked(node: node, typeURL: typeURL, version: version)
        }
    }

    private func checkType(_ typeURL: String, node: String) -> Bool {
        guard Self.servedTypes.contains(typeURL) else {
            metrics.rejected("unknown_type")
            logger.notice(
                "request for a type pilot does not serve; ignored",
                metadata: ["xds.node": "\(node)", "xds.type": "\(typeURL)"]
            )
            return false
        }
        return true
    }

    private func checkCount(_ count: Int, _ typeURL: String) throws {
        guard count <= Self.maxNamesPerType else {
            metrics.rejected("too_many_names")
            throw RPCError(
                code: .resourceExhausted,
                message: "\(count) names subscribed for \(typeURL); at most \(Self.maxNamesPerType) per type"
            )
        }
    }

    /// On a per-type service the type may be left empty (it is the service's); another is refused.
    private func serviceType(_ typeURL: inout String, servedBy fixedType: String?) throws {
        guard let fixedType else { return }
        if typeURL.isEmpty { typeURL = fixedType }
        guard typeURL == fixedType else {
            metrics.rejected("unknown_type")
            throw RPCError(code: .invalidArgument, message: "this service serves \(fixedType) only, not \(typeURL)")
        }
    }

    // MARK: State of the world

    /// One type's subscription on a SotW stream.
    struct Subscription {
        var names: Set<String> = []
        var wildcard = true
        /// The type version last sent, and each resource's version as last sent.
        var sentTypeVersion: String?
        var sent: [String: String] = [:]
        var pendingNonce: String?
        var pendingVersion: String?
    }

    /// Serves a SotW stream; `fixedType` is the type of a per-type service (whose requests may
    /// leave `type_url` empty).
    func serveSotW(
        _ requests: RPCAsyncSequence<Envoy_Service_Discovery_V3_DiscoveryRequest, any Error>,
        _ response: RPCWriter<Envoy_Service_Discovery_V3_DiscoveryResponse>,
        fixedType: String? = nil
    ) async throws {
        var subscriptions: [String: Subscription] = [:]
        var nonce = 0
        try await runStream(requests, node: { $0.hasNode ? $0.node : nil }) { event, node, snapshot in
            var forced: Set<String> = []
            switch event {
            case .request(var message):
                try serviceType(&message.typeURL, servedBy: fixedType)
                guard let type = try await handle(message, node: node.id, subscriptions: &subscriptions) else { return }
                forced.insert(type)
            case .changed:
                break
            }
            for typeURL in subscriptions.keys.sorted() {
                guard var subscription = subscriptions[typeURL] else { continue }
                let typeSnapshot = snapshot[typeURL]
                let force = forced.contains(typeURL)
                // Nothing of this type changed since the last response: nothing to look at.
                guard force || typeSnapshot.version != subscription.sentTypeVersion else { continue }
                let targets = subscription.wildcard ? Array(typeSnapshot.resources.keys) : Array(subscription.names)
                var resources: [Google_Protobuf_Any] = []
                if Self.fullStateTypes.contains(typeURL) {
                    subscription.sent = [:]
                    for name in targets.sorted() {
                        guard let resource = typeSnapshot.resources[name] else { continue }
                        resources.append(resource.any)
                        subscription.sent[name] = resource.version
                    }
                } else {
                    for name in targets {
                        guard let resource = typeSnapshot.resources[name] else { continue }
                        if !force && subscription.sent[name] == resource.version { continue }
                        resources.append(resource.any)
                        subscription.sent[name] = resource.version
                    }
                    guard force || !resources.isEmpty else {
                        subscription.sentTypeVersion = typeSnapshot.version
                        subscriptions[typeURL] = subscription
                        continue
                    }
                }
                nonce += 1
                var message = Envoy_Service_Discovery_V3_DiscoveryResponse()
                message.typeURL = typeURL
                message.versionInfo = typeSnapshot.version
                message.nonce = "\(nonce)"
                message.resources = resources
                try await response.write(message)
                metrics.pushed(typeURL)
                subscription.sentTypeVersion = typeSnapshot.version
                subscription.pendingNonce = message.nonce
                subscription.pendingVersion = message.versionInfo
                subscriptions[typeURL] = subscription
                await sync.sent(node: node.id, typeURL: typeURL, version: message.versionInfo, nonce: message.nonce)
            }
        }
    }

    /// Applies one SotW request; returns the type to answer now in full (a new subscription or
    /// changed names), or nil.
    func handle(
        _ message: Envoy_Service_Discovery_V3_DiscoveryRequest,
        node: String,
        subscriptions: inout [String: Subscription]
    ) async throws -> String? {
        let typeURL = message.typeURL
        guard !typeURL.isEmpty, checkType(typeURL, node: node) else { return nil }
        try checkCount(message.resourceNames.count, typeURL)
        let isNew = subscriptions[typeURL] == nil
        var subscription = subscriptions[typeURL] ?? Subscription()
        if !message.responseNonce.isEmpty {
            guard message.responseNonce == subscription.pendingNonce else { return nil }  // stale
            await recordReply(
                node: node,
                typeURL: typeURL,
                version: message.versionInfo,
                error: message.hasErrorDetail ? message.errorDetail : nil
            )
        }
        let names = Set(message.resourceNames)
        let wildcard = names.isEmpty || names.contains("*")
        let changedNames = names != subscription.names || wildcard != subscription.wildcard
        let added = names.subtracting(subscription.names)
        subscription.names = names.subtracting(["*"])
        subscription.wildcard = wildcard
        for name in added { subscription.sent[name] = nil }  // a newly named resource is sent in full
        subscriptions[typeURL] = subscription
        return isNew || changedNames ? typeURL : nil
    }

    // MARK: Incremental (Delta)

    /// One type's subscription on an incremental stream.
    struct DeltaSubscription {
        var wildcard = false
        var names: Set<String> = []
        /// What the node has: resource name → version.
        var known: [String: String] = [:]
        var pendingNonce: String?
        var pendingVersion: String?
    }

    /// Serves an incremental stream: only resources that changed, and the names of those removed,
    /// are sent; each carries its own version.
    func serveDelta(
        _ requests: RPCAsyncSequence<Envoy_Service_Discovery_V3_DeltaDiscoveryRequest, any Error>,
        _ response: RPCWriter<Envoy_Service_Discovery_V3_DeltaDiscoveryResponse>,
        fixedType: String? = nil
    ) async throws {
        var subscriptions: [String: DeltaSubscription] = [:]
        var nonce = 0
        try await runStream(requests, node: { $0.hasNode ? $0.node : nil }) { event, node, snapshot in
            var candidates: [(typeURL: String, force: Bool)] = []
            switch event {
            case .request(var message):
                try serviceType(&message.typeURL, servedBy: fixedType)
                if let send = try await handleDelta(message, node: node.id, subscriptions: &subscriptions) {
                    candidates.append(send)
                }
            case .changed:
                // Only the types whose version moved since the last response.
                candidates = subscriptions.filter { snapshot[$0.key].version != $0.value.pendingVersion }.keys.sorted()
                    .map {
                        ($0, false)
                    }
            }
            for (typeURL, force) in candidates {
                guard var subscription = subscriptions[typeURL] else { continue }
                let typeSnapshot = snapshot[typeURL]
                let targets =
                    subscription.wildcard
                    ? Array(typeSnapshot.resources.keys)
                    : subscription.names.filter { typeSnapshot.resources[$0] != nil }
                var updated: [Envoy_Service_Discovery_V3_Resource] = []
                for name in targets.sorted() {
                    guard let resource = typeSnapshot.resources[name], subscription.known[name] != resource.version
                    else {
                        continue
                    }
                    var item = Envoy_Service_Discovery_V3_Resource()
                    item.name = name
                    item.version = resource.version
                    item.resource = resource.any
                    updated.append(item)
                    subscription.known[name] = resource.version
                }
                let removed = subscription.known.keys.filter { typeSnapshot.resources[$0] == nil }.sorted()
                for name in removed { subscription.known[name] = nil }
                guard force || !updated.isEmpty || !removed.isEmpty else { continue }
                nonce += 1
                var message = Envoy_Service_Discovery_V3_DeltaDiscoveryResponse()
                message.typeURL = typeURL
                message.systemVersionInfo = typeSnapshot.version
                message.nonce = "\(nonce)"
                message.resources = updated
                message.removedResources = removed
                try await response.write(message)
                metrics.pushed(typeURL)
                subscription.pendingNonce = message.nonce
                subscription.pendingVersion = message.systemVersionInfo
                subscriptions[typeURL] = subscription
                await sync.sent(
                    node: node.id,
                    typeURL: typeURL,
                    version: message.systemVersionInfo,
                    nonce: message.nonce
                )
            }
        }
    }

    /// Applies one Delta request; returns the type to answer now (forced for a new subscription,
    /// so that the node's initial fetch completes even when there is nothing to send).
    func handleDelta(
        _ message: Envoy_Service_Discovery_V3_DeltaDiscoveryRequest,
        node: String,
        subscriptions: inout [String: DeltaSubscription]
    ) async throws -> (typeURL: String, force: Bool)? {
        let typeURL = message.typeURL
        guard !typeURL.isEmpty, checkType(typeURL, node: node) else { return nil }
        let isNew = subscriptions[typeURL] == nil
        var subscription = subscriptions[typeURL] ?? DeltaSubscription()
        if !message.responseNonce.isEmpty {
            guard message.responseNonce == subscription.pendingNonce else { return nil }  // stale
            await recordReply(
                node: node,
                typeURL: typeURL,
                version: subscription.pendingVersion,
                error: message.hasErrorDetail ? message.errorDetail : nil
            )
        }
        if isNew {
            // The first request with no names is a wildcard subscription (legacy form).
            subscription.wildcard = message.resourceNamesSubscribe.isEmpty
            for (name, version) in message.initialResourceVersions { subscription.known[name] = version }
        }
        for name in message.resourceNamesSubscribe {
            if name == "*" { subscription.wildcard = true } else { subscription.names.insert(name) }
        }
        for name in message.resourceNamesUnsubscribe {
            if name == "*" { subscription.wildcard = false }
            subscription.names.remove(name)
            subscription.known[name] = nil
        }
        try checkCount(subscription.names.count, typeURL)
        subscriptions[typeURL] = subscription
        if isNew { return (typeURL, true) }
        if !message.resourceNamesSubscribe.isEmpty { return (typeURL, false) }
        return nil
    }

    // MARK: Fetch (unary)

    func fetch(
        _ request: Envoy_Service_Discovery_V3_DiscoveryRequest,
        typeURL: String
    ) async throws
        -> Envoy_Service_Discovery_V3_DiscoveryResponse
    {
        let node = try identify(request.hasNode ? request.node : nil)
        await source.nodeConnected(node)
        let snapshot = (await cache.snapshot(node.id) ?? .empty)[typeURL]
        await source.nodeDisconnected(node)
        let names = request.resourceNames.isEmpty ? snapshot.resources.keys.sorted() : request.resourceNames.sorted()
        var response = Envoy_Service_Discovery_V3_DiscoveryResponse()
        response.typeURL = typeURL
        response.versionInfo = snapshot.version
        response.resources = names.compactMap { snapshot.resources[$0]?.any }
        return response
    }
}

// MARK: - The gRPC services

extension AggregatedDiscoveryService: Envoy_Service_Discovery_V3_AggregatedDiscoveryService.SimpleServiceProtocol {
    public func streamAggregatedResources(
        request: RPCAsyncSequence<Envoy_Service_Discovery_V3_DiscoveryRequest, any Error>,
        response: RPCWriter<Envoy_Service_Discovery_V3_DiscoveryResponse>,
        context: ServerContext
    ) async throws {
        try await serveSotW(request, response)
    }

    public func deltaAggregatedResources(
        request: RPCAsyncSequence<Envoy_Service_Discovery_V3_DeltaDiscoveryRequest, any Error>,
        response: RPCWriter<Envoy_Service_Discovery_V3_DeltaDiscoveryResponse>,
        context: ServerContext
    ) async throws {
        try await serveDelta(request, response)
    }

    /// Every xDS service pilot registers: ADS and the per-type CDS, EDS, LDS and RDS.
    public var services: [any RegistrableRPCService] {
        [
            self, ClusterService(ads: self), EndpointService(ads: self), ListenerService(ads: self),
            RouteService(ads: self),
        ]
    }
}

/// CDS on its own stream (`StreamClusters`, `DeltaClusters`, `FetchClusters`).
struct ClusterService: Envoy_Service_Cluster_V3_ClusterDiscoveryService.SimpleServiceProtocol {
    let ads: AggregatedDiscoveryService
    func streamClusters(
        request: RPCAsyncSequence<Envoy_Service_Discovery_V3_DiscoveryRequest, any Error>,
        response: RPCWriter<Envoy_Service_Discovery_V3_DiscoveryResponse>,
        context: ServerContext
    ) async throws { try await ads.serveSotW(request, response, fixedType: TypeURL.cluster) }
    func deltaClusters(
        request: RPCAsyncSequence<Envoy_Service_Discovery_V3_DeltaDiscoveryRequest, any Error>,
        response: RPCWriter<Envoy_Service_Discovery_V3_DeltaDiscoveryResponse>,
        context: ServerContext
    ) async throws { try await ads.serveDelta(request, response, fixedType: TypeURL.cluster) }
    func fetchClusters(
        request: Envoy_Service_Discovery_V3_DiscoveryRequest,
        context: ServerContext
    ) async throws
        -> Envoy_Service_Discovery_V3_DiscoveryResponse
    { try await ads.fetch(request, typeURL: TypeURL.cluster) }
}

/// EDS on its own stream.
struct EndpointService: Envoy_Service_Endpoint_V3_EndpointDiscoveryService.SimpleServiceProtocol {
    let ads: AggregatedDiscoveryService
    func streamEndpoints(
        request: RPCAsyncSequence<Envoy_Service_Discovery_V3_DiscoveryRequest, any Error>,
        response: RPCWriter<Envoy_Service_Discovery_V3_DiscoveryResponse>,
        context: ServerContext
    ) async throws { try await ads.serveSotW(request, response, fixedType: TypeURL.clusterLoadAssignment) }
    func deltaEndpoints(
        request: RPCAsyncSequence<Envoy_Service_Discovery_V3_DeltaDiscoveryRequest, any Error>,
        response: RPCWriter<Envoy_Service_Discovery_V3_DeltaDiscoveryResponse>,
        context: ServerContext
    ) async throws { try await ads.serveDelta(request, response, fixedType: TypeURL.clusterLoadAssignment) }
    func fetchEndpoints(
        request: Envoy_Service_Discovery_V3_DiscoveryRequest,
        context: ServerContext
    ) async throws
        -> Envoy_Service_Discovery_V3_DiscoveryResponse
    { try await ads.fetch(request, typeURL: TypeURL.clusterLoadAssignment) }
}

/// LDS on its own stream.
struct ListenerService: Envoy_Service_Listener_V3_ListenerDiscoveryService.SimpleServiceProtocol {
    let ads: AggregatedDiscoveryService
    func streamListeners(
        request: RPCAsyncSequence<Envoy_Service_Discovery_V3_DiscoveryRequest, any Error>,
        response: RPCWriter<Envoy_Service_Discovery_V3_DiscoveryResponse>,
        context: ServerContext
    ) async throws { try await ads.serveSotW(request, response, fixedType: TypeURL.listener) }
    func deltaListeners(
        request: RPCAsyncSequence<Envoy_Service_Discovery_V3_DeltaDiscoveryRequest, any Error>,
        response: RPCWriter<Envoy_Service_Discovery_V3_DeltaDiscoveryResponse>,
        context: ServerContext
    ) async throws { try await ads.serveDelta(request, response, fixedType: TypeURL.listener) }
    func fetchListeners(
        request: Envoy_Service_Discovery_V3_DiscoveryRequest,
        context: ServerContext
    ) async throws
        -> Envoy_Service_Discovery_V3_DiscoveryResponse
    { try await ads.fetch(request, typeURL: TypeURL.listener) }
}

/// RDS on its own stream.
struct RouteService: Envoy_Service_Route_V3_RouteDiscoveryService.SimpleServiceProtocol {
    let ads: AggregatedDiscoveryService
    func streamRoutes(
        request: RPCAsyncSequence<Envoy_Service_Discovery_V3_DiscoveryRequest, any Error>,
        response: RPCWriter<Envoy_Service_Discovery_V3_DiscoveryResponse>,
        context: ServerContext
    ) async throws { try await ads.serveSotW(request, response, fixedType: TypeURL.routeConfiguration) }
    func deltaRoutes(
        request: RPCAsyncSequence<Envoy_Service_Discovery_V3_DeltaDiscoveryRequest, any Error>,
        response: RPCWriter<Envoy_Service_Discovery_V3_DeltaDiscoveryResponse>,
        context: ServerContext
    ) async throws { try await ads.serveDelta(request, response, fixedType: TypeURL.routeConfiguration) }
    func fetchRoutes(
        request: Envoy_Service_Discovery_V3_DiscoveryRequest,
        context: ServerContext
    ) async throws
        -> Envoy_Service_Discovery_V3_DiscoveryResponse
    { try await ads.fetch(request, typeURL: TypeURL.routeConfiguration) }
}
