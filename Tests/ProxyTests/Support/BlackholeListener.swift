import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#endif

/// A loopback TCP socket that listens with a backlog of 0 and never accepts: once its accept queue
/// is full, the kernel drops new SYNs, so connecting to it hangs until the client gives up. With
/// `listening: false` it is only bound: connecting to it is refused at once, and no other socket
/// (a later test server on port 0) can take its port while it lives, unlike a stopped server's.
final class BlackholeListener: Sendable {
    let fd: Int32
    let port: Int

    init(listening: Bool = true) throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw IOError(errnoCode: errno, reason: "socket") }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = 0
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard bound == 0, !listening || listen(fd, 0) == 0 else {
            Glibc.close(fd)
            throw IOError(errnoCode: errno, reason: "bind/listen")
        }
        var out = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &out) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        self.fd = fd
        self.port = Int(UInt16(bigEndian: out.sin_port))
    }

    /// Opens connections until one no longer completes within 200 ms (at most 8), leaving the
    /// accept queue full.
    func fillAcceptQueue(group: any EventLoopGroup) async throws -> [any Channel] {
        var channels: [any Channel] = []
        for _ in 0..<8 {
            do {
                let channel = try await ClientBootstrap(group: group)
                    .connectTimeout(.milliseconds(200))
                    .connect(host: "127.0.0.1", port: port).get()
                channels.append(channel)
            } catch {
                return channels
            }
        }
        return channels
    }

    func close() {
        Glibc.close(fd)
    }
}
