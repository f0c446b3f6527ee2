import NIOCore

/// Buffers for the heads one event loop writes (requests to upstreams, responses to clients),
/// used again instead of allocated for each head: two allocations and two frees per buffer, twice
/// per proxied request. A head is handed to its socket within the loop tick it is made in and
/// written at that tick's end; when its buffer comes round again, ``slots`` heads later, the
/// socket has long released it, and `clear(minimumCapacity:)` keeps its memory. A buffer a socket
/// still holds (a peer that does not read) stays with it, and a new one is made. Buffers larger
/// than ``largestKept`` are not kept: the ring holds 256 KiB at most.
///
/// Touched only on its event loop.
final class HeadBufferRing {
    static let slots = 64
    static let largestKept = 4 * 1024

    private var ring = [ByteBuffer?](repeating: nil, count: HeadBufferRing.slots)
    /// The slot the next buffer is taken from, and the one the next written buffer goes to.
    private var nextOut = 0
    private var nextIn = 0
    private let allocator = ByteBufferAllocator()

    /// An empty buffer of at least `capacity` bytes: a kept one when it is free again.
    func buffer(capacity: Int) -> ByteBuffer {
        let slot = nextOut
        nextOut = (slot &+ 1) & (Self.slots &- 1)
        guard var kept = ring[slot].take() else { return allocator.buffer(capacity: capacity) }
        // Its own memory when no socket holds it any more (the usual case), else a new buffer.
        kept.clear(minimumCapacity: capacity)
        return kept
    }

    /// `buffer`, a head about to be written and not changed after: kept, to be used again once
    /// its socket has written it.
    func recycle(_ buffer: ByteBuffer) {
        guard buffer.capacity <= Self.largestKept else { return }
        ring[nextIn] = buffer
        nextIn = (nextIn &+ 1) & (Self.slots &- 1)
    }
}

@available(*, unavailable)
extension HeadBufferRing: Sendable {}
