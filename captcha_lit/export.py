"""Export a checkpoint to ONNX (implementation: ``captcha_lit.deploy.export``).

    python -m captcha_lit.export ckpt_path=outputs/train/runs/<time>/checkpoints/last.ckpt
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from captcha_lit.deploy.export import export
from captcha_lit.utils import entry_point


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
@entry_point
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
