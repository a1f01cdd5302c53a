"""How separable are two characters as the ``captcha`` package draws them?

    python -m captcha_lit.ambiguity                       # O vs 0, isolated, 120,000 characters, 5 epochs
    python -m captcha_lit.ambiguity --squeeze --width 96  # as inside a whole CAPTCHA at input width 96
    python -m captcha_lit.ambiguity --pair 1I --train 40000 --epochs 3

A security auditor's question before blaming a model: is a confusion in the scheme or in the
solver? This trains a small binary classifier on single characters drawn by the package's
own ``_draw_character`` (random font size, rotation and warp, seeded like the datasets).
Its test accuracy is a lower bound on how separable the pair is.

- Default: each character on its own, at half scale (32x32 from the 64x64 drawing).
- ``--squeeze``: each character also squeezed horizontally by a random word width (5
  characters of the package's font sizes, each with the package's 50% chance of a space
  before it), then scaled to ``--width`` out of the 160-pixel canvas and 32 of its 60 rows,
  as the default pipeline sees it inside a whole CAPTCHA.

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


def _classifier():
    import torch.nn as nn

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.MaxPool2d(2))

    return nn.Sequential(block(1, 16), block(16, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(128, 2))


def study(pair: str = "O0", train: int = 120_000, test: int = 20_000, epochs: int = 5, squeeze: bool = False,
          width: int = 96, batch: int = 128, lr: float = 2e-3, seed: int = 0) -> dict:
    import torch
    import torch.nn.functional as F

    if len(pair) != 2 or pair[0] == pair[1]:
        raise ValueError(f"--pair {pair!r}: give two different characters, e.g. O0")
    if train < batch or test < 1 or epochs < 1:
        raise ValueError(f"--train {train} (>= --batch {batch}), --test {test} and --epochs {epochs} must be positive")
    torch.manual_seed(seed)
    started = time.perf_counter()
    x_train, y_train = draw_characters(pair, 2 * seed + 1, train, squeeze, width)
    x_test, y_test = draw_characters(pair, 2 * seed + 2, test, squeeze, width)
    print(f"drew {train + test} characters in {time.perf_counter() - started:.0f} s", flush=True)
    x_train = torch.from_numpy(x_train)[:, None].float() / 255
    x_test = torch.from_numpy(x_test)[:, None].float() / 255
    y_train, y_test = torch.from_numpy(y_train), torch.from_numpy(y_test)
    net = _classifier()
    optimizer = torch.optim.Adam(net.parameters(), lr)
    steps = epochs * (train // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)

    def accuracy(x, y) -> float:
        net.eval()
        with torch.no_grad():
            right = sum((net(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum().item() for i in range(0, len(x), 1000))
        net.train()
        return right / len(x)

    history = []
    for epoch in range(epochs):
        order = torch.randperm(train)
        for i in range(0, train - batch + 1, batch):
            index = order[i:i + batch]
            loss = F.cross_entropy(net(x_train[index]), y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        row = {"epoch": epoch + 1, "train_acc": round(accuracy(x_train[:test], y_train[:test]), 4),
               "test_acc": round(accuracy(x_test, y_test), 4)}
        history.append(row)
        print(f"epoch {row['epoch']}: train accuracy {row['train_acc']:.4f}, test accuracy {row['test_acc']:.4f}",
              flush=True)
    return {"pair": pair, "train": train, "test": test, "squeeze": squeeze, "width": width if squeeze else None,
            "history": history, "seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default="O0", help="the two characters (default O0)")
    parser.add_argument("--train", type=int, default=120_000, help="training characters")
    parser.add_argument("--test", type=int, default=20_000, help="test characters (their own seed)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--squeeze", action="store_true", help="squeeze and scale as inside a whole CAPTCHA")
    parser.add_argument("--width", type=int, default=96, help="model input width, with --squeeze")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = study(args.pair, args.train, args.test, args.epochs, args.squeeze, args.width, seed=args.seed)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
