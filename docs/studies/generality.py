"""Does the one-command folder recipe hold on schemes it was not tuned on?

    python docs/studies/generality.py --out outputs/studies/generality
    python docs/studies/generality.py --schemes digits4 --labels 50,all --seed 43

captcha_images_v2 is the one real scheme this project has, and the folder recipe must not fit
only that one. This draws folders of other schemes with the ``captcha`` package (other canvas
sizes, fonts, alphabets, lengths and colors, saved as ``LABEL_index.png`` files the way a
scraper with a labeler would), then runs the README's command on each, unchanged:

    python -m captcha_lit.train data=folder data.path=DIR [data.train_limit=N]

Every scheme gets its own fresh cache, shared by its label counts as a user's runs would share
it (the first run with few labels pays for the pre-training). The table reports what the
recipe chose from the folder and the test sequence accuracy on the folder's own test split.
"""

from __future__ import annotations

import argparse
import json
import os
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from captcha_lit.data.synthetic import GeneratorSpec, generate, resolve_fonts

# Schemes unlike captcha_images_v2 (200x50 gray, 5 of 19 lower-case characters, one font).
SCHEMES = {
    # Lower case and digits, 4 to 6 characters, DejaVu fonts, a wide color canvas.
    "dejavu_lower_4to6": dict(charset="0-9a-z", min_length=4, max_length=6, width=220, height=70,
                              fonts="dejavu", font_sizes=(44, 52, 60)),
    # Four digits, small glyphs on a small canvas, the package's font.
    "digits4_small": dict(charset="0-9", min_length=4, max_length=4, width=120, height=40, fonts=None,
                          font_sizes=(30, 34, 38)),
    # Six mixed-case letters (case matters), the package's font at its own sizes.
    "mixed_case6": dict(charset=string.ascii_letters, min_length=6, max_length=6, width=180, height=60, fonts=None,
                        font_sizes=None),
}


def draw_folder(name: str, folder: Path, count: int) -> None:
    """``count`` labeled PNG files of scheme ``name`` in ``folder`` (kept if already there)."""
    done = folder / ".complete"
    if done.exists():
        return
    scheme = dict(SCHEMES[name])
    fonts = resolve_fonts(scheme.pop("fonts"))
    spec = GeneratorSpec(fonts=tuple(fonts) if fonts else None, channels=3, **scheme)
    texts, images = generate(spec, seed=f"generality:{name}", split="all", count=count)
    folder.mkdir(parents=True, exist_ok=True)
    for index, (text, image) in enumerate(zip(texts, images)):
        Image.fromarray(image).save(folder / f"{text}_{index:05d}.png")
    done.touch()


def train(folder: Path, labels: str, seed: int, run_dir: Path, cache: Path) -> dict:
    """The README's folder command; returns its metrics.json plus the process's wall time."""
    command = [sys.executable, "-m", "captcha_lit.train", "data=folder", f"data.path={folder}", f"seed={seed}",
               f"hydra.run.dir={run_dir}"]
    if labels != "all":
        command.append(f"data.train_limit={labels}")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, "CAPTCHA_LIT_CACHE": str(cache)})
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["process_wall_s"] = time.perf_counter() - start
    return metrics


def row(name: str, labels: str, metrics: dict) -> str:
    recipe = metrics["recipe"]
    chose = "; ".join([
        "x".join(str(v) for v in recipe["data.input_size"]["value"]),
        "gray" if recipe["data.grayscale"]["value"] else "color",
        "case folded" if recipe.get("data.case_insensitive", {}).get("value") else "case kept",
        f"{recipe['trainer.max_steps']['value']} steps",
        "pre-trained" if str(recipe.get("pretrain", {}).get("value", "none")) not in ("none", "None") else "no pre-training",
    ])
    return (f"| {name} | {labels} | {chose} | {metrics['test/seq_acc']:.4f} | {metrics['test/ece']:.4f} "
            f"| {metrics['process_wall_s']:.0f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/studies/generality"))
    parser.add_argument("--schemes", default=",".join(SCHEMES), help=f"comma-separated, of {', '.join(SCHEMES)}")
    parser.add_argument("--labels", default="100,all", help="label counts (data.train_limit), or all")
    parser.add_argument("--count", type=int, default=1000, help="images drawn per scheme (the folder's size)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    unknown = set(args.schemes.split(",")) - set(SCHEMES)
    if unknown:
        parser.error(f"--schemes: unknown {sorted(unknown)}; choose from {', '.join(SCHEMES)}")

    lines = ["| scheme | labels | the recipe chose | test seq acc | ECE | wall |", "|---|---|---|---|---|---|"]
    for name in args.schemes.split(","):
        folder = args.out / "folders" / name
        draw_folder(name, folder, args.count)
        with tempfile.TemporaryDirectory(prefix=f"generality-{name}-") as cache:
            for labels in args.labels.split(","):
                run_dir = args.out / "runs" / f"{name}-labels{labels}-seed{args.seed}"
                lines.append(row(name, labels, train(folder, labels, args.seed, run_dir, Path(cache))))
                print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    (args.out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
