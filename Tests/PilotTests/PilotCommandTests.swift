import Foundation
import Testing
import TrellisPolicy
import TrellisTestSupport

@testable import Pilot

#if canImport(Glibc)
import Glibc
#endif

/// `trellis-pilot` as an operator runs it: the real binary, its exit codes and messages, mesh.yaml
/// reloads (on change and SIGHUP), and SIGTERM.
@Suite(.serialized)
struct PilotCommandTests {
    /// The `trellis-pilot` built next to this test bundle (`swift build --build-tests` builds both).
    static var binary: String {
        URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent(
            "trellis-pilot"
        ).path
    }

    static let examples = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("examples")

    /// Runs the binary to completion (bounded); its status and what it printed.
    static func run(_ arguments: [String]) async throws -> (status: Int32, output: String) {
        let dir = try Peers.temporaryDirectory("pilot-cli")
        defer { try? FileManager.default.removeItem(at: dir) }
        let log = dir.appendingPathComponent("out")
        let child = try Peers.Child([binary] + arguments, output: log)
        _ = await Peers.eventually(within: .seconds(20)) { !child.process.isRunning }
        child.stop()
        return (child.process.terminationStatus, (try? String(contentsOf: log, encoding: .utf8)) ?? "")
    }

    @Test func checkMeshAcceptsTheExampleAndRefusesABadFileWithWhereAndWhat() async throws {
        let example = Self.examples.appendingPathComponent("mesh.yaml").path
        let ok = try await Self.run(["check-mesh", example])
        #expect(ok.status == 0 && ok.output.contains("\(example): ok (4 services, 1 gateways"), "\(ok)")

        let dir = try Peers.temporaryDirectory("pilot-cli-bad")
        defer { try? FileManager.default.removeItem(at: dir) }
        let bad = dir.appendingPathComponent("mesh.yaml")
        try "services:\n  - {name: web, port: 8080}\nroutes:\n  - service: api:80\n    rules: []\n".write(
            to: bad,
            atomically: true,
            encoding: .utf8
        )
        let refused = try await Self.run(["check-mesh", bad.path])
        #expect(refused.status == 1)
        #expect(
            refused.output.contains(
                "\(bad.path):4:14: routes[0].service: service 'api:80' is not declared under services:"
            ),
            "\(refused)"
        )
        // serve refuses to start on it too.
        let serve = try await Self.run([
            "serve", "--store", "memory", "--mesh", bad.path, "--xds-address", "127.0.0.1:0", "--http-address",
            "127.0.0.1:0",
        ])
        #expect(serve.status == 1 && serve.output.contains("routes[0].service"), "\(serve)")
        // Said as it is: there is no running configuration to keep at the start.
        #expect(serve.output.contains("pilot does not start") && !serve.output.contains("stays"), "\(serve)")
    }

    @Test func badFlagsAreRefusedWithTheFlagNamed() async throws {
        let address = try await Self.run(["serve", "--xds-address", "nowhere"])
        #expect(
            address.status != 0 && address.output.contains("--xds-address: expected host:port, got 'nowhere'"),
            "\(address)"
        )
        let debounce = try await Self.run(["serve", "--debounce-ms", "-5"])
        #expect(debounce.status != 0 && debounce.output.contains("--debounce-ms"), "\(debounce)")
        let cmdb = try await Self.run([
            "serve", "--store", "memory", "--mesh", "/nonexistent", "--cmdb-url", "https://cmdb", "--xds-address",
            "127.0.0.1:0", "--http-address", "127.0.0.1:0",
        ])
        #expect(cmdb.status != 0 && cmdb.output.contains("only http:// URLs are supported"), "\(cmdb)")
        let missing = try await Self.run(["serve", "--config", "/nonexistent/pilot.yaml"])
        #expect(missing.status != 0 && missing.output.contains("/nonexistent/pilot.yaml cannot be read"), "\(missing)")
        let dir = try Peers.temporaryDirectory("pilot-config")
        defer { try? FileManager.default.removeItem(at: dir) }
        let bad = dir.appendingPathComponent("pilot.yaml")
        try "store:\n  backend: etcd\n  etcd:\n    endpoints: [127.0.0.1:2379, 'etcd-2']\n".write(
            to: bad,
            atomically: true,
            encoding: .utf8
        )
        let config = try await Self.run(["serve", "--config", bad.path])
        #expect(
            config.status != 0 && config.output.contains("\(bad.path):4")
                && config.output.contains("store.etcd.endpoints[1]")
                && config.output.contains("host:port"),
            "\(config)"
        )
        let store = try await Self.run(["serve", "--config", bad.path, "--store", "etcd://127.0.0.1:0"])
        #expect(
            store.status != 0 && store.output.contains("store.etcd.endpoints[1]"),
            "the file is read first: \(store)"
        )
    }

    @Test func serveReloadsMeshYamlOnChangeAndSIGHUPKeepsTheRunningOneWhenBadAndStopsOnSIGTERM() async throws {
        let dir = try Peers.temporaryDirectory("pilot-serve")
        defer { try? FileManager.default.removeItem(at: dir) }
        let mesh = dir.appendingPathComponent("mesh.yaml")
        try "services:\n  - {name: web, port: 8080}\n".write(to: mesh, atomically: true, encoding: .utf8)
        let httpPort = Peers.freePort()
        let api = "http://127.0.0.1:\(httpPort)"
        let log = dir.appendingPathComponent("pilot.log")
        let pilot = try Peers.Child(
            [
                Self.binary, "serve", "--store", dir.appendingPathComponent("state/pilot.db").path, "--mesh", mesh.path,
                "--xds-address", "127.0.0.1:\(Peers.freePort())", "--http-address", "127.0.0.1:\(httpPort)",
            ],
            output: log
        )
        defer { pilot.stop() }
        #expect(
            await Peers.eventually(within: .seconds(15)) { await Peers.http("GET", "\(api)/healthz").status == 200 }
        )
        #expect(await Peers.http("GET", "\(api)/v1/services").body.contains("\"name\":\"web\""))

        // A change to the file is picked up.
        try "services:\n  - {name: web, port: 8080}\n  - {name: api, port: 9090}\n".write(
            to: mesh,
            atomically: true,
            encoding: .utf8
        )
        #expect(
            await Peers.eventually(within: .seconds(5)) {
                await Peers.http("GET", "\(api)/v1/services").body.contains("\"name\":\"api\"")
            }
        )

        // A bad file is refused and logged with where and what; the running mesh stays.
        try "services:\n  - {name: web, port: 8080, colour: red}\n".write(to: mesh, atomically: true, encoding: .utf8)
        #expect(
            await Peers.eventually(within: .seconds(5)) {
                ((try? String(contentsOf: log, encoding: .utf8)) ?? "").contains(
                    "services[0].colour: unknown key 'colour'"
                )
            }
        )
        #expect(await Peers.http("GET", "\(api)/v1/services").body.contains("\"name\":\"api\""))
        #expect(
            await Peers.http("GET", "\(api)/metrics").body.contains(
                #"trellis_pilot_mesh_reloads_total{result="rejected"} 1"#
            )
        )

        // An alias bomb is refused at once, and the watcher goes on: the next good file applies.
        try AliasBombs.tenLevels.write(to: mesh, atomically: true, encoding: .utf8)
        #expect(
            await Peers.eventually(within: .seconds(5)) {
                ((try? String(contentsOf: log, encoding: .utf8)) ?? "").contains("an alias bomb")
            }
        )
        try "services:\n  - {name: web, port: 8080}\n  - {name: after, port: 9191}\n".write(
            to: mesh,
            atomically: true,
            encoding: .utf8
        )
        #expect(
            await Peers.eventually(within: .seconds(5)) {
                await Peers.http("GET", "\(api)/v1/services").body.contains("\"name\":\"after\"")
            }
        )

        // SIGHUP re-reads it now.
        try "services:\n  - {name: only, port: 7070}\n".write(to: mesh, atomically: true, encoding: .utf8)
        kill(pilot.process.processIdentifier, SIGHUP)
        #expect(
            await Peers.eventually(within: .seconds(3)) {
                let body = await Peers.http("GET", "\(api)/v1/services").body
                return body.contains("\"name\":\"only\"") && !body.contains("\"name\":\"after\"")
            }
        )

        // SIGTERM: a clean, prompt exit.
        kill(pilot.process.processIdentifier, SIGTERM)
        let exited = await Peers.eventually(within: .seconds(5)) { !pilot.process.isRunning }
        // Asking a running process for its status would crash the whole test run.
        guard exited else {
            Issue.record("pilot still running 5 s after SIGTERM")
            return
        }
        #expect(pilot.process.terminationStatus == 0)
        #expect(FileManager.default.fileExists(atPath: dir.appendingPathComponent("state/pilot.db").path))
    }

    @Test func theCMDBSourceMergesMachineMetadataAndKeepsItWhenThePollFails() async throws {
        let dir = try Peers.temporaryDirectory("cmdb")
        defer { try? FileManager.default.removeItem(at: dir) }
        let port = Peers.freePort()
        let cmdbDir = dir.appendingPathComponent("cmdb")
        try FileManager.default.createDirectory(at: cmdbDir, withIntermediateDirectories: true)
        let document = cmdbDir.appendingPathComponent("machines.json")
        try #"{"machines": [{"hostname": "vm-a", "region": "eu", "zone": "eu-1b", "labels": {"rack": "r7"}}]}"#
            .write(to: document, atomically: true, encoding: .utf8)
        let server = try Peers.Child([
            "python3", "-m", "http.server", "\(port)", "--bind", "127.0.0.1", "--directory", cmdbDir.path,
        ])
        defer { server.stop() }

        let registry = try await Registry(store: try SQLiteRegistryStore(), logger: .quiet)
        _ = try await registry.register(
            .init(
                instance: Instance(key: InstanceKey(service: "web", address: "10.0.0.1", port: 80), node: "vm-a"),
                ttl: .seconds(30)
            )
        )
        let source = try CMDBSource(
            url: "http://127.0.0.1:\(port)/machines.json",
            interval: .seconds(60),
            registry: registry,
            logger: .quiet
        )
        #expect(await Peers.eventually(within: .seconds(10)) { await source.pollOnce() })
        var instance = try #require(await registry.instances().first)
        #expect(instance.locality.zone == "eu-1b" && instance.labels == ["rack": "r7"])

        // A malformed document and an unreachable CMDB both keep the last metadata.
        try #"{"machines": [{"hostname": "vm-a", "zone": 12}]}"#.write(to: document, atomically: true, encoding: .utf8)
        #expect(await source.pollOnce() == false)
        server.stop()
        #expect(await source.pollOnce() == false)
        instance = try #require(await registry.instances().first)
        #expect(instance.locality.zone == "eu-1b")
    }
}

/// The systemd unit that installs pilot as a service passes `systemd-analyze verify` (with the
/// binary built next to this test bundle in place of /usr/local/bin).
@Suite(
    .enabled(
        if: Peers.which("systemd-analyze") != nil,
        "needs systemd-analyze (Debian systemd): run scripts/bootstrap.sh"
    )
)
struct PilotUnitFileTests {
    @Test func theUnitFileVerifies() async throws {
        let unit = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("systemd/trellis-pilot.service")
        let dir = try Peers.temporaryDirectory("unit")
        defer { try? FileManager.default.removeItem(at: dir) }
        let text = try String(contentsOf: unit, encoding: .utf8)
        #expect(text.contains("ExecStart=/usr/local/bin/trellis-pilot serve"))
        let copy = dir.appendingPathComponent("trellis-pilot.service")
        try text.replacingOccurrences(of: "/usr/local/bin/trellis-pilot", with: PilotCommandTests.binary)
            .write(to: copy, atomically: true, encoding: .utf8)
        let log = dir.appendingPathComponent("verify.log")
        let verify = try Peers.Child(["systemd-analyze", "verify", copy.path], output: log)
        _ = await Peers.eventually(within: .seconds(30)) { !verify.process.isRunning }
        verify.stop()
        let output = (try? String(contentsOf: log, encoding: .utf8)) ?? ""
        // Only this unit's lines matter (the host's own units may warn on a container).
        let ours = output.split(separator: "\n").filter { $0.contains("trellis-pilot.service") }
        #expect(verify.process.terminationStatus == 0 && ours.isEmpty, "\(output)")
    }
}
