"""API keys (`serve --api-keys-file`): every inference and metadata route of REST V2, V1 and gRPC
wants a key; health and readiness stay open; keys limited to some models get 403 elsewhere; the file
is re-read when it changes (rotation, revocation); keys never reach the log."""

import json
import time

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import Server, grpc_answer, grpc_open

ALICE, BOB = "alice-key-7f3a9c", "bob-key-51d0e2"
X = {"inputs": [{"name": "x", "shape": [1, 10], "datatype": "FP32", "data": list(range(10))}]}
V = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}


@pytest.fixture(scope="module")
def guarded(repo_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("auth")
    keys = d / "keys"
    keys.write_text(f"# who may call\nalice:{ALICE}\nbob:{BOB}:versioned\n")
    s = Server(["--model", f"model={repo_dir / 'model' / '1' / 'model.onnx'}",
                "--model", f"versioned={repo_dir / 'versioned' / '3' / 'model.onnx'}",
                "--api-keys-file", str(keys), "--audit-log"], d / "server.log")
    s.keys = keys
    wait_ready(s)
    yield s
    assert s.stop() == 0


def wait_ready(s):
    """Waits for the server's readiness, which needs no key (`wait_loaded` lists models, which does)."""
    for _ in range(300):
        if requests.get(f"{s.url}/v2/health/ready", timeout=5).status_code == 200:
            return
        time.sleep(0.1)
    raise TimeoutError(f"not ready; log at {s.log_path}")


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def test_health_and_readiness_stay_open_for_the_kubelet(guarded):
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/model/ready", "/v2/models/versioned/versions/1/ready"):
        r = requests.get(f"{guarded.url}{path}", timeout=5)
        assert r.status_code == 200, (path, r.status_code, r.text)
    # The metrics port is for the cluster's own components: metrics and model metadata, no key.
    assert requests.get(f"{guarded.metrics_url}/metrics", timeout=5).status_code == 200
    meta = requests.get(f"{guarded.metrics_url}/v2/models/model", timeout=5)
    assert meta.status_code == 200 and meta.json()["name"] == "model"
    assert requests.post(f"{guarded.metrics_url}/v2/models/model/infer", json=X, timeout=5).status_code == 404


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/v2/models/model/infer", X),
    ("GET", "/v2/models/model", None),
    ("GET", "/v2/models/model/config", None),
    ("GET", "/v2/models/model/stats", None),
    ("GET", "/v2/models/stats", None),
    ("GET", "/v2", None),
    ("POST", "/v2/repository/index", None),
    ("GET", "/metrics", None),
    ("POST", "/v1/models/model:predict", {"instances": [list(range(10))]}),
    ("GET", "/v1/models/model/metadata", None),
])
def test_every_other_route_wants_a_valid_key(guarded, method, path, body):
    url = f"{guarded.url}{path}"
    for headers in ({}, bearer("wrong"), {"Authorization": f"Basic {ALICE}"}):
        r = requests.request(method, url, json=body, headers=headers, timeout=10)
        assert r.status_code == 401, (headers, r.status_code, r.text)
        assert r.headers["WWW-Authenticate"].startswith("Bearer") and r.json()["error"], r.text
    r = requests.request(method, url, json=body, headers=bearer(ALICE), timeout=10)
    assert r.status_code == 200, r.text


def test_a_key_limited_to_some_models_gets_403_for_the_others(guarded):
    r = requests.post(f"{guarded.url}/v2/models/model/infer", json=X, headers=bearer(BOB), timeout=10)
    assert r.status_code == 403 and "bob" in r.json()["error"] and "model" in r.json()["error"], r.text
    r = requests.post(f"{guarded.url}/v2/models/versioned/infer", json=V, headers=bearer(BOB), timeout=10)
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [4.0, 5.0], r.text
    r = requests.post(f"{guarded.url}/v1/models/model:predict", json={"instances": [list(range(10))]},
                      headers=bearer(BOB), timeout=10)
    assert r.status_code == 403, r.text


def test_grpc_wants_the_same_keys_in_metadata(guarded):
    client = grpcclient.InferenceServerClient(guarded.grpc)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("model")
    x = grpcclient.InferInput("x", [1, 10], "FP32")
    x.set_data_from_numpy(np.arange(10, dtype=np.float32).reshape(1, 10))
    with pytest.raises(InferenceServerException) as e:
        client.infer("model", [x])
    assert e.value.status() == "StatusCode.UNAUTHENTICATED" and "Authorization: Bearer" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("model", headers={"authorization": "Bearer wrong"})
    assert e.value.status() == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as e:
        client.infer("model", [x], headers={"authorization": f"Bearer {BOB}"})
    assert e.value.status() == "StatusCode.PERMISSION_DENIED"
    got = client.infer("model", [x], headers={"authorization": f"Bearer {ALICE}"}).as_numpy("y")
    assert got.shape == (1, 3)
    assert client.get_model_config("model", headers={"authorization": f"Bearer {ALICE}"}).config.name == "model"
    # A stream opens with a valid key; each request is checked for its model.
    answers = []
    client.start_stream(callback=lambda result, error: answers.append((result, error)),
                        headers={"authorization": f"Bearer {BOB}"})
    v = grpcclient.InferInput("x", [2], "FP32")
    v.set_data_from_numpy(np.array([1, 2], dtype=np.float32))
    client.async_stream_infer("model", [x], request_id="no")
    client.async_stream_infer("versioned", [v], request_id="yes")
    client.stop_stream()
    assert answers[0][0] is None and "may not call model" in answers[0][1].message(), answers
    assert answers[1][1] is None and list(answers[1][0].as_numpy("y")) == [4.0, 5.0]
    # The standard health service stays open.
    check = grpc.insecure_channel(guarded.grpc).unary_unary(
        "/grpc.health.v1.Health/Check", request_serializer=lambda b: b, response_deserializer=lambda b: b)
    assert check(b"", timeout=10) == b"\x08\x01"  # status: SERVING


def test_the_audit_log_says_who_called_what_and_how_it_went(guarded):
    body = json.dumps(X).encode()
    assert requests.post(f"{guarded.url}/v2/models/model/infer", data=body, headers=bearer(ALICE),
                         timeout=10).status_code == 200
    assert requests.post(f"{guarded.url}/v2/models/model/infer?who=nobody", data=body, timeout=10).status_code == 401
    client = grpcclient.InferenceServerClient(guarded.grpc)
    x = grpcclient.InferInput("x", [1, 10], "FP32")
    x.set_data_from_numpy(np.arange(10, dtype=np.float32).reshape(1, 10))
    client.infer("model", [x], headers={"authorization": f"Bearer {ALICE}"})
    with pytest.raises(InferenceServerException):
        client.get_model_config("model", headers={"authorization": f"Bearer {BOB}"})
    time.sleep(0.3)
    audit = [json.loads(line) for line in guarded.log_path.read_text().splitlines()
             if '"target":"kubemaas_audit"' in line]
    http_ok = [a for a in audit if a["protocol"] == "http" and a["caller"] == "alice" and a["status"] == "200"
               and a["route"] == "/v2/models/model/infer"]
    assert http_ok, audit
    a = http_ok[-1]
    assert a["model"] == "model" and a["bytes_in"] == len(body) and a["bytes_out"] > 0 and a["latency_ms"] > 0, a
    assert any(a["caller"] == "anonymous" and a["status"] == "401" for a in audit), audit
    grpc_ok = [a for a in audit if a["protocol"] == "grpc" and a["route"] == "ModelInfer"]
    assert grpc_ok and grpc_ok[-1]["caller"] == "alice" and grpc_ok[-1]["status"] == "Ok", audit
    assert grpc_ok[-1]["bytes_in"] > 40 and grpc_ok[-1]["bytes_out"] > 12
    denied = [a for a in audit if a["route"] == "ModelConfig"]
    assert denied and denied[-1]["status"] == "PermissionDenied" and denied[-1]["caller"] == "bob", audit
    # Probes are not audited; keys never appear.
    assert not any("/health/" in a["route"] for a in audit)
    assert ALICE not in guarded.log_path.read_text()


def audit_lines(server):
    time.sleep(0.3)
    return [json.loads(line) for line in server.log_path.read_text().splitlines()
            if '"target":"kubemaas_audit"' in line]


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),)], ids=["no key", "a wrong key"])
def test_grpc_refuses_a_call_without_a_valid_key_before_its_message_arrives(guarded, metadata):
    # REST answers 401 before it reads a body; gRPC must too, or a caller without a key holds
    # --max-buffered-request-bytes (shared with every valid caller) for --body-read-timeout.
    start = time.monotonic()
    c, conn, sid = grpc_open(guarded, 1_000_000, 100_000, metadata=metadata)
    try:
        fields = grpc_answer(c, conn, sid, timeout=5)
    finally:
        c.close()
    assert fields.get("grpc-status") == "16", fields  # UNAUTHENTICATED
    assert time.monotonic() - start < 3
    refused = [a for a in audit_lines(guarded) if a["protocol"] == "grpc" and a["route"] == "ModelInfer"
               and a["status"] == "Unauthenticated"]
    assert refused and refused[-1]["caller"] == "anonymous", refused


def test_every_grpc_call_but_the_probes_writes_an_audit_line(guarded):
    client = grpcclient.InferenceServerClient(guarded.grpc)
    wrong = {"authorization": "Bearer wrong"}
    alice = {"authorization": f"Bearer {ALICE}"}
    for call in (client.get_server_metadata, client.get_model_repository_index):
        with pytest.raises(InferenceServerException) as e:
            call(headers=wrong)
        assert e.value.status() == "StatusCode.UNAUTHENTICATED"
        call(headers=alice)
    with pytest.raises(InferenceServerException):
        client.get_inference_statistics("model", headers=wrong)
    client.get_inference_statistics("model", headers=alice)
    client.is_server_live()
    seen = {(a["route"], a["status"], a["caller"]) for a in audit_lines(guarded) if a["protocol"] == "grpc"}
    for route in ("ServerMetadata", "RepositoryIndex", "ModelStatistics"):
        assert (route, "Unauthenticated", "anonymous") in seen, seen
        assert (route, "Ok", "alice") in seen, seen
    assert not any(route in ("ServerLive", "ServerReady", "ModelReady") for route, _, _ in seen)


def test_a_key_limited_to_some_models_sees_only_those_in_listings(guarded):
    # bob may call `versioned` only: the server-wide listings must not show him `model` (its
    # statistics, its load errors), nor may /metrics on the HTTP port, which covers every model.
    bob, alice = bearer(BOB), bearer(ALICE)
    stats = requests.get(f"{guarded.url}/v2/models/stats", headers=bob, timeout=5)
    assert stats.status_code == 200, stats.text
    assert {m["name"] for m in stats.json()["model_stats"]} == {"versioned"}
    index = requests.post(f"{guarded.url}/v2/repository/index", headers=bob, timeout=5).json()
    assert {m["name"] for m in index} == {"versioned"}
    everything = requests.post(f"{guarded.url}/v2/repository/index", headers=alice, timeout=5).json()
    assert {m["name"] for m in everything} == {"model", "versioned"}
    r = requests.get(f"{guarded.url}/metrics", headers=bob, timeout=5)
    assert r.status_code == 403 and "bob" in r.json()["error"] and "metrics" in r.json()["error"], r.text
    assert requests.get(f"{guarded.url}/metrics", headers=alice, timeout=5).status_code == 200
    client = grpcclient.InferenceServerClient(guarded.grpc)
    headers = {"authorization": f"Bearer {BOB}"}
    grpc_stats = client.get_inference_statistics(headers=headers, as_json=True)
    assert {m["name"] for m in grpc_stats["model_stats"]} == {"versioned"}, grpc_stats
    grpc_index = client.get_model_repository_index(headers=headers, as_json=True)
    assert {m["name"] for m in grpc_index["models"]} == {"versioned"}, grpc_index


def test_rotated_and_revoked_keys_take_effect_without_a_restart_and_never_reach_the_log(guarded):
    new = "alice-key-rotated-0b44"
    guarded.keys.write_text(f"alice:{new}\n")  # alice rotated, bob revoked
    url = f"{guarded.url}/v2/models/model/infer"
    deadline = time.time() + 10
    while time.time() < deadline:
        if requests.post(url, json=X, headers=bearer(new), timeout=5).status_code == 200:
            break
        time.sleep(0.2)
    assert requests.post(url, json=X, headers=bearer(new), timeout=5).status_code == 200
    assert requests.post(url, json=X, headers=bearer(ALICE), timeout=5).status_code == 401
    r = requests.post(f"{guarded.url}/v2/models/versioned/infer", json=V, headers=bearer(BOB), timeout=5)
    assert r.status_code == 401
    # A broken file keeps the keys in force.
    guarded.keys.write_text("alice:\n")
    time.sleep(2.5)
    assert requests.post(url, json=X, headers=bearer(new), timeout=5).status_code == 200
    log = guarded.log_path.read_text()
    assert "API keys reloaded" in log and "keeping the previous API keys" in log
    for key in (ALICE, BOB, new):
        assert key not in log


def test_an_unreadable_keys_file_stops_the_server_instead_of_serving_open(repo_dir, tmp_path):
    import subprocess

    from conftest import BINARY
    p = subprocess.run([str(BINARY), "serve", "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0",
                        "--metrics-port", "0", "--model", f"m={repo_dir / 'model' / '1' / 'model.onnx'}",
                        "--api-keys-file", str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "failed to read the API keys file" in p.stderr, p.stderr


def test_a_key_limited_to_a_model_reaches_no_other_on_v1_even_one_whose_name_starts_the_same(repo_dir, tmp_path):
    # TF-Serving routes put the verb after a ':' on the last segment. Authorization read the model
    # name up to the first ':' of its segment, routing up to the verb, so with models `a` and `a:b`
    # a key for `a` reached `a:b` through /v1/models/a:b/... (and a key for `a:b` got 403 there).
    keys = tmp_path / "keys"
    keys.write_text(f"only-a:{ALICE}:a\nonly-ab:{BOB}:a:b\n")
    path = repo_dir / "model" / "1" / "model.onnx"
    s = Server(["--model", f"a={path}", "--model", f"a:b={path}", "--api-keys-file", str(keys)],
               tmp_path / "server.log")
    try:
        wait_ready(s)
        row = {"instances": [list(range(10))]}
        for method, route, body in [("POST", "/v1/models/a:b/versions/1:predict", row),
                                    ("GET", "/v1/models/a:b/metadata", None),
                                    ("GET", "/v1/models/a:b/versions/1", None)]:
            r = requests.request(method, f"{s.url}{route}", json=body, headers=bearer(ALICE), timeout=10)
            assert r.status_code == 403, (route, r.status_code, r.text)
            r = requests.request(method, f"{s.url}{route}", json=body, headers=bearer(BOB), timeout=10)
            assert r.status_code == 200, (route, r.status_code, r.text)
        r = requests.post(f"{s.url}/v1/models/a:predict", json=row, headers=bearer(ALICE), timeout=10)
        assert r.status_code == 200, r.text
    finally:
        assert s.stop() == 0


def test_a_limited_key_is_checked_against_the_decoded_model_name(repo_dir, tmp_path):
    # Routing percent-decodes model names; authorization must read the same name. bob may call
    # "a" only: "a%3Ab" is the model "a:b" (not "a" with a verb), and "%61" is "a".
    onnx = repo_dir / "model" / "1" / "model.onnx"
    keys = tmp_path / "keys"
    keys.write_text(f"bob:{BOB}:a\n")
    s = Server(["--model", f"a={onnx}", "--model", f"a:b={onnx}", "--api-keys-file", str(keys)],
               tmp_path / "server.log")
    try:
        wait_ready(s)
        body = {"instances": [list(range(10))]}
        for path, want in (("/v1/models/a%3Ab:predict", 403), ("/v1/models/a%3Ab/versions/1:predict", 403),
                           ("/v1/models/%61:predict", 200), ("/v1/models/a:predict", 200)):
            r = requests.post(f"{s.url}{path}", json=body, headers=bearer(BOB), timeout=10)
            assert r.status_code == want, (path, r.status_code, r.text)
        for path, want in (("/v2/models/a%3Ab/infer", 403), ("/v2/models/%61/infer", 200)):
            r = requests.post(f"{s.url}{path}", json=X, headers=bearer(BOB), timeout=10)
            assert r.status_code == want, (path, r.status_code, r.text)
    finally:
        assert s.stop() == 0
