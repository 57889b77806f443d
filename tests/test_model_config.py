"""A model's own settings from Triton's config.pbtxt in its repository directory: dynamic batching,
instance group and version policy per model, and a file that cannot be honoured fails that model
with a message saying what to fix while the others serve."""

import concurrent.futures
import shutil
import time

import numpy as np
import requests

from conftest import Server

DENSE_CONFIG = """
# Triton's own layout: lists of messages without a colon.
name: "batched"
platform: "onnxruntime_onnx"
max_batch_size: 4
input [ { name: "x" data_type: TYPE_FP32 dims: [ 10 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 3 ] } ]
dynamic_batching { max_queue_delay_microseconds: 300000 default_queue_policy { max_queue_size: 16 } }
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


def repository(tmp_path, repo_dir):
    dense = repo_dir / "model" / "1" / "model.onnx"
    root = tmp_path / "repo"

    def model(name, versions=(1,), config=None):
        for v in versions:
            (root / name / str(v)).mkdir(parents=True)
            shutil.copy(dense, root / name / str(v) / "model.onnx")
        if config is not None:
            (root / name / "config.pbtxt").write_text(config)

    model("batched", versions=(1, 2), config=DENSE_CONFIG)
    model("plain")
    model("pinned", versions=(1, 2, 3), config="version_policy { specific { versions: [ 1, 3 ] } }")
    model("unknown_field", config="max_batch_size: 4\noptimization { }\n")
    model("wrong_type", config='input [ { name: "x" data_type: TYPE_INT64 dims: [ -1, 10 ] } ]')
    model("wrong_dims", config='max_batch_size: 8\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 12 ] } ]')
    model("on_gpu", config="instance_group [ { kind: KIND_GPU gpus: [ 3 ] } ]")
    return root


def dense_body(rows):
    x = np.arange(10 * rows, dtype=np.float32).reshape(rows, 10)
    return {"inputs": [{"name": "x", "shape": [rows, 10], "datatype": "FP32", "data": x.flatten().tolist()}]}


def test_config_pbtxt_sets_batching_instances_and_versions_per_model(repo_dir, tmp_path):
    s = Server(["--model-repository", str(repository(tmp_path, repo_dir)), "--instances", "2"],
               tmp_path / "server.log")
    try:
        index = {(m["name"], m.get("version")): m for m in s.wait_loaded()}
        state = {k: v["state"] for k, v in index.items()}
        # Triton's default policy with a file is the latest version; `specific` serves those listed.
        assert state[("batched", "2")] == "READY" and ("batched", "1") not in state, state
        assert state[("pinned", "1")] == "READY" and state[("pinned", "3")] == "READY", state
        assert ("pinned", "2") not in state, state
        assert state[("plain", "1")] == "READY", state
        reasons = {k[0]: v.get("reason", "") for k, v in index.items() if v["state"] != "READY"}
        assert "optimization" in reasons["unknown_field"] and "fields KubeMaaS reads" in reasons["unknown_field"], reasons
        assert "TYPE_INT64 but the model's is TYPE_FP32" in reasons["wrong_type"], reasons
        assert "dims [12] but the model's are [10] (without the batch dimension)" in reasons["wrong_dims"], reasons
        assert "device 3" in reasons["on_gpu"], reasons
        assert set(reasons) == {"unknown_field", "wrong_type", "wrong_dims", "on_gpu"}, reasons

        config = requests.get(f"{s.url}/v2/models/batched/config", timeout=10).json()
        assert config["max_batch_size"] == 4, config
        assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 300000, config
        assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 16, config
        assert config["instance_group"][0]["count"] == 1 and config["instance_group"][0]["kind"] == "KIND_CPU", config
        assert config["input"][0]["dims"] == [10], config
        plain = requests.get(f"{s.url}/v2/models/plain/config", timeout=10).json()
        assert plain["max_batch_size"] == 0 and "dynamic_batching" not in plain, plain
        assert plain["instance_group"][0]["count"] == 2, plain
        # /config reports the version policy in force, as Triton does (it said "all" for every model).
        assert plain["version_policy"] == {"all": {}}, plain
        assert config["version_policy"] == {"latest": {"num_versions": 1}}, config
        pinned = requests.get(f"{s.url}/v2/models/pinned/config", timeout=10).json()
        assert pinned["version_policy"] == {"specific": {"versions": [1, 3]}}, pinned
        import tritonclient.grpc as grpcclient
        grpc = grpcclient.InferenceServerClient(s.grpc)
        policies = {m: grpc.get_model_config(m, as_json=True)["config"]["version_policy"]
                    for m in ("plain", "batched", "pinned")}
        assert policies == {"plain": {"all": {}}, "batched": {"latest": {"num_versions": 1}},
                            "pinned": {"specific": {"versions": ["1", "3"]}}}, policies

        # Four one-row requests at once on the one instance: batched (the delay holds the first).
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: requests.post(f"{s.url}/v2/models/batched/infer",
                                                            json=dense_body(1), timeout=30), range(4)))
        want = requests.post(f"{s.url}/v2/models/plain/infer", json=dense_body(1), timeout=30).json()
        for r in answers:
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(r.json()["outputs"][0]["data"], want["outputs"][0]["data"], rtol=1e-6)
        stats = requests.get(f"{s.url}/v2/models/batched/versions/2/stats", timeout=10).json()
        sizes = [b["batch_size"] for b in stats["model_stats"][0]["batch_stats"]]
        assert max(sizes) > 1, stats
        # More rows than max_batch_size are refused, as Triton does.
        r = requests.post(f"{s.url}/v2/models/batched/infer", json=dense_body(5), timeout=30)
        assert r.status_code == 400, r.text
        assert requests.post(f"{s.url}/v2/models/plain/infer", json=dense_body(5), timeout=30).status_code == 200
    finally:
        assert s.stop() == 0


def test_a_config_pbtxt_that_cannot_be_honoured_stops_a_server_that_must_load_everything(repo_dir, tmp_path):
    import subprocess

    from conftest import BINARY
    root = tmp_path / "repo"
    (root / "m" / "1").mkdir(parents=True)
    shutil.copy(repo_dir / "model" / "1" / "model.onnx", root / "m" / "1" / "model.onnx")
    (root / "m" / "config.pbtxt").write_text("dynamic_batching { }\n")
    p = subprocess.run([str(BINARY), "serve", "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0",
                        "--metrics-port", "0", "--model-repository", str(root), "--exit-on-load-failure",
                        "--termination-log", str(tmp_path / "termination")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 4, p.stderr[-2000:]
    message = (tmp_path / "termination").read_text()
    assert "config.pbtxt" in message and "dynamic_batching needs max_batch_size above 0" in message, message


def test_a_request_without_a_version_goes_to_the_latest_version_that_is_ready(repo_dir, tmp_path):
    # Triton: version -1 is the latest READY version, and metadata lists the ready versions only.
    # Here the highest version of `up` cannot load: requests without a version failed with
    # "version 2 is not ready" (and /ready said 503) while version 1 served.
    import tritonclient.grpc as grpcclient

    dense = repo_dir / "model" / "1" / "model.onnx"
    root = tmp_path / "repo"
    for name, good, bad in (("up", 1, 2), ("down", 2, 1)):
        (root / name / str(good)).mkdir(parents=True)
        shutil.copy(dense, root / name / str(good) / "model.onnx")
        (root / name / str(bad)).mkdir(parents=True)
        (root / name / str(bad) / "model.onnx").write_bytes(b"not an onnx model")
    s = Server(["--model-repository", str(root)], tmp_path / "server.log")
    try:
        s.wait_loaded()
        for name, good in (("up", "1"), ("down", "2")):
            r = requests.post(f"{s.url}/v2/models/{name}/infer", json=dense_body(2), timeout=10)
            assert r.status_code == 200 and r.json()["model_version"] == good, r.text
            assert requests.get(f"{s.url}/v2/models/{name}/ready", timeout=10).status_code == 200
            meta = requests.get(f"{s.url}/v2/models/{name}", timeout=10).json()
            assert meta["versions"] == [good], meta
            c = grpcclient.InferenceServerClient(s.grpc)
            assert list(c.get_model_metadata(name).versions) == [good]
            x = grpcclient.InferInput("x", [1, 10], "FP32")
            x.set_data_from_numpy(np.ones((1, 10), dtype=np.float32))
            assert c.infer(name, [x]).get_response().model_version == good
            c.close()
        # Naming the broken version still says why it is not there.
        r = requests.post(f"{s.url}/v2/models/up/versions/2/infer", json=dense_body(1), timeout=10)
        assert r.status_code == 503 and "not ready" in r.json()["error"], r.text
    finally:
        s.stop()


def test_max_batch_size_without_dynamic_batching_takes_client_batches_but_never_joins_requests(
        busy_model, tmp_path):
    # Triton: max_batch_size > 0 says the model takes a batch dimension; only a dynamic_batching
    # block makes the server join requests. Without it each request runs as sent, however many
    # queue, and /config shows no dynamic_batching (model analyzers read it to decide).
    root = tmp_path / "repo"
    (root / "slow" / "1").mkdir(parents=True)
    shutil.copy(busy_model, root / "slow" / "1" / "model.onnx")
    (root / "slow" / "config.pbtxt").write_text("max_batch_size: 64\ninstance_group [ { count: 1 } ]\n")
    s = Server(["--model-repository", str(root)], tmp_path / "server.log")
    try:
        s.wait_loaded()
        config = requests.get(f"{s.url}/v2/models/slow/config", timeout=10).json()
        assert config["max_batch_size"] == 64 and "dynamic_batching" not in config, config
        rng = np.random.default_rng(5)
        xs = [rng.standard_normal((1 + i % 3, 256)).astype(np.float32) for i in range(8)]

        def infer(x):
            body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                "data": x.flatten().tolist()}]}
            return requests.post(f"{s.url}/v2/models/slow/infer", json=body, timeout=120)

        # A long request holds the one instance while eight more queue behind it.
        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            head = pool.submit(infer, rng.standard_normal((64, 256)).astype(np.float32))
            # About a quarter of a second of work: the eight queue behind it, not after it.
            time.sleep(0.1)
            answers = list(pool.map(infer, xs))
            assert head.result().status_code == 200
        for x, r in zip(xs, answers):
            assert r.status_code == 200, r.text
            assert r.json()["outputs"][0]["shape"][0] == x.shape[0]
        stats = requests.get(f"{s.url}/v2/models/slow/stats", timeout=10).json()["model_stats"][0]
        assert stats["execution_count"] == 9, stats
        # They did wait together (had they come after the head, joining them would not have shown).
        assert stats["inference_stats"]["queue"]["ns"] > 8 * 0.05e9, stats
        assert stats["inference_count"] == 64 + sum(x.shape[0] for x in xs), stats
        # Every execution is in batch_stats under the rows the client sent, as Triton counts them.
        sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}
        assert sizes == {64: 1, 1: 3, 2: 3, 3: 2}, sizes
        # The batch dimension is still held to max_batch_size.
        r = infer(np.zeros((65, 256), dtype=np.float32))
        assert r.status_code == 400 and "64" in r.json()["error"], r.text
    finally:
        assert s.stop() == 0
