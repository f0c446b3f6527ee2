public import GRPCCore
public import GRPCNIOTransportHTTP2

/// One etcd member's client address: `host:port`, `[v6]:port`, optionally after `http://` or
/// `https://` (as etcd's own `--endpoints` are written).
public struct EtcdEndpoint: Sendable, Hashable, CustomStringConvertible {
    public var host: String
    public var port: Int

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    /// Parses one endpoint; the error says what was expected.
    public init(parsing text: String) throws(EtcdError) {
        var rest = Substring(text)
        for scheme in ["http://", "https://"] where rest.hasPrefix(scheme) { rest = rest.dropFirst(scheme.count) }
        if rest.hasSuffix("/") { rest = rest.dropLast() }
        let host: Substring
        let portText: Substring
        if rest.hasPrefix("[") {
            guard let close = rest.firstIndex(of: "]"), rest[rest.index(after: close)...].hasPrefix(":") else {
                throw Self.invalid(text)
            }
            host = rest[rest.index(after: rest.startIndex)..<close]
            portText = rest[rest.index(close, offsetBy: 2)...]
        } else {
            guard let colon = rest.lastIndex(of: ":"), !rest[..<colon].contains(":") else { throw Self.invalid(text) }
            host = rest[..<colon]
            portText = rest[rest.index(after: colon)...]
        }
        guard !host.isEmpty, let port = Int(portText), (1...65535).contains(port) else { throw Self.invalid(text) }
        self.init(host: String(host), port: port)
    }

    private static func invalid(_ text: String) -> EtcdError {
        EtcdError(
            operation: "reading endpoint '\(text)'",
            underlying: "expected host:port, [IPv6]:port or http(s)://host:port with a port from 1 to 65535"
        )
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }

    static func list(_ endpoints: [EtcdEndpoint]) -> String { endpoints.map(\.description).joined(separator: ", ") }

    enum Kind { case ipv4, ipv6, name }

    var kind: Kind {
        if host.contains(":") { return .ipv6 }
        let parts = host.split(separator: ".", omittingEmptySubsequences: false)
        if parts.count == 4, parts.allSatisfy({ UInt8($0) != nil }) { return .ipv4 }
        return .name
    }

    /// Checks that there is at least one endpoint.
    public static func check(_ endpoints: [EtcdEndpoint]) throws(EtcdError) {
        guard !endpoints.isEmpty else {
            throw EtcdError(operation: "choosing etcd's members", underlying: "no endpoints given")
        }
    }

    /// The gRPC target of one member: its address, or its DNS name (every address it resolves
    /// to, tried in turn).
    var target: any ResolvableTarget {
        switch kind {
        case .ipv4: .ipv4(host: host, port: port)
        case .ipv6: .ipv6(host: host, port: port)
        case .name: .dns(host: host, port: port)
        }
    }
}

/// TLS to etcd (its `--client-cert-auth` set-up): the CA that signed the members' certificates,
/// and the client's own certificate and key when the members ask for one.
public struct EtcdTLS: Sendable, Hashable {
    public var caFile: String?
    public var certFile: String?
    public var keyFile: String?
    /// The name the members' certificates are checked against, when it is not the endpoint's.
    public var serverName: String?

    public init(caFile: String? = nil, certFile: String? = nil, keyFile: String? = nil, serverName: String? = nil) {
        self.caFile = caFile
        self.certFile = certFile
        self.keyFile = keyFile
        self.serverName = serverName
    }

    var transport: HTTP2ClientTransport.Posix.TransportSecurity.TLS {
        var tls = HTTP2ClientTransport.Posix.TransportSecurity.TLS.defaults
        if let caFile { tls.trustRoots = .certificates([.file(path: caFile, format: .pem)]) }
        if let certFile, let keyFile {
            tls.certificateChain = [.file(path: certFile, format: .pem)]
            tls.privateKey = .file(path: keyFile, format: .pem)
        }
        return tls
    }
}
