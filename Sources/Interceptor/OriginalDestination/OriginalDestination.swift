public import NIOCore

#if canImport(Glibc)
import Glibc
#endif

/// The destination a redirected connection was originally sent to, read from the kernel's NAT
/// record of an accepted socket: `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST` (IPv6). The
/// raw socket structures stay inside this type.
public enum OriginalDestination {
    public struct Error: Swift.Error, Hashable, Sendable, CustomStringConvertible {
        enum Code: Hashable, Sendable {
            case notRedirected
            case unsupportedChannel
            case system(Int32)
        }

        let code: Code
        public let file: String
        public let line: UInt

        /// The connection did not pass through a REDIRECT/DNAT rule (the kernel has no original
        /// destination for it).
        public static func notRedirected(file: String = #fileID, line: UInt = #line) -> Self {
            Self(code: .notRedirected, file: file, line: line)
        }

        static func unsupportedChannel(file: String = #fileID, line: UInt = #line) -> Self {
            Self(code: .unsupportedChannel, file: file, line: line)
        }

        static func system(_ errno: Int32, file: String = #fileID, line: UInt = #line) -> Self {
            Self(code: .system(errno), file: file, line: line)
        }

        public var isNotRedirected: Bool { code == .notRedirected }

        public static func == (lhs: Self, rhs: Self) -> Bool { lhs.code == rhs.code }
        public func hash(into hasher: inout Hasher) { hasher.combine(code) }

        public var description: String {
            switch code {
            case .notRedirected: return "the connection was not redirected; it has no original destination"
            case .unsupportedChannel: return "the channel is not a socket channel"
            case .system(let e): return "getsockopt(SO_ORIGINAL_DST) failed: \(String(cString: strerror(e)))"
            }
        }
    }

    /// `SO_ORIGINAL_DST` and `IP6T_SO_ORIGINAL_DST` share the number 80 (linux/netfilter_ipv4.h,
    /// linux/netfilter_ipv6/ip6_tables.h).
    static let optionName: Int32 = 80

    /// Reads the original destination of an accepted, redirected connection. Runs on the
    /// channel's event loop.
    public static func of(_ channel: any Channel) -> EventLoopFuture<SocketAddress> {
        guard let provider = channel as? any SocketOptionProvider else {
            return channel.eventLoop.makeFailedFuture(Error.unsupportedChannel())
        }
        // An IPv4 connection accepted on a dual-stack IPv6 socket (local address ::ffff:a.b.c.d)
        // has an IPv4 NAT record: ask with the IPv4 option.
        let isIPv6: Bool
        if case .v6 = channel.localAddress, let ip = channel.localAddress?.ipAddress,
            !ip.lowercased().hasPrefix("::ffff:")
        {
            isIPv6 = true
        } else {
            isIPv6 = false
        }
        if isIPv6 {
            let future: EventLoopFuture<sockaddr_in6> = provider.unsafeGetSocketOption(
                level: SocketOptionLevel(IPPROTO_IPV6),
                name: SocketOptionName(optionName)
            )
            return future.flatMapThrowing { try checkRedirected(SocketAddress($0, host: ""), channel) }
                .flatMapErrorThrowing { throw translate($0) }
        } else {
            let future: EventLoopFuture<sockaddr_in> = provider.unsafeGetSocketOption(
                level: SocketOptionLevel(IPPROTO_IP),
                name: SocketOptionName(optionName)
            )
            return future.flatMapThrowing { try checkRedirected(SocketAddress($0, host: ""), channel) }
                .flatMapErrorThrowing { throw translate($0) }
        }
    }

    /// The original destination, read at once on the channel's event loop (where the socket option
    /// is answered synchronously); nil when the connection was not redirected or on any error.
    /// This is the lookup the proxy's capture listeners take.
    public static func now(_ channel: any Channel) -> SocketAddress? {
        guard channel.eventLoop.inEventLoop else { return nil }
        var result: SocketAddress?
        of(channel).whenSuccess { result = $0 }
        return result
    }

    /// Conntrack answers for every tracked connection, redirected or not; a connection whose
    /// original destination is the socket's own address was not redirected.
    private static func checkRedirected(_ original: SocketAddress, _ channel: any Channel) throws -> SocketAddress {
        guard let local = channel.localAddress else { return original }
        let localIP = local.ipAddress.map { $0.lowercased().hasPrefix("::ffff:") ? String($0.dropFirst(7)) : $0 }
        if original.port == local.port && original.ipAddress == localIP { throw Error.notRedirected() }
        return original
    }

    private static func translate(_ error: any Swift.Error) -> any Swift.Error {
        if error is Error { return error }
        guard let io = error as? IOError else { return error }
        return io.errnoCode == ENOENT ? Error.notRedirected() : Error.system(io.errnoCode)
    }
}
