"""The labeling page in a real headless Chromium, typed at by keyboard alone, on a folder of generated
CAPTCHAs with a small trained checkpoint; its server is killed and restarted in between."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from captcha_lit.data.files import read_labels_csv
from captcha_lit.data.synthetic import CaptchaGenerator, GeneratorSpec
from captcha_lit.labeling.order import order_images
from captcha_lit.labeling.rules import LabelRules
from captcha_lit.predict import open_model, predict_files
from captcha_lit.utils import available_cores
from conftest import PYTHON, REPO_ROOT, cli_env, free_port, screenshot, wait_until_up

pytest.importorskip("selenium", reason="the browser tests need selenium: pip install -e '.[dev]'")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow
NUM_IMAGES = 60
LATENCY_LABELS = 30  # saves timed in the browser, for the p95
TARGET_P95_MS = 50.0


class LabelServer:
    """``python -m captcha_lit.label`` on one folder and port, started and killed like a user would."""

    def __init__(self, folder, ckpt, log_dir, cache_dir):
        self.folder, self.ckpt, self.log_dir, self.cache_dir = folder, ckpt, log_dir, cache_dir
        self.port, self.proc, self.starts = free_port(), None, 0
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        log_path = self.log_dir / f"server{self.starts}.log"
        cmd = [PYTHON, "-m", "captcha_lit.label", f"path={self.folder}", f"ckpt_path={self.ckpt}",
               f"port={self.port}", f"hydra.run.dir={self.log_dir / f'run{self.starts}'}"]
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=cli_env(self.cache_dir), stdout=log,
                                         stderr=subprocess.STDOUT)
        wait_until_up(f"{self.url}/api/session", self.proc, log_path)

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no chance to flush or clean up anything
        self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Generated CAPTCHAs whose names do not give their text away; their texts, by file name."""
    folder = tmp_path_factory.mktemp("to_label")
    generator = CaptchaGenerator(GeneratorSpec(min_length=5, max_length=5, input_size=(60, 160)))
    truth = {}
    for i in range(NUM_IMAGES):
        text, array = generator.sample("label-page-tests", "files", i)
        Image.fromarray(array).save(folder / f"c{i:02d}.png")
        truth[f"c{i:02d}.png"] = text
    return folder, truth


@pytest.fixture(scope="module")
def server(folder, tiny_checkpoints, tmp_path_factory, cache_dir):
    server = LabelServer(folder[0], tiny_checkpoints["crnn"], tmp_path_factory.mktemp("label_logs"), cache_dir)
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def readings(folder, tiny_checkpoints):
    """What the checkpoint reads in each file, and the page order that follows: least sure first."""
    spec, solve = open_model(str(tiny_checkpoints["crnn"]))
    paths = sorted(p.name for p in folder[0].glob("*.png"))
    rows = predict_files([folder[0] / p for p in paths], spec.input_size, spec.channels, solve, 64)
    order = [paths[i] for i in order_images(paths, [r["confidence"] for r in rows])]
    return {p: r["text"] for p, r in zip(paths, rows)}, order


def _shown(driver) -> dict:
    """What the page shows now, read in one go: the image's place and file, the text box, the counts."""
    where, text, counts = driver.execute_script("""
        const counts = {};
        for (const span of document.querySelectorAll("#counts span")) {
          counts[span.id.replace("count-", "")] = span.querySelector("b").textContent;
        }
        return [document.getElementById("where").textContent, document.getElementById("text").value, counts];""")
    return {"position": int(where.split(" of ")[0]), "path": where.split(" · ")[1], "text": text, "counts": counts}


def _wait_for_position(driver, position: int) -> dict:
    WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "where").text.startswith(f"{position} of "))
    return _shown(driver)


def _label(driver, text: str | None) -> None:
    """Type ``text`` over the prefilled reading (Ctrl+A first; None: keep the reading), then Enter."""
    box = driver.find_element(By.ID, "text")
    box.send_keys(*(([Keys.CONTROL, "a", Keys.NULL, text] if text is not None else []) + [Keys.ENTER]))


def test_five_labels_by_keyboard_survive_a_killed_server(chromium, server, folder, readings, tmp_path):
    images, truth = folder
    model_text, order = readings
    chromium.get(server.url)
    shown = _wait_for_position(chromium, 1)
    assert shown["path"] == order[0]  # the least sure image first
    assert shown["text"] == model_text[order[0]]  # with the model's reading filled in
    chars = chromium.find_elements(By.CSS_SELECTOR, "#chars .char")
    assert len(chars) == len(model_text[order[0]])  # a confidence per character

    rules = LabelRules(charset="0-9A-Z", min_length=5, max_length=5, source="from the model")  # the checkpoint's
    saved = {}
    for step in range(5):
        path = _shown(chromium)["path"]
        if step == 2:  # Enter alone keeps the model's reading, if that is a label of the scheme at all
            _label(chromium, None)
            if rules.problem(model_text[path]) is None:
                saved[path] = model_text[path]
                shown = _wait_for_position(chromium, step + 2)
                continue
            assert chromium.find_element(By.ID, "problem").text == rules.problem(model_text[path])
            assert _shown(chromium)["path"] == path
        _label(chromium, truth[path])
        saved[path] = truth[path]
        shown = _wait_for_position(chromium, step + 2)
    assert list(saved) == order[:5]
    assert dict(read_labels_csv(images / "labels.csv")) == saved
    kept = sum(saved[p] == model_text[p] for p in saved)
    assert shown["counts"]["labeled"] == "5" and shown["counts"]["remaining"] == f"{NUM_IMAGES - 5} of {NUM_IMAGES}"
    assert shown["counts"]["model"] == f"{kept} of 5 ({100 * kept / 5:.0f}%)"

    server.kill()
    server.start()
    chromium.refresh()
    shown = _wait_for_position(chromium, 6)  # where it stopped
    assert shown["path"] == order[5] and shown["counts"]["labeled"] == "5"
    captions = [f.text for f in chromium.find_elements(By.CSS_SELECTOR, "#strip figure.labeled figcaption")]
    assert captions == [saved[p] for p in order[2:5]]  # the strip's three before, with their labels
    assert dict(read_labels_csv(images / "labels.csv")) == saved
    assert "data.labels_csv=labels.csv" in chromium.find_element(By.ID, "train").text
    screenshot(chromium, tmp_path, "label_page")


def test_an_unknown_character_is_refused_on_the_page(chromium, server, folder):
    images = folder[0]
    before = (images / "labels.csv").read_text()
    shown = _shown(chromium)
    box = chromium.find_element(By.ID, "text")
    box.send_keys("ab#12")
    problem = chromium.find_element(By.ID, "problem").text
    assert problem == "'#' is not in the charset '0-9A-Z' (from the model)"
    assert box.get_attribute("value") == "AB#12"  # the charset's case: a becomes A as it is typed
    assert "invalid" in box.get_attribute("class")
    box.send_keys(Keys.ENTER)
    assert _shown(chromium)["position"] == shown["position"]  # not saved, not moved on
    assert (images / "labels.csv").read_text() == before
    box.send_keys(Keys.BACKSPACE * 5, "AB1")
    box.send_keys(Keys.ENTER)
    assert "at least 5" in chromium.find_element(By.ID, "problem").text
    assert (images / "labels.csv").read_text() == before


def test_skip_back_and_unreadable_by_keyboard(chromium, server, folder):
    images = folder[0]
    box = chromium.find_element(By.ID, "text")
    start = _shown(chromium)
    box.send_keys(Keys.TAB)  # skip
    shown = _wait_for_position(chromium, start["position"] + 1)
    assert shown["counts"]["skipped"] == "1"
    box.send_keys(Keys.SHIFT, Keys.TAB)  # back to the skipped one
    shown = _wait_for_position(chromium, start["position"])
    assert shown["path"] == start["path"] and "skipped" in chromium.find_element(By.ID, "where").text
    box.send_keys(Keys.CONTROL, Keys.ENTER)  # unreadable
    shown = _wait_for_position(chromium, start["position"] + 1)
    assert (shown["counts"]["skipped"], shown["counts"]["unreadable"]) == ("0", "1")
    assert (images / "labels.marks.csv").read_text().splitlines() == ["filename,mark", f"{start['path']},unreadable"]
    assert start["path"] not in dict(read_labels_csv(images / "labels.csv"))


def test_two_tabs_label_different_images(chromium, server, folder):
    images, truth = folder
    first_tab = chromium.current_window_handle
    first = _shown(chromium)
    chromium.switch_to.new_window("tab")
    chromium.get(server.url)
    WebDriverWait(chromium, 20).until(lambda d: " of " in d.find_element(By.ID, "where").text)
    second = _shown(chromium)
    assert second["path"] != first["path"]  # the first tab holds its image
    _label(chromium, truth[second["path"]])
    WebDriverWait(chromium, 20).until(lambda d: _shown(d)["path"] not in (second["path"], first["path"]))
    chromium.close()
    chromium.switch_to.window(first_tab)
    _label(chromium, truth[first["path"]])
    WebDriverWait(chromium, 20).until(lambda d: _shown(d)["path"] != first["path"])
    labels = dict(read_labels_csv(images / "labels.csv"))
    assert labels[first["path"]] == truth[first["path"]] and labels[second["path"]] == truth[second["path"]]


def test_next_image_shows_within_the_target_after_enter(chromium, server, folder, tmp_path):
    """Enter -> saved by the server -> the next image on screen, as the page's own clock measures it."""
    truth = folder[1]
    chromium.get(server.url)  # its own page: a fresh one has no timings yet, whatever ran before
    WebDriverWait(chromium, 20).until(lambda d: " of " in d.find_element(By.ID, "where").text)
    for _ in range(LATENCY_LABELS):
        shown = _shown(chromium)
        _label(chromium, truth[shown["path"]])
        _wait_for_position(chromium, shown["position"] + 1)
    # Each timing is taken a frame after its image is on screen, so the last one can lag the position.
    WebDriverWait(chromium, 10).until(
        lambda d: d.execute_script("return window.captchaLabel.timings.length") >= LATENCY_LABELS)
    timings = chromium.execute_script("return window.captchaLabel.timings")
    assert len(timings) == LATENCY_LABELS
    p50, p95 = np.percentile(timings, [50, 95])
    (tmp_path / "label_latency.json").write_text(json.dumps({"p50_ms": p50, "p95_ms": p95, "timings_ms": timings}))
    # The target is a machine's own: where other work keeps every core busy, the server, the browser
    # and this test wait for a core in turn, so the bound there is looser.
    busy = os.getloadavg()[0] > available_cores()
    bound = TARGET_P95_MS * (4 if busy else 1)
    print(f"\nEnter to the next image: p50 {p50:.1f} ms, p95 {p95:.1f} ms over {LATENCY_LABELS} labels "
          f"(load average {os.getloadavg()[0]:.1f} on {available_cores()} cores; bound {bound:.0f} ms)")
    assert p95 <= bound
