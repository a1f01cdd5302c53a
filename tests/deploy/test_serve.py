"""The HTTP service: a real uvicorn server in a subprocess, started from a checkpoint, hit with httpx."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from captcha_lit import __version__
from captcha_lit.deploy.runtime import Solver
from conftest import serving
from test_deploy import captcha_pngs

API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(tiny_checkpoints, tmp_path_factory, cache_dir):
    """``python -m captcha_lit.serve`` on the crnn checkpoint (exported to ONNX at startup), API key on."""
    with serving([f"model_path={tiny_checkpoints['crnn']}", "parity_images=8"], tmp_path_factory.mktemp("serve"),
                 cache_dir, env={"CAPTCHA_LIT_API_KEY": API_KEY}) as (url, _, _):
        yield url


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, headers={"X-API-Key": API_KEY}, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    return [data for _, data in captcha_pngs(4, min_length=5)]


def _upload(data: bytes, name: str = "captcha.png") -> dict:
    return {"files": {"file": (name, data, "image/png")}}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels: a decompression bomb."""
    png = _encode(Image.new("L", (8, 8)))
    ihdr = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]


def test_solve_matches_the_exported_model(client, exported_models, pngs):
    """The server started from a .ckpt answers like the .onnx that captcha_lit.export wrote."""
    solver = Solver(exported_models["crnn"]["onnx"])
    expected = [solver.solve(data) for data in pngs]
    for data, want in zip(pngs, expected):
        for request in (_upload(data), {"json": {"image": _b64(data)}},
                        {"content": data, "headers": {"Content-Type": "image/png"}}):
            response = client.post("/v1/solve", **request)
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["text"] == want.text
            assert body["confidence"] == pytest.approx(want.confidence, rel=1e-4)
            assert body["char_confidences"] == pytest.approx(want.char_confidences, rel=1e-4)
            assert body["model_id"].startswith("crnn-") and body["latency_ms"] > 0


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "I;16", "LA", "CMYK-jpeg"])
def test_image_modes_simply_work(client, pngs, mode):
    image = Image.open(io.BytesIO(pngs[0]))
    if mode == "I;16":
        data = _encode(Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257))
    elif mode == "CMYK-jpeg":
        data = _encode(image.convert("CMYK"), "JPEG")
    else:
        data = _encode(image.convert(mode))
    response = client.post("/v1/solve", **_upload(data))
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["text"], str)


BAD_REQUESTS = {
    # name: (request, status, fragment of the error message)
    "empty body": (lambda png: {}, 400, "empty request body"),
    "empty file": (lambda png: _upload(b""), 422, "empty"),
    "not an image": (lambda png: _upload(b"GIF89a? no, just text"), 422, "not a recognized image format"),
    "truncated png": (lambda png: _upload(png[: len(png) // 2]), 422, "truncated"),
    "huge dimensions": (lambda png: _upload(_bomb_png(5_000, 4_000)), 422, "5000x4000 pixels exceeds the limit"),
    "decompression bomb": (lambda png: _upload(_bomb_png(50_000, 50_000)), 422, "decompression bomb"),
    "body too large": (lambda png: _upload(b"\x89PNG" + bytes(3 * 2**20)), 413, "exceeds the limit of 2097152 bytes"),
    "wrong content type": (lambda png: {"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415,
                           "unsupported Content-Type 'text/plain'"),
    "bad base64": (lambda png: {"json": {"image": "not*base64!"}}, 400, "not valid base64"),
    "bad json": (lambda png: {"content": b"{oops", "headers": {"Content-Type": "application/json"}}, 400,
                 "not valid JSON"),
    "json without image": (lambda png: {"json": {"picture": _b64(png)}}, 400, "no 'image' key"),
    "multipart without file": (lambda png: {"files": {"upload": ("a.png", png, "image/png")}}, 400,
                               "no 'file' field"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_a_4xx_and_the_server_keeps_serving(client, pngs, case):
    build, status, fragment = BAD_REQUESTS[case]
    response = client.post("/v1/solve", **build(pngs[0]))
    assert response.status_code == status, response.text
    assert fragment in response.json()["detail"]
    follow_up = client.post("/v1/solve", **_upload(pngs[1]))
    assert follow_up.status_code == 200, follow_up.text


def test_batch(client, exported_models, pngs):
    expected = [s.text for s in Solver(exported_models["crnn"]["onnx"]).solve_batch(pngs)]
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(pngs)]
    files.insert(2, ("files", ("bad.png", b"garbage", "image/png")))
    response = client.post("/v1/solve/batch", files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(pngs) + 1
    assert "bad.png" in results[2]["error"] and "text" not in results[2]
    assert [r["text"] for i, r in enumerate(results) if i != 2] == expected
    for payload in ([_b64(d) for d in pngs], {"images": [_b64(d) for d in pngs]}):
        response = client.post("/v1/solve/batch", json=payload)
        assert response.status_code == 200, response.text
        assert [r["text"] for r in response.json()["results"]] == expected
    too_many = client.post("/v1/solve/batch", json=[_b64(pngs[0])] * 65)
    assert too_many.status_code == 413 and "limit of 64" in too_many.json()["detail"]
    assert client.post("/v1/solve/batch", json=[]).status_code == 400


def test_api_key_is_enforced(server, pngs):
    with httpx.Client(base_url=server, timeout=60) as anonymous:
        assert anonymous.get("/health").json()["status"] == "ok"
        assert anonymous.get("/docs").status_code == 200
        for headers in ({}, {"X-API-Key": "wrong"}):
            for response in (anonymous.post("/v1/solve", headers=headers, **_upload(pngs[0])),
                             anonymous.get("/v1/model", headers=headers)):
                assert response.status_code == 401
                assert "API key" in response.json()["detail"]
        assert anonymous.post("/v1/solve", headers={"X-API-Key": API_KEY}, **_upload(pngs[0])).status_code == 200


def test_model_info_and_docs(client):
    info = client.get("/v1/model").json()
    assert info["charset"] == "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    assert (info["min_length"], info["max_length"]) == (5, 5)
    assert info["input_size"] == [32, 96] and info["decoder"] == "ctc"
    assert info["version"] == __version__
    assert "swagger" in client.get("/docs").text.lower()
    spec = client.get("/openapi.json").json()
    assert {"/v1/solve", "/v1/solve/batch", "/v1/model", "/health"} <= set(spec["paths"])
    body = spec["paths"]["/v1/solve"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "application/json" in body


def test_concurrent_requests_each_get_their_own_answer(server, exported_models, pngs):
    """Requests that arrive together share model calls; each must still get its own image's answer,
    and a bad image among them fails alone."""
    import concurrent.futures

    solver = Solver(exported_models["crnn"]["onnx"])
    expected = [solver.solve(data).text for data in pngs]
    jobs = [i % len(pngs) for i in range(24)]

    def post(index: int) -> tuple[int, int, dict]:
        with httpx.Client(base_url=server, headers={"X-API-Key": API_KEY}, timeout=60) as http:
            data = pngs[index] if index >= 0 else b"not an image"
            response = http.post("/v1/solve", **_upload(data))
            return index, response.status_code, response.json()

    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(post, jobs[:12] + [-1] + jobs[12:]))
    for index, status, body in answers:
        if index < 0:
            assert status == 422 and "not a recognized image format" in body["detail"]
        else:
            assert status == 200, body
            assert body["text"] == expected[index]
