public import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A real etcd cluster (Debian's `etcd-server`, scripts/bootstrap.sh) of `size` members on
/// loopback ports, each with its own data folder; members can be killed, stopped and started
/// again on the same data. Everything is removed by ``stop()`` (and on deinit).
public final class EtcdCluster: @unchecked Sendable {
    public struct Member {
        public let name: String
        public let clientPort: Int
        public let peerPort: Int
        public let dataDirectory: URL
        var child: Peers.Child?
        var log: URL
    }

    public private(set) var members: [Member]
    private let root: URL
    private let lock = NSLock()
    /// With TLS: the CA that signed the members' certificate, and a client certificate and key
    /// the members accept (`--client-cert-auth`).
    public private(set) var tls: (ca: String, cert: String, key: String)?
    /// Where the members run: this process's network namespace, or the named one (`ip netns
    /// exec`), whose loopback they then listen on.
    public let namespace: String?
    var inNamespace: [String] { namespace.map { ["ip", "netns", "exec", $0] } ?? [] }
    var scheme: String { tls == nil ? "http" : "https" }

    /// Why etcd cannot run here, or nil.
    public static var missing: String? {
        Peers.which("etcd") == nil || !FileManager.default.isExecutableFile(atPath: Peers.which("etcd") ?? "")
            ? "etcd is not installed (Debian's etcd-server: run scripts/bootstrap.sh)" : nil
    }

    /// Starts the members and waits (up to 20 s) until the cluster answers with a leader. With
    /// `tls`, clients must come over TLS with a certificate signed by the cluster's own CA
    /// (made here with openssl).
    public init(size: Int = 3, tls: Bool = false, namespace: String? = nil) async throws {
        self.namespace = namespace
        root = try Peers.temporaryDirectory("etcd")
        if tls { self.tls = try await Self.makeCertificates(in: root) }
        members = (0..<size).map { i in
            Member(
                name: "m\(i)",
                clientPort: Peers.freePort(),
                peerPort: Peers.freePort(),
                dataDirectory: URL(fileURLWithPath: "/nonexistent"),
                log: URL(fileURLWithPath: "/nonexistent")
            )
        }
        for i in members.indices {
            members[i] = Member(
                name: members[i].name,
                clientPort: members[i].clientPort,
                peerPort: members[i].peerPort,
                dataDirectory: root.appendingPathComponent(members[i].name),
                log: root.appendingPathComponent("\(members[i].name).log")
            )
        }
        for i in members.indices { try start(i) }
        guard await waitHealthy(within: .seconds(20)) else {
            let logs = members.map { (try? String(contentsOf: $0.log, encoding: .utf8)) ?? "" }.joined(separator: "\n")
            stop()
            throw ClusterError(message: "etcd did not elect a leader within 20 s:\n\(logs.suffix(3000))")
        }
    }

    deinit { stop() }

    /// `127.0.0.1:PORT` of every member, as a client lists them.
    public var endpoints: [String] { members.map { "127.0.0.1:\($0.clientPort)" } }

    /// A CA, a server certificate for 127.0.0.1 and a client certificate, by openssl.
    static func makeCertificates(in root: URL) async throws -> (ca: String, cert: String, key: String) {
        let dir = root.appendingPathComponent("tls")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        func path(_ name: String) -> String { dir.appendingPathComponent(name).path }
        try "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n".write(
            toFile: path("ext.cnf"),
            atomically: true,
            encoding: .utf8
        )
        let key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        let steps: [[String]] = [
            ["openssl", "req", "-x509"] + key + [
                "-days", "1", "-subj", "/CN=trellis-test-ca", "-keyout", path("ca.key"), "-out", path("ca.pem"),
            ],
            ["openssl", "req"] + key + [
                "-subj", "/CN=etcd", "-keyout", path("server.key"), "-out", path("server.csr"),
            ],
            [
                "openssl", "x509", "-req", "-in", path("server.csr"), "-CA", path("ca.pem"), "-CAkey", path("ca.key"),
                "-CAcreateserial", "-days", "1", "-extfile", path("ext.cnf"), "-out", path("server.pem"),
            ],
            ["openssl", "req"] + key + [
                "-subj", "/CN=pilot", "-keyout", path("client.key"), "-out", path("client.csr"),
            ],
            [
                "openssl", "x509", "-req", "-in", path("client.csr"), "-CA", path("ca.pem"), "-CAkey", path("ca.key"),
                "-CAcreateserial", "-days", "1", "-extfile", path("ext.cnf"), "-out", path("client.pem"),
            ],
        ]
        for step in steps {
            let result = await Peers.command(step)
            guard result.status == 0 else {
                throw ClusterError(message: "openssl failed: \(step.joined(separator: " "))\n\(result.stderr)")
            }
        }
        return (path("ca.pem"), path("client.pem"), path("client.key"))
    }

    public var initialCluster: String {
        members.map { "\($0.name)=http://127.0.0.1:\($0.peerPort)" }.joined(separator: ",")
    }

    /// Starts member `i` (again, on its data folder).
    public func start(_ i: Int) throws {
        let m = members[i]
        let fresh = !FileManager.default.fileExists(atPath: m.dataDirectory.path)
        var arguments = [
            "etcd", "--name", m.name, "--data-dir", m.dataDirectory.path,
            "--listen-client-urls", "\(scheme)://127.0.0.1:\(m.clientPort)",
            "--advertise-client-urls", "\(scheme)://127.0.0.1:\(m.clientPort)",
            "--listen-peer-urls", "http://127.0.0.1:\(m.peerPort)",
            "--initial-advertise-peer-urls", "http://127.0.0.1:\(m.peerPort)",
            "--initial-cluster", initialCluster,
            "--initial-cluster-token", "trellis-test-\(getpid())-\(root.lastPathComponent)",
            "--heartbeat-interval", "100", "--election-timeout", "1000",
            "--log-level", "warn", "--logger", "zap",
        ]
        arguments += ["--initial-cluster-state", fresh ? "new" : "existing"]
        if let tls {
            let dir = URL(fileURLWithPath: tls.ca).deletingLastPathComponent()
            arguments += [
                "--cert-file", dir.appendingPathComponent("server.pem").path,
                "--key-file", dir.appendingPathComponent("server.key").path,
                "--client-cert-auth", "--trusted-ca-file", tls.ca,
            ]
        }
        // Debian's etcd 3.4 on amd64 needs no ETCD_UNSUPPORTED_ARCH; the environment is kept clean.
        let child = try Peers.Child(inNamespace + arguments, output: m.log)
        lock.withLock { members[i].child = child }
    }

    /// SIGKILL to member `i`.
    public func kill(_ i: Int) {
        let child = lock.withLock { () -> Peers.Child? in
            defer { members[i].child = nil }
            return members[i].child
        }
        child?.stop()
    }

    /// Whether `count` members answer their health endpoint.
    public func healthyMembers() async -> Int {
        var healthy = 0
        for m in members where lock.withLock({ m.child != nil }) {
            var command = ["curl", "-s", "--max-time", "2"]
            if let tls { command += ["--cacert", tls.ca, "--cert", tls.cert, "--key", tls.key] }
            let r = await Peers.command(inNamespace + command + ["\(scheme)://127.0.0.1:\(m.clientPort)/health"])
            if r.status == 0, r.stdout.contains("true") { healthy += 1 }
        }
        return healthy
    }

    /// Waits until a majority of the members report themselves healthy (there is a leader).
    public func waitHealthy(within timeout: Duration) async -> Bool {
        await Peers.eventually(within: timeout) { await self.healthyMembers() > self.members.count / 2 }
    }

    /// Runs `etcdctl` against the cluster; its exit status and output.
    public func etcdctl(_ arguments: [String]) async -> (status: Int32, stdout: String, stderr: String) {
        await Peers.command(
            inNamespace + [
                "env", "ETCDCTL_API=3", "etcdctl", "--endpoints",
                endpoints.map { "\(scheme)://\($0)" }.joined(separator: ","), "--command-timeout=5s",
            ]
                + (tls.map { ["--cacert", $0.ca, "--cert", $0.cert, "--key", $0.key] } ?? []) + arguments
        )
    }

    /// Kills every member and removes the data folders.
    public func stop() {
        for i in members.indices { kill(i) }
        try? FileManager.default.removeItem(at: root)
    }

    public struct ClusterError: Error, CustomStringConvertible {
        public var message: String
        public var description: String { message }
        public init(message: String) { self.message = message }
    }
}
