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
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from captcha_lit.preprocess import IMAGE_SUFFIXES, ImageDecodeError, load_input
from captcha_lit.decoding import Solution, check_min_confidence, require_confidence
from captcha_lit.spec import ModelSpec
from captcha_lit.utils import entry_point, require_extra, write_json

log = logging.getLogger(__name__)

OUTPUT_FORMATS = (".json", ".csv")
CSV_FIELDS = ("path", "text", "confidence", "char_confidences", "unsure", "error")
# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def collect_inputs(inputs: str | Sequence[str]) -> list[Path]:
    """A file, a folder (its image files), a glob, or a list of those -> the files, in order.

    In a list, an entry that does not exist stays in the result (its row then names the
    problem); a single input that does not exist is an error."""
    specs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not specs or any(str(s) in ("", "???") for s in specs):
        raise ValueError("no inputs given: pass inputs=FILE, inputs=FOLDER or inputs='\"GLOB\"'")
    files: list[Path] = []
    for spec in specs:
        spec = os.path.expanduser(str(spec))
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found and len(specs) == 1:
                raise ValueError(f"inputs={spec!r} is a folder with no image files ({', '.join(IMAGE_SUFFIXES)})")
            files += found or [path]  # in a list, an empty folder gets a row that says so
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(spec):
            found = glob_files(spec)
            if not found:
                raise ValueError(f"inputs={spec!r} matches no files")
            files += found
        elif len(specs) > 1:
            files.append(path)
        else:
            raise FileNotFoundError(f"inputs={spec!r}: no such file or folder, and it is not a glob pattern")
    return files


def glob_files(pattern: str) -> list[Path]:
    """The files that ``pattern`` matches, sorted; ``**`` spans folders but never enters a linked
    folder, so a symlink loop cannot multiply the matches (``glob.glob`` follows it)."""
    parts = Path(pattern).parts
    magic = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    if "**" not in parts:
        return sorted(Path(p) for p in glob.glob(pattern) if os.path.isfile(p))
    root = Path(*parts[:magic]) if magic else Path(".")
    matcher = re.compile(_translate(parts[magic:]))
    found = []
    for folder, subfolders, names in os.walk(root):  # os.walk does not follow links to folders
        subfolders.sort()
        for name in names:
            path = Path(folder) / name
            if path.is_file() and matcher.fullmatch(path.relative_to(root).as_posix()):
                found.append(path)
    return sorted(found)


def _translate(parts: Sequence[str]) -> str:
    """Glob path components -> a regex over '/'-joined relative paths: ``**`` is any number of
    folders, ``*`` and ``?`` stay within one name, ``[...]`` is a character class."""
    pieces = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            pieces.append(".*" if last else "(?:[^/]*/)*")
            continue
        regex, j = "", 0
        while j < len(part):
            char = part[j]
            close = part.find("]", j + 2) if char == "[" else -1
            if char == "*":
                regex += "[^/]*"
            elif char == "?":
                regex += "[^/]"
            elif close != -1:
                body = part[j + 1:close]
                body = body.replace("\\", "\\\\")
                regex += "[" + ("^" + body[1:] if body.startswith("!") else body) + "]"
                j = close
            else:
                regex += re.escape(char)
            j += 1
        pieces.append(regex + ("" if last else "/"))
    return "".join(pieces)


def open_model(model_path: str, device: str = "cpu", min_confidence: float | None = None,
               ) -> tuple[ModelSpec, Callable[[np.ndarray], list[Solution]]]:
    """A .ckpt (torch, ``read_images``) or an exported .onnx (onnxruntime, ``Solver``) -> its spec, and
    a function from uint8 images at its input size, (N, H, W, C), to their solutions (those less
    sure than ``min_confidence`` marked unsure)."""
    min_confidence = check_min_confidence(min_confidence)
    if str(model_path).endswith(".onnx"):
        from captcha_lit.deploy.runtime import Solver

        require_extra("predict with a .onnx model", "deploy", "onnxruntime")
        solver = Solver(model_path, min_confidence=min_confidence)
        return solver.spec, solver.solve_arrays
    import torch

    from captcha_lit.training.checkpoints import load_module
    from captcha_lit.training.inference import read_images

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    module, _ = load_module(model_path, map_location=device)

    def solve(images: np.ndarray) -> list[Solution]:
        return require_confidence(read_images(module, images).solutions, min_confidence)

    return module.spec, solve


def predict_files(files: Sequence[Path], input_size: tuple[int, int], channels: int,
                  solve: Callable[[np.ndarray], list[Solution]], batch_size: int) -> list[dict]:
    """One row per file, in order; decoding errors become rows with ``error`` set."""
    rows: list[dict] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        arrays, good, batch_rows = [], [], []
        for path in chunk:
            row = {"path": str(path), "text": None, "confidence": None, "char_confidences": None, "unsure": None,
                   "error": None}
            try:
                arrays.append(load_input(path, input_size, channels=channels, name=path.name))
                good.append(row)
            except ImageDecodeError as exc:
                row["error"] = str(exc)
            batch_rows.append(row)
        if arrays:
            for row, solution in zip(good, solve(np.stack(arrays))):
                row.update(text=solution.text, confidence=float(solution.confidence),
                           char_confidences=[float(c) for c in solution.char_confidences], unsure=solution.unsure)
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
            "path": _cell(row["path"]),
            "text": _cell(row["text"] or ""),
            "confidence": f"{row['confidence']:.6f}" if row["confidence"] is not None else "",
            "char_confidences": " ".join(f"{c:.6f}" for c in row["char_confidences"] or []),
            "unsure": _cell(row.get("unsure") or ""),
            "error": _cell(row["error"] or ""),
        })
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(buffer.getvalue())


def _cell(text: str) -> str:
    """A text cell that a spreadsheet shows as text: a leading quote defuses a formula."""
    return "'" + text if text.startswith(_FORMULA_START) else text


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
            unsure = f"  unsure: {r['unsure']}" if r.get("unsure") else ""
            lines.append(f"{short(r['path']):<{width}}  {r['text']:<{text_width}}  {r['confidence']:>6.3f}  {chars}"
                         f"{unsure}")
    return "\n".join(lines)


def predict(cfg: DictConfig) -> list[dict]:
    output = Path(os.path.expanduser(str(cfg.output))) if cfg.get("output") else None
    if output is not None and output.suffix.lower() not in OUTPUT_FORMATS:
        raise ValueError(f"output={str(output)!r}: use a file name ending in .json or .csv")
    batch_size = int(cfg.get("batch_size", 64))
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    files = collect_inputs(cfg.inputs)
    spec, solve = open_model(str(cfg.ckpt_path), str(cfg.get("device", "cpu")), cfg.get("min_confidence"))
    rows = predict_files(files, spec.input_size, spec.channels, solve, batch_size)
    errors = sum(r["error"] is not None for r in rows)
    unsure = sum(r["unsure"] is not None for r in rows)
    print(format_table(rows))
    summary = f"\n{len(rows)} image(s), {errors} error(s), {unsure} unsure"
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
