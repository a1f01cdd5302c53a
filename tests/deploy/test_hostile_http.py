"""The HTTP service under hostile input: a real uvicorn server (``python -m captcha_lit.serve``) gets
malformed HTTP, crafted JSON, multipart and image bodies, slow and idle connections. Every answer is
a JSON 4xx (or a success), never a 500; the log holds no traceback; the server still answers."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import socket
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES, serving
from test_deploy import captcha_pngs
from test_serve import _bomb_png

ONNX = FIXTURES / "compat_640dca3" / "crnn.onnx"  # 5 characters of 0-9A-Z, 64x160 gray
HEADER_TIMEOUT, BODY_TIMEOUT, MAX_CONNECTIONS = 2, 2, 64


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory, cache_dir):
    """One server process with short timeouts and a small connection cap: (url, port, log path)."""
    options = [f"model_path={ONNX}", "workers=1", f"header_timeout={HEADER_TIMEOUT}", f"body_timeout={BODY_TIMEOUT}",
               f"max_connections={MAX_CONNECTIONS}"]
    with serving(options, tmp_path_factory.mktemp("hostile_serve"), cache_dir, timeout=120) as served:
        yield served


def exchange(port: int, request: bytes, timeout: float = 10.0) -> tuple[int | None, dict, bytes]:
    """Send raw bytes on a fresh connection; read the answer until the server closes or the headers
    and declared body are in. Returns (status or None when closed without answering, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            if _:
                headers = _headers(head)
                length = int(headers.get("content-length", -1))
                if length >= 0 and len(body) >= length:
                    break
    if not data.startswith(b"HTTP/"):
        return None, {}, data
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), _headers(head), body


def _headers(head: bytes) -> dict:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _http(method: str, path: str, body: bytes = b"", content_type: str | None = None, extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n"
    head += f"Content-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode("latin-1") + body


def _png(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return buffer.getvalue()


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "XyZ") -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def hostile_requests() -> dict[str, bytes]:
    """name -> the raw bytes of one hostile request."""
    good = captcha_pngs(1)[0][1]
    b64 = base64.b64encode(good).decode()
    solid = _png(Image.new("L", (4096, 4096), 255), optimize=True)
    json_solve = lambda body: _http("POST", "/v1/solve", body, "application/json")  # noqa: E731
    json_batch = lambda body: _http("POST", "/v1/solve/batch", body, "application/json")  # noqa: E731
    multi = lambda body, ct="multipart/form-data; boundary=XyZ": _http("POST", "/v1/solve", body, ct)  # noqa: E731
    requests = {
        # crafted JSON (issue item 1), and its relatives
        "json [ 100,000 deep": json_solve(b"[" * 100_000),
        "json 3,000-deep array beside an image": json_solve(
            f'{{"image": "{b64}", "x": {"[" * 3000}{"]" * 3000}}}'.encode()),
        "json 5,000-digit integer": json_solve(b'{"image": ' + b"7" * 5000 + b"}"),
        "json 5,000-digit float": json_solve(b'{"image": 0.' + b"7" * 5000 + b"}"),
        "json 5,000-digit integer in a batch": json_batch(b"[" + b"9" * 5000 + b"]"),
        "json { 50,000 deep": json_solve(b'{"a":' * 50_000),
        "json unterminated string": json_solve(b'{"image": "abc'),
        "json invalid utf-8": json_solve(b'{"image": "\xff\xfe\xfa"}'),
        "json null": json_solve(b"null"),
        "json number": json_solve(b"42"),
        "json string": json_solve(b'"hello"'),
        "json image null": json_solve(b'{"image": null}'),
        "json image number": json_solve(b'{"image": 123}'),
        "json image list": json_solve(b'{"image": []}'),
        "json image object": json_solve(b'{"image": {"a": 1}}'),
        "json image empty": json_solve(b'{"image": ""}'),
        "json empty data url": json_solve(b'{"image": "data:image/png;base64,"}'),
        "json padding only": json_solve(b'{"image": "=="}'),
        "json non-ascii base64": json_solve('{"image": "\u00fc\u00e9"}'.encode()),
        "json NaN and Infinity": json_solve(b'{"image": NaN, "x": Infinity}'),
        "json duplicate keys": json_solve(f'{{"image": 1, "image": "{b64[:-4]}"}}'.encode()),
        "json byte order mark": json_solve(b"\xef\xbb\xbf" + json.dumps({"image": b64}).encode()),
        "json random bytes": json_solve(base64.b64encode(np.random.default_rng(0).bytes(3000))),
        "json random image bytes": json_solve(json.dumps({"image": base64.b64encode(
            np.random.default_rng(1).bytes(5000)).decode()}).encode()),
        "json truncated png": json_solve(json.dumps({"image": base64.b64encode(good[:200]).decode()}).encode()),
        "json decompression bomb": json_solve(json.dumps({"image": base64.b64encode(
            _bomb_png(60_000, 60_000)).decode()}).encode()),
        "json huge dimensions": json_solve(json.dumps({"image": base64.b64encode(_bomb_png(5000, 5000)).decode()}).encode()),
        "json whitespace to the body limit": json_solve(b" " * (2 * 1024 * 1024 + 1)),
        "json vendor type": _http("POST", "/v1/solve", b'{"image": 5}', "application/vnd.x+json"),
        "batch empty list": json_batch(b"[]"),
        "batch of nulls": json_batch(b"[null, null]"),
        "batch of numbers": json_batch(b"[1, 2, 3]"),
        "batch images not a list": json_batch(b'{"images": "abc"}'),
        "batch nested lists": json_batch(b'{"images": [[["x"]]]}'),
        "batch of 65": json_batch(json.dumps([b64] * 65).encode()),
        "batch amplification, 64 solid 4096x4096 PNGs": json_batch(
            json.dumps([base64.b64encode(solid).decode()] * 64).encode()),
        "batch of 64 decompression bombs": json_batch(json.dumps(
            [base64.b64encode(_bomb_png(60_000, 60_000)).decode()] * 64).encode()),
        # multipart
        "multipart without boundary": multi(_multipart([("file", "a.png", good)]), "multipart/form-data"),
        "multipart garbage": multi(b"this is not multipart at all"),
        "multipart unterminated": multi(b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc'),
        "multipart 2,000 fields": multi(_multipart([(f"f{i}", None, b"x") for i in range(2000)])),
        "multipart file as text field": multi(_multipart([("file", None, b"abc")])),
        "multipart two files to /v1/solve": multi(_multipart([("file", "a.png", good), ("file", "b.png", good)])),
        "multipart empty file": multi(_multipart([("file", "a.png", b"")])),
        "multipart odd file name": multi(_multipart([("file", "=cmd|' /C calc'!A0\u00e9.png", good)])),
        "multipart part header 70 KB": multi(b"--XyZ\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\nx\r\n--XyZ--\r\n"),
        "multipart batch without files": _http("POST", "/v1/solve/batch", _multipart([("x", None, b"1")]),
                                               "multipart/form-data; boundary=XyZ"),
        # raw bodies
        "raw random bytes as image/png": _http("POST", "/v1/solve", np.random.default_rng(2).bytes(4000), "image/png"),
        "raw svg": _http("POST", "/v1/solve", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"),
        "raw empty body": _http("POST", "/v1/solve", b"", "image/png"),
        "raw 1x1 image": _http("POST", "/v1/solve", _png(Image.new("RGB", (1, 1))), "image/png"),
        "raw text/plain": _http("POST", "/v1/solve", b"hello", "text/plain"),
        "raw content type with nul": _http("POST", "/v1/solve", good, "image/png; x=\x01"),
        "no content type": _http("POST", "/v1/solve", good),
        # the HTTP layer
        "garbage request line": b"GARBAGE\r\n\r\n",
        "binary noise": np.random.default_rng(3).bytes(2000),
        "unknown method": _http("BREW", "/v1/solve"),
        "http/0.9 request": b"GET /\r\n\r\n",
        "request line 60 KB": _http("GET", "/" + "a" * 60_000),
        "headers 100 KB": b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        "10,000 headers": b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 10_000 + b"\r\n",
        "negative content-length": b"POST /v1/solve HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        "non-numeric content-length": b"POST /v1/solve HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        "content-length and chunked": b"POST /v1/solve HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                                      b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "bad chunk size": b"POST /v1/solve HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\nZZ\r\nabc\r\n0\r\n\r\n",
        "chunked body over the limit": b"POST /v1/solve HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                                       b"Transfer-Encoding: chunked\r\n\r\n"
                                       + (b"100000\r\n" + b"a" * 0x100000 + b"\r\n") * 3 + b"0\r\n\r\n",
        "declared 100 GB": b"POST /v1/solve HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                           b"Content-Length: 99999999999\r\n\r\n",
        "expect 100-continue, too large": b"POST /v1/solve HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                                          b"Content-Type: image/png\r\nContent-Length: 50000000\r\n\r\n",
        "path traversal": _http("GET", "/../../etc/passwd"),
        "path traversal in docs assets": _http("GET", "/docs/assets/..%2f..%2f..%2fetc%2fpasswd"),
        "invalid percent encoding": _http("GET", "/%ZZ%"),
        "nul in path": _http("POST", "/v1/solve%00", good, "image/png"),
        "10,000 query parameters": _http("GET", "/health?" + "&".join(f"a{i}=b" for i in range(10_000))),
        "options": _http("OPTIONS", "/v1/solve"),
        "post to /health": _http("POST", "/health", b"x", "text/plain"),
        "get /v1/solve": _http("GET", "/v1/solve"),
        "websocket upgrade": b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                             b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        "h2c upgrade": b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                       b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        "http/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        "pipelined with garbage": _http("GET", "/health").replace(b"Connection: close", b"X: y") + b"NONSENSE\r\n\r\n",
        "header without colon": b"GET /health HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n",
        "control characters in header": b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: \x00\x01\x02\r\n\r\n",
        "api key header 60 KB": _http("GET", "/v1/model", extra="X-API-Key: " + "k" * 60_000 + "\r\n"),
    }
    return requests


def _check_answer(name: str, status: int | None, headers: dict, body: bytes) -> None:
    assert status is not None, f"{name}: the connection closed without an answer"
    assert status < 500 or status == 503, f"{name}: answered {status}: {body[:300]!r}"
    if status >= 400:
        assert headers.get("content-type", "").startswith("application/json"), f"{name}: {status} is not JSON: {body[:200]!r}"
        detail = json.loads(body)["detail"]
        assert detail, name


def test_hostile_requests_get_json_4xx_and_the_server_keeps_answering(hostile_server):
    url, port, log_path = hostile_server
    requests = hostile_requests()
    assert len(requests) >= 60
    statuses = {}
    for name, request in requests.items():
        start = time.perf_counter()
        status, headers, body = exchange(port, request)
        _check_answer(name, status, headers, body)
        statuses[name] = status
        # None waits for a timeout here except the ones that are meant to: the body deadline.
        assert time.perf_counter() - start < BODY_TIMEOUT + 3, f"{name} took {time.perf_counter() - start:.1f} s"
    expected = {"json [ 100,000 deep": 400, "json 3,000-deep array beside an image": 400, "json 5,000-digit integer": 400,
                "batch amplification, 64 solid 4096x4096 PNGs": 413, "headers 100 KB": 431,
                "raw 1x1 image": 200, "declared 100 GB": 413}
    assert {name: statuses[name] for name in expected} == expected
    assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok"
    log = log_path.read_text()
    assert "Traceback" not in log and "Internal Server Error" not in log, log[-3000:]


def test_amplification_batch_is_refused_before_decoding(hostile_server):
    """64 copies of a 22 KB PNG that decodes to 4096x4096: 8 s of decoding before; refused from the headers now."""
    url, _, _ = hostile_server
    solid = base64.b64encode(_png(Image.new("L", (4096, 4096), 255), optimize=True)).decode()
    start = time.perf_counter()
    response = httpx.post(f"{url}/v1/solve/batch", json=[solid] * 64, timeout=30)
    assert response.status_code == 413, response.text
    assert "pixels in all" in response.json()["detail"]
    assert time.perf_counter() - start < 1.0


def test_unsure_readings_are_flagged(hostile_server):
    url, _, _ = hostile_server
    body = httpx.post(f"{url}/v1/solve", content=_png(Image.new("RGB", (1, 1))),
                      headers={"Content-Type": "image/png"}, timeout=30).json()
    assert body["unsure"] == (None if len(body["text"]) == 5 else body["unsure"])
    if len(body["text"]) != 5:
        assert "empty reading" in body["unsure"] or "outside the model's 5" in body["unsure"]
    good = httpx.post(f"{url}/v1/solve", content=captcha_pngs(1, min_length=5)[0][1],
                      headers={"Content-Type": "image/png"}, timeout=30).json()
    assert (good["unsure"] is None) == (len(good["text"]) == 5)


def test_head_health_and_offline_docs(hostile_server):
    url, port, _ = hostile_server
    status, headers, body = exchange(port, b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 200 and body == b""
    page = httpx.get(f"{url}/docs", timeout=10).text
    assets = [part.split('"')[0] for part in page.split('src="')[1:]] + \
             [part.split('"')[0] for part in page.split('href="')[1:]]
    assert assets and all(a.startswith("/docs/assets/") for a in assets), assets  # nothing from a CDN
    for asset in assets:
        assert httpx.get(f"{url}{asset}", timeout=10).status_code == 200, asset
    assert "SwaggerUIBundle" in httpx.get(f"{url}/docs/assets/swagger-ui-bundle.js", timeout=10).text


def test_slow_and_idle_connections_are_closed_within_the_timeout(hostile_server):
    """200 clients that send part of their headers and then nothing: beyond the connection cap others get
    503 meanwhile; every one is closed within the header timeout; then the server answers again."""
    url, port, _ = hostile_server
    partial = b"POST /v1/solve HTTP/1.1\r\nHost: x\r\nContent-Type: ima"
    sockets = []
    start = time.monotonic()
    for i in range(200):
        sock = socket.create_connection(("127.0.0.1", port), timeout=HEADER_TIMEOUT + 5)
        if i % 2:
            sock.sendall(partial)  # the other half connect and say nothing at all
        sockets.append(sock)
    busy = httpx.get(f"{url}/health", timeout=5)
    assert busy.status_code == 503 and "limit of open connections" in busy.json()["detail"]

    def closed_after(sock: socket.socket) -> float:
        try:
            while sock.recv(4096):
                pass
        except (ConnectionResetError, socket.timeout):
            pass
        sock.close()
        return time.monotonic() - start

    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        closed = list(pool.map(closed_after, sockets))
    assert max(closed) < HEADER_TIMEOUT + 2.0, f"slowest closed after {max(closed):.1f} s"
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200


def test_a_slow_body_gets_408_within_the_body_timeout(hostile_server):
    _, port, _ = hostile_server
    start = time.perf_counter()
    status, headers, body = exchange(port, b"POST /v1/solve HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                                           b"Content-Length: 1000\r\n\r\n" + b"x" * 10)
    assert status == 408 and "within 2 s" in json.loads(body)["detail"]
    assert time.perf_counter() - start < BODY_TIMEOUT + 1.5
