public import Proxy

/// The proxy configuration the agent starts with, before any comes from pilot: the outbound
/// capture listener (:15001) and the inbound one (:15006), both sniffing; outbound connections
/// pass through to where they were going, inbound ones to the local program on 127.0.0.1 (same
/// port) or, configured so, to the address the client dialed. Nothing a legacy program did before breaks; routing
/// and policies are added by pilot's configuration (issue 7's xDS client).
public enum AgentListeners {
    public static let outboundPort = 15001
    public static let inboundPort = 15006

    /// - Parameter inboundForwardTo: the address inbound connections are forwarded to (port kept);
    ///   `nil` forwards to the original destination.
    public static func passthroughConfig(
        sniffTimeout: Duration = .seconds(1),
        inboundForwardTo: String? = "127.0.0.1"
    ) -> ProxyConfig {
        let route = Route(
            name: "passthrough",
            match: RouteMatch(),
            action: RouteAction(clusters: [.init(name: "passthrough")], timeout: nil)
        )
        let anyHost = [VirtualHost(name: "allow_any", domains: ["*"], routes: [route])]
        return ProxyConfig(
            version: "bootstrap",
            listeners: [
                ListenerConfig(
                    name: "outbound",
                    address: SocketEndpoint(host: "0.0.0.0", port: outboundPort),
                    virtualHosts: anyHost,
                    transparent: TransparentMode(sniffTimeout: sniffTimeout)
                ),
                ListenerConfig(
                    name: "inbound",
                    address: SocketEndpoint(host: "0.0.0.0", port: inboundPort),
                    virtualHosts: anyHost,
                    transparent: TransparentMode(sniffTimeout: sniffTimeout, forwardTo: inboundForwardTo)
                ),
            ],
            clusters: [ClusterConfig(name: "passthrough", endpoints: [], originalDestination: true)]
        )
    }
}
