"""Speed of a model itself: bare training steps and inference in PyTorch, the ONNX export under
ONNX Runtime (throughput, ``Solver.solve`` latency, then the HTTP load test), and the parity of
an exported checkpoint with PyTorch on its test split."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from captcha_lit.bench.common import ROOT, compose, median, percentile
from captcha_lit.bench.http_load import captcha_png, http_compare

INFERENCE_BATCH = 256

# model throughput: label -> overrides. The seed-sized baseline is the first release's cnn,
# measured in the same run so that a slow day shows as a slow baseline.
THROUGHPUT_MODELS = {
    "default": [],
    "cnn": ["model=cnn"],
    "baseline_seed_cnn_64x160": ["model=cnn_seed", "data.input_size=[64,160]", "data.grayscale=false",
                                 "augmentation=none"],
}


def _throughput(overrides: list[str], repeats: int, steps: int = 20) -> dict:
    """Bare training steps (batch ``data.batch_size``) and inference (batch 256) of a composed config.

    Training runs under the precision the config resolves to (``trainer.precision=auto``: bf16
    autocast where the CPU has native bf16) and, as the baseline, in fp32; inference in fp32,
    as predict, serve and the ONNX export run it."""
    import contextlib

    import torch

    from captcha_lit.training.builders import build_module, resolve_precision
    from captcha_lit.training.inference import read_images
    from captcha_lit.training.optim import make_optimizer

    cfg = compose(overrides)
    precision = str(resolve_precision(cfg.trainer))
    module = build_module(cfg)
    height, width = cfg.data.input_size
    batch = int(cfg.data.batch_size)
    targets = torch.randint(0, len(module.charset), (batch, int(cfg.data.max_length)))
    lengths = torch.full((batch,), int(cfg.data.max_length))
    images = torch.randint(0, 256, (batch, module.spec.channels, height, width), dtype=torch.uint8)
    # The run's own optimizer (the config's, Adam at 1e-3 by default, fused where torch has the kernel).
    optimizer_options = dict(module.hparams.optimizer)
    optimizer = make_optimizer(optimizer_options.pop("name"), module.parameters(), optimizer_options)
    batch_augment = module.batch_augment
    modes = {"train_img_s": precision, "train_fp32_img_s": "32-true"}
    runs = []
    for _ in range(repeats):
        run = {}
        module.train()
        for key, mode in modes.items():
            autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if mode.startswith("bf16")
                        else contextlib.nullcontext())
            for step in range(steps + 3):
                if step == 3:  # the first steps warm up allocators and kernels
                    start = time.perf_counter()
                x = module.preprocess.to_float(images)
                x = module.preprocess.normalize(batch_augment(x) if batch_augment is not None else x)
                with autocast:
                    logits = module(x)
                loss = module.compute_loss(logits, targets, lengths)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            run[key] = steps * batch / (time.perf_counter() - start)
        module.eval()
        inference_batch = torch.randint(0, 256, (INFERENCE_BATCH, module.spec.channels, height, width),
                                        dtype=torch.uint8)
        read_images(module, inference_batch, batch_size=INFERENCE_BATCH)
        start = time.perf_counter()
        for _ in range(3):
            read_images(module, inference_batch, batch_size=INFERENCE_BATCH)
        run["infer_img_s_b256"] = 3 * INFERENCE_BATCH / (time.perf_counter() - start)
        runs.append(run)
    return {**{key: round(median([run[key] for run in runs]), 1) for key in modes}, "precision": precision,
            "infer_img_s_b256": round(median([run["infer_img_s_b256"] for run in runs]), 1),
            "input_size": list(cfg.data.input_size), "params": sum(p.numel() for p in module.parameters()),
            "runs": [{key: round(value, 1) for key, value in run.items()} for run in runs]}


def bench_throughput(repeats: int) -> dict:
    return {label: _throughput(overrides, repeats) for label, overrides in THROUGHPUT_MODELS.items()}


def bench_onnx(repeats: int, http_seconds: float, http_clients: int = 16, latency_images: int = 200) -> dict:
    """The default model (freshly initialized: speed does not depend on the weights) exported to ONNX."""

    from captcha_lit.deploy.export import export_onnx
    from captcha_lit.deploy.runtime import Solver
    from captcha_lit.training.builders import build_module
    from captcha_lit.training.inference import read_images

    cfg = compose([])
    module = build_module(cfg).eval()
    height, width = (int(v) for v in cfg.data.input_size)
    work_dir = Path(tempfile.mkdtemp(prefix="captcha_lit_bench_onnx_"))
    try:
        model_path = work_dir / "model.onnx"
        export_onnx(module, {"hyper_parameters": dict(module.hparams)}, model_path, parity_images=16)
        solver = Solver(model_path, batch_size=INFERENCE_BATCH)
        images = np.random.default_rng(0).integers(0, 256, (INFERENCE_BATCH, height, width, module.spec.channels),
                                                   dtype=np.uint8)
        pngs = [captcha_png(i) for i in range(16)]
        runs = []
        for _ in range(repeats):
            solver.solve_arrays(images)
            start = time.perf_counter()
            for _ in range(3):
                solver.solve_arrays(images)
            onnx_img_s = 3 * INFERENCE_BATCH / (time.perf_counter() - start)
            read_images(module, images, batch_size=INFERENCE_BATCH)
            start = time.perf_counter()
            for _ in range(3):
                read_images(module, images, batch_size=INFERENCE_BATCH)
            torch_img_s = 3 * INFERENCE_BATCH / (time.perf_counter() - start)
            for png in pngs:
                solver.solve(png)
            latencies = []
            for i in range(latency_images):
                start = time.perf_counter()
                solver.solve(pngs[i % len(pngs)])
                latencies.append((time.perf_counter() - start) * 1e3)
            runs.append({"onnx_img_s_b256": onnx_img_s, "torch_img_s_b256": torch_img_s,
                         "solve_p50_ms": percentile(latencies, 50), "solve_p99_ms": percentile(latencies, 99)})
        digits = {"onnx_img_s_b256": 1, "torch_img_s_b256": 1, "solve_p50_ms": 2, "solve_p99_ms": 2}
        result = {
            "arch": cfg.model.name, "input_size": [height, width], "threads": solver.threads, "repeats": repeats,
            **{key: round(median([run[key] for run in runs]), places) for key, places in digits.items()},
            "runs": [{key: round(run[key], places) for key, places in digits.items()} for run in runs],
        }
        result["http"] = (http_compare(model_path, http_seconds, http_clients, work_dir, repeats)
                          if http_seconds > 0 else None)
        return result
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def newest_checkpoint() -> str | None:
    """The best checkpoint of the newest run under outputs/train/runs that still has one."""
    runs = sorted(ROOT.glob("outputs/train/runs/*/metrics.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for metrics in runs:
        best = json.loads(metrics.read_text()).get("best_ckpt")
        if best and Path(best).is_file():
            return best
    return None


PARITY_FIGURES = ("num_images", "text_agreement", "text_mismatches", "max_abs_logit_diff", "torch_seq_acc",
                  "onnx_seq_acc")


NO_CHECKPOINT = "no checkpoint: pass --ckpt PATH, run `make train` first, or add train_default to --only"


def _export_report(ckpt: str, out_dir: Path, name: str, report_glob: str, *overrides: str) -> dict:
    """``python -m captcha_lit.export`` of ``ckpt`` into ``out_dir/name`` (log: ``out_dir/name.log``),
    then its parity report (the first match of ``report_glob``), or ``{"error": ...}``."""
    run_dir = out_dir / name
    cmd = [sys.executable, "-m", "captcha_lit.export", f"ckpt_path={ckpt}", f"hydra.run.dir={run_dir}", *overrides]
    with open(out_dir / f"{name}.log", "w") as log_file:
        code = subprocess.call(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    reports = sorted(run_dir.glob(report_glob))
    if not reports:
        return {"error": f"export exited with code {code}; see {out_dir / f'{name}.log'}"}
    return json.loads(reports[0].read_text())


def bench_parity(ckpt: str | None, out_dir: Path) -> dict:
    """ONNX against PyTorch on the checkpoint's whole fixed test split (2,000 images by default)."""
    if not ckpt:
        return {"error": NO_CHECKPOINT}
    report = _export_report(ckpt, out_dir, "parity", "model.parity.json", "parity.split=test",
                            "parity.num_images=null", "parity.max_mismatch_rate=0.001")
    if "error" in report:
        return {"ckpt": ckpt, **report}
    return {"ckpt": ckpt, "passed": report["passed"], **{key: report[key] for key in PARITY_FIGURES}}


INT8_FIGURES = ("fp32_img_s", "int8_img_s", "speedup", "text_agreement", "text_mismatches", "fp32_seq_acc",
                "int8_seq_acc")


def bench_int8(ckpt: str | None, out_dir: Path, repeats: int, images: int = 2048) -> dict:
    """``export quantize=int8`` of the checkpoint (its parity: texts against fp32 on the test split),
    then both models' ONNX Runtime throughput at batch 256, interleaved, on the same images."""
    from captcha_lit.deploy.runtime import Solver

    if not ckpt:
        return {"error": NO_CHECKPOINT}
    report = _export_report(ckpt, out_dir, "int8", "*.int8.parity.json", "quantize=int8")
    if "error" in report:
        return {"ckpt": ckpt, **report}
    solvers = {"fp32": Solver(report["fp32_model"], batch_size=INFERENCE_BATCH),
               "int8": Solver(report["model"], batch_size=INFERENCE_BATCH)}
    spec = solvers["fp32"].spec
    batch = np.random.default_rng(0).integers(0, 256, (INFERENCE_BATCH, *spec.input_size, spec.channels),
                                              dtype=np.uint8)
    batches = max(1, images // INFERENCE_BATCH)
    rates: dict[str, list[float]] = {name: [] for name in solvers}
    for solver in solvers.values():
        solver.logits(batch)  # warm-up
    for _ in range(max(1, repeats)):
        for name, solver in solvers.items():  # interleaved, so machine load hits both alike
            start = time.perf_counter()
            for _ in range(batches):
                solver.logits(batch)
            rates[name].append(batches * INFERENCE_BATCH / (time.perf_counter() - start))
    fp32, int8 = median(rates["fp32"]), median(rates["int8"])
    return {"ckpt": ckpt, "passed": report["passed"], "fp32_img_s": round(fp32, 1), "int8_img_s": round(int8, 1),
            "speedup": round(int8 / fp32, 3), **{key: report[key] for key in INT8_FIGURES[3:]}}
