"""Malformed requests: each gets the right 4xx with {"error": ...}, and the server keeps serving."""

import json
import socket

import pytest
import requests

from conftest import peak_rss_mib

X = {"name": "x", "shape": [1, 10], "datatype": "FP32", "data": list(range(10))}
A = {"name": "a", "shape": [1, 4], "datatype": "FP64", "data": [1, 2, 3, 4]}
B = {"name": "b", "shape": [1, 3], "datatype": "INT32", "data": [1, 2, 3]}


def req(inputs, **extra):
    return json.dumps({"inputs": inputs, **extra})


def with_(base, **kw):
    return {**base, **kw}


BIN_HDR = req([with_(X, data=None, parameters={"binary_data_size": 40})]).replace('"data": null, ', "")

# (id, method, path, body, headers, status)
CASES = [
    ("empty-body", "POST", "/v2/models/model/infer", "", {}, 400),
    ("truncated-json", "POST", "/v2/models/model/infer", req([X])[:-7], {}, 400),
    ("not-json", "POST", "/v2/models/model/infer", "hello", {}, 400),
    ("json-array", "POST", "/v2/models/model/infer", "[1,2]", {}, 400),
    ("json-null", "POST", "/v2/models/model/infer", "null", {}, 400),
    ("no-inputs-key", "POST", "/v2/models/model/infer", "{}", {}, 400),
    ("inputs-not-list", "POST", "/v2/models/model/infer", '{"inputs": 5}', {}, 400),
    ("empty-inputs", "POST", "/v2/models/model/infer", req([]), {}, 400),
    ("missing-name", "POST", "/v2/models/model/infer", req([{k: v for k, v in X.items() if k != "name"}]), {}, 400),
    ("missing-shape", "POST", "/v2/models/model/infer", req([{k: v for k, v in X.items() if k != "shape"}]), {}, 400),
    ("missing-datatype", "POST", "/v2/models/model/infer", req([{k: v for k, v in X.items() if k != "datatype"}]), {}, 400),
    ("missing-data", "POST", "/v2/models/model/infer", req([{k: v for k, v in X.items() if k != "data"}]), {}, 400),
    ("unknown-input", "POST", "/v2/models/model/infer", req([with_(X, name="nope")]), {}, 400),
    ("duplicate-input", "POST", "/v2/models/model/infer", req([X, X]), {}, 400),
    ("missing-second-input", "POST", "/v2/models/arith/infer", req([A]), {}, 400),
    ("unknown-datatype", "POST", "/v2/models/model/infer", req([with_(X, datatype="FLOAT")]), {}, 400),
    ("wrong-datatype", "POST", "/v2/models/model/infer", req([with_(X, datatype="FP64")]), {}, 400),
    ("wrong-rank", "POST", "/v2/models/model/infer", req([with_(X, shape=[10])]), {}, 400),
    ("wrong-static-dim", "POST", "/v2/models/model/infer", req([with_(X, shape=[2, 5])]), {}, 400),
    ("too-few-elements", "POST", "/v2/models/model/infer", req([with_(X, data=list(range(9)))]), {}, 400),
    ("too-many-elements", "POST", "/v2/models/model/infer", req([with_(X, data=list(range(11)))]), {}, 400),
    ("negative-dim", "POST", "/v2/models/model/infer", req([with_(X, shape=[-1, 10])]), {}, 400),
    ("enormous-shape", "POST", "/v2/models/model/infer", req([with_(X, shape=[2**62, 10])]), {}, 400),
    ("overflowing-shape", "POST", "/v2/models/dtypes/infer",
     req([{"name": "in_int8", "shape": [2**40, 2**40], "datatype": "INT8", "data": [1]}]), {}, 400),
    ("shape-not-ints", "POST", "/v2/models/model/infer", req([with_(X, shape=["1", 10])]), {}, 400),
    ("shape-float", "POST", "/v2/models/model/infer", req([with_(X, shape=[1.5, 10])]), {}, 400),
    ("string-in-float-data", "POST", "/v2/models/model/infer", req([with_(X, data=["a"] * 10)]), {}, 400),
    ("null-in-data", "POST", "/v2/models/model/infer", req([with_(X, data=[None] * 10)]), {}, 400),
    ("object-in-data", "POST", "/v2/models/model/infer", req([with_(X, data=[{}] * 10)]), {}, 400),
    ("bool-in-float-data", "POST", "/v2/models/model/infer", req([with_(X, data=[True] * 10)]), {}, 400),
    ("float-in-int-data", "POST", "/v2/models/arith/infer", req([A, with_(B, data=[1.5, 2, 3])]), {}, 400),
    ("int-out-of-range", "POST", "/v2/models/arith/infer", req([A, with_(B, data=[2**31, 2, 3])]), {}, 400),
    ("uint8-negative", "POST", "/v2/models/dtypes/infer",
     req([{"name": "in_uint8", "shape": [1, 1], "datatype": "UINT8", "data": [-1]}]), {}, 400),
    ("bool-as-2", "POST", "/v2/models/dtypes/infer",
     req([{"name": "in_bool", "shape": [1, 1], "datatype": "BOOL", "data": [2]}]), {}, 400),
    ("number-for-bytes", "POST", "/v2/models/dtypes/infer",
     req([{"name": "in_bytes", "shape": [1, 1], "datatype": "BYTES", "data": [7]}]), {}, 400),
    ("huge-nesting", "POST", "/v2/models/model/infer", req([with_(X, data="@")]).replace('"@"', "[" * 5000 + "1" + "]" * 5000), {}, 400),
    ("nesting-over-32", "POST", "/v2/models/model/infer", req([with_(X, data="@")]).replace('"@"', "[" * 40 + "1" + "]" * 40), {}, 400),
    ("unknown-output", "POST", "/v2/models/model/infer", req([X], outputs=[{"name": "zz"}]), {}, 400),
    ("duplicate-output", "POST", "/v2/models/model/infer", req([X], outputs=[{"name": "y"}, {"name": "y"}]), {}, 400),
    ("binary-data-output-not-bool", "POST", "/v2/models/model/infer", req([X], parameters={"binary_data_output": "yes"}), {}, 400),
    ("binary-size-negative", "POST", "/v2/models/model/infer",
     req([with_(X, parameters={"binary_data_size": -4})]), {}, 400),
    ("binary-and-data", "POST", "/v2/models/model/infer",
     req([with_(X, parameters={"binary_data_size": 40})]) + "\0" * 40, {"Inference-Header-Content-Length": "__LEN__"}, 400),
    ("binary-too-short", "POST", "/v2/models/model/infer", BIN_HDR + "\0" * 39, {"Inference-Header-Content-Length": "__LEN__"}, 400),
    ("binary-too-long", "POST", "/v2/models/model/infer", BIN_HDR + "\0" * 41, {"Inference-Header-Content-Length": "__LEN__"}, 400),
    ("binary-wrong-size-for-shape", "POST", "/v2/models/model/infer",
     BIN_HDR.replace("40", "36") + "\0" * 36, {"Inference-Header-Content-Length": "__LEN__"}, 400),
    ("header-length-beyond-body", "POST", "/v2/models/model/infer", req([X]), {"Inference-Header-Content-Length": "999999"}, 400),
    ("header-length-not-a-number", "POST", "/v2/models/model/infer", req([X]), {"Inference-Header-Content-Length": "abc"}, 400),
    ("header-length-cuts-json", "POST", "/v2/models/model/infer", req([X]), {"Inference-Header-Content-Length": "10"}, 400),
    ("header-length-u64-max", "POST", "/v2/models/model/infer", req([X]),
     {"Inference-Header-Content-Length": "18446744073709551615"}, 400),
    ("output-classification", "POST", "/v2/models/model/infer",
     req([X], outputs=[{"name": "y", "parameters": {"classification": 2}}]), {}, 400),
    ("bytes-binary-bad-prefix", "POST", "/v2/models/dtypes/infer",
     req([{"name": "in_bytes", "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]) + "\x09\0\0\0ab",
     {"Inference-Header-Content-Length": "__LEN__"}, 400),
    ("bool-binary-byte-7", "POST", "/v2/models/dtypes/infer",
     req([{"name": "in_bool", "shape": [1, 1], "datatype": "BOOL", "parameters": {"binary_data_size": 1}}]) + "\x07",
     {"Inference-Header-Content-Length": "__LEN__"}, 400),
    ("unknown-model", "POST", "/v2/models/nope/infer", req([X]), {}, 404),
    ("unknown-version", "POST", "/v2/models/model/versions/9/infer", req([X]), {}, 404),
    ("non-numeric-version", "GET", "/v2/models/model/versions/latest", "", {}, 404),
    ("unknown-path", "GET", "/v3/whatever", "", {}, 404),
    ("unknown-model-subpath", "GET", "/v2/models/model/bogus", "", {}, 404),
    ("get-on-infer", "GET", "/v2/models/model/infer", "", {}, 405),
    ("metadata-unknown-model", "GET", "/v2/models/nope", "", {}, 404),
    ("v1-not-json", "POST", "/v1/models/model:predict", "{{", {}, 400),
    ("v1-no-instances", "POST", "/v1/models/model:predict", "{}", {}, 400),
    ("v1-both-formats", "POST", "/v1/models/model:predict", '{"instances": [[1]], "inputs": [[1]]}', {}, 400),
    ("v1-instances-not-list", "POST", "/v1/models/model:predict", '{"instances": 3}', {}, 400),
    ("v1-empty-instances", "POST", "/v1/models/model:predict", '{"instances": []}', {}, 400),
    ("v1-ragged", "POST", "/v1/models/model:predict", '{"instances": [[1,2,3,4,5,6,7,8,9,10],[1]]}', {}, 400),
    ("v1-wrong-width", "POST", "/v1/models/model:predict", '{"instances": [[1,2,3]]}', {}, 400),
    ("v1-bad-b64", "POST", "/v1/models/dtypes:predict", '{"inputs": {"in_bytes": [[{"b64": "!!!"}]]}}', {}, 400),
    ("v1-string-for-float", "POST", "/v1/models/model:predict", '{"instances": [["a","b","c","d","e","f","g","h","i","j"]]}', {}, 400),
    ("v1-unknown-input", "POST", "/v1/models/arith:predict", '{"inputs": {"zz": [1]}}', {}, 400),
    ("v1-duplicate-input", "POST", "/v1/models/arith:predict",
     '{"inputs": {"a": [[1,2,3,4]], "a": [[9,9,9,9]], "b": [[1,2,3]]}}', {}, 400),
    ("v1-duplicate-instance-key", "POST", "/v1/models/arith:predict",
     '{"instances": [{"a": [1,2,3,4], "a": [9,9,9,9], "b": [1,2,3]}]}', {}, 400),
    ("v1-multi-input-unnamed", "POST", "/v1/models/arith:predict", '{"instances": [[1,2,3,4]]}', {}, 400),
    ("v1-unknown-verb", "POST", "/v1/models/model:classify", '{"examples": []}', {}, 400),
    ("v1-unknown-model", "POST", "/v1/models/nope:predict", '{"instances": [[1]]}', {}, 404),
    ("v1-get-predict", "GET", "/v1/models/model:predict", "", {}, 405),
    ("v1-deep-nesting", "POST", "/v1/models/model:predict", '{"instances": ' + "[" * 100 + "1" + "]" * 100 + "}", {}, 400),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_request_gets_4xx_with_error_and_server_keeps_serving(server, case):
    _, method, path, body, headers, status = case
    data = body.encode("latin-1") if isinstance(body, str) else body
    if headers.get("Inference-Header-Content-Length") == "__LEN__":
        headers = {**headers, "Inference-Header-Content-Length": str(data.index(b"}]}") + 3)}
    r = requests.request(method, f"{server.url}{path}", data=data, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["error"], str) and r.json()["error"]
    assert server.alive()


def test_there_are_at_least_fifty_malformed_cases():
    assert len(CASES) >= 50


def test_body_over_the_limit_gets_413_declared_or_streamed(server):
    big = b"[" + b"1," * (5 * 1024 * 1024) + b"1]"
    r = requests.post(f"{server.url}/v2/models/model/infer", data=big, timeout=60)
    assert r.status_code == 413 and "max-request-bytes" in r.json()["error"]

    def chunks():  # no Content-Length: the limit must hold while streaming
        for _ in range(10):
            yield b"x" * (1024 * 1024)

    r = requests.post(f"{server.url}/v2/models/model/infer", data=chunks(), timeout=60)
    assert r.status_code == 413
    assert server.alive()


def raw_exchange(server, payload: bytes, half_close=True):
    """Sends raw bytes; returns everything the server answers until it closes."""
    host, port = server.http.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(payload)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
        return reply


def test_garbage_and_truncated_http_only_affect_their_own_connection(server):
    raw_exchange(server, b"\x00\xff garbage \r\n\r\n")
    # Declares 1000 bytes, sends 10 then closes: the request fails alone.
    raw_exchange(server, b"POST /v2/models/model/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"inputs\":")
    reply = raw_exchange(server, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", half_close=False)
    assert reply.startswith(b"HTTP/1.1 200")
    assert server.alive()


def test_request_without_content_type_is_json(server):
    body = req([X]).encode()
    r = requests.post(f"{server.url}/v2/models/model/infer", data=body, headers={"Content-Type": None})
    assert "Content-Type" not in r.request.headers
    assert r.status_code == 200, r.text


def test_a_request_the_model_itself_rejects_is_400_and_counted_rejected(server):
    # Valid against the signature (x: FP32 [-1], shape: INT64 [2]) but 5 elements cannot take
    # shape [2, 2]: ONNX Runtime's Reshape refuses it. The client's fault, not the server's.
    def rejected():
        text = requests.get(f"{server.metrics_url}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith('nv_inference_request_failure{model="reshape",version="1",reason="REJECTED"}'):
                return int(line.split()[-1])
        return 0

    before = rejected()
    body = req([{"name": "x", "shape": [5], "datatype": "FP32", "data": [1, 2, 3, 4, 5]},
                {"name": "shape", "shape": [2], "datatype": "INT64", "data": [2, 2]}])
    r = requests.post(f"{server.url}/v2/models/reshape/infer", data=body, timeout=30)
    assert r.status_code == 400, r.text
    assert "Reshape" in r.json()["error"] and "model rejected" in r.json()["error"], r.text
    assert rejected() == before + 1
    ok = req([{"name": "x", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]},
              {"name": "shape", "shape": [2], "datatype": "INT64", "data": [2, 2]}])
    assert requests.post(f"{server.url}/v2/models/reshape/infer", data=ok, timeout=30).status_code == 200


def test_binary_bytes_elements_beyond_the_shape_are_refused_without_amplification(repo_dir, tmp_path):
    # 64 MiB of empty BYTES elements (4 bytes each) for a [1, 1] input: a list of 16 million
    # elements would take ~0.5 GiB (32 bytes each). Parsing must stop at the shape's count.
    from conftest import Server

    s = Server(["--model", f"dtypes={repo_dir / 'dtypes' / '1' / 'model.onnx'}",
                "--max-request-bytes", str(65 << 20)], tmp_path / "server.log")
    try:
        s.wait_loaded()
        blob = b"\0" * (64 << 20)
        header = json.dumps({"inputs": [{"name": "in_bytes", "shape": [1, 1], "datatype": "BYTES",
                                         "parameters": {"binary_data_size": len(blob)}}]}).encode()
        before = peak_rss_mib(s.proc.pid)
        r = requests.post(f"{s.url}/v2/models/dtypes/infer", data=header + blob, timeout=120,
                          headers={"Inference-Header-Content-Length": str(len(header))})
        after = peak_rss_mib(s.proc.pid)
        assert r.status_code == 400 and "in_bytes" in r.json()["error"], r.text
        # The body itself (64 MiB, held once) and little else.
        assert after - before < 200, (before, after)
        assert s.alive()
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("shape", ["values", "named"])
def test_a_64_mib_tf_serving_body_decodes_without_a_json_tree(repo_dir, tmp_path, shape):
    # `{"instances": [0,0,...]}` is 32 million elements: as a serde_json Value tree (32 bytes per
    # element plus the clone of the list) it took about 2 GiB. Decoded straight into the tensor it
    # takes the body plus the tensor (4 bytes per element). The rank does not match dense model's
    # input ([-1, 10]), so the model never runs: the peak is decoding's alone.
    from conftest import Server

    element = b"0," if shape == "values" else b'{"x":0},'
    n = (64 << 20) // len(element)
    body = b'{"instances": [' + element * (n - 1) + element[:-1] + b"]}"
    s = Server(["--model", f"dense={repo_dir / 'model' / '1' / 'model.onnx'}",
                "--max-request-bytes", str(65 << 20)], tmp_path / "server.log")
    try:
        s.wait_loaded()
        before = peak_rss_mib(s.proc.pid)
        r = requests.post(f"{s.url}/v1/models/dense:predict", data=body, timeout=300)
        after = peak_rss_mib(s.proc.pid)
        assert r.status_code == 400 and "shape" in r.json()["error"], r.text[:500]
        # The body (64 MiB) and the tensor (4 bytes per element: 128 MiB, or 32 MiB named).
        print(f"peak RSS growth {after - before:.0f} MiB")
        assert after - before < 320, (before, after)
        ok = requests.post(f"{s.url}/v1/models/dense:predict", timeout=30,
                           json={"instances": [[float(i) for i in range(10)]]})
        assert ok.status_code == 200 and len(ok.json()["predictions"][0]) == 3, ok.text
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("dims", [[2**40], [2**31, 2**31, 2**31]], ids=["4-tib-input", "overflowing-input"])
def test_a_model_whose_fixed_input_cannot_exist_loads_without_warm_up_and_the_others_serve(repo_dir, tmp_path, dims):
    # Warm-up ran every model once on zeros of its fixed input shape: [2**40] FP32 asked for 4 TiB
    # (the allocation aborted the server) and [2**31]*3 overflowed the element count (a panic that
    # killed the loader, so the models after it never loaded).
    import onnx
    from onnx import TensorProto, helper
    from conftest import Server

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "huge",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)])
    huge = tmp_path / "huge.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), huge)
    s = Server(["--model", f"huge={huge}", "--model", f"model={repo_dir / 'model' / '1' / 'model.onnx'}"],
               tmp_path / "server.log")
    try:
        s.wait_loaded()
        r = requests.post(f"{s.url}/v2/models/model/infer", data=req([X]), timeout=30)
        assert r.status_code == 200, r.text
        assert requests.get(f"{s.url}/v2/models/huge/ready", timeout=10).status_code == 200
        assert "not warmed" in s.log_path.read_text()
    finally:
        assert s.stop() == 0


DENSE_X = b'{"name":"x","shape":[1,10],"datatype":"FP32","data":[1,2,3,4,5,6,7,8,9,10]}'
AMPLIFIERS = {
    # Each is ~60 MiB of small entries that serde grew into structs, maps or Value trees 7 to 20
    # times their size before anything looked at them (measured: outputs +1086 MiB, shape +961,
    # parameters +648, inputs +434); now each list stops at its bound.
    "outputs": (lambda n: b'{"inputs":[' + DENSE_X + b'],"outputs":[' + b",".join([b'{"name":"y"}'] * n) + b"]}",
                "more than 16384 outputs"),
    "inputs": (lambda n: b'{"inputs":[' + b",".join([b'{"name":"x","shape":[0],"datatype":"FP32","data":[]}'] * n) + b"]}",
               "more than 16384 inputs"),
    "parameters": (lambda n: b'{"parameters":{' + b",".join(b'"k%d":1' % i for i in range(n)) + b'},"inputs":[' + DENSE_X + b"]}",
                   "more than 256 parameters"),
    "a parameter's value": (lambda n: b'{"parameters":{"k":[' + b",".join([b"0"] * n) + b']},"inputs":[' + DENSE_X + b"]}",
                            'parameter "k" must be a string, a number, a boolean or null'),
    "shape": (lambda n: b'{"inputs":[{"name":"x","shape":[' + b",".join([b"1"] * n) + b'],"datatype":"FP32","data":[1]}]}',
              "more than 64 dimensions"),
}


@pytest.mark.parametrize("what", list(AMPLIFIERS))
def test_a_body_of_many_small_entries_is_refused_before_it_takes_gigabytes(repo_dir, tmp_path, what):
    from conftest import Server

    make, expect = AMPLIFIERS[what]
    per = len(make(2)) - len(make(1))
    body = make(((60 << 20) - len(make(1))) // per)
    body = body if len(body) <= 62 << 20 else make(((60 << 20) - len(make(1))) * (60 << 20) // len(body) // per)
    s = Server(["--model", f"dense={repo_dir / 'model' / '1' / 'model.onnx'}",
                "--max-request-bytes", str(64 << 20)], tmp_path / "server.log")
    try:
        s.wait_loaded()
        before = peak_rss_mib(s.proc.pid)
        r = requests.post(f"{s.url}/v2/models/dense/infer", data=body, timeout=300)
        after = peak_rss_mib(s.proc.pid)
        print(f"{what}: {len(body)} bytes, peak RSS growth {after - before:.0f} MiB, {r.status_code} {r.text[:200]}")
        assert r.status_code == 400 and expect in r.json()["error"], r.text[:500]
        assert after - before < 200, (before, after)
        ok = requests.post(f"{s.url}/v2/models/dense/infer", data=b'{"inputs":[' + DENSE_X + b"]}", timeout=30)
        assert ok.status_code == 200 and len(ok.json()["outputs"][0]["data"]) == 3, ok.text
    finally:
        assert s.stop() == 0


def test_an_error_quotes_at_most_a_few_kilobytes_of_what_the_client_sent(server):
    # Messages quote client input (an unknown input's name, a value that does not parse); a name of
    # a million U+0300 characters (2 MB) came back as 8 MB of `\u{300}` escapes over REST, and over
    # gRPC as a grpc-message trailer of 7 MB.
    import grpc
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    name = "\u0300" * 1_000_000
    r = requests.post(f"{server.url}/v2/models/model/infer", timeout=60,
                      json={"inputs": [{"name": name, "shape": [1, 10], "datatype": "FP32", "data": [0] * 10}]})
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert len(r.content) < 8192 and error.startswith("unknown input") and "bytes of this message cut" in error, error[-300:]
    client = grpcclient.InferenceServerClient(server.grpc)
    x = grpcclient.InferInput(name, [1, 10], "FP32")
    x.set_data_from_numpy(np.zeros((1, 10), np.float32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("model", [x])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT", e.value
    assert "unknown input" in e.value.message() and len(e.value.message()) < 8192
    # The health service, open without a key, quotes the service asked for.
    raw = name.encode()
    check = grpc.insecure_channel(server.grpc).unary_unary(
        "/grpc.health.v1.Health/Check", request_serializer=lambda b: b, response_deserializer=lambda b: b)
    length = bytearray()
    n = len(raw)
    while True:
        length.append((n & 0x7F) | (0x80 if n >> 7 else 0))
        n >>= 7
        if not n:
            break
    with pytest.raises(grpc.RpcError) as e:
        check(b"\x0a" + bytes(length) + raw, timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "unknown service" in e.value.details(), e.value.code()
    assert len(e.value.details().encode()) < 8192
    assert requests.post(f"{server.url}/v2/models/model/infer", json={"inputs": [X]}, timeout=30).status_code == 200


def test_bytes_elements_count_in_the_budget_what_they_take(tmp_path):
    # An empty BYTES element is 3 bytes of JSON but about 190 bytes in memory by the time ONNX
    # Runtime holds it (its handle, the Vec's spare room, a String and a CString on the way in,
    # the runtime's std::string); the budget counted 64, so 8 MiB of them (2.8 million) passed a
    # 300 MiB budget as 180 MB while the server grew by 527 MiB.
    from onnx import TensorProto, helper, save

    from conftest import Server

    graph = helper.make_graph([helper.make_node("Identity", ["s"], ["t"])], "strings",
                              [helper.make_tensor_value_info("s", TensorProto.STRING, ["n"])],
                              [helper.make_tensor_value_info("t", TensorProto.STRING, ["n"])])
    model = tmp_path / "strings.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(model))
    n = 2_800_000
    body = b'{"inputs":[{"name":"s","shape":[%d],"datatype":"BYTES","data":[' % n + b",".join([b'""'] * n) + b"]}]}"
    s = Server(["--model", f"strings={model}", "--max-request-bytes", str(9 << 20),
                "--max-buffered-request-bytes", str(300 << 20)], tmp_path / "server.log")
    try:
        s.wait_loaded()
        before = peak_rss_mib(s.proc.pid)
        r = requests.post(f"{s.url}/v2/models/strings/infer", data=body, timeout=300)
        after = peak_rss_mib(s.proc.pid)
        print(f"{len(body)} bytes, {n} elements: {r.status_code}, peak RSS growth {after - before:.0f} MiB")
        assert r.status_code == 413 and "BYTES elements" in r.json()["error"], r.text[:300]
        assert after - before < 300, (before, after)
        ok = requests.post(f"{s.url}/v2/models/strings/infer", timeout=30,
                           json={"inputs": [{"name": "s", "shape": [2], "datatype": "BYTES", "data": ["a", ""]}]})
        assert ok.status_code == 200 and ok.json()["outputs"][0]["data"] == ["a", ""], ok.text
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("form", ["inputs", "instances"])
def test_a_tf_serving_object_of_millions_of_names_stops_at_the_bound(repo_dir, tmp_path, form):
    # Every name went into a map before any was looked up: 60 MiB of `"k1":0,` took +495 MiB
    # before the 400 for the first unknown name.
    from conftest import Server

    n = 5_000_000
    names = b"{" + b",".join(b'"k%d":0' % i for i in range(n)) + b"}"
    body = b'{"inputs":' + names + b"}" if form == "inputs" else b'{"instances":[' + names + b"]}"
    s = Server(["--model", f"dense={repo_dir / 'model' / '1' / 'model.onnx'}",
                "--max-request-bytes", str(64 << 20)], tmp_path / "server.log")
    try:
        s.wait_loaded()
        before = peak_rss_mib(s.proc.pid)
        r = requests.post(f"{s.url}/v1/models/dense:predict", data=body, timeout=300)
        after = peak_rss_mib(s.proc.pid)
        print(f"{form}: {len(body)} bytes, peak RSS growth {after - before:.0f} MiB, {r.status_code} {r.text[:200]}")
        assert r.status_code == 400 and "more than 16384 named inputs" in r.json()["error"], r.text[:300]
        assert after - before < 200, (before, after)
    finally:
        assert s.stop() == 0
