"""`make bench-shm`: binary tensors over the socket against Triton's system shared memory, side by side
with ONNX Runtime in-process, loopback only.

One release server (`--allow-client-shm`, its default instances and threads) serves each model;
perf_analyzer drives it over HTTP twice at each concurrency: binary tensors in the request and
answer (`-i http`), then inputs and outputs in POSIX shared memory (`--shared-memory system`). The
limit is bench.py's: ONNX Runtime in-process, the same sessions and threads, no client. Models: PP-OCR
det 640×640 (4.9 MB in, 1.6 MB out per request), PP-OCR cls and the 1 MiB identity model. Prints a
table with each row's ratio to the limit and shared memory's ratio to binary.

Usage: python scripts/bench_shm.py [--models det,cls,mib] [--clients 1,4] [--seconds 4]
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the same models, server start and in-process limit as make bench)

PERF = bench.ROOT / "scripts" / "perf_analyzer"


def perf(model, port, shape, clients, seconds, extra):
    """perf_analyzer over HTTP at one concurrency: (infer/s, p50 ms, p99 ms), or None if it failed."""
    argv = [str(PERF), "-m", model, "-u", f"127.0.0.1:{port}", "-i", "http", "--shape", shape,
            "--concurrency-range", f"{clients}:{clients}", "--measurement-interval", str(int(seconds * 1000)),
            "--stability-percentage", "25", "--max-trials", "10", "--percentile", "99", *extra]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    tput = re.search(rf"Concurrency: {clients}, throughput: ([0-9.]+) infer/sec", out)
    p50 = re.search(r"p50 latency: ([0-9]+) usec", out)
    p99 = re.search(r"p99 latency: ([0-9]+) usec", out)
    if p.returncode != 0 or not tput:
        bench.log(f"perf_analyzer failed ({model}, {clients} clients, {extra}): {out[-800:]}")
        return None
    return float(tput.group(1)), int(p50.group(1)) / 1e3 if p50 else 0.0, int(p99.group(1)) / 1e3 if p99 else 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="det,cls,mib")
    ap.add_argument("--clients", default="1,4")
    ap.add_argument("--seconds", type=float, default=4)
    a = ap.parse_args()
    bench.OUT.mkdir(parents=True, exist_ok=True)
    clients = [int(c) for c in a.clients.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        catalog = bench.models(tmp)
        for name in a.models.split(","):
            path, inputs = catalog[name]
            inputs, _ = bench.fit_inputs(path, inputs)
            (inp, x), = inputs.items()
            shape = f"{inp}:{','.join(map(str, x.shape))}"
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            out_bytes = max(int(np.asarray(o).nbytes) for o in sess.run(None, inputs))
            port = bench.free_port()
            server = bench.Proc(f"shm-{name}", bench.kubemaas_argv(bench.SERVER, port, os.environ["ORT_DYLIB_PATH"], name, path,
                                                                   "--allow-client-shm"),
                                port, f"/v2/models/{name}/ready")
            try:
                for c in clients:
                    lim = bench.limit(path, inputs, c, a.seconds)
                    binary = perf(name, port, shape, c, a.seconds, [])
                    shm = perf(name, port, shape, c, a.seconds,
                               ["--shared-memory", "system", "--output-shared-memory-size", str(out_bytes)])
                    rows.append((name, c, lim["rps"], binary, shm))
                    bench.log(name, c, round(lim["rps"], 1), binary, shm)
            finally:
                server.stop()

    def cell(r):
        return ("–", "–", "–") if r is None else (f"{r[0]:,.1f}", f"{r[1]:.1f}", f"{r[2]:.1f}")

    def ratio(a, b):
        return "–" if not a or not b else f"{a / b:.2f}×"

    print("| model | clients | limit infer/s | binary infer/s | binary p50 / p99 ms | shm infer/s | "
          "shm p50 / p99 ms | binary ÷ limit | shm ÷ limit | shm ÷ binary |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, c, lim, binary, shm in rows:
        b, s = cell(binary), cell(shm)
        bt, st = binary and binary[0], shm and shm[0]
        print(f"| {name} | {c} | {lim:,.1f} | {b[0]} | {b[1]} / {b[2]} | {s[0]} | {s[1]} / {s[2]} | "
              f"{ratio(bt, lim)} | {ratio(st, lim)} | {ratio(st, bt)} |")


if __name__ == "__main__":
    main()
