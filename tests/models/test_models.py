"""The model registry and the architectures: output shapes, downsampling, stems, blocks and named errors."""

from __future__ import annotations

import re

import pytest
import torch

from captcha_lit.models import get_model, list_models, model_decoder

NUM_CLASSES, MAX_LEN, INPUT = 36, 5, (32, 96)


def test_builtin_models_are_registered():
    assert {"cnn", "crnn", "resnet"} <= set(list_models())
    assert model_decoder("cnn") == "positional"
    assert model_decoder("resnet") == "positional"
    assert model_decoder("crnn") == "ctc"


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


def test_crnn_strided_stem_reads_full_resolution():
    # A 48x128 input with a stride-2 stem gives the same time steps as 24x64 without one.
    stem = dict(stem=24, channels=[32, 64, 128], strides=[[2, 2], [2, 1], [3, 1]])
    net = get_model("crnn", num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(48, 128), **stem)
    assert net.backbone.downsample == (24, 4)
    assert net.seq_len == 32
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 3, 48, 128)).shape == (1, 32, NUM_CLASSES + 1)
    with pytest.raises(ValueError, match="too small"):
        get_model("crnn", num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(16, 128), **stem)


def test_cnn_strided_stem_halves_the_input_once():
    # The default cnn reads 64x160 gray: the stem halves it, four stages of 2x2 pooling end at 2x5.
    net = get_model("cnn", num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(64, 160), stem=16, in_channels=1)
    assert net.head.fc[2].in_features == 128 * 2 * 5
    with torch.no_grad():
        assert net.eval()(torch.randn(2, 1, 64, 160)).shape == (2, MAX_LEN, NUM_CLASSES)
    with pytest.raises(ValueError, match=re.escape("use at least [32, 32]")):
        get_model("cnn", num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(24, 160), stem=16)
    with pytest.raises(ValueError, match=re.escape("model.stem=-1")):
        get_model("cnn", num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(64, 160), stem=-1)


def test_cnn_strides_keep_the_width_for_the_heads():
    kwargs = dict(num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(64, 160), stem=16, in_channels=1)
    square = get_model("cnn", **kwargs)
    wide = get_model("cnn", strides=[[2, 2], [2, 2], [2, 2], [2, 1]], **kwargs)
    # The last stage pools only the height: its 2x10 map, not 2x5, reaches the fully connected layer.
    assert wide.head.fc[2].in_features == 128 * 2 * 10 == 2 * square.head.fc[2].in_features
    pools = [m.kernel_size for m in wide.backbone.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert pools == [(2, 2), (2, 2), (2, 2), (2, 1)]
    with torch.no_grad():
        assert wide.eval()(torch.randn(2, 1, 64, 160)).shape == (2, MAX_LEN, NUM_CLASSES)
    # The size check follows the strides: 2 * 2^4 rows, but 2 * 2^3 columns.
    with pytest.raises(ValueError, match=re.escape("it downsamples by 32x16, so use at least [32, 16]")):
        get_model("cnn", strides=[[2, 2], [2, 2], [2, 2], [2, 1]], **{**kwargs, "input_size": (16, 160)})
    for bad in ([[2, 2]], [[2, 2], [2, 2], [2, 2], [2]], [2, 2, 2, 2], [[2, 2], [2, 2], [2, 2], [0, 1]]):
        with pytest.raises(ValueError, match=re.escape(f"model.strides={bad}: give 4 [h, w] pairs of integers >= 1")):
            get_model("cnn", strides=bad, **kwargs)


@pytest.mark.parametrize("name, options", [
    ("crnn", dict(stem=16, strides=[[2, 2], [2, 1], [2, 1], [2, 1]])),
    ("cnn", dict(stem=16)),
])
def test_strided_downsampling_keeps_the_output_and_drops_the_pools(name, options):
    # model.downsample=stride swaps each conv + max-pool for one strided conv: the same feature-map
    # sizes (so the same heads and time steps), no pooling layer, and still a model that learns.
    kwargs = dict(num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(64, 160), in_channels=1, **options)
    pooled = get_model(name, **kwargs)
    strided = get_model(name, downsample="stride", **kwargs)
    x = torch.randn(4, 1, 64, 160)
    with torch.no_grad():
        assert strided.eval()(x).shape == pooled.eval()(x).shape
    assert any(isinstance(m, torch.nn.MaxPool2d) for m in pooled.modules())
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in strided.modules())
    _assert_learns(name, strided, x)


def _assert_learns(name, net, x):
    """A few Adam steps on one batch of random targets cut the model's loss by 30%."""
    net.train()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    target = torch.randint(0, NUM_CLASSES, (len(x), MAX_LEN))

    def loss_now():
        out = net(x)
        if name == "crnn":  # CTC over the time steps, blank = class 0
            logp = out.log_softmax(-1).transpose(0, 1)
            return torch.nn.functional.ctc_loss(logp, target + 1, torch.full((len(x),), logp.shape[0]),
                                                torch.full((len(x),), MAX_LEN))
        return torch.nn.functional.cross_entropy(out.reshape(-1, NUM_CLASSES), target.reshape(-1))

    first = loss_now()
    for _ in range(15):
        opt.zero_grad()
        loss = loss_now()
        loss.backward()
        opt.step()
    assert loss_now().item() < first.item() * 0.7


@pytest.mark.parametrize("name, options, full_size_norms, out_size", [
    ("crnn", dict(stem=16, strides=[[2, 2], [2, 1], [2, 1], [2, 1]]), (2, 1), (2, 40)),  # the stem's and stage 1's
    ("cnn", dict(stem=16, convs_per_stage=2), (3, 2), (2, 5)),  # the stem's and stage 1's two
])
def test_pool_first_normalizes_the_pooled_map(name, options, full_size_norms, out_size):
    # model.downsample=pool_first keeps the same layers and parameters as maxpool, but each stage's
    # last batch norm and ReLU run after its max-pooling, at the reduced size.
    kwargs = dict(num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(64, 160), in_channels=1, **options)
    pooled = get_model(name, **kwargs).eval()
    early = get_model(name, downsample="pool_first", **kwargs).eval()
    assert [p.shape for p in early.parameters()] == [p.shape for p in pooled.parameters()]

    def norm_input_sizes(net):
        sizes = []
        hooks = [m.register_forward_pre_hook(lambda _, inputs: sizes.append(tuple(inputs[0].shape[-2:])))
                 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        with torch.no_grad():
            out = net(x)
        for h in hooks:
            h.remove()
        return sizes, out.shape

    x = torch.randn(4, 1, 64, 160)
    (pooled_sizes, pooled_shape), (early_sizes, early_shape) = norm_input_sizes(pooled), norm_input_sizes(early)
    assert early_shape == pooled_shape
    assert (pooled_sizes.count((32, 80)), early_sizes.count((32, 80))) == full_size_norms
    assert len(early_sizes) == len(pooled_sizes)
    # the last stage normalizes the backbone's output; with maxpool, the map before its last pool
    assert early_sizes[-1] == out_size and pooled_sizes[-1] != out_size
    _assert_learns(name, early, x)


@pytest.mark.parametrize("name, options", [
    ("crnn", dict(stem=16, strides=[[2, 2], [2, 1], [2, 1], [2, 1]], convs_per_stage=[2, 1, 1, 1])),
    ("cnn", dict(stem=16, convs_per_stage=2)),
])
def test_downsample_per_stage(name, options):
    # One mode per stage: here the first stage max-pools (pool_first) and the later ones stride,
    # with the same feature map (heads, time steps) as one mode for all.
    kwargs = dict(num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(64, 160), in_channels=1, **options)
    mixed = get_model(name, downsample=["pool_first", "stride", "stride", "stride"], **kwargs)
    uniform = get_model(name, downsample="pool_first", **kwargs)
    x = torch.randn(4, 1, 64, 160)
    with torch.no_grad():
        assert mixed.eval()(x).shape == uniform.eval()(x).shape
    pools = [m for m in mixed.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert len(pools) == 1 and pools[0].kernel_size == (2, 2)
    strided = [m for m in mixed.modules() if isinstance(m, torch.nn.Conv2d) and m.stride != (1, 1)]
    assert [m.stride for m in strided] == [(2, 2)] + ([(2, 1)] * 3 if name == "crnn" else [(2, 2)] * 3)
    # one mode for every stage is the same as naming it per stage
    same = get_model(name, downsample=["pool_first"] * 4, **kwargs)
    assert [type(m) for m in same.modules()] == [type(m) for m in uniform.modules()]
    _assert_learns(name, mixed, x)


@pytest.mark.parametrize("bad", [["pool_first", "stride"], ["pool_first", "stride", "stride", "avgpool"],
                                 [1, 2, 3, 4], 5])
def test_downsample_per_stage_errors_are_named(bad):
    for name in ("crnn", "cnn"):
        with pytest.raises(ValueError, match=re.escape(
                f"model.downsample={bad}: give one of maxpool, pool_first, stride, or 4 of them (one per stage")):
            get_model(name, num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(64, 160), downsample=bad)
    with pytest.raises(ValueError, match=re.escape("model.downsample=['pool_first', 'stride'] is for backbone=vgg")):
        get_model("crnn", num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(64, 160), backbone="resnet",
                  downsample=["pool_first", "stride"])


def test_cnn_heads_read_the_flattened_map_without_a_hidden_layer():
    # model.hidden=0: each position's softmax head is one linear layer over the flattened 2x5 map.
    kwargs = dict(num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(64, 160), stem=16, in_channels=1)
    net = get_model("cnn", hidden=0, **kwargs)
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.BatchNorm1d)) for m in net.head.fc.modules())
    assert [(h.in_features, h.out_features) for h in net.head.heads] == [(128 * 2 * 5, NUM_CLASSES)] * MAX_LEN
    hidden = get_model("cnn", hidden=64, **kwargs)
    assert [h.in_features for h in hidden.head.heads] == [64] * MAX_LEN
    x = torch.randn(4, 1, 64, 160)
    assert net.forward_features(x).shape == (4, MAX_LEN, 128 * 2 * 5)
    _assert_learns("cnn", net, x)
    with pytest.raises(ValueError, match=re.escape("model.hidden=-1: use a width >= 1, or 0")):
        get_model("cnn", hidden=-1, **kwargs)


@pytest.mark.parametrize("name", ["crnn", "cnn"])
def test_stem_without_norm(name):
    # model.stem_norm=false: the stem conv gets a bias and no batch norm; the default keeps it,
    # so that checkpoints saved before the option existed rebuild the same layers.
    kwargs = dict(num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(64, 160), in_channels=1, stem=16)
    normed, plain = get_model(name, **kwargs), get_model(name, stem_norm=False, **kwargs)
    body = normed.backbone.body if name == "crnn" else normed.backbone
    plain_body = plain.backbone.body if name == "crnn" else plain.backbone
    assert isinstance(body[0][1], torch.nn.BatchNorm2d) and body[0][0].bias is None
    assert [type(m) for m in plain_body[0]] == [torch.nn.Conv2d, torch.nn.ReLU] and plain_body[0][0].bias is not None
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in normed.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules()) == norms - 1
    x = torch.randn(4, 1, 64, 160)
    _assert_learns(name, plain, x)


@pytest.mark.parametrize("name", ["crnn", "cnn"])
@pytest.mark.parametrize("bad", ["no", 0, None])
def test_stem_norm_must_be_a_bool(name, bad):
    # bool("no") is True: a typo must not silently pick a layer
    with pytest.raises(ValueError, match=re.escape(f"model.stem_norm={bad!r}: use true")):
        get_model(name, num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(64, 160), stem=16, stem_norm=bad)


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


@pytest.mark.parametrize("downsample", ["maxpool", "pool_first", "stride"])
@pytest.mark.parametrize("size", [(64, 160), (63, 160), (65, 161), (50, 130)])
def test_odd_input_sizes_build_the_layers_they_run(downsample, size):
    # A padded strided convolution rounds an odd size up where max-pooling rounds it down; the
    # heads and the CTC length must follow the feature map the layers really produce.
    x = torch.randn(2, 1, *size)
    crnn = get_model("crnn", num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=size, in_channels=1, stem=16,
                     strides=[[2, 2], [2, 1], [2, 1], [2, 1]], downsample=downsample).eval()
    cnn = get_model("cnn", num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=size, in_channels=1, stem=16,
                    downsample=downsample).eval()
    with torch.no_grad():
        assert crnn(x).shape == (2, crnn.seq_len, NUM_CLASSES + 1)
        assert cnn(x).shape == (2, MAX_LEN, NUM_CLASSES)


@pytest.mark.parametrize("size", [(64, 160), (63, 160), (50, 130), (36, 100)])
def test_odd_input_sizes_through_residual_blocks(size):
    # A strided residual block's conv rounds an odd size up; its shortcut must round the same way.
    x = torch.randn(2, 1, *size)
    resnet = get_model("resnet", num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=size, in_channels=1).eval()
    crnn = get_model("crnn", num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=size, in_channels=1,
                     backbone="resnet").eval()
    with torch.no_grad():
        assert resnet(x).shape == (2, MAX_LEN, NUM_CLASSES)
        assert crnn(x).shape == (2, crnn.seq_len, NUM_CLASSES + 1)


@pytest.mark.parametrize("name, options", [
    ("cnn", {}),
    ("crnn", dict(strides=[[2, 2], [2, 1], [2, 1], [2, 1]])),
])
def test_convs_per_stage_one_count_or_one_per_stage(name, options):
    def convs(net):
        return sum(isinstance(m, torch.nn.Conv2d) for m in net.backbone.modules())

    kwargs = dict(num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(64, 160), stem=16, in_channels=1, **options)
    single = get_model(name, **kwargs)
    assert convs(single) == 1 + 4  # the stem, then one per stage
    assert convs(get_model(name, convs_per_stage=2, **kwargs)) == 1 + 4 * 2
    deeper = get_model(name, convs_per_stage=[2, 1, 1, 1], **kwargs)
    assert convs(deeper) == 1 + 5
    x = torch.randn(2, 1, 64, 160)
    with torch.no_grad():  # the extra convolutions keep the stage's size: the same output
        assert deeper.eval()(x).shape == single.eval()(x).shape
    for bad in ([1, 2], 0, [1, 0, 1, 1]):
        with pytest.raises(ValueError, match=re.escape(f"model.convs_per_stage={bad}: use one count >= 1, or 4")):
            get_model(name, convs_per_stage=bad, **kwargs)
    no_stages = {**kwargs, "channels": [], **({"strides": []} if name == "crnn" else {})}
    with pytest.raises(ValueError, match=re.escape("model.channels is empty: give at least one stage")):
        get_model(name, **no_stages)


@pytest.mark.parametrize("name", ["crnn", "resnet"])
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
    for name, options in (("resnet", {}), ("crnn", {"backbone": "resnet"})):
        with pytest.raises(ValueError, match=re.escape(f"model.blocks={blocks}: give 4 counts >= 1, one per stage")):
            get_model(name, num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(64, 160), blocks=blocks, **options)


@pytest.mark.parametrize("name", ["crnn", "cnn"])
def test_unknown_downsampling_is_named(name):
    with pytest.raises(ValueError, match=re.escape("model.downsample='avgpool': use one of maxpool, pool_first, stride")):
        get_model(name, num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(64, 160), downsample="avgpool")


@pytest.mark.parametrize("options, match", [
    ({"rnn": "transformer"}, "model.rnn='transformer': use 'gru', 'lstm' or 'conv'"),
    ({"backbone": "resnet", "downsample": "stride"}, "model.downsample='stride' is for backbone=vgg"),
    ({"backbone": "resnet", "stem": 16, "downsample": "stride"}, "so set model.stem=0 model.downsample=maxpool"),
    ({"stem": -1}, "model.stem=-1"),
    ({"backbone": "resnet", "stem": 16}, "model.stem=16 is for backbone=vgg"),
    ({"backbone": "resnet", "convs_per_stage": [2, 1, 1, 1]}, "model.convs_per_stage=[2, 1, 1, 1] is for backbone=vgg"),
    ({"rnn": "conv", "rnn_layers": 0}, "model.rnn_layers=0: the sequence model needs at least 1 layer"),
    ({"rnn": "gru", "rnn_layers": 0}, "model.rnn_layers=0: the sequence model needs at least 1 layer"),
])
def test_crnn_bad_options_are_named(options, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        get_model("crnn", num_classes=NUM_CLASSES, max_length=MAX_LEN, input_size=(48, 128), **options)


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

