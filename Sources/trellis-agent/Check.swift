import Agent
import ArgumentParser
import Foundation
import Interceptor

/// `trellis-agent check --config FILE`: the whole agent.yaml validated as `run` and a reload
/// would, without touching iptables, pilot or any port.
struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Validate an agent.yaml (every section) without installing or changing anything.",
        discussion: "Exit status 0 when the file would start an agent, 1 with every error (file:line: key path)."
    )

    @Option(help: "The agent configuration to check.")
    var config = "/etc/trellis/agent.yaml"

    func run() throws {
        let agent = try Run.load(config)
        let rules: RuleSet
        do {
            rules = try RuleSet(agent.capture)
        } catch {
            throw AgentCommandError("\(config): invalid capture configuration\n\(error)")
        }
        let gate = agent.capture.gate.map { "gate on (NFQUEUE \($0.queue), fail-open)" } ?? "gate off"
        let pilot =
            agent.pilotXDS.isEmpty
            ? "no pilot xDS (passthrough)" : "xDS from \(agent.pilotXDS.map(\.description).joined(separator: " or "))"
        print(
            "\(config): ok — \(agent.services.count) services, \(pilot), capture "
                + rules.families.map(\.rawValue).joined(separator: "+") + ", \(gate), admin \(agent.adminAddress)"
        )
    }
}
