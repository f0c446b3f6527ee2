import ArgumentParser
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// `--log-file`: standard output and error appended to a file, reopened on SIGUSR1 so that
/// logrotate can move the file away (init/trellis-agent.logrotate).
enum LogFile {
    static func redirect(to path: String) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o640)
        guard fd >= 0 else {
            throw AgentCommandError("--log-file \(path): cannot open it (\(String(cString: strerror(errno))))")
        }
        fflush(nil)  // every output stream, before the descriptors underneath change
        _ = dup2(fd, STDOUT_FILENO)
        _ = dup2(fd, STDERR_FILENO)
        close(fd)
    }
}
