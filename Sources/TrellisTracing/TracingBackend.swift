public import CoreMetrics
import Foundation
public import Logging
import NIOCore
import NIOPosix
public import Proxy
public import ServiceLifecycle
import Tracing
import TrellisConfig
public import TrellisPolicy

/// The span exporter of `run` and `gateway`: ``OTLPTracer`` with its OTLP/gRPC exporter,
/// batched (at most 2,048 spans waiting; past that new ones are dropped and counted, so a dead
/// collector costs memory once and never blocks the data path). Sampling is the data path's
/// (``ProxyTracing``): the tracer records every span it is asked for.
public enum TracingBackend {
    public static func make(
        _ settings: TracingSettings,
        defaultServiceName: String,
        node: String,
        logger: Logger,
        metrics: any MetricsFactory = MetricsSystem.factory
    ) throws -> (tracing: ProxyTracing, service: any Service) {
        let queue = SpanQueue(capacity: 2048, batchSize: 512)
        let tracer = OTLPTracer(queue: queue)
        let resource = [
            ("service.name", settings.serviceName ?? defaultServiceName),
            ("service.instance.id", node),
            ("service.version", TrellisVersion.current),
            ("host.name", ProcessInfo.processInfo.hostName),
            ("telemetry.sdk.name", "trellis"),
            ("telemetry.sdk.language", "swift"),
            ("telemetry.sdk.version", TrellisVersion.current),
        ]
        let collector = SocketEndpoint(host: settings.collectorHost, port: settings.collectorPort)
        let tracing = ProxyTracing(tracer: tracer, sampleRate: settings.sampleRate, untraced: [collector])
        let exporter = Exporter(
            queue: queue,
            collector: SocketEndpointTarget(host: settings.collectorHost, port: settings.collectorPort),
            resource: resource,
            headers: settings.headers,
            tracing: tracing,
            logger: logger,
            metrics: metrics
        )
        return (tracing, exporter)
    }

    /// How long a stopping exporter may take to send what it holds: a collector that is down
    /// would otherwise hold the process for an export timeout per batch.
    static let flushDeadline = Duration.seconds(2)

    /// Runs the exporter on its own batch thread (``BackgroundExecutor``); whenever and however it
    /// ends, tracing stops recording (the data path then only passes trace contexts on), and an
    /// error is logged, never thrown: losing the exporter must not stop the proxy.
    struct Exporter: Service {
        let queue: SpanQueue
        let collector: SocketEndpointTarget
        let resource: [(String, String)]
        let headers: [String: String]
        let tracing: ProxyTracing
        let logger: Logger
        let metrics: any MetricsFactory

        func run() async throws {
            defer { tracing.stop() }
            let executor = BackgroundExecutor(logger: logger)
            defer { executor.shutdown() }
            let exporter = OTLPExporter(
                queue: queue,
                collector: collector,
                resource: resource,
                headers: headers,
                flushDeadline: TracingBackend.flushDeadline,
                logger: logger,
                eventLoopGroup: executor.group,
                metrics: metrics
            )
            do {
                try await withTaskExecutorPreference(executor) { try await exporter.run() }
            } catch {
                logger.error(
                    "the span exporter stopped; no more spans are recorded",
                    metadata: ["error": "\(error)"]
                )
            }
        }
    }
}

/// Where the span exporter's tasks run: one thread of its own, scheduled as a batch thread
/// (`SCHED_BATCH`), which the kernel never lets preempt a thread it wakes from.
///
/// The exporter wakes when a batch is full or its delay passes, and then encodes up to 512 spans
/// at once (milliseconds of work): on the cooperative pool its thread would preempt the event
/// loop on the same core for that long (swift-otel's tasks, which it replaced, did so twice per
/// span, 60,000 times a second at 100 % sampling on one core). A batch thread that is woken waits
/// for the loop's time slice to end or the loop to wait for I/O. The collector's gRPC connection
/// runs on the same thread.
final class BackgroundExecutor: TaskExecutor {
    let group: MultiThreadedEventLoopGroup
    private let loop: any EventLoop

    init(logger: Logger) {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        loop = group.next()
        loop.execute {
            var parameters = sched_param()
            parameters.sched_priority = 0
            // SCHED_BATCH (<linux/sched.h>; Glibc's module leaves it out); pid 0 is this thread.
            if sched_setscheduler(0, 3, &parameters) != 0 {
                logger.warning(
                    "the span exporter's thread could not be made a batch thread; it may preempt the data path",
                    metadata: ["errno": "\(errno)"]
                )
            }
        }
    }

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        loop.execute { job.runSynchronously(on: self.asUnownedTaskExecutor()) }
    }

    /// Once nothing runs on it any more.
    func shutdown() {
        group.shutdownGracefully { _ in }
    }
}
