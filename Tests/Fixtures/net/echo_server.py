#!/usr/bin/env python3
"""A line echo server (a stand-in for any non-HTTP legacy protocol): every byte received is sent
back. Listens on --host (``::`` takes IPv4 and IPv6) and --port, one thread per connection."""
import argparse
import socket
import socketserver
import sys


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            data = self.request.recv(65536)
            if not data:
                return
            self.request.sendall(data)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="::")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        request_queue_size = 511
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in args.host else socket.AF_INET

    with Server((args.host, args.port), Echo) as server:
        print(f"echo listening {args.host}:{args.port}", flush=True)
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
