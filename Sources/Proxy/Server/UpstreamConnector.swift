import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#endif

/// Opens every upstream socket of the data path the same way — the HTTP pools (HTTP/1 and
/// HTTP/2), the TCP relay and the health checker: a connect timeout, no Nagle, and the agent's
/// `SO_MARK`, so that the capture rules let the proxy's own connections through (TLS to
/// upstreams will go here too).
struct UpstreamConnector: Sendable {
    let mark: UInt32?

    /// A captured TCP connection's upstream gives up no sooner than the passthrough cluster's
    /// HTTP connections (Istio's PassthroughCluster: 10 s): a slow accept is waited for.
    static let relayConnectTimeout = TimeAmount.seconds(10)

    func bootstrap(on loop: any EventLoop, connectTimeout: TimeAmount) -> ClientBootstrap {
        var bootstrap = ClientBootstrap(group: loop)
            .connectTimeout(connectTimeout)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
        if let mark {
            bootstrap = bootstrap.channelOption(.socketOption(.init(rawValue: SO_MARK)), value: SocketOptionValue(mark))
        }
        return bootstrap
    }

    /// Connects to a resolved address when there is one, else to the host name and port.
    static func connect(
        _ bootstrap: ClientBootstrap,
        to address: SocketAddress?,
        host: String,
        port: Int
    ) -> EventLoopFuture<any Channel> {
        if let address { return bootstrap.connect(to: address) }
        return bootstrap.connect(host: host, port: port)
    }
}
