"""A real grpcio server and client with raw-bytes methods (no generated code), for the data path.

  echo.py server PORT NAME     serves /trellis.Echo/{Unary,Stream,Fail,Slow} on 127.0.0.1:PORT
  echo.py client TARGET [N]    calls each through TARGET (N unary calls, default 20); prints JSON
  echo.py call TARGET METHOD N [AUTHORITY] [TIMEOUT]
                               N calls of one method; prints JSON: status names and details

Unary answers NAME + ":" + the request; Stream answers five messages; Chat (bidirectional)
answers each message as it comes; Fail aborts with
UNAVAILABLE and a message; Slow answers after 2 s (the client's deadline is 0.5 s); Flaky fails
every other call (the first, third, …) with UNAVAILABLE before any message (trailers-only).
Bounded: every call has a deadline.
"""
import json
import sys
import time
from concurrent import futures

import grpc


def serve(port, name):
    def unary(request, context):
        return name.encode() + b":" + request

    def stream(request, context):
        for i in range(5):
            yield f"{name}:{i}:".encode() + request

    def fail(request, context):
        context.abort(grpc.StatusCode.UNAVAILABLE, "down for maintenance")

    def slow(request, context):
        time.sleep(2)
        return b"late"

    calls = {"flaky": 0}

    def chat(requests, context):
        for message in requests:
            yield name.encode() + b":" + message

    def flaky(request, context):
        calls["flaky"] += 1
        if calls["flaky"] % 2 == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "flaky")
        return name.encode() + b":flaky"

    handler = grpc.method_handlers_generic_handler(
        "trellis.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Slow": grpc.unary_unary_rpc_method_handler(slow),
            "Flaky": grpc.unary_unary_rpc_method_handler(flaky),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


def call(target, count):
    result = {"unary": {}, "unary_errors": {}}
    with grpc.insecure_channel(target) as channel:
        unary = channel.unary_unary("/trellis.Echo/Unary")
        for i in range(count):
            try:
                answer = unary(f"hello-{i}".encode(), timeout=5).decode()
                who = answer.split(":", 1)[0]
                result["unary"][who] = result["unary"].get(who, 0) + 1
                if not answer.endswith(f"hello-{i}"):
                    result.setdefault("wrong", []).append(answer)
            except grpc.RpcError as error:
                code = error.code().name
                result["unary_errors"][code] = result["unary_errors"].get(code, 0) + 1
        big = b"x" * (1 << 20)
        try:
            answer = unary(big, timeout=10)
            result["large"] = len(answer)
        except grpc.RpcError as error:
            result["large"] = error.code().name
        try:
            result["stream"] = [m.decode() for m in channel.unary_stream("/trellis.Echo/Stream")(b"s", timeout=5)]
        except grpc.RpcError as error:
            result["stream"] = error.code().name
        try:
            chat = channel.stream_stream("/trellis.Echo/Chat")
            result["chat"] = [m.decode() for m in chat(iter([b"a", b"b", b"c", b"d", b"e"]), timeout=5)]
        except grpc.RpcError as error:
            result["chat"] = error.code().name
        try:
            channel.unary_unary("/trellis.Echo/Fail")(b"f", timeout=5)
            result["fail"] = "OK"
        except grpc.RpcError as error:
            result["fail"] = [error.code().name, error.details()]
        try:
            channel.unary_unary("/trellis.Echo/Slow")(b"z", timeout=0.5)
            result["slow"] = "OK"
        except grpc.RpcError as error:
            result["slow"] = error.code().name
    print(json.dumps(result), flush=True)


def calls(target, method, count, authority, timeout):
    options = [("grpc.default_authority", authority)] if authority else []
    out = []
    with grpc.insecure_channel(target, options=options) as channel:
        stub = channel.unary_unary(f"/trellis.Echo/{method}")
        for i in range(count):
            try:
                out.append(["OK", stub(b"c", timeout=timeout).decode()])
            except grpc.RpcError as error:
                out.append([error.code().name, error.details()])
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(int(sys.argv[2]), sys.argv[3])
    elif sys.argv[1] == "call":
        authority = sys.argv[5] if len(sys.argv) > 5 and sys.argv[5] != "-" else None
        timeout = float(sys.argv[6]) if len(sys.argv) > 6 else 5
        calls(sys.argv[2], sys.argv[3], int(sys.argv[4]), authority, timeout)
    else:
        call(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 20)
