"""The server: API tests through FastAPI's test client (every bad input), the micro-batcher and
cache on their own, and a real uvicorn server on loopback under a bounded load."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cifarlab.config import DataConfig
from cifarlab.models import default_config
from cifarlab.runs import RunWriter
from cifarlab.serve import ServeSettings, create_app
from cifarlab.trainer import train
from helpers import CIFARLAB, png_bytes, write_cifar_python


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """A trained tutorial model on the synthetic 4-class set (a real run folder)."""
    root = tmp_path_factory.mktemp("served")
    data = root / "cifar-10-batches-py"
    write_cifar_python(data, n_per_class=60, n_batches=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIFARLAB_CACHE", str(root / "cache"))
        cfg = default_config("tutorial")
        cfg.data = DataConfig(source=str(data), val_size=40)
        cfg.optim.epochs = 8
        train(cfg, [RunWriter(root / "runs" / "tiny")], progress=False)
    return root / "runs" / "tiny"


def _wait_ready(client: TestClient) -> None:
    for _ in range(200):
        if client.get("/v2/health/ready").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError("model never became ready")


@pytest.fixture
def client(run_dir):
    settings = ServeSettings(run=str(run_dir), max_upload_bytes=2 * 2**20, max_pixels=1_000_000)
    with TestClient(create_app(settings)) as c:
        _wait_ready(c)
        yield c


def image_bytes(seed: int = 0, size: tuple[int, int] = (40, 30), fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    return png_bytes(Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)),
                     fmt)


def error_of(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error"} and body["error"]["status"] == r.status_code
    return body["error"]["message"]


# ------------------------------------------------------------------------------ the API


def test_page_and_assets_are_served_locally(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'name="viewport"' in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        r = client.get(asset)
        assert r.status_code == 200
        assert "http://" not in r.text and "https://" not in r.text  # no CDN, no outside URL
    assert "https://" not in page.text and "http://" not in page.text


def test_predict_one_then_cached(client):
    data = image_bytes(1)
    r = client.post("/v1/predict", files={"file": ("a.png", data, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny" and len(body["version"]) == 12
    (pred,) = body["predictions"]
    import hashlib

    assert pred["sha256"] == hashlib.sha256(data).hexdigest() and pred["cached"] is False
    probs = [t["probability"] for t in pred["top"]]
    assert len(probs) == 4 and probs == sorted(probs, reverse=True)
    assert abs(sum(probs) - 1) < 1e-4
    assert body["timing"]["total_ms"] > 0
    again = client.post("/v1/predict", files={"file": ("b.png", data, "image/png")}).json()
    assert again["predictions"][0]["cached"] is True
    assert again["predictions"][0]["top"] == pred["top"]
    recent = client.get("/v1/model").json()["recent"]
    assert recent[0]["filename"] == "b.png"


def test_predict_many_files_and_top_k(client):
    files = [("files", (f"{i}.png", image_bytes(i), "image/png")) for i in range(5)]
    r = client.post("/v1/predict?top_k=2", files=files)
    assert r.status_code == 200
    preds = r.json()["predictions"]
    assert [p["filename"] for p in preds] == [f"{i}.png" for i in range(5)]
    assert all(len(p["top"]) == 2 for p in preds)
    assert client.post("/v1/predict?top_k=9", files=files).status_code == 422


def _tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "TIFF")
    return buf.getvalue()


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (2000, 2000)).save(buf, "PNG")  # 4 Mpx in a few hundred bytes
    return buf.getvalue()


BAD_UPLOADS = [
    ("text", b"hello, I am not an image", 415, "not a readable image"),
    ("tiff", _tiff(), 415, "TIFF images are not accepted"),
    ("truncated", image_bytes(2, (64, 64))[:300], 422, "corrupt or truncated"),
    ("empty", b"", 422, "empty"),
    ("bomb", _bomb(), 413, "exceeds the limit of 1000000 pixels"),
]


@pytest.mark.parametrize(("kind", "data", "status", "message"), BAD_UPLOADS,
                         ids=[b[0] for b in BAD_UPLOADS])
def test_bad_uploads_get_clear_json_errors(client, kind, data, status, message):
    r = client.post("/v1/predict", files={"file": (f"{kind}.bin", data)})
    assert r.status_code == status
    msg = error_of(r)
    assert message in msg and f"{kind}.bin" in msg  # says what is wrong, and with which file


def test_request_errors(client):
    assert client.post("/v1/predict", content=b"raw", headers={
        "content-type": "image/png"}).status_code == 415
    r = client.post("/v1/predict", files={"note": (None, b"no file here")})
    assert r.status_code == 422 and "No file" in error_of(r)
    big = b"\0" * (3 * 2**20)
    r = client.post("/v1/predict", files={"file": ("big.png", big)})
    assert r.status_code == 413 and "upload limit" in error_of(r)


def test_upload_cap_holds_without_content_length(client):
    """A chunked body (no Content-Length) is cut off while it streams in."""
    sent = 0

    def chunks():
        nonlocal sent
        for _ in range(100):
            sent += 2**16
            yield b"\0" * 2**16

    r = client.post("/v1/predict", content=chunks(),
                    headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413
    assert "upload limit" in error_of(r)


def _decoding_cases() -> list[tuple[str, bytes]]:
    out = []
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    out.append(("rgba", png_bytes(rgba)))
    out.append(("la", png_bytes(Image.new("LA", (20, 20), (10, 128)))))
    p = Image.new("P", (20, 20))
    p.info["transparency"] = 0
    out.append(("palette", png_bytes(p)))
    out.append(("gray16", png_bytes(Image.fromarray(
        (np.arange(400).reshape(20, 20) * 160).astype(np.uint16)))))
    out.append(("cmyk", png_bytes(Image.new("CMYK", (20, 20), (0, 255, 0, 0)), "JPEG")))
    out.append(("gray", png_bytes(Image.new("L", (20, 20), 90), "JPEG")))
    buf = io.BytesIO()
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "blue")]
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out.append(("animated", buf.getvalue()))
    img = Image.new("RGB", (30, 20), "green")
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    out.append(("exif", buf.getvalue()))
    out.append(("webp", png_bytes(Image.new("RGB", (20, 20), "red"), "WEBP")))
    out.append(("bmp", png_bytes(Image.new("RGB", (20, 20), "red"), "BMP")))
    return out


@pytest.mark.parametrize(("kind", "data"), _decoding_cases(), ids=[c[0] for c in
                                                                   _decoding_cases()])
def test_every_supported_kind_of_image_decodes(client, kind, data):
    r = client.post("/v1/predict", files={"file": (kind, data)})
    assert r.status_code == 200, r.text


def test_kserve_v2(client):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get("/v2/models/tiny").json()
    assert meta["inputs"][0]["shape"] == [-1, 32, 32, 3] and meta["platform"] == "pytorch"
    assert client.get("/v2/models/tiny/ready").json()["ready"] is True
    assert client.get("/v2/models/other").status_code == 404

    # the same image through v2 (FP32 pixels) and v1 (a PNG) gives the same probabilities
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    body = {"id": "r1", "inputs": [{"name": "input", "shape": [2, 32, 32, 3],
                                    "datatype": "FP32",
                                    "data": pixels.astype(float).ravel().tolist()}]}
    r = client.post("/v2/models/tiny/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "r1" and out["outputs"][0]["shape"] == [2, 4]
    probs = np.array(out["outputs"][0]["data"]).reshape(2, 4)
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    v1 = client.post("/v1/predict?top_k=4", files={"f": ("x.png", png_bytes(
        Image.fromarray(pixels[0])))}).json()["predictions"][0]["top"]
    classes = meta["parameters"]["classes"]
    for t in v1:
        assert abs(probs[0][classes.index(t["class"])] - t["probability"]) < 1e-4

    bad = [
        ({**body, "inputs": [{**body["inputs"][0], "datatype": "INT8"}]}, "FP32"),
        ({**body, "inputs": [{**body["inputs"][0], "shape": [2, 3, 32, 32]}]}, "NHWC"),
        ({**body, "inputs": [{**body["inputs"][0], "data": [1.0, 2.0]}]}, "needs"),
        ({**body, "inputs": [{**body["inputs"][0],
                              "data": [300.0] * (2 * 32 * 32 * 3)}]}, "[0, 255]"),
        ({"inputs": []}, "inputs"),
    ]
    for payload, message in bad:
        r = client.post("/v2/models/tiny/infer", json=payload)
        assert r.status_code in (400, 422) and message in error_of(r), (payload.keys(), r.text)


def test_openapi_and_metrics(client):
    schema = client.get("/openapi.json").json()
    assert "/v1/predict" in schema["paths"] and "/v2/models/{name}/infer" in schema["paths"]
    client.post("/v1/predict", files={"file": ("a.png", image_bytes(9))})
    client.post("/v1/predict", files={"file": ("a.png", image_bytes(9))})
    client.post("/v1/predict", files={"file": ("t.txt", b"nope")})
    text = client.get("/metrics").text
    assert 'cifarlab_requests_total{method="POST",route="/v1/predict",status="200"} 2.0' in text
    assert 'status="415"' in text
    assert "cifarlab_cache_hits_total 1.0" in text and "cifarlab_cache_misses_total" in text
    assert "cifarlab_request_seconds_bucket" in text and "cifarlab_batch_size_bucket" in text
    assert "cifarlab_queue_seconds_bucket" in text
    assert 'cifarlab_model_info{name="tiny",version="' in text


def test_reload_swaps_the_model_and_refuses_outside_paths(client, run_dir, tmp_path):
    other = run_dir.parent / "tiny-copy"
    if not other.exists():
        shutil.copytree(run_dir, other)
    r = client.post("/v1/reload", json={"run": "tiny-copy"})
    assert r.status_code == 202
    for _ in range(200):
        status = client.get("/v1/reload").json()
        if status["state"] != "loading":
            break
        time.sleep(0.02)
    assert status["state"] == "loaded", status
    assert client.get("/v1/model").json()["name"] == "tiny-copy"
    r = client.post("/v1/reload", json={"run": str(tmp_path)})
    assert r.status_code == 403 and "only run folders under" in error_of(r)
    client.post("/v1/reload", json={"run": "missing-run"})
    for _ in range(200):
        status = client.get("/v1/reload").json()
        if status["state"] != "loading":
            break
        time.sleep(0.02)
    assert status["state"] == "failed" and "no such run folder" in status["error"]
    assert client.get("/v1/model").json()["name"] == "tiny-copy"  # the old model still serves


def test_not_ready_without_a_model(tmp_path):
    with TestClient(create_app(ServeSettings(run=str(tmp_path / "nope")))) as c:
        time.sleep(0.1)
        r = c.get("/v2/health/ready")
        assert r.status_code == 503 and r.json() == {"ready": False}
        r = c.post("/v1/predict", files={"file": ("a.png", image_bytes(0))})
        assert r.status_code == 503 and "loading" in error_of(r)
        assert c.get("/v2/health/live").status_code == 200


# ------------------------------------------------------------------ batcher and cache


# --------------------------------------------------------------------- a real server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(run_dir):
    port = _free_port()
    proc = subprocess.Popen([CIFARLAB, "serve", str(run_dir), "--port", str(port),
                             "--cache-size", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read() if proc.stderr else "server died")
        time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.mark.slow
def test_load_2000_requests_at_concurrency_32_without_errors(server):
    images = [image_bytes(i) for i in range(50)]
    statuses: list[int] = []

    async def worker(client: httpx.AsyncClient, n: int) -> None:
        for k in range(n):
            r = await client.post("/v1/predict", files={"file": ("x.png", images[k % 50])})
            statuses.append(r.status_code)

    async def main():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=server, limits=limits, timeout=60) as client:
            await asyncio.gather(*(worker(client, 2000 // 32 + (i < 2000 % 32))
                                   for i in range(32)))

    asyncio.run(main())
    assert len(statuses) == 2000 and set(statuses) == {200}
    metrics = httpx.get(f"{server}/metrics").text
    count = float(next(line.split()[1] for line in metrics.splitlines()
                       if line.startswith("cifarlab_batch_size_count")))
    assert count < 2000  # concurrent requests shared forward passes


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not CHROMIUM and not os.environ.get("CI"),
                    reason="needs Debian's chromium (`.ci/run` installs it)")
@pytest.mark.slow
def test_page_in_headless_chromium(server, run_dir, tmp_path):
    """The page, the REST API and `cifarlab predict --json` give the same top classes and the
    same probabilities for the same image and run (one inference path)."""
    assert CHROMIUM, "CI must provide chromium (see .ci/chromium.sh)"
    from playwright.sync_api import sync_playwright

    png = tmp_path / "upload.png"
    png.write_bytes(image_bytes(11, (48, 48)))
    rest = httpx.post(f"{server}/v1/predict", files={"file": ("upload.png", png.read_bytes())}
                      ).json()["predictions"][0]["top"]
    cli = _cli_predict(run_dir, png)["predictions"][0]["top"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 375, "height": 740})  # a phone
        page.goto(server)
        page.wait_for_selector("#model:has-text('test accuracy')")
        assert "(TTA 2)" in page.inner_text("#model")  # the run's TTA, measured and serving
        assert "circle" in page.inner_text("#classes")
        page.set_input_files("#file", str(png))
        page.wait_for_selector("#status[data-top]")
        shown = json.loads(page.get_attribute("#bars", "data-top") or "[]")
        assert page.get_attribute("#status", "data-top") == rest[0]["class"]
        assert page.locator("#bars li").count() == 4
        assert rest[0]["class"] in page.inner_text("#recent")
        # usable at phone width: nothing wider than the screen
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        browser.close()
    for a, b, c in zip(shown, rest, cli, strict=True):
        assert a["class"] == b["class"] == c["class"]
        assert abs(a["probability"] - c["probability"]) <= 1e-5
        assert abs(b["probability"] - c["probability"]) <= 1e-5


def _cli_predict(run_dir: Path, image: Path) -> dict:
    r = subprocess.run([CIFARLAB, "predict", str(run_dir), str(image), "--json"],
                       capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.slow
def test_cli_predict_and_rest_agree(server, run_dir, tmp_path):
    """Same image, same run: the same JSON shape, top classes and probabilities (to 1e-5)."""
    for i, size in ((3, (32, 32)), (8, (61, 45))):
        img = tmp_path / f"x{i}.png"
        img.write_bytes(image_bytes(i, size))
        rest = httpx.post(f"{server}/v1/predict", files={"file": (str(img), img.read_bytes())}
                          ).json()
        cli = _cli_predict(run_dir, img)
        assert (cli["model"], cli["version"], cli["tta"]) == (rest["model"], rest["version"],
                                                               rest["tta"])
        (c,), (r,) = cli["predictions"], rest["predictions"]
        assert set(r) - set(c) == {"cached"} and set(c) <= set(r)
        assert c["sha256"] == r["sha256"] and c["filename"] == r["filename"]
        assert [t["class"] for t in c["top"]] == [t["class"] for t in r["top"]]
        for a, b in zip(c["top"], r["top"], strict=True):
            assert abs(a["probability"] - b["probability"]) <= 1e-5


@pytest.mark.slow
def test_several_server_workers(run_dir):
    """--workers N: uvicorn processes built by the app factory, each with its own model."""
    port = _free_port()
    proc = subprocess.Popen([CIFARLAB, "serve", str(run_dir), "--port", str(port), "--workers",
                             "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        ok = 0
        while time.monotonic() < deadline and ok < 10:
            try:
                r = httpx.post(f"{url}/v1/predict", files={"file": ("a.png", image_bytes(3))},
                               timeout=5)
                ok += r.status_code == 200
            except httpx.HTTPError:
                time.sleep(0.2)
            if proc.poll() is not None:
                raise AssertionError(proc.stderr.read() if proc.stderr else "server died")
        assert ok == 10
    finally:
        proc.terminate()
        proc.wait(10)
