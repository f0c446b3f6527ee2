import Agent
import ArgumentParser
import Foundation
import Interceptor

/// `trellis-agent rules install|uninstall|verify`: the capture rules, on their own.
struct Rules: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Install, remove or check Trellis's iptables/ip6tables capture rules.",
        discussion: """
            Without --config: capture all inbound TCP except port 22 and Trellis's own ports, and all \
            outbound TCP except loopback, DNS and the agent's own (marked) traffic, through the \
            fail-open gate (NFQUEUE 15000): with no agent reading the queue, nothing is redirected.
            """,
        subcommands: [Install.self, Uninstall.self, Verify.self]
    )

    struct Options: ParsableArguments {
        @Option(help: "An agent.yaml whose `capture:` section configures the rules.")
        var config: String?

        @Flag(help: "Print what would be done; change nothing.")
        var dryRun = false

        func ruleSet() throws -> RuleSet {
            var capture = CaptureConfig.installedDefault
            if let config {
                let text: String
                do {
                    text = try String(contentsOfFile: config, encoding: .utf8)
                } catch {
                    throw AgentCommandError("\(config): cannot read the file (\(error.localizedDescription))")
                }
                do {
                    capture = try CaptureConfigLoader.parse(yaml: text, file: config)
                } catch {
                    throw AgentCommandError("invalid configuration\n\(error)")
                }
            }
            do {
                return try RuleSet(capture)
            } catch {
                throw AgentCommandError("invalid capture configuration\n\(error)")
            }
        }

        func capture() throws -> Capture {
            do {
                return Capture(backend: try IPTablesBackend.detect())
            } catch {
                throw AgentCommandError("\(error)")
            }
        }
    }

    struct Install: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Install (or replace) the rules, atomically per family."
        )
        @OptionGroup var options: Options

        func run() throws {
            let rules = try options.ruleSet()
            let capture = try options.capture()
            if options.dryRun {
                for family in rules.families {
                    let current = try capture.state(family)
                    print("# \(capture.backend.restore(family)) --noflush")
                    print(capture.applyTransaction(rules, family: family, current: current), terminator: "")
                }
                return
            }
            try capture.apply(rules)
            print(
                "installed (\(capture.backend.rawValue) back end, \(rules.families.map(\.rawValue).joined(separator: ", ")))"
            )
        }
    }

    struct Uninstall: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Remove every Trellis rule and chain, and nothing else."
        )
        @OptionGroup var options: Options

        func run() throws {
            let capture = try options.capture()
            if options.dryRun {
                for family in RuleSet.Family.allCases {
                    print("# \(capture.backend.restore(family)) --noflush")
                    print(capture.removeTransaction(current: try capture.state(family)), terminator: "")
                }
                return
            }
            try capture.remove()
            print("removed (\(capture.backend.rawValue) back end)")
        }
    }

    struct Verify: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Compare the kernel's rules with the expected set; list each difference (exit 1 if any)."
        )
        @OptionGroup var options: Options

        func run() throws {
            let rules = try options.ruleSet()
            if options.dryRun {
                for family in rules.families { print(rules.restoreText(family), terminator: "") }
                return
            }
            let differences = try options.capture().verify(rules)
            if differences.isEmpty {
                print("ok: the installed rules match")
            } else {
                for line in differences { print(line) }
                throw ExitCode(1)
            }
        }
    }
}
