import NIOCore
import NIOHTTP1
import NIOPosix

/// A small HTTP/1.1 GET over SwiftNIO, for pilot's pollers (the CMDB). `http://` only; the
/// answer's body is capped.
enum HTTPGet {
    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    struct URL {
        var host: String
        var port: Int
        var path: String

        /// `http://host[:port][/path]`; IPv6 hosts in brackets.
        init(_ text: String) throws(Failure) {
            guard text.hasPrefix("http://") else {
                throw Failure(description: "only http:// URLs are supported, got '\(text)'")
            }
            let rest = text.dropFirst("http://".count)
            let slash = rest.firstIndex(of: "/") ?? rest.endIndex
            let authority = rest[..<slash]
            path = slash == rest.endIndex ? "/" : String(rest[slash...])
            if authority.hasPrefix("[") {
                guard let close = authority.firstIndex(of: "]") else {
                    throw Failure(description: "bad IPv6 host in '\(text)'")
                }
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
            guard !host.isEmpty, (1...65535).contains(port) else {
                throw Failure(description: "bad host or port in '\(text)'")
            }
        }
    }

    static func get(_ url: URL, timeout: Duration, maxBody: Int = 16 << 20) async throws -> (status: Int, body: [UInt8])
    {
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connectTimeout(.milliseconds(Int64(timeout.components.seconds * 1000)))
            .connect(host: url.host, port: url.port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    return try NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart>(
                        wrappingChannelSynchronously: channel
                    )
                }
            }
        return try await withThrowingTaskGroup(of: (status: Int, body: [UInt8])?.self) { group in
            group.addTask {
                try await Task.sleep(for: timeout)
                return nil
            }
            group.addTask {
                try await channel.executeThenClose { inbound, outbound in
                    var head = HTTPRequestHead(version: .http1_1, method: .GET, uri: url.path)
                    head.headers.add(
                        name: "Host",
                        value: url.host.contains(":") ? "[\(url.host)]:\(url.port)" : "\(url.host):\(url.port)"
                    )
                    head.headers.add(name: "Accept", value: "application/json")
                    head.headers.add(name: "Connection", value: "close")
                    try await outbound.write(.head(head))
                    try await outbound.write(.end(nil))
                    var status = 0
                    var body: [UInt8] = []
                    for try await part in inbound {
                        switch part {
                        case .head(let response): status = Int(response.status.code)
                        case .body(let buffer):
                            body += buffer.readableBytesView
                            guard body.count <= maxBody else {
                                throw Failure(description: "answer larger than \(maxBody) bytes")
                            }
                        case .end: return (status, body)
                        }
                    }
                    throw Failure(description: "the connection closed before the answer was complete")
                }
            }
            defer { group.cancelAll() }
            guard let result = try await group.next(), let answer = result else {
                channel.channel.close(promise: nil)
                throw Failure(description: "no answer within \(timeout)")
            }
            return answer
        }
    }
}
