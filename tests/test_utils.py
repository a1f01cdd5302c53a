import csv
import json

import pytest
import yaml

from captcha_lit.summary import collect, to_markdown, write_summary
from captcha_lit.utils import entry_point, flatten, write_json


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


def test_flatten():
    flat = flatten({"model": {"name": "cnn", "channels": [8, 16]}, "seed": None, "lr": 1e-3})
    assert flat == {"model/name": "cnn", "model/channels": "[8, 16]", "seed": "null", "lr": 1e-3}


def _job(sweep, num, overrides, metrics=None):
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))


def test_sweep_summary_lists_every_job_in_order(tmp_path):
    sweep = tmp_path / "sweep"
    _job(sweep, 0, ["model=cnn"], {"test/seq_acc": 0.5, "best_ckpt": "a.ckpt"})
    _job(sweep, 10, ["model=resnet"], {"test/seq_acc": 0.75})
    _job(sweep, 2, ["model=crnn", "optimizer=sgd"])  # still running or crashed
    rows = collect(sweep)
    assert [r["job"] for r in rows] == ["0", "2", "10"]  # numeric, not lexical, order
    assert [r["status"] for r in rows] == ["done", "unfinished", "done"]
    assert rows[1]["overrides"] == "model=crnn optimizer=sgd"

    write_summary(sweep)
    with open(sweep / "summary.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["overrides"] for r in table] == ["model=cnn", "model=crnn optimizer=sgd", "model=resnet"]
    assert table[0]["test/seq_acc"] == "0.5" and table[0]["best_ckpt"] == "a.ckpt"
    md = (sweep / "summary.md").read_text()
    assert "| 0 | model=cnn | done | 0.5000 |" in md
    assert md == to_markdown(rows)
