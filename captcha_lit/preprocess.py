"""Image files: finding them in a folder, decoding and resizing; shared by training, eval,
predict, export, serve and labeling.

This module needs only Pillow and numpy, so the torch-free runtime uses the very
same code path that produced the training data.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

# The files that folders of CAPTCHAs (training data, predict inputs) are read from.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

# Refuse decompression bombs well before Pillow's own (much larger) limit.
MAX_IMAGE_PIXELS = 4096 * 4096
_EXIF_ORIENTATION = 0x0112


class ImageDecodeError(ValueError):
    """The input is not a readable image."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode -> RGB; transparency is composited on white, 16-bit is scaled to 8-bit."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 if array.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(source: ImageInput, *, name: str | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode ``source`` (path, bytes, PIL image or HxWxC uint8 array) to an RGB image.

    Raises ImageDecodeError naming the input for empty, non-image, truncated or
    oversized data.
    """
    if isinstance(source, Image.Image):
        image = source
        label = name or "image"
    elif isinstance(source, np.ndarray):
        label = name or "array"
        if source.dtype != np.uint8 or source.ndim not in (2, 3):
            raise ImageDecodeError(f"{label}: expected a HxW or HxWxC uint8 array, got {source.dtype} {source.shape}")
        image = Image.fromarray(source)
    else:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            label = name or "image bytes"
        else:
            if not str(source).strip():
                raise ImageDecodeError(f"{name or 'image path'}: is empty; pass a file path, image bytes or a PIL image")
            path = Path(source)
            label = name or str(path)
            try:
                if path.exists() and not path.is_dir() and not path.is_file():  # a FIFO or device: reading may block
                    raise ImageDecodeError(f"{label}: is not a regular file")
                data = path.read_bytes()
            except FileNotFoundError:
                raise ImageDecodeError(f"{label}: file not found") from None
            except IsADirectoryError:
                raise ImageDecodeError(f"{label}: is a directory, not an image file") from None
            except OSError as exc:
                raise ImageDecodeError(f"{label}: cannot read file ({exc.strerror})") from None
        if not data:
            raise ImageDecodeError(f"{label}: is empty (0 bytes)")
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"{label}: {width}x{height} pixels exceeds the limit of {max_pixels} pixels"
                )
            image.load()
        except ImageDecodeError:
            raise
        except UnidentifiedImageError:
            raise ImageDecodeError(f"{label}: not a recognized image format") from None
        except Image.DecompressionBombError:
            raise ImageDecodeError(f"{label}: too many pixels (decompression bomb)") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageDecodeError(f"{label}: corrupt or truncated image ({exc})") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageDecodeError(f"{label}: has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageDecodeError(f"{label}: {width}x{height} pixels exceeds the limit of {max_pixels} pixels")
    # A camera or an editor may store the image sideways with an EXIF orientation tag, in any
    # format that carries EXIF (JPEG, PNG, WebP, TIFF); the reader sees it upright.
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    return _to_rgb(image)


def probe_pixels(data: bytes) -> int:
    """Width x height that encoded ``data`` declares, read from its header without decoding it;
    0 when it is not a readable image (decoding then names the problem)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:  # noqa: BLE001 - any failure here is reported by the decode that follows
        return 0
    return int(width) * int(height)


def resize_to_input(image: Image.Image, input_size: tuple[int, int], channels: int = 3) -> np.ndarray:
    """RGB image -> (H, W, channels) uint8 array at the model's ``input_size`` = (height, width).

    ``channels=1`` converts to grayscale (Pillow's ITU-R 601-2 luma) before resizing."""
    height, width = int(input_size[0]), int(input_size[1])
    if channels == 1:
        image = image.convert("L")
    elif channels != 3:
        raise ValueError(f"channels={channels}: use 3 (RGB) or 1 (grayscale)")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=None)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if channels == 1 else array


def load_input(source: ImageInput, input_size: tuple[int, int], *, channels: int = 3,
               name: str | None = None) -> np.ndarray:
    """Decode and resize: the one preprocessing step before normalization."""
    return resize_to_input(open_image(source, name=name), input_size, channels)


def scan_images(root: Path, extensions: Sequence[str] = IMAGE_SUFFIXES) -> list[str]:
    """Relative POSIX paths of the image files under ``root`` (hidden ones skipped), sorted."""
    wanted = {e.lower() for e in extensions}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in wanted:
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


def normalize(batch_hwc: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, C, H, W) float32, scaled to [0, 1] then normalized (C = len(mean))."""
    # (x / 255 - mean) / std is x * scale + shift: one multiply and one add straight into the output
    # layout, instead of three passes over float copies, before every batch the runtime solves.
    std = np.asarray(std, dtype=np.float32)
    scale = (np.float32(1.0 / 255.0) / std).reshape(1, -1, 1, 1)
    shift = (-np.asarray(mean, dtype=np.float32) / std).reshape(1, -1, 1, 1)
    out = np.empty((batch_hwc.shape[0], batch_hwc.shape[3], *batch_hwc.shape[1:3]), dtype=np.float32)
    np.multiply(batch_hwc.transpose(0, 3, 1, 2), scale, out=out, casting="unsafe")
    out += shift
    return out
