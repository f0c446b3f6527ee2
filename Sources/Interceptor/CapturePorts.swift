/// The ports of the capture contract (docs/architecture.md): what the iptables rules redirect to.
public enum CapturePorts {
    /// Outbound connections of local processes are redirected here.
    public static let outbound = 15001
    /// Inbound connections to captured ports are redirected here.
    public static let inbound = 15006
}
