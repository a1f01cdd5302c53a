"""The HTTP API: a FastAPI app around a ``Solver``.

Endpoints: POST /v1/solve, POST /v1/solve/batch, GET /v1/model, GET (and HEAD) /health, and
the OpenAPI docs at /docs, with Swagger UI served from this process. Request bodies are
size- and time-limited before parsing; an image comes as multipart, a raw image/* body or
base64 in JSON. With an API key, every /v1 route needs it in the X-API-Key header.
``captcha_lit.deploy.serve`` runs this app on uvicorn.

What one request may cost is bounded: its body (bytes and read time), the nesting and
numbers of its JSON, the pixels its images declare in all (checked from their headers,
before any is decoded), and its time from a full body to the answer. Every error is JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, Field
from starlette.staticfiles import StaticFiles

from captcha_lit import __version__
from captcha_lit.deploy.batcher import MicroBatcher
from captcha_lit.deploy.request_body import BodyLimitMiddleware, decode_base64, read_uploads
from captcha_lit.deploy.runtime import Solver
from captcha_lit.preprocess import ImageDecodeError, probe_pixels

API_KEY_ENV = "CAPTCHA_LIT_API_KEY"
SOLVE_PAGE = Path(__file__).with_name("static") / "solve.html"  # GET /: drop or paste an image, see its reading


def api_key_from_env() -> str | None:
    """The API key that guards /v1: ``$CAPTCHA_LIT_API_KEY``, or None (no key) when unset or empty."""
    return os.environ.get(API_KEY_ENV) or None


# ---- response models (for the OpenAPI docs) ---------------------------------------------
class Solved(BaseModel):
    text: str = Field(description="the decoded text")
    confidence: float = Field(description="probability of the whole text")
    char_confidences: list[float] = Field(description="probability of each character of the text")
    unsure: str | None = Field(None, description="why the reading cannot be right (empty, or a length outside the "
                                                 "model's range); null when its length is in range")


class SolveResponse(Solved):
    model_id: str
    latency_ms: float = Field(description="time spent on the request in the server")


class BatchItem(BaseModel):
    text: str | None = None
    confidence: float | None = None
    char_confidences: list[float] | None = None
    unsure: str | None = None
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
    (401, "missing or wrong API key"), (408, "request body not received in time"),
    (413, "body, batch or pixels in all too large"), (415, "unsupported Content-Type"),
    (422, "not a readable image, or too many pixels"), (503, "busy: the request ran out of time"),
)}


@dataclass(frozen=True)
class RequestLimits:
    """What one request may cost."""

    max_body_bytes: int = 2 * 1024 * 1024
    max_batch: int = 64  # images per /v1/solve/batch request
    max_request_pixels: int = 4096 * 4096  # pixels that a request's images declare, in all
    body_timeout: float = 30.0  # seconds to receive the body once the headers are in
    request_timeout: float = 10.0  # seconds from a full body to the answer



# ---- the app --------------------------------------------------------------------------------
class _RequestError(Exception):
    """A whole request refused while its images are checked (off the event loop)."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def _swagger_assets() -> str | None:
    """The folder of the Swagger UI files that the ``swagger-ui-bundle`` package ships, if installed."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    return str(swagger_ui_path)


def create_app(solver: Solver, *, max_body_bytes: int = 2 * 1024 * 1024, max_batch: int = 64,
               api_key: str | None = None, micro_batch: int = 64, limits: RequestLimits | None = None) -> FastAPI:
    """The FastAPI app around ``solver``. ``api_key`` (if set) guards every /v1 route;
    ``micro_batch`` caps the images that concurrent requests share in one model call;
    ``limits`` bounds what one request may cost (its body and batch sizes override
    ``max_body_bytes`` and ``max_batch``)."""
    limits = limits or RequestLimits(max_body_bytes=max_body_bytes, max_batch=max_batch)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        batcher.close()
        for pool in decoders.values():
            pool.shutdown(wait=False, cancel_futures=True)

    assets = _swagger_assets()
    app = FastAPI(title="captcha_lit", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description=f"Solves text CAPTCHAs with model {solver.model_id} ({solver.spec.arch}, "
                              f"{solver.spec.decoder} decoder).")
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes, timeout=limits.body_timeout)
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description=f"required when {API_KEY_ENV} is set")

    async def check_key(key: str | None = Depends(header)) -> None:
        if api_key and not (key and hmac.compare_digest(key.encode(), api_key.encode())):
            raise HTTPException(401, "missing or wrong API key; send it in the X-API-Key header",
                                headers={"WWW-Authenticate": "ApiKey"})

    # Without a key there is nothing to check: no dependency at all (it costs ~10% of a request).
    guard = [Depends(check_key)] if api_key else []

    def decode(items: list[tuple[str, bytes | str]]) -> tuple[list[dict], np.ndarray | None]:
        """Each image's error, or its pixels at the model input; the request's pixels in all
        are checked from the images' headers before any of them is decoded."""
        encoded: dict[str, bytes] = {}  # a base64 string sent several times is decoded once
        files, declared = [], 0
        for label, data in items:
            if isinstance(data, str):
                data = encoded[data] if data in encoded else encoded.setdefault(data, decode_base64(data, label))
            files.append((label, data))
            pixels = probe_pixels(data)
            # An image over the per-image limit is refused on its own, undecoded, so it does not count here.
            declared += pixels if pixels <= solver.max_pixels else 0
            if declared > limits.max_request_pixels:
                raise _RequestError(413, f"the images of this request declare more than {limits.max_request_pixels} "
                                         f"pixels in all (the limit per request; {label} passes it); send fewer or "
                                         "smaller images")
        results: list[dict] = []
        arrays = []
        for label, data in files:
            try:
                arrays.append(solver.load(data, name=label))
                results.append({})
            except ImageDecodeError as exc:
                results.append({"error": str(exc)})
        return results, (np.stack(arrays) if arrays else None)

    batcher = MicroBatcher(solver.solve_arrays, micro_batch)
    # Single solves decode on a thread of their own, so a batch being decoded never holds one up.
    decoders = {kind: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"captcha_lit_decode_{kind}")
                for kind in ("single", "batch")}

    async def answer(items: list[tuple[str, bytes | str]], kind: str) -> list[dict]:
        loop = asyncio.get_running_loop()
        results, arrays = await loop.run_in_executor(decoders[kind], decode, items)
        if arrays is not None:
            solutions = iter(await batcher.solve(arrays))
            results = [result if "error" in result else next(solutions).to_dict() for result in results]
        return results

    async def within_time_limit(items: list[tuple[str, bytes | str]], kind: str) -> list[dict]:
        try:
            return await asyncio.wait_for(answer(items, kind), limits.request_timeout)
        except asyncio.TimeoutError:
            raise HTTPException(503, f"the server is busy: no answer within {limits.request_timeout:g} s; retry in a "
                                     "moment", headers={"Retry-After": "1"}) from None
        except _RequestError as exc:
            raise HTTPException(exc.status, exc.detail) from None

    page = SOLVE_PAGE.read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def solve_page() -> HTMLResponse:
        return HTMLResponse(page)

    if assets is not None:
        app.mount("/docs/assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        if assets is None:
            raise HTTPException(404, "the API docs need the swagger-ui-bundle package: pip install -e '.[deploy]'; "
                                     "the API itself is described at /openapi.json")
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} API",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon-32x32.png")

    @app.api_route("/health", methods=["GET", "HEAD"], tags=["service"])
    async def health() -> dict:
        return {"status": "ok", "model_id": solver.model_id, "pid": os.getpid()}  # pid: which worker answered

    @app.get("/v1/model", tags=["service"], dependencies=guard, responses={401: _ERRORS[401]})
    async def model() -> dict:
        spec = solver.spec
        return {"model_id": solver.model_id, "arch": spec.arch, "decoder": spec.decoder, "charset": spec.charset,
                "min_length": spec.min_length, "max_length": spec.max_length, "input_size": list(spec.input_size),
                "mean": list(spec.mean), "std": list(spec.std), "exported_with": spec.version,
                "version": __version__, "max_body_bytes": limits.max_body_bytes, "max_batch": limits.max_batch,
                "max_image_pixels": solver.max_pixels, "max_request_pixels": limits.max_request_pixels,
                "request_timeout_s": limits.request_timeout}

    @app.post("/v1/solve", tags=["solve"], response_model=SolveResponse, dependencies=guard,
              responses=_ERRORS, openapi_extra={"requestBody": {"required": True, "content": _IMAGE_BODY}})
    async def solve(request: Request) -> dict:
        """Solve one image: multipart field `file`, JSON `{"image": base64}`, or a raw image/* body.
        `unsure` says why a reading cannot be right (empty, or a length the model does not read)."""
        start = time.perf_counter()
        items = await read_uploads(request, "file", '{"image": "<base64>"}', 1)
        result = (await within_time_limit(items, "single"))[0]
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
        items = await read_uploads(request, "files", '["<base64>", ...]', limits.max_batch)
        if len(items) > limits.max_batch:
            raise HTTPException(413, f"batch of {len(items)} images exceeds the limit of {limits.max_batch}")
        results = await within_time_limit(items, "batch")
        return {"results": results, "model_id": solver.model_id,
                "latency_ms": round((time.perf_counter() - start) * 1e3, 3)}

    return app
