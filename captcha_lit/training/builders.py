"""Turning composed configs into objects, shared by the entry points."""

from __future__ import annotations

import inspect
import logging
import re
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from captcha_lit import __version__
from captcha_lit.spec import DATA_KEYS, ModelSpec

log = logging.getLogger(__name__)


def _datasets_path(name: str = "") -> str:
    from captcha_lit.data.files import datasets_dir

    return str(datasets_dir() / name)


# ${captcha_lit.datasets:NAME} in a config: the named dataset folder ($CAPTCHA_LIT_DATASETS or ../shared/datasets).
if not OmegaConf.has_resolver("captcha_lit.datasets"):
    OmegaConf.register_new_resolver("captcha_lit.datasets", _datasets_path)


def register_model_configs() -> None:
    """``model=NAME`` for every registered model: its builder's options and defaults (the one source
    of them), plus the decoding option of its kind (CTC's beam width, or per-position label smoothing)
    and ``tta_shifts`` (inference averaged over views shifted sideways; ``CaptchaModule``)."""
    from hydra.core.config_store import ConfigStore

    from captcha_lit.models import list_models, model_decoder, model_options
    from captcha_lit.training.module import CaptchaModule

    beam_width = ModelSpec.__dataclass_fields__["beam_width"].default
    label_smoothing = inspect.signature(CaptchaModule.__init__).parameters["label_smoothing"].default
    store = ConfigStore.instance()
    for name in list_models():
        decoding = {"beam_width": beam_width} if model_decoder(name) == "ctc" else {"label_smoothing": label_smoothing}
        store.store(group="model", name=name, node={"name": name, **model_options(name), **decoding, "tta_shifts": []})


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
    return _precision_and_reason(trainer_cfg)[0]


def _precision_and_reason(trainer_cfg: DictConfig | dict) -> tuple[str | int, str]:
    """``resolve_precision``'s choice, and for ``auto`` why, for the log."""
    precision = trainer_cfg.get("precision")
    if str(precision) != "auto":
        return precision, ""
    accelerator = str(trainer_cfg.get("accelerator") or "auto")
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda"):
        return ("bf16-mixed", "this GPU computes bf16 natively") if native_bf16("cuda") else (
            "16-mixed", "this GPU has no native bf16")
    if accelerator == "cpu":
        if native_bf16("cpu"):
            return "bf16-mixed", "this CPU computes bf16 natively"
        return "32-true", ("this CPU has no native bf16 (AMX or AVX512-BF16), where bf16 autocast would be "
                           "emulated and many times slower, so training runs in fp32, slower than on one that has it")
    return "32-true", f"no mixed precision chosen for accelerator {accelerator!r}"


def build_trainer(trainer_cfg: DictConfig, **kwargs):
    """Instantiate ``cfg.trainer`` (with ``precision=auto`` resolved, and written back to the config
    so the logged hparams and the saved config name the precision that ran)."""
    from hydra.utils import instantiate

    precision, reason = _precision_and_reason(trainer_cfg)
    if precision != trainer_cfg.get("precision"):
        with open_dict(trainer_cfg):
            trainer_cfg.precision = precision
        log.info("trainer.precision=auto -> %s: %s", precision, reason)
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


# Data config keys that describe this machine (where the cache is, how many processes generate and
# load), not the data: a checkpoint's values for them are the training machine's.
MACHINE_DATA_KEYS = ("cache_dir", "gen_workers", "num_workers")


def build_datamodule(data_cfg: DictConfig | dict, augmentation: DictConfig | dict | None = None):
    data = dict(to_plain(data_cfg))
    if data.get("grayscale") != "auto":  # auto: checked once the folder has settled it (build_module)
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
    tta_shifts = model.pop("tta_shifts", None)
    data = dict(to_plain(cfg.data))
    if datamodule is not None and hasattr(datamodule, "label_spec"):
        data.update(datamodule.label_spec())
    return CaptchaModule(
        spec=spec_from_config(arch, data, beam_width), model_kwargs=model, optimizer=to_plain(cfg.optimizer),
        scheduler=to_plain(cfg.scheduler), augmentation=to_plain(cfg.get("augmentation")) or {},
        label_smoothing=label_smoothing, tta_shifts=tta_shifts,
    )
