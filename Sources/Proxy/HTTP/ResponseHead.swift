import NIOCore
import NIOHTTP1

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// An upstream's response head as the exchange passes it on, whatever the upstream spoke: an
/// HTTP/1 upstream's header block as received (``RawResponseHead``: relayed to an HTTP/1 client
/// without being decoded into strings and encoded again), or an HTTP/2 upstream's decoded fields.
struct ResponseHead {
    var status: HTTPResponseStatus
    /// The upstream's version.
    var version: HTTPVersion
    /// Whether the upstream's HTTP/1 connection can carry another request after this response.
    var keepAlive: Bool
    /// The body's length as `Content-Length` gives it (nil: chunked, or until the connection ends).
    var contentLength: Int?
    var hasContentLength: Bool { contentLength != nil }
    var fields: Fields

    enum Fields {
        case raw(RawResponseHead)
        case decoded(HTTPHeaders)
    }

    init(status: HTTPResponseStatus, version: HTTPVersion, keepAlive: Bool, contentLength: Int?, fields: Fields) {
        self.status = status
        self.version = version
        self.keepAlive = keepAlive
        self.contentLength = contentLength
        self.fields = fields
    }

    /// An HTTP/2 upstream's head (or a test's).
    init(_ head: HTTPResponseHead) {
        self.init(
            status: head.status,
            version: head.version,
            keepAlive: head.isKeepAlive,
            // Present is what frames the body (nghttp2 checked the value); 0 if it were not a number.
            contentLength: head.headers.first(name: "content-length").map { Int($0) ?? 0 },
            fields: .decoded(head.headers)
        )
    }

    /// The fields as NIO headers (decoded from the raw block on demand: an HTTP/2 client's
    /// response, a test).
    var headers: HTTPHeaders {
        switch fields {
        case .decoded(let headers): return headers
        case .raw(let raw):
            var headers = HTTPHeaders()
            raw.forEachField { name, value in
                headers.add(name: String(decoding: name, as: UTF8.self), value: String(decoding: value, as: UTF8.self))
            }
            return headers
        }
    }

    /// The first value of the field named `lowercase` (lowercase ASCII), without decoding the others.
    func first(name lowercase: StaticString) -> String? {
        switch fields {
        case .decoded(let headers):
            return headers.first(name: lowercase.description)
        case .raw(let raw):
            var found: String?
            raw.forEachField { name, value in
                if found == nil, HeaderRewriting.equalsLowercase(name, lowercase) {
                    found = String(decoding: value, as: UTF8.self)
                }
            }
            return found
        }
    }
}

/// The bytes of an HTTP/1 response head as the upstream sent them, checked by
/// ``HTTP1ResponseParser``.
struct RawResponseHead {
    /// The status line after the version: `200 OK`.
    var statusText: ByteBuffer
    /// The header lines, each ending with CRLF (or a bare LF), without the empty line that ends
    /// the head.
    var block: ByteBuffer
    /// Names listed in `Connection` besides `close` and `keep-alive`, lowercased: hop-by-hop too.
    var connectionOptions: [String] = []
    /// Whether the body is chunked (`Transfer-Encoding` ends with `chunked`).
    var chunked = false
    /// Which lines the parser found that are not relayed as they came: without it, each line
    /// is looked at again.
    var plan = CopyPlan.lineByLine

    /// The field lines that are not relayed to a client as they came (hop-by-hop, framing and
    /// `TE` fields, a line ending with a bare LF), found while the parser checked the block, up
    /// to three of them: the lines between are copied in one piece, without being looked at
    /// again. More than three, or fields named in `Connection`: ``lineByLine``.
    struct CopyPlan {
        /// The number of special lines, -1 for line by line.
        private(set) var count: Int8
        /// Their ranges in the block (each with its line end), in order.
        private var ranges: (UInt16, UInt16, UInt16, UInt16, UInt16, UInt16) = (0, 0, 0, 0, 0, 0)

        /// Every line relayed as it came, so far.
        static let passing = CopyPlan(count: 0)
        /// Each line looked at when relayed.
        static let lineByLine = CopyPlan(count: -1)

        private init(count: Int8) { self.count = count }

        /// Notes a special line (its range in the block, which is smaller than 64 KiB).
        mutating func special(_ line: Range<Int>) {
            let (lower, upper) = (
                UInt16(truncatingIfNeeded: line.lowerBound), UInt16(truncatingIfNeeded: line.upperBound)
            )
            switch count {
            case 0: (ranges.0, ranges.1) = (lower, upper)
            case 1: (ranges.2, ranges.3) = (lower, upper)
            case 2: (ranges.4, ranges.5) = (lower, upper)
            default:
                count = -1
                return
            }
            count += 1
        }

        /// The special line `i` (below ``count``).
        func line(_ i: Int) -> Range<Int> {
            switch i {
            case 0: Int(ranges.0)..<Int(ranges.1)
            case 1: Int(ranges.2)..<Int(ranges.3)
            default: Int(ranges.4)..<Int(ranges.5)
            }
        }
    }

    /// Calls `body` with each field's name and value (without surrounding whitespace), in order.
    func forEachField(_ body: (UnsafeBufferPointer<UInt8>, UnsafeBufferPointer<UInt8>) -> Void) {
        Self.forEachField(in: block) { _, name, value in body(name, value) }
    }

    /// Calls `body` with each field line of a checked block (without its line end), its name and
    /// its value without surrounding whitespace: a response's block, or a request's
    /// (``RequestFields``).
    static func forEachField(
        in block: ByteBuffer,
        _ body: (UnsafeRawBufferPointer, UnsafeBufferPointer<UInt8>, UnsafeBufferPointer<UInt8>) -> Void
    ) {
        block.withUnsafeReadableBytes { raw in
            let bytes = raw.bindMemory(to: UInt8.self)
            forEachLine(bytes) { line, colon in
                body(
                    UnsafeRawBufferPointer(rebasing: raw[line]),
                    UnsafeBufferPointer(rebasing: bytes[line.lowerBound..<colon]),
                    UnsafeBufferPointer(rebasing: bytes[trimmed(bytes, colon + 1..<line.upperBound)])
                )
            }
        }
    }

    /// Each line of a checked block: its bytes without the line end, and the index of its colon.
    /// The line feed and the colon are found with `memchr` (a block is mostly values, which
    /// need no look at each byte here: the parser checked them).
    static func forEachLine(_ bytes: UnsafeBufferPointer<UInt8>, _ body: (Range<Int>, Int) -> Void) {
        guard let base = bytes.baseAddress else { return }
        let raw = UnsafeRawPointer(base)
        var start = 0
        let count = bytes.count
        while start < count {
            let feed = memchr(raw + start, 0x0A, count - start).map { UnsafeRawPointer($0) - raw } ?? count
            var end = feed
            if end > start && base[end - 1] == 0x0D { end -= 1 }
            if end > start, let colon = memchr(raw + start, Int32(UInt8(ascii: ":")), end - start) {
                body(start..<end, UnsafeRawPointer(colon) - raw)
            }
            start = feed + 1
        }
    }

    /// `range` without leading and trailing spaces and tabs.
    @inline(__always)
    static func trimmed(_ bytes: UnsafeBufferPointer<UInt8>, _ range: Range<Int>) -> Range<Int> {
        var lower = range.lowerBound
        var upper = range.upperBound
        while lower < upper && (bytes[lower] == 0x20 || bytes[lower] == 0x09) { lower += 1 }
        while upper > lower && (bytes[upper - 1] == 0x20 || bytes[upper - 1] == 0x09) { upper -= 1 }
        return lower..<upper
    }
}
