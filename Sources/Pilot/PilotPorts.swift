/// Pilot's ports (docs/architecture.md).
public enum PilotPorts {
    /// xDS v3 ADS over gRPC.
    public static let xds = 15010
    /// HTTP API: registration, debug endpoints, metrics, health.
    public static let http = 15014
}
