import Agent
import ArgumentParser
import Foundation
import Interceptor
import Logging
import Metrics
import NIOCore
import NIOPosix
import Prometheus
import Proxy
import ServiceLifecycle
import UnixSignals

/// `trellis-agent run`: the node agent. Binds the capture listeners, then installs the capture
/// rules (and starts the NFQUEUE gate when configured), so that a connection is captured only once
/// the proxy can take it; registers the machine's services with pilot; on SIGTERM stops capturing
/// new connections, deregisters, and removes every rule it installed (unless --keep-rules).
struct Run: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the node agent: capture, proxy (passthrough until pilot configures routes), registration."
    )

    @Option(help: "The agent configuration (see examples/agent.yaml).")
    var config = "/etc/trellis/agent.yaml"

    @Option(help: "Event loops (threads); defaults to the number of cores this process may run on.")
    var eventLoops: Int?

    @Flag(help: "Leave the capture rules installed on exit (the gate, if any, then bypasses).")
    var keepRules = false

    @OptionGroup var logging: LoggingOptions

    func validate() throws {
        if let eventLoops, eventLoops < 1 || eventLoops > 1024 {
            throw ValidationError("--event-loops: expected 1...1024, got \(eventLoops)")
        }
    }

    func run() async throws {
        let logger = try logging.bootstrap(label: "trellis.agent")
        let text: String
        do {
            text = try String(contentsOfFile: config, encoding: .utf8)
        } catch {
            throw ValidationError("\(config): cannot read the file (\(error.localizedDescription))")
        }
        let agent: AgentConfig
        do {
            agent = try AgentConfigLoader.parse(yaml: text, file: config)
        } catch {
            throw ValidationError("invalid configuration (nothing was installed)\n\(error)")
        }
        let rules: RuleSet
        do {
            rules = try RuleSet(agent.capture)
        } catch {
            throw ValidationError("invalid capture configuration (nothing was installed)\n\(error)")
        }
        let capture: Capture
        do {
            capture = Capture(backend: try IPTablesBackend.detect())
        } catch {
            throw ValidationError("\(error)")
        }

        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
        let stats = ProxyStats()
        let group = MultiThreadedEventLoopGroup(numberOfThreads: eventLoops ?? System.coreCount)
        let proxy = try ProxyServer(
            snapshot: try ProxySnapshot(AgentListeners.passthroughConfig(), stats: stats),
            stats: stats,
            group: group,
            originalDestination: { channel in OriginalDestination.now(channel) },
            upstreamMark: agent.capture.agentMark,
            logger: logger
        )
        // Listeners first: capture starts only when they can take connections.
        try await proxy.start()
        let admin = AdminServer(
            host: "127.0.0.1",
            port: 15000,
            group: group,
            proxy: proxy,
            renderMetrics: {
                var buffer: [UInt8] = []
                registry.emit(into: &buffer)
                return String(decoding: buffer, as: UTF8.self)
            },
            logger: logger
        )
        do {
            try capture.apply(rules)
        } catch {
            await proxy.shutdown()
            throw ValidationError("installing the capture rules failed; nothing is captured\n\(error)")
        }
        var gate: NetfilterQueueGate?
        if let settings = agent.capture.gate {
            do {
                let g = try NetfilterQueueGate(queue: settings.queue, mark: settings.mark)
                g.setMode(.capture)
                g.start()
                gate = g
            } catch {
                // Fail open: without a reader the kernel lets new connections through directly.
                logger.error(
                    "the NFQUEUE gate could not start; new connections bypass the proxy",
                    metadata: ["error": "\(error)"]
                )
            }
        }
        logger.info(
            "agent running",
            metadata: ["config.file": "\(config)", "capture": "\(capture.backend.rawValue)", "gate": "\(gate != nil)"]
        )

        var services: [ServiceGroupConfiguration.ServiceConfiguration] = [.init(service: proxy), .init(service: admin)]
        var registrar: PilotRegistrar?
        if !agent.services.isEmpty, let api = agent.pilotAPI, let address = agent.registerAddress {
            let r = PilotRegistrar(
                node: agent.node ?? ProcessInfo.processInfo.hostName,
                pilotAPI: api,
                registerAddress: address,
                ttl: agent.leaseTTL,
                services: agent.services,
                logger: logger
            )
            registrar = r
            services.append(.init(service: RegistrarService(registrar: r)))
        }
        let serviceGroup = ServiceGroup(
            configuration: .init(services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
        )
        try await serviceGroup.run()

        // Stopping: no new captures, deregistration, then the rules go.
        gate?.setMode(.bypass)
        await registrar?.deregisterAll()
        if keepRules {
            logger.info("capture rules kept (--keep-rules)")
        } else {
            do {
                try capture.remove()
                logger.info("capture rules removed")
            } catch {
                logger.error("removing the capture rules failed", metadata: ["error": "\(error)"])
            }
        }
        gate?.stop()
        try await group.shutdownGracefully()
    }
}

/// The registrar as a `Service`: runs until shutdown.
struct RegistrarService: Service {
    let registrar: PilotRegistrar
    func run() async throws {
        await cancelWhenGracefulShutdown { await registrar.run() }
    }
}
