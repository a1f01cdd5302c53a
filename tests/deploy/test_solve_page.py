"""GET / of ``python -m captcha_lit.serve``: an image dropped or pasted on the page, in a real headless Chromium."""

from __future__ import annotations

import base64

import httpx
import pytest

from captcha_lit.deploy.runtime import Solver
from conftest import screenshot, serving
from test_deploy import captcha_pngs

pytest.importorskip("selenium", reason="the browser tests need selenium: pip install -e '.[dev]'")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow

# What a user's drag and drop (or paste) hands the page: a File in a DataTransfer, sent as the event.
DISPATCH = """
const [data, name, type, kind] = arguments;
const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], name, { type }));
if (kind === "paste") {
  document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: transfer, bubbles: true }));
} else {
  const zone = document.getElementById("drop");
  zone.dispatchEvent(new DragEvent("dragover", { dataTransfer: transfer, bubbles: true, cancelable: true }));
  zone.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
}
"""


@pytest.fixture(scope="module")
def service(exported_models, tmp_path_factory, cache_dir):
    onnx = exported_models["crnn"]["onnx"]
    with serving([f"model_path={onnx}", "workers=1"], tmp_path_factory.mktemp("solve_page"), cache_dir) as (url, _, _):
        yield url, Solver(onnx)


def _answer(driver, previous: str = "") -> dict:
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "stats").text not in ("", previous)
                                    or d.find_element(By.ID, "error").text)
    return {key: driver.find_element(By.ID, key).text for key in ("text", "stats", "error")}


def test_an_image_dropped_or_pasted_on_the_page_is_read(chromium, service, tmp_path):
    url, solver = service
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/" not in httpx.get(f"{url}/openapi.json").json()["paths"]  # the JSON API is unchanged
    (first, png), (second, other) = captcha_pngs(2, min_length=5)
    expected = solver.solve(png)

    chromium.get(url)
    chromium.execute_script(DISPATCH, base64.b64encode(png).decode(), "captcha.png", "image/png", "drop")
    answer = _answer(chromium)
    assert answer["error"] == "" and answer["text"] == expected.text
    cells = chromium.find_elements(By.CSS_SELECTOR, "#chars .char")
    assert [c.text.split("\n") for c in cells] == [[ch, f"{p:.2f}"]
                                                   for ch, p in zip(expected.text, expected.char_confidences)]
    assert f"confidence {expected.confidence:.3f}" in answer["stats"] and " ms" in answer["stats"]
    assert chromium.find_element(By.CSS_SELECTOR, "#drop img").get_attribute("naturalWidth") == "160"
    screenshot(chromium, tmp_path, "solve_page")

    chromium.execute_script(DISPATCH, base64.b64encode(other).decode(), "", "image/png", "paste")
    assert _answer(chromium, answer["stats"])["text"] == solver.solve(other).text

    chromium.execute_script(DISPATCH, base64.b64encode(b"not a png").decode(), "broken.png", "image/png", "drop")
    WebDriverWait(chromium, 30).until(lambda d: d.find_element(By.ID, "error").text)
    assert chromium.find_element(By.ID, "error").text.startswith("422: ")
