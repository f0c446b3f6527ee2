import ArgumentParser
import Pilot

@main
struct TrellisPilot: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "trellis-pilot",
        abstract: "The Trellis control plane (xDS on :\(PilotPorts.xds), HTTP API on :\(PilotPorts.http)).",
        subcommands: [Serve.self, CheckMesh.self]
    )
}
