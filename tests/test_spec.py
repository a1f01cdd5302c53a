"""ModelSpec: what a model reads and writes, validated once, stored in checkpoints and ONNX metadata."""

from __future__ import annotations

import dataclasses

import pytest

from captcha_lit.spec import ModelSpec

GRAY_CTC = dict(charset="0-9A-Z", min_length=4, max_length=7, input_size=(64, 160), mean=(0.5,), std=(0.5,),
                decoder="ctc", arch="crnn")


def test_derived_facts():
    ctc = ModelSpec(**GRAY_CTC)
    assert ctc.charset == "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # a preset is expanded
    assert (ctc.channels, ctc.grayscale, ctc.variable_length) == (1, True, True)
    assert (ctc.blank, ctc.end_class, ctc.num_outputs) == (36, None, 37)
    positional = ModelSpec(**{**GRAY_CTC, "decoder": "positional", "arch": "cnn", "mean": (0.5,) * 3,
                              "std": (0.2,) * 3})
    assert (positional.channels, positional.blank, positional.end_class) == (3, None, 36)
    assert positional.output_classes[-1] == "<end>" and ctc.output_classes[-1] == "<blank>"
    fixed = positional.replace(min_length=5, max_length=5)
    assert fixed.end_class is None and fixed.num_outputs == 36


def test_it_is_frozen_and_round_trips():
    spec = ModelSpec(**GRAY_CTC, beam_width=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.charset = "abc"
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert ModelSpec.from_metadata(spec.to_metadata()) == spec
    metadata = spec.to_metadata()
    assert all(isinstance(v, str) for v in metadata.values()) and metadata["blank"] == "36"


@pytest.mark.parametrize("change, message", [
    ({"min_length": 0}, "min_length=0: a CAPTCHA has at least 1 character"),
    ({"max_length": 3}, "max_length=3 is less than min_length=4"),
    ({"min_length": 4.5}, "min_length=4.5 must be a whole number"),
    ({"input_size": (64,)}, "input_size=[64] must be [height, width]"),
    ({"input_size": (64, 0)}, "input_size=[64, 0] must be [height, width]"),
    ({"mean": (0.5, 0.5)}, "need one value per input channel"),
    ({"std": (0.0,)}, "std=[0.0] must be positive"),
    ({"decoder": "attention"}, "decoder='attention': one of positional, ctc"),
    ({"charset": "AAB"}, "duplicate"),
    ({"decoder": "positional", "beam_width": 3}, "beam_width=3 applies to CTC models"),
])
def test_bad_values_are_named(change, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        ModelSpec(**{**GRAY_CTC, **change})


def test_bad_stored_specs_are_named():
    with pytest.raises(ValueError, match="unknown key"):
        ModelSpec.from_dict({**ModelSpec(**GRAY_CTC).to_dict(), "colour": "red"}, "checkpoint 'x.ckpt'")
    with pytest.raises(ValueError, match="incomplete"):
        ModelSpec.from_dict({"charset": "abc"}, "checkpoint 'x.ckpt'")
    metadata = ModelSpec(**{**GRAY_CTC, "decoder": "positional", "arch": "cnn"}).to_metadata()
    with pytest.raises(ValueError, match="end_class=9 does not fit"):
        ModelSpec.from_metadata({**metadata, "end_class": "9"}, "model 'm.onnx'")
    with pytest.raises(ValueError, match="has no captcha_lit metadata"):
        ModelSpec.from_metadata({"charset": "abc"}, "model 'm.onnx'")
