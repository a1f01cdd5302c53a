"""Checkpoints written before the designs were fixed (up to commit 640dca3) named one builder,
``crnn`` or ``cnn``, and a dozen design options. This maps such a model to the registered design
it is, with the same layers and parameter names, or refuses it naming what differs."""

from __future__ import annotations

# The old builders' defaults: an option a checkpoint does not list had this value.
_OLD_DEFAULTS = {
    "crnn": {"backbone": "vgg", "channels": [16, 32, 64, 128], "blocks": [1, 1, 1, 1],
             "strides": [[2, 2], [2, 2], [2, 1], [2, 1]], "dim": 128, "rnn": "conv", "rnn_layers": 2, "dropout": 0.1,
             "stem": 0, "stem_stride": 2, "downsample": "maxpool", "convs_per_stage": 1, "stem_norm": True},
    "cnn": {"channels": [16, 32, 64, 128], "convs_per_stage": 1, "hidden": 512, "dropout": 0.1, "stem": 0,
            "stem_stride": 2, "downsample": "maxpool", "strides": None, "stem_norm": True},
}
_OLD_ONLY = {"backbone", "stem_stride", "downsample", "convs_per_stage", "stem_norm"}


def _per_stage(value, stages: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) and not isinstance(value, str) else [value] * stages


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def upgrade(arch: str, model_kwargs: dict) -> tuple[str, dict]:
    """(arch, options) of a checkpoint written before model specs -> (registered design, its options)."""
    if arch not in _OLD_DEFAULTS:
        return arch, model_kwargs
    old = {**_OLD_DEFAULTS[arch], **_plain(model_kwargs)}
    stages = len(old["channels"])
    downsample = _per_stage(old["downsample"], stages)
    convs = _per_stage(old["convs_per_stage"], stages)
    first = old["channels"][0]
    if arch == "crnn":
        head = {k: old[k] for k in ("channels", "dim", "rnn", "rnn_layers", "dropout")}
        if old["backbone"] == "resnet":
            return "crnn_resnet", {**head, "blocks": old["blocks"], "strides": old["strides"]}
        if (old["stem"] == first and old["stem_stride"] == 2 and not old["stem_norm"]
                and downsample == ["pool_first"] + ["stride"] * (stages - 1) and convs == [2] + [1] * (stages - 1)
                and old["strides"] == [[2, 2]] + [[2, 1]] * (stages - 1)):
            return "crnn", head
        if downsample == ["maxpool"] * stages and convs == [1] * stages and old["stem_stride"] == 2 \
                and (old["stem"] == 0 or old["stem_norm"]):
            return "crnn_classic", {**head, "strides": old["strides"], "stem": old["stem"]}
    else:
        head = {k: old[k] for k in ("channels", "hidden", "dropout")}
        strides = old["strides"] or [[2, 2]] * stages
        if (old["stem"] == first and old["stem_stride"] == 2 and not old["stem_norm"]
                and downsample == ["pool_first"] * stages and convs == [2] * stages and strides == [[2, 2]] * stages):
            return "cnn", head
        if old["stem"] == 0 and downsample == ["maxpool"] * stages and convs == [1] * stages \
                and strides == [[2, 2]] * stages:
            return "cnn_seed", head
    settings = ", ".join(f"model.{k}={old[k]}" for k in sorted(_OLD_ONLY | {"stem", "strides"}) if k in old)
    raise ValueError(f"this {arch!r} checkpoint has a design that captcha_lit no longer builds ({settings}); "
                     f"retrain it with one of the registered models, or read it with captcha_lit at commit 640dca3")
