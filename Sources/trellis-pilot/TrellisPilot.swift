import ArgumentParser
import Pilot
import TrellisConfig

@main
struct TrellisPilot: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "trellis-pilot",
        abstract: "The Trellis control plane (xDS on :\(PilotPorts.xds), HTTP API on :\(PilotPorts.http)).",
        version: TrellisVersion.current,
        subcommands: [Serve.self, CheckMesh.self]
    )
}
