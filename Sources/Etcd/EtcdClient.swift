import FoundationEssentials
public import GRPCCore
public import GRPCNIOTransportHTTP2
public import Logging
import SwiftProtobuf
import Synchronization

/// A client of an etcd v3 cluster (KV, Lease, Watch, Election) over gRPC, with the generated
/// code in `Generated/`. It has a channel to each member and uses one at a time: a member that
/// is unreachable, or cannot answer in time (it lost its leader or the quorum), is left for the
/// next one. It retries what it can safely retry, and turns every failure into an ``EtcdError``
/// that names the operation.
///
/// A leader change or the loss of one member is not seen by callers: etcd forwards requests to
/// its leader, `unavailable` answers are retried on the next member within the call's deadline,
/// and watches resume from their next revision.
public final class EtcdClient: Sendable {
    public let endpoints: [EtcdEndpoint]
    /// One channel per member (a DNS name's, over every address it resolves to) for calls, and
    /// one for the long-lived streams (watches, campaigns). Apart, because etcd answers many
    /// calls with a reset of the stream after their response, and past 200 resets in 10 s
    /// grpc-swift's HTTP/2 client closes the connection as a flood (NIOHTTP2's rapid-reset
    /// guard): a busy registry would break its watch every few seconds if they shared it.
    let members: [GRPCClient<HTTP2ClientTransport.Posix>]
    let streamMembers: [GRPCClient<HTTP2ClientTransport.Posix>]
    /// The member in use.
    private let current = Atomic<Int>(0)
    let logger: Logger
    /// Each unary call's deadline, retries included.
    let callTimeout: Duration

    /// A client of the members at `endpoints` (addresses or DNS names). Nothing is connected
    /// until ``run()`` runs.
    public init(
        endpoints: [EtcdEndpoint],
        tls: EtcdTLS? = nil,
        callTimeout: Duration = .seconds(5),
        logger: Logger
    ) throws(EtcdError) {
        self.endpoints = endpoints
        self.logger = logger
        self.callTimeout = callTimeout
        try EtcdEndpoint.check(endpoints)
        let targets = endpoints.map(\.target)
        var config = HTTP2ClientTransport.Posix.Config.defaults
        // A member that stops answering (paused, cut off) is noticed by its pings within ~8 s.
        config.connection.keepalive = .init(time: .seconds(5), timeout: .seconds(3), allowWithoutCalls: true)
        config.backoff = .init(initial: .milliseconds(100), max: .seconds(2), multiplier: 1.6, jitter: 0.2)
        if let name = tls?.serverName { config.http2.authority = name }
        let security: HTTP2ClientTransport.Posix.TransportSecurity = tls.map { .tls($0.transport) } ?? .plaintext
        func channels() throws -> [GRPCClient<HTTP2ClientTransport.Posix>] {
            try targets.map { target in
                GRPCClient(
                    transport: try HTTP2ClientTransport.Posix(
                        target: target,
                        transportSecurity: security,
                        config: config
                    )
                )
            }
        }
        do {
            members = try channels()
            streamMembers = try channels()
        } catch {
            throw EtcdError(operation: "connecting to \(EtcdEndpoint.list(endpoints))", underlying: "\(error)")
        }
    }

    /// Runs the connections until ``close()`` (or the task is cancelled).
    public func run() async throws {
        try await withThrowingDiscardingTaskGroup { group in
            for member in members + streamMembers { group.addTask { try await member.runConnections() } }
        }
    }

    /// Stops the client: calls in progress finish, new ones fail.
    public func close() {
        for member in members + streamMembers { member.beginGracefulShutdown() }
    }

    /// The member in use (its index in ``endpoints``).
    public var currentMember: Int { current.load(ordering: .relaxed) }

    var grpc: GRPCClient<HTTP2ClientTransport.Posix> { members[currentMember] }

    /// Moves on from member `index` (if no other call did already).
    func memberFailed(_ index: Int) {
        guard members.count > 1 else { return }
        let next = (index + 1) % members.count
        if current.compareExchange(expected: index, desired: next, ordering: .relaxed).exchanged {
            logger.info(
                "etcd: moving to the next member",
                metadata: ["from": "\(endpoints[index])", "to": "\(endpoints[next])"]
            )
        }
    }

    var kv: Etcdserverpb_KV.Client<HTTP2ClientTransport.Posix> { .init(wrapping: grpc) }
    var lease: Etcdserverpb_Lease.Client<HTTP2ClientTransport.Posix> { .init(wrapping: grpc) }
    var election: V3electionpb_Election.Client<HTTP2ClientTransport.Posix> { .init(wrapping: grpc) }

    // MARK: Calls with retries

    /// Runs `call` until it succeeds, fails with something other than a transient error, or the
    /// deadline passes. Transient: the member was unreachable or had no leader (`unavailable`),
    /// or the attempt ran out of time while others remain.
    func retrying<T: Sendable>(
        _ operation: @autoclosure () -> String,
        timeout: Duration? = nil,
        _ call: (CallOptions) async throws -> T
    ) async throws(EtcdError) -> T {
        let deadline = ContinuousClock.now + (timeout ?? callTimeout)
        var delay: Duration = .milliseconds(50)
        var attempt = 0
        while true {
            attempt += 1
            var options = CallOptions.defaults
            options.timeout = min(deadline - .now, .seconds(2))
            let member = currentMember
            do {
                return try await call(options)
            } catch let error as RPCError
                where (error.code == .unavailable || error.code == .deadlineExceeded)
                && ContinuousClock.now + delay < deadline
            {
                memberFailed(member)
                if Task.isCancelled { throw EtcdError(operation: operation(), underlying: "cancelled") }
                logger.debug(
                    "etcd call failed; retrying",
                    metadata: ["operation": "\(operation())", "attempt": "\(attempt)", "error": "\(error)"]
                )
                try? await Task.sleep(for: delay)
                delay = min(delay * 2, .milliseconds(500))
            } catch let error as RPCError {
                throw EtcdError(operation: operation(), code: error.code, underlying: error.message)
            } catch {
                throw EtcdError(operation: operation(), underlying: "\(error)")
            }
        }
    }

    // MARK: KV

    /// The key's current value, or nil.
    public func get(_ key: String) async throws(EtcdError) -> EtcdKeyValue? {
        var request = Etcdserverpb_RangeRequest()
        request.key = Data(key.utf8)
        let response = try await retrying("reading \(key)") { try await kv.range(request, options: $0) }
        return response.kvs.first.map(EtcdKeyValue.init)
    }

    /// Every key under `prefix`, sorted, and the store's revision they were read at.
    public func list(prefix: String) async throws(EtcdError) -> (values: [EtcdKeyValue], revision: Int64) {
        var request = Etcdserverpb_RangeRequest()
        request.key = Data(prefix.utf8)
        request.rangeEnd = Data(EtcdKeyValue.prefixEnd(prefix))
        request.sortOrder = .ascend
        request.sortTarget = .key
        let response = try await retrying("listing \(prefix)") { try await kv.range(request, options: $0) }
        return (response.kvs.map(EtcdKeyValue.init), response.header.revision)
    }

    /// Sets `key` (attached to `lease` unless 0); returns the store's new revision.
    @discardableResult
    public func put(_ key: String, _ value: [UInt8], lease: Int64 = 0) async throws(EtcdError) -> Int64 {
        var request = Etcdserverpb_PutRequest()
        request.key = Data(key.utf8)
        request.value = Data(value)
        request.lease = lease
        return try await retrying("writing \(key)") { try await kv.put(request, options: $0) }.header.revision
    }

    /// Deletes `key`, or every key under it with `prefix`; returns how many were deleted.
    @discardableResult
    public func delete(_ key: String, prefix: Bool = false) async throws(EtcdError) -> Int64 {
        var request = Etcdserverpb_DeleteRangeRequest()
        request.key = Data(key.utf8)
        if prefix { request.rangeEnd = Data(EtcdKeyValue.prefixEnd(key)) }
        return try await retrying("deleting \(key)") { try await kv.deleteRange(request, options: $0) }.deleted
    }

    /// One transaction: `success` if every comparison holds, else `failure`. An attempt that
    /// failed in transit may have been applied: callers compare revisions, so a repeat finds its
    /// own write and takes `failure`; see `EtcdRegistryStore` for how that is told apart.
    public func transaction(
        _ operation: @autoclosure () -> String,
        compare: [Etcdserverpb_Compare],
        success: [Etcdserverpb_RequestOp],
        failure: [Etcdserverpb_RequestOp] = []
    ) async throws(EtcdError) -> Etcdserverpb_TxnResponse {
        var request = Etcdserverpb_TxnRequest()
        request.compare = compare
        request.success = success
        request.failure = failure
        return try await retrying(operation()) { try await kv.txn(request, options: $0) }
    }

    /// The cluster's current revision (a cheap linearizable read: it needs a quorum).
    public func revision(timeout: Duration? = nil) async throws(EtcdError) -> Int64 {
        var request = Etcdserverpb_RangeRequest()
        request.key = Data([0])
        request.countOnly = true
        return try await retrying("reading the revision", timeout: timeout) { try await kv.range(request, options: $0) }
            .header.revision
    }

    // MARK: Leases

    /// A new lease of `ttl` seconds (etcd may lengthen it to its minimum); its id and TTL.
    public func grantLease(ttl: Int64) async throws(EtcdError) -> (id: Int64, ttl: Int64) {
        var request = Etcdserverpb_LeaseGrantRequest()
        request.ttl = ttl
        let response = try await retrying("granting a \(ttl) s lease") {
            try await lease.leaseGrant(request, options: $0)
        }
        guard response.error.isEmpty else {
            throw EtcdError(operation: "granting a \(ttl) s lease", underlying: response.error)
        }
        return (response.id, response.ttl)
    }

    /// Renews the lease for its whole TTL; returns the TTL, or nil when the lease no longer
    /// exists (it ran out or was revoked, and its keys are gone). `timeout` bounds the call,
    /// retries included (the client's call timeout by default).
    public func keepAlive(_ id: Int64, timeout: Duration? = nil) async throws(EtcdError) -> Int64? {
        var message = Etcdserverpb_LeaseKeepAliveRequest()
        message.id = id
        let request = message
        let ttl = try await retrying("renewing lease \(hex(id))", timeout: timeout) { options in
            try await lease.leaseKeepAlive(
                options: options,
                requestProducer: { writer in try await writer.write(request) },
                onResponse: { response in
                    for try await message in response.messages { return message.ttl }
                    throw RPCError(code: .unavailable, message: "the member closed the keep-alive stream")
                }
            )
        }
        return ttl > 0 ? ttl : nil
    }

    /// Revokes the lease; its keys are deleted. A lease already gone is not an error.
    public func revoke(_ id: Int64) async throws(EtcdError) {
        var request = Etcdserverpb_LeaseRevokeRequest()
        request.id = id
        do {
            _ = try await retrying("revoking lease \(hex(id))") { try await lease.leaseRevoke(request, options: $0) }
        } catch  where error.code == .notFound {
            return
        }
    }

    /// The lease's remaining seconds, or nil when it is gone.
    public func timeToLive(_ id: Int64) async throws(EtcdError) -> Int64? {
        var request = Etcdserverpb_LeaseTimeToLiveRequest()
        request.id = id
        let response = try await retrying("reading lease \(hex(id))") {
            try await lease.leaseTimeToLive(request, options: $0)
        }
        return response.ttl > 0 ? response.ttl : nil
    }

    // MARK: Cluster

    /// Each member's answer to `Status` (its version, leader, raft index), by endpoint; a member
    /// that does not answer within `timeout` is left out. For `status` and readiness checks.
    public func memberStatus(timeout: Duration = .seconds(1)) async -> [EtcdEndpoint: Etcdserverpb_StatusResponse] {
        await withTaskGroup(of: (EtcdEndpoint, Etcdserverpb_StatusResponse?).self) { group in
            for (endpoint, member) in zip(endpoints, members) {
                group.addTask {
                    var options = CallOptions.defaults
                    options.timeout = timeout
                    let status = try? await Etcdserverpb_Maintenance.Client(wrapping: member).status(
                        .init(),
                        options: options
                    )
                    return (endpoint, status)
                }
            }
            var result: [EtcdEndpoint: Etcdserverpb_StatusResponse] = [:]
            for await (endpoint, status) in group { if let status { result[endpoint] = status } }
            return result
        }
    }
}

func hex(_ id: Int64) -> String { String(UInt64(bitPattern: id), radix: 16) }

/// One stored key with its value and revisions.
public struct EtcdKeyValue: Sendable, Hashable {
    public var key: String
    public var value: [UInt8]
    /// The revision of the key's last change, and of its creation.
    public var modRevision: Int64
    public var createRevision: Int64
    /// The key's lease (0: none).
    public var lease: Int64

    public init(key: String, value: [UInt8], modRevision: Int64, createRevision: Int64, lease: Int64) {
        self.key = key
        self.value = value
        self.modRevision = modRevision
        self.createRevision = createRevision
        self.lease = lease
    }

    init(_ kv: Mvccpb_KeyValue) {
        self.init(
            key: String(decoding: kv.key, as: UTF8.self),
            value: Array(kv.value),
            modRevision: kv.modRevision,
            createRevision: kv.createRevision,
            lease: kv.lease
        )
    }

    /// The end of the range of keys that start with `prefix` (the prefix with its last byte
    /// that is not 0xff incremented).
    public static func prefixEnd(_ prefix: String) -> [UInt8] {
        var end = Array(prefix.utf8)
        while let last = end.last {
            if last < 0xff {
                end[end.count - 1] = last + 1
                return end
            }
            end.removeLast()
        }
        return [0]  // every key
    }
}

/// A failed etcd operation: what was being done, the gRPC status when there was one, and why.
public struct EtcdError: Error, CustomStringConvertible, Sendable {
    public var operation: String
    public var code: RPCError.Code?
    public var underlying: String

    public init(operation: String, code: RPCError.Code? = nil, underlying: String) {
        self.operation = operation
        self.code = code
        self.underlying = underlying
    }

    public var description: String {
        "etcd: \(operation) failed: \(code.map { "\($0): " } ?? "")\(underlying)"
    }
}
