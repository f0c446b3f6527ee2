import NIOCore
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
