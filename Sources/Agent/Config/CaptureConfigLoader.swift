public import Interceptor
public import TrellisConfig
import Yams

/// Reads the `capture:` section of agent.yaml into a ``CaptureConfig``. Keys (all optional; the
/// defaults are ``CaptureConfig``'s):
///
/// ```yaml
/// capture:
///   inbound_ports: "*"              # or a list: [8080, 9090]
///   inbound_exclude_ports: [22]     # with "*": ports never captured inbound
///   outbound_include_cidrs: []      # empty: every destination
///   outbound_exclude_cidrs: [169.254.169.254/32]
///   exclude_ports: []               # never captured, either way
///   capture_loopback: false
///   agent_mark: 0x1000
///   agent_uid: 990                  # the uid/gid the agent runs as
///   agent_gid: 990
///   ipv4: true
///   ipv6: true
///   gate: {queue: 15000, mark: 0x1} # the default (fail-open); `gate: off` redirects without it
/// ```
///
/// A missing section, or a missing `gate:`, means the fail-open gate on
/// (``CaptureConfig/installedDefault``).
public enum CaptureConfigLoader {
    /// The `capture:` section of a whole agent.yaml (which is checked whole: a file the agent
    /// would refuse is refused here too).
    public static func parse(yaml: String, file: String) throws(ConfigFileErrors) -> CaptureConfig {
        try AgentConfigLoader.parse(yaml: yaml, file: file).capture
    }

    static func load(_ node: ConfigNode) throws(ConfigFileError) -> CaptureConfig {
        let keys = try node.mapping(allowed: [
            "inbound_ports", "inbound_exclude_ports", "outbound_include_cidrs", "outbound_exclude_cidrs",
            "exclude_ports", "capture_loopback", "agent_mark", "agent_uid", "agent_gid", "ipv4", "ipv6", "gate",
        ])
        var c = CaptureConfig.installedDefault
        func ports(_ n: ConfigNode) throws(ConfigFileError) -> [Int] {
            var out: [Int] = []
            for item in try n.sequence() { out.append(try item.int(in: 1...65535)) }
            return out
        }
        func cidrs(_ n: ConfigNode) throws(ConfigFileError) -> [CIDR] {
            var out: [CIDR] = []
            for item in try n.sequence() {
                do {
                    out.append(try CIDR(try item.nonEmptyString()))
                } catch let e as CaptureConfigError {
                    throw item.error(e.message)
                } catch let e as ConfigFileError {
                    throw e
                } catch {
                    throw item.error("\(error)")
                }
            }
            return out
        }
        let exclude = try keys["inbound_exclude_ports"].map(ports) ?? [22]
        if let inbound = keys["inbound_ports"] {
            if case .scalar(_) = inbound.node {
                guard try inbound.string() == "*" else { throw inbound.error("expected \"*\" or a list of ports") }
                c.inbound = .all(except: exclude)
            } else {
                if keys["inbound_exclude_ports"] != nil {
                    throw keys["inbound_exclude_ports"]!.error("only meaningful with inbound_ports: \"*\"")
                }
                c.inbound = .only(try ports(inbound))
            }
        } else {
            c.inbound = .all(except: exclude)
        }
        if let n = keys["outbound_include_cidrs"] { c.outboundIncludeCIDRs = try cidrs(n) }
        if let n = keys["outbound_exclude_cidrs"] { c.outboundExcludeCIDRs = try cidrs(n) }
        if let n = keys["exclude_ports"] { c.excludedPorts = try ports(n) }
        if let n = keys["capture_loopback"] { c.captureLoopback = try n.bool() }
        if let n = keys["agent_mark"] { c.agentMark = try n.mark() }
        if let n = keys["agent_uid"] { c.agentUID = try n.int(in: 0...4_294_967_294) }
        if let n = keys["agent_gid"] { c.agentGID = try n.int(in: 0...4_294_967_294) }
        if let n = keys["ipv4"] { c.ipv4 = try n.bool() }
        if let n = keys["ipv6"] { c.ipv6 = try n.bool() }
        if let n = keys["gate"], case .scalar = n.node {
            switch try n.nonEmptyString() {
            case "on", "true": c.gate = CaptureConfig.Gate()
            case "off", "false": c.gate = nil
            case let other:
                throw n.error("expected a mapping {queue, mark}, on or off, got '\(other)'")
            }
        } else if let n = keys["gate"] {
            let g = try n.mapping(allowed: ["queue", "mark"])
            var gate = CaptureConfig.Gate()
            if let q = g["queue"] { gate.queue = try q.int(in: 0...65535) }
            if let m = g["mark"] { gate.mark = try m.mark() }
            c.gate = gate
        }
        return c
    }
}
