"""Audit a CAPTCHA scheme: how many labels and CPU minutes it takes to break.

    python -m captcha_lit.audit data.path=DIR                               # the default grid, one run at a time
    python -m captcha_lit.audit data.path=DIR audit.labels=[25,100,all]     # other label counts
    python -m captcha_lit.audit data.path=DIR hydra/launcher=joblib hydra.launcher.n_jobs=2
    python -m captcha_lit.audit data.path=DIR hydra/launcher=submitit_slurm hydra.launcher.partition=cpu

Trains the folder recipe at each label count (and each value of ``audit.grid``'s axes), then
writes ``report.html`` and ``report.md`` into ``outputs/audit/<folder name>/``. The same command
again continues an interrupted audit. Any train override (``model=...``, ``trainer.max_steps=...``)
applies to every run. See ``captcha_lit.studies.audit``.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from captcha_lit.studies.audit import audit
from captcha_lit.utils import entry_point


@hydra.main(version_base="1.3", config_path="../conf", config_name="audit")
@entry_point
def main(cfg: DictConfig) -> None:
    overrides = HydraConfig.get().overrides
    audit(cfg, list(overrides.task), list(overrides.hydra))


if __name__ == "__main__":
    main()
