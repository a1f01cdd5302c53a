"""Label a folder of CAPTCHAs in the browser (implementation: ``captcha_lit.labeling``).

    python -m captcha_lit.label path=DIR                    # file order
    python -m captcha_lit.label path=DIR ckpt_path=PATH     # .ckpt or .onnx: least sure first, its reading filled in
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from captcha_lit.labeling.server import label
from captcha_lit.utils import entry_point


@hydra.main(version_base="1.3", config_path="../conf", config_name="label")
@entry_point
def main(cfg: DictConfig) -> None:
    label(cfg)


if __name__ == "__main__":
    main()
