import Agent
import Foundation
import Logging
import Proxy
import Synchronization
import Testing
import TrellisPolicy
import TrellisTestSupport

#if canImport(Glibc)
import Glibc
#endif

/// Two real `trellis-pilot serve` processes on a real 3-member etcd cluster, and the agent's own
/// xDS client and registrar (and a stock Envoy) given both pilots: a registration made through
/// one pilot reaches a node on the other within a second; SIGKILL one pilot and its nodes move to
/// the other without an endpoint lost or flapping in any node's EDS; SIGKILL an etcd member and
/// everything goes on.
@Suite(
    .serialized,
    .enabled(if: EtcdCluster.missing == nil, "needs etcd (Debian's etcd-server): run scripts/bootstrap.sh")
)
struct PilotFailoverTests {
    static var pilotBinary: String {
        URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent(
            "trellis-pilot"
        ).path
    }

    struct PilotProcess {
        let child: Peers.Child
        let xds: HostPort
        let api: HostPort
        var url: String { "http://127.0.0.1:\(api.port)" }
    }

    static func startPilot(
        _ cluster: EtcdCluster,
        dir: URL,
        name: String,
        xds: HostPort = HostPort(host: "127.0.0.1", port: Peers.freePort()),
        cmdb: String? = nil,
        callTimeout: String = "5s"
    ) async throws -> PilotProcess {
        let api = HostPort(host: "127.0.0.1", port: Peers.freePort())
        let config = dir.appendingPathComponent("\(name).yaml")
        var yaml =
            "store: {backend: etcd, etcd: {endpoints: [\(cluster.endpoints.joined(separator: ", "))], call_timeout: \(callTimeout)}}\n"
        if let cmdb { yaml += "cmdb: {url: \"\(cmdb)\", interval: 1s}\n" }
        try yaml.write(to: config, atomically: true, encoding: .utf8)
        let child = try Peers.Child(
            [
                pilotBinary, "serve", "--config", config.path, "--mesh", dir.appendingPathComponent("none.yaml").path,
                "--xds-address", "\(xds)", "--http-address", "\(api)", "--debounce-ms", "20",
            ],
            output: dir.appendingPathComponent("\(name).log")
        )
        let up = await Peers.eventually(within: .seconds(15)) {
            await Peers.http("GET", "http://127.0.0.1:\(api.port)/readyz").status == 200
        }
        guard up else {
            let log = (try? String(contentsOf: dir.appendingPathComponent("\(name).log"), encoding: .utf8)) ?? ""
            child.stop()
            throw EtcdCluster.ClusterError(message: "pilot \(name) did not become ready:\n\(log.suffix(2000))")
        }
        return PilotProcess(child: child, xds: xds, api: api)
    }

    /// Every endpoint set of the `orders` cluster an xDS client applied, in order.
    final class EndpointHistory: Sendable {
        let sets = Mutex<[[String]]>([])
        func record(_ config: ProxyConfig) {
            guard let cluster = config.clusters.first(where: { $0.name.hasSuffix("|orders") }) else { return }
            let set = cluster.endpoints.filter { $0.health == .healthy }.map { "\($0.address.host):\($0.address.port)" }
                .sorted()
            sets.withLock { $0.append(set) }
        }
        var last: [String] { sets.withLock { $0.last ?? [] } }
        var all: [[String]] { sets.withLock { $0 } }
    }

    static func xdsClient(node: String, pilots: [HostPort], history: EndpointHistory) -> XDSClient {
        var base = AgentListeners.passthroughConfig(sniffTimeout: .seconds(5))
        base.listeners = []
        return XDSClient(pilots: pilots, node: node, base: base, logger: .quiet) { config in history.record(config) }
    }

    @Test(.timeLimit(.minutes(2)))
    func nodesMoveToTheOtherPilotWithoutLosingAnEndpoint() async throws {
        let cluster = try await EtcdCluster()
        defer { cluster.stop() }
        let dir = try Peers.temporaryDirectory("pilot-failover")
        defer { try? FileManager.default.removeItem(at: dir) }
        let one = try await Self.startPilot(cluster, dir: dir, name: "pilot-1")
        defer { one.child.stop() }
        // A stock Envoy with both pilots in its ADS cluster, started while only pilot 1 is up,
        // so that it is on pilot 1 when that one dies.
        let twoXDS = HostPort(host: "127.0.0.1", port: Peers.freePort())
        let adminPort = Peers.freePort()
        let envoy: Peers.Child? =
            try Peers.envoyMissing
            ? nil
            : {
                let file = dir.appendingPathComponent("envoy.yaml")
                try EnvoyBootstrap.yaml(
                    nodeID: "envoy-1",
                    adsPort: one.xds.port,
                    adminPort: adminPort,
                    apiType: "DELTA_GRPC",
                    moreADSPorts: [twoXDS.port]
                ).write(to: file, atomically: true, encoding: .utf8)
                return try Peers.Child(
                    [
                        "envoy", "-c", file.path, "--disable-hot-restart", "-l", "error", "--base-id",
                        "\(Int.random(in: 1000...60000))",
                    ],
                    output: dir.appendingPathComponent("envoy.log")
                )
            }()
        defer { envoy?.stop() }
        if envoy != nil {
            let onOne = await Peers.eventually(within: .seconds(15)) {
                await Peers.http("GET", "\(one.url)/debug/syncz").body.contains("envoy-1")
            }
            #expect(onOne, "Envoy connected to pilot 1")
        }
        let two = try await Self.startPilot(cluster, dir: dir, name: "pilot-2", xds: twoXDS)
        defer { two.child.stop() }

        // vm-a starts on pilot 1, vm-b on pilot 2; each knows both.
        let historyA = EndpointHistory()
        let historyB = EndpointHistory()
        let a = Self.xdsClient(node: "vm-a", pilots: [one.xds, two.xds], history: historyA)
        let b = Self.xdsClient(node: "vm-b", pilots: [two.xds, one.xds], history: historyB)
        let runA = Task { try await a.run() }
        let runB = Task { try await b.run() }
        defer {
            runA.cancel()
            runB.cancel()
        }

        // The registrar of the machine that serves `orders`, with both pilots, on pilot 1 first.
        let registrar = PilotRegistrar(
            node: "vm-orders",
            pilots: [one.api, two.api],
            registerAddress: "127.0.0.1",
            ttl: .seconds(6),
            services: [LocalService(name: "orders", port: 18080)],
            logger: .quiet
        )
        let registering = Task { await registrar.run() }
        defer { registering.cancel() }
        #expect(await Peers.eventually(within: .seconds(5)) { await registrar.states.values.allSatisfy(\.registered) })
        let registered = ContinuousClock.now
        let onB = await Peers.eventually(within: .seconds(1)) { historyB.last == ["127.0.0.1:18080"] }
        #expect(onB, "vm-b (on pilot 2) got pilot 1's registration after \(ContinuousClock.now - registered)")
        #expect(await Peers.eventually(within: .seconds(3)) { historyA.last == ["127.0.0.1:18080"] })
        #expect(a.current.pilot == "\(one.xds)" && b.current.pilot == "\(two.xds)")

        // Pilot 1 dies: vm-a and the registrar move to pilot 2 within seconds; the lease (6 s)
        // is renewed there, so the endpoint never leaves anyone's EDS.
        let applied = (historyA.all.count, historyB.all.count)
        kill(one.child.process.processIdentifier, SIGKILL)
        #expect(
            await Peers.eventually(within: .seconds(5)) {
                a.current.pilot == "\(two.xds)" && a.current.connection == "connected"
            }
        )
        #expect(await Peers.eventually(within: .seconds(5)) { await registrar.pilot == two.api })
        try await Task.sleep(for: .seconds(8))  // more than the lease: renewals went through pilot 2
        for (name, history, first) in [("vm-a", historyA, applied.0), ("vm-b", historyB, applied.1)] {
            let since = history.all.dropFirst(max(first - 1, 0))
            #expect(
                since.allSatisfy { $0 == ["127.0.0.1:18080"] },
                "\(name)'s EDS after the failover never lost the endpoint: \(since)"
            )
        }

        // An etcd member dies too: a new registration through pilot 2 still reaches everyone,
        // Envoy included (it moved to pilot 2 as well).
        // (If it was etcd's leader, a registration during the election waits for it, or on a
        // loaded machine gets a 503 that an agent retries.)
        cluster.kill(0)
        var answers: [Int] = []
        let second = await Peers.eventually(within: .seconds(15)) {
            let status = await Peers.http(
                "POST",
                "\(two.url)/v1/instances",
                body:
                    #"{"service": "orders", "address": "127.0.0.2", "port": 18080, "node": "vm-orders-2", "ttl_seconds": 30}"#
            ).status
            answers.append(status)
            return status == 201
        }
        #expect(second, "registration with one etcd member down: \(answers)")
        let both = ["127.0.0.1:18080", "127.0.0.2:18080"]
        #expect(await Peers.eventually(within: .seconds(3)) { historyA.last == both && historyB.last == both })
        if envoy != nil {
            let seen = await Peers.eventually(within: .seconds(20)) {
                let clusters = await Peers.http("GET", "http://127.0.0.1:\(adminPort)/clusters").body
                return clusters.contains("127.0.0.2:18080") && clusters.contains("127.0.0.1:18080")
            }
            #expect(seen, "Envoy, given both pilots, failed over and got the new endpoint")
            #expect(await Peers.http("GET", "\(two.url)/debug/syncz").body.contains("envoy-1"), "Envoy is on pilot 2")
        }
    }

    /// The CMDB poller runs on one pilot at a time and moves when that pilot dies; without
    /// etcd's quorum a pilot says it is not ready, refuses registrations (503) and keeps serving
    /// xDS from its last snapshot, and it recovers when quorum returns.
    @Test(.timeLimit(.minutes(2)))
    func oneCMDBPollerAndAPilotWithoutQuorum() async throws {
        let cluster = try await EtcdCluster()
        defer { cluster.stop() }
        let dir = try Peers.temporaryDirectory("pilot-quorum")
        defer { try? FileManager.default.removeItem(at: dir) }
        // A CMDB: Python's http.server, which logs every request it answers.
        let cmdbDir = dir.appendingPathComponent("cmdb")
        try FileManager.default.createDirectory(at: cmdbDir, withIntermediateDirectories: true)
        try #"{"machines": [{"hostname": "vm-orders", "region": "eu", "zone": "eu-1b"}]}"#
            .write(to: cmdbDir.appendingPathComponent("machines.json"), atomically: true, encoding: .utf8)
        let cmdbPort = Peers.freePort()
        let cmdbLog = dir.appendingPathComponent("cmdb.log")
        let cmdb = try Peers.Child(
            ["python3", "-u", "-m", "http.server", "\(cmdbPort)", "--bind", "127.0.0.1", "--directory", cmdbDir.path],
            output: cmdbLog
        )
        defer { cmdb.stop() }
        func polls() -> Int {
            ((try? String(contentsOf: cmdbLog, encoding: .utf8)) ?? "").components(separatedBy: "GET /machines.json")
                .count
                - 1
        }
        let url = "http://127.0.0.1:\(cmdbPort)/machines.json"

        // Pilot 1 alone: it is elected and polls; then pilot 2 joins and does not poll too.
        let one = try await Self.startPilot(cluster, dir: dir, name: "pilot-1", cmdb: url, callTimeout: "2s")
        defer { one.child.stop() }
        #expect(await Peers.eventually(within: .seconds(10)) { polls() >= 1 }, "pilot 1 polls the CMDB")
        let two = try await Self.startPilot(cluster, dir: dir, name: "pilot-2", cmdb: url, callTimeout: "2s")
        defer { two.child.stop() }
        let before = polls()
        try await Task.sleep(for: .seconds(5))
        let inFive = polls() - before
        #expect((3...7).contains(inFive), "one poller at 1 s: \(inFive) polls in 5 s")

        // The metadata pilot 1 polled reaches pilot 2's instances.
        let status = await Peers.http(
            "POST",
            "\(two.url)/v1/instances",
            body:
                #"{"service": "orders", "address": "127.0.0.1", "port": 18080, "node": "vm-orders", "ttl_seconds": 30}"#
        ).status
        #expect(status == 201)
        #expect(
            await Peers.eventually(within: .seconds(3)) {
                await Peers.http("GET", "\(two.url)/v1/instances?service=orders").body.contains("eu-1b")
            },
            "pilot 2 merges the CMDB's zone"
        )

        // Pilot 1 dies: pilot 2 is elected once pilot 1's election lease runs out (5 s).
        kill(one.child.process.processIdentifier, SIGKILL)
        let afterKill = polls()
        #expect(
            await Peers.eventually(within: .seconds(12)) { polls() >= afterKill + 2 },
            "pilot 2 took over the poller"
        )

        // A node on pilot 2.
        let history = EndpointHistory()
        let node = Self.xdsClient(node: "vm-a", pilots: [two.xds], history: history)
        let running = Task { try await node.run() }
        defer { running.cancel() }
        #expect(await Peers.eventually(within: .seconds(5)) { history.last == ["127.0.0.1:18080"] })

        // Quorum lost: not ready, registrations refused, the node keeps its stream and its EDS.
        cluster.kill(1)
        cluster.kill(2)
        let notReady = await Peers.eventually(within: .seconds(10)) {
            await Peers.http("GET", "\(two.url)/readyz").status == 503
        }
        #expect(notReady, "pilot 2 says it is not ready")
        #expect(await Peers.http("GET", "\(two.url)/readyz").body.contains("etcd"))
        let refused = await Peers.http(
            "POST",
            "\(two.url)/v1/instances",
            body:
                #"{"service": "orders", "address": "127.0.0.2", "port": 18080, "node": "vm-orders-2", "ttl_seconds": 30}"#
        )
        #expect(refused.status == 503, "\(refused)")
        #expect(node.current.connection == "connected" && history.last == ["127.0.0.1:18080"])
        #expect(await Peers.http("GET", "\(two.url)/healthz").status == 200, "alive, if not ready")

        // Quorum back: ready, and registrations reach the node.
        try cluster.start(1)
        #expect(
            await Peers.eventually(within: .seconds(20)) { await Peers.http("GET", "\(two.url)/readyz").status == 200 }
        )
        // Ready again; a registration may still meet the new leader's first moments (503, which
        // an agent retries).
        let again = await Peers.eventually(within: .seconds(10)) {
            await Peers.http(
                "POST",
                "\(two.url)/v1/instances",
                body:
                    #"{"service": "orders", "address": "127.0.0.2", "port": 18080, "node": "vm-orders-2", "ttl_seconds": 30}"#
            ).status == 201
        }
        #expect(again)
        #expect(
            await Peers.eventually(within: .seconds(3)) { history.last == ["127.0.0.1:18080", "127.0.0.2:18080"] }
        )
    }
}
