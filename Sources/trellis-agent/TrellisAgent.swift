import ArgumentParser
import TrellisConfig

@main
struct TrellisAgent: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "trellis-agent",
        abstract: "The Trellis node agent: captures a machine's traffic and runs it through the mesh proxy.",
        version: TrellisVersion.current,
        subcommands: [
            Run.self, Check.self, Reload.self, Drain.self, Undrain.self, Status.self, Gateway.self, Rules.self,
            Gate.self,
        ]
    )
}
