public import TrellisConfig

/// Where an instance (or a client) runs, as xDS localities have it: region, zone, subzone.
public struct Locality: Sendable, Codable, Hashable {
    public var region: String
    public var zone: String
    public var subzone: String

    public init(region: String = "", zone: String = "", subzone: String = "") {
        self.region = region
        self.zone = zone
        self.subzone = subzone
    }

    public var isEmpty: Bool { region.isEmpty && zone.isEmpty && subzone.isEmpty }

    /// `region`, `zone` and `subzone` keys of a mapping (agent.yaml's `locality:`, an instance in
    /// mesh.yaml): each a name of letters, digits, '-', '_' and '.' (at most 63), or absent.
    public static func decode(_ keys: [String: ConfigNode]) throws(ConfigFileError) -> Locality {
        func part(_ key: String) throws(ConfigFileError) -> String {
            guard let n = keys[key] else { return "" }
            let text = try n.nonEmptyString()
            let allowed = text.utf8.allSatisfy { byte in
                switch byte {
                case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                    UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "_"), UInt8(ascii: "."):
                    true
                default: false
                }
            }
            guard allowed, text.utf8.count <= 63 else {
                throw n.error("expected letters, digits, '-', '_' and '.' (at most 63), got '\(text.prefix(80))'")
            }
            return text
        }
        return Locality(region: try part("region"), zone: try part("zone"), subzone: try part("subzone"))
    }
}
