import FoundationEssentials
import GRDB
import TrellisPolicy

/// Where the registry keeps agent registrations so that a restarted pilot loses nothing. One
/// interface for the embedded SQLite store (one pilot) and the shared one several pilots use
/// (etcd, ``SharedRegistryStore``).
public protocol RegistryStore: Sendable {
    /// Every stored instance.
    func loadInstances() async throws -> [Instance]
    /// Inserts or replaces `upserts` and deletes `deletions`, in one transaction: all or nothing.
    func write(upserts: [Instance], deletions: [InstanceKey]) async throws
}

/// A store failure, with what was being done.
public struct RegistryStoreError: Error, CustomStringConvertible {
    public var operation: String
    public var underlying: String
    /// Another writer (pilot) changed what this write depended on; nothing was written.
    public var conflict: Bool

    public init(operation: String, underlying: String, conflict: Bool = false) {
        self.operation = operation
        self.underlying = underlying
        self.conflict = conflict
    }

    public var description: String { "registry store: \(operation) failed: \(underlying)" }
}

/// The embedded store: SQLite through GRDB (`/var/lib/trellis/pilot.db` by default), in WAL mode,
/// with versioned migrations.
public final class SQLiteRegistryStore: RegistryStore {
    private let writer: any DatabaseWriter

    /// Opens (creating if needed) the database at `path` and migrates it to the current schema.
    public init(path: String) throws {
        do {
            var configuration = Configuration()
            configuration.busyMode = .timeout(5)
            writer = try DatabasePool(path: path, configuration: configuration)  // WAL
            try Self.migrator.migrate(writer)
        } catch {
            throw RegistryStoreError(operation: "opening \(path)", underlying: "\(error)")
        }
    }

    /// A private in-memory database (tests, `--store memory`).
    public init() throws {
        writer = try DatabaseQueue()
        try Self.migrator.migrate(writer)
    }

    /// The journal mode SQLite reports (`wal` for a file store).
    public func journalMode() throws -> String {
        try writer.read { db in try String.fetchOne(db, sql: "PRAGMA journal_mode") ?? "" }
    }

    static var migrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1: instances") { db in
            try db.execute(
                sql: """
                    CREATE TABLE instance (
                        service TEXT NOT NULL,
                        address TEXT NOT NULL,
                        port INTEGER NOT NULL,
                        service_port INTEGER NOT NULL,
                        protocol TEXT NOT NULL,
                        node TEXT NOT NULL,
                        region TEXT NOT NULL,
                        zone TEXT NOT NULL,
                        subzone TEXT NOT NULL,
                        labels TEXT NOT NULL,
                        weight INTEGER NOT NULL,
                        status TEXT NOT NULL,
                        lease_ttl_ms INTEGER,
                        lease_expires_at REAL,
                        PRIMARY KEY (service, address, port)
                    )
                    """
            )
        }
        return migrator
    }

    public func loadInstances() throws -> [Instance] {
        do {
            return try writer.read { db in
                try Row.fetchAll(db, sql: "SELECT * FROM instance ORDER BY service, address, port").map(Self.instance)
            }
        } catch let error as RegistryStoreError {
            throw error
        } catch {
            throw RegistryStoreError(operation: "loading instances", underlying: "\(error)")
        }
    }

    public func write(upserts: [Instance], deletions: [InstanceKey]) throws {
        do {
            try writer.write { db in
                for key in deletions {
                    try db.execute(
                        sql: "DELETE FROM instance WHERE service = ? AND address = ? AND port = ?",
                        arguments: [key.service, key.address, key.port]
                    )
                }
                for instance in upserts {
                    let labels = String(decoding: try JSONEncoder().encode(instance.labels), as: UTF8.self)
                    let ttl = instance.leaseTTL.map {
                        Int($0.components.seconds * 1000 + $0.components.attoseconds / 1_000_000_000_000_000)
                    }
                    try db.execute(
                        sql: """
                            INSERT OR REPLACE INTO instance
                            (service, address, port, service_port, protocol, node, region, zone, subzone,
                             labels, weight, status, lease_ttl_ms, lease_expires_at)
                            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                            """,
                        arguments: [
                            instance.key.service, instance.key.address, instance.key.port, instance.servicePort,
                            instance.serviceProtocol.rawValue, instance.node, instance.locality.region,
                            instance.locality.zone, instance.locality.subzone, labels, instance.weight,
                            instance.status.rawValue, ttl, instance.leaseExpiresAt,
                        ]
                    )
                }
            }
        } catch {
            throw RegistryStoreError(
                operation: "writing \(upserts.count) instance(s), deleting \(deletions.count)",
                underlying: "\(error)"
            )
        }
    }

    private static func instance(_ row: Row) throws -> Instance {
        let key = InstanceKey(service: row["service"], address: row["address"], port: row["port"])
        let protocolName: String = row["protocol"]
        let statusName: String = row["status"]
        guard let serviceProtocol = ServiceProtocol(rawValue: protocolName),
            let status = InstanceStatus(rawValue: statusName)
        else {
            throw RegistryStoreError(
                operation: "loading \(key)",
                underlying: "unknown protocol '\(protocolName)' or status '\(statusName)'"
            )
        }
        let labelsText: String = row["labels"]
        let labels = try JSONDecoder().decode([String: String].self, from: Data(labelsText.utf8))
        let ttl: Int? = row["lease_ttl_ms"]
        return Instance(
            key: key,
            servicePort: row["service_port"],
            serviceProtocol: serviceProtocol,
            node: row["node"],
            locality: Locality(region: row["region"], zone: row["zone"], subzone: row["subzone"]),
            labels: labels,
            weight: row["weight"],
            status: status,
            source: .agent,
            leaseTTL: ttl.map { .milliseconds($0) },
            leaseExpiresAt: row["lease_expires_at"]
        )
    }
}
