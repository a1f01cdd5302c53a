"""CRNN: convolutional features, a sequence model (bidirectional GRU/LSTM or temporal convolutions), CTC."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from captcha_lit.models.layers import Dropout, TemporalConv, VGGBackbone, check_input_size, plain
from captcha_lit.models.registry import register_model
from captcha_lit.models.resnet import ResNetBackbone, SequenceNeck


class CRNN(nn.Module):
    decoder = "ctc"

    def __init__(self, num_classes: int, max_length: int, input_size: Sequence[int], backbone: str, channels, blocks,
                 strides, dim: int, rnn: str, rnn_layers: int, dropout: float, stem: int = 0, stem_stride: int = 2,
                 in_channels: int = 3, downsample: str | Sequence[str] = "maxpool",
                 convs_per_stage: int | Sequence[int] = 1, stem_norm: bool = True):
        super().__init__()
        if backbone == "vgg":
            self.backbone = VGGBackbone(channels, strides, in_channels=in_channels, stem=stem, stem_stride=stem_stride,
                                        downsample=downsample, convs_per_stage=convs_per_stage, stem_norm=stem_norm)
        elif backbone == "resnet":
            # Name every vgg-only option that is set, so that one fix works.
            wrong = [(f"model.stem={stem}", "model.stem=0")] if stem else []
            if downsample != "maxpool":
                given = repr(downsample) if isinstance(downsample, str) else plain(downsample)
                wrong.append((f"model.downsample={given}", "model.downsample=maxpool"))
            if convs_per_stage != 1:
                counts = convs_per_stage if isinstance(convs_per_stage, int) else list(convs_per_stage)
                wrong.append((f"model.convs_per_stage={counts}", "model.convs_per_stage=1"))
            if wrong:
                raise ValueError(f"{', '.join(given for given, _ in wrong)} {'is' if len(wrong) == 1 else 'are'} for "
                                 "backbone=vgg; backbone=resnet has its own stem and strided residual blocks, so set "
                                 + " ".join(fix for _, fix in wrong) + ", or use model=crnn_resnet")
            self.backbone = ResNetBackbone(channels, blocks, strides, in_channels=in_channels)
        else:
            raise ValueError(f"model.backbone={backbone!r}: use 'vgg' or 'resnet'")
        check_input_size("crnn", input_size, self.backbone.downsample)
        out_h, self.seq_len = self.backbone.output_size(input_size)
        if self.seq_len < 2 * max_length + 1:
            raise ValueError(
                f"data.input_size width {input_size[1]} gives model 'crnn' only {self.seq_len} time steps, but CTC "
                f"needs at least 2*max_length+1 = {2 * max_length + 1} for {max_length} characters; widen the input "
                "or reduce the width strides in model.strides"
            )
        self.neck = SequenceNeck(self.backbone.out_channels, out_h, dim, dropout)
        if rnn_layers < 1:
            raise ValueError(f"model.rnn_layers={rnn_layers}: the sequence model needs at least 1 layer")
        if rnn == "conv":
            self.rnn = TemporalConv(dim, layers=rnn_layers)
        else:
            rnn_cls = {"gru": nn.GRU, "lstm": nn.LSTM}.get(rnn)
            if rnn_cls is None:
                raise ValueError(f"model.rnn={rnn!r}: use 'gru', 'lstm' or 'conv'")
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
def crnn(num_classes: int, max_length: int, input_size: Sequence[int], backbone: str = "vgg",
         channels: Sequence[int] = (16, 32, 64, 128), blocks: Sequence[int] = (1, 1, 1, 1),
         strides: Sequence[Sequence[int]] = ((2, 2), (2, 2), (2, 1), (2, 1)), dim: int = 128, rnn: str = "conv",
         rnn_layers: int = 2, dropout: float = 0.1, stem: int = 0, stem_stride: int = 2, in_channels: int = 3,
         downsample: str | Sequence[str] = "maxpool", convs_per_stage: int | Sequence[int] = 1,
         stem_norm: bool = True) -> CRNN:
    return CRNN(num_classes, max_length, input_size, backbone, tuple(channels), tuple(blocks),
                strides, dim, rnn, rnn_layers, dropout, int(stem), int(stem_stride),
                int(in_channels), plain(downsample), convs_per_stage, stem_norm)
