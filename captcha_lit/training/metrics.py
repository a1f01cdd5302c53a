"""Per-stage metrics: whole-text and per-character accuracy, CER, and per-position accuracy over the
samples whose length is right."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import BinaryCalibrationError
from torchmetrics.text import CharErrorRate


class PositionAccuracy(Metric):
    """Per-position accuracy over the samples whose predicted length equals the target's.

    Without a length match there is no position to compare, and it reads 0; ``len_acc``
    (the fraction of samples with the right length) says how many samples it covers.
    """

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, matches: torch.Tensor) -> None:
        self.correct += matches.sum()
        self.total += matches.numel()

    def compute(self) -> torch.Tensor:
        return self.correct / self.total if self.total > 0 else torch.zeros_like(self.correct)


def stage_metrics(evaluation: bool) -> nn.ModuleDict:
    metrics = {"loss": MeanMetric(), "seq_acc": MeanMetric(), "char_acc": MeanMetric()}
    if evaluation:
        metrics["cer"] = CharErrorRate()
        metrics["len_acc"] = MeanMetric()
        metrics["pos_acc"] = PositionAccuracy()
        # How far the whole text's confidence is from how often it is right (10 bins, weighted).
        metrics["ece"] = BinaryCalibrationError(n_bins=10, norm="l1")
    return nn.ModuleDict(metrics)


class Match(NamedTuple):
    seq: torch.Tensor  # per sample: the whole text is right
    chars: torch.Tensor  # per target character: the prediction has it at the same position
    same_length: torch.Tensor  # per sample: the prediction has the target's length
    positions: torch.Tensor  # per character of the samples with the right length: it is right


def match_texts(pred_rows: list[list[int]], targets: torch.Tensor) -> Match:
    seq, chars, same_length, positions = [], [], [], []
    for pred, target in zip(pred_rows, targets.tolist()):
        target = [t for t in target if t >= 0]
        seq.append(float(pred == target))
        hits = [float(i < len(pred) and pred[i] == t) for i, t in enumerate(target)]
        chars.extend(hits)
        same_length.append(float(len(pred) == len(target)))
        if len(pred) == len(target):
            positions.extend(hits)
    return Match(torch.tensor(seq), torch.tensor(chars), torch.tensor(same_length), torch.tensor(positions))


def greedy_indices(spec, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, C) logits -> the greedy reading of each sample as class indices, (B, S) padded with
    -1, and its length: the decoding of ``captcha_lit.decoding`` (greedy CTC: repeats merged and
    blanks dropped; positional: up to the first end symbol), in tensors, for every training step."""
    best = logits.argmax(-1)
    if spec.decoder == "ctc":
        previous = torch.cat([torch.full_like(best[:, :1], spec.blank), best[:, :-1]], dim=1)
        keep = (best != spec.blank) & (best != previous)
    elif spec.end_class is not None:
        keep = (best == spec.end_class).cumsum(1) == 0
    else:
        keep = torch.ones_like(best, dtype=torch.bool)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept steps first, in order
    lengths = keep.sum(1)
    steps = torch.arange(best.shape[1], device=best.device)
    return best.gather(1, order).masked_fill(steps[None] >= lengths[:, None], -1), lengths


def match_greedy(spec, logits: torch.Tensor, targets: torch.Tensor) -> Match:
    """``match_texts`` of the greedy readings, without leaving tensors (a training step's metrics)."""
    predicted, lengths = greedy_indices(spec, logits)
    width = targets.shape[1]
    if predicted.shape[1] < width:
        predicted = torch.nn.functional.pad(predicted, (0, width - predicted.shape[1]), value=-1)
    valid = targets >= 0
    hits = (predicted[:, :width] == targets) & valid
    target_lengths = valid.sum(1)
    same_length = lengths == target_lengths
    seq = same_length & (hits.sum(1) == target_lengths)
    return Match(seq.float(), hits[valid].float(), same_length.float(), hits[same_length][valid[same_length]].float())
