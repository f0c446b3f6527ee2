import FoundationEssentials
public import Logging

/// Keeps every connected node's snapshot current: when the registry changes, waits out the
/// debounce window (changes arriving meanwhile are coalesced into one push), translates the new
/// view once for everything the nodes share, builds each node's snapshot, checks it is consistent
/// and sets it in the cache, which wakes only the nodes whose snapshot changed.
public actor SnapshotGenerator: NodeSnapshotSource {
    private let registry: Registry
    private let cache: SnapshotCache
    private let logger: Logger
    private let debounce: Duration
    private let metrics: PilotMetrics
    private var shared: Translator.Shared?
    private var translationCache = Translator.Cache()
    private var nodes: [String: (info: NodeInfo, streams: Int)] = [:]
    /// The last translation problems, shown in `/debug/configz`.
    public private(set) var warnings: [String] = []

    public init(
        registry: Registry,
        cache: SnapshotCache,
        logger: Logger,
        debounce: Duration = .milliseconds(100),
        metrics: PilotMetrics = .init()
    ) {
        self.metrics = metrics
        self.registry = registry
        self.cache = cache
        self.logger = logger
        self.debounce = debounce
    }

    /// Follows the registry until cancelled.
    public func run() async {
        let (id, versions) = await registry.watch()
        for await _ in versions {
            try? await Task.sleep(for: debounce)
            if Task.isCancelled { break }
            await rebuild()
        }
        await registry.unwatch(id)
    }

    public func nodeConnected(_ node: NodeInfo) async {
        if let known = nodes[node.id], known.info != node {
            logger.notice(
                "node reconnected with another role",
                metadata: ["xds.node": "\(node.id)", "role": "\(node.role)"]
            )
        }
        nodes[node.id] = (node, (nodes[node.id]?.streams ?? 0) + 1)
        // A node that connects gets the registry as it is now, not as of the last push.
        let current = await registry.version
        if shared == nil || shared?.view.version != current { await translateShared() }
        guard let shared else { return }
        if let snapshot = makeSnapshot(node, shared, previous: await cache.snapshot(node.id)) {
            await cache.set(node.id, snapshot)
        }
    }

    public func nodeDisconnected(_ node: NodeInfo) async {
        guard let entry = nodes[node.id] else { return }
        if entry.streams <= 1 {
            nodes[node.id] = nil
            Translator.forget(node.id, cache: &translationCache)
            await cache.remove(node.id)
        } else {
            nodes[node.id] = (entry.info, entry.streams - 1)
        }
        metrics.nodes(nodes.count)
    }

    /// Translates the current view and updates every connected node.
    public func rebuild() async {
        let start = ContinuousClock.now
        await translateShared()
        guard let shared else { return }
        var batch: [(node: String, snapshot: NodeSnapshot)] = []
        batch.reserveCapacity(nodes.count)
        let previous = await cache.snapshots(nodes.keys)
        for (id, entry) in nodes {
            if let snapshot = makeSnapshot(entry.info, shared, previous: previous[id]) { batch.append((id, snapshot)) }
        }
        let changed = await cache.set(batch)
        let elapsed = ContinuousClock.now - start
        metrics.translated(seconds: elapsed.seconds)
        metrics.nodes(nodes.count)
        logger.debug(
            "pushed registry version",
            metadata: [
                "version": "\(shared.view.version)", "nodes": "\(nodes.count)", "changed": "\(changed)",
                "elapsed": "\(elapsed)",
            ]
        )
    }

    private func translateShared() async {
        let view = await registry.view()
        metrics.instances(view.services.reduce(0) { $0 + $1.instances.count })
        do {
            let new = try Translator.shared(view, cache: &translationCache)
            if new.warnings != warnings {
                for warning in new.warnings { logger.warning("translation", metadata: ["problem": "\(warning)"]) }
            }
            warnings = new.warnings
            guard new.problems.isEmpty else {
                metrics.inconsistent()
                logger.error(
                    "inconsistent translation not sent; nodes keep their configuration",
                    metadata: ["problems": "\(new.problems.joined(separator: "; "))"]
                )
                return
            }
            shared = new
        } catch {
            logger.error("translation failed; nodes keep their configuration", metadata: ["error": "\(error)"])
        }
    }

    /// The node's snapshot, or nil (logged, counted) when it is not consistent.
    private func makeSnapshot(_ node: NodeInfo, _ shared: Translator.Shared, previous: NodeSnapshot?) -> NodeSnapshot? {
        do {
            return try Translator.snapshot(for: node, shared: shared, cache: &translationCache, previous: previous)
        } catch {
            metrics.inconsistent()
            logger.error(
                "snapshot not sent; the node keeps its configuration",
                metadata: ["xds.node": "\(node.id)", "error": "\(error)"]
            )
            return nil
        }
    }

    public var connectedNodes: [NodeInfo] { nodes.values.map(\.info).sorted { $0.id < $1.id } }
}
