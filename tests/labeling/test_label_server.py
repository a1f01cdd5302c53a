"""``python -m captcha_lit.label`` as a real uvicorn server, over HTTP: what it serves, and what it refuses."""

from __future__ import annotations

import http.client
import io
import subprocess

import httpx
import pytest
from PIL import Image

from conftest import PYTHON, REPO_ROOT, cli_env, free_port, wait_until_up


def _png(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (80, 30), (shade, 40, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory, cache_dir):
    """No model, rules from the command line: 0-9A-Z, 5 characters."""
    root = tmp_path_factory.mktemp("label_server")
    folder = root / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(6):
        (folder / f"img_{i}.png").write_bytes(_png(i * 40))
    (folder / "sub" / "deep.png").write_bytes(_png(250))
    (folder / "notes.txt").write_text("not an image")
    (root / "outside.png").write_bytes(_png(7))
    (folder / "link.png").symlink_to(root / "outside.png")  # an image file, but outside the folder
    port = free_port()
    log_path = root / "server.log"
    cmd = [PYTHON, "-m", "captcha_lit.label", f"path={folder}", f"port={port}", "charset=0-9A-Z",
           "min_length=5", "max_length=5", f"hydra.run.dir={root / 'run'}"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=cli_env(cache_dir), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/api/session", proc, log_path)
        yield url, folder, port
    finally:
        proc.kill()
        proc.wait(timeout=20)


def _raw_get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    """A GET with the path exactly as given: no client-side clean-up of ``..``."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.putrequest("GET", path, skip_host=True)
    connection.putheader("Host", host)
    connection.endheaders()
    response = connection.getresponse()
    return response.status, response.read()


def test_only_image_files_under_the_folder_are_served(server):
    url, folder, port = server
    assert _raw_get(port, "/image/img_0.png") == (200, (folder / "img_0.png").read_bytes())
    assert _raw_get(port, "/image/sub/deep.png")[0] == 200
    for path in ("/image/../outside.png", "/image/..%2Foutside.png", "/image/%2e%2e/outside.png",
                 "/image/sub/../../outside.png", "/image/link.png", "/image/notes.txt", "/image/labels.csv",
                 "/image//etc/passwd", "/image/%2Fetc%2Fpasswd"):
        assert _raw_get(port, path)[0] == 404, path
    assert _raw_get(port, "/", host="attacker.example")[0] == 400  # a page from another site: refused
    session = httpx.get(f"{url}/api/session").json()
    assert session["total"] == 7  # the six, sub/deep.png; not the link out of the folder
    assert session["train_command"] == (f"python -m captcha_lit.train data=folder data.path={folder} "
                                        "data.labels_csv=labels.csv data.charset=0-9A-Z")


def test_labels_are_checked_and_two_clients_do_not_overwrite_each_other(server):
    url, folder, _ = server
    with httpx.Client(base_url=url, timeout=30) as http:
        first = http.get("/api/state", params={"client": "tab1"}).json()
        second = http.get("/api/state", params={"client": "tab2"}).json()
        assert first["current"] != second["current"]  # each tab its own image
        index = first["current"]

        def decide(client: str, label: str, base: str = "pending", action: str = "save"):
            return http.post("/api/label", json={"client": client, "index": index, "action": action,
                                                 "label": label, "base": base})

        refused = decide("tab1", "ab#12")
        assert refused.status_code == 422 and refused.json()["detail"].startswith("'#' is not in the charset")
        assert decide("tab1", "ab123").json()["current"] not in (index, second["current"])
        conflict = decide("tab2", "ZZZZZ")  # tab2 still thought it pending
        assert conflict.status_code == 409 and "labeled 'AB123'" in conflict.json()["detail"]
        assert conflict.json()["item"]["state"] == "labeled:AB123"
        assert decide("tab2", "ZZZZZ", base="labeled:AB123").status_code == 200  # seen, and replaced on purpose
    rows = (folder / "labels.csv").read_text().splitlines()
    assert rows[0].startswith("filename,label") and len(rows) == 2 and ",ZZZZZ," in rows[1]


@pytest.mark.slow
def test_an_onnx_model_orders_the_folder_and_a_taken_port_is_named(server, exported_models, cache_dir, tmp_path):
    """The page reads the folder with an exported model (onnxruntime, no torch): least sure first."""
    from captcha_lit.deploy.runtime import Solver

    _, folder, taken_port = server
    onnx = exported_models["crnn"]["onnx"]
    taken = subprocess.run([PYTHON, "-m", "captcha_lit.label", f"path={folder}", f"ckpt_path={onnx}",
                            f"port={taken_port}", f"hydra.run.dir={tmp_path / 'taken'}"],
                           cwd=REPO_ROOT, env=cli_env(cache_dir), capture_output=True, text=True, timeout=120)
    assert taken.returncode == 2 and f"port={taken_port} on 127.0.0.1 is not free" in taken.stderr

    copy = tmp_path / "images"
    copy.mkdir()
    for path in folder.glob("img_*.png"):
        (copy / path.name).write_bytes(path.read_bytes())
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([PYTHON, "-m", "captcha_lit.label", f"path={copy}", f"ckpt_path={onnx}",
                                 f"port={port}", f"hydra.run.dir={tmp_path / 'run'}"],
                                cwd=REPO_ROOT, env=cli_env(cache_dir), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/api/session", proc, log_path)
        solver = Solver(onnx)
        session = httpx.get(f"http://127.0.0.1:{port}/api/session").json()
        assert session["model"]["id"] == solver.model_id and session["rules"]["charset"] == solver.spec.charset
        view = httpx.get(f"http://127.0.0.1:{port}/api/state", params={"client": "tab"}).json()
        shown = [item["path"] for item in view["items"]]
        confidences = {p.name: solver.solve(p).confidence for p in copy.glob("*.png")}
        assert shown == sorted(confidences, key=lambda p: (confidences[p], p))
        assert view["items"][0]["reading"] == solver.solve(copy / shown[0]).text
    finally:
        proc.kill()
        proc.wait(timeout=20)
