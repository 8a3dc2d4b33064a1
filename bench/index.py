"""Content index benchmark: cifarlab.index.ContentIndex against dict and set.

    python bench/index.py [--sizes 1000000 10000000]

For each size: bytes per entry, bulk insert rate, bulk lookup rate for hits and misses,
single-key lookup time, open time from a file, and (at 1 million) the private memory that a
forked reader adds while doing 1 million lookups. Random 32-byte keys stand in for SHA-256
digests (they are uniformly distributed too). Writes its table into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_section
from cifarlab.index import ContentIndex

CHUNK = 16384  # keys per lookup call in the forked reader: bounds its numpy temporaries


def private_dirty_kb() -> int:
    text = Path("/proc/self/smaps_rollup").read_text()
    return sum(int(line.split()[1]) for line in text.splitlines()
               if line.startswith("Private_Dirty:"))


def forked_reader_growth(work) -> float:
    """MB of private dirty memory a forked child adds while running ``work()``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        gc.freeze()  # what a well-behaved worker does; the dict still dirties its pages
        before = private_dirty_kb()
        work()
        after = private_dirty_kb()
        os.write(w, str(after - before).encode())
        os._exit(0)
    os.close(w)
    data = os.read(r, 64)
    os.waitpid(pid, 0)
    os.close(r)
    return int(data) / 1024


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench(n: int, tmp: Path) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(n)
    keys = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    misses = rng.integers(0, 256, (min(n, 1_000_000), 32), dtype=np.uint8)
    q = min(n, 1_000_000)
    hits = keys[rng.permutation(n)[:q]]
    out: dict[str, dict[str, float]] = {"index": {}, "dict": {}, "set": {}}

    # ---- ContentIndex
    t0 = time.perf_counter()
    idx = ContentIndex.from_digests(keys, np.arange(n))
    t = time.perf_counter() - t0
    out["index"]["bytes_per_entry"] = idx.nbytes / n
    out["index"]["bytes_per_entry_keys"] = (idx.nbytes - idx.values().nbytes) / n
    out["index"]["insert_per_s"] = n / t
    out["index"]["hit_per_s"] = q / timed(lambda: idx.lookup(hits), 3)
    out["index"]["miss_per_s"] = q / timed(lambda: idx.lookup(misses), 3)
    sample = [bytes(k) for k in hits[:20000]]
    out["index"]["single_ns"] = timed(lambda: [idx.get(k) for k in sample], 3) / len(sample) * 1e9
    path = tmp / f"idx{n}.cidx"
    idx.save(path)
    out["index"]["open_ms"] = timed(lambda: ContentIndex.open(path), 5) * 1e3
    out["index"]["open_verify_ms"] = timed(lambda: ContentIndex.open(path, verify=True), 3) * 1e3
    stats = idx.probe_stats()
    out["index"]["load"] = stats["load"]
    out["index"]["probe_hit"], out["index"]["knuth_hit"] = stats["mean_probes_hit"], stats["knuth_hit"]
    out["index"]["probe_miss"], out["index"]["knuth_miss"] = stats["mean_probes_miss"], stats["knuth_miss"]
    out["index"]["max_disp"] = stats["max_displacement"]
    if n <= 1_000_000:
        def index_reader() -> None:
            shared = ContentIndex.open(path)
            for i in range(0, q, CHUNK):
                shared.lookup(hits[i : i + CHUNK])

        out["index"]["fork_mb"] = forked_reader_growth(index_reader)

    # ---- dict and set over bytes keys (conversion from numpy not timed)
    blist = [bytes(k) for k in keys]
    hlist = [bytes(k) for k in hits]
    mlist = [bytes(k) for k in misses]
    for kind in ("dict", "set"):
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        if kind == "dict":
            t0 = time.perf_counter()
            obj = dict(zip(blist, range(n), strict=True))
            t = time.perf_counter() - t0
        else:
            t0 = time.perf_counter()
            obj = set(blist)
            t = time.perf_counter() - t0
        # keys are counted: the table owns them (the index stores its digests too)
        used = tracemalloc.get_traced_memory()[0] - base + sys.getsizeof(blist[0]) * n
        tracemalloc.stop()
        out[kind]["bytes_per_entry"] = used / n
        out[kind]["insert_per_s"] = n / t
        look = obj.get if kind == "dict" else obj.__contains__
        out[kind]["hit_per_s"] = q / timed(lambda look=look: [look(k) for k in hlist], 3)
        out[kind]["miss_per_s"] = q / timed(lambda look=look: [look(k) for k in mlist], 3)
        out[kind]["single_ns"] = timed(lambda look=look: [look(k) for k in hlist[:20000]], 3) / 20000 * 1e9
        if kind == "dict":
            pk = tmp / f"dict{n}.pickle"
            pk.write_bytes(pickle.dumps(obj, protocol=5))
            out[kind]["open_ms"] = timed(lambda pk=pk: pickle.loads(pk.read_bytes()), 1) * 1e3
            pk.unlink()
            if n <= 1_000_000:
                out[kind]["fork_mb"] = forked_reader_growth(
                    lambda obj=obj: [obj.get(k) for k in hlist])
        obj = None
        gc.collect()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="*", default=[1_000_000, 10_000_000])
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            r = bench(n, Path(tmp))
            rows.append((n, r))
            print(n, r, flush=True)

    def f(v: float | None, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    lines = [
        "## Content index",
        "",
        f"Machine: {machine()}.",
        "Command: `python bench/index.py`. Random 32-byte keys; the index stores an int64 value "
        "per key, the dict maps bytes to int, the set holds bytes. Bytes per entry count the "
        "keys too (the index's digest array; the dict's and set's bytes objects, 65 bytes each). "
        "Lookup rates: the index answers a numpy batch, dict and set a Python loop over a list "
        "of bytes keys that already exist (their conversion is not timed). Dict open = "
        "unpickling it from a file. Fork = private dirty memory a forked child adds doing "
        "1 million lookups (both children run `gc.freeze()` first; the index child opens the "
        f"file itself and looks keys up {CHUNK:,} at a time).",
        "",
        "| keys | structure | bytes/entry | insert/s | hit lookups/s | miss lookups/s | "
        "single lookup ns | open ms | fork reader MB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, r in rows:
        for kind in ("index", "dict", "set"):
            m = r[kind]
            open_ms = f(m.get("open_ms"), ".2f")
            size = f"{m['bytes_per_entry']:.1f}"
            if kind == "index":
                open_ms += f" ({m['open_verify_ms']:.0f} verified)"
                size += f" ({m['bytes_per_entry_keys']:.1f} keys only)"
            lines.append(
                f"| {n:,} | {kind} | {size} | {m['insert_per_s'] / 1e6:.2f} M | "
                f"{m['hit_per_s'] / 1e6:.2f} M | {m['miss_per_s'] / 1e6:.2f} M | "
                f"{m['single_ns']:.0f} | {open_ms} | {f(m.get('fork_mb'), '.1f')} |")
    lines += ["", "Probe statistics of the index against Knuth's expectations for linear probing:",
              "", "| keys | load α | probes per hit (Knuth ½(1+1/(1−α))) | probes per miss "
              "(Knuth ½(1+1/(1−α)²)) | max displacement |", "|---:|---:|---:|---:|---:|"]
    for n, r in rows:
        m = r["index"]
        lines.append(f"| {n:,} | {m['load']:.3f} | {m['probe_hit']:.2f} ({m['knuth_hit']:.2f}) | "
                     f"{m['probe_miss']:.2f} ({m['knuth_miss']:.2f}) | {m['max_disp']} |")
    write_section("content-index", "\n".join(lines))


if __name__ == "__main__":
    main()
