/// 64-bit FNV-1a: a short, stable digest of bytes (the same across runs and machines), used to
/// label configuration contents and xDS resource versions. Not for security.
public struct FNV1a: Sendable {
    public var value: UInt64 = 0xcbf2_9ce4_8422_2325

    @inlinable public init() {}

    @inlinable
    public mutating func combine(_ bytes: some Sequence<UInt8>) {
        var h = value
        let done: Void? = bytes.withContiguousStorageIfAvailable { buffer in
            for b in buffer {
                h ^= UInt64(b)
                h &*= 0x100_0000_01b3
            }
        }
        if done == nil {
            for b in bytes {
                h ^= UInt64(b)
                h &*= 0x100_0000_01b3
            }
        }
        value = h
    }

    /// Strings hash their UTF-8 bytes without copying when they are native.
    @inlinable
    public mutating func combine(_ string: String) {
        var s = string
        s.withUTF8 { combine($0) }
    }

    /// The digest as lowercase hex.
    public var hex: String { String(value, radix: 16) }

    @inlinable
    public static func hex(_ bytes: some Sequence<UInt8>) -> String {
        var hash = FNV1a()
        hash.combine(bytes)
        return hash.hex
    }
}
