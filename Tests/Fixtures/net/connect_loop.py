#!/usr/bin/env python3
"""A client that opens a NEW connection for every request, as a legacy program does, and counts
what a user would notice: requests answered, and connections refused, reset or timed out.

  connect_loop.py --target http:10.77.1.2:8080 --target 'http:[fd77:1::2]:8080' --target tcp:10.77.1.2:9000
                  --seconds 20 [--interval-ms 20] [--stop-file PATH] [--timeout 2]

http:HOST:PORT  GET / over HTTP/1.1 with Connection: close; a 200 answer counts as ok.
tcp:HOST:PORT   sends a line, expects the same line back (an echo server); counts as ok.
Targets are used in turn. Runs until --seconds pass or --stop-file exists (bounded either way:
at most 120 s and 100,000 requests). Prints one JSON line: ok, failed, per target, and the
first 20 errors with their time offsets.
"""
import argparse
import json
import os
import socket
import sys
import time


def parse_target(text):
    kind, rest = text.split(":", 1)
    host, port = rest.rsplit(":", 1)
    return kind, host.strip("[]"), int(port)


def one(kind, host, port, timeout, n):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        if kind == "http":
            authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            s.sendall(f"GET / HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while len(data) < 1 << 20:  # the whole answer (Connection: close): read to the end
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            status = data.split(b"\r\n", 1)[0].decode(errors="replace")
            if not status.startswith("HTTP/1.1 200") and not status.startswith("HTTP/1.0 200"):
                try:
                    while len(data) < 65536:
                        chunk = s.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                except OSError:
                    pass
                token = [
                    line.split(b":", 1)[1].strip().decode(errors="replace")
                    for line in data.split(b"\r\n")
                    if line.lower().startswith(b"x-trellis-error:")
                ]
                raise RuntimeError(f"answered {status!r} {token[0] if token else ''}".rstrip())
        else:
            line = f"ping {n}\n".encode()
            s.sendall(line)
            data = b""
            while len(data) < len(line):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            if data != line:
                raise RuntimeError(f"echo {data!r}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", action="append", required=True)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--interval-ms", type=float, default=20)
    parser.add_argument("--stop-file")
    parser.add_argument("--timeout", type=float, default=2)
    # Stop once every target has answered this many times (still within --seconds): a count of
    # samples that does not depend on how fast a loaded machine runs the loop.
    parser.add_argument("--min-each", type=int)
    args = parser.parse_args()
    targets = [parse_target(t) for t in args.target]
    start = time.monotonic()
    end = start + min(args.seconds, 120)
    ok = failed = 0
    per = {t: {"ok": 0, "failed": 0} for t in args.target}
    errors = []
    n = 0
    while time.monotonic() < end and n < 100_000:
        if args.stop_file and os.path.exists(args.stop_file):
            break
        if args.min_each and all(p["ok"] >= args.min_each for p in per.values()):
            break
        name = args.target[n % len(targets)]
        kind, host, port = targets[n % len(targets)]
        try:
            one(kind, host, port, args.timeout, n)
            ok += 1
            per[name]["ok"] += 1
        except Exception as e:  # every failure a user would see: refused, reset, timeout, bad answer
            failed += 1
            per[name]["failed"] += 1
            if len(errors) < 20:
                errors.append(f"{time.monotonic() - start:.2f}s {name}: {e!r}")
        n += 1
        time.sleep(args.interval_ms / 1000)
    print(json.dumps({"ok": ok, "failed": failed, "targets": per, "errors": errors}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
