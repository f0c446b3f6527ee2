/// A configuration file that cannot be used: the file, the position, the key path, and what was
/// expected there.
public struct ConfigFileError: Error, CustomStringConvertible, Sendable {
    public var file: String
    /// `line:column`, when known.
    public var position: String?
    /// Dotted key path, e.g. `clusters[0].lb_policy`.
    public var path: String
    public var message: String

    public init(file: String, position: String? = nil, path: String, message: String) {
        self.file = file
        self.position = position
        self.path = path
        self.message = message
    }

    public var description: String {
        let location = position.map { "\(file):\($0)" } ?? file
        return path.isEmpty ? "\(location): \(message)" : "\(location): \(path): \(message)"
    }
}

/// Every problem found in one file, reported together.
public struct ConfigFileErrors: Error, CustomStringConvertible, Sendable {
    public var errors: [ConfigFileError]
    public init(_ errors: [ConfigFileError]) { self.errors = errors }
    public var description: String { errors.map(\.description).joined(separator: "\n") }
}
