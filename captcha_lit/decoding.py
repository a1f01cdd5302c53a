"""Turning logits into text and confidences, for both decoder kinds."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Decoded:
    indices: list[list[int]]  # class indices per sample, padding and blanks removed
    char_conf: list[list[float]]  # probability of each decoded character
    seq_conf: list[float]  # probability of the whole text (product of its characters)


def decode_positional(logits: torch.Tensor, end_class: int | None = None) -> Decoded:
    """(B, L, C) -> argmax per position; with ``end_class`` the text stops at the first end symbol."""
    probs = logits.float().softmax(-1)
    conf, idx = probs.max(-1)
    indices, char_conf, seq_conf = [], [], []
    for row_idx, row_conf in zip(idx.tolist(), conf.tolist()):
        if end_class is not None and end_class in row_idx:
            stop = row_idx.index(end_class)
            # The end symbol's own confidence belongs to the sequence's probability.
            tail = row_conf[stop]
            row_idx, row_conf = row_idx[:stop], row_conf[:stop]
        else:
            tail = 1.0
        indices.append(row_idx)
        char_conf.append(row_conf)
        seq_conf.append(float(torch.tensor(row_conf + [tail], dtype=torch.float64).prod()))
    return Decoded(indices, char_conf, seq_conf)


def decode_ctc_greedy(logits: torch.Tensor, blank: int) -> Decoded:
    """(B, T, C+1) -> best path: argmax per step, merge repeats, drop blanks.

    A character's confidence is the highest probability over the steps it spans.
    """
    probs = logits.float().softmax(-1)
    conf, idx = probs.max(-1)
    indices, char_conf, seq_conf = [], [], []
    for row_idx, row_conf in zip(idx.tolist(), conf.tolist()):
        out_idx: list[int] = []
        out_conf: list[float] = []
        prev = blank
        for k, p in zip(row_idx, row_conf):
            if k != blank:
                if k != prev:
                    out_idx.append(k)
                    out_conf.append(p)
                elif out_conf:
                    out_conf[-1] = max(out_conf[-1], p)
            prev = k
        indices.append(out_idx)
        char_conf.append(out_conf)
        # With no characters, the confidence in "nothing here" is the best path's probability.
        seq_conf.append(float(torch.tensor(out_conf or row_conf, dtype=torch.float64).prod()))
    return Decoded(indices, char_conf, seq_conf)
