"""Load under attack: legitimate ``POST /v1/solve`` clients while attackers send the amplification
batch (64 base64 copies of a PNG that decodes to 4096x4096, 1.4 MB, under the body and per-image
limits), then slow clients that send part of their headers and stop.

Targets: legitimate p99 <= 200 ms with 0 errors, server RSS growth <= 10%, and every slow
connection closed within the server's header timeout.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import tempfile
import time
from pathlib import Path

from captcha_lit.bench.common import percentile, process_tree_rss
from captcha_lit.bench.http_load import _http_clients, _multipart_request, captcha_png, running_server

HEADER_TIMEOUT_S = 10  # conf/serve.yaml's header_timeout, given explicitly so the figure says what it was measured at


def amplification_request(port: int, copies: int = 64) -> bytes:
    """POST /v1/solve/batch with ``copies`` base64 copies of a solid 4096x4096 PNG (about 22 KB each)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (4096, 4096), 255).save(buffer, format="PNG", optimize=True)
    body = json.dumps([base64.b64encode(buffer.getvalue()).decode()] * copies).encode()
    head = (f"POST /v1/solve/batch HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: keep-alive\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _attackers(port: int, request: bytes, seconds: float, count: int) -> dict:
    """``count`` connections sending ``request`` back to back; their answers' status codes and times."""
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def attacker() -> None:
        reader = writer = None
        while time.perf_counter() < stop_at:
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                sent_at = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                latencies.append((time.perf_counter() - sent_at) * 1e3)
                status = head.split(b" ", 2)[1].decode()
                statuses[status] = statuses.get(status, 0) + 1
                if b"connection: close" in head.lower():
                    writer.close()
                    writer = None
            except (OSError, asyncio.IncompleteReadError):
                statuses["dropped"] = statuses.get("dropped", 0) + 1
                writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(attacker() for _ in range(count)))
    return {"statuses": statuses, "requests": len(latencies), "p50_ms": percentile(latencies, 50)}


async def _under_attack(port: int, legit: list[bytes], attack: bytes, seconds: float, clients: int,
                        attackers: int) -> tuple:
    return await asyncio.gather(_http_clients(port, legit, seconds, clients),
                                _attackers(port, attack, seconds, attackers))


def slow_connections(port: int, count: int, timeout_s: float) -> dict:
    """``count`` connections that send part of a request's headers and then nothing: how long until the
    server closes each (seconds from when the last one was opened)."""
    partial = b"POST /v1/solve HTTP/1.1\r\nHost: x\r\nContent-Type: ima"
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s + 30)
        sock.sendall(partial)
        sock.setblocking(False)
        sockets.append(sock)
    opened = time.monotonic()
    closed_after: list[float] = []
    pending = list(sockets)
    while pending and time.monotonic() - opened < timeout_s + 30:
        still = []
        for sock in pending:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                still.append(sock)
                continue
            except OSError:
                data = b""
            if data and not data.startswith(b"HTTP/"):
                still.append(sock)
                continue
            try:  # an answer (408) is followed by the close
                sock.setblocking(True)
                while sock.recv(65536):
                    pass
            except OSError:
                pass
            closed_after.append(time.monotonic() - opened)
            sock.close()
        pending = still
        time.sleep(0.05)
    for sock in pending:
        sock.close()
    return {"connections": count, "closed": len(closed_after), "still_open": len(pending),
            "max_close_s": round(max(closed_after), 2) if closed_after else None, "header_timeout_s": timeout_s}


def bench_hostile_load(seconds: float = 30.0, clients: int = 16, attackers: int = 4, slow: int = 200) -> dict:
    """The default model (freshly initialized) exported to ONNX, served as it ships, under attack."""
    import httpx

    from captcha_lit.bench.common import compose
    from captcha_lit.deploy.export import export_onnx
    from captcha_lit.training.builders import build_module

    module = build_module(compose([])).eval()
    with tempfile.TemporaryDirectory(prefix="captcha_lit_bench_hostile_") as tmp:
        work_dir = Path(tmp)
        model_path = work_dir / "model.onnx"
        export_onnx(module, {"hyper_parameters": dict(module.hparams)}, model_path, parity_images=16)
        try:
            with running_server(model_path, work_dir, [f"header_timeout={HEADER_TIMEOUT_S}"]) as (server, port):
                legit = [_multipart_request(port, captcha_png(i)) for i in range(16)]
                attack = amplification_request(port)
                # Warm every path, the attack's too: the growth measured is what 30 s more of it adds.
                asyncio.run(_under_attack(port, legit, attack, 3.0, clients, attackers))
                rss_before = process_tree_rss(server.pid)
                (latencies, errors, elapsed), attacked = asyncio.run(
                    _under_attack(port, legit, attack, seconds, clients, attackers))
                rss_after = process_tree_rss(server.pid)
                slowed = slow_connections(port, slow, HEADER_TIMEOUT_S)
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code
        except RuntimeError as exc:  # the server did not start
            return {"error": str(exc)}
    return {"seconds": round(elapsed, 1), "clients": clients, "attackers": attackers, "requests": len(latencies),
            "errors": len(errors), "first_error": errors[0] if errors else None,
            "req_s": round(len(latencies) / elapsed, 1), "p50_ms": round(percentile(latencies, 50), 2),
            "p99_ms": round(percentile(latencies, 99), 2), "attack": attacked,
            "server_rss_before_mb": round(rss_before / 2**20, 1), "server_rss_after_mb": round(rss_after / 2**20, 1),
            "rss_growth_pct": round(100 * (rss_after - rss_before) / rss_before, 2),
            "slow": slowed, "health_after": health}
