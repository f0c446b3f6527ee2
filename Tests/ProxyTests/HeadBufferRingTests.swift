import NIOCore
import NIOHTTP1
import Testing

@testable import Proxy

/// The loop's head buffers are used again only once nothing else holds them: a head still queued
/// on a socket is never written over.
@Suite struct HeadBufferRingTests {
    private func address(_ buffer: ByteBuffer) -> UnsafeRawPointer? {
        buffer.withVeryUnsafeBytes { $0.baseAddress }
    }

    @Test func aWrittenHeadsMemoryComesBackOnceItsSocketLetGo() {
        let ring = HeadBufferRing()
        var first = ring.buffer(capacity: 100)
        first.writeString("GET / HTTP/1.1\r\n\r\n")
        let memory = address(first)
        ring.recycle(first)
        first = ByteBuffer()  // the socket wrote it and let go
        // The other slots first (empty: new buffers, each written and kept too).
        for _ in 1..<HeadBufferRing.slots {
            var other = ring.buffer(capacity: 100)
            other.writeString("x")
            ring.recycle(other)
        }
        let again = ring.buffer(capacity: 50)
        #expect(address(again) == memory)
        #expect(again.readableBytes == 0)
        #expect(again.capacity >= 100)
    }

    @Test func aHeadStillQueuedIsNeverWrittenOver() {
        let ring = HeadBufferRing()
        var head = ring.buffer(capacity: 64)
        head.writeString("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        ring.recycle(head)
        let queued = head  // a socket that has not written it yet
        head = ByteBuffer()
        for _ in 1..<HeadBufferRing.slots { ring.recycle(ring.buffer(capacity: 64)) }
        var next = ring.buffer(capacity: 64)
        next.writeString("GET /other HTTP/1.1\r\n\r\n")
        #expect(address(next) != address(queued))
        #expect(String(buffer: queued) == "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        #expect(String(buffer: next) == "GET /other HTTP/1.1\r\n\r\n")
    }

    @Test func aLargeBufferIsNotKept() {
        let ring = HeadBufferRing()
        var large = ring.buffer(capacity: HeadBufferRing.largestKept * 2)
        large.writeString("big")
        let memory = address(large)
        ring.recycle(large)
        large = ByteBuffer()
        for _ in 1..<HeadBufferRing.slots { _ = ring.buffer(capacity: 8) }
        #expect(address(ring.buffer(capacity: 8)) != memory)
    }
}

/// The buffers a loop's parser keeps request field lines in serve a later request once their
/// exchange finished and nothing holds them; a request still held keeps its lines intact.
@Suite struct FieldBlockStackTests {
    private func head(_ parser: inout HTTP1RequestParser, _ text: String) throws -> RequestHead? {
        var input = ByteBuffer(string: text)
        // The previous request's end comes first.
        while let part = try parser.next(&input) {
            if case .head(let head) = part { return head }
        }
        return nil
    }

    private func address(_ fields: RequestFields) -> UnsafeRawPointer? {
        fields.lines.withVeryUnsafeBytes { $0.baseAddress }
    }

    @Test func aFinishedRequestsBufferServesTheNextRequest() throws {
        let blocks = RequestFields.BlockStack()
        var parser = HTTP1RequestParser(maxHeadBytes: 8192, blocks: blocks)
        var first = try #require(
            try head(
                &parser,
                "GET /a HTTP/1.1\r\nHost: first.example\r\nX-Long: \(String(repeating: "v", count: 200))\r\n\r\n"
            )
        )
        let memory = address(first.fields)
        blocks.giveBack(first.fields)
        #expect(blocks.count == 1)
        first = RequestHead(HTTPRequestHead(version: .http1_1, method: .GET, uri: "/"))  // the exchange let go
        let second = try #require(try head(&parser, "GET /b HTTP/1.1\r\nHost: second.example\r\nAccept: */*\r\n\r\n"))
        #expect(blocks.count == 0)
        #expect(address(second.fields) == memory)
        #expect(second.fields.first("host") == "second.example")
        #expect(second.fields.first("accept") == "*/*")
        #expect(second.fields.first("x-long") == nil)
        #expect(second.fields.lines == ByteBuffer(string: "Host: second.example\r\nAccept: */*\r\n\r\n"))
    }

    @Test func aRequestStillHeldKeepsItsLines() throws {
        let blocks = RequestFields.BlockStack()
        var parser = HTTP1RequestParser(maxHeadBytes: 8192, blocks: blocks)
        let held = try #require(try head(&parser, "GET /a HTTP/1.1\r\nHost: held.example\r\nX-Trace: 1\r\n\r\n"))
        blocks.giveBack(held.fields)  // given back while, say, a retry still holds the request
        let next = try #require(try head(&parser, "GET /b HTTP/1.1\r\nHost: next.example\r\n\r\n"))
        #expect(address(next.fields) != address(held.fields))
        #expect(held.fields.first("host") == "held.example")
        #expect(held.fields.first("x-trace") == "1")
        #expect(held.fields.lines == ByteBuffer(string: "Host: held.example\r\nX-Trace: 1\r\n\r\n"))
        #expect(next.fields.first("host") == "next.example")
    }

    @Test func onlyIndexedLinesOfBoundedSizeAreKept() throws {
        let blocks = RequestFields.BlockStack()
        var parser = HTTP1RequestParser(maxHeadBytes: 64 * 1024, blocks: blocks)
        blocks.giveBack(RequestFields(HTTPHeaders([("host", "decoded.example")])))
        let manyLines = (0..<70).map { "X-\($0): v\r\n" }.joined()
        let unindexed = try #require(try head(&parser, "GET / HTTP/1.1\r\nHost: a\r\n\(manyLines)\r\n"))
        blocks.giveBack(unindexed.fields)
        let large = "X-Large: \(String(repeating: "v", count: RequestFields.BlockStack.largestKept))\r\n"
        let big = try #require(try head(&parser, "GET / HTTP/1.1\r\nHost: b\r\n\(large)\r\n"))
        blocks.giveBack(big.fields)
        #expect(blocks.count == 0)
        // Many requests in flight finish: the stack keeps a bounded number of their buffers.
        var inFlight: [RequestHead] = []
        for _ in 0..<(RequestFields.BlockStack.kept + 5) {
            inFlight.append(try #require(try head(&parser, "GET / HTTP/1.1\r\nHost: c\r\n\r\n")))
        }
        for request in inFlight { blocks.giveBack(request.fields) }
        #expect(blocks.count == RequestFields.BlockStack.kept)
    }
}
