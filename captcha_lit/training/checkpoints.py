"""Checkpoints: a safe load, the module and data config they hold, and fine-tuning from one's weights.

Checkpoints written before model specs (up to commit 640dca3) are converted on load."""

from __future__ import annotations

import inspect
import logging
import os

import torch

from captcha_lit.spec import ModelSpec
from captcha_lit.utils import check_model_path, default_cache_dir

log = logging.getLogger(__name__)


def init_from_checkpoint(module, path: str | os.PathLike) -> dict:
    """Start ``module``'s network from a checkpoint's weights (fine-tuning).

    The architecture must match. Where the charsets differ, the rows of the output layer
    are mapped by character: shared characters (and CTC's blank, or the end symbol) keep
    their trained rows, new characters keep their fresh initialization. Returns a summary.
    """
    state = load_checkpoint_dict(path)
    source = f"init_from={str(path)!r}"
    their_hparams = module_hparams(state, source)
    if not isinstance(state.get("state_dict"), dict):
        raise ValueError(f"{source} is not a captcha_lit checkpoint (no state_dict)")
    theirs = ModelSpec.from_dict(dict(their_hparams["spec"]), source)
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
        their_kwargs, our_kwargs = their_hparams["model_kwargs"], module.hparams.model_kwargs
        differing = [f"model.{k}={their_kwargs.get(k)!r} there, {our_kwargs.get(k)!r} here"
                     for k in sorted(set(their_kwargs) | set(our_kwargs)) if their_kwargs.get(k) != our_kwargs.get(k)]
        if theirs.input_size != ours.input_size:
            differing.append(f"data.input_size={list(theirs.input_size)} there, {list(ours.input_size)} here")
        if theirs.max_length != ours.max_length:
            differing.append(f"data.max_length={theirs.max_length} there, {ours.max_length} here")
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
    """A checkpoint's CaptchaModule arguments, checked: known keys only, a valid spec, and the spec
    the weights were trained for. Checkpoints written before the spec are converted."""
    if not isinstance(state, dict) or not isinstance(state.get("hyper_parameters"), dict):
        raise ValueError(f"{source} is not a captcha_lit checkpoint (no hyper_parameters)")
    hp = dict(state["hyper_parameters"])
    if "spec" not in hp:
        try:
            hp = _legacy_hparams(hp)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{source} is not a captcha_lit checkpoint (its hyperparameters lack {exc})") from None
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None
    from captcha_lit.training.module import CaptchaModule

    known = set(inspect.signature(CaptchaModule.__init__).parameters) - {"self"}
    unknown = sorted(str(k) for k in set(hp) - known)
    if unknown:
        raise ValueError(f"{source}: its hyperparameters have unknown key(s) {', '.join(unknown)}; the checkpoint was "
                         "edited or written by another program")
    if not isinstance(hp["spec"], dict):
        raise ValueError(f"{source}: its hyperparameters' spec is {type(hp['spec']).__name__}, not a mapping")
    spec = ModelSpec.from_dict(dict(hp["spec"]), source)
    stored = state.get("spec_digest")
    if stored is not None and stored != spec.digest():
        raise ValueError(f"{source}: its model spec (charset, lengths, input size, normalization or architecture) was "
                         "edited after training and no longer describes its weights; use the checkpoint as it was "
                         "saved, or fine-tune it with init_from= for new settings")
    return hp


def checkpoint_spec(state: dict, source: str = "checkpoint") -> ModelSpec:
    return ModelSpec.from_dict(dict(module_hparams(state, source)["spec"]), source)


def load_module(path: str | os.PathLike, map_location: str = "cpu"):
    """Rebuild a CaptchaModule from its checkpoint alone."""
    state = load_checkpoint_dict(path)
    source = f"checkpoint {str(path)!r}"
    module = _build_module(state, source)
    try:
        module.load_state_dict(state["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ValueError(_weights_mismatch(source, exc)) from None
    module.eval()
    return module.to(map_location), state


def _build_module(state: dict, source: str):
    """A fresh CaptchaModule from a checkpoint's hyperparameters (its weights not yet loaded)."""
    from captcha_lit.training.module import CaptchaModule

    hparams = module_hparams(state, source)
    if not isinstance(state.get("state_dict"), dict):
        raise ValueError(f"{source} is not a captcha_lit checkpoint (no state_dict)")
    try:
        return CaptchaModule(**hparams)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    except (TypeError, AttributeError, KeyError) as exc:  # a value of the wrong type, edited into the file
        raise ValueError(f"{source}: its hyperparameters are invalid ({type(exc).__name__}: {exc})") from None


def _weights_mismatch(source: str, exc: Exception) -> str:
    first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line or "Missing" in line
                  or "Unexpected" in line), str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    return (f"{source}: its weights do not fit its hyperparameters ({first[:300]}); the checkpoint was edited or is "
            "damaged")


def check_resume_checkpoint(path: str | os.PathLike, module, how: str) -> None:
    """Refuse, with one line, a checkpoint that training cannot resume ``module``'s run from: unreadable,
    unsafe, not a Lightning training checkpoint, or of another model. ``how`` says where it came from."""
    state = load_checkpoint_dict(path)
    source = f"{how} {str(path)!r}"
    if not isinstance(state, dict) or "loops" not in state or "optimizer_states" not in state:
        raise ValueError(f"{source} is not a checkpoint of a training run (no loop or optimizer state), so it cannot be "
                         "resumed; pass init_from= to start a new run from its weights")
    fresh = _build_module(state, source)
    try:
        fresh.load_state_dict(state["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ValueError(_weights_mismatch(source, exc)) from None
    theirs, ours = fresh.spec.replace(beam_width=1, version=""), module.spec.replace(beam_width=1, version="")
    differing = [f"{k}={v!r} there, {ours.to_dict()[k]!r} here" for k, v in theirs.to_dict().items()
                 if v != ours.to_dict()[k]]
    differing += [f"model.{k}={fresh.hparams.model_kwargs.get(k)!r} there, {module.hparams.model_kwargs.get(k)!r} here"
                  for k in sorted(set(fresh.hparams.model_kwargs) | set(module.hparams.model_kwargs))
                  if fresh.hparams.model_kwargs.get(k) != module.hparams.model_kwargs.get(k)]
    if differing:
        raise ValueError(f"{source} holds a different model than this run builds ({'; '.join(differing[:3])}); resume "
                         "with the checkpoint's settings, or pass init_from= to fine-tune it")


def checkpoint_data_config(state: dict) -> dict:
    """The data config a checkpoint was trained with (datamodule hparams), with its spec's preprocessing.
    The cache is this machine's (``$CAPTCHA_LIT_CACHE``): the training machine's path may not exist here."""
    data = {**(state.get("datamodule_hyper_parameters") or {}), **checkpoint_spec(state).data_values()}
    if "cache_dir" in data:
        data["cache_dir"] = default_cache_dir()
    return data
