public import TrellisConfig

/// What a service speaks, as agent.yaml, mesh.yaml and pilot's registration API name it: HTTP/1,
/// HTTP/2 (h2c), gRPC, or TCP (relayed as bytes, no HTTP policy applies).
public enum ServiceProtocol: String, Sendable, Codable, CaseIterable, Hashable {
    case http
    case http2
    case grpc
    case tcp

    public var isHTTP: Bool { self != .tcp }
    /// Whether the service's endpoints are reached over HTTP/2 (its cluster says so in xDS).
    public var usesHTTP2Upstream: Bool { self == .http2 || self == .grpc }

    /// What a `protocol` value may be, for error messages (YAML and the HTTP API alike).
    public static let expected = "expected one of " + allCases.map(\.rawValue).joined(separator: ", ")

    /// A `protocol:` key.
    public static func decode(_ node: ConfigNode) throws(ConfigFileError) -> ServiceProtocol {
        let text = try node.nonEmptyString()
        guard let value = ServiceProtocol(rawValue: text) else { throw node.error("\(expected), got '\(text)'") }
        return value
    }
}
