"""Many ADS streams on ONE grpcio channel, as a proxyless gRPC client multiplexes its watches:
each stream sends one DiscoveryRequest (a node of its own, the listener type) and waits for the
first DiscoveryResponse. Prints one JSON line: streams answered, streams failed (with their gRPC
codes), and the server's advertised limit is respected by grpcio itself (extra streams queue).
Bounded: every stream ends after --seconds.

With RELEASE, the first RELEASE streams answered end (cancelled by the client) right after their
answer, so that streams grpcio queued beyond the server's advertised limit can start.

usage: ads_streams.py TARGET STREAMS SECONDS [RELEASE]
"""
import json
import sys
import threading
import time

import grpc

METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"


def field(number, payload):
    """A length-delimited protobuf field."""
    key = bytes([(number << 3) | 2])
    length = len(payload)
    varint = bytearray()
    while True:
        byte = length & 0x7F
        length >>= 7
        varint.append(byte | (0x80 if length else 0))
        if not length:
            break
    return key + bytes(varint) + payload


def request(node_id):
    node = field(1, node_id.encode())  # Node.id
    return field(2, node) + field(4, LISTENER.encode())  # DiscoveryRequest.node (2), .type_url (4)


def main():
    target, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    release = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    released = 0
    channel = grpc.insecure_channel(target)
    call = channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)
    answered = 0
    failed = {}
    first_error = []
    lock = threading.Lock()
    done = threading.Event()
    deadline = time.monotonic() + seconds

    def one(i):
        nonlocal answered, released
        stop = threading.Event()

        def requests():
            yield request(f"streams-{i}")
            stop.wait(max(0.0, deadline - time.monotonic()))

        try:
            responses = call(requests(), timeout=seconds)
            next(iter(responses))
            with lock:
                answered += 1
                if answered + sum(failed.values()) == count:
                    done.set()
                end_now = released < release
                if end_now:
                    released += 1
            if end_now:
                responses.cancel()
                return
            # Every stream stays open until all are answered: a thousand streams cancelled at
            # once is a reset flood, which the server rightly answers with GOAWAY.
            done.wait(max(0.0, deadline - time.monotonic()))
        except grpc.RpcError as error:
            with lock:
                failed[error.code().name] = failed.get(error.code().name, 0) + 1
                if not first_error:
                    first_error.append(f"{error.code().name}: {error.details()}")
                if answered + sum(failed.values()) == count:
                    done.set()
        except StopIteration:
            with lock:
                failed["NO_RESPONSE"] = failed.get("NO_RESPONSE", 0) + 1
                if answered + sum(failed.values()) == count:
                    done.set()
        finally:
            stop.set()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 5)
    print(json.dumps({"answered": answered, "failed": failed, "first_error": first_error, "released": released}), flush=True)
    channel.close()


if __name__ == "__main__":
    main()
