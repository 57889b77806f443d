"""Dynamic batching (`--max-batch-size`): under concurrent load every response equals ONNX Runtime's
own answer for that request alone, including requests of several rows, mixed trailing shapes,
different output subsets and BYTES tensors; batches really form (Triton's `batch_stats`); a full
queue answers 503 with Retry-After at once; a model without a dynamic first dimension is served
unbatched; `/config` reports batching the way Triton does; `/metrics` histograms batch sizes and
queue time as `batch_stats` counts them."""

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import Server


@pytest.fixture(scope="module", params=[[], ["--pad-batches", "always"]], ids=["unpadded", "padded"])
def batching(repo_dir, tmp_path_factory, request):
    """The same tests run with batches padded with zero rows to 1, 2, 4 or 8 (CUDA's default):
    padded rows must never leak into an answer."""
    s = Server(["--model-repository", str(repo_dir), "--instances", "1", "--max-batch-size", "8",
                "--max-queue-delay-us", "20000", *request.param], tmp_path_factory.mktemp("batching") / "server.log")
    s.wait_loaded()
    s.padded = bool(request.param)
    yield s
    assert s.stop() == 0


def test_padding_is_on_only_when_asked_on_a_cpu(batching):
    padded = [json.loads(line).get("padded_to") for line in batching.log_path.read_text().splitlines()
              if '"dynamic batching on"' in line and '"model":"model"' in line]
    assert padded == (["[1, 2, 4, 8]"] if batching.padded else ["[]"]), padded
    # Padded sizes are run once on every instance before the model is ready, where the shapes
    # are known (`model` is [-1,10]); `dtypes` has open trailing dimensions and says why not.
    events = [json.loads(line) for line in batching.log_path.read_text().splitlines() if line.startswith("{")]
    warmed = {e["model"]: e for e in events if e.get("message") == "padded batch sizes warmed"}
    skipped = {e["model"]: e for e in events if e.get("message") == "padded batch sizes not warmed"}
    if batching.padded:
        assert warmed["model"]["sizes"] == "[1, 2, 4, 8]" and warmed["model"]["instances"] == 1, warmed
        assert "only inputs fixed beyond the first dimension" in skipped["dtypes"]["reason"], skipped
    else:
        assert not warmed and not skipped


def reference(repo_dir, model, feeds, outputs=None):
    sess = ort.InferenceSession(str(repo_dir / model / "1" / "model.onnx"))
    return dict(zip(outputs or [o.name for o in sess.get_outputs()], sess.run(outputs, feeds)))


def v2(name, arr, datatype):
    return {"name": name, "shape": list(arr.shape), "datatype": datatype, "data": arr.flatten().tolist()}


def infer(server, model, inputs, outputs=None):
    body = {"inputs": inputs}
    if outputs:
        body["outputs"] = [{"name": o} for o in outputs]
    return requests.post(f"{server.url}/v2/models/{model}/infer", data=json.dumps(body), timeout=60)


def stats(server, model):
    return requests.get(f"{server.url}/v2/models/{model}/stats", timeout=10).json()["model_stats"][0]


def timed(server, model, x, outputs=None):
    """One FP32 request for input x, and how long its answer took, in seconds."""
    t = time.perf_counter()
    r = infer(server, model, [v2("x", x, "FP32")], outputs)
    return r, time.perf_counter() - t


def start_a_long_request(pool, server):
    """Sends the busy model `slow` a 1500-row request (seconds of work) from `pool` and returns its
    future once it runs on an instance."""
    long = pool.submit(infer, server, "slow", [v2("x", np.ones((1500, 256), dtype=np.float32), "FP32")])
    deadline = time.time() + 30
    while gauge(server, "nv_inference_pending_request_count", "slow") < 1:
        assert time.time() < deadline, "the long request never started"
        time.sleep(0.01)
    time.sleep(0.3)  # its JSON body is parsed and it runs
    return long


def assert_busy_answers(busy_model, xs, responses):
    """Each answer of the busy model is ONNX Runtime's own for that request alone."""
    sess = ort.InferenceSession(str(busy_model))
    for x, r in zip(xs, responses, strict=True):
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        assert out["shape"] == list(x.shape)
        np.testing.assert_allclose(np.array(out["data"], dtype=np.float32).reshape(x.shape),
                                   sess.run(None, {"x": x})[0], rtol=1e-4, atol=1e-4)


def two_cpu_instances(busy_model, tmp_path, max_batch, delay_us, threads):
    """The busy model as `slow` on two CPU instances (pinned to the CPU: a host with CUDA must not
    change the rule under test), batching at most `max_batch` rows with a `delay_us` queue delay."""
    return Server(["--model", f"slow={busy_model}", "--instances", "2", "--intra-op-threads", str(threads),
                   "--execution-provider", "cpu", "--max-batch-size", str(max_batch),
                   "--max-queue-delay-us", str(delay_us)], tmp_path / "server.log")


def gauge(server, name, model):
    for line in requests.get(f"{server.metrics_url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + f'{{model="{model}"'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} for {model}")


def test_concurrent_requests_batch_and_each_gets_its_own_answer(batching, repo_dir):
    before = stats(batching, "model")
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((int(rng.integers(1, 4)), 10)).astype(np.float32) for _ in range(192)]

    def one(x):
        r = infer(batching, "model", [v2("x", x, "FP32")])
        assert r.status_code == 200, r.text
        [out] = r.json()["outputs"]
        return np.array(out["data"], dtype=np.float32).reshape(out["shape"])

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, xs))
    for x, y in zip(xs, got):
        np.testing.assert_allclose(y, reference(repo_dir, "model", {"x": x})["y"], rtol=1e-5, atol=1e-6)
    after = stats(batching, "model")
    rows = sum(len(x) for x in xs)
    assert after["inference_count"] - before["inference_count"] == rows
    executions = after["execution_count"] - before["execution_count"]
    # Batches really formed: fewer executions than requests, and batch sizes above one.
    assert executions < len(xs), (executions, len(xs))
    sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in after["batch_stats"]}
    assert max(sizes) > 1 and max(sizes) <= 8, sizes
    assert sum(sizes.values()) == after["execution_count"] - (before["execution_count"] - sum(
        b["compute_infer"]["count"] for b in before["batch_stats"]))
    # Triton's invariant perf_analyzer checks: per-request phase counts agree.
    st = after["inference_stats"]
    assert st["compute_input"]["count"] == st["compute_infer"]["count"] == st["compute_output"]["count"] == st["success"]["count"]


def histogram(server, name, model):
    """The `name` histogram of `model` in /metrics, read by Prometheus' own Python parser:
    ({upper bound: cumulative count}, sum, count)."""
    text = requests.get(f"{server.metrics_url}/metrics", timeout=10).text
    family = next((f for f in text_string_to_metric_families(text) if f.name == name), None)
    assert family is not None and family.type == "histogram", (name, text)
    buckets, total, count = {}, None, None
    for sample in family.samples:
        if sample.labels.get("model") != model:
            continue
        if sample.name == f"{name}_bucket":
            buckets[float(sample.labels["le"])] = sample.value
        elif sample.name == f"{name}_sum":
            total = sample.value
        elif sample.name == f"{name}_count":
            count = sample.value
    return buckets, total, count


def test_metrics_histogram_batch_sizes_and_queue_time_as_batch_stats_counts_them(batching):
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((int(rng.integers(1, 4)), 10)).astype(np.float32) for _ in range(64)]
    with ThreadPoolExecutor(16) as pool:
        assert all(r.status_code == 200 for r in pool.map(lambda x: infer(batching, "model", [v2("x", x, "FP32")]), xs))
    st = stats(batching, "model")
    batches = {b["batch_size"]: b["compute_infer"]["count"] for b in st["batch_stats"]}
    assert max(batches) > 1, batches
    buckets, rows, executions = histogram(batching, "kubemaas_batch_size", "model")
    assert executions == sum(batches.values()), (buckets, batches)
    assert rows == sum(size * n for size, n in batches.items()), (rows, batches)
    assert buckets[float("inf")] == executions
    for bound, n in buckets.items():
        assert n == sum(c for size, c in batches.items() if size <= bound), (bound, buckets, batches)
    # Queue time per request: its count and sum are Triton's cumulative `queue` statistic.
    buckets, waited, requests_ = histogram(batching, "kubemaas_queue_duration_seconds", "model")
    queue = st["inference_stats"]["queue"]
    assert requests_ == queue["count"] == st["inference_stats"]["success"]["count"]
    assert waited == pytest.approx(queue["ns"] / 1e9, rel=1e-6, abs=1e-6)
    assert buckets[float("inf")] == requests_ and 0 < buckets[0.025] <= requests_, buckets


def test_mixed_trailing_shapes_bytes_and_output_subsets_never_mix_wrongly(batching, repo_dir):
    rng = random.Random(3)
    cases = []
    for i in range(96):
        kind = i % 3
        if kind == 0:  # dtypes: FP32 and BYTES with varying trailing dims
            rows, n = rng.randint(1, 3), rng.choice([1, 2, 5])
            cases.append(("dtypes", rows, n, None))
        elif kind == 1:  # arith: two inputs, a subset of outputs
            cases.append(("arith", rng.randint(1, 3), None, rng.choice([["a2"], ["b1"], ["b1", "a2"], None])))
        else:
            cases.append(("versioned", rng.randint(1, 4), None, None))

    def one(case):
        model, rows, n, outputs = case
        if model == "dtypes":
            f = np.arange(rows * n, dtype=np.float32).reshape(rows, n) + rows * 100 + n
            s = np.array([[f"r{r}c{c}n{n}".encode() for c in range(n)] for r in range(rows)], dtype=object)
            body = []
            sig = requests.get(f"{batching.url}/v2/models/dtypes", timeout=10).json()["inputs"]
            for spec in sig:
                name, dt = spec["name"], spec["datatype"]
                if name == "in_fp32":
                    body.append(v2(name, f, "FP32"))
                elif name == "in_bytes":
                    body.append({"name": name, "shape": [rows, n], "datatype": "BYTES",
                                 "data": [x.decode() for x in s.flatten()]})
                elif dt == "BOOL":
                    body.append({"name": name, "shape": [rows, n], "datatype": dt, "data": [False] * (rows * n)})
                else:
                    body.append({"name": name, "shape": [rows, n], "datatype": dt, "data": [0] * (rows * n)})
            r = infer(batching, "dtypes", body, ["out_fp32", "out_bytes"])
            assert r.status_code == 200, r.text
            out = {o["name"]: o for o in r.json()["outputs"]}
            assert [o["name"] for o in r.json()["outputs"]] == ["out_fp32", "out_bytes"]
            assert out["out_fp32"]["shape"] == [rows, n] and out["out_fp32"]["data"] == f.flatten().tolist()
            assert out["out_bytes"]["data"] == [x.decode() for x in s.flatten()]
        elif model == "arith":
            a = np.arange(rows * 4, dtype=np.float64).reshape(rows, 4) + rows
            b = np.arange(rows * 3, dtype=np.int32).reshape(rows, 3) * rows
            r = infer(batching, "arith", [v2("a", a, "FP64"), v2("b", b, "INT32")], outputs)
            assert r.status_code == 200, r.text
            got = {o["name"]: o for o in r.json()["outputs"]}
            assert [o["name"] for o in r.json()["outputs"]] == (outputs or ["a2", "b1"])
            if "a2" in got:
                assert got["a2"]["data"] == (a * 2).flatten().tolist()
            if "b1" in got:
                assert got["b1"]["data"] == (b + 1).flatten().tolist()
        else:
            x = np.arange(rows, dtype=np.float32) * 10
            r = infer(batching, "versioned", [v2("x", x, "FP32")])
            assert r.status_code == 200, r.text
            assert r.json()["outputs"][0]["data"] == (x + 3).tolist()

    with ThreadPoolExecutor(24) as pool:
        list(pool.map(one, cases))


def test_config_reports_batching_as_triton_does_and_fixed_models_stay_unbatched(batching, repo_dir):
    c = requests.get(f"{batching.url}/v2/models/model/config", timeout=10).json()
    assert c["max_batch_size"] == 8
    assert c["input"][0]["dims"] == [10] and c["output"][0]["dims"] == [3]
    assert c["dynamic_batching"]["max_queue_delay_microseconds"] == 20000
    # reshape's `shape` input has a fixed first dimension: served, but never batched.
    r = requests.get(f"{batching.url}/v2/models/reshape/config", timeout=10).json()
    assert r["max_batch_size"] == 0 and "dynamic_batching" not in r
    log = batching.log_path.read_text()
    assert "dynamic batching off for this model" in log and "reshape" in log
    resp = infer(batching, "reshape", [v2("x", np.arange(6, dtype=np.float32), "FP32"),
                                       v2("shape", np.array([2, 3], dtype=np.int64), "INT64")])
    assert resp.status_code == 200 and resp.json()["outputs"][0]["shape"] == [2, 3]


def test_a_request_larger_than_the_batch_is_refused_with_advice(batching):
    r = infer(batching, "model", [v2("x", np.zeros((9, 10), dtype=np.float32), "FP32")])
    assert r.status_code == 400
    assert "at most 8" in r.json()["error"]


def test_a_full_queue_answers_503_with_retry_after_at_once(busy_model, tmp_path):
    s = Server(["--model", f"slow={busy_model}", "--instances", "1",
                "--max-batch-size", "64", "--max-queue-size", "1"], tmp_path / "server.log")
    try:
        s.wait_loaded()
        # 64 rows fill a batch alone and take ~0.1 s: one runs, one waits for the instance, one
        # waits in the queue, and the rest find it full.
        x = np.ones((64, 256), dtype=np.float32)

        def one(_):
            r = infer(s, "slow", [v2("x", x, "FP32")])
            return r.status_code, r.headers.get("Retry-After"), r.elapsed.total_seconds()

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(16)))
        codes = [c for c, _, _ in results]
        assert 200 in codes and 503 in codes, codes
        refused = [(h, t) for c, h, t in results if c == 503]
        assert all(h == "1" for h, _ in refused)
        # Refused at once, not after waiting behind the queue.
        ok_times = sorted(t for c, _, t in results if c == 200)
        assert min(t for _, t in refused) < ok_times[-1]
        metrics = requests.get(f"{s.url}/metrics", timeout=10).text
        assert 'nv_inference_request_failure{model="slow",version="1",reason="REJECTED"}' in metrics
    finally:
        assert s.stop() == 0


def test_perf_analyzer_drives_a_batching_model_with_triton_batch_semantics(batching):
    # With max_batch_size > 0, perf_analyzer leaves the batch dimension out of --shape and sends
    # -b rows per request, as it does against Triton.
    import os
    import re
    import subprocess
    pa = os.environ.get("KUBEMAAS_PERF_ANALYZER")
    if not pa:
        pytest.fail("KUBEMAAS_PERF_ANALYZER unset: run through `make test` (scripts/setup.sh --test)")
    env = {**os.environ, "LD_LIBRARY_PATH": os.environ.get("KUBEMAAS_PERF_ANALYZER_LIBS", "")}
    before = stats(batching, "model")
    p = subprocess.run([pa, "-m", "model", "-u", batching.http, "-i", "http", "--shape", "x:10", "-b", "2",
                        "--concurrency-range", "4:4", "--measurement-mode", "count_windows",
                        "--measurement-request-count", "100", "--stability-percentage", "100", "--max-trials", "20"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"Concurrency: 4, throughput: [0-9.]+ infer/sec", p.stdout), p.stdout
    after = stats(batching, "model")
    requests_sent = after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
    executions = after["execution_count"] - before["execution_count"]
    assert after["inference_count"] - before["inference_count"] == 2 * requests_sent
    assert executions < requests_sent, (executions, requests_sent)


@pytest.mark.parametrize("flags", [[], ["--max-batch-size", "256"]], ids=["unbatched", "batched"])
def test_a_request_past_its_timeout_gets_503_and_never_runs(flags, busy_model, tmp_path):
    s = Server(["--model", f"slow={busy_model}", "--instances", "1", *flags], tmp_path / "server.log")
    try:
        s.wait_loaded()
        big = np.ones((256, 256), dtype=np.float32)
        before = stats(s, "slow")["inference_count"]
        with ThreadPoolExecutor(3) as pool:
            # Two long requests keep the only instance busy; the third may wait 1 ms at most. It is
            # sent once one long request runs and the other waits (a sleep was not enough: a small
            # body can overtake two large ones still being read).
            busy = [pool.submit(infer, s, "slow", [v2("x", big, "FP32")]) for _ in range(2)]
            deadline = time.time() + 30
            while not (gauge(s, "nv_inference_pending_request_count", "slow") == 2 and
                       gauge(s, "kubemaas_inference_queue_depth", "slow") == 1):
                assert time.time() < deadline, "the long requests never got in"
                time.sleep(0.005)
            body = {"inputs": [v2("x", np.ones((1, 256), dtype=np.float32), "FP32")], "parameters": {"timeout": 1000}}
            r = requests.post(f"{s.url}/v2/models/slow/infer", data=json.dumps(body), timeout=60)
            assert all(f.result().status_code == 200 for f in busy)
        assert r.status_code == 503 and "timed out" in r.json()["error"], r.text
        # Answered when its time ran out, not when the queue was next looked at (after a long
        # request, about a second).
        assert r.elapsed.total_seconds() < 0.5, r.elapsed
        # It never ran: only the two long requests' rows were inferred.
        assert stats(s, "slow")["inference_count"] - before == 512
        bad = requests.post(f"{s.url}/v2/models/slow/infer", timeout=10, data=json.dumps(
            {"inputs": body["inputs"], "parameters": {"timeout": "soon"}}))
        assert bad.status_code == 400 and "parameters.timeout" in bad.json()["error"]
    finally:
        assert s.stop() == 0


def test_a_free_instance_runs_a_request_however_short_its_timeout(repo_dir, tmp_path):
    # parameters.timeout bounds the wait for an instance. An idle server has one free, so nothing
    # waits: a 1 µs timeout must not turn away work that was handed to an instance at once.
    s = Server(["--model", f"model={repo_dir / 'model' / '1' / 'model.onnx'}", "--instances", "2"],
               tmp_path / "server.log")
    try:
        s.wait_loaded()
        x = np.random.default_rng(5).standard_normal((3, 10)).astype(np.float32)
        body = json.dumps({"inputs": [v2("x", x, "FP32")], "parameters": {"timeout": 1}})
        codes = [requests.post(f"{s.url}/v2/models/model/infer", data=body, timeout=10).status_code
                 for _ in range(200)]
        assert codes.count(200) == len(codes), {c: codes.count(c) for c in set(codes)}
    finally:
        assert s.stop() == 0


def test_requests_whose_inputs_disagree_on_rows_run_alone_and_stay_exact(batching):
    # arith takes a [batch,4] and b [batch,3]; nothing forces the two batch sizes to agree. Such a
    # request cannot be split back by rows, so it must not share an execution.
    def one(i):
        ra, rb = (1 + i % 3, 1 + (i // 3) % 3)
        a = np.arange(ra * 4, dtype=np.float64).reshape(ra, 4) + i
        b = np.arange(rb * 3, dtype=np.int32).reshape(rb, 3) + i
        r = infer(batching, "arith", [v2("a", a, "FP64"), v2("b", b, "INT32")])
        assert r.status_code == 200, r.text
        got = {o["name"]: o for o in r.json()["outputs"]}
        assert got["a2"]["shape"] == [ra, 4] and got["a2"]["data"] == (a * 2).flatten().tolist()
        assert got["b1"]["shape"] == [rb, 3] and got["b1"]["data"] == (b + 1).flatten().tolist()

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(90)))


@pytest.mark.parametrize("rows,batches", [
    # Triton's rule (the free instance takes everything queued) would run all 8 rows in one batch
    # on the first instance to come free while the other, soon free too, gets nothing. On the CPU
    # each instance is a core of its own, so the first free one takes an even share, 4; the next
    # finds 4 queued and takes 2; the last 2 are no more than the instances, so they go together.
    ([1] * 8, [2, 2, 4]),
    # Shares are counted in rows, not requests: 12 rows queued, so 6 (two requests of 3), then 3,
    # then the last request alone.
    ([3] * 4, [3, 3, 6]),
], ids=["one-row", "three-row"])
def test_on_a_cpu_a_queue_is_shared_out_over_the_instances_not_drained_by_one(rows, batches, busy_model, tmp_path):
    # Two instances, both busy with a long request, and requests queued behind them. Each answer is
    # still ONNX Runtime's own for that request alone.
    s = two_cpu_instances(busy_model, tmp_path, max_batch=2048, delay_us=2000, threads=2)
    try:
        s.wait_loaded()

        def long_request():
            # Binary, so that the 1.5 MB body costs no parsing: the request runs as soon as it is in.
            big = np.ones((1500, 256), dtype=np.float32).tobytes()
            header = json.dumps({"inputs": [{"name": "x", "shape": [1500, 256], "datatype": "FP32",
                                             "parameters": {"binary_data_size": len(big)}}]}).encode()
            return requests.post(f"{s.url}/v2/models/slow/infer", data=header + big, timeout=120,
                                 headers={"Inference-Header-Content-Length": str(len(header))})

        xs = [np.random.default_rng(40 + i).standard_normal((n, 256)).astype(np.float32) for i, n in enumerate(rows)]
        with ThreadPoolExecutor(10) as pool:
            # A long request is a batch of its own (more rows than the instances' even share of
            # the queue) and holds its instance for seconds: 1,500 rows at a few ms each.
            longs = [pool.submit(long_request) for _ in range(2)]
            deadline = time.time() + 30
            while not (gauge(s, "nv_inference_pending_request_count", "slow") == 2 and
                       gauge(s, "kubemaas_inference_queue_depth", "slow") == 0):
                assert time.time() < deadline, "the long requests never started"
                time.sleep(0.01)
            time.sleep(0.3)  # both are in (and so running): the 1.5 MB bodies take milliseconds
            smalls = [pool.submit(infer, s, "slow", [v2("x", x, "FP32")]) for x in xs]
            while gauge(s, "kubemaas_inference_queue_depth", "slow") < len(xs):
                assert time.time() < deadline, "the one-row requests never all queued"
                time.sleep(0.01)
            assert not any(f.done() for f in longs), "a long request ended before the small ones queued"
            assert [f.result().status_code for f in longs] == [200, 200]
            got = [f.result() for f in smalls]
        assert_busy_answers(busy_model, xs, got)
        sizes = sorted((b["batch_size"], b["compute_infer"]["count"]) for b in stats(s, "slow")["batch_stats"])
        assert sizes == sorted([(b, batches.count(b)) for b in set(batches)] + [(1500, 2)]), sizes
    finally:
        assert s.stop() == 0


def test_a_batch_the_next_request_would_overflow_goes_at_once(repo_dir, tmp_path):
    # Triton's rule: a batch is dispatched as soon as the next queued request would take it past
    # max_batch_size, not after the queue delay. With max 8, 5 rows wait for more; a 4-row request
    # cannot join (9 > 8), so the 5 rows go at once, and the 4 rows wait out their own delay.
    s = Server(["--model", f"model={repo_dir / 'model' / '1' / 'model.onnx'}", "--instances", "1",
                "--execution-provider", "cpu", "--max-batch-size", "8", "--max-queue-delay-us", "1500000"],
               tmp_path / "server.log")
    try:
        s.wait_loaded()
        xs = [np.random.default_rng(50 + n).standard_normal((n, 10)).astype(np.float32) for n in (5, 4)]

        with ThreadPoolExecutor(2) as pool:
            five = pool.submit(timed, s, "model", xs[0])
            time.sleep(0.2)
            four = pool.submit(timed, s, "model", xs[1])
            (r5, t5), (r4, t4) = five.result(), four.result()
        assert r5.status_code == 200 and r4.status_code == 200, (r5.text, r4.text)
        for x, r in ((xs[0], r5), (xs[1], r4)):
            want = reference(repo_dir, "model", {"x": x})
            for out in r.json()["outputs"]:
                np.testing.assert_allclose(np.array(out["data"]).reshape(out["shape"]), want[out["name"]], rtol=1e-5, atol=1e-5)
        # The 5 rows left when the 4 came (about 0.2 s), long before their 1.5 s delay was up.
        assert t5 < 1.0, f"the 5-row batch waited {t5:.2f} s"
        assert t4 >= 1.4, f"the 4-row request waited {t4:.2f} s, not its queue delay"
        sizes = sorted((b["batch_size"], b["compute_infer"]["count"]) for b in stats(s, "model")["batch_stats"])
        assert sizes == [(4, 1), (5, 1)], sizes
    finally:
        assert s.stop() == 0


def test_on_a_cpu_requests_sent_at_once_are_shared_out_as_they_arrive(busy_model, tmp_path):
    # Closed-loop clients whose answers came back together send again together. With two idle
    # instances and a long queue delay, one instance used to collect all of them for the whole
    # delay while the other idled ([6] after 1 s). On the CPU a batch waits for company only
    # while it holds fewer requests than its even share of those in flight (queued, or running
    # on the other instance), so none of the six waits out the 1 s delay, and no batch takes
    # more than half of them.
    s = two_cpu_instances(busy_model, tmp_path, max_batch=64, delay_us=1_000_000, threads=2)
    try:
        s.wait_loaded()
        xs = [np.random.default_rng(60 + i).standard_normal((1, 256)).astype(np.float32) for i in range(6)]

        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda x: timed(s, "slow", x), xs))
        assert_busy_answers(busy_model, xs, [r for r, _ in got])
        times = sorted(t for _, t in got)
        assert times[-1] < 0.6, f"only {sum(t < 0.6 for t in times)} of 6 answered before the 1 s delay: {times}"
        sizes = [b["batch_size"] for b in stats(s, "slow")["batch_stats"] for _ in range(b["compute_infer"]["count"])]
        assert sum(sizes) == 6 and max(sizes) <= 3, sizes
    finally:
        assert s.stop() == 0


def test_on_a_cpu_a_request_does_not_wait_for_company_while_the_other_instance_runs(busy_model, tmp_path):
    # One instance is busy for seconds with a long request; one more request comes to the idle
    # instance. Requests in flight: two, so its share is one, which it already holds. On the
    # CPU waiting would only idle this core (a batch costs what its rows cost one by one), so it
    # runs at once instead of waiting out the 1 s queue delay for company, as Triton's would.
    s = two_cpu_instances(busy_model, tmp_path, max_batch=2048, delay_us=1_000_000, threads=1)
    try:
        s.wait_loaded()
        x = np.random.default_rng(70).standard_normal((1, 256)).astype(np.float32)
        with ThreadPoolExecutor(2) as pool:
            long = start_a_long_request(pool, s)
            r, t = timed(s, "slow", x)
            assert not long.done(), "the long request ended before the short one came"
            assert long.result().status_code == 200
        assert_busy_answers(busy_model, [x], [r])
        assert t < 0.6, f"the short request waited {t:.2f} s beside a running instance"
        sizes = sorted(b["batch_size"] for b in stats(s, "slow")["batch_stats"])
        assert sizes == [1, 1500], sizes
    finally:
        assert s.stop() == 0


def test_on_a_cpu_a_batch_does_not_wait_for_requests_it_cannot_join(busy_model, tmp_path):
    # Both instances are busy: one for seconds, one for a moment. Meanwhile a request that names
    # its output and one that does not queue up: those two never share a batch (as requests of
    # different sequence lengths do not). A batch waits for company only while it holds less
    # than its share of the requests in flight that could join it, so when the instance comes
    # free each runs at once, one after the other. Counting the other one too, the first waited
    # out the 2 s queue delay for a request it could never take.
    s = two_cpu_instances(busy_model, tmp_path, max_batch=2048, delay_us=2_000_000, threads=1)
    try:
        s.wait_loaded()
        medium = np.ones((48, 256), dtype=np.float32)
        xs = [np.random.default_rng(80 + i).standard_normal((1, 256)).astype(np.float32) for i in range(2)]
        named = [None, ["y"]]
        with ThreadPoolExecutor(4) as pool:
            long = start_a_long_request(pool, s)
            short = pool.submit(infer, s, "slow", [v2("x", medium, "FP32")])
            time.sleep(0.02)
            got = list(pool.map(lambda i: timed(s, "slow", xs[i], named[i]), range(2)))
            assert short.result().status_code == 200
            assert not long.done(), "the long request ended before the short ones came"
            assert long.result().status_code == 200
        assert_busy_answers(busy_model, xs, [r for r, _ in got])
        times = [round(t, 2) for _, t in got]
        assert max(times) < 1.0, f"the short requests waited {times} s beside a running instance"
        sizes = sorted(b["batch_size"] for b in stats(s, "slow")["batch_stats"] for _ in range(b["compute_infer"]["count"]))
        assert sizes == [1, 1, 48, 1500], sizes
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("width", [2**40, 2**62], ids=["tib-rows", "overflowing-rows"])
def test_a_request_of_zero_rows_answers_and_never_pads_a_row_of_its_width(batching, width):
    # A shape with a leading 0 holds no elements, however wide its other dimensions. Padded to one
    # row, a [0, 2**40] batch asked for a row of 2**40 elements (the allocation aborted the
    # process), and [0, 2**62] overflowed the row size (a panic in the batch's task).
    sig = requests.get(f"{batching.url}/v2/models/dtypes", timeout=10).json()["inputs"]
    body = [{"name": s["name"], "shape": [0, width], "datatype": s["datatype"], "data": []} for s in sig]
    r = infer(batching, "dtypes", body)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 200:
        assert all(o["shape"] == [0, width] and o["data"] == [] for o in r.json()["outputs"]), r.text[:500]
    assert batching.alive()
    ok = infer(batching, "model", [v2("x", np.ones((1, 10), np.float32), "FP32")])
    assert ok.status_code == 200, ok.text


def test_a_request_whose_inputs_disagree_on_rows_is_still_held_to_the_largest_batch(batching):
    # Such a request runs alone, outside the batcher; max_batch_size still applies to it, as to
    # every request of a batching model (Triton refuses it too).
    a = np.zeros((1000, 4), np.float64)
    b = np.zeros((1, 3), np.int32)
    r = infer(batching, "arith", [v2("a", a, "FP64"), v2("b", b, "INT32")])
    assert r.status_code == 400 and "at most 8" in r.json()["error"], r.text[:300]


def test_a_timeout_of_zero_means_no_timeout_as_in_triton(repo_dir, tmp_path):
    # Triton: "The default is 0 which indicates that the request has no timeout"; tritonclient
    # sends timeout=0 as such. It was refused with 400 on both protocols.
    import tritonclient.grpc as grpcclient

    s = Server(["--model", f"model={repo_dir / 'model' / '1' / 'model.onnx'}"], tmp_path / "server.log")
    try:
        s.wait_loaded()
        x = np.random.default_rng(6).standard_normal((2, 10)).astype(np.float32)
        body = json.dumps({"inputs": [v2("x", x, "FP32")], "parameters": {"timeout": 0}})
        r = requests.post(f"{s.url}/v2/models/model/infer", data=body, timeout=10)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, -1),
                                   reference(repo_dir, "model", {"x": x})["y"], rtol=1e-5, atol=1e-6)
        c = grpcclient.InferenceServerClient(s.grpc)
        i = grpcclient.InferInput("x", list(x.shape), "FP32")
        i.set_data_from_numpy(x)
        np.testing.assert_allclose(c.infer("model", [i], timeout=0).as_numpy("y"),
                                   reference(repo_dir, "model", {"x": x})["y"], rtol=1e-5, atol=1e-6)
        c.close()
    finally:
        assert s.stop() == 0


def test_a_model_whose_output_does_not_keep_the_batch_dimension_is_never_batched(tmp_path):
    # y = Transpose(x): x is [a, b], y is [b, a]. Both first dimensions are dynamic, but y's is
    # x's second: batched, two clients' rows would be transposed together and each would get
    # the other's numbers (or, with other sizes, every request a 500).
    from onnx import TensorProto, helper, save
    graph = helper.make_graph([helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0])], "t",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["a", "b"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "a"])])
    path = tmp_path / "transpose.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    s = Server(["--model", f"t={path}", "--instances", "1", "--max-batch-size", "8",
                "--max-queue-delay-us", "200000"], tmp_path / "server.log")
    try:
        s.wait_loaded()
        c = requests.get(f"{s.url}/v2/models/t/config", timeout=10).json()
        assert c["max_batch_size"] == 0 and "dynamic_batching" not in c, c
        log = s.log_path.read_text()
        assert "dynamic batching off for this model" in log and "dimension 1 of input" in log, log[-2000:]
        x = np.array([[1, 2, 3]], dtype=np.float32)
        r = infer(s, "t", [v2("x", x, "FP32")])
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["shape"] == [3, 1] and r.json()["outputs"][0]["data"] == [1, 2, 3]
        # Sent together (the queue delay would have joined them): each gets its own transpose.
        xs = [np.array([[10 * i + 1, 10 * i + 2]], dtype=np.float32) for i in range(6)]
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda x: infer(s, "t", [v2("x", x, "FP32")]), xs))
        for x, r in zip(xs, answers, strict=True):
            assert r.status_code == 200, r.text
            out = r.json()["outputs"][0]
            assert out["shape"] == [2, 1] and out["data"] == x.T.flatten().tolist(), (x, out)
    finally:
        assert s.stop() == 0


def occupy(pool, server, rows=256):
    """Sends the busy model `slow` a long request (about a second per 256 rows) from `pool` and
    returns its future once it runs on the instance."""
    long = pool.submit(infer, server, "slow", [v2("x", np.ones((rows, 256), dtype=np.float32), "FP32")])
    deadline = time.time() + 30
    while gauge(server, "nv_inference_pending_request_count", "slow") < 1:
        assert time.time() < deadline, "the long request never started"
        time.sleep(0.005)
    time.sleep(0.3)  # its JSON body is parsed and it runs
    assert gauge(server, "kubemaas_inference_queue_depth", "slow") == 0
    return long


def wait_queue_depth(server, n):
    deadline = time.time() + 30
    while gauge(server, "kubemaas_inference_queue_depth", "slow") != n:
        assert time.time() < deadline, f"queue depth never reached {n}"
        time.sleep(0.005)


def test_requests_held_back_for_another_shape_count_in_the_queue_size(busy_model, tmp_path):
    # A request that cannot join the batch being formed (other outputs) was moved out of the
    # bounded channel, so the channel took new requests past --max-queue-size.
    s = Server(["--model", f"slow={busy_model}", "--instances", "1", "--max-batch-size", "256",
                "--max-queue-size", "2", "--max-queue-delay-us", "0"], tmp_path / "server.log")
    try:
        s.wait_loaded()
        one = np.ones((1, 256), dtype=np.float32)
        with ThreadPoolExecutor(8) as pool:
            long = occupy(pool, s)
            # Next: 200 rows (all outputs), then one row asking for `y` alone, which cannot join it.
            a = pool.submit(infer, s, "slow", [v2("x", np.ones((200, 256), dtype=np.float32), "FP32")])
            wait_queue_depth(s, 1)
            b = pool.submit(infer, s, "slow", [v2("x", one, "FP32")], ["y"])
            wait_queue_depth(s, 2)
            assert long.result().status_code == 200
            # `a` runs now (most of a second) and `b` waits: one place is left in the queue.
            while gauge(s, "kubemaas_inference_queue_depth", "slow") != 1:
                time.sleep(0.005)
            later = [pool.submit(infer, s, "slow", [v2("x", one, "FP32")]) for _ in range(3)]
            codes = sorted(f.result().status_code for f in later)
            assert a.result().status_code == 200 and b.result().status_code == 200
        assert codes == [200, 503, 503], codes
    finally:
        assert s.stop() == 0


def test_requests_whose_clients_left_free_their_place_in_the_queue(busy_model, tmp_path):
    s = Server(["--model", f"slow={busy_model}", "--instances", "1", "--max-batch-size", "256",
                "--max-queue-size", "2"], tmp_path / "server.log")
    try:
        s.wait_loaded()
        one = np.ones((1, 256), dtype=np.float32)
        before = stats(s, "slow")["inference_count"]
        body = json.dumps({"inputs": [v2("x", one, "FP32")]})

        def impatient(_):
            try:
                return requests.post(f"{s.url}/v2/models/slow/infer", data=body, timeout=0.3).status_code
            except requests.exceptions.Timeout:
                return "left"

        with ThreadPoolExecutor(4) as pool:
            long = occupy(pool, s, rows=256)
            # Clients fill the queue (two places; a third is refused) and give up while the
            # instance is busy.
            gave_up = list(pool.map(impatient, range(3)))
            assert gave_up.count("left") == 2 and 200 not in gave_up, gave_up
            time.sleep(0.2)
            # Their places are free: a new request is queued, not refused, and answered.
            r = infer(s, "slow", [v2("x", one, "FP32")])
            assert long.result().status_code == 200
        assert r.status_code == 200, r.text
        # The two that left never ran.
        assert stats(s, "slow")["inference_count"] - before == 257
    finally:
        assert s.stop() == 0


def test_preferred_batch_sizes_form_the_largest_the_queue_allows_as_in_triton(busy_model, tmp_path):
    s = Server(["--model", f"slow={busy_model}", "--instances", "1", "--max-batch-size", "256",
                "--preferred-batch-size", "4,8", "--max-queue-delay-us", "1000000"], tmp_path / "server.log")
    try:
        s.wait_loaded()
        xs = [np.full((1, 256), i, dtype=np.float32) for i in range(8)]
        with ThreadPoolExecutor(9) as pool:
            long = occupy(pool, s)
            queued = [pool.submit(infer, s, "slow", [v2("x", x, "FP32")]) for x in xs]
            wait_queue_depth(s, 8)
            assert long.result().status_code == 200
            answers = [f.result() for f in queued]
        assert_busy_answers(busy_model, xs, answers)
        sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in stats(s, "slow")["batch_stats"]}
        # The long request ran alone (256), then the eight queued ones as one batch of 8, not two of 4.
        assert sizes == {256: 1, 8: 1}, sizes
    finally:
        assert s.stop() == 0
