"""Solve CAPTCHAs with an exported ONNX model, without torch.

    from captcha_lit.deploy.runtime import Solver

    solver = Solver("model.onnx")
    solver.solve("captcha.png")     # Solution(text='7K2QD', confidence=0.93, char_confidences=[...])
    solver.solve_batch([png_bytes, pil_image, "other.png"])

Needs only onnxruntime, Pillow and numpy. Everything needed to preprocess and
decode (charset, input size, normalization, decoder kind, lengths) is read from
the model's ONNX metadata, which ``python -m captcha_lit.export`` writes.
Decoding is ``captcha_lit.decoding``'s, which is numpy only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence

import numpy as np

from captcha_lit.decoding import Solution, check_min_confidence, read_logits, require_confidence
from captcha_lit.preprocess import MAX_IMAGE_PIXELS, ImageInput, normalize, open_image, resize_to_input
from captcha_lit.spec import ModelSpec
from captcha_lit.utils import available_cores, check_model_path


# ---- the solver ------------------------------------------------------------------------
class Solver:
    """An exported model, ready to solve images.

    ``threads`` sets onnxruntime's intra-op threads (default: every core this process may
    use); ``providers`` its execution providers (default: CPU). ``max_pixels`` bounds the
    size of an image before it is decoded (decompression bombs). ``spinning`` lets idle
    intra-op threads busy-wait for the next call: a little faster for back-to-back calls in
    one process, but it burns cores that a server's event loop needs. ``min_confidence`` marks
    readings less sure than it unsure (``Solution.unsure``). Calls are thread-safe.
    """

    def __init__(self, model_path: str | os.PathLike, *, threads: int | None = None,
                 providers: Sequence[str] | None = None, max_pixels: int = MAX_IMAGE_PIXELS, batch_size: int = 64,
                 spinning: bool = True, min_confidence: float | None = None):
        import onnxruntime as ort

        self.path = check_model_path(model_path, "model")
        data = self.path.read_bytes()
        options = ort.SessionOptions()
        self.threads = int(threads) if threads else available_cores()
        options.intra_op_num_threads = self.threads
        # One graph, one request at a time per call: parallelism comes from intra-op threads.
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(data, sess_options=options,
                                                 providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf / InvalidGraph types
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"model {str(self.path)!r} is not a valid ONNX model ({reason})") from None
        self.spec = ModelSpec.from_metadata(self._session.get_modelmeta().custom_metadata_map,
                                            source=f"model {str(self.path)!r}")
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"model {str(self.path)!r} has {len(inputs)} inputs; a captcha_lit model has one")
        self._input_name = inputs[0].name
        classes = self._session.get_outputs()[0].shape[-1]
        if isinstance(classes, int) and classes != self.spec.num_outputs:
            raise ValueError(f"model {str(self.path)!r} outputs {classes} classes, but its metadata describes "
                             f"{self.spec.num_outputs}; re-export it with `python -m captcha_lit.export`")
        self.model_id = f"{self.spec.arch or 'model'}-{hashlib.sha256(data).hexdigest()[:12]}"
        self.max_pixels = int(max_pixels)
        self.batch_size = max(1, int(batch_size))
        self.min_confidence = check_min_confidence(min_confidence)

    def __repr__(self) -> str:
        return f"Solver({str(self.path)!r}, arch={self.spec.arch!r}, decoder={self.spec.decoder!r})"

    def load(self, image: ImageInput, *, name: str | None = None) -> np.ndarray:
        """Decode and resize one image to the model input: (H, W, C) uint8, C = ``spec.channels``.
        Raises ``preprocess.ImageDecodeError`` (a ValueError) naming the problem."""
        return resize_to_input(open_image(image, name=name, max_pixels=self.max_pixels), self.spec.input_size,
                               self.spec.channels)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, C) uint8 images at the model input size -> raw logits."""
        batch = normalize(images, self.spec.mean, self.spec.std)
        return self._session.run(None, {self._input_name: batch})[0]

    def solve_arrays(self, images: np.ndarray) -> list[Solution]:
        """Solve (N, H, W, C) uint8 images that ``load`` produced."""
        solutions: list[Solution] = []
        for start in range(0, len(images), self.batch_size):
            solutions.extend(self._decode(self.logits(images[start:start + self.batch_size])))
        return solutions

    def solve(self, image: ImageInput) -> Solution:
        """One image (path, encoded bytes, PIL image or HxWx3 uint8 array) -> its text and confidences."""
        return self.solve_arrays(self.load(image)[None])[0]

    def solve_batch(self, images: Iterable[ImageInput]) -> list[Solution]:
        """Several images, run in batches. A bad image raises ImageDecodeError naming its position."""
        arrays = [self.load(image, name=_describe(image, i)) for i, image in enumerate(images)]
        if not arrays:
            return []
        return self.solve_arrays(np.stack(arrays))

    def _decode(self, logits: np.ndarray) -> list[Solution]:
        # Always greedy: the export's parity check compares against greedy decoding.
        return require_confidence(read_logits(self.spec, logits, beam_width=1)[0], self.min_confidence)


def _describe(image: ImageInput, index: int) -> str:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return f"image {index}"
