"""`kubemaas-server compress` on real models (PP-OCRv4 rec and det, PP-OCR cls from the rapidocr
wheel) with real inputs (text rendered into images), checked independently: the output passes
onnx.checker, Python's ONNX Runtime loads it and recomputes the agreement the report claims, and
ONNX Runtime's own quantizer is run on the same models for comparison."""

import hashlib
import json
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from PIL import Image, ImageDraw, ImageFont

from conftest import BINARY, MODELS

REC, DET, CLS, BERT = (MODELS / m / "1" / "model.onnx" for m in ("ocr-rec", "ocr-det", "ocr-cls", "minilm-fp32"))
SENTENCES = ["KubeMaaS serves ONNX models on Kubernetes.", "The weather is lovely today in the park.",
             "Quantization shrinks a model to a quarter of its size.", "How many replicas does the deployment need?"]
# ImageNet normalisation for det, (x - 0.5) / 0.5 for rec and cls, as PaddleOCR feeds them.
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def text_image(width, height, lines, size):
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=size)
    y = 6
    for line in lines:
        draw.text((8, y), line, fill=(0, 0, 0), font=font)
        y += size + 10
    return np.asarray(img).astype(np.float64) / 255.0


def chw(a):
    return a.transpose(2, 0, 1)[None].astype(np.float32)


LINES = ["Hello 2026 world", "KubeMaaS on ONNX", "int8 and fp16", "model as a service"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Evaluation sets as .npz files (one sample each), per model."""
    d = tmp_path_factory.mktemp("eval")
    sets = {
        "rec": [chw((text_image(320, 48, [t], 28) - 0.5) / 0.5) for t in LINES],
        "cls": [chw((text_image(192, 48, [t], 28) - 0.5) / 0.5) for t in LINES[:2]],
        "det": [chw((text_image(320, 160, LINES[:3], 24) - MEAN) / STD)],
    }
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(BERT.parent / "tokenizer.json"))
    tok.no_padding()
    sets["bert"] = []
    for sentence in SENTENCES:
        e = tok.encode(sentence)
        ids = np.array([e.ids], np.int64)
        sets["bert"].append({"input_ids": ids, "attention_mask": np.array([e.attention_mask], np.int64),
                             "token_type_ids": np.zeros_like(ids)})
    out = {}
    for name, samples in sets.items():
        out[name] = []
        for i, x in enumerate(samples):
            p = d / f"{name}-{i}.npz"
            np.savez(p, **(x if isinstance(x, dict) else {"x": x}))
            out[name].append(p)
    return out


def compress(src, dst, mode, *flags, check=True):
    proc = subprocess.run([str(BINARY), "compress", str(src), str(dst), "--mode", mode, *map(str, flags)],
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def report_of(proc):
    return json.loads(proc.stdout)


def python_cosine(original, compressed, npz_files):
    """The agreement recomputed with Python's ONNX Runtime, as the report defines it: per output,
    the cosine of all samples' values together; the lowest over outputs."""
    a, b = ort.InferenceSession(str(original)), ort.InferenceSession(str(compressed))
    xs, ys = {}, {}
    for p in npz_files:
        x = dict(np.load(p))
        for i, (ya, yb) in enumerate(zip(a.run(None, x), b.run(None, x))):
            assert ya.dtype == yb.dtype == np.float32, "float32 at the model's boundary"
            xs.setdefault(i, []).append(ya.astype(np.float64).ravel())
            ys.setdefault(i, []).append(yb.astype(np.float64).ravel())
    worst = 1.0
    for i in xs:
        ya, yb = np.concatenate(xs[i]), np.concatenate(ys[i])
        worst = min(worst, float(ya @ yb / np.linalg.norm(ya) / np.linalg.norm(yb)))
    return worst


def eval_flags(files):
    return [f for p in files for f in ("--eval-inputs", p)]


@pytest.mark.parametrize("model,name,max_ratio", [(REC, "rec", 0.35), (DET, "det", 0.35), (CLS, "cls", 0.60)])
def test_int8_dynamic_shrinks_real_models_and_agrees_on_real_inputs(model, name, max_ratio, inputs, tmp_path):
    # cls is a MobileNet: most of its weights are depthwise filters, which stay float.
    out = tmp_path / "int8.onnx"
    r = report_of(compress(model, out, "int8-dynamic", *eval_flags(inputs[name]), "--check"))
    print(name, json.dumps({k: r[k] for k in ("sizeRatio", "cosine", "top1Agreement", "latency", "nodes")
                            if k in r}))
    assert r["passed"] is True and r["minCosine"] == 0.99
    assert r["sizeRatio"] <= max_ratio, r
    assert r["bytesAfter"] == out.stat().st_size
    assert r["cosine"] >= 0.99, r
    onnx.checker.check_model(onnx.load(out), full_check=True)
    # What the report claims, recomputed independently.
    assert python_cosine(model, out, inputs[name]) == pytest.approx(r["cosine"], abs=1e-4)
    ops = {n.op_type for n in onnx.load(out).graph.node}
    if name == "rec":
        # The attention's projections really run in integers.
        assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops, ops
        assert r["nodes"]["int8Compute"] >= 6
        assert r["top1Agreement"] >= 0.95, "the recognised characters stay the same"
    assert "ConvInteger" not in ops, "Conv weights are stored in int8, computed in float"


def test_int8_dynamic_on_an_fp32_transformer_quarters_it_and_keeps_its_meaning(inputs, tmp_path):
    """all-MiniLM-L6-v2 in FP32 (BERT-style attention, 48 MatMuls) with real sentences."""
    out = tmp_path / "bert-int8.onnx"
    r = report_of(compress(BERT, out, "int8-dynamic", *eval_flags(inputs["bert"]), "--check", "--threads", "2"))
    print("minilm-fp32", json.dumps({k: r[k] for k in ("sizeRatio", "cosine", "latency", "nodes")}))
    assert r["sizeRatio"] <= 0.35 and r["cosine"] >= 0.99, r
    # 36 projections in int8; the 6 FFN down-projections and 3 embedding tables stored in int8.
    assert r["nodes"] == {"int8Compute": 30, "int8WeightOnly": 9}, r["nodes"]
    assert python_cosine(BERT, out, inputs["bert"]) == pytest.approx(r["cosine"], abs=1e-4)
    onnx.checker.check_model(onnx.load(out), full_check=True)
    # --all-integer puts the down-projections in int8 too: smaller error budget, measurably worse.
    worse = report_of(compress(BERT, tmp_path / "all.onnx", "int8-dynamic", "--all-integer", "--timing-runs", "0",
                               *eval_flags(inputs["bert"])))
    assert worse["nodes"]["int8Compute"] == 36 and worse["cosine"] < r["cosine"], worse


@pytest.mark.parametrize("model,name", [(REC, "rec"), (DET, "det"), (CLS, "cls")])
def test_fp16_halves_real_models_keeps_float32_at_the_boundary_and_agrees(model, name, inputs, tmp_path):
    out = tmp_path / "fp16.onnx"
    r = report_of(compress(model, out, "fp16", *eval_flags(inputs[name]), "--check", "--min-cosine", "0.999"))
    print(name, json.dumps({k: r[k] for k in ("sizeRatio", "cosine", "latency", "nodes")}))
    assert r["sizeRatio"] <= 0.55 and r["cosine"] >= 0.999, r
    m = onnx.load(out)
    onnx.checker.check_model(m, full_check=True)
    fp16 = sum(1 for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
    assert fp16 > 20, "weights are float16"
    for v in list(m.graph.input) + list(m.graph.output):
        assert v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, v.name
    assert python_cosine(model, out, inputs[name]) == pytest.approx(r["cosine"], abs=1e-5)
    if name == "det":
        # PP-OCRv4 det holds a BatchNormalization variance of ~1e8, beyond float16: that node
        # stays float32 (saturating it made the output wrong).
        assert r["nodes"]["keptFloat32"] >= 1


def initializers_from_constants(src, dst):
    """ONNX Runtime's quantizer needs weights as initializers; paddle2onnx keeps them in Constant
    nodes. Moved here with onnx's own API (a pure re-encoding, checked below)."""
    m = onnx.load(src)
    keep = []
    for n in m.graph.node:
        if n.op_type == "Constant" and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            m.graph.initializer.append(t)
        else:
            keep.append(n)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    onnx.save(m, dst)


def test_int8_against_onnxruntimes_own_quantizer_on_the_same_models(inputs, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rows = []
    for model, name in ((REC, "rec"), (CLS, "cls"), (BERT, "bert")):
        pre = tmp_path / f"{name}-pre.onnx"
        initializers_from_constants(model, pre)
        assert python_cosine(model, pre, inputs[name]) == pytest.approx(1.0, abs=1e-6)
        # Like for like: MatMul/Gemm only, per-tensor int8 weights, as quantize_dynamic's default.
        ort_mm = tmp_path / f"{name}-ort-matmul.onnx"
        quantize_dynamic(str(pre), str(ort_mm), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        ours_mm = tmp_path / f"{name}-ours-matmul.onnx"
        compress(model, ours_mm, "int8-dynamic", "--exclude", "Conv", "--exclude", "ConvTranspose",
                 "--exclude", "Gather", "--per-tensor", "--all-integer", "--timing-runs", "0",
                 *eval_flags(inputs[name]))
        # Everything each quantizer does by default (ONNX Runtime's includes ConvInteger).
        ort_all = tmp_path / f"{name}-ort-all.onnx"
        quantize_dynamic(str(pre), str(ort_all), weight_type=QuantType.QInt8)
        ours_all = tmp_path / f"{name}-ours-all.onnx"
        compress(model, ours_all, "int8-dynamic", "--timing-runs", "0", *eval_flags(inputs[name]))
        row = {"model": name}
        for label, path in (("ort_matmul", ort_mm), ("ours_matmul", ours_mm), ("ort_all", ort_all),
                            ("ours_all", ours_all)):
            row[label] = (round(path.stat().st_size / pre.stat().st_size, 4),
                          round(python_cosine(pre, path, inputs[name]), 5))
        rows.append(row)
    print(json.dumps(rows, indent=1))
    for row in rows:
        (ort_size, ort_cos), (our_size, our_cos) = row["ort_matmul"], row["ours_matmul"]
        # Same operators quantized: size and accuracy within 5 % of ONNX Runtime's.
        assert abs(our_size - ort_size) <= 0.05 * ort_size, row
        assert abs(our_cos - ort_cos) <= 0.05 * ort_cos, row
        # Defaults: ours keeps Conv in float arithmetic, so it is at least as accurate.
        assert row["ours_all"][1] >= row["ort_all"][1] - 1e-4, row
    bert = next(r for r in rows if r["model"] == "bert")
    assert bert["ours_all"][1] >= 0.99 > bert["ort_all"][1], bert
    rec = next(r for r in rows if r["model"] == "rec")
    # Ours is a little larger by default: depthwise filters stay float (see quantize.rs).
    assert rec["ours_all"][0] <= 1.10 * rec["ort_all"][0], rec


def test_check_rejects_below_min_cosine_and_writes_nothing(tmp_path):
    out = tmp_path / "rejected.onnx"
    report_file = tmp_path / "report.json"
    proc = compress(REC, out, "int8-dynamic", "--check", "--min-cosine", "1.0", "--samples", "2",
                    "--input-shape", "x=1x3x48x160", "--timing-runs", "0", "--report", report_file, check=False)
    assert proc.returncode == 9, proc.stderr
    assert "compression rejected: cosine similarity" in proc.stderr and "under the required 1" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".compress-*")), list(tmp_path.iterdir())
    r = json.loads(report_file.read_text())
    assert r["passed"] is False and r["cosine"] < 1.0 and r["inputs"] == "2 random samples"


def test_random_inputs_follow_the_declared_shapes_and_are_reproducible(tmp_path):
    a = report_of(compress(CLS, tmp_path / "a.onnx", "int8-dynamic", "--timing-runs", "0"))
    b = report_of(compress(CLS, tmp_path / "b.onnx", "int8-dynamic", "--timing-runs", "0"))
    assert a["inputs"] == "4 random samples"
    assert a["outputs"] == b["outputs"], "seeded: the same numbers every run"
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes(), "deterministic output"


def test_prune_reaches_the_sparsity_and_reports_what_it_buys(tmp_path):
    out = tmp_path / "pruned.onnx"
    r = report_of(compress(CLS, out, "prune", "--sparsity", "0.5", "--timing-runs", "3"))
    assert r["nodes"]["zeroPermille"] == 500, r["nodes"]
    before_gz, after_gz = r["gzipBytes"]
    assert after_gz < 0.8 * before_gz, r["gzipBytes"]
    assert r["sizeRatio"] > 0.95, "dense storage: the file itself does not shrink"
    m = onnx.load(out)
    onnx.checker.check_model(m, full_check=True)
    zeros = total = 0
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32 and a.ndim == 4 and a.size >= 128:
            zeros += int((a == 0).sum())
            total += a.size
    assert 0.49 <= zeros / total <= 0.51


def test_external_data_models_compress_and_keep_their_weights_in_a_side_file(tmp_path):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    pre = tmp_path / "pre.onnx"
    initializers_from_constants(CLS, pre)
    m = onnx.load(pre)
    # Only raw_data moves to external files; paddle2onnx stores some weights as float_data.
    for t in m.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
    onnx.save(m, src_dir / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=256)
    assert (src_dir / "weights.bin").stat().st_size > 400_000
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src_dir.iterdir()}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = report_of(compress(src_dir / "model.onnx", out_dir / "model.onnx", "fp16", "--timing-runs", "0"))
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert r["bytesBefore"] == sum(p.stat().st_size for p in src_dir.iterdir())
    onnx.checker.check_model(str(out_dir / "model.onnx"), full_check=True)
    ort.InferenceSession(str(out_dir / "model.onnx"))
    assert r["cosine"] >= 0.999
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src_dir.iterdir()}
    assert before == after, "the original is untouched"


def test_bad_models_get_clear_errors_and_the_original_is_never_overwritten(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01 not protobuf at all \xff" * 10)
    p = compress(junk, tmp_path / "o.onnx", "int8-dynamic", check=False)
    assert p.returncode == 1 and "not an ONNX model" in p.stderr, p.stderr

    # Compressing onto itself is refused before anything is read or written.
    copy = tmp_path / "cls.onnx"
    copy.write_bytes(CLS.read_bytes())
    digest = hashlib.sha256(copy.read_bytes()).hexdigest()
    p = compress(copy, tmp_path / "." / "cls.onnx", "fp16", check=False)
    assert p.returncode == 1 and "the original is never overwritten" in p.stderr, p.stderr
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == digest

    # fp16 refuses control flow, naming the node and its operator.
    body = helper.make_graph([helper.make_node("Identity", ["x_in"], ["x_out"])], "body",
                             [helper.make_tensor_value_info("x_in", onnx.TensorProto.FLOAT, [1])],
                             [helper.make_tensor_value_info("x_out", onnx.TensorProto.FLOAT, [1])])
    g = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], name="branchy", then_branch=body, else_branch=body)], "g",
        [helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.ones(1, np.float32), "x_in")])
    iffy = tmp_path / "if.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), iffy)
    p = compress(iffy, tmp_path / "o2.onnx", "fp16", check=False)
    assert p.returncode == 1 and 'node "branchy" (op If)' in p.stderr, p.stderr

    # Nothing to quantize is an error, not a silent copy.
    p = compress(iffy, tmp_path / "o3.onnx", "int8-dynamic", check=False)
    assert p.returncode == 1 and "no float32 constant weight" in p.stderr, p.stderr
    assert not (tmp_path / "o2.onnx").exists() and not (tmp_path / "o3.onnx").exists()

    # Bad evaluation inputs name the file and the problem.
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK nonsense")
    p = compress(CLS, tmp_path / "o4.onnx", "fp16", "--eval-inputs", bad, check=False)
    assert p.returncode == 1 and "bad.npz" in p.stderr and "npz" in p.stderr, p.stderr


def test_pull_compress_serves_the_compressed_model_and_keeps_the_original(tmp_path):
    root = tmp_path / "pvc"
    (root / "claim").mkdir(parents=True)
    (root / "claim" / "rec.onnx").write_bytes(REC.read_bytes())
    dest = tmp_path / "models" / "rec" / "1" / "model.onnx"
    proc = subprocess.run([str(BINARY), "pull", "pvc://claim/rec.onnx", str(dest), "--pvc-root", str(root),
                           "--termination-log", str(tmp_path / "term"), "--compress", "int8-dynamic"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    version = dest.parent
    record = json.loads((version / "kubemaas-pull.json").read_text())
    c = record["compression"]
    assert c["mode"] == "int8-dynamic" and c["passed"] is True and c["sizeRatio"] <= 0.35, c
    assert dest.stat().st_size == c["bytesAfter"]
    assert (version / ".kubemaas-original" / "model.onnx").read_bytes() == REC.read_bytes()
    assert record["sha256"] == hashlib.sha256(REC.read_bytes()).hexdigest(), "the digest is the download's"
    assert "MatMulInteger" in {n.op_type for n in onnx.load(dest).graph.node}

    # An impossible bar: exit 9 (CompressionRejected) with the numbers in the termination message.
    dest2 = tmp_path / "models2" / "rec" / "1" / "model.onnx"
    proc = subprocess.run([str(BINARY), "pull", "pvc://claim/rec.onnx", str(dest2), "--pvc-root", str(root),
                           "--termination-log", str(tmp_path / "term2"), "--compress", "int8-dynamic",
                           "--min-cosine", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 9, proc.stderr
    message = (tmp_path / "term2").read_text()
    assert "compression rejected: cosine similarity 0.9" in message and "required 1" in message, message
    assert not dest2.exists() and not (dest2.parent / "kubemaas-pull.json").exists(), "nothing is placed"
    assert not (dest2.parent / ".kubemaas-original").exists()
    assert not (dest2.parent / ".kubemaas-compressed").exists()


def test_an_output_named_onto_the_inputs_side_file_or_itself_from_the_working_directory_is_refused(tmp_path):
    """OUT must never replace any file of the original: not the model given as a bare name from its
    own directory, and not its external-data file (OUT.data)."""
    pre = tmp_path / "pre.onnx"
    initializers_from_constants(CLS, pre)
    m = onnx.load(pre)
    for t in m.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
    d = tmp_path / "d"
    d.mkdir()
    onnx.save(m, d / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="w.data", size_threshold=256)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir()}
    for out in ("model.onnx", "w"):  # "w" would write its weights to w.data
        p = subprocess.run([str(BINARY), "compress", "model.onnx", out, "--mode", "fp16", "--timing-runs", "0"],
                           capture_output=True, text=True, timeout=300, cwd=d)
        assert p.returncode == 1, (out, p.stderr)
        assert "the original is never overwritten" in p.stderr, p.stderr
        after = {q.name: hashlib.sha256(q.read_bytes()).hexdigest() for q in d.iterdir()}
        assert after == before, f"OUT {out!r} changed the original's files"


def test_fp16_keeps_shape_arithmetic_exact(tmp_path):
    """Sizes computed in float (Shape -> Cast -> Mul -> ...) must not round to float16: 4097 is not a
    float16 number. The check's random inputs (32 wide) cannot see it; a serving request can."""
    g = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["s"]),
         helper.make_node("Cast", ["s"], ["sf"], to=onnx.TensorProto.FLOAT),
         helper.make_node("Mul", ["sf", "one"], ["size"]),
         helper.make_node("Mul", ["x", "w"], ["h"]),
         helper.make_node("ReduceSum", ["h"], ["y"], keepdims=0)], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, "w"])],
        [helper.make_tensor_value_info("size", onnx.TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [])],
        [numpy_helper.from_array(np.ones(1, np.float32), "one"),
         numpy_helper.from_array(np.ones((1, 1), np.float32), "w")])
    src = tmp_path / "shape.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), src)
    out = tmp_path / "shape16.onnx"
    compress(src, out, "fp16", "--timing-runs", "0", "--input-shape", "x=1x4")
    size, _ = ort.InferenceSession(str(out)).run(None, {"x": np.zeros((4097, 1), np.float32).T})
    assert size.tolist() == [1.0, 4097.0]


def test_an_input_shape_for_no_input_or_of_the_wrong_rank_is_refused_naming_the_inputs(tmp_path):
    # A typo in --input-shape (spec.model.compression.inputShapes) used to be ignored: the input's
    # dynamic dimensions quietly fell back to 1 and 32 and the evaluation measured something else.
    out = tmp_path / "out.onnx"
    for given, says in [("nosuch=1x3x48x192", '"nosuch" names no input of the model; its inputs: "x"'),
                        ("x=1x3x48", 'input "x" has 4 dimensions'),
                        ("x=1x4x48x192", 'dimension 1 of input "x" is fixed at 3')]:
        proc = compress(CLS, out, "int8-dynamic", "--timing-runs", "0", "--input-shape", given, check=False)
        assert proc.returncode != 0 and says in proc.stderr, (given, proc.returncode, proc.stderr)
        assert not out.exists()
