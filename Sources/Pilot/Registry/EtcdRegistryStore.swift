public import Etcd
import FoundationEssentials
public import Logging
import Synchronization
import TrellisPolicy

/// The registry on etcd, shared by every pilot (docs/ha.md). Under the key prefix (`/trellis/`
/// by default):
///   - `instances/{service}/{address}/{port}`: one JSON document per agent registration, on its
///     own etcd lease of the registration's TTL (renewing the registration renews the lease;
///     when it runs out etcd deletes the key, once, and every pilot's watch sees it);
///   - `machines`: the CMDB's machine metadata, one JSON document written by the elected pilot.
/// Multi-key updates are transactions guarded by each key's revision.
public final class EtcdRegistryStore: SharedRegistryStore {
    public let client: EtcdClient
    public let prefix: String
    private let logger: Logger
    /// Each instance key's lease, as last read or written.
    private let leases = Mutex<[InstanceKey: (id: Int64, ttl: Int64)]>([:])

    public init(client: EtcdClient, prefix: String = "/trellis/", logger: Logger) {
        self.client = client
        self.prefix = prefix.hasSuffix("/") ? prefix : prefix + "/"
        self.logger = logger
    }

    var instancesPrefix: String { prefix + "instances/" }
    var machinesKey: String { prefix + "machines" }

    // MARK: Keys and documents

    /// `/` and `%` in a key's parts are percent-encoded, so every part reads back as written.
    static func escape(_ part: String) -> String {
        var out = ""
        for c in part.unicodeScalars {
            switch c {
            case "%": out += "%25"
            case "/": out += "%2F"
            default: out.unicodeScalars.append(c)
            }
        }
        return out
    }

    static func unescape(_ part: Substring) -> String {
        String(part.replacing("%2F", with: "/").replacing("%25", with: "%"))
    }

    func key(_ k: InstanceKey) -> String {
        instancesPrefix + [k.service, k.address, "\(k.port)"].map(Self.escape).joined(separator: "/")
    }

    func instanceKey(_ key: String) -> InstanceKey? {
        guard key.hasPrefix(instancesPrefix) else { return nil }
        let parts = key.dropFirst(instancesPrefix.count).split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 3, let port = Int(parts[2]) else { return nil }
        return InstanceKey(service: Self.unescape(parts[0]), address: Self.unescape(parts[1]), port: port)
    }

    struct StoredInstance: Codable {
        var service: String
        var address: String
        var port: Int
        var service_port: Int
        var `protocol`: ServiceProtocol
        var node: String
        var locality: Locality
        var labels: [String: String]
        var weight: Int
        var status: InstanceStatus
        var lease_ttl_ms: Int?
    }

    static func encode(_ i: Instance) throws -> [UInt8] {
        let stored = StoredInstance(
            service: i.key.service,
            address: i.key.address,
            port: i.key.port,
            service_port: i.servicePort,
            protocol: i.serviceProtocol,
            node: i.node,
            locality: i.locality,
            labels: i.labels,
            weight: i.weight,
            status: i.status,
            lease_ttl_ms: i.leaseTTL.map { Int($0.seconds * 1000) }
        )
        return Array(try sortedEncoder().encode(stored))
    }

    /// JSON with its keys in order: the same instance is always the same bytes (a write is
    /// recognized by its value).
    static func sortedEncoder() -> JSONEncoder {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        return encoder
    }

    func decode(_ kv: EtcdKeyValue) throws -> Instance {
        let s: StoredInstance
        do {
            s = try JSONDecoder().decode(StoredInstance.self, from: Data(kv.value))
        } catch {
            throw RegistryStoreError(operation: "reading \(kv.key)", underlying: "not an instance document: \(error)")
        }
        let instance = Instance(
            key: InstanceKey(service: s.service, address: s.address, port: s.port),
            servicePort: s.service_port,
            serviceProtocol: s.protocol,
            node: s.node,
            locality: s.locality,
            labels: s.labels,
            weight: s.weight,
            status: s.status,
            source: .agent,
            leaseTTL: s.lease_ttl_ms.map { .milliseconds($0) },
            leaseExpiresAt: nil
        )
        guard key(instance.key) == kv.key else {
            throw RegistryStoreError(operation: "reading \(kv.key)", underlying: "its document names \(instance.key)")
        }
        return instance
    }

    struct StoredMachine: Codable {
        var locality: Locality
        var labels: [String: String]
    }

    func decodeMachines(_ kv: EtcdKeyValue) throws -> [String: MachineMetadata] {
        do {
            return try JSONDecoder().decode([String: StoredMachine].self, from: Data(kv.value)).mapValues {
                MachineMetadata(locality: $0.locality, labels: $0.labels)
            }
        } catch {
            throw RegistryStoreError(operation: "reading \(kv.key)", underlying: "not a machines document: \(error)")
        }
    }

    // MARK: RegistryStore

    public func loadInstances() async throws -> [Instance] {
        try await snapshot().instances.map(\.instance)
    }

    public func write(upserts: [Instance], deletions: [InstanceKey]) async throws {
        _ = try await write(upserts: upserts, deletions: deletions, expected: nil)
    }

    // MARK: SharedRegistryStore

    public func snapshot() async throws -> SharedSnapshot {
        let listed: (values: [EtcdKeyValue], revision: Int64)
        do {
            listed = try await client.list(prefix: prefix)
        } catch {
            throw RegistryStoreError(operation: "loading \(prefix)", underlying: "\(error)")
        }
        var instances: [(instance: Instance, revision: Int64)] = []
        var machines: [String: MachineMetadata] = [:]
        var leased: [InstanceKey: (id: Int64, ttl: Int64)] = [:]
        for kv in listed.values {
            if kv.key == machinesKey {
                machines = try decodeMachines(kv)
            } else if kv.key.hasPrefix(instancesPrefix) {
                let instance = try decode(kv)
                instances.append((instance, kv.modRevision))
                if kv.lease != 0 { leased[instance.key] = (kv.lease, Self.ttlSeconds(instance)) }
            }
        }
        leases.withLock { $0 = leased }
        return SharedSnapshot(instances: instances, machines: machines, revision: listed.revision)
    }

    static func ttlSeconds(_ instance: Instance) -> Int64 {
        max(1, Int64((instance.leaseTTL?.seconds ?? 0).rounded(.up)))
    }

    public func write(
        upserts: [Instance],
        deletions: [InstanceKey],
        expected: [InstanceKey: Int64]?
    ) async throws -> Int64 {
        let operation = "writing \(upserts.count) instance(s), deleting \(deletions.count)"
        do {
            // Leases: a registration keeps its instance's lease while the TTL is the same; a
            // new one (or a new TTL) gets a new lease, and the old one is revoked after.
            var known = leases.withLock { $0 }
            var granted: [InstanceKey: (id: Int64, ttl: Int64)] = [:]
            for instance in upserts where instance.leaseTTL != nil {
                let ttl = Self.ttlSeconds(instance)
                if let lease = known[instance.key], lease.ttl == ttl { continue }
                granted[instance.key] = (try await client.grantLease(ttl: ttl).id, ttl)
            }
            let upserted = Set(upserts.map(\.key))
            let touched = upserted.union(deletions)
            var compare: [Etcdserverpb_Compare] = []
            if let expected {
                for k in touched where expected[k] != nil || upserted.contains(k) {
                    var c = Etcdserverpb_Compare()
                    c.key = Data(key(k).utf8)
                    c.target = .mod
                    c.result = .equal
                    c.modRevision = expected[k] ?? 0
                    compare.append(c)
                }
            }
            var ops: [Etcdserverpb_RequestOp] = []
            var written: [String: [UInt8]] = [:]
            for instance in upserts {
                var op = Etcdserverpb_RequestOp()
                let value = try Self.encode(instance)
                op.requestPut.key = Data(key(instance.key).utf8)
                op.requestPut.value = Data(value)
                op.requestPut.lease = (granted[instance.key] ?? known[instance.key])?.id ?? 0
                written[key(instance.key)] = value
                ops.append(op)
            }
            for k in deletions {
                var op = Etcdserverpb_RequestOp()
                op.requestDeleteRange.key = Data(key(k).utf8)
                ops.append(op)
            }
            let response = try await client.transaction(operation, compare: compare, success: ops)
            var revision = response.header.revision
            if !response.succeeded {
                // Either another pilot changed a key first, or an earlier attempt of this same
                // write was applied before its answer was lost: then every key reads as written.
                var current: [String: EtcdKeyValue] = [:]
                for k in touched { current[key(k)] = try await client.get(key(k)) }
                let applied =
                    upserts.allSatisfy { current[key($0.key)]?.value == written[key($0.key)] }
                    && deletions.allSatisfy { current[key($0)] == nil }
                guard applied else {
                    for lease in granted.values { try? await client.revoke(lease.id) }
                    throw RegistryStoreError(
                        operation: operation,
                        underlying: "another pilot changed these instances at the same time; nothing was written",
                        conflict: true
                    )
                }
                revision = current.values.map(\.modRevision).max() ?? revision
            }
            for k in granted.keys {
                if let old = known[k] { try? await client.revoke(old.id) }  // the key moved to its new lease
            }
            for k in deletions {
                if let lease = known[k] { try? await client.revoke(lease.id) }
                known[k] = nil
            }
            known.merge(granted) { _, new in new }
            let final = known
            leases.withLock { $0 = final }
            return revision
        } catch let error as RegistryStoreError {
            throw error
        } catch {
            throw RegistryStoreError(operation: operation, underlying: "\(error)")
        }
    }

    public func renew(_ key: InstanceKey) async throws -> Bool {
        guard let lease = leases.withLock({ $0[key] }) else { return false }
        do {
            return try await client.keepAlive(lease.id) != nil
        } catch {
            throw RegistryStoreError(operation: "renewing \(key)'s lease", underlying: "\(error)")
        }
    }

    public func writeMachines(_ machines: [String: MachineMetadata]) async throws -> Int64 {
        do {
            let document = try Self.sortedEncoder().encode(
                machines.mapValues { StoredMachine(locality: $0.locality, labels: $0.labels) }
            )
            return try await client.put(machinesKey, Array(document))
        } catch {
            throw RegistryStoreError(operation: "writing the machine metadata", underlying: "\(error)")
        }
    }

    public func changes(after revision: Int64) -> AsyncStream<[SharedChange]> {
        let (stream, continuation) = AsyncStream<[SharedChange]>.makeStream()
        let task = Task {
            var from = revision + 1
            while !Task.isCancelled {
                do {
                    for try await events in client.watch(prefix: prefix, from: from) {
                        let changes = events.compactMap(change)
                        if let last = events.last { from = last.revision + 1 }
                        if !changes.isEmpty { continuation.yield(changes) }
                    }
                    if Task.isCancelled { break }
                } catch {
                    // Compacted past where the watch would resume: everything is read again.
                    logger.warning("registry watch must resync", metadata: ["error": "\(error)"])
                    while !Task.isCancelled {
                        do {
                            let snapshot = try await self.snapshot()
                            continuation.yield([.reset(snapshot)])
                            from = snapshot.revision + 1
                            break
                        } catch {
                            logger.warning("registry resync failed; retrying", metadata: ["error": "\(error)"])
                            try? await Task.sleep(for: .seconds(1))
                        }
                    }
                }
            }
            continuation.finish()
        }
        continuation.onTermination = { _ in task.cancel() }
        return stream
    }

    /// The registry change an etcd event makes, recording its lease; nil (logged) for a key that
    /// is not the registry's or a document that does not decode.
    private func change(_ event: EtcdEvent) -> SharedChange? {
        switch event {
        case .put(let kv) where kv.key == machinesKey:
            do {
                return .machines(try decodeMachines(kv), revision: kv.modRevision)
            } catch {
                logger.error("ignoring the machine metadata in etcd", metadata: ["error": "\(error)"])
                return nil
            }
        case .put(let kv):
            guard instanceKey(kv.key) != nil else { return nil }
            do {
                let instance = try decode(kv)
                leases.withLock {
                    if kv.lease != 0 {
                        $0[instance.key] = (kv.lease, Self.ttlSeconds(instance))
                    } else {
                        $0[instance.key] = nil
                    }
                }
                return .upsert(instance, revision: kv.modRevision)
            } catch {
                logger.error("ignoring an instance in etcd", metadata: ["error": "\(error)"])
                return nil
            }
        case .delete(let k, let revision) where k == machinesKey:
            return .machines([:], revision: revision)
        case .delete(let k, let revision):
            guard let key = instanceKey(k) else { return nil }
            leases.withLock { $0[key] = nil }
            return .delete(key, revision: revision)
        }
    }

    public func readiness() async -> String? {
        do {
            _ = try await client.revision(timeout: .seconds(2))
            return nil
        } catch {
            return "\(error)"
        }
    }
}
