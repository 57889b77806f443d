"""`make bench`: kubemaas-server side by side with the in-process limit and the rivals, loopback only.

Contestants, each serving the same ONNX file on 127.0.0.1 with the same cores:
  limit        ONNX Runtime in-process, no server (Python threads calling Session.run; the same
               sessions and threads as the server's default choice), one request per run, and
               batched: each session running batches of clients ÷ sessions rows (at most 32, the
               batching contestants' --max-batch-size) back to back, the batcher's best case;
  kubemaas     the release server with no thread or instance flags (its own choice), binary tensors
               and JSON, batching off and on, and TF-Serving's :predict (JSON, batching off);
  kserve       KServe 0.21's Python ModelServer with an onnxruntime model (JSON, hey);
  mlserver     MLServer 1.7 with an onnxruntime runtime (JSON, hey);
  hello        a hello-world hyper server answering a fixed body (JSON, hey): the per-request floor.
Models: PP-OCR cls 3×48×192, PP-OCR det 640×640, all-MiniLM-L6-v2 int8 at sequence length 32, and a
generated 10×10 dense layer. One load generator for all, hey (keep-alive HTTP/1.1). Prints a table
(throughput, p50, p99, errors, server RSS, the server's CPU per request, ratios to the limit and to
the best rival), writes it into docs/benchmarks.md and draws target/bench/bench.png. CPU per request
(the server's process tree, user + system, over the run ÷ requests answered; for the limit, its own
process ÷ runs) separates what the server costs from what hey takes of the same cores.

Usage: python scripts/bench.py [--models cls,det,minilm,dense] [--clients 1,4,16,64] [--seconds 5]
KUBEMAAS_BENCH_SERVER names another server binary (default target/release/kubemaas-server); the
scripts that import this one (bench_rss.py) follow it too.
"""
import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("KUBEMAAS_CACHE", Path.home() / ".cache" / "kubemaas"))
BENCH = CACHE / "bench"
KSERVE = BENCH / "kserve-0.21.0" / "bin" / "python"
MLSERVER = BENCH / "mlserver-1.7.1" / "bin" / "mlserver"
HEY = BENCH / "hey-v0.1.4" / "hey"
SERVER = Path(os.environ.get("KUBEMAAS_BENCH_SERVER", ROOT / "target" / "release" / "kubemaas-server"))
HELLO = ROOT / "target" / "release" / "examples" / "hello"
OUT = ROOT / "target" / "bench"
CORES = len(os.sched_getaffinity(0))
MAX_BATCH = 32
BATCH_FLAGS = ["--max-batch-size", str(MAX_BATCH), "--max-queue-delay-us", "2000", "--max-queue-size", "4096"]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(pid):
    """A process and all its descendants (MLServer forks workers)."""
    children = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(p.name))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        q = todo.pop()
        out.append(q)
        todo += children.get(q, [])
    return out


def rss_mib(pid):
    """Resident memory of a process tree."""
    total = 0
    for q in tree(pid):
        try:
            m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{q}/status").read_text())
            total += int(m.group(1)) if m else 0
        except OSError:
            pass
    return total / 1024


def cpu_seconds(pid):
    """User + system CPU time of a process tree so far (/proc/*/stat utime and stime)."""
    total = 0
    for q in tree(pid):
        try:
            fields = Path(f"/proc/{q}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def kubemaas_argv(binary, port, ort_lib, name, path, *flags):
    """A kubemaas-server serving one model on 127.0.0.1:`port` (HTTP only)."""
    return [str(binary), "serve", "--host", "127.0.0.1", "--http-port", str(port), "--grpc-port", "0",
            "--metrics-port", "0", "--ort-library", ort_lib, "--model", f"{name}={path}", *flags]


class Proc:
    """A server process on a free port, ready once `ready_path` answers 200."""

    def __init__(self, label, argv, port, ready_path, env=None, cwd=None):
        self.label, self.port = label, port
        self.logf = open(OUT / f"{label}.log", "w")
        self.p = subprocess.Popen(argv, stdout=self.logf, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                  start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"{label} exited: {(OUT / f'{label}.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{ready_path}", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{label} did not become ready: {(OUT / f'{label}.log').read_text()[-2000:]}")

    def rss(self):
        return rss_mib(self.p.pid)

    def cpu(self):
        return cpu_seconds(self.p.pid)

    def stop(self):
        try:
            os.killpg(self.p.pid, 15)
            self.p.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.p.pid, 9)
            except ProcessLookupError:
                pass


# ---------------------------------------------------------------- models and request bodies

def dense_model(path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(10)
    w = numpy_helper.from_array(rng.standard_normal((10, 10)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "b")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
                          "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 10])], [w, b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, path)


def identity_model(path, n):
    import onnx
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, path)


def models(tmp):
    dense = Path(tmp) / "dense.onnx"
    dense_model(str(dense))
    big = Path(tmp) / "mib.onnx"
    identity_model(str(big), 262_144)
    m = CACHE / "models"
    rng = np.random.default_rng(1)
    seq = 32
    ids = rng.integers(1000, 5000, (1, seq)).astype(np.int64)
    return {
        "cls": (m / "ocr-cls/1/model.onnx", {"x": rng.random((1, 3, 48, 192), dtype=np.float32)}),
        "det": (m / "ocr-det/1/model.onnx", {"x": rng.random((1, 3, 640, 640), dtype=np.float32)}),
        "minilm": (m / "minilm/1/model.onnx", {"input_ids": ids, "attention_mask": np.ones((1, seq), np.int64),
                                               "token_type_ids": np.zeros((1, seq), np.int64)}),
        "dense": (dense, {"x": rng.random((1, 10), dtype=np.float32)}),
        # 1 MiB of FP32 in and out: what JSON costs against binary end to end.
        "mib": (big, {"x": rng.random((1, 262_144), dtype=np.float32)}),
    }


def fit_inputs(path, inputs):
    """Only the inputs the model has (MiniLM exports differ in token_type_ids), and its output names."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return {k: v for k, v in inputs.items() if k in names}, [o.name for o in sess.get_outputs()]


def binary_body(inputs, outs):
    """A V2 binary-extension body (as tritonclient sends): inputs and outputs as raw bytes."""
    dt = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    header = json.dumps({"inputs": [{"name": k, "shape": list(v.shape), "datatype": dt[v.dtype],
                                     "parameters": {"binary_data_size": v.nbytes}} for k, v in inputs.items()],
                         "outputs": [{"name": o, "parameters": {"binary_data": True}} for o in outs]}).encode()
    return header + b"".join(np.ascontiguousarray(v).tobytes() for v in inputs.values()), len(header)


def v1_body(inputs):
    """TF-Serving's :predict body: the row format for one input, the columnar one for several."""
    if len(inputs) == 1:
        return json.dumps({"instances": next(iter(inputs.values())).tolist()})
    return json.dumps({"inputs": {k: v.tolist() for k, v in inputs.items()}})


def v2_body(inputs):
    dt = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    return json.dumps({"inputs": [{"name": k, "shape": list(v.shape), "datatype": dt[v.dtype],
                                   "data": v.flatten().tolist()} for k, v in inputs.items()]})


# ---------------------------------------------------------------- load generators

def hey(url, body_file, clients, seconds, header_len=None):
    """hey: JSON bodies, or binary-extension bodies (JSON header of `header_len` bytes, then tensors)."""
    kind = ["-T", "application/json"] if header_len is None else \
        ["-T", "application/octet-stream", "-H", f"Inference-Header-Content-Length: {header_len}"]
    r = subprocess.run([str(HEY), "-z", f"{seconds}s", "-c", str(clients), "-m", "POST", *kind,
                        "-D", str(body_file), url], capture_output=True, text=True, timeout=seconds + 120)
    out = r.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    pct = dict(re.findall(r"\s+(\d+)% in ([\d.]+) secs", out))
    codes = dict((int(c), int(n)) for c, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", out))
    errors = sum(n for c, n in codes.items() if c != 200)
    if "Error distribution" in out:
        errors += sum(int(n) for n in re.findall(r"\[(\d+)\]\t", out.split("Error distribution")[1]))
    if not rps:
        return {"rps": 0.0, "p50": None, "p99": None, "errors": -1, "requests": 0, "note": (out + r.stderr)[-300:]}
    ok = codes.get(200, 0)
    return {"rps": float(rps.group(1)) * (ok / max(sum(codes.values()), 1)), "requests": sum(codes.values()),
            "p50": float(pct["50"]) * 1e3 if "50" in pct else None,
            "p99": float(pct["99"]) * 1e3 if "99" in pct else None, "errors": errors}


def limit(path, inputs, clients, seconds, batched=False):
    """ONNX Runtime in-process with the server's default sessions and threads (`plan_threads`).

    As many Python threads as there are clients, but no more than sessions: each runs its own
    session back to back, the most the sessions can do. (More threads than sessions only queue on
    them and on Python's lock: on cls, 4 threads on 2 sessions did 12-20 % less than 2.) Unbatched,
    each run is one request; batched, it is the most the batcher could form, ready and waiting:
    clients ÷ sessions rows (at most the server's --max-batch-size). infer/s counts rows; the
    latencies are the runs' own, with no queueing."""
    instances = min(CORES, 4)
    threads = max(1, CORES // instances)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sessions = [ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]) for _ in range(instances)]
    rows = 1
    if batched:
        rows = max(1, min(MAX_BATCH, -(-clients // instances)))
        inputs = {k: np.concatenate([v] * rows) for k, v in inputs.items()}
    workers = min(clients, instances)
    for s in sessions:
        s.run(None, inputs)
    lat, stop = [[] for _ in range(workers)], time.perf_counter() + seconds

    def client(k):
        session = sessions[k]  # its own: workers never outnumber sessions
        while time.perf_counter() < stop:
            t = time.perf_counter()
            session.run(None, inputs)
            lat[k].append(time.perf_counter() - t)

    ts = [threading.Thread(target=client, args=(k,)) for k in range(workers)]
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    allv = np.array([v for lst in lat for v in lst])
    done = len(allv) * rows
    return {"rps": done / (time.perf_counter() - t0), "p50": float(np.percentile(allv, 50)) * 1e3,
            "p99": float(np.percentile(allv, 99)) * 1e3, "errors": 0, "batch": rows,
            "rss": rss_mib(os.getpid()), "cpu_ms": (time.process_time() - cpu0) * 1e3 / max(done, 1)}


# ---------------------------------------------------------------- the run

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cls,det,minilm,dense,mib")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--warmup", type=float, default=1,
                    help="seconds of the same load, not measured, before each server cell (new batch sizes, "
                         "connections, the rivals' first calls)")
    ap.add_argument("--contestants", default="limit,limit-batched,kubemaas-binary,kubemaas-binary-batched,kubemaas-json,"
                    "kubemaas-json-batched,kubemaas-tfserving,kserve,mlserver,hello",
                    help="also: configs (the server's default against explicit instance × thread splits)")
    ap.add_argument("--baseline", metavar="BINARY",
                    help="another kubemaas-server build (e.g. an earlier commit's) run on the same kubemaas loads "
                         "right after each one, labelled 'baseline', for before/after ratios in one run")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from target/bench/bench.json")
    a = ap.parse_args()
    if a.replot:
        plot(json.loads((OUT / "bench.json").read_text()))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    clients = [int(c) for c in a.clients.split(",")]
    want = set(a.contestants.split(","))
    rows = []
    tmp = tempfile.mkdtemp(prefix="kubemaas-bench-")
    all_models = models(tmp)
    ort_lib = os.environ["ORT_DYLIB_PATH"]
    for name in a.models.split(","):
        path, inputs = all_models[name]
        inputs, outputs = fit_inputs(path, inputs)
        body = Path(tmp) / f"{name}.json"
        body.write_text(v2_body(inputs))
        v1 = Path(tmp) / f"{name}.v1.json"
        v1.write_text(v1_body(inputs))
        binary = Path(tmp) / f"{name}.bin"
        data, header_len = binary_body(inputs, outputs)
        binary.write_bytes(data)
        log(f"== {name}: {path.name}, JSON body {body.stat().st_size / 1e3:.0f} KB")

        def record(contestant, c, r, rss=None):
            r = dict(r, model=name, contestant=contestant, clients=c)
            if rss is not None:
                r["rss"] = rss
            rows.append(r)
            log(f"{name:7} c={c:<3} {contestant:26} {r['rps']:9.1f}/s p50 {r['p50']} p99 {r['p99']} "
                f"errors {r['errors']} rss {r.get('rss', 0):.0f} MiB cpu {r.get('cpu_ms') or 0:.3f} ms/req {r.get('note', '')}")

        if "limit" in want:
            for c in clients:
                record("limit (in-process ORT)", c, limit(path, inputs, c, a.seconds))
        if "limit-batched" in want:
            for c in clients:
                record("limit batched (in-process ORT)", c, limit(path, inputs, c, a.seconds, batched=True))
        infer = f"/v2/models/{name}/infer"

        def measure(label, argv, loads, ready=f"/v2/models/{name}/ready", **proc):
            """One server (`argv(port)`), then at each client count every (contestant, path, body,
            binary header length) of `loads`."""
            port = free_port()
            srv = Proc(label, argv(port), port, ready, **proc)
            try:
                for c in clients:
                    for contestant, url_path, payload, hlen in loads:
                        if a.warmup > 0:
                            hey(f"http://127.0.0.1:{port}{url_path}", payload, c, a.warmup, hlen)
                        cpu0 = srv.cpu()
                        r = hey(f"http://127.0.0.1:{port}{url_path}", payload, c, a.seconds, hlen)
                        # The server's own CPU per answered request: what it costs beyond the model,
                        # whatever the load generator beside it takes of the same cores.
                        r["cpu_ms"] = (srv.cpu() - cpu0) * 1e3 / max(r["requests"], 1)
                        record(contestant, c, r, srv.rss())
            finally:
                srv.stop()

        def kubemaas(port, *flags, binary=SERVER):
            return kubemaas_argv(binary, port, ort_lib, name, path, *flags)

        for batched in (False, True):
            suffix = "-batched" if batched else ""
            flags = BATCH_FLAGS if batched else []
            loads = [(f"kubemaas {kind}{' batched' if batched else ''}", infer, payload, hlen)
                     for kind, tag, payload, hlen in (("binary", "kubemaas-binary", binary, header_len),
                                                      ("JSON", "kubemaas-json", body, None))
                     if tag + suffix in want]
            if not batched and "kubemaas-tfserving" in want:
                loads.append(("kubemaas TF-Serving JSON", f"/v1/models/{name}:predict", v1, None))
            if loads:
                measure(f"kubemaas-{name}{suffix}", lambda p: kubemaas(p, *flags), loads)
                if a.baseline:
                    measure(f"baseline-{name}{suffix}", lambda p: kubemaas(p, *flags, binary=a.baseline),
                            [(label.replace("kubemaas", "baseline"), *rest) for label, *rest in loads])
        if "configs" in want:
            # The server's own choice against explicit instance × thread splits of the same cores.
            splits = sorted({(i, max(1, CORES // i)) for i in (1, 2, 4) if i <= 2 * CORES} | {(1, CORES)})
            for instances, threads in splits:
                measure(f"kubemaas-{name}-{instances}x{threads}",
                        lambda p: kubemaas(p, "--instances", str(instances), "--intra-op-threads", str(threads)),
                        [(f"kubemaas binary {instances}×{threads} threads", infer, binary, header_len)])
        if "kserve" in want:
            # cwd: KServe writes Prometheus files into its working directory.
            measure(f"kserve-{name}", lambda p: [str(KSERVE), str(ROOT / "scripts/bench_rivals/kserve_onnx.py"),
                                                 "--model_path", str(path), "--model_name", name,
                                                 "--http_port", str(p), "--grpc_port", str(free_port())],
                    [("KServe 0.21 (JSON)", infer, body, None)], cwd=tmp)
        if "mlserver" in want:
            d = Path(tmp) / f"mlserver-{name}"

            def mlserver(port):
                (d / name).mkdir(parents=True, exist_ok=True)
                (d / "settings.json").write_text(json.dumps({"host": "127.0.0.1", "http_port": port,
                                                             "grpc_port": free_port(), "metrics_port": free_port()}))
                (d / name / "model-settings.json").write_text(json.dumps({
                    "name": name, "implementation": "mlserver_onnx.OnnxModel", "parameters": {"uri": str(path)}}))
                return [str(MLSERVER), "start", str(d)]

            measure(f"mlserver-{name}", mlserver, [("MLServer 1.7 (JSON)", infer, body, None)], cwd=tmp,
                    env=dict(os.environ, PYTHONPATH=str(ROOT / "scripts/bench_rivals")))
        if "hello" in want and name == "dense":
            measure("hello", lambda p: [str(HELLO), str(p)], [("hello-world hyper (floor)", "/", body, None)],
                    ready="/")
    (OUT / "bench.json").write_text(json.dumps(rows, indent=1))
    table = render(rows, a)
    print(table)
    plot(rows)
    if not a.no_docs:
        write_docs(table)


def render(rows, a):
    def f(x, digits=1):
        return "–" if x is None else f"{x:,.{digits}f}"

    lines = [f"{time.strftime('%Y-%m-%d', time.gmtime())}, {CORES} cores, {a.seconds:g} s per cell after {a.warmup:g} s of the "
             f"same load unmeasured, "
             f"ONNX Runtime {ort.__version__}; rivals answer JSON only.", "",
             "| model | clients | contestant | infer/s | p50 ms | p99 ms | errors | RSS MiB | CPU ms/req | ÷ limit | ÷ best rival |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = [x for x in rows if x["model"] == r["model"] and x["clients"] == r["clients"]]
        # Batched contestants against the in-process limit with batches, the others against one
        # request per run: the same batch sizes on both sides.
        kind = "limit batched" if "batched" in r["contestant"] else "limit ("
        lim = next((x["rps"] for x in same if x["contestant"].startswith(kind)), 0)
        rival = max([x["rps"] for x in same if x["contestant"].startswith(("KServe", "MLServer"))] or [0])
        to_limit = f"{r['rps'] / lim:.2f}×" if lim else "–"
        to_rival = f"{r['rps'] / rival:.2f}×" if rival else "–"
        lines.append(f"| {r['model']} | {r['clients']} | {r['contestant']} | {f(r['rps'])} | {f(r['p50'], 2)} | "
                     f"{f(r['p99'], 2)} | {r['errors']} | {f(r.get('rss'), 0)} | {f(r.get('cpu_ms'), 3)} | {to_limit} | "
                     f"{to_rival} |")
    return "\n".join(lines)


def plot(rows):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no PNG (scripts/bench_tools.sh installs it)")
        return
    names = sorted({r["model"] for r in rows})
    everyone = sorted({r["contestant"] for r in rows})
    colour = {who: plt.cm.tab10(i % 10) for i, who in enumerate(everyone)}
    fig, axes = plt.subplots(2, len(names), figsize=(5 * len(names), 8), squeeze=False)
    for j, m in enumerate(names):
        for who in sorted({r["contestant"] for r in rows if r["model"] == m}):
            pts = sorted((r["clients"], r["rps"], r["p99"]) for r in rows if r["model"] == m and r["contestant"] == who)
            axes[0][j].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=who, color=colour[who])
            axes[1][j].plot([p[0] for p in pts], [p[2] or np.nan for p in pts], marker="o", color=colour[who])
        axes[0][j].set_title(m)
        for k, ylabel in ((0, "infer/s"), (1, "p99 ms")):
            axes[k][j].set_xscale("log", base=2)
            axes[k][j].set_yscale("log")
            axes[k][j].set_xlabel("clients")
            axes[k][j].set_ylabel(ylabel)
    handles = [plt.Line2D([], [], color=colour[w], marker="o") for w in everyone]
    fig.legend(handles, everyone, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(OUT / "bench.png", dpi=90)
    log(f"wrote {OUT / 'bench.png'}")


def write_docs(table):
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text()
    start, end = "<!-- make bench: start -->", "<!-- make bench: end -->"
    block = f"{start}\n{table}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text += f"\n## Side by side (`make bench`)\n\n{block}\n"
    doc.write_text(text)
    log(f"updated {doc}")


if __name__ == "__main__":
    main()
