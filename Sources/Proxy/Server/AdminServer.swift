import Atomics
import FoundationEssentials
public import Logging
import NIOConcurrencyHelpers
public import NIOCore
import NIOHTTP1
import NIOPosix
public import ServiceLifecycle

/// The admin endpoint (loopback only, `127.0.0.1:15000` by default):
/// `/ready`, `/stats/prometheus`, `/config_dump`.
public final class AdminServer: Service, Sendable {
    public typealias MetricsRenderer = @Sendable () -> String
    /// More for `/config_dump`, under its own key (the agent adds its xDS state as `xds`).
    public typealias DumpExtra = @Sendable () -> (key: String, value: any Encodable & Sendable)?

    private let host: String
    private let port: Int
    private let group: any EventLoopGroup
    private let proxy: ProxyServer
    private let renderMetrics: MetricsRenderer
    private let dumpExtra: DumpExtra?
    private let logger: Logger

    /// - Parameter renderMetrics: renders the process's metrics in the Prometheus text format;
    ///   the executable owns the metrics backend and passes it in.
    public init(
        host: String = "127.0.0.1",
        port: Int = 15000,
        group: any EventLoopGroup,
        proxy: ProxyServer,
        renderMetrics: @escaping MetricsRenderer,
        dumpExtra: DumpExtra? = nil,
        logger: Logger
    ) {
        self.dumpExtra = dumpExtra
        self.host = host
        self.port = port
        self.group = group
        self.proxy = proxy
        self.renderMetrics = renderMetrics
        self.logger = logger
    }

    /// Binds and returns the channel (its `localAddress` tells the port when 0 was asked).
    public func bind() async throws -> any Channel {
        let proxy = self.proxy
        let render = self.renderMetrics
        let extra = self.dumpExtra
        return try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(
                        AdminHandler(proxy: proxy, renderMetrics: render, dumpExtra: extra)
                    )
                }
            }
            .bind(to: try SocketAddress.listening(host, port)).get()
    }

    public func run() async throws {
        let channel = try await bind()
        logger.info("admin listening", metadata: ["admin.address": "\(channel.localAddress.map { "\($0)" } ?? "-")"])
        try? await gracefulShutdown()
        try? await channel.close()
    }
}

final class AdminHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let proxy: ProxyServer
    private let renderMetrics: AdminServer.MetricsRenderer
    private let dumpExtra: AdminServer.DumpExtra?
    private var head: HTTPRequestHead?

    init(proxy: ProxyServer, renderMetrics: @escaping AdminServer.MetricsRenderer, dumpExtra: AdminServer.DumpExtra?) {
        self.proxy = proxy
        self.renderMetrics = renderMetrics
        self.dumpExtra = dumpExtra
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head): self.head = head
        case .body: break
        case .end:
            guard let head else { return }
            self.head = nil
            let (status, contentType, body) = respond(to: head)
            var headers = HTTPHeaders()
            headers.add(name: "content-type", value: contentType)
            headers.add(name: "content-length", value: "\(body.utf8.count)")
            context.write(
                wrapOutboundOut(.head(.init(version: head.version, status: status, headers: headers))),
                promise: nil
            )
            if head.method != .HEAD {
                context.write(
                    wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))),
                    promise: nil
                )
            }
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
            if !head.isKeepAlive { context.close(promise: nil) }
        }
    }

    private func respond(to head: HTTPRequestHead) -> (HTTPResponseStatus, String, String) {
        let path = RouteTable.path(of: head.uri)
        switch path {
        case "/ready":
            let bound = proxy.boundAddresses
            let ready = !bound.isEmpty && bound.count == proxy.store.snapshot.config.listeners.count
            return ready ? (.ok, "text/plain", "LIVE\n") : (.serviceUnavailable, "text/plain", "NOT READY\n")
        case "/stats/prometheus":
            return (.ok, "text/plain; version=0.0.4", renderMetrics())
        case "/config_dump":
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            do {
                let snapshot = proxy.store.snapshot
                let data = try encoder.encode(
                    ConfigDump(
                        config: snapshot.config,
                        outliers: Self.ejections(snapshot),
                        failing: Self.failingHealthChecks(snapshot),
                        extra: dumpExtra?()
                    )
                )
                return (.ok, "application/json", String(decoding: data, as: UTF8.self) + "\n")
            } catch {
                return (.internalServerError, "text/plain", "cannot encode configuration: \(error)\n")
            }
        default:
            return (.notFound, "text/plain", "not found; try /ready, /stats/prometheus, /config_dump\n")
        }
    }
}

extension AdminHandler {
    /// The endpoints failing their active health checks now, by cluster.
    static func failingHealthChecks(_ snapshot: ProxySnapshot) -> [String: [String]] {
        var result: [String: [String]] = [:]
        for cluster in snapshot.clusters where !cluster.healthRecords.isEmpty {
            result[cluster.config.name] = cluster.healthRecords.filter { $0.failing.load(ordering: .relaxed) }.map(
                \.address
            )
        }
        return result
    }

    /// The endpoints outlier detection has taken out now, by cluster.
    static func ejections(_ snapshot: ProxySnapshot) -> [String: [ConfigDump.Ejection]] {
        let now = NIODeadline.now().uptimeNanoseconds
        var result: [String: [ConfigDump.Ejection]] = [:]
        for cluster in snapshot.clusters where !cluster.outlierRecords.isEmpty {
            var out: [ConfigDump.Ejection] = []
            for record in cluster.outlierRecords {
                let until = record.ejectedUntil.load(ordering: .relaxed)
                guard until > now else { continue }
                let ejections = record.history.withLockedValue { $0.ejections }
                out.append(
                    .init(
                        endpoint: record.address,
                        secondsLeft: Double((until - now) / 1_000_000) / 1000,
                        ejections: ejections
                    )
                )
            }
            result[cluster.config.name] = out
        }
        return result
    }
}

@available(*, unavailable)
extension AdminHandler: Sendable {}

/// The configuration's own keys, the endpoints ejected now (`outlier_ejections`, by cluster,
/// for clusters with outlier detection) and failing their health checks
/// (`health_check_failing`), plus one more (`xds`) when the executable provides it.
struct ConfigDump: Encodable {
    let config: ProxyConfig
    let outliers: [String: [Ejection]]
    let failing: [String: [String]]
    let extra: (key: String, value: any Encodable & Sendable)?

    struct Ejection: Encodable {
        let endpoint: String
        let secondsLeft: Double
        /// Recent ejections of this endpoint (the multiplier of the base ejection time).
        let ejections: Int

        enum CodingKeys: String, CodingKey {
            case endpoint, ejections
            case secondsLeft = "seconds_left"
        }
    }

    struct Key: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    func encode(to encoder: any Encoder) throws {
        try config.encode(to: encoder)
        var container = encoder.container(keyedBy: Key.self)
        if !outliers.isEmpty { try container.encode(outliers, forKey: Key(stringValue: "outlier_ejections")) }
        if !failing.isEmpty { try container.encode(failing, forKey: Key(stringValue: "health_check_failing")) }
        if let extra { try container.encode(extra.value, forKey: Key(stringValue: extra.key)) }
    }
}
