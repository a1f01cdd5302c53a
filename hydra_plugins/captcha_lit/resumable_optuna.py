"""``hydra.sweeper._target_`` of ``hparams_search=optuna``: Hydra's Optuna sweeper, resumable from a
storage. The work is ``captcha_lit.training.sweeper``'s, imported only when a search starts (it needs
the ``scale`` extra, and Hydra imports this module at every start)."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper


class ResumableOptunaSweeper(Sweeper):
    def __init__(self, **options: Any) -> None:
        from captcha_lit.training.sweeper import ResumableOptunaSweeperImpl

        self.sweeper = ResumableOptunaSweeperImpl(**options)

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)
