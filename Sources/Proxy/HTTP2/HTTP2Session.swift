import CNghttp2
import NIOCore

/// One HTTP/2 connection's protocol state on libnghttp2 (framing, HPACK, stream states, flow
/// control, settings, GOAWAY), as bytes in and bytes out with no socket: the channel handlers
/// feed what they read to ``receive(_:)`` and write what ``produce(into:)`` gives them. This type
/// owns the `nghttp2_session` and every pointer into it; nothing else in Trellis speaks HTTP/2.
///
/// Memory is bounded on both sides. Inbound, the session never opens its flow-control windows by
/// itself: the owner calls ``consume(stream:bytes:)`` once it has passed bytes on (to an upstream
/// that accepted them), so a peer can have at most one window of data buffered here. Outbound,
/// body bytes wait in a queue per stream until the peer's window lets them go; the owner stops
/// reading from its source while ``queuedBytes(stream:)`` is above its mark.
final class HTTP2Session {
    enum Role: Sendable { case server, client }

    /// What this endpoint advertises and enforces.
    struct Settings: Sendable, Equatable {
        /// Streams the peer may open at once; HEADERS beyond it are refused by libnghttp2.
        var maxConcurrentStreams: UInt32 = 100
        /// Each stream's receive window (bytes the peer may send before we consume).
        var initialWindowSize: Int32 = 256 * 1024
        /// The connection's receive window, across its streams.
        var connectionWindowSize: Int32 = 1024 * 1024
        /// Largest header list accepted (name + value + 32 per field, RFC 9113 §6.5.2); a larger
        /// block is cut off there and reported as ``HeaderBlock/oversized``.
        var maxHeaderListSize: UInt32 = 64 * 1024
        /// Resets a peer may cause per second, and the burst (rapid reset, CVE-2023-44487): past
        /// them the connection is closed with GOAWAY.
        var resetBurst: UInt64 = 1000
        var resetRate: UInt64 = 33
        /// CONTINUATION frames accepted for one header block (CVE-2024-27983).
        var maxContinuations = 8
        /// SETTINGS entries per frame and queued control-frame ACKs (SETTINGS and PING floods).
        var maxSettingsEntries = 32
        var maxOutboundAcks = 1000

        init() {}
    }

    /// The header fields of one HEADERS block (request, response or trailers), in order, with
    /// pseudo-headers first as libnghttp2 has checked them.
    struct HeaderBlock: Sendable {
        var fields: [(name: String, value: String)] = []
        /// The block carried END_STREAM (a request or response without a body, or trailers).
        var endStream = false
        /// The block was larger than ``Settings/maxHeaderListSize``; fields past it were dropped.
        var oversized = false

        func first(_ name: String) -> String? {
            fields.first { $0.name == name }?.value
        }
    }

    enum Event {
        /// HEADERS on a stream: a new request (server), a response or 1xx (client), or trailers.
        case headers(stream: Int32, HeaderBlock)
        /// Body bytes; flow-control credit comes back only through ``consume(stream:bytes:)``.
        case data(stream: Int32, ByteBuffer)
        /// The peer ended its side of the stream (END_STREAM on DATA; on HEADERS it is in the block).
        case endStream(stream: Int32)
        /// The stream is gone: `error` 0 after a normal end, otherwise the RST_STREAM or GOAWAY code.
        case closed(stream: Int32, error: UInt32)
        /// The peer will not open (server) or accept (client) streams above `lastStream`.
        case goAway(lastStream: Int32, error: UInt32)
        /// The peer's SETTINGS changed (its stream limit, say).
        case remoteSettings
    }

    /// A failure that ends the connection (bad preface, flood, protocol error); whatever
    /// ``produce(into:)`` still gives (a GOAWAY) is worth sending before closing.
    struct Failure: Error, CustomStringConvertible {
        let code: Int32
        var description: String { String(cString: nghttp2_strerror(code)) }
    }

    let role: Role
    let settings: Settings
    private var session: OpaquePointer?
    private var events: [Event] = []
    /// The header block being received. HTTP/2 allows nothing between a HEADERS frame and its
    /// CONTINUATIONs, so there is at most one at a time.
    private var incoming: (stream: Int32, block: HeaderBlock, size: Int)?
    /// ``withNameValues(_:_:)``'s scratch space.
    private var scratchBytes: [UInt8] = []
    private var scratchNV: [nghttp2_nv] = []
    private var outbound: [Int32: Outbound] = [:]
    /// Streams whose queue went below ``lowWater`` during the last ``produce(into:)``.
    private(set) var drained: [Int32] = []
    private let allocator: ByteBufferAllocator

    /// Bytes of outbound body a stream may queue before its source should pause.
    static let highWater = 256 * 1024
    static let lowWater = 64 * 1024

    /// A class, so that the read callback mutates the queue in place (a struct taken out of the
    /// dictionary would copy its buffer on every DATA frame).
    private final class Outbound {
        var queue = CircularBuffer<ByteBuffer>()
        var bytes = 0
        var ended = false
        var trailers: [(name: String, value: String)]?
        var deferred = false
    }

    init(role: Role, settings: Settings = Settings(), allocator: ByteBufferAllocator = ByteBufferAllocator()) {
        self.role = role
        self.settings = settings
        self.allocator = allocator
        var callbacks: OpaquePointer?
        nghttp2_session_callbacks_new(&callbacks)
        defer { nghttp2_session_callbacks_del(callbacks) }
        nghttp2_session_callbacks_set_on_begin_headers_callback(callbacks) { _, frame, user in
            HTTP2Session.from(user).beginHeaders(frame!.pointee.hd.stream_id)
        }
        nghttp2_session_callbacks_set_on_header_callback(callbacks) {
            _,
            frame,
            name,
            nameLength,
            value,
            valueLength,
            _,
            user in
            HTTP2Session.from(user).header(
                frame!.pointee.hd.stream_id,
                UnsafeBufferPointer(start: name, count: nameLength),
                UnsafeBufferPointer(start: value, count: valueLength)
            )
        }
        nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks) { _, frame, user in
            HTTP2Session.from(user).frameReceived(frame!)
        }
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks) { _, _, stream, data, length, user in
            HTTP2Session.from(user).dataReceived(stream, UnsafeRawBufferPointer(start: data, count: length))
        }
        nghttp2_session_callbacks_set_on_stream_close_callback(callbacks) { _, stream, error, user in
            HTTP2Session.from(user).streamClosed(stream, error)
        }
        var options: OpaquePointer?
        nghttp2_option_new(&options)
        defer { nghttp2_option_del(options) }
        nghttp2_option_set_no_auto_window_update(options, 1)
        nghttp2_option_set_stream_reset_rate_limit(options, settings.resetBurst, settings.resetRate)
        nghttp2_option_set_max_continuations(options, settings.maxContinuations)
        nghttp2_option_set_max_settings(options, settings.maxSettingsEntries)
        nghttp2_option_set_max_outbound_ack(options, settings.maxOutboundAcks)
        let user = Unmanaged.passUnretained(self).toOpaque()
        switch role {
        case .server: nghttp2_session_server_new2(&session, callbacks, user, options)
        case .client: nghttp2_session_client_new2(&session, callbacks, user, options)
        }
        var entries = [
            nghttp2_settings_entry(
                settings_id: Int32(NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS.rawValue),
                value: settings.maxConcurrentStreams
            ),
            nghttp2_settings_entry(
                settings_id: Int32(NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE.rawValue),
                value: UInt32(settings.initialWindowSize)
            ),
            nghttp2_settings_entry(
                settings_id: Int32(NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE.rawValue),
                value: settings.maxHeaderListSize
            ),
        ]
        if role == .server {
            entries.append(
                nghttp2_settings_entry(settings_id: Int32(NGHTTP2_SETTINGS_ENABLE_PUSH.rawValue), value: 0)
            )
        }
        nghttp2_submit_settings(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), entries, entries.count)
        nghttp2_session_set_local_window_size(
            session,
            UInt8(NGHTTP2_FLAG_NONE.rawValue),
            0,
            settings.connectionWindowSize
        )
    }

    deinit {
        nghttp2_session_del(session)
    }

    private static func from(_ user: UnsafeMutableRawPointer?) -> HTTP2Session {
        Unmanaged<HTTP2Session>.fromOpaque(user!).takeUnretainedValue()
    }

    // MARK: Bytes in, bytes out

    /// Feeds bytes read from the connection; returns what they meant, in order.
    func receive(_ buffer: ByteBuffer) throws(Failure) -> [Event] {
        let result = buffer.withUnsafeReadableBytes { bytes -> Int in
            guard let base = bytes.baseAddress else { return 0 }
            return nghttp2_session_mem_recv(session, base.assumingMemoryBound(to: UInt8.self), bytes.count)
        }
        let out = events
        events.removeAll(keepingCapacity: true)
        if result < 0 { throw Failure(code: Int32(result)) }
        return out
    }

    /// Streams that received HEADERS or DATA since ``takeTouched()`` was last called, in order:
    /// the ones whose exchanges flush when a batch of reads ends.
    private var touched: [Int32] = []

    func takeTouched() -> [Int32] {
        guard !touched.isEmpty else { return [] }
        let out = touched
        touched.removeAll(keepingCapacity: true)
        return out
    }

    private func touch(_ stream: Int32) {
        if touched.last != stream && !touched.contains(stream) { touched.append(stream) }
    }

    /// Events raised while frames were produced (a stream closes when this side sends its
    /// END_STREAM after the peer's): collect them after ``produce(into:)``.
    func takeEvents() -> [Event] {
        guard !events.isEmpty else { return [] }
        let out = events
        events.removeAll(keepingCapacity: true)
        return out
    }

    /// Appends every frame ready to go to `buffer` (as much body as the peer's windows allow);
    /// returns whether anything was written. ``drained`` then lists the streams whose queues went
    /// below the low-water mark; ``takeEvents()`` what happened meanwhile.
    @discardableResult
    func produce(into buffer: inout ByteBuffer) throws(Failure) -> Bool {
        drained.removeAll(keepingCapacity: true)
        var wrote = false
        while true {
            var data: UnsafePointer<UInt8>?
            let count = nghttp2_session_mem_send(session, &data)
            if count < 0 { throw Failure(code: Int32(count)) }
            guard count > 0, let data else { break }
            buffer.writeBytes(UnsafeRawBufferPointer(start: data, count: count))
            wrote = true
        }
        return wrote
    }

    /// Whether the session still expects to read, or has frames to write; when neither, the
    /// connection is done (after a GOAWAY both ways, or a fatal error).
    var wantsRead: Bool { nghttp2_session_want_read(session) != 0 }
    var wantsWrite: Bool { nghttp2_session_want_write(session) != 0 }

    // MARK: Streams

    /// Server: answers `stream` with a response head (`:status` first); `endStream` when there is
    /// no body and no trailers.
    func respond(stream: Int32, headers: [(name: String, value: String)], endStream: Bool) -> Bool {
        if !endStream { outbound[stream] = Outbound() }
        let rv = withNameValues(headers) { nva, count in
            if endStream { return nghttp2_submit_response(session, stream, nva, count, nil) }
            var provider = Self.provider
            return nghttp2_submit_response(session, stream, nva, count, &provider)
        }
        if rv != 0 { outbound[stream] = nil }
        return rv == 0
    }

    /// Server: a 1xx interim response (its HEADERS do not end the stream).
    func informational(stream: Int32, headers: [(name: String, value: String)]) {
        _ = withNameValues(headers) { nva, count in
            nghttp2_submit_headers(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), stream, nil, nva, count, nil)
        }
    }

    /// Client: opens a stream with a request head (pseudo-headers first). Returns its id, or nil
    /// when no stream can be opened on this connection (GOAWAY received, ids exhausted).
    func request(headers: [(name: String, value: String)], endStream: Bool) -> Int32? {
        let id = withNameValues(headers) { nva, count in
            if endStream { return nghttp2_submit_request(session, nil, nva, count, nil, nil) }
            var provider = Self.provider
            return nghttp2_submit_request(session, nil, nva, count, &provider, nil)
        }
        guard id > 0 else { return nil }
        if !endStream { outbound[id] = Outbound() }
        return id
    }

    /// Queues body bytes on a stream opened with a body.
    func send(stream: Int32, _ buffer: ByteBuffer) {
        guard let out = outbound[stream], buffer.readableBytes > 0 else { return }
        out.bytes += buffer.readableBytes
        out.queue.append(buffer)
        resume(stream)
    }

    /// Ends a stream's body, with trailers when given (gRPC's status goes there).
    func end(stream: Int32, trailers: [(name: String, value: String)]? = nil) {
        guard let out = outbound[stream] else { return }
        out.ended = true
        out.trailers = trailers.flatMap { $0.isEmpty ? nil : $0 }
        resume(stream)
    }

    /// Body bytes queued on `stream`, not yet framed.
    func queuedBytes(stream: Int32) -> Int { outbound[stream]?.bytes ?? 0 }

    /// Gives `bytes` of flow-control credit back for `stream` (and the connection): the peer may
    /// send that much more.
    func consume(stream: Int32, bytes: Int) {
        guard bytes > 0 else { return }
        nghttp2_session_consume(session, stream, bytes)
    }

    /// Ends one stream with RST_STREAM (`code`: CANCEL 0x8, REFUSED_STREAM 0x7, …).
    func reset(stream: Int32, code: UInt32) {
        outbound[stream] = nil
        nghttp2_submit_rst_stream(session, UInt8(NGHTTP2_FLAG_NONE.rawValue), stream, code)
    }

    /// Server drain, first step: GOAWAY with the highest stream id, so the client stops opening
    /// streams while those in flight may still arrive.
    func announceShutdown() {
        nghttp2_submit_shutdown_notice(session)
    }

    /// GOAWAY naming the last stream processed: streams above it were not, and may be retried
    /// elsewhere. With `NO_ERROR` the open streams still finish.
    func goAway(code: UInt32 = 0) {
        nghttp2_submit_goaway(
            session,
            UInt8(NGHTTP2_FLAG_NONE.rawValue),
            nghttp2_session_get_last_proc_stream_id(session),
            code,
            nil,
            0
        )
    }

    /// The peer's limit on streams this side may have open at once.
    var remoteMaxConcurrentStreams: UInt32 {
        nghttp2_session_get_remote_settings(session, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS)
    }

    /// Whether a new request may be opened (client: no GOAWAY received, stream ids left).
    var acceptsRequests: Bool { nghttp2_session_check_request_allowed(session) != 0 }

    // MARK: libnghttp2 callbacks

    private func beginHeaders(_ stream: Int32) -> Int32 {
        var block = HeaderBlock()
        block.fields.reserveCapacity(16)  // most blocks fit: no regrowth while the fields arrive
        incoming = (stream, block, 0)
        return 0
    }

    private func header(
        _ stream: Int32,
        _ name: UnsafeBufferPointer<UInt8>,
        _ value: UnsafeBufferPointer<UInt8>
    ) -> Int32 {
        guard incoming?.stream == stream else { return 0 }
        incoming!.size += name.count + value.count + 32
        if incoming!.size > Int(settings.maxHeaderListSize) {
            incoming!.block.oversized = true
            return 0
        }
        incoming!.block.fields.append(
            (String(decoding: name, as: UTF8.self), String(decoding: value, as: UTF8.self))
        )
        return 0
    }

    private func frameReceived(_ frame: UnsafePointer<nghttp2_frame>) -> Int32 {
        let hd = frame.pointee.hd
        let endStream = hd.flags & UInt8(NGHTTP2_FLAG_END_STREAM.rawValue) != 0
        switch Int(hd.type) {
        case Int(NGHTTP2_HEADERS.rawValue):
            guard let current = incoming, current.stream == hd.stream_id else { return 0 }
            incoming = nil
            var block = current.block
            block.endStream = endStream
            touch(hd.stream_id)
            events.append(.headers(stream: hd.stream_id, block))
        case Int(NGHTTP2_DATA.rawValue):
            if endStream {
                touch(hd.stream_id)
                events.append(.endStream(stream: hd.stream_id))
            }
        case Int(NGHTTP2_GOAWAY.rawValue):
            events.append(
                .goAway(lastStream: frame.pointee.goaway.last_stream_id, error: frame.pointee.goaway.error_code)
            )
        case Int(NGHTTP2_SETTINGS.rawValue):
            if hd.flags & UInt8(NGHTTP2_FLAG_ACK.rawValue) == 0 { events.append(.remoteSettings) }
        default:
            break
        }
        return 0
    }

    private func dataReceived(_ stream: Int32, _ bytes: UnsafeRawBufferPointer) -> Int32 {
        var buffer = allocator.buffer(capacity: bytes.count)
        buffer.writeBytes(bytes)
        touch(stream)
        events.append(.data(stream: stream, buffer))
        return 0
    }

    private func streamClosed(_ stream: Int32, _ error: UInt32) -> Int32 {
        if incoming?.stream == stream { incoming = nil }
        outbound[stream] = nil
        events.append(.closed(stream: stream, error: error))
        return 0
    }

    /// Copies queued body bytes into a DATA frame's payload; defers when the queue is empty and
    /// the body not ended; submits trailers at the end.
    private func read(
        stream: Int32,
        into target: UnsafeMutablePointer<UInt8>,
        length: Int,
        flags: UnsafeMutablePointer<UInt32>
    ) -> Int {
        guard let out = outbound[stream] else {
            return Int(NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE.rawValue)
        }
        let before = out.bytes
        var copied = 0
        while copied < length, var head = out.queue.first {
            let n = min(length - copied, head.readableBytes)
            head.withUnsafeReadableBytes { bytes in
                UnsafeMutableRawPointer(target + copied).copyMemory(from: bytes.baseAddress!, byteCount: n)
            }
            head.moveReaderIndex(forwardBy: n)
            copied += n
            if head.readableBytes == 0 { out.queue.removeFirst() } else { out.queue[out.queue.startIndex] = head }
        }
        out.bytes -= copied
        if before >= Self.lowWater && out.bytes < Self.lowWater { drained.append(stream) }
        if out.queue.isEmpty && out.ended {
            flags.pointee |= NGHTTP2_DATA_FLAG_EOF.rawValue
            if let trailers = out.trailers {
                flags.pointee |= NGHTTP2_DATA_FLAG_NO_END_STREAM.rawValue
                _ = withNameValues(trailers) { nva, count in nghttp2_submit_trailer(session, stream, nva, count) }
            }
            outbound[stream] = nil
            return copied
        }
        if copied == 0 {
            out.deferred = true
            return Int(NGHTTP2_ERR_DEFERRED.rawValue)
        }
        return copied
    }

    private func resume(_ stream: Int32) {
        guard let out = outbound[stream], out.deferred else { return }
        out.deferred = false
        nghttp2_session_resume_data(session, stream)
    }

    private static var provider: nghttp2_data_provider {
        nghttp2_data_provider(
            source: nghttp2_data_source(ptr: nil),
            read_callback: { _, stream, target, length, flags, _, user in
                HTTP2Session.from(user).read(stream: stream, into: target!, length: length, flags: flags!)
            }
        )
    }

    /// Calls `body` with the fields as `nghttp2_nv` (libnghttp2 copies them during the call). The
    /// bytes and the `nghttp2_nv` array are the session's scratch space, kept between calls, so a
    /// header block costs no allocation once the session has seen one as large.
    private func withNameValues<R>(
        _ fields: [(name: String, value: String)],
        _ body: (UnsafePointer<nghttp2_nv>?, Int) -> R
    ) -> R {
        scratchBytes.removeAll(keepingCapacity: true)
        for field in fields {
            // Copied as contiguous UTF-8 (a memcpy), not byte by byte through the generic path.
            field.name.withUTF8Bytes { scratchBytes.append(contentsOf: $0) }
            field.value.withUTF8Bytes { scratchBytes.append(contentsOf: $0) }
        }
        scratchBytes.append(0)  // never empty, so the base address exists
        scratchNV.removeAll(keepingCapacity: true)
        return scratchBytes.withUnsafeMutableBufferPointer { bytes in
            var next = bytes.baseAddress!
            for field in fields {
                let nameLength = field.name.utf8.count
                let valueLength = field.value.utf8.count
                scratchNV.append(
                    nghttp2_nv(
                        name: next,
                        value: next + nameLength,
                        namelen: nameLength,
                        valuelen: valueLength,
                        flags: UInt8(NGHTTP2_NV_FLAG_NONE.rawValue)
                    )
                )
                next += nameLength + valueLength
            }
            return scratchNV.withUnsafeBufferPointer { body($0.baseAddress, $0.count) }
        }
    }
}

@available(*, unavailable)
extension HTTP2Session: Sendable {}
