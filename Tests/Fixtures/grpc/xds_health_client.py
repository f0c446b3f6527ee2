"""A real gRPC proxyless xDS client: one channel to xds:///TARGET (GRPC_XDS_BOOTSTRAP names the
control plane), a Health.Check every 100 ms, one line per call: "OK SERVING" or "ERR <code>".
Runs for at most DURATION seconds (bounded), then exits.

usage: xds_health_client.py TARGET DURATION
"""
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> None:
    target, duration = sys.argv[1], float(sys.argv[2])
    channel = grpc.insecure_channel(f"xds:///{target}")
    stub = health_pb2_grpc.HealthStub(channel)
    end = time.monotonic() + duration
    while time.monotonic() < end:
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
            line = "OK " + health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as error:
            line = f"ERR {error.code().name}"
        print(line, flush=True)
        time.sleep(0.1)


if __name__ == "__main__":
    main()
