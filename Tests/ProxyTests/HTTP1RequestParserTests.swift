import NIOCore
import NIOHTTP1
import Testing

@testable import Proxy

/// A client's HTTP/1 requests read from bytes, without a socket: the parts they become, every
/// split of the input, what is refused (and that nothing after a refusal is read), the limit.
@Suite struct HTTP1RequestParserTests {
    typealias Parser = HTTP1RequestParser

    /// What the parser makes of `chunks` fed one after another: a readable transcript.
    private func transcript(_ chunks: [String], limit: Int = 60 * 1024) throws -> [String] {
        var parser = Parser(maxHeadBytes: limit)
        var out: [String] = []
        var body = ""
        func flush() {
            if !body.isEmpty { out.append("body:\(body)") }
            body = ""
        }
        for chunk in chunks {
            var input = ByteBuffer(string: chunk)
            while let part = try parser.next(&input) {
                switch part {
                case .head(let h):
                    flush()
                    let fields = h.fields.headers.map { "\($0.name)=\($0.value)" }.joined(separator: ",")
                    out.append("head:\(h.method.rawValue) \(h.uri) \(h.version) [\(fields)]")
                case .body(let b):
                    body += String(buffer: b)
                case .end(let trailers):
                    flush()
                    out.append(
                        "end"
                            + (trailers.map { ":" + $0.map { "\($0.name)=\($0.value)" }.joined(separator: ",") } ?? "")
                    )
                }
            }
            #expect(input.readableBytes == 0, "input left unread")
        }
        flush()
        return out
    }

    /// `text` cut at every byte: each split must read exactly as the whole.
    private func everySplit(_ text: String) throws -> [String] {
        let whole = try transcript([text])
        let bytes = Array(text.utf8)
        for cut in 1..<bytes.count {
            let parts = [
                String(decoding: bytes[..<cut], as: UTF8.self), String(decoding: bytes[cut...], as: UTF8.self),
            ]
            #expect(try transcript(parts) == whole, "split at \(cut)")
        }
        #expect(try transcript(bytes.map { String(decoding: [$0], as: UTF8.self) }) == whole, "byte by byte")
        return whole
    }

    @Test func pipelinedRequestsWithAndWithoutBodies() throws {
        let text =
            "GET /a?x=1 HTTP/1.1\r\nHost: svc\r\nX-Two:  spaced value \t\r\n\r\n"
            + "POST /b HTTP/1.1\r\nhost: svc\r\ncontent-length: 5\r\n\r\nhello"
            + "PUT /c HTTP/1.0\r\nContent-Length: 0\r\n\r\n"
        #expect(
            try everySplit(text) == [
                "head:GET /a?x=1 HTTP/1.1 [Host=svc,X-Two=spaced value]", "end",
                "head:POST /b HTTP/1.1 [host=svc,content-length=5]", "body:hello", "end",
                "head:PUT /c HTTP/1.0 [Content-Length=0]", "end",
            ]
        )
    }

    @Test func chunkedBodyWithTrailersAndBareLineFeeds() throws {
        let text =
            "POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 9\r\n\r\n"
            + "GET /next HTTP/1.1\nHost: a\n\n"
        #expect(
            try everySplit(text) == [
                "head:POST /up HTTP/1.1 [Host=a,Transfer-Encoding=chunked]", "body:hello world", "end:x-sum=9",
                "head:GET /next HTTP/1.1 [Host=a]", "end",
            ]
        )
    }

    @Test func emptyLinesBeforeARequestAreSkipped() throws {
        #expect(
            try everySplit("\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n") == [
                "head:GET / HTTP/1.1 [Host=a]", "end", "head:GET /2 HTTP/1.1 [Host=a]", "end",
            ]
        )
    }

    @Test func methodsAndTargets() throws {
        for method in ["GET", "PUT", "POST", "HEAD", "PATCH", "DELETE", "OPTIONS", "PROPFIND", "M-SEARCH"] {
            var parser = Parser(maxHeadBytes: 1024)
            var input = ByteBuffer(string: "\(method) * HTTP/1.1\r\nHost: a\r\n\r\n")
            guard case .head(let head) = try parser.next(&input) else {
                Issue.record("no head for \(method)")
                continue
            }
            #expect(head.method.rawValue == method)
            #expect(head.method == HTTPMethod(rawValue: method), "the same value as NIO's decoder gives")
        }
        #expect(
            try transcript(["GET http://alt.example/x?y=1 HTTP/1.1\r\nHost: a\r\n\r\n"]) == [
                "head:GET http://alt.example/x?y=1 HTTP/1.1 [Host=a]", "end",
            ]
        )
    }

    @Test func whatCannotBeFramedOrReadIsRefused() {
        let refused: [(String, String)] = [
            ("GARBAGE\u{1} / NOPE\r\n\r\n", "not a request line"),
            ("GET /\r\n\r\n", "not a request target"),
            ("GET  / HTTP/1.1\r\n\r\n", "not a request target"),
            ("GET /a b HTTP/1.1\r\n\r\n", "not HTTP/1.0 or HTTP/1.1"),
            ("GET /\u{7F} HTTP/1.1\r\n\r\n", "not a request target"),
            ("GET /caf\u{E9} HTTP/1.1\r\n\r\n", "not a request target"),
            ("GET / HTTP/2.0\r\n\r\n", "not HTTP/1.0 or HTTP/1.1"),
            ("GET / HTTP/1.1 \r\n\r\n", "not HTTP/1.0 or HTTP/1.1"),
            ("GET / http/1.1\r\n\r\n", "not HTTP/1.0 or HTTP/1.1"),
            ("POST / HTTP/1.1\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n", "both"),
            ("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", "two different"),
            ("POST / HTTP/1.1\r\nContent-Length: 12abc\r\n\r\n", "not a number"),
            ("POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n", "not a number"),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", "unsupported Transfer-Encoding"),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", "HTTP/1.0"),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "more than one Host"),
            ("GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", "obsolete line folding"),
            ("GET / HTTP/1.1\r\nBad Name: a\r\n\r\n", "invalid character in a field name"),
            ("GET / HTTP/1.1\r\nHost : a\r\n\r\n", "invalid character in a field name"),
            ("GET / HTTP/1.1\r\nX: a\u{0}b\r\n\r\n", "control character"),
            ("GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", "control character"),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", "without a size"),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n", "longer than its size"),
        ]
        for (text, reason) in refused {
            var parser = Parser(maxHeadBytes: 1024)
            var input = ByteBuffer(string: text)
            do {
                while try parser.next(&input) != nil {}
                Issue.record("accepted: \(text.debugDescription)")
            } catch let error as HTTP1ParseError {
                #expect(error.description.contains(reason), "\(text.debugDescription): \(error)")
                #expect(!error.tooLarge)
            } catch {
                Issue.record("unexpected \(error)")
            }
        }
    }

    @Test func nothingAfterARefusalIsRead() throws {
        // The classic CL.TE smuggling attempt: the request that rides in the body never surfaces.
        var parser = Parser(maxHeadBytes: 1024)
        var input = ByteBuffer(
            string:
                "POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 6\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: a\r\n\r\n"
        )
        #expect(throws: HTTP1ParseError.self) { try parser.next(&input) }
        #expect(parser.failed)
        #expect(input.readableBytes == 0)
        var more = ByteBuffer(string: "GET /after HTTP/1.1\r\nhost: a\r\n\r\n")
        #expect(try parser.next(&more) == nil)
        #expect(more.readableBytes == 0)
    }

    @Test func anOversizedHeadIsRefusedAsTooLargeWithoutGrowingForever() throws {
        var parser = Parser(maxHeadBytes: 4096)
        var input = ByteBuffer(string: "GET / HTTP/1.1\r\n")
        #expect(try parser.next(&input) == nil)
        let line = ByteBuffer(string: "x-filler: " + String(repeating: "a", count: 1000) + "\r\n")
        var refused: HTTP1ParseError?
        for _ in 0..<100 {  // 100 KB at most
            var more = line
            do {
                _ = try parser.next(&more)
            } catch let error as HTTP1ParseError {
                refused = error
                break
            }
        }
        #expect(refused?.tooLarge == true)
        #expect(refused?.description == "request head larger than 4 KiB")
        // A head of exactly the limit is taken.
        let head = "GET / HTTP/1.1\r\nx: "
        let exact = head + String(repeating: "b", count: 4096 - head.utf8.count - 4) + "\r\n\r\n"
        #expect(exact.utf8.count == 4096)
        #expect(try transcript([exact], limit: 4096).count == 2)
    }

    /// The field-value check reads eight bytes at a time: against the byte-by-byte rule, for
    /// seeded random values of every length up to 40 and every offset in a word, with each
    /// kind of byte (HTAB, other controls, DEL, visible ASCII, obs-text) planted anywhere.
    @Test func fieldValuesAreCheckedAsByteByByte() {
        var rng = FastRandom(seed: 0xF1E1_D5)
        let kinds: [[UInt8]] = [
            [0x09], [0x00, 0x0A, 0x0D, 0x1F], [0x7F], [0x20, 0x41, 0x7E], [0x80, 0x9F, 0xA0, 0xFF],
        ]
        var refused = 0
        for _ in 0..<4000 {
            let length = Int.random(in: 0...40, using: &rng)
            let offset = Int.random(in: 0..<8, using: &rng)
            var bytes = (0..<(offset + length)).map { _ in UInt8.random(in: 0x20...0x7E, using: &rng) }
            for _ in 0..<Int.random(in: 0...2, using: &rng) where length > 0 {
                let kind = kinds.randomElement(using: &rng)!
                bytes[offset + Int.random(in: 0..<length, using: &rng)] = kind.randomElement(using: &rng)!
            }
            let expected = bytes[offset...].allSatisfy(HTTP1Framer.isFieldValueByte)
            // Past the end: bytes of any kind, read in a word with the last value bytes or not
            // at all, never counted (and an empty value still has storage).
            bytes.append(0x00)
            for _ in 0..<Int.random(in: 0...8, using: &rng) {
                bytes.append(kinds.randomElement(using: &rng)!.randomElement(using: &rng)!)
            }
            let got = bytes.withUnsafeBufferPointer {
                HTTP1Framer.isFieldValue($0.baseAddress!, from: offset, to: offset + length, readable: $0.count)
            }
            #expect(got == expected, "\(bytes[offset..<(offset + length)].map { String($0, radix: 16) })")
            if !expected { refused += 1 }
        }
        #expect(refused > 500 && refused < 3500, "\(refused) of 4000 values refused")
    }

    /// The framing fields are the only names of the lengths the parsers call `frame` for.
    @Test func framingFieldsAreOfTheLengthsLookedAt() throws {
        for name in ["Content-Length", "Transfer-Encoding", "Connection"] {
            #expect(HTTP1Framer.mayFrame(length: name.utf8.count), "\(name)")
        }
        var parser = HTTP1RequestParser(maxHeadBytes: 4096)
        var input = ByteBuffer(string: "POST / HTTP/1.1\r\nHost: a\r\nCONTENT-LENGTH: 2\r\nConnection: close\r\n\r\nok")
        guard case .head(let head) = try parser.next(&input) else {
            Issue.record("no head")
            return
        }
        #expect(!head.keepAlive)
        guard case .body(let body) = try parser.next(&input) else {
            Issue.record("no body")
            return
        }
        #expect(String(buffer: body) == "ok")
    }

    /// The parser indexes the field lines it checked (start, colon, value, end): every pass over
    /// them reads the same lines, names and values as a search of the lines would, in order.
    @Test func indexedFieldLinesReadAsSearchedOnes() throws {
        func seen(_ fields: RequestFields) -> [String] {
            var out: [String] = []
            fields.forEachLine { line, name, value in
                let text = line.map { String(decoding: $0, as: UTF8.self) } ?? "-"
                out.append("\(text)|\(String(decoding: name, as: UTF8.self))|\(String(decoding: value, as: UTF8.self))")
            }
            return out
        }
        let manyLines = (0..<70).map { "X-\($0): \($0)\r\n" }.joined()
        let heads = [
            "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /x HTTP/1.1\r\nHost:b\r\nX-Odd:  Va lue \t\r\nX-Empty:\r\nX-Spaces:   \r\nAccept: */*\n\r\n",
            "POST /p HTTP/1.1\nHost: c\nContent-Length: 2\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n\nok",
            "GET / HTTP/1.0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: d\r\n" + manyLines + "\r\n",
        ]
        for text in heads {
            var parser = HTTP1RequestParser(maxHeadBytes: 64 * 1024)
            var input = ByteBuffer(string: text)
            guard case .head(let head) = try parser.next(&input) else {
                Issue.record("no head in \(text)")
                continue
            }
            let searched = RequestFields(raw: head.fields.lines)
            #expect(seen(head.fields) == seen(searched))
            #expect(head.fields == searched)
            #expect(head.fields.first("host") == searched.first("host"))
        }
        // The values as the parser trimmed them.
        var parser = HTTP1RequestParser(maxHeadBytes: 4096)
        var input = ByteBuffer(string: heads[1])
        guard case .head(let head) = try parser.next(&input) else { return }
        #expect(
            seen(head.fields) == [
                "Host:b|Host|b", "X-Odd:  Va lue \t|X-Odd|Va lue", "X-Empty:|X-Empty|", "X-Spaces:   |X-Spaces|",
                "Accept: */*|Accept|*/*",
            ]
        )
    }

    /// A field name's end is found eight bytes at a time: against the byte-by-byte rule (`tchar`,
    /// RFC 9110), for every byte value planted at every place of names of every length up to
    /// 20, in a line that ends with CRLF or with the readable bytes.
    @Test func fieldNameEndsAreFoundAsByteByByte() {
        var checked = 0
        // Names of the common bytes, and of rarer `tchar`s too.
        for base in [Array("Content-Length-X9".utf8), Array("x_b3.Sampled!#~".utf8)] {
            for length in 1...20 {
                for place in 0..<length {
                    for byte in UInt8.min...UInt8.max {
                        var name = (0..<length).map { base[$0 % base.count] }
                        name[place] = byte
                        let expected = name.firstIndex { !HTTP1Framer.isTokenByte($0) } ?? length
                        for line in [name + Array(": v\r\n".utf8), name] {
                            let got = line.withUnsafeBufferPointer {
                                HTTP1Framer.tokenEnd($0.baseAddress!, from: 0, to: length, readable: line.count)
                            }
                            if got != expected {
                                Issue.record("byte \(byte) at \(place) of \(length): \(got), expected \(expected)")
                            }
                            checked += 1
                        }
                    }
                }
            }
        }
        #expect(checked == 2 * 2 * 256 * (1...20).reduce(0, +))
    }

    /// Seeded random mutations of valid requests (bytes flipped, inserted, deleted, lines
    /// duplicated), each fed whole and in random pieces: the parser never traps, never returns
    /// input unread, and reads the same parts (or the same error) however the bytes arrive.
    @Test func randomMutationsReadTheSameInAnyPieces() throws {
        let seeds = [
            "GET /a?b=c HTTP/1.1\r\nHost: svc\r\nAccept: */*\r\n\r\n",
            "POST /p HTTP/1.1\r\nHost: s\r\nContent-Length: 4\r\n\r\nabcd",
            "PUT /c HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nt: 1\r\n\r\n",
            "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /2 HTTP/1.1\r\nHost: s\r\n\r\n",
        ].map { Array($0.utf8) }
        let alphabet = Array("\r\n :;,-/0123456789aAzZ\t\u{0}\u{7F}\u{FF}".utf8)
        var rng = FastRandom(seed: 0x7E11_1500)
        /// Whole: one call per part until nil; the parts as text, or the error.
        func read(_ pieces: [[UInt8]]) -> [String] {
            var parser = Parser(maxHeadBytes: 256)
            var out: [String] = []
            var body = ""
            for piece in pieces {
                var input = ByteBuffer(bytes: piece)
                do {
                    while let part = try parser.next(&input) {
                        switch part {
                        case .head(let h):
                            out.append("head:\(h.method.rawValue) \(h.uri) \(h.version) \(h.fields.headers.count)")
                        case .body(let b): body += String(buffer: b)
                        case .end(let t):
                            out.append("body:\(body) end:\(t?.count ?? 0)")
                            body = ""
                        }
                    }
                } catch let error as HTTP1ParseError {
                    out.append("error:\(error)")
                } catch {
                    out.append("unexpected:\(error)")
                }
                #expect(input.readableBytes == 0)
            }
            if !body.isEmpty { out.append("body:\(body)") }
            return out
        }
        var errors = 0
        for round in 0..<1500 {
            var bytes = seeds[round % seeds.count]
            for _ in 0..<Int.random(in: 1...4, using: &rng) {
                let at = Int.random(in: 0..<bytes.count, using: &rng)
                switch Int.random(in: 0..<4, using: &rng) {
                case 0: bytes[at] = alphabet.randomElement(using: &rng)!
                case 1: bytes.insert(alphabet.randomElement(using: &rng)!, at: at)
                case 2: if bytes.count > 1 { bytes.remove(at: at) }
                default:
                    let end = bytes[at...].firstIndex(of: 0x0A).map { $0 + 1 } ?? bytes.count
                    bytes.insert(contentsOf: bytes[at..<end], at: at)
                }
            }
            let whole = read([bytes])
            var pieces: [[UInt8]] = []
            var start = 0
            while start < bytes.count {
                let end = min(bytes.count, start + Int.random(in: 1...16, using: &rng))
                pieces.append(Array(bytes[start..<end]))
                start = end
            }
            let split = read(pieces)
            #expect(split == whole, "round \(round): \(String(decoding: bytes, as: UTF8.self).debugDescription)")
            if whole.last?.hasPrefix("error:") == true { errors += 1 }
            if split != whole { break }
        }
        // The mutations reach both sides: some requests are refused, some still read.
        #expect(errors > 100 && errors < 1400, "\(errors) of 1500 refused")
    }
}
