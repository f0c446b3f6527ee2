public import TrellisPolicy

/// What a service speaks on one port; it decides how the port is translated (HTTP routes, gRPC
/// API listeners with HTTP/2 upstreams, or plain TCP proxying).
/// The health an instance is served with in EDS. Only `healthy` instances take new requests;
/// `draining` ones finish what they have (Envoy: `DRAINING`), `unhealthy` ones are skipped.
public enum InstanceStatus: String, Sendable, Codable, CaseIterable, Hashable {
    case healthy
    case unhealthy
    case draining
}

/// A service is known by its name and the port its clients dial (one cluster per pair).
public struct ServiceKey: Sendable, Hashable, Comparable, CustomStringConvertible {
    public var name: String
    public var port: Int

    public init(name: String, port: Int) {
        self.name = name
        self.port = port
    }

    public static func < (a: Self, b: Self) -> Bool { (a.name, a.port) < (b.name, b.port) }
    public var description: String { "\(name):\(port)" }
}

/// An instance is known by its service, its address and the port it listens on.
public struct InstanceKey: Sendable, Hashable, Comparable, CustomStringConvertible {
    public var service: String
    public var address: String
    public var port: Int

    public init(service: String, address: String, port: Int) {
        self.service = service
        self.address = address
        self.port = port
    }

    public static func < (a: Self, b: Self) -> Bool {
        (a.service, a.address, a.port) < (b.service, b.address, b.port)
    }

    public var description: String {
        address.contains(":") ? "\(service)/[\(address)]:\(port)" : "\(service)/\(address):\(port)"
    }
}

/// Where an instance came from. Agent registrations hold a lease; static ones (mesh.yaml) live as
/// long as the file lists them.
public enum InstanceSource: String, Sendable, Codable, Hashable {
    case agent
    case meshFile = "mesh.yaml"
}

/// One instance of a service in the registry.
public struct Instance: Sendable, Hashable {
    public var key: InstanceKey
    /// The port clients dial for this service (the cluster's port); often the instance's own.
    public var servicePort: Int
    public var serviceProtocol: ServiceProtocol
    /// The node (machine) that registered it; its sidecar serves it inbound.
    public var node: String
    public var locality: Locality
    public var labels: [String: String]
    public var weight: Int
    public var status: InstanceStatus
    public var source: InstanceSource
    /// Agent registrations: the lease length and when it runs out (wall clock, so a restarted
    /// pilot can resume it).
    public var leaseTTL: Duration?
    public var leaseExpiresAt: Double?

    public init(
        key: InstanceKey,
        servicePort: Int? = nil,
        serviceProtocol: ServiceProtocol = .http,
        node: String = "",
        locality: Locality = .init(),
        labels: [String: String] = [:],
        weight: Int = 1,
        status: InstanceStatus = .healthy,
        source: InstanceSource = .agent,
        leaseTTL: Duration? = nil,
        leaseExpiresAt: Double? = nil
    ) {
        self.key = key
        self.servicePort = servicePort ?? key.port
        self.serviceProtocol = serviceProtocol
        self.node = node
        self.locality = locality
        self.labels = labels
        self.weight = weight
        self.status = status
        self.source = source
        self.leaseTTL = leaseTTL
        self.leaseExpiresAt = leaseExpiresAt
    }

    public var service: ServiceKey { ServiceKey(name: key.service, port: servicePort) }
}

/// Machine metadata from the CMDB, merged into the instances of that machine.
public struct MachineMetadata: Sendable, Hashable {
    public var locality: Locality
    public var labels: [String: String]

    public init(locality: Locality = .init(), labels: [String: String] = [:]) {
        self.locality = locality
        self.labels = labels
    }
}
