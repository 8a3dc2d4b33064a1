"""KServe v2 with NVIDIA's official client, ``tritonclient[http]``, against a real server:
health, metadata, inference with JSON and with binary tensors (the client's defaults), encoded
images as BYTES, errors the client can print, versions, and a reload that keeps the model's name.
"""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from helpers import png_bytes, serving

tritonclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.slow
TOKEN = "kserve-test-token"


@pytest.fixture(scope="module")
def server(run_dir, other_run_dir):
    with serving(run_dir, "--admin-token", TOKEN, "--cache-size", "0") as url:
        yield url


@pytest.fixture
def client(server):
    c = tritonclient.InferenceServerClient(url=server.removeprefix("http://"))
    yield c
    c.close()


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3)).astype(np.float32)


def _v1(server: str, data: bytes) -> dict[str, float]:
    top = httpx.post(f"{server}/v1/predict?top_k=4", files={"f": ("x.png", data)}).json()
    return {t["class"]: t["probability"] for t in top["predictions"][0]["top"]}


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "cifarlab" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("tutorial")
    version = model["versions"][0]
    assert client.get_model_metadata("tutorial", model_version=version) == model
    assert client.is_model_ready("tutorial") and client.is_model_ready("tutorial", version)
    assert not client.is_model_ready("nope")
    assert {i["name"] for i in model["inputs"]} == {"image", "input"}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_pixels_with_the_clients_defaults(client, server, binary):
    x = _pixels(3, seed=1)
    inp = tritonclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outputs = None if binary else [
        tritonclient.InferRequestedOutput("probabilities", binary_data=False),
        tritonclient.InferRequestedOutput("label", binary_data=False)]
    result = client.infer("tutorial", [inp], outputs=outputs, request_id="q1")
    probs = result.as_numpy("probabilities")
    labels = result.as_numpy("label")
    assert probs.shape == (3, 4) and probs.dtype == np.float32
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    classes = client.get_model_metadata("tutorial")["parameters"]["classes"]
    assert [v.decode() if isinstance(v, bytes) else v for v in labels] == \
        [classes[i] for i in probs.argmax(1)]
    assert result.get_response()["id"] == "q1"
    v1 = _v1(server, png_bytes(Image.fromarray(x[0].astype(np.uint8))))
    for name, p in v1.items():
        assert abs(probs[0][classes.index(name)] - p) < 1e-4


def test_encoded_images_as_bytes_match_v1(client, server):
    """An encoded photo of any size: the server preprocesses it as /v1/predict does."""
    photos = []
    for seed, size in ((3, (80, 50)), (4, (33, 47))):
        rng = np.random.default_rng(seed)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).save(buf, "JPEG")
        photos.append(buf.getvalue())
    inp = tritonclient.InferInput("image", [2], "BYTES")
    inp.set_data_from_numpy(np.array(photos, dtype=np.object_))
    out = client.infer("tutorial", [inp]).as_numpy("probabilities")
    classes = client.get_model_metadata("tutorial")["parameters"]["classes"]
    for k, photo in enumerate(photos):
        for name, p in _v1(server, photo).items():
            assert abs(out[k][classes.index(name)] - p) < 1e-5


def test_errors_reach_the_client_as_messages(client):
    x = _pixels(1)
    good = tritonclient.InferInput("input", [1, 32, 32, 3], "FP32")
    good.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="Unknown model 'other'"):
        client.infer("other", [good])
    with pytest.raises(InferenceServerException, match="no version '9'"):
        client.infer("tutorial", [good], model_version="9")
    wrong = tritonclient.InferInput("input", [1, 3, 32, 32], "FP32")
    wrong.set_data_from_numpy(x.transpose(0, 3, 1, 2).copy())
    with pytest.raises(InferenceServerException, match="NHWC") as info:
        client.infer("tutorial", [wrong])
    assert info.value.status() == "400"
    bad_image = tritonclient.InferInput("image", [1], "BYTES")
    bad_image.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="not a readable image"):
        client.infer("tutorial", [bad_image])


def test_compressed_requests(client):
    x = _pixels(2, seed=5)
    inp = tritonclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    plain = client.infer("tutorial", [inp]).as_numpy("probabilities")
    for algorithm in ("gzip", "deflate"):
        got = client.infer("tutorial", [inp], request_compression_algorithm=algorithm)
        assert np.array_equal(got.as_numpy("probabilities"), plain)


def test_reload_keeps_the_name_and_changes_the_version(client, server, other_run_dir):
    before = client.get_model_metadata("tutorial")["versions"][0]
    r = httpx.post(f"{server}/v1/reload", json={"run": other_run_dir.name},
                   headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 202, r.text
    for _ in range(300):
        status = httpx.get(f"{server}/v1/reload").json()
        if status["state"] != "loading":
            break
    assert status["state"] == "loaded", status
    after = client.get_model_metadata("tutorial")["versions"][0]
    assert after != before and status["version"] == after
    inp = tritonclient.InferInput("input", [1, 32, 32, 3], "FP32")
    inp.set_data_from_numpy(_pixels(1))
    result = client.infer("tutorial", [inp])
    assert result.get_response()["model_version"] == after
    with pytest.raises(InferenceServerException, match="no version"):
        client.infer("tutorial", [inp], model_version=before)
