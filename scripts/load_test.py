"""Load test of `mdn serve`, compared with `mdn predict` on the same images in the same run.

    python scripts/load_test.py runs/toy/best.pt data/toy/images --requests 200 --concurrency 16
    python scripts/load_test.py runs/toy/best.pt photos/ --url http://gpu-box:8000/   # a server already running
    python scripts/load_test.py runs/toy/best.pt photos/ --quick                     # a smoke run

Starts `mdn serve CHECKPOINT --port 0` (unless --url), fires N requests at concurrency C (stdlib
threads and urllib, each request holding --files-per-request photos), reports requests/s,
images/s, latency percentiles and how many images each forward pass held, stops the server,
then times mdn_cli.predict.predict_images on the same images with `--backend auto` (onnxruntime
on CPUs, after its one-time export) and `--backend torch` (checkpoint load included, as in
`mdn predict`).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body with each file in a field named "file"."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name.replace(chr(34), "%22")}"\r\n' \
               "Content-Type: application/octet-stream\r\n\r\n"
        parts += [head.encode(), data, b"\r\n"]
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def post(url: str, body: bytes, content_type: str) -> tuple[float, int, int]:
    """(seconds, HTTP status, records returned)."""
    request = urllib.request.Request(url + "predict", data=body, headers={"Content-Type": content_type}, method="POST")
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            records = len(json.load(response))
            status = response.status
    except urllib.error.HTTPError as e:
        status, records = e.code, 0
    except (urllib.error.URLError, OSError):
        status, records = 0, 0
    return time.perf_counter() - start, status, records


class Server:
    """`mdn serve` in a subprocess on a free port; its URL is read from its first line."""

    def __init__(self, checkpoint: Path, device: str, max_batch: int, max_wait_ms: float):
        command = [sys.executable, "-m", "mdn_cli", "serve", str(checkpoint), "--port", "0", "--device", device,
                   "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--max-files", "64",
                   "--max-upload-mb", "200"]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        self.log: deque[str] = deque(maxlen=40)
        found = threading.Event()
        self.url = ""

        def read() -> None:  # keeps draining stderr so the server never blocks on a full pipe
            for line in self.process.stderr:
                self.log.append(line.rstrip())
                match = re.search(r" at (http://\S+/)", line)
                if match and not found.is_set():
                    self.url = match.group(1)
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(180) or not self.url:
            self.stop()
            raise SystemExit("mdn serve did not start:\n" + "\n".join(self.log))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("images", help="an image folder, file or glob pattern")
    parser.add_argument("--url", help="a server already running (default: start mdn serve here)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--files-per-request", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 8 requests at concurrency 4")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.concurrency = 8, 4

    from mdn_cli.data.folder import unlabelled
    from mdn_cli.predict import collect_images, predict_images

    paths, problems = collect_images([args.images])
    if not paths:
        raise SystemExit(f"no images: {'; '.join(problems)}")
    k = args.files_per_request
    sent = [paths[i % len(paths)] for i in range(args.requests * k)]
    data = {p: p.read_bytes() for p in paths}
    bodies = [multipart([(p.name, data[p]) for p in sent[i * k:(i + 1) * k]]) for i in range(args.requests)]

    server = None
    if args.url:
        url = args.url.rstrip("/") + "/"
    else:
        server = Server(args.checkpoint, args.device, args.max_batch, args.max_wait_ms)
        url = server.url
    try:
        described = get_json(url + "health")["model"]
        for body in bodies[:2]:  # warm-up: first-call costs are not the server's steady state
            post(url, *body)
        before = get_json(url + "stats")
        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(lambda body: post(url, *body), bodies))
        wall = time.perf_counter() - start
        after = get_json(url + "stats")
    finally:
        if server is not None:
            server.stop()

    latencies = [seconds for seconds, status, _ in results if status == 200]
    failed = sum(status != 200 for _, status, _ in results)
    images_done = sum(records for *_, records in results)
    passes = after["forward_passes"] - before["forward_passes"]
    batched = after["images"] - before["images"]
    print(f"server: {url} ({'started here' if server else 'given'}; {' + '.join(m['backbone'] for m in described['members'])}, {described['image_size']} px, "
          f"{described.get('backend', 'torch')}, max batch {after['max_batch']}, max wait {after['max_wait_ms']:g} ms)")
    print(f"images: {len(paths)} files from {args.images}, {k} per request")
    line = (f"mdn serve: {args.requests} requests ({failed} failed) at concurrency {args.concurrency} in {wall:.2f} s: "
            f"{args.requests / wall:.1f} requests/s, {images_done / wall:.1f} images/s")
    if latencies:
        line += (f"; latency p50 {percentile(latencies, 0.5) * 1000:.0f} ms, p95 {percentile(latencies, 0.95) * 1000:.0f} ms, "
                 f"max {max(latencies) * 1000:.0f} ms")
    print(line + f"; {passes} forward passes, {batched / max(passes, 1):.1f} images per pass")

    quiet = dict(device=args.device, batch_size=args.max_batch, on_skip=lambda message: None, progress=False, log=lambda message: None)
    predict_images(*unlabelled(sent[:1]), args.checkpoint, **quiet)  # --backend auto's one-time ONNX export (on CPUs), not timed
    for backend in ("auto", "torch"):
        start = time.perf_counter()
        predictions, _ = predict_images(*unlabelled(sent), args.checkpoint, backend=backend, **quiet)
        seconds = time.perf_counter() - start
        print(f"mdn predict --backend {backend} (predict_images, the same {len(sent)} images, checkpoint load included): "
              f"{seconds:.2f} s, {len(predictions) / seconds:.1f} images/s")


if __name__ == "__main__":
    main()
