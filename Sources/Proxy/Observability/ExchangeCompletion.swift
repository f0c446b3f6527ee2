import CoreMetrics
import NIOCore
import NIOHTTP1

#if canImport(Glibc)
import Glibc
#endif

/// What happens once per exchange, however it ended (answered, refused by the proxy, abandoned
/// by its client), in one place: outlier detection hears what the endpoint did, the cluster's
/// metrics count the answer, the middleware release what they hold, and the access log gets one
/// line.
enum ExchangeCompletion {
    /// `completing`: the request's chain, whose middleware that observe completion are told.
    static func finished(
        _ request: RequestContext,
        completing: MiddlewareChain,
        accessLog: Bool,
        loop: LoopContext
    ) {
        let now = NIODeadline.now()
        let elapsed = now - request.startTime
        // Read once: each read of an optional error copies it (a call through its value witness).
        let error = request.error
        let status = request.responseStatus
        if let cluster = request.cluster, let detector = cluster.outlier, let policy = cluster.config.outlierDetection,
            let index = request.endpointIndex
        {
            // What the endpoint did: a 5xx answer, or a connection refused, reset or timed out.
            // Decisions of the proxy itself (overflow) and clients leaving say nothing about it.
            let failed: Bool? =
                if let error { error.endpointFailed } else {
                    (status?.code ?? 0) >= 500
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
        // One call per stats object: each call from here retains and releases the object.
        if let cluster = request.cluster {
            cluster.stats.finished(
                status: error == nil || request.endpointIndex != nil ? status : nil,
                grpcStatus: request.isGRPC ? error?.grpcStatus ?? request.grpcStatus : nil,
                upstreamNanoseconds: request.endpointIndex != nil ? elapsed.nanoseconds : nil,
                error: error?.token,
                sent: request.requestBytes,
                received: request.responseBytes
            )
        }
        request.listenerStats?.finished(
            status: status,
            nanoseconds: elapsed.nanoseconds,
            received: request.requestBytes,
            sent: request.responseBytes
        )
        completing.onComplete(request)
        request.trace?.finish(request)
        if accessLog, let log = loop.accessLog,
            log.sampled(failed: error != nil || (status?.code ?? 0) >= 500, rng: &loop.resources.rng)
        {
            self.log(request, elapsed: elapsed, to: log)
        }
        // The request's field lines are read no more: their buffer serves a later request.
        loop.fieldBlocks.giveBack(request.head.fields)
    }

    /// The request's access-log line (fields documented in docs/observability.md).
    private static func log(_ r: RequestContext, elapsed: TimeAmount, to log: LoopAccessLog) {
        let status = r.responseStatus.map { Int($0.code) }
        var record = AccessLogRecord(listener: r.listenerName, elapsed: elapsed)
        let version = r.head.version
        record.protocol = "HTTP/" + RequestTrace.protocolVersion(version)
        record.method = r.head.method.rawValue
        record.authority = r.host
        record.path = r.head.uri
        record.status = status
        record.grpcStatus = r.isGRPC ? (r.error?.grpcStatus ?? r.grpcStatus) : nil
        record.error = r.error?.token
        record.requestID = r.requestID
        record.traceID = r.trace?.traceID
        record.spanID = r.trace?.spanID
        record.source = r.remoteAddress
        if r.cluster?.config.originalDestination != true {
            record.service = r.clusterName.flatMap(AccessLogRecord.service)
        }
        record.cluster = r.clusterName
        record.route = r.routeName
        record.endpoint = r.endpoint?.description
        record.originalDestination = r.originalDestination?.description
        record.retries = r.retries
        record.upstreamConnectNanos = r.upstreamConnectNanos
        record.firstByteNanos = r.firstByteNanos
        record.bytesIn = r.requestBytes
        record.bytesOut = r.responseBytes
        record.userAgent = r.head.fields.first("user-agent")
        log.append(record)
    }
}
