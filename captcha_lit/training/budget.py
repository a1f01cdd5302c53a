"""The folder recipe's training length: a budget of optimizer steps scaled to the labels.

``trainer.max_steps=auto`` (set by ``conf/recipe/folder.yaml``) becomes
``step_budget.steps_per_label`` times the training labels, kept within
``[step_budget.min_steps, step_budget.max_steps]``; ``trainer.min_steps=auto`` becomes half of
it, so that the plateau stop cannot end a run that has barely started. A given
``trainer.max_epochs`` turns the budget off: the user asked for epochs.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, open_dict

from captcha_lit.data.survey import Choice

log = logging.getLogger(__name__)
AUTO = "auto"


def step_budget(num_train: int, steps_per_label: float, min_steps: int, max_steps: int) -> int:
    for key, value in (("steps_per_label", steps_per_label), ("min_steps", min_steps), ("max_steps", max_steps)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"step_budget.{key}={value!r} must be a positive number")
    if max_steps < min_steps:
        raise ValueError(f"step_budget.max_steps={max_steps} is less than step_budget.min_steps={min_steps}")
    return int(min(max(round(steps_per_label * num_train), min_steps), max_steps))


def settle_training_length(cfg: DictConfig, num_train: int | None) -> dict[str, Choice]:
    """Replace ``auto`` in ``trainer.max_steps`` and ``trainer.min_steps`` (in place) -> the choices."""
    trainer = cfg.trainer
    if AUTO not in (str(trainer.get("max_steps")), str(trainer.get("min_steps"))):
        return {}
    choices: dict[str, Choice] = {}
    if trainer.get("max_epochs") is not None:
        reason = f"trainer.max_epochs={trainer.max_epochs} is given: it sets the length, the step budget is off"
        if str(trainer.get("max_steps")) == AUTO:
            choices["max_steps"] = Choice(-1, reason)
        if str(trainer.get("min_steps")) == AUTO:
            choices["min_steps"] = Choice(None, reason)
    else:
        if num_train is None:
            raise ValueError("trainer.max_steps=auto sizes training by the number of labels, which only data=folder "
                             "knows; set trainer.max_steps=N or trainer.max_epochs=N")
        budget = dict(cfg.get("step_budget") or {})
        try:
            steps = step_budget(num_train, budget["steps_per_label"], budget["min_steps"], budget["max_steps"])
        except KeyError as exc:
            raise ValueError(f"trainer.max_steps=auto needs step_budget.{exc.args[0]}") from None
        if str(trainer.get("max_steps")) == AUTO:
            choices["max_steps"] = Choice(steps, f"{num_train} training labels x {budget['steps_per_label']:g} steps "
                                                 f"each, within [{budget['min_steps']}, {budget['max_steps']}]")
        else:
            steps = int(trainer.max_steps)
        if str(trainer.get("min_steps")) == AUTO:
            choices["min_steps"] = Choice(steps // 2, "half the step budget: the plateau stop waits for it")
    with open_dict(trainer):
        for key, choice in choices.items():
            trainer[key] = choice.value
    for key, choice in choices.items():
        log.info("trainer.%s=auto -> %s: %s", key, choice.value, choice.reason)
    return choices
