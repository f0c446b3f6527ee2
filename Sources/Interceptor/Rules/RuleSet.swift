/// The exact rules Trellis puts in the kernel for one capture configuration, per address family,
/// in `iptables-restore` form and in the canonical form `iptables-save` prints them (so that
/// `verify` can compare line by line).
///
/// Chains: `TRELLIS_INBOUND` (nat PREROUTING) selects inbound connections for
/// `TRELLIS_IN_REDIRECT` (→ 15006); `TRELLIS_OUTPUT` (nat OUTPUT) selects outbound ones for
/// `TRELLIS_REDIRECT` (→ 15001). With the gate on, `TRELLIS_GATE_IN`/`TRELLIS_GATE_OUT` (mangle)
/// send the SYNs of the same selection to NFQUEUE with `--queue-bypass`, and the REDIRECT rules
/// match only SYNs the gate reader marked. Each chain is entered from its built-in chain by one
/// rule.
public struct RuleSet: Sendable, Hashable {
    public enum Family: String, Sendable, Hashable, CaseIterable {
        case ipv4
        case ipv6
    }

    /// One table's share of the rule set.
    public struct Table: Sendable, Hashable {
        public var name: String
        /// Trellis's chains in this table.
        public var chains: [String]
        /// Rules appended to built-in chains (`-A OUTPUT -p tcp -j TRELLIS_OUTPUT`).
        public var jumps: [String]
        /// Rules of Trellis's own chains.
        public var rules: [String]
    }

    public static let chainPrefix = "TRELLIS_"

    public let config: CaptureConfig
    public private(set) var tables: [Family: [Table]] = [:]

    public init(_ config: CaptureConfig) throws(CaptureConfigErrors) {
        let errors = config.validationErrors()
        guard errors.isEmpty else { throw CaptureConfigErrors(errors: errors) }
        self.config = config
        for family in Family.allCases where family == .ipv4 ? config.ipv4 : config.ipv6 {
            tables[family] = Self.build(config, family)
        }
    }

    public var families: [Family] { Family.allCases.filter { tables[$0] != nil } }

    /// The `iptables-restore --noflush` text that installs the rules into a table set that has no
    /// Trellis rules yet.
    public func restoreText(_ family: Family) -> String {
        var out = ""
        for table in tables[family] ?? [] {
            out += "*\(table.name)\n"
            for chain in table.chains { out += ":\(chain) - [0:0]\n" }
            for rule in table.rules { out += rule + "\n" }
            for jump in table.jumps { out += jump + "\n" }
            out += "COMMIT\n"
        }
        return out
    }

    // MARK: Building

    private static func build(_ c: CaptureConfig, _ family: Family) -> [Table] {
        let redirectMark = c.gate.map { " -m mark --mark \(hex($0.mark))/\(hex($0.mark))" } ?? ""
        var nat = Table(
            name: "nat",
            chains: ["TRELLIS_INBOUND", "TRELLIS_IN_REDIRECT", "TRELLIS_OUTPUT", "TRELLIS_REDIRECT"],
            jumps: ["-A PREROUTING -p tcp -j TRELLIS_INBOUND", "-A OUTPUT -p tcp -j TRELLIS_OUTPUT"],
            rules: [
                "-A TRELLIS_IN_REDIRECT -p tcp\(redirectMark) -j REDIRECT --to-ports \(c.inboundPort)",
                "-A TRELLIS_REDIRECT -p tcp\(redirectMark) -j REDIRECT --to-ports \(c.outboundPort)",
            ]
        )
        nat.rules += inboundSelection(c, chain: "TRELLIS_INBOUND", capture: .jump("TRELLIS_IN_REDIRECT"))
        nat.rules += outboundSelection(c, family, chain: "TRELLIS_OUTPUT", capture: .jump("TRELLIS_REDIRECT"))
        guard let gate = c.gate else { return [nat] }
        var mangle = Table(
            name: "mangle",
            chains: ["TRELLIS_GATE_IN", "TRELLIS_GATE_OUT"],
            // Only SYNs enter the gate chains: mangle is consulted for every packet, and the
            // rest of a connection has nothing to decide.
            jumps: [
                "-A PREROUTING -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j TRELLIS_GATE_IN",
                "-A OUTPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j TRELLIS_GATE_OUT",
            ],
            rules: []
        )
        mangle.rules += inboundSelection(c, chain: "TRELLIS_GATE_IN", capture: .queue(gate.queue))
        mangle.rules += outboundSelection(c, family, chain: "TRELLIS_GATE_OUT", capture: .queue(gate.queue))
        return [mangle, nat]
    }

    private enum Capture {
        case jump(String)
        case queue(Int)
    }

    /// The match and target of a capturing rule, given the rule's own match (`-d …`, `--dport …`).
    private static func captureRule(chain: String, destination: String?, port: Int?, _ capture: Capture) -> String {
        var rule = "-A \(chain)"
        if let destination { rule += " -d \(destination)" }
        switch capture {
        case .jump(let target):
            rule += " -p tcp"
            if let port { rule += " -m tcp --dport \(port)" }
            rule += " -j \(target)"
        case .queue(let number):
            rule += " -p tcp -m tcp"
            if let port { rule += " --dport \(port)" }
            rule += " --tcp-flags FIN,SYN,RST,ACK SYN -j NFQUEUE --queue-num \(number) --queue-bypass"
        }
        return rule
    }

    private static func inboundSelection(_ c: CaptureConfig, chain: String, capture: Capture) -> [String] {
        var rules: [String] = []
        switch c.inbound {
        case .all(let except):
            for port in unique(c.trellisPorts + except + c.excludedPorts) {
                rules.append("-A \(chain) -p tcp -m tcp --dport \(port) -j RETURN")
            }
            rules.append(captureRule(chain: chain, destination: nil, port: nil, capture))
        case .only(let ports):
            let excluded = Set(c.excludedPorts)
            for port in unique(ports) where !excluded.contains(port) {
                rules.append(captureRule(chain: chain, destination: nil, port: port, capture))
            }
        }
        return rules
    }

    private static func outboundSelection(
        _ c: CaptureConfig,
        _ family: Family,
        chain: String,
        capture: Capture
    ) -> [String] {
        var rules = ["-A \(chain) -m mark --mark \(hex(c.agentMark)) -j RETURN"]
        if let uid = c.agentUID { rules.append("-A \(chain) -m owner --uid-owner \(uid) -j RETURN") }
        if let gid = c.agentGID { rules.append("-A \(chain) -m owner --gid-owner \(gid) -j RETURN") }
        if !c.captureLoopback {
            rules.append("-A \(chain) -o lo -j RETURN")
            rules.append("-A \(chain) -d \(family == .ipv4 ? "127.0.0.0/8" : "::1/128") -j RETURN")
        }
        for port in unique([53] + c.trellisPorts + c.excludedPorts) {
            rules.append("-A \(chain) -p tcp -m tcp --dport \(port) -j RETURN")
        }
        let cidrFamily: CIDR.Family = family == .ipv4 ? .ipv4 : .ipv6
        for cidr in c.outboundExcludeCIDRs where cidr.family == cidrFamily {
            rules.append("-A \(chain) -d \(cidr) -j RETURN")
        }
        let includes = c.outboundIncludeCIDRs.filter { $0.family == cidrFamily }
        if c.outboundIncludeCIDRs.isEmpty {
            rules.append(captureRule(chain: chain, destination: nil, port: nil, capture))
        } else {
            for cidr in includes { rules.append(captureRule(chain: chain, destination: "\(cidr)", port: nil, capture)) }
        }
        return rules
    }

    private static func unique(_ ports: [Int]) -> [Int] {
        var seen = Set<Int>()
        return ports.filter { seen.insert($0).inserted }
    }

    static func hex(_ value: UInt32) -> String { "0x" + String(value, radix: 16) }
}

/// Every problem found in one capture configuration.
public struct CaptureConfigErrors: Error, Sendable, CustomStringConvertible {
    public var errors: [CaptureConfigError]
    public init(errors: [CaptureConfigError]) { self.errors = errors }
    public var description: String { errors.map(\.description).joined(separator: "\n") }
}
