"""Before/after: two kubemaas-server builds side by side on the same model and load, interleaved.

Both servers run at once (each on its own loopback port, with the same flags); hey drives them in
alternating rounds (A, B, A, B, ...), so drift and noise on a shared machine hit both alike. Prints
the median throughput and p99 of each and the ratio B / A per load. `make bench` compares against
the rivals; this compares a change against the build before it.

Usage: python scripts/bench_ab.py A_BINARY B_BINARY [--models dense,cls,mib] [--clients 4,16]
           [--rounds 6] [--seconds 3] [--json] [--flags "--max-batch-size 32"] [--flags-b "..."]

Give the same binary twice with --flags-b to compare two configurations of one build (e.g. the
server's own choice of instances against `--instances 4 --intra-op-threads 1`).
"""
import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the same models, bodies, server start and hey as make bench)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="the build before (A)")
    ap.add_argument("b", help="the build after (B)")
    ap.add_argument("--models", default="dense,cls,mib")
    ap.add_argument("--clients", default="4,16")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--json", action="store_true", help="JSON bodies too, not only binary tensors")
    ap.add_argument("--flags", default="", help="extra server flags for both, e.g. batching")
    ap.add_argument("--flags-b", default=None, help="B's flags instead of --flags (A keeps --flags)")
    a = ap.parse_args()
    ort_lib = os.environ["ORT_DYLIB_PATH"]
    tmp = tempfile.mkdtemp(prefix="kubemaas-ab-")
    all_models = bench.models(tmp)
    lines = ["| model | body | clients | A infer/s | B infer/s | B ÷ A | A p99 ms | B p99 ms |", "|---|---|---|---|---|---|---|---|"]
    for name in a.models.split(","):
        path, inputs = all_models[name]
        inputs, outputs = bench.fit_inputs(path, inputs)
        body = Path(tmp) / f"{name}.json"
        body.write_text(bench.v2_body(inputs))
        binary = Path(tmp) / f"{name}.bin"
        data, header_len = bench.binary_body(inputs, outputs)
        binary.write_bytes(data)
        servers = {}
        try:
            flags_b = a.flags if a.flags_b is None else a.flags_b
            for label, exe, flags in (("A", a.a, a.flags), ("B", a.b, flags_b)):
                port = bench.free_port()
                argv = bench.kubemaas_argv(exe, port, ort_lib, name, path, *flags.split())
                servers[label] = (bench.Proc(f"{label}-{name}", argv, port, f"/v2/models/{name}/ready"), port)
            bodies = [("binary", binary, header_len)] + ([("JSON", body, None)] if a.json else [])
            for kind, payload, hlen in bodies:
                for c in [int(x) for x in a.clients.split(",")]:
                    got = {"A": [], "B": []}
                    for _ in range(a.rounds):
                        for label in ("A", "B"):
                            port = servers[label][1]
                            r = bench.hey(f"http://127.0.0.1:{port}/v2/models/{name}/infer", payload, c, a.seconds, hlen)
                            got[label].append(r)
                    rps = {k: statistics.median(r["rps"] for r in v) for k, v in got.items()}
                    p99 = {k: statistics.median(r["p99"] or 0 for r in v) for k, v in got.items()}
                    line = (f"| {name} | {kind} | {c} | {rps['A']:,.0f} | {rps['B']:,.0f} | {rps['B'] / rps['A']:.2f}× | "
                            f"{p99['A']:.2f} | {p99['B']:.2f} |")
                    bench.log(line)
                    lines.append(line)
        finally:
            for proc, _ in servers.values():
                proc.stop()
    print(f"{a.rounds} interleaved rounds of {a.seconds:g} s per build and load; medians.\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
