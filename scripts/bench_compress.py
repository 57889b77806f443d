"""Compression, measured: `kubemaas-server compress` (int8-dynamic, fp16) next to ONNX Runtime's own
`quantize_dynamic` on the same real models and the same real inputs (text rendered into images),
in one run. Prints a markdown table: size ratio, lowest output cosine similarity (recomputed here
with Python's ONNX Runtime) and median latency ratio (original ÷ compressed, ONNX Runtime on this
machine, 2 intra-op threads, interleaved runs). Not part of `make test` (it measures; tests assert).
Usage: python scripts/bench_compress.py SERVER_BINARY MODELS_DIR"""

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic
from PIL import Image, ImageDraw, ImageFont

BINARY, MODELS = Path(sys.argv[1]), Path(sys.argv[2])
LINES = ["Hello 2026 world", "KubeMaaS on ONNX", "int8 and fp16", "model as a service"]


def text(width, height, lines, size):
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    y = 6
    for line in lines:
        d.text((8, y), line, fill=(0, 0, 0), font=ImageFont.load_default(size=size))
        y += size + 10
    return np.asarray(img).astype(np.float64) / 255.0


def chw(a):
    return a.transpose(2, 0, 1)[None].astype(np.float32)


MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
def sentences():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MODELS / "minilm-fp32" / "1" / "tokenizer.json"))
    tok.no_padding()
    out = []
    for text_ in ["KubeMaaS serves ONNX models on Kubernetes.", "The weather is lovely today in the park.",
                  "Quantization shrinks a model to a quarter of its size.", "How many replicas does the deployment need?"]:
        e = tok.encode(text_)
        ids = np.array([e.ids], np.int64)
        out.append({"input_ids": ids, "attention_mask": np.array([e.attention_mask], np.int64),
                    "token_type_ids": np.zeros_like(ids)})
    return out


SETS = {
    "minilm-fp32": sentences(),
    "ocr-rec": [chw((text(320, 48, [t], 28) - 0.5) / 0.5) for t in LINES],
    "ocr-det": [chw((text(320, 160, LINES[:3], 24) - MEAN) / STD)],
    "ocr-cls": [chw((text(192, 48, [t], 28) - 0.5) / 0.5) for t in LINES[:2]],
}


def feed(x):
    return x if isinstance(x, dict) else {"x": x}


def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so)


def cosine(a, b, xs):
    outs_a, outs_b = [], []
    for x in xs:
        outs_a.append(np.concatenate([y.ravel() for y in a.run(None, feed(x))]).astype(np.float64))
        outs_b.append(np.concatenate([y.ravel() for y in b.run(None, feed(x))]).astype(np.float64))
    ya, yb = np.concatenate(outs_a), np.concatenate(outs_b)
    return float(ya @ yb / np.linalg.norm(ya) / np.linalg.norm(yb))


def latency_ratio(a, b, x, runs=30):
    ta, tb = [], []
    x = feed(x)
    for _ in range(3):
        a.run(None, x), b.run(None, x)
    for _ in range(runs):
        t = time.perf_counter(); a.run(None, x); ta.append(time.perf_counter() - t)
        t = time.perf_counter(); b.run(None, x); tb.append(time.perf_counter() - t)
    return float(np.median(ta) / np.median(tb)), float(np.median(ta) * 1000)


def constants_as_initializers(src, dst):
    m = onnx.load(src)
    keep = []
    for n in m.graph.node:
        if n.op_type == "Constant" and n.attribute[0].name == "value":
            t = onnx.TensorProto(); t.CopyFrom(n.attribute[0].t); t.name = n.output[0]
            m.graph.initializer.append(t)
        else:
            keep.append(n)
    del m.graph.node[:]; m.graph.node.extend(keep)
    onnx.save(m, dst)


def main():
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for name, xs in SETS.items():
            src = MODELS / name / "1" / "model.onnx"
            pre = d / f"{name}-pre.onnx"
            constants_as_initializers(src, pre)
            npz = []
            for i, x in enumerate(xs):
                npz += ["--eval-inputs", str(d / f"{name}-{i}.npz")]
                np.savez(d / f"{name}-{i}.npz", **feed(x))
            variants = {}
            for label, flags in (("int8-dynamic", ["--mode", "int8-dynamic"]),
                                 ("int8-dynamic --all-integer", ["--mode", "int8-dynamic", "--all-integer"]),
                                 ("fp16", ["--mode", "fp16"])):
                out = d / f"{name}-{len(variants)}.onnx"
                subprocess.run([str(BINARY), "compress", str(src), str(out), *flags, "--timing-runs", "0", *npz],
                               check=True, capture_output=True)
                variants[f"kubemaas {label}"] = out
            for label, kw in (("onnxruntime quantize_dynamic (MatMul/Gemm)", {"op_types_to_quantize": ["MatMul", "Gemm"]}),
                              ("onnxruntime quantize_dynamic (default)", {})):
                out = d / f"{name}-ort-{len(kw)}.onnx"
                quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8, **kw)
                variants[label] = out
            base = session(src)
            for label, path in variants.items():
                s = session(path)
                speed, ms = latency_ratio(base, s, xs[0])
                rows.append((name, label, path.stat().st_size / src.stat().st_size, cosine(base, s, xs), speed, ms))
    print(f"\nCompression on {ort.get_device()} ({__import__('os').cpu_count()} cores), onnxruntime {ort.__version__}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| model | compressed by | size ratio | lowest cosine | speed-up (original ms) |")
    print("|---|---|---|---|---|")
    for name, label, size, cos, speed, ms in rows:
        print(f"| {name} | {label} | {size:.3f} | {cos:.5f} | {speed:.2f}× ({ms:.1f} ms) |")


if __name__ == "__main__":
    main()
