public import Etcd
public import TrellisConfig

/// `/etc/trellis/pilot.yaml`: where pilot listens, which files and sources it reads, and its
/// registry store (the embedded SQLite file, or an etcd cluster shared with other pilots; see
/// docs/ha.md). Every key is optional; `trellis-pilot serve`'s flags override the file.
///
/// ```yaml
/// xds_address: 0.0.0.0:15010
/// http_address: 0.0.0.0:15014
/// mesh: /etc/trellis/mesh.yaml
/// debounce: 100ms
/// log_level: info
/// cmdb: {url: http://cmdb.internal/machines, interval: 30s}
/// store:
///   backend: etcd            # sqlite (the default), etcd, or memory
///   path: /var/lib/trellis/pilot.db    # sqlite only
///   etcd:
///     endpoints: [10.0.0.1:2379, 10.0.0.2:2379, 10.0.0.3:2379]
///     prefix: /trellis/
///     call_timeout: 5s
///     tls: {ca_file: …, cert_file: …, key_file: …, server_name: …}
/// ```
public struct PilotConfig: Sendable {
    public enum Store: Sendable, Equatable {
        case sqlite(path: String)
        case memory
        case etcd(EtcdSettings)
    }

    public struct EtcdSettings: Sendable, Equatable {
        public var endpoints: [EtcdEndpoint]
        public var prefix = "/trellis/"
        public var callTimeout: Duration = .seconds(5)
        public var tls: EtcdTLS?

        public init(endpoints: [EtcdEndpoint]) {
            self.endpoints = endpoints
        }
    }

    public static let defaultPath = "/etc/trellis/pilot.yaml"
    public static let defaultStorePath = "/var/lib/trellis/pilot.db"

    public var xdsAddress: (host: String, port: Int) = ("0.0.0.0", PilotPorts.xds)
    public var httpAddress: (host: String, port: Int) = ("0.0.0.0", PilotPorts.http)
    public var mesh = "/etc/trellis/mesh.yaml"
    public var debounce: Duration = .milliseconds(100)
    public var logLevel = "info"
    public var cmdbURL: String?
    public var cmdbInterval: Duration = .seconds(30)
    public var store: Store = .sqlite(path: PilotConfig.defaultStorePath)

    public init() {}

    static let logLevels = ["trace", "debug", "info", "notice", "warning", "error", "critical"]

    /// Reads a pilot.yaml; every error names the file, the line, the key path and what was
    /// expected.
    public static func parse(yaml: String, file: String) throws(ConfigFileError) -> PilotConfig {
        var config = PilotConfig()
        // Only comments (or nothing): every default.
        let content = yaml.split(separator: "\n").contains {
            let line = $0.drop { $0 == " " || $0 == "\t" }
            return !line.isEmpty && !line.hasPrefix("#") && line != "---"
        }
        guard content else { return config }
        let root = try ConfigNode.root(yaml: yaml, file: file)
        let keys = try root.mapping(allowed: [
            "xds_address", "http_address", "mesh", "debounce", "log_level", "cmdb", "store",
        ])
        if let n = keys["xds_address"] { config.xdsAddress = try n.endpoint(portRange: 0...65535) }
        if let n = keys["http_address"] { config.httpAddress = try n.endpoint(portRange: 0...65535) }
        if let n = keys["mesh"] { config.mesh = try n.nonEmptyString() }
        if let n = keys["debounce"] {
            config.debounce = try n.duration()
            guard config.debounce <= .seconds(10) else { throw n.error("expected at most 10s") }
        }
        if let n = keys["log_level"] {
            let level = try n.string()
            guard logLevels.contains(level) else {
                throw n.error("expected one of \(logLevels.joined(separator: ", ")), got '\(level)'")
            }
            config.logLevel = level
        }
        if let n = keys["cmdb"] {
            let cmdb = try n.mapping(allowed: ["url", "interval"])
            config.cmdbURL = try cmdb.required("url", in: n).nonEmptyString()
            if let i = cmdb["interval"] {
                config.cmdbInterval = try i.duration()
                guard config.cmdbInterval >= .seconds(1), config.cmdbInterval <= .seconds(86_400) else {
                    throw i.error("expected 1s to 24h")
                }
            }
        }
        if let n = keys["store"] { config.store = try store(n) }
        return config
    }

    private static func store(_ node: ConfigNode) throws(ConfigFileError) -> Store {
        let keys = try node.mapping(allowed: ["backend", "path", "etcd"])
        let backend = try keys["backend"]?.string() ?? "sqlite"
        switch backend {
        case "sqlite":
            if let e = keys["etcd"] { throw e.error("only with backend: etcd") }
            return .sqlite(path: try keys["path"]?.nonEmptyString() ?? defaultStorePath)
        case "memory":
            if let k = keys["path"] ?? keys["etcd"] { throw k.error("not with backend: memory") }
            return .memory
        case "etcd":
            if let p = keys["path"] { throw p.error("only with backend: sqlite") }
            guard let e = keys["etcd"] else {
                throw node.error("backend etcd needs an 'etcd' mapping with its endpoints")
            }
            return .etcd(try etcd(e))
        default:
            throw keys["backend"]!.error("expected sqlite, etcd or memory, got '\(backend)'")
        }
    }

    private static func etcd(_ node: ConfigNode) throws(ConfigFileError) -> EtcdSettings {
        let keys = try node.mapping(allowed: ["endpoints", "prefix", "call_timeout", "tls"])
        let list = try keys.required("endpoints", in: node).sequence()
        guard !list.isEmpty else { throw keys["endpoints"]!.error("expected at least one endpoint") }
        var endpoints: [EtcdEndpoint] = []
        for item in list {
            do {
                endpoints.append(try EtcdEndpoint(parsing: try item.string()))
            } catch let error as ConfigFileError {
                throw error
            } catch {
                throw item.error((error as? EtcdError)?.underlying ?? "\(error)")
            }
        }
        var settings = EtcdSettings(endpoints: endpoints)
        if let p = keys["prefix"] {
            let prefix = try p.nonEmptyString()
            guard prefix.hasPrefix("/") else {
                throw p.error("expected a key prefix starting with '/', got '\(prefix)'")
            }
            settings.prefix = prefix.hasSuffix("/") ? prefix : prefix + "/"
        }
        if let t = keys["call_timeout"] {
            settings.callTimeout = try t.duration()
            guard settings.callTimeout >= .milliseconds(100), settings.callTimeout <= .seconds(60) else {
                throw t.error("expected 100ms to 60s")
            }
        }
        if let t = keys["tls"] {
            let tls = try t.mapping(allowed: ["ca_file", "cert_file", "key_file", "server_name"])
            var settingsTLS = EtcdTLS()
            settingsTLS.caFile = try tls["ca_file"]?.nonEmptyString()
            settingsTLS.certFile = try tls["cert_file"]?.nonEmptyString()
            settingsTLS.keyFile = try tls["key_file"]?.nonEmptyString()
            settingsTLS.serverName = try tls["server_name"]?.nonEmptyString()
            if (settingsTLS.certFile == nil) != (settingsTLS.keyFile == nil) {
                throw t.error("cert_file and key_file go together (the client's certificate and its key)")
            }
            settings.tls = settingsTLS
        }
        return settings
    }
}
