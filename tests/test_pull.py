"""`kubemaas-server pull`: the init-container download with SHA-256 verification, against a real
HTTP server on loopback; the pulled file is then served."""

import hashlib
import http.server
import shutil
import subprocess
import threading

import pytest

from conftest import BINARY, MODELS


@pytest.fixture(scope="module")
def http_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    shutil.copy(MODELS / "ocr-cls" / "1" / "model.onnx", root / "model.onnx")
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def pull(uri, dest, *extra, tmp):
    return subprocess.run([str(BINARY), "pull", uri, str(dest), "--termination-log", str(tmp / "termination"), *extra],
                          capture_output=True, text=True, timeout=120)


def test_pull_over_http_verifies_sha256_and_the_file_serves(http_root, tmp_path):
    root, base = http_root
    digest = hashlib.sha256((root / "model.onnx").read_bytes()).hexdigest()
    dest = tmp_path / "models" / "cls" / "1" / "model.onnx"
    p = pull(f"{base}/model.onnx", dest, "--sha256", digest, tmp=tmp_path)
    assert p.returncode == 0, p.stderr
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == digest
    from conftest import Server
    import requests
    s = Server(["--model-repository", str(tmp_path / "models")], tmp_path / "server.log")
    try:
        assert s.wait_loaded()[0]["state"] == "READY"
        assert requests.get(f"{s.url}/v2/models/cls").json()["inputs"][0]["name"] == "x"
    finally:
        assert s.stop() == 0


def test_checksum_mismatch_exits_3_and_leaves_no_file(http_root, tmp_path):
    _, base = http_root
    dest = tmp_path / "m.onnx"
    p = pull(f"{base}/model.onnx", dest, "--sha256", "0" * 64, tmp=tmp_path)
    assert p.returncode == 3, p.stderr
    assert not dest.exists() and not dest.with_suffix(".partial").exists()
    assert "checksum mismatch" in (tmp_path / "termination").read_text()


def test_http_404_exits_2_with_the_reason(http_root, tmp_path):
    _, base = http_root
    p = pull(f"{base}/missing.onnx", tmp_path / "m.onnx", tmp=tmp_path)
    assert p.returncode == 2
    assert "404" in (tmp_path / "termination").read_text()


def test_pvc_uri_copies_from_the_mounted_claim(http_root, tmp_path):
    root, _ = http_root
    # --pvc-root/<claim>/<path>, as the pod mounts it.
    claim = tmp_path / "pvcs" / "claim"
    claim.mkdir(parents=True)
    shutil.copy(root / "model.onnx", claim / "model.onnx")
    p = pull("pvc://claim/model.onnx", tmp_path / "m.onnx", "--pvc-root", str(tmp_path / "pvcs"), tmp=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "m.onnx").read_bytes() == (root / "model.onnx").read_bytes()


def test_unsupported_scheme_exits_2_and_says_what_works(tmp_path):
    p = pull("s3://bucket/model.onnx", tmp_path / "m.onnx", tmp=tmp_path)
    assert p.returncode == 2
    assert "use http:// or pvc://" in p.stderr
