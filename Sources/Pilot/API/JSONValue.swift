import FoundationEssentials

/// A JSON document read without a fixed schema, so that the API can name the exact key that is
/// wrong (and refuse unknown keys) instead of failing the whole body with a decoder message.
enum JSONValue: Decodable, Equatable {
    case null
    case bool(Bool)
    case int(Int)
    case double(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if container.decodeNil() {
            self = .null
        } else if let b = try? container.decode(Bool.self) {
            self = .bool(b)
        } else if let i = try? container.decode(Int.self) {
            self = .int(i)
        } else if let d = try? container.decode(Double.self) {
            self = .double(d)
        } else if let s = try? container.decode(String.self) {
            self = .string(s)
        } else if let a = try? container.decode([JSONValue].self) {
            self = .array(a)
        } else {
            self = .object(try container.decode([String: JSONValue].self))
        }
    }

    static func parse(_ bytes: [UInt8]) throws(APIError) -> JSONValue {
        do {
            return try JSONDecoder().decode(JSONValue.self, from: Data(bytes))
        } catch {
            throw APIError(400, "invalid_json", "the body is not valid JSON")
        }
    }

    /// Numbers as written; anything else by its kind.
    var display: String {
        switch self {
        case .int(let i): "\(i)"
        case .double(let d): "\(d)"
        default: kind
        }
    }

    var kind: String {
        switch self {
        case .null: "null"
        case .bool: "a boolean"
        case .int, .double: "a number"
        case .string(let s): "the string \"\(s.prefix(40))\""
        case .array: "a list"
        case .object: "an object"
        }
    }
}

/// A JSON object's fields, read with strict types; errors name the key.
struct JSONFields {
    let fields: [String: JSONValue]
    let path: String

    init(_ value: JSONValue, path: String = "", allowed: Set<String>) throws(APIError) {
        guard case .object(let fields) = value else {
            throw APIError.invalid(path.isEmpty ? "body" : path, "expected a JSON object, got \(value.kind)")
        }
        for key in fields.keys where !allowed.contains(key) {
            throw APIError.invalid(
                Self.join(path, key),
                "unknown key; expected one of \(allowed.sorted().joined(separator: ", "))"
            )
        }
        self.fields = fields
        self.path = path
    }

    static func join(_ path: String, _ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    func has(_ key: String) -> Bool { fields[key] != nil && fields[key] != .null }

    func string(_ key: String, required: Bool = false) throws(APIError) -> String? {
        guard let value = fields[key], value != .null else {
            if required { throw APIError.invalid(Self.join(path, key), "required") }
            return nil
        }
        guard case .string(let s) = value else {
            throw APIError.invalid(Self.join(path, key), "expected a string, got \(value.kind)")
        }
        return s
    }

    func int(_ key: String, in range: ClosedRange<Int>, required: Bool = false) throws(APIError) -> Int? {
        guard let value = fields[key], value != .null else {
            if required { throw APIError.invalid(Self.join(path, key), "required") }
            return nil
        }
        guard case .int(let i) = value, range.contains(i) else {
            throw APIError.invalid(
                Self.join(path, key),
                "expected an integer in \(range.lowerBound)...\(range.upperBound), got \(value.display)"
            )
        }
        return i
    }

    func stringMap(_ key: String) throws(APIError) -> [String: String]? {
        guard let value = fields[key], value != .null else { return nil }
        guard case .object(let object) = value else {
            throw APIError.invalid(Self.join(path, key), "expected an object of strings, got \(value.kind)")
        }
        var result: [String: String] = [:]
        for (k, v) in object {
            guard case .string(let s) = v else {
                throw APIError.invalid(Self.join(Self.join(path, key), k), "expected a string, got \(v.kind)")
            }
            result[k] = s
        }
        return result
    }
}

/// An API error: the status, a stable token, and a message naming what was wrong.
struct APIError: Error, Encodable {
    var status: Int
    var error: String
    var message: String

    init(_ status: Int, _ token: String, _ message: String) {
        self.status = status
        self.error = token
        self.message = message
    }

    static func invalid(_ key: String, _ message: String) -> APIError {
        APIError(400, "invalid_request", "\(key): \(message)")
    }

    init(_ registryError: RegistryError) {
        switch registryError.kind {
        case .invalid: self.init(400, "invalid_request", registryError.message)
        case .notFound: self.init(404, "not_found", registryError.message)
        case .conflict: self.init(409, "conflict", registryError.message)
        case .unavailable: self.init(503, "store_unavailable", registryError.message)
        }
    }

    enum CodingKeys: String, CodingKey { case error, message }
}
