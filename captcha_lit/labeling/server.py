"""Serve the labeling page for a folder, with or without a model.

    python -m captcha_lit.label path=DIR
    python -m captcha_lit.label path=DIR ckpt_path=outputs/train/runs/<time>/checkpoints/<best>.ckpt

With a model (a .ckpt, or a .onnx from captcha_lit.export), every image is read once at
startup: the page prefills its reading, and shows the least sure images first.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from pathlib import Path

from omegaconf import DictConfig

from captcha_lit.labeling.rules import LabelRules
from captcha_lit.labeling.session import LabelSession
from captcha_lit.labeling.store import LabelStore
from captcha_lit.preprocess import IMAGE_SUFFIXES, scan_images
from captcha_lit.utils import check_model_path

log = logging.getLogger(__name__)


def open_session(cfg: DictConfig) -> LabelSession:
    """The folder, its labels file and the model's readings, as ``cfg`` (conf/label.yaml) names them."""
    if cfg.get("path") in (None, "", "???"):
        raise ValueError("path is not set: pass path=DIR, the folder of images to label")
    root = Path(os.path.expanduser(str(cfg.path))).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"path {str(root)!r} is not a folder")
    # Only files that really lie under the folder: a link out of it is never served.
    relpaths = [p for p in scan_images(root) if (root / p).resolve().is_relative_to(root)]
    if not relpaths:
        raise ValueError(f"path {str(root)!r} has no image files ({', '.join(IMAGE_SUFFIXES)})")
    csv_path = Path(os.path.expanduser(str(cfg.get("labels_csv") or "labels.csv")))
    store = LabelStore((csv_path if csv_path.is_absolute() else root / csv_path).resolve())

    spec = readings = model_id = model_path = None
    if cfg.get("ckpt_path"):
        from captcha_lit.predict import open_model, predict_files

        model_file = check_model_path(cfg.ckpt_path, "checkpoint")
        model_path = str(model_file)
        spec, solve = open_model(model_path, str(cfg.get("device", "cpu")))
        model_id = f"{spec.arch or 'model'}-{hashlib.sha256(model_file.read_bytes()).hexdigest()[:12]}"
        log.info("reading %d images with %s", len(relpaths), model_path)
        readings = predict_files([root / p for p in relpaths], spec.input_size, spec.channels, solve,
                                 int(cfg.get("batch_size", 64)))
    charset = cfg.get("charset") or (spec.charset if spec else None)
    lengths = {key: cfg.get(key) if cfg.get(key) is not None else (getattr(spec, key) if spec else None)
               for key in ("min_length", "max_length")}
    given = any(cfg.get(key) is not None for key in ("charset", "min_length", "max_length"))
    source = "from the command line" if given else "from the model" if spec else ""
    rules = LabelRules(charset=str(charset) if charset else None, source=source,
                       **{k: int(v) if v is not None else None for k, v in lengths.items()})
    return LabelSession(root, relpaths, store, rules, readings=readings, model_id=model_id,
                        model_path=model_path, charset_arg=str(cfg.charset) if cfg.get("charset") else None)


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a just-closed port is free
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ValueError(f"port={port} on {host} is not free ({exc.strerror}); "
                             "pass port=N with another one") from None


def label(cfg: DictConfig) -> None:
    import uvicorn

    from captcha_lit.labeling.app import create_app

    host, port = str(cfg.host), int(cfg.port)
    check_port_free(host, port)
    session = open_session(cfg)
    counts = session.counts()
    print(f"labeling {counts['total']} images in {session.root}: {counts['labeled']} labeled, "
          f"{counts['skipped'] + counts['unreadable']} marked, {counts['remaining']} to go; "
          f"{'least sure first by ' + session.model_id if session.model_id else 'in file order (no model)'}\n"
          f"labels: {session.store.csv_path}\nopen http://{host}:{port}/", flush=True)
    uvicorn.run(create_app(session, host=host), host=host, port=port, log_level=str(cfg.get("log_level", "warning")),
                access_log=False)
