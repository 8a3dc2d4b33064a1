"""Serving benchmark: requests/s and p50/p99 latency of `cifarlab serve` on loopback.

    python bench/serve.py [--model airnet] [--requests 2000] [--precision fp32]

Builds a run folder of ``--model`` (a few training steps on synthetic images: the weights do not
change the cost), measures the model's raw forward throughput in batches of 64 and the time of
a single-image forward pass, then starts `cifarlab serve` in a subprocess and drives it with a
small asyncio HTTP/1.1 client (keep-alive connections, one pre-built multipart request per
distinct image, responses parsed by Content-Length) at concurrency 1, 8 and 64, with
micro-batching on (--max-batch 64) and off (--max-batch 1), with the cache off; then cache hits
(one image, cache on). Client and server share the machine's cores, as they would on one host.
Then fairness: the p99 latency of single-image requests alone, and while another client sends
maximum-size KServe v2 requests back to back (a 10 MiB JSON body, the upload limit, of 700
images). Writes its tables into docs/BENCHMARKS.md (``--only fairness`` runs that part alone).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Server, machine, write_section


def build_run(model: str, root: Path) -> Path:
    from PIL import Image

    from cifarlab.config import DataConfig
    from cifarlab.models import default_config
    from cifarlab.runs import RunWriter
    from cifarlab.trainer import train

    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("test", 16)):
        for k in range(10):
            d = root / "data" / split / f"c{k}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n // 10 + 1):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(d / f"{i}.png")
    cfg = default_config(model)
    cfg.data = DataConfig(source=str(root / "data"), val_size=10)
    cfg.optim.epochs = 1
    cfg.optim.batch_size = 32
    os.environ["CIFARLAB_CACHE"] = str(root / "cache")
    train(cfg, [RunWriter(root / "runs" / model)], progress=False)
    return root / "runs" / model


def raw_forward(model, seconds: float = 5.0) -> tuple[float, float]:
    """(images/s in batches of 64, seconds of one single-image forward), the server's way:
    ``Predictor.probabilities`` on uint8 images, on this process's one torch thread team."""
    x64 = np.random.default_rng(0).integers(0, 255, (64, 32, 32, 3), np.uint8)
    for _ in range(3):
        model.probabilities(x64)
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < seconds:
        model.probabilities(x64)
        n += 64
    rate = n / (time.perf_counter() - t0)
    one = x64[:1]
    times = []
    for _ in range(200):
        t = time.perf_counter()
        model.probabilities(one)
        times.append(time.perf_counter() - t)
    return rate, float(np.median(times))


def png(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    img = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), np.uint8)
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def request_bytes(port: int, body_png: bytes) -> bytes:
    boundary = "cifarlabbench"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"x.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + body_png + \
        f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def drive(port: int, requests: list[bytes], total: int, concurrency: int
                ) -> tuple[float, np.ndarray, int]:
    """(requests/s, latencies in s, errors) for ``total`` requests over ``concurrency``
    keep-alive connections."""
    latencies: list[float] = []
    errors = 0
    counter = iter(range(total))

    async def conn() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in counter:
            t = time.perf_counter()
            writer.write(requests[i % len(requests)])
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - t)
            errors += status != 200
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(conn() for _ in range(concurrency)))
    return total / (time.perf_counter() - t0), np.array(latencies), errors


def v2_bulk_request(port: int, model: str, n: int = 700) -> bytes:
    """A maximum-size v2 JSON request: ``n`` images of integer pixels, just under 10 MiB."""
    import json

    x = np.random.default_rng(1).integers(0, 256, (n, 32, 32, 3))
    body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    head = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


def fairness(run: Path, model: str, requests: int = 300) -> dict[str, float]:
    """Single-image p50/p99 alone and under a client sending maximum-size v2 requests back to
    back (its own thread and connection), and that client's images/s."""
    import threading

    server = Server(run, "--cache-size", "0")
    try:
        reqs = [request_bytes(server.port, png(i)) for i in range(256)]
        bulk = v2_bulk_request(server.port, model)
        assert len(bulk) < 10 * 2**20
        asyncio.run(drive(server.port, reqs, 100, 1))  # warm-up
        _, alone, e0 = asyncio.run(drive(server.port, reqs, requests, 1))
        stop = threading.Event()
        done = {"requests": 0, "errors": 0, "seconds": 0.0}

        def bulk_client() -> None:
            t0 = time.perf_counter()
            s = socket.create_connection(("127.0.0.1", server.port))
            f = s.makefile("rb")
            while not stop.is_set():
                s.sendall(bulk)
                status = int(f.readline().split()[1])
                length = 0
                while (line := f.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                f.read(length)
                done["requests"] += 1
                done["errors"] += status != 200
            done["seconds"] = time.perf_counter() - t0
            s.close()

        t = threading.Thread(target=bulk_client)
        t.start()
        time.sleep(2.0)  # the bulk client in full flow
        _, loaded, e1 = asyncio.run(drive(server.port, reqs, requests, 1))
        stop.set()
        t.join()
    finally:
        server.close()
    a50, a99 = np.percentile(alone, [50, 99]) * 1000
    l50, l99 = np.percentile(loaded, [50, 99]) * 1000
    return {"alone_p50": a50, "alone_p99": a99, "loaded_p50": l50, "loaded_p99": l99,
            "errors": e0 + e1 + done["errors"], "bulk_requests": done["requests"],
            "bulk_images_per_s": done["requests"] * 700 / max(done["seconds"], 1e-9)}


def write_fairness(f: dict[str, float], model: str, requests: int) -> None:
    ratio = f["loaded_p99"] / f["alone_p99"]
    lines = [
        "## Serving: fairness under maximum-size requests (`bench/serve.py`)",
        "",
        f"Machine: {machine()}. Model: {model} (fp32), default `cifarlab serve` settings, cache "
        f"off. One client sends {requests} single-image `/v1/predict` requests one after "
        "another, first alone, then while a second client (its own thread and connection) "
        "sends maximum-size KServe v2 requests back to back: 700 images as a 9.8 MB JSON body, "
        "just under the 10 MiB upload limit. Client and server share the 2 cores.",
        "",
        "| single-image requests | p50 ms | p99 ms |",
        "|---|---:|---:|",
        f"| alone | {f['alone_p50']:.2f} | {f['alone_p99']:.2f} |",
        f"| with the bulk client | {f['loaded_p50']:.2f} | {f['loaded_p99']:.2f} |",
        "",
        f"The bulk client got {f['bulk_requests']:.0f} answers ({f['bulk_images_per_s']:.0f} "
        f"images/s) meanwhile; errors: {f['errors']:.0f}.",
        "",
        f"Target: p99 with the bulk client within 3× the p99 alone: {ratio:.2f}×: "
        + ("met." if ratio <= 3 else "MISSED."),
    ]
    body = "\n".join(lines)
    print(body)
    write_section("serve-fairness", body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="airnet")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--rounds", type=int, default=3, help="paired raw/server rounds")
    p.add_argument("--only", choices=["fairness"], default=None)
    a = p.parse_args()
    if a.only == "fairness":
        with tempfile.TemporaryDirectory() as tmp:
            f = fairness(build_run(a.model, Path(tmp)), a.model)
        write_fairness(f, a.model, 300)
        return
    with tempfile.TemporaryDirectory() as tmp:
        from cifarlab.infer import Predictor

        run = build_run(a.model, Path(tmp))
        model = Predictor.from_run(run, precision=a.precision)
        images = [png(i) for i in range(256)]
        rows = []
        results: dict[tuple[str, int], tuple[float, float, float, int]] = {}
        for label, max_batch in (("batching on", "64"), ("batching off", "1")):
            server = Server(run, "--max-batch", max_batch, "--cache-size", "0",
                            "--precision", a.precision)
            reqs = [request_bytes(server.port, img) for img in images]
            try:
                asyncio.run(drive(server.port, reqs, 200, 8))  # warm-up
                for c in (1, 8, 64):
                    n = a.requests if c > 1 else max(300, a.requests // 4)
                    rate, lat, errors = asyncio.run(drive(server.port, reqs, n, c))
                    p50, p99 = np.percentile(lat, [50, 99]) * 1000
                    results[(label, c)] = (rate, p50, p99, errors)
                    print(f"{label:<13} c={c:<3} {rate:7.0f} req/s  p50 {p50:6.2f} ms  "
                          f"p99 {p99:7.2f} ms  errors {errors}", flush=True)
                    rows.append(f"| {label} | {c} | {n} | {rate:.0f} | {p50:.2f} | {p99:.2f} | "
                                f"{errors} |")
                if max_batch != "1":
                    # Paired rounds for the targets: raw forward and server back to back, so a
                    # noisy neighbour on this shared machine hits both sides of each ratio.
                    paired = []
                    for r in range(a.rounds):
                        raw_rate, one = raw_forward(model, 3.0)
                        c64, _, e64 = asyncio.run(drive(server.port, reqs, a.requests, 64))
                        _, lat1, e1 = asyncio.run(drive(server.port, reqs, 300, 1))
                        p50_1 = float(np.median(lat1))
                        paired.append((raw_rate, one, c64, p50_1, e64 + e1))
                        print(f"round {r + 1}: raw {raw_rate:.0f} img/s, c=64 {c64:.0f} req/s "
                              f"({c64 / raw_rate:.2f}); single {one * 1000:.2f} ms, c=1 p50 "
                              f"{p50_1 * 1000:.2f} ms (+{(p50_1 - one) * 1000:.2f})", flush=True)
            finally:
                server.close()
        server = Server(run, "--cache-size", "1000", "--precision", a.precision)
        try:
            req = [request_bytes(server.port, images[0])]
            asyncio.run(drive(server.port, req, 50, 1))
            hit_rate, hit_lat, hit_err = asyncio.run(drive(server.port, req, a.requests, 8))
        finally:
            server.close()
        hp50, hp99 = np.percentile(hit_lat, [50, 99]) * 1000
        print(f"cache hits: {hit_rate:.0f} req/s", flush=True)

    on64 = results[("batching on", 64)][0]
    off64 = results[("batching off", 64)][0]
    ratios = [c64 / raw for raw, _, c64, _, _ in paired]
    extra_ms = [(p50 - one) * 1000 for _, one, _, p50, _ in paired]
    ratio, extra = float(np.median(ratios)), float(np.median(extra_ms))
    raw_rate = float(np.median([r[0] for r in paired]))
    one_forward = float(np.median([r[1] for r in paired]))
    errors = sum(r[3] for r in results.values()) + hit_err + sum(r[4] for r in paired)
    lines = [
        "## Serving (`bench/serve.py`)",
        "",
        f"Machine: {machine()}. Model: {a.model} ({a.precision}), a run folder built by the "
        "benchmark. Server: `cifarlab serve` (1 uvicorn worker) on loopback; client: the "
        "benchmark's asyncio HTTP/1.1 client on keep-alive connections, one 32×32 PNG per "
        "request from 256 distinct images, in the same machine (client and server share the "
        "2 cores). Cache off except in the last row.",
        "",
        f"Raw forward, the server's own code path (`Predictor.probabilities` in the benchmark's "
        f"process), median of the paired rounds: **{raw_rate:.0f} images/s** in batches of 64; "
        f"one image: **{one_forward * 1000:.2f} ms**.",
        "",
        "| server | concurrency | requests | req/s | p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        f"| cache hits (one image, cache on) | 8 | {a.requests} | {hit_rate:.0f} | "
        f"{hp50:.2f} | {hp99:.2f} | {hit_err} |",
        "",
        f"Paired rounds (batching on): each round measures the raw forward (3 s), then the server "
        f"at concurrency 64 ({a.requests} requests) and at concurrency 1 (300 requests), so "
        "each ratio compares figures taken within seconds of each other.",
        "",
        "| round | raw img/s | c=64 req/s | ratio | single forward ms | c=1 p50 ms | difference ms |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {i + 1} | {raw:.0f} | {c64:.0f} | {c64 / raw:.2f} | {one * 1000:.2f} | "
          f"{p50 * 1000:.2f} | {(p50 - one) * 1000:+.2f} |"
          for i, (raw, one, c64, p50, _) in enumerate(paired)],
        "",
        "Targets (medians over the paired rounds):",
        f"- throughput at concurrency 64 ≥ 70% of raw batched forward: {ratio * 100:.0f}% "
        f"(rounds: {', '.join(f'{r * 100:.0f}%' for r in ratios)}): "
        + ("met." if ratio >= 0.7 else "MISSED."),
        f"- p50 latency at concurrency 1 within 5 ms of a single forward pass: {extra:+.2f} ms "
        f"(rounds: {', '.join(f'{x:+.2f}' for x in extra_ms)}): "
        + ("met." if extra <= 5 else "MISSED."),
        f"- zero errors: {errors} errors in all runs: " + ("met." if errors == 0 else "MISSED."),
        f"- cache hits at ≥ 1,000 req/s: {hit_rate:.0f}: "
        + ("met." if hit_rate >= 1000 else "MISSED."),
        f"- micro-batching gain at concurrency 64: {on64 / off64:.2f}× (Triton's tutorial "
        "reports about 3.3× from dynamic batching at concurrency 16 on a GPU).",
    ]
    body = "\n".join(lines)
    print(body)
    write_section("serve", body)
    with tempfile.TemporaryDirectory() as tmp:
        f = fairness(build_run(a.model, Path(tmp)), a.model)
    write_fairness(f, a.model, 300)


if __name__ == "__main__":
    main()
