"""Model registry: a name maps to a builder, as in torchvision and timm.

A builder takes ``num_classes`` (charset size, without any blank), ``max_length``,
``input_size`` = (height, width) and its own keyword options, and returns an
``nn.Module`` with a ``decoder`` attribute: ``"positional"`` (logits of shape
(B, max_length, num_classes), one softmax per position) or ``"ctc"`` (logits of
shape (B, T, num_classes + 1), blank last), and an ``output_class_dims()`` method
naming the parameters indexed by output class and the dimension of that index, so
fine-tuning can map them from one charset to another.

``forward_features(x)`` returns the features the classifier reads: (B, T, D) per time
step for CTC models, (B, max_length, D) per position for positional ones. A positional
model whose positions all read one shared vector sets ``shared_position_features = True``,
so feature plots (``captcha_lit.visualize``) treat it as one point per image.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_DECODERS: dict[str, str] = {}


def register_model(name: str, decoder: str) -> Callable:
    if decoder not in ("positional", "ctc"):
        raise ValueError(f"decoder must be 'positional' or 'ctc', got {decoder!r}")

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = builder
        _DECODERS[name] = decoder
        return builder

    return wrap


def model_decoder(name: str) -> str:
    """The decoder kind of a registered model, without building it."""
    _check_name(name)
    return _DECODERS[name]


def _check_name(name: str) -> None:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")


def list_models() -> list[str]:
    return sorted(_MODELS)


# Set by the data, not by the model config.
_DATA_ARGUMENTS = ("num_classes", "max_length", "input_size", "in_channels")


def model_options(name: str) -> dict:
    """A registered model's options and their defaults, read from its builder: the one source of
    the model configs (``model=NAME`` composes these, see ``captcha_lit.training.builders``)."""
    _check_name(name)
    return {p.name: _plain(p.default) for p in inspect.signature(_MODELS[name]).parameters.values()
            if p.name not in _DATA_ARGUMENTS and p.default is not inspect.Parameter.empty}


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def get_model(name: str, **kwargs) -> nn.Module:
    _check_name(name)
    builder = _MODELS[name]
    params = inspect.signature(builder).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ValueError(
                f"model {name!r} has no option(s) {', '.join(unknown)}; its options are: "
                f"{', '.join(p for p in params if p not in _DATA_ARGUMENTS)}"
            )
    return builder(**kwargs)
