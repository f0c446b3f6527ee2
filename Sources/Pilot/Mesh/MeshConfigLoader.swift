import FoundationEssentials
public import TrellisConfig
import TrellisPolicy
import Yams

/// Reads `mesh.yaml` text into a validated ``MeshConfig``. Parsing only: the executable reads the
/// file. Every service a route names must be declared under `services:` (with or without static
/// instances; agents add theirs), so a dangling reference is an error at load time, not a 503 later.
public enum MeshConfigLoader {
    /// - Throws: ``ConfigFileErrors`` with file, line, key path and what was expected.
    public static func parse(yaml: String, file: String) throws(ConfigFileErrors) -> MeshConfig {
        let mesh: MeshConfig
        var routeRefs: [(ConfigNode, ServiceKey)] = []
        var subsetRefs: [(ConfigNode, ServiceKey, String)] = []
        do {
            mesh = try load(ConfigNode.root(yaml: yaml, file: file), refs: &routeRefs, subsetRefs: &subsetRefs)
        } catch {
            throw ConfigFileErrors([error])
        }
        var problems: [ConfigFileError] = []
        let declared = Set(mesh.services.map(\.key))
        for (node, key) in routeRefs where !declared.contains(key) {
            problems.append(node.error("service '\(key)' is not declared under services:"))
        }
        let subsets = mesh.subsets
        for (node, key, subset) in subsetRefs where declared.contains(key) {
            guard subsets[key]?.contains(where: { $0.name == subset }) != true else { continue }
            let names = subsets[key]?.map(\.name).joined(separator: ", ") ?? ""
            problems.append(
                node.error(
                    "service '\(key)' has no subset '\(subset)'"
                        + (names.isEmpty ? " (it declares none)" : "; it declares \(names)")
                )
            )
        }
        guard problems.isEmpty else { throw ConfigFileErrors(problems) }
        return mesh
    }

    private static func load(
        _ root: ConfigNode,
        refs: inout [(ConfigNode, ServiceKey)],
        subsetRefs: inout [(ConfigNode, ServiceKey, String)]
    ) throws(ConfigFileError) -> MeshConfig {
        let top = try root.mapping(allowed: ["services", "gateways", "routes", "policies"])
        var mesh = MeshConfig()
        var seenServices: [ServiceKey: String] = [:]
        var seenInstances: [InstanceKey: String] = [:]
        for node in try top["services"]?.sequence() ?? [] {
            let service = try self.service(node, seenInstances: &seenInstances)
            if let first = seenServices[service.key] {
                throw node.error("service '\(service.key)' is declared twice (first at \(first))")
            }
            seenServices[service.key] = node.path
            mesh.services.append(service)
        }
        var gatewayNames: Set<String> = []
        for node in try top["gateways"]?.sequence() ?? [] {
            let keys = try node.mapping(allowed: ["name", "listeners"])
            let nameNode = try keys.required("name", in: node)
            let name = try nameNode.nonEmptyString()
            guard Names.isValidServiceName(name) else {
                throw nameNode.error("expected a name of lowercase letters, digits, '-' and '.', got '\(name)'")
            }
            guard gatewayNames.insert(name).inserted else {
                throw nameNode.error("gateway '\(name)' is declared twice")
            }
            var listeners: [MeshConfig.GatewayListener] = []
            var ports: Set<Int> = []
            for listener in try keys.required("listeners", in: node).sequence() {
                let l = try listener.mapping(allowed: ["port", "routes"])
                let portNode = try l.required("port", in: listener)
                let port = try portNode.int(in: 1...65535)
                guard ports.insert(port).inserted else {
                    throw portNode.error("port \(port) is used twice in this gateway")
                }
                var routes: [RouteRule] = []
                for r in try l.required("routes", in: listener).sequence() {
                    routes.append(try route(r, allowHosts: true, refs: &refs, subsetRefs: &subsetRefs))
                }
                if routes.isEmpty { throw listener.error("expected at least one route") }
                listeners.append(.init(port: port, routes: routes))
            }
            mesh.gateways.append(.init(name: name, listeners: listeners))
        }
        for node in try top["routes"]?.sequence() ?? [] {
            let keys = try node.mapping(allowed: ["service", "rules"])
            let serviceNode = try keys.required("service", in: node)
            let key = try serviceKey(serviceNode)
            refs.append((serviceNode, key))
            guard mesh.serviceRoutes[key] == nil else { throw serviceNode.error("routes for '\(key)' are given twice") }
            var rules: [RouteRule] = []
            for r in try keys.required("rules", in: node).sequence() {
                rules.append(try route(r, allowHosts: false, refs: &refs, subsetRefs: &subsetRefs))
            }
            mesh.serviceRoutes[key] = rules
        }
        for node in try top["policies"]?.sequence() ?? [] {
            let serviceNode = try node.mapping(allowed: PolicyLoader.keys.union(["service"])).required(
                "service",
                in: node
            )
            let key = try serviceKey(serviceNode)
            refs.append((serviceNode, key))
            guard mesh.policies[key] == nil else { throw serviceNode.error("a policy for '\(key)' is given twice") }
            mesh.policies[key] = try PolicyLoader.policy(node)
        }
        return mesh
    }

    private static func service(
        _ node: ConfigNode,
        seenInstances: inout [InstanceKey: String]
    ) throws(ConfigFileError) -> MeshConfig.StaticService {
        let keys = try node.mapping(allowed: ["name", "port", "protocol", "hosts", "instances", "subsets"])
        let nameNode = try keys.required("name", in: node)
        let name = try nameNode.nonEmptyString()
        guard Names.isValidServiceName(name) else {
            throw nameNode.error(
                "expected a service name of lowercase letters, digits, '-' and '.' (at most 63), got '\(name)'"
            )
        }
        let port = try keys.required("port", in: node).int(in: 1...65535)
        let serviceProtocol = try keys["protocol"].map(ServiceProtocol.decode) ?? .http
        let hosts = try keys["hosts"]?.stringList() ?? []
        var instances: [Instance] = []
        for item in try keys["instances"]?.sequence() ?? [] {
            let i = try item.mapping(allowed: [
                "address", "port", "node", "region", "zone", "subzone", "labels", "weight",
            ])
            let addressNode = try i.required("address", in: item)
            let address = try addressNode.nonEmptyString()
            guard Names.isIPAddress(address) else {
                throw addressNode.error("expected an IPv4 or IPv6 address, got '\(address)'")
            }
            let instancePort = try i["port"]?.int(in: 1...65535) ?? port
            let key = InstanceKey(service: name, address: address, port: instancePort)
            if let first = seenInstances[key] {
                throw item.error("instance \(key) is listed twice (first at \(first))")
            }
            seenInstances[key] = item.path
            let labels = try i["labels"]?.stringMap() ?? [:]
            for label in labels.keys where !Names.isValidLabelKey(label) {
                throw item.error("label key '\(label)' is not valid (letters, digits, '-', '_', '.', '/')")
            }
            instances.append(
                Instance(
                    key: key,
                    servicePort: port,
                    serviceProtocol: serviceProtocol,
                    node: try i["node"]?.nonEmptyString() ?? "",
                    locality: try Locality.decode(i),
                    labels: labels,
                    weight: try i["weight"]?.int(in: EndpointWeights.range) ?? 1,
                    source: .meshFile
                )
            )
        }
        var subsets: [MeshConfig.Subset] = []
        for item in try keys["subsets"]?.sequence() ?? [] {
            let sk = try item.mapping(allowed: ["name", "labels"])
            let subsetNameNode = try sk.required("name", in: item)
            let subsetName = try subsetNameNode.nonEmptyString()
            guard Names.isValidServiceName(subsetName) else {
                throw subsetNameNode.error(
                    "expected a subset name of lowercase letters, digits, '-' and '.', got '\(subsetName)'"
                )
            }
            guard !subsets.contains(where: { $0.name == subsetName }) else {
                throw subsetNameNode.error("subset '\(subsetName)' is declared twice")
            }
            let labelsNode = try sk.required("labels", in: item)
            let labels = try labelsNode.stringMap()
            guard !labels.isEmpty else { throw labelsNode.error("expected at least one label") }
            for label in labels.keys where !Names.isValidLabelKey(label) {
                throw labelsNode.error("label key '\(label)' is not valid (letters, digits, '-', '_', '.', '/')")
            }
            subsets.append(MeshConfig.Subset(name: subsetName, labels: labels))
        }
        return .init(
            key: ServiceKey(name: name, port: port),
            serviceProtocol: serviceProtocol,
            hosts: hosts,
            instances: instances,
            subsets: subsets
        )
    }

    /// `name:port`.
    private static func serviceKey(_ node: ConfigNode) throws(ConfigFileError) -> ServiceKey {
        let text = try node.nonEmptyString()
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2, let port = Int(parts[1]), (1...65535).contains(port),
            Names.isValidServiceName(String(parts[0]))
        else {
            throw node.error("expected a service as name:port (e.g. orders:8080), got '\(text)'")
        }
        return ServiceKey(name: String(parts[0]), port: port)
    }

    private static func route(
        _ node: ConfigNode,
        allowHosts: Bool,
        refs: inout [(ConfigNode, ServiceKey)],
        subsetRefs: inout [(ConfigNode, ServiceKey, String)]
    ) throws(ConfigFileError) -> RouteRule {
        let allowed: Set<String> = allowHosts ? ["hosts", "match", "to", "timeout"] : ["match", "to", "timeout"]
        let keys = try node.mapping(allowed: allowed)
        var rule = RouteRule(destinations: [])
        if let h = keys["hosts"] {
            rule.hosts = try h.stringList()
            for host in rule.hosts where host.dropFirst(host.hasPrefix("*") ? 1 : 0).contains("*") {
                throw h.error("'*' is allowed only as a whole host or a leading '*.' wildcard, got '\(host)'")
            }
        }
        if let m = keys["match"] { rule.match = try RouteMatch.decode(m) }
        let to = try keys.required("to", in: node)
        if case .scalar = to.node {
            let key = try serviceKey(to)
            refs.append((to, key))
            rule.destinations = [.init(service: key, weight: 1)]
        } else {
            for d in try to.sequence() {
                let dk = try d.mapping(allowed: ["service", "subset", "weight"])
                let serviceNode = try dk.required("service", in: d)
                let key = try serviceKey(serviceNode)
                refs.append((serviceNode, key))
                var subset: String?
                if let s = dk["subset"] {
                    subset = try s.nonEmptyString()
                    subsetRefs.append((s, key, subset!))
                }
                rule.destinations.append(
                    .init(
                        service: key,
                        subset: subset,
                        weight: try dk.required("weight", in: d).int(in: WeightedDestinations.weights)
                    )
                )
            }
            if rule.destinations.isEmpty { throw to.error("expected at least one destination") }
        }
        if let t = keys["timeout"] { rule.timeout = try t.requestTimeout() }
        return rule
    }
}
