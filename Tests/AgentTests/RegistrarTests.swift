import Agent
import Foundation
import GatewayConfig
import Interceptor
import Pilot
import Testing
import TrellisConfig
import TrellisPolicy
import TrellisTestSupport

/// The agent's registration with a real pilot (in-process, real HTTP) and health checks against a
/// real local program (Python's http.server).
@Suite(.serialized)
struct RegistrarTests {
    static let examples = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("examples")

    @Test func theExampleAgentFileLoads() throws {
        let url = Self.examples.appendingPathComponent("agent.yaml")
        let config = try AgentConfigLoader.parse(yaml: try String(contentsOf: url, encoding: .utf8), file: url.path)
        #expect(config.node == "vm-orders-1" && config.pilotAPI == [HostPort(host: "10.0.0.10", port: 15014)])
        #expect(config.locality == Locality(region: "eu-west", zone: "eu-west-1a"))
        #expect(config.services.map(\.name) == ["orders", "billing-db"])
        #expect(
            config.services[0].healthCheck?.kind == .http(path: "/healthz", host: nil, expectedStatuses: [200...399])
        )
        #expect(
            config.services[1].healthCheck?.kind == .tcp && config.services[1].healthCheck?.interval == .seconds(10)
        )
        #expect(config.leaseTTL == .seconds(30) && config.drainDeadline == .seconds(30))
        // Several pilots that share a store: each is tried in turn.
        let several = try AgentConfigLoader.parse(
            yaml: "pilot: {api: [10.0.0.1:15014, \"[fd00::2]:15014\"], xds: pilots.internal:15010}\n",
            file: "agent.yaml"
        )
        #expect(several.pilotAPI == [HostPort(host: "10.0.0.1", port: 15014), HostPort(host: "fd00::2", port: 15014)])
        #expect(several.pilotXDS == [HostPort(host: "pilots.internal", port: 15010)])
        #expect(config.inboundForward == .loopback)
        let original = try AgentConfigLoader.parse(yaml: "inbound_forward: original_destination\n", file: "a.yaml")
        #expect(original.inboundForward == .originalDestination)
        // The access log: stdout in the example, the rotated file in what the package installs.
        #expect(config.accessLog == AccessLogSettings(output: .stdout, sampleRate: 1))
        let installed = Self.examples.deletingLastPathComponent().appendingPathComponent("init/agent.yaml")
        let packaged = try AgentConfigLoader.parse(
            yaml: try String(contentsOf: installed, encoding: .utf8),
            file: "a.yaml"
        )
        #expect(packaged.accessLog == AccessLogSettings(output: .file("/var/log/trellis/access.log"), sampleRate: 1))
        #expect(try AgentConfigLoader.parse(yaml: "node: a\n", file: "a.yaml").accessLog == nil)
        #expect(config.tracing == TracingSettings(collectorHost: "10.0.0.10", collectorPort: 4317, sampleRate: 0.01))
        let traced = try AgentConfigLoader.parse(
            yaml: "tracing: {collector: \"[::1]:4317\", sample_rate: 0, service_name: vm-orders}\n",
            file: "a.yaml"
        )
        #expect(
            traced.tracing
                == TracingSettings(collectorHost: "::1", collectorPort: 4317, sampleRate: 0, serviceName: "vm-orders")
        )
        let withToken = try AgentConfigLoader.parse(
            yaml: "tracing: {collector: 127.0.0.1:4317, headers: {authorization: \"Bearer abc\", x-tenant: a}}\n",
            file: "a.yaml"
        )
        #expect(withToken.tracing?.headers == ["authorization": "Bearer abc", "x-tenant": "a"])
    }

    /// The fail-open gate is on unless a file turns it off; the admin listener stays on loopback
    /// unless a file opens it.
    @Test func theGateIsOnByDefaultAndTheAdminAddressIsConfigurable() throws {
        let bare = try AgentConfigLoader.parse(yaml: "node: vm-a\n", file: "agent.yaml")
        #expect(bare.capture.gate == CaptureConfig.Gate(queue: 15000, mark: 0x1))
        #expect(bare.adminAddress == HostPort(host: "127.0.0.1", port: 15000))
        let section = try AgentConfigLoader.parse(yaml: "capture: {inbound_ports: [8080]}\n", file: "agent.yaml")
        #expect(section.capture.gate == CaptureConfig.Gate())
        let off = try AgentConfigLoader.parse(yaml: "capture: {gate: off}\n", file: "agent.yaml")
        #expect(off.capture.gate == nil)
        let custom = try AgentConfigLoader.parse(
            yaml: "capture: {gate: {queue: 7, mark: 0x4}}\nadmin: {address: \"0.0.0.0:15090\"}\n",
            file: "agent.yaml"
        )
        #expect(custom.capture.gate == CaptureConfig.Gate(queue: 7, mark: 0x4))
        #expect(custom.adminAddress == HostPort(host: "0.0.0.0", port: 15090))
        for file in ["init/agent.yaml", "examples/agent.yaml"] {
            let url = Self.examples.deletingLastPathComponent().appendingPathComponent(file)
            let config = try AgentConfigLoader.parse(yaml: try String(contentsOf: url, encoding: .utf8), file: file)
            #expect(config.capture.gate != nil, "\(file): the gate must be on in what users install and copy")
        }
    }

    @Test(arguments: [
        ("services: [{name: web, port: 80}]\n", "services are listed but pilot.api is missing"),
        (
            "pilot: {api: 127.0.0.1:15014}\nregister: {address: 10.0.0.1}\nservices: [{name: Web, port: 80}]\n",
            "services[0].name: expected lowercase"
        ),
        (
            "pilot: {api: 127.0.0.1:15014}\nregister: {address: 10.0.0.1}\nservices: [{name: web, port: 80, health_check: {http: /h, tcp: true}}]\n",
            "services[0].health_check: expected exactly one of http or tcp"
        ),
        (
            "pilot: {api: 127.0.0.1:15014}\nregister: {address: 10.0.0.1}\nservices: [{name: web, port: 80, health_check: {http: /h, interval: 1s, timeout: 2s}}]\n",
            "services[0].health_check.timeout: expected a timeout no longer than the interval"
        ),
        ("register: {address: vm-b.local}\n", "register.address: expected an IPv4 or IPv6 address"),
        ("locality: {zone: \"eu west\"}\n", "locality.zone: expected letters, digits, '-', '_' and '.'"),
        ("locality: {datacenter: x}\n", "locality.datacenter: unknown key 'datacenter'"),
        ("register: {ttl: 1s}\n", "register.ttl: expected a lease between 5s and 1h"),
        ("inbound_forward: localhost\n", "inbound_forward: expected loopback or original_destination, got 'localhost'"),
        ("pilot: {xds: 127.0.0.1:15010, xds_protocol: v2}\n", "pilot.xds_protocol: expected delta or sotw, got 'v2'"),
        ("state_dir: var/lib\n", "state_dir: expected an absolute path"),
        ("pilot: {api: nowhere}\n", "pilot.api: expected host:port"),
        ("pilot: {api: [10.0.0.1:15014, nowhere]}\n", "pilot.api[1]: expected host:port"),
        ("pilot: {xds: []}\n", "pilot.xds: expected host:port or a list of them, got an empty list"),
        ("pilot: {xds: [10.0.0.1:15010, 10.0.0.1:15010]}\n", "pilot.xds[1]: 10.0.0.1:15010 is listed twice"),
        ("nodes: x\n", "nodes: unknown key 'nodes'"),
        // Keys that were accepted and ignored before: now refused like any unknown key.
        ("listeners: []\n", "listeners: unknown key 'listeners'"),
        ("node: a\nnode: b\n", "'node' given twice in one mapping at line"),
        (
            "capture: {inbound_ports: [8080, 15006]}\n",
            "agent.yaml:1:33: capture.inbound_ports[1]: port 15006 is Trellis's own",
        ),
        ("admin: {port: 15000}\n", "admin.port: unknown key 'port'"),
        ("admin: {address: localhost:15000}\n", "admin.address: expected an IP address and port"),
        ("capture: {gate: maybe}\n", "capture.gate: expected a mapping {queue, mark}, on or off, got 'maybe'"),
        ("capture: {gate: {queue: 70000}}\n", "capture.gate.queue"),
        ("access_log: {output: access.log}\n", "access_log.output: expected stdout, stderr or an absolute file path"),
        ("access_log: {sample_rate: -1}\n", "access_log.sample_rate: expected a number above 0 and at most 1"),
        ("tracing: {sample_rate: 0.1}\n", "tracing: missing required key 'collector'"),
        ("tracing: {collector: collector}\n", "tracing.collector: expected host:port"),
        (
            "tracing: {collector: 127.0.0.1:4317, sample_rate: 5}\n",
            "tracing.sample_rate: expected a number above 0 and at most 1"
        ),
        ("tracing: {collector: 127.0.0.1:4317, service_name: \"my app\"}\n", "tracing.service_name: expected a name"),
        ("tracing: {collector: 127.0.0.1:4317, exporter: zipkin}\n", "tracing.exporter: unknown key 'exporter'"),
        (
            "tracing: {collector: 127.0.0.1:4317, headers: {Authorization: x}}\n",
            "tracing.headers: expected header names of lower-case letters, digits, '-', '_' and '.'"
        ),
        (
            "tracing: {collector: 127.0.0.1:4317, headers: {grpc-timeout: 1S}}\n",
            "tracing.headers: expected header names of lower-case letters, digits, '-', '_' and '.', not 'grpc-…'"
        ),
        (
            "tracing: {collector: 127.0.0.1:4317, headers: {authorization: \"a\\nb\"}}\n",
            "tracing.headers: expected the value of header 'authorization' to be at most 8192 printable ASCII characters"
        ),
    ])
    func badAgentFilesNameTheKeyAndWhatWasExpected(yaml: String, expected: String) {
        do {
            _ = try AgentConfigLoader.parse(yaml: yaml, file: "agent.yaml")
            Issue.record("accepted: \(yaml)")
        } catch {
            #expect(error.description.contains(expected), "\(error)")
        }
    }

    /// The instance pilot lists for `port`, or nil.
    static func listed(_ pilot: PilotHarness, port: Int) async -> String? {
        let body = await Peers.http("GET", "\(pilot.api)/v1/instances?service=web").body
        return body.components(separatedBy: "},{").first { $0.contains("\"port\":\(port),") }
    }

    /// A "billion laughs" file (ten levels of ten aliases, the last used as a key) made every
    /// loader spin forever; each refuses it now within a second, naming the file and why. A deep
    /// nesting is refused the same way; a small alias still loads.
    @Test func aliasBombsAreRefusedQuicklyByEveryLoader() throws {
        let loaders: [(String, (String) -> String?)] = [
            (
                "agent.yaml",
                { yaml in Self.failure { _ = try AgentConfigLoader.parse(yaml: yaml, file: "agent.yaml") } }
            ),
            ("capture", { yaml in Self.failure { _ = try CaptureConfigLoader.parse(yaml: yaml, file: "agent.yaml") } }),
            (
                "gateway",
                { yaml in Self.failure { _ = try GatewayConfigLoader.parse(yaml: yaml, file: "gateway.yaml") } }
            ),
            ("mesh.yaml", { yaml in Self.failure { _ = try MeshConfigLoader.parse(yaml: yaml, file: "mesh.yaml") } }),
        ]
        let deep = String(repeating: "[", count: 300) + String(repeating: "]", count: 300) + "\n"
        for (name, load) in loaders {
            let clock = ContinuousClock()
            let started = clock.now
            let bomb = load(AliasBombs.tenLevels) ?? "accepted"
            #expect(clock.now - started < .seconds(1), "\(name): took \(clock.now - started)")
            #expect(bomb.contains("an alias bomb"), "\(name): \(bomb)")
            // Line 6: level 5 alone expands to a million nodes.
            #expect(bomb.contains(".yaml:6:"), "\(name): the line where the budget ran out: \(bomb)")
            let nested = load(deep) ?? "accepted"
            #expect(nested.contains("nest deeper than 256 levels"), "\(name): \(nested)")
        }
        let small = try AgentConfigLoader.parse(
            yaml: "pilot: &p {api: 127.0.0.1:15014}\nregister: {address: 10.0.0.1}\nservices: [{name: a, port: 80}]\n",
            file: "agent.yaml"
        )
        #expect(small.services.count == 1)
    }

    static func failure(_ body: () throws -> Void) -> String? {
        do {
            try body()
            return nil
        } catch {
            return "\(error)"
        }
    }

    /// A node id that must be percent-encoded in a URL path (`rb-pct#1`): the registrar encodes
    /// it, pilot decodes it, and the drain reaches the node's instance.
    @Test func aNodeIDThatNeedsEncodingIsDrained() async throws {
        let xdsPort = Peers.freePort()
        let httpPort = Peers.freePort()
        let appPort = Peers.freePort()
        let registrar = PilotRegistrar(
            node: "rb-pct#1",
            pilots: [HostPort(host: "127.0.0.1", port: httpPort)],
            registerAddress: "127.0.0.1",
            ttl: .seconds(30),
            services: [LocalService(name: "web", port: appPort)],
            logger: .quiet
        )
        let running = Task { await registrar.run() }
        defer { running.cancel() }
        try await PilotHarness.run(store: try SQLiteRegistryStore(), xdsPort: xdsPort, httpPort: httpPort) { pilot in
            #expect(await Peers.eventually(within: .seconds(5)) { await Self.listed(pilot, port: appPort) != nil })
            try await registrar.drain()
            let listed = await Self.listed(pilot, port: appPort) ?? ""
            #expect(listed.contains(#""node":"rb-pct#1""#) && listed.contains(#""status":"draining""#), "\(listed)")
        }
    }

    @Test func servicesAreRegisteredKeptAliveHealthCheckedDrainedAndRegisteredAgainAfterAPilotRestart() async throws {
        let dir = try Peers.temporaryDirectory("registrar")
        defer { try? FileManager.default.removeItem(at: dir) }
        let appPort = Peers.freePort()
        let app = try Peers.pythonHTTPServer(port: appPort, body: "ok", root: dir)
        defer { app.stop() }
        let healthz = dir.appendingPathComponent("upstream-\(appPort)/healthz")
        try "ok".write(to: healthz, atomically: true, encoding: .utf8)
        let check = HealthCheck(
            kind: .http(path: "/healthz", host: nil, expectedStatuses: [200...299]),
            interval: .milliseconds(200),
            timeout: .milliseconds(150),
            healthyThreshold: 2,
            unhealthyThreshold: 2
        )
        let tcpCheck = HealthCheck(
            kind: .tcp,
            interval: .milliseconds(200),
            timeout: .milliseconds(150),
            healthyThreshold: 1,
            unhealthyThreshold: 2
        )
        let xdsPort = Peers.freePort()
        let httpPort = Peers.freePort()

        let registrar = PilotRegistrar(
            node: "vm-test",
            pilots: [HostPort(host: "127.0.0.1", port: httpPort)],
            registerAddress: "127.0.0.1",
            ttl: .seconds(5),
            services: [
                LocalService(
                    name: "web",
                    port: appPort,
                    servicePort: 8080,
                    labels: ["version": "v1"],
                    healthCheck: check
                ),
                LocalService(name: "web-tcp", port: appPort, serviceProtocol: .tcp, healthCheck: tcpCheck),
            ],
            logger: .quiet
        )
        let running = Task { await registrar.run() }
        defer { running.cancel() }

        try await PilotHarness.run(store: try SQLiteRegistryStore(), xdsPort: xdsPort, httpPort: httpPort) { pilot in
            #expect(
                await Peers.eventually(within: .seconds(5)) {
                    await Self.listed(pilot, port: appPort)?.contains("\"status\":\"healthy\"") == true
                }
            )
            let listed = await Self.listed(pilot, port: appPort) ?? ""
            #expect(
                listed.contains("\"node\":\"vm-test\"") && listed.contains("\"service_port\":8080")
                    && listed.contains("\"version\":\"v1\"")
            )

            // The health check fails (404): unhealthy after two failures; back after two successes.
            try FileManager.default.removeItem(at: healthz)
            #expect(
                await Peers.eventually(within: .seconds(5)) {
                    await Self.listed(pilot, port: appPort)?.contains("\"status\":\"unhealthy\"") == true
                }
            )
            try "ok".write(to: healthz, atomically: true, encoding: .utf8)
            #expect(
                await Peers.eventually(within: .seconds(5)) {
                    await Self.listed(pilot, port: appPort)?.contains("\"status\":\"healthy\"") == true
                }
            )

            // Drain and undrain the node.
            try await registrar.drain()
            #expect(await Self.listed(pilot, port: appPort)?.contains("\"status\":\"draining\"") == true)
            try await registrar.undrain()
            #expect(await Self.listed(pilot, port: appPort)?.contains("\"status\":\"healthy\"") == true)

            // Leases are renewed: still there after more than a TTL.
            try await Task.sleep(for: .seconds(6))
            #expect(await Self.listed(pilot, port: appPort) != nil)
        }

        // A new pilot that lost everything (memory store): the agent registers again.
        try await PilotHarness.run(store: try SQLiteRegistryStore(), xdsPort: xdsPort, httpPort: httpPort) { pilot in
            #expect(await Peers.eventually(within: .seconds(6)) { await Self.listed(pilot, port: appPort) != nil })
            #expect(
                await Peers.eventually(within: .seconds(6)) {
                    let tcp = await Peers.http("GET", "\(pilot.api)/v1/instances?service=web-tcp").body
                    return tcp.contains("\"protocol\":\"tcp\"") && tcp.contains("\"status\":\"healthy\"")
                }
            )

            // The program stops: both checks fail.
            app.stop()
            #expect(
                await Peers.eventually(within: .seconds(5)) {
                    await Peers.http("GET", "\(pilot.api)/v1/instances?service=web-tcp").body.contains(
                        "\"status\":\"unhealthy\""
                    )
                }
            )

            // On the way out the agent deregisters.
            running.cancel()
            await registrar.deregisterAll()
            #expect(await Peers.http("GET", "\(pilot.api)/v1/instances").body == "[]")
        }
    }
}
