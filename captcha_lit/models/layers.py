"""Building blocks shared by the architectures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int = 3, stride: int | tuple[int, int] = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class Dropout(nn.Dropout):
    """``nn.Dropout`` with the same distribution, drawn with ``torch.rand``: on a CPU the bernoulli
    draw of ``F.dropout`` costs about 1.4x as much (2.1 against 1.5 ms on the default crnn's
    (64, 40, 128) features, two of them per training step). The same in eval mode, in
    checkpoints (it has no state) and in ONNX exports (where it is an identity)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p >= 1:
            return torch.zeros_like(x)
        keep = torch.rand_like(x, dtype=torch.float32) >= self.p
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))


def strided_stem(in_ch: int, width: int, norm: bool) -> nn.Module:
    """A stride-2 first convolution with ``width`` channels that reads every pixel of a large input
    and halves it, so the layers after it cost less.

    ``norm=False`` gives the convolution a bias instead of a batch norm: the input is already
    normalized, the next convolution's batch norm follows, and at the stem's full output size a
    batch norm is one of the costliest layers of a CPU training step (memory-bound)."""
    if norm:
        return conv_bn_relu(in_ch, width, stride=2)
    return nn.Sequential(nn.Conv2d(in_ch, width, 3, stride=2, padding=1), nn.ReLU(inplace=True))


@dataclass(frozen=True)
class Stage:
    """One stage of a plain conv net: ``convs`` conv-BN-ReLUs with ``channels`` outputs, the last
    of which shrinks the map by ``stride`` (h, w) the way ``downsample`` says:

    - ``maxpool``: the conv, batch norm and ReLU at full size, then max-pooling;
    - ``pool_first``: the conv at full size, then max-pooling, then batch norm and ReLU at the
      reduced size (the same layers and parameters; max-pooling commutes with ReLU), which on a
      CPU saves the memory-bound batch norm and ReLU at the larger size;
    - ``stride``: the conv itself strides, so everything after it runs at the reduced size. The
      cheapest, but it learns less per image than pooling.
    """

    channels: int
    stride: tuple[int, int] = (2, 2)
    convs: int = 1
    downsample: str = "maxpool"


def conv_stages(in_ch: int, stages: Sequence[Stage]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for stage in stages:
        for _ in range(stage.convs - 1):
            layers.append(conv_bn_relu(in_ch, stage.channels))
            in_ch = stage.channels
        stride = tuple(stage.stride)
        if stride == (1, 1):
            layers.append(conv_bn_relu(in_ch, stage.channels))
        elif stage.downsample == "stride":
            layers.append(conv_bn_relu(in_ch, stage.channels, stride=stride))
        elif stage.downsample == "pool_first":
            conv, norm, relu = conv_bn_relu(in_ch, stage.channels)
            layers.append(nn.Sequential(conv, nn.MaxPool2d(stride), norm, relu))
        else:
            layers += [conv_bn_relu(in_ch, stage.channels), nn.MaxPool2d(stride)]
        in_ch = stage.channels
    return layers


def check_channels(channels) -> tuple[int, ...]:
    """model.channels: one width >= 1 per stage."""
    if not _is_sequence(channels) or not channels or not all(_is_count(c) for c in channels):
        raise ValueError(f"model.channels={_plain(channels)}: give one width >= 1 per stage, e.g. [16, 32, 64, 128]")
    return tuple(channels)


def check_strides(strides, stages: int) -> tuple[tuple[int, int], ...]:
    """model.strides: one [h, w] pair of integers >= 1 per stage of model.channels."""
    pairs = [tuple(s) for s in strides if _is_sequence(s) and len(s) == 2 and all(_is_count(v) for v in s)] \
        if _is_sequence(strides) else []
    if len(pairs) != stages or len(pairs) != len(strides):
        raise ValueError(f"model.strides={_plain(strides)}: give {stages} [h, w] pairs of integers >= 1, one per "
                         f"stage of model.channels, e.g. {[[2, 2]] * stages}")
    return tuple(pairs)


def check_counts(name: str, counts, stages: int) -> tuple[int, ...]:
    """model.blocks and the like: one count >= 1 per stage."""
    if not _is_sequence(counts) or len(counts) != stages or not all(_is_count(n) for n in counts):
        raise ValueError(f"model.{name}={_plain(counts)}: give {stages} counts >= 1, one per stage of model.channels")
    return tuple(counts)


def total_downsample(strides: Sequence[Sequence[int]], first: int = 1) -> tuple[int, int]:
    """(h, w) factor by which a stack shrinks its input: ``first`` (a stem's) times every stage's stride."""
    return first * math.prod(s[0] for s in strides), first * math.prod(s[1] for s in strides)


def _is_sequence(value) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _is_count(value) -> bool:
    """An integer >= 1 (not a bool, a float or a string of digits)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _plain(value):
    """A config value with its sequences as plain lists, for messages."""
    return [_plain(v) for v in value] if _is_sequence(value) else value


def stack_output_size(stack: nn.Module | Sequence[nn.Module], input_size: Sequence[int]) -> tuple[int, int]:
    """(h, w) of the feature map after a plain stack of convolutions and max-poolings (a module, or
    the modules of one path in order), by their own size formulas: a padded strided convolution
    rounds up where pooling rounds down."""
    h, w = int(input_size[0]), int(input_size[1])
    modules = stack.modules() if isinstance(stack, nn.Module) else (m for part in stack for m in part.modules())
    for m in modules:
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
                nn.modules.utils._pair(v) for v in (m.kernel_size, m.stride, m.padding, m.dilation))
            h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
            w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return h, w


def check_downsampling_fits(name: str, input_size: Sequence[int], downsample: tuple[int, int], min_out: tuple[int, int] = (1, 1)) -> None:
    """Fail early, naming the size, when the feature map would vanish."""
    height, width = int(input_size[0]), int(input_size[1])
    need_h, need_w = downsample[0] * min_out[0], downsample[1] * min_out[1]
    if height < need_h or width < need_w:
        raise ValueError(
            f"data.input_size=[{height}, {width}] is too small for model {name!r}: it downsamples by "
            f"{downsample[0]}x{downsample[1]}, so use at least [{need_h}, {need_w}]"
        )


class PositionAttentionHead(nn.Module):
    """One softmax per character position, read from a feature sequence by attention.

    Each position has a learned query that attends over the width of the feature
    map; the attended feature goes through that position's own classifier. This
    keeps per-position CrossEntropy while letting each position find its
    character wherever the CAPTCHA placed it.
    """

    def __init__(self, dim: int, num_classes: int, max_length: int, seq_len: int, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, seq_len, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.queries = nn.Parameter(torch.randn(1, max_length, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), Dropout(dropout), nn.Linear(dim * 2, dim))
        self.norm2 = nn.LayerNorm(dim)
        # A grouped weight = one independent linear classifier per position.
        self.weight = nn.Parameter(torch.empty(max_length, dim, num_classes))
        self.bias = nn.Parameter(torch.zeros(max_length, num_classes))
        nn.init.normal_(self.weight, std=dim**-0.5)

    def features(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, T, D) sequence -> (B, L, D) one feature per position."""
        seq = seq + self.pos_embed
        q = self.queries.expand(seq.shape[0], -1, -1)
        x, _ = self.attn(q, seq, seq, need_weights=False)
        x = self.norm(x + q)
        return self.norm2(x + self.mlp(x))

    def classify(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bld,ldc->blc", feats, self.weight) + self.bias

    def output_class_dims(self) -> dict[str, int]:
        return {"weight": 2, "bias": 1}


class FlattenHeads(nn.Module):
    """The classic design: flatten, fully connected layers, one linear head per position."""

    def __init__(self, in_features: int, num_classes: int, max_length: int, hidden: int, dropout: float):
        super().__init__()
        if hidden < 0:
            raise ValueError(f"model.hidden={hidden}: use a width >= 1, or 0 for heads that read the flattened map")
        layers: list[nn.Module] = [nn.Flatten(), Dropout(dropout)]
        if hidden:
            layers += [nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), Dropout(dropout)]
        self.fc = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(hidden or in_features, num_classes) for _ in range(max_length))

    def features(self, fmap: torch.Tensor) -> torch.Tensor:
        shared = self.fc(fmap)
        return shared.unsqueeze(1).expand(-1, len(self.heads), -1)

    def classify(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(feats[:, i]) for i, head in enumerate(self.heads)], dim=1)

    def output_class_dims(self) -> dict[str, int]:
        return {f"heads.{i}.{name}": 0 for i in range(len(self.heads)) for name in ("weight", "bias")}


class VGGBackbone(nn.Module):
    """Plain conv stages (see ``Stage``), after an optional stride-2 stem convolution
    (``stem`` channels; 0: none; see ``strided_stem``)."""

    def __init__(self, stages: Sequence[Stage], in_channels: int, stem: int = 0, stem_norm: bool = True):
        super().__init__()
        layers: list[nn.Module] = [strided_stem(in_channels, stem, stem_norm)] if stem else []
        layers += conv_stages(stem or in_channels, stages)
        self.body = nn.Sequential(*layers)
        self.out_channels = stages[-1].channels
        self.downsample = total_downsample([stage.stride for stage in stages], 2 if stem else 1)

    def output_size(self, input_size: Sequence[int]) -> tuple[int, int]:
        return stack_output_size(self.body, input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class TemporalConv(nn.Module):
    """A sequence model of residual 1-D convolutions: each layer mixes three neighbouring time
    steps. Same interface as ``nn.GRU`` with ``batch_first=True`` (returns ``(output, None)``),
    and on the CPU much faster to train than a recurrent layer of the same width."""

    def __init__(self, dim: int, layers: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv1d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm1d(dim), nn.GELU())
            for _ in range(layers)
        )

    def forward(self, seq: torch.Tensor) -> tuple[torch.Tensor, None]:
        y = seq.transpose(1, 2)
        for block in self.blocks:
            y = y + block(y)
        return y.transpose(1, 2), None
