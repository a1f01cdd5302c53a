"""What a model gets wrong, character by character, and the features behind its characters.

The test-time callback, eval and ``captcha_lit.visualize`` share these definitions:

- **Alignment.** A prediction is aligned to its true text by edit distance (Levenshtein; on
  ties a substitution wins over a dropped character, which wins over an added one). A
  dropped or added character then counts as one error instead of shifting every
  character after it. A character without a counterpart is paired with ``MISSING``.
- **Confusion matrix.** Counts of the aligned pairs: rows are true characters, columns
  predicted ones. The ``MISSING`` column counts characters the model dropped; the
  ``MISSING`` row counts characters it added.
- **Accuracy per position.** Position i of the true text is right when the alignment pairs
  it with the same character. It differs from ``char_acc`` (which compares position i with
  position i) only where the alignment finds a dropped or added character.
- **Per-character features** (``character_points``): the features the classifier reads,
  one point per character of the true text, labeled with that character and with what the
  model read there. Positional models have one feature per position: position i is the
  point of character i. CTC models have one feature per time step: the true text is aligned
  to the steps (Viterbi, the alignment that also gives CTC confidences), and a character's
  point is the step of its alignment where it is most probable. So every image contributes,
  misread ones too, and a confusion shows as a point among another character's cluster.
  Models whose positions all read one shared vector (``shared_position_features``) give
  one point per image.
- **Confidence.** ``accuracy_at_coverage`` scores the most confident answers only, as a solver
  that retries unsure CAPTCHAs would; ``reliability`` bins answers by confidence for a
  reliability diagram and the expected calibration error.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from captcha_lit.decoding import ctc_character_steps

MISSING = "∅"  # the counterpart of a dropped or added character


def align(truth: str, pred: str) -> list[tuple[str, str]]:
    """Edit-distance alignment -> (true character, predicted character) pairs, ``MISSING`` for a gap."""
    n, m = len(truth), len(pred)
    cost = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        cost[i][0] = i
    for j in range(m + 1):
        cost[0][j] = j
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost[i][j] = min(cost[i - 1][j - 1] + (truth[i - 1] != pred[j - 1]), cost[i - 1][j] + 1,
                             cost[i][j - 1] + 1)
    pairs: list[tuple[str, str]] = []
    i, j = n, m
    while i or j:
        if i and j and cost[i][j] == cost[i - 1][j - 1] + (truth[i - 1] != pred[j - 1]):
            pairs.append((truth[i - 1], pred[j - 1]))
            i, j = i - 1, j - 1
        elif i and cost[i][j] == cost[i - 1][j] + 1:
            pairs.append((truth[i - 1], MISSING))
            i -= 1
        else:
            pairs.append((MISSING, pred[j - 1]))
            j -= 1
    return pairs[::-1]


@dataclass
class ErrorReport:
    """Character-level errors of a set of predictions (see the module docstring for the definitions)."""

    labels: list[str]  # rows and columns of ``confusion``: the charset, then MISSING
    confusion: np.ndarray  # (C+1, C+1) counts; rows true, columns predicted
    position_correct: np.ndarray  # per position of the true text: aligned to the same character
    position_total: np.ndarray  # per position: texts that have it
    num_texts: int
    num_correct: int  # whole texts right

    @property
    def seq_acc(self) -> float:
        return self.num_correct / self.num_texts if self.num_texts else 0.0

    def confused_pairs(self, top: int | None = None) -> list[dict]:
        """The off-diagonal cells, most frequent first: true, predicted, count, and rate (the share of the
        true character's occurrences; empty for added characters, which have no true occurrence)."""
        row_totals = self.confusion.sum(1)
        rows = []
        for i, j in zip(*np.nonzero(self.confusion)):
            if i == j:
                continue
            true = self.labels[i]
            rate = float(self.confusion[i, j] / row_totals[i]) if true != MISSING else None
            rows.append({"true": true, "predicted": self.labels[j], "count": int(self.confusion[i, j]), "rate": rate})
        rows.sort(key=lambda r: (-r["count"], -(r["rate"] or 0.0), self.labels.index(r["true"]),
                                 self.labels.index(r["predicted"])))
        return rows[:top] if top is not None else rows

    def position_accuracy(self) -> list[dict]:
        """Position (1-based), accuracy and how many texts have that position."""
        return [{"position": i + 1, "accuracy": float(c / t) if t else 0.0, "count": int(t)}
                for i, (c, t) in enumerate(zip(self.position_correct, self.position_total))]


def error_report(truths: Sequence[str], preds: Sequence[str], charset: str) -> ErrorReport:
    """Confusion counts, accuracy per position and whole-text accuracy of ``preds`` against ``truths``."""
    if len(truths) != len(preds):
        raise ValueError(f"{len(truths)} true texts but {len(preds)} predictions")
    labels = list(charset)
    # A character outside the charset (a folder label the model cannot emit) still gets its row.
    for text in (*truths, *preds):
        labels.extend(c for c in dict.fromkeys(text) if c not in labels)
    labels.append(MISSING)
    index = {c: i for i, c in enumerate(labels)}
    confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
    longest = max((len(t) for t in truths), default=0)
    position_correct = np.zeros(longest, dtype=np.int64)
    position_total = np.zeros(longest, dtype=np.int64)
    num_correct = 0
    for truth, pred in zip(truths, preds):
        num_correct += truth == pred
        position = 0
        for true_char, pred_char in align(truth, pred):
            confusion[index[true_char], index[pred_char]] += 1
            if true_char != MISSING:
                position_total[position] += 1
                position_correct[position] += true_char == pred_char
                position += 1
    return ErrorReport(labels, confusion, position_correct, position_total, len(truths), num_correct)


def gallery_order(truths: Sequence[str], preds: Sequence[str], confidences: Sequence[float] | None = None) -> list[int]:
    """Indices for a gallery: wrong predictions first, then right ones.

    With confidences, the wrong ones go most confident first (a confident mistake says the
    most, and it may be a wrong label) and the right ones least confident first (the close
    calls). Without, each group keeps its order.
    """
    confidences = list(confidences) if confidences is not None else [0.0] * len(truths)
    wrong = [i for i, (t, p) in enumerate(zip(truths, preds)) if t != p]
    right = [i for i, (t, p) in enumerate(zip(truths, preds)) if t == p]
    wrong.sort(key=lambda i: -confidences[i])
    right.sort(key=lambda i: confidences[i])
    return wrong + right


def accuracy_at_coverage(confidences: Sequence[float], correct: Sequence[bool], coverage: float) -> float | None:
    """The accuracy of the answers kept when the least confident ``1 - coverage`` of them are dropped:
    what a solver scores that answers only when sure and asks for another CAPTCHA otherwise.
    The ``ceil(coverage * N)`` most confident answers are kept (ties in the order given); None for no answers."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage={coverage} must be in (0, 1]")
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences but {len(correct)} right/wrong values")
    if not len(confidences):
        return None
    kept = sorted(range(len(confidences)), key=lambda i: -confidences[i])[:math.ceil(coverage * len(confidences) - 1e-9)]
    return sum(bool(correct[i]) for i in kept) / len(kept)


@dataclass
class Reliability:
    """Confidence against accuracy in equal-width confidence bins (a reliability diagram)."""

    edges: np.ndarray  # (bins + 1,) from 0 to 1
    count: np.ndarray  # answers per bin
    confidence: np.ndarray  # their mean confidence (nan in an empty bin)
    accuracy: np.ndarray  # the share of them that is right (nan in an empty bin)

    @property
    def expected_calibration_error(self) -> float:
        """The mean gap between confidence and accuracy, each bin weighted by its share of the answers."""
        filled = self.count > 0
        total = self.count.sum()
        if not total:
            return 0.0
        gaps = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float((self.count[filled] / total * gaps).sum())


def reliability(confidences: Sequence[float], correct: Sequence[bool], bins: int = 10) -> Reliability:
    """Bin answers by confidence (the last bin includes 1.0) -> counts, mean confidence and accuracy per bin."""
    if bins < 1:
        raise ValueError(f"bins={bins} must be at least 1")
    conf = np.clip(np.asarray(confidences, dtype=np.float64), 0.0, 1.0)
    right = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(which, weights=conf, minlength=bins) / count
        accuracy = np.bincount(which, weights=right, minlength=bins) / count
    return Reliability(edges, count, confidence, accuracy)


@dataclass
class FeaturePoints:
    """Feature vectors with what each one stands for."""

    features: np.ndarray  # (N, D)
    sample: list[int]  # the image each point comes from
    position: list[int]  # the character's position in the text (0-based); -1: the point is the whole image
    true: list[str]  # the true character (the whole text for a whole-image point)
    predicted: list[str]  # what the model read there (MISSING: nothing)

    @classmethod
    def concat(cls, parts: Sequence[FeaturePoints]) -> FeaturePoints:
        if not parts:
            return cls(np.zeros((0, 0), dtype=np.float32), [], [], [], [])
        return cls(np.concatenate([p.features for p in parts]), *(sum((getattr(p, f) for p in parts), [])
                                                                  for f in ("sample", "position", "true", "predicted")))

    @property
    def whole_images(self) -> bool:
        return bool(self.position) and self.position[0] < 0


def character_points(features, logits, truths: Sequence[str], preds: Sequence[str], *, decoder: str, charset: str,
                     shared: bool = False, first_sample: int = 0) -> FeaturePoints:
    """One feature point per character of each image (see the module docstring for the choice of feature).

    ``features``: (B, S, D) from ``forward_features``; ``logits``: the model's (B, S, C) output;
    ``preds``: the decoded texts. ``first_sample`` numbers the images of this batch.
    """
    features = _numpy(features)
    points = FeaturePoints(np.zeros((0, features.shape[-1]), dtype=np.float32), [], [], [], [])
    rows = []
    if decoder == "ctc":
        logits = _numpy(logits)
        best = logits.argmax(-1)
        steps = ctc_character_steps(logits, [[charset.index(c) for c in truth] for truth in truths], blank=len(charset))
        for b, (truth, row_steps) in enumerate(zip(truths, steps)):
            for i, t in enumerate(row_steps):
                rows.append(features[b, t])
                read = best[b, t]
                _add(points, first_sample + b, i, truth[i], charset[read] if read < len(charset) else MISSING)
    elif shared:
        for b, (truth, pred) in enumerate(zip(truths, preds)):
            rows.append(features[b, 0])
            _add(points, first_sample + b, -1, truth, pred)
    else:
        for b, (truth, pred) in enumerate(zip(truths, preds)):
            for i, true_char in enumerate(truth[:features.shape[1]]):
                rows.append(features[b, i])
                _add(points, first_sample + b, i, true_char, pred[i] if i < len(pred) else MISSING)
    if rows:
        points.features = np.stack(rows).astype(np.float32)
    return points


def _add(points: FeaturePoints, sample: int, position: int, true: str, predicted: str) -> None:
    points.sample.append(sample)
    points.position.append(position)
    points.true.append(true)
    points.predicted.append(predicted)


def _numpy(array) -> np.ndarray:
    if hasattr(array, "detach"):
        array = array.detach().float().cpu().numpy()
    return np.asarray(array)


def tsne_2d(features: np.ndarray, perplexity: float = 30.0, seed: int = 0, max_iter: int = 1000) -> np.ndarray:
    """(N, D) -> (N, 2) with scikit-learn's t-SNE, after PCA to 50 dimensions (the usual step that
    removes noise and saves time). Perplexity is capped at (N - 1) / 3 so small sets work."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n = len(features)
    if n < 5:
        raise ValueError(f"t-SNE needs at least 5 feature points, got {n}; raise num_embeddings")
    x = np.asarray(features, dtype=np.float32)
    if x.shape[1] > 50 and n > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    return TSNE(n_components=2, perplexity=min(float(perplexity), (n - 1) / 3), init="pca", learning_rate="auto",
                max_iter=int(max_iter), random_state=seed).fit_transform(x)


def read_logged_scalars(log_dirs: Sequence[str | Path]) -> dict[str, list[tuple[int, float]]]:
    """Scalars a run logged -> {name: [(step, value), ...]}, from TensorBoard event files or a CSVLogger's
    metrics.csv in each folder. A name found in an earlier folder is not read again."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for folder in map(Path, log_dirs):
        if any(folder.glob("events.out.tfevents.*")):
            from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

            events = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
            # Its directory watcher logs every file it opens at INFO, which would land in the run's log.
            tb_log = logging.getLogger("tensorboard")
            level = tb_log.level
            tb_log.setLevel(max(level, logging.WARNING))
            try:
                events.Reload()
            finally:
                tb_log.setLevel(level)
            for tag in events.Tags()[SCALARS]:
                scalars.setdefault(tag, [(e.step, float(e.value)) for e in events.Scalars(tag)])
        table = folder / "metrics.csv"
        if table.is_file():
            found: dict[str, list[tuple[int, float]]] = {}
            with open(table, newline="") as handle:
                for row in csv.DictReader(handle):
                    step = int(float(row.get("step") or 0))
                    for name, value in row.items():
                        if name not in ("step", None) and value not in ("", None):
                            found.setdefault(name, []).append((step, float(value)))
            for name, points in found.items():
                scalars.setdefault(name, points)
    return scalars
