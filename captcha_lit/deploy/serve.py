"""Serve a model over HTTP with FastAPI on uvicorn.

    python -m captcha_lit.serve model_path=model.onnx port=8000
    python -m captcha_lit.serve model_path=outputs/train/runs/<time>/checkpoints/last.ckpt

A .ckpt is exported to ONNX (and parity-checked) at startup, so a checkpoint and its
exported model answer identically; inference runs on ``captcha_lit.deploy.runtime``.

    curl -F file=@captcha.png http://127.0.0.1:8000/v1/solve
    curl -H 'Content-Type: application/json' -d '{"image": "<base64>"}' http://127.0.0.1:8000/v1/solve

Endpoints: POST /v1/solve, POST /v1/solve/batch, GET /v1/model, GET /health, and the
OpenAPI docs at /docs. ``workers=auto`` (the default) runs one server process per core on
the port; ``workers=1`` serves from this process alone. Set CAPTCHA_LIT_API_KEY to require that key in the X-API-Key
header of every /v1 request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.security import APIKeyHeader
from omegaconf import DictConfig
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile

from captcha_lit import __version__
from captcha_lit.preprocess import MAX_IMAGE_PIXELS, ImageDecodeError
from captcha_lit.deploy.runtime import Solver, check_model_file

log = logging.getLogger(__name__)

API_KEY_ENV = "CAPTCHA_LIT_API_KEY"
RAW_IMAGE_TYPES = ("application/octet-stream",)  # and every image/* type


# ---- response models (for the OpenAPI docs) ---------------------------------------------
class Solved(BaseModel):
    text: str = Field(description="the decoded text")
    confidence: float = Field(description="probability of the whole text")
    char_confidences: list[float] = Field(description="probability of each character of the text")


class SolveResponse(Solved):
    model_id: str
    latency_ms: float = Field(description="time spent on the request in the server")


class BatchItem(BaseModel):
    text: str | None = None
    confidence: float | None = None
    char_confidences: list[float] | None = None
    error: str | None = Field(None, description="why this image could not be solved")


class BatchResponse(BaseModel):
    results: list[BatchItem]
    model_id: str
    latency_ms: float


class Error(BaseModel):
    detail: str


_IMAGE_BODY = {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
    "application/json": {"schema": {"type": "object", "required": ["image"],
                                    "properties": {"image": {"type": "string", "format": "byte",
                                                             "description": "base64-encoded image"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
}
_BATCH_BODY = {
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "application/json": {"schema": {"oneOf": [
        {"type": "array", "items": {"type": "string", "format": "byte"}},
        {"type": "object", "required": ["images"],
         "properties": {"images": {"type": "array", "items": {"type": "string", "format": "byte"}}}},
    ]}},
}
_ERRORS = {code: {"model": Error, "description": text} for code, text in (
    (400, "malformed request: empty body, bad JSON or base64, missing field"),
    (401, "missing or wrong API key"), (413, "body or batch too large"),
    (415, "unsupported Content-Type"), (422, "not a readable image, or too many pixels"),
)}


# ---- body size limit ----------------------------------------------------------------------
class BodyLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with 413, before any parsing.

    The body is read here (it is small by construction) and replayed to the app. An
    oversized body is drained up to ``drain_factor`` times the limit so that the client,
    still sending, reads the 413 instead of a reset connection.
    """

    def __init__(self, app, max_bytes: int, drain_factor: int = 8):
        self.app, self.max_bytes, self.drain_limit = app, int(max_bytes), int(max_bytes) * drain_factor

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = f"request body exceeds the limit of {self.max_bytes} bytes"
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            if int(declared) <= self.drain_limit:
                await _drain(receive)
            return await _send_json(send, 413, too_big)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.max_bytes:
                if size <= self.drain_limit and more:
                    await _drain(receive, size, self.drain_limit)
                return await _send_json(send, 413, too_big)
            chunks.append(chunk)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _drain(receive, size: int = 0, limit: float = float("inf")) -> None:
    while size <= limit:
        message = await receive()
        size += len(message.get("body", b""))
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return


async def _send_json(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# ---- request parsing ----------------------------------------------------------------------
def _b64decode(value: Any, label: str) -> bytes:
    if not isinstance(value, str):
        raise HTTPException(400, f"{label} must be a base64 string, got {type(value).__name__}")
    if value.startswith("data:") and "," in value:  # a data URL
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HTTPException(400, f"{label} is not valid base64 ({exc})") from None


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


_EXPECTED = ("send multipart/form-data with a '{field}' file field, or application/json {example}")


async def _read_uploads(request: Request, field: str, example: str, max_files: int) -> list[tuple[str, bytes]]:
    body = await request.body()
    hint = _EXPECTED.format(field=field, example=example)
    if not body:
        raise HTTPException(400, f"empty request body; {hint}")
    media = _media_type(request)
    if media == "multipart/form-data":
        form = await request.form()  # the body limit already bounds the number of parts
        uploads = form.getlist(field)
        if not uploads:
            raise HTTPException(400, f"multipart body has no '{field}' field; {hint}")
        if not all(isinstance(u, UploadFile) for u in uploads):
            raise HTTPException(400, f"multipart field '{field}' must be a file upload, not a text value")
        if max_files == 1 and len(uploads) > 1:
            raise HTTPException(400, f"send one '{field}' per request, or several to /v1/solve/batch")
        if max_files == 1:
            return [(f"{field} {uploads[0].filename or ''!r}", await uploads[0].read())]
        return [(f"{field}[{i}] {u.filename or ''!r}", await u.read()) for i, u in enumerate(uploads)]
    if media == "application/json" or media.endswith("+json"):
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPException(400, f"request body is not valid JSON ({exc})") from None
        return _json_images(payload, field, hint)
    if field == "file" and (media.startswith("image/") or media in RAW_IMAGE_TYPES):
        return [("request body", body)]
    raise HTTPException(415, f"unsupported Content-Type {media or '(none)'!r}; {hint}")


def _json_images(payload: Any, field: str, hint: str) -> list[tuple[str, bytes]]:
    if field == "file":
        if not isinstance(payload, dict) or "image" not in payload:
            raise HTTPException(400, f"JSON body has no 'image' key; {hint}")
        return [("image", _b64decode(payload["image"], "'image'"))]
    images = payload.get("images") if isinstance(payload, dict) else payload
    if not isinstance(images, list) or not images:
        raise HTTPException(400, f"JSON body must be a non-empty list of base64 images; {hint}")
    return [(f"images[{i}]", _b64decode(value, f"images[{i}]")) for i, value in enumerate(images)]


# ---- micro-batching ---------------------------------------------------------------------------
class MicroBatcher:
    """Coalesces the images of concurrent requests into one onnxruntime call.

    Requests queue their images and await a future. One worker thread takes everything
    queued (up to ``max_images``), decodes it and runs one batched inference, while the
    next requests queue up behind it. A lone request therefore goes straight through,
    with no waiting window; under load, the per-call cost of the model is shared by the
    whole batch, so throughput rises instead of latency. ``max_images=1`` turns it off.
    """

    def __init__(self, solve_images, max_images: int):
        self._solve_images = solve_images
        self.max_images = max(1, int(max_images))
        self._pending: list[tuple[list[tuple[str, bytes]], asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        # One thread: batches run one after another, and each uses every intra-op thread.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="captcha_lit_solve")
        self.batches = 0
        self.images = 0

    async def solve(self, items: list[tuple[str, bytes]]) -> list[dict]:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((items, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    def _take(self) -> list[tuple[list[tuple[str, bytes]], asyncio.Future]]:
        taken, count = [], 0
        while self._pending and (not taken or count + len(self._pending[0][0]) <= self.max_images):
            items, future = self._pending.pop(0)
            taken.append((items, future))
            count += len(items)
        return taken

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            taken = self._take()
            flat = [item for items, _ in taken for item in items]
            try:
                results = await loop.run_in_executor(self._executor, self._solve_images, flat)
            except Exception as exc:  # noqa: BLE001 - every waiting request must hear about it
                for _, future in taken:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches += 1
            self.images += len(flat)
            start = 0
            for items, future in taken:
                if not future.done():  # the client may have gone away
                    future.set_result(results[start:start + len(items)])
                start += len(items)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# ---- the app --------------------------------------------------------------------------------
def create_app(solver: Solver, *, max_body_bytes: int = 2 * 1024 * 1024, max_batch: int = 64,
               api_key: str | None = None, micro_batch: int = 64) -> FastAPI:
    """The FastAPI app around ``solver``. ``api_key`` (if set) guards every /v1 route;
    ``micro_batch`` caps the images that concurrent requests share in one model call."""
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        batcher.close()

    app = FastAPI(title="captcha_lit", version=__version__, lifespan=lifespan,
                  description=f"Solves text CAPTCHAs with model {solver.model_id} ({solver.spec.arch}, "
                              f"{solver.spec.decoder} decoder).")
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description=f"required when {API_KEY_ENV} is set")

    async def check_key(key: str | None = Depends(header)) -> None:
        if api_key and not (key and hmac.compare_digest(key.encode(), api_key.encode())):
            raise HTTPException(401, "missing or wrong API key; send it in the X-API-Key header",
                                headers={"WWW-Authenticate": "ApiKey"})

    # Without a key there is nothing to check: no dependency at all (it costs ~10% of a request).
    guard = [Depends(check_key)] if api_key else []

    def solve_images(items: list[tuple[str, bytes]]) -> list[dict]:
        """Decode each image (errors per image), then solve the good ones in one batch."""
        results: list[dict] = []
        arrays, slots = [], []
        for label, data in items:
            try:
                arrays.append(solver.load(data, name=label))
                slots.append(len(results))
                results.append({})
            except ImageDecodeError as exc:
                results.append({"error": str(exc)})
        if arrays:
            for slot, solution in zip(slots, solver.solve_arrays(np.stack(arrays))):
                results[slot] = solution.to_dict()
        return results

    batcher = MicroBatcher(solve_images, max(int(micro_batch), 1))
    app.state.batcher = batcher

    @app.get("/health", tags=["service"])
    async def health() -> dict:
        return {"status": "ok", "model_id": solver.model_id, "pid": os.getpid()}  # pid: which worker answered

    @app.get("/v1/model", tags=["service"], dependencies=guard, responses={401: _ERRORS[401]})
    async def model() -> dict:
        spec = solver.spec
        return {"model_id": solver.model_id, "arch": spec.arch, "decoder": spec.decoder, "charset": spec.charset,
                "min_length": spec.min_length, "max_length": spec.max_length, "input_size": list(spec.input_size),
                "mean": list(spec.mean), "std": list(spec.std), "exported_with": spec.version,
                "version": __version__, "max_body_bytes": max_body_bytes, "max_batch": max_batch,
                "max_image_pixels": solver.max_pixels}

    @app.post("/v1/solve", tags=["solve"], response_model=SolveResponse, dependencies=guard,
              responses=_ERRORS, openapi_extra={"requestBody": {"required": True, "content": _IMAGE_BODY}})
    async def solve(request: Request) -> dict:
        """Solve one image: multipart field `file`, JSON `{"image": base64}`, or a raw image/* body."""
        start = time.perf_counter()
        items = await _read_uploads(request, "file", '{"image": "<base64>"}', 1)
        result = (await batcher.solve(items))[0]
        if "error" in result:
            raise HTTPException(422, result["error"])
        return {**result, "model_id": solver.model_id, "latency_ms": round((time.perf_counter() - start) * 1e3, 3)}

    @app.post("/v1/solve/batch", tags=["solve"], response_model=BatchResponse, response_model_exclude_none=True,
              dependencies=guard,
              responses=_ERRORS, openapi_extra={"requestBody": {"required": True, "content": _BATCH_BODY}})
    async def solve_batch(request: Request) -> dict:
        """Solve several images: multipart fields `files`, or a JSON list of base64 strings (or
        `{"images": [...]}`). An unreadable image gets an `error` in its result; the others are solved."""
        start = time.perf_counter()
        items = await _read_uploads(request, "files", '["<base64>", ...]', max_batch)
        if len(items) > max_batch:
            raise HTTPException(413, f"batch of {len(items)} images exceeds the limit of {max_batch}")
        results = await batcher.solve(items)
        return {"results": results, "model_id": solver.model_id,
                "latency_ms": round((time.perf_counter() - start) * 1e3, 3)}

    return app


# ---- entry point ------------------------------------------------------------------------------
WORKER_ENV = "CAPTCHA_LIT_SERVE_WORKER"  # the serving spec handed to uvicorn's worker processes


def onnx_model(model_path: str, out_dir: str | os.PathLike, *, parity_images: int = 32) -> Path:
    """The .onnx file to serve: ``model_path`` itself, or a checkpoint exported (and
    parity-checked against PyTorch) into ``out_dir``."""
    path = check_model_file(model_path)
    if path.suffix.lower() == ".onnx":
        return path
    from captcha_lit.training.builders import load_module
    from captcha_lit.deploy.export import export_onnx

    module, state = load_module(path)
    out = Path(out_dir) / f"{path.stem}.onnx"
    report = export_onnx(module, state, out, parity_images=parity_images, ckpt_path=str(path))
    log.info("exported %s to ONNX: texts agree %.1f%%, largest logit difference %.2e", path,
             100 * report["text_agreement"], report["max_abs_logit_diff"])
    return out


def load_solver(model_path: str, *, threads: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS,
                parity_images: int = 32, spinning: bool = False) -> Solver:
    """A Solver for a .onnx model, or for a checkpoint exported to ONNX in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="captcha_lit_serve_") as tmp:
        # onnxruntime reads the whole model at session creation, so the folder can go afterwards.
        return Solver(onnx_model(model_path, tmp, parity_images=parity_images), threads=threads,
                      max_pixels=max_pixels, spinning=spinning)


def resolve_workers(value: Any) -> int:
    """``workers``: a positive count, or ``auto`` for one server process per core."""
    if value is None or str(value).lower() == "auto":
        return max(1, os.cpu_count() or 1)
    try:
        workers = int(value)
    except (TypeError, ValueError):
        workers = 0
    if workers < 1 or str(workers) != str(value).strip():
        raise ValueError(f"workers={value!r}: give a whole number of server processes >= 1, or auto")
    return workers


def _app_from_spec(spec: dict, solver: Solver | None = None) -> FastAPI:
    if solver is None:
        solver = Solver(spec["onnx"], threads=spec["threads"], max_pixels=spec["max_pixels"],
                        spinning=spec["spinning"])
    return create_app(solver, max_body_bytes=spec["max_body_bytes"], max_batch=spec["max_batch"],
                      api_key=os.environ.get(API_KEY_ENV) or None, micro_batch=spec["micro_batch"])


def worker_app() -> FastAPI:
    """uvicorn's app factory for its own worker processes (platforms without SO_REUSEPORT)."""
    return _app_from_spec(json.loads(os.environ[WORKER_ENV]))


def _run_worker(spec: dict, run: dict, sock) -> None:
    """One server process on its own SO_REUSEPORT socket."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(_app_from_spec(spec), **run)).run(sockets=[sock])


def _listening_sockets(host: str, port: int, count: int) -> list:
    """``count`` sockets bound to the same address with SO_REUSEPORT: the kernel spreads new
    connections over them, so each worker gets its share (a single shared socket lets one
    idle worker accept a burst of keep-alive connections and keep them)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # SO_REUSEPORT would also let these sockets join another server that listens on the port
    # with SO_REUSEPORT (a second captcha_lit.serve, say) and take half of its connections.
    # A plain bind first fails on any port that something already listens on.
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another port=") from None
        port = probe.getsockname()[1]  # port=0 picks a free port, which every worker then shares
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another port=") from None
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _serve_workers(spec: dict, run: dict, workers: int) -> None:
    """Run ``workers`` server processes and stop them all when one exits or on SIGINT/SIGTERM."""
    import multiprocessing
    import multiprocessing.connection
    import signal

    sockets = _listening_sockets(run.pop("host"), run.pop("port"), workers)
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_run_worker, args=(spec, run, sock), name=f"captcha_lit-serve-{i}")
                 for i, sock in enumerate(sockets)]
    stopping = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stopping.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for process in processes:
            process.start()
        while not stopping and all(p.is_alive() for p in processes):
            multiprocessing.connection.wait([p.sentinel for p in processes], timeout=0.5)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()  # uvicorn shuts down gracefully on SIGTERM
        for process in processes:
            process.join(15)
            if process.is_alive():
                process.kill()
                process.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sock in sockets:
            sock.close()
    failed = [(p.name, p.exitcode) for p in processes if p.exitcode not in (0, None, -signal.SIGTERM)]
    if not stopping and failed:
        raise RuntimeError(f"server process {failed[0][0]} exited with code {failed[0][1]}; the others were stopped")


def serve(cfg: DictConfig) -> None:
    import uvicorn

    workers = resolve_workers(cfg.get("workers", 1))
    # One process per core scales past the GIL; each then runs onnxruntime on one thread.
    threads = cfg.get("threads")
    threads = int(threads) if threads is not None else (None if workers == 1 else 1)
    spec = {"threads": threads, "max_pixels": int(cfg.get("max_image_pixels") or MAX_IMAGE_PIXELS),
            "spinning": bool(cfg.get("spinning", False)), "max_body_bytes": int(cfg.max_body_bytes),
            "max_batch": int(cfg.max_batch), "micro_batch": int(cfg.get("micro_batch", 64))}
    api_key = os.environ.get(API_KEY_ENV) or None
    run = dict(host=str(cfg.host), port=int(cfg.port), log_level=str(cfg.get("log_level", "info")),
               access_log=bool(cfg.get("access_log", True)))
    with tempfile.TemporaryDirectory(prefix="captcha_lit_serve_") as tmp:
        spec["onnx"] = str(onnx_model(str(cfg.model_path), tmp, parity_images=int(cfg.get("parity_images", 32))))
        solver = Solver(spec["onnx"], threads=threads, max_pixels=spec["max_pixels"], spinning=spec["spinning"])
        print(f"serving {solver.model_id} ({solver.spec.arch}, {solver.spec.decoder}) on "
              f"http://{cfg.host}:{cfg.port} with {workers} worker process(es)  docs: /docs  "
              f"API key: {'required' if api_key else 'off'}", flush=True)
        if workers == 1:
            uvicorn.run(_app_from_spec(spec, solver), **run)
            return
        del solver  # each worker process opens its own session on the same file
        import socket

        if hasattr(socket, "SO_REUSEPORT"):
            _serve_workers(spec, run, workers)
        else:
            os.environ[WORKER_ENV] = json.dumps(spec)
            uvicorn.run("captcha_lit.deploy.serve:worker_app", factory=True, workers=workers, **run)
