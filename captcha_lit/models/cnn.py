"""The seed's design: conv + pool stages, fully connected layers, one softmax head per position."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from captcha_lit.models.layers import (FlattenHeads, check_input_size, conv_stages, plain, stack_output_size,
                                       stage_strides, strided_stem, total_downsample)
from captcha_lit.models.registry import register_model


class CaptchaCNN(nn.Module):
    decoder = "positional"
    # Every position's head reads the same flattened vector (see FlattenHeads).
    shared_position_features = True

    def __init__(self, num_classes: int, max_length: int, input_size: Sequence[int], channels: Sequence[int],
                 convs_per_stage: int | Sequence[int], hidden: int, dropout: float, in_channels: int = 3, stem: int = 0,
                 stem_stride: int = 2, downsample: str | Sequence[str] = "maxpool",
                 strides: Sequence[Sequence[int]] | None = None, stem_norm: bool = True):
        super().__init__()
        layers: list[nn.Module] = strided_stem(in_channels, stem, stem_stride, stem_norm)
        strides = stage_strides(strides, len(channels))
        stem_down = stem_stride if stem else 1
        check_input_size("cnn", input_size, total_downsample(strides, stem_down))
        layers += conv_stages(stem or in_channels, channels, strides, convs_per_stage, downsample)
        self.backbone = nn.Sequential(*layers)
        out_h, out_w = stack_output_size(self.backbone, input_size)
        self.head = FlattenHeads(channels[-1] * out_h * out_w, num_classes, max_length, hidden, dropout)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D): the features each position's classifier sees."""
        return self.head.features(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.classify(self.forward_features(x))

    def output_class_dims(self) -> dict[str, int]:
        return {f"head.{name}": dim for name, dim in self.head.output_class_dims().items()}


@register_model("cnn", decoder="positional")
def cnn(num_classes: int, max_length: int, input_size: Sequence[int], channels: Sequence[int] = (16, 32, 64, 128),
        convs_per_stage: int | Sequence[int] = 1, hidden: int = 512, dropout: float = 0.1, in_channels: int = 3,
        stem: int = 0, stem_stride: int = 2, downsample: str | Sequence[str] = "maxpool",
        strides: Sequence[Sequence[int]] | None = None, stem_norm: bool = True) -> CaptchaCNN:
    return CaptchaCNN(num_classes, max_length, input_size, tuple(channels), convs_per_stage, hidden, dropout,
                      int(in_channels), int(stem), int(stem_stride), plain(downsample), strides, stem_norm)
