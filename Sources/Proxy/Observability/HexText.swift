/// Numbers as lower-case hex written straight into a buffer (trace ids, request ids).
enum HexText {
    /// The low `digits` nibbles of `value`, most significant first.
    @inline(__always)
    static func write(_ value: UInt64, _ digits: Int, into out: UnsafeMutableBufferPointer<UInt8>, at offset: Int) {
        var v = value
        var i = offset + digits - 1
        while i >= offset {
            let nibble = UInt8(truncatingIfNeeded: v & 0xF)
            out[i] = nibble < 10 ? UInt8(ascii: "0") &+ nibble : UInt8(ascii: "a") &+ nibble &- 10
            v >>= 4
            i -= 1
        }
    }
}
