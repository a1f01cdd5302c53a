"""The ``captcha`` package's ImageCaptcha, byte for byte, with the work it throws away skipped.

Generation is the biggest cost of a training run outside the training steps, and much of
``ImageCaptcha`` draws what never reaches the image:

- half of the characters are preceded by a space, which is drawn, cropped, rotated, resized
  and warped as a fully transparent image, then pasted through an all-zero mask: only its
  size and the random numbers it draws matter;
- every character's text box is measured again, though it depends only on font and character;
- every paste mask goes through ``Image.point`` with a Python list of 256 entries, which Pillow
  rounds entry by entry on every call.

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


class FastImageCaptcha(package.ImageCaptcha):
    """ImageCaptcha's images from the same random numbers, without the work they do not show."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._text_boxes: dict[tuple[int, str], tuple[float, float]] = {}
        # Pillow's own point() of the package's table, applied once to every gray level.
        ramp = Image.frombytes("L", (256, 1), bytes(range(256)))
        self._mask_table = np.asarray(ramp.point(self.lookup_table), dtype=np.uint8)[0]

    def _text_box(self, c: str, draw: ImageDraw.ImageDraw, font) -> tuple[float, float]:
        key = (id(font), c)
        box = self._text_boxes.get(key)
        if box is None:
            _, _, w, h = draw.multiline_textbbox((1, 1), c, font=font)
            box = self._text_boxes[key] = (w, h)
        return box

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
            im = Image.new("RGBA", (int(w) + dx1, int(h) + dy1))
            ImageDraw.Draw(im).text((dx1, dy1), c, font=font, fill=color)
            im = im.crop(im.getbbox())
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
            image = image.resize((width, self._height))
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
