import TrellisValues

// Durations in the configuration's JSON (`/config_dump`, the agent's saved configuration) are
// written as the YAML writes them (`"1.5s"`), not as Swift's `[seconds, attoseconds]` pair. The
// synthesized `Codable` of the configuration types picks these overloads over the generic ones.
// Reading also accepts the pair, so a configuration saved by an older agent still loads.

extension KeyedEncodingContainer {
    public mutating func encode(_ value: Duration, forKey key: Key) throws {
        try encode(DurationText.format(value), forKey: key)
    }

    public mutating func encodeIfPresent(_ value: Duration?, forKey key: Key) throws {
        guard let value else { return }
        try encode(DurationText.format(value), forKey: key)
    }
}

extension KeyedDecodingContainer {
    public func decode(_ type: Duration.Type, forKey key: Key) throws -> Duration {
        if let text = try? decode(String.self, forKey: key) {
            guard let duration = DurationText.parse(text) else {
                throw DecodingError.dataCorruptedError(
                    forKey: key,
                    in: self,
                    debugDescription: "\(DurationText.expected), got '\(text)'"
                )
            }
            return duration
        }
        return try pair(Duration.self, forKey: key)
    }

    /// Swift's own encoding of the value (through the generic overload).
    private func pair<T: Decodable>(_ type: T.Type, forKey key: Key) throws -> T {
        try decode(type, forKey: key)
    }

    public func decodeIfPresent(_ type: Duration.Type, forKey key: Key) throws -> Duration? {
        guard contains(key), try !decodeNil(forKey: key) else { return nil }
        return try decode(Duration.self, forKey: key)
    }
}
