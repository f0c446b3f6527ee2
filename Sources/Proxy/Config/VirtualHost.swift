/// A set of domains and the routes tried, in order, for requests whose `Host` matches one of them.
public struct VirtualHost: Sendable, Hashable, Codable {
    public var name: String
    /// `example.com` (exact), `*.example.com` (any name ending in `.example.com`), or `*`.
    public var domains: [String]
    public var routes: [Route]

    public init(name: String, domains: [String], routes: [Route]) {
        self.name = name
        self.domains = domains
        self.routes = routes
    }
}
