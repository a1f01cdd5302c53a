"""The runtime's numpy normalization is the training pipeline's, in the ONNX input layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from captcha_lit.data.transforms import EvalPreset
from captcha_lit.preprocess import normalize


@pytest.mark.parametrize("mean, std", [((0.5,), (0.5,)), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
def test_normalize_matches_the_training_preprocessing(mean, std):
    images = np.random.default_rng(0).integers(0, 256, (4, 12, 20, len(mean)), dtype=np.uint8)
    ours = normalize(images, mean, std)
    theirs = EvalPreset(mean=mean, std=std)(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    assert ours.dtype == np.float32 and ours.shape == (4, len(mean), 12, 20) and ours.flags.c_contiguous
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
