"""Weight averaging: the EMA is what validation, checkpoints, the test and eval read."""

from __future__ import annotations

import pytest
import torch

from captcha_lit.eval import evaluate
from captcha_lit.train import train
from captcha_lit.training.averaging import EMA, ema_multi_avg_fn

EMA_ON = ["callbacks=averaged", "callbacks.ema.decay=0.9"]  # a short memory for a short run
SMALL = ["model.channels=[8,16,32,32]", "model.dim=32", "logger=csv", "trainer.max_epochs=2"]


def test_the_average_warms_up_then_keeps_its_decay():
    average, current = [torch.zeros(3)], [torch.ones(3)]
    update = ema_multi_avg_fn(0.99, warmup=True)
    update(average, current, torch.tensor(1))  # a young run: decay (1 + 1) / (10 + 1)
    assert torch.allclose(average[0], torch.full((3,), 1 - 2 / 11))
    steady = [torch.zeros(3)]
    ema_multi_avg_fn(0.99, warmup=True)(steady, current, torch.tensor(10_000))
    assert torch.allclose(steady[0], torch.full((3,), 0.01))
    counts = [torch.tensor([3])]
    update(counts, [torch.tensor([7])], torch.tensor(5))  # integer buffers take the current value
    assert counts[0].item() == 7


@pytest.mark.parametrize("decay", [0, 1, 1.5, "0.9", True])
def test_a_decay_outside_the_open_unit_interval_is_refused(decay):
    with pytest.raises(ValueError, match="callbacks.ema.decay"):
        EMA(decay=decay)


def test_checkpoints_and_the_test_read_the_average(make_cfg):
    metrics = train(make_cfg("train", SMALL + EMA_ON, name="ema"))
    state = torch.load(metrics["best_ckpt"], map_location="cpu", weights_only=True)
    averaged, raw = state["state_dict"], state["current_model_state"]
    assert averaged.keys() == raw.keys()
    assert any(not torch.equal(averaged[k], raw[k]) for k in averaged if averaged[k].is_floating_point())
    # eval loads the checkpoint on its own: the same test loss means training's test read the average too.
    overrides = [f"ckpt_path={metrics['best_ckpt']}"]
    result = evaluate(make_cfg("eval", overrides, name="eval_ema"), overrides)
    assert result["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-6)
    assert result["test/seq_acc"] == metrics["test/seq_acc"]


@pytest.mark.parametrize("callbacks", [[], ["callbacks.ema=null"], ["callbacks=averaged", "callbacks.ema=null"]],
                         ids=["default", "default_ema_null", "averaged_ema_null"])
def test_the_default_and_callbacks_ema_null_train_without_an_average(make_cfg, callbacks):
    metrics = train(make_cfg("train", SMALL + ["trainer.max_epochs=1", *callbacks], name="plain"))
    state = torch.load(metrics["best_ckpt"], map_location="cpu", weights_only=True)
    assert "current_model_state" not in state


def test_the_per_step_update_matches_averaged_models_own():
    # EMA.on_train_batch_end pairs the tensors once an epoch instead of walking the modules every step;
    # it must leave the same average (weights and batch-norm buffers) as AveragedModel.update_parameters.
    from types import SimpleNamespace

    from torch.optim.swa_utils import AveragedModel

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    net(torch.randn(2, 1, 8, 8))
    ema = EMA(decay=0.9)
    ema._average_model = AveragedModel(net, use_buffers=True, multi_avg_fn=ema._update)
    reference = AveragedModel(net, use_buffers=True, multi_avg_fn=ema_multi_avg_fn(0.9, warmup=True))
    trainer = SimpleNamespace(global_step=0)
    ema.on_train_epoch_start(trainer, net)
    for step in range(1, 6):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net(torch.randn(4, 1, 8, 8))  # training mode: batch norm's running statistics and count move
        trainer.global_step = step
        ema.on_train_batch_end(trainer, net, None, None, step)
        ema.on_train_batch_end(trainer, net, None, None, step)  # once per optimizer step
        reference.update_parameters(net)
    assert int(ema._average_model.n_averaged) == int(reference.n_averaged) == 5
    ours, theirs = ema._average_model.module.state_dict(), reference.module.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.allclose(ours[key].float(), theirs[key].float()), key
    assert not torch.allclose(ours["0.weight"], net.state_dict()["0.weight"])  # an average, not the weights
