/// An IPv4 or IPv6 network (`10.0.0.0/8`, `fd00::/8`), normalised so that host bits are zero.
public struct CIDR: Sendable, Hashable, CustomStringConvertible {
    public enum Family: Sendable, Hashable { case ipv4, ipv6 }

    public let family: Family
    /// Network address bytes (4 or 16), host bits cleared.
    public let bytes: [UInt8]
    public let prefix: Int

    /// Parses `address/prefix` (or a bare address, which is a /32 or /128).
    public init(_ text: String) throws(CaptureConfigError) {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count <= 2, let address = parts.first, !address.isEmpty else {
            throw CaptureConfigError(path: "", message: "expected a CIDR such as 10.0.0.0/8 or fd00::/8, got '\(text)'")
        }
        let parsed: [UInt8]
        let family: Family
        if let v4 = Self.parseIPv4(address) {
            parsed = v4
            family = .ipv4
        } else if let v6 = Self.parseIPv6(address) {
            parsed = v6
            family = .ipv6
        } else {
            throw CaptureConfigError(path: "", message: "expected a CIDR such as 10.0.0.0/8 or fd00::/8, got '\(text)'")
        }
        let maxPrefix = parsed.count * 8
        var prefix = maxPrefix
        if parts.count == 2 {
            guard let p = Int(parts[1]), (0...maxPrefix).contains(p) else {
                throw CaptureConfigError(path: "", message: "expected a prefix length 0...\(maxPrefix) in '\(text)'")
            }
            prefix = p
        }
        var masked = parsed
        for i in 0..<masked.count {
            let bitsHere = max(0, min(8, prefix - i * 8))
            masked[i] &= bitsHere == 0 ? 0 : UInt8(truncatingIfNeeded: 0xFF << (8 - bitsHere))
        }
        self.family = family
        self.bytes = masked
        self.prefix = prefix
    }

    public var description: String {
        switch family {
        case .ipv4: return bytes.map(String.init).joined(separator: ".") + "/\(prefix)"
        case .ipv6: return Self.formatIPv6(bytes) + "/\(prefix)"
        }
    }

    /// Whether the two networks share any address.
    public func overlaps(_ other: CIDR) -> Bool {
        guard family == other.family else { return false }
        let common = min(prefix, other.prefix)
        for bit in 0..<common {
            let mask = UInt8(0x80) >> UInt8(bit % 8)
            if bytes[bit / 8] & mask != other.bytes[bit / 8] & mask { return false }
        }
        return true
    }

    static func parseIPv4(_ s: Substring) -> [UInt8]? {
        let octets = s.split(separator: ".", omittingEmptySubsequences: false)
        guard octets.count == 4 else { return nil }
        var result: [UInt8] = []
        for o in octets {
            guard !o.isEmpty, o.count <= 3, o.allSatisfy(\.isASCII), let v = UInt8(o) else { return nil }
            result.append(v)
        }
        return result
    }

    static func parseIPv6(_ s: Substring) -> [UInt8]? {
        guard s.contains(":") else { return nil }
        let halves = s.components(separatedBy: "::")
        guard halves.count <= 2 else { return nil }
        func groups(_ part: String) -> [UInt16]? {
            if part.isEmpty { return [] }
            var out: [UInt16] = []
            for g in part.split(separator: ":", omittingEmptySubsequences: false) {
                guard !g.isEmpty, g.count <= 4, let v = UInt16(g, radix: 16) else { return nil }
                out.append(v)
            }
            return out
        }
        guard let head = groups(halves[0]) else { return nil }
        var all = head
        if halves.count == 2 {
            guard let tail = groups(halves[1]), head.count + tail.count < 8 else { return nil }
            all += Array(repeating: 0, count: 8 - head.count - tail.count) + tail
        }
        guard all.count == 8 else { return nil }
        return all.flatMap { [UInt8($0 >> 8), UInt8($0 & 0xFF)] }
    }

    static func formatIPv6(_ bytes: [UInt8]) -> String {
        let groups = stride(from: 0, to: 16, by: 2).map { UInt16(bytes[$0]) << 8 | UInt16(bytes[$0 + 1]) }
        // Longest run of zero groups (length ≥ 2) becomes "::".
        var best = (start: -1, length: 0)
        var i = 0
        while i < 8 {
            if groups[i] == 0 {
                var j = i
                while j < 8 && groups[j] == 0 { j += 1 }
                if j - i > best.length && j - i >= 2 { best = (i, j - i) }
                i = j
            } else {
                i += 1
            }
        }
        func hex(_ g: ArraySlice<UInt16>) -> String { g.map { String($0, radix: 16) }.joined(separator: ":") }
        if best.start < 0 { return hex(groups[...]) }
        return hex(groups[..<best.start]) + "::" + hex(groups[(best.start + best.length)...])
    }
}

extension Substring {
    fileprivate func components(separatedBy separator: String) -> [String] {
        var result: [String] = []
        var rest = self[...]
        while let range = rest.firstRange(of: separator) {
            result.append(String(rest[..<range.lowerBound]))
            rest = rest[range.upperBound...]
        }
        result.append(String(rest))
        return result
    }
}
