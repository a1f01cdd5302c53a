"""The one torch inference path: uint8 images in either layout, in batches, give the same readings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from captcha_lit.training.inference import read_images


def test_layouts_and_batches_read_alike(make_module):
    torch.manual_seed(0)
    module = make_module("crnn", charset="0-9", model_kwargs={"dim": 32}).eval()
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 96, 3), dtype=np.uint8)
    whole = read_images(module, images, keep_logits=True)
    in_pairs = read_images(module, torch.from_numpy(images).permute(0, 3, 1, 2), batch_size=2, keep_logits=True)
    assert whole.texts == in_pairs.texts and len(whole.solutions) == 5
    assert np.allclose(whole.logits, in_pairs.logits, atol=1e-5)
    # the same numbers as the module's own forward pass and decoding of the normalized images
    with torch.no_grad():
        expected, _ = module.read(module(module.preprocess(torch.from_numpy(images).permute(0, 3, 1, 2))))
    assert whole.texts == [s.text for s in expected]
    assert [s.confidence for s in whole.solutions] == pytest.approx([s.confidence for s in expected], rel=1e-5)


def test_it_reads_in_fp32_under_an_outer_autocast(make_module):
    module = make_module("crnn", charset="0-9", model_kwargs={"dim": 32}).eval()
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 96, 3), dtype=np.uint8)
    plain = read_images(module, images, keep_logits=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = read_images(module, images, keep_logits=True)
    assert under_autocast.logits.dtype == np.float32
    assert np.array_equal(plain.logits, under_autocast.logits)
