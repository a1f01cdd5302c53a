"""The model contract: what a model reads and what its outputs mean, in one frozen value.

The checkpoint stores it, the ONNX metadata carries it, and every consumer (eval, predict,
export, the runtime, the HTTP service, visualize) reads it from there and nowhere else.
Torch-free, so the ONNX runtime uses it too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from captcha_lit.charset import Charset

DECODERS = ("positional", "ctc")
# The keys of a data config that are the model's, not the datamodule's: a checkpoint reads only
# what it was trained on, whatever the data config says.
DATA_KEYS = ("charset", "min_length", "max_length", "input_size", "mean", "std")
_METADATA_REQUIRED = ("charset", "input_size", "mean", "std", "decoder", "min_length", "max_length")


@dataclass(frozen=True)
class ModelSpec:
    """Charset, length range, input size and normalization (and so channels), and how to decode.

    Building one validates it: a bad value raises a ValueError that names it.
    """

    charset: str  # the literal characters, in class order
    min_length: int
    max_length: int
    input_size: tuple[int, int]  # (height, width)
    mean: tuple[float, ...]  # one per input channel: 1 (gray) or 3 (RGB)
    std: tuple[float, ...]
    decoder: str  # "positional": logits (B, L, C); "ctc": logits (B, T, C+1), blank last
    arch: str = ""
    beam_width: int = 1  # CTC prefix beam search above 1; the ONNX runtime always decodes greedily
    # Logits are divided by it before the softmax that gives confidences: fitted on validation after
    # training, so that a confidence of 0.9 is right about 90% of the time. Readings do not change.
    temperature: float = 1.0
    version: str = field(default="", compare=False)  # the captcha_lit version that wrote it

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalize the field types once, here
        for name in ("charset", "decoder", "arch", "version"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a string")
        set_(self, "charset", Charset(self.charset).chars)
        for name in ("min_length", "max_length", "beam_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}={value!r} must be a whole number")
        if self.min_length < 1:
            raise ValueError(f"min_length={self.min_length}: a CAPTCHA has at least 1 character")
        if self.max_length < self.min_length:
            raise ValueError(f"max_length={self.max_length} is less than min_length={self.min_length}")
        if not isinstance(self.input_size, (list, tuple)):
            raise ValueError(f"input_size={self.input_size!r} must be [height, width]")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if not isinstance(values, (list, tuple)) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ValueError(f"{name}={values!r} must be a list of numbers, one per input channel")
        size = tuple(self.input_size)
        if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size):
            raise ValueError(f"input_size={list(size)} must be [height, width], two whole numbers >= 1")
        set_(self, "input_size", size)
        mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if len(mean) != len(std) or len(mean) not in (1, 3):
            raise ValueError(f"mean={list(mean)} and std={list(std)} need one value per input channel, both 3 "
                             "(RGB) or both 1 (grayscale)")
        if min(std) <= 0:
            raise ValueError(f"std={list(std)} must be positive")
        set_(self, "mean", mean)
        set_(self, "std", std)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0 < self.temperature < float("inf"):
            raise ValueError(f"temperature={self.temperature!r} must be a positive number (1: the raw softmax)")
        set_(self, "temperature", float(self.temperature))
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder={self.decoder!r}: one of {', '.join(DECODERS)}")
        if self.beam_width < 1:
            raise ValueError(f"beam_width={self.beam_width} must be at least 1 (1: greedy decoding)")
        if self.beam_width > 1 and self.decoder != "ctc":
            raise ValueError(f"beam_width={self.beam_width} applies to CTC models such as 'crnn'; a "
                             f"{self.arch or self.decoder!r} model reads one character per position, so leave it at 1")

    # ---- derived facts -------------------------------------------------------------------
    @property
    def channels(self) -> int:
        return len(self.mean)

    @property
    def grayscale(self) -> bool:
        return self.channels == 1

    @property
    def variable_length(self) -> bool:
        return self.min_length != self.max_length

    @property
    def blank(self) -> int | None:
        """CTC's blank class, one past the last character."""
        return len(self.charset) if self.decoder == "ctc" else None

    @property
    def end_class(self) -> int | None:
        """Positional models of variable length predict this class after the text."""
        return len(self.charset) if self.decoder == "positional" and self.variable_length else None

    @property
    def output_classes(self) -> list[str]:
        """What each output class stands for: the characters, then the blank or the end symbol."""
        extra = ["<blank>"] if self.decoder == "ctc" else ["<end>"] if self.end_class is not None else []
        return list(self.charset) + extra

    @property
    def num_outputs(self) -> int:
        return len(self.output_classes)

    def replace(self, **changes) -> ModelSpec:
        return ModelSpec(**{**self.to_dict(), **changes})

    # ---- storage -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain values, for checkpoints (``torch.load(weights_only=True)``) and JSON."""
        out = asdict(self)
        out["input_size"], out["mean"], out["std"] = list(self.input_size), list(self.mean), list(self.std)
        return out

    @classmethod
    def from_dict(cls, data: dict, source: str = "model") -> ModelSpec:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{source}: its model spec has unknown key(s) {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:  # a missing key
            raise ValueError(f"{source}: its model spec is incomplete ({exc})") from None
        except ValueError as exc:
            raise ValueError(f"{source}: its model spec is invalid ({exc})") from None

    def digest(self) -> str:
        """A fingerprint of what the weights were trained for (every field but the decoding-time
        ``beam_width`` and ``temperature``, and ``version``): a checkpoint stores it, so an edited spec
        is detected."""
        trained = {k: v for k, v in self.to_dict().items() if k not in ("beam_width", "temperature", "version")}
        return hashlib.sha256(json.dumps(trained, sort_keys=True).encode()).hexdigest()

    def data_values(self) -> dict:
        """The data config keys that are the model's (``DATA_KEYS``, and ``grayscale``), as plain values."""
        plain = self.to_dict()
        return {**{key: plain[key] for key in DATA_KEYS}, "grayscale": self.grayscale}

    def to_metadata(self) -> dict[str, str]:
        """ONNX ``metadata_props``: strings only. ``blank``, ``end_class`` and ``input_layout`` are
        derived, written for readers that decode without captcha_lit."""
        return {
            "charset": self.charset, "input_size": json.dumps(list(self.input_size)),
            "mean": json.dumps(list(self.mean)), "std": json.dumps(list(self.std)), "decoder": self.decoder,
            "min_length": str(self.min_length), "max_length": str(self.max_length),
            "end_class": "" if self.end_class is None else str(self.end_class),
            "blank": "" if self.blank is None else str(self.blank),
            "arch": self.arch, "captcha_lit_version": self.version, "beam_width": str(self.beam_width),
            "temperature": repr(self.temperature),
            "input_layout": f"NCHW float32, {'grayscale' if self.grayscale else 'RGB'} scaled to [0, 1] then "
                            "(x - mean) / std",
        }

    @classmethod
    def from_metadata(cls, props: dict[str, str], source: str = "model") -> ModelSpec:
        missing = [k for k in _METADATA_REQUIRED if k not in props]
        if missing:
            raise ValueError(
                f"{source} has no captcha_lit metadata (missing {', '.join(missing)}); export the model with "
                "`python -m captcha_lit.export ckpt_path=PATH`"
            )
        try:
            spec = cls(
                charset=props["charset"], input_size=tuple(int(v) for v in json.loads(props["input_size"])),
                mean=tuple(json.loads(props["mean"])), std=tuple(json.loads(props["std"])),
                decoder=props["decoder"], min_length=int(props["min_length"]), max_length=int(props["max_length"]),
                arch=props.get("arch", ""), version=props.get("captcha_lit_version", ""),
                beam_width=int(props.get("beam_width") or 1), temperature=float(props.get("temperature") or 1.0),
            )
        except (TypeError, ValueError, json.JSONDecodeError) as exc:
            raise ValueError(f"{source} has malformed captcha_lit metadata ({exc})") from None
        stored_end = props.get("end_class") or None
        if stored_end is not None and str(spec.end_class) != stored_end:
            raise ValueError(f"{source} has malformed captcha_lit metadata (end_class={stored_end} does not fit "
                             f"its charset and lengths)")
        return spec
