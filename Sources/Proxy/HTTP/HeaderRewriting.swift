import NIOCore
import NIOHTTP1

/// Header handling of a forwarding proxy (RFC 9110 §7.6): hop-by-hop headers removed, `Via`,
/// `X-Forwarded-For` and `X-Forwarded-Proto` set, `Host` kept. Each head is rewritten in one pass.
enum HeaderRewriting {
    private enum Kind {
        case endToEnd
        case connection
        /// Describes one connection; never forwarded (RFC 9110 §7.6.1 and the legacy ones every
        /// proxy strips).
        case hopByHop
        /// Re-framed by the encoder: only whether the body is chunked is kept.
        case transferEncoding
        case contentLength
        case xForwardedFor
        case xForwardedProto
        case via
        /// `te`: only `trailers` is passed on (gRPC needs it; RFC 9110 §10.1.4 lets a proxy keep it).
        case te
        /// `traceparent`, `tracestate`: replaced by the proxy's own when it traces requests.
        case traceContext
    }

    private static func kind(of name: String) -> Kind {
        var name = name
        return name.withUTF8 { kind(of: $0) }
    }

    private static func kind(of bytes: UnsafeBufferPointer<UInt8>) -> Kind {
        switch bytes.count {
        case 2: return equalsLowercase(bytes, "te") ? .te : .endToEnd
        case 3: return equalsLowercase(bytes, "via") ? .via : .endToEnd
        case 7:
            return equalsLowercase(bytes, "upgrade") || equalsLowercase(bytes, "trailer") ? .hopByHop : .endToEnd
        case 10:
            if equalsLowercase(bytes, "connection") { return .connection }
            if equalsLowercase(bytes, "tracestate") { return .traceContext }
            return equalsLowercase(bytes, "keep-alive") ? .hopByHop : .endToEnd
        case 11: return equalsLowercase(bytes, "traceparent") ? .traceContext : .endToEnd
        case 14: return equalsLowercase(bytes, "content-length") ? .contentLength : .endToEnd
        case 15:
            if equalsLowercase(bytes, "x-forwarded-for") { return .xForwardedFor }
            return .endToEnd
        case 16: return equalsLowercase(bytes, "proxy-connection") ? .hopByHop : .endToEnd
        case 17:
            if equalsLowercase(bytes, "transfer-encoding") { return .transferEncoding }
            return equalsLowercase(bytes, "x-forwarded-proto") ? .xForwardedProto : .endToEnd
        case 18: return equalsLowercase(bytes, "proxy-authenticate") ? .hopByHop : .endToEnd
        case 19: return equalsLowercase(bytes, "proxy-authorization") ? .hopByHop : .endToEnd
        default: return .endToEnd
        }
    }

    /// `bytes` equals `lowercase` ignoring ASCII case; `lowercase` must be lowercase ASCII.
    static func equalsLowercase(_ bytes: UnsafeBufferPointer<UInt8>, _ lowercase: StaticString) -> Bool {
        guard bytes.count == lowercase.utf8CodeUnitCount else { return false }
        let expected = lowercase.utf8Start
        for i in 0..<bytes.count {
            let b = bytes[i]
            let lower = b >= UInt8(ascii: "A") && b <= UInt8(ascii: "Z") ? b | 0x20 : b
            if lower != expected[i] { return false }
        }
        return true
    }

    /// What one pass over a head found.
    private struct Scan {
        var headers = HTTPHeaders()
        var chunked = false
        var hasContentLength = false
        var forwardedFor: String?
        var via: String?
        /// Names listed in `Connection` (other than `close`/`keep-alive`): hop-by-hop too.
        var connectionOptions: [Substring] = []
    }

    private static func scan(_ headers: HTTPHeaders, extra: Int, replacingTraceContext: Bool = false) -> Scan {
        var s = Scan()
        s.headers.reserveCapacity(headers.count + extra)
        for (name, value) in headers {
            switch kind(of: name) {
            case .endToEnd:
                s.headers.add(name: name, value: value)
            case .traceContext:
                if !replacingTraceContext { s.headers.add(name: name, value: value) }
            case .contentLength:
                s.hasContentLength = true
                s.headers.add(name: name, value: value)
            case .connection:
                for token in value.split(separator: ",") {
                    let option = token.trimmingASCIIWhitespace()
                    let lower = option.lowercased()
                    if !option.isEmpty && lower != "close" && lower != "keep-alive" {
                        s.connectionOptions.append(option)
                    }
                }
            case .hopByHop, .xForwardedProto:
                continue
            case .te:
                if value.lowercased().contains("trailers") { s.headers.add(name: "te", value: "trailers") }
            case .transferEncoding:
                if value.lowercased().contains("chunked") { s.chunked = true }
            case .xForwardedFor:
                s.forwardedFor = s.forwardedFor.map { "\($0), \(value)" } ?? value
            case .via:
                s.via = s.via.map { "\($0), \(value)" } ?? value
            }
        }
        for option in s.connectionOptions { s.headers.remove(name: String(option)) }
        return s
    }

    /// The head sent upstream for a downstream request; `requestID` is added as `x-request-id`
    /// (one the proxy made for a request without), and `trace`'s context replaces the request's
    /// `traceparent`/`tracestate`.
    static func upstreamRequest(
        _ head: HTTPRequestHead,
        clientIP: String?,
        requestID: String? = nil,
        trace: RequestTrace? = nil
    ) -> HTTPRequestHead {
        let replacing = trace?.replacesHeaders ?? false
        var s = scan(head.headers, extra: 7, replacingTraceContext: replacing)
        if let requestID { s.headers.add(name: "x-request-id", value: requestID) }
        if let trace, replacing {
            s.headers.add(name: "traceparent", value: trace.traceparent)
            if let state = trace.tracestate { s.headers.add(name: "tracestate", value: state) }
        }
        if s.chunked && !s.hasContentLength { s.headers.add(name: "transfer-encoding", value: "chunked") }
        if let ip = clientIP {
            s.headers.add(name: "x-forwarded-for", value: s.forwardedFor.map { "\($0), \(ip)" } ?? ip)
        } else if let existing = s.forwardedFor {
            s.headers.add(name: "x-forwarded-for", value: existing)
        }
        s.headers.add(name: "x-forwarded-proto", value: "http")
        s.headers.add(name: "via", value: viaValue(existing: s.via, version: head.version))
        var uri = head.uri
        if !uri.hasPrefix("/") && uri != "*" {
            uri = String(RouteTable.pathAndQuery(of: uri))
        }
        return HTTPRequestHead(version: .http1_1, method: head.method, uri: uri, headers: s.headers)
    }

    /// Writes the head sent to an HTTP/1 client for an upstream response: the status line in the
    /// request's version, the upstream's fields less the hop-by-hop ones, `Via`, and the framing
    /// and connection fields of this connection. An HTTP/1 upstream's field lines are copied as
    /// they came (``RawResponseHead``), never decoded. `keepAlive` says whether the client's
    /// connection stays open after it; `chunked`, whether its body is sent in chunks.
    static func writeHTTP1Response(
        _ head: ResponseHead,
        requestVersion: HTTPVersion,
        keepAlive: Bool,
        chunked: Bool,
        into out: inout ByteBuffer
    ) {
        out.writeStaticString(requestVersion == .http1_0 ? "HTTP/1.0 " : "HTTP/1.1 ")
        switch head.fields {
        case .raw(let raw):
            out.writeImmutableBuffer(raw.statusText)
            out.writeStaticString("\r\n")
            writeFields(raw, into: &out)
            out.writeStaticString(head.version.minor == 0 ? "via: 1.0 trellis\r\n" : "via: 1.1 trellis\r\n")
        case .decoded(let headers):
            out.writeString(String(head.status.code))
            out.writeStaticString(" ")
            out.writeString(head.status.reasonPhrase)
            out.writeStaticString("\r\n")
            let s = scan(headers, extra: 0)
            for (name, value) in s.headers { writeField(name, value, into: &out) }
            if let forwardedFor = s.forwardedFor { writeField("x-forwarded-for", forwardedFor, into: &out) }
            writeField("via", viaValue(existing: s.via, version: head.version), into: &out)
        }
        if chunked { out.writeStaticString("transfer-encoding: chunked\r\n") }
        if !keepAlive {
            out.writeStaticString("connection: close\r\n")
        } else if requestVersion == .http1_0 {
            out.writeStaticString("connection: keep-alive\r\n")
        }
        out.writeStaticString("\r\n")
    }

    /// An HTTP/1 upstream's field lines, copied as received but for the hop-by-hop ones (and those
    /// its `Connection` names), `Transfer-Encoding` (framed again), and `TE` (only `trailers`).
    private static func writeFields(_ raw: RawResponseHead, into out: inout ByteBuffer) {
        raw.block.withUnsafeReadableBytes { rawBytes in
            let bytes = rawBytes.bindMemory(to: UInt8.self)
            RawResponseHead.forEachLine(bytes) { line, colon in
                let name = UnsafeBufferPointer(rebasing: bytes[line.lowerBound..<colon])
                switch kind(of: name) {
                case .endToEnd, .traceContext, .contentLength, .xForwardedFor, .via:
                    if !raw.connectionOptions.isEmpty,
                        raw.connectionOptions.contains(where: {
                            String(decoding: name, as: UTF8.self).lowercased() == $0
                        })
                    {
                        return
                    }
                    out.writeBytes(UnsafeRawBufferPointer(rebasing: rawBytes[line]))
                    out.writeStaticString("\r\n")
                case .te:
                    let value = String(
                        decoding: UnsafeBufferPointer(rebasing: bytes[(colon + 1)..<line.upperBound]),
                        as: UTF8.self
                    )
                    if value.lowercased().contains("trailers") { out.writeStaticString("te: trailers\r\n") }
                case .connection, .hopByHop, .xForwardedProto, .transferEncoding:
                    return
                }
            }
        }
    }

    private static func writeField(_ name: String, _ value: String, into out: inout ByteBuffer) {
        out.writeString(name)
        out.writeStaticString(": ")
        out.writeString(value)
        out.writeStaticString("\r\n")
    }

    /// The fields sent to an HTTP/2 client for an upstream response: `:status` first, names
    /// lowercase, connection-specific headers gone (RFC 9113 §8.2.2), framing left to HTTP/2.
    static func http2Response(_ head: ResponseHead) -> [(name: String, value: String)] {
        let s = scan(head.headers, extra: 2)
        var fields: [(name: String, value: String)] = [(":status", String(head.status.code))]
        fields.reserveCapacity(s.headers.count + 3)
        for (name, value) in s.headers { fields.append((name.asciiLowercased, value)) }
        if let forwardedFor = s.forwardedFor { fields.append(("x-forwarded-for", forwardedFor)) }
        fields.append(("via", viaValue(existing: s.via, version: head.version)))
        return fields
    }

    private static func viaValue(existing: String?, version: HTTPVersion) -> String {
        let entry = version == .http1_1 ? "1.1 trellis" : "\(version.major).\(version.minor) trellis"
        return existing.map { "\($0), \(entry)" } ?? entry
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

extension String {
    /// Whether the string equals `lowercase` ignoring ASCII case (a header name), without
    /// copying; `lowercase` must be lowercase ASCII.
    func equalsIgnoringASCIICase(_ lowercase: StaticString) -> Bool {
        var s = self
        return s.withUTF8 { HeaderRewriting.equalsLowercase($0, lowercase) }
    }

    /// The string with ASCII letters lowercased; the string itself (no copy) when it has no
    /// uppercase ASCII letter, as header names on the wire mostly have not.
    var asciiLowercased: String {
        var s = self
        let hasUpper = s.withUTF8 { bytes in bytes.contains { $0 >= UInt8(ascii: "A") && $0 <= UInt8(ascii: "Z") } }
        return hasUpper ? lowercased() : self
    }
}
