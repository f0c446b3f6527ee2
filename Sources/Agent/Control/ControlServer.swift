import FoundationEssentials
public import Logging
import NIOConcurrencyHelpers
public import NIOCore
import NIOHTTP1
import NIOPosix
public import ServiceLifecycle
import TrellisConfig
import TrellisValues

#if canImport(Glibc)
import Glibc
#endif

/// The agent's control API, HTTP/1.1 over a Unix domain socket readable and writable by root only
/// (`/run/trellis/agent.sock`): `GET /status`, `POST /drain[?deadline=30s]`, `POST /undrain`,
/// `POST /reload`, all answered in JSON, and `GET /metrics` (the Prometheus text of the admin
/// listener's `/stats/prometheus`, for `status --watch`). `trellis-agent drain|undrain|status` are
/// its clients. The loopback admin
/// port (15000) carries no command that changes the agent.
public final class ControlServer: Service, Sendable {
    public static let defaultPath = "/run/trellis/agent.sock"

    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    private let path: String
    private let controller: AgentController
    private let group: any EventLoopGroup
    private let logger: Logger
    private let renderMetrics: @Sendable () -> String
    private let bound = NIOLockedValueBox<NIOAsyncChannel<Connection, Never>?>(nil)

    public init(
        path: String = ControlServer.defaultPath,
        controller: AgentController,
        group: any EventLoopGroup,
        renderMetrics: @escaping @Sendable () -> String = { "" },
        logger: Logger
    ) {
        self.path = path
        self.controller = controller
        self.renderMetrics = renderMetrics
        self.group = group
        self.logger = logger
    }

    typealias Connection = NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>

    /// Binds the socket (mode 0600, its folder created 0755 if missing). A socket file left by an
    /// agent that died is replaced; one that still answers means another agent runs: refused.
    /// The agent binds it before anything else, so a second agent stops before touching rules or
    /// ports; `run()` binds it if this was not called.
    public func bind() async throws {
        let channel = try await makeChannel()
        bound.withLockedValue { $0 = channel }
    }

    private func makeChannel() async throws -> NIOAsyncChannel<Connection, Never> {
        let folder = String(path[..<(path.lastIndex(of: "/") ?? path.startIndex)])
        if !folder.isEmpty {
            if !FileManager.default.fileExists(atPath: folder) {
                guard mkdir(folder, 0o755) == 0 || errno == EEXIST else {
                    throw Failure(
                        description: "\(folder): cannot create the folder for the control socket (errno \(errno))"
                    )
                }
            }
        }
        if let attributes = try? FileManager.default.attributesOfItem(atPath: path) {
            guard (attributes[.type] as? FileAttributeType) == .typeSocket else {
                throw Failure(description: "\(path) exists and is not a socket; refusing to replace it")
            }
            let answering = try? await ClientBootstrap(group: group).connect(unixDomainSocketPath: path).get()
            if let answering {
                try? await answering.close()
                throw Failure(description: "another trellis-agent is running (its control socket \(path) answers)")
            }
            unlink(path)
        }
        // Created 0600 from the start (the umask covers the window between bind and chmod).
        let previous = umask(0o177)
        defer { umask(previous) }
        let channel = try await ServerBootstrap(group: group)
            .bind(unixDomainSocketPath: path) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    return try Connection(wrappingChannelSynchronously: channel)
                }
            }
        chmod(path, 0o600)
        return channel
    }

    /// Closes a socket bound by ``bind()`` that will not be served (the agent failed to start).
    public func close() async {
        let channel = bound.withLockedValue { bound in
            defer { bound = nil }
            return bound
        }
        try? await channel?.channel.close()
        unlink(path)
    }

    public func run() async throws {
        let server: NIOAsyncChannel<Connection, Never>
        if let early = bound.withLockedValue({ $0 }) { server = early } else { server = try await makeChannel() }
        logger.info("control socket listening", metadata: ["control.path": "\(path)"])
        await withTaskGroup(of: Void.self) { group in
            group.addTask {
                try? await server.executeThenClose { connections in
                    try await withThrowingDiscardingTaskGroup { each in
                        for try await connection in connections {
                            each.addTask { await self.serve(connection) }
                        }
                    }
                }
            }
            try? await gracefulShutdown()
            // Stop accepting first: the loop above is still handed what was already accepted,
            // then ends. Cancelling it right away could drop a connection NIO had accepted but
            // the loop had not taken, which NIO traps on. Commands still running get 5 s.
            try? await server.channel.close()
            group.addTask { try? await Task.sleep(for: .seconds(5)) }
            await group.next()
            group.cancelAll()
        }
        unlink(path)
    }

    private func serve(_ connection: Connection) async {
        try? await connection.executeThenClose { inbound, outbound in
            var head: HTTPRequestHead?
            for try await part in inbound {
                switch part {
                case .head(let h): head = h
                case .body: break
                case .end:
                    guard let request = head else { return }
                    let (status, body) = await respond(to: request)
                    var headers = HTTPHeaders()
                    headers.add(name: "content-type", value: "application/json")
                    headers.add(name: "content-length", value: "\(body.utf8.count)")
                    headers.add(name: "connection", value: "close")
                    try await outbound.write(
                        .head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))
                    )
                    try await outbound.write(.body(.byteBuffer(ByteBuffer(string: body))))
                    try await outbound.write(.end(nil))
                    return
                }
            }
        }
    }

    func respond(to head: HTTPRequestHead) async -> (HTTPResponseStatus, String) {
        let parts = head.uri.split(separator: "?", maxSplits: 1)
        let route = parts.first.map(String.init) ?? "/"
        let query = parts.count > 1 ? Self.query(String(parts[1])) : [:]
        switch (head.method, route) {
        case (.GET, "/status"):
            return (.ok, Self.json(await controller.status()))
        case (.GET, "/metrics"):
            return (.ok, renderMetrics())
        case (.POST, "/drain"):
            var deadline: Duration?
            if let text = query["deadline"] {
                guard let parsed = DurationText.parse(text), parsed <= .seconds(24 * 3600) else {
                    return Self.error(.badRequest, "deadline: \(DurationText.expected) (at most 24h), got '\(text)'")
                }
                deadline = parsed
            }
            return (.ok, Self.json(await controller.drain(deadline: deadline)))
        case (.POST, "/undrain"):
            return (.ok, Self.json(await controller.undrain()))
        case (.POST, "/reload"):
            return (.ok, Self.json(await controller.reload()))
        case (_, "/status"), (_, "/metrics"), (_, "/drain"), (_, "/undrain"), (_, "/reload"):
            return Self.error(
                .methodNotAllowed,
                "\(head.method) \(route): use GET /status, GET /metrics, POST /drain, POST /undrain, POST /reload"
            )
        default:
            return Self.error(
                .notFound,
                "\(route): no such command; use GET /status, GET /metrics, POST /drain, POST /undrain, POST /reload"
            )
        }
    }

    static func query(_ text: String) -> [String: String] {
        var result: [String: String] = [:]
        for pair in text.split(separator: "&") {
            let kv = pair.split(separator: "=", maxSplits: 1)
            result[String(kv[0])] = kv.count > 1 ? String(kv[1]) : ""
        }
        return result
    }

    static func json<T: Encodable>(_ value: T) -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        guard let data = try? encoder.encode(value) else { return "{}\n" }
        return String(decoding: data, as: UTF8.self) + "\n"
    }

    static func error(_ status: HTTPResponseStatus, _ message: String) -> (HTTPResponseStatus, String) {
        (status, json(["error": message]))
    }
}
