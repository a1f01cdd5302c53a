"""data.grayscale=true: one gray channel through generation, the cache, training, checkpoints,
eval, export, the torch-free runtime and predict, and clear errors where it cannot apply."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from captcha_lit.training.inference import read_images
from PIL import Image

from captcha_lit.training.builders import build_module
from captcha_lit.training.checkpoints import init_from_checkpoint, load_module
from captcha_lit.data.synthetic import CaptchaGenerator, GeneratorSpec, generate
from captcha_lit.data.transforms import BatchAugment, TrainPreset
from captcha_lit.eval import evaluate
from captcha_lit.deploy.export import export
from captcha_lit.predict import predict
from captcha_lit.preprocess import load_input, resize_to_input
from captcha_lit.deploy.runtime import Solver
from captcha_lit.train import train

GRAY_CRNN = ["data.grayscale=true", "model=crnn", "model.channels=[8,16,32,32]", "model.dim=32"]


def test_resize_to_input_converts_to_luma_before_resizing():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 160, 3), dtype=np.uint8))
    gray = resize_to_input(rgb, (32, 96), channels=1)
    assert gray.shape == (32, 96, 1) and gray.dtype == np.uint8
    expected = np.asarray(rgb.convert("L").resize((96, 32), Image.Resampling.BILINEAR, reducing_gap=None))
    np.testing.assert_array_equal(gray[..., 0], expected)
    assert resize_to_input(rgb, (32, 96)).shape == (32, 96, 3)
    with pytest.raises(ValueError, match="channels=2"):
        resize_to_input(rgb, (32, 96), channels=2)


def test_grayscale_generation_draws_the_same_captchas_in_one_channel():
    rgb_spec = GeneratorSpec(input_size=(32, 96))
    gray_spec = GeneratorSpec(input_size=(32, 96), channels=1)
    rgb_texts, rgb = generate(rgb_spec, 7, "train", 12, workers=1)
    gray_texts, gray = generate(gray_spec, 7, "train", 12, workers=2, chunk_size=4)
    assert gray_texts == rgb_texts  # the same seeds draw the same texts and images
    assert gray.shape == (12, 32, 96, 1)
    # Gray is the luma of the same drawing (converted before resizing, so within rounding of it).
    luma = np.asarray(rgb, dtype=np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(luma - gray[..., 0]).mean() < 1.0
    # Separate caches.
    assert gray_spec.key_fields() != rgb_spec.key_fields()
    with pytest.raises(ValueError, match="channels=2"):
        GeneratorSpec(channels=2)


def test_augmentations_work_on_one_channel():
    torch.manual_seed(0)
    batch = torch.rand(8, 1, 32, 96)
    augment = BatchAugment(rotation=10, translate=(0.05, 0.1), scale=(0.9, 1.1), shear=5, brightness=0.3,
                           contrast=0.3, saturation=0.3, hue=0.1, noise_std=0.05, blur_prob=0.5, erase_prob=0.5,
                           grayscale_prob=0.5)
    out = augment(batch)
    assert out.shape == batch.shape and 0.0 <= out.min() and out.max() <= 1.0
    assert not torch.allclose(out, batch)
    preset = TrainPreset(rotation=10, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1, grayscale_prob=0.5,
                         blur_prob=0.5, noise_std=0.05, erase_prob=0.5)
    image = preset(np.random.default_rng(1).integers(0, 256, (32, 96, 1), dtype=np.uint8))
    assert image.shape == (1, 32, 96) and image.dtype == torch.uint8


@pytest.fixture(scope="module")
def gray_run(tmp_path_factory, cache_dir):
    """A real one-epoch grayscale training run on tiny data."""
    from conftest import QUIET_TRAINER, TINY_DATA, _compose

    out = tmp_path_factory.mktemp("gray_run")
    cfg = _compose("train", [f"data.cache_dir={cache_dir}", *TINY_DATA, *QUIET_TRAINER, *GRAY_CRNN,
                             "trainer.max_epochs=1", "logger=csv"], out)
    return train(cfg)


def test_grayscale_checkpoint_reads_one_channel_everywhere(gray_run, make_cfg, tmp_path):
    ckpt = Path(gray_run["best_ckpt"])
    module, state = load_module(ckpt)
    assert module.spec.channels == 1 and module.spec.mean == (0.5,) and module.spec.std == (0.5,)
    first_conv = next(m for m in module.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 1
    assert state["datamodule_hyper_parameters"]["grayscale"] is True

    # eval rebuilds the grayscale test split from the checkpoint and scores it as training did.
    metrics = evaluate(make_cfg("eval", [f"ckpt_path={ckpt}"]))
    assert metrics["test/seq_acc"] == pytest.approx(gray_run["test/seq_acc"])

    # export: a one-channel ONNX input, parity with PyTorch, and the runtime converts any image to gray.
    exported = make_cfg("export", [f"ckpt_path={ckpt}", "parity.num_images=16"], name="export")
    report = export(exported)
    assert report["passed"] is True and report["text_agreement"] == 1.0
    onnx_path = tmp_path / "export" / "model.onnx"
    solver = Solver(onnx_path)
    assert solver.spec.channels == 1
    assert solver._session.get_inputs()[0].shape[1] == 1

    generator = CaptchaGenerator(GeneratorSpec())
    files = []
    for i in range(3):
        _, array = generator.sample("gray-tests", "files", i)
        path = tmp_path / f"captcha{i}.png"
        Image.fromarray(array).save(path)  # RGB files, as a user has them
        files.append(path)
    expected = read_images(module, np.stack([load_input(f, (32, 96), channels=1) for f in files])).texts
    assert [s.text for s in solver.solve_batch(files)] == expected
    buffer = io.BytesIO()
    Image.open(files[0]).convert("L").save(buffer, format="PNG")  # an already-gray file gives the same input
    assert solver.solve(buffer.getvalue()).text == expected[0]
    for model in (ckpt, onnx_path):
        output = tmp_path / f"{Path(model).suffix[1:]}.json"
        predict(make_cfg("predict", [f"ckpt_path={model}", f"inputs={tmp_path}/captcha*.png", f"output={output}"]))
        assert [row["text"] for row in json.loads(output.read_text())] == expected


def test_bad_grayscale_settings_are_named(make_cfg):
    with pytest.raises(ValueError, match=r"data.mean=\[0.5, 0.5, 0.5\] needs one number, or one per input channel: "
                                         r"1 with data.grayscale=true"):
        build_module(make_cfg("train", ["data.grayscale=true", "data.mean=[0.5,0.5,0.5]"]))
    with pytest.raises(ValueError, match="data.grayscale='yes' must be true"):
        build_module(make_cfg("train", ["data.grayscale=yes"]))
    with pytest.raises(ValueError, match=r"data.std=\[0.5, 0\] needs one number"):
        build_module(make_cfg("train", ["data.std=[0.5,0]"]))
    with pytest.raises(ValueError, match="model.in_channels is set by the data"):
        build_module(make_cfg("train", ["+model.in_channels=1"]))


def test_init_from_an_rgb_checkpoint_names_the_channels(gray_run, make_cfg, tmp_path):
    rgb = make_cfg("train", ["data.grayscale=false", *GRAY_CRNN[1:], "trainer.max_epochs=1", "logger=csv", "test=false"],
                   name="rgb")
    rgb_ckpt = train(rgb)["best_ckpt"]
    gray_module = build_module(make_cfg("train", GRAY_CRNN))
    with pytest.raises(ValueError, match="data.grayscale=false there, true here"):
        init_from_checkpoint(gray_module, rgb_ckpt)
