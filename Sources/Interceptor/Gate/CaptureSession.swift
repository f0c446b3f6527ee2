import Foundation
public import Logging

/// The capture rules and the NFQUEUE gate of one running agent, from the moment they are
/// installed (after the listeners are bound) to the moment they are removed: replaced as a whole
/// on reload, the gate bypassing while draining, and every rule gone on the way out.
///
/// Ordering keeps the machine reachable at each step: a gate is started before rules that send
/// SYNs to its queue, and stopped only after rules that no longer do (a queue without a reader is
/// bypassed by the kernel). A rule change that the kernel refuses for one family puts the previous
/// rules back, so a reload is applied whole or not at all.
public actor CaptureSession {
    public private(set) var rules: RuleSet
    public nonisolated let capture: Capture
    private var gate: NetfilterQueueGate?
    private var mode: NetfilterQueueGate.Mode = .capture
    private var installed = false
    private let makeGate: @Sendable (CaptureConfig.Gate) throws -> NetfilterQueueGate
    private let logger: Logger

    public init(
        capture: Capture,
        rules: RuleSet,
        logger: Logger,
        makeGate: @escaping @Sendable (CaptureConfig.Gate) throws -> NetfilterQueueGate = {
            try NetfilterQueueGate(queue: $0.queue, mark: $0.mark)
        }
    ) {
        self.capture = capture
        self.rules = rules
        self.logger = logger
        self.makeGate = makeGate
    }

    /// Installs the rules and starts the gate (when configured). A gate that cannot start is
    /// logged and left out: its queue has no reader, so the kernel lets connections through
    /// directly (fail open). Returns whether a gate runs.
    @discardableResult
    public func install() throws(IPTablesError) -> Bool {
        if let settings = rules.config.gate { gate = startGate(settings) }
        do {
            try capture.apply(rules)
        } catch {
            gate?.stop()
            gate = nil
            throw error
        }
        installed = true
        return gate != nil
    }

    /// Replaces the rules with `new` (one `iptables-restore` transaction per family) and the gate
    /// when its queue or mark changed. Returns what changed, empty when nothing did.
    public func reload(to new: RuleSet) throws(IPTablesError) -> [String] {
        guard new != rules else { return [] }
        var changes: [String] = []
        let old = rules
        let oldGate = old.config.gate
        let newGate = new.config.gate
        let gateChanged = oldGate != newGate
        var started: NetfilterQueueGate?
        if gateChanged, let settings = newGate {
            if let running = gate, oldGate?.queue == settings.queue {
                // One reader per queue: the old one goes first (its queue bypasses meanwhile).
                running.stop()
                gate = nil
            }
            started = startGate(settings)
        }
        if installed {
            do {
                try capture.apply(new)
            } catch {
                started?.stop()
                if started != nil, let settings = oldGate, gate == nil { gate = startGate(settings) }
                // A family may have been changed before another refused: put the old rules back.
                try? capture.apply(old)
                throw error
            }
        }
        if gateChanged {
            if let running = gate, running !== started { running.stop() }
            gate = started
            changes.append(
                "gate: " + (oldGate.map(Self.describe) ?? "off") + " -> " + (newGate.map(Self.describe) ?? "off")
            )
        }
        if old.families != new.families || old.tables != new.tables {
            changes.append("capture rules replaced (" + new.families.map(\.rawValue).joined(separator: ", ") + ")")
        }
        rules = new
        return changes
    }

    /// `.bypass` while draining: new connections go straight to their destination.
    public func setMode(_ mode: NetfilterQueueGate.Mode) {
        self.mode = mode
        gate?.setMode(mode)
    }

    public var gateCounters: NetfilterQueueGate.Counters? { gate?.counters }
    public var gateRunning: Bool { gate != nil }

    /// New connections bypass, then every Trellis rule goes (unless `keepRules`), then the gate
    /// stops.
    public func remove(keepRules: Bool) {
        gate?.setMode(.bypass)
        if installed && !keepRules {
            do {
                try capture.remove()
                logger.info("capture rules removed")
            } catch {
                logger.error("removing the capture rules failed", metadata: ["error": "\(error)"])
            }
        } else if keepRules {
            logger.info("capture rules kept (--keep-rules)")
        }
        installed = false
        gate?.stop()
        gate = nil
    }

    /// Differences between the kernel and the rules this session installed.
    public func verify() -> (rules: String, differences: [String]) {
        do {
            let differences = try capture.verify(rules)
            return (differences.isEmpty ? "installed" : "differs", differences)
        } catch {
            return ("unknown: \(error)", [])
        }
    }

    private func startGate(_ settings: CaptureConfig.Gate) -> NetfilterQueueGate? {
        do {
            let g = try makeGate(settings)
            g.setMode(mode)
            g.start()
            return g
        } catch {
            logger.error(
                "the NFQUEUE gate could not start; new connections bypass the proxy",
                metadata: ["error": "\(error)", "gate.queue": "\(settings.queue)"]
            )
            return nil
        }
    }

    private static func describe(_ gate: CaptureConfig.Gate) -> String {
        "queue \(gate.queue) mark 0x\(String(gate.mark, radix: 16))"
    }
}
