"""Per-stage metrics: whole-text and per-character accuracy, CER, and per-position accuracy over the
samples whose length is right."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torchmetrics import MeanMetric, Metric
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
