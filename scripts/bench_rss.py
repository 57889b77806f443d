"""`make bench-rss`: is kubemaas-server's memory flat under sustained load? The release server (default
threads) serves PP-OCR cls; hey keeps 64 clients sending binary requests for `--minutes` (5) after a
30 s warm-up; RSS is sampled every `--interval` seconds (15). Prints the samples and the spread around the
median (the issue's target: ±5 %). Each sample is also split by where the pages are mapped: mimalloc's
arenas (the Rust side: bodies, tensors, answers; mimalloc reserves them 1 GiB at a time), other anonymous
memory (ONNX Runtime's glibc heaps and arena, stacks) and files (code). Loopback only. Batching on with
`--batching`."""
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


def split_rss(pid):
    """Resident MiB of one process by kind of mapping, from /proc/PID/smaps: (allocator, anonymous, files)."""
    kinds = {"allocator": 0, "anonymous": 0, "files": 0}
    kind = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$", line)
        if head:
            size = int(head.group(2), 16) - int(head.group(1), 16)
            name = head.group(3).strip()
            kind = "files" if name.startswith("/") else "allocator" if not name and size >= 1 << 30 else "anonymous"
        elif line.startswith("Rss:") and kind:
            kinds[kind] += int(line.split()[1]) / 1024
    return kinds["allocator"], kinds["anonymous"], kinds["files"]


def spread(values):
    med = statistics.median(values)
    return (f"median {med:.1f} MiB, min {min(values):.1f} ({(min(values) / med - 1) * 100:+.1f} %), max "
            f"{max(values):.1f} ({(max(values) / med - 1) * 100:+.1f} %), first {values[0]:.1f}, last {values[-1]:.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=5)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--batching", action="store_true")
    ap.add_argument("--interval", type=float, default=15, help="seconds between RSS samples")
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
            samples.append((round(time.time() - start), srv.rss(), *split_rss(srv.p.pid)))
            print("{:5d} s  {:7.1f} MiB  (allocator {:.1f}, other anonymous {:.1f}, files {:.1f})"
                  .format(*samples[-1]), flush=True)
            time.sleep(a.interval)
        out, _ = load.communicate(timeout=120)
    finally:
        srv.stop()
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    print(f"\ncls, {a.clients} clients, batching {'on' if a.batching else 'off'}, {a.minutes:g} min after {warm} s "
          f"warm-up, {rps.group(1) if rps else '?'} req/s: RSS {spread([s[1] for s in samples])}")
    for i, kind in ((2, "mimalloc's arenas"), (3, "other anonymous"), (4, "files")):
        print(f"  {kind}: {spread([s[i] for s in samples])}")


if __name__ == "__main__":
    main()
