import Foundation
import NIOCore
import NIOHTTP1
import Testing

@testable import Proxy

/// An upstream's HTTP/1 responses read from bytes, without a socket: framing, the head kept as
/// received, every split of the input, and what is refused. Then the head an HTTP/1 client gets.
@Suite struct HTTP1ResponseParserTests {
    typealias Parser = HTTP1ResponseParser

    /// What the parser makes of `chunks` fed one after another: a readable transcript.
    private func transcript(_ chunks: [String], head: Bool = false, close: Bool = false) throws -> [String] {
        var parser = Parser()
        parser.requestIsHEAD = head
        var out: [String] = []
        var body = ""
        func record(_ part: UpstreamResponsePart) {
            switch part {
            case .head(let h):
                if !body.isEmpty {
                    out.append("body:\(body)")
                    body = ""
                }
                out.append("head:\(h.status.code) keepAlive=\(h.keepAlive) length=\(h.hasContentLength)")
            case .body(let b): body += String(buffer: b)
            case .end(let trailers):
                if !body.isEmpty {
                    out.append("body:\(body)")
                    body = ""
                }
                out.append(
                    "end" + (trailers.map { ":" + $0.map { "\($0.name)=\($0.value)" }.joined(separator: ",") } ?? "")
                )
            }
        }
        for chunk in chunks {
            var input = ByteBuffer(string: chunk)
            while let part = try parser.next(&input) { record(part) }
            #expect(input.readableBytes == 0, "input left unread")
        }
        if close, let part = try parser.inputClosed() { record(part) }
        if !body.isEmpty { out.append("body:\(body)") }
        return out
    }

    /// `text` cut at every byte: each split must read exactly as the whole.
    private func everySplit(_ text: String, head: Bool = false) throws -> [String] {
        let whole = try transcript([text], head: head)
        let bytes = Array(text.utf8)
        for cut in 1..<bytes.count {
            let parts = [
                String(decoding: bytes[..<cut], as: UTF8.self), String(decoding: bytes[cut...], as: UTF8.self),
            ]
            #expect(try transcript(parts, head: head) == whole, "split at \(cut)")
        }
        #expect(
            try transcript(bytes.map { String(decoding: [$0], as: UTF8.self) }, head: head) == whole,
            "byte by byte"
        )
        return whole
    }

    @Test func contentLengthResponsesOnOneConnection() throws {
        let two =
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: x\r\n\r\nhelloHTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
        #expect(
            try everySplit(two) == [
                "head:200 keepAlive=true length=true", "body:hello", "end",
                "head:404 keepAlive=true length=true", "end",
            ]
        )
    }

    @Test func chunkedBodyWithExtensionsAndTrailers() throws {
        let text =
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\nB\r\n, world!!!!\r\n0\r\ngrpc-status: 0\r\nx-t: a b\r\n\r\n"
        #expect(
            try everySplit(text) == [
                "head:200 keepAlive=true length=false", "body:hello, world!!!!", "end:grpc-status=0,x-t=a b",
            ]
        )
    }

    @Test func chunkedBodyWithBareLineFeeds() throws {
        let text = "HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n3\nabc\n0\n\n"
        #expect(try everySplit(text) == ["head:200 keepAlive=true length=false", "body:abc", "end"])
    }

    @Test func responsesWithoutBodies() throws {
        // A HEAD's response announces a length and sends nothing; 204 and 304 have no body.
        #expect(
            try transcript(["HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"], head: true) == [
                "head:200 keepAlive=true length=true", "end",
            ]
        )
        #expect(try transcript(["HTTP/1.1 204 No Content\r\n\r\n"]) == ["head:204 keepAlive=true length=false", "end"])
        #expect(
            try transcript(["HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"]) == [
                "head:304 keepAlive=true length=true", "end",
            ]
        )
    }

    @Test func informationalThenFinal() throws {
        let text =
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
        #expect(
            try everySplit(text) == [
                "head:100 keepAlive=true length=false", "head:103 keepAlive=true length=false",
                "head:201 keepAlive=true length=true", "body:ok", "end",
            ]
        )
    }

    @Test func bodyUntilTheConnectionCloses() throws {
        #expect(
            try transcript(["HTTP/1.1 200 OK\r\n\r\nsome ", "bytes"], close: true) == [
                "head:200 keepAlive=false length=false", "body:some bytes", "end",
            ]
        )
        // HTTP/1.0 closes unless it says keep-alive; HTTP/1.1 keeps alive unless it says close.
        #expect(
            try transcript(["HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"]) == [
                "head:200 keepAlive=false length=true", "end",
            ]
        )
        #expect(
            try transcript(["HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n"]) == [
                "head:200 keepAlive=true length=true", "end",
            ]
        )
        #expect(
            try transcript(["HTTP/1.1 200 OK\r\nConnection: foo, close\r\nContent-Length: 0\r\n\r\n"]) == [
                "head:200 keepAlive=false length=true", "end",
            ]
        )
    }

    @Test func theHeadIsKeptAsReceived() throws {
        var parser = Parser()
        var input = ByteBuffer(string: "HTTP/1.1 418 I'm a teapot\r\nX-Odd-Case: Va lue \r\nContent-Length: 0\r\n\r\n")
        guard case .head(let head) = try parser.next(&input), case .raw(let raw) = head.fields else {
            Issue.record("no raw head")
            return
        }
        #expect(String(buffer: raw.statusText) == "418 I'm a teapot")
        #expect(String(buffer: raw.block) == "X-Odd-Case: Va lue \r\nContent-Length: 0\r\n")
        #expect(head.first(name: "x-odd-case") == "Va lue")
        #expect(head.headers["X-Odd-Case"] == ["Va lue"])
    }

    @Test func whatCannotBeFramedIsRefused() {
        let refused: [(String, String)] = [
            ("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", "both"),
            ("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", "two different"),
            ("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "not a number"),
            ("HTTP/1.1 200 OK\r\nContent-Length: 1 2\r\n\r\n", "not a number"),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported Transfer-Encoding"),
            ("HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n", "obsolete line folding"),
            ("HTTP/1.1 200 OK\r\nBad Name: a\r\n\r\n", "invalid character in a field name"),
            ("HTTP/1.1 200 OK\r\nX: a\u{0}b\r\n\r\n", "control character"),
            ("HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n", "control character"),
            ("HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "invalid character in a field name"),
            ("HTTP/1.1 200 OK\r\n: empty\r\n\r\n", "without a name"),
            ("HTTP/2.0 200 OK\r\n\r\n", "status line"),
            ("HTTP/1.1 20 OK\r\n\r\n", "status line"),
            ("HTTP/1.1 600 Odd\r\n\r\n", "out of range"),
            ("garbage\r\n\r\n", "status line"),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "without a size"),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n", "longer than its size"),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000000000000000\r\n", "too large"),
        ]
        for (text, reason) in refused {
            var parser = Parser()
            var input = ByteBuffer(string: text)
            do {
                while try parser.next(&input) != nil {}
                Issue.record("accepted: \(text.debugDescription)")
            } catch let error as Parser.ParseError {
                #expect(error.description.contains(reason), "\(text.debugDescription): \(error)")
            } catch {
                Issue.record("unexpected \(error)")
            }
        }
    }

    @Test func anOversizedHeadIsRefusedWithoutGrowingForever() throws {
        var parser = Parser()
        var input = ByteBuffer(string: "HTTP/1.1 200 OK\r\n")
        #expect(try parser.next(&input) == nil)
        let line = ByteBuffer(string: "x-filler: " + String(repeating: "a", count: 1000) + "\r\n")
        var refused: Parser.ParseError?
        for _ in 0..<100 {  // 100 KB at most
            var more = line
            do {
                _ = try parser.next(&more)
            } catch let error as Parser.ParseError {
                refused = error
                break
            }
        }
        #expect(refused?.description.contains("larger than 64 KiB") == true)
    }

    @Test func aResponseCutShortIsAnErrorAndAnIdleCloseIsNot() throws {
        var idle = Parser()
        #expect(try idle.inputClosed() == nil)
        var cut = Parser()
        var input = ByteBuffer(string: "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        while try cut.next(&input) != nil {}
        #expect(throws: Parser.ParseError.self) { try cut.inputClosed() }
        var partialHead = Parser()
        var head = ByteBuffer(string: "HTTP/1.1 200 OK\r\nContent-")
        #expect(try partialHead.next(&head) == nil)
        #expect(!partialHead.isIdle)
        #expect(throws: Parser.ParseError.self) { try partialHead.inputClosed() }
    }

    // MARK: The head an HTTP/1 client gets

    private func relayed(
        _ text: String,
        requestVersion: HTTPVersion = .http1_1,
        keepAlive: Bool = true,
        chunked: Bool = false
    ) throws -> String {
        var parser = Parser()
        var input = ByteBuffer(string: text)
        guard case .head(let head) = try parser.next(&input) else { return "no head" }
        func written(_ head: ResponseHead) -> String {
            var out = ByteBuffer()
            HeaderRewriting.writeHTTP1Response(
                head,
                requestVersion: requestVersion,
                keepAlive: keepAlive,
                chunked: chunked,
                into: &out
            )
            return String(buffer: out)
        }
        // The lines between those the parser marked are copied in one piece: the same head as
        // when each line is looked at.
        var lineByLine = head
        if case .raw(var raw) = head.fields {
            raw.plan = .lineByLine
            lineByLine.fields = .raw(raw)
        }
        let text = written(head)
        #expect(text == written(lineByLine))
        return text
    }

    /// The parser notes the lines not relayed as they came (up to three): the others are copied
    /// in one piece.
    @Test func theLinesBetweenSpecialOnesAreCopiedWhole() throws {
        func plan(_ text: String) throws -> RawResponseHead.CopyPlan? {
            var parser = Parser()
            var input = ByteBuffer(string: text)
            guard case .head(let head) = try parser.next(&input), case .raw(let raw) = head.fields else { return nil }
            return raw.plan
        }
        let nginx =
            "HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 02 Dec 2026 02:00:00 GMT\r\n"
            + "Content-Type: text/plain\r\nContent-Length: 12\r\nConnection: keep-alive\r\n\r\n"
        #expect(try plan(nginx)?.count == 1)
        #expect(
            try relayed(nginx) == "HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 02 Dec 2026 02:00:00 GMT\r\n"
                + "Content-Type: text/plain\r\nContent-Length: 12\r\nvia: 1.1 trellis\r\n\r\n"
        )
        let three =
            "HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nA: 1\nB: 2\r\nTE: trailers\r\nContent-Length: 0\r\n\r\n"
        #expect(try plan(three)?.count == 3)
        #expect(
            try relayed(three)
                == "HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\nte: trailers\r\nContent-Length: 0\r\nvia: 1.1 trellis\r\n\r\n"
        )
        let four =
            "HTTP/1.1 200 OK\r\nUpgrade: x\r\nA: 1\r\nTrailer: t\r\nProxy-Authenticate: b\r\nKeep-Alive: 1\r\n\r\n"
        #expect(try plan(four)?.count == -1)
        #expect(try relayed(four) == "HTTP/1.1 200 OK\r\nA: 1\r\nvia: 1.1 trellis\r\n\r\n")
        let named = "HTTP/1.1 200 OK\r\nX-Hop: 1\r\nConnection: x-hop\r\nContent-Length: 0\r\n\r\n"
        #expect(try plan(named)?.count == -1)
        #expect(try relayed(named) == "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nvia: 1.1 trellis\r\n\r\n")
        let plain = "HTTP/1.1 204 No Content\r\nX-A: 1\r\nX-B: 2\r\n\r\n"
        #expect(try plan(plain)?.count == 0)
        #expect(try relayed(plain) == "HTTP/1.1 204 No Content\r\nX-A: 1\r\nX-B: 2\r\nvia: 1.1 trellis\r\n\r\n")
    }

    @Test func hopByHopFieldsGoAndTheRestIsCopiedByteForByte() throws {
        let upstream =
            "HTTP/1.1 200 OK\r\nServer: nginx\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\n"
            + "X-Secret: s\r\nContent-Type: text/plain; charset=UTF-8\r\nContent-Length: 12\r\n"
            + "Proxy-Authenticate: Basic\r\nUpgrade: h2c\r\nVia: 1.0 older\r\nX-Empty:\r\n\r\n"
        #expect(
            try relayed(upstream) == "HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain; charset=UTF-8\r\n"
                + "Content-Length: 12\r\nVia: 1.0 older\r\nX-Empty:\r\nvia: 1.1 trellis\r\n\r\n"
        )
    }

    /// Lines that grow when written (a bare LF becomes CRLF, `TE` becomes `te: trailers`) stay
    /// within the memory reserved for the head (debug builds check each piece).
    @Test func aHeadOfLinesThatGrowStaysWithinItsBound() throws {
        let lines = String(repeating: "a:\n", count: 300) + String(repeating: "TE:trailers\n", count: 100)
        let text = try relayed("HTTP/1.1 200 OK\n" + lines + "Content-Length: 0\n\n")
        #expect(text.hasPrefix("HTTP/1.1 200 OK\r\na:\r\na:\r\n"))
        #expect(text.components(separatedBy: "a:\r\n").count == 301)
        #expect(text.components(separatedBy: "te: trailers\r\n").count == 101)
        #expect(text.hasSuffix("Content-Length: 0\r\nvia: 1.1 trellis\r\n\r\n"))
    }

    @Test func framingAndConnectionFieldsAreThisConnections() throws {
        let chunkedUpstream = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTE: trailers, deflate\r\n\r\n"
        #expect(
            try relayed(chunkedUpstream, keepAlive: false, chunked: true)
                == "HTTP/1.1 200 OK\r\nte: trailers\r\nvia: 1.1 trellis\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        )
        #expect(
            try relayed("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", requestVersion: .http1_0)
                == "HTTP/1.0 200 OK\r\nContent-Length: 0\r\nvia: 1.0 trellis\r\nconnection: keep-alive\r\n\r\n"
        )
    }

    @Test func anHTTP2UpstreamsHeadIsEncodedForAnHTTP1Client() {
        let head = ResponseHead(
            HTTPResponseHead(
                version: HTTPVersion(major: 2, minor: 0),
                status: .created,
                headers: ["content-type": "a/b", "connection": "close", "content-length": "3"]
            )
        )
        var out = ByteBuffer()
        HeaderRewriting.writeHTTP1Response(head, requestVersion: .http1_1, keepAlive: true, chunked: false, into: &out)
        #expect(
            String(buffer: out)
                == "HTTP/1.1 201 Created\r\ncontent-type: a/b\r\ncontent-length: 3\r\nvia: 2.0 trellis\r\n\r\n"
        )
    }
}
