import Agent
import ArgumentParser
import Foundation
import GatewayConfig
import Interceptor
import Logging
import Metrics
import NIOCore
import NIOPosix
import Proxy
import ServiceLifecycle
import TrellisConfig
import TrellisPolicy
import TrellisRuntime
import TrellisTracing
import UnixSignals

/// `trellis-agent gateway --config FILE`: the proxy alone, from a static YAML file.
struct Gateway: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the proxy standalone as an HTTP gateway from a YAML file (SIGHUP reloads it)."
    )

    @Option(help: "The gateway configuration file (see examples/gateway.yaml).")
    var config: String

    @Option(help: "Event loops (threads); defaults to the number of cores this process may run on.")
    var eventLoops: Int?

    @Flag(help: "Check the configuration file and exit.")
    var check = false

    @OptionGroup var logging: LoggingOptions

    func validate() throws {
        if let eventLoops, eventLoops < 1 || eventLoops > 1024 {
            throw ValidationError("--event-loops: expected 1...1024, got \(eventLoops)")
        }
    }

    func run() async throws {
        let logger = try logging.bootstrap(label: "trellis.gateway")
        let gateway = try Self.load(path: config)
        if check {
            print(
                "\(config): ok (\(gateway.proxy.listeners.count) listeners, \(gateway.proxy.clusters.count) clusters)"
            )
            return
        }

        let metrics = TrellisMetricsFactory()
        MetricsSystem.bootstrap(metrics)
        let stats = ProxyStats()

        let threads = eventLoops ?? System.coreCount
        let group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
        let snapshot = try ProxySnapshot(gateway.proxy, stats: stats)
        // Capture listeners read each connection's original destination from the capture rules.
        let transparent = gateway.proxy.listeners.contains { $0.transparent != nil }
        var lookup: OriginalDestinationLookup?
        if transparent {
            lookup = { channel in OriginalDestination.now(channel) }
        }
        let accessLog = try gateway.accessLog.map { settings in
            do {
                return try AccessLog(settings, logger: logger)
            } catch {
                throw AgentCommandError("\(config): \(error)")
            }
        }
        let tracing = try gateway.tracing.map {
            try TracingBackend.make(
                $0,
                defaultServiceName: "trellis-gateway",
                node: ProcessInfo.processInfo.hostName,
                logger: logger
            )
        }
        let proxy = try ProxyServer(
            snapshot: snapshot,
            stats: stats,
            group: group,
            originalDestination: lookup,
            upstreamMark: gateway.upstreamMark,
            accessLog: accessLog,
            tracing: tracing?.tracing,
            logger: logger
        )
        let admin = AdminServer(
            host: gateway.adminAddress.host,
            port: gateway.adminAddress.port,
            group: group,
            proxy: proxy,
            renderMetrics: metrics.text,
            logger: logger
        )
        let reloader = Reloader(
            path: config,
            proxy: proxy,
            stats: stats,
            accessLog: gateway.accessLog,
            tracing: gateway.tracing,
            logger: logger
        )
        logger.info("starting gateway", metadata: ["config.file": "\(config)", "event_loops": "\(threads)"])
        // The exporter first, so that it stops last and sends the final spans.
        // Ending (a failed exporter) stops tracing, never the gateway.
        let exporter: [ServiceGroupConfiguration.ServiceConfiguration] =
            tracing.map {
                [.init(service: $0.service, successTerminationBehavior: .ignore, failureTerminationBehavior: .ignore)]
            } ?? []
        let services = ServiceGroup(
            configuration: .init(
                services: exporter + [
                    .init(service: proxy), .init(service: admin), .init(service: reloader),
                    .init(service: AccessLogReopener(accessLog: accessLog, logger: logger)),
                    // Memory freed after a burst of connections goes back to the kernel.
                    .init(
                        service: MemoryReturn(
                            enabled: MemoryReturn.enabled(by: ProcessInfo.processInfo.environment),
                            logger: logger
                        )
                    ),
                ],
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger
            )
        )
        try await services.run()
        await accessLog?.shutdown()
        try await group.shutdownGracefully()
    }

    static func load(path: String) throws -> GatewayFile {
        let text: String
        do {
            text = try String(contentsOfFile: path, encoding: .utf8)
        } catch {
            throw AgentCommandError("\(path): cannot read the file (\(error.localizedDescription))")
        }
        do {
            return try GatewayConfigLoader.parse(yaml: text, file: path, version: digest(text))
        } catch {
            throw AgentCommandError("invalid configuration\n\(error)")
        }
    }

    /// A short, stable label for a file's contents (FNV-1a, hex).
    static func digest(_ text: String) -> String { FNV1a.hex(text.utf8) }
}

/// Reloads the gateway file on SIGHUP; an invalid file is reported and the running configuration
/// stays. The access log's output and sampling apply at start only: a file that changes them is
/// refused whole.
struct Reloader: Service {
    let path: String
    let proxy: ProxyServer
    let stats: ProxyStats
    let accessLog: AccessLogSettings?
    let tracing: TracingSettings?
    let logger: Logger

    func run() async throws {
        for await _ in await UnixSignalsSequence(trapping: .sighup).cancelOnGracefulShutdown() {
            do {
                let gateway = try Gateway.load(path: path)
                guard gateway.accessLog == accessLog else {
                    throw AgentCommandError(
                        "access_log: changed (output, sample rate, or whether any listener logs), and only a restart applies it"
                    )
                }
                guard gateway.tracing == tracing else {
                    throw AgentCommandError("tracing: changed, and only a restart applies it")
                }
                try await proxy.apply(try ProxySnapshot(gateway.proxy, stats: stats))
            } catch {
                logger.error(
                    "reload rejected; the previous configuration stays",
                    metadata: ["config.file": "\(path)", "error": "\(error)"]
                )
            }
        }
    }
}

/// SIGUSR1 reopens the access log's file (after logrotate moved it away).
struct AccessLogReopener: Service {
    let accessLog: AccessLog?
    let logger: Logger

    func run() async throws {
        for await _ in await UnixSignalsSequence(trapping: .sigusr1).cancelOnGracefulShutdown() {
            guard let accessLog else {
                logger.notice("SIGUSR1: no access log file to reopen; ignored")
                continue
            }
            Self.reopen(accessLog, logger: logger)
        }
    }

    /// What SIGUSR1 does to the access log (the agent's and the gateway's), said in the log.
    static func reopen(_ accessLog: AccessLog, logger: Logger) {
        do {
            try accessLog.reopen()
            logger.notice(
                "SIGUSR1: access log reopened",
                metadata: ["access_log.output": "\(accessLog.settings.output)"]
            )
        } catch {
            logger.error(
                "SIGUSR1: reopening the access log failed; the old file stays",
                metadata: ["error": "\(error)"]
            )
        }
    }
}
