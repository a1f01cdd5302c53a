"""The HTTP API: a FastAPI app around a ``Solver``.

Endpoints: POST /v1/solve, POST /v1/solve/batch, GET /v1/model, GET /health, and the
OpenAPI docs at /docs. Request bodies are size-limited before parsing; an image comes as
multipart, a raw image/* body or base64 in JSON. With an API key, every /v1 route needs it
in the X-API-Key header. ``captcha_lit.deploy.serve`` runs this app on uvicorn.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile

from captcha_lit import __version__
from captcha_lit.deploy.batcher import MicroBatcher
from captcha_lit.deploy.runtime import Solver
from captcha_lit.preprocess import ImageDecodeError

API_KEY_ENV = "CAPTCHA_LIT_API_KEY"
RAW_IMAGE_TYPES = ("application/octet-stream",)  # and every image/* type
SOLVE_PAGE = Path(__file__).with_name("static") / "solve.html"  # GET /: drop or paste an image, see its reading


def api_key_from_env() -> str | None:
    """The API key that guards /v1: ``$CAPTCHA_LIT_API_KEY``, or None (no key) when unset or empty."""
    return os.environ.get(API_KEY_ENV) or None


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

    batcher = MicroBatcher(solve_images, micro_batch)
    page = SOLVE_PAGE.read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def solve_page() -> HTMLResponse:
        return HTMLResponse(page)

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
