/// What `iptables-save` shows of Trellis in one family: its chains, their rules, and the jumps to
/// them from built-in chains, per table.
public struct IPTablesState: Sendable, Hashable {
    public struct Table: Sendable, Hashable {
        public var chains: [String] = []
        public var jumps: [String] = []
        public var rules: [String] = []
    }

    public var tables: [String: Table] = [:]

    public var isEmpty: Bool { tables.values.allSatisfy { $0.chains.isEmpty && $0.jumps.isEmpty && $0.rules.isEmpty } }

    /// Parses `iptables-save` output, keeping only what belongs to Trellis.
    public init(save: String) {
        var table = ""
        for raw in save.split(separator: "\n") {
            let line = String(raw)
            if line.hasPrefix("*") {
                table = String(line.dropFirst())
            } else if line.hasPrefix(":" + RuleSet.chainPrefix) {
                let name = line.dropFirst().split(separator: " ").first.map(String.init) ?? ""
                tables[table, default: Table()].chains.append(name)
            } else if line.hasPrefix("-A ") {
                let parts = line.split(separator: " ")
                guard parts.count > 1 else { continue }
                if parts[1].hasPrefix(RuleSet.chainPrefix) {
                    tables[table, default: Table()].rules.append(line)
                } else if line.contains(" -j \(RuleSet.chainPrefix)") {
                    tables[table, default: Table()].jumps.append(line)
                }
            }
        }
    }

    /// Differences from what `ruleSet` expects for `family`, one line each (`missing: …`,
    /// `unexpected: …`); empty when they match exactly, rule order included.
    public func differences(from ruleSet: RuleSet, family: RuleSet.Family) -> [String] {
        var diffs: [String] = []
        var expectedTables: [String: RuleSet.Table] = [:]
        for t in ruleSet.tables[family] ?? [] { expectedTables[t.name] = t }
        for name in Set(expectedTables.keys).union(tables.keys).sorted() {
            let want = expectedTables[name]
            let have = tables[name] ?? Table()
            let wantChains = Set(want?.chains ?? [])
            for chain in (want?.chains ?? []) where !have.chains.contains(chain) {
                diffs.append("missing: [\(family.rawValue) \(name)] chain \(chain)")
            }
            for chain in have.chains where !wantChains.contains(chain) {
                diffs.append("unexpected: [\(family.rawValue) \(name)] chain \(chain)")
            }
            diffs += Self.compare(want?.jumps ?? [], have.jumps, label: "[\(family.rawValue) \(name)]")
            diffs += Self.compare(want?.rules ?? [], have.rules, label: "[\(family.rawValue) \(name)]")
        }
        return diffs
    }

    /// Compares rule lists; order matters within a chain (`iptables-save` lists chains one after
    /// another, so order across chains does not).
    private static func compare(_ want: [String], _ have: [String], label: String) -> [String] {
        var diffs: [String] = []
        for rule in want where !have.contains(rule) { diffs.append("missing: \(label) \(rule)") }
        for rule in have where !want.contains(rule) { diffs.append("unexpected: \(label) \(rule)") }
        if diffs.isEmpty {
            func byChain(_ rules: [String]) -> [String: [String]] {
                Dictionary(grouping: rules) { $0.split(separator: " ").dropFirst().first.map(String.init) ?? "" }
            }
            let wantByChain = byChain(want)
            let haveByChain = byChain(have)
            for chain in wantByChain.keys.sorted() where wantByChain[chain] != haveByChain[chain] {
                diffs.append("order: \(label) the rules of \(chain) are present but in another order")
            }
        }
        return diffs
    }
}
