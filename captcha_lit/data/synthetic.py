"""Reproducible CAPTCHA generation with the ``captcha`` package, in parallel.

``captcha.image`` draws every random number from the ``secrets`` module, which
cannot be seeded. We swap the module reference that ``captcha.image`` holds for an
object with the same three functions backed by ``random.Random``, seeded per image
from ``(seed, split, index)``. Image ``i`` therefore depends only on its own seed,
not on which worker drew it or in what order, and the same seed gives
byte-identical images on every run and any number of workers.

This module does not import torch.
"""

from __future__ import annotations

import contextlib
import glob
import os
import random
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from captcha_lit.charset import Charset
from captcha_lit.preprocess import resize_to_input
from captcha_lit.utils import available_cores


class _SeededSecrets:
    """The subset of ``secrets`` that ``captcha.image`` calls, driven by a seeded RNG."""

    def __init__(self, rng: random.Random):
        self._rng = rng

    def randbelow(self, n: int) -> int:
        return self._rng.randrange(n)

    def randbits(self, k: int) -> int:
        return self._rng.getrandbits(k)

    def choice(self, seq):
        return self._rng.choice(seq)


@contextlib.contextmanager
def _seeded_captcha(rng: random.Random) -> Iterator[None]:
    import captcha.image as captcha_image

    original = captcha_image.secrets
    captcha_image.secrets = _SeededSecrets(rng)
    try:
        yield
    finally:
        captcha_image.secrets = original


def resolve_fonts(fonts: Sequence[str] | str | None) -> list[str] | None:
    """Font spec -> list of TTF/OTF files; ``None`` keeps the package's own font.

    Each entry may be a file, a directory (all .ttf/.otf inside) or a glob, and the
    special name ``dejavu`` selects the DejaVu fonts that matplotlib ships.
    """
    if fonts is None or fonts == "default" or fonts == []:
        return None
    if isinstance(fonts, str):
        fonts = [fonts]
    files: list[str] = []
    for spec in fonts:
        spec = os.path.expanduser(str(spec))
        if spec == "default":
            import captcha.image

            files.extend(captcha.image.DEFAULT_FONTS)
        elif spec == "dejavu":
            try:
                import matplotlib
            except ImportError:
                raise ValueError("data.fonts 'dejavu' needs matplotlib, which ships the DejaVu fonts") from None
            folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
            # DejaVuSansDisplay holds only a few symbols, no letters or digits.
            files.extend(sorted(str(p) for p in folder.glob("DejaVuSans*.ttf") if "Display" not in p.name))
        elif os.path.isdir(spec):
            found = sorted(str(p) for p in Path(spec).iterdir() if p.suffix.lower() in (".ttf", ".otf"))
            if not found:
                raise ValueError(f"data.fonts: folder {spec!r} has no .ttf or .otf files")
            files.extend(found)
        elif os.path.isfile(spec):
            files.append(spec)
        else:
            found = sorted(glob.glob(spec))
            if not found:
                raise ValueError(f"data.fonts: {spec!r} is not a font file, folder or glob that matches anything")
            files.extend(found)
    return files


def missing_glyphs(font: str, chars: str) -> str:
    """The characters of ``chars`` that ``font`` draws as nothing or as its missing-glyph box."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        face = ImageFont.truetype(font, 32)
    except OSError as exc:
        raise ValueError(f"data.fonts: cannot load font {font!r} ({exc})") from None

    def draw(text: str) -> bytes:
        canvas = Image.new("L", (64, 64))
        ImageDraw.Draw(canvas).text((8, 8), text, font=face, fill=255)
        return canvas.tobytes()

    blank, notdef = bytes(64 * 64), draw("\uffff")  # U+FFFF is never a character
    return "".join(c for c in chars if draw(c) in (blank, notdef))


@dataclass(frozen=True)
class GeneratorSpec:
    """Everything that determines the generated images: also the cache key."""

    charset: str = "0-9A-Z"
    min_length: int = 5
    max_length: int = 5
    width: int = 160
    height: int = 60
    input_size: tuple[int, int] | None = None  # (height, width) the images are resized to; None: the canvas
    channels: int = 3  # 3: RGB, 1: grayscale
    fonts: tuple[str, ...] | None = None
    font_sizes: tuple[int, ...] | None = None
    # Sampling weight of each charset character in the drawn texts; None: uniform.
    char_weights: tuple[float, ...] | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.input_size is None:
            object.__setattr__(self, "input_size", (self.height, self.width))
        if self.min_length < 1:
            raise ValueError(f"data.min_length={self.min_length}: CAPTCHA length must be at least 1")
        if self.max_length < self.min_length:
            raise ValueError(
                f"data.max_length={self.max_length} is less than data.min_length={self.min_length}"
            )
        if self.channels not in (1, 3):
            raise ValueError(f"channels={self.channels}: use 3 (RGB) or 1 (grayscale)")
        if self.width < 8 or self.height < 8:
            raise ValueError(f"data.width x data.height = {self.width}x{self.height} is too small; use at least 8x8")
        chars = Charset(self.charset).chars  # validates
        if self.char_weights is not None:
            if len(self.char_weights) != len(chars) or min(self.char_weights) < 0 or sum(self.char_weights) <= 0:
                raise ValueError(f"char_weights needs one non-negative weight per character of {chars!r}, "
                                 f"not all zero; got {list(self.char_weights)}")
        for font in self.fonts or ():
            missing = missing_glyphs(font, chars)
            if missing:
                raise ValueError(
                    f"data.fonts: font {font!r} cannot draw {missing!r} of charset {chars!r}; "
                    "leave it out or choose a charset it covers"
                )

    def key_fields(self) -> dict:
        return {
            "charset": Charset(self.charset).chars,
            "min_length": self.min_length,
            "max_length": self.max_length,
            "width": self.width,
            "height": self.height,
            "input_size": list(self.input_size),
            "channels": self.channels,
            "fonts": [_font_identity(f) for f in self.fonts] if self.fonts else None,
            "font_sizes": list(self.font_sizes) if self.font_sizes else None,
            "char_weights": [float(w) for w in self.char_weights] if self.char_weights is not None else None,
        }


def _font_identity(path: str) -> str:
    """A font is identified by its file name and size, so moving a venv keeps the cache."""
    try:
        return f"{os.path.basename(path)}:{os.path.getsize(path)}"
    except OSError:
        return os.path.basename(path)


class CaptchaGenerator:
    """Draws (text, image) pairs, each determined by ``(seed, split, index)``."""

    def __init__(self, spec: GeneratorSpec):
        from captcha_lit.data.drawing import image_captcha_class

        self.spec = spec
        self.charset = Charset(spec.charset)
        self._captcha = image_captcha_class()(
            width=spec.width,
            height=spec.height,
            fonts=list(spec.fonts) if spec.fonts else None,
            font_sizes=tuple(spec.font_sizes) if spec.font_sizes else None,
        )

    def sample(self, seed: int | str, split: str, index: int) -> tuple[str, np.ndarray]:
        rng = random.Random(f"captcha_lit:{seed}:{split}:{index}")
        length = rng.randint(self.spec.min_length, self.spec.max_length)
        if self.spec.char_weights is None:
            text = "".join(rng.choice(self.charset.chars) for _ in range(length))
        else:
            text = "".join(rng.choices(self.charset.chars, weights=self.spec.char_weights, k=length))
        with _seeded_captcha(rng):
            image = self._captcha.generate_image(text)
        return text, resize_to_input(image, self.spec.input_size, self.spec.channels)


_worker_generator: CaptchaGenerator | None = None


_worker_out: np.ndarray | None = None


def _init_worker(spec: GeneratorSpec, shared_out: np.ndarray | None = None) -> None:
    global _worker_generator, _worker_out
    _worker_generator = CaptchaGenerator(spec)
    _worker_out = shared_out


def _generate_chunk(args: tuple[int | str, str, int, int]) -> tuple[int, list[str], np.ndarray | None]:
    """Draw images ``start..stop``; write them into the shared output when there is one,
    else return them (pickling a chunk back costs the parent a copy)."""
    seed, split, start, stop = args
    assert _worker_generator is not None
    texts, images = [], []
    for index in range(start, stop):
        text, image = _worker_generator.sample(seed, split, index)
        texts.append(text)
        if _worker_out is not None:
            _worker_out[index] = image
        else:
            images.append(image)
    return start, texts, (None if _worker_out is not None else np.stack(images))


def _shared_array(shape: tuple[int, ...]) -> np.ndarray:
    """A uint8 array in anonymous shared memory, which forked workers write into directly."""
    import mmap

    size = int(np.prod(shape))
    return np.frombuffer(mmap.mmap(-1, max(size, 1)), dtype=np.uint8, count=size).reshape(shape)


def _pool_context():
    """fork where available: workers start in milliseconds. They only run Pillow code, so
    the parent's torch/OpenMP state, which makes fork unsafe for torch work, does not matter.
    spawn would re-import the entry point (torch, Lightning) in every worker, ~9 s each."""
    import multiprocessing

    return get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def _is_shared(array: np.ndarray) -> bool:
    import mmap

    base = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return isinstance(base, mmap.mmap)


def generate(
    spec: GeneratorSpec,
    seed: int | str,
    split: str,
    count: int,
    *,
    workers: int | None = None,
    out: np.ndarray | None = None,
    chunk_size: int = 256,
    progress: bool = False,
) -> tuple[list[str], np.ndarray]:
    """Generate ``count`` images -> (texts, uint8 array of shape (count, H, W, C), C = ``spec.channels``).

    ``out`` may be a preallocated (e.g. memory-mapped) array to fill in place.
    """
    height, width = spec.input_size
    workers = available_cores() if workers is None else max(1, int(workers))
    chunks = [(seed, split, s, min(s + chunk_size, count)) for s in range(0, count, chunk_size)]
    parallel = workers > 1 and len(chunks) > 1
    forked = parallel and _pool_context().get_start_method() == "fork"
    if out is None:
        shape = (count, height, width, spec.channels)
        out = _shared_array(shape) if forked else np.empty(shape, dtype=np.uint8)
    # Forked workers share file-backed memmaps and our shared arrays, so they write in place.
    shared_out = out if forked and (isinstance(out, np.memmap) or _is_shared(out)) else None
    texts: list[str] = [""] * count
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=count, desc=f"generating {split}", unit="img", leave=False)
        except ImportError:
            pass
    if not parallel:
        _init_worker(spec)
        results: Iterator = map(_generate_chunk, chunks)
        pool = None
    else:
        pool = ProcessPoolExecutor(workers, mp_context=_pool_context(), initializer=_init_worker,
                                   initargs=(spec, shared_out))
        results = pool.map(_generate_chunk, chunks)
    try:
        for start, chunk_texts, chunk_images in results:
            if chunk_images is not None:
                out[start : start + len(chunk_texts)] = chunk_images
            texts[start : start + len(chunk_texts)] = chunk_texts
            if bar is not None:
                bar.update(len(chunk_texts))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()
    return texts, out
