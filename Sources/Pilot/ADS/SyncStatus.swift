/// What each connected node was sent and what it answered, per type (for `/debug/syncz` and the
/// NACK metric).
public actor SyncStatus {
    public struct TypeStatus: Sendable, Hashable {
        public var sentVersion: String?
        public var sentNonce: String?
        public var ackedVersion: String?
        /// The last NACK's error detail, until a later ACK.
        public var lastNack: String?
    }

    private var nodes: [String: [String: TypeStatus]] = [:]

    public init() {}

    public func status(node: String) -> [String: TypeStatus] { nodes[node] ?? [:] }
    public var connectedNodes: [String] { nodes.keys.sorted() }

    func sent(node: String, typeURL: String, version: String, nonce: String) {
        nodes[node, default: [:]][typeURL, default: TypeStatus()].sentVersion = version
        nodes[node, default: [:]][typeURL, default: TypeStatus()].sentNonce = nonce
    }

    func acked(node: String, typeURL: String, version: String) {
        nodes[node, default: [:]][typeURL, default: TypeStatus()].ackedVersion = version
        nodes[node, default: [:]][typeURL, default: TypeStatus()].lastNack = nil
    }

    func nacked(node: String, typeURL: String, error: String) {
        nodes[node, default: [:]][typeURL, default: TypeStatus()].lastNack = error
    }

    func disconnected(node: String) {
        nodes.removeValue(forKey: node)
    }
}
