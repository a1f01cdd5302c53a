"""Pictures of what a checkpoint learned (implementation: ``captcha_lit.viz.visualize``).

    python -m captcha_lit.visualize ckpt_path=outputs/train/runs/<time>/checkpoints/last.ckpt
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from captcha_lit.viz.visualize import visualize
from captcha_lit.utils import entry_point


@hydra.main(version_base="1.3", config_path="../conf", config_name="visualize")
@entry_point
def main(cfg: DictConfig) -> None:
    visualize(cfg, list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    main()
