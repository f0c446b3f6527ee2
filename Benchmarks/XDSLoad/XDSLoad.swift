import ArgumentParser
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import NIOCore
import NIOHTTP1
import NIOPosix
import SwiftProtobuf
import Synchronization
import TrellisHTTP
import XDS

#if canImport(Glibc)
import Glibc
#endif

/// `trellis-xds-load`: registers N×M instances through pilot's HTTP API, connects C simulated
/// sidecars over ADS (each its own HTTP/2 connection, subscribing and ACKing like Envoy: CDS and
/// LDS wildcard, then EDS and RDS by name), then times registration changes until every client
/// has ACKed the resulting push. Prints pilot's RSS and CPU (from /proc) when given its pid.
@main
struct XDSLoad: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "trellis-xds-load")

    @Option(help: "Pilot's xDS address; several, comma-separated, spread the clients over them in turn.")
    var xds = "127.0.0.1:15010"
    @Option(help: "Pilot's HTTP API address.") var api = "127.0.0.1:15014"
    @Option(help: "Simulated ADS clients (sidecars).") var clients = 1000
    @Option(help: "Services registered.") var services = 100
    @Option(help: "Instances per service.") var endpointsPerService = 100
    @Option(help: "Measured registration changes.") var rounds = 10
    @Option(help: "A pilot's pid, to read its RSS and CPU (repeat it for several pilots).") var pilotPid: [Int] = []
    @Flag(help: "Use incremental (Delta) ADS instead of state of the world.") var delta = false
    @Option(
        help:
            "The admin address of a real Envoy connected to the same pilot: each round also times until it has applied the change."
    )
    var envoyAdmin: String?

    func validate() throws {
        guard (1...20_000).contains(clients), (1...10_000).contains(services),
            (1...10_000).contains(endpointsPerService),
            (1...1000).contains(rounds)
        else { throw ValidationError("clients 1...20000, services 1...10000, endpoints 1...10000, rounds 1...1000") }
    }

    func run() async throws {
        let pilots = try xds.split(separator: ",").map { try Self.split(String($0)) }
        let (apiHost, apiPort) = try Self.split(api)
        let http = try await KeepAliveHTTP(host: apiHost, port: apiPort, connections: 8)
        let total = services * endpointsPerService
        let cpu0 = ProcStat.cpuSeconds(pilotPid)

        // 1. The registry: every instance through the HTTP API, spread over the clients' nodes.
        let setupStart = ContinuousClock.now
        try await http.each(0..<total) { i in
            let service = i % services
            let address = "127.\(1 + i / 65_536).\((i / 256) % 256).\(i % 256)"
            let body =
                #"{"service":"svc-\#(service)","address":"\#(address)","port":8080,"node":"load-node-\#(i % clients)","zone":"z\#(i % 3)","ttl_seconds":3600}"#
            return ("POST", "/v1/instances", body)
        }
        let registered = ContinuousClock.now - setupStart

        // 2. The clients.
        let state = LoadState(clients: clients)
        let connectStart = ContinuousClock.now
        let clientTasks = Task {
            await withTaskGroup(of: Void.self) { group in
                for id in 0..<clients {
                    group.addTask {
                        await SimulatedSidecar(
                            id: id,
                            node: "load-node-\(id)",
                            state: state,
                            services: services,
                            delta: delta
                        )
                        .run(host: pilots[id % pilots.count].0, port: pilots[id % pilots.count].1)
                    }
                }
            }
        }
        defer { clientTasks.cancel() }
        while state.synced < clients {
            guard ContinuousClock.now - connectStart < .seconds(120) else {
                throw ValidationError(
                    "only \(state.synced) of \(clients) clients synced in 120 s (failed: \(state.failures))"
                )
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        let initialSync = ContinuousClock.now - connectStart
        let cpu1 = ProcStat.cpuSeconds(pilotPid)

        // 3. Registration changes: one instance added to / removed from a service, in turn.
        var latencies: [Double] = []
        var envoyLatencies: [Double] = []
        var envoy: KeepAliveHTTP?
        if let envoyAdmin {
            let (host, port) = try Self.split(envoyAdmin)
            envoy = try await KeepAliveHTTP(host: host, port: port, connections: 0)
        }
        for round in 1...rounds {
            try await Task.sleep(for: .milliseconds(300))
            let service = round % services
            let add = round % 2 == 1
            let path =
                add
                ? "/v1/instances"
                : "/v1/instances/svc-\(service - 1 < 0 ? services - 1 : service - 1)/127.255.255.1/8080"
            let body =
                #"{"service":"svc-\#(service)","address":"127.255.255.1","port":8080,"node":"load-extra","ttl_seconds":3600}"#
            state.startRound(round)
            let roundStart = ContinuousClock.now
            let status = try await http.request(add ? "POST" : "DELETE", path, add ? body : nil)
            guard status == 201 || status == 204 else {
                throw ValidationError("round \(round): API answered \(status)")
            }
            if let envoy {
                // Envoy's /clusters lists each host as cluster::address:port::...; poll until the
                // extra instance is there (added) or gone (removed).
                let cluster =
                    "outbound|8080||svc-\(add ? service : (service == 0 ? services - 1 : service - 1))::127.255.255.1:8080::"
                var applied = false
                while !applied && ContinuousClock.now - roundStart < .seconds(30) {
                    let text = try await envoy.get("/clusters")
                    applied = text.contains(cluster) == add
                    if !applied { try await Task.sleep(for: .milliseconds(5)) }
                }
                guard applied else {
                    throw ValidationError("round \(round): Envoy did not apply the change within 30 s")
                }
                envoyLatencies.append((ContinuousClock.now - roundStart).seconds)
            }
            let deadline = ContinuousClock.now + .seconds(30)
            while state.ackedThisRound < clients && ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(2))
            }
            let result = state.roundResult()
            guard result.count == clients else {
                throw ValidationError("round \(round): only \(result.count) of \(clients) clients ACKed within 30 s")
            }
            latencies.append(result.max)
            print(
                String(
                    format: "round %2d (%@ svc-%d): all %d clients ACKed after %.0f ms (median client %.0f ms)",
                    round,
                    add ? "add to" : "remove from",
                    add ? service : (service == 0 ? services - 1 : service - 1),
                    clients,
                    result.max * 1000,
                    result.median * 1000
                )
            )
        }
        let cpu2 = ProcStat.cpuSeconds(pilotPid)

        latencies.sort()
        let median = latencies[latencies.count / 2]
        let worst = latencies.last!
        print("")
        print(
            "xDS push, \(clients) \(delta ? "Delta" : "SotW") ADS clients, \(services) services × \(endpointsPerService) = \(total) endpoints"
        )
        print("| measure                                   | value        | target   |")
        print("|-------------------------------------------|--------------|----------|")
        print(String(format: "| registration → all clients ACKed, median  | %9.0f ms | < 1000 ms |", median * 1000))
        print(String(format: "| registration → all clients ACKed, worst   | %9.0f ms | < 1000 ms |", worst * 1000))
        if !envoyLatencies.isEmpty {
            envoyLatencies.sort()
            print(
                String(
                    format: "| registration → applied in a real Envoy, median | %4.0f ms |          |",
                    envoyLatencies[envoyLatencies.count / 2] * 1000
                )
            )
        }
        print(
            String(
                format: "| %d registrations through the API          | %9.1f s  |          |",
                total,
                registered.seconds
            )
        )
        print(
            String(
                format: "| %d clients connected and synced           | %9.1f s  | (%d reconnects) |",
                clients,
                initialSync.seconds,
                state.reconnects
            )
        )
        for (n, pid) in pilotPid.enumerated() {
            guard let rss = ProcStat.memory(pid) else { continue }
            print(
                String(
                    format: "| pilot%@ RSS now / peak                     | %4d / %4d MiB | < 300 MiB |",
                    pilotPid.count > 1 ? " \(n + 1)" : "",
                    rss.current >> 20,
                    rss.peak >> 20
                )
            )
        }
        if let cpu0, let cpu1, let cpu2 {
            print(
                String(
                    format: "| pilot CPU (all): setup+sync / %d pushes    | %5.1f s / %4.2f s |          |",
                    rounds,
                    cpu1 - cpu0,
                    cpu2 - cpu1
                )
            )
        }
        // Pilot's own account: time to translate and hand snapshots to the streams, per push.
        if let metrics = try? await http.get("/metrics") {
            var sum = 0.0
            var count = 0.0
            for line in metrics.split(separator: "\n") {
                if line.hasPrefix("trellis_pilot_xds_translate_seconds_sum ") {
                    sum = Double(line.split(separator: " ")[1]) ?? 0
                }
                if line.hasPrefix("trellis_pilot_xds_translate_seconds_count ") {
                    count = Double(line.split(separator: " ")[1]) ?? 0
                }
            }
            if count > 0 {
                print(
                    String(
                        format: "| pilot translation per push (mean of %.0f)    | %9.0f ms |          |",
                        count,
                        sum / count * 1000
                    )
                )
            }
        }
        clientTasks.cancel()
    }

    static func split(_ text: String) throws -> (String, Int) {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]) else {
            throw ValidationError("expected host:port, got \(text)")
        }
        return (String(text[..<colon]), port)
    }
}

extension Duration {
    var seconds: Double { Double(components.seconds) + Double(components.attoseconds) * 1e-18 }
}

/// What all clients share: how many synced, and the current round's ACK times.
final class LoadState: Sendable {
    let clients: Int
    private let lock = Mutex<State>(State())

    struct State {
        var synced = 0
        var syncedClients: Set<Int> = []
        var reconnects = 0
        var failures = 0
        var round = 0
        var roundStart = ContinuousClock.now
        var acked: [Int: Double] = [:]
    }

    init(clients: Int) { self.clients = clients }

    var synced: Int { lock.withLock { $0.synced } }
    var failures: Int { lock.withLock { $0.failures } }
    var ackedThisRound: Int { lock.withLock { $0.acked.count } }

    /// Counts a client once, even if it syncs again after reconnecting.
    func markSynced(_ client: Int) {
        lock.withLock {
            if $0.syncedClients.insert(client).inserted { $0.synced += 1 }
        }
    }

    func reconnected() { lock.withLock { $0.reconnects += 1 } }
    var reconnects: Int { lock.withLock { $0.reconnects } }
    func markFailed(_ why: String) {
        let first = lock.withLock {
            $0.failures += 1
            return $0.failures <= 3
        }
        if first { print("client failed: \(why)") }
    }

    func startRound(_ round: Int) {
        lock.withLock {
            $0.round = round
            $0.acked = [:]
            $0.roundStart = .now
        }
    }

    /// A client ACKed an endpoint push: the first of each round counts.
    func endpointsACKed(by client: Int) {
        let now = ContinuousClock.now
        lock.withLock {
            guard $0.round > 0, $0.acked[client] == nil else { return }
            $0.acked[client] = (now - $0.roundStart).seconds
        }
    }

    func roundResult() -> (count: Int, max: Double, median: Double) {
        lock.withLock {
            let values = $0.acked.values.sorted()
            return (values.count, values.last ?? 0, values.isEmpty ? 0 : values[values.count / 2])
        }
    }
}

/// One simulated sidecar: subscribes like Envoy, ACKs every response.
struct SimulatedSidecar {
    let id: Int
    let node: String
    let state: LoadState
    let services: Int
    let delta: Bool

    /// Like Envoy, a client whose stream fails reconnects after a randomized back-off (at most
    /// 20 attempts: the tool is bounded).
    func run(host: String, port: Int) async {
        for attempt in 1...20 {
            do {
                let transport = try HTTP2ClientTransport.Posix(
                    target: .ipv4(address: host, port: port),
                    transportSecurity: .plaintext
                )
                try await withGRPCClient(transport: transport) { client in
                    let ads = Envoy_Service_Discovery_V3_AggregatedDiscoveryService.Client(wrapping: client)
                    if delta {
                        try await runDelta(ads)
                    } else {
                        try await runSotW(ads)
                    }
                }
                return
            } catch is CancellationError {
                return
            } catch {
                if Task.isCancelled { return }
                if attempt == 20 {
                    state.markFailed("\(error)")
                    return
                }
                state.reconnected()
                try? await Task.sleep(for: .milliseconds(Int.random(in: 500...2000)))
            }
        }
    }

    /// The route configurations a listener names through RDS, as Envoy would subscribe to them.
    static func routeNames(_ any: Google_Protobuf_Any) -> [String] {
        guard let listener = try? Envoy_Config_Listener_V3_Listener(unpackingAny: any) else { return [] }
        return (listener.filterChains.flatMap(\.filters) + listener.defaultFilterChain.filters).compactMap { filter in
            guard
                let hcm = try? Envoy_Extensions_Filters_Network_HttpConnectionManager_V3_HttpConnectionManager(
                    unpackingAny: filter.typedConfig
                ),
                case .rds(let rds)? = hcm.routeSpecifier
            else { return nil }
            return rds.routeConfigName
        }
    }

    var envoyNode: Envoy_Config_Core_V3_Node {
        var n = Envoy_Config_Core_V3_Node()
        n.id = node
        n.userAgentName = "trellis-xds-load"
        n.metadata.fields["trellis.role"] = Google_Protobuf_Value(stringValue: "sidecar")
        return n
    }

    func runSotW(
        _ ads: Envoy_Service_Discovery_V3_AggregatedDiscoveryService.Client<HTTP2ClientTransport.Posix>
    ) async throws {
        let (requests, sink) = AsyncStream<Envoy_Service_Discovery_V3_DiscoveryRequest>.makeStream()
        @Sendable func request(
            _ type: String,
            _ names: [String] = [],
            nonce: String = "",
            version: String = "",
            node: Bool = false
        )
            -> Envoy_Service_Discovery_V3_DiscoveryRequest
        {
            var r = Envoy_Service_Discovery_V3_DiscoveryRequest()
            if node { r.node = envoyNode }
            r.typeURL = type
            r.resourceNames = names
            r.responseNonce = nonce
            r.versionInfo = version
            return r
        }
        sink.yield(request(TypeURL.cluster, node: true))
        sink.yield(request(TypeURL.listener))
        let state = self.state
        let id = self.id
        let services = self.services
        try await ads.streamAggregatedResources(
            requestProducer: { writer in for await r in requests { try await writer.write(r) } },
            onResponse: { response in
                var edsNames: [String] = []
                var rdsNames: [String] = []
                var edsSynced = false
                for try await message in response.messages {
                    switch message.typeURL {
                    case TypeURL.cluster:
                        let names = message.resources.compactMap { any -> String? in
                            guard let c = try? Envoy_Config_Cluster_V3_Cluster(unpackingAny: any), c.type == .eds else {
                                return nil
                            }
                            return c.name
                        }.sorted()
                        sink.yield(request(TypeURL.cluster, nonce: message.nonce, version: message.versionInfo))
                        if names != edsNames {
                            edsNames = names
                            sink.yield(request(TypeURL.clusterLoadAssignment, names))
                        }
                    case TypeURL.listener:
                        let names = Set(message.resources.flatMap(SimulatedSidecar.routeNames))
                        sink.yield(request(TypeURL.listener, nonce: message.nonce, version: message.versionInfo))
                        if names.sorted() != rdsNames {
                            rdsNames = names.sorted()
                            sink.yield(request(TypeURL.routeConfiguration, rdsNames))
                        }
                    case TypeURL.clusterLoadAssignment:
                        sink.yield(
                            request(
                                TypeURL.clusterLoadAssignment,
                                edsNames,
                                nonce: message.nonce,
                                version: message.versionInfo
                            )
                        )
                        if !edsSynced && edsNames.count >= services {
                            edsSynced = true
                            state.markSynced(id)
                        } else if edsSynced {
                            state.endpointsACKed(by: id)
                        }
                    default:
                        sink.yield(
                            request(message.typeURL, rdsNames, nonce: message.nonce, version: message.versionInfo)
                        )
                    }
                }
            }
        )
    }

    func runDelta(
        _ ads: Envoy_Service_Discovery_V3_AggregatedDiscoveryService.Client<HTTP2ClientTransport.Posix>
    ) async throws {
        let (requests, sink) = AsyncStream<Envoy_Service_Discovery_V3_DeltaDiscoveryRequest>.makeStream()
        @Sendable func request(
            _ type: String,
            subscribe: [String] = [],
            nonce: String = "",
            node: Bool = false
        )
            -> Envoy_Service_Discovery_V3_DeltaDiscoveryRequest
        {
            var r = Envoy_Service_Discovery_V3_DeltaDiscoveryRequest()
            if node { r.node = envoyNode }
            r.typeURL = type
            r.resourceNamesSubscribe = subscribe
            r.responseNonce = nonce
            return r
        }
        sink.yield(request(TypeURL.cluster, node: true))
        sink.yield(request(TypeURL.listener))
        let state = self.state
        let id = self.id
        let services = self.services
        try await ads.deltaAggregatedResources(
            requestProducer: { writer in for await r in requests { try await writer.write(r) } },
            onResponse: { response in
                var edsNames: Set<String> = []
                var rdsNames: Set<String> = []
                var edsKnown: Set<String> = []
                var edsSynced = false
                for try await message in response.messages {
                    sink.yield(request(message.typeURL, nonce: message.nonce))
                    switch message.typeURL {
                    case TypeURL.cluster:
                        var new: [String] = []
                        for r in message.resources {
                            guard let c = try? Envoy_Config_Cluster_V3_Cluster(unpackingAny: r.resource), c.type == .eds
                            else { continue }
                            if edsNames.insert(c.name).inserted { new.append(c.name) }
                        }
                        if !new.isEmpty { sink.yield(request(TypeURL.clusterLoadAssignment, subscribe: new)) }
                    case TypeURL.listener:
                        let new = message.resources.flatMap { SimulatedSidecar.routeNames($0.resource) }.filter {
                            rdsNames.insert($0).inserted
                        }
                        if !new.isEmpty { sink.yield(request(TypeURL.routeConfiguration, subscribe: new)) }
                    case TypeURL.clusterLoadAssignment:
                        for r in message.resources { edsKnown.insert(r.name) }
                        if !edsSynced && edsKnown.count >= services {
                            edsSynced = true
                            state.markSynced(id)
                        } else if edsSynced {
                            state.endpointsACKed(by: id)
                        }
                    default:
                        break
                    }
                }
            }
        )
    }
}

/// Pilot's memory and CPU, from /proc.
enum ProcStat {
    static func read(_ path: String) -> String? {
        guard let f = fopen(path, "r") else { return nil }
        defer { fclose(f) }
        var result = ""
        var buffer = [CChar](repeating: 0, count: 4096)
        while fgets(&buffer, Int32(buffer.count), f) != nil { result += String(cString: buffer) }
        return result
    }

    static func memory(_ pid: Int) -> (current: Int, peak: Int)? {
        guard let text = read("/proc/\(pid)/status") else { return nil }
        func kib(_ key: String) -> Int? {
            for line in text.split(separator: "\n") where line.hasPrefix(key) {
                return Int(line.split(separator: " ", omittingEmptySubsequences: true)[1]).map { $0 * 1024 }
            }
            return nil
        }
        guard let rss = kib("VmRSS:"), let hwm = kib("VmHWM:") else { return nil }
        return (rss, hwm)
    }

    /// The CPU time of every process in `pids`, summed; nil when there are none or one is gone.
    static func cpuSeconds(_ pids: [Int]) -> Double? {
        guard !pids.isEmpty else { return nil }
        var total = 0.0
        for pid in pids {
            guard let seconds = cpuSeconds(pid) else { return nil }
            total += seconds
        }
        return total
    }

    static func cpuSeconds(_ pid: Int) -> Double? {
        guard let text = read("/proc/\(pid)/stat"), let close = text.lastIndex(of: ")") else { return nil }
        let fields = text[text.index(after: close)...].split(separator: " ")
        guard fields.count > 13, let user = Double(fields[11]), let system = Double(fields[12]) else { return nil }
        return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }
}

/// Keep-alive HTTP/1.1 connections to pilot's API (registration at setup and in rounds).
final class KeepAliveHTTP: Sendable {
    typealias Connection = NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart>
    let host: String
    let port: Int
    let connections: [Connection]

    init(host: String, port: Int, connections count: Int) async throws {
        self.host = host
        self.port = port
        var list: [Connection] = []
        for _ in 0..<count {
            list.append(
                try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton).connect(host: host, port: port)
                { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHTTPClientHandlers()
                        return try Connection(wrappingChannelSynchronously: channel)
                    }
                }
            )
        }
        connections = list
    }

    /// Sends one request per index, spread over the connections, each answered before the next.
    func each(_ indices: Range<Int>, _ make: @Sendable @escaping (Int) -> (String, String, String?)) async throws {
        let count = connections.count
        try await withThrowingTaskGroup(of: Void.self) { group in
            for (c, connection) in connections.enumerated() {
                group.addTask {
                    try await connection.executeThenClose { inbound, outbound in
                        var iterator = inbound.makeAsyncIterator()
                        for i in stride(from: indices.lowerBound + c, to: indices.upperBound, by: count) {
                            let (method, path, body) = make(i)
                            let status = try await Self.exchange(
                                method,
                                path,
                                body,
                                host: self.host,
                                inbound: &iterator,
                                outbound: outbound
                            )
                            guard (200..<300).contains(status) else {
                                throw ValidationError("\(method) \(path): status \(status)")
                            }
                        }
                    }
                }
            }
            try await group.waitForAll()
        }
    }

    /// GET on a fresh connection; the body (Envoy's admin, pilot's /metrics).
    func get(_ path: String) async throws -> String {
        try await HTTPClient().request("GET", HTTPClient.URL(host: host, port: port, path: path), timeout: .seconds(10))
            .text
    }

    /// One request on a fresh connection; the status.
    func request(_ method: String, _ path: String, _ body: String?) async throws -> Int {
        try await HTTPClient().request(
            method,
            HTTPClient.URL(host: host, port: port, path: path),
            json: body,
            timeout: .seconds(10)
        )
        .status
    }

    static func exchange(
        _ method: String,
        _ path: String,
        _ body: String?,
        host: String,
        inbound: inout NIOAsyncChannelInboundStream<HTTPClientResponsePart>.AsyncIterator,
        outbound: NIOAsyncChannelOutboundWriter<HTTPClientRequestPart>
    ) async throws -> Int {
        var head = HTTPRequestHead(version: .http1_1, method: HTTPMethod(rawValue: method), uri: path)
        head.headers.add(name: "Host", value: host)
        let bytes = body.map { ByteBuffer(string: $0) }
        head.headers.add(name: "Content-Length", value: "\(bytes?.readableBytes ?? 0)")
        if bytes != nil { head.headers.add(name: "Content-Type", value: "application/json") }
        try await outbound.write(.head(head))
        if let bytes { try await outbound.write(.body(.byteBuffer(bytes))) }
        try await outbound.write(.end(nil))
        var status = 0
        while let part = try await inbound.next() {
            switch part {
            case .head(let response): status = Int(response.status.code)
            case .body: break
            case .end: return status
            }
        }
        throw ValidationError("connection closed before the answer")
    }
}
