"""Decoding: greedy CTC vs prefix beam search, positional with an end symbol, confidences, and the module's choice."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from captcha_lit.decoding import decode_ctc_beam, decode_ctc_greedy, decode_positional

BLANK = 3  # 3 characters + blank
# A best path and the text it collapses to.
CTC_PATHS = [
    ([0, 0, 0, 1], [0, 1]),  # repeats merge
    ([0, BLANK, 0, 1], [0, 0, 1]),  # a blank separates a doubled character
    ([0, 0, BLANK, BLANK, 0, 0], [0, 0]),
    ([BLANK, 2, BLANK, 1, BLANK], [2, 1]),  # blanks dropped
    ([BLANK, BLANK, BLANK, BLANK], []),  # all blank -> empty
    ([2, 2, 2, 2], [2]),
]


def _peaked(rows: list[list[int]], num_classes: int = BLANK + 1, peak: float = 6.0, seed: int = 0) -> torch.Tensor:
    """Logits whose argmax follows ``rows``, with random (but clearly lower) other classes."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(rows), len(rows[0]), num_classes, generator=gen)
    for b, row in enumerate(rows):
        for t, k in enumerate(row):
            logits[b, t, k] += peak
    return logits


def _most_likely_text(log_probs: np.ndarray, blank: int) -> tuple[int, ...]:
    """Exhaustive search: the text with the highest probability summed over all its alignments."""
    totals: dict[tuple[int, ...], float] = {}
    for path in itertools.product(range(log_probs.shape[1]), repeat=log_probs.shape[0]):
        text, prev = [], None
        for k in path:
            if k != blank and k != prev:
                text.append(k)
            prev = k
        score = float(sum(log_probs[t, k] for t, k in enumerate(path)))
        totals[tuple(text)] = np.logaddexp(totals.get(tuple(text), -np.inf), score)
    return max(totals, key=totals.get)


@pytest.mark.parametrize(("path", "expected"), CTC_PATHS)
@pytest.mark.parametrize("beam_width", [2, 8])
def test_beam_agrees_with_greedy_on_clear_paths(path, expected, beam_width):
    logits = _peaked([path])
    greedy = decode_ctc_greedy(logits, blank=BLANK)
    beam = decode_ctc_beam(logits, blank=BLANK, beam_width=beam_width)
    assert greedy.indices == beam.indices == [expected]
    # Same text -> same confidences: both read them off the best alignment.
    assert beam.char_conf[0] == pytest.approx(greedy.char_conf[0], rel=1e-5)
    assert beam.seq_conf[0] == pytest.approx(greedy.seq_conf[0], rel=1e-5)
    assert len(beam.char_conf[0]) == len(expected)
    assert all(0.5 < c <= 1.0 for c in beam.char_conf[0])


def test_empty_output_confidence_is_the_blank_path_probability():
    probs = torch.tensor([[[0.1, 0.0, 0.0, 0.9], [0.2, 0.0, 0.0, 0.8]]]) + 1e-9
    for decoded in (decode_ctc_greedy(probs.log(), BLANK), decode_ctc_beam(probs.log(), BLANK, beam_width=4)):
        assert decoded.indices == [[]] and decoded.char_conf == [[]]
        assert decoded.seq_conf[0] == pytest.approx(0.72, rel=1e-4)


def test_beam_sums_alignments_where_greedy_follows_one_path():
    # Each step: blank 0.6, 'a' 0.4. The best single path is blank-blank (0.36, text ""),
    # but "a" has three paths: a-blank, blank-a, a-a = 0.24 + 0.24 + 0.16 = 0.64.
    logits = torch.tensor([[[0.4, 1e-6, 1e-6, 0.6], [0.4, 1e-6, 1e-6, 0.6]]]).log()
    assert decode_ctc_greedy(logits, blank=BLANK).indices == [[]]
    beam = decode_ctc_beam(logits, blank=BLANK, beam_width=4)
    assert beam.indices == [[0]]
    assert beam.char_conf[0] == pytest.approx([0.4], rel=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_beam_finds_the_most_likely_text(seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 5, 3, generator=gen) * 2  # 2 characters + blank, 5 steps: small enough to enumerate
    decoded = decode_ctc_beam(logits, blank=2, beam_width=16)
    for row, text in zip(logits.log_softmax(-1).double().numpy(), decoded.indices):
        assert tuple(text) == _most_likely_text(row, blank=2)


def test_beam_batch_rows_are_independent():
    rows = [[0, BLANK, 0], [BLANK, BLANK, BLANK], [1, 1, 2]]
    together = decode_ctc_beam(_peaked(rows), blank=BLANK, beam_width=4)
    assert together.indices == [[0, 0], [], [1, 2]]
    alone = decode_ctc_beam(_peaked(rows)[1:2], blank=BLANK, beam_width=4)
    assert alone.indices == [[]]


def test_beam_width_must_be_positive():
    with pytest.raises(ValueError, match="beam_width=0"):
        decode_ctc_beam(_peaked([[0]]), blank=BLANK, beam_width=0)


def test_module_decodes_with_its_beam_width(make_module):
    logits = torch.tensor([[[0.4, 1e-6, 1e-6, 0.6], [0.4, 1e-6, 1e-6, 0.6]]]).log()
    greedy = make_module("crnn", charset="abc", model_kwargs={"dim": 32})
    beam = make_module("crnn", charset="abc", model_kwargs={"dim": 32}, beam_width=4)
    assert greedy.read(logits)[1].indices == [[]]
    assert beam.read(logits)[1].indices == [[0]]
    assert beam.read(logits, beam_width=1)[1].indices == [[]]  # a per-call override
    assert beam.hparams.spec["beam_width"] == 4


def test_beam_width_is_refused_for_positional_models(make_module):
    with pytest.raises(ValueError, match="beam_width=4 applies to CTC models"):
        make_module("cnn", charset="abc", beam_width=4)


# ---- greedy CTC and positional decoding -----------------------------------------------


def _one_hot(rows: list[list[int]], num_classes: int) -> torch.Tensor:
    """Class index sequences -> logits whose argmax is that sequence."""
    logits = torch.full((len(rows), len(rows[0]), num_classes), -10.0)
    for b, row in enumerate(rows):
        for t, k in enumerate(row):
            logits[b, t, k] = 10.0
    return logits


@pytest.mark.parametrize(("path", "expected"), CTC_PATHS)
def test_ctc_greedy(path, expected):
    decoded = decode_ctc_greedy(_one_hot([path], BLANK + 1), blank=BLANK)
    assert decoded.indices == [expected]
    assert len(decoded.char_conf[0]) == len(expected)
    assert decoded.seq_conf[0] == pytest.approx(1.0, abs=1e-6)  # every step is certain


def test_ctc_greedy_batch_rows_are_independent():
    decoded = decode_ctc_greedy(_one_hot([[0, BLANK, 0], [BLANK, BLANK, BLANK], [1, 1, 2]], 4), blank=BLANK)
    assert decoded.indices == [[0, 0], [], [1, 2]]


def test_positional_without_end_class_keeps_every_position():
    decoded = decode_positional(_one_hot([[1, 2, 0, 2]], 3))
    assert decoded.indices == [[1, 2, 0, 2]]
    assert len(decoded.char_conf[0]) == 4


def test_positional_stops_at_end_symbol():
    end = 3
    decoded = decode_positional(_one_hot([[1, 2, end, 0], [0, 1, 2, 0], [end, 1, 1, 1]], 4), end_class=end)
    assert decoded.indices == [[1, 2], [0, 1, 2, 0], []]
    assert [len(c) for c in decoded.char_conf] == [2, 4, 0]
    assert decoded.seq_conf == pytest.approx([1.0] * 3, abs=1e-6)  # every position is certain, the end symbol too


def test_positional_confidence_is_product_of_characters():
    logits = torch.zeros(1, 2, 2)  # uniform over 2 classes -> each position 0.5
    logits[0, :, 0] = 1e-3  # break ties towards class 0
    decoded = decode_positional(logits)
    assert decoded.seq_conf[0] == pytest.approx(0.25, abs=1e-3)

