"""How separable are two characters as the ``captcha`` package draws them?

    python docs/studies/ambiguity.py                       # O vs 0, isolated, 120,000 characters, 5 epochs
    python docs/studies/ambiguity.py --squeeze --width 96  # as inside a whole CAPTCHA at input width 96
    python docs/studies/ambiguity.py --pair 1I --train 40000 --epochs 3
    python docs/studies/ambiguity.py --context --train 25000,50000,100000  # inside whole CAPTCHAs

A security auditor's question before blaming a model: is a confusion in the scheme or in the
solver? This trains a small binary classifier on single characters drawn by the package's
own ``_draw_character`` (random font size, rotation and warp, seeded like the datasets).
Its test accuracy is a lower bound on how separable the pair is.

- Default: each character on its own, at half scale (32x32 from the 64x64 drawing).
- ``--squeeze``: each character also squeezed horizontally by a random word width (5
  characters of the package's font sizes, each with the package's 50% chance of a space
  before it), then scaled to ``--width`` out of the 160-pixel canvas and 32 of its 60 rows,
  as the default pipeline sees it inside a whole CAPTCHA.
- ``--context``: each character inside a whole CAPTCHA (``--length`` random characters of
  0-9A-Z, the pair's character at a random position), drawn by ``generate_image`` with noise,
  overlap and squeeze. Each CAPTCHA is drawn twice from the same random state, once with each
  character of the pair. Both characters of a pair have the same text box in the package's font,
  so every other draw and every other pixel is the same, and the pixels that differ locate the
  character exactly. The classifier sees a window of ``CONTEXT_WIDTH`` columns around it at full
  resolution (60 rows): it knows where to look, and sees the neighbours. Both images of a pair
  are examples, with their own label.

``--train`` takes several sizes (``25000,50000``): the largest is drawn once and a fresh
classifier is trained on each prefix. If test accuracy stops rising with more examples, what
is left is near the scheme's own limit for that pair, whatever the solver.

Prints train and test accuracy per epoch and writes them as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from multiprocessing import get_context

import numpy as np

SIDE = 32  # the classifier's input is SIDE x SIDE
CONTEXT_WIDTH = 64  # --context: columns of the 160x60 CAPTCHA around the character
DEFAULT_CHARSET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _draw(args: tuple[str, int, int, bool, int]) -> tuple[np.ndarray, np.ndarray]:
    """``count`` characters of ``pair`` (label = index in the pair), top-left aligned."""
    from captcha.image import ImageCaptcha
    from PIL import Image, ImageDraw

    from captcha_lit.data.synthetic import _seeded_captcha

    pair, seed, count, squeeze, width = args
    rng = random.Random(seed)
    captcha = ImageCaptcha(160, 60)
    sizes = [font.size for font in captcha.truefonts]
    draw = ImageDraw.Draw(Image.new("RGB", (160, 60)))
    images = np.zeros((count, SIDE, SIDE), np.uint8)
    labels = np.zeros(count, np.int64)
    with _seeded_captcha(rng):
        for i in range(count):
            label = rng.randrange(2)
            alpha = captcha._draw_character(pair[label], draw, (0, 0, 0)).getchannel("A")
            if squeeze:
                # A word's characters are ~0.62 font sizes wide; the canvas is squeezed to 160 px.
                word = sum(round(0.62 * rng.choice(sizes)) * (1 + (rng.random() < 0.5)) for _ in range(5))
                sx, sy = min(1.0, 160 / word) * width / 160, SIDE / 60
            else:
                sx = sy = 0.5
            alpha = alpha.resize((max(1, round(alpha.width * sx)), max(1, round(alpha.height * sy))),
                                 Image.BILINEAR)
            array = np.asarray(alpha)[:SIDE, :SIDE]
            images[i, :array.shape[0], :array.shape[1]] = array
            labels[i] = label
    return images, labels


def draw_characters(pair: str, seed: int, count: int, squeeze: bool, width: int, processes: int = 2):
    chunks = [(pair, seed * 1000 + k, count // 8 + (k < count % 8), squeeze, width) for k in range(8)]
    with get_context("spawn").Pool(processes) as pool:
        parts = pool.map(_draw, chunks)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _draw_context(args: tuple[str, int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` CAPTCHAs, each drawn with both characters of ``pair``: 2 * count windows,
    labels, and the number of pixels in which each pair of images differs."""
    from captcha.image import ImageCaptcha

    from captcha_lit.data.synthetic import _seeded_captcha

    pair, seed, count, length = args
    rng = random.Random(seed)
    captcha = ImageCaptcha(160, 60)
    images = np.zeros((2 * count, 60, CONTEXT_WIDTH), np.uint8)
    differing = np.zeros(count, np.int64)
    half = CONTEXT_WIDTH // 2
    for i in range(count):
        text = [rng.choice(DEFAULT_CHARSET) for _ in range(length)]
        position, state = rng.randrange(length), rng.getrandbits(64)
        drawn = []
        for character in pair:
            text[position] = character
            with _seeded_captcha(random.Random(state)):
                image = captcha.generate_image("".join(text)).convert("L")
            drawn.append(np.asarray(image))
        changed = np.abs(drawn[0].astype(np.int16) - drawn[1]) > 0
        differing[i] = changed.sum()
        columns = np.flatnonzero(changed.any(axis=0))
        # Identical images (the character fully covered) are kept: they are part of the scheme.
        centre = (columns[0] + columns[-1]) // 2 if len(columns) else 80
        for label, array in enumerate(drawn):
            padded = np.pad(array, ((0, 0), (half, half)), mode="edge")
            images[2 * i + label] = padded[:, centre:centre + CONTEXT_WIDTH]
    return images, np.tile(np.arange(2), count), differing


def _same_text_box(pair: str) -> bool:
    """Whether the package sizes both characters alike at every font size, so that swapping
    one for the other leaves every other random draw and pixel of a CAPTCHA as it was."""
    from captcha.image import ImageCaptcha
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (160, 60)))
    return all(draw.multiline_textbbox((1, 1), pair[0], font=font) == draw.multiline_textbbox((1, 1), pair[1], font=font)
               for font in ImageCaptcha(160, 60).truefonts)


def draw_in_context(pair: str, seed: int, count: int, length: int = 5, processes: int = 2):
    """``count`` images from ``count // 2`` CAPTCHAs drawn with each character of ``pair``:
    (windows, labels, pixels in which each CAPTCHA's two images differ)."""
    pairs = count // 2
    chunks = [(pair, seed * 1000 + k, pairs // 8 + (k < pairs % 8), length) for k in range(8)]
    with get_context("spawn").Pool(processes) as pool:
        parts = pool.map(_draw_context, chunks)
    return tuple(np.concatenate([p[j] for p in parts]) for j in range(3))


def _classifier():
    import torch.nn as nn

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.MaxPool2d(2))

    return nn.Sequential(block(1, 16), block(16, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(128, 2))


def study(pair: str = "O0", train: tuple[int, ...] = (120_000,), test: int = 20_000, epochs: int = 5,
          squeeze: bool = False, width: int = 96, context: bool = False, length: int = 5, batch: int = 128,
          lr: float = 2e-3, seed: int = 0) -> dict:
    import torch
    import torch.nn.functional as F

    if len(pair) != 2 or pair[0] == pair[1]:
        raise ValueError(f"--pair {pair!r}: give two different characters, e.g. O0")
    if not train or min(train) < batch or test < 2 or epochs < 1:
        raise ValueError(f"--train {','.join(map(str, train))} (each >= --batch {batch}), --test {test} (>= 2) "
                         f"and --epochs {epochs} must be positive")
    if context and (set(pair) - set(DEFAULT_CHARSET) or length < 1):
        raise ValueError(f"--context draws from {DEFAULT_CHARSET}: --pair {pair!r} must come from it and "
                         f"--length {length} must be >= 1")
    if context and not _same_text_box(pair):
        raise ValueError(f"--context --pair {pair!r}: the package's font gives the two characters different text "
                         "boxes, so swapping them moves the rest of the CAPTCHA; pick a pair with the same box, e.g. O0")
    started = time.perf_counter()
    result: dict = {"pair": pair, "mode": "context" if context else "squeeze" if squeeze else "isolated",
                    "test": test, "width": width if squeeze and not context else None,
                    "length": length if context else None}
    if context:
        x_train, y_train, _ = draw_in_context(pair, 2 * seed + 1, max(train), length)
        x_test, y_test, differing = draw_in_context(pair, 2 * seed + 2, test, length)
        result["test_pairs_differing_pixels"] = {
            "median": int(np.median(differing)), "p10": int(np.percentile(differing, 10)),
            "identical": round(float(np.mean(differing == 0)), 4)}
    else:
        x_train, y_train = draw_characters(pair, 2 * seed + 1, max(train), squeeze, width)
        x_test, y_test = draw_characters(pair, 2 * seed + 2, test, squeeze, width)
    print(f"drew {len(x_train) + len(x_test)} images in {time.perf_counter() - started:.0f} s", flush=True)
    # uint8 until a batch is used: 200,000 context windows are 0.8 GB as bytes, 3 GB as floats.
    x_train, x_test = torch.from_numpy(x_train)[:, None], torch.from_numpy(x_test)[:, None]
    y_train, y_test = torch.from_numpy(y_train), torch.from_numpy(y_test)

    def as_input(x):
        return x.float().div_(255)

    result["runs"] = []
    for size in sorted(set(train)):
        run_started = time.perf_counter()
        torch.manual_seed(seed)
        net = _classifier()
        optimizer = torch.optim.Adam(net.parameters(), lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * (size // batch))

        def accuracy(x, y) -> float:
            net.eval()
            with torch.no_grad():
                right = sum((net(as_input(x[i:i + 1000])).argmax(1) == y[i:i + 1000]).sum().item()
                            for i in range(0, len(x), 1000))
            net.train()
            return right / len(x)

        history = []
        for epoch in range(epochs):
            order = torch.randperm(size)
            for i in range(0, size - batch + 1, batch):
                index = order[i:i + batch]
                loss = F.cross_entropy(net(as_input(x_train[index])), y_train[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
            row = {"epoch": epoch + 1, "train_acc": round(accuracy(x_train[:min(size, test)], y_train[:min(size, test)]), 4),
                   "test_acc": round(accuracy(x_test, y_test), 4)}
            history.append(row)
            print(f"train {size}, epoch {row['epoch']}: train accuracy {row['train_acc']:.4f}, "
                  f"test accuracy {row['test_acc']:.4f}", flush=True)
        result["runs"].append({"train": size, "history": history,
                               "seconds": round(time.perf_counter() - run_started, 1)})
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers of images, e.g. 120000 or 25000,50000") from None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default="O0", help="the two characters (default O0)")
    parser.add_argument("--train", type=_sizes, default=(120_000,),
                        help="training images; several sizes (25000,50000) train one classifier each")
    parser.add_argument("--test", type=int, default=20_000, help="test images (their own seed)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--squeeze", action="store_true", help="squeeze and scale as inside a whole CAPTCHA")
    parser.add_argument("--width", type=int, default=96, help="model input width, with --squeeze")
    parser.add_argument("--context", action="store_true", help="inside whole CAPTCHAs, at full resolution")
    parser.add_argument("--length", type=int, default=5, help="characters per CAPTCHA, with --context")
    parser.add_argument("--batch", type=int, default=128, help="images per optimizer step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = study(args.pair, args.train, args.test, args.epochs, args.squeeze, args.width, args.context,
                   args.length, batch=args.batch, seed=args.seed)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
