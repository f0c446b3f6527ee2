/// What each connected node was sent and what it answered, per type (for `/debug/syncz`, the NACK
/// metric and `trellis_pilot_xds_push_duration_seconds{type}`: from a response sent to its ACK).
public actor SyncStatus {
    public struct TypeStatus: Sendable, Hashable {
        public var sentVersion: String?
        public var sentNonce: String?
        public var ackedVersion: String?
        /// The last NACK's error detail, until a later ACK.
        public var lastNack: String?
        /// When the version waiting for its ACK was sent.
        var sentAt: ContinuousClock.Instant?
    }

    private var nodes: [String: [String: TypeStatus]] = [:]
    private let metrics: PilotMetrics?

    public init(metrics: PilotMetrics? = nil) {
        self.metrics = metrics
    }

    public func status(node: String) -> [String: TypeStatus] { nodes[node] ?? [:] }
    public var connectedNodes: [String] { nodes.keys.sorted() }

    func sent(node: String, typeURL: String, version: String, nonce: String) {
        nodes[node, default: [:]][typeURL, default: TypeStatus()].sentVersion = version
        nodes[node, default: [:]][typeURL, default: TypeStatus()].sentNonce = nonce
        nodes[node, default: [:]][typeURL, default: TypeStatus()].sentAt = .now
    }

    func acked(node: String, typeURL: String, version: String) {
        var status = nodes[node, default: [:]][typeURL, default: TypeStatus()]
        if let sentAt = status.sentAt, status.sentVersion == version {
            metrics?.pushAcked(typeURL, after: .now - sentAt)
            status.sentAt = nil
        }
        status.ackedVersion = version
        status.lastNack = nil
        nodes[node, default: [:]][typeURL] = status
    }

    func nacked(node: String, typeURL: String, error: String) {
        nodes[node, default: [:]][typeURL, default: TypeStatus()].lastNack = error
    }

    func disconnected(node: String) {
        nodes.removeValue(forKey: node)
    }
}
