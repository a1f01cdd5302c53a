"""Serve a model over HTTP with FastAPI on uvicorn.

    python -m captcha_lit.serve model_path=model.onnx port=8000
    python -m captcha_lit.serve model_path=outputs/train/runs/<time>/checkpoints/last.ckpt

A .ckpt is exported to ONNX (and parity-checked) at startup, so a checkpoint and its
exported model answer identically; inference runs on ``captcha_lit.deploy.runtime``.

    curl -F file=@captcha.png http://127.0.0.1:8000/v1/solve
    curl -H 'Content-Type: application/json' -d '{"image": "<base64>"}' http://127.0.0.1:8000/v1/solve

The endpoints are ``captcha_lit.deploy.app``'s. ``workers=auto`` (the default) runs one
server process per core on the port (``captcha_lit.deploy.workers``); ``workers=1`` serves
from this process alone. Set CAPTCHA_LIT_API_KEY to require that key in the X-API-Key
header of every /v1 request.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from captcha_lit.decoding import check_min_confidence
from captcha_lit.deploy.app import api_key_from_env
from captcha_lit.deploy.workers import AppSpec, check_address, resolve_workers, run_workers
from captcha_lit.preprocess import MAX_IMAGE_PIXELS
from captcha_lit.utils import check_model_path

log = logging.getLogger(__name__)


def onnx_model(model_path: str, out_dir: str | os.PathLike, *, parity_images: int = 32) -> Path:
    """The .onnx file to serve: ``model_path`` itself, or a checkpoint exported (and
    parity-checked against PyTorch) into ``out_dir``."""
    path = check_model_path(model_path, "model")
    if path.suffix.lower() == ".onnx":
        return path
    from captcha_lit.training.checkpoints import load_module
    from captcha_lit.deploy.export import export_onnx

    module, state = load_module(path)
    out = Path(out_dir) / f"{path.stem}.onnx"
    report = export_onnx(module, state, out, parity_images=parity_images, ckpt_path=str(path))
    log.info("exported %s to ONNX: texts agree %.1f%%, largest logit difference %.2e", path,
             100 * report["text_agreement"], report["max_abs_logit_diff"])
    return out


def _whole(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be a whole number >= {minimum}")
    return value


def _seconds(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}={value!r} must be a number of seconds > 0")
    return float(value)


def serve(cfg: DictConfig) -> None:
    import uvicorn

    workers = resolve_workers(cfg.get("workers", 1))
    port = _whole(cfg.port, "port", 0)
    check_address(str(cfg.host), port)  # before the model loads (a .ckpt is exported first)
    # One process per core scales past the GIL; each then runs onnxruntime on one thread.
    threads = cfg.get("threads")
    threads = int(threads) if threads is not None else (None if workers == 1 else 1)
    run = dict(host=str(cfg.host), port=port, log_level=str(cfg.get("log_level", "info")),
               access_log=bool(cfg.get("access_log", True)), timeout_keep_alive=5,
               ws="none")  # no WebSocket routes: an upgrade request is answered as plain HTTP
    with tempfile.TemporaryDirectory(prefix="captcha_lit_serve_") as tmp:
        spec = AppSpec(
            onnx=str(onnx_model(str(cfg.model_path), tmp, parity_images=int(cfg.get("parity_images", 32)))),
            threads=threads, max_pixels=int(cfg.get("max_image_pixels") or MAX_IMAGE_PIXELS),
            spinning=bool(cfg.get("spinning", False)), max_body_bytes=_whole(cfg.max_body_bytes, "max_body_bytes"),
            max_batch=_whole(cfg.max_batch, "max_batch"), micro_batch=_whole(cfg.get("micro_batch", 64), "micro_batch"),
            max_request_pixels=_whole(cfg.max_request_pixels, "max_request_pixels"),
            body_timeout=_seconds(cfg.body_timeout, "body_timeout"),
            request_timeout=_seconds(cfg.request_timeout, "request_timeout"),
            header_timeout=_seconds(cfg.header_timeout, "header_timeout"),
            min_confidence=check_min_confidence(cfg.get("min_confidence")),
            max_connections=_whole(cfg.max_connections, "max_connections"),
        )
        # Opened here even for several workers: a bad model fails once, with one error, before any fork.
        solver = spec.solver()
        print(f"serving {solver.model_id} ({solver.spec.arch}, {solver.spec.decoder}) on "
              f"http://{cfg.host}:{cfg.port} with {workers} worker process(es)  docs: /docs  "
              f"API key: {'required' if api_key_from_env() else 'off'}", flush=True)
        if workers == 1:
            uvicorn.run(spec.app(solver), http=spec.http(), **run)
            return
        del solver  # each worker process opens its own session on the same file
        run_workers(spec, run, workers)
