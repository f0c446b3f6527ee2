"""A burst of client connections held open, then all closed: how much memory does a proxy keep?

usage: conn_burst.py MODE HOST PORT COUNT HOLD_SECONDS
  idle       connect and send nothing
  slowloris  send a request head one header line per second, never finishing it

Prints one JSON line: connections opened, connections the server closed before the end.
Bounded: at most COUNT sockets, held for HOLD_SECONDS, then closed.
"""
import json
import selectors
import socket
import sys
import time


def main():
    mode, host, port, count, hold = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    if mode not in ("idle", "slowloris"):
        sys.exit(f"unknown mode {mode!r}: idle or slowloris")
    socks = []
    for _ in range(count):
        s = socket.create_connection((host, port), timeout=5)
        s.setblocking(False)
        if mode == "slowloris":
            s.send(b"GET /slow HTTP/1.1\r\nhost: burst\r\n")
        socks.append(s)
    end = time.monotonic() + hold
    closed_by_server = set()
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    line = 0
    while time.monotonic() < end:
        for key, _ in sel.select(timeout=min(1.0, max(0.0, end - time.monotonic()))):
            try:
                data = key.fileobj.recv(4096)
            except OSError:
                data = b""
            if not data:
                closed_by_server.add(key.fileobj)
                sel.unregister(key.fileobj)
        if mode == "slowloris":
            line += 1
            for s in socks:
                if s not in closed_by_server:
                    try:
                        s.send(f"x-slow-{line}: {line}\r\n".encode())
                    except OSError:
                        closed_by_server.add(s)
    for s in socks:
        s.close()
    print(json.dumps({"mode": mode, "opened": len(socks), "closed_by_server": len(closed_by_server)}), flush=True)


if __name__ == "__main__":
    main()
