"""Hydra's Optuna sweeper, resumable: with a storage (``hparams_search.storage=sqlite:///study.db``)
the study outlives the search.

Re-running a killed search with the same storage and study name continues the study: its
finished trials stand (TPE learns from them), the trials it was running when it died are
marked failed, and only the trials still missing from ``n_trials`` run, numbered after the
earlier ones (so their job folders do not collide). Several searches on one storage share
the study, each running until it holds ``n_trials`` finished trials. Needs the ``scale`` extra.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import optuna
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
from optuna.trial import TrialState

log = logging.getLogger(__name__)

OWNER = "captcha_lit_owner"  # trial system attribute: the host and process of the search that runs it


def _this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_is_dead(owner: str | None) -> bool:
    """Only a search on this machine can be known dead: its process no longer exists."""
    host, _, pid = (owner or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def sqlite_folder(storage: Any) -> None:
    """SQLite creates its file but not the folders above it."""
    url = str(storage)
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(os.path.expanduser(url[len("sqlite:///"):])).parent.mkdir(parents=True, exist_ok=True)


def resume_study(study: optuna.Study, n_trials: int) -> tuple[int, int]:
    """Mark the dead searches' running trials failed; return (trials still to run, trials in the study)."""
    trials = study.get_trials(deepcopy=False)
    for trial in trials:
        if trial.state == TrialState.RUNNING and _owner_is_dead(trial.system_attrs.get(OWNER)):
            study._storage.set_trial_state(trial._trial_id, TrialState.FAIL)
            log.warning("trial %d was running in a search that died; marked failed", trial.number)
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    return max(0, n_trials - finished), len(trials)


class ResumableOptunaSweeperImpl(OptunaSweeperImpl):
    """The Optuna sweeper's work, with a stored study resumed first (see the module docstring)."""

    def sweep(self, arguments: list[str]) -> None:
        if self.storage is not None:
            sqlite_folder(self.storage)
            study = optuna.create_study(study_name=self.study_name, storage=self.storage,
                                        directions=self._get_directions(), load_if_exists=True)
            total = self.n_trials
            self.n_trials, self.job_idx = resume_study(study, total)
            if self.job_idx:
                log.info("study %r in %s holds %d trial(s): running the %d still missing from n_trials=%d",
                         self.study_name, self.storage, self.job_idx, self.n_trials, total)
        super().sweep(arguments)

    def _configure_trials(self, trials, search_space_distributions, fixed_params):
        for trial in trials:
            trial.set_system_attr(OWNER, _this_process())
        return super()._configure_trials(trials, search_space_distributions, fixed_params)
