"""Several server processes (``workers=N``) on one port: each answers, and all stop together."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import pytest

from captcha_lit.deploy import workers as workers_module
from captcha_lit.deploy.runtime import Solver
from captcha_lit.deploy.workers import AppSpec, _listening_sockets, resolve_workers
from captcha_lit.utils import available_cores
from conftest import FIXTURES, PYTHON, REPO_ROOT, cli_env, free_port
from test_deploy import captcha_pngs

COMPAT_ONNX = FIXTURES / "compat_640dca3" / "crnn.onnx"  # a small committed model


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is gone for our purpose.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _start(onnx, workers: int, cache_dir, tmp_path) -> tuple[subprocess.Popen, str, object]:
    """``python -m captcha_lit.serve`` with ``workers`` processes: (process, url, log path)."""
    port = free_port()
    cmd = [PYTHON, "-m", "captcha_lit.serve", f"model_path={onnx}", f"port={port}", f"workers={workers}",
           "access_log=false", f"hydra.run.dir={tmp_path}"]
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=cli_env(cache_dir), stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}", log_path


def test_two_workers_share_the_port_answer_alike_and_stop_together(exported_models, cache_dir, tmp_path):
    onnx = exported_models["crnn"]["onnx"]
    proc, url, log_path = _start(onnx, 2, cache_dir, tmp_path)
    pids: set[int] = set()
    try:
        deadline = time.time() + 120
        # Each fresh connection lands on one of the two sockets; keep asking until both answered.
        while len(pids) < 2:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            assert time.time() < deadline, f"not both workers answered ({pids}):\n{log_path.read_text()[-3000:]}"
            try:
                pids.add(httpx.get(f"{url}/health", timeout=2).json()["pid"])
            except httpx.HTTPError:
                time.sleep(0.2)
        assert proc.pid not in pids  # the parent only supervises
        pngs = [data for _, data in captcha_pngs(6)]
        expected = [Solver(onnx).solve(data).text for data in pngs]
        for data, text in zip(pngs, expected):
            with httpx.Client(base_url=url, timeout=60) as fresh:  # new connection, either worker
                body = fresh.post("/v1/solve", files={"file": ("c.png", data, "image/png")}).json()
            assert body["text"] == text
        with httpx.Client(base_url=url, timeout=60) as fresh:
            bad = fresh.post("/v1/solve", content=b"not an image", headers={"Content-Type": "image/png"})
        assert bad.status_code == 422 and "not a recognized image format" in bad.json()["detail"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    deadline = time.time() + 10
    while any(_alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids), "a worker outlived the server"


def test_one_worker_serves_from_the_main_process(exported_models, cache_dir, tmp_path):
    onnx = exported_models["crnn"]["onnx"]
    proc, url, log_path = _start(onnx, 1, cache_dir, tmp_path)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            assert time.time() < deadline, f"server did not start:\n{log_path.read_text()[-3000:]}"
            try:
                health = httpx.get(f"{url}/health", timeout=2).json()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert health["pid"] == proc.pid
        _, data = captcha_pngs(1)[0]
        body = httpx.post(f"{url}/v1/solve", files={"file": ("c.png", data, "image/png")}, timeout=60).json()
        assert body["text"] == Solver(onnx).solve(data).text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("value", [0, -2, "two", "1.5"])
def test_a_bad_worker_count_is_named(value):
    with pytest.raises(ValueError, match=r"workers=.*whole number of server processes >= 1, or auto"):
        resolve_workers(value)


def test_worker_counts():
    assert resolve_workers(3) == 3
    assert resolve_workers("2") == 2
    assert resolve_workers("auto") == available_cores()


def test_workers_refuse_a_port_another_server_listens_on():
    import socket

    for reuse_port in (False, True):  # a plain server, and one (like ours) that allows SO_REUSEPORT
        with socket.socket() as other:
            if reuse_port:
                other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            other.bind(("127.0.0.1", 0))
            other.listen()
            port = other.getsockname()[1]
            with pytest.raises(ValueError, match=rf"cannot listen on 127.0.0.1:{port}: .*choose another port="):
                _listening_sockets("127.0.0.1", port, 2)


def test_workers_share_one_free_port():
    sockets = _listening_sockets("127.0.0.1", 0, 3)
    try:
        assert len({sock.getsockname()[1] for sock in sockets}) == 1
    finally:
        for sock in sockets:
            sock.close()


def test_without_so_reuseport_uvicorns_workers_build_the_same_app(monkeypatch):
    """Where the platform lacks SO_REUSEPORT, uvicorn starts its own workers from an import string."""
    import asyncio
    import socket

    import uvicorn
    from uvicorn.importer import import_from_string

    monkeypatch.delattr(socket, "SO_REUSEPORT", raising=False)
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.update(app=app, **kwargs))
    monkeypatch.setenv(workers_module.WORKER_ENV, "")  # restored afterwards; run_workers sets it
    monkeypatch.setattr(workers_module, "freeze_startup_objects", lambda: None)  # pytest's objects stay collectable
    spec = AppSpec(onnx=str(COMPAT_ONNX), threads=1, max_pixels=1 << 20, spinning=False, max_body_bytes=1 << 20,
                   max_batch=4, micro_batch=8)
    workers_module.run_workers(spec, {"host": "127.0.0.1", "port": 0}, 3)
    assert started["workers"] == 3 and started["factory"] is True
    app = import_from_string(started["app"])()  # what each uvicorn worker runs
    _, data = captcha_pngs(1)[0]

    async def ask():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://worker") as client:
            model = (await client.get("/v1/model")).json()
            solved = (await client.post("/v1/solve", files={"file": ("c.png", data, "image/png")})).json()
        return model, solved

    model, solved = asyncio.run(ask())
    assert model["max_batch"] == 4
    assert solved["text"] == Solver(COMPAT_ONNX).solve(data).text


def test_a_server_process_exempts_its_startup_objects_from_full_collections():
    """A full garbage collection walks every tracked object and stalls the requests in flight;
    the app, model and modules a server process loads at startup are exempted from it."""
    import json

    script = f"""
import gc, json
from captcha_lit.deploy.workers import AppSpec
AppSpec(onnx={str(COMPAT_ONNX)!r}, threads=1, max_pixels=1 << 20, spinning=False, max_body_bytes=1 << 20, max_batch=4,
        micro_batch=8).app()
print(json.dumps({{"frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects())}}))
"""
    done = subprocess.run([PYTHON, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["frozen"] > 20_000, counts  # FastAPI, pydantic, onnxruntime's bindings: tens of thousands
    assert counts["tracked"] < counts["frozen"] / 10, counts
