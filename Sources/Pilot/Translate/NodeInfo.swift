import SwiftProtobuf
import TrellisConfig
public import TrellisPolicy
public import XDS

/// What pilot serves a node, from its xDS `Node` (docs/architecture.md, "xDS roles").
public enum NodeRole: Sendable, Hashable, CustomStringConvertible {
    /// The Trellis agent, or a stock Envoy behind the same iptables rules (the default).
    case sidecar
    /// A gateway serving the listeners of the named gateway in mesh.yaml.
    case gateway(String)
    /// A gRPC client with an xDS resolver (no proxy).
    case proxyless

    public var description: String {
        switch self {
        case .sidecar: "sidecar"
        case .gateway(let name): "gateway(\(name))"
        case .proxyless: "proxyless"
        }
    }
}

/// A connected node: its id and role.
public struct NodeInfo: Sendable, Hashable {
    public var id: String
    public var role: NodeRole
    /// Where the node runs (Envoy's `node.locality`): its endpoints are prioritized by it.
    public var locality: Locality

    public init(id: String, role: NodeRole, locality: Locality = Locality()) {
        self.id = id
        self.role = role
        self.locality = locality
    }

    /// Node metadata keys: `trellis.role` (`sidecar`, `gateway`, `proxyless`) and, for gateways,
    /// `trellis.gateway` (a gateway's name in mesh.yaml). Without `trellis.role`, a node whose
    /// user agent is a gRPC library is proxyless and any other is a sidecar.
    public static let roleKey = "trellis.role"
    public static let gatewayKey = "trellis.gateway"

    public struct Invalid: Error, CustomStringConvertible {
        public var description: String
    }

    public init(_ node: Envoy_Config_Core_V3_Node) throws(Invalid) {
        guard !node.id.isEmpty else { throw Invalid(description: "node.id is required") }
        guard Names.isValidNodeID(node.id) else {
            throw Invalid(
                description:
                    "node.id '\(node.id.prefix(80))' must be printable ASCII without spaces or '/', at most 253 bytes"
            )
        }
        locality = Locality(region: node.locality.region, zone: node.locality.zone, subzone: node.locality.subZone)
        let fields = node.metadata.fields
        let roleName: String
        if let value = fields[Self.roleKey] {
            guard case .stringValue(let text) = value.kind else {
                throw Invalid(description: "node.metadata[\"\(Self.roleKey)\"] must be a string")
            }
            roleName = text
        } else {
            roleName = node.userAgentName.lowercased().hasPrefix("grpc") ? "proxyless" : "sidecar"
        }
        switch roleName {
        case "sidecar": role = .sidecar
        case "proxyless": role = .proxyless
        case "gateway":
            guard let kind = fields[Self.gatewayKey]?.kind, case .stringValue(let name) = kind, !name.isEmpty else {
                throw Invalid(
                    description:
                        "a gateway node needs node.metadata[\"\(Self.gatewayKey)\"]: the gateway's name in mesh.yaml"
                )
            }
            role = .gateway(name)
        default:
            throw Invalid(
                description:
                    "node.metadata[\"\(Self.roleKey)\"] is '\(roleName)'; expected sidecar, gateway or proxyless"
            )
        }
        id = node.id
    }
}
