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
/// ``HTTP1RequestParser`` (each ending with CRLF or a bare LF, without the empty line), or NIO's
/// decoded headers. Lookups on raw lines compare bytes and make a `String` only of the value
/// asked for.
struct RequestFields: Equatable {
    /// The field lines when raw (empty when decoded). Two stored properties rather than an enum
    /// with payloads: reading the lines in place then needs no copy of the buffer (a retain and
    /// a release each time a field is looked up).
    private(set) var block: ByteBuffer
    /// The decoded fields; nil when raw.
    private var decodedHeaders: HTTPHeaders?

    init(raw block: ByteBuffer) {
        self.block = block
        self.decodedHeaders = nil
    }

    init(_ headers: HTTPHeaders) {
        self.block = ByteBuffer()
        self.decodedHeaders = headers
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
        RawResponseHead.forEachField(in: block) { line, name, value in body(line, name, value) }
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

    static func == (lhs: RequestFields, rhs: RequestFields) -> Bool {
        if lhs.isRaw && rhs.isRaw { return lhs.block == rhs.block }
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
