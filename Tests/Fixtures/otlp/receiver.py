"""A real OTLP/gRPC trace receiver (grpcio with the opentelemetry-proto package's messages and
service): it answers TraceService/Export and prints every span it received as one JSON line on
standard output (flushed), for the tests to read:

  {"service": ..., "trace_id": hex, "span_id": hex, "parent_span_id": hex or "",
   "name": ..., "kind": "SERVER"|"CLIENT"|..., "status": "OK"|"ERROR"|"UNSET",
   "attributes": {key: value (a list for an array)}, "resource": {key: value}, "scope": name,
   "status_message", "trace_state", "flags", "events": [{name, attributes}],
   "links": [{trace_id, span_id, flags}], "duration_ms",
   "headers": {the export's authorization and x-* metadata}}

It prints "listening <port>" first. With --delay-ms, each export is answered that much later (a
slow collector). With --reject N, each export is answered with a partial success
rejecting (up to) N of its spans. With --fail N, the first N exports are refused with the gRPC
status --fail-code (UNAVAILABLE unless given: a collector restarting), printing "refused export
<n>" for each. With --count-only it prints nothing per span, only "received <spans> spans in
<exports> exports" when it stops (for benchmarks). It stops on SIGTERM or after --seconds
(bounded).

usage: receiver.py --port PORT [--host ADDRESS] [--delay-ms MS] [--reject N] [--fail N [--fail-code CODE]]
                   [--count-only] [--seconds S]
"""
import argparse
import json
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

KINDS = {v: k.replace("SPAN_KIND_", "") for k, v in trace_pb2.Span.SpanKind.items()}
STATUS = {v: k.replace("STATUS_CODE_", "") for k, v in trace_pb2.Status.StatusCode.items()}
lock = threading.Lock()


def value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, delay, count_only, reject=0, fail=0, fail_code=grpc.StatusCode.UNAVAILABLE):
        self.delay = delay
        self.fail = fail
        self.fail_code = fail_code
        self.refused = 0
        self.reject = reject
        self.count_only = count_only
        self.spans = 0
        self.exports = 0

    def Export(self, request, context):
        if self.delay:
            time.sleep(self.delay)
        with lock:
            refuse = self.refused < self.fail
            if refuse:
                self.refused += 1
                print(f"refused export {self.refused}", flush=True)
        if refuse:
            context.abort(self.fail_code, "refused by the test")
        if self.count_only:
            n = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
            with lock:
                self.spans += n
                self.exports += 1
            return trace_service_pb2.ExportTraceServiceResponse()
        lines = []
        headers = {k: v for k, v in context.invocation_metadata() if k.startswith("x-") or k == "authorization"}
        for resource_spans in request.resource_spans:
            resource = {a.key: value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    lines.append(
                        json.dumps(
                            {
                                "service": resource.get("service.name"),
                                "instance": resource.get("service.instance.id"),
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_span_id": span.parent_span_id.hex(),
                                "name": span.name,
                                "kind": KINDS.get(span.kind, str(span.kind)),
                                "status": STATUS.get(span.status.code, str(span.status.code)),
                                "attributes": {a.key: value(a.value) for a in span.attributes},
                                "resource": resource,
                                "headers": headers,
                                "scope": scope_spans.scope.name,
                                "status_message": span.status.message,
                                "trace_state": span.trace_state,
                                "flags": span.flags,
                                "events": [
                                    {"name": e.name, "attributes": {a.key: value(a.value) for a in e.attributes}}
                                    for e in span.events
                                ],
                                "links": [
                                    {"trace_id": l.trace_id.hex(), "span_id": l.span_id.hex(), "flags": l.flags}
                                    for l in span.links
                                ],
                                "duration_ms": (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6,
                            },
                            sort_keys=True,
                        )
                    )
        with lock:
            for line in lines:
                print(line)
            sys.stdout.flush()
        if self.reject:
            n = min(self.reject, len(lines))
            return trace_service_pb2.ExportTraceServiceResponse(
                partial_success=trace_service_pb2.ExportTracePartialSuccess(
                    rejected_spans=n, error_message=f"rejected {n} by the test"
                )
            )
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--delay-ms", type=int, default=0)
    parser.add_argument("--count-only", action="store_true")
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--reject", type=int, default=0)
    parser.add_argument("--fail", type=int, default=0)
    parser.add_argument("--fail-code", default="UNAVAILABLE", choices=[c.name for c in grpc.StatusCode])
    args = parser.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    receiver = Receiver(
        args.delay_ms / 1000, args.count_only, args.reject, args.fail, grpc.StatusCode[args.fail_code]
    )
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    print(f"listening {port}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait(args.seconds)
    server.stop(grace=1)
    if args.count_only:
        print(f"received {receiver.spans} spans in {receiver.exports} exports", flush=True)


if __name__ == "__main__":
    main()
