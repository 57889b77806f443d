"""Binary tensors reach ONNX Runtime in place: the server reads a binary-extension body so that the
tensors land aligned in memory and hands them over without copying them. Whatever the JSON header's
length, with or without Content-Length (a chunked body may land anywhere and is copied), the
answers are ONNX Runtime's own."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import requests

from conftest import Server


@pytest.fixture(scope="module")
def traced(repo_dir, tmp_path_factory):
    s = Server(["--model-repository", str(repo_dir), "--instances", "1", "--log-level",
                "info,kubemaas_server::backend::ort=debug"], tmp_path_factory.mktemp("in-place") / "server.log")
    s.wait_loaded()
    yield s
    assert s.stop() == 0


def handed_over(server):
    """(in_place, copied) of every execution so far, from the server's debug log."""
    events = [json.loads(line) for line in server.log_path.read_text().splitlines() if line.startswith("{")]
    return [(e["in_place"], e["copied"]) for e in events if e.get("message") == "inputs handed to ONNX Runtime"]


def binary_request(tensors, pad):
    """A binary-extension body whose JSON header is `pad` spaces longer than it needs to be."""
    header = {"inputs": [{"name": n, "shape": list(a.shape), "datatype": dt,
                          "parameters": {"binary_data_size": a.nbytes}} for n, a, dt in tensors]}
    head = json.dumps(header).encode() + b" " * pad
    return head, head + b"".join(a.tobytes() for _, a, _ in tensors)


def decode(r):
    assert r.status_code == 200, r.text
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_every_header_length_gives_onnx_runtimes_answer(traced, repo_dir, chunked):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 10)).astype(np.float32)
    a = rng.standard_normal((2, 4))
    b = rng.integers(-50, 50, (2, 3)).astype(np.int32)
    want_y = ort.InferenceSession(str(repo_dir / "model" / "1" / "model.onnx")).run(None, {"x": x})[0]
    before = len(handed_over(traced))
    for pad in range(16):
        for model, tensors in (("model", [("x", x, "FP32")]), ("arith", [("a", a, "FP64"), ("b", b, "INT32")])):
            head, body = binary_request(tensors, pad)
            data = iter([body[:7], body[7:]]) if chunked else body
            r = requests.post(f"{traced.url}/v2/models/{model}/infer", data=data, timeout=30,
                              headers={"Inference-Header-Content-Length": str(len(head))})
            got = decode(r)
            if model == "model":
                np.testing.assert_allclose(got["y"], want_y, rtol=1e-6)
            else:
                assert got["a2"].tolist() == (a * 2).tolist() and got["b1"].tolist() == (b + 1).tolist()
    runs = handed_over(traced)[before:]
    assert len(runs) == 32, runs
    if not chunked:
        # With the body's length known up front, every numeric tensor went in place.
        assert all(copied == 0 for _, copied in runs), runs
        assert sum(n for n, _ in runs) == 16 * (1 + 2)


def test_every_type_side_by_side_comes_back_byte_for_byte(traced):
    # `dtypes` is one Identity per type: 14 tensors of 1-, 2-, 4- and 8-byte elements (and BYTES)
    # in one body, so later tensors start at offsets that do not suit their type. Those are
    # copied, the rest go in place, and every output is the input, byte for byte.
    import ml_dtypes
    types = {"bool": ("BOOL", np.bool_), "uint8": ("UINT8", np.uint8), "uint16": ("UINT16", np.uint16),
             "uint32": ("UINT32", np.uint32), "uint64": ("UINT64", np.uint64), "int8": ("INT8", np.int8),
             "int16": ("INT16", np.int16), "int32": ("INT32", np.int32), "int64": ("INT64", np.int64),
             "fp16": ("FP16", np.float16), "bf16": ("BF16", ml_dtypes.bfloat16), "fp32": ("FP32", np.float32),
             "fp64": ("FP64", np.float64)}
    rng = np.random.default_rng(9)
    tensors, raw = [], {}
    for name, (dt, np_type) in types.items():
        a = (rng.integers(0, 2, (2, 3)) if dt == "BOOL" else rng.integers(1, 100, (2, 3))).astype(np_type)
        tensors.append((f"in_{name}", a, dt))
        raw[f"out_{name}"] = a.tobytes()
    words = [b"in", b"place", b"", b"\xc3\xa9t\xc3\xa9", b"x", b"yz"]
    strings = b"".join(len(w).to_bytes(4, "little") + w for w in words)
    header = {"inputs": [{"name": n, "shape": list(a.shape), "datatype": dt, "parameters": {"binary_data_size": a.nbytes}}
                         for n, a, dt in tensors]
              + [{"name": "in_bytes", "shape": [2, 3], "datatype": "BYTES", "parameters": {"binary_data_size": len(strings)}}],
              "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in [*raw, "out_bytes"]]}
    head = json.dumps(header).encode()
    body = head + b"".join(a.tobytes() for _, a, _ in tensors) + strings
    before = len(handed_over(traced))
    r = requests.post(f"{traced.url}/v2/models/dtypes/infer", data=body, timeout=30,
                      headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    out_header, at = json.loads(r.content[:n]), n
    got = {}
    for o in out_header["outputs"]:
        size = o["parameters"]["binary_data_size"]
        got[o["name"]] = r.content[at:at + size]
        at += size
    assert got == {**raw, "out_bytes": strings}
    [(in_place, copied)] = handed_over(traced)[before:]
    # BOOL and BYTES are always converted; the numeric tensors that landed aligned went in place.
    assert in_place + copied == 14 and copied >= 2 and in_place >= 2, (in_place, copied)


def binary_outputs(r):
    """{name: raw bytes} of a binary-extension answer."""
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    got, at = {}, n
    for o in json.loads(r.content[:n])["outputs"]:
        size = o["parameters"]["binary_data_size"]
        got[o["name"]] = r.content[at:at + size]
        at += size
    return got


def test_answers_keep_their_own_bytes_while_later_runs_go_on(traced):
    # 6 clients at once, each with its own 512 KiB input, on one instance that runs the next
    # request while earlier answers are still being written: an output buffer freed or reused too
    # early (ONNX Runtime's arena hands chunks out again) would give some client another's numbers.
    from concurrent.futures import ThreadPoolExecutor

    def client(k):
        rng = np.random.default_rng(100 + k)
        with requests.Session() as http:
            for _ in range(25):
                a = rng.standard_normal((16_384, 4))
                b = rng.integers(-9, 9, (16_384, 3)).astype(np.int32)
                head, body = binary_request([("a", a, "FP64"), ("b", b, "INT32")], 0)
                header = json.loads(head)
                header["outputs"] = [{"name": n, "parameters": {"binary_data": True}} for n in ("a2", "b1")]
                head = json.dumps(header).encode()
                body = head + a.tobytes() + b.tobytes()
                got = binary_outputs(http.post(f"{traced.url}/v2/models/arith/infer", data=body, timeout=60,
                                               headers={"Inference-Header-Content-Length": str(len(head))}))
                if got != {"a2": (a * 2).tobytes(), "b1": (b + 1).tobytes()}:
                    return False
        return True

    with ThreadPoolExecutor(6) as pool:
        assert all(pool.map(client, range(6)))
