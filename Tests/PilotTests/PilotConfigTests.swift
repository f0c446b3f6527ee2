import Etcd
import Foundation
import Testing
import TrellisConfig

@testable import Pilot

/// `/etc/trellis/pilot.yaml`: every key read, and bad values refused with where and what.
struct PilotConfigTests {
    @Test func aFullFileIsRead() throws {
        let config = try PilotConfig.parse(
            yaml: """
                xds_address: 127.0.0.1:25010
                http_address: "[::1]:25014"
                mesh: /srv/mesh.yaml
                debounce: 250ms
                log_level: debug
                cmdb: {url: http://cmdb.internal/machines, interval: 1m}
                store:
                  backend: etcd
                  etcd:
                    endpoints: [10.0.0.1:2379, "http://10.0.0.2:2379", "etcd-3.internal:2379"]
                    prefix: /mesh-a
                    call_timeout: 2s
                    tls: {ca_file: /etc/trellis/etcd-ca.pem, cert_file: /etc/trellis/c.pem, key_file: /etc/trellis/c.key}
                """,
            file: "pilot.yaml"
        )
        #expect(config.xdsAddress == ("127.0.0.1", 25010) && config.httpAddress == ("::1", 25014))
        #expect(config.mesh == "/srv/mesh.yaml" && config.debounce == .milliseconds(250) && config.logLevel == "debug")
        #expect(config.cmdbURL == "http://cmdb.internal/machines" && config.cmdbInterval == .seconds(60))
        guard case .etcd(let etcd) = config.store else {
            Issue.record("expected the etcd store, got \(config.store)")
            return
        }
        #expect(etcd.endpoints.map(\.description) == ["10.0.0.1:2379", "10.0.0.2:2379", "etcd-3.internal:2379"])
        #expect(etcd.prefix == "/mesh-a/" && etcd.callTimeout == .seconds(2))
        #expect(
            etcd.tls
                == EtcdTLS(
                    caFile: "/etc/trellis/etcd-ca.pem",
                    certFile: "/etc/trellis/c.pem",
                    keyFile: "/etc/trellis/c.key"
                )
        )
        let defaults = try PilotConfig.parse(yaml: "{}", file: "pilot.yaml")
        #expect(
            defaults.store == .sqlite(path: "/var/lib/trellis/pilot.db") && defaults.xdsAddress == ("0.0.0.0", 15010)
        )
        #expect(try PilotConfig.parse(yaml: "store: {backend: memory}", file: "p").store == .memory)
        #expect(try PilotConfig.parse(yaml: "", file: "p").store == .sqlite(path: "/var/lib/trellis/pilot.db"))
        #expect(try PilotConfig.parse(yaml: "# nothing set\n\n", file: "p").mesh == "/etc/trellis/mesh.yaml")
    }

    /// examples/pilot.yaml (what install.sh writes) loads, and so does its commented etcd store.
    @Test func theExampleFileLoadsWithEitherStore() throws {
        let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("examples/pilot.yaml")
        let text = try String(contentsOf: url, encoding: .utf8)
        #expect(try PilotConfig.parse(yaml: text, file: url.path).store == .sqlite(path: "/var/lib/trellis/pilot.db"))
        // The etcd block instead of the SQLite one.
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        guard let start = lines.firstIndex(of: "store:"), let etcd = lines.firstIndex(of: "# store:") else {
            Issue.record("the example has no store blocks")
            return
        }
        let swapped = lines[..<start] + lines[etcd...].map { $0.hasPrefix("# ") ? $0.dropFirst(2) : $0 }
        let config = try PilotConfig.parse(yaml: swapped.joined(separator: "\n"), file: url.path)
        guard case .etcd(let settings) = config.store else {
            Issue.record("expected the etcd store, got \(config.store)")
            return
        }
        #expect(settings.endpoints.count == 3 && settings.tls?.caFile == "/etc/trellis/etcd-ca.pem")
    }

    @Test func badValuesAreRefusedWithTheLineTheKeyPathAndWhatWasExpected() {
        let cases: [(yaml: String, expected: [String])] = [
            ("stores: {}", ["stores", "unknown key 'stores'"]),
            ("store: {backend: zookeeper}", ["store.backend", "expected sqlite, etcd or memory, got 'zookeeper'"]),
            ("store: {backend: etcd}", ["store", "backend etcd needs an 'etcd' mapping"]),
            ("store: {etcd: {endpoints: [127.0.0.1:2379]}}", ["store.etcd", "only with backend: etcd"]),
            ("store: {backend: etcd, etcd: {endpoints: []}}", ["store.etcd.endpoints", "at least one endpoint"]),
            (
                "store:\n  backend: etcd\n  etcd:\n    endpoints: [127.0.0.1:2379, ':99']\n",
                [":4", "store.etcd.endpoints[1]", "host:port"]
            ),
            (
                "store: {backend: etcd, etcd: {endpoints: [a:1], prefix: trellis}}",
                ["store.etcd.prefix", "starting with '/'"]
            ),
            (
                "store: {backend: etcd, etcd: {endpoints: [a:1], tls: {cert_file: /c.pem}}}",
                ["store.etcd.tls", "go together"]
            ),
            ("store: {backend: sqlite, path: ''}", ["store.path", "non-empty"]),
            ("cmdb: {interval: 5s}", ["cmdb", "missing required key 'url'"]),
            ("log_level: loud", ["log_level", "expected one of trace"]),
            ("debounce: 20s", ["debounce", "at most 10s"]),
        ]
        for (yaml, expected) in cases {
            do {
                _ = try PilotConfig.parse(yaml: yaml, file: "pilot.yaml")
                Issue.record("accepted: \(yaml)")
            } catch {
                let text = error.description
                #expect(text.hasPrefix("pilot.yaml"), "\(text)")
                for part in expected { #expect(text.contains(part), "\(yaml) → \(text)") }
            }
        }
    }
}
