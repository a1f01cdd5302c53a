"""Outside training: predict CLI, ONNX export with parity, the torch-free runtime, bad model files."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from captcha_lit import __version__
from captcha_lit.training.checkpoints import load_module
from captcha_lit.training.inference import read_images
from captcha_lit.data.synthetic import CaptchaGenerator, GeneratorSpec
from captcha_lit.decoding import decode_ctc_greedy, decode_positional
from captcha_lit.deploy.export import ParityError, export, export_onnx
from captcha_lit.predict import predict
from captcha_lit.preprocess import load_input
from captcha_lit.deploy.runtime import Solver
from conftest import PYTHON, REPO_ROOT, cli_env, run_entry_points

ARCHS = ("cnn", "crnn")


def captcha_pngs(count: int, min_length: int = 4) -> list[tuple[str, bytes]]:
    """Generated CAPTCHAs at their canvas size (160x60), PNG-encoded like files a user has."""
    generator = CaptchaGenerator(GeneratorSpec(min_length=min_length, max_length=5, input_size=(60, 160)))
    pngs = []
    for i in range(count):
        text, array = generator.sample("deploy-tests", "files", i)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        pngs.append((text, buffer.getvalue()))
    return pngs


def torch_predictions(ckpt: Path, sources: list) -> tuple[list[str], list[float]]:
    """What the checkpoint's own CaptchaModule predicts for these images."""
    module, _ = load_module(ckpt)
    size = module.spec.input_size
    reading = read_images(module, np.stack([load_input(s, size, channels=module.spec.channels) for s in sources]))
    return reading.texts, [s.confidence for s in reading.solutions]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """Six good CAPTCHAs (RGB, RGBA, palette, grayscale, 16-bit among them), three bad files, one non-image."""
    folder = tmp_path_factory.mktemp("images")
    pngs = captcha_pngs(6)
    for i, (_, data) in enumerate(pngs[:3]):
        (folder / f"rgb{i}.png").write_bytes(data)
    image = Image.open(io.BytesIO(pngs[3][1]))
    image.convert("RGBA").save(folder / "alpha.png")
    image.quantize(64).save(folder / "palette.png")
    gray = image.convert("L")
    gray.save(folder / "gray.jpg", quality=95)
    (folder / "broken.png").write_bytes(b"this is not an image")
    (folder / "truncated.png").write_bytes(pngs[4][1][: len(pngs[4][1]) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not picked up from a folder")
    Image.fromarray((np.asarray(gray, dtype=np.uint16) * 257)).save(folder / "sixteen_bit.png")
    return folder


GOOD = ["gray.jpg", "palette.png", "rgb0.png", "rgb1.png", "rgb2.png", "alpha.png", "sixteen_bit.png"]
BAD = {"broken.png": "not a recognized image format", "truncated.png": "truncated", "empty.png": "empty"}


# ---- predict -------------------------------------------------------------------------------
def test_predict_folder_to_json(tiny_checkpoints, make_cfg, image_dir, tmp_path, capsys):
    ckpt = tiny_checkpoints["cnn"]
    output = tmp_path / "preds.json"
    cfg = make_cfg("predict", [f"ckpt_path={ckpt}", f"inputs={image_dir}", f"output={output}", "batch_size=4"])
    rows = predict(cfg)
    assert json.loads(output.read_text()) == rows
    by_name = {Path(r["path"]).name: r for r in rows}
    assert sorted(by_name) == sorted(GOOD + list(BAD))  # notes.txt is not an image file
    for name, fragment in BAD.items():
        assert by_name[name]["text"] is None
        assert name in by_name[name]["error"] and fragment in by_name[name]["error"]
    expected_texts, expected_conf = torch_predictions(ckpt, [image_dir / name for name in GOOD])
    for name, text, conf in zip(GOOD, expected_texts, expected_conf):
        row = by_name[name]
        assert row["error"] is None
        assert row["text"] == text
        assert row["confidence"] == pytest.approx(conf, rel=1e-5)
        assert len(row["char_confidences"]) == len(text)
        # Each is the winning class's probability among 36 characters and the end symbol, and the
        # text's confidence is their product times the end symbol's (when the text stops early).
        assert all(1 / 37 <= c <= 1.0 for c in row["char_confidences"])
        assert row["confidence"] <= math.prod(row["char_confidences"]) * (1 + 1e-6)
    table = capsys.readouterr().out
    assert "rgb0.png" in table and "not a recognized image format" in table
    assert f"{len(rows)} image(s), {len(BAD)} error(s)" in table


def test_predict_glob_to_csv_and_onnx_agree(tiny_checkpoints, exported_models, make_cfg, image_dir, tmp_path):
    results = {}
    for kind, model in (("ckpt", tiny_checkpoints["crnn"]), ("onnx", exported_models["crnn"]["onnx"])):
        output = tmp_path / f"{kind}.csv"
        cfg = make_cfg("predict", [f"ckpt_path={model}", f"inputs={image_dir}/rgb*.png", f"output={output}"])
        predict(cfg)
        with open(output, newline="") as handle:
            results[kind] = list(csv.DictReader(handle))
    assert [Path(r["path"]).name for r in results["ckpt"]] == ["rgb0.png", "rgb1.png", "rgb2.png"]
    expected, _ = torch_predictions(tiny_checkpoints["crnn"], [image_dir / f"rgb{i}.png" for i in range(3)])
    assert [r["text"] for r in results["ckpt"]] == expected
    assert [r["text"] for r in results["onnx"]] == expected
    for a, b in zip(results["ckpt"], results["onnx"]):
        assert float(a["confidence"]) == pytest.approx(float(b["confidence"]), abs=1e-4)
        assert len(a["char_confidences"].split()) == len(a["text"])
        assert a["error"] == ""


def test_predict_bad_arguments(tiny_checkpoints, make_cfg, tmp_path, image_dir):
    ckpt = tiny_checkpoints["cnn"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        predict(make_cfg("predict", [f"ckpt_path={ckpt}", f"inputs={tmp_path / 'missing.png'}"]))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        predict(make_cfg("predict", [f"ckpt_path={ckpt}", f"inputs={tmp_path / 'empty_dir'}"]))
    with pytest.raises(ValueError, match=r"\.json or \.csv"):
        predict(make_cfg("predict", [f"ckpt_path={ckpt}", f"inputs={image_dir}", "output=preds.txt"]))


# ---- export --------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_export_writes_onnx_with_metadata_and_parity(exported_models, tiny_checkpoints, arch):
    exported = exported_models[arch]
    model_path, report = exported["onnx"], exported["report"]
    assert model_path.is_file() and model_path.parent == exported["run_dir"]
    on_disk = json.loads((exported["run_dir"] / "model.parity.json").read_text())
    assert on_disk["passed"] is True and report["passed"] is True
    assert on_disk["num_images"] == 24
    assert on_disk["text_agreement"] == 1.0 and on_disk["text_mismatches"] == 0
    assert on_disk["max_abs_logit_diff"] < 1e-4

    model = onnx.load(str(model_path))
    meta = {p.key: p.value for p in model.metadata_props}
    module, _ = load_module(tiny_checkpoints[arch])
    assert meta["charset"] == module.charset.chars
    assert json.loads(meta["input_size"]) == [32, 96]
    assert tuple(json.loads(meta["mean"])) == module.spec.mean and tuple(json.loads(meta["std"])) == module.spec.std
    assert meta["decoder"] == {"cnn": "positional", "crnn": "ctc"}[arch]
    assert (meta["min_length"], meta["max_length"]) == ({"cnn": "4", "crnn": "5"}[arch], "5")
    assert meta["end_class"] == {"cnn": str(len(module.charset)), "crnn": ""}[arch]
    assert meta["arch"] == arch and meta["captcha_lit_version"] == __version__ and meta["beam_width"] == "1"
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # dynamic batch

    # Dynamic batch in practice: 1 and 7 images give the PyTorch texts.
    pngs = [data for _, data in captcha_pngs(7)]
    expected, _ = torch_predictions(tiny_checkpoints[arch], pngs)
    solver = Solver(model_path)
    assert solver.solve(pngs[0]).text == expected[0]
    assert [s.text for s in solver.solve_batch(pngs)] == expected


def test_export_parity_failure_is_loud(tiny_checkpoints, tmp_path, monkeypatch):
    module, state = load_module(tiny_checkpoints["cnn"])
    real_logits = Solver.logits
    monkeypatch.setattr(Solver, "logits", lambda self, images: -real_logits(self, images))  # a broken export
    path = tmp_path / "model.onnx"
    with pytest.raises(ParityError, match="does not match PyTorch") as info:
        export_onnx(module, state, path, parity_images=8)
    assert "model.failed.onnx" in str(info.value)
    assert not path.exists() and (tmp_path / "model.failed.onnx").is_file()
    report = json.loads((tmp_path / "model.parity.json").read_text())
    assert report["passed"] is False and report["text_mismatches"] > 0


def test_export_and_predict_refuse_unsafe_checkpoints(make_cfg, tmp_path, tiny_checkpoints, image_dir):
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"hyper_parameters": {"x": _NotPlain()}, "state_dict": {}}, unsafe)
    with pytest.raises(ValueError, match="needs unsafe unpickling"):
        export(make_cfg("export", [f"ckpt_path={unsafe}"]))
    with pytest.raises(ValueError, match="needs unsafe unpickling"):
        predict(make_cfg("predict", [f"ckpt_path={unsafe}", f"inputs={image_dir}"]))


class _NotPlain:
    """A Python object that a weights_only load must refuse."""


# ---- runtime ---------------------------------------------------------------------------------
_RUNTIME_SCRIPT = """
import json, sys
from PIL import Image
from captcha_lit.deploy.runtime import Solver
solver = Solver(sys.argv[1])
paths = sys.argv[2:]
single = solver.solve(open(paths[0], "rb").read())
batch = solver.solve_batch([paths[0], Image.open(paths[1])] + paths[2:])
print(json.dumps({"single": single.to_dict(), "batch": [s.to_dict() for s in batch],
                  "torch_loaded": "torch" in sys.modules, "lightning_loaded": "lightning" in sys.modules}))
"""


@pytest.mark.parametrize("arch", ARCHS)
def test_runtime_solves_without_torch(exported_models, tiny_checkpoints, image_dir, cache_dir, arch):
    paths = [image_dir / name for name in ("rgb0.png", "rgb1.png", "alpha.png")]
    proc = subprocess.run([PYTHON, "-c", _RUNTIME_SCRIPT, str(exported_models[arch]["onnx"]), *map(str, paths)],
                          cwd=REPO_ROOT, env=cli_env(cache_dir), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["torch_loaded"] is False and result["lightning_loaded"] is False
    texts, seq_conf = torch_predictions(tiny_checkpoints[arch], paths)
    assert result["single"]["text"] == texts[0]
    assert [s["text"] for s in result["batch"]] == texts
    for solution, conf in zip(result["batch"], seq_conf):
        assert solution["confidence"] == pytest.approx(conf, abs=1e-5)


def test_decoders_read_numpy_and_torch_logits_alike():
    """The runtime (numpy logits) and the module (torch logits) share one decoder."""
    rng = np.random.default_rng(0)
    num_classes = 10
    # CTC: sharp logits so that paths repeat characters and visit the blank; row 0 is all blank.
    best = rng.integers(0, num_classes + 1, (32, 16))
    best[:, 1::3] = best[:, 0::3][:, : best[:, 1::3].shape[1]]
    logits = rng.normal(0, 1, (32, 16, num_classes + 1)).astype(np.float32)
    np.put_along_axis(logits, best[..., None], 4.0, axis=-1)
    logits[0, :, num_classes] = 9.0
    from_torch = decode_ctc_greedy(torch.from_numpy(logits), blank=num_classes)
    from_numpy = decode_ctc_greedy(logits, blank=num_classes)
    # An all-blank row decodes to nothing, with the best path's probability as its confidence.
    path_prob = torch.from_numpy(logits[0]).double().softmax(-1).max(-1).values.prod().item()
    assert from_numpy.indices[0] == [] and from_numpy.seq_conf[0] == pytest.approx(path_prob, rel=1e-5)
    assert any(len(indices) > 3 for indices in from_numpy.indices)
    assert from_numpy.indices == from_torch.indices
    for i in range(len(logits)):
        assert from_numpy.char_conf[i] == pytest.approx(from_torch.char_conf[i], rel=1e-6)
        assert from_numpy.seq_conf[i] == pytest.approx(from_torch.seq_conf[i], rel=1e-6)

    # Positional with an end symbol at every position, and rows without one.
    end = num_classes
    logits = rng.normal(0, 2, (24, 5, num_classes + 1)).astype(np.float32)
    for row in range(6):
        logits[row, row if row < 5 else 0, end] = 12.0
    for end_class in (end, None):
        from_torch = decode_positional(torch.from_numpy(logits), end_class=end_class)
        from_numpy = decode_positional(logits, end_class=end_class)
        assert from_numpy.indices == from_torch.indices
        assert from_numpy.seq_conf == pytest.approx(from_torch.seq_conf, rel=1e-6)
    stopped = decode_positional(logits, end_class=end)
    assert stopped.indices[0] == [] and all(len(stopped.indices[r]) <= r for r in range(5))


def test_solver_rejects_bad_model_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Solver(tmp_path / "missing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage that is not a protobuf graph")
    with pytest.raises(ValueError, match="not a valid ONNX model") as info:
        Solver(corrupt)
    assert str(corrupt) in str(info.value)
    # A valid ONNX model that captcha_lit did not export.
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(foreign))
    with pytest.raises(ValueError, match="no captcha_lit metadata"):
        Solver(foreign)


# ---- command lines: bad model files end with one error line and exit code 2 -----------------------
@pytest.mark.slow
def test_cli_bad_model_files(tmp_path, cache_dir):
    corrupt_ckpt = tmp_path / "corrupt.ckpt"
    corrupt_ckpt.write_bytes(b"not a checkpoint")
    corrupt_onnx = tmp_path / "corrupt.onnx"
    corrupt_onnx.write_bytes(b"not an onnx model")
    cases = {
        "export": (["captcha_lit.export", f"ckpt_path={corrupt_ckpt}"], "corrupt or not a PyTorch checkpoint"),
        "serve_corrupt": (["captcha_lit.serve", f"model_path={corrupt_onnx}"], "not a valid ONNX model"),
        "serve_missing": (["captcha_lit.serve", f"model_path={tmp_path / 'none.onnx'}"], "does not exist"),
    }
    results = run_entry_points({name: [*args, f"hydra.run.dir={tmp_path / name}"] for name, (args, _) in cases.items()},
                               cache_dir, timeout=180)
    for name, (code, _, stderr) in results.items():
        assert code == 2, f"{name}: exit {code}\n{stderr[-3000:]}"
        assert "Traceback" not in stderr
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and cases[name][1] in errors[0], stderr[-2000:]


def test_export_parity_on_the_checkpoints_test_split(make_cfg, tiny_checkpoints, tmp_path):
    """parity.split=test compares PyTorch and ONNX on the checkpoint's own fixed test split."""
    output = tmp_path / "m.onnx"
    report = export(make_cfg("export", [f"ckpt_path={tiny_checkpoints['crnn']}", f"output={output}",
                                        "parity.split=test", "parity.num_images=null"]))
    module, state = load_module(tiny_checkpoints["crnn"])
    num_test = state["datamodule_hyper_parameters"]["num_test"]
    assert report["split"] == "test" and report["num_images"] == num_test
    assert report["passed"] and report["text_agreement"] == 1.0
    with pytest.raises(ValueError, match="parity.split='train'"):
        export(make_cfg("export", [f"ckpt_path={tiny_checkpoints['crnn']}", f"output={output}", "parity.split=train"]))
    with pytest.raises(ValueError, match="needs parity.split=test"):
        export(make_cfg("export", [f"ckpt_path={tiny_checkpoints['crnn']}", f"output={output}",
                                   "parity.num_images=null"]))
