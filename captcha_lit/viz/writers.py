"""The files pictures and tables go into: error-analysis CSV and Markdown, TensorBoard projector files."""

from __future__ import annotations

import csv
import html
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from captcha_lit.viz.analysis import MISSING, ErrorReport, FeaturePoints
from captcha_lit.viz.plots import as_hwc_uint8, save_image


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            value = f"{value:.4f}"
        return "" if value is None else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def html_table(rows: list[dict], columns) -> str:
    def cell(value) -> str:
        return html.escape(f"{value:.4f}" if isinstance(value, float) else "" if value is None else str(value))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(row.get(c))}</td>" for c in columns) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def html_page(title: str, body: Sequence[str]) -> str:
    """A plain, self-styled HTML page around ``body``'s parts."""
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>" + html.escape(title) + "</title>"
            "<style>body{font-family:sans-serif;max-width:1500px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_csv(path: str | Path, rows: Sequence[dict], columns: Sequence[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


PAIR_COLUMNS = ("true", "predicted", "count", "rate")


def write_error_analysis(report: ErrorReport, dirpath: str | Path, top_pairs: int = 20,
                         figures: dict[str, np.ndarray] | None = None) -> dict[str, Path]:
    """confusion.csv, confused_pairs.csv (every pair) and .md (the ``top_pairs`` most frequent),
    position_accuracy.csv, and each of ``figures`` (from ``error_figures``) as NAME.png."""
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    path = dirpath / "confusion.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted", *report.labels])
        for label, row in zip(report.labels, report.confusion.tolist()):
            writer.writerow([label, *row])
    files["confusion_csv"] = path
    pairs = report.confused_pairs()
    files["confused_pairs_csv"] = write_csv(dirpath / "confused_pairs.csv", pairs, PAIR_COLUMNS)
    top = pairs[:top_pairs]
    text = (f"# Most confused characters\n\n{report.num_texts} texts, {report.num_texts - report.num_correct} read "
            f"wrong. Texts are aligned to predictions by edit distance; {MISSING} as `predicted` is a dropped "
            f"character, as `true` an added one. `rate` is the share of the true character's occurrences.\n\n")
    text += markdown_table(top, PAIR_COLUMNS) if top else "No character was confused.\n"
    (dirpath / "confused_pairs.md").write_text(text)
    files["confused_pairs_md"] = dirpath / "confused_pairs.md"
    files["position_accuracy_csv"] = write_csv(dirpath / "position_accuracy.csv", report.position_accuracy(),
                                      ("position", "accuracy", "count"))
    for name, image in (figures or {}).items():
        files[f"{name}_png"] = save_image(image, dirpath / f"{name}.png")
    return files


MAX_SPRITE_PX = 8192  # TensorBoard's projector refuses larger sprites


def write_projector(dirpath: str | Path, points: FeaturePoints, header: Sequence[str], metadata: Sequence[Sequence],
                    thumbnails: np.ndarray, tag: str = "character_features") -> Path:
    """TensorBoard projector files for ``points``: tensors.tsv, metadata.tsv (``header`` + one row per
    point), sprite.png (``thumbnails``, one per point) and projector_config.pbtxt; view them with
    ``tensorboard --logdir DIRPATH``.

    The files are written here rather than with ``SummaryWriter.add_embedding``, which pads its sprite
    to a float64 square: about 1 GB of memory for 5,000 wide CAPTCHA thumbnails.
    """
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig
    from torch.utils.tensorboard import SummaryWriter

    dirpath = Path(dirpath)
    folder = dirpath / tag
    folder.mkdir(parents=True, exist_ok=True)
    np.savetxt(folder / "tensors.tsv", points.features, delimiter="\t", fmt="%.6g")
    with open(folder / "metadata.tsv", "w") as handle:
        for row in [header, *metadata]:
            handle.write("\t".join(str(v).replace("\t", " ").replace("\n", " ") for v in row) + "\n")
    thumbnails = as_hwc_uint8(thumbnails)
    count, height, width = thumbnails.shape[:3]
    # The projector reads the sprite row by row, ceil(sqrt(N)) images to a row.
    per_row = math.ceil(math.sqrt(count))
    rows = math.ceil(count / per_row)
    scale = min(1.0, MAX_SPRITE_PX / (per_row * width), MAX_SPRITE_PX / (rows * height))
    thumb_w, thumb_h = max(1, int(width * scale)), max(1, int(height * scale))
    sprite = Image.new("RGB", (per_row * thumb_w, rows * thumb_h), "white")
    for k, image in enumerate(thumbnails):
        tile = Image.fromarray(image)
        if (thumb_w, thumb_h) != (width, height):
            tile = tile.resize((thumb_w, thumb_h), Image.BILINEAR)
        sprite.paste(tile, ((k % per_row) * thumb_w, (k // per_row) * thumb_h))
    sprite.save(folder / "sprite.png")
    config = ProjectorConfig()
    embedding = config.embeddings.add()
    embedding.tensor_name = tag
    embedding.tensor_path = f"{tag}/tensors.tsv"
    embedding.metadata_path = f"{tag}/metadata.tsv"
    embedding.sprite.image_path = f"{tag}/sprite.png"
    embedding.sprite.single_image_dim.extend([thumb_w, thumb_h])
    (dirpath / "projector_config.pbtxt").write_text(text_format.MessageToString(config))
    # TensorBoard lists a folder as a run only when it holds an event file.
    SummaryWriter(log_dir=str(dirpath)).close()
    return dirpath
