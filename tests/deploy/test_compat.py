"""Checkpoints and ONNX files written by an earlier captcha_lit still load and read the same texts."""

from __future__ import annotations

import json

import pytest

from captcha_lit.predict import open_model, predict_files
from conftest import FIXTURES

FIXTURE = FIXTURES / "compat_640dca3"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


@pytest.mark.parametrize("model", sorted(EXPECTED))
def test_old_model_reads_the_same_texts(model):
    path = str(FIXTURE / model)
    spec, solve = open_model(path)
    expected = EXPECTED[model]
    rows = predict_files([FIXTURE / "images" / e["image"] for e in expected], spec.input_size, spec.channels, solve, 64)
    assert [r["text"] for r in rows] == [e["text"] for e in expected]
    assert [r["confidence"] for r in rows] == pytest.approx([e["confidence"] for e in expected], abs=1e-5)
    for row, want in zip(rows, expected):
        assert row["char_confidences"] == pytest.approx(want["char_confidences"], abs=1e-5)
