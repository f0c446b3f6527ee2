public import NIOCore
import NIOHTTP1
public import NIOPosix

/// A small HTTP/1.1 client over SwiftNIO for control-plane calls: pilot's CMDB poller, the agent's
/// registration and health checks. One request per connection, `http://` only, a deadline on the
/// whole exchange, the answer's body capped. Not for the data path.
public struct HTTPClient: Sendable {
    public struct Failure: Error, CustomStringConvertible, Sendable {
        public var description: String
        public init(_ description: String) { self.description = description }
    }

    /// `http://host[:port][/path]`; IPv6 hosts in brackets.
    public struct URL: Sendable, CustomStringConvertible {
        public var host: String
        public var port: Int
        public var path: String

        public init(_ text: String) throws(Failure) {
            guard text.hasPrefix("http://") else { throw Failure("only http:// URLs are supported, got '\(text)'") }
            let rest = text.dropFirst("http://".count)
            let slash = rest.firstIndex(of: "/") ?? rest.endIndex
            let authority = rest[..<slash]
            path = slash == rest.endIndex ? "/" : String(rest[slash...])
            if authority.hasPrefix("[") {
                guard let close = authority.firstIndex(of: "]") else { throw Failure("bad IPv6 host in '\(text)'") }
                host = String(authority[authority.index(after: authority.startIndex)..<close])
                let after = authority[authority.index(after: close)...]
                port = after.hasPrefix(":") ? Int(after.dropFirst()) ?? -1 : 80
            } else if let colon = authority.lastIndex(of: ":") {
                host = String(authority[..<colon])
                port = Int(authority[authority.index(after: colon)...]) ?? -1
            } else {
                host = String(authority)
                port = 80
            }
            guard !host.isEmpty, (1...65535).contains(port) else { throw Failure("bad host or port in '\(text)'") }
        }

        public init(host: String, port: Int, path: String) {
            self.host = host
            self.port = port
            self.path = path
        }

        public var authority: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
        public var description: String { "http://\(authority)\(path)" }

        /// The same server, another path.
        public func with(path: String) -> URL { URL(host: host, port: port, path: path) }
    }

    public struct Response: Sendable {
        public var status: Int
        public var body: [UInt8]
        public var text: String { String(decoding: body, as: UTF8.self) }
    }

    let group: any EventLoopGroup
    let maxBody: Int

    public init(group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton, maxBody: Int = 16 << 20) {
        self.group = group
        self.maxBody = maxBody
    }

    /// One exchange; throws ``Failure`` when there is no complete answer within `timeout`.
    /// `authority` replaces the URL's as the `Host` header (a health check's `host`).
    public func request(
        _ method: String,
        _ url: URL,
        json body: String? = nil,
        authority: String? = nil,
        timeout: Duration = .seconds(5)
    ) async throws -> Response {
        try await exchange(
            method,
            target: .tcp(host: url.host, port: url.port),
            path: url.path,
            authority: authority ?? url.authority,
            json: body,
            timeout: timeout
        )
    }

    /// One exchange over a Unix domain socket (an agent's control socket, say).
    public func request(
        _ method: String,
        unixSocket socketPath: String,
        path: String,
        json body: String? = nil,
        timeout: Duration = .seconds(5)
    ) async throws -> Response {
        try await exchange(
            method,
            target: .unix(socketPath),
            path: path,
            authority: "localhost",
            json: body,
            timeout: timeout
        )
    }

    private enum Target: Sendable {
        case tcp(host: String, port: Int)
        case unix(String)

        var description: String {
            switch self {
            case .tcp(let host, let port): host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
            case .unix(let path): path
            }
        }
    }

    private func exchange(
        _ method: String,
        target: Target,
        path: String,
        authority: String,
        json body: String?,
        timeout: Duration
    ) async throws -> Response {
        let maxBody = self.maxBody
        return try await withThrowingTaskGroup(of: Response?.self) { group in
            group.addTask {
                try await Task.sleep(for: timeout)
                return nil
            }
            group.addTask {
                let bootstrap = ClientBootstrap(group: self.group)
                    .connectTimeout(
                        .nanoseconds(
                            Int64(timeout.components.seconds) * 1_000_000_000 + timeout.components.attoseconds
                                / 1_000_000_000
                        )
                    )
                let initializer:
                    @Sendable (any Channel) -> EventLoopFuture<
                        NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart>
                    > = { channel in
                        channel.eventLoop.makeCompletedFuture {
                            try channel.pipeline.syncOperations.addHTTPClientHandlers()
                            return try NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart>(
                                wrappingChannelSynchronously: channel
                            )
                        }
                    }
                let channel =
                    switch target {
                    case .tcp(let host, let port):
                        try await bootstrap.connect(host: host, port: port, channelInitializer: initializer)
                    case .unix(let socketPath):
                        try await bootstrap.connect(unixDomainSocketPath: socketPath, channelInitializer: initializer)
                    }
                return try await channel.executeThenClose { inbound, outbound in
                    var head = HTTPRequestHead(version: .http1_1, method: HTTPMethod(rawValue: method), uri: path)
                    head.headers.add(name: "Host", value: authority)
                    head.headers.add(name: "Connection", value: "close")
                    let bytes = body.map { ByteBuffer(string: $0) }
                    if let bytes {
                        head.headers.add(name: "Content-Type", value: "application/json")
                        head.headers.add(name: "Content-Length", value: "\(bytes.readableBytes)")
                    } else if method != "GET" && method != "HEAD" {
                        head.headers.add(name: "Content-Length", value: "0")
                    }
                    try await outbound.write(.head(head))
                    if let bytes { try await outbound.write(.body(.byteBuffer(bytes))) }
                    try await outbound.write(.end(nil))
                    var status = 0
                    var received: [UInt8] = []
                    for try await part in inbound {
                        switch part {
                        case .head(let response): status = Int(response.status.code)
                        case .body(let buffer):
                            received += buffer.readableBytesView
                            guard received.count <= maxBody else {
                                throw Failure("answer larger than \(maxBody) bytes")
                            }
                        case .end: return Response(status: status, body: received)
                        }
                    }
                    throw Failure("the connection closed before the answer was complete")
                }
            }
            defer { group.cancelAll() }
            guard let first = try await group.next(), let response = first else {
                throw Failure("no answer from \(target.description) within \(timeout)")
            }
            return response
        }
    }
}
