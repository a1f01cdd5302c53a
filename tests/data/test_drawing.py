import random

import pytest
from captcha.image import ImageCaptcha

from captcha_lit.data import drawing
from captcha_lit.data.drawing import FastImageCaptcha, image_captcha_class
from captcha_lit.data.synthetic import _seeded_captcha, resolve_fonts


def _draw(captcha: ImageCaptcha, text: str, seed: int) -> bytes:
    with _seeded_captcha(random.Random(seed)):
        return captcha.generate_image(text).tobytes()


@pytest.mark.parametrize(("fonts", "font_sizes", "size"), [
    (None, None, (160, 60)),                        # the default scheme
    ("dejavu", (30, 40), (200, 50)),                # several fonts and sizes, a wider canvas
    (None, (20,), (100, 30)),                       # text wider than the canvas: the image is squeezed
])
def test_fast_drawing_equals_the_package_byte_for_byte(fonts, font_sizes, size):
    kwargs = dict(width=size[0], height=size[1], fonts=resolve_fonts(fonts), font_sizes=font_sizes)
    package, fast = ImageCaptcha(**kwargs), FastImageCaptcha(**kwargs)
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcxyz"
    for seed in range(60):
        rng = random.Random(-seed)
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
        assert _draw(fast, text, seed) == _draw(package, text, seed), (text, seed)
    assert fast._cached_text  # the pinned Pillow draws text as the cached coverage assumes


def test_a_pillow_that_draws_text_otherwise_renders_every_character(monkeypatch):
    monkeypatch.setattr(FastImageCaptcha, "_coverage_rule_holds", lambda self: False)
    package, fast = ImageCaptcha(), FastImageCaptcha()
    for seed in range(10):
        assert _draw(fast, "A0O9Z", seed) == _draw(package, "A0O9Z", seed), seed
    assert fast._cached_text is False and not fast._coverages


def test_the_coverage_rule_is_checked_against_pillow_with_faint_colors():
    # Opacity 1 rounds most of a glyph's alpha to 0 while its color stays: the rule must hold there too.
    fast = FastImageCaptcha()
    assert fast._coverage_rule_holds()
    for seed in range(10):
        with _seeded_captcha(random.Random(seed)):
            faint = fast.generate_image("WM8g", fg_color=(57, 88, 123, 1)).tobytes()
        with _seeded_captcha(random.Random(seed)):
            assert ImageCaptcha().generate_image("WM8g", fg_color=(57, 88, 123, 1)).tobytes() == faint


def test_an_unverified_captcha_release_draws_with_the_package(monkeypatch):
    assert image_captcha_class() is FastImageCaptcha  # the pinned release is verified
    monkeypatch.setattr(drawing, "_captcha_version", lambda: "0.9.0")
    assert image_captcha_class() is ImageCaptcha
