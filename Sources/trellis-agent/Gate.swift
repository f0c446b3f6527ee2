import ArgumentParser
import Foundation
import Interceptor

#if canImport(Glibc)
import Glibc
#endif

/// `trellis-agent gate`: the NFQUEUE gate reader alone, in the foreground (for tests, benchmarks
/// and diagnosis; `trellis-agent run` will embed it).
struct Gate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the NFQUEUE gate reader in the foreground until SIGINT/SIGTERM.",
        discussion: "Install rules with a `gate:` section first (trellis-agent rules install --config FILE)."
    )

    @Option(help: "The NFQUEUE number of the rules' gate.")
    var queue: Int = CaptureConfig.Gate().queue

    @Option(help: "The mark set on captured SYNs (hex like 0x1, or decimal).")
    var mark: String = "0x1"

    @Option(help: "capture: new connections enter the proxy; bypass: they go direct.")
    var mode: String = "capture"

    func run() throws {
        let markValue = mark.hasPrefix("0x") ? UInt32(mark.dropFirst(2), radix: 16) : UInt32(mark)
        guard let markValue, markValue != 0 else {
            throw ValidationError("--mark: expected a non-zero 32-bit mark such as 0x1, got '\(mark)'")
        }
        guard (0...65535).contains(queue) else { throw ValidationError("--queue: expected 0...65535, got \(queue)") }
        let chosen: NetfilterQueueGate.Mode
        switch mode {
        case "capture": chosen = .capture
        case "bypass": chosen = .bypass
        default: throw ValidationError("--mode: expected capture or bypass, got '\(mode)'")
        }
        let gate: NetfilterQueueGate
        do {
            gate = try NetfilterQueueGate(queue: queue, mark: markValue)
        } catch {
            throw AgentCommandError("\(error)")
        }
        gate.setMode(chosen)
        // Blocked before the reader thread starts, so that it inherits the mask and SIGTERM is
        // taken here by sigwait.
        var signals = sigset_t()
        sigemptyset(&signals)
        sigaddset(&signals, SIGINT)
        sigaddset(&signals, SIGTERM)
        pthread_sigmask(SIG_BLOCK, &signals, nil)
        gate.start()
        print("gate: reading queue \(queue) (\(mode))")
        fflush(nil)
        var received: Int32 = 0
        sigwait(&signals, &received)
        gate.stop()
        let c = gate.counters
        print("gate: gated \(c.gated), captured \(c.captured), bypassed \(c.bypassed), overflows \(c.overflows)")
    }
}
