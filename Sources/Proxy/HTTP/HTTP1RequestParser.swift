import NIOCore
import NIOHTTP1

/// Reads a client's HTTP/1 requests from its connection's bytes, as a value (no I/O): the
/// downstream handler feeds what it read and takes the parts one at a time.
///
/// Checked as RFC 9112 asks of a server that forwards what it receives: the request line
/// (`method SP request-target SP HTTP/1.x`, a token method, a target of visible ASCII), field
/// names and values, one `Host` at most, and framing. Anything that could make the proxy and the
/// upstream disagree on where a request ends (both `Content-Length` and `Transfer-Encoding`,
/// differing lengths, a transfer coding other than a final chunked, `Transfer-Encoding` in an
/// HTTP/1.0 request, line folding, control characters) is an ``HTTP1ParseError``; a head larger
/// than the listener's limit is one marked `tooLarge` (431). Empty lines before a request line
/// are skipped. After an error nothing more of the connection is parsed.
///
/// Bodies are framed by `Content-Length` or chunked coding (decoded: the upstream's side frames
/// again); a request with neither has none.
struct HTTP1RequestParser {
    private var framer: HTTP1Framer
    /// Set once a request could not be parsed: what follows is dropped unread.
    private(set) var failed = false
    /// Where a head's field lines lie, gathered while they are checked and copied with them:
    /// memory used again for every head (an event loop's parsers share one).
    private let index: RequestFields.LineIndex
    /// The buffers the lines are copied into (the loop's, used again once their exchange ends).
    private let blocks: RequestFields.BlockStack

    /// `maxHeadBytes` bounds the request line and fields together (and a trailer section).
    init(
        maxHeadBytes: Int,
        index: RequestFields.LineIndex = RequestFields.LineIndex(),
        blocks: RequestFields.BlockStack = RequestFields.BlockStack()
    ) {
        framer = HTTP1Framer(headLimit: maxHeadBytes, what: "request head")
        self.index = index
        self.blocks = blocks
    }

    /// The next part found in `input` (what it uses is consumed), or nil when more bytes are needed.
    mutating func next(_ input: inout ByteBuffer) throws -> RequestPart? {
        if failed {
            input.moveReaderIndex(to: input.writerIndex)
            return nil
        }
        do {
            while let step = try framer.next(&input) {
                switch step {
                case .head(let section):
                    // nil: an empty line before a request line.
                    if let head = try head(section) { return .head(head) }
                case .body(let buffer):
                    return .body(buffer)
                case .end(let trailers):
                    return .end(trailers)
                }
            }
            return nil
        } catch {
            failed = true
            input.moveReaderIndex(to: input.writerIndex)
            throw error
        }
    }

    // MARK: Heads

    /// Checks a head and sets the framer for its body; nil for an empty line. The field lines are
    /// kept as received (copied out of the read buffer, which they would otherwise hold for the
    /// whole exchange), not decoded into strings: they are relayed upstream as they are.
    private mutating func head(_ bytes: ByteBuffer) throws -> RequestHead? {
        var framing = HTTP1Framer.Framing()
        index.removeAll()
        let parsed = try bytes.withUnsafeReadableBytes { raw -> (HTTPMethod, String, Int, RequestFields)? in
            let b = raw.bindMemory(to: UInt8.self)
            let (lineEnd, fieldsStart) = HTTP1Framer.startLine(b)
            if lineEnd == 0 { return nil }
            let (method, uri, minor) = try Self.requestLine(UnsafeBufferPointer(rebasing: b[0..<lineEnd]))
            var hosts = 0
            guard let base = b.baseAddress else { return nil }
            try HTTP1Framer.fields(b, from: fieldsStart) { name, value, line in
                if HTTP1Framer.mayFrame(length: name.count) {
                    try HTTP1Framer.frame(&framing, name: name, value: value)
                }
                if name.count == 4 && HeaderRewriting.equalsLowercase(name, "host") {
                    hosts += 1
                    if hosts > 1 { throw HTTP1ParseError("more than one Host field") }
                }
                // Offsets in the copied lines, which start at `fieldsStart`.
                let valueStart = (value.baseAddress.map { $0 - base } ?? line.end) &- fieldsStart
                index.append(
                    start: line.start &- fieldsStart,
                    colon: line.start &+ name.count &- fieldsStart,
                    valueStart: valueStart,
                    valueEnd: valueStart &+ value.count,
                    end: line.end &- fieldsStart
                )
            }
            let lines = UnsafeRawBufferPointer(rebasing: raw[fieldsStart...])
            let fields =
                index.overflowed
                ? RequestFields(raw: ByteBuffer(bytes: lines)) : RequestFields(raw: lines, index: index, blocks: blocks)
            return (method, uri, minor, fields)
        }
        guard let (method, uri, minor, fields) = parsed else { return nil }
        if framing.transferEncoding && minor == 0 {
            throw HTTP1ParseError("Transfer-Encoding in an HTTP/1.0 request")
        }
        let body = try framing.body()
        framer.expect(body == .untilClose ? .none : body)
        return RequestHead(
            method: method,
            uri: uri,
            version: HTTPVersion(major: 1, minor: minor),
            fields: fields,
            // As NIO's `isKeepAlive`: HTTP/1.1 unless `close`, HTTP/1.0 only with `keep-alive`.
            keepAlive: minor == 1 ? !framing.close : framing.keepAlive && !framing.close
        )
    }

    /// `method SP request-target SP HTTP/1.x`: the method, the target and the minor version.
    private static func requestLine(_ line: UnsafeBufferPointer<UInt8>) throws -> (HTTPMethod, String, Int) {
        var i = 0
        while i < line.count && HTTP1Framer.isTokenByte(line[i]) { i += 1 }
        let methodEnd = i
        guard methodEnd > 0, i < line.count, line[i] == SP else {
            throw HTTP1ParseError("not a request line: '\(HTTP1Framer.printable(line))'")
        }
        i += 1
        let targetStart = i
        // Visible ASCII: no space, control character or byte above 0x7E.
        while i < line.count && line[i] > SP && line[i] < 0x7F { i += 1 }
        let targetEnd = i
        guard targetEnd > targetStart, i < line.count, line[i] == SP else {
            throw HTTP1ParseError("not a request target (visible ASCII): '\(HTTP1Framer.printable(line))'")
        }
        i += 1
        guard line.count - i == 8, line[i] == UInt8(ascii: "H"), line[i + 1] == UInt8(ascii: "T"),
            line[i + 2] == UInt8(ascii: "T"), line[i + 3] == UInt8(ascii: "P"), line[i + 4] == UInt8(ascii: "/"),
            line[i + 5] == UInt8(ascii: "1"), line[i + 6] == UInt8(ascii: "."),
            line[i + 7] == UInt8(ascii: "0") || line[i + 7] == UInt8(ascii: "1")
        else {
            throw HTTP1ParseError(
                "not HTTP/1.0 or HTTP/1.1: '\(HTTP1Framer.printable(UnsafeBufferPointer(rebasing: line[i...])))'"
            )
        }
        let method = Self.method(UnsafeBufferPointer(rebasing: line[0..<methodEnd]))
        let uri = String(decoding: UnsafeBufferPointer(rebasing: line[targetStart..<targetEnd]), as: UTF8.self)
        return (method, uri, Int(line[i + 7] - 48))
    }

    /// The common methods without going through a string; the others by name (methods are
    /// case-sensitive).
    static func method(_ m: UnsafeBufferPointer<UInt8>) -> HTTPMethod {
        switch m.count {
        case 3:
            if equals(m, "GET") { return .GET }
            if equals(m, "PUT") { return .PUT }
        case 4:
            if equals(m, "POST") { return .POST }
            if equals(m, "HEAD") { return .HEAD }
        case 5:
            if equals(m, "PATCH") { return .PATCH }
        case 6:
            if equals(m, "DELETE") { return .DELETE }
        case 7:
            if equals(m, "OPTIONS") { return .OPTIONS }
        default:
            break
        }
        return HTTPMethod(rawValue: String(decoding: m, as: UTF8.self))
    }

    private static func equals(_ bytes: UnsafeBufferPointer<UInt8>, _ text: StaticString) -> Bool {
        guard bytes.count == text.utf8CodeUnitCount else { return false }
        let t = text.utf8Start
        for i in 0..<bytes.count where bytes[i] != t[i] { return false }
        return true
    }
}

private let SP: UInt8 = 0x20

/// What ``HTTP1RequestParser`` reads: a head, body bytes, the end (with trailers).
typealias RequestPart = HTTPPart<RequestHead, ByteBuffer>
