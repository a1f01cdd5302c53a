"""Export-time rewrites compute the trained function: folded pool-first stages and temporal
convolutions written as 2-D ones give the module's outputs."""

from __future__ import annotations

import pytest
import torch

from captcha_lit.deploy.folding import fold_pool_first, temporal_convs_as_2d
from captcha_lit.models import get_model
from captcha_lit.models.layers import TemporalConv


def _trained_looking(name: str) -> torch.nn.Module:
    """A model whose batch norms hold statistics and affine values far from their initial ones,
    so that a rewrite that dropped or misplaced one would change the outputs."""
    torch.manual_seed(0)
    net = get_model(name, num_classes=36, max_length=5, input_size=(64, 160), in_channels=1)
    for module in net.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.3)
    return net.eval()


@pytest.mark.parametrize("name", ["crnn", "crnn_lite"])
def test_temporal_convolutions_as_2d_compute_the_same_function(name):
    net = _trained_looking(name)
    rewritten, replaced = temporal_convs_as_2d(net)
    assert replaced == 1
    assert not any(isinstance(m, (TemporalConv, torch.nn.Conv1d, torch.nn.BatchNorm1d)) for m in rewritten.modules())
    assert any(isinstance(m, TemporalConv) for m in net.modules())  # the original is left as it was
    images = torch.randn(3, 1, 64, 160)
    with torch.no_grad():
        expected = net(images)
        torch.testing.assert_close(rewritten(images), expected, atol=1e-5, rtol=1e-5)
        both, _ = temporal_convs_as_2d(fold_pool_first(net)[0])
        torch.testing.assert_close(both(images), expected, atol=1e-5, rtol=1e-5)


def test_a_model_without_temporal_convolutions_is_copied_unchanged():
    net = _trained_looking("crnn_classic")  # a GRU over the time steps
    rewritten, replaced = temporal_convs_as_2d(net)
    assert replaced == 0 and rewritten is not net
    images = torch.randn(2, 1, 64, 160)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(images), net(images))
