"""`make bench-rss`: is kubemaas-server's memory flat under sustained load? The release server (default
threads) serves PP-OCR cls; hey keeps 64 clients sending binary requests for `--minutes` (5) after a
30 s warm-up; RSS is sampled every 15 s. Prints the samples and the spread around the median (the
issue's target: ±5 %). Loopback only. Batching on with `--batching`."""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the same server, body and hey helpers as make bench)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=5)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--batching", action="store_true")
    a = ap.parse_args()
    bench.OUT.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="kubemaas-rss-")
    path, inputs = bench.models(tmp)["cls"]
    body = Path(tmp) / "cls.bin"
    data, header_len = bench.binary_body(*bench.fit_inputs(path, inputs))
    body.write_bytes(data)
    port = bench.free_port()
    srv = bench.Proc("rss-server", [str(bench.SERVER), "serve", "--host", "127.0.0.1", "--http-port", str(port),
                                    "--grpc-port", "0", "--metrics-port", "0", "--ort-library",
                                    os.environ["ORT_DYLIB_PATH"], "--model", f"cls={path}",
                                    *(bench.BATCH_FLAGS if a.batching else [])], port, "/v2/models/cls/ready")
    warm, total = 30, int(30 + a.minutes * 60)
    load = subprocess.Popen([str(bench.HEY), "-z", f"{total}s", "-c", str(a.clients), "-m", "POST",
                             "-T", "application/octet-stream", "-H", f"Inference-Header-Content-Length: {header_len}",
                             "-D", str(body), f"http://127.0.0.1:{port}/v2/models/cls/infer"],
                            stdout=subprocess.PIPE, text=True)
    samples = []
    try:
        start = time.time()
        time.sleep(warm)
        while time.time() - start < total - 2:
            samples.append((round(time.time() - start), srv.rss()))
            print(f"{samples[-1][0]:5d} s  {samples[-1][1]:7.1f} MiB", flush=True)
            time.sleep(15)
        out, _ = load.communicate(timeout=120)
    finally:
        srv.stop()
    rss = [r for _, r in samples]
    med = statistics.median(rss)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    print(f"\ncls, {a.clients} clients, batching {'on' if a.batching else 'off'}, {a.minutes:g} min after {warm} s "
          f"warm-up, {rps.group(1) if rps else '?'} req/s: RSS median {med:.1f} MiB, min {min(rss):.1f} "
          f"({(min(rss) / med - 1) * 100:+.1f} %), max {max(rss):.1f} ({(max(rss) / med - 1) * 100:+.1f} %), "
          f"first {rss[0]:.1f}, last {rss[-1]:.1f}")


if __name__ == "__main__":
    main()
