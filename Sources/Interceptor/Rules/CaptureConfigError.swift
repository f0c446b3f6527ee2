/// A capture configuration that must not be applied, with the key path and what was expected.
/// Raised before any rule is touched.
public struct CaptureConfigError: Error, Hashable, Sendable, CustomStringConvertible {
    public var path: String
    public var message: String

    public init(path: String, message: String) {
        self.path = path
        self.message = message
    }

    public var description: String { path.isEmpty ? message : "\(path): \(message)" }
}
