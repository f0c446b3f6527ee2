import ArgumentParser
import Etcd
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
        abstract: "Run the control plane: registry, xDS (ADS) server and HTTP API. SIGHUP reloads mesh.yaml.",
        discussion: "Settings come from --config (pilot.yaml); each flag given overrides the file."
    )

    @Option(help: "The pilot configuration (listen addresses, store, CMDB). Missing at its default path: defaults.")
    var config = PilotConfig.defaultPath

    @Option(help: "xDS (gRPC) listen address (default 0.0.0.0:\(PilotPorts.xds)).")
    var xdsAddress: String?

    @Option(help: "HTTP API listen address (default 0.0.0.0:\(PilotPorts.http)).")
    var httpAddress: String?

    @Option(
        help:
            "The registry store: a SQLite file, 'memory' (nothing survives a restart), or etcd://host:port,host:port (several pilots share it; docs/ha.md). Default \(PilotConfig.defaultStorePath)."
    )
    var store: String?

    @Option(
        help:
            "The mesh configuration (static services, gateways, routes); watched for changes. Missing: an empty mesh until it appears. Default /etc/trellis/mesh.yaml."
    )
    var mesh: String?

    @Option(help: "A CMDB endpoint (http://…) polled for machine metadata (see docs/pilot-api.md).")
    var cmdbURL: String?

    @Option(help: "How often the CMDB is polled, in seconds (default 30).")
    var cmdbInterval: Int?

    @Option(help: "Registry changes within this many milliseconds are pushed together (default 100).")
    var debounceMs: Int?

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical (default info).")
    var logLevel: String?

    func validate() throws {
        _ = try settings()
    }

    /// pilot.yaml (when there is one) with the flags given laid over it.
    func settings() throws -> PilotConfig {
        var settings = PilotConfig()
        if let data = FileManager.default.contents(atPath: config) {
            do {
                settings = try PilotConfig.parse(yaml: String(decoding: data, as: UTF8.self), file: config)
            } catch {
                throw ValidationError("\(error)")
            }
        } else if config != PilotConfig.defaultPath || FileManager.default.fileExists(atPath: config) {
            throw ValidationError("--config: \(config) cannot be read")
        }
        if let xdsAddress { settings.xdsAddress = try Self.endpoint(xdsAddress, option: "--xds-address") }
        if let httpAddress { settings.httpAddress = try Self.endpoint(httpAddress, option: "--http-address") }
        if let mesh { settings.mesh = mesh }
        if let cmdbURL { settings.cmdbURL = cmdbURL }
        if let cmdbInterval {
            guard (1...86_400).contains(cmdbInterval) else {
                throw ValidationError("--cmdb-interval: expected 1...86400, got \(cmdbInterval)")
            }
            settings.cmdbInterval = .seconds(cmdbInterval)
        }
        if let debounceMs {
            guard (0...10_000).contains(debounceMs) else {
                throw ValidationError("--debounce-ms: expected 0...10000, got \(debounceMs)")
            }
            settings.debounce = .milliseconds(debounceMs)
        }
        if let logLevel {
            guard Logger.Level(rawValue: logLevel) != nil else {
                throw ValidationError(
                    "--log-level: expected one of \(Logger.Level.allCases.map(\.rawValue).joined(separator: ", ")), got '\(logLevel)'"
                )
            }
            settings.logLevel = logLevel
        }
        if let store {
            if store == "memory" {
                settings.store = .memory
            } else if store.hasPrefix("etcd://") {
                let list = store.dropFirst("etcd://".count).split(separator: ",").map(String.init)
                do {
                    let endpoints = try list.map { try EtcdEndpoint(parsing: $0) }
                    try EtcdEndpoint.check(endpoints)
                    var etcd = PilotConfig.EtcdSettings(endpoints: endpoints)
                    if case .etcd(let fromFile) = settings.store {
                        etcd = fromFile
                        etcd.endpoints = endpoints
                    }
                    settings.store = .etcd(etcd)
                } catch {
                    throw ValidationError("--store: \(error)")
                }
            } else {
                settings.store = .sqlite(path: store)
            }
        }
        return settings
    }

    /// The pilot over its store; a shared store that cannot be read yet is retried for 30 s
    /// (pilot has no snapshot to serve before it has read it once).
    static func startingPilot(
        configuration: PilotServer.Configuration,
        store: any RegistryStore,
        logger: Logger,
        metricsText: @escaping @Sendable () -> String
    ) async throws -> PilotServer {
        let deadline = ContinuousClock.now + .seconds(30)
        while true {
            do {
                return try await PilotServer(
                    configuration: configuration,
                    store: store,
                    logger: logger,
                    metricsText: metricsText
                )
            } catch {
                guard store is any SharedRegistryStore, ContinuousClock.now < deadline else { throw error }
                logger.warning("the registry store cannot be read yet; retrying", metadata: ["error": "\(error)"])
                try await Task.sleep(for: .seconds(1))
            }
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
        let settings = try settings()
        let level = Logger.Level(rawValue: settings.logLevel)!
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        var logger = Logger(label: "trellis.pilot")
        logger.logLevel = level
        let prometheus = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: prometheus))

        switch settings.store {
        case .memory:
            try await serve(
                settings,
                store: try SQLiteRegistryStore(),
                etcd: nil,
                logger: logger,
                prometheus: prometheus
            )
        case .sqlite(let path):
            let store: SQLiteRegistryStore
            do {
                try FileManager.default.createDirectory(
                    atPath: (path as NSString).deletingLastPathComponent,
                    withIntermediateDirectories: true
                )
                store = try SQLiteRegistryStore(path: path)
            } catch {
                throw ValidationError("store: \(error)")
            }
            try await serve(settings, store: store, etcd: nil, logger: logger, prometheus: prometheus)
        case .etcd(let etcd):
            let client = try EtcdClient(
                endpoints: etcd.endpoints,
                tls: etcd.tls,
                callTimeout: etcd.callTimeout,
                logger: logger
            )
            // The client's connections run beside the services and stop after them.
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await client.run() }
                defer { client.close() }
                let store = EtcdRegistryStore(client: client, prefix: etcd.prefix, logger: logger)
                try await serve(
                    settings,
                    store: store,
                    etcd: (client, etcd.prefix),
                    logger: logger,
                    prometheus: prometheus
                )
            }
        }
    }

    func serve(
        _ settings: PilotConfig,
        store registryStore: any RegistryStore,
        etcd: (client: EtcdClient, prefix: String)?,
        logger: Logger,
        prometheus: PrometheusCollectorRegistry
    ) async throws {
        var configuration = PilotServer.Configuration()
        (configuration.xdsHost, configuration.xdsPort) = settings.xdsAddress
        (configuration.httpHost, configuration.httpPort) = settings.httpAddress
        configuration.debounce = settings.debounce
        let pilot = try await Self.startingPilot(configuration: configuration, store: registryStore, logger: logger) {
            var buffer: [UInt8] = []
            prometheus.emit(into: &buffer)
            return String(decoding: buffer, as: UTF8.self)
        }
        let meshWatcher = MeshFileWatcher(path: settings.mesh, registry: pilot.registry, logger: logger)
        // A mesh.yaml that is there but wrong stops the start: better than serving a mesh without it.
        if FileManager.default.fileExists(atPath: settings.mesh) {
            guard await meshWatcher.reload(starting: true) else { throw ExitCode(1) }
        }
        var services: [any Service] = [pilot, meshWatcher]
        if let cmdbURL = settings.cmdbURL {
            let cmdb: CMDBSource
            do {
                cmdb = try CMDBSource(
                    url: cmdbURL,
                    interval: settings.cmdbInterval,
                    registry: pilot.registry,
                    logger: logger
                )
            } catch {
                throw ValidationError("cmdb url: \(error)")
            }
            if let etcd {
                // With several pilots one polls the CMDB at a time: the one elected in etcd.
                let name =
                    "\(ProcessInfo.processInfo.hostName) \(settings.httpAddress.host):\(settings.httpAddress.port)"
                services.append(
                    ElectedService(
                        client: etcd.client,
                        election: etcd.prefix + "election/cmdb",
                        value: name,
                        service: cmdb
                    )
                )
            } else {
                services.append(cmdb)
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

/// A service that runs only on the pilot elected for it in etcd (the CMDB poller), and stops
/// there when that pilot loses the election.
struct ElectedService: Service {
    let client: EtcdClient
    let election: String
    let value: String
    let service: any Service

    func run() async throws {
        await cancelWhenGracefulShutdown {
            await client.lead(election: election, value: value) { try await service.run() }
        }
    }
}
