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
    typealias ParseError = HTTP1ParseError

    /// The largest head (status line and fields) or trailer section taken.
    static let maxHeadBytes = 64 * 1024

    private var framer = HTTP1Framer(headLimit: maxHeadBytes, what: "response head")
    /// Whether the request being answered is a HEAD (its response has no body, whatever its
    /// head announces). Set when the request is sent.
    var requestIsHEAD = false

    init() {}

    /// Whether no response is under way: nothing of one was received.
    var isIdle: Bool { framer.isIdle }

    /// The next part found in `input` (what it uses is consumed), or nil when more bytes are needed.
    mutating func next(_ input: inout ByteBuffer) throws -> UpstreamResponsePart? {
        switch try framer.next(&input) {
        case nil: return nil
        case .head(let section): return .head(try head(section))
        case .body(let buffer): return .body(buffer)
        case .end(let trailers): return .end(trailers)
        }
    }

    /// The connection closed: the end of a body that lasts until then, nothing if no response was
    /// under way, otherwise a ``ParseError`` (the response was cut short).
    mutating func inputClosed() throws -> UpstreamResponsePart? {
        guard try framer.inputClosed("the upstream closed the connection in the middle of a response") != nil else {
            return nil
        }
        return .end(nil)
    }

    // MARK: Heads

    /// Checks a head (status line, fields, the empty line) and sets the framer for its body.
    private mutating func head(_ bytes: ByteBuffer) throws -> ResponseHead {
        var framing = HTTP1Framer.Framing()
        var plan = RawResponseHead.CopyPlan.passing
        let (versionMinor, code, textEnd) = try bytes.withUnsafeReadableBytes { raw in
            let b = raw.bindMemory(to: UInt8.self)
            let (statusEnd, fields) = HTTP1Framer.startLine(b)
            let (minor, code) = try Self.statusLine(UnsafeBufferPointer(rebasing: b[0..<statusEnd]))
            try HTTP1Framer.fields(b, from: fields) { name, value, line in
                if HTTP1Framer.mayFrame(length: name.count) {
                    try HTTP1Framer.frame(&framing, name: name, value: value)
                }
                if !line.endsWithCRLF || !HeaderRewriting.copiesResponseField(name) {
                    plan.special(line.start &- fields..<line.next &- fields)
                }
            }
            return (minor, code, statusEnd)
        }
        // Fields named in `Connection` are dropped too (rare): each line is looked at.
        if !framing.options.isEmpty { plan = .lineByLine }
        let body = try framing.body()
        let version = HTTPVersion(major: 1, minor: versionMinor)
        var keepAlive = versionMinor == 1 ? !framing.close : framing.keepAlive && !framing.close
        let status = HTTPResponseStatus(statusCode: code)
        if code < 200 && code != 101 {
            // The final head follows: the framer waits for it.
        } else if code == 101 {
            // The upstream switched protocols: nothing of what follows is HTTP/1.
            keepAlive = false
            framer.expect(.none)
        } else if requestIsHEAD || !status.mayHaveResponseBody {  // 204, 304
            framer.expect(.none)
        } else {
            if body == .untilClose { keepAlive = false }
            framer.expect(body)
        }
        let raw = RawResponseHead(
            statusText: bytes.getSlice(at: bytes.readerIndex + 9, length: textEnd - 9)!,
            block: bytes.getSlice(at: bytes.readerIndex + textEnd, length: bytes.readableBytes - textEnd)!
                .trimmingHeadLine(),
            connectionOptions: framing.options,
            chunked: framing.chunked,
            plan: plan
        )
        return ResponseHead(
            status: status,
            version: version,
            keepAlive: keepAlive,
            contentLength: framing.contentLength,
            fields: .raw(raw)
        )
    }

    /// `HTTP/1.x NNN reason`: the minor version and the status code.
    private static func statusLine(_ line: UnsafeBufferPointer<UInt8>) throws -> (Int, Int) {
        guard line.count >= 12, line[0] == UInt8(ascii: "H"), line[1] == UInt8(ascii: "T"),
            line[2] == UInt8(ascii: "T"), line[3] == UInt8(ascii: "P"), line[4] == UInt8(ascii: "/"),
            line[5] == UInt8(ascii: "1"), line[6] == UInt8(ascii: "."),
            line[7] == UInt8(ascii: "0") || line[7] == UInt8(ascii: "1"), line[8] == SP,
            HTTP1Framer.isDigit(line[9]), HTTP1Framer.isDigit(line[10]), HTTP1Framer.isDigit(line[11]),
            line.count == 12 || line[12] == SP
        else {
            throw ParseError("not an HTTP/1.0 or HTTP/1.1 status line: '\(HTTP1Framer.printable(line))'")
        }
        let code = Int(line[9] - 48) * 100 + Int(line[10] - 48) * 10 + Int(line[11] - 48)
        guard (100...599).contains(code) else { throw ParseError("status \(code) out of range") }
        for i in 12..<line.count where !HTTP1Framer.isFieldValueByte(line[i]) {
            throw ParseError("a control character in the reason phrase")
        }
        return (Int(line[7] - 48), code)
    }
}

private let CR: UInt8 = 0x0D
private let LF: UInt8 = 0x0A
private let SP: UInt8 = 0x20

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
