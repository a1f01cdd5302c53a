"""Shared fixtures: Hydra-composed configs that write only into temporary folders.

Every generated split goes into one cache folder per test session, so tests that
use the same data sizes generate it once. Nothing is written under the
repository, ``~/.cache`` or any shared folder.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
FIXTURES = Path(__file__).resolve().parent / "fixtures"  # committed test data
TINY_FOLDER = FIXTURES / "tiny_folder"  # 48 labeled 120x40 CAPTCHAs: 33 train, 5 val, 10 test



def synthetic_data(**overrides) -> dict:
    """CaptchaDataModule arguments: conf/data/synthetic.yaml's (the recipe's), with ``overrides``."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "data" / "synthetic.yaml"))
    length = data.pop("length")
    data.update(min_length=length, max_length=length, cache_dir="~/.cache/captcha_lit")
    for key in ("source", "mean", "std"):
        data.pop(key)
    return {**data, **overrides}


# Tiny but real: a few batches of every split at the default model input size.
TINY_DATA = [
    "data.num_train=64",
    "data.num_val=32",
    "data.num_test=32",
    "data.input_size=[32,96]",
    "data.batch_size=16",
    "data.eval_batch_size=32",
    "data.gen_workers=1",
]
QUIET_TRAINER = [
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.num_sanity_val_steps=0",
]
# The audit's points on TINY_FOLDER: a small model on small inputs, 30 batches of 8 per epoch, 3 epochs.
AUDIT_TINY_RUN = ["model=crnn", "model.channels=[8,16,32,32]", "model.dim=32", "data.input_size=[32,96]",
                  "data.batch_size=8", "data.train_samples_per_epoch=240", "trainer.max_steps=90", "logger=csv",
                  *QUIET_TRAINER]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One generated-data cache for the whole session."""
    return tmp_path_factory.mktemp("captcha_cache")


@pytest.fixture(autouse=True)
def _isolated_cache_env(cache_dir, monkeypatch):
    """Anything that falls back to CAPTCHA_LIT_CACHE uses the session's temporary cache."""
    monkeypatch.setenv("CAPTCHA_LIT_CACHE", str(cache_dir))
    monkeypatch.delenv("CAPTCHA_LIT_DEBUG", raising=False)


def _compose(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose like ``@hydra.main`` does, with the run directory pointed at ``output_dir``.

    The returned config has no ``hydra`` node (as in a real run), but HydraConfig is set,
    so ``${hydra:...}`` interpolations and ``HydraConfig.get()`` work.
    """
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture
def make_cfg(tmp_path, cache_dir) -> Callable[..., DictConfig]:
    """``make_cfg("train", [overrides], name="run1")`` -> composed config writing into tmp_path/run1."""
    counter = {"n": 0}

    def make(config_name: str = "train", overrides: list[str] | None = None, name: str | None = None) -> DictConfig:
        counter["n"] += 1
        out = tmp_path / (name or f"{config_name}{counter['n']}")
        if config_name == "train":
            base = [f"data.cache_dir={cache_dir}", *TINY_DATA, *QUIET_TRAINER]
        elif config_name == "eval":
            base = [f"data.cache_dir={cache_dir}", "trainer.accelerator=cpu", "trainer.devices=1",
                    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
        else:  # predict, export, serve: the model brings its own data config and runs no Trainer
            base = []
        return _compose(config_name, base + list(overrides or []), out)

    return make


@pytest.fixture
def cfg_train(make_cfg) -> DictConfig:
    """The default train config with tiny data, one epoch, on CPU."""
    return make_cfg("train", ["trainer.max_epochs=1"])


@pytest.fixture(autouse=True)
def _clear_hydra():
    yield
    GlobalHydra.instance().clear()


def cli_env(cache_dir: Path) -> dict:
    """Environment for subprocess runs of the entry points."""
    env = dict(os.environ)
    env["CAPTCHA_LIT_CACHE"] = str(cache_dir)
    env.pop("CAPTCHA_LIT_DEBUG", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


PYTHON = sys.executable


def run_entry_points(commands: dict[str, list[str]], cache_dir: Path, timeout: float) -> dict[str, tuple[int, str, str]]:
    """``python -m <args>`` for each named command, all at once (they are mostly start-up time); their
    exit codes and outputs by name. Any still running when one fails to finish in time is killed."""
    procs = {name: subprocess.Popen([PYTHON, "-m", *args], cwd=REPO_ROOT, env=cli_env(cache_dir),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in commands.items()}
    results = {}
    try:
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=timeout)
            results[name] = (proc.returncode, stdout, stderr)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


# ---- deployment: tiny trained checkpoints of both decoder kinds, and their ONNX exports ----
SMALL_MODELS = {
    # 4 to 5 characters, so the positional decoder predicts an end symbol.
    "cnn": ["model=cnn", "model.channels=[8,16,16,32]", "model.hidden=64", "data.min_length=4"],
    "crnn": ["model=crnn", "model.channels=[8,16,32,32]", "model.dim=32"],
}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, cache_dir) -> dict[str, Path]:
    """A real one-epoch training run per decoder kind (positional cnn, CTC crnn): arch -> best checkpoint."""
    from captcha_lit.train import train

    checkpoints = {}
    for arch, overrides in SMALL_MODELS.items():
        out = tmp_path_factory.mktemp(f"tiny_{arch}")
        cfg = _compose("train", [f"data.cache_dir={cache_dir}", *TINY_DATA, *QUIET_TRAINER, *overrides,
                                 "trainer.max_epochs=1", "logger=csv", "test=false"], out)
        checkpoints[arch] = Path(train(cfg)["best_ckpt"])
    GlobalHydra.instance().clear()
    return checkpoints


@pytest.fixture(scope="session")
def exported_models(tiny_checkpoints, tmp_path_factory) -> dict[str, dict]:
    """``python -m captcha_lit.export`` on each tiny checkpoint: arch -> {run_dir, onnx, report}."""
    from captcha_lit.deploy.export import export

    exported = {}
    for arch, ckpt in tiny_checkpoints.items():
        out = tmp_path_factory.mktemp(f"export_{arch}")
        cfg = _compose("export", [f"ckpt_path={ckpt}", "parity.num_images=24"], out)
        report = export(cfg)
        exported[arch] = {"run_dir": out, "onnx": out / "model.onnx", "report": report}
    GlobalHydra.instance().clear()
    return exported


@pytest.fixture
def make_module() -> Callable[..., object]:
    """A CaptchaModule from spec fields and module options, with the defaults of a small test model."""
    from captcha_lit.models import model_decoder
    from captcha_lit.spec import ModelSpec
    from captcha_lit.training.module import CaptchaModule

    def build(arch: str = "crnn", *, charset: str = "0-9A-Z", min_length: int = 5, max_length: int = 5,
              input_size=(32, 96), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), beam_width: int = 1, **options):
        spec = ModelSpec(charset=charset, min_length=min_length, max_length=max_length, input_size=tuple(input_size),
                         mean=tuple(mean), std=tuple(std), decoder=model_decoder(arch), arch=arch,
                         beam_width=beam_width)
        return CaptchaModule(spec=spec, **options)

    return build


# ---- servers in subprocesses, and a real headless Chromium to drive their pages ------------------
def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, proc, log_path: Path, timeout: float = 180.0) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log if it exits or never does."""
    import time

    import httpx

    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, f"server did not start:\n{log_path.read_text()[-3000:]}"
        time.sleep(0.1)


@contextlib.contextmanager
def serving(options: list[str], out: Path, cache_dir: Path, env: dict | None = None, timeout: float = 180.0):
    """``python -m captcha_lit.serve <options>`` on a free port, once it answers: (url, port, log
    path). Its output goes to ``out/server.log``; it is stopped (SIGTERM, then SIGKILL) afterwards."""
    port = free_port()
    cmd = [PYTHON, "-m", "captcha_lit.serve", f"port={port}", "access_log=false", f"hydra.run.dir={out}", *options]
    log_path = out / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**cli_env(cache_dir), **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/health", proc, log_path, timeout)
        yield url, port, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# Debian's packages (`make setup` and .ci/run install them); nothing is downloaded at run time.
CHROMIUM_BINARIES = ("chromium", "chromium-browser")
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--window-size=1100,900")


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    """A headless Chromium driven by Selenium, one per test module. Without the browser the test is
    skipped on a developer's machine and fails under CI, where it must run."""
    import shutil

    binary = next(filter(None, map(shutil.which, CHROMIUM_BINARIES)), None)
    driver_path = shutil.which("chromedriver")
    missing = [name for name, found in (("chromium", binary), ("chromedriver", driver_path)) if not found]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if missing:
        message = f"browser tests need {', '.join(missing)}: run `make setup`"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))  # a given driver: no Selenium Manager
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver, folder: Path, name: str) -> Path:
    """A PNG of the page in ``folder``, also copied to $CAPTCHA_LIT_SCREENS when that is set."""
    import shutil

    path = folder / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"no screenshot of {name}"
    if os.environ.get("CAPTCHA_LIT_SCREENS"):
        target = Path(os.environ["CAPTCHA_LIT_SCREENS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / path.name)
    return path
