"""Serve a model over HTTP (implementation: ``captcha_lit.deploy``).

    python -m captcha_lit.serve model_path=model.onnx port=8000
    python -m captcha_lit.serve model_path=outputs/train/runs/<time>/checkpoints/last.ckpt
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from captcha_lit.utils import entry_point, require_extra


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
@entry_point
def main(cfg: DictConfig) -> None:
    exporting = () if str(cfg.model_path).lower().endswith(".onnx") else ("onnx",)
    require_extra("serve", "deploy", "fastapi", "uvicorn", "httptools", "onnxruntime", *exporting)
    from captcha_lit.deploy.serve import serve

    serve(cfg)


if __name__ == "__main__":
    main()
