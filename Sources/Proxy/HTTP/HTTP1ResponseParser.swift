import NIOCore
import NIOHTTP1

/// One part of an upstream's response, whatever the upstream spoke.
enum UpstreamResponsePart {
    case head(ResponseHead)
    case body(ByteBuffer)
    /// The response is complete, with its trailers if it had any.
    case end(HTTPHeaders?)
}

/// Reads an upstream's HTTP/1 responses from its connection's bytes, as a value (no I/O): the
/// caller feeds what it read and takes the parts one at a time, so that what a part sets off (the
/// connection going back to its pool, the next request on it) happens between two calls.
///
/// The head is checked (RFC 9112: status line, field names and values, framing) but not decoded:
/// ``RawResponseHead`` keeps its bytes, which an HTTP/1 client receives without the proxy
/// turning them into strings and back. Bodies are framed by `Content-Length`, chunked coding
/// (decoded: the client's side frames again) or the connection's end; a response to HEAD, a 1xx,
/// 204 or 304 has none. Anything that could make the proxy and the upstream disagree on where a
/// response ends (both `Content-Length` and `Transfer-Encoding`, differing lengths, line folding,
/// control characters, a coding other than chunked) is a ``ParseError``.
struct HTTP1ResponseParser {
    /// A response that cannot be framed: its connection cannot be trusted with anything more.
    struct ParseError: Error, Equatable, CustomStringConvertible {
        var description: String
        init(_ description: String) { self.description = description }
    }

    /// The largest head (status line and fields) or trailer section taken.
    static let maxHeadBytes = 64 * 1024
    /// The longest chunk-size line (with its extensions).
    static let maxChunkLineBytes = 4 * 1024

    private enum State {
        /// Waiting for a head (a final one, or another after a 1xx).
        case head
        case fixed(remaining: Int)
        case chunkSize
        case chunkData(remaining: Int)
        /// The line end after a chunk's data.
        case chunkDataEnd
        case trailers
        /// A body that ends with the connection.
        case untilClose
        /// The body is complete: `.end` is next.
        case ending
    }

    private var state = State.head
    /// The start of a head, chunk-size line or trailer section that has not come whole yet.
    private var stash: ByteBuffer?
    /// Where the search for the end of the stashed section goes on (the start of its last line,
    /// already searched up to there): a head arriving a byte at a time is not searched again
    /// from its start at each byte.
    private var searchedUpTo = 0
    /// Whether the request being answered is a HEAD (its response has no body, whatever its
    /// head announces). Set when the request is sent.
    var requestIsHEAD = false

    init() {}

    /// Whether no response is under way: nothing of one was received.
    var isIdle: Bool {
        if case .head = state { return stash == nil }
        return false
    }

    /// The next part found in `input` (what it uses is consumed), or nil when more bytes are needed.
    mutating func next(_ input: inout ByteBuffer) throws -> UpstreamResponsePart? {
        switch state {
        case .ending:
            state = .head
            return .end(nil)
        case .fixed(let remaining):
            guard input.readableBytes > 0 else { return nil }
            let n = min(remaining, input.readableBytes)
            state = n == remaining ? .ending : .fixed(remaining: remaining - n)
            return .body(input.readSlice(length: n)!)
        case .chunkData(let remaining):
            guard input.readableBytes > 0 else { return nil }
            let n = min(remaining, input.readableBytes)
            state = n == remaining ? .chunkDataEnd : .chunkData(remaining: remaining - n)
            return .body(input.readSlice(length: n)!)
        case .untilClose:
            guard input.readableBytes > 0 else { return nil }
            return .body(input.readSlice(length: input.readableBytes)!)
        case .head:
            unstash(&input)
            guard let end = try sectionEnd(input, limit: Self.maxHeadBytes, what: "response head") else {
                return keep(&input)
            }
            searchedUpTo = 0
            return .head(try head(input.readSlice(length: end)!))
        case .chunkSize:
            unstash(&input)
            guard let line = try lineEnd(input) else { return keep(&input) }
            let size = try Self.chunkSize(input.readSlice(length: line)!)
            state = size == 0 ? .trailers : .chunkData(remaining: size)
            return try next(&input)
        case .chunkDataEnd:
            unstash(&input)
            guard let first = input.getInteger(at: input.readerIndex, as: UInt8.self) else { return nil }
            if first == LF {
                input.moveReaderIndex(forwardBy: 1)
            } else if first == CR {
                guard let second = input.getInteger(at: input.readerIndex + 1, as: UInt8.self) else {
                    return keep(&input)
                }
                guard second == LF else { throw ParseError("a chunk's data is not followed by CRLF") }
                input.moveReaderIndex(forwardBy: 2)
            } else {
                throw ParseError("a chunk's data is longer than its size")
            }
            state = .chunkSize
            return try next(&input)
        case .trailers:
            unstash(&input)
            guard let end = try sectionEnd(input, limit: Self.maxHeadBytes, what: "trailer section") else {
                return keep(&input)
            }
            searchedUpTo = 0
            let section = input.readSlice(length: end)!
            state = .head
            return .end(try Self.trailers(section))
        }
    }

    /// The connection closed: the end of a body that lasts until then, nothing if no response was
    /// under way, otherwise a ``ParseError`` (the response was cut short).
    mutating func inputClosed() throws -> UpstreamResponsePart? {
        switch state {
        case .untilClose, .ending:
            state = .head
            return .end(nil)
        case .head where stash == nil:
            return nil
        default:
            throw ParseError("the upstream closed the connection in the middle of a response")
        }
    }

    // MARK: Buffering

    private mutating func unstash(_ input: inout ByteBuffer) {
        guard var kept = stash else { return }
        stash = nil
        kept.writeBuffer(&input)
        input = kept
    }

    /// Keeps what is left of `input` for the next call (an incomplete head or line).
    private mutating func keep(_ input: inout ByteBuffer) -> UpstreamResponsePart? {
        if input.readableBytes > 0 { stash = input.readSlice(length: input.readableBytes) }
        return nil
    }

    // MARK: Heads

    /// The length of the section (lines up to and with an empty one) at the start of `input`, or
    /// nil if it has not come whole.
    private mutating func sectionEnd(_ input: ByteBuffer, limit: Int, what: StaticString) throws -> Int? {
        let from = searchedUpTo
        let (end, lastLine) = input.withUnsafeReadableBytes { raw -> (Int?, Int) in
            let count = min(raw.count, limit)
            var lineStart = from
            var i = from
            while i < count {
                if raw[i] == LF {
                    let length = i - lineStart
                    if length == 0 || (length == 1 && raw[lineStart] == CR) { return (i + 1, 0) }
                    lineStart = i + 1
                }
                i += 1
            }
            return (nil, lineStart)
        }
        searchedUpTo = lastLine
        if end == nil && input.readableBytes >= limit {
            throw ParseError("\(what) larger than \(limit / 1024) KiB")
        }
        return end
    }

    /// The length of the line (with its end) at the start of `input`, or nil if incomplete.
    private func lineEnd(_ input: ByteBuffer) throws -> Int? {
        let end = input.withUnsafeReadableBytes { raw -> Int? in
            let count = min(raw.count, Self.maxChunkLineBytes)
            var i = 0
            while i < count {
                if raw[i] == LF { return i + 1 }
                i += 1
            }
            return nil
        }
        if end == nil && input.readableBytes >= Self.maxChunkLineBytes {
            throw ParseError("chunk-size line longer than \(Self.maxChunkLineBytes) bytes")
        }
        return end
    }

    /// What a head's fields say about framing.
    private struct Framing {
        var contentLength: Int?
        var transferEncoding = false
        var chunked = false
        var close = false
        var keepAlive = false
        var options: [String] = []
    }

    /// Checks a head (status line, fields, the empty line) and sets the state for its body.
    private mutating func head(_ bytes: ByteBuffer) throws -> ResponseHead {
        var framing = Framing()
        let (versionMinor, code, textEnd) = try bytes.withUnsafeReadableBytes { raw in
            let b = raw.bindMemory(to: UInt8.self)
            var lineEnd = 0
            while b[lineEnd] != LF { lineEnd += 1 }
            let statusEnd = lineEnd > 0 && b[lineEnd - 1] == CR ? lineEnd - 1 : lineEnd
            let (minor, code) = try Self.statusLine(UnsafeBufferPointer(rebasing: b[0..<statusEnd]))
            try Self.fields(b, from: lineEnd + 1) { name, value in
                try Self.frame(&framing, name: name, value: value)
            }
            return (minor, code, statusEnd)
        }
        if framing.transferEncoding && framing.contentLength != nil {
            throw ParseError("both Content-Length and Transfer-Encoding")
        }
        let version = HTTPVersion(major: 1, minor: versionMinor)
        var keepAlive = versionMinor == 1 ? !framing.close : framing.keepAlive && !framing.close
        let status = HTTPResponseStatus(statusCode: code)
        if code < 200 && code != 101 {
            state = .head  // the final head follows
        } else if code == 101 {
            // The upstream switched protocols: nothing of what follows is HTTP/1.
            keepAlive = false
            state = .ending
        } else if requestIsHEAD || !status.mayHaveResponseBody {  // 204, 304
            state = .ending
        } else if framing.chunked {
            state = .chunkSize
        } else if let length = framing.contentLength {
            state = length == 0 ? .ending : .fixed(remaining: length)
        } else {
            keepAlive = false
            state = .untilClose
        }
        let raw = RawResponseHead(
            statusText: bytes.getSlice(at: bytes.readerIndex + 9, length: textEnd - 9)!,
            block: bytes.getSlice(at: bytes.readerIndex + textEnd, length: bytes.readableBytes - textEnd)!
                .trimmingHeadLine(),
            connectionOptions: framing.options,
            chunked: framing.chunked
        )
        return ResponseHead(
            status: status,
            version: version,
            keepAlive: keepAlive,
            hasContentLength: framing.contentLength != nil,
            fields: .raw(raw)
        )
    }

    /// `HTTP/1.x NNN reason`: the minor version and the status code.
    private static func statusLine(_ line: UnsafeBufferPointer<UInt8>) throws -> (Int, Int) {
        guard line.count >= 12, line[0] == UInt8(ascii: "H"), line[1] == UInt8(ascii: "T"),
            line[2] == UInt8(ascii: "T"), line[3] == UInt8(ascii: "P"), line[4] == UInt8(ascii: "/"),
            line[5] == UInt8(ascii: "1"), line[6] == UInt8(ascii: "."),
            line[7] == UInt8(ascii: "0") || line[7] == UInt8(ascii: "1"), line[8] == SP,
            isDigit(line[9]), isDigit(line[10]), isDigit(line[11]),
            line.count == 12 || line[12] == SP
        else {
            throw ParseError("not an HTTP/1.0 or HTTP/1.1 status line: '\(printable(line))'")
        }
        let code = Int(line[9] - 48) * 100 + Int(line[10] - 48) * 10 + Int(line[11] - 48)
        guard (100...599).contains(code) else { throw ParseError("status \(code) out of range") }
        for i in 12..<line.count where !isFieldValueByte(line[i]) {
            throw ParseError("a control character in the reason phrase")
        }
        return (Int(line[7] - 48), code)
    }

    /// Checks each field line from `start` up to the empty line, calling `body` with its name and
    /// trimmed value.
    private static func fields(
        _ b: UnsafeBufferPointer<UInt8>,
        from start: Int,
        _ body: (UnsafeBufferPointer<UInt8>, UnsafeBufferPointer<UInt8>) throws -> Void
    ) throws {
        var lineStart = start
        while lineStart < b.count {
            var lineEnd = lineStart
            while b[lineEnd] != LF { lineEnd += 1 }
            let next = lineEnd + 1
            if lineEnd > lineStart && b[lineEnd - 1] == CR { lineEnd -= 1 }
            if lineEnd == lineStart { return }  // the empty line
            if b[lineStart] == SP || b[lineStart] == HT { throw ParseError("obsolete line folding in a field") }
            var colon = lineStart
            while colon < lineEnd && b[colon] != UInt8(ascii: ":") {
                guard isTokenByte(b[colon]) else {
                    throw ParseError(
                        "an invalid character in a field name: '\(printable(UnsafeBufferPointer(rebasing: b[lineStart..<lineEnd])))'"
                    )
                }
                colon += 1
            }
            guard colon < lineEnd, colon > lineStart else {
                throw ParseError(
                    "a field line without a name and a colon: '\(printable(UnsafeBufferPointer(rebasing: b[lineStart..<lineEnd])))'"
                )
            }
            for i in (colon + 1)..<lineEnd where !isFieldValueByte(b[i]) {
                throw ParseError(
                    "a control character in the value of '\(printable(UnsafeBufferPointer(rebasing: b[lineStart..<colon])))'"
                )
            }
            let value = RawResponseHead.trimmed(b, (colon + 1)..<lineEnd)
            try body(UnsafeBufferPointer(rebasing: b[lineStart..<colon]), UnsafeBufferPointer(rebasing: b[value]))
            lineStart = next
        }
    }

    /// Notes what a field says about framing and the connection.
    private static func frame(
        _ f: inout Framing,
        name: UnsafeBufferPointer<UInt8>,
        value: UnsafeBufferPointer<UInt8>
    )
        throws
    {
        switch name.count {
        case 14 where HeaderRewriting.equalsLowercase(name, "content-length"):
            guard !value.isEmpty, value.count <= 18, value.allSatisfy(isDigit) else {
                throw ParseError("Content-Length is not a number: '\(printable(value))'")
            }
            let length = value.reduce(0) { $0 * 10 + Int($1 - 48) }
            if let previous = f.contentLength, previous != length {
                throw ParseError("two different Content-Length values")
            }
            f.contentLength = length
        case 17 where HeaderRewriting.equalsLowercase(name, "transfer-encoding"):
            f.transferEncoding = true
            // The last coding decides: chunked frames the body; any other would need the
            // connection's end and a client that decodes it.
            let last = value.lastIndex(of: UInt8(ascii: ",")).map { $0 + 1 } ?? 0
            let coding = RawResponseHead.trimmed(value, last..<value.count)
            guard HeaderRewriting.equalsLowercase(UnsafeBufferPointer(rebasing: value[coding]), "chunked") else {
                throw ParseError("unsupported Transfer-Encoding '\(printable(value))'")
            }
            f.chunked = true
        case 10 where HeaderRewriting.equalsLowercase(name, "connection"):
            var start = 0
            while start <= value.count {
                let end = value[start...].firstIndex(of: UInt8(ascii: ",")) ?? value.count
                let token = UnsafeBufferPointer(rebasing: value[RawResponseHead.trimmed(value, start..<end)])
                if HeaderRewriting.equalsLowercase(token, "close") {
                    f.close = true
                } else if HeaderRewriting.equalsLowercase(token, "keep-alive") {
                    f.keepAlive = true
                } else if !token.isEmpty {
                    let option = String(decoding: token, as: UTF8.self).lowercased()
                    // Never a framing field: dropping it would leave the body unframed.
                    if !HeaderRewriting.isConnectionOnlyOrFraming(option) { f.options.append(option) }
                }
                start = end + 1
            }
        default:
            break
        }
    }

    /// A chunk-size line: hex digits, optional extensions, the line end.
    private static func chunkSize(_ line: ByteBuffer) throws -> Int {
        try line.withUnsafeReadableBytes { raw in
            let b = raw.bindMemory(to: UInt8.self)
            var end = b.count - 1  // the LF
            if end > 0 && b[end - 1] == CR { end -= 1 }
            var size = 0
            var i = 0
            while i < end, let digit = hexValue(b[i]) {
                guard i < 15 else { throw ParseError("chunk size too large") }
                size = size << 4 | digit
                i += 1
            }
            guard i > 0 else {
                throw ParseError(
                    "a chunk-size line without a size: '\(printable(UnsafeBufferPointer(rebasing: b[0..<end])))'"
                )
            }
            while i < end && (b[i] == SP || b[i] == HT) { i += 1 }
            guard i == end || b[i] == UInt8(ascii: ";") else { throw ParseError("an invalid chunk size") }
            for j in i..<end where !isFieldValueByte(b[j]) {
                throw ParseError("a control character in a chunk extension")
            }
            return size
        }
    }

    /// A trailer section as headers (nil when empty).
    private static func trailers(_ section: ByteBuffer) throws -> HTTPHeaders? {
        var headers = HTTPHeaders()
        try section.withUnsafeReadableBytes { raw in
            try fields(raw.bindMemory(to: UInt8.self), from: 0) { name, value in
                headers.add(name: String(decoding: name, as: UTF8.self), value: String(decoding: value, as: UTF8.self))
            }
        }
        return headers.isEmpty ? nil : headers
    }

    // MARK: Bytes

    private static func isDigit(_ b: UInt8) -> Bool { b >= 48 && b <= 57 }

    private static func hexValue(_ b: UInt8) -> Int? {
        switch b {
        case 48...57: return Int(b - 48)
        case 65...70: return Int(b - 55)
        case 97...102: return Int(b - 87)
        default: return nil
        }
    }

    /// `tchar` (RFC 9110 §5.6.2).
    static func isTokenByte(_ b: UInt8) -> Bool {
        if b < 64 { return (0x03FF_6CFA_0000_0000 as UInt64) >> UInt64(b) & 1 == 1 }
        if b < 128 { return (0x57FF_FFFF_C7FF_FFFE as UInt64) >> UInt64(b - 64) & 1 == 1 }
        return false
    }

    /// A byte allowed in a field value or reason phrase: HTAB, SP, VCHAR, obs-text.
    static func isFieldValueByte(_ b: UInt8) -> Bool { b == HT || (b >= 0x20 && b != 0x7F) }

    private static func printable(_ bytes: UnsafeBufferPointer<UInt8>) -> String {
        String(decoding: bytes.prefix(200).map { $0 >= 0x20 && $0 < 0x7F ? $0 : UInt8(ascii: "?") }, as: UTF8.self)
    }
}

private let CR: UInt8 = 0x0D
private let LF: UInt8 = 0x0A
private let SP: UInt8 = 0x20
private let HT: UInt8 = 0x09

extension ByteBuffer {
    /// The head's bytes after its status line: the line end that closed the status line is
    /// dropped, and so is the empty line that ends the head, leaving the field lines.
    fileprivate func trimmingHeadLine() -> ByteBuffer {
        var buffer = self
        // Status line end.
        if buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) == CR { buffer.moveReaderIndex(forwardBy: 1) }
        buffer.moveReaderIndex(forwardBy: 1)
        // The empty line.
        buffer.moveWriterIndex(to: buffer.writerIndex - 1)
        if buffer.readableBytes > 0, buffer.getInteger(at: buffer.writerIndex - 1, as: UInt8.self) == CR {
            buffer.moveWriterIndex(to: buffer.writerIndex - 1)
        }
        return buffer
    }
}
