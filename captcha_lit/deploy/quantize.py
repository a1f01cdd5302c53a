"""Static int8 quantization of an exported model, with onnxruntime's quantization tools.

    python -m captcha_lit.export ckpt_path=PATH quantize=int8

The fp32 export is written and checked first. Its int8 copy (``<stem>.int8.onnx``) is
quantized from the same function with the temporal convolutions left 1-D (the form
onnxruntime's integer kernels run fastest; ``captcha_lit.deploy.folding``), calibrated on
generated CAPTCHAs drawn like the model's training data, from a seed stream of its own,
then compared with the fp32 model on the checkpoint's fixed test split: an
int8 model whose texts agree with the fp32 model's on fewer than
``int8.min_text_agreement`` of those images is renamed ``*.failed.onnx`` and refused.
The int8 file carries the same metadata, so the runtime and ``serve`` take it like any
other model.

Weights are quantized per output channel (int8, symmetric); activations per tensor
(uint8), to the 99.999th percentile of the calibration images' values, so that a few
outliers do not coarsen every other value's step. Besides the convolutions and matrix
products, the operators that are exact on integers are quantized too (ReLU, max-pooling,
reshapes and transposes): the maps stay integer from one convolution to the next, where a
float operator between them would cost a dequantize and a quantize of the whole map. The
elementwise arithmetic (GELU, additions, normalizations) stays float: rounding at each of
its steps made more texts differ from fp32's. The convolutions that read the input
image stay float too: with one or three input channels they have too little arithmetic per
output for integer kernels to pay for their layout changes.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from captcha_lit.preprocess import normalize

log = logging.getLogger(__name__)

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm", "Relu", "MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze",
                 "Unsqueeze")


def int8_path(fp32_path: str | os.PathLike) -> Path:
    path = Path(fp32_path)
    return path.with_name(f"{path.stem}.int8.onnx")


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike, calibration: np.ndarray,
                  mean: tuple[float, ...], std: tuple[float, ...], batch_size: int = 64) -> Path:
    """Write the static int8 quantization of ``fp32_path`` to ``out_path``, calibrated on
    ``calibration``: (N, H, W, C) uint8 images at the model's input size."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) < 1:
        raise ValueError("int8.calibration_images must be at least 1")
    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name

    class Batches(CalibrationDataReader):
        def __init__(self):
            self._starts = iter(range(0, len(calibration), batch_size))

        def get_next(self):
            start = next(self._starts, None)
            if start is None:
                return None
            return {input_name: normalize(calibration[start:start + batch_size], mean, std)}

    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="captcha_lit_int8_") as tmp:
        # Shape inference and graph optimization first, as onnxruntime recommends for quantization:
        # it folds batch norms into the convolutions they follow, so those become integer work too.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(out_path), Batches(), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_exclude=input_convolutions(onnx.load(str(prepared))),
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.Percentile,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    # quantize_static keeps the graph's metadata_props only in some versions: copy them over.
    source, quantized = onnx.load(str(fp32_path)), onnx.load(str(out_path))
    del quantized.metadata_props[:]
    for prop in source.metadata_props:
        entry = quantized.metadata_props.add()
        entry.key, entry.value = prop.key, prop.value
    quantized.producer_name, quantized.producer_version = source.producer_name, source.producer_version
    quantized.doc_string = source.doc_string + " (static int8)"
    onnx.save(quantized, str(out_path))
    return out_path


# Operators that only move or copy the input's values (a model's test-time views pad, slice and
# concatenate it), through which a convolution still reads the raw image.
MOVES = {"Pad", "Slice", "Concat", "Reshape", "Transpose", "Identity", "Cast"}


def input_convolutions(model) -> list[str]:
    """Names of the convolutions that read the graph's input, directly or through ``MOVES``."""
    raw = {value.name for value in model.graph.input}
    found = []
    for node in model.graph.node:  # ONNX lists nodes in topological order
        if node.input and node.input[0] in raw:
            if node.op_type == "Conv":
                found.append(node.name)
            elif node.op_type in MOVES:
                raw.update(node.output)
    return found


def compare_texts(reference, candidate, images: np.ndarray, labels: list[str]) -> dict:
    """Texts of two Solvers on the same images: agreement, and each one's sequence accuracy."""
    ours = [s.text for s in candidate.solve_arrays(images)]
    theirs = [s.text for s in reference.solve_arrays(images)]
    mismatched = [{"index": i, "label": labels[i], "fp32": t, "int8": o}
                  for i, (t, o) in enumerate(zip(theirs, ours)) if t != o]
    return {
        "num_images": len(images),
        "text_agreement": 1.0 - len(mismatched) / max(len(images), 1),
        "text_mismatches": len(mismatched),
        "mismatched": mismatched[:20],
        "fp32_seq_acc": float(np.mean([t == y for t, y in zip(theirs, labels)])),
        "int8_seq_acc": float(np.mean([t == y for t, y in zip(ours, labels)])),
    }
