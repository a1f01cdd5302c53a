"""Several server processes on one port, and the supervisor that starts and stops them.

One Python process cannot use much more than one core for HTTP parsing and image decoding
(the GIL), so ``workers=N`` runs N processes. Each listens on its own SO_REUSEPORT socket
and opens its own onnxruntime session on the same .onnx file. Where the platform has no
SO_REUSEPORT, uvicorn's own worker processes share one socket instead.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import FastAPI

from captcha_lit.deploy.app import RequestLimits, api_key_from_env, create_app
from captcha_lit.deploy.memory import freeze_startup_objects, return_freed_memory
from captcha_lit.deploy.protocol import ConnectionLimits, guarded_protocol
from captcha_lit.deploy.runtime import Solver
from captcha_lit.utils import available_cores

WORKER_ENV = "CAPTCHA_LIT_SERVE_WORKER"  # the AppSpec, as JSON, for uvicorn's worker processes


@dataclass(frozen=True)
class AppSpec:
    """Everything a server process needs to build its app; plain values, since it crosses
    into processes (pickled for ours, JSON in ``WORKER_ENV`` for uvicorn's)."""

    onnx: str
    threads: int | None  # onnxruntime intra-op threads; None: every core this process may use
    max_pixels: int
    spinning: bool
    max_body_bytes: int
    max_batch: int
    micro_batch: int
    max_request_pixels: int = RequestLimits.max_request_pixels
    body_timeout: float = RequestLimits.body_timeout
    request_timeout: float = RequestLimits.request_timeout
    header_timeout: float = ConnectionLimits.header_timeout
    max_connections: int = ConnectionLimits.max_connections
    min_confidence: float | None = None

    def solver(self) -> Solver:
        return Solver(self.onnx, threads=self.threads, max_pixels=self.max_pixels, spinning=self.spinning,
                      min_confidence=self.min_confidence)

    def app(self, solver: Solver | None = None) -> FastAPI:
        """The app around ``solver``, or around a session of its own on ``onnx``."""
        return_freed_memory()
        limits = RequestLimits(max_body_bytes=self.max_body_bytes, max_batch=self.max_batch,
                               max_request_pixels=self.max_request_pixels, body_timeout=self.body_timeout,
                               request_timeout=self.request_timeout)
        app = create_app(solver or self.solver(), api_key=api_key_from_env(), micro_batch=self.micro_batch,
                         limits=limits)
        freeze_startup_objects()
        return app

    def http(self):
        """uvicorn's ``http=``: connections with a header deadline and a cap per process."""
        return guarded_protocol(ConnectionLimits(header_timeout=self.header_timeout,
                                                 max_connections=self.max_connections))


def resolve_workers(value: Any) -> int:
    """``workers``: a positive count, or ``auto`` for one server process per core."""
    if value is None or str(value).lower() == "auto":
        return available_cores()
    try:
        workers = int(value)
    except (TypeError, ValueError):
        workers = 0
    if workers < 1 or str(workers) != str(value).strip():
        raise ValueError(f"workers={value!r}: give a whole number of server processes >= 1, or auto")
    return workers


def worker_app() -> FastAPI:
    """uvicorn's app factory for its own worker processes (platforms without SO_REUSEPORT)."""
    return AppSpec(**json.loads(os.environ[WORKER_ENV])).app()


def run_workers(spec: AppSpec, run: dict, workers: int) -> None:
    """Serve ``spec``'s app from ``workers`` processes on ``run["host"]:run["port"]``;
    ``run`` holds the rest of uvicorn's settings."""
    if hasattr(socket, "SO_REUSEPORT"):
        _supervise(spec, run, workers)
        return
    import uvicorn

    os.environ[WORKER_ENV] = json.dumps(asdict(spec))
    uvicorn.run(f"{worker_app.__module__}:{worker_app.__name__}", factory=True, workers=workers, http=spec.http(),
                **run)


def _run_worker(spec: AppSpec, run: dict, sock: socket.socket) -> None:
    """One server process on its own SO_REUSEPORT socket."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(spec.app(), http=spec.http(), **run)).run(sockets=[sock])


def check_address(host: str, port: int) -> int:
    """The port to listen on (``port=0`` picks a free one); a port out of range, or one that
    something already listens on, is refused before any model loads."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port={port} is out of range: use 1-65535 (0 picks a free port)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another port= or host=") from None
        return probe.getsockname()[1]


def _listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` sockets bound to the same address with SO_REUSEPORT: the kernel spreads new
    connections over them, so each worker gets its share (a single shared socket lets one
    idle worker accept a burst of keep-alive connections and keep them)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # SO_REUSEPORT would also let these sockets join another server that listens on the port
    # with SO_REUSEPORT (a second captcha_lit.serve, say) and take half of its connections.
    # A plain bind first fails on any port that something already listens on.
    port = check_address(host, port)
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
                raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another port=") from None
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _supervise(spec: AppSpec, run: dict, workers: int) -> None:
    """Run ``workers`` server processes and stop them all when one exits or on SIGINT/SIGTERM."""
    run = dict(run)
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
