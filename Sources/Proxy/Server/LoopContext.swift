import Logging
import NIOCore

/// What one event loop owns: its upstream pool, its middleware chain and load balancers for the
/// snapshot it last saw. Touched only on that loop, so the hot path takes no lock.
final class LoopContext {
    let eventLoop: any EventLoop
    let store: ProxyConfigStore
    let factories: [any ProxyMiddlewareFactory]
    let stats: ProxyStats
    let logger: Logger
    /// This loop's access-log lines, when the process has an access log.
    let accessLog: LoopAccessLog?
    /// The tracer and sampling, when the process traces requests.
    let tracing: ProxyTracing?
    let pool: UpstreamPool
    /// Buffers for the heads this loop writes, used again (requests, through the pool, and responses).
    let heads = HeadBufferRing()
    /// Where a request head's field lines lie, for the parser that is reading one (each head is
    /// parsed whole before the next, so the loop's parsers share it).
    let lineIndex = RequestFields.LineIndex()
    /// The buffers request field lines are kept in, given back as exchanges finish.
    let fieldBlocks = RequestFields.BlockStack()
    let deadlines: RequestDeadlines
    let resources = LoopResources()
    private(set) var snapshot: ProxySnapshot?
    private(set) var chain = MiddlewareChain([])

    init(
        eventLoop: any EventLoop,
        store: ProxyConfigStore,
        factories: [any ProxyMiddlewareFactory],
        stats: ProxyStats,
        logger: Logger,
        upstreamMark: UInt32? = nil,
        accessLog: AccessLog? = nil,
        tracing: ProxyTracing? = nil
    ) {
        self.tracing = tracing
        self.eventLoop = eventLoop
        self.store = store
        self.factories = factories
        self.stats = stats
        self.logger = logger
        self.accessLog = accessLog.map { LoopAccessLog(sink: $0, eventLoop: eventLoop) }
        self.pool = UpstreamPool(eventLoop: eventLoop, mark: upstreamMark, heads: heads)
        self.deadlines = RequestDeadlines(eventLoop: eventLoop)
    }

    // MARK: Drain

    /// This loop's open HTTP connections (drain closes the idle ones and marks the busy ones).
    private var downstreams: [ObjectIdentifier: any DownstreamConnection] = [:]
    /// Relayed TCP connections of this loop that are glued to their upstream.
    var activeRelays = 0
    /// Whether connections opened on this loop answer with `Connection: close` and close when idle.
    private(set) var draining = false

    func opened(_ handler: any DownstreamConnection) {
        downstreams[ObjectIdentifier(handler)] = handler
    }

    func closed(_ handler: any DownstreamConnection) {
        downstreams.removeValue(forKey: ObjectIdentifier(handler))
    }

    /// How long a connection must have been idle before drain closes it without a response to
    /// carry `Connection: close`.
    static let drainQuietPeriod = TimeAmount.seconds(1)
    private var drainSweep: RepeatedTask?

    /// Starts draining: connections idle for ``drainQuietPeriod`` are closed now, busy ones close
    /// after their response, and the rest once they have been quiet that long (checked four times
    /// per period). Returns how many were closed now.
    func startDraining() -> Int {
        draining = true
        let closed = sweepIdle()
        if drainSweep == nil {
            let bound = NIOLoopBound(self, eventLoop: eventLoop)
            let every = TimeAmount.nanoseconds(Self.drainQuietPeriod.nanoseconds / 4)
            drainSweep = eventLoop.scheduleRepeatedTask(initialDelay: every, delay: every) { _ in
                _ = bound.value.sweepIdle()
            }
        }
        return closed
    }

    private func sweepIdle() -> Int {
        var closed = 0
        for handler in Array(downstreams.values) where handler.drain(quiet: Self.drainQuietPeriod) { closed += 1 }
        return closed
    }

    func stopDraining() {
        draining = false
        drainSweep?.cancel()
        drainSweep = nil
        for handler in downstreams.values { handler.stopDrain() }
    }

    var activity: ProxyActivity {
        var activity = ProxyActivity(httpConnections: downstreams.count, tcpRelays: activeRelays)
        for handler in downstreams.values { activity.requestsInFlight += handler.requestsInFlight }
        return activity
    }

    private var pendingFlushes: [any BatchedFlush] = []
    /// The batch being flushed, swapped with ``pendingFlushes`` so that neither array is ever
    /// copied or reallocated (a flush may ask for the next batch while this one runs).
    private var flushing: [any BatchedFlush] = []

    /// Flushes `connection` once the loop has handled the I/O events at hand, so that the writes
    /// of one busy loop iteration reach the kernel together (peers are woken once, not per write)
    /// and a connection written to several times in it is flushed once.
    func flushSoon(_ connection: any BatchedFlush) {
        if connection.flushQueued { return }
        connection.flushQueued = true
        pendingFlushes.append(connection)
        if pendingFlushes.count == 1 {
            let bound = NIOLoopBound(self, eventLoop: eventLoop)
            eventLoop.execute { bound.value.flushPending() }
        }
    }

    private func flushPending() {
        swap(&pendingFlushes, &flushing)
        for connection in flushing {
            // Cleared first: what it writes while flushing waits for the next batch.
            connection.flushQueued = false
            connection.flushNow()
        }
        flushing.removeAll(keepingCapacity: true)
    }

    /// The store's ``ProxyConfigStore/version`` when this loop last looked at its snapshot.
    private var seenVersion = -1

    /// The middleware chain of the current snapshot; rebuilt when the store holds a newer
    /// snapshot than this loop last saw (one atomic load of an integer when nothing changed).
    func currentChain() -> MiddlewareChain {
        let version = store.version
        if version == seenVersion { return chain }
        seenVersion = version
        let latest = store.snapshot
        if let snapshot, snapshot === latest { return chain }
        resources.balancers = latest.clusters.map { LoadBalancer(cluster: $0, rng: &resources.rng) }
        chain = MiddlewareChain(factories.map { $0.makeMiddleware(latest, resources) })
        snapshot = latest
        return chain
    }
}

@available(*, unavailable)
extension LoopContext: Sendable {}

/// An HTTP connection from a client (HTTP/1 or HTTP/2), as drain and `/ready`'s activity see it.
protocol DownstreamConnection: AnyObject {
    /// Requests (HTTP/1) or streams (HTTP/2) being served now.
    var requestsInFlight: Int { get }
    /// Marks the connection draining; closes it when it may be closed now (returns true).
    func drain(quiet: TimeAmount) -> Bool
    /// Drain was called off: keep-alive again where the protocol allows.
    func stopDrain()
}

/// A connection whose writes its loop flushes once per batch of I/O events
/// (``LoopContext/flushSoon(_:)``): HTTP/1 downstream and upstream connections.
protocol BatchedFlush: AnyObject {
    /// Whether it waits in the loop's batch (set and cleared by the loop only).
    var flushQueued: Bool { get set }
    /// Hands what was written to the socket now.
    func flushNow()
}
