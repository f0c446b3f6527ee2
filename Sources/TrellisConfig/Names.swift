#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Names Trellis accepts for services, nodes and label keys (what DNS labels and xDS resource
/// names both take), and IP address literals: one rule for pilot's registry, mesh.yaml and
/// agent.yaml.
public enum Names {
    public static func isValidServiceName(_ name: String) -> Bool {
        guard (1...63).contains(name.utf8.count), let first = name.utf8.first, let last = name.utf8.last else {
            return false
        }
        func alnum(_ c: UInt8) -> Bool { (c >= 97 && c <= 122) || (c >= 48 && c <= 57) }
        return alnum(first) && alnum(last) && name.utf8.allSatisfy { alnum($0) || $0 == 45 || $0 == 46 }
    }

    /// Node ids: printable ASCII without spaces or `/`, up to 253 bytes.
    public static func isValidNodeID(_ id: String) -> Bool {
        (1...253).contains(id.utf8.count) && id.utf8.allSatisfy { $0 > 32 && $0 < 127 && $0 != 47 }
    }

    public static func isValidLabelKey(_ key: String) -> Bool {
        (1...63).contains(key.utf8.count)
            && key.utf8.allSatisfy { c in
                (c >= 97 && c <= 122) || (c >= 65 && c <= 90) || (c >= 48 && c <= 57) || c == 45 || c == 95
                    || c == 46 || c == 47
            }
    }

    /// An IPv4 or IPv6 address literal (instances are addressed by IP; no DNS names). Checked on
    /// its whole byte content: `inet_pton` stops at a NUL, so "10.0.0.1\0junk" would pass it.
    public static func isIPAddress(_ text: String) -> Bool {
        guard (2...45).contains(text.utf8.count), text.utf8.allSatisfy({ $0 > 32 && $0 < 127 }) else { return false }
        var buffer = (UInt64(0), UInt64(0))
        return withUnsafeMutableBytes(of: &buffer) { raw in
            inet_pton(text.contains(":") ? AF_INET6 : AF_INET, text, raw.baseAddress) == 1
        }
    }
}
