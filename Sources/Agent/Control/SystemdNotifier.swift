import FoundationEssentials

#if canImport(Glibc)
import Glibc
#endif

/// `sd_notify(3)` without libsystemd: one datagram to `$NOTIFY_SOCKET` (a path, or an abstract
/// name when it starts with `@`). The agent says `READY=1` once its listeners, rules and gate are
/// up (so `systemctl start` returns only when traffic is being captured) and `STOPPING=1` when it
/// starts draining. Does nothing when not started by systemd with `Type=notify`.
public enum SystemdNotifier {
    @discardableResult
    public static func notify(_ state: String) -> Bool {
        guard let path = ProcessInfo.processInfo.environment["NOTIFY_SOCKET"], !path.isEmpty else { return false }
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        var bytes = Array(path.utf8)
        if bytes.first == UInt8(ascii: "@") { bytes[0] = 0 }
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard bytes.count < capacity else { return false }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, byte) in bytes.enumerated() { raw[i] = byte }
        }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count + (bytes.first == 0 ? 0 : 1))
        let sent = state.utf8CString.withUnsafeBufferPointer { message in
            withUnsafePointer(to: &address) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                    sendto(fd, message.baseAddress, message.count - 1, Int32(MSG_NOSIGNAL), sa, length)
                }
            }
        }
        return sent >= 0
    }
}
