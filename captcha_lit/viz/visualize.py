"""See what a checkpoint learned, as files: no TensorBoard needed.

    python -m captcha_lit.visualize ckpt_path=outputs/train/runs/<time>/checkpoints/last.ckpt
    python -m captcha_lit.visualize ckpt_path=PATH split=val num_embeddings=2000

Writes into its run directory (``outputs/visualize/runs/<time>/``), with ``index.md`` and
``index.html`` linking everything:

- ``samples.png``: images of the split with the checkpoint's training augmentation, labeled;
- ``gallery.png``: predictions, wrong ones first (most confident first), framed red or green;
  ``predictions.csv`` holds every image's text, prediction and confidence;
- ``confusion.png``/``.csv``, ``position_accuracy.png``/``.csv``, ``confused_pairs.md``/``.csv``:
  errors by character (definitions in ``captcha_lit.viz.analysis``);
- ``tsne.png``: a t-SNE map of per-character features of ``num_embeddings`` images, and
  ``projector/``, the same features for TensorBoard's projector with labels and image sprites;
- ``learning_curves.png``: from the training run's logs, when they sit next to the checkpoint.

The data and preprocessing config come from the checkpoint, as in eval.
"""

from __future__ import annotations

import html
import importlib.util
import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset

from captcha_lit.viz import analysis, plots, writers
from captcha_lit.training.builders import build_datamodule
from captcha_lit.training.checkpoints import load_module
from captcha_lit.data.datamodule import collate
from captcha_lit.data.transforms import BatchAugment
from captcha_lit.eval import resolve_data_config, set_beam_width
from captcha_lit.training.inference import read_images
from captcha_lit.utils import output_dir, write_json

log = logging.getLogger(__name__)

SPLITS = {"test": "test", "val": "validate"}  # split -> the datamodule stage that loads it


@torch.inference_mode()
def run_model(module, dataset, batch_size: int, num_embeddings: int, device: str):
    """Every image of ``dataset`` through the model -> (true texts, predictions, confidences, the
    per-character feature points of the first ``num_embeddings`` images)."""
    truths, preds, confidences, parts = [], [], [], []
    shared = bool(getattr(module.net, "shared_position_features", False))
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate):
        start = len(truths)
        batch_texts = [module.charset.decode(row) for row in batch["target"].tolist()]
        take = min(len(batch_texts), num_embeddings - start)
        reading = read_images(module, batch["image"], batch_size=batch_size, keep_logits=take > 0)
        texts = reading.texts
        truths += batch_texts
        preds += texts
        confidences += [s.confidence for s in reading.solutions]
        if take > 0:
            features = module.forward_features(module.preprocess(batch["image"][:take].to(device)))
            parts.append(analysis.character_points(
                features, reading.logits[:take], batch_texts[:take], texts[:take],
                decoder=module.spec.decoder, charset=module.spec.charset, shared=shared, first_sample=start,
            ))
    return truths, preds, confidences, analysis.FeaturePoints.concat(parts)


def _augmented_samples(module, dataset, count: int, seed: int) -> tuple[torch.Tensor, bool]:
    """The first ``count`` images with the checkpoint's training augmentation (the same parameters
    drive both augmentation backends), as uint8; and whether there was any augmentation."""
    images = torch.stack([dataset[i]["image"] for i in range(count)])
    settings = {k: v for k, v in module.hparams.augmentation.items() if k != "backend"}
    if not settings:
        return images, False
    torch.manual_seed(seed)
    augmented = BatchAugment(**settings)(module.preprocess.to_float(images))
    return augmented.mul(255).round().clamp(0, 255).to(torch.uint8), True


def _training_log_dirs(ckpt_path: str) -> list[Path]:
    """Folders of the checkpoint's training run that hold TensorBoard events or a CSVLogger's metrics.csv."""
    ckpt = Path(ckpt_path).resolve()
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    found = {p.parent for p in run_dir.glob("**/events.out.tfevents.*")}
    found |= {p.parent for p in run_dir.glob("**/metrics.csv")}
    return sorted(found)


def _embedding_metadata(points: analysis.FeaturePoints, truths: list[str], preds: list[str]):
    """Projector columns and rows, and the t-SNE panels (title, label of each point)."""
    if points.whole_images:
        longest = max(len(t) for t in points.true)
        header = ["text", "prediction", "right", "image"] + [f"char {i + 1}" for i in range(longest)]
        rows = [[t, p, t == p, s] + [t[i] if i < len(t) else "" for i in range(longest)]
                for t, p, s in zip(points.true, points.predicted, points.sample)]
        panels = [(f"colored by the character at position {i + 1}", [t[i] if i < len(t) else "" for t in points.true])
                  for i in range(longest)]
        return header, rows, panels
    header = ["character", "read", "position", "right", "text", "prediction", "image"]
    rows = [[t, p, pos + 1, t == p, truths[s], preds[s], s]
            for t, p, pos, s in zip(points.true, points.predicted, points.position, points.sample)]
    panels = [("colored by true character", points.true),
              ("colored by position in the text", [str(pos + 1) for pos in points.position])]
    return header, rows, panels


def _check(cfg: DictConfig) -> None:
    missing = [name for name in ("matplotlib", "sklearn") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"captcha_lit.visualize needs {' and '.join(missing)}; "
                         "install them with pip install -e '.[viz]'")
    if cfg.split not in SPLITS:
        raise ValueError(f"split={cfg.split!r}: use one of {', '.join(SPLITS)}")
    if cfg.get("num_images") is not None and int(cfg.num_images) < 1:
        raise ValueError(f"num_images={cfg.num_images} must be at least 1 (null: the whole split)")
    if int(cfg.num_embeddings) < 0:
        raise ValueError(f"num_embeddings={cfg.num_embeddings} must be >= 0 (0 skips t-SNE and the projector)")
    for group in ("samples", "gallery"):
        for key in ("num_images", "columns"):
            if int(cfg[group][key]) < 1:
                raise ValueError(f"{group}.{key}={cfg[group][key]} must be at least 1")
    if int(cfg.tsne.max_iter) < 250:
        raise ValueError(f"tsne.max_iter={cfg.tsne.max_iter} must be at least 250 (scikit-learn's minimum)")
    if cfg.device not in ("cpu", "cuda", "auto"):
        raise ValueError(f"device={cfg.device!r}: use cpu, cuda or auto")


def visualize(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Write every picture into the run directory; return what metrics.json holds."""
    start = time.time()
    _check(cfg)
    out_dir = Path(output_dir(cfg))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else str(cfg.device)
    module, state = load_module(cfg.ckpt_path, map_location=device)
    set_beam_width(module, cfg.get("beam_width"))
    datamodule = build_datamodule(resolve_data_config(cfg, state, overrides or []))
    datamodule.setup(SPLITS[cfg.split])
    dataset = datamodule.datasets[cfg.split]
    if cfg.get("num_images") is not None and int(cfg.num_images) < len(dataset):
        dataset = Subset(dataset, range(int(cfg.num_images)))
    log.info("running %s on %d %s images", module.spec.arch, len(dataset), cfg.split)
    truths, preds, confidences, points = run_model(module, dataset, datamodule.eval_batch_size,
                                                   int(cfg.num_embeddings), device)
    files: dict[str, Path] = {}
    arch = module.spec.arch

    samples, augmented = _augmented_samples(module, dataset, min(int(cfg.samples.num_images), len(dataset)),
                                            int(cfg.seed))
    samples_are = ("with the checkpoint's training augmentation" if augmented else
                   "as they are (the checkpoint trained without augmentation)")
    files["samples"] = plots.save_image(
        plots.sample_grid(samples, truths[:len(samples)], columns=int(cfg.samples.columns),
                          title=f"{cfg.split} images {samples_are}"), out_dir / "samples.png")

    order = analysis.gallery_order(truths, preds, confidences)[:int(cfg.gallery.num_images)]
    wrong = sum(t != p for t, p in zip(truths, preds))
    gallery = plots.prediction_gallery(torch.stack([dataset[i]["image"] for i in order]), [truths[i] for i in order],
                                       [preds[i] for i in order], [confidences[i] for i in order],
                                       columns=int(cfg.gallery.columns),
                                       title=f"{arch} on {len(truths)} {cfg.split} images: {wrong} read wrong; "
                                             "wrong first")
    files["gallery"] = plots.save_image(gallery, out_dir / "gallery.png")
    files["predictions"] = writers.write_csv(
        out_dir / "predictions.csv",
        [{"image": i, "text": t, "prediction": p, "confidence": round(c, 6), "right": t == p}
         for i, (t, p, c) in enumerate(zip(truths, preds, confidences))],
        ("image", "text", "prediction", "confidence", "right"))

    report = analysis.error_report(truths, preds, module.charset.chars)
    files.update(writers.write_error_analysis(report, out_dir, int(cfg.top_pairs), plots.error_figures(report)))

    features_are = ("one point per image: its positions share one feature vector" if points.whole_images else
                    "one point per character: the aligned time step where CTC finds it most probable"
                    if module.spec.decoder == "ctc" else "one point per character: its position's feature")
    if len(points.sample):
        header, rows, panels = _embedding_metadata(points, truths, preds)
        coords = analysis.tsne_2d(points.features, perplexity=float(cfg.tsne.perplexity), seed=int(cfg.seed),
                                  max_iter=int(cfg.tsne.max_iter))
        fig = plots.tsne_figure(coords, panels, title=f"t-SNE of {arch} features from {len(set(points.sample))} "
                                                      f"{cfg.split} images, {features_are}")
        files["tsne"] = plots.save_figure(fig, out_dir / "tsne.png")
        thumbnails = torch.stack([dataset[s]["image"] for s in points.sample])
        files["projector"] = writers.write_projector(out_dir / "projector", points, header, rows, thumbnails)
    elif int(cfg.num_embeddings):
        log.warning("no feature points: no true text could be aligned to the model's output")

    log_dirs = _training_log_dirs(cfg.ckpt_path)
    curves = plots.learning_curves_figure(analysis.read_logged_scalars(log_dirs)) if log_dirs else None
    if curves is not None:
        files["learning_curves"] = plots.save_figure(curves, out_dir / "learning_curves.png")

    summary = {"ckpt_path": str(Path(cfg.ckpt_path).resolve()), "split": cfg.split, "num_images": len(truths),
               "seq_acc": report.seq_acc, "character_errors": int(report.confusion.sum() - np.trace(report.confusion)),
               "feature_points": len(points.sample), "features": features_are, "samples": samples_are}
    files["index_md"], files["index_html"] = write_index(out_dir, cfg, summary, report, files, log_dirs)
    summary["files"] = {k: str(v) for k, v in files.items()}
    summary["wall_time_s"] = round(time.time() - start, 2)
    write_json(out_dir / "metrics.json", summary)
    print(f"\n{arch} on {len(truths)} {cfg.split} images: seq_acc {report.seq_acc:.4f}, {wrong} wrong\n"
          f"pictures: {out_dir / 'index.html'} (and index.md)")
    return summary


def write_index(out_dir: Path, cfg: DictConfig, summary: dict, report: analysis.ErrorReport,
                files: dict[str, Path], log_dirs: list[Path]) -> tuple[Path, Path]:
    """index.md and index.html: one section per picture, each with what it shows and links to its data."""
    def name(key: str) -> str | None:
        return files[key].name if key in files else None

    pairs = report.confused_pairs(int(cfg.top_pairs))
    sections = [
        ("Samples", f"{cfg.split.capitalize()} images {summary['samples']}, with their labels.", name("samples"), []),
        ("Predictions", "Wrong predictions first (most confident first), framed red; then right ones (least "
                        "confident first), framed green. The true text is above what the model read; a wrong "
                        "character is red, a dropped or added one shows as ·.", name("gallery"),
         [name("predictions")]),
        ("Confusion by character", "Rows: true characters; columns: what the model read. Texts are aligned to "
                                   f"predictions by edit distance; {analysis.MISSING} marks a dropped or added "
                                   "character.", name("confusion_png"), [name("confusion_csv")]),
        ("Most confused pairs", "The most frequent (true, read) pairs off the diagonal; rate is the share of the "
                                "true character's occurrences.", None,
         [name("confused_pairs_md"), name("confused_pairs_csv")]),
        ("Accuracy per position", "How often each position of the true text is read right, after alignment.",
         name("position_accuracy_png"), [name("position_accuracy_csv")]),
    ]
    if "tsne" in files:
        sections.append(("Features (t-SNE)", f"The features the classifier reads ({summary['features']}), "
                                             f"{summary['feature_points']} points mapped to 2-D with t-SNE. Explore "
                                             f"them with `tensorboard --logdir {files['projector']}` (Projector "
                                             "tab).", name("tsne"), ["projector/"]))
    if "learning_curves" in files:
        sections.append(("Learning curves", "Train and val loss and accuracy, from the training run's logs.",
                         name("learning_curves"), []))
    else:
        sections.append(("Learning curves", "No training logs next to the checkpoint "
                                            f"({', '.join(map(str, log_dirs)) or 'none found'}).", None, []))
    title = f"captcha_lit: {summary['ckpt_path']}"
    lead = (f"{summary['num_images']} {cfg.split} images, {summary['seq_acc']:.2%} read right, "
            f"{summary['character_errors']} character errors.")

    md = [f"# {title}\n", lead + "\n"]
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(lead)}</p>"]
    for heading, text, image, links in sections:
        md.append(f"## {heading}\n")
        body.append(f"<h2>{html.escape(heading)}</h2>")
        if text:
            md.append(text + "\n")
            body.append(f"<p>{html.escape(text)}</p>")
        if heading == "Most confused pairs":
            md.append(writers.markdown_table(pairs, writers.PAIR_COLUMNS) if pairs else "No character was confused.\n")
            body.append(writers.html_table(pairs, writers.PAIR_COLUMNS) if pairs else "<p>No character was confused.</p>")
        if image:
            md.append(f"![{heading}]({image})\n")
            body.append(f'<p><a href="{image}"><img src="{image}" alt="{html.escape(heading)}" '
                        'style="max-width:100%"></a></p>')
        links = [link for link in links if link]
        if links:
            md.append("Data: " + ", ".join(f"[{link}]({link})" for link in links) + "\n")
            body.append("<p>Data: " + ", ".join(f'<a href="{link}">{html.escape(link)}</a>' for link in links) + "</p>")
    (out_dir / "index.md").write_text("\n".join(md))
    (out_dir / "index.html").write_text(writers.html_page(title, body))
    return out_dir / "index.md", out_dir / "index.html"
