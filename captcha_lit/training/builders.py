"""Turning composed configs into objects, shared by the entry points."""

from __future__ import annotations

import inspect
import logging
import os
import re
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from captcha_lit import __version__
from captcha_lit.spec import DATA_KEYS, ModelSpec
from captcha_lit.utils import check_model_path

log = logging.getLogger(__name__)


def _datasets_path(name: str = "") -> str:
    from captcha_lit.data.folder import datasets_dir

    return str(datasets_dir() / name)


# ${captcha_lit.datasets:NAME} in a config: the named dataset folder ($CAPTCHA_LIT_DATASETS or ../shared/datasets).
if not OmegaConf.has_resolver("captcha_lit.datasets"):
    OmegaConf.register_new_resolver("captcha_lit.datasets", _datasets_path)


def register_model_configs() -> None:
    """``model=NAME`` for every registered model: its builder's options and defaults (the one source
    of them), plus the decoding option of its kind (CTC's beam width, or per-position label smoothing)."""
    from hydra.core.config_store import ConfigStore

    from captcha_lit.models import list_models, model_decoder, model_options
    from captcha_lit.training.module import CaptchaModule

    beam_width = ModelSpec.__dataclass_fields__["beam_width"].default
    label_smoothing = inspect.signature(CaptchaModule.__init__).parameters["label_smoothing"].default
    store = ConfigStore.instance()
    for name in list_models():
        decoding = {"beam_width": beam_width} if model_decoder(name) == "ctc" else {"label_smoothing": label_smoothing}
        store.store(group="model", name=name, node={"name": name, **model_options(name), **decoding})


register_model_configs()


def to_plain(node: Any) -> Any:
    """DictConfig/ListConfig -> plain dicts and lists (resolved), for checkpoints and JSON."""
    if isinstance(node, (DictConfig,)) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` ("cpu" or "cuda") computes bfloat16 in hardware, so bf16 autocast
    speeds training up instead of emulating it (CPUs with AVX512-BF16 or AMX, GPUs from Ampere)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        try:
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a torch build without oneDNN's probe
            return False
    return False


def resolve_precision(trainer_cfg: DictConfig | dict) -> str | int:
    """``trainer.precision=auto`` -> the Lightning precision for the accelerator the run will use.

    bf16 autocast (``bf16-mixed``) where the device has native bf16, else ``32-true`` on a CPU
    and ``16-mixed`` on an older GPU. Weights and the optimizer stay fp32 either way; any
    Lightning value (``32-true``, ``bf16-mixed``, ``16-mixed``, ...) is passed through."""
    precision = trainer_cfg.get("precision")
    if str(precision) != "auto":
        return precision
    accelerator = str(trainer_cfg.get("accelerator") or "auto")
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda"):
        return "bf16-mixed" if native_bf16("cuda") else "16-mixed"
    if accelerator == "cpu":
        return "bf16-mixed" if native_bf16("cpu") else "32-true"
    return "32-true"


def build_trainer(trainer_cfg: DictConfig, **kwargs):
    """Instantiate ``cfg.trainer`` (with ``precision=auto`` resolved, and written back to the config
    so the logged hparams and the saved config name the precision that ran)."""
    from hydra.utils import instantiate

    precision = resolve_precision(trainer_cfg)
    if precision != trainer_cfg.get("precision"):
        with open_dict(trainer_cfg):
            trainer_cfg.precision = precision
        log.info("trainer.precision=auto -> %s", precision)
    return instantiate(trainer_cfg, **kwargs)


def normalization(data: dict) -> tuple[list[float], list[float]]:
    """A data config's per-channel ``(mean, std)``. ``data.grayscale`` picks one channel or three
    (RGB); ``data.mean`` and ``data.std`` are one number for every channel, or one per channel."""
    grayscale = data.get("grayscale", False)
    if not isinstance(grayscale, bool):
        raise ValueError(f"data.grayscale={grayscale!r} must be true (one gray channel) or false (RGB)")
    channels = 1 if grayscale else 3
    out = []
    for key in ("mean", "std"):
        value = data.get(key, 0.5)
        values = [value] if isinstance(value, (int, float)) else list(value)
        if len(values) == 1:
            values = values * channels
        if len(values) != channels or not all(isinstance(v, (int, float)) for v in values):
            raise ValueError(
                f"data.{key}={value!r} needs one number, or one per input channel: {channels} with "
                f"data.grayscale={str(grayscale).lower()}"
            )
        if key == "std" and min(values) <= 0:
            raise ValueError(f"data.std={value!r} must be positive")
        out.append([float(v) for v in values])
    return out[0], out[1]


def build_datamodule(data_cfg: DictConfig | dict, augmentation: DictConfig | dict | None = None):
    data = dict(to_plain(data_cfg))
    normalization(data)  # a bad data.grayscale, mean or std fails here, before any data is generated
    source = data.pop("source", "synthetic")
    length = data.pop("length", None)
    if length is not None and data.get("min_length") == data.get("max_length") == length and int(length) < 1:
        raise ValueError(f"data.length={length}: a CAPTCHA needs at least 1 character")
    # Normalization belongs to the module; a checkpoint's datamodule hparams carry their own augmentation.
    data.pop("mean", None)
    data.pop("std", None)
    saved_augmentation = data.pop("augmentation", None)
    if augmentation is None:
        augmentation = saved_augmentation
    if source == "synthetic":
        from captcha_lit.data.datamodule import CaptchaDataModule

        return CaptchaDataModule(**data, augmentation=to_plain(augmentation) or {})
    if source == "folder":
        from captcha_lit.data.folder import FolderDataModule

        # Sizes of generated splits (debug=fast sets them) mean nothing for a folder, which uses all its images.
        for key in ("num_train", "num_val", "num_test"):
            data.pop(key, None)
        options = inspect.signature(FolderDataModule.__init__).parameters
        unknown = sorted(set(data) - set(options))
        if unknown:
            raise ValueError(
                f"data.{unknown[0]} is not an option of data.source=folder; its options are: "
                + ", ".join(p for p in options if p not in ("self", "augmentation"))
            )
        return FolderDataModule(**data, augmentation=to_plain(augmentation) or {})
    raise ValueError(f"data.source={source!r} is not supported; use 'synthetic' or 'folder'")


def spec_from_config(arch: str, data: dict, beam_width: int = 1) -> ModelSpec:
    """The ModelSpec of model ``arch`` trained on data config ``data``; errors name the data key."""
    from captcha_lit.models import model_decoder

    for key in ("charset", "min_length", "max_length"):
        if data.get(key) is None:
            raise ValueError(f"data.{key} is not set, and the data source {data.get('source')!r} does not infer it")
    if isinstance(beam_width, bool) or not isinstance(beam_width, int):
        raise ValueError(f"model.beam_width={beam_width!r} must be a whole number >= 1 (1: greedy decoding)")
    mean, std = normalization(data)
    try:
        return ModelSpec(charset=data["charset"], min_length=data["min_length"], max_length=data["max_length"],
                         input_size=tuple(data["input_size"]), mean=tuple(mean), std=tuple(std),
                         decoder=model_decoder(arch), arch=arch, beam_width=beam_width, version=__version__)
    except ValueError as exc:
        # The spec names its field (min_length=0); users set it as data.min_length or model.beam_width.
        message = re.sub(r"\b(" + "|".join(DATA_KEYS) + r")=", r"data.\1=", str(exc))
        raise ValueError(message.replace("beam_width=", "model.beam_width=")) from None


def build_module(cfg: DictConfig, datamodule=None):
    """The CaptchaModule for ``cfg``. With a ``datamodule``, its ``label_spec()`` (e.g. the charset
    a folder dataset inferred from its labels) takes the place of data.charset and the lengths."""
    from captcha_lit.training.module import CaptchaModule

    model = dict(to_plain(cfg.model))
    arch = model.pop("name")
    beam_width = model.pop("beam_width", 1)
    label_smoothing = model.pop("label_smoothing", 0.0)
    data = dict(to_plain(cfg.data))
    if datamodule is not None and hasattr(datamodule, "label_spec"):
        data.update(datamodule.label_spec())
    return CaptchaModule(
        spec=spec_from_config(arch, data, beam_width), model_kwargs=model, optimizer=to_plain(cfg.optimizer),
        scheduler=to_plain(cfg.scheduler), augmentation=to_plain(cfg.get("augmentation")) or {},
        label_smoothing=label_smoothing,
    )


def init_from_checkpoint(module, path: str | os.PathLike) -> dict:
    """Start ``module``'s network from a checkpoint's weights (fine-tuning).

    The architecture must match. Where the charsets differ, the rows of the output layer
    are mapped by character: shared characters (and CTC's blank, or the end symbol) keep
    their trained rows, new characters keep their fresh initialization. Returns a summary.
    """
    state = load_checkpoint_dict(path)
    theirs = checkpoint_spec(state, f"init_from={str(path)!r}")
    ours = module.spec
    if theirs.arch != ours.arch:
        raise ValueError(
            f"init_from={str(path)!r} holds a {theirs.arch!r} model, but this run builds {ours.arch!r}; "
            f"pass model={theirs.arch} or a checkpoint of a {ours.arch!r} model"
        )
    old_index = {name: i for i, name in enumerate(theirs.output_classes)}
    new_classes = ours.output_classes
    class_dims = module.net.output_class_dims()
    source = {k.removeprefix("net."): v for k, v in state["state_dict"].items() if k.startswith("net.")}
    target = module.net.state_dict()
    mismatched = [f"{k} is missing" for k in target if k not in source]
    mismatched += [f"{k} is not in this model" for k in source if k not in target]
    loaded = {}
    for key, fresh in target.items():
        if key not in source:
            continue
        old = source[key]
        dim = class_dims.get(key)
        if dim is None:
            if old.shape != fresh.shape:
                mismatched.append(f"{key} has shape {tuple(old.shape)} there but {tuple(fresh.shape)} here")
            loaded[key] = old
            continue
        if old.ndim != fresh.ndim or any(a != b for d, (a, b) in enumerate(zip(old.shape, fresh.shape)) if d != dim):
            mismatched.append(f"{key} has shape {tuple(old.shape)} there but {tuple(fresh.shape)} here")
            continue
        mapped = fresh.clone()
        for j, name in enumerate(new_classes):
            if name in old_index:
                mapped.select(dim, j).copy_(old.select(dim, old_index[name]))
        loaded[key] = mapped
    if mismatched:
        their_kwargs, our_kwargs = module_hparams(state, str(path))["model_kwargs"], module.hparams.model_kwargs
        differing = [f"model.{k}={their_kwargs.get(k)!r} there, {our_kwargs.get(k)!r} here"
                     for k in sorted(set(their_kwargs) | set(our_kwargs)) if their_kwargs.get(k) != our_kwargs.get(k)]
        for key in ("input_size", "max_length"):
            if getattr(theirs, key) != getattr(ours, key):
                differing.append(f"data.{key}={list(getattr(theirs, key)) if key == 'input_size' else theirs.max_length} "
                                 f"there, {list(getattr(ours, key)) if key == 'input_size' else ours.max_length} here")
        if theirs.grayscale != ours.grayscale:
            differing.append(f"data.grayscale={str(theirs.grayscale).lower()} there, {str(ours.grayscale).lower()} here")
        raise ValueError(
            f"init_from={str(path)!r}: the checkpoint's {theirs.arch!r} network does not match this run's: "
            + "; ".join(mismatched[:3]) + (f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else "")
            + (". Settings that differ: " + "; ".join(differing) if differing else "")
            + ". Use the checkpoint's model and input settings to fine-tune it"
        )
    module.net.load_state_dict(loaded)
    shared = [c for c in new_classes if c in old_index]
    new = [c for c in new_classes if c not in old_index]
    summary = {"init_from": str(path), "classes_from_checkpoint": len(shared), "new_classes": "".join(new)}
    log.info("initialized from %s: %d of %d output classes from the checkpoint%s", path, len(shared),
             len(new_classes), f", new characters {''.join(new)!r} start fresh" if new else "")
    return summary


def load_checkpoint_dict(path: str | os.PathLike) -> dict:
    """``torch.load`` with ``weights_only=True``: a checkpoint that needs arbitrary unpickling is refused."""
    ckpt = check_model_path(path, "checkpoint")
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


def _legacy_hparams(hp: dict) -> dict:
    """The arguments of a checkpoint written before specs existed (up to commit 640dca3): its spec's
    fields sat in the hyperparameters, and its design was a set of options of ``crnn`` or ``cnn``."""
    from captcha_lit.models import model_decoder
    from captcha_lit.models.legacy import upgrade

    arch, model_kwargs = upgrade(hp["arch"], dict(hp.get("model_kwargs") or {}))
    spec = {"charset": hp["charset"], "min_length": hp["min_length"], "max_length": hp["max_length"],
            "input_size": tuple(hp["input_size"]), "mean": tuple(hp["mean"]), "std": tuple(hp["std"]),
            "decoder": model_decoder(arch), "arch": arch, "beam_width": int(hp.get("beam_width", 1))}
    return {"spec": spec, "model_kwargs": model_kwargs,
            **{k: hp[k] for k in ("optimizer", "scheduler", "augmentation", "channels_last", "label_smoothing") if k in hp}}


def module_hparams(state: dict, source: str) -> dict:
    """A checkpoint's CaptchaModule arguments; checkpoints written before the spec are converted."""
    if not isinstance(state, dict) or not isinstance(state.get("hyper_parameters"), dict):
        raise ValueError(f"{source} is not a captcha_lit checkpoint (no hyper_parameters)")
    hp = dict(state["hyper_parameters"])
    if "spec" not in hp:
        try:
            hp = _legacy_hparams(hp)
        except KeyError as exc:
            raise ValueError(f"{source} is not a captcha_lit checkpoint (its hyperparameters lack {exc})") from None
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None
    return hp


def checkpoint_spec(state: dict, source: str = "checkpoint") -> ModelSpec:
    return ModelSpec.from_dict(dict(module_hparams(state, source)["spec"]), source)


def load_module(path: str | os.PathLike, map_location: str = "cpu"):
    """Rebuild a CaptchaModule from its checkpoint alone."""
    from captcha_lit.training.module import CaptchaModule

    state = load_checkpoint_dict(path)
    source = f"checkpoint {str(path)!r}"
    hparams = module_hparams(state, source)
    if "state_dict" not in state:
        raise ValueError(f"{source} is not a captcha_lit checkpoint (no state_dict)")
    module = CaptchaModule(**hparams)
    module.load_state_dict(state["state_dict"])
    module.eval()
    return module.to(map_location), state


def checkpoint_data_config(state: dict) -> dict:
    """The data config a checkpoint was trained with (datamodule hparams), with its spec's preprocessing."""
    data = dict(state.get("datamodule_hyper_parameters") or {})
    spec = checkpoint_spec(state)
    for key in DATA_KEYS:
        value = getattr(spec, key)
        data[key] = list(value) if isinstance(value, tuple) else value
    data["grayscale"] = spec.grayscale
    return data
