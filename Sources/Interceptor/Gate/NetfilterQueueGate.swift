import Atomics
import CMnl
import CNetfilterQueue
public import CoreMetrics
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// The reader of the NFQUEUE gate: decides, for the SYN of each capturable connection, whether it
/// enters the proxy (accepted with the gate mark) or bypasses it (accepted unmarked). It owns the
/// netlink socket and one thread of its own, so it never blocks an event loop; verdicts go out in
/// batches (one per receive). When no reader is bound the kernel bypasses the queue
/// (`--queue-bypass`), and a full queue accepts (`fail-open`): capture fails open.
public final class NetfilterQueueGate: @unchecked Sendable {
    public enum Mode: Int, Sendable {
        /// New connections enter the proxy.
        case capture = 0
        /// New connections bypass the proxy (draining, or not ready yet).
        case bypass = 1
    }

    public struct Counters: Sendable, Hashable {
        /// SYNs the gate decided on.
        public var gated: Int
        /// …of which sent into the proxy.
        public var captured: Int
        /// …of which let through directly.
        public var bypassed: Int
        /// Times the socket buffer overflowed (the kernel accepted the packets, fail-open).
        public var overflows: Int
    }

    public let queue: UInt32
    public let mark: UInt32
    private let mode = ManagedAtomic<Int>(Mode.bypass.rawValue)
    private let gated = ManagedAtomic<Int>(0)
    private let captured = ManagedAtomic<Int>(0)
    private let bypassed = ManagedAtomic<Int>(0)
    private let overflows = ManagedAtomic<Int>(0)
    private let stopping = ManagedAtomic<Bool>(false)
    private let capturedMetric: Counter
    private let bypassedMetric: Counter
    private let overflowMetric: Counter
    private let socket: OpaquePointer
    private let portID: UInt32
    private var thread: Thread?
    private let finished = DispatchSemaphore(value: 0)

    /// Opens the netlink socket (in the calling thread's network namespace) and binds the queue.
    /// Starts in `.bypass`; call ``setMode(_:)`` once the proxy is ready.
    ///
    /// Metrics: `trellis_gate_connections_total{decision="captured"|"bypassed"}` and
    /// `trellis_gate_queue_overflows_total`.
    public init(
        queue: Int,
        mark: UInt32,
        maxQueueLength: UInt32 = 16384,
        metrics: any MetricsFactory = MetricsSystem.factory
    ) throws(IPTablesError) {
        guard let nl = mnl_socket_open(NETLINK_NETFILTER) else {
            throw IPTablesError("NFQUEUE: cannot open a netfilter netlink socket (errno \(CNetfilterQueue_errno()))")
        }
        guard mnl_socket_bind(nl, 0, pid_t(MNL_SOCKET_AUTOPID)) >= 0 else {
            let e = CNetfilterQueue_errno()
            mnl_socket_close(nl)
            throw IPTablesError("NFQUEUE: cannot bind the netlink socket (errno \(e))")
        }
        var buffer = [CChar](repeating: 0, count: Int(CMnl_socket_buffer_size()))
        let rc = buffer.withUnsafeMutableBufferPointer {
            CNetfilterQueue_bind(nl, $0.baseAddress, UInt32(queue), maxQueueLength)
        }
        guard rc == 0 else {
            let e = CNetfilterQueue_errno()
            mnl_socket_close(nl)
            throw IPTablesError("NFQUEUE: cannot bind queue \(queue) (errno \(e)); is another reader bound to it?")
        }
        // Large receive buffer for bursts; a wakeup at least every 200 ms to notice stop().
        var size: Int32 = 8 * 1024 * 1024
        _ = setsockopt(mnl_socket_get_fd(nl), SOL_SOCKET, SO_RCVBUFFORCE, &size, socklen_t(MemoryLayout<Int32>.size))
        var timeout = timeval(tv_sec: 0, tv_usec: 200_000)
        _ = setsockopt(mnl_socket_get_fd(nl), SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        self.capturedMetric = Counter(
            label: "trellis_gate_connections_total",
            dimensions: [("decision", "captured")],
            factory: metrics
        )
        self.bypassedMetric = Counter(
            label: "trellis_gate_connections_total",
            dimensions: [("decision", "bypassed")],
            factory: metrics
        )
        self.overflowMetric = Counter(label: "trellis_gate_queue_overflows_total", factory: metrics)
        self.socket = nl
        self.portID = mnl_socket_get_portid(nl)
        self.queue = UInt32(queue)
        self.mark = mark
    }

    public func setMode(_ mode: Mode) {
        self.mode.store(mode.rawValue, ordering: .releasing)
    }

    public var counters: Counters {
        Counters(
            gated: gated.load(ordering: .relaxed),
            captured: captured.load(ordering: .relaxed),
            bypassed: bypassed.load(ordering: .relaxed),
            overflows: overflows.load(ordering: .relaxed)
        )
    }

    /// Starts the reader thread.
    public func start() {
        let thread = Thread { [self] in
            self.readLoop()
            self.finished.signal()
        }
        thread.name = "trellis-nfqueue-\(queue)"
        self.thread = thread
        thread.start()
    }

    /// Stops the reader and closes the socket; the queue then has no reader and the kernel
    /// bypasses it.
    public func stop() {
        guard !stopping.exchange(true, ordering: .acquiringAndReleasing) else { return }
        if thread != nil { finished.wait() }
        mnl_socket_close(socket)
    }

    private func readLoop() {
        let size = Int(CMnl_socket_buffer_size()) * 16
        let receive = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        let send = UnsafeMutablePointer<CChar>.allocate(capacity: Int(CMnl_socket_buffer_size()))
        defer {
            receive.deallocate()
            send.deallocate()
        }
        while !stopping.load(ordering: .acquiring) {
            let n = mnl_socket_recvfrom(socket, receive, size)
            if n < 0 {
                let e = CNetfilterQueue_errno()
                if e == ENOBUFS {
                    overflows.wrappingIncrement(ordering: .relaxed)
                    overflowMetric.increment()
                }
                continue  // EAGAIN (timeout), EINTR, ENOBUFS: keep reading
            }
            var remaining = Int32(n)
            var header: UnsafePointer<nlmsghdr>? = UnsafePointer(receive.assumingMemoryBound(to: nlmsghdr.self))
            var maxID: Int64 = -1
            var count = 0
            while let h = header, mnl_nlmsg_ok(h, remaining) {
                let id = CNetfilterQueue_packet_id(h)
                if id >= 0 {
                    maxID = max(maxID, id)
                    count += 1
                }
                header = UnsafePointer(mnl_nlmsg_next(h, &remaining))
            }
            guard maxID >= 0 else { continue }
            let capture = mode.load(ordering: .acquiring) == Mode.capture.rawValue
            _ = CNetfilterQueue_accept_batch(socket, send, queue, UInt32(maxID), capture ? 1 : 0, mark)
            gated.wrappingIncrement(by: count, ordering: .relaxed)
            (capture ? captured : bypassed).wrappingIncrement(by: count, ordering: .relaxed)
            (capture ? capturedMetric : bypassedMetric).increment(by: count)
        }
    }
}
