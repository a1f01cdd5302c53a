"""export quantize=int8: a statically quantized model beside the fp32 one, checked against its texts
on the test split, refused below int8.min_text_agreement, and served like any other model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from captcha_lit.deploy.export import ParityError, export
from captcha_lit.deploy.runtime import Solver
from captcha_lit.training.checkpoints import load_module

# Integer work in the graph: onnxruntime's QDQ format brackets the quantized operators with these.
QUANTIZATION_OPS = {"QuantizeLinear", "DequantizeLinear"}
SMALL_INT8 = ["quantize=int8", "int8.calibration_images=32"]


def _export(make_cfg, tmp_path, ckpt, *overrides: str) -> dict:
    return export(make_cfg("export", [f"ckpt_path={ckpt}", f"output={tmp_path / 'model.onnx'}",
                                      "parity.num_images=16", *SMALL_INT8, *overrides]))


def test_int8_export_writes_a_quantized_model_that_serves_like_the_fp32_one(make_cfg, tiny_checkpoints, tmp_path):
    # A one-epoch model reads almost nothing, so its int8 agreement is measured here, not required.
    report = _export(make_cfg, tmp_path, tiny_checkpoints["crnn"], "int8.min_text_agreement=0")
    int8 = report["int8"]
    path = tmp_path / "model.int8.onnx"
    assert int8["model"] == str(path.resolve()) and path.is_file()
    graph = onnx.load(str(path)).graph
    assert QUANTIZATION_OPS <= {node.op_type for node in graph.node}
    assert not QUANTIZATION_OPS & {node.op_type for node in onnx.load(str(tmp_path / "model.onnx")).graph.node}

    _, state = load_module(tiny_checkpoints["crnn"])
    assert int8["split"] == "test" and int8["num_images"] == state["datamodule_hyper_parameters"]["num_test"]
    assert 0.0 <= int8["text_agreement"] <= 1.0
    assert int8["text_mismatches"] == round((1 - int8["text_agreement"]) * int8["num_images"])
    assert json.loads((tmp_path / "model.int8.parity.json").read_text())["passed"] is True

    fp32, quantized = Solver(tmp_path / "model.onnx"), Solver(path)
    assert quantized.spec == fp32.spec  # the metadata (charset, input, decoder, temperature) came along
    height, width = fp32.spec.input_size
    images = np.zeros((4, height, width, fp32.spec.channels), dtype=np.uint8)
    for solution in quantized.solve_arrays(images):
        assert set(solution.text) <= set(fp32.spec.charset) and 0.0 <= solution.confidence <= 1.0
        assert len(solution.char_confidences) == len(solution.text)


def test_an_int8_model_that_reads_otherwise_is_refused(make_cfg, tiny_checkpoints, tmp_path, monkeypatch):
    real_logits = Solver.logits

    def broken_int8(self, images):  # an int8 model whose readings differ from fp32's everywhere
        logits = real_logits(self, images)
        return -logits if self.path.name.endswith(".int8.onnx") else logits

    monkeypatch.setattr(Solver, "logits", broken_int8)
    with pytest.raises(ParityError, match=r"int8 model's texts agree with the fp32 model's on .* below "
                                          r"int8.min_text_agreement=0.999") as info:
        _export(make_cfg, tmp_path, tiny_checkpoints["crnn"])
    assert "model.int8.failed.onnx" in str(info.value) and "serve" in str(info.value)
    assert not (tmp_path / "model.int8.onnx").exists() and (tmp_path / "model.int8.failed.onnx").is_file()
    assert (tmp_path / "model.onnx").is_file()  # the fp32 model stands
    assert json.loads((tmp_path / "model.int8.parity.json").read_text())["passed"] is False


def test_bad_quantize_settings_are_clear_errors(make_cfg, tiny_checkpoints, tmp_path):
    with pytest.raises(ValueError, match="quantize='int4': use int8"):
        _export(make_cfg, tmp_path, tiny_checkpoints["crnn"], "quantize=int4")
    with pytest.raises(ValueError, match=r"int8.min_text_agreement=1.5: use a fraction in \[0, 1\]"):
        _export(make_cfg, tmp_path, tiny_checkpoints["crnn"], "int8.min_text_agreement=1.5")


@pytest.mark.parametrize("arch", ["crnn", "cnn"])
def test_int8_keeps_the_input_convolution_float_and_quantizes_what_lies_between_the_others(
        make_cfg, tiny_checkpoints, tmp_path, arch):
    _export(make_cfg, tmp_path, tiny_checkpoints[arch], "int8.min_text_agreement=0")
    graph = onnx.load(str(tmp_path / "model.int8.onnx")).graph
    produced_by = {output: node for node in graph.node for output in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    image = graph.input[0].name
    first = [node for node in convs if node.input[0] == image]
    assert len(first) == 1 and first[0].input[1] in {init.name for init in graph.initializer}  # float weights
    others = [node for node in convs if node not in first]
    assert others and all(produced_by[node.input[1]].op_type == "DequantizeLinear" for node in others)
    # No float activation or pool is left after an integer convolution: past the float one, each
    # reads a dequantized map (onnxruntime then runs it on the integers), never a convolution's output.
    later = [node for node in graph.node if node.op_type in ("Relu", "MaxPool") and node.input[0] != first[0].output[0]]
    assert any(produced_by[node.input[0]].op_type == "DequantizeLinear" for node in later)
    assert not [node.name for node in later if produced_by[node.input[0]].op_type == "Conv"]


def test_a_model_with_test_time_views_exports_them_and_its_int8_keeps_the_input_convolution_float(
        make_cfg, tiny_checkpoints, tmp_path):
    import torch

    state = torch.load(tiny_checkpoints["crnn"], map_location="cpu", weights_only=True)
    state["hyper_parameters"]["tta_shifts"] = [-1, 1]
    ckpt = tmp_path / "tta.ckpt"
    torch.save(state, ckpt)
    report = _export(make_cfg, tmp_path, ckpt, "int8.min_text_agreement=0")  # raises if ONNX and torch differ
    fp32 = onnx.load(str(tmp_path / "model.onnx")).graph
    assert {"Pad", "Concat"} <= {node.op_type for node in fp32.node}  # the views are in the graph
    module, _ = load_module(ckpt)
    images = np.random.default_rng(0).integers(0, 256, (6, *module.spec.input_size, module.spec.channels), np.uint8)
    with torch.no_grad():
        expected = module.eval()(module.preprocess(torch.from_numpy(images).permute(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(Solver(tmp_path / "model.onnx").logits(images), expected, atol=1e-4)
    graph = onnx.load(report["int8"]["model"]).graph
    weights = {init.name for init in graph.initializer}
    float_convs = [node.name for node in graph.node if node.op_type == "Conv" and node.input[1] in weights]
    assert len(float_convs) == 1  # the first, reading the padded and concatenated image


def _conv_weight_ranks(graph) -> list[int]:
    """The rank of each convolution's weights (4: 2-D, 3: 1-D), through a DequantizeLinear if quantized."""
    weights = {init.name: init for init in graph.initializer}
    produced_by = {output: node for node in graph.node for output in node.output}
    ranks = []
    for node in graph.node:
        if node.op_type == "Conv":
            name = node.input[1]
            if name not in weights:
                name = produced_by[name].input[0]
            ranks.append(len(weights[name].dims))
    return ranks


def test_fp32_runs_temporal_convolutions_as_2d_and_int8_as_1d(make_cfg, tiny_checkpoints, tmp_path):
    # onnxruntime's fp32 1-D convolutions are slow and its integer 2-D ones add layout transposes:
    # each graph gets the form its kernels run fastest (captcha_lit.deploy.folding).
    _export(make_cfg, tmp_path, tiny_checkpoints["crnn"], "int8.min_text_agreement=0")
    fp32 = _conv_weight_ranks(onnx.load(str(tmp_path / "model.onnx")).graph)
    int8 = _conv_weight_ranks(onnx.load(str(tmp_path / "model.int8.onnx")).graph)
    assert fp32 and set(fp32) == {4}
    assert int8.count(3) == 2 and len(int8) == len(fp32)  # the two temporal layers
