import NIOCore
import NIOHTTP1

/// A client's request head as the proxy carries it, whatever the client spoke: the request line's
/// parts, and the fields either as an HTTP/1 client sent them (``RequestFields``, raw: relayed
/// upstream line by line without being decoded into strings and encoded again) or decoded (an
/// HTTP/2 client's, a middleware's edit, a test's).
struct RequestHead: Equatable {
    var method: HTTPMethod
    /// The request target as received (absolute form turned into origin form by the HTTP/1
    /// connection, see ``HTTP1ConnectionStateMachine/normalizedHead(_:)``).
    var uri: String
    var version: HTTPVersion
    var fields: RequestFields
    /// Whether the client's connection may carry another request after this one (its version and
    /// `Connection` field, as ``HTTPRequestHead/isKeepAlive`` says).
    var keepAlive: Bool

    /// A head whose fields the HTTP/1 parser checked and framed (`keepAlive` from its `Connection`).
    init(method: HTTPMethod, uri: String, version: HTTPVersion, fields: RequestFields, keepAlive: Bool) {
        self.method = method
        self.uri = uri
        self.version = version
        self.fields = fields
        self.keepAlive = keepAlive
    }

    /// NIO's head (an HTTP/2 client's, a test's).
    init(_ head: HTTPRequestHead) {
        self.init(
            method: head.method,
            uri: head.uri,
            version: head.version,
            fields: RequestFields(head.headers),
            keepAlive: head.isKeepAlive
        )
    }

    /// As NIO's type (decoding raw fields): for a middleware, a test, and what is rarely asked.
    var decoded: HTTPRequestHead {
        HTTPRequestHead(version: version, method: method, uri: uri, headers: fields.headers)
    }
}

/// A request's header fields: the field lines of an HTTP/1 head as received and checked by
/// ``HTTP1RequestParser`` (each ending with CRLF or a bare LF; from the parser, the empty line
/// after them too), or NIO's decoded headers. Lookups on raw lines compare bytes and make a
/// `String` only of the value asked for.
struct RequestFields: Equatable {
    /// The field lines when raw (empty when decoded), followed by their index when the parser
    /// made one (see ``init(raw:index:blocks:)``). Two stored properties rather than an enum with
    /// payloads: reading the lines in place then needs no copy of the buffer (a retain and a
    /// release each time a field is looked up).
    private var block: ByteBuffer
    /// The decoded fields; nil when raw.
    private var decodedHeaders: HTTPHeaders?
    /// How many bytes of ``block`` are field lines; -1 when the block has no index after them.
    private var indexStart: Int32 = -1

    /// Lines found without an index: each pass looks for their ends and colons again.
    init(raw block: ByteBuffer) {
        self.block = block
        self.decodedHeaders = nil
    }

    /// Lines as ``HTTP1RequestParser`` checked them, with where each lies (``LineIndex``): the
    /// passes over them (the request's facts, the head sent upstream) search nothing again.
    /// The lines and their index go into a buffer from `blocks` (see ``BlockStack``).
    init(raw lines: UnsafeRawBufferPointer, index: LineIndex, blocks: BlockStack) {
        var block = blocks.buffer(capacity: lines.count + index.byteCount)
        block.writeBytes(lines)
        index.write(into: &block)
        self.block = block
        self.decodedHeaders = nil
        self.indexStart = Int32(lines.count)
    }

    init(_ headers: HTTPHeaders) {
        self.block = ByteBuffer()
        self.decodedHeaders = headers
    }

    /// The bytes of the field lines as received (0 when decoded).
    var rawBytes: Int { indexStart < 0 ? block.readableBytes : Int(indexStart) }

    /// Where each field line of a head lies: its start, colon, value (without surrounding
    /// whitespace) and end (before CR or LF), as offsets in the lines. Gathered by the parser in
    /// memory its event loop keeps (no allocation per request or connection) and stored after
    /// the lines; a head of more than ``maxLines`` lines is not indexed (its index would
    /// outweigh it).
    final class LineIndex {
        static let maxLines = 64
        private static let perLine = 5
        private let offsets = UnsafeMutablePointer<UInt32>.allocate(capacity: maxLines * perLine)
        /// Offsets written.
        private var count = 0
        /// More lines than ``maxLines``.
        private(set) var overflowed = false

        init() {}
        deinit { offsets.deallocate() }

        var byteCount: Int { count &* 4 }

        func removeAll() {
            count = 0
            overflowed = false
        }

        @inline(__always)
        func append(start: Int, colon: Int, valueStart: Int, valueEnd: Int, end: Int) {
            guard count < Self.maxLines &* Self.perLine else {
                overflowed = true
                return
            }
            let p = offsets + count
            p[0] = UInt32(truncatingIfNeeded: start)
            p[1] = UInt32(truncatingIfNeeded: colon)
            p[2] = UInt32(truncatingIfNeeded: valueStart)
            p[3] = UInt32(truncatingIfNeeded: valueEnd)
            p[4] = UInt32(truncatingIfNeeded: end)
            count &+= Self.perLine
        }

        func write(into buffer: inout ByteBuffer) {
            buffer.writeBytes(UnsafeRawBufferPointer(start: offsets, count: byteCount))
        }
    }

    /// The buffers a loop's parser copies field lines and their index into
    /// (``init(raw:index:blocks:)``), given back when their exchange finishes
    /// (``giveBack(_:)``) and used again for a later request's lines: an allocation and a free
    /// fewer per request. A buffer given back while something still holds its request is never
    /// written over: `clear(minimumCapacity:)` gives the next request new memory then. Last in,
    /// first out (the memory touched last); at most ``kept`` buffers of at most ``largestKept``
    /// bytes each.
    ///
    /// Touched only on its event loop.
    final class BlockStack {
        static let kept = 64
        static let largestKept = 4 * 1024
        private var stack: [ByteBuffer] = []
        private let allocator = ByteBufferAllocator()

        init() { stack.reserveCapacity(Self.kept) }

        /// How many buffers are kept.
        var count: Int { stack.count }

        /// An empty buffer of at least `capacity` bytes: the last one given back when it is free.
        func buffer(capacity: Int) -> ByteBuffer {
            guard var kept = stack.popLast() else { return allocator.buffer(capacity: capacity) }
            kept.clear(minimumCapacity: capacity)
            return kept
        }

        /// Keeps the buffer of `fields` when it came from a stack (indexed raw lines), to be used
        /// again once nothing else holds it.
        func giveBack(_ fields: RequestFields) {
            guard fields.indexStart >= 0, fields.block.capacity <= Self.largestKept, stack.count < Self.kept else {
                return
            }
            stack.append(fields.block)
        }
    }

    /// Whether the fields are an HTTP/1 client's lines as received.
    var isRaw: Bool { decodedHeaders == nil }

    /// The fields as NIO headers (decoded from raw lines on demand).
    var headers: HTTPHeaders {
        if let decodedHeaders { return decodedHeaders }
        var pairs: [(String, String)] = []
        pairs.reserveCapacity(8)
        forEach { name, value in
            pairs.append((String(decoding: name, as: UTF8.self), String(decoding: value, as: UTF8.self)))
        }
        return HTTPHeaders(pairs)
    }

    /// Calls `body` with each field's name and value (without surrounding whitespace), in order.
    func forEach(_ body: (UnsafeBufferPointer<UInt8>, UnsafeBufferPointer<UInt8>) -> Void) {
        forEachLine { _, name, value in body(name, value) }
    }

    /// Calls `body` with each field's line as received (without its line end; nil for decoded
    /// fields), its name and its trimmed value.
    func forEachLine(
        _ body: (UnsafeRawBufferPointer?, UnsafeBufferPointer<UInt8>, UnsafeBufferPointer<UInt8>) -> Void
    ) {
        if let decodedHeaders {
            for (name, value) in decodedHeaders {
                name.withUTF8Bytes { n in value.withUTF8Bytes { v in body(nil, n, v) } }
            }
            return
        }
        guard indexStart >= 0 else {
            RawResponseHead.forEachField(in: block) { line, name, value in body(line, name, value) }
            return
        }
        let linesEnd = Int(indexStart)
        block.withUnsafeReadableBytes { raw in
            let bytes = raw.bindMemory(to: UInt8.self)
            var entry = linesEnd
            while entry &+ 20 <= raw.count {
                let start = Int(raw.loadUnaligned(fromByteOffset: entry, as: UInt32.self))
                let colon = Int(raw.loadUnaligned(fromByteOffset: entry &+ 4, as: UInt32.self))
                let valueStart = Int(raw.loadUnaligned(fromByteOffset: entry &+ 8, as: UInt32.self))
                let valueEnd = Int(raw.loadUnaligned(fromByteOffset: entry &+ 12, as: UInt32.self))
                let end = Int(raw.loadUnaligned(fromByteOffset: entry &+ 16, as: UInt32.self))
                body(
                    UnsafeRawBufferPointer(rebasing: raw[start..<end]),
                    UnsafeBufferPointer(rebasing: bytes[start..<colon]),
                    UnsafeBufferPointer(rebasing: bytes[valueStart..<valueEnd])
                )
                entry &+= 20
            }
        }
    }

    /// The first value of the field named `lowercase` (lowercase ASCII), without decoding the others.
    func first(_ lowercase: StaticString) -> String? {
        if let decodedHeaders { return decodedHeaders.first(name: lowercase.description) }
        var found: String?
        forEach { name, value in
            if found == nil, HeaderRewriting.equalsLowercase(name, lowercase) {
                found = String(decoding: value, as: UTF8.self)
            }
        }
        return found
    }

    /// Whether a field named `lowercase` (lowercase ASCII) is present.
    func contains(_ lowercase: StaticString) -> Bool {
        if let decodedHeaders { return decodedHeaders.contains(name: lowercase.description) }
        var found = false
        forEach { name, _ in
            if !found, HeaderRewriting.equalsLowercase(name, lowercase) { found = true }
        }
        return found
    }

    /// The first value of the field named `name` (any case): a configured name (a rate limit's
    /// key, a hash policy's header).
    func first(name: String) -> String? {
        if let decodedHeaders { return decodedHeaders.first(name: name) }
        let lowercase = name.lowercased()
        var found: String?
        lowercase.withUTF8Bytes { wanted in
            forEach { name, value in
                if found == nil, Self.equals(name, lowercase: wanted) {
                    found = String(decoding: value, as: UTF8.self)
                }
            }
        }
        return found
    }

    /// `bytes` equals `lowercase` ignoring ASCII case.
    private static func equals(_ bytes: UnsafeBufferPointer<UInt8>, lowercase: UnsafeBufferPointer<UInt8>) -> Bool {
        guard bytes.count == lowercase.count else { return false }
        for i in 0..<bytes.count {
            let b = bytes[i]
            if (b >= UInt8(ascii: "A") && b <= UInt8(ascii: "Z") ? b | 0x20 : b) != lowercase[i] { return false }
        }
        return true
    }

    /// The field lines as received (without their index), e.g. to compare.
    var lines: ByteBuffer { indexStart < 0 ? block : block.getSlice(at: block.readerIndex, length: rawBytes)! }

    static func == (lhs: RequestFields, rhs: RequestFields) -> Bool {
        if lhs.isRaw && rhs.isRaw { return lhs.lines == rhs.lines }
        return lhs.headers == rhs.headers
    }
}

extension HTTPMethod {
    /// Whether this is HEAD, by the case alone (NIO's `==` compares the methods' names).
    var isHEAD: Bool {
        if case .HEAD = self { return true }
        return false
    }

    /// Whether this is TRACE, by the case alone.
    var isTRACE: Bool {
        if case .TRACE = self { return true }
        return false
    }
}

@available(*, unavailable)
extension RequestFields.LineIndex: Sendable {}

@available(*, unavailable)
extension RequestFields.BlockStack: Sendable {}
