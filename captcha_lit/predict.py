"""Solve CAPTCHA images with a trained checkpoint (or an exported .onnx model).

    python -m captcha_lit.predict ckpt_path=PATH inputs=captcha.png
    python -m captcha_lit.predict ckpt_path=PATH inputs=folder/ output=preds.csv
    python -m captcha_lit.predict ckpt_path=PATH 'inputs="shots/**/*.png"' output=preds.json

Charset, input size, normalization and lengths come from the model itself. Every
image gets a row with its text, the confidence of each character and of the whole
text; an unreadable file gets a row with its error instead and the others go on.
"""

from __future__ import annotations

import csv
import glob
import io
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from captcha_lit.preprocess import IMAGE_SUFFIXES, ImageDecodeError, load_input
from captcha_lit.decoding import Solution
from captcha_lit.spec import ModelSpec
from captcha_lit.utils import entry_point, write_json

log = logging.getLogger(__name__)

OUTPUT_FORMATS = (".json", ".csv")
CSV_FIELDS = ("path", "text", "confidence", "char_confidences", "error")


def collect_inputs(inputs: str | Sequence[str]) -> list[Path]:
    """A file, a folder (its image files), a glob, or a list of those -> the files, in order."""
    specs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not specs or any(str(s) in ("", "???") for s in specs):
        raise ValueError("no inputs given: pass inputs=FILE, inputs=FOLDER or inputs='\"GLOB\"'")
    files: list[Path] = []
    for spec in specs:
        spec = os.path.expanduser(str(spec))
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"inputs={spec!r} is a folder with no image files ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(spec):
            matches = sorted(Path(p) for p in glob.glob(spec, recursive=True))
            found = [p for p in matches if p.is_file()]
            if not found:
                raise ValueError(f"inputs={spec!r} matches no files")
            files += found
        else:
            raise FileNotFoundError(f"inputs={spec!r}: no such file or folder, and it is not a glob pattern")
    return files


def open_model(model_path: str, device: str = "cpu") -> tuple[ModelSpec, Callable[[np.ndarray], list[Solution]]]:
    """A .ckpt (torch, ``read_images``) or an exported .onnx (onnxruntime, ``Solver``) -> its spec, and
    a function from uint8 images at its input size, (N, H, W, C), to their solutions."""
    if str(model_path).endswith(".onnx"):
        from captcha_lit.deploy.runtime import Solver

        solver = Solver(model_path)
        return solver.spec, solver.solve_arrays
    import torch

    from captcha_lit.training.checkpoints import load_module
    from captcha_lit.training.inference import read_images

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    module, _ = load_module(model_path, map_location=device)

    def solve(images: np.ndarray) -> list[Solution]:
        return read_images(module, images).solutions

    return module.spec, solve


def predict_files(files: Sequence[Path], input_size: tuple[int, int], channels: int,
                  solve: Callable[[np.ndarray], list[Solution]], batch_size: int) -> list[dict]:
    """One row per file, in order; decoding errors become rows with ``error`` set."""
    rows: list[dict] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        arrays, good, batch_rows = [], [], []
        for path in chunk:
            row = {"path": str(path), "text": None, "confidence": None, "char_confidences": None, "error": None}
            try:
                arrays.append(load_input(path, input_size, channels=channels, name=path.name))
                good.append(row)
            except ImageDecodeError as exc:
                row["error"] = str(exc)
            batch_rows.append(row)
        if arrays:
            for row, solution in zip(good, solve(np.stack(arrays))):
                row.update(text=solution.text, confidence=float(solution.confidence),
                           char_confidences=[float(c) for c in solution.char_confidences])
        rows += batch_rows
    return rows


def write_rows(rows: list[dict], path: Path) -> None:
    if path.suffix.lower() == ".json":
        write_json(path, rows)
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({
            **row,
            "text": row["text"] if row["text"] is not None else "",
            "confidence": f"{row['confidence']:.6f}" if row["confidence"] is not None else "",
            "char_confidences": " ".join(f"{c:.6f}" for c in row["char_confidences"] or []),
            "error": row["error"] or "",
        })
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(buffer.getvalue())


def format_table(rows: list[dict], max_path: int = 48) -> str:
    def short(path: str) -> str:
        return path if len(path) <= max_path else "..." + path[-(max_path - 3):]

    width = max([4] + [len(short(r["path"])) for r in rows])
    text_width = max([4] + [len(r["text"] or "") for r in rows])
    lines = [f"{'file':<{width}}  {'text':<{text_width}}  {'conf':>6}  char conf",
             f"{'-' * width}  {'-' * text_width}  {'-' * 6}  {'-' * 9}"]
    for r in rows:
        if r["error"]:
            lines.append(f"{short(r['path']):<{width}}  error: {r['error']}")
        else:
            chars = " ".join(f"{c:.2f}" for c in r["char_confidences"])
            lines.append(f"{short(r['path']):<{width}}  {r['text']:<{text_width}}  {r['confidence']:>6.3f}  {chars}")
    return "\n".join(lines)


def predict(cfg: DictConfig) -> list[dict]:
    output = Path(os.path.expanduser(str(cfg.output))) if cfg.get("output") else None
    if output is not None and output.suffix.lower() not in OUTPUT_FORMATS:
        raise ValueError(f"output={str(output)!r}: use a file name ending in .json or .csv")
    batch_size = int(cfg.get("batch_size", 64))
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    files = collect_inputs(cfg.inputs)
    spec, solve = open_model(str(cfg.ckpt_path), str(cfg.get("device", "cpu")))
    rows = predict_files(files, spec.input_size, spec.channels, solve, batch_size)
    errors = sum(r["error"] is not None for r in rows)
    print(format_table(rows))
    summary = f"\n{len(rows)} image(s), {errors} error(s)"
    if output is not None:
        write_rows(rows, output)
        summary += f"; predictions written to {output}"
    print(summary)
    return rows


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
@entry_point
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
