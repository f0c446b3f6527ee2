import NIOPosix

#if canImport(Glibc)
import Glibc
#endif

/// The pilots an agent can use, as addresses to try in turn: each IP literal of agent.yaml's
/// list as it is, and each DNS name as every address it resolves to (one name for all the
/// pilots works as a list does). A name that does not resolve stays a name, so that the attempt
/// to reach it fails with the resolver's reason.
enum PilotAddresses {
    static func expand(_ pilots: [HostPort]) async -> [HostPort] {
        var result: [HostPort] = []
        for pilot in pilots {
            let addresses = isLiteral(pilot.host) ? [pilot.host] : await resolve(pilot.host)
            for address in addresses.isEmpty ? [pilot.host] : addresses {
                let candidate = HostPort(host: address, port: pilot.port)
                if !result.contains(candidate) { result.append(candidate) }
            }
        }
        return result
    }

    static func isLiteral(_ host: String) -> Bool {
        var v4 = in_addr()
        var v6 = in6_addr()
        return inet_pton(AF_INET, host, &v4) == 1 || inet_pton(AF_INET6, host, &v6) == 1
    }

    /// Every address of `name` (IPv4 and IPv6, in the resolver's order), looked up on NIO's
    /// blocking-work pool rather than a task's thread.
    static func resolve(_ name: String) async -> [String] {
        (try? await NIOThreadPool.singleton.runIfActive { lookup(name) }) ?? []
    }

    private static func lookup(_ name: String) -> [String] {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(name, nil, &hints, &list) == 0, let first = list else { return [] }
        defer { freeaddrinfo(first) }
        var addresses: [String] = []
        var entry: UnsafeMutablePointer<addrinfo>? = first
        while let e = entry {
            var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
            if let address = e.pointee.ai_addr {
                let ok: Bool
                switch Int32(address.pointee.sa_family) {
                case AF_INET:
                    ok = address.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { sin in
                        var a = sin.pointee.sin_addr
                        return inet_ntop(AF_INET, &a, &text, socklen_t(text.count)) != nil
                    }
                case AF_INET6:
                    ok = address.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { sin6 in
                        var a = sin6.pointee.sin6_addr
                        return inet_ntop(AF_INET6, &a, &text, socklen_t(text.count)) != nil
                    }
                default: ok = false
                }
                if ok {
                    let address = String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
                    if !addresses.contains(address) { addresses.append(address) }
                }
            }
            entry = e.pointee.ai_next
        }
        return addresses
    }
}
