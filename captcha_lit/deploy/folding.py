"""Export-time rewrites that compute the same function with fewer, fusable operations.

``pool_first`` stages train as convolution -> max-pool -> batch norm -> ReLU, because on a CPU
the batch norm is cheaper after the pool. In an exported graph that batch norm sits between the
pool and the ReLU, where no runtime folds it, and an int8 graph must dequantize and requantize
around it. A batch norm is a per-channel ``scale * x + shift``; where every ``scale`` is
positive it commutes with max-pooling (as ReLU does), so the stage can be written as
convolution (with the batch norm folded in) -> ReLU -> max-pool: one fused convolution and a
pool, the same outputs up to rounding. Stages with a non-positive scale are left as they are.

``TemporalConv`` trains as 1-D convolutions over the time steps. onnxruntime runs an fp32 1-D
convolution through a generic path that is several times slower per operation than its 2-D
kernels, so the fp32 graph writes each one as a 2-D convolution over a one-row map, with its
batch norm folded in (``temporal_convs_as_2d``). An int8 graph keeps them 1-D: onnxruntime's
integer kernels run those fast, and 2-D ones would add layout transposes around each.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from captcha_lit.models.layers import TemporalConv


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


class TemporalConv2d(nn.Module):
    """``TemporalConv``'s function with each layer a 2-D convolution (kernel ``1 x k``) over a
    one-row map, its batch norm folded in. Same interface: ``(B, T, D) -> ((B, T, D), None)``."""

    def __init__(self, temporal: TemporalConv):
        super().__init__()
        self.blocks = nn.ModuleList()
        for conv, norm, activation in temporal.blocks:
            flat = nn.Conv2d(conv.in_channels, conv.out_channels, (1, conv.kernel_size[0]),
                             padding=(0, conv.padding[0]), bias=conv.bias is not None)
            flat.weight = nn.Parameter(conv.weight.detach().unsqueeze(2))
            if conv.bias is not None:
                flat.bias = nn.Parameter(conv.bias.detach().clone())
            self.blocks.append(nn.Sequential(_folded_conv(flat, norm), copy.deepcopy(activation)))

    def forward(self, seq: torch.Tensor) -> tuple[torch.Tensor, None]:
        y = seq.transpose(1, 2).unsqueeze(2)
        for block in self.blocks:
            y = y + block(y)
        return y.squeeze(2).transpose(1, 2), None


def temporal_convs_as_2d(net: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``net`` (in eval mode) with every ``TemporalConv`` replaced by its
    ``TemporalConv2d`` -> (the copy, how many were replaced)."""
    net = copy.deepcopy(net).eval()
    replaced = 0
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, TemporalConv):
                setattr(module, name, TemporalConv2d(child).eval())
                replaced += 1
    return net, replaced
