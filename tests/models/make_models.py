"""Writes the ONNX models the integration tests serve, into a Triton-layout repository.

Each model exercises one thing: every ONNX Runtime tensor type (`dtypes`), a real computation with
dynamic dims (`model`, the TF-Serving example's [-1,10] input; `arith`), several versions
(`versioned`), an input that a zero-filled warm-up cannot satisfy (`reshape`), a slow model for
shutdown tests (`slow`), and a file that is not a model (`broken`).

It also writes the quick-start model `make run` serves beside the real OCR classifier:
`row-stats` (input `x` FP32 [-1,10], output `stats` FP32 [-1,3]: each row's sum, mean and maximum,
so an answer is easy to check by eye). That one is committed (`models/row-stats/1/model.onnx`) and a
test checks it is what this script writes.

Usage: python make_models.py OUT_DIR
       python make_models.py --row-stats FILE
       python make_models.py --busy FILE   (a model that runs ~1 s for 256 rows: cancellation tests)
"""

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 21)]
IR = 10

DTYPES = {
    "bool": TensorProto.BOOL,
    "uint8": TensorProto.UINT8,
    "uint16": TensorProto.UINT16,
    "uint32": TensorProto.UINT32,
    "uint64": TensorProto.UINT64,
    "int8": TensorProto.INT8,
    "int16": TensorProto.INT16,
    "int32": TensorProto.INT32,
    "int64": TensorProto.INT64,
    "fp16": TensorProto.FLOAT16,
    "bf16": TensorProto.BFLOAT16,
    "fp32": TensorProto.FLOAT,
    "fp64": TensorProto.DOUBLE,
    "bytes": TensorProto.STRING,
}


def save(model, out: Path, name: str, version: int = 1):
    onnx.checker.check_model(model)
    d = out / name / str(version)
    d.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(d / "model.onnx"))


def model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=OPSET, ir_version=IR)


def row_stats():
    """The quick-start model: per row of a [-1,10] FP32 input, [sum, mean, max]."""
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("ReduceSum", ["x", "axes"], ["sum"], keepdims=1),
        helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=1),
        helper.make_node("ReduceMax", ["x", "axes"], ["max"], keepdims=1),
        helper.make_node("Concat", ["sum", "mean", "max"], ["stats"], axis=1),
    ]
    m = model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 10])],
        [helper.make_tensor_value_info("stats", TensorProto.FLOAT, ["batch", 3])],
        [axes],
    )
    m.producer_name = "kubemaas tests/models/make_models.py"
    onnx.checker.check_model(m)
    return m


def main(out: Path):
    # One Identity per type; dims are dynamic and named, so any shape goes through.
    inputs, outputs, nodes = [], [], []
    for name, ty in DTYPES.items():
        inputs.append(helper.make_tensor_value_info(f"in_{name}", ty, ["batch", "n"]))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", ty, ["batch", "n"]))
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
    save(model(nodes, inputs, outputs), out, "dtypes")

    # Dense layer + ReLU, [-1,10] -> [-1,3], fixed weights.
    rng = np.random.default_rng(7)
    w = numpy_helper.from_array(rng.standard_normal((10, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    save(
        model(
            [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["z"]),
             helper.make_node("Relu", ["z"], ["y"])],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 10])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3])],
            [w, b],
        ),
        out,
        "model",
    )

    # Two inputs of different types, two outputs: output selection and multi-output formats.
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float64), "two")
    one = numpy_helper.from_array(np.array(1, dtype=np.int32), "one")
    save(
        model(
            [helper.make_node("Mul", ["a", "two"], ["a2"]), helper.make_node("Add", ["b", "one"], ["b1"])],
            [helper.make_tensor_value_info("a", TensorProto.DOUBLE, ["batch", 4]),
             helper.make_tensor_value_info("b", TensorProto.INT32, ["batch", 3])],
            [helper.make_tensor_value_info("a2", TensorProto.DOUBLE, ["batch", 4]),
             helper.make_tensor_value_info("b1", TensorProto.INT32, ["batch", 3])],
            [two, one],
        ),
        out,
        "arith",
    )

    # Versions 1 and 3 add different constants: the default must be 3.
    for v in (1, 3):
        c = numpy_helper.from_array(np.array(float(v), dtype=np.float32), "c")
        save(
            model([helper.make_node("Add", ["x", "c"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1])], [c]),
            out, "versioned", v,
        )

    # Reshape driven by a shape input: the zero-filled warm-up ([0] as a shape) is rejected.
    save(
        model([helper.make_node("Reshape", ["x", "shape"], ["y"])],
              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1]),
               helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, -1])]),
        out, "reshape",
    )

    # A chain of large MatMuls: each request takes a noticeable time (shutdown-under-load test).
    m = numpy_helper.from_array((rng.standard_normal((512, 512)) / 23).astype(np.float32), "m")
    chain, prev = [], "x"
    for i in range(24):
        chain.append(helper.make_node("MatMul", [prev, "m"], [f"t{i}"]))
        prev = f"t{i}"
    chain.append(helper.make_node("Identity", [prev], ["y"]))
    save(model(chain, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 512])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 512])], [m]), out, "slow")

    # Not a model at all: must be reported not ready with its load error, not crash the server.
    d = out / "broken" / "1"
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.onnx").write_bytes(b"this is not an onnx model")


def slow_to_load(nodes: int = 5000):
    """A chain of Adds that ONNX Runtime's graph optimiser takes long to load (~25 s for 5,000
    nodes on 2 cores; it grows faster than linearly), for shutdown-during-load tests."""
    c = numpy_helper.from_array(np.array([1.0], dtype=np.float32), "c")
    chain, prev = [], "x"
    for i in range(nodes):
        chain.append(helper.make_node("Add", [prev, "c"], [f"t{i}"]))
        prev = f"t{i}"
    chain.append(helper.make_node("Identity", [prev], ["y"]))
    return model(chain, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1])], [c])


def busy(iterations: int = 8000, width: int = 256):
    """x FP32 [-1,256] multiplied by one orthogonal 256x256 matrix 8,000 times in an ONNX Loop: about
    20–30 ms for one row and 1–4 ms per further row on one core (4 ms on the CI machine of
    2026-11-30), from a small request, so a test can keep
    an instance busy for a second without a large body. Orthogonal keeps every row's norm, so
    answers stay well away from zero and can be compared."""
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.standard_normal((width, width)))
    m = numpy_helper.from_array(q.astype(np.float32), "m")
    state = [-1, width]
    body = helper.make_graph(
        [helper.make_node("MatMul", ["s_in", "m"], ["s_out"]), helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_in", TensorProto.FLOAT, state)],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_out", TensorProto.FLOAT, state)])
    n = numpy_helper.from_array(np.array(iterations, dtype=np.int64), "n")
    keep_going = numpy_helper.from_array(np.array(True), "keep_going")
    return model([helper.make_node("Loop", ["n", "keep_going", "x"], ["y"], body=body)],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, state)],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, state)], [m, n, keep_going])


if __name__ == "__main__":
    if sys.argv[1] == "--busy":
        Path(sys.argv[2]).parent.mkdir(parents=True, exist_ok=True)
        Path(sys.argv[2]).write_bytes(busy().SerializeToString())
    elif sys.argv[1] == "--slow-to-load":
        Path(sys.argv[2]).parent.mkdir(parents=True, exist_ok=True)
        Path(sys.argv[2]).write_bytes(slow_to_load().SerializeToString())
    elif sys.argv[1] == "--row-stats":
        Path(sys.argv[2]).parent.mkdir(parents=True, exist_ok=True)
        Path(sys.argv[2]).write_bytes(row_stats().SerializeToString())
    else:
        main(Path(sys.argv[1]))
