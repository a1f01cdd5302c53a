"""Benchmarks that train for real: the shipped recipes from a fresh data cache (test accuracy,
wall time, peak RSS of the process tree, val accuracy at 5/10/15 minutes), fine-tuning from
synthetic pre-training on a few real labels, and one process against DDP with two."""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

from captcha_lit.bench.common import ROOT, compose, median, process_tree_memory

# The minutes of a run (data generation included) at which its validation accuracy is reported.
VAL_MINUTES = (2, 4, 6, 10, 15)


class TrainingRecipe(NamedTuple):
    benchmark: str  # its name in results.csv
    overrides: list[str]
    target: str
    commit: str | None = None  # train with this commit's code (a git worktree of it) instead of the checkout's


# The last commit before the work of issue 28 (a faster default): its `make train`, code and
# recipe both, is what the default's wall time is compared with.
PREVIOUS_DEFAULT_COMMIT = "2642041"


# --only name: recipe. Each is run from a fresh data cache, so generation is in the wall time.
TRAINING = {
    "train_default": TrainingRecipe("train_default", [], ">= 0.99 in <= 8 min, <= 3 GB"),
    "train_previous": TrainingRecipe("train_crnn_140k", ["experiment=crnn_140k"], "the default until 2026-12-05"),
    "train_previous_commit": TrainingRecipe("train_previous_commit", [], "the default as of its commit",
                                            commit=PREVIOUS_DEFAULT_COMMIT),
    "train_best": TrainingRecipe("train_best", ["experiment=best"], ">= 0.995 in <= 15 min"),
    "train_cnn": TrainingRecipe("train_cnn", ["experiment=cnn"], ">= 0.98 in <= 15 min"),
    "train_varlen": TrainingRecipe("train_varlen", ["experiment=varlen"], ">= 0.97 in <= 20 min"),
    "train_v2": TrainingRecipe("train_captcha_images_v2", ["experiment=captcha_images_v2"], ">= 0.98 in <= 10 min"),
    "train_seed": TrainingRecipe("train_seed", ["experiment=seed"], "reported (the seed project: about 0.95 val)"),
    # The folder recipe with no override but the folder: the one command a researcher runs on a scheme.
    "train_folder_v2": TrainingRecipe("train_folder_captcha_images_v2",
                                      ["data=folder", "data.path=${captcha_lit.datasets:captcha_images_v2}"],
                                      ">= 0.99 in <= 3 min"),
}


def shipped_seed(overrides: list[str]) -> int:
    """The seed of the recipe as shipped: repeat 0's, and repeat r > 0 sets this + r."""
    return int(compose(overrides).seed)


def train_command(overrides: list[str]) -> str:
    """The command line that repeats a training run. The data cache folder is left out: any
    cache with the same data gives the same run (only a fresh one adds generation time)."""
    kept = [override for override in overrides if not override.startswith("data.cache_dir=")]
    return " ".join(["python -m captcha_lit.train", *map(shlex.quote, kept)])  # ${...} stays literal in a shell


def _timed_process(name: str, module: str, overrides: list[str], out_dir: Path, fresh_cache: bool,
                   cache_dir: Path | None = None, code_dir: Path = ROOT) -> dict:
    """``python -m module`` of the code in ``code_dir`` in a subprocess, its log in
    ``out_dir/name.log`` and its Hydra run in ``out_dir/name``; ``fresh_cache``: in a new data
    cache of its own, removed afterwards; else in ``cache_dir`` (or the configured cache). Returns
    the exit code, the wall time and the peak memory of its process tree."""
    run_dir = out_dir / name
    owned = fresh_cache
    cache_dir = Path(tempfile.mkdtemp(prefix="captcha_lit_bench_cache_")) if fresh_cache else cache_dir
    cmd = [sys.executable, "-m", module, *overrides, f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false"]
    env = dict(os.environ)
    if cache_dir is not None:
        cmd.append(f"data.cache_dir={cache_dir}")
        env["CAPTCHA_LIT_CACHE"] = str(cache_dir)  # every cache a run writes, pre-trained models included
    peak_rss = peak_pss = 0
    start = time.time()
    with open(out_dir / f"{name}.log", "w") as log_file:
        # `python -m` puts its working directory first on sys.path: code_dir's package is the one imported.
        process = subprocess.Popen(cmd, cwd=code_dir, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        done = threading.Event()

        def sample_rss():
            nonlocal peak_rss, peak_pss
            while not done.is_set():
                rss, pss = process_tree_memory(process.pid)
                peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
                done.wait(0.5)

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        code = process.wait()
        done.set()
        sampler.join()
    wall = time.time() - start
    if owned:
        shutil.rmtree(cache_dir, ignore_errors=True)
    result = {"name": name, "run_dir": run_dir, "wall_s": round(wall, 1), "peak_rss_gb": round(peak_rss / 2**30, 2),
              "peak_pss_gb": round(peak_pss / 2**30, 2)}
    if code != 0:
        result["error"] = f"exit code {code}; see {out_dir / f'{name}.log'}"
    return result


def _train_run(name: str, overrides: list[str], out_dir: Path, fresh_cache: bool, cache_dir: Path | None = None,
               code_dir: Path = ROOT) -> dict:
    """One training run (``_timed_process``) and the figures of its metrics.json."""
    process = _timed_process(name, "captcha_lit.train", overrides, out_dir, fresh_cache, cache_dir, code_dir)
    if "error" in process:
        return {"name": name, "error": process["error"]}
    metrics = json.loads((process["run_dir"] / "metrics.json").read_text())

    def val_seq_acc_at(minutes: float):
        points = [point for point in metrics.get("timeline", []) if point["elapsed_s"] <= minutes * 60]
        return points[-1]["val/seq_acc"] if points else None

    return {"name": name, "test_seq_acc": metrics.get("test/seq_acc"), "test_char_acc": metrics.get("test/char_acc"),
            "best_ckpt": metrics.get("best_ckpt"), "wall_s": process["wall_s"], "peak_rss_gb": process["peak_rss_gb"],
            "peak_pss_gb": process["peak_pss_gb"], "train_img_s": metrics.get("train_images_per_s"),
            **{f"val_seq_acc_at_{minutes}min": val_seq_acc_at(minutes) for minutes in VAL_MINUTES},
            "test_ece": metrics.get("test/ece"), "pretrain": (metrics.get("recipe") or {}).get("pretrain")}


TRAINING_FIGURES = ("test_seq_acc", "test_char_acc", "wall_s", "peak_rss_gb", "peak_pss_gb", "train_img_s",
                    *(f"val_seq_acc_at_{minutes}min" for minutes in VAL_MINUTES))


class CommitError(RuntimeError):
    """The commit a benchmark trains with cannot be checked out."""


def commit_worktree(commit: str) -> Path:
    """A detached git worktree of ``commit`` of this repository in a new temporary folder
    (``remove_worktree`` removes it)."""
    into = Path(tempfile.mkdtemp(prefix="captcha_lit_bench_commit_")) / "code"
    done = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(into), commit],
                          capture_output=True, text=True)
    if done.returncode != 0:
        into.parent.rmdir()
        raise CommitError(f"cannot check out commit {commit} of {ROOT} ({done.stderr.strip() or 'not a git clone'}); "
                          "run the benchmark from a git clone with its history")
    return into


def remove_worktree(path: Path) -> None:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], capture_output=True)
    shutil.rmtree(path.parent, ignore_errors=True)


def bench_training(name: str, overrides: list[str], repeats: int, out_dir: Path, commit: str | None = None) -> dict:
    """Repeat 0 is the config as shipped. The recipes are deterministic, so an identical repeat
    would only re-measure the wall time: repeat r > 0 sets ``seed`` to the shipped seed + r
    (weights and batch order; the data and the test split keep their own seeds). ``commit``:
    each run trains with that commit's code and configs, in a worktree of it made beforehand."""
    runs = []
    code_dir = ROOT
    if commit is not None:
        try:
            code_dir = commit_worktree(commit)
        except CommitError as exc:
            runs.append({"name": f"{name}_run0", "error": str(exc)})
    try:
        first_seed = shipped_seed(overrides)
        for repeat in range(repeats if not runs else 0):
            seed = first_seed + repeat
            run_overrides = overrides + ([f"seed={seed}"] if repeat else [])
            run = _train_run(f"{name}_run{repeat}", run_overrides, out_dir, fresh_cache=True, code_dir=code_dir)
            command = train_command(run_overrides)
            if commit is not None:
                command = f"git checkout {commit} && {command}"
            runs.append({**run, "seed": seed, "command": command})
    finally:
        if code_dir != ROOT:
            remove_worktree(code_dir)
    ok = [run for run in runs if "error" not in run]
    summary = {"overrides": overrides, "commit": commit, "runs": runs}
    accuracies = [run["test_seq_acc"] for run in ok if run.get("test_seq_acc") is not None]
    summary["test_seq_acc_range"] = [min(accuracies), max(accuracies)] if accuracies else None
    for key in TRAINING_FIGURES:
        summary[f"median_{key}"] = median([run.get(key) for run in ok])
    return summary


def _eval_run(name: str, overrides: list[str], out_dir: Path) -> dict:
    run_dir = out_dir / name
    cmd = [sys.executable, "-m", "captcha_lit.eval", *overrides, f"hydra.run.dir={run_dir}",
           "trainer.enable_progress_bar=false"]
    with open(out_dir / f"{name}.log", "w") as log_file:
        code = subprocess.call(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    if code != 0:
        return {"name": name, "error": f"exit code {code}; see {out_dir / f'{name}.log'}"}
    return {"name": name, "test_seq_acc": json.loads((run_dir / "metrics.json").read_text()).get("test/seq_acc")}


# Few labels of captcha_images_v2 (data.train_limit) with the folder recipe as shipped (pretrain=auto),
# against pretrain=none; and self-training from SELF_TRAINING_LABELS with the rest as unlabeled images.
LABEL_COUNTS = (100, 50)
SELF_TRAINING_LABELS = 25
LABELS_DATASET = "captcha_images_v2"


def unlabeled_rest(root: Path, labels: int, into: Path) -> Path:
    """Copy the training split's images beyond its first ``labels`` (those ``data.train_limit``
    keeps) into ``into``, named by a hash of their path: unlabeled images of the same scheme,
    none from the validation or test split."""
    import hashlib

    from captcha_lit.data.folder import FolderDataModule

    limited = FolderDataModule(path=str(root), train_limit=labels, cache_dir=str(into / ".cache"))
    full = FolderDataModule(path=str(root), cache_dir=str(into / ".cache"))
    limited.resolve(), full.resolve()
    kept = set(limited.files["train"])
    folder = into / "unlabeled"
    folder.mkdir(parents=True, exist_ok=True)
    for relpath in full.files["train"]:
        if relpath not in kept:
            name = hashlib.sha256(relpath.encode()).hexdigest()[:16] + Path(relpath).suffix
            shutil.copyfile(root / relpath, folder / name)
    shutil.rmtree(into / ".cache", ignore_errors=True)
    return folder


def _pretrain_seconds(cache_dir: Path) -> float | None:
    metas = sorted(cache_dir.glob("pretrained-*/meta.json"))
    return json.loads(metas[0].read_text()).get("wall_time_s") if metas else None


def bench_labels(repeats: int, out_dir: Path) -> dict:
    """Each seed starts from a fresh data cache: its first run pre-trains on the scheme (timed
    apart, as ``pretrain_s``) and the later runs of the seed reuse that model, as a researcher's
    next runs on the same scheme do."""
    from captcha_lit.data.files import datasets_dir

    root = datasets_dir() / LABELS_DATASET
    if not root.is_dir():
        return {"error": f"{root} does not exist; set CAPTCHA_LIT_DATASETS"}
    folder = ["data=folder", f"data.path={root}"]
    work = Path(tempfile.mkdtemp(prefix="captcha_lit_bench_labels_"))
    unlabeled = unlabeled_rest(root, SELF_TRAINING_LABELS, work)
    setups = {}
    for labels in LABEL_COUNTS:
        setups[f"{labels}"] = [f"data.train_limit={labels}"]
        setups[f"{labels}_scratch"] = [f"data.train_limit={labels}", "pretrain=none"]
    setups[f"{SELF_TRAINING_LABELS}_unlabeled"] = [f"data.train_limit={SELF_TRAINING_LABELS}",
                                                   f"data.unlabeled_path={unlabeled}"]
    setups[f"{SELF_TRAINING_LABELS}"] = [f"data.train_limit={SELF_TRAINING_LABELS}"]
    runs: dict[str, list[dict]] = {name: [] for name in setups}
    pretrain_s = []
    first_seed = shipped_seed(folder)
    try:
        for repeat in range(repeats):
            seed = first_seed + repeat
            cache_dir = work / f"cache_{seed}"
            for name, overrides in setups.items():
                run_overrides = folder + overrides + [f"seed={seed}"]
                run = _train_run(f"labels_{name}_seed{seed}", run_overrides, out_dir, fresh_cache=False,
                                 cache_dir=cache_dir)
                runs[name].append({**run, "seed": seed, "command": train_command(run_overrides)})
            pretrain_s.append(_pretrain_seconds(cache_dir))
            shutil.rmtree(cache_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result: dict = {"dataset": LABELS_DATASET, "repeats": repeats, "median_pretrain_s": median(pretrain_s),
                    "pretrain_s": pretrain_s}
    for name, setup_runs in runs.items():
        ok = [run for run in setup_runs if "error" not in run]
        result[name] = {"runs": setup_runs, **{f"median_{key}": median([run.get(key) for run in ok])
                                               for key in ("test_seq_acc", "wall_s", "test_ece")}}
    return result


DDP_FIGURES = ("test_seq_acc", "test_char_acc", "wall_s", "train_img_s")


def bench_ddp(repeats: int, num_train: int, epochs: int, out_dir: Path) -> dict:
    """The default model on CPU, trained by one process (batch 64) and by DDP with two gloo
    processes (batch 32 each: the same global batch, steps and samples), scored on the test split."""
    cache_dir = Path(tempfile.mkdtemp(prefix="captcha_lit_bench_ddp_cache_"))
    shared_overrides = [f"data.num_train={num_train}", f"trainer.max_epochs={epochs}", f"data.cache_dir={cache_dir}",
                        "trainer.accelerator=cpu", "trainer.enable_model_summary=false"]
    setups = {"one_process": ["trainer.devices=1", "data.batch_size=64"],
              "two_processes": ["trainer=ddp", "trainer.devices=2", "data.batch_size=32"]}
    runs: dict[str, list[dict]] = {name: [] for name in setups}
    try:
        from captcha_lit.training.builders import build_datamodule

        build_datamodule(compose(shared_overrides).data).prepare_data()  # generated once, outside the timed runs
        first_seed = shipped_seed(shared_overrides)
        for repeat in range(repeats):
            seed = first_seed + repeat
            for name, overrides in setups.items():  # interleaved, so machine load hits both alike
                run_overrides = shared_overrides + overrides + [f"seed={seed}"]
                run = _train_run(f"ddp_{name}_run{repeat}", run_overrides, out_dir, fresh_cache=False)
                runs[name].append({**run, "seed": seed, "command": train_command(run_overrides)})
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    result: dict = {"num_train": num_train, "epochs": epochs, "total_samples": num_train * epochs,
                    "repeats": repeats}
    for name, setup_runs in runs.items():
        ok = [run for run in setup_runs if "error" not in run]
        result[name] = {"runs": setup_runs, **{f"median_{key}": median([run.get(key) for run in ok])
                                               for key in DDP_FIGURES}}
    one, two = result["one_process"]["median_test_seq_acc"], result["two_processes"]["median_test_seq_acc"]
    result["seq_acc_difference"] = round(two - one, 4) if one is not None and two is not None else None
    return result


AUDIT_FIGURES = ("wall_s", "peak_rss_gb", "peak_pss_gb", "points", "fewest_labels", "fewest_labels_seq_acc",
                 "all_labels_seq_acc")


def audit_figures(results_csv: Path, target: float) -> dict:
    """From an audit's results.csv: its points, the fewest labels whose best variant reads at
    least ``target`` of the test split (and what it reads), and the best reading with every label."""
    with open(results_csv, newline="") as file:
        points = list(csv.DictReader(file))
    best: dict[int, float] = {}
    for point in points:
        labels, accuracy = int(point["labels"]), float(point["test_seq_acc"])
        best[labels] = max(best.get(labels, 0.0), accuracy)
    reached = [labels for labels in sorted(best) if best[labels] >= target]
    return {"points": len(points), "target": target, "fewest_labels": reached[0] if reached else None,
            "fewest_labels_seq_acc": best[reached[0]] if reached else None,
            "all_labels_seq_acc": best[max(best)] if best else None}


def bench_audit(out_dir: Path) -> dict:
    """``python -m captcha_lit.audit`` on captcha_images_v2 with its default grid, once, from a
    fresh data cache: the wall time includes the scheme's pre-training, as a first audit's does."""
    from captcha_lit.data.files import datasets_dir

    root = datasets_dir() / LABELS_DATASET
    if not root.is_dir():
        return {"error": f"{root} does not exist; set CAPTCHA_LIT_DATASETS"}
    overrides = [f"data.path={root}"]
    process = _timed_process(f"audit_{LABELS_DATASET}", "captcha_lit.audit", overrides, out_dir, fresh_cache=True)
    result = {"dataset": LABELS_DATASET, "command": " ".join(["python -m captcha_lit.audit", *overrides]),
              **{key: value for key, value in process.items() if key != "run_dir"}}
    if "error" in result:
        return result
    target = float(compose(overrides, config_name="audit").audit.target)
    return {**result, **audit_figures(process["run_dir"] / "results.csv", target)}
