import NIOCore
import NIOHTTP1

/// Header handling of a forwarding proxy (RFC 9110 §7.6): hop-by-hop headers removed, `Via`,
/// `X-Forwarded-For` and `X-Forwarded-Proto` set, `Host` kept.
enum HeaderRewriting {
    static let via = "1.1 trellis"

    /// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1 and the legacy
    /// ones every proxy strips). `Transfer-Encoding` is handled by the encoder, which re-frames.
    private static let hopByHop: [String] = [
        "connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade",
        "proxy-authenticate", "proxy-authorization",
    ]

    /// Removes `Connection`, every header it names, and the fixed hop-by-hop set.
    static func removeHopByHop(_ headers: inout HTTPHeaders) {
        for value in headers["connection"] {
            for token in value.split(separator: ",") {
                let name = token.trimmingASCIIWhitespace().lowercased()
                if !name.isEmpty && name != "close" && name != "keep-alive" { headers.remove(name: name) }
            }
        }
        for name in hopByHop where headers.contains(name: name) { headers.remove(name: name) }
    }

    /// The head sent upstream for a downstream request.
    static func upstreamRequest(_ head: HTTPRequestHead, clientAddress: SocketAddress?) -> HTTPRequestHead {
        var headers = head.headers
        removeHopByHop(&headers)
        let chunked = headers["transfer-encoding"].contains { $0.lowercased().contains("chunked") }
        headers.remove(name: "transfer-encoding")
        if chunked && !headers.contains(name: "content-length") {
            headers.add(name: "transfer-encoding", value: "chunked")
        }
        if let ip = clientAddress?.ipAddress {
            if let existing = headers.first(name: "x-forwarded-for") {
                headers.replaceOrAdd(name: "x-forwarded-for", value: "\(existing), \(ip)")
            } else {
                headers.add(name: "x-forwarded-for", value: ip)
            }
        }
        headers.replaceOrAdd(name: "x-forwarded-proto", value: "http")
        appendVia(&headers, version: head.version)
        var uri = head.uri
        if !uri.hasPrefix("/") && uri != "*" {
            uri = String(RouteTable.pathAndQuery(of: uri))
        }
        return HTTPRequestHead(version: .http1_1, method: head.method, uri: uri, headers: headers)
    }

    /// The head sent downstream for an upstream response. `keepAlive` says whether the downstream
    /// connection stays open after it.
    static func downstreamResponse(
        _ head: HTTPResponseHead,
        requestVersion: HTTPVersion,
        keepAlive: Bool
    )
        -> HTTPResponseHead
    {
        var headers = head.headers
        removeHopByHop(&headers)
        let chunked = headers["transfer-encoding"].contains { $0.lowercased().contains("chunked") }
        headers.remove(name: "transfer-encoding")
        if chunked && !headers.contains(name: "content-length") && requestVersion == .http1_1 {
            headers.add(name: "transfer-encoding", value: "chunked")
        }
        appendVia(&headers, version: head.version)
        if !keepAlive {
            headers.add(name: "connection", value: "close")
        } else if requestVersion == .http1_0 {
            headers.add(name: "connection", value: "keep-alive")
        }
        return HTTPResponseHead(version: requestVersion, status: head.status, headers: headers)
    }

    private static func appendVia(_ headers: inout HTTPHeaders, version: HTTPVersion) {
        let entry = "\(version.major).\(version.minor) trellis"
        if let existing = headers.first(name: "via") {
            headers.replaceOrAdd(name: "via", value: "\(existing), \(entry)")
        } else {
            headers.add(name: "via", value: entry)
        }
    }
}

extension Substring {
    func trimmingASCIIWhitespace() -> Substring {
        var s = self
        while let f = s.first, f == " " || f == "\t" { s = s.dropFirst() }
        while let l = s.last, l == " " || l == "\t" { s = s.dropLast() }
        return s
    }
}
