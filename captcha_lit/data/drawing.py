"""The ``captcha`` package's ImageCaptcha, byte for byte, with the work it throws away skipped.

Generation is the biggest cost of a training run outside the training steps, and much of
``ImageCaptcha`` draws what never reaches the image:

- half of the characters are preceded by a space, which is drawn, cropped, rotated, resized
  and warped as a fully transparent image, then pasted through an all-zero mask: only its
  size and the random numbers it draws matter;
- every character's text box is measured again, though it depends only on font and character;
- every paste mask goes through ``Image.point`` with a Python list of 256 entries, which Pillow
  rounds entry by entry on every call;
- every character is rendered by FreeType again, though its coverage depends only on font,
  character and offset: only the text color changes, and Pillow lays it over the coverage by a
  fixed rule (:func:`_colored_glyph`);
- the canvas is widened by resampling an image of one color, which gives that color again.

:class:`FastImageCaptcha` draws the same random numbers in the same order and does the rest
once, so its images equal the package's exactly (``tests/data/test_drawing.py`` checks this on
every call path). It follows the drawing of the ``captcha`` versions in :data:`VERIFIED_VERSIONS`;
any other version gets the package's own class.

This module does not import torch; the generator imports it only when it draws.
"""

from __future__ import annotations

from importlib import metadata

import captcha.image as package
import numpy as np
from PIL import Image, ImageDraw

# captcha releases whose ImageCaptcha this module reproduces exactly.
VERIFIED_VERSIONS = ("0.7.1",)

# Coverages kept per drawer (one per font and size, character and offset, a few KB each): the default
# scheme needs 3,780; a large alphabet in many fonts renders the rest each time instead of growing.
MAX_CACHED_COVERAGES = 20_000


def _captcha_version() -> str:
    try:
        return metadata.version("captcha")
    except metadata.PackageNotFoundError:
        return ""


def image_captcha_class() -> type[package.ImageCaptcha]:
    """The class to draw with: the fast one where the installed ``captcha`` is verified."""
    return FastImageCaptcha if _captcha_version() in VERIFIED_VERSIONS else package.ImageCaptcha


def _unit(secrets) -> float:
    """The package's uniform draw in [0, 1)."""
    return secrets.randbits(32) / (2**32)


def _div255(x: np.ndarray) -> np.ndarray:
    """Pillow's rounded division by 255 of a product of two 8-bit values."""
    x = x + 128
    return (x + (x >> 8)) >> 8


def _colored_glyph(coverage: np.ndarray, color) -> Image.Image:
    """Text of ``coverage`` (uint8 FreeType coverage) in ``color``, cropped to its alpha.

    Pillow draws text onto a transparent RGBA image as the color itself wherever coverage is
    non-zero, with alpha = opacity x coverage / 255, and leaves other pixels (0, 0, 0, 0).
    :class:`FastImageCaptcha` checks this rule against Pillow's own drawing before it relies on it.
    """
    opacity = color[3] if len(color) == 4 else 255
    alpha = _div255(coverage.astype(np.uint16) * opacity).astype(np.uint8)
    rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
    if rows.size:  # crop to the alpha's bounding box, as Image.crop(Image.getbbox()) does
        box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        alpha, coverage = alpha[box], coverage[box]
    rgba = np.zeros((*alpha.shape, 4), dtype=np.uint8)
    rgba[coverage > 0, :3] = color[:3]  # also where a faint color's alpha rounds to 0
    rgba[..., 3] = alpha
    return Image.fromarray(rgba, "RGBA")


class FastImageCaptcha(package.ImageCaptcha):
    """ImageCaptcha's images from the same random numbers, without the work they do not show."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._text_boxes: dict[tuple[int, str], tuple[float, float]] = {}
        # Pillow's own point() of the package's table, applied once to every gray level.
        ramp = Image.frombytes("L", (256, 1), bytes(range(256)))
        self._mask_table = np.asarray(ramp.point(self.lookup_table), dtype=np.uint8)[0]
        self._coverages: dict[tuple[int, str, int, int], np.ndarray] = {}
        self._cached_text: bool | None = None  # decided on first use, once the fonts are loaded

    def _text_box(self, c: str, draw: ImageDraw.ImageDraw, font) -> tuple[float, float]:
        key = (id(font), c)
        box = self._text_boxes.get(key)
        if box is None:
            _, _, w, h = draw.multiline_textbbox((1, 1), c, font=font)
            box = self._text_boxes[key] = (w, h)
        return box

    def _text_image(self, c: str, font, size: tuple[int, int], offset: tuple[int, int], color) -> Image.Image:
        """The package's ``Image.new`` + ``Draw.text`` + ``crop(getbbox())`` of one character."""
        if self._cached_text is None:
            self._cached_text = self._coverage_rule_holds()
        if not self._cached_text:
            return self._pillow_text_image(c, font, size, offset, color)
        key = (id(font), c, *offset)
        coverage = self._coverages.get(key)
        if coverage is None:
            coverage = self._coverage(c, font, size, offset)
            if len(self._coverages) < MAX_CACHED_COVERAGES:
                self._coverages[key] = coverage
        return _colored_glyph(coverage, color)

    @staticmethod
    def _pillow_text_image(c: str, font, size, offset, color) -> Image.Image:
        im = Image.new("RGBA", size)
        ImageDraw.Draw(im).text(offset, c, font=font, fill=color)
        return im.crop(im.getbbox())

    @staticmethod
    def _coverage(c: str, font, size, offset) -> np.ndarray:
        """FreeType's coverage of one character: the alpha of opaque white text, uncropped."""
        im = Image.new("RGBA", size)
        ImageDraw.Draw(im).text(offset, c, font=font, fill=(255, 255, 255, 255))
        return np.asarray(im.getchannel("A"))

    def _coverage_rule_holds(self) -> bool:
        """Whether this Pillow draws text as :func:`_colored_glyph` assumes, on a few probes."""
        font = self.truefonts[0]
        for c, color in (("W", (10, 20, 200, 220)), ("8", (199, 100, 37, 255)), ("g", (57, 88, 123, 1))):
            _, _, w, h = ImageDraw.Draw(Image.new("RGB", (1, 1))).multiline_textbbox((1, 1), c, font=font)
            size, offset = (int(w) + 2, int(h) + 3), (2, 3)
            expected = self._pillow_text_image(c, font, size, offset, color)
            if _colored_glyph(self._coverage(c, font, size, offset), color).tobytes() != expected.tobytes():
                return False
        return True

    def _draw_character(self, c: str, draw: ImageDraw.ImageDraw, color) -> Image.Image:
        # ``secrets`` is looked up on every call: captcha_lit swaps the package's reference
        # for a seeded one while it draws.
        secrets = package.secrets
        font = secrets.choice(self.truefonts)
        w, h = self._text_box(c, draw, font)
        low_dx, high_dx = self.character_offset_dx
        low_dy, high_dy = self.character_offset_dy
        dx1 = secrets.randbelow(high_dx - low_dx + 1) + low_dx
        dy1 = secrets.randbelow(high_dy - low_dy + 1) + low_dy
        blank = c.isspace()
        if not blank:
            im = self._text_image(c, font, (int(w) + dx1, int(h) + dy1), (dx1, dy1), color)
        low_angle, high_angle = self.character_rotate
        angle = low_angle + _unit(secrets) * (high_angle - low_angle)
        if not blank:
            im = im.rotate(angle, Image.Resampling.BILINEAR, expand=True)
        low_wx, high_wx = self.character_warp_dx
        low_wy, high_wy = self.character_warp_dy
        dx2 = w * _unit(secrets) * (high_wx - low_wx) + low_wx
        dy2 = h * _unit(secrets) * (high_wy - low_wy) + low_wy
        x1 = int(_unit(secrets) * (dx2 - (-dx2)) + (-dx2))
        y1 = int(_unit(secrets) * (dy2 - (-dy2)) + (-dy2))
        x2 = int(_unit(secrets) * (dx2 - (-dx2)) + (-dx2))
        y2 = int(_unit(secrets) * (dy2 - (-dy2)) + (-dy2))
        if blank:
            im = Image.new("RGBA", (int(w), int(h)))
            im.info["blank"] = True
            return im
        w2 = w + abs(x1) + abs(x2)
        h2 = h + abs(y1) + abs(y2)
        quad = (x1, y1, -x1, h2 - y2, w2 + x2, h2 + y2, w2 - x2, -y1)
        im = im.resize((w2, h2))
        return im.transform((int(w), int(h)), Image.Transform.QUAD, quad)

    def create_captcha_image(self, chars: str, color, background) -> Image.Image:
        secrets = package.secrets
        image = Image.new("RGB", (self._width, self._height), background)
        draw = ImageDraw.Draw(image)
        glyphs: list[Image.Image] = []
        for c in chars:
            if _unit(secrets) > self.word_space_probability:
                glyphs.append(self._draw_character(" ", draw, color))
            glyphs.append(self._draw_character(c, draw, color))

        text_width = sum(glyph.size[0] for glyph in glyphs)
        width = max(text_width, self._width)
        if width != self._width:
            image = Image.new("RGB", (width, self._height), background)
        average = int(text_width / len(chars))
        jitter = int(self.word_offset_dx * average)
        offset = int(average * 0.1)
        for glyph in glyphs:
            w, h = glyph.size
            if not glyph.info.get("blank"):
                mask = Image.fromarray(self._mask_table[np.asarray(glyph.convert("L"))])
                image.paste(glyph, (offset, int((self._height - h) / 2)), mask)
            offset = offset + w + (-secrets.randbelow(jitter + 1))
        if width > self._width:
            image = image.resize((self._width, self._height))
        return image
