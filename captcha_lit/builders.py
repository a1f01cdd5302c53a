"""Turning composed configs into objects, shared by the entry points."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# Keys of the data config that belong to the datamodule, not to the preprocessing contract.
_PREPROCESSING_KEYS = ("charset", "min_length", "max_length", "input_size", "mean", "std")


def to_plain(node: Any) -> Any:
    """DictConfig/ListConfig -> plain dicts and lists (resolved), for checkpoints and JSON."""
    if isinstance(node, (DictConfig,)) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def build_datamodule(data_cfg: DictConfig | dict, augmentation: DictConfig | dict | None = None):
    data = dict(to_plain(data_cfg))
    source = data.pop("source", "synthetic")
    data.pop("length", None)
    if source == "synthetic":
        from captcha_lit.data.datamodule import CaptchaDataModule

        data.pop("mean", None)
        data.pop("std", None)
        # A checkpoint's datamodule hparams carry their own augmentation entry.
        saved_augmentation = data.pop("augmentation", None)
        if augmentation is None:
            augmentation = saved_augmentation
        return CaptchaDataModule(**data, augmentation=to_plain(augmentation) or {})
    raise ValueError(f"data.source={source!r} is not supported; use 'synthetic'")


def build_module(cfg: DictConfig):
    from captcha_lit.module import CaptchaModule

    model = dict(to_plain(cfg.model))
    arch = model.pop("name")
    data = to_plain(cfg.data)
    return CaptchaModule(
        arch=arch, model_kwargs=model, charset=data["charset"], min_length=data["min_length"],
        max_length=data["max_length"], input_size=data["input_size"], mean=data["mean"], std=data["std"],
        optimizer=to_plain(cfg.optimizer), scheduler=to_plain(cfg.scheduler),
        augmentation=to_plain(cfg.get("augmentation")) or {},
    )


def check_checkpoint(path: str | os.PathLike) -> Path:
    """A readable checkpoint file, or a ValueError that says what is wrong and how to get one."""
    if path is None or str(path) in ("", "???"):
        raise ValueError("no checkpoint given: pass ckpt_path=PATH (train one with `make train`)")
    ckpt = Path(os.path.expanduser(str(path)))
    if not ckpt.exists():
        raise FileNotFoundError(
            f"checkpoint {str(ckpt)!r} does not exist; train one with `make train` or "
            "`python -m captcha_lit.train`, then look in outputs/train/runs/*/checkpoints/"
        )
    if ckpt.is_dir():
        raise ValueError(f"checkpoint {str(ckpt)!r} is a directory; pass the .ckpt file inside it")
    return ckpt


def load_checkpoint_dict(path: str | os.PathLike) -> dict:
    """``torch.load`` with ``weights_only=True``: a checkpoint that needs arbitrary unpickling is refused."""
    ckpt = check_checkpoint(path)
    try:
        return torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        text = str(exc)
        # Every weights_only failure starts "Weights only load failed", garbage bytes included;
        # only these markers mean the file holds objects beyond tensors and plain values.
        unsafe = ("Unsupported global", "unsupported GLOBAL", "Can only create new object", "Can only build",
                  "call reduce for unrecognized function")
        if any(marker in text for marker in unsafe):
            raise ValueError(
                f"checkpoint {str(ckpt)!r} needs unsafe unpickling (it contains Python objects beyond tensors and "
                "plain values); captcha_lit loads checkpoints with weights_only=True and refuses it"
            ) from None
        raise ValueError(f"checkpoint {str(ckpt)!r} is corrupt or not a PyTorch checkpoint ({type(exc).__name__})") from None


def load_module(path: str | os.PathLike, map_location: str = "cpu"):
    """Rebuild a CaptchaModule from its checkpoint alone."""
    from captcha_lit.module import CaptchaModule

    state = load_checkpoint_dict(path)
    if "hyper_parameters" not in state or "state_dict" not in state:
        raise ValueError(f"checkpoint {str(path)!r} is not a captcha_lit checkpoint (no hyper_parameters/state_dict)")
    module = CaptchaModule(**state["hyper_parameters"])
    module.load_state_dict(state["state_dict"])
    module.eval()
    return module.to(map_location), state


def checkpoint_data_config(state: dict) -> dict:
    """The data config a checkpoint was trained with (datamodule hparams), plus its preprocessing."""
    data = dict(state.get("datamodule_hyper_parameters") or {})
    hp = state["hyper_parameters"]
    for key in _PREPROCESSING_KEYS:
        data[key] = hp[key]
    return data
