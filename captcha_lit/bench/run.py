"""``make bench``: the project's accuracy and speed targets, measured on this machine.

    python -m captcha_lit.bench                         # everything (about 1.5 hours on 2 cores)
    python -m captcha_lit.bench --only gen,load,throughput --repeats 5
    python -m captcha_lit.bench --only train_default --train-repeats 3
    python -m captcha_lit.bench --only onnx --http-seconds 10
    python -m captcha_lit.bench --only parity --ckpt outputs/train/runs/<time>/checkpoints/<best>.ckpt
    python -m captcha_lit.bench --only finetune         # synthetic pre-training vs. 100/200 real labels
    python -m captcha_lit.bench --only ddp --train-repeats 3 # 1 process vs DDP with 2 (gloo), equal samples
    python -m captcha_lit.bench --only stream --repeats 3    # time the trainer waits for streamed data

Each figure is the median over repeats, next to a baseline measured in the same run.
Training repeats differ in their weight seed (repeat 0 is the config as shipped).
Results go to outputs/bench/<time>/results.json and table.md, and are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from captcha_lit.decoding import read_logits

ROOT = Path(__file__).resolve().parents[2]


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ---- data generation -----------------------------------------------------------------
def bench_generation(repeats: int, count: int) -> dict:
    from captcha_lit.data.synthetic import GeneratorSpec, generate
    from captcha_lit.utils import available_cores

    height, width, channels = _default_input_shape()
    spec = GeneratorSpec(input_size=(height, width), channels=channels)
    workers = available_cores()
    single, parallel = [], []
    for r in range(repeats):
        t = time.perf_counter()
        generate(spec, f"bench{r}", "train", count, workers=1)
        single.append(count / (time.perf_counter() - t))
        t = time.perf_counter()
        generate(spec, f"bench{r}", "train", count, workers=workers)
        parallel.append(count / (time.perf_counter() - t))
    s, p = _median(single), _median(parallel)
    return {"images": count, "repeats": repeats, "workers": workers, "single_core_img_s": round(s, 1),
            "all_cores_img_s": round(p, 1), "speedup": round(p / s, 2)}


# ---- cache loading -------------------------------------------------------------------
def bench_cache_load(repeats: int, count: int) -> dict:
    """Loading time of a cached split of ``count`` images at the default input size.

    The split's pixels are filled with noise instead of rendered CAPTCHAs (rendering 100k
    takes minutes); loading does not look at pixel content, so the time is the same.
    """
    from captcha_lit.charset import Charset
    from captcha_lit.data import cache
    from captcha_lit.data.datamodule import CaptchaArrayDataset

    tmp = Path(tempfile.mkdtemp(prefix="captcha_lit_bench_"))
    rng = np.random.default_rng(0)
    chars = Charset("0-9A-Z").chars
    labels = ["".join(rng.choice(list(chars), 5)) for _ in range(count)]

    def build(out):
        for start in range(0, count, 10_000):
            out[start:start + 10_000] = rng.integers(0, 256, size=out[start:start + 10_000].shape, dtype=np.uint8)
        return labels

    shape = _default_input_shape()
    cache.get_or_build(tmp, "bench", {"n": count}, count, build, shape)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        texts, images = cache.get_or_build(tmp, "bench", {"n": count}, count, build, shape)
        dataset = CaptchaArrayDataset(images, texts, Charset("0-9A-Z"), 5)
        _ = dataset[len(dataset) - 1]
        times.append(time.perf_counter() - t)
    shutil.rmtree(tmp, ignore_errors=True)
    return {"images": count, "repeats": repeats, "load_s": round(_median(times), 3)}


# ---- model throughput ----------------------------------------------------------------
def _default_input_shape() -> tuple[int, int, int]:
    """(height, width, channels) of the default recipe's model input."""
    data = _compose([]).data
    height, width = (int(v) for v in data.input_size)
    return height, width, 1 if data.get("grayscale") else 3


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _throughput(overrides: list[str], repeats: int, steps: int = 20) -> dict:
    """Bare training steps (batch ``data.batch_size``) and inference (batch 256) of a composed config.

    Training runs under the precision the config resolves to (``trainer.precision=auto``: bf16
    autocast where the CPU has native bf16) and, as the baseline, in fp32; inference in fp32,
    as predict, serve and the ONNX export run it."""
    import contextlib

    import torch

    from captcha_lit.training.builders import build_module, resolve_precision
    from captcha_lit.training.module import make_optimizer

    cfg = _compose(overrides)
    precision = str(resolve_precision(cfg.trainer))
    module = build_module(cfg)
    height, width = cfg.data.input_size
    batch = int(cfg.data.batch_size)
    targets = torch.randint(0, len(module.charset), (batch, int(cfg.data.max_length)))
    lengths = torch.full((batch,), int(cfg.data.max_length))
    images = torch.randint(0, 256, (batch, module.spec.channels, height, width), dtype=torch.uint8)
    # The run's own optimizer (the config's, Adam at 1e-3 by default, fused where torch has the kernel).
    opt_cfg = dict(module.hparams.optimizer)
    optimizer = make_optimizer(opt_cfg.pop("name"), module.parameters(), opt_cfg)
    aug = module.batch_augment
    modes = {"train_img_s": precision, "train_fp32_img_s": "32-true"}
    rates: dict[str, list[float]] = {key: [] for key in modes}
    infer_rates = []
    for _ in range(repeats):
        module.train()
        for key, mode in modes.items():
            autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if mode.startswith("bf16")
                        else contextlib.nullcontext())
            for i in range(steps + 3):
                if i == 3:
                    t = time.perf_counter()
                x = module.preprocess.to_float(images)
                x = module.preprocess.normalize(aug(x) if aug is not None else x)
                with autocast:
                    logits = module(x)
                loss = module.compute_loss(logits, targets, lengths)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            rates[key].append(steps * batch / (time.perf_counter() - t))
        module.eval()
        big = module.preprocess(torch.randint(0, 256, (256, module.spec.channels, height, width), dtype=torch.uint8))
        with torch.inference_mode():
            module(big)
            t = time.perf_counter()
            for _ in range(3):
                read_logits(module.spec, module(big))
            infer_rates.append(3 * 256 / (time.perf_counter() - t))
    return {**{key: round(_median(values), 1) for key, values in rates.items()}, "precision": precision,
            "infer_img_s_b256": round(_median(infer_rates), 1),
            "input_size": list(cfg.data.input_size), "params": sum(p.numel() for p in module.parameters())}


def bench_throughput(repeats: int) -> dict:
    return {
        "default": _throughput([], repeats),
        "cnn": _throughput(["model=cnn"], repeats),
        "baseline_seed_cnn_64x160": _throughput(["model=cnn", "model.channels=[32,64,128,256]",
                                                          "model.stem=0", "model.downsample=maxpool", "model.convs_per_stage=1",
                                                          "model.hidden=512", "data.input_size=[64,160]", "data.grayscale=false",
                                                          "augmentation=none"], repeats),
    }


# ---- deployment: ONNX Runtime, the Solver, the HTTP server ---------------------------------
def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _captcha_png(index: int) -> bytes:
    """One generated CAPTCHA at its canvas size, PNG-encoded like an upload."""
    import io

    from PIL import Image

    from captcha_lit.data.synthetic import CaptchaGenerator, GeneratorSpec

    _, array = CaptchaGenerator(GeneratorSpec(input_size=(60, 160))).sample("bench", "onnx", index)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _multipart_request(port: int, png: bytes) -> bytes:
    """A complete HTTP/1.1 keep-alive POST /v1/solve with ``png`` in the multipart field ``file``."""
    boundary = "captcha-lit-bench-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/solve HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: keep-alive\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _http_clients(port: int, requests: list[bytes], seconds: float, clients: int):
    """A lean closed-loop load generator: ``clients`` keep-alive connections on one event loop,
    each sending prebuilt requests back to back. It spends a few tens of microseconds per
    request, so on a small machine the server, not the client, is what gets measured."""
    import asyncio

    latencies: list[float] = []
    errors: list[str] = []
    stop_at = time.perf_counter() + seconds

    async def client(k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = k
        try:
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                writer.write(requests[i % len(requests)])
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                latencies.append((time.perf_counter() - t) * 1e3)
                if not head.startswith(b"HTTP/1.1 200"):
                    errors.append(head.split(b"\r\n", 1)[0].decode() + " " + body[:200].decode(errors="replace"))
                i += 1
        except (OSError, asyncio.IncompleteReadError) as exc:
            errors.append(f"client {k}: {exc!r}")
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    return latencies, errors, time.perf_counter() - started


def _http_load(model_path: Path, seconds: float, clients: int, work_dir: Path, extra: list[str] = ()) -> dict:
    """Start the real server in a subprocess and keep ``clients`` concurrent POST /v1/solve going."""
    import asyncio

    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "captcha_lit.serve", f"model_path={model_path}", f"port={port}",
           "access_log=false", "log_level=warning", f"hydra.run.dir={work_dir / 'serve'}", *extra]
    env = {k: v for k, v in os.environ.items() if k != "CAPTCHA_LIT_API_KEY"}
    url = f"http://127.0.0.1:{port}"
    with open(work_dir / "serve.log", "w") as log_file:
        server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            if server.poll() is not None:
                return {"error": f"server exited with code {server.returncode}; see {work_dir / 'serve.log'}"}
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                return {"error": "server did not start within 120 s"}
            time.sleep(0.2)
        pngs = [_captcha_png(i) for i in range(16)]
        with httpx.Client(base_url=url) as warm:
            for png in pngs:
                response = warm.post("/v1/solve", files={"file": ("c.png", png, "image/png")})
                response.raise_for_status()
                if not response.json().get("text"):
                    return {"error": f"warm-up answer has no text: {response.text[:200]}"}
        requests = [_multipart_request(port, png) for png in pngs]
        asyncio.run(_http_clients(port, requests, 2.0, clients))  # warm every connection path
        rss_before = _tree_rss(server.pid)  # every worker process
        latencies, errors, elapsed = asyncio.run(_http_clients(port, requests, seconds, clients))
        rss_after = _tree_rss(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
    return {"seconds": round(elapsed, 1), "clients": clients, "requests": len(latencies), "errors": len(errors),
            "first_error": errors[0] if errors else None,
            "req_s": round(len(latencies) / elapsed, 1), "p50_ms": round(_percentile(latencies, 50), 2),
            "p99_ms": round(_percentile(latencies, 99), 2), "server_rss_before_mb": round(rss_before / 2**20, 1),
            "server_rss_after_mb": round(rss_after / 2**20, 1), "server_options": list(extra)}


# The server as it ships (one worker process per core), the same in one process, and a baseline
# of one process without micro-batching (one model call per request, spinning onnxruntime
# threads: the first release's behaviour), measured in the same run.
HTTP_CONFIGS = {"default": [], "one_worker": ["workers=1"],
                "baseline_no_micro_batching": ["workers=1", "micro_batch=1", "spinning=true"]}


def _http_compare(model_path: Path, seconds: float, clients: int, work_dir: Path, repeats: int) -> dict:
    out = {}
    for name, extra in HTTP_CONFIGS.items():
        runs = [_http_load(model_path, seconds, clients, work_dir, extra) for _ in range(max(1, repeats))]
        ok = [r for r in runs if "error" not in r]
        if not ok:
            out[name] = runs[0]
            continue
        out[name] = {"runs": runs, "clients": clients, "seconds": seconds, "repeats": len(ok),
                     "errors": sum(r["errors"] for r in ok), "requests": sum(r["requests"] for r in ok),
                     "first_error": next((r["first_error"] for r in ok if r["first_error"]), None),
                     **{k: _median([r[k] for r in ok]) for k in ("p50_ms", "p99_ms", "req_s")},
                     "server_rss_before_mb": ok[0]["server_rss_before_mb"],
                     "server_rss_after_mb": ok[-1]["server_rss_after_mb"], "server_options": extra}
    return out


def bench_onnx(repeats: int, http_seconds: float, http_clients: int = 16, latency_images: int = 200) -> dict:
    """The default model (freshly initialized: speed does not depend on the weights) exported to ONNX."""
    import torch

    from captcha_lit.training.builders import build_module
    from captcha_lit.deploy.export import export_onnx
    from captcha_lit.deploy.runtime import Solver

    cfg = _compose([])
    module = build_module(cfg).eval()
    height, width = (int(v) for v in cfg.data.input_size)
    work_dir = Path(tempfile.mkdtemp(prefix="captcha_lit_bench_onnx_"))
    try:
        model_path = work_dir / "model.onnx"
        export_onnx(module, {"hyper_parameters": dict(module.hparams)}, model_path, parity_images=16)
        solver = Solver(model_path, batch_size=256)
        images = np.random.default_rng(0).integers(0, 256, (256, height, width, module.spec.channels), dtype=np.uint8)
        batch = module.preprocess(torch.from_numpy(images).permute(0, 3, 1, 2))
        onnx_rates, torch_rates, p50s, p99s = [], [], [], []
        pngs = [_captcha_png(i) for i in range(16)]
        for _ in range(repeats):
            solver.solve_arrays(images)
            t = time.perf_counter()
            for _ in range(3):
                solver.solve_arrays(images)
            onnx_rates.append(3 * 256 / (time.perf_counter() - t))
            with torch.inference_mode():
                read_logits(module.spec, module(batch))
                t = time.perf_counter()
                for _ in range(3):
                    read_logits(module.spec, module(batch))
                torch_rates.append(3 * 256 / (time.perf_counter() - t))
            for png in pngs:
                solver.solve(png)
            latencies = []
            for i in range(latency_images):
                t = time.perf_counter()
                solver.solve(pngs[i % len(pngs)])
                latencies.append((time.perf_counter() - t) * 1e3)
            p50s.append(_percentile(latencies, 50))
            p99s.append(_percentile(latencies, 99))
        result = {
            "arch": cfg.model.name, "input_size": [height, width], "threads": solver.threads, "repeats": repeats,
            "onnx_img_s_b256": round(_median(onnx_rates), 1), "torch_img_s_b256": round(_median(torch_rates), 1),
            "solve_p50_ms": round(_median(p50s), 2), "solve_p99_ms": round(_median(p99s), 2),
        }
        result["http"] = _http_compare(model_path, http_seconds, http_clients, work_dir, repeats) if http_seconds > 0 else None
        return result
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


# ---- full training runs --------------------------------------------------------------
def _tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _train_run(name: str, overrides: list[str], out_dir: Path, fresh_cache: bool) -> dict:
    run_dir = out_dir / name
    cache_dir = Path(tempfile.mkdtemp(prefix="captcha_lit_bench_cache_")) if fresh_cache else None
    cmd = [sys.executable, "-m", "captcha_lit.train", *overrides, f"hydra.run.dir={run_dir}",
           "trainer.enable_progress_bar=false"]
    if cache_dir is not None:
        cmd.append(f"data.cache_dir={cache_dir}")
    peak = 0
    start = time.time()
    with open(out_dir / f"{name}.log", "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample():
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _tree_rss(proc.pid))
                done.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        done.set()
        sampler.join()
    wall = time.time() - start
    if cache_dir is not None:
        shutil.rmtree(cache_dir, ignore_errors=True)
    if code != 0:
        return {"name": name, "error": f"exit code {code}; see {out_dir / f'{name}.log'}"}
    metrics = json.loads((run_dir / "metrics.json").read_text())

    def acc_at(minutes: float):
        points = [p for p in metrics["timeline"] if p["elapsed_s"] <= minutes * 60]
        return points[-1]["val/seq_acc"] if points else None

    return {"name": name, "test_seq_acc": metrics.get("test/seq_acc"), "test_char_acc": metrics.get("test/char_acc"),
            "best_ckpt": metrics.get("best_ckpt"), "wall_s": round(wall, 1), "peak_rss_gb": round(peak / 2**30, 2),
            "train_img_s": metrics.get("train_images_per_s"),
            "val_seq_acc_at_5min": acc_at(5), "val_seq_acc_at_10min": acc_at(10), "val_seq_acc_at_15min": acc_at(15)}


def bench_training(name: str, overrides: list[str], repeats: int, out_dir: Path) -> dict:
    """Repeat 0 is the config as shipped. The recipes are deterministic, so an identical repeat
    would only re-measure the wall time: repeat r > 0 sets ``seed=42+r`` (weights and batch
    order; the data and the test split keep their own seeds)."""
    runs = []
    for r in range(repeats):
        run = _train_run(f"{name}_run{r}", overrides + ([f"seed={42 + r}"] if r else []), out_dir, fresh_cache=True)
        runs.append({**run, "seed": 42 + r})
    ok = [r for r in runs if "error" not in r]
    summary = {"overrides": overrides, "runs": runs}
    accuracies = [r["test_seq_acc"] for r in ok if r.get("test_seq_acc") is not None]
    summary["test_seq_acc_range"] = [min(accuracies), max(accuracies)] if accuracies else None
    for key in ("test_seq_acc", "wall_s", "peak_rss_gb", "train_img_s", "val_seq_acc_at_5min",
                "val_seq_acc_at_10min", "val_seq_acc_at_15min"):
        summary[f"median_{key}"] = _median([r.get(key) for r in ok])
    return summary


# name: (overrides, target). Each is run from a fresh data cache, so generation is in the wall time.
TRAINING = {
    "train_default": ([], ">= 0.99 in <= 15 min, <= 4 GB"),
    "train_cnn": (["experiment=cnn"], ">= 0.98 in <= 15 min"),
    "train_varlen": (["experiment=varlen"], ">= 0.97 in <= 20 min"),
    "train_v2": (["experiment=captcha_images_v2"], ">= 0.98 in <= 10 min"),
    "train_seed": (["experiment=seed"], "reported (the seed project: about 0.95 val)"),
}


def _eval_run(name: str, overrides: list[str], out_dir: Path) -> dict:
    run_dir = out_dir / name
    cmd = [sys.executable, "-m", "captcha_lit.eval", *overrides, f"hydra.run.dir={run_dir}",
           "trainer.enable_progress_bar=false"]
    with open(out_dir / f"{name}.log", "w") as log_file:
        code = subprocess.call(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    if code != 0:
        return {"name": name, "error": f"exit code {code}; see {out_dir / f'{name}.log'}"}
    return {"name": name, "test_seq_acc": json.loads((run_dir / "metrics.json").read_text()).get("test/seq_acc")}


def bench_finetune(out_dir: Path, limits: tuple[int, ...] = (100, 200)) -> dict:
    """Does synthetic pre-training help on a real set with few labels? captcha_images_v2 with
    only ``limits`` training labels (the same fixed val and test splits), trained from scratch
    and fine-tuned from a model pre-trained on generated CAPTCHAs of the same charset."""
    pre = _train_run("finetune_pretrain", ["experiment=captcha_images_v2_pretrain"], out_dir, fresh_cache=True)
    result: dict = {"pretrain": pre, "rows": []}
    if "error" in pre:
        return result
    ckpt = pre["best_ckpt"]
    result["zero_shot"] = _eval_run("finetune_zero_shot", [f"ckpt_path={ckpt}", "data=captcha_images_v2"], out_dir)
    for n in limits:
        base = ["experiment=captcha_images_v2", f"data.train_limit={n}"]
        scratch = _train_run(f"finetune_scratch_{n}", base, out_dir, fresh_cache=False)
        tuned = _train_run(f"finetune_init_{n}", [*base, f"init_from={ckpt}"], out_dir, fresh_cache=False)
        result["rows"].append({"labels": n, "scratch": scratch, "pretrained": tuned})
    return result


def _newest_checkpoint() -> str | None:
    runs = sorted(ROOT.glob("outputs/train/runs/*/metrics.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for metrics in runs:
        best = json.loads(metrics.read_text()).get("best_ckpt")
        if best and Path(best).is_file():
            return best
    return None


def bench_parity(ckpt: str | None, out_dir: Path) -> dict:
    """ONNX against PyTorch on the checkpoint's whole fixed test split (2,000 images by default)."""
    if not ckpt:
        return {"error": "no checkpoint: pass --ckpt PATH, run `make train` first, or add train_default to --only"}
    run_dir = out_dir / "parity"
    cmd = [sys.executable, "-m", "captcha_lit.export", f"ckpt_path={ckpt}", f"hydra.run.dir={run_dir}",
           "parity.split=test", "parity.num_images=null", "parity.max_mismatch_rate=0.001"]
    with open(out_dir / "parity.log", "w") as log_file:
        code = subprocess.call(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    report_path = run_dir / "model.parity.json"
    if not report_path.is_file():
        return {"ckpt": ckpt, "error": f"export exited with code {code}; see {out_dir / 'parity.log'}"}
    report = json.loads(report_path.read_text())
    return {"ckpt": ckpt, "passed": report["passed"], **{k: report[k] for k in (
        "num_images", "text_agreement", "text_mismatches", "max_abs_logit_diff", "torch_seq_acc", "onnx_seq_acc")}}


# ---- distributed training: 1 process vs DDP with 2, equal total samples -------------------
def bench_ddp(repeats: int, num_train: int, epochs: int, out_dir: Path) -> dict:
    """The default model on CPU, trained by one process (batch 64) and by DDP with two gloo
    processes (batch 32 each: the same global batch, steps and samples), scored on the test split."""
    cache_dir = Path(tempfile.mkdtemp(prefix="captcha_lit_bench_ddp_cache_"))
    common = [f"data.num_train={num_train}", f"trainer.max_epochs={epochs}", f"data.cache_dir={cache_dir}",
              "trainer.accelerator=cpu", "trainer.enable_model_summary=false"]
    setups = {"one_process": ["trainer.devices=1", "data.batch_size=64"],
              "two_processes": ["trainer=ddp", "trainer.devices=2", "data.batch_size=32"]}
    runs: dict[str, list[dict]] = {name: [] for name in setups}
    try:
        from captcha_lit.training.builders import build_datamodule

        build_datamodule(_compose(common).data).prepare_data()  # generated once, outside the timed runs
        for r in range(repeats):
            for name, overrides in setups.items():  # interleaved, so machine load hits both alike
                runs[name].append(_train_run(f"ddp_{name}_run{r}", common + overrides + [f"seed={42 + r}"], out_dir,
                                             fresh_cache=False))
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    result: dict = {"num_train": num_train, "epochs": epochs, "total_samples": num_train * epochs,
                    "repeats": repeats}
    for name, name_runs in runs.items():
        ok = [r for r in name_runs if "error" not in r]
        result[name] = {"runs": name_runs, **{f"median_{key}": _median([r.get(key) for r in ok])
                                               for key in ("test_seq_acc", "test_char_acc", "wall_s", "train_img_s")}}
    one, two = result["one_process"]["median_test_seq_acc"], result["two_processes"]["median_test_seq_acc"]
    result["seq_acc_difference"] = round(two - one, 4) if one is not None and two is not None else None
    return result


# ---- streaming data: how long the training loop waits for batches -------------------------
def _data_wait_run(overrides: list[str], skip: int) -> dict:
    import lightning as L
    from lightning.pytorch.profilers import SimpleProfiler

    from captcha_lit.training.builders import build_datamodule, build_module

    class Span(L.Callback):
        """Wall time from the end of warm-up batch ``skip - 1`` to the end of the last batch."""

        def __init__(self):
            self.batches, self.samples, self.start, self.end = 0, 0, None, None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            now = time.perf_counter()
            self.batches += 1
            if self.batches == skip:
                self.start = now
            elif self.batches > skip:
                self.samples += int(batch["image"].shape[0])
                self.end = now

    # Lightning's profiler times each ``next()`` on the train DataLoader: the time the loop is
    # blocked on data. Work the module does on a batch it already holds (augmentation in
    # ``on_after_batch_transfer``) is busy time, not waiting.
    report_dir = Path(tempfile.mkdtemp(prefix="captcha_lit_bench_profile_"))
    profiler = SimpleProfiler(dirpath=report_dir, filename="profile")  # its report goes there, not to stdout
    span = Span()
    cfg = _compose(overrides)
    datamodule = build_datamodule(cfg.data, cfg.augmentation)
    module = build_module(cfg, datamodule)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[span], profiler=profiler)
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        shutil.rmtree(report_dir, ignore_errors=True)
    # next() call k (from 0) fetches batch k; those of batches skip.. fall inside the timed span.
    fetches = profiler.recorded_durations["[_TrainingEpochLoop].train_dataloader_next"]
    wait = sum(fetches[skip:span.batches])
    total = (span.end - span.start) if span.start is not None and span.end is not None else 0.0
    return {"wait_fraction": round(wait / total, 4) if total else None,
            "img_s": round(span.samples / total, 1) if total else None, "batches": span.batches - skip}


def bench_stream(repeats: int, batches: int, workers: int) -> dict:
    """The default model trained on streamed data generated by ``workers`` DataLoader workers,
    against the cached split read in the training process: the fraction of the training loop's
    time spent waiting for the next batch, and the images per second trained."""
    cache_dir = Path(tempfile.mkdtemp(prefix="captcha_lit_bench_stream_cache_"))
    batch = 64
    common = [f"data.num_train={batches * batch}", f"data.batch_size={batch}", "data.num_val=64", "data.num_test=64",
              f"data.cache_dir={cache_dir}"]
    setups = {f"streaming_{workers}_workers": ["data.streaming=true", f"data.num_workers={workers}"],
              "cached_0_workers": ["data.streaming=false", "data.num_workers=0"]}
    runs: dict[str, list[dict]] = {name: [] for name in setups}
    try:
        for _ in range(repeats):
            for name, overrides in setups.items():
                runs[name].append(_data_wait_run(common + overrides, skip=min(5, batches // 4)))
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    result: dict = {"batches": batches, "batch_size": batch, "workers": workers, "repeats": repeats,
                    "cpus": os.cpu_count()}
    for name, name_runs in runs.items():
        result[name] = {"runs": name_runs, "median_wait_fraction": _median([r["wait_fraction"] for r in name_runs]),
                        "median_img_s": _median([r["img_s"] for r in name_runs])}
    return result


# ---- report ----------------------------------------------------------------------------
def _f(value, digits: int = 4) -> str:
    return "n/a" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def _table(results: dict) -> str:
    rows = ["| benchmark | figure | value | target |", "|---|---|---|---|"]
    if "gen" in results:
        g = results["gen"]
        rows += [f"| data generation ({g['images']} img, median of {g['repeats']}) | 1 core | {g['single_core_img_s']} img/s | |",
                 f"| | {g['workers']} cores | {g['all_cores_img_s']} img/s | |",
                 f"| | speedup | {g['speedup']}x | >= 1.8x |"]
    if "load" in results:
        lo = results["load"]
        rows.append(f"| cached dataset load ({lo['images']} img, median of {lo['repeats']}) | time | {lo['load_s']} s | <= 5 s |")
    if "throughput" in results:
        for name, t in results["throughput"].items():
            rows.append(f"| throughput {name} (input {t['input_size']}, {t['params']} params) | train, batch 64, "
                        f"{t.get('precision', '32-true')} | {t['train_img_s']} img/s | |")
            if t.get("precision", "32-true") != "32-true" and "train_fp32_img_s" in t:
                rows.append(f"| | train, batch 64, 32-true (baseline) | {t['train_fp32_img_s']} img/s | |")
            rows.append(f"| | inference, batch 256 | {t['infer_img_s_b256']} img/s | |")
    if "onnx" in results:
        o = results["onnx"]
        rows += [f"| ONNX Runtime, default model ({o['arch']}, input {o['input_size']}, {o['threads']} threads, "
                 f"median of {o['repeats']}) | inference + decoding, batch 256 | {o['onnx_img_s_b256']} img/s | |",
                 f"| | PyTorch baseline, batch 256 | {o['torch_img_s_b256']} img/s | |",
                 f"| | Solver.solve on PNG bytes, p50 / p99 | {o['solve_p50_ms']} / {o['solve_p99_ms']} ms | |"]
        for name, h in (o.get("http") or {}).items():
            if "error" in h:
                rows.append(f"| HTTP {name} | load test | FAILED: {h['error']} | |")
                continue
            target = "p50 <= 20, p99 <= 100 ms" if name == "default" else ""
            rows += [f"| HTTP POST /v1/solve, {name} ({' '.join(h['server_options']) or 'as shipped'}; "
                     f"{h['clients']} clients, {h['seconds']:g} s, median of {h['repeats']}) | latency p50 / p99 | "
                     f"{h['p50_ms']:.1f} / {h['p99_ms']:.1f} ms | {target} |",
                     f"| | throughput | {h['req_s']:.0f} req/s ({h['requests']} requests, {h['errors']} errors) | |",
                     f"| | server RSS before / after | {h['server_rss_before_mb']} / {h['server_rss_after_mb']} MB | |"]
    if "ddp" in results:
        d = results["ddp"]
        one, two = d["one_process"], d["two_processes"]
        rows += [f"| DDP on CPU, default model, {d['num_train']} samples x {d['epochs']} epochs (median of "
                 f"{d['repeats']}) | test seq acc, 1 process / 2 processes (gloo) | {_f(one['median_test_seq_acc'])} / "
                 f"{_f(two['median_test_seq_acc'])} (difference {_f(d['seq_acc_difference'])}) | same accuracy |",
                 f"| | wall time, 1 / 2 processes | {one['median_wall_s']} / {two['median_wall_s']} s | |",
                 f"| | train throughput, 1 / 2 processes | {one['median_train_img_s']} / "
                 f"{two['median_train_img_s']} img/s | |"]
    if "stream" in results:
        st = results["stream"]
        for name in (k for k in st if isinstance(st[k], dict)):
            wait = st[name]["median_wait_fraction"]
            target = "<= 10% (trainer >= 90% busy)" if name.startswith("streaming") else ""
            rows.append(f"| data wait, default model, {st['batches']} batches of {st['batch_size']}, "
                        f"{name.replace('_', ' ')} (median of {st['repeats']}) | time waiting for data / img/s | "
                        f"{'n/a' if wait is None else f'{wait:.1%}'} / {st[name]['median_img_s']} | {target} |")
    for key, (_, target) in TRAINING.items():
        if key in results:
            t = results[key]
            seeds = [str(r["seed"]) for r in t["runs"] if "error" not in r]
            n, spread = len(seeds), t.get("test_seq_acc_range")
            spread = f" (seeds {', '.join(seeds)}: {_f(spread[0])} to {_f(spread[1])})" if n > 1 and spread else ""
            rows += [f"| {key} ({' '.join(t['overrides']) or 'no overrides'}; median of {n}) | test seq acc | "
                     f"{_f(t['median_test_seq_acc'])}{spread} | {target} |",
                     f"| | wall time (incl. data generation) | {t['median_wall_s']} s | |",
                     f"| | peak RSS (process tree) | {t['median_peak_rss_gb']} GB | |",
                     f"| | val seq acc at 5 / 10 / 15 min | {_f(t['median_val_seq_acc_at_5min'])} / "
                     f"{_f(t['median_val_seq_acc_at_10min'])} / {_f(t['median_val_seq_acc_at_15min'])} | |",
                     f"| | train throughput | {t['median_train_img_s']} img/s | |"]
            for r in t["runs"]:
                if "error" in r:
                    rows.append(f"| | {r['name']} | FAILED: {r['error']} | |")
    if "finetune" in results:
        f = results["finetune"]
        pre = f["pretrain"]
        if "error" in pre:
            rows.append(f"| fine-tuning study | pre-training | FAILED: {pre['error']} | |")
        else:
            rows.append(f"| fine-tuning study (captcha_images_v2, fixed 208-image test split) | synthetic pre-training: "
                        f"synthetic test acc / wall | {_f(pre['test_seq_acc'])} / {pre['wall_s']} s | |")
            zero = f.get("zero_shot") or {}
            rows.append(f"| | pre-trained model on the real test split, no real labels | "
                        f"{_f(zero.get('test_seq_acc')) if 'error' not in zero else 'FAILED: ' + zero['error']} | |")
            for row in f["rows"]:
                for kind in ("scratch", "pretrained"):
                    r = row[kind]
                    value = f"FAILED: {r['error']}" if "error" in r else f"{_f(r['test_seq_acc'])} ({r['wall_s']} s)"
                    rows.append(f"| | {row['labels']} real labels, {'from scratch' if kind == 'scratch' else 'fine-tuned from synthetic'}"
                                f" | {value} | |")
    if "parity" in results:
        p = results["parity"]
        if "error" in p:
            rows.append(f"| ONNX parity | | FAILED: {p['error']} | |")
        else:
            rows += [f"| ONNX parity on the test split ({p['num_images']} images) | decoded texts agree | "
                     f"{p['text_agreement']:.2%} ({p['text_mismatches']} differ) | >= 99.9% |",
                     f"| | largest logit difference | {p['max_abs_logit_diff']:.2e} | |",
                     f"| | seq acc PyTorch / ONNX | {_f(p['torch_seq_acc'])} / {_f(p['onnx_seq_acc'])} | |"]
    return "\n".join(rows) + "\n"


ALL_BENCHMARKS = ("gen", "load", "throughput", "onnx", *TRAINING, "ddp", "stream", "finetune", "parity")
DEFAULT_BENCHMARKS = ALL_BENCHMARKS


def _save(out_dir: Path, results: dict) -> None:
    """Results so far, so that a long benchmark that is interrupted keeps what it measured."""
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(DEFAULT_BENCHMARKS),
                        help=f"comma-separated subset of: {', '.join(ALL_BENCHMARKS)} (default: {','.join(DEFAULT_BENCHMARKS)})")
    parser.add_argument("--ckpt", default=None, help="checkpoint of the parity benchmark (default: this run's "
                        "train_default model, else the newest trained one under outputs/train)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the quick benchmarks")
    parser.add_argument("--train-repeats", type=int, default=1,
                        help="repeats of each full training run (train_*: up to 20 min each; ddp: ~3 min per setup)")
    parser.add_argument("--gen-images", type=int, default=3000)
    parser.add_argument("--load-images", type=int, default=100_000)
    parser.add_argument("--http-seconds", type=float, default=30.0,
                        help="length of the HTTP load test in the onnx benchmark (0 skips it)")
    parser.add_argument("--http-clients", type=int, default=16, help="concurrent clients of the HTTP load test")
    parser.add_argument("--ddp-samples", type=int, default=20_000, help="training samples per epoch of --only ddp")
    parser.add_argument("--ddp-epochs", type=int, default=3, help="epochs of each --only ddp run")
    parser.add_argument("--stream-batches", type=int, default=60, help="training batches timed by --only stream")
    parser.add_argument("--stream-workers", type=int, default=2, help="DataLoader workers generating the stream")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench"))
    args = parser.parse_args(argv)
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    known = set(ALL_BENCHMARKS)
    unknown = set(wanted) - known
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; choose from {', '.join(sorted(known))}")
    out_dir = Path(args.out) / time.strftime("%Y-%m-%d_%H-%M-%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    if "gen" in wanted:
        results["gen"] = bench_generation(args.repeats, args.gen_images)
    if "load" in wanted:
        results["load"] = bench_cache_load(args.repeats, args.load_images)
    if "throughput" in wanted:
        results["throughput"] = bench_throughput(args.repeats)
    if "onnx" in wanted:
        results["onnx"] = bench_onnx(args.repeats, args.http_seconds, args.http_clients)
    for key, (overrides, _) in TRAINING.items():
        if key in wanted:
            results[key] = bench_training(key.removeprefix("train_"), overrides, args.train_repeats, out_dir)
            _save(out_dir, results)
    if "ddp" in wanted:
        results["ddp"] = bench_ddp(args.train_repeats, args.ddp_samples, args.ddp_epochs, out_dir)
        _save(out_dir, results)
    if "stream" in wanted:
        results["stream"] = bench_stream(args.repeats, args.stream_batches, args.stream_workers)
        _save(out_dir, results)
    if "finetune" in wanted:
        results["finetune"] = bench_finetune(out_dir)
    if "parity" in wanted:
        ckpt = args.ckpt
        if ckpt is None and "train_default" in results:
            ckpt = next((r["best_ckpt"] for r in results["train_default"]["runs"] if r.get("best_ckpt")), None)
        results["parity"] = bench_parity(ckpt or _newest_checkpoint(), out_dir)
    _save(out_dir, results)
    table = _table(results)
    (out_dir / "table.md").write_text(table)
    print(table)
    print(f"written to {out_dir}")
    return results


if __name__ == "__main__":
    main()
