import CoreMetrics
import FoundationEssentials
import GRPCCore
import GRPCNIOTransportHTTP2
public import Logging
public import Proxy
public import ServiceLifecycle
import SwiftProtobuf
import Synchronization
import TrellisConfig
public import TrellisPolicy
import XDS

#if canImport(Glibc)
import Glibc
#endif

/// The agent's xDS client: one incremental (Delta) ADS stream to pilot as a `sidecar` node.
/// Subscribes to every listener and cluster, then to the route configurations and EDS
/// assignments they name; turns the resources into a ``ProxyConfig`` (``XDSTranslator``) and
/// applies it through `apply` once everything referred to has arrived. A response that cannot be
/// translated is NACKed with the reason and nothing of it is kept: the last good configuration
/// keeps serving. A broken stream is re-opened on the next pilot of the list (a DNS name counts as
/// each of its addresses) a moment later; once every pilot failed in turn, after a jittered
/// exponential back-off (0.5 s to 30 s). It subscribes again from scratch and the pilot sends
/// the current state; meanwhile the last configuration keeps serving.
public final class XDSClient: Service, Sendable {
    public typealias Apply = @Sendable (ProxyConfig) async throws -> Void

    /// Incremental (Delta, the default) or state-of-the-world ADS.
    public enum XDSProtocol: String, Sendable, CaseIterable {
        case delta, sotw
    }

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
        /// `pilot`, or `disk` while serving the last configuration saved before a restart.
        public var source = "none"
        public var resyncs = 0

        enum CodingKeys: String, CodingKey {
            case pilot, connection, appliedVersion = "applied_version", versions, lastNACK = "last_nack"
            case updatesApplied = "updates_applied", nacks, source, resyncs
        }
    }

    /// The pilots' xDS addresses, in the order they are tried.
    private let pilots: [HostPort]
    private let node: String
    private let base: ProxyConfig
    private let persistPath: String?
    private let resyncInterval: Duration
    private let xdsProtocol: XDSProtocol
    private let maxEndpoints: Int
    private let locality: Locality
    /// Enough for a large mesh (the scale test translates 100,000), bounded all the same.
    public static let defaultMaxEndpoints = 200_000
    private let apply: Apply
    private let logger: Logger
    private let state: Mutex<State>
    /// The configuration waiting to be saved, and whether a writer is at it (saving is taken off
    /// the stream's path and coalesced: a burst of pushes costs one write per second at most).
    private let saving = Mutex<(pending: ProxyConfig?, writing: Bool)>((nil, false))
    private let metrics = Metrics()

    /// `trellis_xds_connected` (1 while the stream is open), `trellis_xds_updates_total`
    /// (configurations applied and ACKed), `trellis_xds_nacks_total`, `trellis_xds_resyncs_total`,
    /// `trellis_xds_reconnects_total` (streams that failed or that pilot closed, opened again),
    /// `trellis_xds_version` (the applied configuration's version as a number: the low 52 bits of
    /// its FNV-1a digest, equal on agents that run the same configuration),
    /// `trellis_xds_last_update_timestamp_seconds`, and `trellis_xds_serving_saved_config` (1 while
    /// the configuration saved before a restart serves).
    final class Metrics: Sendable {
        let connected = Gauge(label: "trellis_xds_connected")
        let updates = Counter(label: "trellis_xds_updates_total")
        let nacks = Counter(label: "trellis_xds_nacks_total")
        let resyncs = Counter(label: "trellis_xds_resyncs_total")
        let reconnects = Counter(label: "trellis_xds_reconnects_total")
        let version = Gauge(label: "trellis_xds_version")
        let lastUpdate = Gauge(label: "trellis_xds_last_update_timestamp_seconds")
        let savedConfig = Gauge(label: "trellis_xds_serving_saved_config")

        func applied(_ version: String) {
            var digest = FNV1a()
            digest.combine(version)
            // A Prometheus value is a double: 52 bits keep it exact.
            self.version.record(Double(digest.value & 0xF_FFFF_FFFF_FFFF))
            lastUpdate.record(Date.now.timeIntervalSince1970)
        }
    }

    public init(
        pilots: [HostPort],
        node: String,
        base: ProxyConfig,
        persistPath: String? = nil,
        resyncInterval: Duration = .seconds(300),
        protocol xdsProtocol: XDSProtocol = .delta,
        maxEndpoints: Int = XDSClient.defaultMaxEndpoints,
        locality: Locality = Locality(),
        logger: Logger,
        apply: @escaping Apply
    ) {
        self.locality = locality
        self.maxEndpoints = maxEndpoints
        precondition(!pilots.isEmpty, "XDSClient needs a pilot address")
        self.pilots = pilots
        self.node = node
        self.base = base
        self.persistPath = persistPath
        self.resyncInterval = resyncInterval
        self.xdsProtocol = xdsProtocol
        self.apply = apply
        self.logger = logger
        self.state = Mutex(State(pilot: pilots[0].description))
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
        // Whatever was applied last is on disk when the agent stops.
        if let last = saving.withLock({ state -> ProxyConfig? in
            defer { state.pending = nil }
            return state.pending
        }) {
            write(last)
        }
    }

    private func runUntilCancelled() async {
        await loadPersisted()
        var backoff: Duration = .milliseconds(500)
        var candidates = await PilotAddresses.expand(pilots)
        var index = 0
        var failedInARow = 0
        while !Task.isCancelled {
            let started = ContinuousClock.now
            let pilot = candidates[index % candidates.count]
            state.withLock { $0.pilot = pilot.description }
            do {
                let target: ResolvableTargets.IPv4OrDNS = Self.target(host: pilot.host, port: pilot.port)
                var config = HTTP2ClientTransport.Posix.Config.defaults
                // A pilot that stops answering (its machine gone, no reset sent) is noticed by its
                // pings within 15 s, and the stream moves on.
                config.connection.keepalive = .init(time: .seconds(10), timeout: .seconds(5), allowWithoutCalls: false)
                let transport = try HTTP2ClientTransport.Posix(
                    target: target.resolvable,
                    transportSecurity: .plaintext,
                    config: config
                )
                let resync = try await withGRPCClient(transport: transport) { client in
                    let ads = Envoy_Service_Discovery_V3_AggregatedDiscoveryService.Client(wrapping: client)
                    // The stream is opened again every resync interval: pilot then sends its whole
                    // state, which catches anything a long-lived stream may have missed.
                    return try await withThrowingTaskGroup(of: Bool.self) { group in
                        group.addTask {
                            switch self.xdsProtocol {
                            case .delta: try await self.stream(ads)
                            case .sotw: try await self.stateOfTheWorld(ads)
                            }
                            return false
                        }
                        group.addTask {
                            try await Task.sleep(for: self.resyncInterval)
                            return true
                        }
                        let first = try await group.next() ?? false
                        group.cancelAll()
                        return first
                    }
                }
                if resync {
                    state.withLock { $0.resyncs += 1 }
                    metrics.resyncs.increment()
                    logger.debug("xDS resync: the stream is opened again")
                    backoff = .milliseconds(500)
                    failedInARow = 0
                    continue
                }
                setConnection("disconnected: pilot closed the stream")
                metrics.reconnects.increment()
            } catch {
                if Task.isCancelled { return }
                setConnection("disconnected: \(error)")
                metrics.reconnects.increment()
                logger.warning(
                    "xDS stream to pilot failed; trying the next pilot",
                    metadata: ["pilot": "\(pilot)", "error": "\(error)"]
                )
            }
            // A stream that lived a while starts over: the next pilot at once, then the back-off.
            if ContinuousClock.now - started > .seconds(30) {
                backoff = .milliseconds(500)
                failedInARow = 0
            }
            failedInARow += 1
            index += 1
            if failedInARow < candidates.count {
                try? await Task.sleep(for: .milliseconds(Int.random(in: 100...300)))
                continue
            }
            let jittered = backoff * Double.random(in: 0.5...1.0)
            try? await Task.sleep(for: jittered)
            backoff = min(backoff * 2, .seconds(30))
            failedInARow = 0
            candidates = await PilotAddresses.expand(pilots)  // a DNS name may have moved
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

    /// The connection state `status` shows, and `trellis_xds_connected` with it.
    private func setConnection(_ connection: String) {
        state.withLock { $0.connection = connection }
        metrics.connected.record(connection == "connected" ? 1 : 0)
    }

    private var envoyNode: Envoy_Config_Core_V3_Node {
        var n = Envoy_Config_Core_V3_Node()
        n.id = node
        n.cluster = "trellis"
        n.userAgentName = "trellis-agent"
        // Pilot puts this machine's own zone first (EDS priorities).
        n.locality.region = locality.region
        n.locality.zone = locality.zone
        n.locality.subZone = locality.subzone
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
        try await ads.deltaAggregatedResources(
            requestProducer: { writer in
                for await r in requests { try await writer.write(r) }
            },
            onResponse: { response in
                var resources = XDSResources()
                var applied = self.state.withLock { $0.appliedVersion }
                var answered = false
                for try await message in response.messages {
                    // Connected once pilot answers, not when the request went out: a pilot that
                    // takes the connection but never serves the stream is not "connected".
                    if !answered {
                        answered = true
                        self.setConnection("connected")
                        self.logger.info("xDS stream to pilot open", metadata: ["pilot": "\(self.current.pilot)"])
                    }
                    var next = resources
                    do {
                        try Self.merge(message, into: &next)
                    } catch {
                        self.nack(message, "\(error)", sink: sink, node: node)
                        continue
                    }
                    let type = Self.short(message.typeURL)
                    let changes: Subscriptions
                    do {
                        changes = try await self.accept(&next, previous: resources, applied: &applied)
                    } catch {
                        self.nack(message, "\(error)", sink: sink, node: node)
                        continue
                    }
                    let (newRoutes, goneRoutes, newEndpoints, goneEndpoints) = (
                        changes.newRoutes, changes.goneRoutes, changes.newEndpoints, changes.goneEndpoints
                    )
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

    /// Route configurations and EDS assignments to subscribe to or drop after a response.
    struct Subscriptions {
        var newRoutes: Set<String>
        var goneRoutes: Set<String>
        var newEndpoints: Set<String>
        var goneEndpoints: Set<String>
    }

    /// Follows what the listeners and clusters of `next` name, and applies `next` when it is
    /// complete and differs from what is applied. Throws (nothing applied) when it cannot be
    /// translated or applied.
    private func accept(
        _ next: inout XDSResources,
        previous: XDSResources,
        applied: inout String?
    ) async throws -> Subscriptions {
        let wantRoutes = next.routeNames
        let wantEndpoints = next.edsClusterNames
        let changes = Subscriptions(
            newRoutes: wantRoutes.subtracting(previous.routeNames),
            goneRoutes: previous.routeNames.subtracting(wantRoutes),
            newEndpoints: wantEndpoints.subtracting(previous.edsClusterNames),
            goneEndpoints: previous.edsClusterNames.subtracting(wantEndpoints)
        )
        for name in changes.goneRoutes { next.routes.removeValue(forKey: name) }
        for name in changes.goneEndpoints { next.endpoints.removeValue(forKey: name) }
        // Bounded memory: a configuration beyond the agent's limit is refused whole.
        let endpoints = next.endpoints.values.reduce(0) { sum, assignment in
            sum + assignment.endpoints.reduce(0) { $0 + $1.lbEndpoints.count }
        }
        guard endpoints <= maxEndpoints else {
            throw XDSTranslator.Failure(
                "\(endpoints) endpoints in all, above this agent's limit of \(maxEndpoints) (pilot.max_endpoints in agent.yaml)"
            )
        }
        guard next.isComplete else { return changes }
        let version = Self.version(of: next)
        guard version != applied else { return changes }
        let config = try XDSTranslator.proxyConfig(next, version: version, base: base)
        try await apply(config)
        applied = version
        state.withLock {
            $0.appliedVersion = version
            $0.updatesApplied += 1
            $0.source = "pilot"
        }
        metrics.updates.increment()
        metrics.applied(version)
        metrics.savedConfig.record(0)
        save(config)
        return changes
    }

    // MARK: State of the world

    /// The SotW variant: LDS and CDS responses carry every resource (absent ones are gone); RDS
    /// and EDS responses carry the named resources that changed. ACK/NACK by version and nonce.
    private func stateOfTheWorld(
        _ ads: Envoy_Service_Discovery_V3_AggregatedDiscoveryService.Client<HTTP2ClientTransport.Posix>
    ) async throws {
        let (requests, sink) = AsyncStream<Envoy_Service_Discovery_V3_DiscoveryRequest>.makeStream()
        let node = envoyNode
        @Sendable func request(
            _ type: String,
            version: String = "",
            names: [String] = [],
            nonce: String = "",
            error: String? = nil
        ) -> Envoy_Service_Discovery_V3_DiscoveryRequest {
            var r = Envoy_Service_Discovery_V3_DiscoveryRequest()
            r.node = node
            r.typeURL = type
            r.versionInfo = version
            r.resourceNames = names
            r.responseNonce = nonce
            if let error {
                r.errorDetail.code = 3
                r.errorDetail.message = error
            }
            return r
        }
        sink.yield(request(TypeURL.cluster))
        sink.yield(request(TypeURL.listener))
        try await ads.streamAggregatedResources(
            requestProducer: { writer in
                for await r in requests { try await writer.write(r) }
            },
            onResponse: { response in
                var resources = XDSResources()
                var applied = self.state.withLock { $0.appliedVersion }
                var accepted: [String: String] = [:]  // type URL → last accepted version
                var nonces: [String: String] = [:]
                var answered = false
                for try await message in response.messages {
                    if !answered {
                        answered = true
                        self.setConnection("connected")
                        self.logger.info(
                            "xDS stream to pilot open (state of the world)",
                            metadata: ["pilot": "\(self.current.pilot)"]
                        )
                    }
                    nonces[message.typeURL] = message.nonce
                    var next = resources
                    let problem: String?
                    do {
                        try Self.mergeStateOfTheWorld(message, into: &next)
                        let changes = try await self.accept(&next, previous: resources, applied: &applied)
                        resources = next
                        accepted[message.typeURL] = message.versionInfo
                        self.state.withLock { $0.versions[Self.short(message.typeURL)] = message.versionInfo }
                        problem = nil
                        let names = Self.subscribedNames(message.typeURL, resources)
                        sink.yield(
                            request(message.typeURL, version: message.versionInfo, names: names, nonce: message.nonce)
                        )
                        if !changes.newRoutes.isEmpty || !changes.goneRoutes.isEmpty {
                            sink.yield(
                                request(
                                    TypeURL.routeConfiguration,
                                    version: accepted[TypeURL.routeConfiguration] ?? "",
                                    names: Self.subscribedNames(TypeURL.routeConfiguration, resources),
                                    nonce: nonces[TypeURL.routeConfiguration] ?? ""
                                )
                            )
                        }
                        if !changes.newEndpoints.isEmpty || !changes.goneEndpoints.isEmpty {
                            sink.yield(
                                request(
                                    TypeURL.clusterLoadAssignment,
                                    version: accepted[TypeURL.clusterLoadAssignment] ?? "",
                                    names: Self.subscribedNames(TypeURL.clusterLoadAssignment, resources),
                                    nonce: nonces[TypeURL.clusterLoadAssignment] ?? ""
                                )
                            )
                        }
                    } catch {
                        problem = "\(error)"
                    }
                    if let problem {
                        self.recordNACK(Self.short(message.typeURL), message.versionInfo, problem)
                        sink.yield(
                            request(
                                message.typeURL,
                                version: accepted[message.typeURL] ?? "",
                                names: Self.subscribedNames(message.typeURL, resources),
                                nonce: message.nonce,
                                error: problem
                            )
                        )
                    }
                }
                sink.finish()
            }
        )
    }

    static func subscribedNames(_ typeURL: String, _ resources: XDSResources) -> [String] {
        switch typeURL {
        case TypeURL.routeConfiguration: resources.routeNames.sorted()
        case TypeURL.clusterLoadAssignment: resources.edsClusterNames.sorted()
        default: []
        }
    }

    static func mergeStateOfTheWorld(
        _ message: Envoy_Service_Discovery_V3_DiscoveryResponse,
        into resources: inout XDSResources
    ) throws {
        let type = short(message.typeURL)
        func decode<M: SwiftProtobuf.Message>(_ kind: M.Type, _ any: Google_Protobuf_Any) throws -> M {
            guard any.typeURL == message.typeURL else {
                throw XDSTranslator.Failure("a resource is a \(any.typeURL), expected \(message.typeURL)")
            }
            do {
                return try M(serializedBytes: any.value)
            } catch {
                throw XDSTranslator.Failure("a \(type) resource cannot be decoded: \(error)")
            }
        }
        // State of the world: resources carry no version of their own; the digest of their bytes.
        func note(_ name: String, _ any: Google_Protobuf_Any) {
            resources.received["\(type)/\(name)"] = digest(any.value)
        }
        switch message.typeURL {
        case TypeURL.listener:
            var all: [String: Envoy_Config_Listener_V3_Listener] = [:]
            for any in message.resources {
                let l = try decode(Envoy_Config_Listener_V3_Listener.self, any)
                all[l.name] = l
                note(l.name, any)
            }
            resources.listeners = all
        case TypeURL.cluster:
            var all: [String: Envoy_Config_Cluster_V3_Cluster] = [:]
            for any in message.resources {
                let c = try decode(Envoy_Config_Cluster_V3_Cluster.self, any)
                all[c.name] = c
                note(c.name, any)
            }
            resources.clusters = all
        case TypeURL.routeConfiguration:
            for any in message.resources {
                let r = try decode(Envoy_Config_Route_V3_RouteConfiguration.self, any)
                resources.routes[r.name] = r
                note(r.name, any)
            }
        case TypeURL.clusterLoadAssignment:
            for any in message.resources {
                let a = try decode(Envoy_Config_Endpoint_V3_ClusterLoadAssignment.self, any)
                resources.endpoints[a.clusterName] = a
                note(a.clusterName, any)
            }
        default:
            throw XDSTranslator.Failure("unknown type \(message.typeURL)")
        }
    }

    private func recordNACK(_ type: String, _ version: String, _ reason: String) {
        state.withLock {
            $0.lastNACK = "\(type) \(version): \(reason)"
            $0.nacks += 1
        }
        metrics.nacks.increment()
        logger.error(
            "configuration from pilot refused (NACK); the last good one keeps serving",
            metadata: ["xds.type": "\(type)", "error": "\(reason)"]
        )
    }

    private func nack(
        _ message: Envoy_Service_Discovery_V3_DeltaDiscoveryResponse,
        _ reason: String,
        sink: AsyncStream<Envoy_Service_Discovery_V3_DeltaDiscoveryRequest>.Continuation,
        node: Envoy_Config_Core_V3_Node
    ) {
        recordNACK(Self.short(message.typeURL), message.systemVersionInfo, reason)
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

    // MARK: Last known good

    /// What is saved after each applied configuration: pilot's part of it (clusters and the
    /// outbound listener's per-port routes); the listeners themselves come from agent.yaml.
    struct Persisted: Codable {
        var version: String
        var savedAt: Date
        var clusters: [ClusterConfig]
        var portVirtualHosts: [Int: [VirtualHost]]

        enum CodingKeys: String, CodingKey {
            case version, savedAt = "saved_at", clusters, portVirtualHosts = "port_virtual_hosts"
        }
    }

    /// Saves `config` (temporary file, then rename: a crash leaves the old file or the new one).
    /// Saves `config` soon, off the caller's path; newer ones replace one still waiting.
    private func save(_ config: ProxyConfig) {
        guard persistPath != nil else { return }
        let start = saving.withLock { state -> Bool in
            state.pending = config
            if state.writing { return false }
            state.writing = true
            return true
        }
        guard start else { return }
        Task.detached {
            while let next = self.saving.withLock({ state -> ProxyConfig? in
                let next = state.pending
                state.pending = nil
                if next == nil { state.writing = false }
                return next
            }) {
                self.write(next)
                try? await Task.sleep(for: .seconds(1))
            }
        }
    }

    private func write(_ config: ProxyConfig) {
        guard let persistPath else { return }
        let saved = Persisted(
            version: config.version,
            savedAt: Date(),
            clusters: config.clusters,
            portVirtualHosts: config.listeners.first { $0.name == "outbound" }?.portVirtualHosts ?? [:]
        )
        do {
            let data = try JSONEncoder().encode(saved)
            // A name of its own: the shutdown flush may overlap the background writer.
            let temporary = persistPath + ".tmp-\(UInt32.random(in: 0...UInt32.max))"
            try data.write(to: URL(fileURLWithPath: temporary))
            guard rename(temporary, persistPath) == 0 else {
                let code = errno
                unlink(temporary)
                throw XDSTranslator.Failure("rename to \(persistPath) failed (errno \(code))")
            }
        } catch {
            logger.warning(
                "could not save the configuration",
                metadata: ["file": "\(persistPath)", "error": "\(error)"]
            )
        }
    }

    /// At start, before pilot answers: the configuration saved last time, if there is one and it
    /// is still valid with this agent's listeners. A damaged file is reported and ignored.
    private func loadPersisted() async {
        guard let persistPath, let data = FileManager.default.contents(atPath: persistPath) else { return }
        do {
            let saved = try JSONDecoder().decode(Persisted.self, from: data)
            var config = base
            config.version = saved.version
            config.clusters = saved.clusters
            if let outbound = config.listeners.firstIndex(where: { $0.name == "outbound" }) {
                config.listeners[outbound].portVirtualHosts = saved.portVirtualHosts
            }
            try await apply(config)
            state.withLock {
                $0.appliedVersion = saved.version
                $0.source = "disk"
            }
            metrics.savedConfig.record(1)
            logger.notice(
                "serving the configuration saved before the restart until pilot answers",
                metadata: [
                    "file": "\(persistPath)", "config.version": "\(saved.version)", "saved_at": "\(saved.savedAt)",
                ]
            )
        } catch {
            logger.error(
                "the saved configuration cannot be used; passthrough until pilot answers",
                metadata: ["file": "\(persistPath)", "error": "\(error)"]
            )
        }
    }

    /// Adds, replaces and removes the response's resources; an undecodable one fails the whole
    /// response (nothing of it is kept).
    static func merge(
        _ message: Envoy_Service_Discovery_V3_DeltaDiscoveryResponse,
        into resources: inout XDSResources
    ) throws {
        let type = short(message.typeURL)
        func decode<M: SwiftProtobuf.Message>(_ kind: M.Type, _ r: Envoy_Service_Discovery_V3_Resource) throws -> M {
            guard r.resource.typeURL == message.typeURL else {
                throw XDSTranslator.Failure(
                    "resource '\(r.name)' is a \(r.resource.typeURL), expected \(message.typeURL)"
                )
            }
            let decoded: M
            do {
                decoded = try M(serializedBytes: r.resource.value)
            } catch {
                throw XDSTranslator.Failure("resource '\(r.name)' cannot be decoded: \(error)")
            }
            resources.received["\(type)/\(r.name)"] = r.version.isEmpty ? digest(r.resource.value) : r.version
            return decoded
        }
        for name in message.removedResources { resources.received.removeValue(forKey: "\(type)/\(name)") }
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

    /// FNV-1a (64-bit) of bytes, in hex.
    static func digest(_ bytes: Data) -> String {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        bytes.withUnsafeBytes { raw in
            for b in raw {
                hash ^= UInt64(b)
                hash &*= 0x100_0000_01b3
            }
        }
        return String(hash, radix: 16)
    }

    /// A digest of every resource: the same resources always give the same version. Built from
    /// each resource's version as received (pilot's, or a digest of its bytes); a resource with
    /// none (made here, not received) is encoded for it.
    static func version(of resources: XDSResources) -> String {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        func add(_ text: String) {
            for b in text.utf8 {
                hash ^= UInt64(b)
                hash &*= 0x100_0000_01b3
            }
            hash ^= 0xff
            hash &*= 0x100_0000_01b3
        }
        func addAll<M: SwiftProtobuf.Message>(_ type: String, _ map: [String: M]) {
            for key in map.keys.sorted() {
                add(key)
                if let version = resources.received["\(type)/\(key)"] {
                    add(version)
                } else {
                    add(digest(Data((try? map[key]!.serializedBytes() as [UInt8]) ?? [])))
                }
            }
        }
        addAll("lds", resources.listeners)
        addAll("rds", resources.routes)
        addAll("cds", resources.clusters)
        addAll("eds", resources.endpoints)
        return "xds-" + String(hash, radix: 16)
    }
}
