"""Load on the real HTTP server: latency percentiles, requests per second and server memory
under concurrent ``POST /v1/solve`` from a closed-loop client."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from captcha_lit.bench.common import ROOT, median, percentile, process_tree_rss

# The server as it ships (one worker process per core), the same in one process, and a baseline
# of one process without micro-batching (one model call per request, spinning onnxruntime
# threads: the first release's behaviour), measured in the same run.
HTTP_CONFIGS = {"default": [], "one_worker": ["workers=1"],
                "baseline_no_micro_batching": ["workers=1", "micro_batch=1", "spinning=true"]}


def captcha_png(index: int) -> bytes:
    """One generated CAPTCHA at its canvas size, PNG-encoded like an upload."""
    import io

    from PIL import Image

    from captcha_lit.data.synthetic import CaptchaGenerator, GeneratorSpec

    _, array = CaptchaGenerator(GeneratorSpec()).sample("bench", "onnx", index)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _multipart_request(port: int, png: bytes) -> bytes:
    """A complete HTTP/1.1 keep-alive POST /v1/solve with ``png`` in the multipart field ``file``."""
    boundary = "captcha-lit-bench-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/solve HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: keep-alive\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _http_clients(port: int, requests: list[bytes], seconds: float, clients: int):
    """A lean closed-loop load generator: ``clients`` keep-alive connections on one event loop,
    each sending prebuilt requests back to back. It spends a few tens of microseconds per
    request, so on a small machine the server, not the client, is what gets measured."""
    import asyncio

    latencies: list[float] = []
    errors: list[str] = []
    stop_at = time.perf_counter() + seconds

    async def client(client_index: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request_index = client_index
        try:
            while time.perf_counter() < stop_at:
                sent_at = time.perf_counter()
                writer.write(requests[request_index % len(requests)])
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                latencies.append((time.perf_counter() - sent_at) * 1e3)
                if not head.startswith(b"HTTP/1.1 200"):
                    errors.append(head.split(b"\r\n", 1)[0].decode() + " " + body[:200].decode(errors="replace"))
                request_index += 1
        except (OSError, asyncio.IncompleteReadError) as exc:
            errors.append(f"client {client_index}: {exc!r}")
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(client_index) for client_index in range(clients)))
    return latencies, errors, time.perf_counter() - started


@contextlib.contextmanager
def running_server(model_path: Path, work_dir: Path, extra: list[str] = ()) -> Iterator[tuple[subprocess.Popen, int]]:
    """The real server (``python -m captcha_lit.serve``) in a subprocess, answering: (process, port).
    Raises RuntimeError if it does not start."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "captcha_lit.serve", f"model_path={model_path}", f"port={port}",
           "access_log=false", "log_level=warning", f"hydra.run.dir={work_dir / 'serve'}", *extra]
    env = {name: value for name, value in os.environ.items() if name != "CAPTCHA_LIT_API_KEY"}
    url = f"http://127.0.0.1:{port}"
    with open(work_dir / "serve.log", "w") as log_file:
        server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"server exited with code {server.returncode}; see {work_dir / 'serve.log'}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("server did not start within 120 s")
            time.sleep(0.2)
        yield server, port
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()


def http_load(model_path: Path, seconds: float, clients: int, work_dir: Path, extra: list[str] = ()) -> dict:
    """Start the real server in a subprocess and keep ``clients`` concurrent POST /v1/solve going."""
    import asyncio

    import httpx

    try:
        with running_server(model_path, work_dir, extra) as (server, port):
            pngs = [captcha_png(i) for i in range(16)]
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as warm:
                for png in pngs:
                    response = warm.post("/v1/solve", files={"file": ("c.png", png, "image/png")})
                    response.raise_for_status()
                    if not response.json().get("text"):
                        return {"error": f"warm-up answer has no text: {response.text[:200]}"}
            requests = [_multipart_request(port, png) for png in pngs]
            asyncio.run(_http_clients(port, requests, 2.0, clients))  # warm every connection path
            rss_before = process_tree_rss(server.pid)  # every worker process
            latencies, errors, elapsed = asyncio.run(_http_clients(port, requests, seconds, clients))
            rss_after = process_tree_rss(server.pid)
    except RuntimeError as exc:
        return {"error": str(exc)}
    return {"seconds": round(elapsed, 1), "clients": clients, "requests": len(latencies), "errors": len(errors),
            "first_error": errors[0] if errors else None,
            "req_s": round(len(latencies) / elapsed, 1), "p50_ms": round(percentile(latencies, 50), 2),
            "p99_ms": round(percentile(latencies, 99), 2), "server_rss_before_mb": round(rss_before / 2**20, 1),
            "server_rss_after_mb": round(rss_after / 2**20, 1), "server_options": list(extra)}


def http_compare(model_path: Path, seconds: float, clients: int, work_dir: Path, repeats: int) -> dict:
    """Every server setup of HTTP_CONFIGS, ``repeats`` load tests each, and their medians."""
    compared = {}
    for name, extra in HTTP_CONFIGS.items():
        runs = [http_load(model_path, seconds, clients, work_dir, extra) for _ in range(max(1, repeats))]
        ok = [run for run in runs if "error" not in run]
        if not ok:
            compared[name] = runs[0]
            continue
        compared[name] = {"runs": runs, "clients": clients, "seconds": seconds, "repeats": len(ok),
                          "errors": sum(run["errors"] for run in ok), "requests": sum(run["requests"] for run in ok),
                          "first_error": next((run["first_error"] for run in ok if run["first_error"]), None),
                          **{key: median([run[key] for run in ok]) for key in ("p50_ms", "p99_ms", "req_s")},
                          "server_rss_before_mb": ok[0]["server_rss_before_mb"],
                          "server_rss_after_mb": ok[-1]["server_rss_after_mb"], "server_options": extra}
    return compared
