import FoundationEssentials
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging

extension EtcdClient {
    /// Runs `body` only while this process leads the election `name` (etcd's v3election API):
    /// it campaigns with `value` on a lease of `ttl` seconds that it keeps alive, runs `body`
    /// once elected, and cancels it as soon as the lease can no longer be shown to be alive
    /// (2/3 of the TTL without a successful renewal), before etcd lets another campaigner win.
    /// Then it campaigns again. Returns when the task is cancelled; leadership is given up
    /// (the lease revoked) on the way out.
    public func lead(
        election name: String,
        value: String,
        ttl: Int64 = 5,
        whileLeader body: @escaping @Sendable () async throws -> Void
    ) async {
        while !Task.isCancelled {
            var leaseID: Int64?
            do {
                let lease = try await grantLease(ttl: ttl)
                leaseID = lease.id
                try await withThrowingTaskGroup(of: Void.self) { group in
                    group.addTask { try await self.holdLease(lease.id, ttl: lease.ttl) }
                    group.addTask {
                        try await self.campaign(name, lease: lease.id, value: value)
                        self.logger.info("elected", metadata: ["election": "\(name)", "value": "\(value)"])
                        try await body()
                    }
                    _ = try await group.next()
                    group.cancelAll()
                }
            } catch {
                if !Task.isCancelled {
                    logger.warning(
                        "election: leadership lost or not won; campaigning again",
                        metadata: ["election": "\(name)", "error": "\(error)"]
                    )
                }
            }
            if let leaseID {
                // Not cancellable: leadership is handed over now rather than at the lease's end.
                await Task { try? await self.revoke(leaseID) }.value
            }
            if !Task.isCancelled { try? await Task.sleep(for: .seconds(1)) }
        }
    }

    /// The value of the election's current leader, or nil when there is none.
    public func leader(election name: String) async throws(EtcdError) -> String? {
        var request = V3electionpb_LeaderRequest()
        request.name = Data(name.utf8)
        do {
            let response = try await retrying("reading the leader of \(name)") {
                try await election.leader(request, options: $0)
            }
            return String(decoding: response.kv.value, as: UTF8.self)
        } catch  where error.underlying.contains("no leader") {
            return nil
        }
    }

    /// Waits (with no deadline) until this lease holds the election.
    private func campaign(_ name: String, lease: Int64, value: String) async throws {
        var request = V3electionpb_CampaignRequest()
        request.name = Data(name.utf8)
        request.lease = lease
        request.value = Data(value.utf8)
        while true {
            let member = currentMember
            do {
                _ = try await V3electionpb_Election.Client(wrapping: streamMembers[member]).campaign(request)
                return
            } catch let error as RPCError where error.code == .unavailable {
                memberFailed(member)  // the member went away: on the next
                try await Task.sleep(for: .milliseconds(200))
            }
        }
    }

    /// Renews the lease every third of its TTL; throws once 2/3 of it passed without a renewal,
    /// or when etcd says it is gone.
    private func holdLease(_ id: Int64, ttl: Int64) async throws {
        let period = Duration.seconds(ttl) / 3
        var renewed = ContinuousClock.now
        while true {
            try await Task.sleep(for: period)
            do {
                guard try await keepAlive(id, timeout: period) != nil else {
                    throw EtcdError(operation: "renewing lease \(hex(id))", underlying: "the lease ran out")
                }
                renewed = .now
            } catch {
                if Task.isCancelled { throw CancellationError() }
                if ContinuousClock.now - renewed >= period * 2 { throw error }
            }
        }
    }
}

extension EtcdClient {
    /// Waits (with no deadline) until this lease holds the lock `name` (etcd's v3lock API);
    /// returns the key that owns it, for ``unlock(_:)``. The lock is released by `unlock`, or
    /// when the lease ends.
    public func lock(_ name: String, lease: Int64) async throws(EtcdError) -> String {
        var request = V3lockpb_LockRequest()
        request.name = Data(name.utf8)
        request.lease = lease
        while true {
            let member = currentMember
            do {
                let response = try await V3lockpb_Lock.Client(wrapping: streamMembers[member]).lock(request)
                return String(decoding: response.key, as: UTF8.self)
            } catch let error as RPCError where error.code == .unavailable {
                memberFailed(member)
                do {
                    try await Task.sleep(for: .milliseconds(200))
                } catch {
                    throw EtcdError(operation: "taking the lock \(name)", underlying: "cancelled")
                }
            } catch let error as RPCError {
                throw EtcdError(operation: "taking the lock \(name)", code: error.code, underlying: error.message)
            } catch {
                throw EtcdError(operation: "taking the lock \(name)", underlying: "\(error)")
            }
        }
    }

    /// Releases a lock ``lock(_:lease:)`` took.
    public func unlock(_ key: String) async throws(EtcdError) {
        var request = V3lockpb_UnlockRequest()
        request.key = Data(key.utf8)
        _ = try await retrying("releasing the lock \(key)") {
            try await V3lockpb_Lock.Client(wrapping: grpc).unlock(request, options: $0)
        }
    }
}
