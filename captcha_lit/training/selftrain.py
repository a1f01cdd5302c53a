"""Self-training on a scheme's unlabeled images (``data.unlabeled_path``): teacher and students.

The run's own model is the first teacher. Each round, the best model so far reads every unlabeled
image; the readings it is sure of (``selftrain.min_confidence`` of the whole text, a length the
model reads, nothing flagged unsure) become labels of a training split that also holds the real
ones (``data.pseudo_labels``), and a student continues from the teacher's weights on it, under
stronger augmentation (``selftrain.augmentation_strength``). Validation and test stay real labels
only, and ``captcha_lit.data.unlabeled`` refuses an unlabeled folder that shares a file with the
labeled one. Each round is a training run of its own in ``<run>/selftrain/round<N>/`` with
``resume=auto``, so an interrupted run continues with the round it was in.
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import os
import time
from pathlib import Path

from omegaconf import DictConfig, open_dict

from captcha_lit.data.unlabeled import decode_unlabeled

log = logging.getLogger(__name__)

# What each round reports of its training run.
ROUND_FIGURES = ("test/seq_acc", "test/char_acc", "test/loss", "val/seq_acc_best", "global_step")


def student_config(cfg: DictConfig, pseudo_labels: Path, teacher: str, out_dir: Path) -> DictConfig:
    student = copy.deepcopy(cfg)
    with open_dict(student):
        student.data.unlabeled_path = None
        student.data.pseudo_labels = str(pseudo_labels)
        student.init_from = teacher
        student.pretrain = "none"
        student.ckpt_path = None
        student.resume = "auto"
        student.paths.output_dir = str(out_dir)
        if student.get("augmentation"):
            strength = float(student.augmentation.get("strength", 1.0))
            student.augmentation.strength = strength * float(cfg.selftrain.augmentation_strength)
    return student


def _write_labels(path: Path, rows: list[tuple[str, str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["filename", "label"])
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(buffer.getvalue(), encoding="utf-8")
    os.replace(tmp, path)


def self_train(cfg: DictConfig, datamodule, teacher: dict, out_dir: str, start_time: float) -> dict:
    """Rounds of pseudo-labeling and student training after the run's own fit -> the final metrics
    (the last student's test metrics and checkpoints), with each round's figures under ``selftrain``."""
    from captcha_lit.train import train
    from captcha_lit.training.checkpoints import load_module
    from captcha_lit.training.inference import read_images

    plan = cfg.get("selftrain")
    if plan is None:
        raise ValueError("data.unlabeled_path needs the selftrain settings of the folder recipe (data=folder)")
    rounds, min_confidence = int(plan.rounds), float(plan.min_confidence)
    if rounds < 1 or not 0 <= min_confidence <= 1:
        raise ValueError(f"selftrain.rounds={plan.rounds} must be >= 1 and selftrain.min_confidence="
                         f"{plan.min_confidence} in [0, 1]")
    files, images = decode_unlabeled(datamodule.unlabeled(), datamodule.input_size, datamodule.channels,
                                     datamodule.cache_dir)
    history = [{"round": 0, "pseudo_labeled": 0, **{k: teacher.get(k) for k in ROUND_FIGURES}}]
    best, final = teacher.get("best_ckpt") or teacher.get("last_ckpt"), teacher
    for number in range(1, rounds + 1):
        module, _ = load_module(best)
        solutions = read_images(module, images).solutions
        kept = [(str(path), s.text) for path, s in zip(files, solutions)
                if s.unsure is None and s.confidence >= min_confidence]
        folder = Path(out_dir) / "selftrain"
        _write_labels(folder / f"pseudo_labels_round{number}.csv", kept)
        log.info("self-training round %d: %d of %d unlabeled images read with confidence >= %g", number, len(kept),
                 len(files), min_confidence)
        if not kept:
            log.warning("self-training stops: the model is sure of none of the unlabeled images")
            break
        final = train(student_config(cfg, folder / f"pseudo_labels_round{number}.csv", best,
                                     folder / f"round{number}"))
        history.append({"round": number, "pseudo_labeled": len(kept), **{k: final.get(k) for k in ROUND_FIGURES}})
        best = final.get("best_ckpt") or final.get("last_ckpt")
    return {**final, "selftrain": {"unlabeled": len(files), "rounds": history},
            "wall_time_s": round(time.time() - start_time, 2)}
