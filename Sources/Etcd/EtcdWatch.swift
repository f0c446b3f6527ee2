import FoundationEssentials
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import Synchronization

/// A change to one key, as a watch reports it.
public enum EtcdEvent: Sendable, Hashable {
    case put(EtcdKeyValue)
    /// The key was deleted (or its lease ran out) at `revision`.
    case delete(key: String, revision: Int64)

    public var key: String {
        switch self {
        case .put(let kv): kv.key
        case .delete(let key, _): key
        }
    }

    public var revision: Int64 {
        switch self {
        case .put(let kv): kv.modRevision
        case .delete(_, let revision): revision
        }
    }
}

/// Why a watch ended for good.
public enum EtcdWatchError: Error, CustomStringConvertible, Sendable {
    /// The revisions from which it would resume were compacted away: the caller must read the
    /// whole range again and watch from there.
    case compacted(requested: Int64, compactedThrough: Int64)

    public var description: String {
        switch self {
        case .compacted(let requested, let through):
            "etcd: the watch cannot resume at revision \(requested): revisions up to \(through) were compacted; read everything again"
        }
    }
}

extension EtcdClient {
    /// Every change under `prefix` from `revision` on, in order, one batch per revision group,
    /// until the caller stops reading (or the task is cancelled). A broken stream (a member that
    /// died or lost its leader) is opened again, on the next member if need be, from the revision
    /// after the last one delivered, so no event is lost or repeated. Ends with
    /// ``EtcdWatchError/compacted(requested:compactedThrough:)`` when that revision is gone.
    public func watch(prefix: String, from revision: Int64) -> AsyncThrowingStream<[EtcdEvent], any Error> {
        let (stream, continuation) = AsyncThrowingStream<[EtcdEvent], any Error>.makeStream()
        let task = Task { await self.runWatch(prefix: prefix, from: revision, into: continuation) }
        continuation.onTermination = { _ in task.cancel() }
        return stream
    }

    private func runWatch(
        prefix: String,
        from revision: Int64,
        into continuation: AsyncThrowingStream<[EtcdEvent], any Error>.Continuation
    ) async {
        let next = Mutex(revision)
        var delay: Duration = .milliseconds(100)
        while !Task.isCancelled {
            let member = currentMember
            let client = Etcdserverpb_Watch.Client(wrapping: streamMembers[member])
            do {
                var create = Etcdserverpb_WatchCreateRequest()
                create.key = Data(prefix.utf8)
                create.rangeEnd = Data(EtcdKeyValue.prefixEnd(prefix))
                create.startRevision = next.withLock { $0 }
                create.progressNotify = true
                var message = Etcdserverpb_WatchRequest()
                message.createRequest = create
                let request = message
                // `hasleader`: a member cut off from its leader ends the watch instead of
                // holding it silent, so it is opened again on a member that can serve it.
                try await client.watch(
                    metadata: ["hasleader": "true"],
                    requestProducer: { writer in
                        try await writer.write(request)
                        // The request side stays open for as long as the watch runs.
                        while true { try await Task.sleep(for: .seconds(3600)) }
                    },
                    onResponse: { response in
                        for try await message in response.messages {
                            if message.compactRevision > 0 {
                                throw EtcdWatchError.compacted(
                                    requested: next.withLock { $0 },
                                    compactedThrough: message.compactRevision
                                )
                            }
                            if message.canceled {
                                throw RPCError(code: .unavailable, message: "watch cancelled: \(message.cancelReason)")
                            }
                            let events = message.events.map { event -> EtcdEvent in
                                switch event.type {
                                case .delete:
                                    .delete(
                                        key: String(decoding: event.kv.key, as: UTF8.self),
                                        revision: event.kv.modRevision
                                    )
                                default: .put(EtcdKeyValue(event.kv))
                                }
                            }
                            if let last = events.last {
                                next.withLock { $0 = last.revision + 1 }
                                continuation.yield(events)
                            } else if !message.created {
                                // A progress notification: everything up to its revision was sent.
                                next.withLock { $0 = max($0, message.header.revision + 1) }
                            }
                        }
                        throw RPCError(code: .unavailable, message: "the member ended the watch")
                    }
                )
            } catch let error as EtcdWatchError {
                continuation.finish(throwing: error)
                return
            } catch {
                if Task.isCancelled { break }
                memberFailed(member)
                logger.warning(
                    "etcd watch broke; opening it again",
                    metadata: ["prefix": "\(prefix)", "from": "\(next.withLock { $0 })", "error": "\(error)"]
                )
                try? await Task.sleep(for: delay)
                delay = min(delay * 2, .seconds(2))
                continue
            }
        }
        continuation.finish()
    }
}
