"""The seed's design: conv + pool stages, then one fully connected softmax head per position.

- ``cnn``: the default. A stride-2 stem convolution reads the full-resolution input and halves
  it; each stage has two convolutions and max-pools 2x2 before its last batch norm and ReLU.
- ``cnn_seed``: the seed project's own network (one conv-BN-ReLU-max-pool per stage, no stem,
  a 512-wide hidden layer), for ``experiment=seed`` and the benchmarks' baseline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from captcha_lit.models.layers import FlattenHeads, Stage, VGGBackbone, check_channels, check_downsampling_fits
from captcha_lit.models.registry import register_model


class CaptchaCNN(nn.Module):
    decoder = "positional"
    # Every position's head reads the same flattened vector (see FlattenHeads).
    shared_position_features = True

    def __init__(self, backbone: VGGBackbone, num_classes: int, max_length: int, input_size: Sequence[int],
                 hidden: int, dropout: float):
        super().__init__()
        check_downsampling_fits("cnn", input_size, backbone.downsample)
        self.backbone = backbone.body
        out_h, out_w = backbone.output_size(input_size)
        self.head = FlattenHeads(backbone.out_channels * out_h * out_w, num_classes, max_length, hidden, dropout)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D): the features each position's classifier sees."""
        return self.head.features(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.classify(self.forward_features(x))

    def output_class_dims(self) -> dict[str, int]:
        return {f"head.{name}": dim for name, dim in self.head.output_class_dims().items()}


@register_model("cnn", decoder="positional")
def cnn(num_classes: int, max_length: int, input_size: Sequence[int], in_channels: int = 3,
        channels: Sequence[int] = (16, 32, 64, 128), hidden: int = 0, dropout: float = 0.4) -> CaptchaCNN:
    """``hidden``: the width of a shared fully connected layer before the heads; 0, none: each
    head reads the flattened map. ``dropout``: on the flattened features (and the hidden layer)."""
    channels = check_channels(channels)
    stages = [Stage(width, (2, 2), convs=2, downsample="pool_first") for width in channels]
    backbone = VGGBackbone(stages, in_channels, stem=channels[0], stem_norm=False)
    return CaptchaCNN(backbone, num_classes, max_length, input_size, hidden, dropout)


@register_model("cnn_seed", decoder="positional")
def cnn_seed(num_classes: int, max_length: int, input_size: Sequence[int], in_channels: int = 3,
             channels: Sequence[int] = (32, 64, 128, 256), hidden: int = 512, dropout: float = 0.3) -> CaptchaCNN:
    channels = check_channels(channels)
    backbone = VGGBackbone([Stage(width, (2, 2)) for width in channels], in_channels)
    return CaptchaCNN(backbone, num_classes, max_length, input_size, hidden, dropout)
