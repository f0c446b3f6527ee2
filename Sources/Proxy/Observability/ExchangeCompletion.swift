import CoreMetrics
import Logging
import NIOCore
import NIOHTTP1

/// What happens once per exchange, however it ended (answered, refused by the proxy, abandoned
/// by its client), in one place: outlier detection hears what the endpoint did, the cluster's
/// metrics count the answer, the middleware release what they hold, and the access log gets one
/// line.
enum ExchangeCompletion {
    static func finished(_ request: RequestContext, chain: [any ProxyMiddleware], accessLog: Bool, loop: LoopContext) {
        let now = NIODeadline.now()
        let elapsed = now - request.startTime
        if let cluster = request.cluster, let detector = cluster.outlier, let policy = cluster.config.outlierDetection,
            let index = request.endpointIndex
        {
            // What the endpoint did: a 5xx answer, or a connection refused, reset or timed out.
            // Decisions of the proxy itself (overflow) and clients leaving say nothing about it.
            let failed: Bool? =
                if let error = request.error { error.endpointFailed } else {
                    (request.responseStatus?.code ?? 0) >= 500
                }
            if let failed {
                detector.finished(
                    cluster.outlierRecords[index],
                    failed: failed,
                    cluster: cluster,
                    policy: policy,
                    now: now.uptimeNanoseconds
                )
            }
        }
        if let cluster = request.cluster {
            if let status = request.responseStatus, request.error == nil || request.endpointIndex != nil {
                cluster.stats.recordResponse(status)
            }
            if request.isGRPC, let status = request.error?.grpcStatus ?? request.grpcStatus {
                cluster.stats.recordGRPC(status)
            }
            if request.endpointIndex != nil { cluster.stats.duration.recordNanoseconds(elapsed.nanoseconds) }
        }
        for middleware in chain { middleware.onComplete(request) }
        if accessLog { log(request, elapsed: elapsed, to: loop.accessLogger) }
    }

    private static func log(_ r: RequestContext, elapsed: TimeAmount, to logger: Logger) {
        let version = r.head.version
        logger.info(
            "\"\(r.head.method.rawValue) \(r.head.uri) HTTP/\(version.major).\(version.minor)\" \(r.responseStatus?.code ?? 0) \(r.error?.token ?? "-")",
            metadata: [
                "http.status": "\(r.responseStatus?.code ?? 0)",
                "trellis.token": "\(r.error?.token ?? "-")",
                "trellis.listener": "\(r.listenerName)",
                "trellis.route": "\(r.routeName ?? "-")",
                "upstream.cluster": "\(r.clusterName ?? "-")",
                "upstream.endpoint": "\(r.endpoint?.description ?? "-")",
                "grpc.status": "\(r.isGRPC ? (r.error?.grpcStatus ?? r.grpcStatus).map { "\($0)" } ?? "-" : "-")",
                "downstream.address": "\(r.remoteAddress?.description ?? "-")",
                "http.request_bytes": "\(r.requestBytes)",
                "http.response_bytes": "\(r.responseBytes)",
                "duration_ms": "\(Double(elapsed.nanoseconds) / 1e6)",
            ]
        )
    }
}
