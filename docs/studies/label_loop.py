"""Does labeling the model's doubts first pay? The label page's loop, as a user would run it.

    python docs/studies/label_loop.py --out outputs/studies/label_loop
    python docs/studies/label_loop.py --out outputs/studies/label_loop --train-arg trainer.max_steps=3000

On a labeled folder (default: captcha_images_v2), with labels read from the file names by an
automated user that types them into the real page over HTTP (``python -m captcha_lit.label``):

- ``doubt``: label ``--round`` images in the page's order (file order: there is no model yet),
  train with the command the page shows, reopen the page with the new model (the rest least
  sure first), label ``--round`` more, train again; ``--rounds`` rounds in all.
- ``file``: label ``--round`` x ``--rounds`` images in file order, train once.

Every model is scored on the same held-out test images: the folder recipe's test split of the
whole folder (``data.split_seed=0``, ``--test-fraction``), which is never offered for labeling.
As the test is outside the labels, training runs with ``test=false data.test_fraction=0`` (plus
any ``--train-arg``). Writes ``label_loop.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
CLIENT = "label-loop-study"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def hydra_quoted(value: str) -> str:
    """A path as a Hydra override value, whatever its characters (Lightning's names hold '=')."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def run(cmd: list[str], log: Path) -> None:
    print("$", shlex.join(cmd), flush=True)
    with open(log, "w") as handle:
        code = subprocess.run(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"exit code {code}: {shlex.join(cmd)}\n{log.read_text()[-3000:]}")


def split_folder(data: Path, out: Path, test_fraction: float) -> tuple[Path, Path, dict[str, str]]:
    """Copies of the folder's images: test/ (the recipe's test split of the whole folder) and pool/ (the rest,
    to label). Copies, not links: the page serves only files that lie under its folder."""
    from captcha_lit.data.files import label_from_name, split_ranks
    from captcha_lit.preprocess import scan_images

    relpaths = scan_images(data)
    ranked = split_ranks(relpaths, 0)
    num_test = max(1, round(len(relpaths) * test_fraction))
    test = {relpaths[i] for i in ranked[:num_test]}
    pool, test_dir = out / "pool", out / "test"
    for relpath in relpaths:
        target = (test_dir if relpath in test else pool) / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            shutil.copyfile(data / relpath, target)
    return pool, test_dir, {p: label_from_name(p) for p in relpaths}


class LabelPage:
    """``python -m captcha_lit.label`` in a subprocess, and an automated user of its HTTP API."""

    def __init__(self, pool: Path, labels_csv: Path, charset: str, ckpt: str | None, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "captcha_lit.label", f"path={pool}", f"labels_csv={labels_csv}",
               f"charset={charset}", f"port={self.port}", f"hydra.run.dir={log.parent / (log.stem + '_run')}"]
        if ckpt:
            cmd.append(f"ckpt_path={hydra_quoted(ckpt)}")
        print("$", shlex.join(cmd), flush=True)
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, timeout=60)
        deadline = time.time() + 600
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the label page exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                self.info = self.http.get("/api/session").raise_for_status().json()
                break
            except httpx.HTTPError:
                if time.time() > deadline:
                    raise SystemExit(f"the label page did not start:\n{log.read_text()[-3000:]}") from None
                time.sleep(0.2)

    def label(self, count: int, truth: dict[str, str]) -> list[dict]:
        """Type the true label of the next ``count`` images the page shows, in its order."""
        view = self.http.get("/api/state", params={"client": CLIENT}).raise_for_status().json()
        done = []
        while len(done) < count and view["current"] is not None:
            item = next(i for i in view["items"] if i["index"] == view["current"])
            label = truth[item["path"]]
            view = self.http.post("/api/label", json={"client": CLIENT, "index": item["index"], "action": "save",
                                                      "label": label, "base": item["state"]}).raise_for_status().json()
            done.append({"path": item["path"], "label": label, "reading": item["reading"],
                         "confidence": item["confidence"]})
        self.counts = view["counts"]
        return done

    def close(self) -> None:
        self.http.close()
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def train(page: LabelPage, run_dir: Path, extra: list[str]) -> dict:
    """The train command the page shows, with the study's overrides; -> metrics.json."""
    cmd = shlex.split(page.info["train_command"])
    cmd[0] = sys.executable
    run_dir.mkdir(parents=True, exist_ok=True)
    run(cmd + ["test=false", "data.test_fraction=0", *extra, f"hydra.run.dir={run_dir}"], run_dir / "train.log")
    return json.loads((run_dir / "metrics.json").read_text())


def score(ckpt: str, test_dir: Path, truth: dict[str, str], run_dir: Path, fold_case: bool) -> float:
    """Sequence accuracy of ``ckpt`` on the held-out test images, by ``python -m captcha_lit.predict``."""
    preds = run_dir / "test_predictions.csv"
    run([sys.executable, "-m", "captcha_lit.predict", f"ckpt_path={hydra_quoted(ckpt)}", f"inputs={test_dir}",
         f"output={preds}", f"hydra.run.dir={run_dir / 'predict'}"], run_dir / "predict.log")
    with open(preds, newline="") as handle:
        rows = list(csv.DictReader(handle))

    def same(text: str, path: str) -> bool:
        want = truth[Path(path).relative_to(test_dir).as_posix()]
        return text.upper() == want.upper() if fold_case else text == want

    return sum(same(row["text"], row["path"]) for row in rows) / len(rows)


def arm(name: str, rounds: list[int], pool: Path, test_dir: Path, truth: dict, charset: str, out: Path,
        extra: list[str], reorder: bool, fold_case: bool) -> list[dict]:
    """Label ``rounds[i]`` more images, then train, for each round; with ``reorder``, each round after the
    first opens the page with the previous round's model."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    labels_csv, ckpt, results = folder / "labels.csv", None, []
    for number, count in enumerate(rounds, 1):
        page = LabelPage(pool, labels_csv, charset, ckpt if reorder else None, folder / f"label_page{number}.log")
        try:
            start = time.time()
            labeled = page.label(count, truth)
            counts = page.counts
        finally:
            page.close()
        metrics = train(page, folder / f"round{number}", extra)
        ckpt = metrics["best_ckpt"] or metrics["last_ckpt"]
        result = {"arm": name, "round": number, "labels": counts["labeled"], "new_labels": len(labeled),
                  "label_time_s": round(time.time() - start, 1), "train_time_s": metrics["wall_time_s"],
                  "readings_kept": f"{counts['accepted']}/{counts['compared']}" if counts["compared"] else None,
                  "test_seq_acc": score(ckpt, test_dir, truth, folder / f"round{number}", fold_case),
                  "checkpoint": ckpt, "train_command": page.info["train_command"]}
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> dict:
    from captcha_lit.data.files import datasets_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=datasets_dir() / "captcha_images_v2",
                        help="a folder labeled by file names")
    parser.add_argument("--out", type=Path, required=True, help="the study's folder (copies, labels, runs, results)")
    parser.add_argument("--round", type=int, default=50, help="labels per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--train-arg", action="append", default=[], metavar="OVERRIDE",
                        help="a Hydra override added to every training command (repeatable)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    pool, test_dir, truth = split_folder(args.data.resolve(), out, args.test_fraction)
    charset = "".join(sorted({c for label in truth.values() for c in label}))
    fold_case = not any(c.swapcase() in charset for c in charset if c.swapcase() != c)
    rounds = [args.round] * args.rounds
    results = (arm("doubt", rounds, pool, test_dir, truth, charset, out, args.train_arg, True, fold_case)
               + arm("file", [sum(rounds)], pool, test_dir, truth, charset, out, args.train_arg, False, fold_case))
    num_test = sum(1 for p in test_dir.rglob("*") if p.is_file())
    summary = {"data": str(args.data), "pool_images": len(truth) - num_test, "test_images": num_test,
               "charset": charset, "train_args": args.train_arg, "runs": results}
    (out / "label_loop.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n| arm | round | labels | readings kept | test seq acc | train s |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['arm']} | {r['round']} | {r['labels']} | {r['readings_kept'] or '-'} | "
              f"{r['test_seq_acc']:.4f} | {r['train_time_s']} |")
    return summary


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
