"""Seeded random mutation of HTTP/2 client traffic against an h2c listener.

usage: h2_fuzz.py HOST PORT SEED SECONDS

Each round opens a connection, builds a plausible client conversation (preface, SETTINGS,
requests with and without bodies, WINDOW_UPDATE, PING, PRIORITY, RST_STREAM, CONTINUATION,
GOAWAY), mutates it (bit flips, wrong lengths and types, truncation, duplicated or dropped
frames, garbage), sends it and reads what comes back for a moment. Every tenth round, and at the
end, a well-formed request on a new connection must get a 200. Prints one JSON line with the
seed, the rounds, and the checks that passed and failed. Bounded by SECONDS and by round size.
"""
import json
import os
import random
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from h2_abuse import (  # noqa: E402
    CONTINUATION, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, PING, PREFACE, RST_STREAM, SETTINGS,
    WINDOW_UPDATE, Peer, frame, request, settings)


def conversation(rng):
    frames = [settings([(0x3, rng.choice([0, 1, 100])), (0x4, rng.choice([0, 65535, 1 << 20]))])]
    stream = 1
    for _ in range(rng.randint(1, 8)):
        kind = rng.random()
        if kind < 0.4:
            frames.append(frame(HEADERS, END_HEADERS | END_STREAM, stream, request(path=f"/{rng.randint(0, 9)}")))
        elif kind < 0.6:
            frames.append(frame(HEADERS, END_HEADERS, stream, request(path="/count")))
            frames.append(frame(DATA, 0, stream, os.urandom(rng.randint(0, 2000))))
            frames.append(frame(DATA, END_STREAM, stream, b""))
        elif kind < 0.7:
            block = request(path="/split")
            frames.append(frame(HEADERS, END_STREAM, stream, block[:5]))
            frames.append(frame(CONTINUATION, END_HEADERS, stream, block[5:]))
        else:
            frames.append(frame(HEADERS, END_HEADERS, stream, request()))
            frames.append(frame(RST_STREAM, 0, stream, (8).to_bytes(4, "big")))
        stream += 2
    frames.append(frame(WINDOW_UPDATE, 0, rng.choice([0, 1, 3]), rng.randint(0, 1 << 31).to_bytes(4, "big")))
    frames.append(frame(PING, rng.choice([0, 1]), 0, os.urandom(8)))
    frames.append(frame(2, 0, rng.choice([1, 3]), os.urandom(5)))  # PRIORITY
    if rng.random() < 0.2:
        frames.append(frame(GOAWAY, 0, 0, os.urandom(8)))
    return frames


def mutate(rng, frames):
    out = []
    for f in frames:
        r = rng.random()
        if r < 0.05:
            continue  # dropped
        f = bytearray(f)
        if r < 0.15 and len(f) > 9:
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(f))
                f[i] ^= 1 << rng.randrange(8)
        elif r < 0.2:
            f[0:3] = rng.randint(0, 1 << 24).to_bytes(3, "big") if rng.random() < 0.3 else rng.randint(0, 64).to_bytes(3, "big")
        elif r < 0.25:
            f[3] = rng.randrange(256)
        elif r < 0.3:
            f = f[: rng.randrange(len(f))]
        elif r < 0.35:
            out.append(bytes(f))
        out.append(bytes(f))
    if rng.random() < 0.1:
        out.insert(rng.randrange(len(out) + 1), os.urandom(rng.randint(1, 64)))
    return out


def check(host, port):
    peer = Peer(host, port)
    peer.start(wait=0.05)
    peer.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, request(path="/check")))
    end = time.monotonic() + 3
    while time.monotonic() < end and "1" not in peer.result["statuses"] and not peer.result["closed"]:
        peer.read(0.05)
    peer.sock.close()
    return peer.result["statuses"].get("1") == "200"


def main():
    host, port, seed, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    rng = random.Random(seed)
    os.urandom = lambda n: bytes(rng.randrange(256) for _ in range(n))  # every byte from the seed
    end = time.monotonic() + seconds
    rounds, ok, failed = 0, 0, []
    while time.monotonic() < end:
        rounds += 1
        try:
            sock = socket.create_connection((host, port), timeout=2)
            preface = PREFACE if rng.random() > 0.05 else PREFACE[: rng.randrange(24)] + os.urandom(4)
            sock.sendall(preface + b"".join(mutate(rng, conversation(rng))))
            sock.settimeout(0.05)
            try:
                while sock.recv(65536):
                    pass
            except OSError:
                pass
            sock.close()
        except OSError:
            pass
        if rounds % 10 == 0:
            if check(host, port):
                ok += 1
            else:
                failed.append(rounds)
    if check(host, port):
        ok += 1
    else:
        failed.append("end")
    print(json.dumps({"seed": seed, "rounds": rounds, "checks_ok": ok, "checks_failed": failed}), flush=True)


if __name__ == "__main__":
    main()
