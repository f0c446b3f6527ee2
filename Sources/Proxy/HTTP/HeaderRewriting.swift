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
        name.withUTF8Bytes { kind(of: $0) }
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
    /// Inlined up to the first byte, where most names of the right length already differ; the
    /// rest of a name of eight bytes or more is compared eight bytes at a time (the last word
    /// overlapping the one before when the length is not a multiple of eight).
    @inline(__always)
    static func equalsLowercase(_ bytes: UnsafeBufferPointer<UInt8>, _ lowercase: StaticString) -> Bool {
        let count = lowercase.utf8CodeUnitCount
        guard bytes.count == count else { return false }
        guard count > 0, let base = bytes.baseAddress else { return true }
        guard asciiLowercased(base[0]) == lowercase.utf8Start[0] else { return false }
        return equalsLowercase(base, UnsafeRawPointer(lowercase.utf8Start), count: count)
    }

    private static func equalsLowercase(_ base: UnsafePointer<UInt8>, _ expected: UnsafeRawPointer, count: Int) -> Bool
    {
        guard count >= 8 else {
            for i in 1..<count where asciiLowercased(base[i]) != expected.load(fromByteOffset: i, as: UInt8.self) {
                return false
            }
            return true
        }
        let raw = UnsafeRawPointer(base)
        var i = 0
        while true {
            let offset = min(i, count &- 8)
            let word = raw.loadUnaligned(fromByteOffset: offset, as: UInt64.self)
            guard asciiLowercased(word) == expected.loadUnaligned(fromByteOffset: offset, as: UInt64.self) else {
                return false
            }
            i &+= 8
            if i >= count { return true }
        }
    }

    @inline(__always)
    private static func asciiLowercased(_ b: UInt8) -> UInt8 {
        b >= UInt8(ascii: "A") && b <= UInt8(ascii: "Z") ? b | 0x20 : b
    }

    /// Each byte of `w` from `A` to `Z` made lower case, the others left as they are: with the
    /// top bit of each byte masked off, adding 0x3F sets it from `A` (0x41) up and adding 0x25
    /// from `[` (0x5B) up, never carrying into the next byte; bytes of 0x80 and more are left out.
    @inline(__always)
    static func asciiLowercased(_ w: UInt64) -> UInt64 {
        let ones: UInt64 = 0x0101_0101_0101_0101
        let highs: UInt64 = 0x8080_8080_8080_8080
        let low7 = w & ~highs
        let fromA = low7 &+ 0x3F &* ones
        let pastZ = low7 &+ 0x25 &* ones
        let upper = fromA & ~pastZ & ~w & highs
        return w | upper &>> 2
    }

    /// What one pass over a head found. The fields passed on are kept as pairs, not `HTTPHeaders`:
    /// their names came through a parser that checked them, and `HTTPHeaders.add` checks each again.
    private struct Scan {
        var fields: [(name: String, value: String)] = []
        var chunked = false
        var hasContentLength = false
        var forwardedFor: String?
        var via: String?
        /// Names listed in `Connection` (other than `close`/`keep-alive`): hop-by-hop too.
        var connectionOptions: [Substring] = []
    }

    private static func scan(_ headers: HTTPHeaders, extra: Int, replacingTraceContext: Bool = false) -> Scan {
        var s = Scan()
        s.fields.reserveCapacity(headers.count + extra)
        for (name, value) in headers {
            switch kind(of: name) {
            case .endToEnd:
                s.fields.append((name, value))
            case .traceContext:
                if !replacingTraceContext { s.fields.append((name, value)) }
            case .contentLength:
                s.hasContentLength = true
                s.fields.append((name, value))
            case .connection:
                s.connectionOptions.append(contentsOf: connectionOptions(value))
            case .hopByHop, .xForwardedProto:
                continue
            case .te:
                if value.lowercased().contains("trailers") { s.fields.append(("te", "trailers")) }
            case .transferEncoding:
                if value.lowercased().contains("chunked") { s.chunked = true }
            case .xForwardedFor:
                s.forwardedFor = s.forwardedFor.map { "\($0), \(value)" } ?? value
            case .via:
                s.via = s.via.map { "\($0), \(value)" } ?? value
            }
        }
        if !s.connectionOptions.isEmpty {
            let named = Set(s.connectionOptions.map { $0.lowercased() })
            s.fields.removeAll { named.contains($0.name.lowercased()) }
        }
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
        if let requestID { s.fields.append(("x-request-id", requestID)) }
        if let trace, replacing {
            s.fields.append(("traceparent", trace.traceparent))
            if let state = trace.tracestate { s.fields.append(("tracestate", state)) }
        }
        if s.chunked && !s.hasContentLength { s.fields.append(("transfer-encoding", "chunked")) }
        if let ip = clientIP {
            s.fields.append(("x-forwarded-for", s.forwardedFor.map { "\($0), \(ip)" } ?? ip))
        } else if let existing = s.forwardedFor {
            s.fields.append(("x-forwarded-for", existing))
        }
        s.fields.append(("x-forwarded-proto", "http"))
        s.fields.append(("via", viaValue(existing: s.via, version: head.version)))
        var uri = head.uri
        if !uri.hasPrefix("/") && uri != "*" {
            uri = String(RouteTable.pathAndQuery(of: uri))
        }
        return HTTPRequestHead(
            version: .http1_1,
            method: head.method,
            uri: uri,
            headers: HTTPHeaders(s.fields.map { ($0.name, $0.value) })
        )
    }

    /// Writes the HTTP/1.1 head sent upstream for a client's request, straight from its decoded
    /// head: what ``upstreamRequest(_:clientIP:requestID:trace:)`` makes, without building it
    /// first. Returns whether the body goes in chunks (the client's was chunked, or a POST, PUT or
    /// PATCH has no length; a TRACE has no body). The head is measured, then copied into memory
    /// reserved once (``HeadSink``).
    static func writeHTTP1Request(_ request: UpstreamRequestHead, into out: inout ByteBuffer) -> Bool {
        if request.head.fields.isRaw {
            // An HTTP/1 client's lines: written in one pass into memory reserved for a bound,
            // and once more (rare) when its `Connection` names fields to drop.
            let bound = rawRequestBound(request)
            let start = out.writerIndex
            var found: (chunked: Bool, connectionOptions: [Substring]) = (false, [])
            out.writeWithUnsafeMutableBytes(minimumWritableBytes: bound) { raw in
                var memory = HeadMemory(raw)
                found = emitRequest(request, skipping: [], into: &memory)
                return memory.count
            }
            guard !found.connectionOptions.isEmpty else { return found.chunked }
            out.moveWriterIndex(to: start)
            let skipping = found.connectionOptions.map { $0.lowercased() }
            out.writeWithUnsafeMutableBytes(minimumWritableBytes: bound) { raw in
                var memory = HeadMemory(raw)
                _ = emitRequest(request, skipping: skipping, into: &memory)
                return memory.count
            }
            return found.chunked
        }
        var length = HeadLength()
        let found = emitRequest(request, skipping: [], into: &length)
        // Fields named in `Connection` are hop-by-hop too, wherever they came (rare).
        let skipping = found.connectionOptions.map { $0.lowercased() }
        out.writeWithUnsafeMutableBytes(minimumWritableBytes: length.count) { raw in
            var memory = HeadMemory(raw)
            _ = emitRequest(request, skipping: skipping, into: &memory)
            return memory.count
        }
        return found.chunked
    }

    /// Memory for the head ``writeHTTP1Request(_:into:)`` writes, reserved at once: the bound of
    /// raw field lines, else a size most decoded heads fit in.
    static func http1RequestCapacity(_ request: UpstreamRequestHead) -> Int {
        if request.head.fields.isRaw { return rawRequestBound(request) }
        return 512
    }

    /// The most bytes ``emitRequest(_:skipping:into:)`` writes for raw field lines: a copied
    /// line grows by at most its line end (a bare LF written as CRLF; `TE` written as
    /// `te: trailers`, from a line of at least 12 bytes), so twice the block bounds the copied
    /// lines and the values joined into `X-Forwarded-For` and `Via`; plus the request line and
    /// what the proxy adds (its constant parts under 256 bytes).
    static func rawRequestBound(_ request: UpstreamRequestHead) -> Int {
        2 * request.head.fields.rawBytes + request.head.method.rawValue.utf8.count
            + request.head.uri.utf8.count
            + (request.clientIP?.utf8.count ?? 0) + (request.requestID == nil ? 0 : RequestID.length)
            + (request.trace?.tracestate?.utf8.count ?? 0) + 256
    }

    /// What a request's fields said besides the ones passed on.
    private struct PassedFields {
        var connectionOptions: [Substring] = []
        var chunked = false
        var hasContentLength = false
        var forwardedFor: String?
        var via: String?
    }

    /// The fields sent to an HTTP/2 upstream for a client's request: the same rewriting as
    /// ``writeHTTP1Request(_:into:)`` (one function, ``emitRequest(_:skipping:into:)``, decides
    /// both), as pseudo-headers (`:authority` from `Host`) and lowercase fields without the
    /// connection-specific ones (RFC 9113 §8.2.2).
    static func http2RequestFields(_ request: UpstreamRequestHead) -> [(name: String, value: String)] {
        var fields = HTTP2RequestFields(
            authority: request.head.fields.first("host"),
            capacity: 16
        )
        let found = emitRequest(request, skipping: [], into: &fields)
        guard !found.connectionOptions.isEmpty else { return fields.fields }
        // Fields named in `Connection` are hop-by-hop too (rare): written again without them.
        fields = HTTP2RequestFields(authority: fields.authority, capacity: fields.fields.count)
        _ = emitRequest(request, skipping: found.connectionOptions.map { $0.lowercased() }, into: &fields)
        return fields.fields
    }

    private static func emitRequest<Sink: RequestSink>(
        _ request: UpstreamRequestHead,
        skipping: [String],
        into out: inout Sink
    ) -> (chunked: Bool, connectionOptions: [Substring]) {
        // Field by field: a copy of the whole head is a retain per string and buffer in it.
        let context = request.request
        let (method, uri, version) = (context.head.method, context.head.uri, context.head.version)
        if uri.utf8.first == UInt8(ascii: "/") || uri == "*" {
            out.requestLine(method: method.rawValue, target: uri)
        } else {
            out.requestLine(method: method.rawValue, target: String(RouteTable.pathAndQuery(of: uri)))
        }
        let replacingTraceContext = request.trace?.replacesHeaders ?? false
        var s = PassedFields()
        // An HTTP/1 client's field lines are copied as they came (``RequestFields``), never
        // decoded; what is rewritten is read into strings.
        context.head.fields.forEachLine { line, name, value in
            switch kind(of: name) {
            case .endToEnd:
                if !skipping.isEmpty && skipping.contains(String(decoding: name, as: UTF8.self).lowercased()) {
                    return
                }
                out.field(line: line, name: name, value: value)
            case .traceContext:
                if !replacingTraceContext { out.field(line: line, name: name, value: value) }
            case .contentLength:
                guard !method.isTRACE else { return }
                s.hasContentLength = true
                out.field(line: line, name: name, value: value)
            case .connection:
                s.connectionOptions.append(contentsOf: connectionOptions(String(decoding: value, as: UTF8.self)))
            case .hopByHop, .xForwardedProto:
                return
            case .te:
                if String(decoding: value, as: UTF8.self).lowercased().contains("trailers") {
                    out.field("te", constant: "trailers")
                }
            case .transferEncoding:
                if String(decoding: value, as: UTF8.self).lowercased().contains("chunked") { s.chunked = true }
            case .xForwardedFor:
                let value = String(decoding: value, as: UTF8.self)
                s.forwardedFor = s.forwardedFor.map { "\($0), \(value)" } ?? value
            case .via:
                let value = String(decoding: value, as: UTF8.self)
                s.via = s.via.map { "\($0), \(value)" } ?? value
            }
        }
        if let requestID = request.requestID { out.requestID(requestID) }
        if let trace = request.trace, trace.replacesHeaders {
            out.traceparent(trace.ids)
            if let state = trace.tracestate { out.field("tracestate", state) }
        }
        var chunked = false
        if !s.hasContentLength && !method.isTRACE {
            switch method {
            case .POST, .PUT, .PATCH: chunked = true
            default: chunked = s.chunked
            }
            if chunked { out.chunkedFraming() }
        }
        if let ip = request.clientIP {
            out.forwardedFor(existing: s.forwardedFor, client: ip)
        } else if let existing = s.forwardedFor {
            out.field("x-forwarded-for", existing)
        }
        out.field("x-forwarded-proto", constant: "http")
        if s.via == nil && version == .http1_1 {
            out.field("via", constant: "1.1 trellis")
        } else {
            out.field("via", viaValue(existing: s.via, version: version))
        }
        out.end()
        return (chunked, s.connectionOptions)
    }

    /// The names a `Connection` value lists as hop-by-hop: not `close` or `keep-alive`, and never
    /// a framing field (dropping `Content-Length` because a peer named it would leave the body
    /// unframed for the other side: request smuggling).
    static func connectionOptions(_ value: String) -> [Substring] {
        var options: [Substring] = []
        for token in value.split(separator: ",") {
            let option = token.trimmingASCIIWhitespace()
            if option.isEmpty || isConnectionOnlyOrFraming(option.lowercased()) { continue }
            options.append(option)
        }
        return options
    }

    static func isConnectionOnlyOrFraming(_ lowercased: String) -> Bool {
        lowercased == "close" || lowercased == "keep-alive" || lowercased == "content-length"
            || lowercased == "transfer-encoding"
    }

    /// A chunk's size line (its data and ``lineEnd`` follow).
    static func chunkSizeLine(_ bytes: Int, _ allocator: ByteBufferAllocator) -> ByteBuffer {
        var line = allocator.buffer(capacity: 20)
        line.writeString(String(bytes, radix: 16))
        line.writeStaticString("\r\n")
        return line
    }

    static let lineEnd = ByteBuffer(staticString: "\r\n")

    /// The end of a chunked body: the last chunk, the trailers, the empty line.
    static func writeLastChunk(_ trailers: HTTPHeaders?, into out: inout ByteBuffer) {
        out.writeStaticString("0\r\n")
        if let trailers {
            for (name, value) in trailers {
                out.writeString(name)
                out.writeStaticString(": ")
                out.writeString(value)
                out.writeStaticString("\r\n")
            }
        }
        out.writeStaticString("\r\n")
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
        let framing = ClientFraming(requestVersion: requestVersion, keepAlive: keepAlive, chunked: chunked)
        switch head.fields {
        case .raw(let raw):
            out.writeWithUnsafeMutableBytes(minimumWritableBytes: responseHeadBound(raw)) { memory in
                var sink = HeadMemory(memory)
                emitResponse(raw, head, framing, into: &sink)
                return sink.count
            }
        case .decoded(let headers):
            var length = HeadLength()
            let s = scan(headers, extra: 0)
            emitDecodedResponse(s, head, framing, into: &length)
            out.writeWithUnsafeMutableBytes(minimumWritableBytes: length.count) { memory in
                var sink = HeadMemory(memory)
                emitDecodedResponse(s, head, framing, into: &sink)
                return sink.count
            }
        }
    }

    /// The most bytes ``writeHTTP1Response`` writes for an HTTP/1 upstream's head: a copied line
    /// grows by at most 2 bytes (a bare LF written as CRLF; `TE` written as `te: trailers`) and a
    /// line has at least 3 (`a:` and LF), so twice the block is a bound; plus the status line's
    /// version and the fields added (under 128 bytes).
    static func responseHeadBound(_ raw: RawResponseHead) -> Int {
        raw.statusText.readableBytes + 2 * raw.block.readableBytes + 128
    }

    /// How the client's connection frames this response.
    private struct ClientFraming {
        var requestVersion: HTTPVersion
        var keepAlive: Bool
        var chunked: Bool
    }

    private static func emitResponse<Sink: HeadSink>(
        _ raw: RawResponseHead,
        _ head: ResponseHead,
        _ framing: ClientFraming,
        into out: inout Sink
    ) {
        out.put(framing.requestVersion == .http1_0 ? "HTTP/1.0 " : "HTTP/1.1 ")
        raw.statusText.withUnsafeReadableBytes { out.put($0) }
        out.put("\r\n")
        // The upstream's field lines as received but for the hop-by-hop ones (and those its
        // `Connection` names), `Transfer-Encoding` (framed again) and `TE` (only `trailers`). Where
        // the parser found which lines those are, the lines between are copied in one piece.
        raw.block.withUnsafeReadableBytes { rawBytes in
            let plan = raw.plan
            guard plan.count >= 0 else {
                emitResponseLines(rawBytes, raw, into: &out)
                return
            }
            var copied = 0
            for i in 0..<Int(plan.count) {
                let line = plan.line(i)
                out.put(UnsafeRawBufferPointer(rebasing: rawBytes[copied..<line.lowerBound]))
                emitResponseLines(UnsafeRawBufferPointer(rebasing: rawBytes[line]), raw, into: &out)
                copied = line.upperBound
            }
            out.put(UnsafeRawBufferPointer(rebasing: rawBytes[copied...]))
        }
        out.put(head.version.minor == 0 ? "via: 1.0 trellis\r\n" : "via: 1.1 trellis\r\n")
        emitResponseEnd(framing, into: &out)
    }

    /// Whether a response field named `name` is relayed to an HTTP/1 client as it came (unless
    /// `Connection` names it): what ``emitResponseLines(_:_:into:)`` copies.
    static func copiesResponseField(_ name: UnsafeBufferPointer<UInt8>) -> Bool {
        copiesResponseField(kind(of: name))
    }

    private static func copiesResponseField(_ kind: Kind) -> Bool {
        switch kind {
        case .endToEnd, .traceContext, .contentLength, .xForwardedFor, .via: true
        case .te, .connection, .hopByHop, .xForwardedProto, .transferEncoding: false
        }
    }

    /// The field lines of `block` (whole lines of a checked response block) as relayed to an
    /// HTTP/1 client, each looked at.
    private static func emitResponseLines<Sink: HeadSink>(
        _ block: UnsafeRawBufferPointer,
        _ raw: RawResponseHead,
        into out: inout Sink
    ) {
        let bytes = block.bindMemory(to: UInt8.self)
        RawResponseHead.forEachLine(bytes) { line, colon in
            let name = UnsafeBufferPointer(rebasing: bytes[line.lowerBound..<colon])
            let kind = kind(of: name)
            if copiesResponseField(kind) {
                if !raw.connectionOptions.isEmpty,
                    raw.connectionOptions.contains(where: {
                        String(decoding: name, as: UTF8.self).lowercased() == $0
                    })
                {
                    return
                }
                out.put(UnsafeRawBufferPointer(rebasing: block[line]))
                out.put("\r\n")
            } else if case .te = kind {
                let value = String(
                    decoding: UnsafeBufferPointer(rebasing: bytes[(colon + 1)..<line.upperBound]),
                    as: UTF8.self
                )
                if value.lowercased().contains("trailers") { out.put("te: trailers\r\n") }
            }
        }
    }

    /// An HTTP/2 upstream's response for an HTTP/1 client: its fields as scanned.
    private static func emitDecodedResponse<Sink: HeadSink>(
        _ s: Scan,
        _ head: ResponseHead,
        _ framing: ClientFraming,
        into out: inout Sink
    ) {
        out.put(framing.requestVersion == .http1_0 ? "HTTP/1.0 " : "HTTP/1.1 ")
        out.put(string: String(head.status.code))
        out.put(" ")
        out.put(string: head.status.reasonPhrase)
        out.put("\r\n")
        for (name, value) in s.fields { out.putField(name, value) }
        if let forwardedFor = s.forwardedFor { out.putField("x-forwarded-for", forwardedFor) }
        out.putField("via", viaValue(existing: s.via, version: head.version))
        emitResponseEnd(framing, into: &out)
    }

    private static func emitResponseEnd<Sink: HeadSink>(_ framing: ClientFraming, into out: inout Sink) {
        if framing.chunked { out.put("transfer-encoding: chunked\r\n") }
        if !framing.keepAlive {
            out.put("connection: close\r\n")
        } else if framing.requestVersion == .http1_0 {
            out.put("connection: keep-alive\r\n")
        }
        out.put("\r\n")
    }

    /// The fields sent to an HTTP/2 client for an upstream response: `:status` first, names
    /// lowercase, connection-specific headers gone (RFC 9113 §8.2.2), framing left to HTTP/2.
    static func http2Response(_ head: ResponseHead) -> [(name: String, value: String)] {
        let s = scan(head.headers, extra: 2)
        var fields: [(name: String, value: String)] = [(":status", String(head.status.code))]
        fields.reserveCapacity(s.fields.count + 3)
        for (name, value) in s.fields { fields.append((name.asciiLowercased, value)) }
        if let forwardedFor = s.forwardedFor { fields.append(("x-forwarded-for", forwardedFor)) }
        fields.append(("via", viaValue(existing: s.via, version: head.version)))
        return fields
    }

    private static func viaValue(existing: String?, version: HTTPVersion) -> String {
        // The versions every request has are constants, not formatted per request.
        let entry =
            switch (version.major, version.minor) {
            case (1, 1): "1.1 trellis"
            case (2, 0): "2.0 trellis"
            case (1, 0): "1.0 trellis"
            default: "\(version.major).\(version.minor) trellis"
            }
        return existing.map { $0 + ", " + entry } ?? entry
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
    /// Calls `body` with the string's UTF-8 bytes where they are. `withUTF8` needs a `var` copy,
    /// which retains and releases the storage each time; on the data path that is several times
    /// per header. A string that is not contiguous UTF-8 (bridged) is made so once.
    @inline(__always)
    func withUTF8Bytes<R>(_ body: (UnsafeBufferPointer<UInt8>) throws -> R) rethrows -> R {
        if let result = try utf8.withContiguousStorageIfAvailable(body) { return result }
        var copy = self
        return try copy.withUTF8(body)
    }

    /// Whether the string equals `lowercase` ignoring ASCII case (a header name), without
    /// copying; `lowercase` must be lowercase ASCII.
    func equalsIgnoringASCIICase(_ lowercase: StaticString) -> Bool {
        guard utf8.count == lowercase.utf8CodeUnitCount else { return false }
        return withUTF8Bytes { HeaderRewriting.equalsLowercase($0, lowercase) }
    }

    /// The string with ASCII letters lowercased; the string itself (no copy) when it has no
    /// uppercase ASCII letter, as header names on the wire mostly have not.
    var asciiLowercased: String {
        let hasUpper = withUTF8Bytes { bytes in bytes.contains { $0 >= UInt8(ascii: "A") && $0 <= UInt8(ascii: "Z") } }
        return hasUpper ? lowercased() : self
    }
}

/// Where a head's bytes go. One generic function writes a head into either sink:
/// ``HeadLength`` measures it, then ``HeadMemory`` copies it into memory reserved for that length,
/// one capacity check instead of one per piece.
protocol HeadSink {
    mutating func put(_ text: StaticString)
    /// Labelled: a string literal given to an unlabelled `put` would be taken as a `String` (its
    /// default type), and copying through `String` cost ~110 instructions a piece against a
    /// `memcpy` of a `StaticString`'s bytes.
    mutating func put(string text: String)
    mutating func put(_ bytes: UnsafeRawBufferPointer)
    mutating func putTraceparent(_ ids: TraceIDs)
    mutating func putRequestID(_ id: RequestID)
}

extension HeadSink {
    mutating func putField(_ name: String, _ value: String) {
        put(string: name)
        put(": ")
        put(string: value)
        put("\r\n")
    }
}

/// What ``HeaderRewriting`` writes a request head into, field by field: HTTP/1 bytes (the two
/// ``HeadSink``s) or an HTTP/2 field list (``HTTP2RequestFields``). `name`s given as static
/// strings are lowercase.
protocol RequestSink {
    mutating func requestLine(method: String, target: String)
    /// A client's field passed on: its line as received when there is one (HTTP/1), else its
    /// name and value.
    mutating func field(
        line: UnsafeRawBufferPointer?,
        name: UnsafeBufferPointer<UInt8>,
        value: UnsafeBufferPointer<UInt8>
    )
    /// A field of the proxy's own. (No `String`-named variant, and the constant value labelled:
    /// a string literal matches a `String` parameter before a `StaticString` one.)
    mutating func field(_ name: StaticString, _ value: String)
    mutating func field(_ name: StaticString, constant value: StaticString)
    mutating func traceparent(_ ids: TraceIDs)
    /// `x-request-id`, one the proxy made.
    mutating func requestID(_ id: RequestID)
    /// `x-forwarded-for`: what the request had, then the client's address.
    mutating func forwardedFor(existing: String?, client: String)
    /// The body goes in chunks (`transfer-encoding: chunked` in HTTP/1; HTTP/2 frames it itself).
    mutating func chunkedFraming()
    mutating func end()
}

/// HTTP/1.1 bytes: the request line, `name: value` lines, the empty line.
extension RequestSink where Self: HeadSink {
    mutating func requestLine(method: String, target: String) {
        put(string: method)
        put(" ")
        put(string: target)
        put(" HTTP/1.1\r\n")
    }

    mutating func field(
        line: UnsafeRawBufferPointer?,
        name: UnsafeBufferPointer<UInt8>,
        value: UnsafeBufferPointer<UInt8>
    ) {
        if let line {
            put(line)
        } else {
            put(UnsafeRawBufferPointer(name))
            put(": ")
            put(UnsafeRawBufferPointer(value))
        }
        put("\r\n")
    }

    mutating func field(_ name: StaticString, _ value: String) {
        put(name)
        put(": ")
        put(string: value)
        put("\r\n")
    }

    mutating func field(_ name: StaticString, constant value: StaticString) {
        put(name)
        put(": ")
        put(value)
        put("\r\n")
    }

    mutating func traceparent(_ ids: TraceIDs) {
        put("traceparent: ")
        putTraceparent(ids)
        put("\r\n")
    }

    mutating func requestID(_ id: RequestID) {
        put("x-request-id: ")
        putRequestID(id)
        put("\r\n")
    }

    mutating func forwardedFor(existing: String?, client: String) {
        put("x-forwarded-for: ")
        if let existing {
            put(string: existing)
            put(", ")
        }
        put(string: client)
        put("\r\n")
    }

    mutating func chunkedFraming() { put("transfer-encoding: chunked\r\n") }

    mutating func end() { put("\r\n") }
}

/// An HTTP/2 request's fields: pseudo-headers first, names lowercase, `Host` as `:authority`,
/// and no framing field but `Content-Length` (HTTP/2 frames bodies itself: `chunkedFraming`
/// writes nothing). The connection-specific fields never reach a sink (``HeaderRewriting`` drops
/// them, `Transfer-Encoding` included), `te` only as `trailers`.
struct HTTP2RequestFields: RequestSink {
    private(set) var fields: [(name: String, value: String)] = []
    let authority: String?

    init(authority: String?, capacity: Int) {
        self.authority = authority
        fields.reserveCapacity(capacity)
    }

    mutating func requestLine(method: String, target: String) {
        fields.append((":method", method))
        fields.append((":scheme", "http"))
        if let authority { fields.append((":authority", authority)) }
        fields.append((":path", target))
    }

    private mutating func add(_ name: String, _ value: String) {
        let lower = name.asciiLowercased
        if lower == "host" { return }  // sent as `:authority`
        fields.append((lower, value))
    }

    mutating func field(
        line: UnsafeRawBufferPointer?,
        name: UnsafeBufferPointer<UInt8>,
        value: UnsafeBufferPointer<UInt8>
    ) {
        add(String(decoding: name, as: UTF8.self), String(decoding: value, as: UTF8.self))
    }

    mutating func field(_ name: StaticString, _ value: String) {
        fields.append((name.description, value))
    }

    mutating func field(_ name: StaticString, constant value: StaticString) {
        fields.append((name.description, value.description))
    }

    mutating func traceparent(_ ids: TraceIDs) { fields.append(("traceparent", TraceHeaders.traceparent(ids))) }

    mutating func requestID(_ id: RequestID) { fields.append(("x-request-id", id.text)) }

    mutating func forwardedFor(existing: String?, client: String) {
        fields.append(("x-forwarded-for", existing.map { $0 + ", " + client } ?? client))
    }

    mutating func chunkedFraming() {}

    mutating func end() {}
}

struct HeadLength: HeadSink, RequestSink {
    private(set) var count = 0

    mutating func put(_ text: StaticString) { count += text.utf8CodeUnitCount }
    mutating func put(string text: String) { count += text.utf8.count }
    mutating func put(_ bytes: UnsafeRawBufferPointer) { count += bytes.count }
    mutating func putTraceparent(_ ids: TraceIDs) { count += TraceHeaders.traceparentLength }
    mutating func putRequestID(_ id: RequestID) { count += RequestID.length }
}

/// Copies into memory reserved beforehand (at least what a ``HeadLength`` measured, or a proven
/// bound); debug builds, and so the tests, check every piece against it.
struct HeadMemory: HeadSink, RequestSink {
    private let base: UnsafeMutableRawPointer
    private let capacity: Int
    private(set) var count = 0

    init(_ memory: UnsafeMutableRawBufferPointer) {
        self.base = memory.baseAddress!
        self.capacity = memory.count
    }

    private func fits(_ n: Int) -> Bool { count + n <= capacity }

    mutating func put(_ text: StaticString) {
        assert(fits(text.utf8CodeUnitCount), "head larger than reserved")
        (base + count).copyMemory(from: text.utf8Start, byteCount: text.utf8CodeUnitCount)
        count += text.utf8CodeUnitCount
    }

    /// Reads the string's bytes where they are (``Swift/String/withUTF8Bytes(_:)``).
    mutating func put(string text: String) {
        let (dest, room) = (base + count, capacity - count)
        let written = text.withUTF8Bytes { utf8 -> Int in
            assert(utf8.count <= room, "head larger than reserved")
            if let start = utf8.baseAddress { dest.copyMemory(from: start, byteCount: utf8.count) }
            return utf8.count
        }
        count += written
    }

    mutating func put(_ bytes: UnsafeRawBufferPointer) {
        assert(fits(bytes.count), "head larger than reserved")
        if let start = bytes.baseAddress { (base + count).copyMemory(from: start, byteCount: bytes.count) }
        count += bytes.count
    }

    mutating func putTraceparent(_ ids: TraceIDs) {
        assert(fits(TraceHeaders.traceparentLength), "head larger than reserved")
        TraceHeaders.write(
            ids,
            into: UnsafeMutableBufferPointer(
                start: (base + count).assumingMemoryBound(to: UInt8.self),
                count: TraceHeaders.traceparentLength
            )
        )
        count += TraceHeaders.traceparentLength
    }

    mutating func putRequestID(_ id: RequestID) {
        assert(fits(RequestID.length), "head larger than reserved")
        id.write(
            into: UnsafeMutableBufferPointer(
                start: (base + count).assumingMemoryBound(to: UInt8.self),
                count: RequestID.length
            )
        )
        count += RequestID.length
    }
}
