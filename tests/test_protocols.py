"""KServe V2, binary extension, TF-Serving REST and Triton endpoints against the real server, with
every output compared to ONNX Runtime's own result for the same input."""

import json

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
import requests
import tritonclient.http as httpclient

from conftest import Server

NP = {
    "bool": np.bool_, "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64, "fp16": np.float16,
    "fp32": np.float32, "fp64": np.float64, "bytes": np.object_,
}
V2 = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64", "fp16": "FP16", "bf16": "BF16",
    "fp32": "FP32", "fp64": "FP64", "bytes": "BYTES",
}


def reference(repo_dir, name, feeds, version=1):
    sess = ort.InferenceSession(str(repo_dir / name / str(version) / "model.onnx"), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def sample(kind, shape, rng):
    if kind == "bool":
        return rng.integers(0, 2, shape).astype(np.bool_)
    if kind == "bytes":
        return np.array([f"s{i}-é".encode() for i in range(int(np.prod(shape)))], dtype=np.object_).reshape(shape)
    dt = np.dtype(NP[kind])
    if dt.kind == "f":
        return (rng.standard_normal(shape) * 100).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, shape, dtype=dt, endpoint=True)


def all_dtype_inputs(rng, shape=(2, 3)):
    return {k: sample(k, shape, rng) for k in NP}


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_every_dtype_round_trips_through_tritonclient(server, binary):
    rng = np.random.default_rng(1)
    values = all_dtype_inputs(rng)
    # numpy has no bfloat16: tritonclient takes ml_dtypes' (binary only).
    values["bf16"] = (rng.integers(-64, 64, (2, 3)) / 4).astype(ml_dtypes.bfloat16)
    client = httpclient.InferenceServerClient(server.http)
    inputs = []
    for k, v in values.items():
        i = httpclient.InferInput(f"in_{k}", list(v.shape), V2[k])
        i.set_data_from_numpy(v, binary_data=binary or k == "bf16")
        inputs.append(i)
    outputs = [httpclient.InferRequestedOutput(f"out_{k}", binary_data=binary or k == "bf16") for k in values]
    result = client.infer("dtypes", inputs, outputs=outputs, request_id="dt-1")
    assert result.get_response()["id"] == "dt-1"
    for k, v in values.items():
        got = result.as_numpy(f"out_{k}")
        assert got.shape == v.shape, k
        if k == "bytes":
            assert [x if isinstance(x, bytes) else x.encode() for x in got.ravel()] == list(v.ravel()), k
        else:
            assert got.dtype == v.dtype, k
            np.testing.assert_array_equal(got, v, err_msg=k)


def test_bf16_json_and_binary_agree(server):
    bits = np.array([0x3FC0, 0xC000, 0x0000, 0x4049], dtype="<u2")  # 1.5, -2, 0, 3.140625
    header = {"inputs": [{"name": "in_bf16", "shape": [2, 2], "datatype": "BF16", "parameters": {"binary_data_size": 8}}],
              "outputs": [{"name": "out_bf16"}]}
    # Fill the other inputs with zero-size tensors so only BF16 matters.
    for k, v in V2.items():
        if k == "bf16":
            continue
        header["inputs"].append({"name": f"in_{k}", "shape": [0, 2], "datatype": v, "data": []})
    body = json.dumps(header).encode()
    r = requests.post(f"{server.url}/v2/models/dtypes/infer", data=body + bits.tobytes(),
                      headers={"Inference-Header-Content-Length": str(len(body))})
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [1.5, -2.0, 0.0, 3.140625]


def test_dense_model_json_matches_onnxruntime(server, repo_dir):
    x = np.random.default_rng(2).standard_normal((5, 10)).astype(np.float32)
    body = {"id": "abc", "parameters": {"trace": "on"},
            "inputs": [{"name": "x", "shape": [5, 10], "datatype": "FP32", "data": x.tolist()}]}
    r = requests.post(f"{server.url}/v2/models/model/infer", json=body)
    assert r.status_code == 200, r.text
    resp = r.json()
    assert resp["id"] == "abc" and resp["parameters"] == {"trace": "on"} and resp["model_version"] == "1"
    out = resp["outputs"][0]
    assert out["name"] == "y" and out["datatype"] == "FP32" and out["shape"] == [5, 3]
    np.testing.assert_allclose(np.array(out["data"], dtype=np.float32).reshape(5, 3),
                               reference(repo_dir, "model", {"x": x})["y"], rtol=1e-6, atol=1e-6)


def test_tf_serving_row_format_verbatim(server, repo_dir):
    body = '{"instances": [[1,2,3,4,5,6,7,8,9,10],[11,12,13,14,15,16,17,18,19,20]]}'
    r = requests.post(f"{server.url}/v1/models/model:predict", data=body)
    assert r.status_code == 200, r.text
    x = np.arange(1, 21, dtype=np.float32).reshape(2, 10)
    np.testing.assert_allclose(np.array(r.json()["predictions"], dtype=np.float32),
                               reference(repo_dir, "model", {"x": x})["y"], rtol=1e-6)


def test_tf_serving_columnar_and_multi_output_formats(server, repo_dir):
    a = np.arange(8, dtype=np.float64).reshape(2, 4) / 3
    b = np.arange(6, dtype=np.int32).reshape(2, 3)
    ref = reference(repo_dir, "arith", {"a": a, "b": b})
    r = requests.post(f"{server.url}/v1/models/arith/versions/1:predict",
                      json={"inputs": {"a": a.tolist(), "b": b.tolist()}})
    assert r.status_code == 200, r.text
    outs = r.json()["outputs"]
    np.testing.assert_array_equal(np.array(outs["a2"]), ref["a2"])
    np.testing.assert_array_equal(np.array(outs["b1"]), ref["b1"])
    r = requests.post(f"{server.url}/v1/models/arith:predict",
                      json={"instances": [{"a": a[0].tolist(), "b": b[0].tolist()}, {"a": a[1].tolist(), "b": b[1].tolist()}]})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 2
    np.testing.assert_array_equal(np.array([p["b1"] for p in preds]), ref["b1"])


def test_tf_serving_b64_bytes(server):
    # Columnar: every input named, the others with an empty second dimension.
    body = {"inputs": {"in_bytes": [[{"b64": "aGVsbG8="}, "world"]],
                       **{f"in_{k}": [[]] for k in V2 if k not in ("bytes",)}}}
    r = requests.post(f"{server.url}/v1/models/dtypes:predict", json=body)
    assert r.status_code == 200, r.text
    # TF-Serving writes every element of an output whose name ends in "_bytes" as {"b64": ...},
    # text or not, and its clients decode them so.
    assert r.json()["outputs"]["out_bytes"] == [[{"b64": "aGVsbG8="}, {"b64": "d29ybGQ="}]]


def test_tf_serving_status_and_metadata(server):
    st = requests.get(f"{server.url}/v1/models/versioned").json()
    assert sorted(s["version"] for s in st["model_version_status"]) == ["1", "3"]
    assert all(s["state"] == "AVAILABLE" for s in st["model_version_status"])
    md = requests.get(f"{server.url}/v1/models/model/metadata").json()
    sig = md["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["inputs"]["x"]["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in sig["inputs"]["x"]["tensor_shape"]["dim"]] == ["-1", "10"]
    broken = requests.get(f"{server.url}/v1/models/broken").json()["model_version_status"][0]
    assert broken["state"] == "END" and "broken" in broken["status"]["error_message"]


def test_kserve_v1_clients_read_liveness_the_model_list_and_readiness(server):
    # KServe's V1 protocol beside TF-Serving's: GET / says alive, GET /v1/models lists the models,
    # and GET /v1/models/{m} carries "name" and "ready" (what InferenceRESTClient.is_model_ready
    # reads) next to TF-Serving's model_version_status.
    assert requests.get(f"{server.url}/", timeout=5).json() == {"status": "alive"}
    listed = requests.get(f"{server.url}/v1/models", timeout=5)
    assert listed.status_code == 200, listed.text
    assert {"model", "versioned", "broken"} <= set(listed.json()["models"])
    st = requests.get(f"{server.url}/v1/models/versioned", timeout=5).json()
    assert st["name"] == "versioned" and st["ready"] is True and st["model_version_status"], st
    broken = requests.get(f"{server.url}/v1/models/broken", timeout=5).json()
    assert broken["ready"] is False and broken["model_version_status"][0]["state"] == "END"


def test_tf_serving_requests_may_carry_bare_nan_and_infinity(server):
    # TF-Serving parses NaN, Infinity and -Infinity literals (what Python's json.dumps writes);
    # a string that merely contains the word stays a string.
    body = '{"signature_name": "serving_default", "inputs": {"a": [[NaN, Infinity, -Infinity, 1.5]], "b": [[1, 2, 3]]}}'
    r = requests.post(f"{server.url}/v1/models/arith:predict", data=body, timeout=10)
    assert r.status_code == 200, r.text
    a2 = r.json()["outputs"]["a2"][0]
    assert a2[3] == 3.0 and a2[:3] == [None, None, None]  # JSON answers carry non-finite values as null
    row = json.dumps({"instances": [{"a": [float("nan"), 1, 2, 3], "b": [1, 2, 3]}]})
    assert "NaN" in row
    r = requests.post(f"{server.url}/v1/models/arith:predict", data=row, timeout=10)
    assert r.status_code == 200 and r.json()["predictions"][0]["a2"][1:] == [2.0, 4.0, 6.0], r.text
    r = requests.post(f"{server.url}/v1/models/arith:predict", data='{"inputs": {"a": [[NaNa]]}}', timeout=10)
    assert r.status_code == 400 and "error" in r.json()


def test_tf_serving_version_labels_and_unknown_signatures_are_refused_by_name(server):
    for method, path in (("POST", "/v1/models/model/labels/stable:predict"),
                         ("GET", "/v1/models/model/labels/stable"),
                         ("GET", "/v1/models/model/labels/stable/metadata")):
        # TF-Serving answers an unrecognized label with INVALID_ARGUMENT (400), and an unknown
        # model with NOT_FOUND (404).
        r = requests.request(method, f"{server.url}{path}", json={"instances": [list(range(10))]}, timeout=5)
        assert r.status_code == 400 and "label" in r.json()["error"] and "/versions/" in r.json()["error"], r.text
        r = requests.request(method, f"{server.url}{path.replace('/model/', '/nomodel/', 1)}",
                             json={"instances": [list(range(10))]}, timeout=5)
        assert r.status_code == 404 and "nomodel" in r.json()["error"], r.text
        assert "not served here" in r.json()["error"], r.text
    r = requests.post(f"{server.url}/v1/models/model:predict", timeout=5,
                      json={"signature_name": "predict_images", "instances": [list(range(10))]})
    assert r.status_code == 400 and "predict_images" in r.json()["error"] and "serving_default" in r.json()["error"]
    r = requests.post(f"{server.url}/v1/models/model:predict", timeout=5,
                      json={"signature_name": "serving_default", "instances": [list(range(10))]})
    assert r.status_code == 200, r.text


def test_output_selection_and_binary_output_flag(server):
    body = {"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP64", "data": [1, 2, 3, 4]},
                       {"name": "b", "shape": [1, 3], "datatype": "INT32", "data": [1, 2, 3]}],
            "outputs": [{"name": "b1"}]}
    r = requests.post(f"{server.url}/v2/models/arith/infer", json=body).json()
    assert [o["name"] for o in r["outputs"]] == ["b1"] and r["outputs"][0]["data"] == [2, 3, 4]
    body["parameters"] = {"binary_data_output": True}
    del body["outputs"]
    r = requests.post(f"{server.url}/v2/models/arith/infer", json=body)
    n = int(r.headers["Inference-Header-Content-Length"])
    header = json.loads(r.content[:n])
    assert [o["parameters"]["binary_data_size"] for o in header["outputs"]] == [32, 12]
    assert np.frombuffer(r.content[n + 32:], dtype="<i4").tolist() == [2, 3, 4]
    assert np.frombuffer(r.content[n:n + 32], dtype="<f8").tolist() == [2, 4, 6, 8]


def test_versions_default_to_the_highest(server):
    body = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [10]}]}
    latest = requests.post(f"{server.url}/v2/models/versioned/infer", json=body).json()
    v1 = requests.post(f"{server.url}/v2/models/versioned/versions/1/infer", json=body).json()
    assert (latest["model_version"], latest["outputs"][0]["data"]) == ("3", [13.0])
    assert (v1["model_version"], v1["outputs"][0]["data"]) == ("1", [11.0])
    assert requests.get(f"{server.url}/v2/models/versioned").json()["versions"] == ["1", "3"]
    assert requests.get(f"{server.url}/v2/models/versioned/versions/2/ready").status_code == 404


def test_warmup_rejected_by_model_is_not_a_load_failure(server):
    assert requests.get(f"{server.url}/v2/models/reshape/ready").status_code == 200
    body = {"inputs": [{"name": "x", "shape": [6], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]},
                       {"name": "shape", "shape": [2], "datatype": "INT64", "data": [2, 3]}]}
    r = requests.post(f"{server.url}/v2/models/reshape/infer", json=body).json()
    assert r["outputs"][0]["shape"] == [2, 3]


def test_broken_model_is_not_ready_with_its_error_and_others_serve(server):
    r = requests.get(f"{server.url}/v2/models/broken/ready")
    assert r.status_code == 503 and "failed to load" in r.json()["error"]
    # Without --exit-on-load-failure the others keep serving, so the server is ready: a model that
    # failed is reported on its own (above, and in the index) and does not hold the rest back.
    assert requests.get(f"{server.url}/v2/health/ready").status_code == 200
    assert requests.get(f"{server.url}/v2/health/live").status_code == 200
    r = requests.post(f"{server.url}/v2/models/broken/infer", json={"inputs": []})
    assert r.status_code == 503 and "error" in r.json()
    index = {m["name"]: m for m in requests.post(f"{server.url}/v2/repository/index").json()}
    assert index["broken"]["state"] == "UNAVAILABLE" and index["model"]["state"] == "READY"


def test_metadata_and_server_endpoints(server):
    meta = requests.get(f"{server.url}/v2").json()
    assert "binary_tensor_data" in meta["extensions"]
    md = requests.get(f"{server.url}/v2/models/minilm").json()
    assert md["parameters"]["execution_provider"] == "CPUExecutionProvider"
    assert [(i["name"], i["datatype"], i["shape"]) for i in md["inputs"]][0] == ("input_ids", "INT64", [-1, -1])
    assert md["outputs"][0]["shape"] == [-1, -1, 384]
    cfg = requests.get(f"{server.url}/v2/models/model/config").json()
    assert cfg["platform"] == "onnxruntime_onnx" and cfg["max_batch_size"] == 0
    assert cfg["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1, 10]}]
    assert cfg["instance_group"][0]["count"] == 2
    dt = requests.get(f"{server.url}/v2/models/dtypes/config").json()
    assert {i["data_type"] for i in dt["input"]} >= {"TYPE_STRING", "TYPE_BF16", "TYPE_BOOL", "TYPE_UINT64"}


def test_real_ocr_classifier_matches_onnxruntime(server, repo_dir):
    x = np.random.default_rng(3).random((2, 3, 48, 192), dtype=np.float32)
    client = httpclient.InferenceServerClient(server.http)
    i = httpclient.InferInput("x", list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=True)
    res = client.infer("ocr-cls", [i])
    ref = reference(repo_dir, "ocr-cls", {"x": x})
    (name, want), = ref.items()
    np.testing.assert_allclose(res.as_numpy(name), want, rtol=1e-5, atol=1e-6)


def test_json_float_inputs_reach_the_model_exactly_however_they_are_written(server, repo_dir):
    # FP32 numbers sent as JSON must reach ONNX Runtime as the very float32 values a binary tensor
    # carries, whether the one-pass parser takes them (datatype before data, any nesting, spacing
    # or spelling) or serde does (datatype after data), on V2 and on TF-Serving's :predict.
    x = np.random.default_rng(7).random((2, 3, 48, 192), dtype=np.float32) * 4 - 2
    x[0, 0, 0, :4] = [0.0, -0.0, 1e-30, 3e5]
    client = httpclient.InferenceServerClient(server.http)
    i = httpclient.InferInput("x", list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=True)
    res = client.infer("ocr-cls", [i])
    (name, want), = reference(repo_dir, "ocr-cls", {"x": x}).items()
    binary = res.as_numpy(name)
    np.testing.assert_allclose(binary, want, rtol=1e-5, atol=1e-6)

    flat = x.flatten().tolist()
    nested = x.tolist()
    spelled = "[" + ",\n ".join(f"{v:.9e}" for v in x.flatten()) + "]"
    bodies = {
        "flat, numpy's digits": json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": flat}]}),
        "nested, indented": json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": nested}]}, indent=1),
        "9 digits with exponents": '{"inputs":[{"name":"x","shape":[2,3,48,192],"datatype":"FP32","data":' + spelled + "}]}",
        "datatype after data": json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "data": flat, "datatype": "FP32"}]}),
    }
    for label, body in bodies.items():
        r = requests.post(f"{server.url}/v2/models/ocr-cls/infer", data=body)
        assert r.status_code == 200, (label, r.text[:300])
        out = r.json()["outputs"][0]
        got = np.array(out["data"], dtype=np.float32).reshape(out["shape"])
        np.testing.assert_array_equal(got, binary, err_msg=label)
    for body in ({"instances": nested}, {"inputs": nested}):
        r = requests.post(f"{server.url}/v1/models/ocr-cls:predict", data=json.dumps(body))
        assert r.status_code == 200, r.text[:300]
        got = np.array(next(iter(r.json().values())), dtype=np.float32)
        np.testing.assert_array_equal(got, binary, err_msg=str(list(body)))


def test_real_minilm_embedding_matches_onnxruntime(server, repo_dir):
    ids = np.array([[101, 7592, 2088, 2003, 1037, 3231, 102]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    body = {"inputs": [{"name": k, "shape": list(v.shape), "datatype": "INT64", "data": v.tolist()} for k, v in feeds.items()]}
    r = requests.post(f"{server.url}/v2/models/minilm/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    ref = reference(repo_dir, "minilm", feeds)["last_hidden_state"]
    np.testing.assert_allclose(np.array(out["data"], dtype=np.float32).reshape(out["shape"]), ref, rtol=1e-4, atol=1e-5)


def test_statistics_and_metrics_count_requests(server):
    before = requests.get(f"{server.url}/v2/models/versioned/versions/1/stats").json()["model_stats"][0]
    body = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}
    for _ in range(3):
        assert requests.post(f"{server.url}/v2/models/versioned/versions/1/infer", json=body).ok
    requests.post(f"{server.url}/v2/models/versioned/versions/1/infer", json={"inputs": [{"name": "x"}]})
    after = requests.get(f"{server.url}/v2/models/versioned/versions/1/stats").json()["model_stats"][0]
    s0, s1 = before["inference_stats"], after["inference_stats"]
    assert s1["success"]["count"] - s0["success"]["count"] == 3
    assert s1["fail"]["count"] - s0["fail"]["count"] == 1
    assert s1["compute_infer"]["ns"] > s0["compute_infer"]["ns"]
    for url in (server.url, server.metrics_url):
        text = requests.get(f"{url}/metrics").text
        for name in ("nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
                     "nv_inference_exec_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                     "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
                     "nv_inference_compute_output_duration_us", "nv_inference_pending_request_count",
                     "kubemaas_request_duration_seconds_bucket", "kubemaas_model_load_duration_seconds",
                     "kubemaas_inference_queue_depth", "kubemaas_inflight_request_seconds_total"):
            assert f"\n{name}{{" in text, name
        # On CPU no GPU family is exported: never an invented number.
        assert "nv_gpu_" not in text
        # The time-weighted in-flight count grew while the requests ran.
        spent = [ln for ln in text.splitlines()
                 if ln.startswith('kubemaas_inflight_request_seconds_total{model="versioned",version="1"}')]
        assert float(spent[0].split()[-1]) > 0
        line = [ln for ln in text.splitlines() if ln.startswith('nv_inference_request_success{model="versioned",version="1"}')]
        assert int(line[0].split()[-1]) >= 3
        assert 'reason="REJECTED"' in text
        assert 'execution_provider="CPUExecutionProvider"' in text
    # The metrics port serves metrics, health and model metadata (what the operator reads), not inference.
    assert requests.get(f"{server.metrics_url}/v2/models/model").status_code == 200
    assert requests.post(f"{server.metrics_url}/v2/models/model/infer", json={}).status_code == 404
    assert requests.get(f"{server.metrics_url}/v2/models/model/config").status_code == 404


def test_model_names_are_percent_decoded_in_paths_as_clients_encode_them(repo_dir, tmp_path):
    # tritonclient quotes the model name in the URL, and TF-Serving decodes the name in
    # /v1/models/{name}: a model named "my model+v2" is "my%20model%2Bv2" on the wire, and one
    # named "a:b" is "a%3Ab" (its colon is not the verb's). Both were 404.
    onnx = repo_dir / "model" / "1" / "model.onnx"
    s = Server(["--model", f"my model+v2={onnx}", "--model", f"a:b={onnx}"], tmp_path / "server.log")
    try:
        s.wait_loaded()
        x = np.arange(1, 21, dtype=np.float32).reshape(2, 10)
        want = reference(repo_dir, "model", {"x": x})["y"]
        client = httpclient.InferenceServerClient(s.http)
        inp = httpclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        got = client.infer("my model+v2", [inp]).as_numpy("y")
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert client.is_model_ready("my model+v2")
        assert client.get_model_metadata("my model+v2")["name"] == "my model+v2"
        for path in ("my%20model%2Bv2:predict", "a%3Ab:predict", "a%3Ab/versions/1:predict"):
            r = requests.post(f"{s.url}/v1/models/{path}", json={"instances": x.tolist()})
            assert r.status_code == 200, (path, r.text)
            np.testing.assert_allclose(np.array(r.json()["predictions"], dtype=np.float32), want, rtol=1e-6)
        r = requests.get(f"{s.url}/v1/models/a%3Ab")
        assert r.status_code == 200 and r.json()["name"] == "a:b", r.text
        r = requests.get(f"{s.url}/v2/models/a%3Ab/versions/1/ready")
        assert r.status_code == 200, r.text
        # Bytes that are not UTF-8 once decoded name no model: a 400 that says so.
        r = requests.post(f"{s.url}/v2/models/%FF/infer", json={"inputs": []})
        assert r.status_code == 400 and "UTF-8" in r.json()["error"], r.text
        # The raw name is still found where it has nothing to decode.
        r = requests.get(f"{s.url}/v2/models/a:b/ready")
        assert r.status_code == 200, r.text
        assert s.alive()
    finally:
        assert s.stop() == 0
