"""Transform presets, in the style of torchvision's classification references.

Images arrive already decoded and resized to the model input by
``captcha_lit.preprocess`` as uint8. Batches stay uint8 until the LightningModule,
which augments them when training and then applies ``EvalPreset``. ``EvalPreset``
is the only preprocessing that val, test, predict, export and serve apply, so a
served model sees exactly what it was validated on.

Augmentation has two backends with the same parameters: ``batch`` (default),
vectorized over the batch in the training process, and ``torchvision``, per
sample with torchvision.transforms.v2 in the DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

AUGMENTATION_BACKENDS = ("batch", "torchvision")


def to_chw_uint8(image) -> torch.Tensor:
    """(H, W, C) uint8 array or tensor -> (C, H, W) uint8 tensor, C = 3 (RGB) or 1 (grayscale);
    a (B, H, W, C) batch -> (B, C, H, W)."""
    tensor = image if isinstance(image, torch.Tensor) else torch.from_numpy(image)
    if tensor.ndim in (3, 4) and tensor.shape[-1] in (1, 3) and tensor.shape[-3] not in (1, 3):
        tensor = tensor.movedim(-1, -3)
    return tensor.contiguous()


class EvalPreset:
    """uint8 (C, H, W) image or (B, C, H, W) batch -> normalized float32 (C = len(mean): 3 or 1)."""

    def __init__(self, *, mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)):
        self.to_float = v2.ToDtype(torch.float32, scale=True)
        self.normalize = v2.Normalize(mean=list(mean), std=list(std))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.to_float(image))

    def to_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized float images -> uint8, the inverse of ``__call__``: for showing what the model saw."""
        shape = (-1, 1, 1)
        mean = torch.tensor(self.normalize.mean, dtype=images.dtype, device=images.device).view(shape)
        std = torch.tensor(self.normalize.std, dtype=images.dtype, device=images.device).view(shape)
        return (images.detach() * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)


def scaled_strengths(strength: float = 1.0, **params) -> dict:
    """Multiply every augmentation magnitude by ``strength``: the angles, shifts, the scale
    range's distance from 1, the color jitter, the noise and the blur/erase/grayscale
    probabilities (capped at 1). ``p`` stays as it is. One number to sweep: 0 turns
    augmentation off, 1 applies the config as written, 2 doubles it."""
    if not isinstance(strength, (int, float)) or strength < 0:
        raise ValueError(f"augmentation.strength={strength!r} must be a number >= 0 "
                         "(0 turns augmentation off, 1 applies the strengths as written)")
    strength = float(strength)
    out = dict(params)  # insertion order is kept, so callers can unpack .values()
    for key in ("rotation", "shear", "brightness", "contrast", "saturation", "noise_std"):
        if key in out:
            out[key] = float(out[key]) * strength
    if "hue" in out:
        out["hue"] = min(float(out["hue"]) * strength, 0.5)  # a hue shift wraps around at 0.5
    if "translate" in out:
        out["translate"] = tuple(float(v) * strength for v in out["translate"])
    if "scale" in out:
        out["scale"] = tuple(1.0 + (float(v) - 1.0) * strength for v in out["scale"])
    for key in ("blur_prob", "erase_prob", "grayscale_prob"):
        if key in out:
            out[key] = min(float(out[key]) * strength, 1.0)
    return out


class TrainPreset:
    """Per-sample augmentation with torchvision.transforms.v2, uint8 in and uint8 out.

    Used with ``augmentation.backend=torchvision`` inside DataLoader workers; the
    module then applies ``EvalPreset``'s normalization to the batch. Every strength
    is a plain number, and 0 turns that augmentation off; ``strength`` scales them all
    (see ``scaled_strengths``).
    """

    def __init__(
        self,
        *,
        rotation: float = 0.0,
        translate: Sequence[float] = (0.0, 0.0),
        scale: Sequence[float] = (1.0, 1.0),
        shear: float = 0.0,
        brightness: float = 0.0,
        contrast: float = 0.0,
        saturation: float = 0.0,
        hue: float = 0.0,
        noise_std: float = 0.0,
        blur_prob: float = 0.0,
        erase_prob: float = 0.0,
        grayscale_prob: float = 0.0,
        p: float = 1.0,
        strength: float = 1.0,
    ):
        (rotation, translate, scale, shear, brightness, contrast, saturation, hue, noise_std, blur_prob, erase_prob,
         grayscale_prob) = scaled_strengths(
            strength, rotation=rotation, translate=translate, scale=scale, shear=shear, brightness=brightness,
            contrast=contrast, saturation=saturation, hue=hue, noise_std=noise_std, blur_prob=blur_prob,
            erase_prob=erase_prob, grayscale_prob=grayscale_prob).values()
        ops: list = []
        if rotation or any(translate) or scale != (1.0, 1.0) or shear:
            ops.append(v2.RandomApply([v2.RandomAffine(
                degrees=rotation, translate=translate if any(translate) else None,
                scale=scale if scale != (1.0, 1.0) else None, shear=shear or None,
                interpolation=v2.InterpolationMode.BILINEAR, fill=255,
            )], p=p))
        if brightness or contrast or saturation or hue:
            ops.append(v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, hue)], p=p))
        if grayscale_prob:
            ops.append(v2.RandomGrayscale(p=grayscale_prob))
        if blur_prob:
            ops.append(v2.RandomApply([v2.GaussianBlur(kernel_size=3, sigma=(0.1, 1.0))], p=blur_prob))
        if noise_std or erase_prob:
            ops.append(v2.ToDtype(torch.float32, scale=True))
            if noise_std:
                ops.append(v2.RandomApply([v2.GaussianNoise(mean=0.0, sigma=noise_std, clip=True)], p=p))
            if erase_prob:
                ops.append(v2.RandomErasing(p=erase_prob, scale=(0.01, 0.04), ratio=(0.3, 3.3), value=1.0))
            ops.append(v2.ToDtype(torch.uint8, scale=True))
        self.transforms = v2.Compose(ops) if ops else None

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = to_chw_uint8(image)
        return self.transforms(image) if self.transforms is not None else image


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


class BatchAugment(torch.nn.Module):
    """The same augmentations as ``TrainPreset``, on a whole (B, C, H, W) float batch in [0, 1],
    with independent random parameters per sample. On grayscale batches (C = 1) saturation,
    hue and grayscale conversion have nothing to change and are skipped.

    Per-sample torchvision transforms cost about 2 ms an image on this project's
    reference CPU, as much as a training step itself; vectorized over the batch
    they cost a few percent of it, and they run on the accelerator when there is one.
    """

    def __init__(self, *, rotation: float = 0.0, translate: Sequence[float] = (0.0, 0.0),
                 scale: Sequence[float] = (1.0, 1.0), shear: float = 0.0, brightness: float = 0.0,
                 contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0, noise_std: float = 0.0,
                 blur_prob: float = 0.0, erase_prob: float = 0.0, grayscale_prob: float = 0.0, p: float = 1.0,
                 strength: float = 1.0):
        super().__init__()
        (rotation, translate, scale, shear, brightness, contrast, saturation, hue, noise_std, blur_prob, erase_prob,
         grayscale_prob) = scaled_strengths(
            strength, rotation=rotation, translate=translate, scale=scale, shear=shear, brightness=brightness,
            contrast=contrast, saturation=saturation, hue=hue, noise_std=noise_std, blur_prob=blur_prob,
            erase_prob=erase_prob, grayscale_prob=grayscale_prob).values()
        self.rotation, self.shear = float(rotation), float(shear)
        self.translate, self.scale = tuple(float(v) for v in translate), tuple(float(v) for v in scale)
        self.brightness, self.contrast, self.saturation, self.hue = map(float, (brightness, contrast, saturation, hue))
        self.noise_std, self.blur_prob, self.erase_prob = float(noise_std), float(blur_prob), float(erase_prob)
        self.grayscale_prob, self.p = float(grayscale_prob), float(p)

    def _uniform(self, n: int, low: float, high: float, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(n, device=like.device, dtype=like.dtype).uniform_(low, high)

    def _apply_mask(self, n: int, prob: float, like: torch.Tensor) -> torch.Tensor:
        return (torch.rand(n, device=like.device) < prob).to(like.dtype).view(n, 1, 1, 1)

    def _affine(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        angle = self._uniform(b, -self.rotation, self.rotation, x).deg2rad()
        shear = self._uniform(b, -self.shear, self.shear, x).deg2rad()
        scale = self._uniform(b, self.scale[0], self.scale[1], x)
        tx = self._uniform(b, -self.translate[0], self.translate[0], x) * 2
        ty = self._uniform(b, -self.translate[1], self.translate[1], x) * 2
        keep = (torch.rand(b, device=x.device) >= self.p)
        angle, shear, tx, ty = (v.masked_fill(keep, 0.0) for v in (angle, shear, tx, ty))
        scale = scale.masked_fill(keep, 1.0)
        # Forward map in pixel units: rotate and shear, then scale; grid_sample needs its inverse
        # in normalized coordinates, where x and y have different pixel scales.
        cos, sin, tan = angle.cos(), angle.sin(), shear.tan()
        a = torch.stack([torch.stack([cos, -sin + cos * tan], -1), torch.stack([sin, cos + sin * tan], -1)], -2)
        a = a * scale.view(b, 1, 1)
        pix = torch.tensor([w / 2, h / 2], device=x.device, dtype=x.dtype)
        a_norm = a * pix.view(1, 1, 2).reciprocal().transpose(1, 2) * pix.view(1, 1, 2)  # S^-1 A S
        inv = torch.linalg.inv(a_norm)
        shift = torch.stack([tx, ty], -1).unsqueeze(-1)
        theta = torch.cat([inv, -inv @ shift], dim=2)
        grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, channels = x.shape[:2]
        if self.rotation or self.shear or any(self.translate) or self.scale != (1.0, 1.0):
            x = self._affine(x)
        color = channels == 3
        gray_weights = (torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1) if color
                        else torch.ones(1, 1, 1, 1, device=x.device, dtype=x.dtype))
        if self.brightness:
            factor = self._uniform(b, max(0.0, 1 - self.brightness), 1 + self.brightness, x).view(b, 1, 1, 1)
            mask = self._apply_mask(b, self.p, x)
            x = x * (1 + mask * (factor - 1))
        if self.contrast:
            factor = self._uniform(b, max(0.0, 1 - self.contrast), 1 + self.contrast, x).view(b, 1, 1, 1)
            mask = self._apply_mask(b, self.p, x)
            mean = (x * gray_weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
            x = x + mask * (factor - 1) * (x - mean)
        if self.saturation and color:
            factor = self._uniform(b, max(0.0, 1 - self.saturation), 1 + self.saturation, x).view(b, 1, 1, 1)
            mask = self._apply_mask(b, self.p, x)
            gray = (x * gray_weights).sum(1, keepdim=True)
            x = x + mask * (factor - 1) * (x - gray)
        if self.hue and color:
            theta = self._uniform(b, -self.hue, self.hue, x) * 2 * torch.pi
            theta = theta * self._apply_mask(b, self.p, x).view(b)
            cos, sin = theta.cos(), theta.sin()
            zeros, ones = torch.zeros_like(cos), torch.ones_like(cos)
            rot = torch.stack([torch.stack([ones, zeros, zeros], -1), torch.stack([zeros, cos, -sin], -1),
                               torch.stack([zeros, sin, cos], -1)], -2)
            yiq = _RGB_TO_YIQ.to(x)
            mix = torch.linalg.inv(yiq) @ rot @ yiq
            x = torch.einsum("bij,bjhw->bihw", mix, x)
        if self.grayscale_prob and color:
            mask = self._apply_mask(b, self.grayscale_prob, x)
            x = x + mask * ((x * gray_weights).sum(1, keepdim=True) - x)
        if self.blur_prob:
            kernel = torch.tensor([0.25, 0.5, 0.25], device=x.device, dtype=x.dtype)
            kernel = (kernel[:, None] * kernel[None, :]).expand(channels, 1, 3, 3)
            blurred = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), kernel,
                                                 groups=channels)
            mask = self._apply_mask(b, self.blur_prob, x)
            x = x + mask * (blurred - x)
        x = x.clamp(0, 1)
        if self.noise_std:
            sigma = self._uniform(b, 0, self.noise_std, x).view(b, 1, 1, 1) * self._apply_mask(b, self.p, x)
            x = (x + torch.randn_like(x) * sigma).clamp(0, 1)
        if self.erase_prob:
            h, w = x.shape[-2:]
            eh = (self._uniform(b, 0.1, 0.3, x) * h).long().clamp(min=1)
            ew = (self._uniform(b, 0.02, 0.08, x) * w).long().clamp(min=1)
            y0 = (torch.rand(b, device=x.device) * (h - eh)).long()
            x0 = (torch.rand(b, device=x.device) * (w - ew)).long()
            rows = torch.arange(h, device=x.device).view(1, h, 1)
            cols = torch.arange(w, device=x.device).view(1, 1, w)
            box = ((rows >= y0.view(b, 1, 1)) & (rows < (y0 + eh).view(b, 1, 1)) & (cols >= x0.view(b, 1, 1))
                   & (cols < (x0 + ew).view(b, 1, 1)))
            box = box & (torch.rand(b, device=x.device) < self.erase_prob).view(b, 1, 1)
            x = x.masked_fill(box.unsqueeze(1), 1.0)
        return x
