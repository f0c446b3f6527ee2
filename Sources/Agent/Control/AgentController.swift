import CoreMetrics
import FoundationEssentials
public import Interceptor
public import Logging
import NIOConcurrencyHelpers
import NIOCore
public import Proxy

/// What `trellis-agent drain`, `undrain` and `status` act on: the proxy, the gate, the
/// registration with pilot and the capture rules of one running agent.
///
/// Drain, in order: pilot is told the node is draining (peers stop choosing it), the gate stops
/// capturing new connections (they go straight to their destination), idle keep-alive
/// connections are closed, each busy one answers its current request with `Connection: close`;
/// then the in-flight requests and relayed TCP connections are waited for, up to the deadline.
public actor AgentController {
    /// Builds the parts agent.yaml configures, for the start and for each reload.
    public struct Parts: Sendable {
        /// The registrar for a configuration (nil: nothing to register); `draining` carries a
        /// drain in progress over to a new registrar.
        public var registrar: @Sendable (AgentConfig, _ draining: Bool) -> PilotRegistrar?
        /// The xDS client for a configuration (nil: no pilot.xds).
        public var xds: @Sendable (AgentConfig) -> XDSClient?
        /// The proxy configuration without pilot (the capture listeners passing through).
        public var base: @Sendable (AgentConfig) -> ProxyConfig
        /// Reads and parses agent.yaml again (`trellis-agent reload`, SIGHUP).
        public var load: @Sendable () throws -> AgentConfig

        public init(
            registrar: @escaping @Sendable (AgentConfig, _ draining: Bool) -> PilotRegistrar?,
            xds: @escaping @Sendable (AgentConfig) -> XDSClient?,
            base: @escaping @Sendable (AgentConfig) -> ProxyConfig,
            load: @escaping @Sendable () throws -> AgentConfig
        ) {
            self.registrar = registrar
            self.xds = xds
            self.base = base
            self.load = load
        }
    }

    private var config: AgentConfig
    private let node: String
    private let proxy: ProxyServer
    private let capture: CaptureSession?
    private let parts: Parts
    private var registrar: PilotRegistrar?
    private var registrarTask: Task<Void, Never>?
    private var xds: XDSClient? {
        didSet { currentXDS.withLockedValue { [xds] in $0 = xds } }
    }
    private var xdsTask: Task<Void, Never>?
    /// The xDS client, readable off the actor (the admin's `/config_dump` runs on an event loop).
    private nonisolated let currentXDS = NIOLockedValueBox<XDSClient?>(nil)
    private let logger: Logger
    private var drainStarted: Date?
    private var lastDrain: DrainReport?
    private var lastReload: ReloadReport?
    private let reloads = (
        applied: Counter(label: "trellis_agent_reloads_total", dimensions: [("result", "applied")]),
        refused: Counter(label: "trellis_agent_reloads_total", dimensions: [("result", "refused")])
    )

    /// - Parameters:
    ///   - config: the configuration the agent started with (`node` already defaulted).
    ///   - capture: the installed rules and gate; nil when the agent captures nothing (tests).
    public init(
        config: AgentConfig,
        node: String,
        proxy: ProxyServer,
        capture: CaptureSession?,
        parts: Parts,
        logger: Logger
    ) {
        self.config = config
        self.node = node
        self.proxy = proxy
        self.capture = capture
        self.parts = parts
        self.logger = logger
    }

    /// The xDS client's state, when pilot's xDS address is configured.
    public nonisolated var xdsState: XDSClient.State? { currentXDS.withLockedValue { $0?.current } }

    public var isDraining: Bool { drainStarted != nil }

    /// Starts the registrar and the xDS client of the current configuration.
    public func start() {
        startRegistrar(parts.registrar(config, false))
        startXDS(parts.xds(config))
    }

    /// Stops the xDS client (its last configuration is saved) and deregisters from pilot.
    public func stop() async {
        xdsTask?.cancel()
        await xdsTask?.value
        xdsTask = nil
        registrarTask?.cancel()
        await registrarTask?.value
        registrarTask = nil
        await registrar?.deregisterAll()
    }

    private func startRegistrar(_ new: PilotRegistrar?) {
        registrar = new
        registrarTask = new.map { r in Task { await r.run() } }
    }

    private func startXDS(_ new: XDSClient?) {
        xds = new
        xdsTask = new.map { client in
            Task { [logger] in
                do {
                    try await client.run()
                } catch {
                    logger.error("the xDS client stopped", metadata: ["error": "\(error)"])
                }
            }
        }
    }

    // MARK: Reload

    /// Reads agent.yaml again and applies what changed: capture rules and gate (one transaction
    /// per family, rolled back if the kernel refuses one), services and health checks, pilot's
    /// addresses, the drain deadline. A file that does not parse, or that changes what only a
    /// restart can (node, state_dir, admin, access_log, tracing), is refused whole and the running
    /// configuration stays.
    public func reload() async -> ReloadReport {
        let new: AgentConfig
        do {
            new = try parts.load()
        } catch {
            return refuse("\(error)")
        }
        return await reload(to: new)
    }

    /// Applies `new` (already parsed and validated) as ``reload()`` does.
    public func reload(to new: AgentConfig) async -> ReloadReport {
        let old = config
        var restartOnly: [String] = []
        if new.node != old.node { restartOnly.append("node") }
        if new.stateDirectory != old.stateDirectory { restartOnly.append("state_dir") }
        if new.adminAddress != old.adminAddress { restartOnly.append("admin.address") }
        if new.accessLog != old.accessLog { restartOnly.append("access_log") }
        if new.tracing != old.tracing { restartOnly.append("tracing") }
        // New IPv6 rules before [::] listeners would refuse every redirected IPv6 connection.
        if new.capture.ipv6 != old.capture.ipv6 { restartOnly.append("capture.ipv6") }
        guard restartOnly.isEmpty else {
            return refuse(
                restartOnly.joined(separator: ", ")
                    + ": changed, and only a restart applies \(restartOnly.count == 1 ? "it" : "them")"
                    + " (systemctl restart trellis-agent); nothing was applied"
            )
        }
        var changes: [String] = []
        if let capture {
            let rules: RuleSet
            do {
                rules = try RuleSet(new.capture)
            } catch {
                return refuse("capture: \(error)")
            }
            do {
                changes += try await capture.reload(to: rules)
            } catch {
                return refuse("the kernel refused the new capture rules; the old ones stay: \(error)")
            }
        }
        if old.services != new.services || old.pilotAPI != new.pilotAPI || old.registerAddress != new.registerAddress
            || old.leaseTTL != new.leaseTTL
        {
            let previous = registrar
            registrarTask?.cancel()
            await registrarTask?.value
            let next = parts.registrar(new, isDraining)
            // Instances no longer declared (or declared to another pilot or address) are removed.
            let kept = (next?.instanceKeys).map(Set.init) ?? []
            if let previous {
                // Pilots with none in common are other registries: the old ones are told to forget.
                let moved = Set(old.pilotAPI).isDisjoint(with: new.pilotAPI)
                let gone = previous.instanceKeys.filter { !kept.contains($0) || moved }
                await previous.deregister(gone)
                if !gone.isEmpty { changes.append("deregistered: " + gone.sorted().joined(separator: ", ")) }
            }
            startRegistrar(next)
            changes.append(
                next == nil
                    ? "registration: none (no services or pilot.api)"
                    : "registration: \(new.services.count) services with \(new.pilotAPI.map(\.description).joined(separator: ", "))"
            )
        }
        if old.pilotXDS != new.pilotXDS || old.xdsProtocol != new.xdsProtocol || old.maxEndpoints != new.maxEndpoints
            || old.inboundForward != new.inboundForward
        {
            xdsTask?.cancel()
            await xdsTask?.value
            xdsTask = nil
            xds = nil
            if let next = parts.xds(new) {
                // The configuration from the old stream keeps serving until the new one applies.
                startXDS(next)
                changes.append("pilot xDS: \(next.current.pilot) (\(new.xdsProtocol.rawValue))")
            } else {
                do {
                    try await proxy.apply(try ProxySnapshot(parts.base(new), stats: proxy.stats))
                } catch {
                    logger.error("applying the passthrough configuration failed", metadata: ["error": "\(error)"])
                }
                changes.append("pilot xDS: off (passthrough)")
            }
        }
        if old.drainDeadline != new.drainDeadline {
            changes.append("drain_deadline: \(old.drainDeadline) -> \(new.drainDeadline)")
        }
        config = new
        let report = ReloadReport(applied: true, changes: changes)
        lastReload = report
        reloads.applied.increment()
        logger.notice(
            "configuration reloaded",
            metadata: ["reload.changes": "\(changes.isEmpty ? "none" : changes.joined(separator: "; "))"]
        )
        return report
    }

    private func refuse(_ error: String) -> ReloadReport {
        let report = ReloadReport(applied: false, error: error)
        lastReload = report
        reloads.refused.increment()
        logger.error("configuration refused; the running one stays", metadata: ["reload.error": "\(error)"])
        return report
    }

    // MARK: Drain

    /// Drains and waits up to `deadline` (the configured `drain_deadline` when nil) for in-flight
    /// work; returns what it did. Draining again while draining waits again with the new deadline.
    public func drain(deadline: Duration? = nil) async -> DrainReport {
        let deadline = deadline ?? config.drainDeadline
        // Under systemd, `systemctl stop` runs `trellis-agent drain` (ExecStop): the stop timeout
        // is extended to the deadline (with room to exit), whatever TimeoutStopSec says.
        SystemdNotifier.notify("EXTEND_TIMEOUT_USEC=\((deadline + .seconds(15)).components.seconds * 1_000_000)")
        let clock = ContinuousClock()
        let start = clock.now
        if drainStarted == nil { drainStarted = Date() }
        var report = DrainReport(deadlineSeconds: Self.seconds(deadline))

        if let registrar {
            do {
                try await registrar.drain()
                report.pilot = "node marked draining"
            } catch {
                report.pilot = "could not tell pilot: \(error)"
                logger.warning("drain: pilot was not told", metadata: ["error": "\(error)"])
            }
        } else {
            report.pilot = "not registered with pilot"
        }
        let gateRunning = await capture?.gateRunning ?? false
        await capture?.setMode(.bypass)
        report.gate =
            gateRunning
            ? "bypass: new connections go straight to their destination"
            : "no gate running: new connections are still captured, and not kept alive"
        let started = await proxy.startDraining()
        report.idleClosed = started.idleClosed
        report.inFlightAtStart = started
        var now = started
        while !now.isQuiet && clock.now - start < deadline {
            try? await Task.sleep(for: .milliseconds(50))
            now = await proxy.activity()
        }
        report.remaining = now
        report.completed = now.isQuiet
        report.waitedMilliseconds = Self.milliseconds(clock.now - start)
        lastDrain = report
        logger.info(
            "drained",
            metadata: [
                "drain.idle_closed": "\(report.idleClosed)",
                "drain.in_flight_at_start": "\(started.requestsInFlight + started.tcpRelays)",
                "drain.remaining": "\(now.requestsInFlight + now.tcpRelays)",
                "drain.waited_ms": "\(report.waitedMilliseconds)",
            ]
        )
        return report
    }

    /// Serves normally again: keep-alive, the gate captures, pilot gets the health back.
    public func undrain() async -> UndrainReport {
        var report = UndrainReport()
        await proxy.stopDraining()
        if let capture {
            await capture.setMode(.capture)
            report.gate = await capture.gateRunning ? "capture" : "no gate running"
        } else {
            report.gate = "no gate configured"
        }
        if let registrar {
            do {
                try await registrar.undrain()
                report.pilot = "health reported again"
            } catch {
                report.pilot = "could not tell pilot: \(error)"
            }
        } else {
            report.pilot = "not registered with pilot"
        }
        drainStarted = nil
        logger.info("undrained")
        return report
    }

    public func status() async -> AgentStatus {
        var status = AgentStatus(node: node, state: drainStarted == nil ? "serving" : "draining")
        status.drainStarted = drainStarted.map { $0.formatted(.iso8601) }
        status.listeners = proxy.allBoundAddresses.flatMap { name, addresses in
            addresses.map { address in
                let ip = address.ipAddress ?? "\(address)"
                return AgentStatus.Listener(
                    name: name,
                    address: ip.contains(":") ? "[\(ip)]:\(address.port ?? 0)" : "\(ip):\(address.port ?? 0)"
                )
            }
        }.sorted { ($0.name, $0.address) < ($1.name, $1.address) }
        status.activity = await proxy.activity()
        status.configVersion = proxy.store.snapshot.config.version
        if let capture {
            let (rules, differences) = await capture.verify()
            status.capture = CaptureStatus(
                backend: capture.capture.backend.rawValue,
                rules: rules,
                differences: differences
            )
        } else {
            status.capture = CaptureStatus(backend: "", rules: "not installed")
        }
        if let counters = await capture?.gateCounters {
            status.gate = AgentStatus.Gate(
                mode: drainStarted == nil ? "capture" : "bypass",
                captured: counters.captured,
                bypassed: counters.bypassed,
                overflows: counters.overflows
            )
        }
        if status.gate == nil, let capture, await capture.rules.config.gate != nil {
            // Configured, but the reader could not start (logged): the queue bypasses.
            status.gate = AgentStatus.Gate(mode: "not running", captured: 0, bypassed: 0, overflows: 0)
        }
        let states = await registrar?.states ?? [:]
        status.services = config.services.map { service in
            let state = states["\(service.name):\(service.servicePort)"]
            return AgentStatus.Service(
                name: service.name,
                port: service.port,
                servicePort: service.servicePort,
                registered: state?.registered ?? false,
                healthy: state?.healthy ?? true,
                lastError: state?.lastError
            )
        }
        status.pilot = AgentStatus.Pilot(
            api: await registrar?.pilot.description ?? config.pilotAPI.first?.description,
            registration: registrar == nil
                ? "not registering (no services declared in agent.yaml)"
                : "\(states.values.filter(\.registered).count)/\(config.services.count) services registered"
        )
        status.lastDrain = lastDrain
        status.lastReload = lastReload
        status.xds = xds?.current
        return status
    }

    static func seconds(_ d: Duration) -> Double {
        Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
    }

    static func milliseconds(_ d: Duration) -> Int {
        Int(d.components.seconds * 1000 + d.components.attoseconds / 1_000_000_000_000_000)
    }
}

/// The capture rules as `status` shows them.
public struct CaptureStatus: Sendable, Codable, Equatable {
    public var backend: String
    /// `installed`, `not installed`, `differs` (with the differences) or `unknown` (with why).
    public var rules: String
    public var differences: [String]

    public init(backend: String, rules: String, differences: [String] = []) {
        self.backend = backend
        self.rules = rules
        self.differences = differences
    }
}

public struct DrainReport: Sendable, Codable, Equatable {
    public var deadlineSeconds: Double
    public var pilot = ""
    public var gate = ""
    public var idleClosed = 0
    public var inFlightAtStart = ProxyActivity()
    public var remaining = ProxyActivity()
    /// Everything in flight finished before the deadline.
    public var completed = false
    public var waitedMilliseconds = 0

    public init(deadlineSeconds: Double) {
        self.deadlineSeconds = deadlineSeconds
    }

    enum CodingKeys: String, CodingKey {
        case deadlineSeconds = "deadline_seconds", pilot, gate
        case idleClosed = "idle_closed", inFlightAtStart = "in_flight_at_start", remaining, completed
        case waitedMilliseconds = "waited_ms"
    }
}

/// What a reload did: applied (with what changed) or refused (with why; nothing changed).
public struct ReloadReport: Sendable, Codable, Equatable {
    public var applied: Bool
    public var changes: [String] = []
    public var error: String?

    public init(applied: Bool, changes: [String] = [], error: String? = nil) {
        self.applied = applied
        self.changes = changes
        self.error = error
    }
}

public struct UndrainReport: Sendable, Codable, Equatable {
    public var pilot = ""
    public var gate = ""
}

public struct AgentStatus: Sendable, Codable, Equatable {
    public struct Listener: Sendable, Codable, Equatable {
        public var name: String
        public var address: String
    }
    public struct Gate: Sendable, Codable, Equatable {
        public var mode: String
        public var captured: Int
        public var bypassed: Int
        public var overflows: Int
    }
    public struct Service: Sendable, Codable, Equatable {
        public var name: String
        public var port: Int
        public var servicePort: Int
        public var registered: Bool
        public var healthy: Bool
        public var lastError: String?

        enum CodingKeys: String, CodingKey {
            case name, port, servicePort = "service_port", registered, healthy, lastError = "last_error"
        }
    }
    public struct Pilot: Sendable, Codable, Equatable {
        public var api: String?
        public var registration: String
    }

    public var node: String
    /// `serving` or `draining`.
    public var state: String
    public var drainStarted: String?
    public var listeners: [Listener] = []
    public var activity = ProxyActivity()
    public var configVersion = ""
    public var capture = CaptureStatus(backend: "", rules: "")
    public var gate: Gate?
    public var services: [Service] = []
    public var pilot = Pilot(api: nil, registration: "")
    public var lastDrain: DrainReport?
    public var lastReload: ReloadReport?
    public var xds: XDSClient.State?

    public init(node: String, state: String) {
        self.node = node
        self.state = state
    }

    enum CodingKeys: String, CodingKey {
        case node, state, drainStarted = "drain_started", listeners, activity, configVersion = "config_version"
        case capture, gate, services, pilot, lastDrain = "last_drain", lastReload = "last_reload", xds
    }
}
