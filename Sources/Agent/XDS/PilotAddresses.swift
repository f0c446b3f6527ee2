import NIOPosix
import TrellisConfig

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

    static func isLiteral(_ host: String) -> Bool { Names.isIPAddress(host) }

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
            // The address as text, by the resolver itself (IPv4 or IPv6 alike).
            var text = [CChar](repeating: 0, count: 1025)
            if let address = e.pointee.ai_addr,
                getnameinfo(address, e.pointee.ai_addrlen, &text, socklen_t(text.count), nil, 0, NI_NUMERICHOST) == 0
            {
                let address = String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
                if !addresses.contains(address) { addresses.append(address) }
            }
            entry = e.pointee.ai_next
        }
        return addresses
    }
}
