"""The model registry and the architectures: output shapes, the fixed designs, model configs, old checkpoints
and named errors."""

from __future__ import annotations

import re

import pytest
import torch

from captcha_lit.models import get_model, list_models, model_decoder

NUM_CLASSES, MAX_LEN, INPUT = 36, 5, (32, 96)


def test_builtin_models_are_registered():
    assert {"cnn", "cnn_seed", "crnn", "crnn_classic", "crnn_resnet", "resnet"} <= set(list_models())
    assert {name: model_decoder(name) for name in ("cnn", "cnn_seed", "resnet", "crnn", "crnn_classic")} == {
        "cnn": "positional", "cnn_seed": "positional", "resnet": "positional", "crnn": "ctc", "crnn_classic": "ctc"}


@pytest.mark.parametrize("name", list_models())
def test_forward_shape(name):
    torch.manual_seed(0)
    net = get_model(name, num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=INPUT).eval()
    assert net.decoder == model_decoder(name)
    with torch.no_grad():
        out = net(torch.randn(2, 3, *INPUT))
    assert out.ndim == 3 and out.shape[0] == 2
    if net.decoder == "positional":
        assert out.shape == (2, MAX_LEN, NUM_CLASSES)
    else:
        assert out.shape[2] == NUM_CLASSES + 1  # blank
        assert out.shape[1] >= 2 * MAX_LEN + 1  # enough CTC time steps
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list_models())
def test_input_too_small(name):
    with pytest.raises(ValueError, match="too small") as info:
        get_model(name, num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(8, 8))
    assert "[8, 8]" in str(info.value)


def test_crnn_needs_enough_time_steps():
    with pytest.raises(ValueError, match="time steps"):
        get_model("crnn", num_classes=10, max_length=10, input_size=(32, 64))


@pytest.mark.parametrize("rnn", ["gru", "lstm", "conv"])
def test_crnn_sequence_models_lower_ctc_loss(rnn):
    """Each sequence model gives one CTC frame per time step, and a few gradient steps on a
    tiny batch lower the CTC loss."""
    torch.manual_seed(0)
    net = get_model("crnn", num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=INPUT, rnn=rnn, rnn_layers=2)
    x = torch.randn(4, 3, *INPUT)
    targets = torch.randint(0, NUM_CLASSES, (4, MAX_LEN))
    opt = torch.optim.Adam(net.parameters(), 3e-3)

    def loss_fn():
        lp = net(x).log_softmax(-1).transpose(0, 1)
        return torch.nn.functional.ctc_loss(lp, targets, torch.full((4,), lp.shape[0]), torch.full((4,), MAX_LEN),
                                            blank=NUM_CLASSES)

    first = loss_fn()
    assert net(x).shape == (4, net.seq_len, NUM_CLASSES + 1)
    for _ in range(5):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss_fn().item() < first.item()


def _layers(net, kind) -> list:
    return [m for m in net.modules() if isinstance(m, kind)]


def test_default_crnn_design_reads_full_resolution_in_40_steps():
    # 64x160 gray: the stem halves it, the first stage pools 2x2, the later ones stride the height.
    net = get_model("crnn", num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(64, 160), in_channels=1).eval()
    stem = net.backbone.body[0]
    assert stem[0].stride == (2, 2) and stem[0].bias is not None and not _layers(stem, torch.nn.BatchNorm2d)
    assert [m.kernel_size for m in _layers(net.backbone, torch.nn.MaxPool2d)] == [(2, 2)]
    strided = [m.stride for m in _layers(net.backbone, torch.nn.Conv2d)[1:] if m.stride != (1, 1)]
    assert strided == [(2, 1)] * 3
    assert net.seq_len == 40 and net.backbone.output_size((64, 160)) == (2, 40)
    with torch.no_grad():
        assert net(torch.randn(2, 1, 64, 160)).shape == (2, 40, NUM_CLASSES + 1)


def test_pool_first_normalizes_the_pooled_map():
    # The first stage max-pools between its conv and its batch norm: the norm runs at the pooled size.
    net = get_model("crnn", num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(64, 160), in_channels=1)
    sizes = {}

    def record(name):
        def hook(module, inputs, output):
            sizes[name] = tuple(output.shape[2:])
        return hook

    hooks = [m.register_forward_hook(record(name))
             for name, m in net.backbone.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        net.eval()(torch.randn(1, 1, 64, 160))
    for hook in hooks:
        hook.remove()
    assert list(sizes.values())[:2] == [(32, 80), (16, 40)]  # the first conv at 32x80, the pooled one at 16x40


def test_cnn_designs():
    kwargs = dict(num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(64, 160), in_channels=1)
    cnn = get_model("cnn", **kwargs)
    # The stem halves 64x160, four stages of 2x2 pooling end at 2x5, which every head reads.
    assert len(_layers(cnn.backbone, torch.nn.Conv2d)) == 1 + 4 * 2
    assert cnn.head.heads[0].in_features == 128 * 2 * 5 and cnn.head.fc[1].p == 0.4
    seed = get_model("cnn_seed", **kwargs)
    assert len(_layers(seed.backbone, torch.nn.Conv2d)) == 4  # no stem, one conv per stage
    assert seed.head.fc[2].in_features == 256 * 4 * 10 and seed.head.heads[0].in_features == 512
    with torch.no_grad():
        for net in (cnn, seed):
            assert net.eval()(torch.randn(2, 1, 64, 160)).shape == (2, MAX_LEN, NUM_CLASSES)
    with pytest.raises(ValueError, match=re.escape("use at least [32, 32]")):
        get_model("cnn", **{**kwargs, "input_size": (24, 160)})


def test_crnn_classic_stem_and_strides():
    stem = dict(stem=24, channels=[32, 64, 128], strides=[[2, 2], [2, 1], [3, 1]])
    net = get_model("crnn_classic", num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(48, 128), **stem)
    assert net.backbone.downsample == (24, 4) and net.seq_len == 32
    assert len(_layers(net.backbone, torch.nn.MaxPool2d)) == 3
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 3, 48, 128)).shape == (1, 32, NUM_CLASSES + 1)
    with pytest.raises(ValueError, match="too small"):
        get_model("crnn_classic", num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(16, 128), **stem)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=re.escape(f"model.stem={bad!r}: the stem's width, or 0 for none")):
            get_model("crnn_classic", num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(48, 128), stem=bad)


@pytest.mark.parametrize("name", ["crnn", "crnn_classic", "crnn_resnet", "cnn", "cnn_seed", "resnet"])
@pytest.mark.parametrize("size", [(64, 160), (63, 160), (65, 161), (50, 130)])
def test_odd_input_sizes_build_the_layers_they_run(name, size):
    # A padded strided convolution (and a strided residual block) rounds an odd size up where
    # max-pooling rounds it down; the heads and the CTC length must follow the real feature map.
    net = get_model(name, num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=size, in_channels=1).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, *size))
    assert out.shape == ((2, net.seq_len, NUM_CLASSES + 1) if net.decoder == "ctc" else (2, MAX_LEN, NUM_CLASSES))


@pytest.mark.parametrize("name", list_models())
def test_model_config_is_the_builders_defaults(name, make_cfg):
    """``model=NAME`` composes the builder's own options and defaults, and builds the same network."""
    from captcha_lit.models import model_options
    from captcha_lit.training.builders import build_module

    cfg = make_cfg("train", [f"model={name}"])
    module_options = ("name", "beam_width", "label_smoothing", "tta_shifts")
    options = {k: v for k, v in dict(cfg.model).items() if k not in module_options}
    assert cfg.model.name == name and options == model_options(name) and list(cfg.model.tta_shifts) == []
    assert ("beam_width" in cfg.model) == (model_decoder(name) == "ctc")
    built = build_module(cfg).net
    assert type(built) is type(get_model(name, num_classes=1, max_length=5, input_size=(64, 160)))


@pytest.mark.parametrize("name", ["crnn", "cnn"])
def test_removed_design_options_are_named(name):
    with pytest.raises(ValueError, match=r"no option\(s\) downsample, stem_norm; its options are: channels"):
        get_model(name, num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(64, 160), downsample="stride",
                  stem_norm=True)


@pytest.mark.parametrize("arch, old, new", [
    # the shipped recipes of commit 640dca3, as their checkpoints record them
    ("crnn", {"stem": 16, "stem_norm": False, "downsample": ["pool_first", "stride", "stride", "stride"],
              "convs_per_stage": [2, 1, 1, 1], "strides": [[2, 2], [2, 1], [2, 1], [2, 1]], "channels": [16, 32, 64, 128],
              "backbone": "vgg", "blocks": [1, 1, 1, 1], "stem_stride": 2, "dim": 128, "rnn": "conv", "rnn_layers": 2,
              "dropout": 0.1}, ("crnn", {"channels": [16, 32, 64, 128], "dim": 128, "rnn": "conv", "rnn_layers": 2,
                                         "dropout": 0.1})),
    ("crnn", {"channels": [32, 64, 96, 128], "stem": 0, "downsample": "maxpool", "convs_per_stage": 1, "rnn": "gru",
              "rnn_layers": 1, "dropout": 0.2}, ("crnn_classic", {
                  "channels": [32, 64, 96, 128], "dim": 128, "rnn": "gru", "rnn_layers": 1, "dropout": 0.2,
                  "strides": [[2, 2], [2, 2], [2, 1], [2, 1]], "stem": 0})),
    ("crnn", {"backbone": "resnet", "stem": 0, "strides": [[2, 2], [2, 1], [2, 1], [2, 1]]}, ("crnn_resnet", {
        "channels": [16, 32, 64, 128], "dim": 128, "rnn": "conv", "rnn_layers": 2, "dropout": 0.1,
        "blocks": [1, 1, 1, 1], "strides": [[2, 2], [2, 1], [2, 1], [2, 1]]})),
    ("cnn", {"stem": 16, "stem_norm": False, "downsample": "pool_first", "convs_per_stage": 2, "hidden": 0,
             "dropout": 0.4}, ("cnn", {"channels": [16, 32, 64, 128], "hidden": 0, "dropout": 0.4})),
    ("cnn", {"channels": [32, 64, 128, 256], "stem": 0, "convs_per_stage": 1, "hidden": 512, "dropout": 0.3},
     ("cnn_seed", {"channels": [32, 64, 128, 256], "hidden": 512, "dropout": 0.3})),
    ("resnet", {"dim": 64}, ("resnet", {"dim": 64})),
])
def test_old_checkpoint_designs_map_to_registered_ones(arch, old, new):
    from captcha_lit.models.legacy import upgrade

    assert upgrade(arch, old) == new


def test_an_old_design_no_longer_built_is_named():
    from captcha_lit.models.legacy import upgrade

    with pytest.raises(ValueError, match=r"no longer builds \(.*model.downsample=stride.*\); retrain it"):
        upgrade("crnn", {"downsample": "stride", "stem": 16})


def test_dropout_draws_the_same_distribution_as_torch():
    from captcha_lit.models.layers import Dropout

    x = torch.ones(200, 40, 128)
    for p in (0.1, 0.5):
        ours, theirs = Dropout(p).train(), torch.nn.Dropout(p).train()
        torch.manual_seed(0)
        a = ours(x)
        b = theirs(x)
        for out in (a, b):
            zero, kept = out.unique().tolist()
            assert zero == 0.0 and kept == pytest.approx(1 / (1 - p))
        # the share dropped is p, as torch's (1M draws: a standard error of 0.0005 at p=0.5)
        assert (a == 0).float().mean().item() == pytest.approx(p, abs=0.003)
        assert (a == 0).float().mean().item() == pytest.approx((b == 0).float().mean().item(), abs=0.004)
        assert a.mean().item() == pytest.approx(1.0, abs=0.01)
    torch.manual_seed(1)
    first = Dropout(0.3).train()(x)
    torch.manual_seed(1)
    assert torch.equal(Dropout(0.3).train()(x), first)  # seeded: the same mask
    assert torch.equal(Dropout(0.3).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert not Dropout(1.0).train()(x).any()
    bf16 = Dropout(0.2).train()(x.bfloat16())
    assert bf16.dtype == torch.bfloat16
    # gradients flow through the kept units only, scaled like the values
    y = torch.ones(1000, requires_grad=True)
    out = Dropout(0.25).train()(y)
    out.sum().backward()
    assert torch.equal(y.grad, out.detach())


@pytest.mark.parametrize("name", ["crnn_classic", "crnn_resnet", "resnet"])
@pytest.mark.parametrize("bad", [[[2, 2], [2], [2, 1], [2, 1]], [[2, 2], [2, 1], [2, 1]], [2, 2, 2, 2],
                                 [[2, 2], [0, 1], [2, 1], [2, 1]], [[2, 2], [1.5, 1], [2, 1], [2, 1]],
                                 ["22", [2, 1], [2, 1], [2, 1]]])
def test_malformed_strides_are_named(name, bad):
    # Each stage needs one [h, w] pair: a short list, a bare number or a zero is named, not an
    # IndexError, a TypeError or a division by zero from inside the stage loop.
    with pytest.raises(ValueError, match=re.escape(f"model.strides={bad}: give 4 [h, w] pairs of integers >= 1")):
        get_model(name, num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(64, 160), strides=bad)


@pytest.mark.parametrize("blocks", [[1, 1], [1, 0, 1, 1], [1, 2.5, 1, 1], [1, "2", 1, 1]])
def test_resnet_blocks_one_count_per_stage(blocks):
    # zip() used to drop the stages past the shorter list without a word.
    for name in ("resnet", "crnn_resnet"):
        with pytest.raises(ValueError, match=re.escape(f"model.blocks={blocks}: give 4 counts >= 1, one per stage")):
            get_model(name, num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(64, 160), blocks=blocks)


@pytest.mark.parametrize("name", ["crnn", "cnn", "resnet"])
@pytest.mark.parametrize("bad", [[], [16, 0, 32], "16", [16, 2.5]])
def test_bad_channels_are_named(name, bad):
    with pytest.raises(ValueError, match=re.escape(f"model.channels={bad}: give one width >= 1 per stage")):
        get_model(name, num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(64, 160), channels=bad)


@pytest.mark.parametrize("options, match", [
    ({"rnn": "transformer"}, "model.rnn='transformer': use one of conv, gru, lstm"),
    ({"rnn": "conv", "rnn_layers": 0}, "model.rnn_layers=0: the sequence model needs at least 1 layer"),
    ({"rnn": "gru", "rnn_layers": 0}, "model.rnn_layers=0: the sequence model needs at least 1 layer"),
])
def test_crnn_bad_options_are_named(options, match):
    for name in ("crnn", "crnn_classic"):
        with pytest.raises(ValueError, match=re.escape(match)):
            get_model(name, num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(48, 128), **options)


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError) as info:
        get_model("nope", num_classes=10, max_length=5, input_size=INPUT)
    message = str(info.value)
    assert "unknown model 'nope'" in message
    for name in list_models():
        assert name in message


def test_unknown_model_option_is_named():
    with pytest.raises(ValueError, match="no option.*bogus"):
        get_model("cnn", num_classes=10, max_length=5, input_size=INPUT, bogus=1)

