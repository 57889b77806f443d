"""The in-process probe (`server/examples/ort_probe.rs`) that the GPU benchmark runs to decide
whether pinned buffers, I/O binding or CUDA graphs pay. Without a GPU it is checked on the CPU
execution provider: the ways that need no CUDA run the real model and agree with the plain run
bit for bit; the CUDA-only ways, and a CUDA session on a machine without one, say why they
cannot run instead of printing a number."""

import json
import os
import subprocess

import pytest

from conftest import MODELS, ROOT

PROBE = ROOT / "target" / "debug" / "examples" / "ort_probe"
CLS = MODELS / "ocr-cls" / "1" / "model.onnx"


def probe(*args, timeout=120):
    if not PROBE.exists():
        pytest.fail(f"{PROBE} is missing: `make build` builds the examples")
    return subprocess.run([str(PROBE), "--model", str(CLS), *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def test_cpu_dry_run_times_the_real_model_and_the_ways_agree(tmp_path):
    out = tmp_path / "probe.json"
    r = probe("--shape", "3x48x192", "--batches", "1,3", "--ep", "cpu", "--seconds", "0.2",
              "--json", str(out))
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    by = {(row["batch"], row["way"]): row for row in rows}
    assert set(by) == {(b, w) for b in (1, 3) for w in ("plain", "pinned", "device", "graph", "graph-run")}
    for b in (1, 3):
        for way in ("plain", "device"):
            row = by[(b, way)]
            assert row["runs"] > 0 and row["items_per_s"] > 0, row
            # cls answers two class scores per image: every one of them was compared.
            assert row["output_elements"] == 2 * b, row
        # Same session, same CPU kernels: running with the I/O bound must not change a single bit
        # of what the plain run gave (plain against itself would prove nothing, so it is not asked).
        assert by[(b, "device")]["max_abs_diff"] == 0.0, by[(b, "device")]
        for way in ("pinned", "graph", "graph-run"):
            assert "--ep cuda" in by[(b, way)]["error"], by[(b, way)]
    # The table names every way and batch too.
    assert "| 3 | device |" in r.stdout and "pinned memory needs --ep cuda" in r.stdout


def test_cuda_without_a_gpu_fails_with_the_reason():
    r = probe("--shape", "3x48x192", "--batches", "1", "--ep", "cuda", "--seconds", "0.1")
    assert r.returncode == 1, r.stderr
    assert "CUDA" in r.stderr and "panicked" not in r.stderr, r.stderr


@pytest.mark.parametrize("args,rc,words", [
    (["--shape", "3xfortyx192"], 1, ["bad --shape", "3xfortyx192"]),
    (["--shape", "3x0x192"], 1, ["bad --shape", "positive"]),
    (["--shape", "3x48x192", "--batches", "0"], 1, ["batch 0", "empty"]),
    (["--shape", "3x48x192", "--batches", "99999999999"], 1, ["over"]),
    (["--shape", "3x48x192", "--seconds", "0"], 2, ["--seconds", "positive"]),
    (["--shape", "3x48x192", "--seconds", "nan"], 2, ["--seconds", "positive"]),
])
def test_bad_arguments_are_named_not_panicked_on(args, rc, words):
    r = probe("--ep", "cpu", *args)
    assert r.returncode == rc, r.stderr
    assert "panicked" not in r.stderr
    for w in words:
        assert w in r.stderr, r.stderr
