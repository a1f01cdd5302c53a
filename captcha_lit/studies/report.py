"""An audit's report: ``report.md`` and ``report.html`` beside their pictures and ``results.csv``.

The learning curve and the training time cover every point; the reliability diagram, the most
confused characters and the sample errors describe the solver that the summary line names.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from captcha_lit.studies.results import RESULT_COLUMNS, PointResult
from captcha_lit.viz import analysis, plots, writers

log = logging.getLogger(__name__)

FILES = {"learning_curve": "learning_curve.png", "time": "training_time.png", "reliability": "reliability.png",
         "confused": "confused_characters.png", "errors": "sample_errors.png"}


@dataclass
class Section:
    heading: str
    text: list[str] = field(default_factory=list)
    image: str | None = None  # a file beside the report
    rows: list[dict] | None = None  # a table
    columns: Sequence[str] = ()


@dataclass
class AuditFacts:
    """What the report says besides the points' figures."""

    root: Path  # the labeled folder
    split: dict[str, int]  # images per split
    machine: str
    command: str  # how to run (and continue) this audit
    summary: str
    solver: PointResult  # the point the summary names
    coverage: float
    train_command: str  # how to train the solver alone
    confused_pairs: int = 15
    sample_errors: int = 24


def _variant(result: PointResult) -> str:
    return result.point.variant or "the folder recipe"


def _label_axis(ax, results: Sequence[PointResult], num_train: int) -> None:
    counts = sorted({r.point.labels for r in results})
    ax.set_xscale("log")
    ax.set_xticks(counts, [f"all\n{n}" if n == num_train else str(n) for n in counts])
    ax.minorticks_off()
    ax.set_xlabel("training labels")
    ax.grid(alpha=0.3)


def _curves(ax, results: Sequence[PointResult], value) -> None:
    for variant in dict.fromkeys(_variant(r) for r in results):
        points = sorted((r.point.labels, value(r)) for r in results if _variant(r) == variant and value(r) is not None)
        if points:
            ax.plot(*zip(*points), "-o", markersize=4, label=variant)
    ax.legend(fontsize=8)


def learning_curve_figure(results: Sequence[PointResult], num_train: int, coverage: float):
    fig = plots.new_figure(11.0, 4.2)
    for k, (title, value) in enumerate((("test sequence accuracy", lambda r: r.seq_acc),
                                        (f"accuracy of the {coverage:.0%} most confident answers",
                                         lambda r: r.covered_acc))):
        ax = fig.add_subplot(1, 2, k + 1)
        _curves(ax, results, value)
        _label_axis(ax, results, num_train)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(title, fontsize=10)
    fig.suptitle("Learning curve: the same test split at every label count", fontsize=11)
    return fig


def time_figure(results: Sequence[PointResult], num_train: int, machine: str):
    fig = plots.new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    _curves(ax, results, lambda r: r.minutes)
    _label_axis(ax, results, num_train)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("minutes (wall clock, data included)")
    ax.set_title(f"Time to train on {machine}", fontsize=9)
    return fig


def confused_figure(pairs: list[dict]):
    fig = plots.new_figure(6.0, max(2.0, 0.3 * len(pairs) + 1.0))
    ax = fig.add_subplot()
    from matplotlib.ticker import MaxNLocator

    names = [f"{p['predicted']} added" if p["true"] == analysis.MISSING else f"{p['true']} dropped"
             if p["predicted"] == analysis.MISSING else f"{p['true']} read as {p['predicted']}" for p in pairs][::-1]
    ax.barh(names, [p["count"] for p in pairs][::-1], color="#c44e52")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("times in the test split")
    ax.set_title("Most confused characters", fontsize=10)
    return fig


def errors_image(result: PointResult, root: Path, limit: int) -> Image.Image | None:
    """The solver's wrong test answers, most confident first, as the original images."""
    rows = result.predictions
    order = analysis.gallery_order([r["text"] for r in rows], [r["prediction"] for r in rows],
                                   [r["confidence"] for r in rows])
    wrong = [rows[i] for i in order if not rows[i]["right"] and rows[i].get("file") and (root / rows[i]["file"]).is_file()]
    wrong = wrong[:limit]
    if not wrong:
        return None
    images = [Image.open(root / row["file"]).convert("RGB") for row in wrong]
    size = images[0].size
    array = np.stack([np.asarray(image.resize(size, Image.BILINEAR)) for image in images])
    return plots.prediction_gallery(array, [r["text"] for r in wrong], [r["prediction"] for r in wrong],
                                    [r["confidence"] for r in wrong], columns=6,
                                    title=f"{len(wrong)} wrong test answers, most confident first")


def write_report(out_dir: Path, results: Sequence[PointResult], facts: AuditFacts) -> dict[str, Path]:
    """Pictures, results.csv, report.md and report.html into ``out_dir`` -> the files written."""
    num_train = facts.split["train"]
    files: dict[str, Path] = {"results": writers.write_csv(out_dir / "results.csv", [r.row() for r in results],
                                                           RESULT_COLUMNS)}
    files["learning_curve"] = plots.save_figure(learning_curve_figure(results, num_train, facts.coverage),
                                                out_dir / FILES["learning_curve"])
    files["time"] = plots.save_figure(time_figure(results, num_train, facts.machine), out_dir / FILES["time"])
    solver = facts.solver
    described = f"labels={solver.point.labels}" + (f", {solver.point.variant}" if solver.point.variant else "")
    diagnostics = [Section(f"The solver: {described}", [
        f"The pictures below describe the point that the summary names, trained in `{solver.run_dir}`. "
        f"Train it alone with `{facts.train_command}`."])]
    if solver.predictions:
        confidences = [r["confidence"] for r in solver.predictions]
        bins = analysis.reliability(confidences, [r["right"] for r in solver.predictions])
        files["reliability"] = plots.save_figure(plots.reliability_figure(bins, "Reliability on the test split"),
                                                 out_dir / FILES["reliability"])
        diagnostics.append(Section("Reliability", [
            "Each bar is the accuracy of the test answers whose confidence falls in that bin; a calibrated model's "
            "bars reach the diagonal. Below: the share of answers in each bin."], FILES["reliability"]))
        report = analysis.error_report([r["text"] for r in solver.predictions],
                                       [r["prediction"] for r in solver.predictions], "")
        pairs = report.confused_pairs(facts.confused_pairs)
        if pairs:
            files["confused"] = plots.save_figure(confused_figure(pairs), out_dir / FILES["confused"])
        diagnostics.append(Section("Most confused characters", [
            "Texts are aligned to the answers by edit distance; rate is the share of the true character's "
            "occurrences." if pairs else "No character was confused."], FILES["confused"] if pairs else None,
            pairs or None, writers.PAIR_COLUMNS))
        gallery = errors_image(solver, facts.root, facts.sample_errors)
        if gallery is not None:
            files["errors"] = plots.save_image(gallery, out_dir / FILES["errors"])
        diagnostics.append(Section("Sample errors", [
            "The original images of wrong answers, most confident first; a wrong character is red."
            if gallery is not None else "No wrong answer with an image file to show."],
            FILES["errors"] if gallery is not None else None))
    else:
        diagnostics.append(Section("Confidence", ["The runs wrote no test_predictions.csv (its callback is "
                                                  "callbacks.test_predictions), so there is no coverage, "
                                                  "reliability or error analysis."]))
    sections = [
        Section("Setup", [
            f"Folder `{facts.root}`: {facts.split['train']} training, {facts.split['val']} validation and "
            f"{facts.split['test']} test images. Every point trains on a subset of the training images (each "
            "smaller one inside every larger one) and is scored on the same test images.",
            f"Machine: {facts.machine}. Run or continue this audit with `{facts.command}`."]),
        Section("Results", [f"At coverage {facts.coverage:.0%}, only the most confident {facts.coverage:.0%} of "
                            "the test answers are kept (the rest would be retried). Minutes are wall-clock time from "
                            "the start of the training process."],
                rows=[_table_row(r) for r in results], columns=TABLE_COLUMNS),
        Section("Learning curve", [], FILES["learning_curve"]),
        Section("Training time", [], FILES["time"]),
        *diagnostics,
    ]
    files["md"], files["html"] = _render(out_dir, f"CAPTCHA audit: {facts.root.name}", facts.summary, sections)
    return files


TABLE_COLUMNS = ("labels", "variant", "test seq acc", "acc at coverage", "calibration error", "minutes", "steps")


def _table_row(result: PointResult) -> dict:
    return {"labels": result.point.labels, "variant": _variant(result), "test seq acc": result.seq_acc,
            "acc at coverage": result.covered_acc, "calibration error": result.calibration_error,
            "minutes": f"{result.minutes:.1f}" if result.minutes is not None else None, "steps": result.steps}


def _render(out_dir: Path, title: str, summary: str, sections: Sequence[Section]) -> tuple[Path, Path]:
    md = [f"# {title}\n", f"**{summary}**\n"]
    body = [f"<h1>{html.escape(title)}</h1>", f"<p><strong>{html.escape(summary)}</strong></p>"]
    for section in sections:
        md.append(f"## {section.heading}\n")
        body.append(f"<h2>{html.escape(section.heading)}</h2>")
        for text in section.text:
            md.append(text + "\n")
            body.append(f"<p>{html.escape(text)}</p>")
        if section.rows:
            md.append(writers.markdown_table(section.rows, section.columns))
            body.append(writers.html_table(section.rows, section.columns))
        if section.image:
            md.append(f"![{section.heading}]({section.image})\n")
            body.append(f'<p><img src="{section.image}" alt="{html.escape(section.heading)}" style="max-width:100%"></p>')
    (out_dir / "report.md").write_text("\n".join(md))
    (out_dir / "report.html").write_text(writers.html_page(title, body))
    return out_dir / "report.md", out_dir / "report.html"
