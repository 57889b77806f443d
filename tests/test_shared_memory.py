"""Triton's system shared memory extension (`--allow-client-shm`): Triton's own clients put inputs
in POSIX shared memory, register the regions, and read the outputs back from them; the answers are
ONNX Runtime's own. Off by default, with a clear error; bad keys, sizes and regions get a 4xx
that says what to fix, and the server keeps serving."""

import concurrent.futures
import json
import os
import re
import subprocess
import time
import uuid

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from conftest import Server
from test_protocols import reference

CLIENTS = {"http": httpclient, "grpc": grpcclient}


@pytest.fixture(scope="module")
def shm_server(repo_dir, tmp_path_factory):
    s = Server(["--model-repository", str(repo_dir), "--instances", "2", "--allow-client-shm"],
               tmp_path_factory.mktemp("shm") / "server.log")
    s.wait_loaded()
    yield s
    assert s.stop() == 0


@pytest.fixture
def regions():
    """Shared memory objects made as tritonclient makes them, destroyed after the test."""
    made = []

    def make(size):
        name = f"kubemaas-{uuid.uuid4().hex[:12]}"
        handle = shm.create_shared_memory_region(name, "/" + name, size)
        made.append(handle)
        return name, "/" + name, handle

    yield make
    for h in made:
        shm.destroy_shared_memory_region(h)


def client_for(server, protocol):
    return (httpclient.InferenceServerClient(server.http) if protocol == "http"
            else grpcclient.InferenceServerClient(server.grpc))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_tritonclient_passes_inputs_and_outputs_through_shared_memory(shm_server, repo_dir, regions, protocol):
    lib = CLIENTS[protocol]
    client = client_for(shm_server, protocol)
    img = np.random.default_rng(21).random((2, 3, 48, 192), dtype=np.float32)
    want = reference(repo_dir, "ocr-cls", {"x": img})
    (out_name, out_ref), = want.items()
    in_region, in_key, in_handle = regions(img.nbytes)
    # The output region is larger than the output and the output goes at an offset within it.
    out_region, out_key, out_handle = regions(out_ref.nbytes + 64)
    shm.set_shared_memory_region(in_handle, [img])
    client.register_system_shared_memory(in_region, in_key, img.nbytes)
    client.register_system_shared_memory(out_region, out_key, out_ref.nbytes + 64)
    try:
        meta = client.get_server_metadata(**({"as_json": True} if protocol == "grpc" else {}))
        assert "system_shared_memory" in meta["extensions"], meta
        status = client.get_system_shared_memory_status(**({"as_json": True} if protocol == "grpc" else {}))
        names = ({r["name"] for r in status} if protocol == "http" else set(status.get("regions", {})))
        assert {in_region, out_region} <= names, status

        x = lib.InferInput("x", list(img.shape), "FP32")
        x.set_shared_memory(in_region, img.nbytes)
        out = lib.InferRequestedOutput(out_name)
        out.set_shared_memory(out_region, out_ref.nbytes, offset=64)
        result = client.infer("ocr-cls", [x], outputs=[out])
        # The data is in the region, not in the answer: it says only the output's type and shape.
        meta = result.get_output(out_name)
        if protocol == "http":
            assert meta == {"name": out_name, "datatype": "FP32", "shape": list(out_ref.shape)}, meta
        else:
            assert (meta.datatype, list(meta.shape)) == ("FP32", list(out_ref.shape)), meta
            assert list(result.get_response().raw_output_contents) == [b""]
        got = shm.get_contents_as_numpy(out_handle, np.float32, list(out_ref.shape), offset=64)
        np.testing.assert_allclose(got, out_ref, rtol=1e-5, atol=1e-6)

        # An output too large for what the client set aside is refused, and says so.
        small = lib.InferRequestedOutput(out_name)
        small.set_shared_memory(out_region, 4)
        with pytest.raises(InferenceServerException, match="shared_memory_byte_size is 4"):
            client.infer("ocr-cls", [x], outputs=[small])
    finally:
        client.unregister_system_shared_memory()
    # Once unregistered, the region is gone.
    with pytest.raises(InferenceServerException, match=f"no system shared memory region \"{in_region}\""):
        client.infer("ocr-cls", [x], outputs=[out])


def test_bad_registrations_and_references_get_a_4xx_that_says_what_to_fix(shm_server, regions):
    url = shm_server.url
    name, key, handle = regions(40)
    shm.set_shared_memory_region(handle, [np.arange(10, dtype=np.float32)])

    def register(region, body):
        return requests.post(f"{url}/v2/systemsharedmemory/region/{region}/register", json=body, timeout=10)

    for body, words in [
        ({"key": "/../etc/passwd", "offset": 0, "byte_size": 4}, "not a POSIX shared memory name"),
        ({"key": "/kubemaas-no-such-object", "offset": 0, "byte_size": 4}, "cannot open shared memory key"),
        ({"key": key, "offset": 8, "byte_size": 40}, "which has 40 bytes"),
        ({"key": key, "byte_size": -1}, "shared memory register request"),
        ({"key": key}, "missing field `byte_size`"),
    ]:
        r = register("bad", body)
        assert r.status_code == 400 and words in r.json()["error"], (body, r.status_code, r.text)
    assert register("r", {"key": key, "offset": 0, "byte_size": 40}).status_code == 200
    r = register("r", {"key": key, "offset": 0, "byte_size": 40})
    assert r.status_code == 400 and "already registered" in r.json()["error"], r.text
    status = requests.get(f"{url}/v2/systemsharedmemory/region/r/status", timeout=10).json()
    assert status == [{"name": "r", "key": key, "offset": 0, "byte_size": 40}], status

    def infer(params, shape=(1, 10), data=None):
        inp = {"name": "x", "shape": list(shape), "datatype": "FP32", "parameters": params}
        if data is not None:
            inp["data"] = data
        return requests.post(f"{url}/v2/models/model/infer", json={"inputs": [inp]}, timeout=10)

    # The region holds 0..9: the model answers for them.
    ok = infer({"shared_memory_region": "r", "shared_memory_byte_size": 40})
    assert ok.status_code == 200, ok.text
    for params, shape, data, status_code, words in [
        ({"shared_memory_region": "r"}, (1, 10), None, 400, "go together"),
        ({"shared_memory_region": "r", "shared_memory_byte_size": 40}, (1, 10), [0] * 10, 400, "also carries data"),
        ({"shared_memory_region": "r", "shared_memory_byte_size": 36}, (1, 10), None, 400, "input \"x\""),
        ({"shared_memory_region": "r", "shared_memory_byte_size": 40, "shared_memory_offset": 4}, (1, 10), None,
         400, "which has 40 bytes"),
        ({"shared_memory_region": 7, "shared_memory_byte_size": 40}, (1, 10), None, 400, "a region name"),
        ({"shared_memory_region": "nope", "shared_memory_byte_size": 40}, (1, 10), None, 400, "no system shared memory"),
    ]:
        r = infer(params, shape, data)
        assert r.status_code == status_code and words in r.json()["error"], (params, r.status_code, r.text)
    r = requests.post(f"{url}/v2/cudasharedmemory/region/c/register", json={}, timeout=10)
    assert r.status_code == 400 and "CUDA shared memory is not supported" in r.json()["error"], r.text
    assert requests.post(f"{url}/v2/systemsharedmemory/region/r/unregister", timeout=10).status_code == 200
    assert requests.get(f"{url}/v2/systemsharedmemory/status", timeout=10).json() == []
    assert shm_server.alive()


def test_shared_memory_is_off_unless_allowed(server, regions):
    # The session's server was started without --allow-client-shm.
    name, key, handle = regions(40)
    r = requests.post(f"{server.url}/v2/systemsharedmemory/region/r/register",
                      json={"key": key, "offset": 0, "byte_size": 40}, timeout=10)
    assert r.status_code == 400 and "--allow-client-shm" in r.json()["error"], r.text
    r = requests.post(f"{server.url}/v2/models/model/infer", json={"inputs": [
        {"name": "x", "shape": [1, 10], "datatype": "FP32",
         "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 40}}]}, timeout=10)
    assert r.status_code == 400 and "--allow-client-shm" in r.json()["error"], r.text
    client = grpcclient.InferenceServerClient(server.grpc)
    with pytest.raises(InferenceServerException, match="--allow-client-shm"):
        client.register_system_shared_memory("r", key, 40)
    assert "system_shared_memory" not in requests.get(f"{server.url}/v2", timeout=10).json()["extensions"]
    assert server.alive()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_drives_the_server_through_shared_memory(shm_server, protocol):
    pa = os.environ.get("KUBEMAAS_PERF_ANALYZER")
    if not pa:
        pytest.fail("KUBEMAAS_PERF_ANALYZER unset: run through `make test` (scripts/setup.sh --test)")
    env = {**os.environ, "LD_LIBRARY_PATH": os.environ.get("KUBEMAAS_PERF_ANALYZER_LIBS", "")}
    url = shm_server.http if protocol == "http" else shm_server.grpc
    before = requests.get(f"{shm_server.url}/v2/models/ocr-cls/stats", timeout=10).json()
    count = lambda s: s["model_stats"][0]["inference_stats"]["success"].get("count", 0)  # noqa: E731
    p = subprocess.run([pa, "-m", "ocr-cls", "-u", url, "-i", protocol, "--shape", "x:1,3,48,192",
                        "--shared-memory", "system", "--output-shared-memory-size", "4096",
                        "--concurrency-range", "1:2", "--measurement-mode", "count_windows",
                        "--measurement-request-count", "100", "--stability-percentage", "100",
                        "--max-trials", "20"], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"Concurrency: 2, throughput: [0-9.]+ infer/sec", p.stdout), p.stdout
    after = requests.get(f"{shm_server.url}/v2/models/ocr-cls/stats", timeout=10).json()
    assert count(after) - count(before) >= 200
    # perf_analyzer unregisters what it registered.
    assert requests.get(f"{shm_server.url}/v2/systemsharedmemory/status", timeout=10).json() == []


def test_region_names_and_keys_with_any_characters_work_through_tritonclient(shm_server, repo_dir):
    # tritonclient percent-encodes the region name in the register URL and sends it as is in the
    # request; perf_analyzer's keys carry tensor names such as "input_1:0".
    client = httpclient.InferenceServerClient(shm_server.http)
    x = np.random.default_rng(22).random((1, 10), dtype=np.float32)
    want = reference(repo_dir, "model", {"x": x})
    key = f"/kubemaas-{uuid.uuid4().hex[:8]}_x:0"
    h = shm.create_shared_memory_region("odd", key, x.nbytes)
    try:
        shm.set_shared_memory_region(h, [x])
        client.register_system_shared_memory("in: a%", key, x.nbytes)
        status = requests.get(f"{shm_server.url}/v2/systemsharedmemory/status", timeout=10).json()
        assert [r["name"] for r in status] == ["in: a%"], status
        inp = httpclient.InferInput("x", [1, 10], "FP32")
        inp.set_shared_memory("in: a%", x.nbytes)
        got = client.infer("model", [inp])
        for name, value in want.items():
            np.testing.assert_allclose(got.as_numpy(name), value, rtol=1e-5, atol=1e-6)
    finally:
        client.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(h)


def test_keys_limited_to_some_models_may_not_use_shared_memory(repo_dir, tmp_path, regions):
    # Regions are shared by every client: a key limited to some models could read or overwrite
    # the tensors of models it may not call, so only keys without a model list may use them.
    keys = tmp_path / "keys"
    keys.write_text("admin:admin-secret\nscoped:scoped-secret:model\n")
    s = Server(["--model", f"model={repo_dir / 'model' / '1' / 'model.onnx'}", "--allow-client-shm",
                "--api-keys-file", str(keys), "--audit-log"], tmp_path / "server.log")
    try:
        for _ in range(300):
            if requests.get(f"{s.url}/v2/health/ready", timeout=5).status_code == 200:
                break
            time.sleep(0.1)
        name, key, handle = regions(40)
        shm.set_shared_memory_region(handle, [np.arange(10, dtype=np.float32)])
        auth = lambda k: {"Authorization": f"Bearer {k}"}  # noqa: E731
        grpc_auth = lambda k: {"authorization": f"Bearer {k}"}  # noqa: E731  (gRPC metadata is lower case)
        body = {"key": key, "offset": 0, "byte_size": 40}
        r = requests.post(f"{s.url}/v2/systemsharedmemory/region/r/register", json=body,
                          headers=auth("scoped-secret"), timeout=10)
        assert r.status_code == 403 and "may not use shared memory" in r.json()["error"], r.text
        r = requests.post(f"{s.url}/v2/systemsharedmemory/region/r/register", json=body,
                          headers=auth("admin-secret"), timeout=10)
        assert r.status_code == 200, r.text
        req = {"inputs": [{"name": "x", "shape": [1, 10], "datatype": "FP32",
                           "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 40}}]}
        r = requests.post(f"{s.url}/v2/models/model/infer", json=req, headers=auth("scoped-secret"), timeout=10)
        assert r.status_code == 403 and "may not use shared memory" in r.json()["error"], r.text
        r = requests.post(f"{s.url}/v2/models/model/infer", json=req, headers=auth("admin-secret"), timeout=10)
        assert r.status_code == 200, r.text
        # The key is checked before any region is looked up: a scoped key cannot learn which
        # regions exist from 404 against 403.
        nope = {"inputs": [{"name": "x", "shape": [1, 10], "datatype": "FP32",
                            "parameters": {"shared_memory_region": "nope", "shared_memory_byte_size": 40}}]}
        r = requests.post(f"{s.url}/v2/models/model/infer", json=nope, headers=auth("scoped-secret"), timeout=10)
        assert r.status_code == 403 and "may not use shared memory" in r.json()["error"], r.text
        # The same over gRPC.
        g = grpcclient.InferenceServerClient(s.grpc)
        with pytest.raises(InferenceServerException, match="may not use shared memory"):
            g.get_system_shared_memory_status(headers=grpc_auth("scoped-secret"))
        x = grpcclient.InferInput("x", [1, 10], "FP32")
        x.set_shared_memory("r", 40)
        with pytest.raises(InferenceServerException, match="may not use shared memory"):
            g.infer("model", [x], headers=grpc_auth("scoped-secret"))
        unknown = grpcclient.InferInput("x", [1, 10], "FP32")
        unknown.set_shared_memory("nope", 40)
        with pytest.raises(InferenceServerException, match="may not use shared memory"):
            g.infer("model", [unknown], headers=grpc_auth("scoped-secret"))
        assert g.infer("model", [x], headers=grpc_auth("admin-secret")).as_numpy("y").shape == (1, 3)
        g.unregister_system_shared_memory("r", headers=grpc_auth("admin-secret"))
        # Calls that change or list the regions are audited, with who made them.
        audit = [json.loads(line) for line in s.log_path.read_text().splitlines()
                 if '"target":"kubemaas_audit"' in line]
        calls = [(a["protocol"], a["route"], a["caller"], a["status"]) for a in audit
                 if "SharedMemory" in a["route"] or "systemsharedmemory" in a["route"]]
        assert ("grpc", "SystemSharedMemoryStatus", "scoped", "PermissionDenied") in calls, calls
        assert ("grpc", "SystemSharedMemoryUnregister", "admin", "Ok") in calls, calls
    finally:
        assert s.stop() == 0


def test_an_unknown_region_is_not_found_over_rest_and_grpc_alike(shm_server):
    # REST answered 404 for the status of a region never registered; gRPC said INVALID_ARGUMENT,
    # as if the request were malformed. Triton answers NOT_FOUND on both.
    r = requests.get(f"{shm_server.url}/v2/systemsharedmemory/region/nope/status", timeout=10)
    assert r.status_code == 404 and "nope" in r.json()["error"], r.text
    client = grpcclient.InferenceServerClient(shm_server.grpc)
    with pytest.raises(InferenceServerException) as e:
        client.get_system_shared_memory_status(region_name="nope")
    assert e.value.status() == "StatusCode.NOT_FOUND", (e.value.status(), e.value.message())
    assert "nope" in e.value.message()


def test_a_name_registered_twice_is_already_exists_over_grpc_and_400_over_rest(shm_server, regions):
    # Triton: TRITONSERVER_ERROR_ALREADY_EXISTS, which its gRPC server sends as ALREADY_EXISTS and
    # its HTTP server as 400. gRPC said INVALID_ARGUMENT, as if the request were malformed.
    name, key, _ = regions(64)
    client = grpcclient.InferenceServerClient(shm_server.grpc)
    client.register_system_shared_memory(name, key, 64)
    try:
        with pytest.raises(InferenceServerException) as e:
            client.register_system_shared_memory(name, key, 64)
        assert e.value.status() == "StatusCode.ALREADY_EXISTS", (e.value.status(), e.value.message())
        assert "already registered" in e.value.message()
        r = requests.post(f"{shm_server.url}/v2/systemsharedmemory/region/{name}/register", timeout=10,
                          data=json.dumps({"key": key, "offset": 0, "byte_size": 64}))
        assert r.status_code == 400 and "already registered" in r.json()["error"], r.text
    finally:
        client.unregister_system_shared_memory(name)


def model_counts(server, model):
    st = requests.get(f"{server.url}/v2/models/{model}/stats", timeout=10).json()["model_stats"][0]
    return st["inference_count"], st["inference_stats"]["success"]["count"]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_an_output_region_is_checked_before_the_model_runs(shm_server, protocol):
    # Triton resolves and bounds-checks output regions before inference. Here the model ran, was
    # counted a success, and only then the answer failed.
    lib = CLIENTS[protocol]
    client = client_for(shm_server, protocol)
    x = lib.InferInput("x", [1, 10], "FP32")
    x.set_data_from_numpy(np.ones((1, 10), dtype=np.float32))
    out = lib.InferRequestedOutput("y")
    out.set_shared_memory("nope", 12)
    before = model_counts(shm_server, "model")
    with pytest.raises(InferenceServerException, match='no system shared memory region "nope"'):
        client.infer("model", [x], outputs=[out])
    assert model_counts(shm_server, "model") == before


def test_a_region_unregistered_while_a_request_runs_still_gets_that_requests_answer(shm_server, repo_dir, regions):
    # Triton holds a region for the requests that use it; unregistering waits for them. Here the
    # request failed ("no system shared memory region"), or wrote into whatever object was
    # registered under the name by then.
    client = grpcclient.InferenceServerClient(shm_server.grpc)
    x = np.random.default_rng(23).standard_normal((256, 512)).astype(np.float32)
    want = reference(repo_dir, "slow", {"x": x})["y"]
    name, key, handle = regions(want.nbytes)
    client.register_system_shared_memory(name, key, want.nbytes)
    i = grpcclient.InferInput("x", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    out = grpcclient.InferRequestedOutput("y")
    out.set_shared_memory(name, want.nbytes)
    pending = lambda: int(float(next(
        line.rsplit(" ", 1)[1] for line in requests.get(f"{shm_server.metrics_url}/metrics", timeout=10).text.splitlines()
        if line.startswith('nv_inference_pending_request_count{model="slow"'))))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.infer, "slow", [i], outputs=[out])
        deadline = time.time() + 30
        while pending() < 1:
            assert time.time() < deadline, "the request never started"
            time.sleep(0.002)
        client.unregister_system_shared_memory(name)
        running.result(timeout=120)
    np.testing.assert_allclose(shm.get_contents_as_numpy(handle, np.float32, list(want.shape)), want,
                               rtol=1e-4, atol=1e-4)
