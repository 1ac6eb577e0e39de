"""`mdn serve`: predictions over HTTP, with a web page, batching concurrent requests into one
forward pass.

    GET  /          the web page (static/index.html; no CDN, works offline)
    GET  /health    {"status": "ok", "model": Model.describe()}
    GET  /stats     how the batching went: forward passes, images, largest batch
    POST /predict   multipart/form-data, one or more fields named "file" -> one record per file,
                    {"image": filename, **record}, the numbers of `mdn predict --format json`

A request is all or nothing: when any of its files cannot be read, nothing is predicted and the
422 answer names every bad file (the page sends one photo per request, so one bad photo only
fails its own card). Every refusal is JSON {"error": "one line"} with a 4xx status.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from . import interrupts
from .api import Model
from .errors import MdnError
from .images import UnreadableImageError

STATIC = Path(__file__).with_name("static")
FIELD = "file"
GROUP_FIELD = "group"
# Only what the page's own files need: no inline script, nothing from another origin.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
    "script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class ServeError(MdnError):
    """The server cannot start (address in use, bad settings)."""


@dataclass(frozen=True)
class ServeSettings:
    max_batch: int = 32
    """Most images in one forward pass."""
    max_wait_ms: float = 10.0
    """How long the first image of a batch waits for others before the forward pass starts."""
    max_files: int = 16
    """Most files in one request."""
    max_upload_mb: float = 20.0
    """Most bytes in one request body, in MB (10^6 bytes)."""
    max_queue: int = 256
    """Most images accepted and not yet answered; beyond it a request is refused with 503 and a
    Retry-After header (a burst larger than the server can absorb waits at the client, not here)."""
    request_timeout_s: float = 30.0
    """Longest a client may take to send its request body: a slow or stalled upload gets 408
    instead of holding a connection and memory for ever."""

    def __post_init__(self):
        for flag, value, low in (("--max-batch", self.max_batch, 1), ("--max-wait-ms", self.max_wait_ms, 0),
                                 ("--max-files", self.max_files, 1), ("--max-upload-mb", self.max_upload_mb, 1e-6),
                                 ("--max-queue", self.max_queue, 1), ("--request-timeout", self.request_timeout_s, 1e-3)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low):
                raise ServeError(f"{flag} must be a number >= {low:g} (got {value!r})")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)


class Rejected(Exception):
    """A request the server refuses: answered as {"error": message, **extra} with `status`
    (and `headers`, such as Retry-After)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers, extra


# ---------------------------------------------------------------------------------------------
# Batching


@dataclass
class _Job:
    image: torch.Tensor
    group: str | None
    future: asyncio.Future


class Batcher:
    """Collects prepared images from all requests and predicts them together.

    The first image waits at most `max_wait_ms` for others; a batch closes early at `max_batch`.
    While a forward pass runs (in its own thread, so the event loop keeps accepting requests),
    the next batch fills up, so under load batches grow without any waiting.
    """

    def __init__(self, predict: Callable[[torch.Tensor, list[str | None]], list[dict]], max_batch: int, max_wait_ms: float):
        self.predict_batch, self.max_batch, self.max_wait = predict, max_batch, max_wait_ms / 1000
        self.forward_passes = 0
        self.images = 0
        self.largest_batch = 0
        self.seconds = 0.0  # in forward passes, for the throughput behind Retry-After
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        self._thread: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="mdn-model")  # one model, one pass at a time
        self._task = asyncio.get_running_loop().create_task(self._run(), name="mdn-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(Rejected(503, "the server is shutting down; send the request again later"))
        if self._thread is not None:
            self._thread.shutdown(wait=True)

    def stats(self) -> dict:
        return {"forward_passes": self.forward_passes, "images": self.images, "largest_batch": self.largest_batch,
                "max_batch": self.max_batch, "max_wait_ms": self.max_wait * 1000}

    def seconds_for(self, images: int) -> float:
        """How long the model takes for `images` images at the throughput seen so far (1 s before any)."""
        return images * self.seconds / self.images if self.images else 1.0

    async def predict(self, images: Sequence[torch.Tensor], groups: Sequence[str | None]) -> list[dict]:
        """Records for prepared images (each uint8 (3, S, S)) of the given groups, in order."""
        assert self._queue is not None, "Batcher.start() was not called"
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        for image, group, future in zip(images, groups, futures):
            self._queue.put_nowait(_Job(image, group, future))
        return list(await asyncio.gather(*futures))

    async def _next_batch(self) -> list[_Job]:
        queue = self._queue
        jobs = [await queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(jobs) < self.max_batch:
            if not queue.empty():
                jobs.append(queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                jobs.append(await asyncio.wait_for(queue.get(), remaining))
            except TimeoutError:
                break
        return [job for job in jobs if not job.future.done()]  # a client that went away cancelled its futures

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._next_batch()
            if not jobs:
                continue
            try:
                batch = torch.stack([job.image for job in jobs])
                started = time.monotonic()
                records = await loop.run_in_executor(self._thread, self.predict_batch, batch, [job.group for job in jobs])
                self.seconds += time.monotonic() - started
                if len(records) != len(jobs):
                    raise RuntimeError(f"the model answered {len(records)} records for {len(jobs)} images")
            except Exception as e:  # noqa: BLE001 - the waiting requests get the error; this loop must go on
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            self.forward_passes += 1
            self.images += len(jobs)
            self.largest_batch = max(self.largest_batch, len(jobs))
            for job, record in zip(jobs, records):
                if not job.future.done():
                    job.future.set_result(record)


# ---------------------------------------------------------------------------------------------
# The app


def create_app(model: Model, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The HTTP app around a loaded model. The batcher runs while the app's lifespan does (a
    TestClient used as a context manager, or uvicorn)."""
    batcher = Batcher(lambda batch, groups: model.predict_prepared(batch, groups=groups), settings.max_batch, settings.max_wait_ms)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # decoding (PIL releases the GIL) runs beside the forward pass, never on the event loop
        app.state.decoders = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="mdn-decode")
        batcher.start()
        try:
            interrupts.reached("serving")
            yield
        finally:
            await batcher.stop()
            app.state.decoders.shutdown(wait=True)

    app = FastAPI(title="mdn", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.model, app.state.batcher, app.state.settings = model, batcher, settings
    described = _finite(model.describe())

    @app.exception_handler(Rejected)
    async def rejected(request: Request, e: Rejected) -> JSONResponse:
        return JSONResponse({"error": e.message, **e.extra}, status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error ({type(e).__name__}: {_one_line(str(e))}); see the server log"},
                            status_code=500)

    app.add_middleware(_Headers)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": described}

    @app.get("/stats")
    async def stats() -> dict:
        return batcher.stats()

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    queued = [0]  # images accepted and not yet answered

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        try:
            files, groups = await asyncio.wait_for(_read_files(request, settings), settings.request_timeout_s)
        except TimeoutError:
            raise Rejected(408, f"the upload took longer than {settings.request_timeout_s:g} s; send it again on a faster "
                                "connection, or start the server with a larger --request-timeout",
                           headers={"Connection": "close"}) from None
        except ClientDisconnect:
            return Response(status_code=499)  # nobody is listening; nothing to log but the access line
        if queued[0] + len(files) > settings.max_queue:
            wait = max(1, math.ceil(batcher.seconds_for(queued[0])))
            raise Rejected(503, f"the server is busy ({queued[0]} images waiting, at most {settings.max_queue}); "
                                f"send the request again in {wait} s", headers={"Retry-After": str(wait)})
        queued[0] += len(files)
        try:
            interrupts.reached("predict-request")
            loop = asyncio.get_running_loop()
            decoders = request.app.state.decoders
            prepared = await asyncio.gather(*(loop.run_in_executor(decoders, _prepare, model, data, name) for name, data in files))
            bad = [{"image": name, "error": result} for (name, _), result in zip(files, prepared) if isinstance(result, str)]
            if bad:
                if len(files) == 1:
                    raise Rejected(422, bad[0]["error"], files=bad)
                listed = "; ".join(b["error"] for b in bad)
                raise Rejected(422, f"{len(bad)} of {len(files)} files could not be read, so none was predicted "
                                    f"(send the others without them): {listed}", files=bad)
            records = await batcher.predict(prepared, groups)
        finally:
            queued[0] -= len(files)
        return JSONResponse([_finite({"image": name, **record}) for (name, _), record in zip(files, records)])

    return app


class _Headers:
    """Adds SECURITY_HEADERS to every response, and makes browsers revalidate the page's assets
    (a cheap 304) so that a new mdn's page never runs an old app.js. A plain ASGI middleware:
    bodies stream through untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    headers[key] = value
                if scope["path"].startswith("/static/"):
                    headers["Cache-Control"] = "no-cache"
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _read_files(request: Request, settings: ServeSettings) -> tuple[list[tuple[str, bytes]], list[str | None]]:
    """(name, bytes) of every file field named "file", in order, and each file's group (text
    fields named "group": one for every file, or one per file in order; none: no group). Refuses
    what is not a small enough multipart upload of at most `max_files` files without reading more
    than the limit."""
    example = f"send images as multipart/form-data fields named {FIELD!r}, e.g. curl -F {FIELD}=@photo.jpg URL/predict"
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "multipart/form-data":
        raise Rejected(415, f"expected multipart/form-data, got {content_type or 'no Content-Type'!r}; {example}")
    limit = settings.max_upload_bytes
    too_large = (f"upload is larger than the {settings.max_upload_mb:g} MB limit per request; send fewer or smaller "
                 "photos per request, or start the server with a larger --max-upload-mb")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Rejected(413, too_large)

    async def limited() -> AsyncIterator[bytes]:
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:  # a chunked body declares no length: count as it arrives
                raise Rejected(413, too_large)
            yield chunk

    try:
        form = await MultiPartParser(request.headers, limited(), max_files=settings.max_files, max_fields=100).parse()
    except MultiPartException as e:
        if e.message.startswith("Too many files"):
            raise Rejected(413, f"more than {settings.max_files} files in one request; send at most {settings.max_files} "
                                "per request, or start the server with a larger --max-files") from None
        raise Rejected(400, f"malformed multipart body ({e.message}); {example}") from None
    try:
        files: list[tuple[str, bytes]] = []
        groups: list[str] = []
        for key, value in form.multi_items():
            if key == GROUP_FIELD and isinstance(value, str):
                groups.append(value.strip())
                continue
            if key != FIELD:
                continue
            if not isinstance(value, UploadFile):
                raise Rejected(400, f"field {FIELD!r} holds text, not a file; {example}")
            data = await value.read()
            if not value.filename and not data:  # a form sent with no file chosen
                continue
            files.append((_clean_name(value.filename, len(files)), data))
    finally:
        await form.close()
    if not files:
        others = sorted({key for key, _ in form.multi_items()} - {FIELD})
        got = f" (got fields {', '.join(map(repr, others))})" if others else ""
        raise Rejected(400, f"no {FIELD!r} field with a file in the form{got}; {example}")
    if len(groups) > 1 and len(groups) != len(files):
        raise Rejected(400, f"{len(groups)} {GROUP_FIELD!r} fields for {len(files)} files; send one group for all the files, "
                            "or one per file in the order of the files")
    per_file: list[str | None] = (groups * len(files) if len(groups) == 1 else groups) or [None] * len(files)
    return files, [g or None for g in per_file]


def _prepare(model: Model, data: bytes, name: str) -> torch.Tensor | str:
    """The model's input for one upload, or the one-line reason it cannot be read."""
    if not data:
        return f"{name}: file is empty (0 bytes); choose the photo again"
    try:
        return model.prepare(data, name=name)
    except UnreadableImageError as e:
        return _one_line(str(e))


def _clean_name(filename: str | None, index: int) -> str:
    """The uploaded file's name as sent, without control characters (they would break the
    one-line messages) and at most 200 characters."""
    name = "".join(c if c.isprintable() else "?" for c in (filename or "")).strip()
    return name[:200] if name else f"file {index + 1}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _finite(value):
    """JSON has no NaN or infinity: a non-finite number becomes null (as predict does for
    unbounded interval ends); everything else passes through unchanged."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Running it


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket; port 0 picks a free one. Raises ServeError when the address is taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ServeError(f"--host {host}: cannot resolve it ({e.strerror}); use an address such as 127.0.0.1 or 0.0.0.0") from None
    family, *_, address = infos[0]
    try:
        return socket.create_server(address, family=family, backlog=2048)
    except OSError as e:
        hint = "choose another with --port" if e.errno in (98, 48, 10048) else "check --host and --port"
        raise ServeError(f"cannot listen on {host}:{port} ({e.strerror}); {hint}") from None


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


@contextmanager
def in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` from a background thread while the block runs (tests, notebooks, scripts);
    yields its URL."""
    sock = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="mdn-serve", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise ServeError("the server thread stopped while starting; see the log above")
            time.sleep(0.01)
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def serve(checkpoint: Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          settings: ServeSettings = ServeSettings(), log: Callable[[str], None] = print, backend: str = "auto") -> None:
    """Load the checkpoint and serve until Ctrl-C (or SIGTERM). Raises MdnError subclasses
    (address in use, unreadable checkpoint) before anything is served."""
    sock = bind(host, port)
    try:
        model = Model.load(checkpoint, device, backend=backend, log=log)
        app = create_app(model, settings)
        interrupts.reached("model-loaded")
        interrupts.check()
        d = model.describe()
        members = " + ".join(f"{m['backbone']} ({m['components']} components)" for m in d["members"])
        device = "cpu" if model.onnx is not None else model.runtime.device
        log(f"serving {checkpoint} ({members}, {device}, {model.backend}) "
            f"at {url_of(sock)}  (Ctrl-C to stop)")
        # uvicorn's own handlers stop it gracefully (no new connections, in-flight requests finished,
        # slow uploads cut by --request-timeout), then hand the signal back to mdn's.
        _Server(uvicorn.Config(app, log_level="info", timeout_keep_alive=30,
                               timeout_graceful_shutdown=settings.request_timeout_s + 30)).run(sockets=[sock])
    finally:
        sock.close()


class _Server(uvicorn.Server):
    """uvicorn's server, told at once about a stop asked for before its own signal handlers were in place."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            if interrupts.requested():
                self.should_exit = True
            yield
