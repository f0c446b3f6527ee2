import NIOCore

/// Route timeouts of one event loop without a timer per request.
///
/// Requests of one route share one timeout, so their deadlines arrive in order: each distinct
/// timeout gets a FIFO queue and an append is O(1). A request that finishes gives its slot back;
/// entries whose slot moved on are dropped from the head of their queue as new ones arrive, so a
/// queue holds about as many entries as there are requests in flight. One scheduled task per loop
/// fires at the earliest deadline still pending. The queues are an array searched in order, not a
/// dictionary: a loop sees a handful of distinct timeouts, and taking a queue out of a dictionary
/// and putting it back cost two hashes and ~550 instructions per request.
final class RequestDeadlines {
    private struct Entry {
        let deadline: NIODeadline
        let slot: Int
        let generation: UInt64
    }

    private struct Slot {
        var exchange: ProxyExchange?
        var generation: UInt64
    }

    private let eventLoop: any EventLoop
    private struct Queue {
        let timeout: TimeAmount
        var entries: CircularBuffer<Entry>
    }

    private var queues: [Queue] = []
    private var slots: [Slot] = []
    private var free: [Int] = []
    private var generation: UInt64 = 0
    private var timer: Scheduled<Void>?
    private var timerFiresAt: NIODeadline?

    init(eventLoop: any EventLoop) {
        self.eventLoop = eventLoop
    }

    /// Requests in flight with a deadline (for tests and stats).
    var pending: Int { slots.count - free.count }

    /// Arranges for `exchange.deadlineExpired()` after `timeout`; returns the slot to release when
    /// the exchange finishes first.
    func register(_ exchange: ProxyExchange, timeout: TimeAmount, now: NIODeadline) -> Int {
        generation &+= 1
        let slot: Int
        if let reused = free.popLast() {
            slot = reused
            slots[slot] = Slot(exchange: exchange, generation: generation)
        } else {
            slot = slots.count
            slots.append(Slot(exchange: exchange, generation: generation))
        }
        let deadline = now + timeout
        let entry = Entry(deadline: deadline, slot: slot, generation: generation)
        if let q = queues.firstIndex(where: { $0.timeout == timeout }) {
            while let first = queues[q].entries.first, !isLive(first) { queues[q].entries.removeFirst() }
            queues[q].entries.append(entry)
        } else {
            var entries = CircularBuffer<Entry>(initialCapacity: 64)
            entries.append(entry)
            queues.append(Queue(timeout: timeout, entries: entries))
        }
        if timerFiresAt == nil || deadline < timerFiresAt! { arm(at: deadline) }
        return slot
    }

    /// The exchange of `slot` finished; its deadline no longer matters.
    func release(_ slot: Int) {
        slots[slot].exchange = nil
        slots[slot].generation &+= 1
        free.append(slot)
    }

    /// Read in place (a copy of the slot would retain its exchange).
    private func isLive(_ entry: Entry) -> Bool {
        slots[entry.slot].generation == entry.generation && slots[entry.slot].exchange != nil
    }

    private func arm(at deadline: NIODeadline) {
        timer?.cancel()
        timerFiresAt = deadline
        let bound = NIOLoopBound(self, eventLoop: eventLoop)
        timer = eventLoop.scheduleTask(deadline: deadline) { bound.value.fire() }
    }

    private func fire() {
        timer = nil
        timerFiresAt = nil
        let now = NIODeadline.now()
        var expired: [ProxyExchange] = []
        var next: NIODeadline?
        for q in queues.indices {
            while let first = queues[q].entries.first, first.deadline <= now || !isLive(first) {
                queues[q].entries.removeFirst()
                if isLive(first), let exchange = slots[first.slot].exchange { expired.append(exchange) }
            }
            if let first = queues[q].entries.first { next = next.map { min($0, first.deadline) } ?? first.deadline }
        }
        // A timeout no route uses any more leaves no empty queue behind.
        queues.removeAll { $0.entries.isEmpty }
        if let next { arm(at: next) }
        // Expiring may finish exchanges, which releases their slots: done after the sweep.
        for exchange in expired { exchange.deadlineExpired() }
    }

    func shutdown() {
        timer?.cancel()
        timer = nil
        queues.removeAll()
    }
}

@available(*, unavailable)
extension RequestDeadlines: Sendable {}
