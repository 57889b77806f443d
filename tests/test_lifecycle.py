"""Lifecycle: SIGTERM under load, the ORT library missing, perf_analyzer against the server."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests

from conftest import BINARY, ROOT, Server


def pending(server):
    text = requests.get(f"{server.metrics_url}/metrics", timeout=5).text
    m = re.search(r'nv_inference_pending_request_count\{model="slow",version="1"\} (\d+)', text)
    return int(m.group(1)) if m else 0


def test_sigterm_under_load_loses_no_accepted_request(repo_dir, tmp_path):
    s = Server(["--model", f"slow={repo_dir / 'slow' / '1' / 'model.onnx'}", "--instances", "1",
                "--shutdown-timeout", "60", "--shutdown-delay", "1"], tmp_path / "server.log")
    s.wait_loaded()
    x = np.random.default_rng(0).standard_normal((1024, 512)).astype(np.float32)
    # Binary in and out, so the time is spent in the model, not in JSON.
    header = ('{"inputs": [{"name": "x", "shape": [1024, 512], "datatype": "FP32", '
              '"parameters": {"binary_data_size": %d}}], "parameters": {"binary_data_output": true}}' % x.nbytes).encode()
    headers = {"Inference-Header-Content-Length": str(len(header))}
    n = 6
    results = [None] * n

    def call(i):
        try:
            r = requests.post(f"{s.url}/v2/models/slow/infer", data=header + x.tobytes(), headers=headers, timeout=120)
            n_json = int(r.headers["Inference-Header-Content-Length"])
            results[i] = (r.status_code, len(r.content) - n_json)
        except Exception as e:  # noqa: BLE001 - recorded and asserted below
            results[i] = ("error", repr(e))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    # Wait until every request is accepted and queued or running, one instance serving them in turn.
    deadline = time.time() + 60
    while pending(s) < n and time.time() < deadline:
        time.sleep(0.01)
    assert pending(s) == n, "requests were not all accepted"
    s.proc.send_signal(signal.SIGTERM)
    # Readiness turns false at once; new requests are still taken during --shutdown-delay.
    time.sleep(0.1)
    assert requests.get(f"{s.url}/v2/health/ready", timeout=5).status_code == 503
    assert requests.get(f"{s.url}/v2/models/slow/ready", timeout=5).status_code == 503
    for t in threads:
        t.join(120)
    assert s.proc.wait(60) == 0
    s.stop()
    assert results == [(200, x.nbytes)] * n, results


def test_missing_ort_library_exits_with_instructions(repo_dir, tmp_path):
    p = subprocess.run([str(BINARY), "serve", "--model", f"m={repo_dir / 'model' / '1' / 'model.onnx'}",
                        "--ort-library", str(tmp_path / "nope.so"), "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert "failed to load the ONNX Runtime library" in p.stderr and "make setup" in p.stderr
    assert "panicked" not in p.stderr


def test_cuda_requested_without_cuda_reports_the_model_not_ready(repo_dir, tmp_path):
    s = Server(["--model", f"model={repo_dir / 'model' / '1' / 'model.onnx'}", "--execution-provider", "cuda"],
               tmp_path / "server.log")
    try:
        index = s.wait_loaded()
        assert index[0]["state"] == "UNAVAILABLE" and "CUDA" in index[0]["reason"]
        assert requests.get(f"{s.url}/v2/models/model/ready").status_code == 503
    finally:
        assert s.stop() == 0


def test_perf_analyzer_runs_against_the_server(server):
    pa = os.environ.get("KUBEMAAS_PERF_ANALYZER")
    if not pa:
        pytest.fail("KUBEMAAS_PERF_ANALYZER unset: run through `make test` (scripts/setup.sh --test)")
    env = {**os.environ, "LD_LIBRARY_PATH": os.environ.get("KUBEMAAS_PERF_ANALYZER_LIBS", "")}
    for shared_memory in ("none",):
        p = subprocess.run([pa, "-m", "model", "-u", server.http, "-i", "http", "--shape", "x:4,10",
                            "--concurrency-range", "1:2",
                            # Count windows and a loose stability bound: CI machines are noisy, and
                            # this test is about protocol compatibility, not about the numbers.
                            "--measurement-mode", "count_windows", "--measurement-request-count", "100",
                            "--stability-percentage", "100", "--max-trials", "20",
                            "--shared-memory", shared_memory],
                           capture_output=True, text=True, timeout=300, env=env)
        assert p.returncode == 0, p.stdout + p.stderr
        assert re.search(r"Concurrency: 2, throughput: [0-9.]+ infer/sec", p.stdout), p.stdout
    # Server-side statistics saw the load.
    st = requests.get(f"{server.url}/v2/models/model/stats").json()["model_stats"][0]
    assert st["inference_stats"]["success"]["count"] > 10


def test_exit_on_load_failure_ends_with_code_4_and_the_error_in_the_termination_log(repo_dir, tmp_path):
    term = tmp_path / "termination-log"
    p = subprocess.run([str(BINARY), "serve", "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
                        "--model", f"broken={repo_dir / 'broken' / '1' / 'model.onnx'}",
                        "--exit-on-load-failure", "--termination-log", str(term)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 4, p.stderr
    assert "model broken version 1: failed to load model" in term.read_text()


def test_sigterm_during_a_long_model_load_exits_at_once(tmp_path):
    path = tmp_path / "slow-load" / "model.onnx"
    subprocess.run([sys.executable, str(ROOT / "tests" / "models" / "make_models.py"), "--slow-to-load", str(path)],
                   check=True)
    # The kubelet makes the termination log; the server says in it that it was still loading,
    # which is how the operator tells a startup-probe kill from a liveness-probe restart.
    term = tmp_path / "termination-log"
    term.write_text("")
    s = Server(["--model", f"slowload={path}", "--termination-log", str(term)], tmp_path / "server.log")
    try:
        time.sleep(1)
        index = requests.post(f"{s.url}/v2/repository/index", timeout=5).json()
        assert index[0]["state"] == "LOADING", index  # the load takes ~25 s
        began = time.time()
        s.proc.send_signal(signal.SIGTERM)
        code = s.proc.wait(30)
        took = time.time() - began
    finally:
        s.stop()
    assert code == 0 and took < 2, (code, took)
    assert term.read_text().startswith("stopped by a signal while loading its models ("), term.read_text()


def test_a_signal_after_loading_is_told_apart_in_the_termination_log(repo_dir, tmp_path):
    # Exit 0 either way: only these words tell the operator that a restart came after the
    # model had loaded (a liveness-probe kill), not from the startup budget.
    term = tmp_path / "termination-log"
    term.write_text("")
    s = Server(["--model", f"model={repo_dir / 'model' / '1' / 'model.onnx'}", "--termination-log", str(term),
                "--shutdown-delay", "0"], tmp_path / "server.log")
    s.wait_loaded()
    assert s.stop() == 0
    assert term.read_text().startswith("stopped by a signal after its models had loaded ("), term.read_text()
    # Outside Kubernetes there is no such file, and none is made.
    missing = tmp_path / "no-termination-log"
    s = Server(["--model", f"model={repo_dir / 'model' / '1' / 'model.onnx'}", "--termination-log", str(missing),
                "--shutdown-delay", "0"], tmp_path / "server2.log")
    s.wait_loaded()
    assert s.stop() == 0
    assert not missing.exists()


def test_slow_silent_and_idle_connections_are_closed_and_do_not_starve_a_client(repo_dir, tmp_path):
    import resource
    import socket

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))  # this test holds 1,000 sockets
    s = Server(["--model", f"model={repo_dir / 'model' / '1' / 'model.onnx'}", "--header-read-timeout", "2"],
               tmp_path / "server.log")
    held = []
    try:
        s.wait_loaded()
        host, port = s.http.rsplit(":", 1)
        held = [socket.create_connection((host, int(port))) for _ in range(1000)]  # silent
        slow = socket.create_connection((host, int(port)))
        slow.sendall(b"POST /v2/models/model/infer HTTP/1.1\r\nHost: x\r\n")  # never finishes
        held.append(slow)
        keep = socket.create_connection((host, int(port)))  # one request, then idle keep-alive
        keep.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        held.append(keep)
        began = time.time()
        r = requests.post(f"{s.url}/v2/models/model/infer", timeout=5,
                          json={"inputs": [{"name": "x", "shape": [1, 10], "datatype": "FP32", "data": [0] * 10}]})
        took = time.time() - began
        assert r.status_code == 200 and took < 1, (r.status_code, took)
        assert keep.recv(4096).startswith(b"HTTP/1.1 200")

        def closed_within(sock, seconds):
            sock.settimeout(seconds)
            try:
                while True:
                    data = sock.recv(4096)
                    if not data:
                        return True
            except socket.timeout:
                return False
            except ConnectionResetError:
                return True

        # --header-read-timeout 2: each is closed by the server, not left open.
        assert closed_within(slow, 6), "a partial request head held its connection"
        assert closed_within(keep, 6), "an idle keep-alive connection was never closed"
        assert closed_within(held[0], 6), "a silent connection was never closed"
        assert s.alive()
    finally:
        for sock in held:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert s.stop() == 0


def test_readiness_waits_for_loading_and_needs_one_model_that_serves(repo_dir, tmp_path):
    # Only broken models: nothing would be served, so the server never becomes ready.
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    s = Server(["--model", f"a={broken}", "--model", f"b={broken}"], tmp_path / "broken.log")
    try:
        s.wait_loaded()
        assert requests.get(f"{s.url}/v2/health/ready", timeout=5).status_code == 503
    finally:
        assert s.stop() == 0
    # A good model next to a broken one: ready once loading is over, the broken one reported alone.
    s = Server(["--model", f"good={repo_dir / 'model' / '1' / 'model.onnx'}", "--model", f"bad={broken}"],
               tmp_path / "mixed.log")
    try:
        s.wait_loaded()
        assert requests.get(f"{s.url}/v2/health/ready", timeout=5).status_code == 200
        assert requests.get(f"{s.url}/v2/models/bad/ready", timeout=5).status_code == 503
    finally:
        assert s.stop() == 0
