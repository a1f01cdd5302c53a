"""Hostile files for predict and the runtime: each gets an answer or its own error row, never a
traceback; predict's CSV cannot run formulas; a list with a missing file and a symlink loop are
handled; EXIF orientation is applied in every format; readings of the wrong length are flagged."""

from __future__ import annotations

import csv
import io
import os
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captcha_lit.deploy.runtime import Solver
from captcha_lit.predict import collect_inputs, predict_files, write_rows
from captcha_lit.preprocess import ImageDecodeError, open_image
from conftest import FIXTURES, PYTHON, REPO_ROOT, cli_env
from test_deploy import captcha_pngs
from test_serve import _bomb_png

ONNX = FIXTURES / "compat_640dca3" / "crnn.onnx"  # 5 characters of 0-9A-Z


def _encode(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def hostile_files(folder: Path) -> list[Path]:
    """Write 30+ hostile or odd files into ``folder`` and return their paths (some are not regular files)."""
    good = captcha_pngs(1)[0][1]
    image = Image.open(io.BytesIO(good))
    rng = np.random.default_rng(0)
    jpeg = _encode(image.convert("RGB"), "JPEG")
    contents: dict[str, bytes] = {
        "empty.png": b"",
        "random.png": rng.bytes(5000),
        "text.png": b"just some text, not an image\n",
        "truncated.png": good[: len(good) // 2],
        "header_only.png": good[:33],
        "bad_crc.png": good[:29] + b"\x00\x00\x00\x00" + good[33:],
        "truncated.jpg": jpeg[: len(jpeg) // 3],
        "jpeg_noise.jpg": jpeg[:600] + rng.bytes(2000),
        "truncated.gif": _encode(image.convert("P"), "GIF")[:100],
        "truncated.webp": _encode(image, "WEBP")[:80],
        "bomb.png": _bomb_png(60_000, 60_000),
        "huge_dimensions.png": _bomb_png(5000, 5000),
        "zero_width.png": _bomb_png(0, 60),
        "one_pixel.png": _encode(Image.new("RGB", (1, 1)), "PNG"),
        "one_by_4000.png": _encode(Image.new("L", (4000, 1), 200), "PNG"),
        "sixteen_bit.png": _encode(Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257), "PNG"),
        "palette_transparent.png": _encode(image.convert("P"), "PNG", transparency=0),
        "cmyk.jpg": _encode(image.convert("CMYK"), "JPEG"),
        "float.tif": _encode(Image.fromarray(np.asarray(image.convert("L"), dtype=np.float32) / 255), "TIFF"),
        "animated.gif": _encode(image.convert("P"), "GIF", save_all=True,
                                append_images=[Image.new("P", image.size)] * 3),
        "multipage.tif": _encode(image, "TIFF", save_all=True, append_images=[image] * 2),
        "big_text_chunk.png": good[:33] + _png_chunk(b"tEXt", b"comment\x00" + b"a" * 1_000_000) + good[33:],
        "jpeg_named.png": jpeg,
        "svg.png": b"<svg xmlns='http://www.w3.org/2000/svg' width='99999' height='99999'/>",
        "ico.ico": _encode(image.convert("RGBA"), "ICO"),
        "ppm_16bit.ppm": b"P5 4 4 65535\n" + bytes(32),
        "bmp_negative.bmp": _encode(image, "BMP")[:22] + struct.pack("<i", -60) + _encode(image, "BMP")[26:],
        "=HYPERLINK(evil).png": good,
        "+cmd.png": good,
        "-1+1.png": good,
        "@sum.png": good,
        "ok.png": good,
    }
    paths = []
    for name, data in contents.items():
        path = folder / name
        path.write_bytes(data)
        paths.append(path)
    (folder / "folder.png").mkdir()
    paths.append(folder / "folder.png")
    os.symlink(folder / "nowhere.png", folder / "dangling.png")
    paths.append(folder / "dangling.png")
    os.mkfifo(folder / "fifo.png")  # reading it would block forever
    paths.append(folder / "fifo.png")
    paths.append(folder / "missing.png")
    return paths


def test_runtime_answers_or_names_the_problem_for_every_hostile_file(tmp_path):
    files = hostile_files(tmp_path)
    assert len(files) >= 30
    solver = Solver(ONNX)
    answered = 0
    for path in files:
        try:
            solution = solver.solve(path)
        except ImageDecodeError as exc:
            assert path.name in str(exc) and "\n" not in str(exc), str(exc)
            continue
        answered += 1
        assert (solution.unsure is None) == (len(solution.text) == 5), (path.name, solution)
    assert answered >= 10
    with pytest.raises(ImageDecodeError, match="is empty; pass a file path"):
        solver.solve("")


def test_predict_gives_every_hostile_file_a_row_and_writes_a_safe_csv(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    files = hostile_files(folder)
    out = tmp_path / "preds.csv"
    # The real command line: a list with a missing file, a FIFO and a folder among the files.
    listed = "[" + ",".join(f"'{p}'" for p in files) + "]"
    proc = subprocess.run([PYTHON, "-m", "captcha_lit.predict", f"ckpt_path={ONNX}", f"inputs={listed}",
                           f"output={out}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO_ROOT,
                          env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(files)
    by_name = {Path(r["path"].lstrip("'")).name: r for r in rows}
    assert "file not found" in by_name["missing.png"]["error"]
    assert "not a regular file" in by_name["fifo.png"]["error"]
    assert "is a directory" in by_name["folder.png"]["error"]
    assert by_name["ok.png"]["error"] == ""
    for row in rows:  # no cell may start a formula
        assert not any(cell.startswith(("=", "+", "-", "@")) for cell in row.values()), row
    formula = [r for r in rows if "HYPERLINK" in r["path"]][0]
    assert formula["error"] == "" and formula["text"] != ""
    for row in rows:
        if row["error"] == "":
            assert (row["unsure"] == "") == (len(row["text"].lstrip("'")) == 5), row


def test_csv_cells_that_start_a_formula_are_defused(tmp_path):
    rows = [{"path": "=cmd|'/C calc'!A0", "text": "-2+3", "confidence": 0.5, "char_confidences": [0.5],
             "unsure": None, "error": "@SUM(A1)"}]
    write_rows(rows, tmp_path / "p.csv")
    with open(tmp_path / "p.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert row["path"] == "'=cmd|'/C calc'!A0" and row["text"] == "'-2+3" and row["error"] == "'@SUM(A1)"


def test_recursive_glob_does_not_follow_a_symlink_loop(tmp_path):
    good = captcha_pngs(1)[0][1]
    for i, sub in enumerate(["a", "a/b", "c", "c/d"]):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        (tmp_path / sub / f"x{i}.png").write_bytes(good)
        (tmp_path / sub / f"y{i}.png").write_bytes(good)
    os.symlink(tmp_path, tmp_path / "a" / "b" / "loop")
    os.symlink(tmp_path / "c", tmp_path / "a" / "again")
    found = collect_inputs(f"{tmp_path}/**/*.png")
    assert len(found) == 8 and len(set(found)) == 8
    assert [p.name for p in collect_inputs(f"{tmp_path}/**/x[0-1].png")] == ["x1.png", "x0.png"]
    assert [p.name for p in collect_inputs(f"{tmp_path}/a/*.png")] == ["x0.png", "y0.png"]


def test_a_missing_file_in_a_list_gets_its_row(tmp_path):
    good = captcha_pngs(1)[0][1]
    (tmp_path / "a.png").write_bytes(good)
    files = collect_inputs([str(tmp_path / "a.png"), str(tmp_path / "gone.png")])
    solver = Solver(ONNX)
    rows = predict_files(files, solver.spec.input_size, solver.spec.channels, solver.solve_arrays, 8)
    assert rows[0]["error"] is None and "gone.png: file not found" in rows[1]["error"]
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        collect_inputs(str(tmp_path / "gone.png"))  # a single input that does not exist is still an error


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_exif_orientation_is_applied_in_every_format(fmt):
    """The same sideways-stored image with an EXIF 'rotate 90' tag reads upright in every format."""
    upright = Image.fromarray(np.tile(np.arange(160, dtype=np.uint8), (60, 1))).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # how a camera stores it; tag 6 rotates it back
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(stored, fmt, exif=exif.tobytes(), **({"quality": 100} if fmt in ("JPEG", "WEBP") else {}))
    decoded = open_image(data)
    assert decoded.size == upright.size
    difference = np.abs(np.asarray(decoded, dtype=int) - np.asarray(upright, dtype=int)).mean()
    assert difference < 3, difference
