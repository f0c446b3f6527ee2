import NIOCore
import NIOHTTP1

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A message that cannot be framed: the connection it came on cannot be trusted with anything
/// more.
struct HTTP1ParseError: Error, Equatable, CustomStringConvertible {
    var description: String
    /// The head (or a trailer section) was larger than the limit: 431 for a request.
    var tooLarge = false
    init(_ description: String, tooLarge: Bool = false) {
        self.description = description
        self.tooLarge = tooLarge
    }
}

/// What HTTP/1 requests and responses share, as a value (no I/O): finding a head's end, then
/// taking its body as framed by `Content-Length`, chunked coding (decoded) or the connection's
/// end, and the trailers. ``HTTP1RequestParser`` and ``HTTP1ResponseParser`` check the head and
/// say which body follows (``expect(_:)``).
struct HTTP1Framer {
    /// One step through a message.
    enum Step {
        /// A whole head section (start line, field lines, the empty line), not checked yet.
        case head(ByteBuffer)
        case body(ByteBuffer)
        /// The message is complete, with its trailers if it had any.
        case end(HTTPHeaders?)
    }

    /// The body that follows a head.
    enum Body: Equatable {
        case none
        case fixed(Int)
        case chunked
        /// Until the connection ends (a response only).
        case untilClose
    }

    /// The longest chunk-size line (with its extensions).
    static let maxChunkLineBytes = 4 * 1024

    private enum State {
        /// Waiting for a head.
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
    /// The largest head (or trailer section) taken.
    let headLimit: Int
    /// The start of a head, chunk-size line or trailer section that has not come whole yet.
    private var stash: ByteBuffer?
    /// Where the search for the end of the stashed section goes on (the start of its last line,
    /// already searched up to there): a head arriving a byte at a time is not searched again
    /// from its start at each byte.
    private var searchedUpTo = 0
    /// What the head is called in errors: `request head`, `response head`.
    private let what: StaticString

    init(headLimit: Int, what: StaticString) {
        self.headLimit = headLimit
        self.what = what
    }

    /// Whether no message is under way: nothing of one was received.
    var isIdle: Bool {
        if case .head = state { return stash == nil }
        return false
    }

    /// Sets the body that follows the head just returned. Not called after a head that another
    /// head follows (an informational response): the framer waits for a head again.
    mutating func expect(_ body: Body) {
        switch body {
        case .none, .fixed(0): state = .ending
        case .fixed(let length): state = .fixed(remaining: length)
        case .chunked: state = .chunkSize
        case .untilClose: state = .untilClose
        }
    }

    /// The next step found in `input` (what it uses is consumed), or nil when more bytes are
    /// needed.
    mutating func next(_ input: inout ByteBuffer) throws -> Step? {
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
            guard let end = try sectionEnd(input, what: what) else { return keep(&input) }
            searchedUpTo = 0
            return .head(input.readSlice(length: end)!)
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
                guard second == LF else { throw HTTP1ParseError("a chunk's data is not followed by CRLF") }
                input.moveReaderIndex(forwardBy: 2)
            } else {
                throw HTTP1ParseError("a chunk's data is longer than its size")
            }
            state = .chunkSize
            return try next(&input)
        case .trailers:
            unstash(&input)
            guard let end = try sectionEnd(input, what: "trailer section") else { return keep(&input) }
            searchedUpTo = 0
            let section = input.readSlice(length: end)!
            state = .head
            return .end(try Self.trailers(section))
        }
    }

    /// The connection closed: the end of a body that lasts until then, nothing if no message was
    /// under way, otherwise a ``HTTP1ParseError`` (the message was cut short).
    mutating func inputClosed(_ cutShort: @autoclosure () -> String) throws -> Step? {
        switch state {
        case .untilClose, .ending:
            state = .head
            return .end(nil)
        case .head where stash == nil:
            return nil
        default:
            throw HTTP1ParseError(cutShort())
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
    private mutating func keep(_ input: inout ByteBuffer) -> Step? {
        if input.readableBytes > 0 { stash = input.readSlice(length: input.readableBytes) }
        return nil
    }

    // MARK: Sections and lines

    /// The length of the section (lines up to and with an empty one) at the start of `input`, or
    /// nil if it has not come whole.
    private mutating func sectionEnd(_ input: ByteBuffer, what: StaticString) throws -> Int? {
        let from = searchedUpTo
        let limit = headLimit
        let (end, lastLine) = input.withUnsafeReadableBytes { raw -> (Int?, Int) in
            let count = min(raw.count, limit)
            guard let base = raw.baseAddress else { return (nil, from) }
            var lineStart = from
            while let i = Self.lineFeed(base, from: lineStart, to: count) {
                let length = i - lineStart
                if length == 0 || (length == 1 && raw[lineStart] == CR) { return (i + 1, 0) }
                lineStart = i + 1
            }
            return (nil, lineStart)
        }
        searchedUpTo = lastLine
        if end == nil && input.readableBytes >= limit {
            throw HTTP1ParseError("\(what) larger than \(Self.sizeText(limit))", tooLarge: true)
        }
        return end
    }

    /// The index of the first line feed in `base[from..<to]` (memchr), or nil.
    private static func lineFeed(_ base: UnsafeRawPointer, from: Int, to: Int) -> Int? {
        guard from < to, let found = memchr(base + from, Int32(LF), to - from) else { return nil }
        return UnsafeRawPointer(found) - base
    }

    private static func sizeText(_ bytes: Int) -> String {
        bytes % 1024 == 0 ? "\(bytes / 1024) KiB" : "\(bytes) bytes"
    }

    /// The length of the line (with its end) at the start of `input`, or nil if incomplete.
    private func lineEnd(_ input: ByteBuffer) throws -> Int? {
        let end = input.withUnsafeReadableBytes { raw -> Int? in
            guard let base = raw.baseAddress else { return nil }
            return Self.lineFeed(base, from: 0, to: min(raw.count, Self.maxChunkLineBytes)).map { $0 + 1 }
        }
        if end == nil && input.readableBytes >= Self.maxChunkLineBytes {
            throw HTTP1ParseError("chunk-size line longer than \(Self.maxChunkLineBytes) bytes")
        }
        return end
    }

    /// The end of the start line at the beginning of a head section, without its CR, and where
    /// the field lines begin.
    static func startLine(_ b: UnsafeBufferPointer<UInt8>) -> (end: Int, fields: Int) {
        let lineEnd = b.baseAddress.flatMap { lineFeed(UnsafeRawPointer($0), from: 0, to: b.count) } ?? b.count
        return (lineEnd > 0 && b[lineEnd - 1] == CR ? lineEnd - 1 : lineEnd, lineEnd + 1)
    }

    // MARK: Fields

    /// What a head's fields say about framing.
    struct Framing {
        var contentLength: Int?
        var transferEncoding = false
        var chunked = false
        var close = false
        var keepAlive = false
        var options: [String] = []

        /// The body these fields announce (`untilClose` when neither length nor chunked coding):
        /// both a length and a transfer coding is an error, since the two ends could disagree on
        /// where the message ends.
        func body() throws -> Body {
            if transferEncoding && contentLength != nil {
                throw HTTP1ParseError("both Content-Length and Transfer-Encoding")
            }
            if chunked { return .chunked }
            if let contentLength { return .fixed(contentLength) }
            return .untilClose
        }
    }

    /// Where a field line lies in its section: from `start` to `end` (before its CR or LF), the
    /// next line from `next`.
    struct LineExtent {
        var start: Int
        var end: Int
        var next: Int
        /// Whether the line ends with CRLF (not a bare LF).
        var endsWithCRLF: Bool { next &- end == 2 }
    }

    /// Checks each field line from `start` up to the empty line, calling `body` with its name,
    /// trimmed value and extent.
    static func fields(
        _ b: UnsafeBufferPointer<UInt8>,
        from start: Int,
        _ body: (UnsafeBufferPointer<UInt8>, UnsafeBufferPointer<UInt8>, LineExtent) throws -> Void
    ) throws {
        guard let base = b.baseAddress else { return }
        var lineStart = start
        while lineStart < b.count {
            // A checked section: every line ends with a line feed.
            guard var lineEnd = Self.lineFeed(UnsafeRawPointer(base), from: lineStart, to: b.count) else { return }
            let next = lineEnd + 1
            if lineEnd > lineStart && b[lineEnd - 1] == CR { lineEnd -= 1 }
            if lineEnd == lineStart { return }  // the empty line
            if b[lineStart] == SP || b[lineStart] == HT {
                throw HTTP1ParseError("obsolete line folding in a field")
            }
            let colon = tokenEnd(base, from: lineStart, to: lineEnd, readable: b.count)
            if colon < lineEnd && base[colon] != UInt8(ascii: ":") {
                throw HTTP1ParseError(
                    "an invalid character in a field name: '\(printable(UnsafeBufferPointer(rebasing: b[lineStart..<lineEnd])))'"
                )
            }
            guard colon < lineEnd, colon > lineStart else {
                throw HTTP1ParseError(
                    "a field line without a name and a colon: '\(printable(UnsafeBufferPointer(rebasing: b[lineStart..<lineEnd])))'"
                )
            }
            guard isFieldValue(base, from: colon + 1, to: lineEnd, readable: b.count) else {
                throw HTTP1ParseError(
                    "a control character in the value of '\(printable(UnsafeBufferPointer(rebasing: b[lineStart..<colon])))'"
                )
            }
            let value = RawResponseHead.trimmed(b, (colon + 1)..<lineEnd)
            try body(
                UnsafeBufferPointer(rebasing: b[lineStart..<colon]),
                UnsafeBufferPointer(rebasing: b[value]),
                LineExtent(start: lineStart, end: lineEnd, next: next)
            )
            lineStart = next
        }
    }

    /// Whether a field name of this length may be one ``frame(_:name:value:connection:)``
    /// notes (`Connection`, `Content-Length`, `Transfer-Encoding`): the call is spared for the
    /// others.
    @inline(__always)
    static func mayFrame(length: Int) -> Bool { length == 14 || length == 10 || length == 17 }

    /// Notes what a field says about framing and, when `connection` is set, about the
    /// connection (`close`, `keep-alive` and the options it lists).
    static func frame(
        _ f: inout Framing,
        name: UnsafeBufferPointer<UInt8>,
        value: UnsafeBufferPointer<UInt8>,
        connection: Bool = true
    ) throws {
        switch name.count {
        case 14 where HeaderRewriting.equalsLowercase(name, "content-length"):
            guard !value.isEmpty, value.count <= 18, value.allSatisfy(isDigit) else {
                throw HTTP1ParseError("Content-Length is not a number: '\(printable(value))'")
            }
            let length = value.reduce(0) { $0 * 10 + Int($1 - 48) }
            if let previous = f.contentLength, previous != length {
                throw HTTP1ParseError("two different Content-Length values")
            }
            f.contentLength = length
        case 17 where HeaderRewriting.equalsLowercase(name, "transfer-encoding"):
            f.transferEncoding = true
            // The last coding decides: chunked frames the body; any other would need the
            // connection's end and a peer that decodes it.
            let last = value.lastIndex(of: UInt8(ascii: ",")).map { $0 + 1 } ?? 0
            let coding = RawResponseHead.trimmed(value, last..<value.count)
            guard HeaderRewriting.equalsLowercase(UnsafeBufferPointer(rebasing: value[coding]), "chunked") else {
                throw HTTP1ParseError("unsupported Transfer-Encoding '\(printable(value))'")
            }
            f.chunked = true
        case 10 where connection && HeaderRewriting.equalsLowercase(name, "connection"):
            // The usual values whole, before the general list.
            if HeaderRewriting.equalsLowercase(value, "keep-alive") {
                f.keepAlive = true
                return
            }
            if HeaderRewriting.equalsLowercase(value, "close") {
                f.close = true
                return
            }
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
                guard i < 15 else { throw HTTP1ParseError("chunk size too large") }
                size = size << 4 | digit
                i += 1
            }
            guard i > 0 else {
                throw HTTP1ParseError(
                    "a chunk-size line without a size: '\(printable(UnsafeBufferPointer(rebasing: b[0..<end])))'"
                )
            }
            while i < end && (b[i] == SP || b[i] == HT) { i += 1 }
            guard i == end || b[i] == UInt8(ascii: ";") else { throw HTTP1ParseError("an invalid chunk size") }
            for j in i..<end where !isFieldValueByte(b[j]) {
                throw HTTP1ParseError("a control character in a chunk extension")
            }
            return size
        }
    }

    /// A trailer section as headers (nil when empty).
    private static func trailers(_ section: ByteBuffer) throws -> HTTPHeaders? {
        var headers = HTTPHeaders()
        try section.withUnsafeReadableBytes { raw in
            try fields(raw.bindMemory(to: UInt8.self), from: 0) { name, value, _ in
                headers.add(name: String(decoding: name, as: UTF8.self), value: String(decoding: value, as: UTF8.self))
            }
        }
        return headers.isEmpty ? nil : headers
    }

    // MARK: Bytes

    static func isDigit(_ b: UInt8) -> Bool { b >= 48 && b <= 57 }

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
        if b < 64 { return (0x03FF_6CFA_0000_0000 as UInt64) &>> UInt64(b) & 1 == 1 }
        if b < 128 { return (0x57FF_FFFF_C7FF_FFFE as UInt64) &>> UInt64(b &- 64) & 1 == 1 }
        return false
    }

    /// The index of the first byte from `from` that is not a `tchar`, at most `to`: where a field
    /// name ends (at its colon, if the line is well formed). Eight bytes at a time while they lie
    /// within the `readable` bytes: a word of letters, digits and `-` (what names are made of)
    /// passes at once; from the first other byte on (the colon, or a rarer `tchar` such as `_`),
    /// byte by byte. A line ends with CR or LF, neither a `tchar`, so no word is taken past the
    /// line's end.
    @inline(__always)
    static func tokenEnd(_ p: UnsafePointer<UInt8>, from: Int, to: Int, readable: Int) -> Int {
        var i = from
        while i &+ 8 <= readable {
            let common = commonTokenBytes(UnsafeRawPointer(p + i).loadUnaligned(as: UInt64.self))
            if common != 0x8080_8080_8080_8080 {
                i &+= (~common & 0x8080_8080_8080_8080).trailingZeroBitCount &>> 3
                break
            }
            i &+= 8
        }
        while i < to && isTokenByte(p[i]) { i &+= 1 }
        return min(i, to)
    }

    /// 0x80 in each byte of `w` that is an ASCII letter, digit or `-`, 0 in the others. Range
    /// checks on the low seven bits of each byte (no carry crosses a byte), then bytes from 0x80
    /// up are cleared; letters are folded to lowercase first (which maps no other byte into
    /// `a`–`z`).
    @inline(__always)
    static func commonTokenBytes(_ w: UInt64) -> UInt64 {
        let ones: UInt64 = 0x0101_0101_0101_0101
        let highs: UInt64 = 0x8080_8080_8080_8080
        let low = w & ~highs
        @inline(__always) func within(_ x: UInt64, _ lo: UInt64, _ hi: UInt64) -> UInt64 {
            (x &+ (0x80 &- lo) &* ones) & ~(x &+ (0x7F &- hi) &* ones)
        }
        let letters = within(low | 0x20 &* ones, 0x61, 0x7A)
        let digits = within(low, 0x30, 0x39)
        let dash = within(low, 0x2D, 0x2D)
        return (letters | digits | dash) & ~w & highs
    }

    /// A byte allowed in a field value or reason phrase: HTAB, SP, VCHAR, obs-text.
    static func isFieldValueByte(_ b: UInt8) -> Bool { b == HT || (b >= 0x20 && b != 0x7F) }

    /// Whether every byte from `from` up to `to` is ``isFieldValueByte(_:)``, eight at a time: a
    /// word with no byte below 0x20 and none equal to 0x7F is fine as it is (the two tests may
    /// flag a good word, never pass a bad one); a flagged word is checked byte by byte, since
    /// HTAB, below 0x20, is allowed. The last bytes too are one word: the last eight, overlapping
    /// the word before, or, for a value of fewer than eight bytes, the word from its start when
    /// it lies within the `readable` bytes, the bytes past `to` taken as visible ASCII.
    static func isFieldValue(_ p: UnsafePointer<UInt8>, from: Int, to: Int, readable: Int) -> Bool {
        var i = from
        while i &+ 8 <= to {
            if !isFieldValueWord(UnsafeRawPointer(p + i).loadUnaligned(as: UInt64.self), p, i, i &+ 8) { return false }
            i &+= 8
        }
        guard i < to else { return true }
        if to &- from >= 8 {
            return isFieldValueWord(UnsafeRawPointer(p + (to &- 8)).loadUnaligned(as: UInt64.self), p, to &- 8, to)
        }
        if i &+ 8 <= readable {
            let keep: UInt64 = (1 &<< UInt64((to &- i) &* 8)) &- 1
            let w = UnsafeRawPointer(p + i).loadUnaligned(as: UInt64.self).littleEndian
            return isFieldValueWord((w & keep) | (0x4141_4141_4141_4141 & ~keep), p, i, to)
        }
        while i < to {
            if !isFieldValueByte(p[i]) { return false }
            i &+= 1
        }
        return true
    }

    /// Whether a word of value bytes (`p[from..<to]`, at most eight, the rest of `w` visible) is
    /// all ``isFieldValueByte(_:)``: at once when no byte is below 0x20 or 0x7F, else byte by byte.
    @inline(__always)
    private static func isFieldValueWord(_ w: UInt64, _ p: UnsafePointer<UInt8>, _ from: Int, _ to: Int) -> Bool {
        let ones: UInt64 = 0x0101_0101_0101_0101
        let highs: UInt64 = 0x8080_8080_8080_8080
        let below = (w &- 0x20 &* ones) & ~w & highs
        let x = w ^ (0x7F &* ones)
        let delete = (x &- ones) & ~x & highs
        guard below | delete != 0 else { return true }
        for j in from..<to where !isFieldValueByte(p[j]) { return false }
        return true
    }

    /// At most 200 bytes of `bytes`, anything but printable ASCII shown as `?`: for errors.
    static func printable(_ bytes: UnsafeBufferPointer<UInt8>) -> String {
        String(decoding: bytes.prefix(200).map { $0 >= 0x20 && $0 < 0x7F ? $0 : UInt8(ascii: "?") }, as: UTF8.self)
    }
}

private let CR: UInt8 = 0x0D
private let LF: UInt8 = 0x0A
private let SP: UInt8 = 0x20
private let HT: UInt8 = 0x09
