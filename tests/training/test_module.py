"""The LightningModule: logits, losses, label smoothing, normalization, optimizers and its hyperparameters."""

from __future__ import annotations

import io
import math
import re

import pytest
import torch

from captcha_lit.models import list_models, model_decoder
from captcha_lit.spec import ModelSpec
from captcha_lit.training.module import CaptchaModule

INPUT = (32, 96)


SPEC_KEYS = ("arch", "charset", "min_length", "max_length", "input_size", "mean", "std", "beam_width")


def _module(**kwargs) -> CaptchaModule:
    """A small cnn on digits; ``kwargs`` set spec fields (arch, charset, lengths, ...) or module options."""
    spec = {"arch": "cnn", "charset": "0-9", "min_length": 5, "max_length": 5, "input_size": INPUT,
            "mean": (0.5,) * 3, "std": (0.5,) * 3, **{k: v for k, v in kwargs.items() if k in SPEC_KEYS}}
    spec["decoder"] = model_decoder(spec["arch"]) if spec["arch"] in list_models() else "positional"
    options = {"model_kwargs": {"channels": [8, 16, 16, 16], "hidden": 32}, "channels_last": False,
               **{k: v for k, v in kwargs.items() if k not in SPEC_KEYS}}
    return CaptchaModule(spec=ModelSpec(**spec), **options)


def test_module_logits_and_predictions():
    module = _module().eval()
    images = torch.randn(3, 3, *INPUT)
    with torch.no_grad():
        logits = module(images)
        solutions, decoded = module.read(logits)
        texts = [solution.text for solution in solutions]
    assert logits.shape == (3, 5, 10)
    assert texts == ["".join(str(i) for i in row) for row in logits.argmax(-1).tolist()]  # charset 0-9: index = digit
    # Each character's confidence is its softmax probability; the text's, their product (no end symbol here).
    for chars, probs in zip(decoded.char_conf, logits.softmax(-1).max(-1).values.tolist()):
        assert chars == pytest.approx(probs)
    assert decoded.seq_conf == pytest.approx([math.prod(chars) for chars in decoded.char_conf])


def test_module_variable_length_positional_adds_end_class():
    module = _module(min_length=3, max_length=6).eval()
    with torch.no_grad():
        logits = module(torch.randn(2, 3, *INPUT))
    assert logits.shape == (2, 6, 11)  # 10 digits + end symbol
    assert module.spec.end_class == 10


def test_module_ctc_loss_is_finite():
    module = _module(arch="crnn", model_kwargs={"dim": 32}, min_length=3, max_length=5)
    logits = module(torch.randn(2, 3, *INPUT))
    assert logits.shape[2] == 11
    targets = torch.tensor([[1, 2, 3, -1, -1], [4, 5, 6, 7, 8]])
    loss = module.compute_loss(logits, targets, torch.tensor([3, 5]))
    assert torch.isfinite(loss) and loss > 0
    loss.backward()


def test_label_smoothing_shapes_the_training_loss_only():
    plain, smooth = _module(), _module(label_smoothing=0.2)
    smooth.load_state_dict(plain.state_dict())
    plain.eval(), smooth.eval()  # the same forward pass in both (no dropout, BN running stats)
    batch = {"image": torch.randn(4, 3, *INPUT), "target": torch.randint(0, 10, (4, 5)),
             "length": torch.full((4,), 5)}
    with torch.no_grad():
        logits = plain(batch["image"]).flatten(0, 1)
        plain_ce = torch.nn.functional.cross_entropy(logits, batch["target"].flatten())
        smoothed_ce = torch.nn.functional.cross_entropy(logits, batch["target"].flatten(), label_smoothing=0.2)
        assert not torch.allclose(plain_ce, smoothed_ce)
        # Training minimizes CE against targets that put 0.2 / 10 on every class ...
        assert torch.allclose(smooth._shared_step(batch, "train")[0], smoothed_ce, atol=1e-6)
        assert torch.allclose(plain._shared_step(batch, "train")[0], plain_ce, atol=1e-6)
        # ... while val and test report plain CrossEntropy, comparable across runs.
        for stage in ("val", "test"):
            assert torch.allclose(smooth._shared_step(batch, stage)[0], plain_ce, atol=1e-6)
    assert smooth.hparams.label_smoothing == 0.2 and plain.hparams.label_smoothing == 0.0


@pytest.mark.parametrize("value", [-0.1, 1.0, "0.1", True])
def test_bad_label_smoothing_is_named(value):
    with pytest.raises(ValueError, match=re.escape(f"model.label_smoothing={value!r}: use a number in [0, 1)")):
        _module(label_smoothing=value)


def test_label_smoothing_is_refused_for_ctc():
    with pytest.raises(ValueError, match="applies to per-position CrossEntropy; model 'crnn' trains with CTC"):
        _module(arch="crnn", model_kwargs={"dim": 32}, label_smoothing=0.1)


def test_module_uint8_batches_are_normalized():
    module = _module()
    batch = {"image": torch.full((2, 3, *INPUT), 255, dtype=torch.uint8)}
    out = module.on_after_batch_transfer(batch, 0)
    assert out["image"].dtype == torch.float32
    assert torch.allclose(out["image"], torch.ones_like(out["image"]))  # (1 - 0.5) / 0.5


def test_module_unknown_optimizer_named():
    with pytest.raises(ValueError) as info:
        _module(optimizer={"name": "nope", "lr": 0.1})
    assert "unknown optimizer 'nope'" in str(info.value)
    assert "adam" in str(info.value)


def test_module_bad_optimizer_option_named():
    with pytest.raises(ValueError, match="optimizer 'adam' rejects"):
        _module(optimizer={"name": "adam", "lr": 0.1, "momentum": 0.9})
    with pytest.raises(ValueError, match="optimizer.lr"):
        _module(optimizer={"name": "adam", "lr": -1})


def test_module_unknown_scheduler_named():
    with pytest.raises(ValueError, match="unknown scheduler 'nope'"):
        _module(scheduler={"name": "nope"})


def test_module_rejects_duplicate_charset():
    with pytest.raises(ValueError, match="duplicate"):
        _module(charset="AAB")


def test_module_rejects_unknown_arch():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        _module(arch="nope", model_kwargs={})


def test_module_rejects_bad_lengths():
    with pytest.raises(ValueError, match="at least 1"):
        _module(min_length=0)
    with pytest.raises(ValueError, match="less than"):
        _module(min_length=5, max_length=4)


def test_module_hparams_are_plain_values():
    module = _module(model_kwargs={"channels": (8, 16, 16, 16), "hidden": 32})
    hp = dict(module.hparams)
    assert hp["spec"]["arch"] == "cnn" and hp["spec"]["charset"] == "0123456789"
    assert hp["spec"]["input_size"] == [32, 96]
    buffer = io.BytesIO()
    torch.save(hp, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == hp  # plain values only: a safe load reads them back
    # The module can be rebuilt from its own hyperparameters, into the same network.
    rebuilt = CaptchaModule(**hp)
    assert dict(rebuilt.hparams) == hp
    rebuilt.load_state_dict(module.state_dict())


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_uses_the_fused_kernel_and_matches_the_plain_one(name):
    from captcha_lit.training.optim import make_optimizer

    torch.manual_seed(0)
    plain_params = [torch.randn(4, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    fused_params = [p.detach().clone().requires_grad_(True) for p in plain_params]
    plain = make_optimizer(name, plain_params, {"lr": 1e-2, "fused": False})
    fused = make_optimizer(name, fused_params, {"lr": 1e-2})
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    for _ in range(5):
        grads = [torch.randn_like(p) for p in plain_params]
        for params, opt in ((plain_params, plain), (fused_params, fused)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(plain_params, fused_params):
        assert not torch.equal(a, torch.zeros_like(a))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # A value that is not a bool is named, not read as true.
    for bad in ("no", "maybe", 2):
        with pytest.raises(ValueError, match=re.escape(f"optimizer.fused={bad!r}: use true, false or null")):
            _module(optimizer={"name": name, "lr": 1e-3, "fused": bad})
    # An explicit choice is kept, and optimizers without a fused kernel are built as configured.
    assert make_optimizer(name, [torch.zeros(2, requires_grad=True)], {"lr": 1e-3, "foreach": True}).defaults["fused"] is None
    sgd = make_optimizer("sgd", [torch.zeros(2, requires_grad=True)], {"lr": 0.1, "momentum": 0.9})
    assert "fused" not in sgd.defaults or not sgd.defaults["fused"]



def test_init_from_a_checkpoint_without_weights_is_named(tmp_path):
    from captcha_lit.training.checkpoints import init_from_checkpoint

    module = _module()
    path = tmp_path / "no_weights.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams)}, path)
    with pytest.raises(ValueError, match=r"init_from=.*no_weights.ckpt.* is not a captcha_lit checkpoint \(no state_dict\)"):
        init_from_checkpoint(module, path)


@pytest.mark.parametrize("arch, model_kwargs", [("cnn", {"channels": [8, 16, 16, 16], "hidden": 32}),
                                                ("crnn", {"channels": [8, 16, 16, 16], "dim": 32})])
def test_tta_shifts_average_the_probabilities_of_views_moved_sideways(arch, model_kwargs):
    torch.manual_seed(0)
    module = _module(arch=arch, model_kwargs=model_kwargs, tta_shifts=[-2, 1])
    images = torch.rand(3, 3, *INPUT)
    padded = torch.cat([images[..., :1]] * 2 + [images] + [images[..., -1:]] * 2, dim=-1)  # edge columns repeated
    views = [images, padded[..., 4:4 + INPUT[1]], padded[..., 1:1 + INPUT[1]]]  # moved left by 2, right by 1
    module.eval()
    with torch.no_grad():
        expected = torch.stack([module.net(view).softmax(-1) for view in views]).mean(0).log()
        got = module(images)
        assert torch.allclose(got, expected, atol=1e-5)
        module.train()  # training sees the image alone (the same dropout draws on both sides)
        torch.manual_seed(1)
        trained = module(images)
        torch.manual_seed(1)
        assert torch.allclose(trained, module.net(images))
    assert module.hparams.tta_shifts == [-2, 1]


@pytest.mark.parametrize("value", [[0], [1.5], [True], [1, 1], [24], 0, "abc"])
def test_bad_tta_shifts_are_named(value):
    with pytest.raises(ValueError, match=re.escape(f"model.tta_shifts={value!r}: use distinct whole numbers")):
        _module(tta_shifts=value)


def test_tta_shifts_from_the_config_reach_the_check_unchanged(make_cfg):
    from captcha_lit.training.builders import build_module

    assert build_module(make_cfg("train", ["model.tta_shifts=[-1,1]"])).tta_shifts == (-1, 1)
    with pytest.raises(ValueError, match=re.escape("model.tta_shifts=0: use distinct whole numbers")):
        build_module(make_cfg("train", ["model.tta_shifts=0"]))  # not read as "no views"
