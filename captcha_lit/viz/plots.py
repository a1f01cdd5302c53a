"""Pictures of data, predictions and errors.

Image grids with captions are drawn with Pillow (a core dependency), so the training-time
callbacks cost a few milliseconds and need nothing extra. Charts use matplotlib (the ``viz``
extra) through its object API on the Agg canvas: no window ever opens, and pyplot's global
state (a notebook's backend, say) is left alone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from captcha_lit.viz.analysis import MISSING, ErrorReport, Reliability, align

GREEN = (0, 140, 60)
RED = (210, 30, 30)
GRAY = (110, 110, 110)
BLACK = (20, 20, 20)
GAP = "·"  # stands in a caption where the alignment has no character

Segment = tuple[str, tuple[int, int, int]]  # text and its color


# ---- image grids (Pillow) ---------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont:
    """A monospaced font, so aligned captions line up character by character: matplotlib's DejaVu
    Sans Mono where matplotlib is installed, else Pillow's built-in font."""
    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSansMono.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size=size)


def as_hwc_uint8(images) -> np.ndarray:
    """(N, 3, H, W) or (N, H, W, 3) uint8 images, tensor or array -> (N, H, W, 3) array."""
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
        images = images.transpose(0, 2, 3, 1)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return np.ascontiguousarray(images.astype(np.uint8))


def _draw_line(draw: ImageDraw.ImageDraw, xy: tuple[int, int], segments: Sequence[Segment], font) -> None:
    x, y = xy
    char_width = font.getlength("0")
    for text, color in segments:
        for char in text:
            draw.text((x, y), char, font=font, fill=color)
            if char == "0":  # slashed zero: 0 and O look alike in small sans fonts, and models confuse them most
                top, bottom = font.getbbox("0")[1], font.getbbox("0")[3]
                draw.line([(x + char_width * 0.8, y + top + 1), (x + char_width * 0.2, y + bottom - 1)], fill=color)
            x += char_width


def tile_grid(images, captions: Sequence[Sequence[Sequence[Segment]]], borders: Sequence | None = None,
              columns: int = 8, title: str | None = None, min_width: int = 160, max_width: int = 320,
              font_size: int = 13) -> Image.Image:
    """Images in a grid, each with caption lines below it (a line is a list of colored segments) and an
    optional colored border. Small images are scaled up to ``min_width`` for legibility."""
    images = as_hwc_uint8(images)
    if len(images) == 0:
        raise ValueError("no images to draw")
    height, width = images.shape[1:3]
    scale = min_width / width if width < min_width else min(1.0, max_width / width)
    tile_w, tile_h = max(1, round(width * scale)), max(1, round(height * scale))
    font = _font(font_size)
    line_h = font_size + 4
    lines = max((len(c) for c in captions), default=0)
    border, pad = 3, 6
    cell_w, cell_h = tile_w + 2 * border + pad, tile_h + 2 * border + lines * line_h + pad
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    title_h = line_h + 6 if title else 0
    canvas = Image.new("RGB", (columns * cell_w + pad, rows * cell_h + pad + title_h), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        _draw_line(draw, (pad, pad), [(title, BLACK)], font)
    for k, image in enumerate(images):
        x0 = pad + (k % columns) * cell_w
        y0 = pad + title_h + (k // columns) * cell_h
        color = borders[k] if borders is not None else None
        if color is not None:
            draw.rectangle([x0, y0, x0 + tile_w + 2 * border - 1, y0 + tile_h + 2 * border - 1], fill=color)
        tile = Image.fromarray(image).resize((tile_w, tile_h), Image.BILINEAR)
        canvas.paste(tile, (x0 + border, y0 + border))
        for n, line in enumerate(captions[k] if k < len(captions) else []):
            _draw_line(draw, (x0 + border, y0 + tile_h + 2 * border + 2 + n * line_h), line, font)
    return canvas


def sample_grid(images, texts: Sequence[str], columns: int = 8, title: str | None = None) -> Image.Image:
    """Images with their labels."""
    return tile_grid(images, [[[(text, BLACK)]] for text in texts], columns=columns, title=title)


def prediction_gallery(images, truths: Sequence[str], preds: Sequence[str], confidences: Sequence[float] | None = None,
                       columns: int = 8, title: str | None = None) -> Image.Image:
    """Images framed green (read right) or red (wrong), with the true text above the prediction.
    The two are aligned like the error analysis aligns them, so a wrong character is red under
    the true one, and a dropped or added character shows as ``·``."""
    captions, borders = [], []
    for k, (truth, pred) in enumerate(zip(truths, preds)):
        true_line: list[Segment] = [("true ", GRAY)]
        pred_line: list[Segment] = [("read ", GRAY)]
        for t, p in align(truth, pred):
            color = BLACK if t == p else RED
            true_line.append((GAP if t == MISSING else t, BLACK))
            pred_line.append((GAP if p == MISSING else p, color))
        if confidences is not None:
            pred_line.append((f" {confidences[k]:.2f}", GRAY))
        captions.append([true_line, pred_line])
        borders.append(GREEN if truth == pred else RED)
    return tile_grid(images, captions, borders=borders, columns=columns, title=title)


# ---- charts (matplotlib) ----------------------------------------------------------------
def new_figure(width: float, height: float):
    """A matplotlib figure off pyplot (no global state, no window), laid out to fit its labels."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def figure_to_array(fig, dpi: int = 100) -> np.ndarray:
    """A matplotlib figure -> (H, W, 3) uint8 RGB, for TensorBoard."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    fig.set_dpi(dpi)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def confusion_figure(report: ErrorReport, title: str = "Confusion by character"):
    """Rows: true characters; columns: what the model read. Color: the share of the true character's
    occurrences (on a square-root scale, so rare confusions still show); numbers: counts off the diagonal."""
    from matplotlib.colors import PowerNorm

    counts = report.confusion
    totals = counts.sum(1, keepdims=True)
    rates = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0)
    n = len(report.labels)
    side = min(14.0, max(5.0, 0.28 * n + 2))
    fig = new_figure(side + 1.2, side)
    ax = fig.add_subplot()
    shown = ax.imshow(rates, cmap="Blues", norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
    fig.colorbar(shown, ax=ax, shrink=0.8, label="share of the true character")
    ax.set_xticks(range(n), report.labels, fontsize=8)
    ax.set_yticks(range(n), report.labels, fontsize=8)
    ax.set_xlabel(f"read by the model ({MISSING}: an added character)")
    ax.set_ylabel(f"true character ({MISSING}: a dropped character)")
    if n <= 40:
        for i, j in zip(*np.nonzero(counts)):
            if i != j:
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if rates[i, j] > 0.5 else "black")
    errors = int(counts.sum() - np.trace(counts))
    ax.set_title(f"{title}: {errors} character errors in {report.num_texts} texts "
                 f"(aligned by edit distance)", fontsize=10)
    return fig


def position_accuracy_figure(report: ErrorReport, title: str = "Accuracy per character position"):
    rows = report.position_accuracy()
    fig = new_figure(max(4.0, 0.7 * len(rows) + 2), 3.2)
    ax = fig.add_subplot()
    positions = [r["position"] for r in rows]
    accuracy = [r["accuracy"] for r in rows]
    bars = ax.bar(positions, accuracy, color="#4c72b0")
    for bar, row in zip(bars, rows):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{row['accuracy']:.3f}\nn={row['count']}",
                ha="center", va="bottom", fontsize=7)
    # Near-perfect positions differ in the second decimal: start the axis just below the worst one.
    lowest = min(accuracy, default=0.0)
    ax.set_ylim(0 if lowest < 0.5 else np.floor((lowest - 0.02) * 20) / 20, 1.04 + (1 - lowest) * 0.15)
    ax.set_xticks(positions)
    ax.set_xlabel("position in the true text")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    return fig


def _label_colors(labels: Sequence[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    distinct = sorted(set(labels))
    if len(distinct) <= 10:
        return {label: colormaps["tab10"](i) for i, label in enumerate(distinct)}
    return {label: colormaps["gist_rainbow"](i / (len(distinct) - 1)) for i, label in enumerate(distinct)}


def tsne_figure(coords: np.ndarray, panels: Sequence[tuple[str, Sequence[str]]], title: str):
    """One scatter panel per (panel title, label of each point) over the same 2-D coordinates; each
    point is drawn as its label, so clusters read as characters, and a label whose points form one
    cluster is also written large at its center. An empty label is drawn as a gray dot."""
    from matplotlib import patheffects

    extent = float(np.ptp(coords, axis=0).max()) if len(coords) else 1.0
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig = new_figure(6.0 * columns, 6.0 * rows + 0.4)
    for k, (panel_title, labels) in enumerate(panels):
        ax = fig.add_subplot(rows, columns, k + 1)
        labels = list(labels)
        colors = _label_colors([label for label in labels if label])
        empty = [i for i, label in enumerate(labels) if not label]
        if empty:
            ax.scatter(coords[empty, 0], coords[empty, 1], s=4, color="lightgray", linewidths=0)
        for label, color in colors.items():
            index = [i for i, value in enumerate(labels) if value == label]
            # A mathtext marker draws the label itself; \mathrm keeps it upright, as in the CAPTCHA.
            marker = f"$\\mathrm{{{_mathtext_escape(label)}}}$"
            ax.scatter(coords[index, 0], coords[index, 1], s=36 if len(label) == 1 else 60, marker=marker,
                       color=color, linewidths=0, alpha=0.8)
            center = np.median(coords[index], axis=0)
            if len(index) >= 3 and np.median(np.linalg.norm(coords[index] - center, axis=1)) < 0.05 * extent:
                ax.text(center[0], center[1], label, fontsize=13, weight="bold", color=color, ha="center",
                        va="center", path_effects=[patheffects.withStroke(linewidth=3, foreground="white")])
        ax.set_title(panel_title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=11)
    return fig


def _mathtext_escape(text: str) -> str:
    return "".join("\\" + c if c in "#$%&_{}\\^~" else c for c in text)


LOSS_CURVES = (("train/loss_step", "train (per step)", "C0", "-", 0.3), ("train/loss_epoch", "train", "C0", "-o", 1.0),
               ("train/loss", "train", "C0", "-o", 1.0), ("val/loss", "val", "C1", "-o", 1.0))
ACCURACY_CURVES = (("train/seq_acc", "train text", "C0", "-o", 1.0), ("val/seq_acc", "val text", "C1", "-o", 1.0),
                   ("train/char_acc", "train character", "C0", "--", 1.0),
                   ("val/char_acc", "val character", "C1", "--", 1.0))


def learning_curves_figure(scalars: dict[str, list[tuple[int, float]]], title: str = "Learning curves"):
    """Loss and accuracy (whole text and per character) of train and val against the training step;
    ``None`` when the logs hold none of them."""
    from matplotlib.ticker import MaxNLocator

    panels = [(name, [c for c in curves if scalars.get(c[0])]) for name, curves in
              (("loss", LOSS_CURVES), ("accuracy", ACCURACY_CURVES))]
    panels = [(name, curves) for name, curves in panels if curves]
    if not panels:
        return None
    fig = new_figure(6.0 * len(panels), 4.0)
    for k, (name, curves) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        drawn = set()
        for tag, label, color, style, alpha in curves:
            if label in drawn:  # train/loss_epoch and train/loss are the same curve under two names
                continue
            drawn.add(label)
            steps, values = zip(*scalars[tag])
            ax.plot(steps, values, style, color=color, alpha=alpha, label=label, markersize=3, linewidth=1.2)
        ax.set_xlabel("training step")
        ax.set_ylabel(name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        values = [v for tag, *_ in curves for _, v in scalars[tag]]
        if name == "loss" and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")  # CTC losses fall by orders of magnitude
        elif name == "accuracy":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return fig


def reliability_figure(bins: Reliability, title: str = "Reliability"):
    """Accuracy against confidence per confidence bin, beside the diagonal a calibrated model follows,
    with the share of answers in each bin below it; the title gives the expected calibration error."""
    fig = new_figure(5.5, 5.5)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    width = np.diff(bins.edges)
    centers = bins.edges[:-1] + width / 2
    filled = bins.count > 0
    top.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="calibrated")
    top.bar(centers[filled], bins.accuracy[filled], width=width[filled] * 0.9, color="#4c72b0", label="accuracy")
    top.plot(bins.confidence[filled], bins.accuracy[filled], "o", color="C1", markersize=4,
             label="mean confidence of the bin")
    top.set_ylim(0, 1.02)
    top.set_ylabel("accuracy of the answers")
    top.legend(fontsize=8, loc="upper left")
    top.grid(alpha=0.3)
    total = max(int(bins.count.sum()), 1)
    bottom.bar(centers, bins.count / total, width=width * 0.9, color="gray")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence of the answer")
    bottom.set_ylabel("share")
    top.set_title(f"{title}\nexpected calibration error {bins.expected_calibration_error:.3f}, {total} answers",
                  fontsize=10)
    return fig


def error_figures(report: ErrorReport) -> dict[str, np.ndarray]:
    """The confusion matrix and the accuracy per position, drawn once as RGB arrays for both
    TensorBoard and PNG files."""
    return {"confusion": figure_to_array(confusion_figure(report)),
            "position_accuracy": figure_to_array(position_accuracy_figure(report))}


def save_image(image, path: str | Path) -> Path:
    """An RGB array or PIL image -> a PNG file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))).save(path)
    return path
