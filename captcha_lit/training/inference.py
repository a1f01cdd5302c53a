"""Images -> texts with a torch model: the one inference loop of predict, export's parity check,
visualize and the benchmarks. Training and eval steps decode their own logits with the same
``read_logits``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from captcha_lit.data.transforms import to_chw_uint8
from captcha_lit.decoding import Solution, read_logits


@dataclass
class Reading:
    solutions: list[Solution]
    logits: np.ndarray | None  # (N, steps or positions, classes), when asked for

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.solutions]


@torch.inference_mode()
def read_images(module, images, *, beam_width: int | None = None, batch_size: int = 256,
                keep_logits: bool = False) -> Reading:
    """uint8 images at the model's input size, (N, H, W, C) or (N, C, H, W), numpy or torch ->
    their readings, in batches of ``batch_size``, in fp32 whatever the training precision."""
    module.eval()
    device = module.device
    solutions: list[Solution] = []
    logits_parts: list[np.ndarray] = []
    images = torch.as_tensor(images)
    for start in range(0, len(images), batch_size):
        chunk = to_chw_uint8(images[start:start + batch_size]).to(device)
        with torch.autocast(device.type, enabled=False):
            logits = module(module.preprocess(chunk))
        solutions += read_logits(module.spec, logits, beam_width)[0]
        if keep_logits:
            logits_parts.append(logits.float().cpu().numpy())
    return Reading(solutions, np.concatenate(logits_parts) if keep_logits and logits_parts else None)
