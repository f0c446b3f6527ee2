/// What the agent captures. The defaults capture all inbound TCP except SSH and Trellis's own
/// ports, and all outbound TCP except loopback, DNS and the agent's own traffic.
public struct CaptureConfig: Sendable, Hashable {
    public enum InboundPorts: Sendable, Hashable {
        /// Every TCP port except the listed ones (and, always, Trellis's own ports).
        case all(except: [Int])
        /// Only these TCP ports.
        case only([Int])
    }

    /// How the NFQUEUE gate is wired in (see docs/architecture.md, "The capture path").
    public struct Gate: Sendable, Hashable {
        /// The NFQUEUE number the SYNs of capturable connections are sent to.
        public var queue: Int
        /// The mark (and mask) the gate reader sets on SYNs it lets into the proxy.
        public var mark: UInt32

        public init(queue: Int = 15000, mark: UInt32 = 0x1) {
            self.queue = queue
            self.mark = mark
        }
    }

    public var inbound: InboundPorts
    /// Outbound destinations captured; empty means all.
    public var outboundIncludeCIDRs: [CIDR]
    /// Outbound destinations never captured.
    public var outboundExcludeCIDRs: [CIDR]
    /// Destination ports never captured, outbound and inbound.
    public var excludedPorts: [Int]
    /// Capture connections to loopback addresses too (off by default).
    public var captureLoopback: Bool
    /// The agent's own sockets carry this mark; such traffic is never captured.
    public var agentMark: UInt32
    /// The agent's uid and gid; traffic of processes running as them is never captured.
    public var agentUID: Int?
    public var agentGID: Int?
    public var outboundPort: Int
    public var inboundPort: Int
    /// Ports that must never be captured: the agent's and pilot's (admin 15000, capture 15001
    /// and 15006, pilot 15010 and 15014).
    public var trellisPorts: [Int]
    public var ipv4: Bool
    public var ipv6: Bool
    /// `nil`: the nat rules redirect unconditionally. Set: only SYNs the gate reader marked.
    public var gate: Gate?

    public static let defaultTrellisPorts = [15000, 15001, 15006, 15010, 15014]

    /// What agent.yaml and `trellis-agent rules` mean when they say nothing: the defaults above
    /// with the fail-open gate on (queue 15000, mark 0x1), so that an agent that stops, crashes or
    /// is killed never leaves the machine's connections redirected to nothing. (The memberwise
    /// default has no gate: it is the model, and tests build exact rule sets from it.)
    public static var installedDefault: CaptureConfig { CaptureConfig(gate: Gate()) }

    public init(
        inbound: InboundPorts = .all(except: [22]),
        outboundIncludeCIDRs: [CIDR] = [],
        outboundExcludeCIDRs: [CIDR] = [],
        excludedPorts: [Int] = [],
        captureLoopback: Bool = false,
        agentMark: UInt32 = 0x1000,
        agentUID: Int? = nil,
        agentGID: Int? = nil,
        outboundPort: Int = 15001,
        inboundPort: Int = 15006,
        trellisPorts: [Int] = CaptureConfig.defaultTrellisPorts,
        ipv4: Bool = true,
        ipv6: Bool = true,
        gate: Gate? = nil
    ) {
        self.inbound = inbound
        self.outboundIncludeCIDRs = outboundIncludeCIDRs
        self.outboundExcludeCIDRs = outboundExcludeCIDRs
        self.excludedPorts = excludedPorts
        self.captureLoopback = captureLoopback
        self.agentMark = agentMark
        self.agentUID = agentUID
        self.agentGID = agentGID
        self.outboundPort = outboundPort
        self.inboundPort = inboundPort
        self.trellisPorts = trellisPorts
        self.ipv4 = ipv4
        self.ipv6 = ipv6
        self.gate = gate
    }

    /// Every problem that makes this configuration unsafe or meaningless.
    public func validationErrors() -> [CaptureConfigError] {
        var errors: [CaptureConfigError] = []
        func fail(_ path: String, _ message: String) { errors.append(.init(path: path, message: message)) }
        func checkPorts(_ ports: [Int], _ path: String) {
            var seen = Set<Int>()
            for (i, p) in ports.enumerated() {
                if !(1...65535).contains(p) { fail("\(path)[\(i)]", "expected a port in 1...65535, got \(p)") }
                if !seen.insert(p).inserted { fail("\(path)[\(i)]", "port \(p) is listed twice") }
            }
        }
        switch inbound {
        case .all(let except):
            checkPorts(except, "inbound_exclude_ports")
        case .only(let ports):
            checkPorts(ports, "inbound_ports")
            for (i, p) in ports.enumerated() where trellisPorts.contains(p) {
                fail("inbound_ports[\(i)]", "port \(p) is Trellis's own (\(trellisPorts)); capturing it would loop")
            }
            if ports.isEmpty { fail("inbound_ports", "expected at least one port, or '*'") }
        }
        checkPorts(excludedPorts, "exclude_ports")
        for (name, port) in [("outbound_port", outboundPort), ("inbound_port", inboundPort)] {
            if !(1...65535).contains(port) { fail(name, "expected a port in 1...65535, got \(port)") }
        }
        if outboundPort == inboundPort { fail("inbound_port", "must differ from outbound_port (\(outboundPort))") }
        for (list, path) in [
            (outboundIncludeCIDRs, "outbound_include_cidrs"), (outboundExcludeCIDRs, "outbound_exclude_cidrs"),
        ] {
            for i in list.indices {
                for j in list.indices where j > i && list[i].overlaps(list[j]) {
                    fail("\(path)[\(j)]", "\(list[j]) overlaps \(list[i]) (\(path)[\(i)])")
                }
            }
        }
        for (i, cidr) in outboundIncludeCIDRs.enumerated() where cidr.prefix == 0 {
            fail("outbound_include_cidrs[\(i)]", "\(cidr) is everything; leave the list empty to capture all")
        }
        if agentMark == 0 { fail("agent_mark", "expected a non-zero mark") }
        if let gate {
            if !(0...65535).contains(gate.queue) { fail("gate.queue", "expected 0...65535, got \(gate.queue)") }
            if gate.mark == 0 { fail("gate.mark", "expected a non-zero mark") }
            if gate.mark & agentMark != 0 {
                fail(
                    "gate.mark",
                    "0x\(String(gate.mark, radix: 16)) shares bits with agent_mark 0x\(String(agentMark, radix: 16))"
                )
            }
        }
        if let uid = agentUID, uid < 0 { fail("agent_uid", "expected 0 or more, got \(uid)") }
        if let gid = agentGID, gid < 0 { fail("agent_gid", "expected 0 or more, got \(gid)") }
        if !ipv4 && !ipv6 { fail("ipv4", "at least one of ipv4 and ipv6 must be on") }
        return errors
    }
}
