import Agent
import ArgumentParser
import Foundation
import Interceptor
import Logging
import Metrics
import NIOConcurrencyHelpers
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

    @Option(help: "The control socket that drain, undrain and status talk to (root only).")
    var controlSocket = ControlServer.defaultPath

    @OptionGroup var logging: LoggingOptions

    func validate() throws {
        if let eventLoops, eventLoops < 1 || eventLoops > 1024 {
            throw ValidationError("--event-loops: expected 1...1024, got \(eventLoops)")
        }
    }

    func run() async throws {
        let logger = try logging.bootstrap(label: "trellis.agent")
        // Signals are taken from the very start: a SIGTERM while starting ends the start cleanly
        // (rules that were installed are removed) instead of killing the process half-way.
        let termination = Termination()
        let signals = await UnixSignalsSequence(trapping: .sigterm, .sigint)
        let signalTask = Task {
            for await signal in signals {
                logger.info("signal received: draining, then exiting", metadata: ["signal": "\(signal)"])
                await termination.request()
            }
        }
        defer { signalTask.cancel() }
        let text: String
        do {
            text = try String(contentsOfFile: config, encoding: .utf8)
        } catch {
            throw ValidationError("\(config): cannot read the file (\(error.localizedDescription))")
        }
        var agent: AgentConfig
        do {
            agent = try AgentConfigLoader.parse(yaml: text, file: config)
        } catch {
            throw ValidationError("invalid configuration (nothing was installed)\n\(error)")
        }
        if agent.capture.agentUID == nil, geteuid() != 0 {
            // Running as a dedicated user (the packaged service): that user's own connections
            // (registration, health checks) are never captured. Root's never are excluded this way.
            agent.capture.agentUID = Int(geteuid())
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
            snapshot: try ProxySnapshot(
                AgentListeners.passthroughConfig(inboundForwardTo: agent.inboundForwardTo),
                stats: stats
            ),
            stats: stats,
            group: group,
            originalDestination: { channel in OriginalDestination.now(channel) },
            upstreamMark: agent.capture.agentMark,
            logger: logger
        )
        let node = agent.node ?? ProcessInfo.processInfo.hostName
        let xdsBox = NIOLockedValueBox<XDSClient?>(nil)
        var registrar: PilotRegistrar?
        if !agent.services.isEmpty, let api = agent.pilotAPI, let address = agent.registerAddress {
            registrar = PilotRegistrar(
                node: node,
                pilotAPI: api,
                registerAddress: address,
                ttl: agent.leaseTTL,
                services: agent.services,
                logger: logger
            )
        }
        let controller = AgentController(
            node: node,
            proxy: proxy,
            gate: nil,
            registrar: registrar,
            pilotAPI: agent.pilotAPI,
            services: agent.services,
            captureState: { [capture] in
                do {
                    let differences = try capture.verify(rules)
                    return CaptureStatus(
                        backend: capture.backend.rawValue,
                        rules: differences.isEmpty ? "installed" : "differs",
                        differences: differences
                    )
                } catch {
                    return CaptureStatus(backend: capture.backend.rawValue, rules: "unknown: \(error)")
                }
            },
            logger: logger
        )
        // The control socket first: a second agent on this machine stops here, before it touches
        // a port or a rule of the running one.
        let control = ControlServer(path: controlSocket, controller: controller, group: group, logger: logger)
        do {
            try await control.bind()
        } catch {
            try? await group.shutdownGracefully()
            throw ValidationError("\(error); nothing was installed")
        }
        // Listeners next: capture starts only when they can take connections.
        do {
            try await proxy.start()
        } catch {
            await proxy.shutdown()
            await control.close()
            try? await group.shutdownGracefully()
            throw ValidationError("binding the capture listeners failed; nothing was installed\n\(error)")
        }
        do {
            try capture.apply(rules)
        } catch {
            await proxy.shutdown()
            await control.close()
            try? await group.shutdownGracefully()
            throw ValidationError("installing the capture rules failed; nothing is captured\n\(error)")
        }
        var gate: NetfilterQueueGate?
        if let settings = agent.capture.gate {
            do {
                let g = try NetfilterQueueGate(queue: settings.queue, mark: settings.mark)
                g.setMode(.capture)
                g.start()
                gate = g
                await controller.attach(gate: g)
            } catch {
                // Fail open: without a reader the kernel lets new connections through directly.
                logger.error(
                    "the NFQUEUE gate could not start; new connections bypass the proxy",
                    metadata: ["error": "\(error)"]
                )
            }
        }
        // systemd (Type=notify): `systemctl start` returns once traffic is being captured.
        SystemdNotifier.notify("READY=1")
        logger.info(
            "agent running",
            metadata: ["config.file": "\(config)", "capture": "\(capture.backend.rawValue)", "gate": "\(gate != nil)"]
        )

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
            dumpExtra: { [xdsBox] in xdsBox.withLockedValue { $0 }.map { (key: "xds", value: $0.current) } },
            logger: logger
        )
        var services: [ServiceGroupConfiguration.ServiceConfiguration] = [.init(service: proxy)]
        if let registrar { services.append(.init(service: RegistrarService(registrar: registrar))) }
        if let xdsAddress = agent.pilotXDS {
            // Routes, clusters and endpoints from pilot; until the first configuration arrives
            // (or while pilot is unreachable) the listeners pass everything through.
            var persist: String? = agent.stateDirectory + "/agent-config.json"
            do {
                try FileManager.default.createDirectory(
                    atPath: agent.stateDirectory,
                    withIntermediateDirectories: true,
                    attributes: [.posixPermissions: 0o750]
                )
            } catch {
                logger.warning(
                    "no state folder: the configuration from pilot will not survive a restart",
                    metadata: ["state_dir": "\(agent.stateDirectory)", "error": "\(error)"]
                )
                persist = nil
            }
            let xds = XDSClient(
                pilot: xdsAddress.host,
                port: xdsAddress.port,
                node: node,
                base: AgentListeners.passthroughConfig(inboundForwardTo: agent.inboundForwardTo),
                persistPath: persist,
                protocol: agent.xdsProtocol,
                maxEndpoints: agent.maxEndpoints,
                logger: logger
            ) { config in
                try await proxy.apply(try ProxySnapshot(config, stats: stats))
            }
            await controller.attach(xds: xds)
            xdsBox.withLockedValue { $0 = xds }
            services.append(.init(service: xds))
        }
        services.append(.init(service: admin))
        services.append(.init(service: control))
        // Last in the list, so the first to stop: SIGTERM drains while everything else still runs.
        services.append(.init(service: DrainOnShutdown(controller: controller, deadline: agent.drainDeadline)))
        let serviceGroup = ServiceGroup(configuration: .init(services: services, logger: logger))
        await termination.attach(serviceGroup)
        do {
            try await serviceGroup.run()
        } catch {
            // A service failed (the control socket is taken, say): the rules still go.
            logger.error("the agent stopped on an error", metadata: ["error": "\(error)"])
            gate?.setMode(.bypass)
            await registrar?.deregisterAll()
            if !keepRules { try? capture.remove() }
            gate?.stop()
            try? await group.shutdownGracefully()
            throw error
        }

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

/// Drains (pilot told, gate bypassed, idle connections closed, in-flight work waited for up to the
/// deadline) when graceful shutdown begins, before the other services stop.
struct DrainOnShutdown: Service {
    let controller: AgentController
    let deadline: Duration
    func run() async throws {
        try? await gracefulShutdown()
        SystemdNotifier.notify("STOPPING=1")
        _ = await controller.drain(deadline: deadline)
    }
}

/// Remembers a termination request until the service group exists, then passes it on.
actor Termination {
    private var requested = false
    private var group: ServiceGroup?

    func request() async {
        requested = true
        await group?.triggerGracefulShutdown()
    }

    func attach(_ group: ServiceGroup) async {
        self.group = group
        if requested { await group.triggerGracefulShutdown() }
    }
}

/// The registrar as a `Service`: runs until shutdown.
struct RegistrarService: Service {
    let registrar: PilotRegistrar
    func run() async throws {
        await cancelWhenGracefulShutdown { await registrar.run() }
    }
}
