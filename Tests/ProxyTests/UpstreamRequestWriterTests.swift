import NIOCore
import NIOHTTP1
import Testing
import Tracing

@testable import Proxy

extension RequestID {
    /// An id as the proxy makes them, its digits all different.
    static let test = RequestID(high: 0x0123_4567_89ab_4def, low: 0x8123_4567_89ab_cdef)
}

extension UpstreamRequestHead {
    /// A test's head, its fields decoded (as an HTTP/2 client's are).
    init(head: HTTPRequestHead, clientIP: String?, requestID: RequestID? = nil, trace: RequestTrace? = nil) {
        self.init(head: RequestHead(head), clientIP: clientIP, requestID: requestID, trace: trace)
    }

    /// A test's head as the data path holds it, in a request of its own.
    init(head: RequestHead, clientIP: String?, requestID: RequestID? = nil, trace: RequestTrace? = nil) {
        let request = RequestContext(
            head: head,
            listenerName: "test",
            remoteAddress: nil,
            clientIP: clientIP,
            startTime: .now()
        )
        request.trace = trace
        request.generatedRequestID = requestID
        self.init(request: request)
    }

    /// The same head with its fields as an HTTP/1 client's arrive: raw lines, relayed as received.
    var withRawFields: UpstreamRequestHead {
        var block = ByteBuffer()
        for (name, value) in head.fields.headers { block.writeString("\(name): \(value)\r\n") }
        var raw = head
        raw.fields = RequestFields(raw: block)
        return UpstreamRequestHead(head: raw, clientIP: clientIP, requestID: requestID, trace: trace)
    }
}

/// The HTTP/1.1 head sent upstream, written straight from the client's head: the same fields
/// ``HeaderRewriting/upstreamRequest(_:clientIP:requestID:trace:)`` makes, in wire form, with the
/// body's framing; an HTTP/1 client's field lines (raw) and decoded fields give the same bytes.
@Suite struct UpstreamRequestWriterTests {
    private func written(_ request: UpstreamRequestHead) -> (text: String, chunked: Bool) {
        var out = ByteBuffer()
        let chunked = HeaderRewriting.writeHTTP1Request(request, into: &out)
        var raw = ByteBuffer()
        let rawChunked = HeaderRewriting.writeHTTP1Request(request.withRawFields, into: &raw)
        #expect(raw == out && rawChunked == chunked, "raw lines: \(String(buffer: raw))")
        return (String(buffer: out), chunked)
    }

    /// An HTTP/1 client's head as the parser reads it goes upstream with its field lines as they
    /// came (spacing and case kept), the hop-by-hop ones dropped, the proxy's own added.
    /// Header names are compared with the names the proxy knows eight bytes at a time: against a
    /// byte-by-byte comparison, for names of every length the proxy knows, each byte in either
    /// case or replaced by a neighbour of the letters (`@`, `[`, `` ` ``, `{`), a control or a
    /// non-ASCII byte (seeded random texts).
    @Test func headerNamesCompareAsByteByByte() {
        func reference(_ bytes: [UInt8], _ lowercase: StaticString) -> Bool {
            let expected = Array(UnsafeBufferPointer(start: lowercase.utf8Start, count: lowercase.utf8CodeUnitCount))
            return bytes.count == expected.count
                && zip(bytes, expected).allSatisfy { b, e in (b >= 0x41 && b <= 0x5A ? b | 0x20 : b) == e }
        }
        let names: [StaticString] = [
            "te", "via", "host", "upgrade", "trailer", "connection", "tracestate", "keep-alive", "traceparent",
            "x-request-id", "content-type", "content-length", "x-forwarded-for", "proxy-connection",
            "transfer-encoding", "x-forwarded-proto", "proxy-authenticate", "proxy-authorization",
        ]
        let strays = Array("@[`{-_0Z".utf8) + [0x00, 0x0D, 0x60, 0x7F, 0x80, 0xC1, 0xDA, 0xFF]
        var rng = FastRandom(seed: 0xCA5E)
        var matches = 0
        for _ in 0..<400 {
            for name in names {
                var bytes = Array(UnsafeBufferPointer(start: name.utf8Start, count: name.utf8CodeUnitCount))
                for i in bytes.indices where Bool.random(using: &rng) && bytes[i] >= 0x61 && bytes[i] <= 0x7A {
                    bytes[i] -= 0x20
                }
                if Int.random(in: 0..<3, using: &rng) == 0 {
                    bytes[Int.random(in: 0..<bytes.count, using: &rng)] = strays.randomElement(using: &rng)!
                }
                let got = bytes.withUnsafeBufferPointer { HeaderRewriting.equalsLowercase($0, name) }
                #expect(got == reference(bytes, name), "\(bytes) against \(name)")
                if got { matches += 1 }
            }
        }
        // Every word of a name holds each kind of byte in turn, matching or not.
        #expect(matches > 400 * names.count / 2 && matches < 400 * names.count)
        #expect(
            ["", "a"].allSatisfy { text in
                Array(text.utf8).withUnsafeBufferPointer { !HeaderRewriting.equalsLowercase($0, "te") }
            }
        )
    }

    @Test func anHTTP1ClientsFieldLinesAreRelayedAsReceived() throws {
        var parser = HTTP1RequestParser(maxHeadBytes: 8192)
        var input = ByteBuffer(
            string: "GET /a HTTP/1.1\r\nHost:svc\r\nX-Two:  spaced  value\r\nConnection: X-Two\nAccept: */*\n"
                + "Keep-Alive: 5\r\nUser-Agent: curl/8\r\n\r\n"
        )
        guard case .head(let head) = try parser.next(&input), head.fields.isRaw else {
            Issue.record("no raw head")
            return
        }
        var out = ByteBuffer()
        let chunked = HeaderRewriting.writeHTTP1Request(
            UpstreamRequestHead(head: head, clientIP: "10.1.2.3", requestID: .test),
            into: &out
        )
        let text = String(buffer: out)
        #expect(!chunked)
        #expect(
            text == "GET /a HTTP/1.1\r\nHost:svc\r\nAccept: */*\r\nUser-Agent: curl/8\r\n"
                + "x-request-id: 01234567-89ab-4def-8123-456789abcdef\r\n"
                + "x-forwarded-for: 10.1.2.3\r\nx-forwarded-proto: http\r\nvia: 1.1 trellis\r\n\r\n"
        )
        #expect(head.fields.first("user-agent") == "curl/8" && head.fields.first(name: "X-TWO") == "spaced  value")
        #expect(head.fields.contains("accept") && !head.fields.contains("cookie"))
    }

    /// The ids the proxy makes: UUID text (8-4-4-4-12 lower-case hex digits), version 4,
    /// variant 10, different each time.
    @Test func requestIDsAreVersion4UUIDs() {
        #expect(RequestID.test.text == "01234567-89ab-4def-8123-456789abcdef")
        var rng = FastRandom()
        var seen: Set<String> = []
        for _ in 0..<1000 {
            let text = RequestID.make(&rng).text
            let parts = text.split(separator: "-", omittingEmptySubsequences: false).map(\.count)
            #expect(parts == [8, 4, 4, 4, 12] && text.allSatisfy { $0 == "-" || $0.isHexDigit && !$0.isUppercase })
            #expect(text.dropFirst(14).first == "4" && "89ab".contains(text.dropFirst(19).first ?? "x"), "\(text)")
            seen.insert(text)
        }
        #expect(seen.count == 1000)
    }

    /// The same head as NIO's types would carry it: `upstreamRequest`'s fields in order.
    private func viaNIO(_ request: UpstreamRequestHead) -> String {
        let head = request.rewritten
        var text = "\(head.method.rawValue) \(head.uri) HTTP/1.1\r\n"
        for (name, value) in head.headers { text += "\(name): \(value)\r\n" }
        return text + "\r\n"
    }

    /// A middleware that edits the head (NIO's type) changes what goes upstream and what the
    /// exchange reads of it (`Host`, whether a body was announced); the raw lines are dropped.
    @Test func aMiddlewaresEditOfTheHeadIsWhatGoesUpstream() throws {
        var parser = HTTP1RequestParser(maxHeadBytes: 8192)
        var input = ByteBuffer(string: "GET /a HTTP/1.1\r\nHost: old\r\nX-Keep: 1\r\n\r\n")
        guard case .head(let head) = try parser.next(&input) else {
            Issue.record("no head")
            return
        }
        let request = RequestContext(
            head: head,
            listenerName: "l",
            remoteAddress: nil,
            clientIP: nil,
            startTime: .now()
        )
        #expect(request.host == "old" && !request.announcesBody && request.head.fields.isRaw)
        var edited = request.decodedHead
        edited.headers.replaceOrAdd(name: "Host", value: "new")
        edited.headers.add(name: "Content-Length", value: "2")
        request.decodedHead = edited
        #expect(request.host == "new" && request.announcesBody && !request.head.fields.isRaw)
        var out = ByteBuffer()
        _ = HeaderRewriting.writeHTTP1Request(UpstreamRequestHead(request: request), into: &out)
        #expect(
            String(buffer: out) == "GET /a HTTP/1.1\r\nX-Keep: 1\r\nHost: new\r\nContent-Length: 2\r\n"
                + "x-forwarded-proto: http\r\nvia: 1.1 trellis\r\n\r\n"
        )
    }

    @Test func hopByHopFieldsGoAndTheProxysAreAdded() {
        let head = HTTPRequestHead(
            version: .http1_1,
            method: .GET,
            uri: "http://example.com/a?b=1",
            headers: [
                "Host": "example.com", "Connection": "keep-alive, X-Hop", "X-Hop": "1", "Keep-Alive": "timeout=5",
                "X-Forwarded-For": "10.0.0.1", "X-Forwarded-Proto": "https", "Via": "1.0 edge",
                "TE": "trailers, deflate",
                "Proxy-Authorization": "secret", "Accept": "*/*",
                "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ]
        )
        let request = UpstreamRequestHead(head: head, clientIP: "127.0.0.9", requestID: .test, trace: nil)
        let (text, chunked) = written(request)
        #expect(!chunked)
        #expect(
            text == "GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nte: trailers\r\nAccept: */*\r\n"
                + "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\nx-request-id: 01234567-89ab-4def-8123-456789abcdef\r\n"
                + "x-forwarded-for: 10.0.0.1, 127.0.0.9\r\nx-forwarded-proto: http\r\nvia: 1.0 edge, 1.1 trellis\r\n\r\n"
        )
        #expect(text == viaNIO(request))
    }

    @Test func bodiesAreFramedAsTheClientsWereOrInChunks() {
        let chunkedUpload = HTTPRequestHead(
            version: .http1_1,
            method: .PUT,
            uri: "/up",
            headers: ["host": "a", "transfer-encoding": "chunked"]
        )
        let (put, putChunked) = written(UpstreamRequestHead(head: chunkedUpload, clientIP: nil))
        #expect(putChunked)
        #expect(
            put
                == "PUT /up HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\nx-forwarded-proto: http\r\nvia: 1.1 trellis\r\n\r\n"
        )
        let sized = HTTPRequestHead(version: .http1_1, method: .POST, uri: "/p", headers: ["content-length": "3"])
        #expect(!written(UpstreamRequestHead(head: sized, clientIP: nil)).chunked)
        // A POST without a length (an HTTP/2 client's) goes in chunks; a TRACE never has a body.
        let unsized = HTTPRequestHead(version: HTTPVersion(major: 2, minor: 0), method: .POST, uri: "/p", headers: [:])
        let (post, postChunked) = written(UpstreamRequestHead(head: unsized, clientIP: "::1"))
        #expect(postChunked)
        #expect(
            post
                == "POST /p HTTP/1.1\r\ntransfer-encoding: chunked\r\nx-forwarded-for: ::1\r\nx-forwarded-proto: http\r\n"
                + "via: 2.0 trellis\r\n\r\n"
        )
        let trace = HTTPRequestHead(version: .http1_1, method: .TRACE, uri: "/", headers: ["content-length": "4"])
        let (traced, traceChunked) = written(UpstreamRequestHead(head: trace, clientIP: nil))
        #expect(!traceChunked && !traced.contains("content-length"))
    }

    /// A peer cannot unframe a body by naming its framing field in `Connection` (smuggling).
    @Test func connectionCannotNameAFramingField() {
        let head = HTTPRequestHead(
            version: .http1_1,
            method: .POST,
            uri: "/",
            headers: ["Connection": "Content-Length, Transfer-Encoding, X-Hop", "X-Hop": "1", "Content-Length": "3"]
        )
        let request = UpstreamRequestHead(head: head, clientIP: nil)
        let (text, chunked) = written(request)
        #expect(!chunked)
        #expect(text == "POST / HTTP/1.1\r\nContent-Length: 3\r\nx-forwarded-proto: http\r\nvia: 1.1 trellis\r\n\r\n")
        #expect(text == viaNIO(request))
        var parser = HTTP1ResponseParser()
        var input = ByteBuffer(string: "HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 2\r\n\r\nok")
        guard case .head(let response) = try? parser.next(&input) else {
            Issue.record("no head")
            return
        }
        var out = ByteBuffer()
        HeaderRewriting.writeHTTP1Response(
            response,
            requestVersion: .http1_1,
            keepAlive: true,
            chunked: false,
            into: &out
        )
        #expect(String(buffer: out) == "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nvia: 1.1 trellis\r\n\r\n")
    }

    @Test func aTraceThatReplacesTheHeadersWritesItsOwnContext() {
        var rng = FastRandom(seed: 7)
        let ids = TraceIDs.random(&rng)
        let head = HTTPRequestHead(
            version: .http1_1,
            method: .GET,
            uri: "/",
            headers: ["traceparent": "00-ffffffffffffffffffffffffffffffff-ffffffffffffffff-01", "tracestate": "a=b"]
        )
        let trace = RequestTrace(span: nil, ids: ids, state: "x=y", kind: .server, replacesHeaders: true)
        let request = UpstreamRequestHead(head: head, clientIP: nil, trace: trace)
        let (text, _) = written(request)
        #expect(text.contains("\r\ntraceparent: \(TraceHeaders.traceparent(ids))\r\ntracestate: x=y\r\n"))
        #expect(!text.contains("ffffffff") && !text.contains("a=b"))
        #expect(text == viaNIO(request))
    }

    /// The fields an HTTP/2 upstream gets come from the same rewriting: they equal NIO's rewritten
    /// head converted to HTTP/2 (pseudo-headers, `:authority` from `Host`, lowercase names,
    /// connection-specific fields and `Transfer-Encoding` left out), the conversion this replaced.
    @Test func http2FieldsAreTheSameRewriting() {
        func viaNIOAsHTTP2(_ request: UpstreamRequestHead) -> [String] {
            let head = request.rewritten
            var fields = [":method: \(head.method.rawValue)", ":scheme: http"]
            if let host = head.headers.first(name: "host") { fields.append(":authority: \(host)") }
            fields.append(":path: \(head.uri)")
            for (name, value) in head.headers {
                switch name.lowercased() {
                case "host", "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade": continue
                case "te": if value.lowercased().contains("trailers") { fields.append("te: trailers") }
                default: fields.append("\(name.lowercased()): \(value)")
                }
            }
            return fields
        }
        func http2(_ request: UpstreamRequestHead) -> [String] {
            HeaderRewriting.http2RequestFields(request).map { "\($0.name): \($0.value)" }
        }
        var rng = FastRandom(seed: 11)
        let requests = [
            UpstreamRequestHead(
                head: HTTPRequestHead(
                    version: .http1_1,
                    method: .GET,
                    uri: "http://example.com/a?b=1",
                    headers: [
                        "Host": "example.com", "Connection": "keep-alive, X-Hop", "X-Hop": "1",
                        "Keep-Alive": "timeout=5", "X-Forwarded-For": "10.0.0.1", "X-Forwarded-Proto": "https",
                        "Via": "1.0 edge", "TE": "trailers, deflate", "Proxy-Authorization": "secret",
                        "Accept": "*/*", "Upgrade": "h2c",
                    ]
                ),
                clientIP: "127.0.0.9",
                requestID: .test
            ),
            UpstreamRequestHead(
                head: HTTPRequestHead(
                    version: HTTPVersion(major: 2, minor: 0),
                    method: .POST,
                    uri: "/orders.Orders/Get",
                    headers: [
                        "host": "orders:8080", "content-type": "application/grpc", "te": "trailers",
                        "transfer-encoding": "chunked",
                        "traceparent": "00-ffffffffffffffffffffffffffffffff-ffffffffffffffff-01",
                    ]
                ),
                clientIP: nil,
                trace: RequestTrace(span: nil, ids: .random(&rng), state: "k=v", kind: .client, replacesHeaders: true)
            ),
            UpstreamRequestHead(
                head: HTTPRequestHead(version: .http1_1, method: .PUT, uri: "/up", headers: ["content-length": "3"]),
                clientIP: "::1"
            ),
        ]
        for request in requests { #expect(http2(request) == viaNIOAsHTTP2(request)) }
        #expect(
            http2(requests[0]) == [
                ":method: GET", ":scheme: http", ":authority: example.com", ":path: /a?b=1", "te: trailers",
                "accept: */*", "x-request-id: 01234567-89ab-4def-8123-456789abcdef",
                "x-forwarded-for: 10.0.0.1, 127.0.0.9", "x-forwarded-proto: http",
                "via: 1.0 edge, 1.1 trellis",
            ]
        )
        #expect(!http2(requests[1]).contains { $0.hasPrefix("transfer-encoding") || $0.contains("ffffffff") })
    }
}
