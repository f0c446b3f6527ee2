import Glibc
import Tracing

/// The protocol-buffers wire format, written straight into one buffer: what an OTLP export
/// request needs (varints, fixed-width numbers, length-delimited fields and nested messages).
///
/// A nested message is written in place: its length is reserved as one byte and, when the message
/// turns out longer than 127 bytes, the bytes after it move to make room for the longer varint.
/// Every part of a message is therefore visited once (swift-protobuf, which swift-otel used, sizes
/// a nested message once for each message around it: an attribute's value, five levels down in
/// an export request, was sized six times). The buffer is raw memory grown by doubling: a write
/// is a bounds check and a store (an `Array` append checks uniqueness and capacity per byte).
struct ProtobufWriter: ~Copyable {
    private var base: UnsafeMutablePointer<UInt8>
    private var capacity: Int
    private(set) var count = 0

    init(capacity: Int = 256) {
        self.capacity = max(capacity, 16)
        base = .allocate(capacity: self.capacity)
    }

    deinit { base.deallocate() }

    /// What was written.
    var bytes: [UInt8] { Array(UnsafeBufferPointer(start: base, count: count)) }

    enum WireType: UInt8 {
        case varint = 0
        case fixed64 = 1
        case lengthDelimited = 2
        case fixed32 = 5
    }

    /// Room for `n` more bytes.
    @inline(__always)
    private mutating func reserve(_ n: Int) {
        if count &+ n > capacity { grow(count + n) }
    }

    private mutating func grow(_ needed: Int) {
        let size = max(needed, capacity * 2)
        let bigger = UnsafeMutablePointer<UInt8>.allocate(capacity: size)
        bigger.update(from: base, count: count)
        base.deallocate()
        base = bigger
        capacity = size
    }

    private mutating func append(_ bytes: UnsafeRawBufferPointer) {
        guard let source = bytes.baseAddress, !bytes.isEmpty else { return }
        reserve(bytes.count)
        UnsafeMutableRawPointer(base + count).copyMemory(from: source, byteCount: bytes.count)
        count &+= bytes.count
    }

    private mutating func append<T: FixedWidthInteger>(littleEndian value: T) {
        reserve(MemoryLayout<T>.size)
        UnsafeMutableRawPointer(base + count).storeBytes(of: value.littleEndian, as: T.self)
        count &+= MemoryLayout<T>.size
    }

    mutating func tag(_ field: Int, _ type: WireType) {
        varint(UInt64(field) << 3 | UInt64(type.rawValue))
    }

    mutating func varint(_ value: UInt64) {
        reserve(10)
        var v = value
        while v >= 0x80 {
            base[count] = UInt8(truncatingIfNeeded: v) | 0x80
            count &+= 1
            v >>= 7
        }
        base[count] = UInt8(truncatingIfNeeded: v)
        count &+= 1
    }
    /// The bytes `value` takes as a varint.
    static func varintSize(_ value: UInt64) -> Int {
        value == 0 ? 1 : (64 - value.leadingZeroBitCount + 6) / 7
    }

    /// A varint field; a zero value, the default, is left out (proto3).
    mutating func uint64(_ field: Int, _ value: UInt64) {
        guard value != 0 else { return }
        tag(field, .varint)
        varint(value)
    }

    mutating func fixed64(_ field: Int, _ value: UInt64) {
        guard value != 0 else { return }
        tag(field, .fixed64)
        append(littleEndian: value)
    }

    mutating func fixed32(_ field: Int, _ value: UInt32) {
        guard value != 0 else { return }
        tag(field, .fixed32)
        append(littleEndian: value)
    }

    mutating func double(_ field: Int, _ value: Double) {
        tag(field, .fixed64)
        append(littleEndian: value.bitPattern)
    }

    /// A string field; an empty one is left out (proto3).
    mutating func string(_ field: Int, _ value: String) {
        guard !value.isEmpty else { return }
        presentString(field, value)
    }

    /// A string written even when empty (an attribute's value, whose presence matters).
    mutating func presentString(_ field: Int, _ value: String) {
        var value = value
        value.withUTF8 { utf8 in
            tag(field, .lengthDelimited)
            varint(UInt64(utf8.count))
            append(UnsafeRawBufferPointer(utf8))
        }
    }

    /// An id, big-endian: a span id's 8 bytes (`low` nil), or a trace id's 16 in two halves; an
    /// id of zero is left out.
    mutating func id(_ field: Int, _ high: UInt64, _ low: UInt64?) {
        guard high != 0 || (low ?? 0) != 0 else { return }
        tag(field, .lengthDelimited)
        varint(low == nil ? 8 : 16)
        append(littleEndian: high.byteSwapped)  // big-endian
        if let low { append(littleEndian: low.byteSwapped) }
    }

    /// A nested message, written by `body`, with its length before it.
    mutating func message(_ field: Int, _ body: (inout ProtobufWriter) -> Void) {
        tag(field, .lengthDelimited)
        reserve(1)
        let lengthAt = count
        count &+= 1
        body(&self)
        let length = count - lengthAt - 1
        guard length >= 0x80 else {
            base[lengthAt] = UInt8(length)
            return
        }
        // Room for the longer length: the message moves up by the bytes it needs beyond one.
        let extra = Self.varintSize(UInt64(length)) - 1
        reserve(extra)
        memmove(base + lengthAt + 1 + extra, base + lengthAt + 1, length)
        count &+= extra
        var v = UInt64(length)
        for i in 0...extra {
            base[lengthAt + i] = UInt8(truncatingIfNeeded: v) | (i == extra ? 0 : 0x80)
            v >>= 7
        }
    }
}

/// What an OTLP `ExportTraceServiceRequest` is made of
/// (opentelemetry-proto `collector/trace/v1/trace_service.proto`, `trace/v1/trace.proto`,
/// `common/v1/common.proto`, `resource/v1/resource.proto`), written by ``ProtobufWriter``: one
/// resource (this process) and one instrumentation scope (Trellis) around the spans.
enum OTLPTraceExport {
    /// The request for `spans`, with `resource`'s attributes (`service.name` and the rest).
    static func request(
        resource: [(String, SpanAttribute)],
        scope: (name: String, version: String),
        spans: [SpanData]
    )
        -> [UInt8]
    {
        var w = ProtobufWriter(capacity: 256 + spans.count * 512)
        // ExportTraceServiceRequest.resource_spans = 1
        w.message(1) { w in
            // ResourceSpans.resource = 1 (Resource.attributes = 1)
            w.message(1) { w in
                for (key, value) in resource { keyValue(&w, 1, key, value) }
            }
            // ResourceSpans.scope_spans = 2
            w.message(2) { w in
                // ScopeSpans.scope = 1 (InstrumentationScope.name = 1, version = 2)
                w.message(1) { w in
                    w.string(1, scope.name)
                    w.string(2, scope.version)
                }
                // ScopeSpans.spans = 2
                for span in spans { w.message(2) { w in write(span, to: &w) } }
            }
        }
        return w.bytes
    }

    /// A `Span` message's fields.
    static func write(_ span: SpanData, to w: inout ProtobufWriter) {
        w.id(1, span.context.traceHigh, span.context.traceLow)  // trace_id
        w.id(2, span.context.spanID, nil)  // span_id
        w.string(3, span.context.state ?? "")  // trace_state
        w.id(4, span.parentSpanID, nil)  // parent_span_id
        w.string(5, span.name)  // name
        w.uint64(6, UInt64(kind(span.kind)))  // kind
        w.fixed64(7, span.start)  // start_time_unix_nano
        w.fixed64(8, span.end)  // end_time_unix_nano
        for (key, value) in span.list { keyValue(&w, 9, key, value) }  // attributes
        span.attributes.forEach { key, value in keyValue(&w, 9, key, value) }
        for event in span.events {  // events = 11
            w.message(11) { w in
                w.fixed64(1, event.nanosecondsSinceEpoch)  // time_unix_nano
                w.string(2, event.name)  // name
                event.attributes.forEach { key, value in keyValue(&w, 3, key, value) }
            }
        }
        for link in span.links {  // links = 13
            guard let context = link.context[OTLPSpanContextKey.self] else { continue }
            w.message(13) { w in
                w.id(1, context.traceHigh, context.traceLow)
                w.id(2, context.spanID, nil)
                w.string(3, context.state ?? "")
                link.attributes.forEach { key, value in keyValue(&w, 4, key, value) }
                w.fixed32(6, context.otlpFlags)
            }
        }
        if let status = span.status {  // status = 15 (Status.message = 2, code = 3)
            w.message(15) { w in
                w.string(2, status.message ?? "")
                w.uint64(3, status.code == .ok ? 1 : 2)
            }
        }
        // flags = 16: the W3C flags, and whether the parent was in another process.
        var flags = UInt32(span.context.flags)
        if span.parentSpanID != 0 { flags |= 0x100 | (span.parentIsRemote ? 0x200 : 0) }
        w.fixed32(16, flags)
    }

    /// `Span.SpanKind`: unspecified 0, internal 1, server 2, client 3, producer 4, consumer 5.
    static func kind(_ kind: SpanKind) -> Int {
        switch kind {
        case .internal: 1
        case .server: 2
        case .client: 3
        case .producer: 4
        case .consumer: 5
        }
    }

    /// A `KeyValue` (key = 1, value = 2) as field `field` of the enclosing message.
    static func keyValue(_ w: inout ProtobufWriter, _ field: Int, _ key: String, _ value: SpanAttribute) {
        w.message(field) { w in
            w.presentString(1, key)
            w.message(2) { w in anyValue(&w, value) }
        }
    }

    /// An `AnyValue`'s one field: string_value = 1, bool_value = 2, int_value = 3,
    /// double_value = 4, array_value = 5 (`ArrayValue.values` = 1).
    static func anyValue(_ w: inout ProtobufWriter, _ value: SpanAttribute) {
        switch value {
        case .string(let s): w.presentString(1, s)
        case .int64(let i): scalar(&w, int: i)
        case .int32(let i): scalar(&w, int: Int64(i))
        case .bool(let b): scalar(&w, bool: b)
        case .double(let d): w.double(4, d)
        case .stringConvertible(let s): w.presentString(1, s.description)
        case .stringArray(let a): array(&w, a) { w, s in w.presentString(1, s) }
        case .int64Array(let a): array(&w, a) { w, i in scalar(&w, int: i) }
        case .int32Array(let a): array(&w, a) { w, i in scalar(&w, int: Int64(i)) }
        case .boolArray(let a): array(&w, a) { w, b in scalar(&w, bool: b) }
        case .doubleArray(let a): array(&w, a) { w, d in w.double(4, d) }
        case .stringConvertibleArray(let a): array(&w, a) { w, s in w.presentString(1, s.description) }
        default: w.presentString(1, "\(value)")
        }
    }

    /// A zero or false is still written: the field is a `oneof` member, whose presence is the
    /// value's type.
    private static func scalar(_ w: inout ProtobufWriter, int value: Int64) {
        w.tag(3, .varint)
        w.varint(UInt64(bitPattern: value))
    }

    private static func scalar(_ w: inout ProtobufWriter, bool value: Bool) {
        w.tag(2, .varint)
        w.varint(value ? 1 : 0)
    }

    private static func array<T>(
        _ w: inout ProtobufWriter,
        _ values: [T],
        _ element: (inout ProtobufWriter, T) -> Void
    ) {
        w.message(5) { w in
            for value in values { w.message(1) { w in element(&w, value) } }
        }
    }

    /// What a collector answered (`ExportTraceServiceResponse.partial_success` = 1:
    /// `rejected_spans` = 1, `error_message` = 2); an empty answer is a full success.
    struct Response: Sendable, Equatable {
        var rejectedSpans: Int64 = 0
        var errorMessage = ""
    }

    /// Reads a response; unknown fields are skipped, as protocol buffers require.
    static func response(_ bytes: UnsafeRawBufferPointer) throws(MalformedResponse) -> Response {
        var response = Response()
        var reader = ProtobufReader(bytes)
        while let (field, type) = try reader.next() {
            guard field == 1, type == .lengthDelimited else {
                try reader.skip(type)
                continue
            }
            var inner = ProtobufReader(try reader.lengthDelimited())
            while let (field, type) = try inner.next() {
                switch (field, type) {
                case (1, .varint): response.rejectedSpans = Int64(bitPattern: try inner.varint())
                case (2, .lengthDelimited):
                    response.errorMessage = String(decoding: try inner.lengthDelimited(), as: UTF8.self)
                default: try inner.skip(type)
                }
            }
        }
        return response
    }

    struct MalformedResponse: Error, CustomStringConvertible {
        let offset: Int
        let expected: String
        var description: String { "malformed ExportTraceServiceResponse at byte \(offset): expected \(expected)" }
    }
}

/// Reads the protocol-buffers wire format (the collector's answer).
struct ProtobufReader {
    private let bytes: UnsafeRawBufferPointer
    private var offset = 0

    init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    /// The next field's number and wire type; nil at the end.
    mutating func next() throws(OTLPTraceExport.MalformedResponse) -> (Int, ProtobufWriter.WireType)? {
        guard offset < bytes.count else { return nil }
        let key = try varint()
        guard let type = ProtobufWriter.WireType(rawValue: UInt8(key & 7)), key >> 3 > 0 else {
            throw .init(offset: offset, expected: "a field key with a wire type of 0, 1, 2 or 5")
        }
        return (Int(key >> 3), type)
    }

    mutating func varint() throws(OTLPTraceExport.MalformedResponse) -> UInt64 {
        var value: UInt64 = 0
        var shift: UInt64 = 0
        while offset < bytes.count, shift < 64 {
            let byte = bytes[offset]
            offset += 1
            value |= UInt64(byte & 0x7F) << shift
            if byte < 0x80 { return value }
            shift += 7
        }
        throw .init(offset: offset, expected: "a varint of at most 10 bytes")
    }

    mutating func lengthDelimited() throws(OTLPTraceExport.MalformedResponse) -> UnsafeRawBufferPointer {
        let length = try varint()
        guard length <= UInt64(bytes.count - offset) else {
            throw .init(offset: offset, expected: "\(length) bytes, \(bytes.count - offset) left")
        }
        let slice = UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + Int(length)])
        offset += Int(length)
        return slice
    }

    mutating func skip(_ type: ProtobufWriter.WireType) throws(OTLPTraceExport.MalformedResponse) {
        switch type {
        case .varint: _ = try varint()
        case .lengthDelimited: _ = try lengthDelimited()
        case .fixed64, .fixed32:
            let size = type == .fixed64 ? 8 : 4
            guard bytes.count - offset >= size else { throw .init(offset: offset, expected: "\(size) bytes") }
            offset += size
        }
    }
}
