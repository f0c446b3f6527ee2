/// A configuration that cannot be served, with the key path of the offending value and what was
/// expected there. A snapshot that fails validation is never applied.
public struct ProxyConfigError: Error, Hashable, CustomStringConvertible {
    /// Dotted key path into the configuration, e.g. `listeners[0].virtual_hosts[1].routes[0].match`.
    public var path: String
    public var message: String

    public init(path: String, message: String) {
        self.path = path
        self.message = message
    }

    public var description: String { "\(path): \(message)" }
}
