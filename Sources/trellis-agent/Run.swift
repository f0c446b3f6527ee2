import Agent
import ArgumentParser
import Foundation
import Interceptor
import Logging
import Metrics
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Proxy
import ServiceLifecycle
import TrellisConfig
import TrellisPolicy
import TrellisRuntime
import TrellisTracing
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

    @Option(help: "Append standard output and error to this file; SIGUSR1 reopens it (for logrotate).")
    var logFile: String?

    @OptionGroup var logging: LoggingOptions

    func validate() throws {
        if let eventLoops, eventLoops < 1 || eventLoops > 1024 {
            throw ValidationError("--event-loops: expected 1...1024, got \(eventLoops)")
        }
    }

    func run() async throws {
        if let logFile { try LogFile.redirect(to: logFile) }
        let logger = try logging.bootstrap(label: "trellis.agent")
        // Signals are taken from the very start: a SIGTERM while starting ends the start cleanly
        // (rules that were installed are removed) instead of killing the process half-way. Every
        // signal whose default would end the process is handled: SIGHUP reloads agent.yaml,
        // SIGUSR1 reopens the log file, SIGUSR2 is ignored; SIGTERM, SIGINT and SIGQUIT drain,
        // remove the rules and exit. (SIGKILL cannot be handled: the gate fails open.)
        let termination = Termination()
        let controllerBox = NIOLockedValueBox<AgentController?>(nil)
        let accessLogBox = NIOLockedValueBox<AccessLog?>(nil)
        let signals = await UnixSignalsSequence(trapping: .sigterm, .sigint, .sigquit, .sighup, .sigusr1, .sigusr2)
        let signalTask = Task { [logFile] in
            for await signal in signals {
                switch signal {
                case .sighup:
                    guard let controller = controllerBox.withLockedValue({ $0 }) else {
                        logger.notice("SIGHUP while starting: the configuration being started is the file's")
                        continue
                    }
                    logger.notice("SIGHUP: reloading the configuration")
                    _ = await controller.reload()
                case .sigusr1:
                    let accessLog = accessLogBox.withLockedValue { $0 }
                    if logFile == nil && accessLog == nil {
                        logger.notice("SIGUSR1: no --log-file and no access log to reopen; ignored")
                    }
                    if let logFile {
                        do {
                            try LogFile.redirect(to: logFile)
                            logger.notice("SIGUSR1: log file reopened", metadata: ["file": "\(logFile)"])
                        } catch {
                            logger.error("SIGUSR1: reopening the log file failed", metadata: ["error": "\(error)"])
                        }
                    }
                    if let accessLog { AccessLogReopener.reopen(accessLog, logger: logger) }
                case .sigusr2:
                    logger.notice("SIGUSR2: ignored")
                default:
                    logger.info("signal received: draining, then exiting", metadata: ["signal": "\(signal)"])
                    await termination.request()
                }
            }
        }
        defer { signalTask.cancel() }
        let configPath = config
        var agent: AgentConfig
        do {
            agent = try Self.load(configPath)
        } catch {
            throw AgentCommandError("\(error.description); nothing was installed")
        }
        if agent.capture.ipv6 && !agent.capture.ipv4 && !Self.kernelHasIPv6 {
            throw AgentCommandError("capture: only ipv6 is on, and this machine has no IPv6; nothing was installed")
        }
        let rules: RuleSet
        do {
            rules = try RuleSet(agent.capture)
        } catch {
            throw AgentCommandError("invalid capture configuration (nothing was installed)\n\(error)")
        }
        let capture: Capture
        do {
            capture = Capture(backend: try IPTablesBackend.detect())
        } catch {
            throw AgentCommandError("\(error)")
        }

        let metrics = TrellisMetricsFactory()
        MetricsSystem.bootstrap(metrics)
        let stats = ProxyStats()
        let group = MultiThreadedEventLoopGroup(numberOfThreads: eventLoops ?? System.coreCount)
        let base: @Sendable (AgentConfig) -> ProxyConfig = {
            AgentListeners.passthroughConfig(
                inboundForward: $0.inboundForward,
                ipv6: $0.capture.ipv6,
                accessLog: $0.accessLog != nil
            )
        }
        let accessLog: AccessLog?
        do {
            accessLog = try agent.accessLog.map { try AccessLog($0, logger: logger) }
        } catch {
            throw AgentCommandError("\(configPath): \(error); nothing was installed")
        }
        accessLogBox.withLockedValue { $0 = accessLog }
        let node = agent.node ?? ProcessInfo.processInfo.hostName
        let tracing: (tracing: ProxyTracing, service: any Service)?
        do {
            tracing = try agent.tracing.map {
                try TracingBackend.make($0, defaultServiceName: "trellis-agent", node: node, logger: logger)
            }
        } catch {
            throw AgentCommandError("\(configPath): tracing: \(error); nothing was installed")
        }
        let proxy = try ProxyServer(
            snapshot: try ProxySnapshot(base(agent), stats: stats),
            stats: stats,
            group: group,
            originalDestination: { channel in OriginalDestination.now(channel) },
            upstreamMark: agent.capture.agentMark,
            accessLog: accessLog,
            tracing: tracing?.tracing,
            logger: logger
        )
        // The state folder (the last configuration from pilot, served after a restart).
        var persist: String? = agent.stateDirectory + "/agent-config.json"
        if !agent.pilotXDS.isEmpty {
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
        }
        let parts = AgentController.Parts(
            registrar: { config, draining in
                guard !config.services.isEmpty, !config.pilotAPI.isEmpty, let address = config.registerAddress else {
                    return nil
                }
                return PilotRegistrar(
                    node: node,
                    pilots: config.pilotAPI,
                    registerAddress: address,
                    ttl: config.leaseTTL,
                    services: config.services,
                    locality: config.locality,
                    draining: draining,
                    logger: logger
                )
            },
            xds: { [persist] config in
                // Routes, clusters and endpoints from pilot; until the first configuration arrives
                // (or while pilot is unreachable) the listeners pass everything through.
                guard !config.pilotXDS.isEmpty else { return nil }
                return XDSClient(
                    pilots: config.pilotXDS,
                    node: node,
                    base: base(config),
                    persistPath: persist,
                    protocol: config.xdsProtocol,
                    maxEndpoints: config.maxEndpoints,
                    locality: config.locality,
                    logger: logger
                ) { config in
                    try await proxy.apply(try ProxySnapshot(config, stats: stats))
                }
            },
            base: base,
            load: { try Self.load(configPath) }
        )
        let session = CaptureSession(capture: capture, rules: rules, logger: logger)
        let controller = AgentController(
            config: agent,
            node: node,
            proxy: proxy,
            capture: session,
            parts: parts,
            logger: logger
        )
        // The control socket first: a second agent on this machine stops here, before it touches
        // a port or a rule of the running one.
        let control = ControlServer(
            path: controlSocket,
            controller: controller,
            group: group,
            renderMetrics: metrics.text,
            logger: logger
        )
        do {
            try await control.bind()
        } catch {
            try? await group.shutdownGracefully()
            throw AgentCommandError("\(error); nothing was installed")
        }
        // Listeners next: capture starts only when they can take connections.
        do {
            try await proxy.start()
        } catch {
            await proxy.shutdown()
            await control.close()
            try? await group.shutdownGracefully()
            throw AgentCommandError("binding the capture listeners failed; nothing was installed\n\(error)")
        }
        let gateRunning: Bool
        do {
            gateRunning = try await session.install()
        } catch {
            await proxy.shutdown()
            await control.close()
            try? await group.shutdownGracefully()
            throw AgentCommandError("installing the capture rules failed; nothing is captured\n\(error)")
        }
        controllerBox.withLockedValue { $0 = controller }
        // systemd (Type=notify): `systemctl start` returns once traffic is being captured.
        SystemdNotifier.notify("READY=1")
        logger.info(
            "agent running",
            metadata: [
                "config.file": "\(configPath)", "capture": "\(capture.backend.rawValue)",
                "families": "\(rules.families.map(\.rawValue).joined(separator: ","))", "gate": "\(gateRunning)",
                "version": "\(TrellisVersion.current)",
            ]
        )

        let admin = AdminServer(
            host: agent.adminAddress.host,
            port: agent.adminAddress.port,
            group: group,
            proxy: proxy,
            renderMetrics: metrics.text,
            dumpExtra: { controller.xdsState.map { (key: "xds", value: $0) } },
            logger: logger
        )
        // The span exporter runs apart and stops after the capture rules are gone: sending the last
        // spans (up to its 5 s export timeout when the collector is down) never delays that.
        let exporter = tracing.map { ServiceGroup(services: [$0.service], logger: logger) }
        let exporting = exporter.map { group in Task { try? await group.run() } }
        func stopExporter() async {
            await exporter?.triggerGracefulShutdown()
            await exporting?.value
        }
        let services: [ServiceGroupConfiguration.ServiceConfiguration] = [
            .init(service: proxy),
            .init(service: ControllerParts(controller: controller)),
            .init(service: admin),
            .init(service: control),
            // Memory freed after a burst of connections goes back to the kernel.
            .init(
                service: MemoryReturn(
                    enabled: MemoryReturn.enabled(by: ProcessInfo.processInfo.environment),
                    logger: logger
                )
            ),
            // Last in the list, so the first to stop: a stop drains while everything else still runs.
            .init(service: DrainOnShutdown(controller: controller)),
        ]
        let serviceGroup = ServiceGroup(configuration: .init(services: services, logger: logger))
        await termination.attach(serviceGroup)
        do {
            try await serviceGroup.run()
        } catch {
            // A service failed (the admin port is taken, say): the rules still go.
            logger.error("the agent stopped on an error", metadata: ["error": "\(error)"])
            await session.remove(keepRules: keepRules)
            await controller.stop()
            await stopExporter()
            try? await group.shutdownGracefully()
            throw error
        }
        // Stopping: the gate bypasses, then the rules go.
        await session.remove(keepRules: keepRules)
        await stopExporter()
        await accessLog?.shutdown()
        try await group.shutdownGracefully()
    }

    /// Reads and parses agent.yaml: at the start, for `check`, and for each reload.
    static func load(_ path: String) throws(AgentCommandError) -> AgentConfig {
        let text: String
        do {
            text = try String(contentsOfFile: path, encoding: .utf8)
        } catch {
            throw AgentCommandError("\(path): cannot read the file (\(error.localizedDescription))")
        }
        var agent: AgentConfig
        do {
            agent = try AgentConfigLoader.parse(yaml: text, file: path)
        } catch {
            throw AgentCommandError("invalid configuration\n\(error)")
        }
        if agent.capture.agentUID == nil, geteuid() != 0 {
            // Running as a dedicated user (the packaged service): that user's own connections
            // (registration, health checks) are never captured. Root's never are excluded this way.
            agent.capture.agentUID = Int(geteuid())
        }
        // A machine without IPv6 gets no ip6tables rules and no IPv6 listeners, and no error.
        if agent.capture.ipv6 && agent.capture.ipv4 && !kernelHasIPv6 { agent.capture.ipv6 = false }
        return agent
    }

    /// Whether the kernel has IPv6 (`ipv6.disable=1` removes /proc/net/if_inet6, and AF_INET6
    /// sockets cannot be made).
    static var kernelHasIPv6: Bool {
        let fd = socket(AF_INET6, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        close(fd)
        return FileManager.default.fileExists(atPath: "/proc/net/if_inet6")
    }
}

/// The parts agent.yaml configures (registration, the xDS client), started with the agent,
/// replaced by reloads, stopped (deregistered, last configuration saved) on the way out.
struct ControllerParts: Service {
    let controller: AgentController
    func run() async throws {
        await controller.start()
        try? await gracefulShutdown()
        await controller.stop()
    }
}

/// Drains (pilot told, gate bypassed, idle connections closed, in-flight work waited for up to the
/// configured `drain_deadline`) when graceful shutdown begins, before the other services stop.
/// (The drain itself tells systemd how long it may take, so the unit's stop timeout follows it.)
struct DrainOnShutdown: Service {
    let controller: AgentController
    func run() async throws {
        try? await gracefulShutdown()
        SystemdNotifier.notify("STOPPING=1")
        _ = await controller.drain()
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
