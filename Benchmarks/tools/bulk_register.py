#!/usr/bin/env python3
"""Registers (or deregisters) N instances of one service with pilot's HTTP API over keep-alive
connections, as fast as pilot answers. Addresses are 10.200.x.y (never contacted: the benchmark's
traffic goes to another service). Prints the seconds it took.
    bulk_register.py --api HOST:PORT --service bulk --count 10000 [--delete]
"""
import argparse
import http.client
import json
import sys
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--api", required=True)
    p.add_argument("--service", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--delete", action="store_true")
    a = p.parse_args()
    host, port = a.api.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    start = time.monotonic()
    for i in range(a.count):
        address = f"10.200.{i >> 8}.{i & 255}"
        if a.delete:
            conn.request("DELETE", f"/v1/instances/{a.service}/{address}/8080")
        else:
            body = json.dumps({"service": a.service, "address": address, "port": 8080,
                               "node": f"bulk-{i}", "ttl_seconds": 3600})
            conn.request("POST", "/v1/instances", body=body, headers={"content-type": "application/json"})
        r = conn.getresponse()
        r.read()
        if r.status not in (200, 201, 204):
            print(f"bulk_register: {r.status} for {address}", file=sys.stderr)
            return 1
    print(f"{time.monotonic() - start:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
