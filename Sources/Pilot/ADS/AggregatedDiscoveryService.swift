import FoundationEssentials
public import GRPCCore
public import Logging
import SwiftProtobuf
public import XDS

/// The state-of-the-world ADS stream (`StreamAggregatedResources`): one stream per node carries
/// every resource type. Requests subscribe (wildcard or by name), ACK (`response_nonce` of the last
/// response, no error) or NACK (with `error_detail`: the node keeps its last good version, the
/// error is recorded in ``SyncStatus``); requests with a stale nonce are ignored. A change in the
/// ``ResourceCache`` is pushed to every stream whose subscribed types it touched.
public struct AggregatedDiscoveryService: Envoy_Service_Discovery_V3_AggregatedDiscoveryService.SimpleServiceProtocol {
    let cache: ResourceCache
    let sync: SyncStatus
    let logger: Logger

    public init(cache: ResourceCache, sync: SyncStatus, logger: Logger) {
        self.cache = cache
        self.sync = sync
        self.logger = logger
    }

    /// What wakes a stream: a message from the node, or a change in the cache.
    enum StreamEvent<Request: Sendable>: Sendable {
        case request(Request)
        case changed
    }

    /// The life of one ADS stream, SotW or Delta alike: watch the cache, merge the node's requests
    /// and the cache's changes into one sequence handled by one loop (so per-stream state needs no
    /// lock), and on the way out stop watching and forget the node.
    private func runStream<Request: Sendable>(
        _ requests: RPCAsyncSequence<Request, any Error>,
        nodeID: (Request) -> String?,
        onEvent: (StreamEvent<Request>, _ node: String) async throws -> Void
    ) async throws {
        let (watchID, changes) = await cache.watch()
        let (events, sink) = AsyncStream<StreamEvent<Request>>.makeStream()
        var node = ""
        do {
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    defer { sink.finish() }
                    for try await message in requests { sink.yield(.request(message)) }
                }
                group.addTask {
                    for await _ in changes { sink.yield(.changed) }
                }
                for await event in events {
                    if node.isEmpty, case .request(let message) = event, let id = nodeID(message) { node = id }
                    try await onEvent(event, node)
                }
                group.cancelAll()
            }
        } catch {
            await cache.unwatch(watchID)
            await sync.disconnected(node: node)
            throw error
        }
        await cache.unwatch(watchID)
        await sync.disconnected(node: node)
    }

    /// One type's subscription on one stream.
    struct Subscription {
        var names: Set<String> = []
        var wildcard = true
        var sentVersion: Int?
        var pendingNonce: String?
    }

    public func streamAggregatedResources(
        request: RPCAsyncSequence<Envoy_Service_Discovery_V3_DiscoveryRequest, any Error>,
        response: RPCWriter<Envoy_Service_Discovery_V3_DiscoveryResponse>,
        context: ServerContext
    ) async throws {
        var subscriptions: [String: Subscription] = [:]
        var nonce = 0
        try await runStream(request, nodeID: { $0.hasNode ? $0.node.id : nil }) { event, node in
            var toSend: [String] = []
            switch event {
            case .request(let message):
                toSend = await handle(message, node: node, subscriptions: &subscriptions)
            case .changed:
                for (typeURL, subscription) in subscriptions
                where await cache.snapshot(typeURL).version != subscription.sentVersion {
                    toSend.append(typeURL)
                }
            }
            for typeURL in toSend {
                nonce += 1
                try await send(typeURL, nonce: "\(nonce)", node: node, to: response, subscriptions: &subscriptions)
            }
        }
    }

    /// Applies one request; returns the types to send now.
    func handle(
        _ message: Envoy_Service_Discovery_V3_DiscoveryRequest,
        node: String,
        subscriptions: inout [String: Subscription]
    ) async -> [String] {
        let typeURL = message.typeURL
        guard !typeURL.isEmpty else { return [] }
        let isNew = subscriptions[typeURL] == nil
        var subscription = subscriptions[typeURL] ?? Subscription()
        if !message.responseNonce.isEmpty {
            guard message.responseNonce == subscription.pendingNonce else { return [] }  // stale
            if message.hasErrorDetail {
                await sync.nacked(node: node, typeURL: typeURL, error: message.errorDetail.message)
                logger.warning(
                    "configuration rejected (NACK)",
                    metadata: [
                        "xds.node": "\(node)", "xds.type": "\(typeURL)", "error": "\(message.errorDetail.message)",
                    ]
                )
            } else {
                await sync.acked(node: node, typeURL: typeURL, version: message.versionInfo)
            }
        }
        let names = Set(message.resourceNames)
        let wildcard = names.isEmpty || names.contains("*")
        let changedNames = names != subscription.names || wildcard != subscription.wildcard
        subscription.names = names
        subscription.wildcard = wildcard
        subscriptions[typeURL] = subscription
        if isNew || changedNames { return [typeURL] }
        // An ACK may reveal that a change arrived while the response was in flight.
        if !message.hasErrorDetail, await cache.snapshot(typeURL).version != subscription.sentVersion {
            return [typeURL]
        }
        return []
    }

    private func send(
        _ typeURL: String,
        nonce: String,
        node: String,
        to response: RPCWriter<Envoy_Service_Discovery_V3_DiscoveryResponse>,
        subscriptions: inout [String: Subscription]
    ) async throws {
        guard var subscription = subscriptions[typeURL] else { return }
        let snapshot = await cache.snapshot(typeURL)
        var message = Envoy_Service_Discovery_V3_DiscoveryResponse()
        message.typeURL = typeURL
        message.versionInfo = "\(snapshot.version)"
        message.nonce = nonce
        let names = subscription.wildcard ? snapshot.resources.keys.sorted() : subscription.names.sorted()
        message.resources = names.compactMap { snapshot.resources[$0] }
        try await response.write(message)
        subscription.sentVersion = snapshot.version
        subscription.pendingNonce = nonce
        subscriptions[typeURL] = subscription
        await sync.sent(node: node, typeURL: typeURL, version: message.versionInfo, nonce: nonce)
    }

    /// One type's subscription on an incremental (Delta) stream.
    struct DeltaSubscription {
        var wildcard = false
        var names: Set<String> = []
        /// What the node has: resource name → version.
        var known: [String: String] = [:]
        var pendingNonce: String?
        var pendingVersion: String?
    }

    /// The incremental ADS stream (`DeltaAggregatedResources`): only resources that changed, and
    /// the names of those removed, are sent; each resource carries its own version (a digest of its
    /// bytes).
    public func deltaAggregatedResources(
        request: RPCAsyncSequence<Envoy_Service_Discovery_V3_DeltaDiscoveryRequest, any Error>,
        response: RPCWriter<Envoy_Service_Discovery_V3_DeltaDiscoveryResponse>,
        context: ServerContext
    ) async throws {
        var subscriptions: [String: DeltaSubscription] = [:]
        var nonce = 0
        try await runStream(request, nodeID: { $0.hasNode ? $0.node.id : nil }) { event, node in
            var candidates: [(typeURL: String, force: Bool)] = []
            switch event {
            case .request(let message):
                if let send = await handleDelta(message, node: node, subscriptions: &subscriptions) {
                    candidates.append(send)
                }
            case .changed:
                candidates = subscriptions.keys.sorted().map { ($0, false) }
            }
            for (typeURL, force) in candidates {
                guard var subscription = subscriptions[typeURL] else { continue }
                let snapshot = await cache.snapshot(typeURL)
                let targets =
                    subscription.wildcard
                    ? Array(snapshot.resources.keys)
                    : subscription.names.filter { snapshot.resources[$0] != nil }
                var updated: [Envoy_Service_Discovery_V3_Resource] = []
                for name in targets.sorted() {
                    guard let any = snapshot.resources[name] else { continue }
                    let version = Self.digest(any)
                    if subscription.known[name] == version { continue }
                    var resource = Envoy_Service_Discovery_V3_Resource()
                    resource.name = name
                    resource.version = version
                    resource.resource = any
                    updated.append(resource)
                    subscription.known[name] = version
                }
                let removed = subscription.known.keys.filter { snapshot.resources[$0] == nil }.sorted()
                for name in removed { subscription.known[name] = nil }
                guard force || !updated.isEmpty || !removed.isEmpty else { continue }
                nonce += 1
                var message = Envoy_Service_Discovery_V3_DeltaDiscoveryResponse()
                message.typeURL = typeURL
                message.systemVersionInfo = "\(snapshot.version)"
                message.nonce = "\(nonce)"
                message.resources = updated
                message.removedResources = removed
                try await response.write(message)
                subscription.pendingNonce = message.nonce
                subscription.pendingVersion = message.systemVersionInfo
                subscriptions[typeURL] = subscription
                await sync.sent(
                    node: node,
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
    ) async -> (typeURL: String, force: Bool)? {
        let typeURL = message.typeURL
        guard !typeURL.isEmpty else { return nil }
        let isNew = subscriptions[typeURL] == nil
        var subscription = subscriptions[typeURL] ?? DeltaSubscription()
        if !message.responseNonce.isEmpty {
            guard message.responseNonce == subscription.pendingNonce else { return nil }  // stale
            if message.hasErrorDetail {
                await sync.nacked(node: node, typeURL: typeURL, error: message.errorDetail.message)
                logger.warning(
                    "configuration rejected (NACK)",
                    metadata: [
                        "xds.node": "\(node)", "xds.type": "\(typeURL)", "error": "\(message.errorDetail.message)",
                    ]
                )
            } else if let version = subscription.pendingVersion {
                await sync.acked(node: node, typeURL: typeURL, version: version)
            }
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
        subscriptions[typeURL] = subscription
        if isNew { return (typeURL, true) }
        if !message.resourceNamesSubscribe.isEmpty { return (typeURL, false) }
        return nil
    }

    /// A resource's version: a digest of its serialized bytes (stable across restarts).
    static func digest(_ any: Google_Protobuf_Any) -> String {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in any.typeURL.utf8 {
            h ^= UInt64(b)
            h &*= 0x100_0000_01b3
        }
        for b in any.value {
            h ^= UInt64(b)
            h &*= 0x100_0000_01b3
        }
        return String(h, radix: 16)
    }
}
