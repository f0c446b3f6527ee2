#!/usr/bin/env python3
"""A legacy-style HTTP/1.1 server for tests: keep-alive, one thread per connection.

GET /slow?ms=N  -> 200 "<name> slow <N>" after N milliseconds (at most 60000)
GET /status/N   -> that status
anything else   -> 200 "<name>" (after --delay-ms, default 0)
Every response carries `x-served-by: <name>`.
"""
import argparse
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    # A slowed instance: every other answer waits this long (at most 60000 ms).
    parser.add_argument("--delay-ms", type=int, default=0)
    args = parser.parse_args()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # The head and the body go out in two writes: without TCP_NODELAY the body waits for the
        # peer's delayed ACK of the head (~40 ms per response on a keep-alive connection).
        disable_nagle_algorithm = True

        def log_message(self, *a):
            pass

        def answer(self, status, body):
            data = (body + "\n").encode()
            self.send_response(status)
            self.send_header("content-type", "text/plain")
            self.send_header("content-length", str(len(data)))
            self.send_header("x-served-by", args.name)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            url = urlparse(self.path)
            if url.path == "/slow":
                ms = min(int(parse_qs(url.query).get("ms", ["1000"])[0]), 60000)
                time.sleep(ms / 1000)
                self.answer(200, f"{args.name} slow {ms}")
            elif url.path.startswith("/status/"):
                self.answer(int(url.path.rsplit("/", 1)[1]), args.name)
            else:
                if args.delay_ms:
                    time.sleep(min(args.delay_ms, 60000) / 1000)
                self.answer(200, args.name)

    class Server(ThreadingHTTPServer):
        # A real server's backlog (nginx: 511), not socketserver's 5: a burst of new connections
        # is queued, not dropped.
        request_queue_size = 511

    family_server = Server
    if ":" in args.host:
        import socket

        class V6(Server):
            address_family = socket.AF_INET6

        family_server = V6
    server = family_server((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"listening {args.host}:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
