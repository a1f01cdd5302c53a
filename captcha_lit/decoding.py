"""Turning logits into text and confidences, for both decoder kinds.

numpy only, so the torch-free runtime decodes with the very same code as training,
eval and predict. Logits may be numpy arrays or torch tensors.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from captcha_lit.charset import Charset

if TYPE_CHECKING:
    from captcha_lit.spec import ModelSpec


@dataclass
class Decoded:
    indices: list[list[int]]  # class indices per sample, padding and blanks removed
    char_conf: list[list[float]]  # probability of each decoded character
    seq_conf: list[float]  # probability of the whole text (product of its characters)


@dataclass(frozen=True)
class Solution:
    """One image's reading."""

    text: str
    confidence: float  # probability of the whole text
    char_confidences: list[float]  # probability of each character of ``text``
    # Why the reading cannot be right whatever its confidence (empty, or a length the model was not
    # trained for); None when its length is in the model's range.
    unsure: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def decode(spec: ModelSpec, logits, beam_width: int | None = None) -> Decoded:
    """Logits -> class indices and confidences, as ``spec`` says: CTC (prefix beam search when the
    beam width, ``beam_width`` or the spec's own, is above 1, else greedy) or positional."""
    if spec.temperature != 1.0:  # calibrated confidences; the argmax, and so every greedy reading, stays
        logits = _as_float_array(logits) / spec.temperature
    if spec.decoder == "ctc":
        width = spec.beam_width if beam_width is None else int(beam_width)
        if width > 1:
            return decode_ctc_beam(logits, blank=spec.blank, beam_width=width)
        return decode_ctc_greedy(logits, blank=spec.blank)
    return decode_positional(logits, end_class=spec.end_class)


def read_logits(spec: ModelSpec, logits, beam_width: int | None = None) -> tuple[list[Solution], Decoded]:
    """Logits -> each sample's text and confidences: the one path from a model's output to text,
    for training metrics, eval, predict, export, visualize, the benchmarks and the ONNX runtime."""
    decoded = decode(spec, logits, beam_width)
    charset = _charset(spec.charset)
    solutions = [Solution(charset.decode(indices), confidence, char_conf, unsure_reason(spec, len(indices)))
                 for indices, char_conf, confidence in zip(decoded.indices, decoded.char_conf, decoded.seq_conf)]
    return solutions, decoded


def check_min_confidence(min_confidence) -> float | None:
    if min_confidence is None:
        return None
    if isinstance(min_confidence, bool) or not isinstance(min_confidence, (int, float)) or not 0 <= min_confidence <= 1:
        raise ValueError(f"min_confidence={min_confidence!r} must be a probability in [0, 1], e.g. 0.9 (null: off)")
    return float(min_confidence)


def require_confidence(solutions: list[Solution], min_confidence: float | None) -> list[Solution]:
    """Readings less sure than ``min_confidence`` are marked unsure: whoever uses them should ask
    for another CAPTCHA rather than submit a likely wrong answer. Calibrated models (their spec's
    ``temperature``) make the threshold mean what it says."""
    if min_confidence is None:
        return solutions
    return [solution if solution.unsure is not None or solution.confidence >= min_confidence else
            replace(solution, unsure=f"confidence {solution.confidence:.3f} is below min_confidence={min_confidence:g}")
            for solution in solutions]


def unsure_reason(spec: ModelSpec, length: int) -> str | None:
    """Why a reading of ``length`` characters is not an answer of this model, or None."""
    if length == 0:
        return "empty reading: no characters found"
    if not spec.min_length <= length <= spec.max_length:
        lengths = str(spec.min_length) if not spec.variable_length else f"{spec.min_length}-{spec.max_length}"
        return f"{length} characters, outside the model's {lengths}"
    return None


@functools.lru_cache(maxsize=8)
def _charset(chars: str) -> Charset:
    return Charset(chars)


def _as_float_array(logits) -> np.ndarray:
    if hasattr(logits, "detach"):  # a torch tensor; duck-typed so this module never imports torch
        logits = logits.detach().float().cpu().numpy()
    return np.asarray(logits, dtype=np.float32)


def _log_softmax(logits) -> np.ndarray:
    x = _as_float_array(logits).astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _best_per_step(logits) -> tuple[list[list[int]], list[list[float]]]:
    """(B, S, C) logits -> best class and its probability at each step."""
    x = _as_float_array(logits)
    e = np.exp(x - x.max(-1, keepdims=True))
    probs = e / e.sum(-1, keepdims=True)
    return probs.argmax(-1).tolist(), probs.max(-1).tolist()


def _product(values: list[float]) -> float:
    return float(np.prod(np.asarray(values, dtype=np.float64)))


def decode_positional(logits, end_class: int | None = None) -> Decoded:
    """(B, L, C) -> argmax per position; with ``end_class`` the text stops at the first end symbol."""
    indices, char_conf, seq_conf = [], [], []
    for row_idx, row_conf in zip(*_best_per_step(logits)):
        if end_class is not None and end_class in row_idx:
            stop = row_idx.index(end_class)
            # The end symbol's own confidence belongs to the sequence's probability.
            tail = row_conf[stop]
            row_idx, row_conf = row_idx[:stop], row_conf[:stop]
        else:
            tail = 1.0
        indices.append(row_idx)
        char_conf.append(row_conf)
        seq_conf.append(_product(row_conf + [tail]))
    return Decoded(indices, char_conf, seq_conf)


def decode_ctc_greedy(logits, blank: int) -> Decoded:
    """(B, T, C+1) -> best path: argmax per step, merge repeats, drop blanks.

    A character's confidence is the highest probability over the steps it spans.
    """
    indices, char_conf, seq_conf = [], [], []
    for row_idx, row_conf in zip(*_best_per_step(logits)):
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
        seq_conf.append(_product(out_conf or row_conf))
    return Decoded(indices, char_conf, seq_conf)


def decode_ctc_beam(logits, blank: int, beam_width: int = 8) -> Decoded:
    """(B, T, C+1) -> CTC prefix beam search: the text with the highest total probability,
    summed over every alignment that collapses to it (greedy decoding scores one path only).

    Confidences are defined as in ``decode_ctc_greedy``, read off the best alignment of the
    chosen text, so that both decoders report the same numbers whenever they agree.
    """
    if beam_width < 1:
        raise ValueError(f"beam_width={beam_width} must be at least 1")
    log_probs = _log_softmax(logits)
    indices, char_conf, seq_conf = [], [], []
    for row in log_probs:
        text = _prefix_beam_search(row, blank, beam_width)
        confs, path_conf = _aligned_confidences(row, text, blank)
        indices.append(list(text))
        char_conf.append(confs)
        seq_conf.append(float(np.prod(confs or path_conf, dtype=np.float64)))
    return Decoded(indices, char_conf, seq_conf)


MIN_LOG_PROB = -12.0  # about 6e-6


def _prefix_beam_search(log_probs: np.ndarray, blank: int, beam_width: int) -> tuple[int, ...]:
    """Beam search over collapsed prefixes of one (T, C+1) row of log-probabilities.

    Each prefix keeps two scores: ending in a blank, and ending in its last character;
    a repeated character extends the prefix only after a blank.
    """
    neg_inf = -np.inf
    beams: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, neg_inf)}  # prefix -> (blank, non-blank)
    num_classes = log_probs.shape[1]
    top_k = min(beam_width, num_classes)
    for step in log_probs:
        # Only the step's most likely characters can enter the beam (plus each prefix's own last one);
        # one below MIN_LOG_PROB cannot change the ranking and would only cost time.
        candidates = [int(c) for c in np.argpartition(-step, top_k - 1)[:top_k]
                      if c != blank and step[c] > MIN_LOG_PROB]
        extended: dict[tuple[int, ...], list[float]] = {}

        def add(prefix: tuple[int, ...], slot: int, score: float) -> None:
            entry = extended.setdefault(prefix, [neg_inf, neg_inf])
            entry[slot] = np.logaddexp(entry[slot], score)

        for prefix, (p_blank, p_char) in beams.items():
            total = np.logaddexp(p_blank, p_char)
            add(prefix, 0, total + step[blank])
            last = prefix[-1] if prefix else None
            for c in candidates if last is None or last in candidates else [*candidates, last]:
                p = step[c]
                if c == last:
                    add(prefix, 1, p_char + p)  # the same character continues
                    add(prefix + (c,), 1, p_blank + p)  # a new one, after a blank
                else:
                    add(prefix + (c,), 1, total + p)
        ranked = sorted(extended.items(), key=lambda kv: (-np.logaddexp(*kv[1]), kv[0]))
        beams = {prefix: (scores[0], scores[1]) for prefix, scores in ranked[:beam_width]}
    return next(iter(beams))  # ranked best first


def _aligned_confidences(log_probs: np.ndarray, text: tuple[int, ...], blank: int) -> tuple[list[float], list[float]]:
    """Viterbi-align ``text`` to one (T, C+1) row -> (each character's highest probability over
    the steps aligned to it, the probability of every step of the best alignment)."""
    path, step_log_probs = _viterbi_path(log_probs, text, blank)
    probs = np.exp(step_log_probs)
    confs = [0.0] * len(text)
    for state, p in zip(path, probs):
        if state % 2 == 1:
            confs[state // 2] = max(confs[state // 2], float(p))
    return confs, probs.tolist()


def ctc_character_steps(logits, texts: list[list[int]], blank: int) -> list[list[int]]:
    """(B, T, C+1) logits and each sample's text as class indices -> for each character, the step of
    the text's best alignment (Viterbi) at which that character is most probable; [] where the
    text cannot be aligned (it needs more steps than there are)."""
    steps = []
    for row, text in zip(_log_softmax(logits), texts):
        path, step_log_probs = _viterbi_path(row, tuple(text), blank)
        best = [-1] * len(text)
        for t, (state, lp) in enumerate(zip(path, step_log_probs)):
            if state % 2 == 1 and (best[state // 2] < 0 or lp > step_log_probs[best[state // 2]]):
                best[state // 2] = t
        # A text longer than the row fits no path: the backtrace then skips some of its characters.
        steps.append(best if min(best, default=0) >= 0 else [])
    return steps


def _viterbi_path(log_probs: np.ndarray, text: tuple[int, ...], blank: int) -> tuple[list[int], np.ndarray]:
    """The best alignment of ``text`` to one (T, C+1) row of log-probabilities -> the state of each step
    (2i+1: the text's character i; even: a blank) and each step's log-probability on that path."""
    states = [blank]
    for c in text:
        states += [c, blank]
    num_steps, num_states = log_probs.shape[0], len(states)
    emit = log_probs[:, states]  # (T, S)
    score = np.full(num_states, -np.inf)
    score[0] = emit[0, 0]
    if num_states > 1:
        score[1] = emit[0, 1]
    back = np.zeros((num_steps, num_states), dtype=np.int64)
    # A state may be entered from itself, the state before it, or skip a blank between two different characters.
    can_skip = np.array([s >= 2 and states[s] != blank and states[s] != states[s - 2] for s in range(num_states)])
    for t in range(1, num_steps):
        step = np.full(num_states, -np.inf)
        step[1:] = score[:-1]
        skip = np.full(num_states, -np.inf)
        skip[2:] = score[:-2]
        options = np.stack([score, step, np.where(can_skip, skip, -np.inf)])
        choice = options.argmax(0)
        back[t] = np.arange(num_states) - choice
        score = options.max(0) + emit[t]
    end = num_states - 1 if num_states == 1 or score[-1] >= score[-2] else num_states - 2
    path = [end]
    for t in range(num_steps - 1, 0, -1):
        path.append(int(back[t, path[-1]]))
    path.reverse()
    return path, emit[np.arange(num_steps), path]
