import Foundation

/// Installs, checks and removes Trellis's rules with `iptables-restore`/`iptables-save` of the
/// host's back end. Every change is one `iptables-restore --noflush` transaction per family: it
/// applies whole or not at all, and touches nothing that is not Trellis's.
public struct Capture: Sendable {
    public let backend: IPTablesBackend
    public let runner: CommandRunner

    public init(backend: IPTablesBackend, runner: CommandRunner = CommandRunner()) {
        self.backend = backend
        self.runner = runner
    }

    /// What `iptables-save` shows of Trellis now, per family.
    public func state(_ family: RuleSet.Family) throws(IPTablesError) -> IPTablesState {
        let out = try runner.run(backend.save(family), [])
        guard out.status == 0 else {
            throw IPTablesError("\(backend.save(family)) failed (exit \(out.status)): \(out.stderr)")
        }
        return IPTablesState(save: out.stdout)
    }

    /// The transaction that replaces whatever Trellis had in `family` with `ruleSet`'s rules.
    public func applyTransaction(_ ruleSet: RuleSet, family: RuleSet.Family, current: IPTablesState) -> String {
        var out = ""
        let wanted = Dictionary(uniqueKeysWithValues: (ruleSet.tables[family] ?? []).map { ($0.name, $0) })
        for name in Set(wanted.keys).union(current.tables.keys).sorted() {
            let have = current.tables[name] ?? IPTablesState.Table()
            let want = wanted[name]
            if want == nil && have.chains.isEmpty && have.jumps.isEmpty { continue }
            out += "*\(name)\n"
            for jump in have.jumps { out += "-D" + jump.dropFirst(2) + "\n" }
            for chain in want?.chains ?? [] { out += ":\(chain) - [0:0]\n" }
            // Chains Trellis no longer wants (the gate turned off, say): flushed, then deleted.
            let stale = have.chains.filter { !(want?.chains.contains($0) ?? false) }
            for chain in stale { out += "-F \(chain)\n" }
            for chain in stale { out += "-X \(chain)\n" }
            for rule in want?.rules ?? [] { out += rule + "\n" }
            for jump in want?.jumps ?? [] { out += jump + "\n" }
            out += "COMMIT\n"
        }
        return out
    }

    /// The transaction that removes every Trellis rule and chain of `family`, and nothing else.
    public func removeTransaction(current: IPTablesState) -> String {
        var out = ""
        for name in current.tables.keys.sorted() {
            let have = current.tables[name]!
            if have.chains.isEmpty && have.jumps.isEmpty { continue }
            out += "*\(name)\n"
            for jump in have.jumps { out += "-D" + jump.dropFirst(2) + "\n" }
            for chain in have.chains { out += "-F \(chain)\n" }
            for chain in have.chains { out += "-X \(chain)\n" }
            out += "COMMIT\n"
        }
        return out
    }

    /// Installs `ruleSet`, replacing any earlier Trellis rules, atomically per family.
    public func apply(_ ruleSet: RuleSet) throws(IPTablesError) {
        for family in ruleSet.families {
            try restore(applyTransaction(ruleSet, family: family, current: state(family)), family: family)
        }
    }

    /// Removes every Trellis rule and chain (both families), leaving other tools' rules alone.
    public func remove(families: [RuleSet.Family] = RuleSet.Family.allCases) throws(IPTablesError) {
        for family in families {
            let text = removeTransaction(current: try state(family))
            if !text.isEmpty { try restore(text, family: family) }
        }
    }

    /// Differences between the kernel and `ruleSet`; empty when they match.
    public func verify(_ ruleSet: RuleSet) throws(IPTablesError) -> [String] {
        var diffs: [String] = []
        for family in RuleSet.Family.allCases {
            let current = try state(family)
            if ruleSet.tables[family] == nil {
                if !current.isEmpty {
                    diffs.append(
                        "unexpected: [\(family.rawValue)] Trellis rules present but \(family.rawValue) capture is off"
                    )
                }
            } else {
                diffs += current.differences(from: ruleSet, family: family)
            }
        }
        return diffs
    }

    private func restore(_ text: String, family: RuleSet.Family) throws(IPTablesError) {
        let out = try runner.run(backend.restore(family), ["--noflush"], input: text)
        guard out.status == 0 else {
            throw IPTablesError(
                "\(backend.restore(family)) --noflush rejected the transaction (exit \(out.status)); nothing was changed: "
                    + out.stderr.trimmingCharacters(in: .whitespacesAndNewlines)
            )
        }
    }
}
