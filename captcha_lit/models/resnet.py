"""A small ResNet trained from scratch, with attention-read per-position heads."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from captcha_lit.models.layers import (Dropout, FlattenHeads, PositionAttentionHead, check_channels, check_counts,
                                       check_downsampling_fits, check_strides, conv_bn_relu, stack_output_size,
                                       total_downsample)
from captcha_lit.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: tuple[int, int]):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != (1, 1) or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                # Rounds an odd size up, as the strided conv1 does, so the two paths always add up.
                nn.AvgPool2d(stride, stride, ceil_mode=True) if stride != (1, 1) else nn.Identity(),
                nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetBackbone(nn.Module):
    """Stem + residual stages. Later stages halve height only, keeping width for the sequence."""

    def __init__(self, channels: Sequence[int], blocks: Sequence[int], strides: Sequence[Sequence[int]], in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(conv_bn_relu(in_channels, channels[0]), nn.MaxPool2d(2))
        stages = []
        prev = channels[0]
        for ch, n, stride in zip(channels, blocks, strides):
            layers = [BasicBlock(prev, ch, tuple(stride))] + [BasicBlock(ch, ch, (1, 1)) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            prev = ch
        self.stages = nn.Sequential(*stages)
        self.out_channels = prev
        self.downsample = total_downsample(strides, 2)

    def output_size(self, input_size: Sequence[int]) -> tuple[int, int]:
        main_path = [self.stem] + [conv for block in self.stages.modules() if isinstance(block, BasicBlock)
                                   for conv in (block.conv1, block.conv2)]
        return stack_output_size(main_path, input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


class SequenceNeck(nn.Module):
    """(B, C, h, w) feature map -> (B, w, dim) sequence, mixing each column's full height."""

    def __init__(self, channels: int, height: int, dim: int, dropout: float):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(channels * height, dim), nn.LayerNorm(dim), nn.GELU(), Dropout(dropout))

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        b, c, h, w = fmap.shape
        return self.proj(fmap.permute(0, 3, 1, 2).reshape(b, w, c * h))


class CaptchaResNet(nn.Module):
    decoder = "positional"

    def __init__(self, num_classes: int, max_length: int, input_size: Sequence[int], channels, blocks, strides,
                 dim: int, head: str, dropout: float, in_channels: int = 3):
        super().__init__()
        self.backbone = ResNetBackbone(channels, blocks, strides, in_channels=in_channels)
        check_downsampling_fits("resnet", input_size, self.backbone.downsample)
        out_h, out_w = self.backbone.output_size(input_size)
        self.head_kind = head
        if head == "attention":
            self.neck = SequenceNeck(self.backbone.out_channels, out_h, dim, dropout)
            self.head = PositionAttentionHead(dim, num_classes, max_length, out_w, dropout=dropout)
        elif head == "flatten":
            self.neck = nn.Identity()
            self.head = FlattenHeads(self.backbone.out_channels * out_h * out_w, num_classes, max_length, dim, dropout)
        else:
            raise ValueError(f"model.head={head!r} is not a head of 'resnet'; use 'attention' or 'flatten'")

    @property
    def shared_position_features(self) -> bool:
        """The flatten head gives every position the same vector; attention reads one per position."""
        return self.head_kind == "flatten"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.features(self.neck(self.backbone(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.classify(self.forward_features(x))

    def output_class_dims(self) -> dict[str, int]:
        return {f"head.{name}": dim for name, dim in self.head.output_class_dims().items()}


@register_model("resnet", decoder="positional")
def resnet(num_classes: int, max_length: int, input_size: Sequence[int], channels: Sequence[int] = (32, 64, 128, 192),
           blocks: Sequence[int] = (1, 1, 1, 1), strides: Sequence[Sequence[int]] = ((1, 1), (2, 2), (2, 1), (2, 1)),
           dim: int = 192, head: str = "attention", dropout: float = 0.1, in_channels: int = 3) -> CaptchaResNet:
    channels = check_channels(channels)
    return CaptchaResNet(num_classes, max_length, input_size, channels, check_counts("blocks", blocks, len(channels)),
                         check_strides(strides, len(channels)), dim, head, dropout, int(in_channels))
