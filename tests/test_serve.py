"""`mdn serve`: the HTTP API (TestClient and a real uvicorn server), its limits, the batching of
concurrent requests, the CLI command, the load-test script and the web page in a real browser."""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import socket
import struct
import threading
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import load_script, write_config
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("fastapi", reason='mdn serve needs its extra: pip install "mdn-cli[serve]"')
from fastapi.testclient import TestClient  # noqa: E402

from mdn_cli import modes as md  # noqa: E402
from mdn_cli.api import Model  # noqa: E402
from mdn_cli.cli import app as cli  # noqa: E402
from mdn_cli.serve import STATIC, ServeSettings, create_app, in_thread  # noqa: E402

runner = CliRunner()
SETTINGS = ServeSettings(max_batch=2, max_wait_ms=5, max_files=4, max_upload_mb=0.5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, toy_data) -> Path:
    tmp = tmp_path_factory.mktemp("serve")
    config = write_config(tmp / "config.yaml", toy_data, tmp / "runs", train={"epochs": 1})
    result = runner.invoke(cli, ["train", str(config)])
    assert result.exit_code == 0, result.output
    return tmp / "runs" / "tiny" / "best.pt"


@pytest.fixture(scope="module")
def model(checkpoint) -> Model:
    return Model.load(checkpoint, "cpu")


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(model, SETTINGS)) as client:
        yield client


@pytest.fixture(scope="module")
def images(toy_data) -> list[Path]:
    return sorted((toy_data / "images").glob("*.png"))


def upload(*files: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (name, data, "application/octet-stream")) for name, data in files]


def close(a, b, rel=1e-6, path="record") -> None:
    """Same structure, same strings, numbers equal within `rel` (float32 batch effects)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            close(a[key], b[key], rel, f"{path}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: {a} != {b}"
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, rel, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert b == pytest.approx(a, rel=rel, abs=1e-9), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def assert_still_serving(client, images) -> None:
    response = client.post("/predict", files=upload(("ok.png", images[0].read_bytes())))
    assert response.status_code == 200, response.text
    assert [r["image"] for r in response.json()] == ["ok.png"]


# ---------------------------------------------------------------------------------------------
# The API


def test_health_describes_the_model(client, model):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "model": json.loads(json.dumps(model.describe()))}


def test_predict_gives_the_numbers_of_mdn_predict_json(client, checkpoint, images):
    chosen = images[:3]
    cli_rows = json.loads(runner.invoke(cli, ["predict", *map(str, chosen), "-c", str(checkpoint), "--format", "json",
                                              "--device", "cpu"]).stdout)
    response = client.post("/predict", files=upload(*((p.name, p.read_bytes()) for p in chosen)))
    assert response.status_code == 200, response.text
    served = response.json()
    assert [r["image"] for r in served] == [p.name for p in chosen]  # in order, across batches of 2
    for expected, got in zip(cli_rows, served):
        close({**expected, "image": Path(expected["image"]).name}, got)


def test_one_request_per_file_gives_the_same_records_as_one_request(client, images):
    together = client.post("/predict", files=upload(*((p.name, p.read_bytes()) for p in images[:4]))).json()
    for p, record in zip(images[:4], together):
        alone = client.post("/predict", files=upload((p.name, p.read_bytes()))).json()
        close(record, alone[0])


def _jpeg(size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 120, 40)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but holds a single row of data: a bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _chunked_multipart(total: int):
    boundary = "mdnboundary"
    yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n\r\n'.encode()
    for _ in range(total // 65536 + 1):
        yield b"\xff" * 65536
    yield f"\r\n--{boundary}--\r\n".encode()


HOSTILE = {
    # name: (request arguments, status, words the error must contain)
    "empty file": (lambda img: {"files": upload(("empty.jpg", b""))}, 422, ["empty.jpg", "empty"]),
    "text named .jpg": (lambda img: {"files": upload(("notes.jpg", b"shopping list: milk, eggs\n" * 20))}, 422,
                        ["notes.jpg", "not an image"]),
    "truncated JPEG": (lambda img: {"files": upload(("cut.jpg", _jpeg((400, 300))[:900]))}, 422, ["cut.jpg", "decode"]),
    "10 files over a limit of 4": (lambda img: {"files": upload(*[(f"{i}.png", img) for i in range(10)])}, 413,
                                   ["more than 4 files", "--max-files"]),
    "decompression-bomb PNG header": (lambda img: {"files": upload(("bomb.png", _png_header(10_000, 10_000)))}, 422,
                                      ["bomb.png", "decompression bomb"]),
    "giant declared PNG": (lambda img: {"files": upload(("giant.png", _png_header(200_000, 200_000)))}, 422,
                           ["giant.png", "decompression bomb"]),
    "huge upload": (lambda img: {"files": upload(("huge.jpg", b"\xff" * 600_000))}, 413, ["0.5 MB", "--max-upload-mb"]),
    "huge chunked upload (no length)": (
        lambda img: {"content": _chunked_multipart(600_000), "headers": {"content-type": "multipart/form-data; boundary=mdnboundary"}},
        413, ["0.5 MB", "--max-upload-mb"]),
    "JSON body": (lambda img: {"json": {"file": "photo.jpg"}}, 415, ["multipart/form-data", "application/json"]),
    "raw image body": (lambda img: {"content": img, "headers": {"content-type": "image/png"}}, 415, ["multipart/form-data"]),
    "no content type": (lambda img: {"content": img}, 415, ["multipart/form-data"]),
    "field named image": (lambda img: {"files": [("image", ("a.png", img, "image/png"))]}, 400, ["no 'file' field", "'image'"]),
    "urlencoded form": (lambda img: {"data": {"file": "photo.jpg"}}, 415, ["multipart/form-data", "urlencoded"]),
    "text in the file field": (lambda img: {"data": {"file": "photo.jpg"}, "files": [("other", ("x.txt", b"x", "text/plain"))]},
                               400, ["holds text"]),
    "no boundary": (lambda img: {"content": b"--x--", "headers": {"content-type": "multipart/form-data"}}, 400,
                    ["malformed multipart"]),
    "escape codes in the file name": (
        lambda img: {"content": b'--b\r\nContent-Disposition: form-data; name="file"; filename="evil\x1b[2J.jpg"\r\n\r\n'
                                b"GIF8\r\n--b--\r\n", "headers": {"content-type": "multipart/form-data; boundary=b"}},
        422, ["evil?[2J.jpg: not an image"]),
    "one bad among good files": (lambda img: {"files": upload(("a.png", img), ("bad.jpg", b"GIF89a-not-really"), ("b.png", img))},
                                 422, ["1 of 3 files", "bad.jpg", "none was predicted"]),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_uploads_are_refused_by_name_and_the_server_keeps_serving(client, images, case):
    arguments, status, words = HOSTILE[case]
    response = client.post("/predict", **arguments(images[0].read_bytes()))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert "\n" not in error and all(w in error for w in words), error
    assert_still_serving(client, images)


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_read(client, images):
    body, content_type = load_script("load_test").multipart([("small.png", images[0].read_bytes())])
    response = client.post("/predict", content=body, headers={"content-type": content_type, "content-length": "600000"})
    assert response.status_code == 413 and "0.5 MB" in response.json()["error"]
    assert_still_serving(client, images)


def test_a_failing_forward_pass_answers_500_and_the_server_keeps_serving(model, images):
    class Flaky:  # the real model, whose first forward pass fails
        failures = 1

        def __getattr__(self, name):
            return getattr(model, name)

        def predict_prepared(self, batch, groups=None):
            if Flaky.failures:
                Flaky.failures -= 1
                raise RuntimeError("CUDA out of memory")
            return model.predict_prepared(batch, groups=groups)

    with TestClient(create_app(Flaky(), SETTINGS), raise_server_exceptions=False) as client:
        response = client.post("/predict", files=upload(("a.png", images[0].read_bytes())))
        assert response.status_code == 500 and "CUDA out of memory" in response.json()["error"]
        assert_still_serving(client, images)


def test_more_images_than_the_queue_takes_are_refused_503_with_retry_after(model, images):
    with TestClient(create_app(model, ServeSettings(max_batch=2, max_files=8, max_queue=2))) as client:
        response = client.post("/predict", files=upload(*((f"{i}.png", images[i].read_bytes()) for i in range(3))))
        assert response.status_code == 503 and response.headers["retry-after"].isdigit()
        assert "the server is busy (0 images waiting, at most 2)" in response.json()["error"]
        assert_still_serving(client, images)


def _raw_upload(url: str, photo: bytes) -> tuple[socket.socket, bytes]:
    """A connection with the request's head sent, and the body it announced (not sent)."""
    body, content_type = load_script("load_test").multipart([("slow.png", photo)])
    host, port = url.split("//")[1].rstrip("/").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode())
    return sock, body


def test_a_stalled_upload_is_cut_off_with_408_while_others_are_answered(model, images):
    with in_thread(create_app(model, ServeSettings(request_timeout_s=0.5))) as url:
        sock, body = _raw_upload(url, images[0].read_bytes())
        sock.sendall(body[:20])  # and then nothing: a client on a dead connection
        normal = httpx.post(url + "predict", files=upload(("ok.png", images[1].read_bytes())), timeout=None)
        assert normal.status_code == 200  # not held up by the stalled one
        answer = b""
        while chunk := sock.recv(4096):  # the server answers once its request timeout is up, then closes: the events waited for
            answer += chunk
        sock.close()
        assert answer.startswith(b"HTTP/1.1 408") and b"the upload took longer than 0.5 s" in answer, answer


def test_a_client_that_hangs_up_mid_upload_leaves_the_server_serving(model, images):
    with in_thread(create_app(model, SETTINGS)) as url:
        for _ in range(3):
            sock, body = _raw_upload(url, images[0].read_bytes())
            sock.sendall(body[: len(body) // 2])
            sock.close()
        response = httpx.post(url + "predict", files=upload(("ok.png", images[1].read_bytes())), timeout=None)
        assert response.status_code == 200 and httpx.get(url + "stats", timeout=None).json()["images"] == 1


def test_a_partly_bad_request_lists_every_bad_file(client, images):
    img = images[0].read_bytes()
    response = client.post("/predict", files=upload(("a.png", img), ("x.jpg", b""), ("b.png", img), ("y.png", b"nope")))
    assert response.status_code == 422
    assert [f["image"] for f in response.json()["files"]] == ["x.jpg", "y.png"]


def test_a_form_with_no_file_chosen_is_no_file(client):
    # what a browser sends for an empty <input type=file>: a file part with no name and no bytes
    body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename=""\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n\r\n--b--\r\n")
    response = client.post("/predict", content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 400 and "no 'file' field with a file" in response.json()["error"]


def test_unknown_paths_and_methods_answer_json(client):
    assert client.get("/nope").json() == {"error": "Not Found"}
    assert client.get("/predict").status_code == 405 and "error" in client.get("/predict").json()


def test_page_and_assets_are_served_without_anything_from_elsewhere(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css", "favicon.svg"):
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200 and asset.headers["cache-control"] == "no-cache"  # a new mdn, a new page
    for path in STATIC.iterdir():  # no CDN: every URL in the page's files is relative
        urls = re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"')]*", path.read_text(encoding="utf-8"))
        assert set(urls) <= {"http://www.w3.org/2000/svg"}, (path.name, urls)
    assert re.findall(r'(?:src|href)="([^"]+)"', page.text) == ["static/favicon.svg", "static/style.css", "static/app.js"]


# ---------------------------------------------------------------------------------------------
# Batching, through a real server


def test_concurrent_requests_share_forward_passes_and_each_gets_its_own_answer(model, images):
    chosen = images[:16]
    expected = model.predict([p.read_bytes() for p in chosen])
    app = create_app(model, ServeSettings(max_batch=8, max_wait_ms=200))
    answers: dict[int, httpx.Response] = {}
    start = threading.Barrier(len(chosen))

    def ask(i: int, url: str) -> None:
        start.wait()
        answers[i] = httpx.post(url + "predict", files=upload((chosen[i].name, chosen[i].read_bytes())), timeout=None)

    with in_thread(app) as url:
        threads = [threading.Thread(target=ask, args=(i, url)) for i in range(len(chosen))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = httpx.get(url + "stats", timeout=None).json()
    for i, p in enumerate(chosen):
        assert answers[i].status_code == 200, answers[i].text
        [record] = answers[i].json()
        assert record["image"] == p.name
        close({"image": p.name, **expected[i]}, record)
    assert stats["images"] == 16 and stats["largest_batch"] <= 8
    assert stats["forward_passes"] < 16, stats  # batching happened
    assert stats["forward_passes"] >= 2  # and max_batch held


# ---------------------------------------------------------------------------------------------
# The command


def test_serve_help_lists_the_options():
    result = runner.invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0
    for option in ("--host", "--port", "--device", "--max-batch", "--max-wait-ms", "--max-files", "--max-upload-mb"):
        assert option in result.output


def test_serve_without_fastapi_names_the_extra(monkeypatch, checkpoint):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    result = runner.invoke(cli, ["serve", str(checkpoint)])
    assert result.exit_code == 2
    assert 'pip install "mdn-cli[serve]"' in result.output and len(result.output.strip().splitlines()) == 1


def test_serve_refuses_a_taken_port_and_a_missing_checkpoint(checkpoint, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = runner.invoke(cli, ["serve", str(checkpoint), "--port", str(port)])
    assert result.exit_code == 2 and "choose another with --port" in result.output, result.output
    result = runner.invoke(cli, ["serve", str(tmp_path / "none.pt"), "--port", "0"])
    assert result.exit_code == 2 and "none.pt" in result.output and "Traceback" not in result.output


def test_load_test_script_runs_mdn_serve_and_reports(checkpoint, images, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in images[:6]:
        shutil.copy(p, folder)
    load_script("load_test").main([str(checkpoint), str(folder), "--quick", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "0 failed" in out
    for words in ("requests/s", "images/s", "p50", "p95", "forward passes", "mdn predict --backend auto", "mdn predict --backend torch"):
        assert words in out, out


# ---------------------------------------------------------------------------------------------
# The page, in a real browser

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="browser test needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
    "scripts/test.sh installs them when it can)",
)

SYNTHETIC = {  # fields other branches add, and one nobody knows; "mode" left out on purpose
    "mean": 6.1, "std": 2.6, "median": 5.2,
    "interval_68": [3.1, 9.4], "interval_95": [None, 11.8],
    "hdr_68": [[3.0, 4.6], [8.4, 9.6]],
    "modes": [{"location": 9.0, "mass": 0.4}, [4.0, 0.6]],
    "in_distribution": False, "ood_score": 3.25, "std_aleatoric": 1.2, "std_epistemic": 0.5,
    "some_future_field": {"x": 1},
    "components": [{"weight": 0.6, "mean": 4.0, "std": 0.8}, {"weight": 0.4, "mean": 9.0, "std": 0.7}],
    "target_transform": "none",
    "calibration": {"method": "scale", "guarantee": "none: stds scaled", "warning": "too few calibration images"},
}


def _reference_density(record: dict, y: float) -> float:
    total = 0.0
    for c in record["components"]:
        t = math.log(y) if record["target_transform"] == "log" else y
        g = c["weight"] * math.exp(-0.5 * ((t - c["mean"]) / c["std"]) ** 2) / (c["std"] * math.sqrt(2 * math.pi))
        total += g / y if record["target_transform"] == "log" else g
    return total


@needs_chromium
def test_page_in_chromium_uploads_photos_and_draws_each_answer(model, images, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chrome = load_script("page_screenshot").chrome
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo\n")
    good = images[5]
    with in_thread(create_app(model)) as url, chrome(tmp_path / "profile") as driver:
        expected = httpx.post(url + "predict", files=upload((good.name, good.read_bytes())), timeout=None).json()[0]
        driver.get(url)
        wait = WebDriverWait(driver, 600)  # a hang guard: only a page that never answers reaches it
        wait.until(lambda d: "resnet18" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "files").send_keys(f"{good}\n{bad}")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card")) == 2
                   and not d.find_elements(By.CSS_SELECTOR, ".card[data-state=loading]"))

        card = driver.find_element(By.CSS_SELECTOR, ".card[data-state=done]")
        assert card.find_element(By.CSS_SELECTOR, ".name").text == good.name
        assert "null" not in card.text and "undefined" not in card.text and "NaN" not in card.text
        cells = {td.get_attribute("data-key"): td for td in card.find_elements(By.CSS_SELECTOR, "td[data-key]")}
        # the regions are shown for a multimodal answer only (two or more modes of mass >= LIKELY_MASS)
        multimodal = sum(m["mass"] >= md.LIKELY_MASS for m in expected["modes"]) >= 2
        regions = {"hdr_68", "hdr_95"} if multimodal else set()
        assert set(cells) == {"mean", "std", "median", "mode", "interval_68", "interval_95"} | regions | ({"ood_score"} & set(expected))
        for key, td in cells.items():
            assert json.loads(td.get_attribute("data-value")) == expected[key]  # the API's numbers, exactly
            shown = [float(x.replace("−", "-")) for x in re.findall(r"[−-]?[\d.]+(?:e[+-]?\d+)?", td.text)]
            values = [v for v in np.ravel(np.array(expected[key], dtype=float)) if not np.isnan(v)]
            assert shown == pytest.approx(values, rel=1e-3), (key, td.text)  # rounded to 4 digits
        assert card.find_element(By.CSS_SELECTOR, ".big").text == cells["mean"].text
        curve = card.find_element(By.CSS_SELECTOR, "svg.plot path.curve").get_attribute("d")
        assert curve.startswith("M") and curve.count("L") == 320
        n_drawn = sum(c["weight"] >= 0.005 for c in expected["components"])
        assert len(card.find_elements(By.CSS_SELECTOR, "svg.plot path.component")) == n_drawn
        assert card.find_elements(By.CSS_SELECTOR, "svg.plot path.band")
        assert expected["calibration"]["guarantee"] in card.find_element(By.CSS_SELECTOR, ".guarantee").text
        if "warning" in expected["calibration"]:
            assert expected["calibration"]["warning"] in card.find_element(By.CSS_SELECTOR, ".banner.warn").text

        driver.save_screenshot(str(tmp_path / "page.png"))
        failed = driver.find_element(By.CSS_SELECTOR, ".card[data-state=error]")
        assert "notes.jpg" in failed.text and "not an image" in failed.text
        assert "2 photos · 1 could not be read" in driver.find_element(By.ID, "summary").text

        # the page's own maths: density with the log Jacobian, a density that integrates to 1
        for transform in ("none", "log"):
            record = {**SYNTHETIC, "target_transform": transform,
                      "components": [{"weight": 0.7, "mean": 1.2, "std": 0.3}, {"weight": 0.3, "mean": 2.0, "std": 0.2}]}
            for y in (1.5, 3.3, 7.0):
                got = driver.execute_script("return mdn.density(arguments[0], arguments[1])", record, y)
                assert got == pytest.approx(_reference_density(record, y), rel=1e-12)
            area = driver.execute_script(
                "const r = arguments[0]; let s = 0; const h = 1e-3;"
                "for (let y = h / 2; y < 60; y += h) s += mdn.density(r, y) * h; return s;", record)
            assert area == pytest.approx(1.0, abs=2e-3)
            median = driver.execute_script("return mdn.quantile(arguments[0], 0.5)", record)
            assert driver.execute_script("return mdn.cdf(arguments[0], arguments[1])", record, median) == pytest.approx(0.5, abs=1e-6)

        # fields from other branches: shown when present, unknown ones tolerated, missing ones skipped
        driver.execute_script("mdn.addRecord('synthetic.jpg', arguments[0])", SYNTHETIC)
        card = driver.find_element(By.CSS_SELECTOR, ".card")
        text = card.text
        assert "Two likely answers: ~4 (60%) and ~9 (40%)" in text
        banners = [b.text for b in card.find_elements(By.CSS_SELECTOR, ".banner.warn")]
        assert any("unlike the training images" in b and "3.25" in b for b in banners)
        assert any("too few calibration images" in b for b in banners)
        keys = [td.get_attribute("data-key") for td in card.find_elements(By.CSS_SELECTOR, "td[data-key]")]
        assert keys == ["mean", "std", "median", "interval_68", "interval_95", "hdr_68", "std_aleatoric",
                        "std_epistemic", "ood_score"]
        assert "[3, 4.6] ∪ [8.4, 9.6]" in text and "[−∞, 11.8]" in text
        assert len(card.find_elements(By.CSS_SELECTOR, "svg.plot line.hdr")) == 2
        errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert all("status of 422" in message for message in errors), errors  # only notes.jpg's answer
        driver.save_screenshot(str(tmp_path / "page-with-synthetic-record.png"))
    assert (tmp_path / "page.png").stat().st_size > 10_000

