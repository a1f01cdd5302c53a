import csv
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from captcha_lit.report import collect, main as report_main, write_report
from captcha_lit.utils import check_model_path, entry_point, flatten, write_json


def test_entry_point_turns_bad_input_into_exit_code_2(capsys, monkeypatch):
    @entry_point
    def bad():
        raise ValueError("data.length=0 is wrong")

    with pytest.raises(SystemExit) as info:
        bad()
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: data.length=0 is wrong"

    @entry_point
    def missing():
        raise FileNotFoundError("checkpoint 'x.ckpt' does not exist")

    with pytest.raises(SystemExit) as info:
        missing()
    assert info.value.code == 2
    assert "x.ckpt" in capsys.readouterr().err


def test_entry_point_debug_shows_traceback(monkeypatch):
    monkeypatch.setenv("CAPTCHA_LIT_DEBUG", "1")

    @entry_point
    def bad():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        bad()


def test_entry_point_passes_through_results_and_other_errors():
    assert entry_point(lambda: 3.5)() == 3.5

    @entry_point
    def crash():
        raise RuntimeError("a real bug")

    with pytest.raises(RuntimeError):  # programming errors keep their traceback
        crash()


def test_write_json_is_complete_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    write_json(path, {"a": 1.5, "path": tmp_path})
    assert json.loads(path.read_text()) == {"a": 1.5, "path": str(tmp_path)}
    write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]


@pytest.mark.parametrize("kind, how_to_get, suffix", [("checkpoint", "train one with `make train`", ".ckpt"),
                                                      ("model", "export one with `python -m captcha_lit.export", ".onnx")])
def test_a_missing_model_path_says_how_to_get_one(tmp_path, kind, how_to_get, suffix):
    with pytest.raises(FileNotFoundError, match=rf"{kind} '.*none{suffix}' does not exist; {how_to_get}"):
        check_model_path(tmp_path / f"none{suffix}", kind)
    with pytest.raises(ValueError, match=f"no {kind} given"):
        check_model_path("???", kind)
    with pytest.raises(ValueError, match=rf"is a directory; pass the \{suffix} file inside it"):
        check_model_path(tmp_path, kind)
    (tmp_path / f"m{suffix}").write_bytes(b"")
    assert check_model_path(tmp_path / f"m{suffix}", kind) == tmp_path / f"m{suffix}"


def test_flatten():
    flat = flatten({"model": {"name": "cnn", "channels": [8, 16]}, "seed": None, "lr": 1e-3})
    assert flat == {"model/name": "cnn", "model/channels": "[8, 16]", "seed": "null", "lr": 1e-3}


def _job(sweep, num, overrides, metrics=None):
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))


def test_sweep_report_sorts_best_first_and_lists_every_job(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _job(sweep, 0, ["model=cnn", "seed=1"], {"val/seq_acc_best": 0.5, "test/seq_acc": 0.4, "best_ckpt": "a.ckpt"})
    _job(sweep, 10, ["model=resnet", "seed=1"], {"val/seq_acc_best": 0.75, "test/seq_acc": 0.3})
    _job(sweep, 2, ["model=crnn", "seed=1", "optimizer=sgd"])  # still running or crashed
    rows = collect(sweep)
    assert [r["job"] for r in rows] == ["0", "2", "10"]  # numeric, not lexical, order
    assert [r["status"] for r in rows] == ["done", "unfinished", "done"]
    assert rows[1]["overrides"] == "model=crnn seed=1 optimizer=sgd"

    rows, text = write_report(sweep)
    assert [r["job"] for r in rows] == ["10", "0", "2"]  # best val/seq_acc_best first, unfinished last
    with open(sweep / "summary.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["model"] for r in table] == ["resnet", "cnn", "crnn"]  # a column per override
    assert [r["optimizer"] for r in table] == ["", "", "sgd"]
    assert table[1]["test/seq_acc"] == "0.4" and table[1]["best_ckpt"] == "a.ckpt"
    md = (sweep / "summary.md").read_text()
    assert md.startswith("overrides of every job: seed=1\n")  # shared overrides once, above the table
    assert "| job | status | val/seq_acc_best | test/seq_acc |" in md
    assert "| 10 | done | 0.7500 | 0.3000 |" in md and md.rstrip().endswith("| crnn | sgd |")
    assert "sorted by val/seq_acc_best (highest first)" in text and md in text

    rows, _ = write_report(sweep, sort="test/seq_acc")
    assert [r["job"] for r in rows] == ["0", "10", "2"]
    rows, _ = write_report(sweep, sort="test/seq_acc", ascending=True)
    assert [r["job"] for r in rows] == ["10", "0", "2"]

    (sweep / "optimization_results.yaml").write_text(
        yaml.safe_dump({"name": "optuna", "best_params": {"optimizer.lr": 0.003}, "best_value": 0.75}))
    report_main([str(sweep)])
    assert "optuna best: 0.7500 with optimizer.lr=0.003" in capsys.readouterr().out


def test_parallel_jobs_share_the_cores(monkeypatch):
    from omegaconf import OmegaConf

    from captcha_lit import utils

    monkeypatch.setattr(utils, "available_cores", lambda: 8)
    joblib = lambda n: OmegaConf.create({"_target_": "JoblibLauncher", "n_jobs": n})  # noqa: E731
    assert [utils.parallel_jobs(joblib(n)) for n in (1, 2, 3, -1, -2, 100, None)] == [1, 2, 3, 8, 7, 8, 1]
    assert utils.parallel_jobs(OmegaConf.create({"_target_": "BasicLauncher"})) == 1
    assert utils.parallel_jobs(None) == 1
    assert [utils.job_cores(n) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]


_FAULTS_PER_STEP = """
import resource, sys
import numpy as np
from captcha_lit.utils import keep_freed_memory

kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def step():  # allocates, writes and frees 64 MB, past the 32 MB up to which glibc adapts by itself
    np.ones(16 << 20, dtype=np.float32).sum()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_kept_freed_memory_is_not_faulted_in_again_every_step():
    def faults(mode: str) -> tuple[str, float]:
        out = subprocess.run([sys.executable, "-c", _FAULTS_PER_STEP, mode], capture_output=True, text=True,
                             check=True).stdout.split()
        return out[0], float(out[1])

    kept, with_setting = faults("keep")
    _, without = faults("plain")
    assert kept == "True"
    # By default the block is mapped afresh and faulted in again on every step; kept, the steps
    # after the first reuse its pages.
    assert without >= 16 and with_setting == 0, (with_setting, without)


@pytest.mark.parametrize("flags, features", [
    ({"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"}, ["AMX"]),
    ({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}, ["AVX512-BF16", "VNNI"]),
    ({"avx2", "avx512f", "avx512_vnni"}, ["AVX-512", "VNNI"]),
    ({"avx2", "avx_vnni"}, ["AVX2", "VNNI"]),
    ({"avx2", "fma"}, ["AVX2"]),
    ({"sse4_2"}, []),
])
def test_cpu_features_name_what_sets_training_and_int8_speed(flags, features):
    from captcha_lit.utils import cpu_features

    assert cpu_features(flags) == features


def test_the_machine_names_its_cpu_features_within_the_cpu_column():
    from captcha_lit.bench.tables import cpu_name
    from captcha_lit.utils import cpu_features, cpu_model_and_flags, machine_description

    if not Path("/proc/cpuinfo").exists():
        pytest.skip("reads the CPU's flags from Linux's /proc/cpuinfo")
    model, flags = cpu_model_and_flags()
    assert model
    if platform.machine() == "x86_64":  # every x86-64 CPU has SSE2: the flags line was found and split
        assert "sse2" in flags
    features = cpu_features(flags)
    machine = machine_description()
    cpu, cores, memory = machine.split(", ")
    assert cores.endswith(" cores") and memory.endswith(" GiB")
    assert cpu == (f"{model} ({' '.join(features)})" if features else model)
    if features:  # the results table's CPU column keeps them
        assert cpu_name(machine).endswith(f"({' '.join(features)})")
