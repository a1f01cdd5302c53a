"""Bad checkpoints and bad settings end every consumer with one line and exit code 2: resuming
(ckpt_path= and resume=auto), eval, predict, export, serve and init_from refuse random, empty,
truncated, foreign, malicious and edited files, never suggesting weights_only=False."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

from captcha_lit.deploy.export import export
from captcha_lit.deploy.serve import serve
from captcha_lit.eval import evaluate
from captcha_lit.predict import predict
from captcha_lit.train import train
from captcha_lit.training.checkpoints import init_from_checkpoint, load_module
from captcha_lit.utils import entry_point
from conftest import FIXTURES

SMALL_CRNN = ["model=crnn", "model.channels=[8,16,32,32]", "model.dim=32", "trainer.max_epochs=1", "logger=csv"]


class _RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def bad_files(folder: Path, real: Path) -> dict[str, Path]:
    data = real.read_bytes()
    files = {"random": os.urandom(4096), "empty": b"", "truncated": data[: len(data) // 2]}
    paths = {}
    for name, content in files.items():
        paths[name] = folder / f"{name}.ckpt"
        paths[name].write_bytes(content)
    paths["not lightning"] = folder / "plain.ckpt"
    torch.save({"weights": torch.zeros(3)}, paths["not lightning"])
    paths["malicious"] = folder / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": _RunsCode(folder / "PWNED")}, paths["malicious"])
    return paths


def edited(folder: Path, real: Path) -> dict[str, Path]:
    """Copies of ``real`` with edited hyperparameters (item 9) or length range (item 10)."""
    def write(name: str, change) -> Path:
        state = torch.load(real, map_location="cpu", weights_only=True)
        change(state)
        path = folder / f"{name}.ckpt"
        torch.save(state, path)
        return path

    def spec(key, value):
        return lambda state: state["hyper_parameters"]["spec"].__setitem__(key, value)

    return {
        "charset not a string": write("charset_int", spec("charset", 12345)),
        "charset of another size": write("charset_digits", spec("charset", "0123456789")),
        "unknown key": write("unknown", lambda state: state["hyper_parameters"].__setitem__("backdoor", 1)),
        "no state_dict": write("no_weights", lambda state: state.pop("state_dict")),
        "length range edited": write("lengths", spec("max_length", 8)),
    }


def _one_line_exit(capsys, fn, *args) -> str:
    """Run ``fn`` as an entry point does; it must exit with code 2 and one line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        entry_point(fn)(*args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "weights_only=False" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def crnn_ckpt(tiny_checkpoints) -> Path:
    return tiny_checkpoints["crnn"]


def test_resume_refuses_bad_checkpoints_in_one_line(make_cfg, crnn_ckpt, tmp_path, capsys):
    for name, path in bad_files(tmp_path, crnn_ckpt).items():
        err = _one_line_exit(capsys, train, make_cfg("train", SMALL_CRNN + [f"ckpt_path={path}"]))
        assert str(path) in err, (name, err)
        # resume=auto with that file as the run's last.ckpt: the message says how to go on
        cfg = make_cfg("train", SMALL_CRNN + ["resume=auto"], name=f"auto_{name.replace(' ', '_')}")
        last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        last.parent.mkdir(parents=True)
        last.write_bytes(path.read_bytes())
        err = _one_line_exit(capsys, train, cfg)
        assert "resume=auto" in err and "Delete it to start this run afresh" in err, (name, err)
    assert not (tmp_path / "PWNED").exists()
    # A finished inference checkpoint of another model is not a run to resume either.
    err = _one_line_exit(capsys, train, make_cfg("train", SMALL_CRNN + ["model.dim=48", f"ckpt_path={crnn_ckpt}"]))
    assert "holds a different model than this run builds (model.dim=32 there, 48 here)" in err


def test_every_consumer_refuses_edited_and_bad_checkpoints(make_cfg, crnn_ckpt, tmp_path, capsys):
    cases = {**bad_files(tmp_path, crnn_ckpt), **edited(tmp_path, crnn_ckpt)}
    expected = {"charset not a string": "charset=12345 must be a string",
                "charset of another size": "was edited after training",
                "unknown key": "unknown key(s) backdoor",
                "no state_dict": "no state_dict",
                "length range edited": "was edited after training",
                "malicious": "needs unsafe unpickling",
                "not lightning": "not a captcha_lit checkpoint"}
    for name, path in cases.items():
        for consumer, run in (("eval", lambda: (evaluate, make_cfg("eval", [f"ckpt_path={path}"]))),
                              ("predict", lambda: (predict, make_cfg("predict", [f"ckpt_path={path}",
                                                                                f"inputs={crnn_ckpt}"]))),
                              ("export", lambda: (export, make_cfg("export", [f"ckpt_path={path}"])))):
            fn, cfg = run()
            err = _one_line_exit(capsys, fn, cfg)
            assert expected.get(name, str(path)) in err, (name, consumer, err)
        with pytest.raises(ValueError) as info:
            load_module(path)
        assert "\n" not in str(info.value)
    module, _ = load_module(crnn_ckpt)
    for name in ("charset not a string", "unknown key", "no state_dict", "malicious"):
        with pytest.raises(ValueError, match=expected[name].replace("(", r"\(").replace(")", r"\)")):
            init_from_checkpoint(module, cases[name])
    assert not (tmp_path / "PWNED").exists()


def test_resume_after_the_last_epoch_keeps_the_best_score_and_timeline(make_cfg, monkeypatch):
    """Killed after its last epoch, before the test: resume=auto must still record val/seq_acc_best."""
    import lightning

    straight = train(make_cfg("train", SMALL_CRNN, name="straight"))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed between the last epoch and the test")

    monkeypatch.setattr(lightning.Trainer, "test", killed)
    cfg = make_cfg("train", SMALL_CRNN + ["resume=auto"], name="late")
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()
    assert not (Path(cfg.paths.output_dir) / "metrics.json").exists()
    resumed = train(make_cfg("train", SMALL_CRNN + ["resume=auto"], name="late"))
    assert resumed["resumed_from"].endswith("last.ckpt")
    for key in ("val/seq_acc_best", "val/seq_acc", "test/seq_acc", "epochs"):
        assert resumed[key] == straight[key] is not None, key
    assert [p["epoch"] for p in resumed["timeline"]] == [p["epoch"] for p in straight["timeline"]] == [0]


def test_serve_and_export_settings_fail_in_one_line(make_cfg, crnn_ckpt, capsys, monkeypatch):
    onnx = FIXTURES / "compat_640dca3" / "crnn.onnx"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for workers in (1, 2):
            err = _one_line_exit(capsys, serve, make_cfg("serve", [f"model_path={onnx}", f"port={port}",
                                                                   f"workers={workers}"]))
            assert f"cannot listen on 127.0.0.1:{port}" in err and "choose another port=" in err
    err = _one_line_exit(capsys, serve, make_cfg("serve", [f"model_path={onnx}", "port=70000"]))
    assert "port=70000 is out of range" in err
    err = _one_line_exit(capsys, serve, make_cfg("serve", [f"model_path={onnx}", "request_timeout=0"]))
    assert "request_timeout=0 must be a number of seconds > 0" in err
    err = _one_line_exit(capsys, export, make_cfg("export", [f"ckpt_path={crnn_ckpt}", "opset=3"]))
    assert "opset=3: torch cannot export" in err and "use opset=17" in err
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if the deploy extra were not installed
    err = _one_line_exit(capsys, export, make_cfg("export", [f"ckpt_path={crnn_ckpt}"]))
    assert "export needs onnx" in err and "pip install -e '.[deploy]'" in err


def test_eval_builds_only_the_test_split_in_this_machines_cache(crnn_ckpt, tmp_path, monkeypatch):
    """A checkpoint moved to another machine names a cache folder that does not exist there; eval must
    use $CAPTCHA_LIT_CACHE (or data.cache_dir when given) and generate only the split it tests on."""
    from conftest import _compose

    state = torch.load(crnn_ckpt, map_location="cpu", weights_only=True)
    state["datamodule_hyper_parameters"]["cache_dir"] = "/nonexistent/other/machine/cache"
    moved = tmp_path / "moved.ckpt"
    torch.save(state, moved)
    for given in (False, True):
        cache = tmp_path / f"cache_{given}"
        monkeypatch.setenv("CAPTCHA_LIT_CACHE", str(tmp_path / "env_cache") if given else str(cache))
        overrides = [f"ckpt_path={moved}", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]
        overrides += [f"data.cache_dir={cache}"] if given else []
        metrics = evaluate(_compose("eval", overrides, tmp_path / f"eval_{given}"), overrides)
        assert metrics["num_test"] == 32
        assert sorted(p.name.split("-")[1] for p in cache.iterdir() if p.is_dir()) == ["test"]
    assert not Path("/nonexistent").exists()
