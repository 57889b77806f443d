"""ONNX operator conformance through the V2 protocol.

Every node test case of Debian's libonnx-testdata whose inputs and outputs are plain tensors is
served by one kubemaas-server; its inputs are sent as JSON and as binary, and the outputs compared
with the expected ones. A case may fail only where ONNX Runtime itself (the Python package, same
version) fails it: that is the explanation the report gives for every failure.
"""

import json
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import requests
from onnx import TensorProto, numpy_helper

from conftest import Server

DATA = Path(os.environ.get("KUBEMAAS_ONNX_TESTDATA", "/usr/share/libonnx-testdata/data/node"))

V2 = {
    TensorProto.BOOL: ("BOOL", "?"), TensorProto.UINT8: ("UINT8", "<u1"), TensorProto.UINT16: ("UINT16", "<u2"),
    TensorProto.UINT32: ("UINT32", "<u4"), TensorProto.UINT64: ("UINT64", "<u8"), TensorProto.INT8: ("INT8", "<i1"),
    TensorProto.INT16: ("INT16", "<i2"), TensorProto.INT32: ("INT32", "<i4"), TensorProto.INT64: ("INT64", "<i8"),
    TensorProto.FLOAT16: ("FP16", "<f2"), TensorProto.BFLOAT16: ("BF16", "<u2"), TensorProto.FLOAT: ("FP32", "<f4"),
    TensorProto.DOUBLE: ("FP64", "<f8"), TensorProto.STRING: ("BYTES", None),
}
BY_NAME = {v[0]: v[1] for v in V2.values()}


def plain_tensors(values):
    return all(v.type.HasField("tensor_type") and v.type.tensor_type.elem_type in V2 for v in values)


def load_case(case: Path):
    """(model, inputs by name, expected outputs by name) or None when not plain tensors."""
    model = onnx.load(str(case / "model.onnx"), load_external_data=False)
    init = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in init]
    if not plain_tensors(graph_inputs) or not plain_tensors(model.graph.output):
        return None
    ds = case / "test_data_set_0"
    if not ds.is_dir():
        return None
    ins, outs = {}, {}
    for kind, decls, dest in (("input", graph_inputs, ins), ("output", model.graph.output, outs)):
        files = sorted(ds.glob(f"{kind}_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
        if len(files) != len(decls):
            return None
        for decl, f in zip(decls, files):
            t = TensorProto()
            t.ParseFromString(f.read_bytes())
            dest[decl.name] = (t.data_type, numpy_helper.to_array(t))
    return model, ins, outs


def raw_bytes(ty, arr):
    if ty == TensorProto.STRING:
        out = b""
        for s in arr.ravel():
            s = s if isinstance(s, bytes) else str(s).encode()
            out += len(s).to_bytes(4, "little") + s
        return out
    if ty == TensorProto.BFLOAT16:
        return np.ascontiguousarray(arr).view(np.uint16).astype("<u2").tobytes()
    return np.ascontiguousarray(arr).astype(V2[ty][1]).tobytes()


def json_elems(ty, arr):
    flat = arr.ravel()
    if ty == TensorProto.STRING:
        return [s.decode() if isinstance(s, bytes) else str(s) for s in flat]
    if ty == TensorProto.BOOL:
        return [bool(x) for x in flat]
    if ty in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
        return [float(x) if math.isfinite(x) else ("NaN" if math.isnan(x) else ("inf" if x > 0 else "-inf"))
                for x in flat.astype(np.float64)]
    return [int(x) for x in flat]


def decode_binary(datatype, shape, blob):
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(blob):
            n = int.from_bytes(blob[pos:pos + 4], "little")
            items.append(blob[pos + 4:pos + 4 + n])
            pos += 4 + n
        return np.array(items, dtype=object).reshape(shape)
    return np.frombuffer(blob, dtype=BY_NAME[datatype]).reshape(shape)


def close(ty, got, want):
    """ONNX backend-test tolerance for floats; exact otherwise."""
    want = np.asarray(want)
    if got.shape != want.shape:
        return False
    if ty == TensorProto.STRING:
        return [g if isinstance(g, bytes) else str(g).encode() for g in got.ravel()] == \
               [w if isinstance(w, bytes) else str(w).encode() for w in want.ravel()]
    if ty == TensorProto.BFLOAT16:
        want = np.ascontiguousarray(want).view(np.uint16)
        g = (got.astype(np.uint32) << 16).view(np.float32)
        w = (want.astype(np.uint32) << 16).view(np.float32)
        return np.allclose(g, w, rtol=1e-3, atol=1e-7, equal_nan=True)
    if want.dtype.kind == "f":
        return np.allclose(got.astype(np.float64), want.astype(np.float64), rtol=1e-3, atol=1e-7, equal_nan=True)
    with np.errstate(invalid="ignore"):
        return np.array_equal(got.astype(want.dtype), want)


def onnxruntime_verdict(case: Path, ins, outs):
    """None when ONNX Runtime passes the case itself, else why it fails."""
    try:
        sess = ort.InferenceSession(str(case / "model.onnx"), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - the failure is the verdict
        return f"onnxruntime cannot load it: {str(e).splitlines()[0][:160]}"
    try:
        res = sess.run(None, {k: v for k, (_, v) in ins.items()})
    except Exception as e:  # noqa: BLE001
        return f"onnxruntime fails to run it: {str(e).splitlines()[0][:160]}"
    for (name, (ty, want)), got in zip(outs.items(), res):
        if not close(ty, np.asarray(got), want):
            return f"onnxruntime's own output {name!r} differs from the expected one"
    return None


def infer(server, name, ins, out_names, binary):
    if binary:
        header = {"inputs": [], "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in out_names]}
        blobs = b""
        for k, (ty, arr) in ins.items():
            b = raw_bytes(ty, arr)
            header["inputs"].append({"name": k, "shape": list(arr.shape), "datatype": V2[ty][0],
                                     "parameters": {"binary_data_size": len(b)}})
            blobs += b
        h = json.dumps(header).encode()
        r = requests.post(f"{server.url}/v2/models/{name}/infer", data=h + blobs,
                          headers={"Inference-Header-Content-Length": str(len(h))}, timeout=60)
        if r.status_code != 200:
            return None, r.text
        n = int(r.headers["Inference-Header-Content-Length"])
        meta, pos, got = json.loads(r.content[:n]), n, {}
        for o in meta["outputs"]:
            size = o["parameters"]["binary_data_size"]
            got[o["name"]] = decode_binary(o["datatype"], o["shape"], r.content[pos:pos + size])
            pos += size
        return got, None
    body = {"inputs": [{"name": k, "shape": list(arr.shape), "datatype": V2[ty][0], "data": json_elems(ty, arr)}
                       for k, (ty, arr) in ins.items()]}
    r = requests.post(f"{server.url}/v2/models/{name}/infer", json=body, timeout=60)
    if r.status_code != 200:
        return None, r.text
    got = {}
    for o in r.json()["outputs"]:
        if o["datatype"] == "BYTES":
            got[o["name"]] = np.array([s.encode() for s in o["data"]], dtype=object).reshape(o["shape"])
        elif o["datatype"] == "BOOL":
            got[o["name"]] = np.array(o["data"], dtype=bool).reshape(o["shape"])
        else:
            # JSON has no NaN/Infinity: the server writes null for them.
            vals = [math.nan if v is None else v for v in o["data"]]
            got[o["name"]] = np.array(vals, dtype=np.float64 if o["datatype"].startswith(("FP", "BF")) else np.int64).reshape(o["shape"])
    return got, None


def json_representable(ty, arr):
    if ty == TensorProto.BFLOAT16:
        return False  # numpy has no bfloat16 to build the JSON values from; covered in binary
    if ty == TensorProto.STRING:
        try:
            [s.decode() if isinstance(s, bytes) else str(s) for s in arr.ravel()]
        except UnicodeDecodeError:
            return False
    return True


def json_close(ty, got, want):
    want = np.asarray(want)
    if ty in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16) and got.shape == want.shape:
        w = want.astype(np.float64)
        # Infinities come back as null (NaN): accept exactly there.
        w = np.where(np.isinf(w), np.nan, w)
        return np.allclose(got, w, rtol=1e-3, atol=1e-7, equal_nan=True)
    return close(ty, got, want)


@pytest.fixture(scope="module")
def conformance(tmp_path_factory):
    if not DATA.is_dir():
        pytest.fail(f"{DATA} missing: scripts/setup.sh --test installs Debian's libonnx-testdata")
    repo = tmp_path_factory.mktemp("conformance")
    cases = {}
    skipped = Counter()
    for case in sorted(p for p in DATA.iterdir() if (p / "model.onnx").exists()):
        try:
            loaded = load_case(case)
        except Exception:  # noqa: BLE001 - unreadable test data is counted, not served
            skipped["unreadable test data"] += 1
            continue
        if loaded is None:
            skipped["not plain tensors"] += 1
            continue
        (repo / case.name / "1").mkdir(parents=True)
        (repo / case.name / "1" / "model.onnx").symlink_to(case / "model.onnx")
        cases[case.name] = (case, *loaded)
    server = Server(["--model-repository", str(repo), "--max-request-bytes", str(256 * 1024 * 1024)],
                    tmp_path_factory.mktemp("conformance-logs") / "server.log")
    index = {m["name"]: m for m in server.wait_loaded(timeout=900)}
    yield server, cases, index, skipped
    assert server.stop() == 0


def test_onnx_node_conformance_through_v2_json_and_binary(conformance):
    server, cases, index, skipped = conformance
    passed = Counter()
    explained, unexplained, beyond = [], [], []
    for name, (case, model, ins, outs) in cases.items():
        ort_says = onnxruntime_verdict(case, ins, outs)
        state = index[name]
        problems = []
        if state["state"] != "READY":
            problems.append(f"not loaded: {state['reason'][:160]}")
        else:
            for binary in (True, False):
                if not binary and not all(json_representable(ty, a) for ty, a in list(ins.values()) + list(outs.values())):
                    continue
                got, err = infer(server, name, ins, list(outs), binary)
                mode = "binary" if binary else "json"
                if err is not None:
                    problems.append(f"{mode}: {err[:160]}")
                    continue
                cmp = close if binary else json_close
                for o, (ty, want) in outs.items():
                    if o not in got or not cmp(ty, got[o], want):
                        problems.append(f"{mode}: output {o!r} differs from the expected one")
                if not any(p.startswith(mode) for p in problems):
                    passed[mode] += 1
        if problems:
            (explained if ort_says else unexplained).append((name, problems, ort_says))
        elif ort_says:
            beyond.append((name, ort_says))
        assert server.alive(), f"server died on {name}"
    print(f"\nONNX node conformance: {len(cases)} cases served of {len(cases) + sum(skipped.values())}; "
          f"skipped {dict(skipped)}")
    print(f"passed: binary {passed['binary']}, json {passed['json']}; "
          f"failed where onnxruntime itself fails: {len(explained)}; unexplained: {len(unexplained)}")
    for name, why in beyond:
        print(f"  passes here though the onnxruntime Python check does not ({why[:90]}): {name}")
    for name, problems, why in explained:
        print(f"  explained  {name}: {why}")
    for name, problems, _ in unexplained:
        print(f"  UNEXPLAINED {name}: {problems}")
    assert not unexplained, f"{len(unexplained)} cases fail here but pass in onnxruntime: {[n for n, _, _ in unexplained]}"
    assert passed["binary"] > 0.8 * len(cases)
