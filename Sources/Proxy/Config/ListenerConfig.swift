import TrellisPolicy

/// One HTTP/1.1 listener: where it binds, its limits, and the virtual hosts it routes by.
public struct ListenerConfig: Sendable, Hashable, Codable {
    public var name: String
    public var address: SocketEndpoint
    /// More addresses the same listener takes connections on (Envoy's `additional_addresses`):
    /// the agent's capture listeners bind `0.0.0.0` and `[::]` on one port, so redirected IPv4 and
    /// IPv6 connections are both taken. With both families on one port, the IPv6 sockets are
    /// IPv6-only (each family keeps its own addresses, no `::ffff:` mapped peers).
    public var additionalAddresses: [SocketEndpoint]
    /// Virtual hosts, matched by the request's `Host`: exact names first, then the longest
    /// `*.suffix`, then `*`.
    public var virtualHosts: [VirtualHost]
    public var limits: ConnectionLimits
    /// Write one access-log line per request or TCP connection (to the server's ``AccessLog``).
    public var accessLog: Bool
    /// Which way the listener's traffic goes (Envoy's `traffic_direction`): the agent's outbound
    /// listener records client spans, every other listener server spans. Nil: unspecified.
    public var trafficDirection: TrafficDirection?
    /// Set on the agent's capture listeners: connections arrive redirected, so their protocol is
    /// sniffed and what is not HTTP/1 is relayed as TCP to its original destination. Nil: a plain
    /// HTTP listener (the gateway).
    public var transparent: TransparentMode?
    /// On a transparent listener: the virtual hosts for connections whose original destination
    /// port is the key (xDS: the sidecar's per-port listeners); other ports use `virtualHosts`.
    public var portVirtualHosts: [Int: [VirtualHost]]

    public init(
        name: String,
        address: SocketEndpoint,
        virtualHosts: [VirtualHost],
        limits: ConnectionLimits = .init(),
        accessLog: Bool = false,
        transparent: TransparentMode? = nil,
        portVirtualHosts: [Int: [VirtualHost]] = [:],
        additionalAddresses: [SocketEndpoint] = [],
        trafficDirection: TrafficDirection? = nil
    ) {
        self.trafficDirection = trafficDirection
        self.portVirtualHosts = portVirtualHosts
        self.additionalAddresses = additionalAddresses
        self.name = name
        self.address = address
        self.virtualHosts = virtualHosts
        self.limits = limits
        self.accessLog = accessLog
        self.transparent = transparent
    }

    /// Whether `other` needs the same sockets and pipeline (its routes may differ).
    public func bindsLike(_ other: ListenerConfig) -> Bool {
        name == other.name && address == other.address && additionalAddresses == other.additionalAddresses
            && limits == other.limits && accessLog == other.accessLog && transparent == other.transparent
    }

    /// Every address the listener binds, the main one first.
    public var addresses: [SocketEndpoint] { [address] + additionalAddresses }

    enum CodingKeys: String, CodingKey {
        case name, address, limits, transparent
        case additionalAddresses = "additional_addresses"
        case virtualHosts = "virtual_hosts"
        case portVirtualHosts = "port_virtual_hosts"
        case accessLog = "access_log"
        case trafficDirection = "traffic_direction"
    }
}

/// Envoy's `traffic_direction`.
public enum TrafficDirection: String, Sendable, Hashable, Codable {
    /// Requests the machine's programs make (the agent's outbound capture listener).
    case outbound
    /// Requests made to the machine's programs (the agent's inbound capture listener).
    case inbound
}

/// How a capture listener treats a redirected connection.
public struct TransparentMode: Sendable, Hashable, Codable {
    /// How long to wait for the client's first bytes. A client that sends nothing in this time is
    /// talking to a server-speaks-first protocol (SMTP, MySQL, SSH banners): relayed as TCP.
    public var sniffTimeout: Duration
    /// IP literals, at most one per family, that replace the original destination's address of
    /// that family (the port is kept): the agent's inbound listener forwards to the local program
    /// on `127.0.0.1` (IPv4) and `::1` (IPv6). A connection whose family has none here goes to its
    /// original destination as it was; empty: every connection does.
    public var forwardTo: [String]

    public init(sniffTimeout: Duration = .seconds(1), forwardTo: [String] = []) {
        self.sniffTimeout = sniffTimeout
        self.forwardTo = forwardTo
    }

    enum CodingKeys: String, CodingKey {
        case sniffTimeout = "sniff_timeout"
        case forwardTo = "forward_to"
    }
}

/// Limits a listener enforces on each downstream connection.
public struct ConnectionLimits: Sendable, Hashable, Codable {
    /// Largest request head (request line and headers), in bytes; beyond it the client gets 431.
    /// At most 80 KiB (the HTTP/1 parser's own ceiling).
    public var maxRequestHeaderBytes: Int
    /// A client that has started a request must deliver its whole head within this time, or it
    /// gets 408 and the connection is closed.
    public var requestHeaderTimeout: Duration
    /// A keep-alive connection with no request in progress is closed after this time.
    public var idleTimeout: Duration

    public static let maxHeaderCeiling = 80 * 1024

    public init(
        maxRequestHeaderBytes: Int = 60 * 1024,
        requestHeaderTimeout: Duration = .seconds(10),
        idleTimeout: Duration = .seconds(300)
    ) {
        self.maxRequestHeaderBytes = maxRequestHeaderBytes
        self.requestHeaderTimeout = requestHeaderTimeout
        self.idleTimeout = idleTimeout
    }

    enum CodingKeys: String, CodingKey {
        case maxRequestHeaderBytes = "max_request_header_bytes"
        case requestHeaderTimeout = "request_header_timeout"
        case idleTimeout = "idle_timeout"
    }
}

/// A host and port, as written in configuration (`127.0.0.1`, `::1`, or a name resolved at
/// connect time).
public struct SocketEndpoint: Sendable, Hashable, Codable, CustomStringConvertible {
    public var host: String
    public var port: Int

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    public var description: String {
        host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
    }
}
