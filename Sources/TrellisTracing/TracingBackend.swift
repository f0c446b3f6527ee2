import Foundation
public import Logging
import NIOCore
import NIOPosix
import OTel
public import Proxy
public import ServiceLifecycle
import Tracing
import TrellisConfig
public import TrellisPolicy

/// The span exporter of `run` and `gateway`: swift-otel's tracer with its OTLP/gRPC exporter,
/// batched (at most 2,048 spans waiting; past that new ones are dropped, so a dead collector costs
/// memory once and never blocks the data path). Sampling is the data path's (``ProxyTracing``):
/// the tracer records every span it is asked for.
public enum TracingBackend {
    public static func make(
        _ settings: TracingSettings,
        defaultServiceName: String,
        node: String,
        logger: Logger
    ) throws -> (tracing: ProxyTracing, service: any Service) {
        var configuration = OTel.Configuration.default
        configuration.serviceName = settings.serviceName ?? defaultServiceName
        configuration.resourceAttributes = [
            "service.instance.id": node, "host.name": ProcessInfo.processInfo.hostName,
            "service.version": TrellisVersion.current,
        ]
        configuration.diagnosticLogger = .custom(logger)
        configuration.diagnosticLogLevel = .warning
        configuration.logs.enabled = false
        configuration.metrics.enabled = false
        configuration.traces.sampler = .alwaysOn
        configuration.traces.batchSpanProcessor.scheduleDelay = .seconds(1)
        configuration.traces.batchSpanProcessor.exportTimeout = .seconds(5)
        configuration.traces.batchSpanProcessor.maxQueueSize = 2048
        configuration.traces.batchSpanProcessor.maxExportBatchSize = 512
        let host = settings.collectorHost.contains(":") ? "[\(settings.collectorHost)]" : settings.collectorHost
        configuration.traces.otlpExporter.endpoint = "http://\(host):\(settings.collectorPort)"
        configuration.traces.otlpExporter.protocol = .grpc
        configuration.traces.otlpExporter.timeout = .seconds(5)
        let (tracer, service) = try OTel.makeTracingBackend(configuration: configuration)
        let collector = SocketEndpoint(host: settings.collectorHost, port: settings.collectorPort)
        let tracing = ProxyTracing(tracer: tracer, sampleRate: settings.sampleRate, untraced: [collector])
        return (tracing, Exporter(backend: service, tracing: tracing, logger: logger))
    }

    /// How long a stopping exporter may take to send what it holds: a collector that is down
    /// would otherwise hold the process for an export timeout per batch.
    static let flushDeadline = Duration.seconds(2)

    /// Runs the exporter; whenever and however it ends, tracing stops recording (the data path
    /// then only passes trace contexts on), and an error is logged, never thrown: losing the
    /// exporter must not stop the proxy. Once a graceful shutdown starts, the exporter gets
    /// ``flushDeadline`` to send its last spans, then it is cancelled.
    struct Exporter: Service {
        let backend: any Service
        let tracing: ProxyTracing
        let logger: Logger

        func run() async throws {
            defer { tracing.stop() }
            let (backend, logger) = (backend, logger)
            let executor = BackgroundExecutor(logger: logger)
            defer { executor.shutdown() }
            await withTaskGroup(of: Void.self) { group in
                group.addTask {
                    do {
                        try await withTaskExecutorPreference(executor) { try await backend.run() }
                    } catch {
                        logger.error(
                            "the span exporter stopped; no more spans are recorded",
                            metadata: ["error": "\(error)"]
                        )
                    }
                }
                group.addTask {
                    // Cancelled (and so returns at once) when the exporter ended first.
                    guard (try? await gracefulShutdown()) != nil else { return }
                    try? await Task.sleep(for: TracingBackend.flushDeadline)
                }
                await group.next()
                group.cancelAll()
            }
        }
    }
}

/// Where the span exporter's tasks run: one thread of its own, scheduled as a batch thread
/// (`SCHED_BATCH`), which the kernel never lets preempt a thread it wakes from.
///
/// swift-otel hands each started and each ended span to its tracer's task, and each finished span
/// to its batch processor's, through `AsyncStream`s: every hand-off from the event loop wakes the
/// task that waits on the other side. On the cooperative pool that task's thread preempted the
/// event loop at once, ran for one span and slept again: one context switch each way per span
/// (60,000 a second at 100 % sampling on one core). A batch thread that is woken waits for the
/// loop's time slice to end or the loop to wait for I/O, then takes every span handed over
/// meanwhile.
final class BackgroundExecutor: TaskExecutor {
    private let group: MultiThreadedEventLoopGroup
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
