#!/usr/bin/env python
"""A long soak of `mdn serve`: a mix of clients at once for a set time, the server watched throughout.

    python scripts/soak_serve.py runs/toy/best.pt data/toy/images --duration 600

Starts `mdn serve` on a free loopback port (its address read from its own log line) and runs, all
at once until --duration is up:
    normal      --clients clients uploading one photo after another (a 503 is retried after its
                Retry-After, as a well-behaved client does)
    bursts      every --burst-every seconds, --burst simultaneous uploads: more than the queue takes
    slow        clients that send their body a byte at a time: cut off with 408 by --request-timeout
    truncated   uploads of a photo cut in half (422), oversized bodies (413), text files named .jpg (422)
    vanishing   clients that send half a body and hang up
Every --sample seconds it records the server's resident memory and open file descriptors. At the
end it stops the server with SIGINT (it must exit 130 after finishing its requests) and reports
the latency of normal uploads (p50/p95/p99, after the warm-up), the answers by client and status,
and the memory and descriptor series. It passes when, after the warm-up, memory grows by less than
10%, the descriptors come back (within --fd-slack) to their fewest during the load once it ends, overload is answered 503 with Retry-After,
no request gets a 5xx other than those 503s or hangs, and slow clients get 408 while the normal
uploads keep being answered. Exit code 0: passed; 1: failed (the reasons are printed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

BOUNDARY = "soakboundary7e3f"


def multipart(name: str, data: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def request_head(host: str, port: int, length: int, expect: bool = False) -> bytes:
    return (f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n{'Expect: 100-continue' + chr(13) + chr(10) if expect else ''}"
            "\r\n").encode()


async def send(host: str, port: int, body: bytes, chunk: int | None = None, pause: float = 0.0,
               cut: int | None = None, expect: bool = False) -> tuple[int | None, dict[str, str]]:
    """One raw HTTP request: the body sent whole, or `chunk` bytes every `pause` seconds, or only its
    first `cut` bytes (then the connection dropped). `expect`: ask before sending the body
    (Expect: 100-continue), as clients of large uploads do, so a refusal is read, not cut off.
    Returns (status or None, headers)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request_head(host, port, len(body), expect))
        if expect:
            await writer.drain()
            status, headers = _status(await reader.readline(), await _headers(reader))
            if status != 100:
                return status, headers
        if cut is not None:
            writer.write(body[:cut])
            await writer.drain()
            return None, {}
        if chunk is None:
            try:
                writer.write(body)
                await writer.drain()
            except ConnectionError:  # refused early (413): the answer may still be there to read
                pass
        else:
            for i in range(0, len(body), chunk):
                if reader.at_eof():
                    break
                writer.write(body[i : i + chunk])
                await writer.drain()
                try:  # the server may answer (408) before the body is complete
                    line = await asyncio.wait_for(reader.readline(), pause)
                    if line:
                        return _status(line, await _headers(reader))
                except TimeoutError:
                    pass
        line = await reader.readline()
        return _status(line, await _headers(reader)) if line else (None, {})
    except (ConnectionError, OSError):
        return None, {}
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def _status(line: bytes, headers: dict[str, str]) -> tuple[int | None, dict[str, str]]:
    parts = line.split()
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None), headers


async def _headers(reader: asyncio.StreamReader) -> dict[str, str]:
    headers = {}
    while True:
        line = await reader.readline()
        if not line or line in (b"\r\n", b"\n"):
            return headers
        key, _, value = line.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()


class Soak:
    def __init__(self, args, host: str, port: int, pid: int, photos: list[bytes]):
        self.args, self.host, self.port, self.pid, self.photos = args, host, port, pid, photos
        self.answers: dict[str, Counter] = defaultdict(Counter)
        self.latencies: list[tuple[float, float]] = []  # (when, seconds) of normal uploads answered 200
        self.samples: list[dict] = []
        self.start = time.monotonic()
        self.retry_after_missing = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def running(self) -> bool:
        return self.elapsed() < self.args.duration

    async def normal(self) -> None:
        while self.running():
            began = time.monotonic()
            status, headers = await send(self.host, self.port, multipart("photo.png", random.choice(self.photos)))
            self.answers["normal"][status] += 1
            if status == 200:
                self.latencies.append((self.elapsed(), time.monotonic() - began))
            elif status == 503:
                self._retry_after(headers)
                await asyncio.sleep(min(float(headers.get("retry-after", 1)), 2.0))

    def _retry_after(self, headers: dict[str, str]) -> None:
        if not headers.get("retry-after", "").isdigit():
            self.retry_after_missing += 1

    async def bursts(self) -> None:
        while self.running():
            await asyncio.sleep(self.args.burst_every)
            results = await asyncio.gather(*(send(self.host, self.port, multipart("b.png", random.choice(self.photos)))
                                             for _ in range(self.args.burst)))
            for status, headers in results:
                self.answers["burst"][status] += 1
                if status == 503:
                    self._retry_after(headers)

    async def slow(self) -> None:
        while self.running():
            status, _ = await send(self.host, self.port, multipart("slow.png", random.choice(self.photos)), chunk=1, pause=0.25)
            self.answers["slow"][status] += 1

    async def hostile(self) -> None:
        big = os.urandom(int(self.args.max_upload_mb * 1_000_000) + 1000)
        while self.running():
            photo = random.choice(self.photos)
            for kind, body, cut in (("truncated", multipart("half.png", photo[: len(photo) // 2]), None),
                                    ("oversized", multipart("big.png", big), None),
                                    ("not an image", multipart("notes.jpg", b"these are notes, not a photo"), None),
                                    ("vanishing", multipart("gone.png", photo), len(photo) // 3)):
                status, _ = await send(self.host, self.port, body, cut=cut, expect=kind == "oversized")
                self.answers[kind][status] += 1
            await asyncio.sleep(0.2)

    async def watch(self) -> None:
        while self.running():
            self.samples.append({"t": round(self.elapsed(), 1), **server_usage(self.pid)})
            await asyncio.sleep(self.args.sample)
        self.samples.append({"t": round(self.elapsed(), 1), **server_usage(self.pid)})

    async def run(self) -> None:
        clients = [self.normal() for _ in range(self.args.clients)]
        await asyncio.gather(*clients, self.bursts(), self.slow(), self.hostile(), self.watch())


def server_usage(pid: int) -> dict:
    """Resident memory (MB) and open file descriptors of a process, from /proc."""
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return {"rss_mb": round(rss, 1), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def settled_fds(pid: int, start: int, slack: int, settle_s: float | None = None) -> int:
    """The server's open descriptors once the load has ended: polled until they are back within
    `slack` of `start` (the connections of the last requests close), or for at most FD_SETTLE_S,
    which only a leak reaches: leaked descriptors never close. Samples taken during the load are
    only reported: one that lands in a burst counts its ~50 sockets in flight, not a leak."""
    deadline = time.monotonic() + (FD_SETTLE_S if settle_s is None else settle_s)
    while True:
        fds = server_usage(pid)["fds"]
        if fds <= start + slack or time.monotonic() > deadline:
            return fds
        time.sleep(0.05)


FD_SETTLE_S = 120.0


def verdict(soak: Soak, exit_code: int, warmup: float, fds_after: int, fd_slack: int) -> list[str]:
    """The failures (an empty list: passed)."""
    failures = []
    start = min((s["fds"] for s in soak.samples), default=fds_after)
    if fds_after > start + fd_slack:
        failures.append(f"open descriptors: {fds_after} once the load had ended, {start} before it: a leak")
    after = [s for s in soak.samples if s["t"] >= warmup]
    if len(after) >= 2:
        growth = max(s["rss_mb"] for s in after) / after[0]["rss_mb"] - 1
        if growth >= 0.10:
            failures.append(f"memory grew {growth:.1%} after the warm-up (from {after[0]['rss_mb']} MB)")
    else:
        failures.append("too short to judge memory and descriptors: raise --duration above the warm-up")
    for client, statuses in soak.answers.items():
        errors = {s: n for s, n in statuses.items() if s is not None and s >= 500 and s != 503}
        if errors:
            failures.append(f"{client} clients got server errors {errors}")
    overload = soak.answers["burst"][503] + soak.answers["normal"][503]
    if not overload:
        failures.append("no burst was refused with 503: raise --burst above --max-queue")
    if soak.retry_after_missing:
        failures.append(f"{soak.retry_after_missing} answers 503 without a Retry-After header")
    if soak.answers["slow"] and set(soak.answers["slow"]) - {408, None}:
        failures.append(f"slow clients got {dict(soak.answers['slow'])}, not 408")
    if not soak.answers["slow"][408]:
        failures.append("no slow client was cut off with 408")
    for kind, expected in (("truncated", 422), ("oversized", 413), ("not an image", 422)):
        wrong = {s: n for s, n in soak.answers[kind].items() if s not in (expected, 503)}
        if wrong:
            failures.append(f"{kind} uploads got {wrong}, not {expected}")
    if not soak.answers["normal"][200]:
        failures.append("no normal upload was answered")
    if exit_code != 130:
        failures.append(f"mdn serve exited {exit_code} on SIGINT, not 130")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("images", type=Path, help="A folder of photos to upload.")
    parser.add_argument("--duration", type=float, default=600.0, help="Seconds of load (default 600).")
    parser.add_argument("--warmup", type=float, default=None, help="Seconds before memory is judged (default: a sixth).")
    parser.add_argument("--sample", type=float, default=10.0, help="Seconds between memory and descriptor samples.")
    parser.add_argument("--clients", type=int, default=4, help="Normal clients uploading one photo after another.")
    parser.add_argument("--burst", type=int, default=48, help="Uploads in one burst.")
    parser.add_argument("--burst-every", type=float, default=5.0)
    parser.add_argument("--max-queue", type=int, default=16, help="The server's --max-queue.")
    parser.add_argument("--request-timeout", type=float, default=3.0, help="The server's --request-timeout.")
    parser.add_argument("--max-upload-mb", type=float, default=1.0, help="The server's --max-upload-mb.")
    parser.add_argument("--fd-slack", type=int, default=8, help="Descriptor count changes tolerated (connections in flight).")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--json", type=Path, help="Write every number here.")
    args = parser.parse_args(argv)
    photos = [p.read_bytes() for p in sorted(args.images.iterdir()) if p.suffix.lower() in (".png", ".jpg", ".jpeg")][:64]
    if not photos:
        parser.error(f"{args.images}: no .png or .jpg photos")
    command = [sys.executable, "-m", "mdn_cli", "serve", str(args.checkpoint), "--port", "0", "--max-queue", str(args.max_queue),
               "--request-timeout", str(args.request_timeout), "--max-upload-mb", str(args.max_upload_mb), "--backend", args.backend]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # stdout: the access log
    log: list[str] = []
    for line in server.stderr:  # the server says where it listens: the event to start on
        log.append(line)
        found = re.search(r" at http://([\d.]+):(\d+)/", line)
        if found:
            host, port = found.group(1), int(found.group(2))
            break
    else:
        print("".join(log), file=sys.stderr)
        print("mdn serve ended before serving", file=sys.stderr)
        return 1
    drain = threading.Thread(target=lambda: log.extend(server.stderr), daemon=True)
    drain.start()
    soak = Soak(args, host, port, server.pid, photos)
    asyncio.run(soak.run())
    fds_after = settled_fds(server.pid, min((s["fds"] for s in soak.samples), default=0), args.fd_slack)
    server.send_signal(signal.SIGINT)
    exit_code = server.wait()
    drain.join()
    warmup = args.warmup if args.warmup is not None else args.duration / 6
    failures = verdict(soak, exit_code, warmup, fds_after, args.fd_slack)
    latencies = [s for t, s in soak.latencies if t >= warmup] or [s for _, s in soak.latencies]
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    result = {
        "duration_s": args.duration, "warmup_s": warmup, "normal_uploads_answered": len(soak.latencies),
        "latency_ms": {"p50": round(1000 * q[49], 1), "p95": round(1000 * q[94], 1), "p99": round(1000 * q[98], 1)},
        "answers": {client: {str(k): v for k, v in sorted(c.items(), key=lambda kv: str(kv[0]))} for client, c in soak.answers.items()},
        "samples": soak.samples, "fds_after_load": fds_after, "server_exit_code": exit_code, "failures": failures,
    }
    print(f"soak of {args.checkpoint} for {args.duration:g} s ({args.clients} normal clients, bursts of {args.burst} every "
          f"{args.burst_every:g} s, slow, truncated, oversized, non-image and vanishing clients)")
    print(f"normal uploads answered: {len(soak.latencies)}; latency after the warm-up: p50 {result['latency_ms']['p50']} ms, "
          f"p95 {result['latency_ms']['p95']} ms, p99 {result['latency_ms']['p99']} ms")
    for client, counts in result["answers"].items():
        print(f"  {client:>13}: " + ", ".join(f"{k if k != 'None' else 'no answer'}: {v}" for k, v in counts.items()))
    print("  every sample: " + "; ".join(f"{s['t']:g} s {s['rss_mb']} MB {s['fds']} fds" for s in soak.samples))
    print(f"open descriptors: {min((s['fds'] for s in soak.samples), default='?')} at the fewest during the load, {fds_after} once it had ended")
    print(f"mdn serve exited {exit_code} on SIGINT")
    print("PASSED" if not failures else "FAILED: " + "; ".join(failures))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
