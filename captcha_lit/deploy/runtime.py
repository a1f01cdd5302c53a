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
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from captcha_lit import __version__
from captcha_lit.charset import Charset
from captcha_lit.decoding import decode_ctc_greedy, decode_positional
from captcha_lit.preprocess import MAX_IMAGE_PIXELS, ImageInput, check_channels, normalize, open_image, resize_to_input
from captcha_lit.utils import available_cores, check_model_path

DECODERS = ("positional", "ctc")
_REQUIRED_KEYS = ("charset", "input_size", "mean", "std", "decoder", "min_length", "max_length")


@dataclass(frozen=True)
class Solution:
    text: str
    confidence: float  # probability of the whole text
    char_confidences: list[float]  # probability of each character of ``text``

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelInfo:
    """The decoding contract of an exported model, stored as ONNX ``metadata_props``."""

    charset: str
    input_size: tuple[int, int]  # (height, width)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    decoder: str  # "positional": logits (B, L, C); "ctc": logits (B, T, C+1), blank last
    min_length: int
    max_length: int
    end_class: int | None = None  # positional, variable length: the class that ends the text
    arch: str = ""
    version: str = __version__  # the captcha_lit version that exported the model
    # The CTC beam width the checkpoint was configured with. This runtime decodes greedily,
    # which is what the export's parity check compares against.
    beam_width: int = 1

    def to_metadata(self) -> dict[str, str]:
        return {
            "charset": self.charset, "input_size": json.dumps(list(self.input_size)),
            "mean": json.dumps(list(self.mean)), "std": json.dumps(list(self.std)), "decoder": self.decoder,
            "min_length": str(self.min_length), "max_length": str(self.max_length),
            "end_class": "" if self.end_class is None else str(self.end_class),
            "blank": str(len(self.charset)) if self.decoder == "ctc" else "",
            "arch": self.arch, "captcha_lit_version": self.version, "beam_width": str(self.beam_width),
            "input_layout": f"NCHW float32, {'RGB' if self.channels == 3 else 'grayscale'} scaled to [0, 1] then "
                            "(x - mean) / std",
        }

    @classmethod
    def from_metadata(cls, props: dict[str, str], source: str = "model") -> ModelInfo:
        missing = [k for k in _REQUIRED_KEYS if k not in props]
        if missing:
            raise ValueError(
                f"{source} has no captcha_lit metadata (missing {', '.join(missing)}); export the model with "
                "`python -m captcha_lit.export ckpt_path=PATH`"
            )
        try:
            info = cls(
                charset=Charset(props["charset"]).chars,
                input_size=tuple(int(v) for v in json.loads(props["input_size"])),
                mean=tuple(float(v) for v in json.loads(props["mean"])),
                std=tuple(float(v) for v in json.loads(props["std"])),
                decoder=props["decoder"], min_length=int(props["min_length"]), max_length=int(props["max_length"]),
                end_class=int(props["end_class"]) if props.get("end_class") else None,
                arch=props.get("arch", ""), version=props.get("captcha_lit_version", ""),
                beam_width=int(props.get("beam_width") or 1),
            )
        except (TypeError, ValueError, json.JSONDecodeError) as exc:
            raise ValueError(f"{source} has malformed captcha_lit metadata ({exc})") from None
        if info.decoder not in DECODERS:
            raise ValueError(f"{source}: decoder {info.decoder!r} in its metadata is not one of {', '.join(DECODERS)}")
        if len(info.input_size) != 2:
            raise ValueError(f"{source}: input_size {list(info.input_size)} in its metadata is not [height, width]")
        try:
            check_channels(info.mean, info.std)
        except ValueError as exc:
            raise ValueError(f"{source} has malformed captcha_lit metadata ({exc})") from None
        return info

    @property
    def channels(self) -> int:
        """Input channels: 3 (RGB) or 1 (grayscale), one per normalization value."""
        return len(self.mean)

    @property
    def num_outputs(self) -> int:
        """Classes per logit row: the charset, plus the CTC blank or the end symbol."""
        return len(self.charset) + (self.decoder == "ctc" or self.end_class is not None)


# ---- the solver ------------------------------------------------------------------------
class Solver:
    """An exported model, ready to solve images.

    ``threads`` sets onnxruntime's intra-op threads (default: every core this process may
    use); ``providers`` its execution providers (default: CPU). ``max_pixels`` bounds the
    size of an image before it is decoded (decompression bombs). ``spinning`` lets idle
    intra-op threads busy-wait for the next call: a little faster for back-to-back calls in
    one process, but it burns cores that a server's event loop needs. Calls are thread-safe.
    """

    def __init__(self, model_path: str | os.PathLike, *, threads: int | None = None,
                 providers: Sequence[str] | None = None, max_pixels: int = MAX_IMAGE_PIXELS, batch_size: int = 64,
                 spinning: bool = True):
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
        self.info = ModelInfo.from_metadata(self._session.get_modelmeta().custom_metadata_map,
                                            source=f"model {str(self.path)!r}")
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"model {str(self.path)!r} has {len(inputs)} inputs; a captcha_lit model has one")
        self._input_name = inputs[0].name
        classes = self._session.get_outputs()[0].shape[-1]
        if isinstance(classes, int) and classes != self.info.num_outputs:
            raise ValueError(f"model {str(self.path)!r} outputs {classes} classes, but its metadata describes "
                             f"{self.info.num_outputs}; re-export it with `python -m captcha_lit.export`")
        self.charset = Charset(self.info.charset)
        self.model_id = f"{self.info.arch or 'model'}-{hashlib.sha256(data).hexdigest()[:12]}"
        self.max_pixels = int(max_pixels)
        self.batch_size = max(1, int(batch_size))

    def __repr__(self) -> str:
        return f"Solver({str(self.path)!r}, arch={self.info.arch!r}, decoder={self.info.decoder!r})"

    def load(self, image: ImageInput, *, name: str | None = None) -> np.ndarray:
        """Decode and resize one image to the model input: (H, W, C) uint8, C = ``info.channels``.
        Raises ``preprocess.ImageDecodeError`` (a ValueError) naming the problem."""
        return resize_to_input(open_image(image, name=name, max_pixels=self.max_pixels), self.info.input_size,
                               self.info.channels)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, C) uint8 images at the model input size -> raw logits."""
        batch = normalize(images, self.info.mean, self.info.std)
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
        if self.info.decoder == "ctc":
            decoded = decode_ctc_greedy(logits, blank=len(self.charset))
        else:
            decoded = decode_positional(logits, end_class=self.info.end_class)
        return [Solution(self.charset.decode(indices), confidence, char_conf)
                for indices, char_conf, confidence in zip(decoded.indices, decoded.char_conf, decoded.seq_conf)]


def _describe(image: ImageInput, index: int) -> str:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return f"image {index}"
