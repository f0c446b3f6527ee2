public import Interceptor
public import TrellisConfig
public import TrellisPolicy

/// `/etc/trellis/agent.yaml`: who this machine is, where pilot is, the local services to register
/// and health-check, capture settings, and the drain deadline. See `examples/agent.yaml`.
public struct AgentConfig: Sendable {
    /// This machine's node id (pilot's `node`); the executable defaults it to the hostname.
    public var node: String?
    /// The pilots' HTTP API and xDS addresses (`pilot.api`, `pilot.xds`: one, or a list of
    /// pilots that share a store, tried in turn; a DNS name stands for each of its addresses).
    /// Empty: none.
    public var pilotAPI: [HostPort] = []
    public var pilotXDS: [HostPort] = []
    /// The address peers reach this machine's services at, as registered with pilot.
    public var registerAddress: String?
    /// Lease length for registrations; renewed every third of it.
    public var leaseTTL: Duration = .seconds(30)
    public var services: [LocalService] = []
    /// Where this machine runs (`locality: {region, zone, subzone}`): registered with its
    /// instances and sent to pilot with its xDS requests, so that it is served its own zone's
    /// endpoints first.
    public var locality = Locality()
    public var capture = CaptureConfig.installedDefault
    public var drainDeadline: Duration = .seconds(30)
    /// Where the inbound listener sends captured connections: the local program on `127.0.0.1` or
    /// `::1` (`inbound_forward: loopback`, the default) or, with `original_destination`, the
    /// address the client dialed, for programs that listen only on the machine's own address.
    public var inboundForward: AgentListeners.InboundForward = .loopback
    /// Where the agent keeps what must survive a restart (the last configuration from pilot).
    public var stateDirectory = "/var/lib/trellis"
    /// Incremental ADS (the default) or state of the world (`pilot.xds_protocol: sotw`).
    public var xdsProtocol: XDSClient.XDSProtocol = .delta
    /// The most endpoints (over all clusters) the agent takes from pilot (`pilot.max_endpoints`);
    /// a configuration with more is refused (NACKed), keeping the agent's memory bounded.
    public var maxEndpoints: Int = XDSClient.defaultMaxEndpoints
    /// The admin HTTP listener (`/ready`, `/stats/prometheus`, `/config_dump`): loopback unless
    /// configured (`admin.address`), e.g. `0.0.0.0:15000` for a remote Prometheus.
    public var adminAddress = HostPort(host: "127.0.0.1", port: 15000)
    /// The access log of every listener (`access_log`); none when absent. Applies at start only.
    public var accessLog: AccessLogSettings?
    /// Spans of every request, exported over OTLP/gRPC (`tracing`); none when absent. Applies at
    /// start only.
    public var tracing: TracingSettings?

    public init() {}
}

public struct HostPort: Sendable, Hashable, CustomStringConvertible {
    public var host: String
    public var port: Int
    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }
    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

/// A service of this machine: the local port its (unmodified) program listens on.
public struct LocalService: Sendable, Hashable {
    public var name: String
    /// Where the local program listens (on 127.0.0.1 and the registered address).
    public var port: Int
    /// The port clients dial; defaults to `port`.
    public var servicePort: Int
    public var serviceProtocol: ServiceProtocol
    public var labels: [String: String]
    public var weight: Int
    public var healthCheck: HealthCheck?

    public init(
        name: String,
        port: Int,
        servicePort: Int? = nil,
        serviceProtocol: ServiceProtocol = .http,
        labels: [String: String] = [:],
        weight: Int = 1,
        healthCheck: HealthCheck? = nil
    ) {
        self.name = name
        self.port = port
        self.servicePort = servicePort ?? port
        self.serviceProtocol = serviceProtocol
        self.labels = labels
        self.weight = weight
        self.healthCheck = healthCheck
    }
}

/// Reads the whole agent.yaml. Parsing only: the executable reads the file.
public enum AgentConfigLoader {
    static let topLevelKeys: Set<String> = [
        "node", "pilot", "register", "services", "capture", "drain_deadline", "inbound_forward", "state_dir",
        "admin", "locality", "access_log", "tracing",
    ]

    /// - Throws: ``ConfigFileErrors`` naming file, line, key path and what was expected.
    public static func parse(yaml: String, file: String) throws(ConfigFileErrors) -> AgentConfig {
        var config = AgentConfig()
        let root: ConfigNode
        do {
            root = try ConfigNode.root(yaml: yaml, file: file)
        } catch {
            throw ConfigFileErrors([error])
        }
        do throws(ConfigFileError) {
            let top = try root.mapping(allowed: topLevelKeys)
            if let n = top["locality"] {
                config.locality = try Locality.decode(try n.mapping(allowed: ["region", "zone", "subzone"]))
            }
            if let n = top["node"] {
                let id = try n.nonEmptyString()
                guard Names.isValidNodeID(id) else {
                    throw n.error("expected printable ASCII without spaces or '/', at most 253 bytes")
                }
                config.node = id
            }
            if let n = top["pilot"] {
                let p = try n.mapping(allowed: ["api", "xds", "xds_protocol", "max_endpoints"])
                if let m = p["max_endpoints"] { config.maxEndpoints = try m.int(in: 1...10_000_000) }
                if let x = p["xds_protocol"] {
                    let text = try x.nonEmptyString()
                    guard let value = XDSClient.XDSProtocol(rawValue: text) else {
                        throw x.error("expected delta or sotw, got '\(text)'")
                    }
                    config.xdsProtocol = value
                }
                if let a = p["api"] { config.pilotAPI = try pilotAddresses(a) }
                if let x = p["xds"] { config.pilotXDS = try pilotAddresses(x) }
            }
            if let n = top["register"] {
                let r = try n.mapping(allowed: ["address", "ttl"])
                if let a = r["address"] { config.registerAddress = try ipAddress(a) }
                if let t = r["ttl"] {
                    let ttl = try t.duration()
                    guard ttl >= .seconds(5) && ttl <= .seconds(3600) else {
                        throw t.error("expected a lease between 5s and 1h")
                    }
                    config.leaseTTL = ttl
                }
            }
            var names: Set<String> = []
            for item in try top["services"]?.sequence() ?? [] {
                let service = try self.service(item)
                guard names.insert("\(service.name):\(service.servicePort)").inserted else {
                    throw item.error("service '\(service.name):\(service.servicePort)' is listed twice")
                }
                config.services.append(service)
            }
            if !config.services.isEmpty {
                guard !config.pilotAPI.isEmpty else { throw root.error("services are listed but pilot.api is missing") }
                guard config.registerAddress != nil else {
                    throw root.error("services are listed but register.address is missing")
                }
            }
            if let c = top["capture"] { config.capture = try CaptureConfigLoader.load(c) }
            if let d = top["state_dir"] {
                let path = try d.nonEmptyString()
                guard path.hasPrefix("/") else { throw d.error("expected an absolute path, got '\(path)'") }
                config.stateDirectory = path
            }
            if let f = top["inbound_forward"] {
                let text = try f.nonEmptyString()
                guard let value = AgentListeners.InboundForward(rawValue: text) else {
                    throw f.error("expected loopback or original_destination, got '\(text)'")
                }
                config.inboundForward = value
            }
            if let n = top["access_log"] { config.accessLog = try AccessLogSettings.decode(n) }
            if let n = top["tracing"] { config.tracing = try TracingSettings.decode(n) }
            if let a = top["admin"] {
                let keys = try a.mapping(allowed: ["address"])
                if let n = keys["address"] {
                    let (host, port) = try n.endpoint()
                    guard Names.isIPAddress(host) else {
                        throw n.error("expected an IP address and port such as 127.0.0.1:15000, got host '\(host)'")
                    }
                    config.adminAddress = HostPort(host: host, port: port)
                }
            }
            if let d = top["drain_deadline"] {
                let deadline = try d.duration()
                guard deadline <= .seconds(3600) else { throw d.error("expected at most 1h") }
                config.drainDeadline = deadline
            }
        } catch {
            throw ConfigFileErrors([error])
        }
        let problems = config.capture.validationErrors()
        guard problems.isEmpty else {
            throw ConfigFileErrors(
                problems.map {
                    let path = "capture.\($0.path)"
                    return ConfigFileError(
                        file: file,
                        position: root.position(of: path),
                        path: path,
                        message: $0.message
                    )
                }
            )
        }
        return config
    }

    /// `host:port`, or a list of them (several pilots sharing one store), without repeats.
    private static func pilotAddresses(_ node: ConfigNode) throws(ConfigFileError) -> [HostPort] {
        let items = node.isScalar ? [node] : try node.sequence()
        guard !items.isEmpty else { throw node.error("expected host:port or a list of them, got an empty list") }
        var result: [HostPort] = []
        for item in items {
            let (host, port) = try item.endpoint()
            let address = HostPort(host: host, port: port)
            guard !result.contains(address) else { throw item.error("\(address) is listed twice") }
            result.append(address)
        }
        return result
    }

    private static func ipAddress(_ node: ConfigNode) throws(ConfigFileError) -> String {
        let text = try node.nonEmptyString()
        guard Names.isIPAddress(text) else {
            throw node.error("expected an IPv4 or IPv6 address, got '\(text)'")
        }
        return text
    }

    private static func service(_ node: ConfigNode) throws(ConfigFileError) -> LocalService {
        let keys = try node.mapping(allowed: [
            "name", "port", "service_port", "protocol", "labels", "weight", "health_check",
        ])
        let nameNode = try keys.required("name", in: node)
        let name = try nameNode.nonEmptyString()
        guard Names.isValidServiceName(name) else {
            throw nameNode.error("expected lowercase letters, digits, '-' and '.' (1 to 63), got '\(name)'")
        }
        var service = LocalService(name: name, port: try keys.required("port", in: node).int(in: 1...65535))
        if let p = keys["service_port"] { service.servicePort = try p.int(in: 1...65535) }
        if let p = keys["protocol"] { service.serviceProtocol = try ServiceProtocol.decode(p) }
        if let l = keys["labels"] { service.labels = try l.stringMap() }
        if let w = keys["weight"] { service.weight = try w.int(in: EndpointWeights.range) }
        if let h = keys["health_check"] { service.healthCheck = try HealthCheck.decode(h) }
        return service
    }
}
