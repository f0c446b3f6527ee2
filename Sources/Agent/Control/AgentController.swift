import FoundationEssentials
public import Interceptor
public import Logging
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
    private let node: String
    private let proxy: ProxyServer
    private var gate: NetfilterQueueGate?
    private let registrar: PilotRegistrar?
    private let pilotAPI: HostPort?
    private let services: [LocalService]
    private let captureState: @Sendable () -> CaptureStatus
    private var xds: XDSClient?
    private let logger: Logger
    private var drainStarted: Date?
    private var lastDrain: DrainReport?

    public init(
        node: String,
        proxy: ProxyServer,
        gate: NetfilterQueueGate?,
        registrar: PilotRegistrar?,
        pilotAPI: HostPort?,
        services: [LocalService],
        captureState: @escaping @Sendable () -> CaptureStatus,
        logger: Logger
    ) {
        self.node = node
        self.proxy = proxy
        self.gate = gate
        self.registrar = registrar
        self.pilotAPI = pilotAPI
        self.services = services
        self.captureState = captureState
        self.logger = logger
    }

    /// The xDS client, when pilot's xDS address is configured.
    public func attach(xds: XDSClient) {
        self.xds = xds
    }

    /// The gate starts after the rules are installed, once the controller exists.
    public func attach(gate: NetfilterQueueGate) {
        self.gate = gate
    }

    public var isDraining: Bool { drainStarted != nil }

    /// Drains and waits up to `deadline` for in-flight work; returns what it did. Draining again
    /// while draining waits again with the new deadline.
    public func drain(deadline: Duration) async -> DrainReport {
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
        if let gate {
            gate.setMode(.bypass)
            report.gate = "bypass: new connections go straight to their destination"
        } else {
            report.gate = "no gate configured: new connections are still captured, and not kept alive"
        }
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
        if let gate {
            gate.setMode(.capture)
            report.gate = "capture"
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
        status.listeners = proxy.boundAddresses.map { name, address in
            let ip = address.ipAddress ?? "\(address)"
            return AgentStatus.Listener(
                name: name,
                address: ip.contains(":") ? "[\(ip)]:\(address.port ?? 0)" : "\(ip):\(address.port ?? 0)"
            )
        }.sorted { $0.name < $1.name }
        status.activity = await proxy.activity()
        status.configVersion = proxy.store.snapshot.config.version
        status.capture = captureState()
        if let gate {
            let counters = gate.counters
            status.gate = AgentStatus.Gate(
                mode: drainStarted == nil ? "capture" : "bypass",
                captured: counters.captured,
                bypassed: counters.bypassed,
                overflows: counters.overflows
            )
        }
        let states = await registrar?.states ?? [:]
        status.services = services.map { service in
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
            api: pilotAPI.map { "\($0)" },
            registration: registrar == nil
                ? "not registering (no services declared in agent.yaml)"
                : "\(states.values.filter(\.registered).count)/\(services.count) services registered"
        )
        status.lastDrain = lastDrain
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
    public var xds: XDSClient.State?

    public init(node: String, state: String) {
        self.node = node
        self.state = state
    }

    enum CodingKeys: String, CodingKey {
        case node, state, drainStarted = "drain_started", listeners, activity, configVersion = "config_version"
        case capture, gate, services, pilot, lastDrain = "last_drain", xds
    }
}
