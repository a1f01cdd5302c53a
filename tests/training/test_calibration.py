"""Calibrated confidence: a temperature fitted on validation lowers the calibration error, goes into
the checkpoint's spec and the ONNX metadata, and min_confidence marks the readings below it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from captcha_lit.decoding import Solution, check_min_confidence, decode, require_confidence
from captcha_lit.spec import ModelSpec
from captcha_lit.train import train
from captcha_lit.training.calibration import fit_temperature
from captcha_lit.viz.analysis import reliability

SPEC = ModelSpec(charset="ABCD", min_length=3, max_length=3, input_size=(32, 96), mean=(0.5,), std=(0.5,),
                 decoder="ctc", arch="crnn")


def _overconfident(n: int = 600) -> tuple[np.ndarray, list[str]]:
    """Peaked logits (confidences near 1) whose readings are right only about two times in three."""
    rng = np.random.default_rng(0)
    steps, classes = 7, SPEC.num_outputs
    logits = rng.normal(0, 1, (n, steps, classes))
    truths = []
    for i in range(n):
        text = "".join(rng.choice(list("ABCD"), 3))
        read = text if rng.random() < 0.67 else text[:2] + "ABCD"[("ABCD".index(text[2]) + 1) % 4]
        path = [SPEC.blank] * steps
        for j, char in enumerate(read):
            path[1 + 2 * j] = "ABCD".index(char)
        logits[i, np.arange(steps), path] += 9.0
        truths.append(text)
    return logits.astype(np.float32), truths


def _ece(spec: ModelSpec, logits: np.ndarray, truths: list[str]) -> float:
    decoded = decode(spec, logits, beam_width=1)
    right = ["".join("ABCD"[k] for k in indices) == truth for indices, truth in zip(decoded.indices, truths)]
    return reliability(decoded.seq_conf, right).expected_calibration_error


def test_the_fitted_temperature_lowers_the_calibration_error_and_keeps_the_readings():
    logits, truths = _overconfident()
    fit, held_out = (logits[:300], truths[:300]), (logits[300:], truths[300:])
    temperature, report = fit_temperature(SPEC, *fit)
    assert temperature > 1  # an overconfident model is softened
    assert report["val_log_loss_after"] < report["val_log_loss_before"]
    calibrated = SPEC.replace(temperature=temperature)
    before, after = _ece(SPEC, *held_out), _ece(calibrated, *held_out)
    assert before > 0.2 and after < before / 3, (before, after)
    assert decode(calibrated, held_out[0]).indices == decode(SPEC, held_out[0]).indices


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), "2", True])
def test_a_temperature_that_is_not_a_positive_number_is_refused(value):
    with pytest.raises(ValueError, match="temperature"):
        SPEC.replace(temperature=value)


def test_temperature_is_a_decoding_value_in_the_metadata():
    spec = SPEC.replace(temperature=2.5)
    assert spec.digest() == SPEC.digest()  # fitted after training: not part of what the weights are for
    assert ModelSpec.from_metadata(spec.to_metadata()).temperature == 2.5
    assert ModelSpec.from_metadata({k: v for k, v in SPEC.to_metadata().items() if k != "temperature"}) == SPEC


def test_min_confidence_marks_unsure_readings():
    solutions = [Solution("ABC", 0.95, [0.99] * 3), Solution("ABD", 0.5, [0.8] * 3),
                 Solution("", 0.99, [], unsure="empty reading: no characters found")]
    marked = require_confidence(solutions, 0.9)
    assert marked[0].unsure is None
    assert marked[1].unsure == "confidence 0.500 is below min_confidence=0.9" and marked[1].text == "ABD"
    assert marked[2].unsure == "empty reading: no characters found"
    assert require_confidence(solutions, None) == solutions
    for bad in (1.5, -0.1, "high", True):
        with pytest.raises(ValueError, match="min_confidence"):
            check_min_confidence(bad)


def test_training_calibrates_the_best_checkpoint(make_cfg):
    metrics = train(make_cfg("train", ["model.channels=[8,16,32,32]", "model.dim=32", "logger=csv",
                                       "trainer.max_epochs=1"]))
    report = metrics["calibration"]
    assert report["val_images"] == 32 and report["temperature"] > 0
    spec = torch.load(metrics["best_ckpt"], map_location="cpu", weights_only=True)["hyper_parameters"]["spec"]
    assert spec["temperature"] == report["temperature"]
    assert 0 <= metrics["test/ece"] <= 1
    uncalibrated = train(make_cfg("train", ["model.channels=[8,16,32,32]", "model.dim=32", "logger=csv",
                                            "trainer.max_epochs=1", "calibrate=false"]))
    assert uncalibrated["calibration"] is None
    assert uncalibrated["test/seq_acc"] == metrics["test/seq_acc"]  # the same readings, other confidences


def test_a_validation_split_read_all_right_keeps_the_softmax():
    logits, truths = _overconfident()
    readings = ["".join("ABCD"[k] for k in indices) for indices in decode(SPEC, logits).indices]
    temperature, report = fit_temperature(SPEC, logits, readings)  # every reading "right"
    assert temperature == 1.0 and "nothing to fit" in report["note"]


def test_an_underconfident_model_is_sharpened_below_half():
    """A model read as an average of views (``model.tta_shifts``) peaks low where right: the fit
    reaches below 0.5, the bottom of the range before such models existed."""
    rng = np.random.default_rng(1)
    steps, classes, n = 7, SPEC.num_outputs, 600
    logits = rng.normal(0, 0.3, (n, steps, classes))
    truths = []
    for i in range(n):
        text = "".join(rng.choice(list("ABCD"), 3))
        read = text if rng.random() < 0.97 else "ABCD"[("ABCD".index(text[0]) + 1) % 4] + text[1:]
        path = [SPEC.blank] * steps
        for j, char in enumerate(read):
            path[1 + 2 * j] = "ABCD".index(char)
        logits[i, np.arange(steps), path] += 1.0  # right 97% of the time at confidences near 0.15
        truths.append(text)
    temperature, report = fit_temperature(SPEC, logits.astype(np.float32), truths)
    assert temperature < 0.5 and report["val_log_loss_after"] < report["val_log_loss_before"]
    calibrated = SPEC.replace(temperature=temperature)
    assert _ece(calibrated, logits, truths) < _ece(SPEC, logits, truths) / 3
