public import CoreMetrics
public import Logging
public import ServiceLifecycle

#if canImport(Glibc)
import CMalloc
import Glibc
#endif

/// Gives the memory freed after a burst back to the kernel.
///
/// glibc's allocator keeps what a program frees in its arenas (one per thread that met contention:
/// each event loop gets its own). It returns only the free space at the top of an arena by itself,
/// so after thousands of connections came and went the resident size stays near its peak although
/// nothing is in use: one long-lived allocation above the freed ones pins the pages below it.
/// `malloc_trim(0)` hands every whole free page of every arena back (`MADV_DONTNEED`), wherever it
/// is. Calling it costs a walk of the heap with each arena locked in turn, so this service calls
/// it only when the resident memory not in use by the allocator grew by ``threshold`` since the
/// last return (a burst ended), checking every ``interval``: a state, not an event, so a burst
/// shorter than the interval is seen too. Counted in `trellis_memory_returns_total` and
/// `trellis_memory_returned_bytes_total` (the resident size it dropped by).
public struct MemoryReturn: Service {
    public let enabled: Bool
    public let interval: Duration
    public let threshold: Int
    private let logger: Logger
    private let returns: Counter
    private let returnedBytes: Counter

    /// `enabled: false` leaves freed memory to the allocator (the executables pass
    /// `TRELLIS_MEMORY_RETURN=off` from their environment, to compare).
    public init(
        enabled: Bool = true,
        interval: Duration = .seconds(5),
        threshold: Int = 8 << 20,
        logger: Logger,
        factory: any MetricsFactory = MetricsSystem.factory
    ) {
        self.enabled = enabled
        self.interval = interval
        self.threshold = threshold
        self.logger = logger
        self.returns = Counter(label: "trellis_memory_returns_total", dimensions: [], factory: factory)
        self.returnedBytes = Counter(label: "trellis_memory_returned_bytes_total", dimensions: [], factory: factory)
    }

    /// What the executables read from their environment: `TRELLIS_MEMORY_RETURN=off` turns the
    /// service off (to compare, as `Benchmarks/memory-burst.sh` does); anything else leaves it on.
    public static func enabled(by environment: [String: String]) -> Bool {
        environment["TRELLIS_MEMORY_RETURN"] != "off"
    }

    public func run() async throws {
        guard enabled else {
            logger.info("freed memory is left to the allocator")
            // A service that returns would stop the group: wait for the shutdown instead.
            try? await gracefulShutdown()
            return
        }
        await cancelWhenGracefulShutdown { await watch() }
    }

    private func watch() async {
        var policy = Policy(threshold: threshold, held: Self.heldBytes())
        while !Task.isCancelled {
            do { try await Task.sleep(for: interval) } catch { return }
            guard policy.shouldReturn(held: Self.heldBytes()) else { continue }
            let dropped = Self.returnNow()
            policy.returned(held: Self.heldBytes())
            returns.increment()
            returnedBytes.increment(by: dropped)
            logger.debug(
                "returned freed memory to the kernel",
                metadata: [
                    "rss.dropped_bytes": "\(dropped)", "rss.bytes": "\(Self.residentBytes())",
                    "heap.held_bytes": "\(Self.heldBytes())",
                ]
            )
        }
    }

    /// When to return memory: the resident bytes the allocator does not use (``heldBytes()``)
    /// grew by `threshold` above the mark, which is what they were right after the last return
    /// (code, stacks and partly used pages stay resident) and follows them down.
    public struct Policy: Sendable, Equatable {
        public let threshold: Int
        public private(set) var mark: Int

        public init(threshold: Int, held: Int) {
            self.threshold = threshold
            self.mark = held
        }

        public mutating func shouldReturn(held: Int) -> Bool {
            if held < mark { mark = held }
            return held - mark >= threshold
        }

        public mutating func returned(held: Int) {
            mark = held
        }
    }

    /// Returns every whole free page to the kernel now; the resident size it dropped by, in bytes.
    @discardableResult
    public static func returnNow() -> Int {
        #if canImport(Glibc)
        let before = residentBytes()
        malloc_trim(0)
        return max(0, before - residentBytes())
        #else
        return 0
        #endif
    }

    /// Resident bytes not in use by glibc's allocator: the resident size less the bytes handed
    /// out (`mallinfo2()`: `uordblks` in the arenas, `hblkhd` mapped on their own).
    public static func heldBytes() -> Int {
        #if canImport(Glibc)
        let info = mallinfo2()
        return residentBytes() - Int(info.uordblks) - Int(info.hblkhd)
        #else
        return 0
        #endif
    }

    /// This process's resident size in bytes (`/proc/self/statm`), or 0 when unreadable.
    public static func residentBytes() -> Int {
        #if canImport(Glibc)
        let fd = open("/proc/self/statm", O_RDONLY)
        guard fd >= 0 else { return 0 }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: 128)
        let count = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard count > 0 else { return 0 }
        // "size resident shared text lib data dt", in pages.
        let fields = bytes[..<count].split(separator: UInt8(ascii: " "))
        guard fields.count > 1, let pages = Int(String(decoding: fields[1], as: UTF8.self)) else { return 0 }
        return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
        #else
        return 0
        #endif
    }
}
