"""CRNN: convolutional features, a sequence model over the width, CTC.

Three registered designs share the head (a neck to one feature per column, temporal
convolutions or a bidirectional GRU/LSTM, a linear classifier with CTC's blank last):

- ``crnn``: the default. A stride-2 stem convolution reads the full-resolution input and halves
  it; the first stage has two convolutions and max-pools (its fine shapes tell ``O`` from
  ``0``), the later stages stride.
- ``crnn_classic``: the classic CRNN (Shi et al.): conv-BN-ReLU-max-pool stages, optionally after
  a stem. The recipes measured on it (varlen, captcha_images_v2) keep it.
- ``crnn_resnet``: residual stages instead of plain ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from captcha_lit.models.layers import (Dropout, Stage, TemporalConv, VGGBackbone, check_channels, check_counts,
                                       check_downsampling_fits, check_strides)
from captcha_lit.models.registry import register_model
from captcha_lit.models.resnet import ResNetBackbone, SequenceNeck

RNNS = ("conv", "gru", "lstm")


class CRNN(nn.Module):
    decoder = "ctc"

    def __init__(self, backbone: nn.Module, num_classes: int, max_length: int, input_size: Sequence[int], dim: int,
                 rnn: str, rnn_layers: int, dropout: float):
        super().__init__()
        self.backbone = backbone
        check_downsampling_fits("crnn", input_size, backbone.downsample)
        out_h, self.seq_len = backbone.output_size(input_size)
        if self.seq_len < 2 * max_length + 1:
            raise ValueError(
                f"data.input_size width {input_size[1]} gives the model only {self.seq_len} time steps, but CTC "
                f"needs at least 2*max_length+1 = {2 * max_length + 1} for {max_length} characters; widen the input"
            )
        self.neck = SequenceNeck(backbone.out_channels, out_h, dim, dropout)
        if not isinstance(rnn_layers, int) or rnn_layers < 1:
            raise ValueError(f"model.rnn_layers={rnn_layers!r}: the sequence model needs at least 1 layer")
        if rnn not in RNNS:
            raise ValueError(f"model.rnn={rnn!r}: use one of {', '.join(RNNS)}")
        if rnn == "conv":
            self.rnn = TemporalConv(dim, layers=rnn_layers)
        else:
            rnn_cls = nn.GRU if rnn == "gru" else nn.LSTM
            self.rnn = rnn_cls(dim, dim // 2, num_layers=rnn_layers, bidirectional=True, batch_first=True,
                               dropout=dropout if rnn_layers > 1 else 0.0)
        self.dropout = Dropout(dropout)
        self.classifier = nn.Linear(dim, num_classes + 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D): one feature per time step."""
        seq, _ = self.rnn(self.neck(self.backbone(x)))
        return seq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.forward_features(x)))

    def output_class_dims(self) -> dict[str, int]:
        return {"classifier.weight": 0, "classifier.bias": 0}


@register_model("crnn", decoder="ctc")
def crnn(num_classes: int, max_length: int, input_size: Sequence[int], in_channels: int = 3,
         channels: Sequence[int] = (16, 32, 64, 128), dim: int = 128, rnn: str = "conv", rnn_layers: int = 2,
         dropout: float = 0.1) -> CRNN:
    """``channels``: the stage widths (the stem has the first one). ``rnn``: ``conv`` (residual
    temporal convolutions, the fastest on a CPU), ``gru`` or ``lstm`` (bidirectional)."""
    return _strided_crnn(2, num_classes, max_length, input_size, in_channels, channels, dim, rnn, rnn_layers, dropout)


@register_model("crnn_lite", decoder="ctc")
def crnn_lite(num_classes: int, max_length: int, input_size: Sequence[int], in_channels: int = 3,
              channels: Sequence[int] = (16, 32, 64, 128), dim: int = 128, rnn: str = "conv", rnn_layers: int = 2,
              dropout: float = 0.1) -> CRNN:
    """``crnn`` with one convolution in its first stage instead of two: the full-resolution stage
    is where a CPU step spends most of its time."""
    return _strided_crnn(1, num_classes, max_length, input_size, in_channels, channels, dim, rnn, rnn_layers, dropout)


def _strided_crnn(first_stage_convs: int, num_classes: int, max_length: int, input_size: Sequence[int],
                  in_channels: int, channels: Sequence[int], dim: int, rnn: str, rnn_layers: int,
                  dropout: float) -> CRNN:
    """The design of ``crnn`` and ``crnn_lite``, which differ in ``first_stage_convs``."""
    channels = check_channels(channels)
    # A 64-pixel-high input: stem 32, the first stage 16, then 8, 4, 2 rows; the width is halved twice.
    stages = [Stage(channels[0], (2, 2), convs=first_stage_convs, downsample="pool_first")]
    stages += [Stage(width, (2, 1), downsample="stride") for width in channels[1:]]
    backbone = VGGBackbone(stages, in_channels, stem=channels[0], stem_norm=False)
    return CRNN(backbone, num_classes, max_length, input_size, dim, rnn, rnn_layers, dropout)


@register_model("crnn_classic", decoder="ctc")
def crnn_classic(num_classes: int, max_length: int, input_size: Sequence[int], in_channels: int = 3,
                 channels: Sequence[int] = (32, 64, 96, 128),
                 strides: Sequence[Sequence[int]] = ((2, 2), (2, 2), (2, 1), (2, 1)), stem: int = 0, dim: int = 128,
                 rnn: str = "gru", rnn_layers: int = 1, dropout: float = 0.2) -> CRNN:
    """One conv-BN-ReLU-max-pool per stage, each pooling by its (h, w) ``strides``; ``stem`` > 0
    puts a stride-2 convolution (with batch norm) of that width first."""
    channels = check_channels(channels)
    strides = check_strides(strides, len(channels))
    if not isinstance(stem, int) or isinstance(stem, bool) or stem < 0:
        raise ValueError(f"model.stem={stem!r}: the stem's width, or 0 for none")
    backbone = VGGBackbone([Stage(width, stride) for width, stride in zip(channels, strides)], in_channels,
                           stem=stem, stem_norm=True)
    return CRNN(backbone, num_classes, max_length, input_size, dim, rnn, rnn_layers, dropout)


@register_model("crnn_resnet", decoder="ctc")
def crnn_resnet(num_classes: int, max_length: int, input_size: Sequence[int], in_channels: int = 3,
                channels: Sequence[int] = (16, 32, 64, 128), blocks: Sequence[int] = (1, 1, 1, 1),
                strides: Sequence[Sequence[int]] = ((2, 2), (2, 1), (2, 1), (2, 1)), dim: int = 128,
                rnn: str = "conv", rnn_layers: int = 2, dropout: float = 0.1) -> CRNN:
    """Residual stages (``blocks`` per stage, the first one strided by ``strides``) after the
    ResNet stem (a conv and a 2x2 max-pool)."""
    channels = check_channels(channels)
    backbone = ResNetBackbone(channels, check_counts("blocks", blocks, len(channels)),
                              check_strides(strides, len(channels)), in_channels=in_channels)
    return CRNN(backbone, num_classes, max_length, input_size, dim, rnn, rnn_layers, dropout)
