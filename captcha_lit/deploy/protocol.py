"""The server's HTTP connections: uvicorn's httptools protocol, guarded against slow and idle clients.

uvicorn times out idle keep-alive connections, but a client that sends part of its request
line or headers, and then nothing, is held forever; enough of them starve the server. Each
connection here must finish its headers within ``header_timeout`` seconds of its first byte
(or of connecting), and the headers may not grow past ``max_header_bytes``. A worker holds at
most ``max_connections`` connections: past that, each request is answered 503 until some
close. Every answer given here, and uvicorn's own 400 for malformed HTTP, is JSON.
(The request body's own time limit is the app's: ``captcha_lit.deploy.app``.)
"""

from __future__ import annotations

import asyncio
import functools
import json
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10.0  # seconds from a request's first byte (or the connection) to its last header
    max_header_bytes: int = 65536  # request line and headers
    max_connections: int = 512  # open connections per server process; more get 503


def json_response(status: int, detail: str, extra_headers: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A complete HTTP/1.1 response with a JSON ``{"detail": ...}`` body that closes the connection."""
    body = json.dumps({"detail": detail}).encode()
    head = [STATUS_LINE[status], b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n", b"connection: close\r\n"]
    head += [name + b": " + value + b"\r\n" for name, value in extra_headers]
    return b"".join(head) + b"\r\n" + body


def _refusal(status: int, detail: str, *extra_headers: tuple[bytes, bytes]):
    """An ASGI app that answers ``status`` with ``{"detail": detail}`` and closes the connection."""
    body = json.dumps({"detail": detail}).encode()

    async def refuse(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close"), *extra_headers]})
        await send({"type": "http.response.body", "body": body})

    return refuse


_busy = _refusal(503, "the server is at its limit of open connections; retry in a moment", (b"retry-after", b"1"))


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's HttpToolsProtocol with a header deadline, a header size cap and a connection cap."""

    def __init__(self, *args, limits: ConnectionLimits, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._header_timer: asyncio.TimerHandle | None = None
        self._awaiting_headers = True
        self._header_bytes = 0  # of the request being read: what has arrived, or what was parsed
        self._parsed_bytes = 0
        self._too_long = _refusal(431, f"request line and headers exceed {limits.max_header_bytes} bytes")

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        # Counted after parsing, so that a first read holding headers and body is not mistaken for headers.
        if self._awaiting_headers and self._header_bytes > self.limits.max_header_bytes:
            self._refuse(431, f"request line and headers exceed {self.limits.max_header_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._awaiting_headers, self._header_bytes, self._parsed_bytes = True, 0, 0
        if self._header_timer is None:
            self._arm_header_timer()

    def on_url(self, url: bytes) -> None:
        self._parsed_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._parsed_bytes += len(name) + len(value) + 4
        if self._parsed_bytes <= self.limits.max_header_bytes:  # past it nothing more is kept
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._disarm_header_timer()
        limit = self.limits.max_connections
        if self._parsed_bytes > self.limits.max_header_bytes:  # arrived whole, in one read
            refusal = self._too_long
        elif len(self.connections) > limit or len(self.tasks) >= limit:
            refusal = _busy
        else:
            super().on_headers_complete()
            return
        app, self.app = self.app, refusal
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def send_400_response(self, msg: str) -> None:
        if not self.transport.is_closing():
            self.transport.write(json_response(400, f"malformed HTTP request: {msg}"))
            self.transport.close()

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.limits.header_timeout, self._header_deadline)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        if not self._awaiting_headers or self.transport.is_closing():
            return
        if self._header_bytes:
            self._refuse(408, f"request headers not received within {self.limits.header_timeout:g} s")
        else:  # connected and said nothing: nobody to answer
            self.transport.close()

    def _refuse(self, status: int, detail: str) -> None:
        self._awaiting_headers = False
        self._disarm_header_timer()
        if not self.transport.is_closing():
            self.transport.write(json_response(status, detail))
            self.transport.close()


def guarded_protocol(limits: ConnectionLimits):
    """What uvicorn's ``http=`` takes: a factory of guarded connections."""
    return functools.partial(GuardedHttpToolsProtocol, limits=limits)
