public import Proxy
import TrellisPolicy

/// The proxy configuration the agent starts with, before any comes from pilot: the outbound
/// capture listener (:15001) and the inbound one (:15006), both sniffing, each on IPv4 and, where
/// the machine has IPv6, on IPv6 too; outbound connections pass through to where they were going,
/// inbound ones to the local program on 127.0.0.1 or ::1 (same port, same family) or, configured
/// so, to the address the client dialed. Nothing a legacy program did before breaks; routing and
/// policies are added by pilot's configuration (the xDS client).
public enum AgentListeners {
    public static let outboundPort = 15001
    public static let inboundPort = 15006
    public static let passthroughConnectTimeout: Duration = .seconds(10)

    /// Where the inbound listener sends captured connections.
    public enum InboundForward: String, Sendable, Hashable {
        /// The local program, on the loopback address of the connection's family.
        case loopback
        /// The address the client dialed.
        case originalDestination = "original_destination"

        public var addresses: [String] {
            switch self {
            case .loopback: ["127.0.0.1", "::1"]
            case .originalDestination: []
            }
        }
    }

    /// - Parameters:
    ///   - inboundForward: where inbound connections are forwarded (port kept).
    ///   - ipv6: bind the capture listeners on `[::]` as well as `0.0.0.0` (the ip6tables rules
    ///     redirect there); off on a machine without IPv6.
    ///   - accessLog: whether both listeners write access-log lines.
    public static func passthroughConfig(
        sniffTimeout: Duration = .seconds(1),
        inboundForward: InboundForward = .loopback,
        ipv6: Bool = true,
        accessLog: Bool = false
    ) -> ProxyConfig {
        let route = Route(
            name: "passthrough",
            match: RouteMatch(),
            action: RouteAction(clusters: [.init(name: "passthrough")], timeout: nil)
        )
        let anyHost = [VirtualHost(name: "allow_any", domains: ["*"], routes: [route])]
        func v6(_ port: Int) -> [SocketEndpoint] { ipv6 ? [SocketEndpoint(host: "::", port: port)] : [] }
        return ProxyConfig(
            version: "bootstrap",
            listeners: [
                ListenerConfig(
                    name: "outbound",
                    address: SocketEndpoint(host: "0.0.0.0", port: outboundPort),
                    virtualHosts: anyHost,
                    accessLog: accessLog,
                    transparent: TransparentMode(sniffTimeout: sniffTimeout),
                    additionalAddresses: v6(outboundPort),
                    trafficDirection: .outbound
                ),
                ListenerConfig(
                    name: "inbound",
                    address: SocketEndpoint(host: "0.0.0.0", port: inboundPort),
                    virtualHosts: anyHost,
                    accessLog: accessLog,
                    transparent: TransparentMode(sniffTimeout: sniffTimeout, forwardTo: inboundForward.addresses),
                    additionalAddresses: v6(inboundPort),
                    trafficDirection: .inbound
                ),
            ],
            // A captured connection must not give up sooner than it would have without the agent:
            // the passthrough connect timeout is generous (Istio's PassthroughCluster: 10 s), so
            // a slow accept (a full backlog, a SYN retransmitted after 1 s) is waited for.
            clusters: [
                ClusterConfig(
                    name: "passthrough",
                    endpoints: [],
                    connectTimeout: passthroughConnectTimeout,
                    originalDestination: true,
                    // h2c from the client: the destination speaks it (gRPC does).
                    upstreamProtocol: .downstream
                )
            ]
        )
    }
}
