"""Export-time rewrites that compute the same function with fewer, fusable operations.

``pool_first`` stages train as convolution -> max-pool -> batch norm -> ReLU, because on a CPU
the batch norm is cheaper after the pool. In an exported graph that batch norm sits between the
pool and the ReLU, where no runtime folds it, and an int8 graph must dequantize and requantize
around it. A batch norm is a per-channel ``scale * x + shift``; where every ``scale`` is
positive it commutes with max-pooling (as ReLU does), so the stage can be written as
convolution (with the batch norm folded in) -> ReLU -> max-pool: one fused convolution and a
pool, the same outputs up to rounding. Stages with a non-positive scale are left as they are.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def _folded_conv(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> nn.Conv2d:
    scale = norm.weight.detach() / torch.sqrt(norm.running_var + norm.eps)
    fused = copy.deepcopy(conv)
    fused.weight = nn.Parameter(conv.weight.detach() * scale.view(-1, 1, 1, 1))
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(norm.running_mean)
    fused.bias = nn.Parameter((bias - norm.running_mean) * scale + norm.bias.detach())
    return fused


def _foldable(block: nn.Module) -> bool:
    if not isinstance(block, nn.Sequential) or len(block) != 4:
        return False
    conv, pool, norm, relu = block
    if not (isinstance(conv, nn.Conv2d) and isinstance(pool, nn.MaxPool2d) and isinstance(norm, nn.BatchNorm2d)
            and isinstance(relu, nn.ReLU) and norm.track_running_stats and norm.affine):
        return False
    return bool((norm.weight.detach() > 0).all())


def fold_pool_first(net: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``net`` (in eval mode) with every foldable conv -> max-pool -> batch norm -> ReLU
    block rewritten as fused conv -> ReLU -> max-pool -> (the copy, how many blocks were folded)."""
    net = copy.deepcopy(net).eval()
    folded = 0
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if _foldable(child):
                conv, pool, norm, _ = child
                setattr(module, name, nn.Sequential(_folded_conv(conv, norm), nn.ReLU(), pool))
                folded += 1
    return net, folded
