"""Reading a request: the body's size and time limits, JSON that cannot nest without bound,
and the images of a multipart, JSON or raw body. Every refusal is an ``HTTPException`` (JSON)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
from typing import Any

import numpy as np
from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile

from captcha_lit.deploy.memory import LARGE_BODY_BYTES, trim_heap

log = logging.getLogger(__name__)

RAW_IMAGE_TYPES = ("application/octet-stream",)  # and every image/* type

# ---- body size and time limits, and the last line of defence --------------------------------
class BodyLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with 413, before any parsing, and bodies that
    take longer than ``timeout`` seconds to arrive with 408.

    The body is read here (it is small by construction) and replayed to the app. An
    oversized body is drained up to ``drain_factor`` times the limit so that the client,
    still sending, reads the 413 instead of a reset connection. An exception that escapes
    the app is answered with a JSON 500 and logged on one line (none is expected: every
    bad input has its own 4xx).
    """

    def __init__(self, app, max_bytes: int, timeout: float = 30.0, drain_factor: int = 8):
        self.app, self.max_bytes, self.drain_limit = app, int(max_bytes), int(max_bytes) * drain_factor
        self.timeout = float(timeout)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked_send(message):
            nonlocal started
            started = True
            await send(message)

        try:
            if scope["method"] in ("GET", "HEAD", "OPTIONS"):
                return await self.app(scope, receive, tracked_send)
            try:
                body = await asyncio.wait_for(self._read(scope, receive, send), self.timeout)
            except asyncio.TimeoutError:
                return await _send_json(send, 408, f"request body not received within {self.timeout:g} s")
            if body is None:  # answered (413) or the client left
                return None
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            try:
                return await self.app(scope, replay, tracked_send)
            finally:
                if len(body) > LARGE_BODY_BYTES:  # its parsed pieces are freed by now
                    trim_heap()
        except Exception as exc:  # noqa: BLE001 - the client gets JSON, the log one line
            log.error("%s %s failed: %s: %s", scope["method"], scope["path"], type(exc).__name__, exc)
            if not started:
                await _send_json(send, 500, f"internal error ({type(exc).__name__}); the request was not solved")
            return None

    async def _read(self, scope, receive, send) -> bytes | None:
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = f"request body exceeds the limit of {self.max_bytes} bytes"
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            if int(declared) <= self.drain_limit:
                await _drain(receive)
            await _send_json(send, 413, too_big)
            return None
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
                await _send_json(send, 413, too_big)
                return None
            chunks.append(chunk)
        return b"".join(chunks)


async def _drain(receive, size: int = 0, limit: float = float("inf")) -> None:
    while size <= limit:
        message = await receive()
        size += len(message.get("body", b""))
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return


async def _send_json(send, status: int, detail: str) -> None:
    """Answer ``{"detail": detail}`` and close the connection (its body may be unread)."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# ---- the body's content ----------------------------------------------------------------------
# A payload is {"image": ...}, [...] or {"images": [...]}: depth 2. Deeper nesting only costs
# the parser (Python's json recurses once per level), so it is refused before parsing.
MAX_JSON_DEPTH = 8
MAX_JSON_NUMBER_DIGITS = 64
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def parse_json(body: bytes) -> Any:
    """``json.loads`` that cannot recurse without bound or spend long on one number: nesting
    deeper than ``MAX_JSON_DEPTH`` and numbers longer than ``MAX_JSON_NUMBER_DIGITS`` are 400."""
    # Brackets inside strings do not nest; the rest are counted with numpy, without recursion. A body with
    # few brackets anywhere (every real request) cannot nest deeply, and skips the scan.
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        steps = np.zeros(0, dtype=np.int32)
    else:
        structure = np.frombuffer(_JSON_STRING.sub(b'""', body), dtype=np.uint8)
        steps = (np.isin(structure, (91, 123)).astype(np.int32) - np.isin(structure, (93, 125)))
    if len(steps) and int(np.cumsum(steps).max()) > MAX_JSON_DEPTH:
        raise HTTPException(400, f"request body is JSON nested deeper than {MAX_JSON_DEPTH} levels; send "
                                 '{"image": "<base64>"} or a list of base64 strings')

    def number(parse):
        def bounded(text: str):
            if len(text) > MAX_JSON_NUMBER_DIGITS:
                raise ValueError(f"a number of {len(text)} characters; the limit is {MAX_JSON_NUMBER_DIGITS}")
            return parse(text)
        return bounded

    try:
        return json.loads(body, parse_int=number(int), parse_float=number(float))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise HTTPException(400, f"request body is not valid JSON ({str(exc)[:200]})") from None


def _base64_text(value: Any, label: str) -> str:
    if not isinstance(value, str):
        raise HTTPException(400, f"{label} must be a base64 string, got {type(value).__name__}")
    return value


def decode_base64(value: str, label: str) -> bytes:
    """A base64 string (or data URL) -> bytes; 400 when it is not base64."""
    if value.startswith("data:") and "," in value:  # a data URL
        value = value.split(",", 1)[1]
    try:
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:  # line breaks and spaces are allowed, and rare: strip them only then
            return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HTTPException(400, f"{label} is not valid base64 ({exc})") from None


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


_EXPECTED = ("send multipart/form-data with a '{field}' file field, or application/json {example}")


async def read_uploads(request: Request, field: str, example: str, max_files: int) -> list[tuple[str, bytes | str]]:
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
        return _json_images(parse_json(body), field, hint)
    if field == "file" and (media.startswith("image/") or media in RAW_IMAGE_TYPES):
        return [("request body", body)]
    raise HTTPException(415, f"unsupported Content-Type {media or '(none)'!r}; {hint}")


def _json_images(payload: Any, field: str, hint: str) -> list[tuple[str, bytes | str]]:
    """The JSON body's images, still base64 (``str``): they are decoded off the event loop, one at a
    time, so that a request over its pixel budget is refused before most of them are."""
    if field == "file":
        if not isinstance(payload, dict) or "image" not in payload:
            raise HTTPException(400, f"JSON body has no 'image' key; {hint}")
        return [("'image'", _base64_text(payload["image"], "'image'"))]
    images = payload.get("images") if isinstance(payload, dict) else payload
    if not isinstance(images, list) or not images:
        raise HTTPException(400, f"JSON body must be a non-empty list of base64 images; {hint}")
    return [(f"images[{i}]", _base64_text(value, f"images[{i}]")) for i, value in enumerate(images)]
