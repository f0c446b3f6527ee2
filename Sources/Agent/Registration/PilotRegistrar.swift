import FoundationEssentials
public import Logging
public import TrellisHTTP
public import TrellisPolicy

/// Registers this machine's services with pilot's HTTP API and keeps them current: a lease renewed
/// every third of its TTL (an instance pilot no longer knows is registered again), health checks
/// with thresholds whose changes are reported, drain and undrain for the whole node, and
/// deregistration on the way out. Every request goes to the current pilot of the list; one that
/// does not answer (or answers 503: it cannot reach its store) is left for the next, and the
/// agent stays on whichever answered. With pilots that share a store (etcd), registrations and
/// their leases follow the agent to any of them. Pilot being unreachable is retried with
/// back-off; the local services keep running whatever pilot says.
public actor PilotRegistrar {
    public enum ReportedStatus: String, Sendable {
        case healthy, unhealthy, draining
    }

    /// What the agent knows of one service, for `trellis-agent status`.
    public struct ServiceState: Sendable, Equatable {
        public var registered = false
        public var healthy = true
        public var lastError: String?
    }

    let node: String
    /// The pilots' HTTP API addresses, tried in turn.
    let pilots: [HostPort]
    private var currentPilot = 0
    let address: String
    let ttl: Duration
    let services: [LocalService]
    let locality: Locality
    let client: HTTPClient
    let logger: Logger
    /// Where health checks connect (the local program).
    let checkHost: String
    public private(set) var draining = false
    public private(set) var states: [String: ServiceState] = [:]

    public init(
        node: String,
        pilots: [HostPort],
        registerAddress: String,
        ttl: Duration,
        services: [LocalService],
        locality: Locality = Locality(),
        checkHost: String = "127.0.0.1",
        client: HTTPClient = HTTPClient(),
        draining: Bool = false,
        logger: Logger
    ) {
        self.draining = draining
        self.node = node
        precondition(!pilots.isEmpty, "PilotRegistrar needs a pilot address")
        self.pilots = pilots
        self.address = registerAddress
        self.ttl = ttl
        self.services = services
        self.locality = locality
        self.checkHost = checkHost
        self.client = client
        self.logger = logger
        for service in services { states[Self.key(service)] = ServiceState() }
    }

    static func key(_ service: LocalService) -> String { "\(service.name):\(service.servicePort)" }

    /// The pilot the agent talks to now (`status`).
    public var pilot: HostPort { pilots[currentPilot] }

    /// One request to the current pilot; when it does not answer, or answers 503, to the next
    /// ones in turn. The first other answer (the agent then stays on that pilot), or the last
    /// failure.
    func send(
        _ method: String,
        _ path: String,
        json: String? = nil,
        timeout: Duration = .seconds(5)
    ) async throws
        -> HTTPClient.Response
    {
        var failure: any Error = HTTPClient.Failure("no pilot to ask")
        for attempt in 0..<pilots.count {
            let index = (currentPilot + attempt) % pilots.count
            let pilot = pilots[index]
            do {
                let response = try await client.request(
                    method,
                    HTTPClient.URL(host: pilot.host, port: pilot.port, path: path),
                    json: json,
                    timeout: timeout
                )
                if response.status == 503, attempt < pilots.count - 1 {
                    failure = HTTPClient.Failure("pilot \(pilot) answered 503: \(response.text)")
                    continue
                }
                if index != currentPilot {
                    logger.notice(
                        "pilot changed",
                        metadata: ["from": "\(pilots[currentPilot])", "to": "\(pilot)", "because": "\(failure)"]
                    )
                    currentPilot = index
                }
                return response
            } catch {
                failure = error
            }
        }
        throw failure
    }

    /// Runs every service's loop until cancelled.
    public func run() async {
        await withTaskGroup(of: Void.self) { group in
            for service in services {
                group.addTask { await self.loop(service) }
            }
        }
    }

    // MARK: Drain

    /// Marks every instance of this node draining in pilot (peers stop sending new requests).
    public func drain() async throws {
        draining = true
        let response = try await send(
            "PUT",
            "/v1/nodes/\(Self.pathSegment(node))/status",
            json: #"{"status": "draining"}"#
        )
        guard response.status == 200 else {
            throw HTTPClient.Failure("pilot answered \(response.status): \(response.text)")
        }
        logger.info("node draining", metadata: ["node": "\(node)"])
    }

    /// Reports each service's health again instead of draining.
    public func undrain() async throws {
        draining = false
        for service in services {
            try await report(service, status: (states[Self.key(service)]?.healthy ?? true) ? .healthy : .unhealthy)
        }
        logger.info("node no longer draining", metadata: ["node": "\(node)"])
    }

    /// Removes this node's instances from pilot (best effort; the leases would run out anyway).
    public func deregisterAll() async {
        await deregister(instanceKeys)
    }

    /// The instances this registrar keeps registered, as `service/address/port`.
    public nonisolated var instanceKeys: [String] {
        services.map { "\($0.name)/\(address)/\($0.port)" }
    }

    /// Removes the named instances (``instanceKeys``) from pilot, best effort.
    public func deregister(_ keys: [String]) async {
        let wanted = Set(keys)
        for service in services where wanted.contains("\(service.name)/\(address)/\(service.port)") {
            let path = "/v1/instances/\(service.name)/\(address)/\(service.port)"
            let response = try? await send("DELETE", path, timeout: .seconds(2))
            if response?.status == 204 { states[Self.key(service)]?.registered = false }
        }
    }

    // MARK: One service

    private func status(_ service: LocalService) -> ReportedStatus {
        draining ? .draining : ((states[Self.key(service)]?.healthy ?? true) ? .healthy : .unhealthy)
    }

    private func update(_ service: LocalService, _ change: (inout ServiceState) -> Void) {
        change(&states[Self.key(service), default: ServiceState()])
    }

    private nonisolated func loop(_ service: LocalService) async {
        let clock = ContinuousClock()
        var health = HealthState(healthy: true)
        if let check = service.healthCheck {
            // The first answer decides the status registered with; thresholds apply afterwards.
            health = HealthState(
                healthy: await HealthProbe.check(check, host: checkHost, port: service.port, client: client)
            )
            await update(service) { $0.healthy = health.healthy }
        }
        var nextCheck = clock.now + (service.healthCheck?.interval ?? .seconds(3600))
        var nextRenew = clock.now
        var backoff: Duration = .milliseconds(500)
        var registered = false
        while !Task.isCancelled {
            if !registered {
                do {
                    try await register(service)
                    registered = true
                    backoff = .milliseconds(500)
                    nextRenew = clock.now + ttl / 3
                } catch {
                    await update(service) { $0.lastError = "\(error)" }
                    try? await Task.sleep(for: backoff)
                    backoff = min(backoff * 2, .seconds(10))
                    continue
                }
            }
            if let check = service.healthCheck, clock.now >= nextCheck {
                let ok = await HealthProbe.check(check, host: checkHost, port: service.port, client: client)
                nextCheck = clock.now + check.interval
                if health.record(ok, check) {
                    await update(service) { $0.healthy = health.healthy }
                    logger.notice(
                        "health changed",
                        metadata: ["service": "\(Self.key(service))", "healthy": "\(health.healthy)"]
                    )
                    do {
                        try await report(service, status: await status(service))
                    } catch {
                        registered = false  // registering again carries the current status
                    }
                }
            }
            if clock.now >= nextRenew {
                do {
                    let response = try await send(
                        "PUT",
                        "/v1/instances/\(service.name)/\(address)/\(service.port)/lease"
                    )
                    if response.status == 404 {
                        logger.notice(
                            "pilot does not know this instance; registering again",
                            metadata: ["service": "\(Self.key(service))"]
                        )
                        registered = false
                        continue
                    }
                    guard response.status == 200 else { throw HTTPClient.Failure("pilot answered \(response.status)") }
                    nextRenew = clock.now + ttl / 3
                } catch {
                    await update(service) { $0.lastError = "\(error)" }
                    nextRenew = clock.now + .seconds(1)
                }
            }
            let wake = min(nextRenew, service.healthCheck == nil ? nextRenew : nextCheck)
            try? await Task.sleep(until: wake, clock: clock)
        }
    }

    private func register(_ service: LocalService) async throws {
        let labels = service.labels.map { "\(Self.quote($0.key)): \(Self.quote($0.value))" }.sorted().joined(
            separator: ", "
        )
        let json = """
            {"service": \(Self.quote(service.name)), "address": \(Self.quote(address)), "port": \(service.port),
             "service_port": \(service.servicePort), "protocol": "\(service.serviceProtocol.rawValue)",
             "node": \(Self.quote(node)), "labels": {\(labels)}, "weight": \(service.weight),
             "region": \(Self.quote(locality.region)), "zone": \(Self.quote(locality.zone)),
             "subzone": \(Self.quote(locality.subzone)),
             "status": "\(status(service).rawValue)", "ttl_seconds": \(ttl.components.seconds)}
            """
        let response = try await send("POST", "/v1/instances", json: json)
        guard response.status == 200 || response.status == 201 else {
            // A refusal (a conflict, a bad name) is logged with pilot's reason; it is retried, since
            // the operator may fix the other side.
            logger.error(
                "pilot refused the registration",
                metadata: [
                    "service": "\(Self.key(service))", "status": "\(response.status)", "answer": "\(response.text)",
                ]
            )
            throw HTTPClient.Failure("pilot answered \(response.status): \(response.text)")
        }
        update(service) {
            $0.registered = true
            $0.lastError = nil
        }
        logger.info(
            "registered with pilot",
            metadata: ["service": "\(Self.key(service))", "status": "\(status(service).rawValue)"]
        )
    }

    private func report(_ service: LocalService, status: ReportedStatus) async throws {
        let response = try await send(
            "PUT",
            "/v1/instances/\(service.name)/\(address)/\(service.port)/status",
            json: #"{"status": "\#(status.rawValue)"}"#
        )
        guard response.status == 200 else {
            throw HTTPClient.Failure("pilot answered \(response.status): \(response.text)")
        }
    }

    /// `text` as one URL path segment: unreserved characters kept, every other byte
    /// percent-encoded (a node id may hold `#`, `?` or `%`).
    static func pathSegment(_ text: String) -> String {
        let hex = Array("0123456789ABCDEF")
        var out = ""
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"),
                UInt8(ascii: "~"):
                out.append(Character(Unicode.Scalar(byte)))
            default:
                out += "%" + String(hex[Int(byte >> 4)]) + String(hex[Int(byte & 0xF)])
            }
        }
        return out
    }

    static func quote(_ s: String) -> String {
        let data = (try? JSONEncoder().encode(s)) ?? Data("\"\"".utf8)
        return String(decoding: data, as: UTF8.self)
    }
}
