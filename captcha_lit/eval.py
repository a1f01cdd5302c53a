"""Evaluate a checkpoint on the fixed test split.

    python -m captcha_lit.eval ckpt_path=outputs/train/runs/<time>/checkpoints/last.ckpt

The data and preprocessing config come from the checkpoint. ``data.<key>=value``
overrides on the command line replace single values (e.g. data.num_test=500);
``data=<option>`` replaces the whole data config.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from captcha_lit.training.builders import MACHINE_DATA_KEYS, build_datamodule, build_trainer, to_plain
from captcha_lit.training.checkpoints import checkpoint_data_config, checkpoint_spec, load_module
from captcha_lit.training.callbacks import ErrorAnalysis, written_files
from captcha_lit.utils import entry_point, output_dir, write_json

log = logging.getLogger(__name__)

def resolve_data_config(cfg: DictConfig, state: dict, overrides: list[str]) -> dict:
    """The checkpoint's data config, with the user's data.* overrides applied on top."""
    composed = to_plain(cfg.data)
    if any(o.split("=", 1)[0].lstrip("+~") == "data" for o in overrides):
        data = dict(composed)
    else:
        data = checkpoint_data_config(state)
        for override in overrides:
            key = override.split("=", 1)[0].lstrip("+~")
            if key.startswith("data."):
                name = key.split(".", 2)[1]
                data[name] = composed.get(name)
    for key, value in checkpoint_spec(state).data_values().items():  # the model reads only what it was trained on
        if key in data and data[key] != value and key not in ("min_length", "max_length"):
            log.warning("data.%s=%s differs from the checkpoint's %s; using the checkpoint's", key, data[key], value)
        data[key] = value
    # Where to cache and how many processes to use are this machine's, not the training machine's.
    for key in MACHINE_DATA_KEYS:
        if key in composed and key in data:  # a folder's data has no gen_workers, say
            data[key] = composed[key]
    return data


def set_beam_width(module, beam_width: int | None) -> None:
    """``beam_width=N`` on the command line replaces the checkpoint's; null keeps it."""
    if beam_width is None:
        return
    module.spec = module.spec.replace(beam_width=int(beam_width))


def evaluate(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    start = time.time()
    out_dir = output_dir(cfg)
    module, state = load_module(cfg.ckpt_path)
    set_beam_width(module, cfg.get("beam_width"))
    data = resolve_data_config(cfg, state, overrides or [])
    datamodule = build_datamodule(data)
    callbacks = []
    if cfg.get("error_analysis") is not None:
        callbacks.append(ErrorAnalysis(dirpath=out_dir, top_pairs=cfg.error_analysis.top_pairs))
    trainer: L.Trainer = build_trainer(cfg.trainer, logger=False, callbacks=callbacks, enable_checkpointing=False,
                                       enable_autolog_hparams=False)
    results = trainer.test(module, datamodule=datamodule)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    metrics.update({"ckpt_path": str(Path(cfg.ckpt_path).resolve()), "num_test": len(datamodule.datasets["test"]),
                    "beam_width": module.spec.beam_width if module.spec.decoder == "ctc" else None,
                    "wall_time_s": round(time.time() - start, 2), "plots": written_files(callbacks)})
    write_json(Path(out_dir) / "metrics.json", metrics)
    print("\n".join(["", "test metrics:"] + [f"  {k:<16} {v}" for k, v in metrics.items() if k != "plots"]))
    report = callbacks[0].report if callbacks else None
    if report is not None:
        pairs = ", ".join(f"{p['true']}->{p['predicted']} ({p['count']})" for p in report.confused_pairs(5))
        print(f"  {'most confused':<16} {pairs or 'none'}\n  {'error analysis':<16} {out_dir}/confusion.png, "
              "confused_pairs.md, position_accuracy.png")
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
@entry_point
def main(cfg: DictConfig) -> None:
    evaluate(cfg, list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    main()
