public import TrellisConfig

/// Where and how much the access log writes (`access_log:` in agent.yaml and the gateway file):
/// one JSON line per request or relayed TCP connection, on every listener. See
/// docs/observability.md for the fields.
public struct AccessLogSettings: Sendable, Hashable {
    public enum Output: Sendable, Hashable, CustomStringConvertible {
        case stdout
        case stderr
        /// An absolute path, appended to; SIGUSR1 reopens it (for logrotate).
        case file(String)

        public var description: String {
            switch self {
            case .stdout: "stdout"
            case .stderr: "stderr"
            case .file(let path): path
            }
        }
    }

    public var output: Output
    /// The share of requests logged, 0...1; a request the proxy refused or that got a 5xx is always
    /// logged.
    public var sampleRate: Double

    public init(output: Output = .stdout, sampleRate: Double = 1) {
        self.output = output
        self.sampleRate = sampleRate
    }

    /// `access_log: {output: stdout | stderr | /var/log/trellis/access.log, sample_rate: 0.01}`;
    /// `true` for stdout and every request, `false` for none (`nil`).
    public static func decode(_ node: ConfigNode) throws(ConfigFileError) -> AccessLogSettings? {
        if node.isScalar { return try node.bool() ? AccessLogSettings() : nil }
        let keys = try node.mapping(allowed: ["output", "sample_rate"])
        var settings = AccessLogSettings()
        if let n = keys["output"] {
            let text = try n.nonEmptyString()
            switch text {
            case "stdout": settings.output = .stdout
            case "stderr": settings.output = .stderr
            default:
                guard text.hasPrefix("/"), !text.hasSuffix("/") else {
                    throw n.error("expected stdout, stderr or an absolute file path, got '\(text)'")
                }
                settings.output = .file(text)
            }
        }
        if let n = keys["sample_rate"] {
            if n.isScalar, (try? n.string()) == "0" {
                settings.sampleRate = 0
            } else {
                settings.sampleRate = try n.number(above: 0, atMost: 1)
            }
        }
        return settings
    }
}

/// Distributed tracing (`tracing:` in agent.yaml and the gateway file): spans exported over
/// OTLP/gRPC to a collector. See docs/observability.md.
public struct TracingSettings: Sendable, Hashable {
    /// The collector's OTLP/gRPC address (`host:port`, usually port 4317).
    public var collectorHost: String
    public var collectorPort: Int
    /// The share of new traces recorded, 0...1 (default 1 %); a request that arrives with a trace
    /// follows its caller's decision (parent-based sampling).
    public var sampleRate: Double
    /// The `service.name` of the exported spans (default: the executable's).
    public var serviceName: String?
    /// gRPC metadata sent with every export (e.g. `authorization` for a collector that wants a
    /// token), sorted by name.
    public var headers: [String: String]

    public init(
        collectorHost: String,
        collectorPort: Int,
        sampleRate: Double = 0.01,
        serviceName: String? = nil,
        headers: [String: String] = [:]
    ) {
        self.collectorHost = collectorHost
        self.collectorPort = collectorPort
        self.sampleRate = sampleRate
        self.serviceName = serviceName
        self.headers = headers
    }

    /// `tracing: {collector: 127.0.0.1:4317, sample_rate: 0.01, service_name: orders-vm,
    /// headers: {authorization: Bearer …}}`.
    public static func decode(_ node: ConfigNode) throws(ConfigFileError) -> TracingSettings {
        let keys = try node.mapping(allowed: ["collector", "sample_rate", "service_name", "headers"])
        let (host, port) = try keys.required("collector", in: node).endpoint()
        var settings = TracingSettings(collectorHost: host, collectorPort: port)
        if let n = keys["sample_rate"] {
            if n.isScalar, (try? n.string()) == "0" {
                settings.sampleRate = 0
            } else {
                settings.sampleRate = try n.number(above: 0, atMost: 1)
            }
        }
        if let n = keys["service_name"] {
            let name = try n.nonEmptyString()
            guard name.utf8.count <= 255, name.allSatisfy({ $0.isASCII && !$0.isWhitespace && $0 != "\"" }) else {
                throw n.error("expected a name of at most 255 printable ASCII characters without spaces, got '\(name)'")
            }
            settings.serviceName = name
        }
        if let n = keys["headers"] {
            let headers = try n.stringMap()
            for (name, value) in headers.sorted(by: { $0.key < $1.key }) {
                // gRPC metadata: a lower-case ASCII key, not one of gRPC's own; a value of
                // printable ASCII (a binary `-bin` value is not supported here).
                guard !name.isEmpty,
                    name.allSatisfy({ "abcdefghijklmnopqrstuvwxyz0123456789-_.".contains($0) }),
                    !name.hasPrefix("grpc-"), !name.hasSuffix("-bin"),
                    !["te", "content-type", "user-agent"].contains(name)
                else {
                    throw n.error(
                        "expected header names of lower-case letters, digits, '-', '_' and '.', not 'grpc-…', '…-bin', 'te', 'content-type' or 'user-agent', got '\(name)'"
                    )
                }
                guard value.utf8.count <= 8192, value.utf8.allSatisfy({ $0 >= 0x20 && $0 < 0x7F }) else {
                    throw n.error(
                        "expected the value of header '\(name)' to be at most 8192 printable ASCII characters"
                    )
                }
            }
            settings.headers = headers
        }
        return settings
    }
}
