"""The server: API tests through FastAPI's test client (every bad input), the micro-batcher and
cache on their own, and a real uvicorn server on loopback under a bounded load."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cifarlab.serve.app import ServeSettings, create_app
from helpers import CIFARLAB, free_port, png_bytes, serving


def _wait_ready(client: TestClient) -> None:
    for _ in range(200):
        if client.get("/v2/health/ready").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError("model never became ready")


@pytest.fixture
def client(run_dir):
    settings = ServeSettings(run=str(run_dir), max_upload_bytes=2 * 2**20, max_pixels=1_000_000,
                             admin_token=TOKEN)
    with TestClient(create_app(settings)) as c:
        _wait_ready(c)
        yield c


def image_bytes(seed: int = 0, size: tuple[int, int] = (40, 30), fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    return png_bytes(Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)),
                     fmt)


TOKEN = "s3cret-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def error_of(r: httpx.Response) -> str:
    """The message of an error response, checking the one error shape every route uses."""
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error", "status"} and body["status"] == r.status_code, body
    assert isinstance(body["error"], str) and body["error"]
    return body["error"]


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
    assert "recent" not in client.get("/v1/model").json()  # nobody sees others' uploads


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
    if status == 413:
        assert "--max-pixels" in msg  # and which option sets the limit


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
    """The protocol through the test client; tests/test_serve_kserve.py drives the official
    client (tritonclient) against a real server."""
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2").json()["extensions"] == ["binary_tensor_data"]
    meta = client.get("/v2/models/tutorial").json()  # the run's model: stable across reloads
    version = meta["versions"][0]
    assert {i["name"]: i["shape"] for i in meta["inputs"]} == {"image": [-1],
                                                               "input": [-1, 32, 32, 3]}
    assert "center-crop" in meta["parameters"]["input"]
    assert client.get(f"/v2/models/tutorial/versions/{version}").json() == meta
    assert client.get("/v2/models/tutorial/ready").json()["ready"] is True
    assert "Unknown model" in error_of(client.get("/v2/models/other"))
    assert "no version" in error_of(client.get("/v2/models/tutorial/versions/0"))

    # the same image through v2 (FP32 pixels, with no Content-Type) and v1 (a PNG) gives the
    # same probabilities
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    body = {"id": "r1", "inputs": [{"name": "input", "shape": [2, 32, 32, 3],
                                    "datatype": "FP32",
                                    "data": pixels.astype(float).ravel().tolist()}]}
    r = client.post("/v2/models/tutorial/infer", content=json.dumps(body).encode())
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "r1" and out["model_version"] == version
    probs_out, label_out = out["outputs"]
    assert probs_out["shape"] == [2, 4] and label_out["shape"] == [2]
    probs = np.array(probs_out["data"]).reshape(2, 4)
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    classes = meta["parameters"]["classes"]
    assert label_out["data"] == [classes[i] for i in probs.argmax(1)]
    v1 = client.post("/v1/predict?top_k=4", files={"f": ("x.png", png_bytes(
        Image.fromarray(pixels[0])))}).json()["predictions"][0]["top"]
    for t in v1:
        assert abs(probs[0][classes.index(t["class"])] - t["probability"]) < 1e-4

    # an encoded image as BYTES (base64 in JSON) is preprocessed as /v1/predict does it
    photo = image_bytes(7, (61, 45))
    import base64

    r = client.post("/v2/models/tutorial/infer", json={
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                    "data": [base64.b64encode(photo).decode()]}],
        "outputs": [{"name": "probabilities"}]})
    assert r.status_code == 200, r.text
    p2 = np.array(r.json()["outputs"][0]["data"])
    v1 = client.post("/v1/predict?top_k=4", files={"f": ("p.png", photo)}).json()
    for t in v1["predictions"][0]["top"]:
        assert abs(p2[classes.index(t["class"])] - t["probability"]) < 1e-5

    inp = body["inputs"][0]
    bad = [
        ({**body, "inputs": [{**inp, "datatype": "BYTES"}]}, 400, "BYTES"),
        ({**body, "inputs": [{**inp, "shape": [2, 3, 32, 32], "data": inp["data"]}]}, 400,
         "NHWC"),
        ({**body, "inputs": [{**inp, "data": [1.0, 2.0]}]}, 400, "needs"),
        ({**body, "inputs": [{**inp, "data": [300.0] * (2 * 32 * 32 * 3)}]}, 400, "[0, 255]"),
        ({"inputs": []}, 400, "inputs"),
        ({**body, "inputs": [{**inp, "name": "pixels"}]}, 400, "Unknown input"),
        ({**body, "outputs": [{"name": "logits"}]}, 400, "Unknown output"),
        ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]},
         400, "base64"),
        ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                      "data": [base64.b64encode(b"not an image").decode()]}]}, 415,
         "not a readable image"),
    ]
    for payload, status, message in bad:
        r = client.post("/v2/models/tutorial/infer", json=payload)
        assert r.status_code == status and message in error_of(r), (payload.keys(), r.text)
    r = client.post("/v2/models/tutorial/infer", content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in error_of(r)


def test_openapi_documents_every_error_it_sends(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/reload", "/v2", "/v2/models/{name}/infer",
            "/v2/models/{name}/versions/{version}/infer"} <= set(paths)
    predict = paths["/v1/predict"]["post"]["responses"]
    assert {"200", "400", "413", "415", "422", "503"} <= set(predict)
    shape = predict["413"]["content"]["application/json"]["schema"]
    assert shape["required"] == ["error", "status"] and "--max" in predict["413"]["description"]
    assert {"401", "403", "409"} <= set(paths["/v1/reload"]["post"]["responses"])
    assert {"400", "404", "413", "503"} <= set(paths["/v2/models/{name}/infer"]["post"][
        "responses"])


def test_every_route_errs_in_one_shape(client):
    """404, 405, body-parse errors, malformed paths: the same JSON shape as every other error."""
    assert "No route" in error_of(client.get("/nope"))
    assert "No route" in error_of(client.get("/static/nope.js"))
    r = client.get("/v1/predict")
    assert r.status_code == 405 and "not allowed" in error_of(r)
    r = client.post("/v1/reload", content=b"{oops", headers=ADMIN)
    assert r.status_code == 400 and "JSON" in error_of(r)
    r = client.post("/v1/reload", json={"run": "bad\x00name"}, headers=ADMIN)
    assert r.status_code == 400 and "NUL" in error_of(r)
    r = client.post("/v1/reload", json={"run": 3}, headers=ADMIN)
    assert r.status_code == 422 and error_of(r)
    for path in ("/static/a%00b.js", "/v2/models/%00", "/v1/predict%0a", "/static/%c0%ae",
                 "/static/" + "a" * 3000):
        for method in ("GET", "POST"):
            r = client.request(method, path)
            assert r.status_code == 400 and "Malformed request path" in error_of(r), path


def test_request_limits_refuse_before_any_work(run_dir):
    """All-or-nothing: a request over the queue or the decode budgets gets 413 naming the
    option, and none of its images is decoded or computed."""
    settings = ServeSettings(run=str(run_dir), max_queue=3, max_files=10,
                             max_request_decode_bytes=8 * 2**20, max_decode_bytes=16 * 2**20)
    with TestClient(create_app(settings)) as c:
        _wait_ready(c)
        files = [("f", (f"{i}.png", image_bytes(20 + i), "image/png")) for i in range(4)]
        r = c.post("/v1/predict", files=files)
        assert r.status_code == 413 and "--max-queue" in error_of(r)
        # 2000x2000 RGB: about 19 MiB to decode, over the whole 16 MiB budget
        big = png_bytes(Image.new("RGB", (2000, 2000), (9, 9, 9)))
        r = c.post("/v1/predict", files={"f": ("big.png", big)})
        assert r.status_code == 413 and "--max-decode-mb" in error_of(r) and "big.png" in \
            error_of(r)
        # 1200x1200 each: under the global budget alone, over the per-request one together
        mid = png_bytes(Image.new("RGB", (1200, 1200), (9, 9, 9)))
        r = c.post("/v1/predict", files=[("f", ("a.png", mid)), ("f", ("b.png", mid))])
        assert r.status_code == 413 and "--max-request-decode-mb" in error_of(r)
        assert c.post("/v1/predict", files={"f": ("a.png", mid)}).status_code == 200
        pixels = np.zeros((4, 32, 32, 3), np.uint8)
        r = c.post("/v2/models/tutorial/infer", json={"inputs": [{
            "name": "input", "shape": [4, 32, 32, 3], "datatype": "UINT8",
            "data": pixels.ravel().tolist()}]})
        assert r.status_code == 413 and "--max-queue" in error_of(r)
        text = c.get("/metrics").text
        # only the one accepted image was computed
        assert "cifarlab_batch_size_sum 1.0" in text, text


def test_openapi_and_metrics(client):
    client.post("/v1/predict", files={"file": ("a.png", image_bytes(9))})
    client.post("/v1/predict", files={"file": ("a.png", image_bytes(9))})
    client.post("/v1/predict", files={"file": ("t.txt", b"nope")})
    text = client.get("/metrics").text
    assert 'cifarlab_requests_total{method="POST",route="/v1/predict",status="200"} 2.0' in text
    assert 'status="415"' in text
    assert "cifarlab_cache_hits_total 1.0" in text and "cifarlab_cache_misses_total" in text
    assert "cifarlab_request_seconds_bucket" in text and "cifarlab_batch_size_bucket" in text
    assert "cifarlab_queue_seconds_bucket" in text
    assert 'cifarlab_model_info{name="tutorial",version="' in text


def _wait_reload(client) -> dict:
    for _ in range(300):
        status = client.get("/v1/reload").json()
        if status["state"] != "loading":
            return status
        time.sleep(0.02)
    raise AssertionError(status)


def test_reload_swaps_the_model_and_refuses_outside_paths(client, run_dir, tmp_path):
    other = run_dir.parent / "tiny-copy"
    if not other.exists():
        shutil.copytree(run_dir, other)
    r = client.post("/v1/reload", json={"run": "tiny-copy"})
    assert r.status_code == 401 and "Bearer" in error_of(r)
    assert r.headers["www-authenticate"] == "Bearer"
    r = client.post("/v1/reload", json={"run": "tiny-copy"},
                    headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 403 and "Wrong admin token" in error_of(r)
    r = client.post("/v1/reload", json={"run": "tiny-copy"}, headers=ADMIN)
    assert r.status_code == 202
    status = _wait_reload(client)
    assert status["state"] == "loaded", status
    info = client.get("/v1/model").json()
    assert info["name"] == "tiny-copy" and info["served_name"] == "tutorial"
    assert client.get("/v2/models/tutorial").status_code == 200  # v2 clients keep working
    for outside in (str(tmp_path), "../elsewhere", "/etc"):
        r = client.post("/v1/reload", json={"run": outside}, headers=ADMIN)
        msg = error_of(r)
        assert r.status_code == 403 and "only run folders under" in msg
        assert str(run_dir.parent) not in msg  # no filesystem paths in errors
    client.post("/v1/reload", json={"run": "missing-run"}, headers=ADMIN)
    status = _wait_reload(client)
    assert status["state"] == "failed" and "no such run folder" in status["error"]
    assert str(run_dir.parent) not in json.dumps(status)
    assert client.get("/v1/model").json()["name"] == "tiny-copy"  # the old model still serves


def test_reload_is_off_without_an_admin_token(run_dir):
    with TestClient(create_app(ServeSettings(run=str(run_dir)))) as c:
        _wait_ready(c)
        r = c.post("/v1/reload", json={"run": "tiny"}, headers=ADMIN)
        assert r.status_code == 403 and "--admin-token" in error_of(r)


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


@pytest.fixture
def server(run_dir):
    with serving(run_dir, "--cache-size", "0") as url:
        yield url


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
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"just text")
    rest_body = httpx.post(f"{server}/v1/predict",
                           files={"file": ("upload.png", png.read_bytes())}).json()
    rest = rest_body["predictions"][0]["top"]
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
        assert rest[0]["class"] in page.inner_text("#recent")  # this tab's own history
        unsure = rest[0]["probability"] < 0.5
        assert page.is_visible("#unsure") == unsure
        # usable at phone width: nothing wider than the screen
        assert page.evaluate("document.documentElement.scrollWidth") <= 375

        # keyboard only: Tab reaches the file chooser, and its button shows the focus. The
        # listener goes on first: Playwright turns on its file-chooser interception
        # asynchronously, and a key pressed before that opens no interceptable chooser.
        choosers: list = []
        page.on("filechooser", lambda c: choosers.append(c))
        page.wait_for_timeout(200)
        page.focus("body")
        for _ in range(5):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.id") == "file":
                break
        assert page.evaluate("document.activeElement.id") == "file"
        with page.expect_file_chooser() as chooser:
            page.keyboard.press("Enter")
        assert choosers and choosers[-1].element.get_attribute("id") == "file"
        chooser.value.set_files(str(bad))
        page.wait_for_selector("#status.error")
        assert page.get_attribute("#status", "role") == "alert"
        assert "not a readable image" in page.inner_text("#status")
        assert page.eval_on_selector("#status", "e => getComputedStyle(e).color") == \
            "rgb(179, 38, 30)"

        # a low top probability shows the "not sure" cue (the answer is shaped by the test;
        # the page's handling of it is what is checked)
        low = {**rest_body, "predictions": [{**rest_body["predictions"][0], "top": [
            {"class": "circle", "probability": 0.31}, {"class": "square", "probability": 0.3}]}]}
        page.route("**/v1/predict", lambda route: route.fulfill(json=low))
        page.set_input_files("#file", str(png))
        page.wait_for_selector("#unsure:not([hidden])")
        assert "Not sure" in page.inner_text("#unsure") and "square" in page.inner_text("#unsure")

        # another visitor does not see this tab's uploads
        other = browser.new_page()
        other.goto(server)
        other.wait_for_selector("#model:has-text('test accuracy')")
        assert other.inner_text("#recent") == ""
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
    port = free_port()
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
