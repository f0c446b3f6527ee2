import ArgumentParser
import Foundation
import Logging
import Metrics
import Pilot
import Prometheus
import ServiceLifecycle
import TrellisConfig
import TrellisRuntime
import UnixSignals

/// `trellis-pilot serve`: the registry, the xDS server and the HTTP API.
struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the control plane: registry, xDS (ADS) server and HTTP API. SIGHUP reloads mesh.yaml."
    )

    @Option(help: "xDS (gRPC) listen address.")
    var xdsAddress = "0.0.0.0:\(PilotPorts.xds)"

    @Option(help: "HTTP API listen address.")
    var httpAddress = "0.0.0.0:\(PilotPorts.http)"

    @Option(help: "The registry store: a SQLite file, or 'memory' (nothing survives a restart).")
    var store = "/var/lib/trellis/pilot.db"

    @Option(
        help:
            "The mesh configuration (static services, gateways, routes); watched for changes. Missing: an empty mesh until it appears."
    )
    var mesh = "/etc/trellis/mesh.yaml"

    @Option(help: "A CMDB endpoint (http://…) polled for machine metadata (see docs/pilot-api.md).")
    var cmdbURL: String?

    @Option(help: "How often the CMDB is polled, in seconds.")
    var cmdbInterval = 30

    @Option(help: "Registry changes within this many milliseconds are pushed together.")
    var debounceMs = 100

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel = "info"

    func validate() throws {
        _ = try Self.endpoint(xdsAddress, option: "--xds-address")
        _ = try Self.endpoint(httpAddress, option: "--http-address")
        guard (0...10_000).contains(debounceMs) else {
            throw ValidationError("--debounce-ms: expected 0...10000, got \(debounceMs)")
        }
        guard (1...86_400).contains(cmdbInterval) else {
            throw ValidationError("--cmdb-interval: expected 1...86400, got \(cmdbInterval)")
        }
        guard Logger.Level(rawValue: logLevel) != nil else {
            throw ValidationError(
                "--log-level: expected one of \(Logger.Level.allCases.map(\.rawValue).joined(separator: ", ")), got '\(logLevel)'"
            )
        }
    }

    static func endpoint(_ text: String, option: String) throws -> (host: String, port: Int) {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]),
            (0...65535).contains(port)
        else {
            throw ValidationError("\(option): expected host:port, got '\(text)'")
        }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard !host.isEmpty else { throw ValidationError("\(option): expected host:port, got '\(text)'") }
        return (host, port)
    }

    func run() async throws {
        let level = Logger.Level(rawValue: logLevel)!
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        var logger = Logger(label: "trellis.pilot")
        logger.logLevel = level
        let prometheus = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: prometheus))

        let registryStore: any RegistryStore
        do {
            if store == "memory" {
                registryStore = try SQLiteRegistryStore()
            } else {
                try FileManager.default.createDirectory(
                    atPath: (store as NSString).deletingLastPathComponent,
                    withIntermediateDirectories: true
                )
                registryStore = try SQLiteRegistryStore(path: store)
            }
        } catch {
            throw ValidationError("--store: \(error)")
        }

        var configuration = PilotServer.Configuration()
        (configuration.xdsHost, configuration.xdsPort) = try Self.endpoint(xdsAddress, option: "--xds-address")
        (configuration.httpHost, configuration.httpPort) = try Self.endpoint(httpAddress, option: "--http-address")
        configuration.debounce = .milliseconds(debounceMs)
        let pilot = try PilotServer(
            configuration: configuration,
            store: registryStore,
            logger: logger,
            metricsText: {
                var buffer: [UInt8] = []
                prometheus.emit(into: &buffer)
                return String(decoding: buffer, as: UTF8.self)
            }
        )
        let meshWatcher = MeshFileWatcher(path: mesh, registry: pilot.registry, logger: logger)
        // A mesh.yaml that is there but wrong stops the start: better than serving a mesh without it.
        if FileManager.default.fileExists(atPath: mesh) {
            guard await meshWatcher.reload(starting: true) else { throw ExitCode(1) }
        }
        var services: [any Service] = [pilot, meshWatcher]
        if let cmdbURL {
            do {
                services.append(
                    try CMDBSource(
                        url: cmdbURL,
                        interval: .seconds(cmdbInterval),
                        registry: pilot.registry,
                        logger: logger
                    )
                )
            } catch {
                throw ValidationError("--cmdb-url: \(error)")
            }
        }
        // Memory freed after a burst of streams or API requests goes back to the kernel.
        services.append(
            MemoryReturn(enabled: MemoryReturn.enabled(by: ProcessInfo.processInfo.environment), logger: logger)
        )
        let group = ServiceGroup(
            configuration: .init(
                services: services.map { .init(service: $0) },
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger
            )
        )
        try await group.run()
    }
}

/// Reloads mesh.yaml when its contents change (polled every second) or on SIGHUP. A file with
/// errors is reported (file, line, key path) and the running configuration stays.
struct MeshFileWatcher: Service {
    let path: String
    let registry: Registry
    let logger: Logger
    private let lastDigest = LastDigest()

    init(path: String, registry: Registry, logger: Logger) {
        self.path = path
        self.registry = registry
        self.logger = logger
    }

    actor LastDigest {
        var value: String?
        func set(_ v: String?) { value = v }
    }

    func run() async throws {
        let signals = await UnixSignalsSequence(trapping: .sighup)
        try await withThrowingDiscardingTaskGroup { group in
            group.addTask {
                for await _ in signals { await reload(force: true) }
            }
            group.addTask {
                while !Task.isCancelled {
                    try? await Task.sleep(for: .seconds(1))
                    await reload()
                }
            }
            try? await gracefulShutdown()
            group.cancelAll()
        }
    }

    /// Reads and applies the file if it changed; returns false when it was refused.
    @discardableResult
    /// - Parameter starting: the file pilot starts with: a refusal stops the start (there is no
    ///   running configuration to keep).
    func reload(force: Bool = false, starting: Bool = false) async -> Bool {
        guard let data = FileManager.default.contents(atPath: path) else {
            if force {
                logger.warning(
                    "mesh file not readable; keeping the running configuration",
                    metadata: ["file": "\(path)"]
                )
            }
            return true
        }
        let text = String(decoding: data, as: UTF8.self)
        let digest = FNV1a.hex(data)
        let previous = await lastDigest.value
        guard force || digest != previous else { return true }
        await lastDigest.set(digest)
        do {
            let mesh = try MeshConfigLoader.parse(yaml: text, file: path)
            try await registry.applyMesh(mesh)
            logger.info(
                "mesh configuration applied",
                metadata: [
                    "file": "\(path)", "services": "\(mesh.services.count)", "gateways": "\(mesh.gateways.count)",
                    "digest": "\(digest)",
                ]
            )
            Self.count(ok: true)
            return true
        } catch {
            logger.error(
                starting
                    ? "mesh configuration refused; pilot does not start\n\(error)"
                    : "mesh configuration refused; the running one stays\n\(error)",
                metadata: ["file": "\(path)"]
            )
            Self.count(ok: false)
            return false
        }
    }

    static func count(ok: Bool) {
        Counter(label: "trellis_pilot_mesh_reloads_total", dimensions: [("result", ok ? "ok" : "rejected")]).increment()
    }
}

/// `trellis-pilot check-mesh FILE`: validates a mesh.yaml and exits.
struct CheckMesh: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Check a mesh.yaml file and exit (status 1 on errors).")

    @Argument(help: "The mesh configuration file.")
    var file: String

    func run() throws {
        guard let data = FileManager.default.contents(atPath: file) else {
            throw ValidationError("\(file): cannot be read")
        }
        do {
            let mesh = try MeshConfigLoader.parse(yaml: String(decoding: data, as: UTF8.self), file: file)
            print(
                "\(file): ok (\(mesh.services.count) services, \(mesh.gateways.count) gateways, \(mesh.serviceRoutes.count) routed services)"
            )
        } catch {
            FileHandle.standardError.write(Data("\(error)\n".utf8))
            throw ExitCode(1)
        }
    }
}
