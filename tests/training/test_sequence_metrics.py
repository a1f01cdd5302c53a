"""Sequence metrics, variable-length synthetic training, and generation in several fonts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from captcha_lit.decoding import Decoded, Solution
from captcha_lit.spec import ModelSpec
from captcha_lit.train import train
from captcha_lit.training.builders import build_datamodule
from captcha_lit.training.module import CaptchaModule
from conftest import synthetic_data

SMALL_CRNN = ["model=crnn", "model.channels=[8,16,32,32]", "model.dim=32"]


def _score(predictions: list[str], truths: list[str]) -> dict:
    """Run one test step whose decoder returns ``predictions`` -> the test metrics."""
    module = CaptchaModule(spec=ModelSpec(charset="abcd", min_length=1, max_length=4, input_size=(32, 96),
                                          mean=(0.5,) * 3, std=(0.5,) * 3, decoder="ctc", arch="crnn"),
                           model_kwargs={"dim": 32})
    charset = module.charset
    decoded = Decoded([charset.encode(p) for p in predictions], [[1.0] * len(p) for p in predictions],
                      [1.0] * len(predictions))
    solutions = [Solution(p, 1.0, [1.0] * len(p)) for p in predictions]
    module.read = lambda logits, beam_width=None: (solutions, decoded)
    targets = torch.tensor(charset.encode_batch(truths, 4))
    batch = {"image": torch.zeros(len(truths), 3, 32, 96), "target": targets,
             "length": torch.tensor([len(t) for t in truths])}
    module._shared_step(batch, "test")  # outside a Trainer, self.log does nothing
    return {name: float(metric.compute()) for name, metric in module.test_metrics.items()}


def test_position_accuracy_counts_only_samples_of_the_right_length():
    metrics = _score(predictions=["abcd", "abd", "ab", "dcba"], truths=["abcd", "abcd", "ab", "dcbb"])
    assert metrics["seq_acc"] == pytest.approx(2 / 4)
    assert metrics["len_acc"] == pytest.approx(3 / 4)  # "abd" is one short
    # positions of the three length matches: 4 + 2 + 3 right out of 4 + 2 + 4
    assert metrics["pos_acc"] == pytest.approx(9 / 10)
    # char_acc compares by position over every target character, "abd" included (a, b right)
    assert metrics["char_acc"] == pytest.approx(11 / 14)
    assert metrics["cer"] == pytest.approx(2 / 14)  # one deletion, one substitution


def test_position_accuracy_without_any_length_match_is_zero():
    metrics = _score(predictions=["", "a"], truths=["ab", "abc"])
    assert metrics["len_acc"] == 0.0
    assert metrics["pos_acc"] == 0.0


def test_variable_length_crnn_fit(make_cfg):
    cfg = make_cfg("train", [*SMALL_CRNN, "data.charset=0-9", "data.min_length=4", "data.max_length=7",
                             "debug=fast"], name="variable")
    metrics = train(cfg)
    on_disk = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    for key in ("test/seq_acc", "test/cer", "test/pos_acc", "test/len_acc"):
        assert on_disk[key] == pytest.approx(metrics[key])
    assert on_disk["test/cer"] > 0  # an untrained model reads variable-length text wrong


def test_several_fonts_from_the_config(make_cfg):
    cfg = make_cfg("train", ["data=synthetic_fonts", "data.num_train=8", "data.num_val=4", "data.num_test=4"],
                   name="fonts")
    dm = build_datamodule(cfg.data)
    names = [Path(f).name for f in dm.spec.fonts]
    assert "DejaVuSans.ttf" in names and "DejaVuSansMono-Bold.ttf" in names
    assert "DejaVuSansDisplay.ttf" not in names  # it has no letters or digits
    assert len(names) > 2  # the package's own font too
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 8


def test_font_without_the_charset_is_refused(cache_dir):
    import matplotlib

    display = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSansDisplay.ttf"
    with pytest.raises(ValueError, match="cannot draw"):
        build_datamodule(synthetic_data(fonts=[str(display)], cache_dir=str(cache_dir), grayscale=False))


@pytest.mark.parametrize("decoder,min_length", [("ctc", 5), ("ctc", 3), ("positional", 5), ("positional", 3)])
def test_training_matches_in_tensors_equal_those_of_the_decoded_texts(decoder, min_length):
    """A training step's metrics (``match_greedy``, on tensors) are those of decoding each sample and
    comparing lists (``match_texts``), for both decoders and fixed or variable lengths."""
    from captcha_lit.decoding import decode
    from captcha_lit.training.metrics import match_greedy, match_texts

    spec = ModelSpec(charset="ABC", min_length=min_length, max_length=5, input_size=(32, 96), mean=(0.5,),
                     std=(0.5,), decoder=decoder, arch="crnn" if decoder == "ctc" else "cnn", beam_width=1)
    generator = torch.Generator().manual_seed(0)
    steps = 12 if decoder == "ctc" else 5
    # Few classes and peaked logits, so that repeats, blanks, end symbols and exact hits all occur.
    logits = torch.randn(400, steps, spec.num_outputs, generator=generator) * 4
    lengths = torch.randint(min_length, 6, (400,), generator=generator)
    targets = torch.randint(0, 3, (400, 5), generator=generator)
    targets = targets.masked_fill(torch.arange(5)[None] >= lengths[:, None], -1)
    for row, reading in enumerate(decode(spec, logits[:100], beam_width=1).indices):
        if 1 <= len(reading) <= 5:  # a quarter of the samples read right, so whole-text hits occur too
            targets[row] = torch.tensor(reading + [-1] * (5 - len(reading)))
    ours = match_greedy(spec, logits, targets)
    theirs = match_texts(decode(spec, logits, beam_width=1).indices, targets)
    for name, a, b in zip(ours._fields, ours, theirs):
        assert torch.equal(a, b), name
    assert 0 < ours.chars.mean() < 1 and 0 < ours.seq.mean() < 1 and ours.same_length.sum() > 0
