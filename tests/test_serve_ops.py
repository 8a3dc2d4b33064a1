"""The server under operations' worst cases, on a real uvicorn server: memory under the
worst-case requests at the default settings, header limits and idle connections, and a reload
with two workers under load."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from helpers import serving

pytestmark = pytest.mark.slow
MiB = 2**20


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def _server_pids(url: str) -> list[int]:
    """The process listening on the URL's port, and its children (the v2 JSON parser)."""
    port = int(url.rsplit(":", 1)[1])
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if int(parts[1].split(":")[1], 16) == port and parts[3] == "0A":  # LISTEN
                inode = parts[9]
    assert inode, "no listening socket"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(Path(fd).readlink().as_posix() == f"socket:[{inode}]"
                   for fd in (proc / "fd").iterdir()):
                pid = int(proc.name)
                children = (proc / "task" / proc.name / "children").read_text().split()
                return [pid, *map(int, children)]
        except (PermissionError, FileNotFoundError, OSError):
            continue
    raise AssertionError("no process owns the socket")


def _flat_png(size: int, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size)).save(buf, "PNG")  # megapixels in a few kilobytes
    return buf.getvalue()


def test_worst_case_memory_at_the_default_settings(run_dir):
    """Many clients at once send what costs the server most per byte at the default limits:
    images whose decoding needs nearly the per-request budget, 10 MiB v2 JSON bodies, and
    requests that must be refused (8 huge PNGs in one request, the case that used to take
    3.4 GB). Peak RSS (VmHWM) of the server and its parser process stays within the bound
    the README states: idle RSS + in-flight upload budget + decode budget + 200 MiB."""
    with serving(run_dir, "--cache-size", "0") as url:
        pids = _server_pids(url)
        httpx.post(f"{url}/v1/predict", files={"f": ("a.png", _flat_png(64, "RGB"))})
        idle = _rss_kib(pids[0], "VmRSS") * 1024
        rgba = _flat_png(4500, "RGBA")  # about 200 MiB to decode: one fits a request
        bomb = _flat_png(6300, "RGB")
        pixels = np.random.default_rng(0).integers(0, 256, (700, 32, 32, 3))
        v2 = json.dumps({"inputs": [{"name": "input", "shape": list(pixels.shape),
                                     "datatype": "FP32", "data": pixels.ravel().tolist()}]})
        assert 9 * MiB < len(v2) < 10 * MiB
        statuses: dict[int, list[int]] = {0: [], 1: [], 2: []}

        async def send(client: httpx.AsyncClient, kind: int) -> None:
            if kind == 0:
                r = await client.post("/v1/predict", files={"f": ("big.png", rgba)})
            elif kind == 1:
                r = await client.post("/v2/models/tutorial/infer", content=v2)
            else:
                r = await client.post("/v1/predict",
                                      files=[("f", (f"{i}.png", bomb)) for i in range(8)])
            statuses[kind].append(r.status_code)

        async def main() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=300) as client:
                await asyncio.gather(*(send(client, k % 3) for k in range(24)))

        asyncio.run(main())
        pids = _server_pids(url)  # the parser process exists now
        peak = sum(_rss_kib(p, "VmHWM") for p in pids) * 1024
    assert statuses[0] == [200] * 8, statuses  # decoded in turn, within the budget
    assert statuses[2] == [413] * 8, statuses  # refused from the headers, nothing decoded
    # 700 images each: all or nothing; those that do not fit the queue now get 503
    assert 200 in statuses[1] and set(statuses[1]) <= {200, 503}, statuses
    bound = idle + 256 * MiB + 512 * MiB + 200 * MiB
    print(f"idle {idle / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB, bound {bound / MiB:.0f} MiB")
    assert peak <= bound


def _raw(url: str, data: bytes, read: bool = True) -> tuple[socket.socket, bytes]:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    if data:
        s.sendall(data)
    out = b""
    while read:
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    return s, out


def _closed_within(s: socket.socket, seconds: float) -> bool:
    s.settimeout(seconds)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False


def test_header_limits_and_idle_connections(run_dir):
    with serving(run_dir, "--keep-alive", "1", "--header-timeout", "2",
                 "--max-connections", "3") as url:
        big = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (64 * 1024) + \
            b"\r\n\r\n"
        _, out = _raw(url, big)
        assert out.startswith(b"HTTP/1.1 431") and b'"status": 431' in out
        assert b"--max-header-kb" in out
        many = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b"".join(
            f"X-{i}: 1\r\n".encode() for i in range(150)) + b"\r\n"
        _, out = _raw(url, many)
        assert out.startswith(b"HTTP/1.1 431") and b"--max-headers" in out
        # a connection that never sends anything is closed after the keep-alive timeout
        idle, _ = _raw(url, b"", read=False)
        assert _closed_within(idle, 5)
        # one that sends half its headers is told 408 and closed
        slow, _ = _raw(url, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n", read=False)
        slow.settimeout(6)
        assert slow.recv(65536).startswith(b"HTTP/1.1 408")
        # a malformed request line gets 400 in the JSON error shape
        _, out = _raw(url, b"BLAH\x01 / HTTP/1.1\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 400") and b'"error"' in out
        # ordinary requests still work
        with httpx.Client(base_url=url) as c:
            assert c.get("/v2/health/live").status_code == 200
        # beyond --max-connections: 503 in the JSON shape
        held = [_raw(url, b"", read=False)[0] for _ in range(3)]
        _, out = _raw(url, b"")  # told at once, before it sends anything
        assert out.startswith(b"HTTP/1.1 503") and b"--max-connections" in out
        for s in held:
            s.close()


def test_reload_reaches_both_workers_under_load(run_dir, other_run_dir):
    """Two workers, a client hammering /v1/predict; once GET /v1/reload says loaded, no answer
    comes from the old weights, and nothing fails."""
    token = "ops-token"
    with serving(run_dir, "--workers", "2", "--admin-token", token, "--cache-size", "0") as url:
        png = io.BytesIO()
        Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(png, "PNG")
        answers: list[tuple[float, int, str]] = []  # (sent at, status, version)
        stop = threading.Event()

        def hammer() -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                while not stop.is_set():
                    t = time.monotonic()
                    r = c.post("/v1/predict", files={"f": ("x.png", png.getvalue())})
                    answers.append((t, r.status_code, r.json().get("version", "")))

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            old = httpx.get(f"{url}/v2/models/tutorial").json()["versions"][0]
            r = httpx.post(f"{url}/v1/reload", json={"run": other_run_dir.name},
                           headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 202, r.text
            deadline = time.monotonic() + 60
            while True:
                status = httpx.get(f"{url}/v1/reload").json()
                if status["state"] != "loading" or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            done = time.monotonic()
            assert status["state"] == "loaded" and status["workers"] == 2, status
            time.sleep(1.5)
        finally:
            stop.set()
            for t in threads:
                t.join()
        new = status["version"]
        assert new != old
        after = [v for t, _, v in answers if t > done]
        assert after and set(after) == {new}
        assert {s for _, s, _ in answers} == {200}
        # state and metrics say the same, whichever worker answers
        for _ in range(6):
            assert httpx.get(f"{url}/v1/reload").json()["version"] == new
            metrics = httpx.get(f"{url}/metrics").text
            assert f'cifarlab_model_info{{name="tutorial",version="{new}"}} 1.0' in metrics
