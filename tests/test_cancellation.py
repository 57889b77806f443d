"""Clients that leave. A request whose client disconnects while it waits for an instance (or for its
batch) never runs; a client that leaves while its request runs does not free the instance early;
a client that leaves mid-batch costs no other client its answer, and nobody gets two.

Every test runs twice: requests running alone on one instance, and through the dynamic batcher.
The `busy` model (`make_models.py --busy`: a Loop of 8,000 small MatMuls) runs about a second for
256 rows from a small request, so "while it runs" and "while it waits" are wide windows."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
import requests

from conftest import Server

MODES = {"unbatched": [], "batched": ["--max-batch-size", "4096", "--max-queue-delay-us", "2000"]}


@pytest.fixture(params=list(MODES))
def slow(request, busy_model, tmp_path):
    s = Server(["--model", f"slow={busy_model}", "--instances", "1", *MODES[request.param]],
               tmp_path / "server.log")
    s.wait_loaded()
    yield s
    assert s.stop() == 0


def rows_of(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 256)).astype(np.float32)


def request_body(x):
    return json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.flatten().tolist()}]}).encode()


def infer(server, x):
    return requests.post(f"{server.url}/v2/models/slow/infer", data=request_body(x), timeout=120)


def stats(server):
    return requests.get(f"{server.url}/v2/models/slow/stats", timeout=10).json()["model_stats"][0]


def series(server, family, *label):
    """The value of `family` for the slow model on the metrics port (with `label` too, if given)."""
    text = requests.get(f"{server.metrics_url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(f'{family}{{model="slow"') and all(l in line for l in label):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {family} {label} for slow")


def pending(server):
    return series(server, "nv_inference_pending_request_count")


def queued(server):
    """Requests read, decoded and waiting for an instance or their batch (the queue-depth gauge)."""
    return series(server, "kubemaas_inference_queue_depth")


def canceled(server):
    """`nv_inference_request_failure{reason="CANCELED"}` for the model, as Triton counts clients that left."""
    return series(server, "nv_inference_request_failure", 'reason="CANCELED"')


def send_and_stay(server, x):
    """Sends a whole request on a raw connection and returns the socket, unanswered."""
    host, port = server.http.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    body = request_body(x)
    sock.sendall(b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def leave(sock):
    # An abortive close (RST), as a client process that dies or times out would.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def wait_until(cond, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_a_request_whose_client_leaves_while_it_waits_never_runs(slow):
    before = stats(slow)
    long = threading.Thread(target=lambda: infer(slow, rows_of(256)))
    long.start()
    assert wait_until(lambda: pending(slow) >= 1)
    time.sleep(0.1)
    # 3 rows queue behind the running 256 and their client goes away before they can run.
    sock = send_and_stay(slow, rows_of(3, seed=1))
    # Read and queued, not merely connected: its client leaves while it waits.
    assert wait_until(lambda: queued(slow) >= 1)
    leave(sock)
    assert wait_until(lambda: pending(slow) <= 1), "the abandoned request is still counted in flight"
    long.join(120)
    # The server goes on serving, and the 3 rows never ran.
    x = rows_of(5, seed=2)
    r = infer(slow, x)
    assert r.status_code == 200, r.text
    after = stats(slow)
    assert after["inference_count"] - before["inference_count"] == 256 + 5
    assert after["execution_count"] - before["execution_count"] == 2
    assert pending(slow) == 0
    # It is counted, as Triton counts it: a failure for CANCELED, and not a success.
    assert canceled(slow) == 1
    assert after["inference_stats"]["fail"]["count"] - before["inference_stats"]["fail"]["count"] == 1
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 2


def test_a_client_leaving_mid_inference_does_not_free_its_instance(slow):
    # How long 256 rows take here, alone.
    t0 = time.time()
    assert infer(slow, rows_of(256)).status_code == 200
    alone = time.time() - t0
    before = stats(slow)
    sock = send_and_stay(slow, rows_of(256, seed=3))
    assert wait_until(lambda: stats(slow)["execution_count"] > before["execution_count"] or pending(slow) >= 1)
    sent = time.time()
    # Long enough for its body to be read and decoded (it must be running when its client leaves),
    # short against the run.
    time.sleep(min(0.3, alone / 3))
    leave(sock)
    # The only instance is still busy with the abandoned 256 rows: one more row must wait for them
    # (had the instance been freed, it would be answered in milliseconds, running beside them).
    t1 = time.time()
    r = infer(slow, rows_of(1, seed=4))
    waited = time.time() - t1
    assert r.status_code == 200, r.text
    remaining = alone - (t1 - sent)
    assert waited > 0.5 * remaining, (waited, remaining, alone)
    after = stats(slow)
    # The abandoned request ran to its end (it had started): both executions are counted.
    assert after["execution_count"] - before["execution_count"] == 2
    assert after["inference_count"] - before["inference_count"] == 256 + 1
    assert after["inference_stats"]["queue"]["ns"] - before["inference_stats"]["queue"]["ns"] > 0.5 * remaining * 1e9
    assert wait_until(lambda: pending(slow) == 0)
    # Its client never got the answer: CANCELED, though it ran.
    assert canceled(slow) == 1
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 1


def test_clients_leaving_mid_batch_cost_the_others_nothing(slow, busy_model):
    sess = ort.InferenceSession(str(busy_model))
    xs = [rows_of(1 + i % 4, seed=100 + i) for i in range(48)]
    leavers = set(range(0, 48, 3))
    got = {}

    def one(i):
        if i in leavers:
            sock = send_and_stay(slow, xs[i])
            time.sleep(0.01 * (i % 5))
            leave(sock)
            return
        r = infer(slow, xs[i])
        assert r.status_code == 200, r.text
        [out] = r.json()["outputs"]
        got.setdefault(i, []).append(np.array(out["data"], dtype=np.float32).reshape(out["shape"]))

    # A long request keeps the instance busy while the others queue up and batch behind it.
    head = threading.Thread(target=lambda: infer(slow, rows_of(128)))
    head.start()
    with ThreadPoolExecutor(24) as pool:
        list(pool.map(one, range(48)))
    head.join(120)
    stayed = [i for i in range(48) if i not in leavers]
    # Everyone who stayed got exactly one answer, and it is the answer to their own input.
    assert sorted(got) == stayed
    for i in stayed:
        assert len(got[i]) == 1
        [want] = sess.run(None, {"x": xs[i]})
        np.testing.assert_allclose(got[i][0], want, rtol=1e-4, atol=1e-4)
    assert wait_until(lambda: pending(slow) == 0)
    assert infer(slow, rows_of(2)).status_code == 200
