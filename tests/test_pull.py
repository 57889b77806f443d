"""`kubemaas-server pull`, the model-download init container, against real stores on 127.0.0.1: moto's S3
server with IAM authentication enforced, fake-gcs-server, HTTP/HTTPS file servers with a test CA and
scripted failures, a fake Hugging Face Hub, and a PVC directory. Pulled models are then served by the
real server and answer what ONNX Runtime answers in-process. The servers are in artifact_servers.py."""

import email.utils
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest
import requests

from artifact_servers import FakeGcs, FakeHub, FileServer, MotoS3, TestCA, sha256_hex
from conftest import BINARY, MODELS, Server

MODEL = MODELS / "ocr-cls" / "1" / "model.onnx"
RECORD = "kubemaas-pull.json"
LOCAL = "--allow-private-addresses"  # every pull from 127.0.0.1 over http(s)/hf needs it


# --------------------------------------------------------------------------------------------------
# Helpers


def tree_sha256(root: Path) -> str:
    """The directory digest of the contract: sha256 of `sha256sum`'s output for every file, sorted by
    relative path in byte order (the pull record itself left out)."""
    files = [p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != RECORD]
    lines = [f"{sha256_hex(p.read_bytes())}  {p.relative_to(root).as_posix()}\n"
             for p in sorted(files, key=lambda p: p.relative_to(root).as_posix().encode())]
    return sha256_hex("".join(lines).encode())


def tree_sha256_coreutils(root: Path) -> str:
    """The same digest from the shell pipeline the contract quotes."""
    out = subprocess.run("find . -type f -printf '%P\\n' | LC_ALL=C sort | xargs -d '\\n' sha256sum | sha256sum",
                         shell=True, cwd=root, capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.split()[0]


def tree(root: Path) -> dict:
    """{relative path: bytes} of every file below root, the pull record left out."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and p.relative_to(root).as_posix() != RECORD}


@dataclass
class Pull:
    cmd: list
    returncode: int
    stdout: str
    stderr: str
    termination: str
    seconds: float

    @property
    def record(self) -> dict:
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        assert lines, f"no stdout at all\n{self.explain()}"
        return json.loads(lines[-1])

    def explain(self) -> str:
        return (f"$ {' '.join(self.cmd)}\nexit {self.returncode} after {self.seconds:.1f}s\n"
                f"termination log: {self.termination!r}\nstdout tail: {self.stdout[-1500:]}\n"
                f"stderr tail:\n{self.stderr[-4000:]}")


def assert_ok(p: Pull):
    assert p.returncode == 0, p.explain()


def assert_failed(p: Pull, code: int, dest: Path, *, mentions: str | None = None):
    """Exit `code`, a message in the termination log, and nothing at DEST (nor a partial copy beside it)."""
    assert p.returncode == code, p.explain()
    assert not dest.exists() and not dest.is_symlink(), f"{dest} exists after a failed pull\n{p.explain()}"
    if dest.parent.exists():
        partial = [x.name for x in dest.parent.iterdir() if dest.name in x.name]
        assert not partial, f"partial download left beside DEST: {partial}\n{p.explain()}"
    assert p.termination.strip(), f"empty termination log\n{p.explain()}"
    if mentions is not None:
        assert re.search(mentions, p.termination, re.IGNORECASE), \
            f"termination log does not mention {mentions!r}\n{p.explain()}"


def no_network_prefix() -> list:
    """`unshare --net`: a process in a fresh network namespace (loopback down) cannot reach any address,
    so a test that provokes a connection to a refused address sends no packet anywhere if the guard
    fails; it then sees a connection error (exit 2) instead of the refusal (exit 8)."""
    try:
        ok = subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=10).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        ok = False
    assert ok, "the address-guard tests need `unshare --net` (util-linux, as root) to run without a network"
    return ["unshare", "--net", "--"]


def ort_outputs(model_path: Path, x: np.ndarray) -> dict:
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})))


def assert_serves_like_onnxruntime(repo: Path, name: str, reference_model: Path, log: Path, record=None):
    """Serves `repo` with the real server and compares one KServe V2 inference on `name` with ONNX Runtime
    running `reference_model` in-process. With `record` (the pull's final JSON line), the model metadata
    must report it as `parameters.artifact` (what the operator copies into status.model)."""
    s = Server(["--model-repository", str(repo)], log)
    try:
        index = s.wait_loaded()
        assert [(m["name"], m["state"]) for m in index] == [(name, "READY")], index
        if record is not None:
            meta = requests.get(f"{s.url}/v2/models/{name}/versions/1", timeout=10).json()
            assert meta["parameters"]["artifact"] == record, meta
        x = np.random.default_rng(7).random((2, 3, 48, 192), dtype=np.float32)
        body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
        r = requests.post(f"{s.url}/v2/models/{name}/infer", json=body, timeout=60)
        assert r.status_code == 200, r.text
        (want_name, want), = ort_outputs(reference_model, x).items()
        out, = r.json()["outputs"]
        assert out["name"] == want_name
        np.testing.assert_allclose(np.array(out["data"], dtype=np.float32).reshape(out["shape"]), want,
                                   rtol=1e-5, atol=1e-6)
    finally:
        assert s.stop() == 0, f"server exited non-zero; log at {log}"


# --------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def model_bytes():
    assert MODEL.exists(), f"{MODEL} missing: run scripts/setup.sh --test"
    return MODEL.read_bytes()


@pytest.fixture(scope="module")
def external_model(tmp_path_factory) -> Path:
    """The bundled classifier saved with external data: model.onnx + model.onnx.data.

    Its weights are Constant nodes holding float_data, which onnx never moves out (only raw_data
    initializers are), so they become raw_data initializers first. Integer tensors stay inline
    (int64_data): shape inference must read Reshape's shape, which it cannot from external data."""
    out = tmp_path_factory.mktemp("external")
    m = onnx.load(str(MODEL))
    nodes = []
    for n in m.graph.node:
        if n.op_type == "Constant" and [a.name for a in n.attribute] == ["value"]:
            arr = onnx.numpy_helper.to_array(n.attribute[0].t)
            if arr.dtype.kind == "f":
                m.graph.initializer.append(onnx.numpy_helper.from_array(arr, n.output[0]))
            else:
                m.graph.initializer.append(onnx.helper.make_tensor(
                    n.output[0], onnx.helper.np_dtype_to_tensor_dtype(arr.dtype), arr.shape, arr.ravel().tolist()))
        else:
            nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.save_model(m, str(out / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert (out / "model.onnx.data").stat().st_size > 5 * (out / "model.onnx").stat().st_size
    return out


@pytest.fixture(scope="module")
def big_blob():
    """11 MiB of incompressible bytes: three multipart parts of 5, 5 and 1 MiB."""
    return np.random.default_rng(11).bytes(11 * 1024 * 1024)


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="session")
def metadata_trap():
    """Where every cloud metadata endpoint variable points, so a credential chain that falls back to
    instance metadata talks to 127.0.0.1 (and the test fails) instead of 169.254.169.254."""
    with FileServer(name="metadata-trap") as trap:
        yield trap


@pytest.fixture(autouse=True)
def nothing_asked_the_metadata_trap(metadata_trap):
    metadata_trap.clear()
    yield
    asked = [(r.method, r.path) for r in metadata_trap.requests]
    assert not asked, f"pull asked an instance-metadata endpoint: {asked}"


@pytest.fixture
def run_pull(tmp_path, metadata_trap):
    """run_pull(uri, dest, *flags, env={}, timeout=120, network=True) -> Pull, with a clean environment:
    no AWS/GCP/HF variables or proxies from the caller, a scratch HOME (no ~/.aws), metadata endpoints
    pointed at the trap."""
    logs = tmp_path / "termination-logs"
    logs.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    counter = itertools.count()
    trap = f"127.0.0.1:{metadata_trap.port}"
    drop = ("AWS_", "GOOGLE_", "GCE_", "HF_", "HUGGING", "STORAGE_EMULATOR_HOST")
    proxies = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    base = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k.lower() not in proxies}
    base.update({
        "HOME": str(home),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_METADATA_ENDPOINT": f"http://{trap}",
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://{trap}",
        "GCE_METADATA_HOST": trap,
        "GCE_METADATA_IP": trap,
        "GCE_METADATA_ROOT": trap,
        "NO_PROXY": "*",
    })

    def run(uri, dest, *flags, env=None, timeout=120, network=True) -> Pull:
        term = logs / f"termination-{next(counter)}"
        cmd = [str(BINARY), "pull", uri, str(dest), "--termination-log", str(term), *map(str, flags)]
        if not network:
            cmd = no_network_prefix() + cmd
        e = dict(base)
        e.update(env or {})
        t = time.monotonic()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, stdin=subprocess.DEVNULL)
        took = time.monotonic() - t
        return Pull(cmd, p.returncode, p.stdout, p.stderr, term.read_text() if term.exists() else "", took)

    return run


@pytest.fixture(scope="module")
def s3(model_bytes, external_model, big_blob):
    """moto S3 with IAM auth on; bucket `models` holding a single model, a model with external data, a
    multipart object, and a prefix with a key that climbs out of it."""
    from boto3.s3.transfer import TransferConfig

    with MotoS3() as store:
        c = store.client()
        c.create_bucket(Bucket="models")
        c.put_object(Bucket="models", Key="ocr/model.onnx", Body=model_bytes)
        for f in ("model.onnx", "model.onnx.data"):
            c.put_object(Bucket="models", Key=f"cls/{f}", Body=(external_model / f).read_bytes())
        c.upload_fileobj(io.BytesIO(big_blob), "models", "big/weights.bin",
                         Config=TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20,
                                               use_threads=False))
        c.put_object(Bucket="models", Key="evil/model.onnx", Body=model_bytes)
        c.put_object(Bucket="models", Key="evil/../../escaped.txt", Body=b"outside")
        yield store


@pytest.fixture(scope="module")
def gcs(model_bytes, external_model):
    with FakeGcs() as store:
        store.create_bucket("models")
        store.upload("models", "ocr/model.onnx", model_bytes)
        for f in ("model.onnx", "model.onnx.data"):
            store.upload("models", f"cls/{f}", (external_model / f).read_bytes())
        store.upload("models", "cls/extra/notes.txt", b"pulled from fake-gcs-server\n")
        yield store


@pytest.fixture
def web(ca):
    """An HTTPS file server (certificate from the test CA)."""
    with FileServer(tls=ca, name="https") as s:
        yield s


@pytest.fixture
def plain():
    """A plain HTTP file server."""
    with FileServer(name="http") as s:
        yield s


HUB_REPO = "kubemaas/ocr-cls"


@pytest.fixture
def hub(model_bytes, external_model):
    """A fake Hub with a public repo (LFS files, a nested onnx/ directory, a refs/pr/1 revision), a
    private repo, listings paginated two entries per page."""
    files = {
        "README.md": b"# ocr-cls\n",
        "config.json": b'{"task": "text-direction"}\n',
        "model.onnx": model_bytes,
        "onnx/model.onnx": (external_model / "model.onnx").read_bytes(),
        "onnx/model.onnx.data": (external_model / "model.onnx.data").read_bytes(),
    }
    with FakeHub(page_size=2) as h:
        h.add_repo(HUB_REPO, files, lfs={"model.onnx", "onnx/model.onnx.data"})
        h.add_repo(HUB_REPO, {"config.json": b'{"task": "from pull request 1"}\n', "model.onnx": model_bytes},
                   revision="refs/pr/1", lfs={"model.onnx"})
        h.add_repo("kubemaas/private", {"model.onnx": model_bytes}, private=True, lfs={"model.onnx"})
        h.files = files
        yield h


def hub_env(hub, **extra):
    return {"HF_ENDPOINT": hub.url, **extra}


# --------------------------------------------------------------------------------------------------
# S3 (moto, authentication enforced)


def test_an_s3_object_pulled_with_its_sha256_serves_the_same_answers_as_onnxruntime(
        s3, run_pull, tmp_path, model_bytes):
    dest = tmp_path / "repo" / "ocr" / "1" / "model.onnx"
    p = run_pull("s3://models/ocr/model.onnx", dest, "--sha256", sha256_hex(model_bytes), env=s3.env())
    assert_ok(p)
    assert dest.read_bytes() == model_bytes
    assert_serves_like_onnxruntime(tmp_path / "repo", "ocr", MODEL, tmp_path / "server.log", record=p.record)


def test_s3_and_gcs_keys_with_characters_object_store_would_escape_are_fetched_as_named(
        s3, gcs, run_pull, tmp_path, model_bytes):
    # `~`, `#` and `[` are legal in keys; they were percent-encoded into another key (404).
    c = s3.client()
    c.put_object(Bucket="models", Key="ocr/v1~rc/model.onnx", Body=model_bytes)
    c.put_object(Bucket="models", Key="odd/a#b[1].bin", Body=b"side file")
    c.put_object(Bucket="models", Key="odd/model.onnx", Body=model_bytes)
    gcs.upload("models", "ocr/v1~rc/model.onnx", model_bytes)
    for uri, env in (("s3://models/ocr/v1~rc/model.onnx", s3.env()), ("gs://models/ocr/v1~rc/model.onnx", gcs.env())):
        dest = tmp_path / uri[:2] / "model.onnx"
        p = run_pull(uri, dest, "--sha256", sha256_hex(model_bytes), env=env)
        assert_ok(p)
        assert dest.read_bytes() == model_bytes
    dest = tmp_path / "prefix" / "1"
    p = run_pull("s3://models/odd/", dest, env=s3.env())
    assert_ok(p)
    assert (dest / "a#b[1].bin").read_bytes() == b"side file"


def test_an_s3_prefix_with_external_data_is_pulled_served_and_matches_the_sha256sum_manifest(
        s3, run_pull, tmp_path, external_model):
    digest = tree_sha256(external_model)
    assert digest == tree_sha256_coreutils(external_model)
    dest = tmp_path / "repo" / "cls" / "1"
    p = run_pull("s3://models/cls/", dest, "--sha256", digest, env=s3.env())
    assert_ok(p)
    assert tree(dest) == tree(external_model)
    assert tree_sha256(dest) == digest
    assert p.record["sha256"] == digest and p.record["files"] == 2
    assert_serves_like_onnxruntime(tmp_path / "repo", "cls", MODEL, tmp_path / "server.log", record=p.record)


def test_a_multipart_uploaded_s3_object_is_byte_identical_after_the_pull(s3, run_pull, tmp_path, big_blob):
    etag = s3.client().head_object(Bucket="models", Key="big/weights.bin")["ETag"]
    assert re.fullmatch(r'"[0-9a-f]{32}-3"', etag), f"not a 3-part multipart object: {etag}"
    dest = tmp_path / "weights.bin"
    p = run_pull("s3://models/big/weights.bin", dest, "--sha256", sha256_hex(big_blob), env=s3.env())
    assert_ok(p)
    assert dest.read_bytes() == big_blob
    assert p.record["bytes"] == len(big_blob)


@pytest.mark.parametrize("credentials", ["wrong secret key", "unknown access key id", "wrong session token"])
def test_s3_credentials_the_store_rejects_exit_6(s3, run_pull, tmp_path, credentials):
    if credentials == "wrong secret key":
        env = s3.env(AWS_SECRET_ACCESS_KEY="wrong" + s3.secret_key[5:])
    elif credentials == "unknown access key id":
        env = s3.env(AWS_ACCESS_KEY_ID="AKIA" + "Z" * 16)
    else:
        env = s3.env(**s3.temporary_credentials())
        env["AWS_SESSION_TOKEN"] = "not-the-token-sts-issued"
    dest = tmp_path / "model.onnx"
    assert_failed(run_pull("s3://models/ocr/model.onnx", dest, "--retries", 1, env=env), 6, dest)


def test_s3_temporary_credentials_with_a_session_token_are_accepted(s3, run_pull, tmp_path, model_bytes):
    dest = tmp_path / "model.onnx"
    assert_ok(run_pull("s3://models/ocr/model.onnx", dest, env=s3.env(**s3.temporary_credentials())))
    assert dest.read_bytes() == model_bytes


def test_a_missing_s3_key_exits_5(s3, run_pull, tmp_path):
    dest = tmp_path / "model.onnx"
    assert_failed(run_pull("s3://models/ocr/missing.onnx", dest, env=s3.env()), 5, dest)


def test_an_empty_s3_prefix_exits_5(s3, run_pull, tmp_path):
    dest = tmp_path / "repo" / "none" / "1"
    assert_failed(run_pull("s3://models/nothing-here/", dest, env=s3.env()), 5, dest)


@pytest.mark.parametrize("uri", ["s3://models/ocr/model.onnx", "s3://models/cls/"])
def test_an_s3_checksum_mismatch_exits_3_and_leaves_nothing_at_dest(s3, run_pull, tmp_path, uri):
    dest = tmp_path / "repo" / "m" / "1"
    dest = dest if uri.endswith("/") else dest / "model.onnx"
    p = run_pull(uri, dest, "--sha256", "0" * 64, env=s3.env())
    assert_failed(p, 3, dest, mentions="checksum|sha-?256")


def test_s3_credentials_come_from_the_credentials_file_in_the_credentials_dir(s3, run_pull, tmp_path, model_bytes):
    creds = tmp_path / "secret"
    creds.mkdir()
    (creds / "credentials").write_text(
        f"[default]\naws_access_key_id = {s3.access_key}\naws_secret_access_key = {s3.secret_key}\n")
    dest = tmp_path / "model.onnx"
    env = s3.env(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None)
    p = run_pull("s3://models/ocr/model.onnx", dest, "--credentials-dir", creds, env=env)
    assert_ok(p)
    assert dest.read_bytes() == model_bytes


def test_s3_credentials_come_from_the_named_profile_of_a_shared_credentials_file(s3, run_pull, tmp_path, model_bytes):
    shared = tmp_path / "aws-credentials"
    shared.write_text(f"[default]\naws_access_key_id = AKIAZZZZZZZZZZZZZZZZ\naws_secret_access_key = nope\n\n"
                      f"[models]\naws_access_key_id = {s3.access_key}\naws_secret_access_key = {s3.secret_key}\n")
    env = s3.env(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None, AWS_SHARED_CREDENTIALS_FILE=str(shared),
                 AWS_PROFILE="models")
    dest = tmp_path / "model.onnx"
    assert_ok(run_pull("s3://models/ocr/model.onnx", dest, env=env))
    assert dest.read_bytes() == model_bytes


def test_an_s3_prefix_listing_a_key_that_climbs_out_is_refused_and_writes_nothing_outside(s3, run_pull, tmp_path):
    dest = tmp_path / "a" / "b" / "dest"
    p = run_pull("s3://models/evil/", dest, env=s3.env())
    assert_failed(p, 2, dest)
    assert not [x for x in tmp_path.rglob("escaped.txt")], "a listed key with .. was written outside DEST"


def s3_on(server) -> dict:
    """The environment that points pull's S3 client at a recording server, with a made-up key."""
    return {"AWS_ENDPOINT_URL": server.url, "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEEXAMPLE12", "AWS_SECRET_ACCESS_KEY": "x",
            "AWS_REGION": "us-east-1"}


@pytest.mark.parametrize("configured", [None, "us-east-1"])
def test_a_bucket_in_another_region_is_followed_there_as_the_aws_tools_do(plain, run_pull, tmp_path, model_bytes,
                                                                          configured):
    # S3 answers a request signed for the wrong region with 301 PermanentRedirect and the bucket's
    # region (x-amz-bucket-region). The AWS CLI and boto3 go on in that region; a pull retried the
    # same refusal for 15 s and failed with "301 Moved Permanently".
    plain.route("/models/ocr/model.onnx", body=model_bytes, s3_region="eu-west-1")
    plain.route("/models", s3_region="eu-west-1")  # the bucket: HEAD tells its region, signed or not
    env = s3_on(plain)
    if configured is None:
        del env["AWS_REGION"]
    else:
        env["AWS_REGION"] = configured
    dest = tmp_path / "model.onnx"
    p = run_pull("s3://models/ocr/model.onnx", dest, LOCAL, "--sha256", sha256_hex(model_bytes), env=env, timeout=60)
    assert_ok(p)
    assert dest.read_bytes() == model_bytes
    assert p.seconds < 10, p.explain()
    signed = [r for r in plain.requests if r.status != 301]
    assert signed and all("/eu-west-1/s3/aws4_request" in r.header("authorization") for r in signed)
    assert "eu-west-1" in p.stderr, p.explain()


def test_a_bucket_in_another_region_that_does_not_say_which_fails_at_once_saying_what_to_set(
        plain, run_pull, tmp_path, model_bytes):
    plain.route("/models/ocr/model.onnx", body=model_bytes, s3_region="eu-west-1")
    dest = tmp_path / "model.onnx"
    p = run_pull("s3://models/ocr/model.onnx", dest, LOCAL, env=s3_on(plain), timeout=60)
    assert_failed(p, 2, dest, mentions="set AWS_REGION")
    assert p.seconds < 10, p.explain()
    assert len([r for r in plain.requests if r.route == "/models/ocr/model.onnx"]) == 1


def test_an_s3_compatible_store_addressed_by_virtual_host_when_asked(plain, run_pull, tmp_path, model_bytes):
    # AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true: the endpoint is the bucket's own address and keys are
    # paths below it (stores that refuse path-style); it was overridden to path-style.
    plain.route("/ocr/model.onnx", body=model_bytes)
    env = {**s3_on(plain), "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "true"}
    dest = tmp_path / "model.onnx"
    p = run_pull("s3://models/ocr/model.onnx", dest, LOCAL, "--retries", 0, env=env)
    assert_ok(p)
    assert dest.read_bytes() == model_bytes
    assert all(not r.path.startswith("/models") for r in plain.requests), [r.path for r in plain.requests]


@pytest.mark.parametrize("uri", ["s3://models/ocr/../../etc/passwd", "s3://models//etc/passwd",
                                 "gs://models/ocr/../../etc/passwd", "hf://kubemaas/ocr-cls/../../etc/passwd",
                                 "pvc://claim/../../etc/passwd", "{plain}/models/../../etc/passwd"])
def test_a_path_climbing_out_is_refused_before_any_request(run_pull, tmp_path, plain, uri):
    """Every store endpoint points at a recording server: a refused URI never reaches it."""
    uri = uri.format(plain=plain.url)
    env = {**s3_on(plain), "STORAGE_EMULATOR_HOST": plain.url, "HF_ENDPOINT": plain.url}
    pvcs = tmp_path / "pvcs"
    (pvcs / "claim").mkdir(parents=True)
    dest = tmp_path / "out" / "passwd"
    p = run_pull(uri, dest, LOCAL, "--pvc-root", pvcs, "--retries", 0, env=env)
    assert_failed(p, 2, dest)
    assert plain.requests == [], [r.path for r in plain.requests]


# --------------------------------------------------------------------------------------------------
# GCS (fake-gcs-server through STORAGE_EMULATOR_HOST)


def test_a_gcs_object_is_pulled_from_the_emulator(gcs, run_pull, tmp_path, model_bytes):
    dest = tmp_path / "model.onnx"
    p = run_pull("gs://models/ocr/model.onnx", dest, "--sha256", sha256_hex(model_bytes), env=gcs.env())
    assert_ok(p)
    assert dest.read_bytes() == model_bytes


def test_a_gcs_prefix_is_pulled_into_a_directory_with_its_relative_paths(gcs, run_pull, tmp_path, external_model):
    dest = tmp_path / "repo" / "cls" / "1"
    p = run_pull("gs://models/cls/", dest, env=gcs.env())
    assert_ok(p)
    want = tree(external_model) | {"extra/notes.txt": b"pulled from fake-gcs-server\n"}
    assert tree(dest) == want
    assert p.record["files"] == 3 and p.record["sha256"] == tree_sha256(dest)


def test_a_missing_gcs_object_exits_5(gcs, run_pull, tmp_path):
    dest = tmp_path / "model.onnx"
    assert_failed(run_pull("gs://models/ocr/missing.onnx", dest, env=gcs.env()), 5, dest)


# The S3 console's "Create folder" and the GCS console leave a 0-byte object named `folder/`.
@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_folder_objects_the_consoles_create_are_skipped_in_a_prefix(
        scheme, request, run_pull, tmp_path, model_bytes, external_model):
    store = request.getfixturevalue("s3" if scheme == "s3" else "gcs")
    onnx = (external_model / "model.onnx").read_bytes()
    objects = {f"{scheme}-folders/": b"", f"{scheme}-folders/onnx/": b"",
               f"{scheme}-folders/onnx/model.onnx": onnx, f"{scheme}-folders/model.onnx": model_bytes,
               f"{scheme}-only-folders/": b"", f"{scheme}-only-folders/sub/": b""}
    for key, body in objects.items():
        if scheme == "s3":
            store.client().put_object(Bucket="models", Key=key, Body=body)
        else:
            store.upload("models", key, body)
    dest = tmp_path / "repo" / "m" / "1"
    p = run_pull(f"{scheme}://models/{scheme}-folders/", dest, env=store.env())
    assert_ok(p)
    assert tree(dest) == {"model.onnx": model_bytes, "onnx/model.onnx": onnx}
    assert p.record["files"] == 2
    # A prefix holding folders and no file has nothing to download.
    empty = tmp_path / "repo" / "empty" / "1"
    assert_failed(run_pull(f"{scheme}://models/{scheme}-only-folders/", empty, env=store.env()), 5, empty,
                  mentions="no files")


# --------------------------------------------------------------------------------------------------
# HTTP and HTTPS


def test_https_with_the_test_ca_in_ca_file_downloads_the_file(web, ca, run_pull, tmp_path, model_bytes):
    web.route("/model.onnx", body=model_bytes)
    dest = tmp_path / "model.onnx"
    p = run_pull(web.url_for("/model.onnx"), dest, LOCAL, "--ca-file", ca.ca_file, "--sha256", sha256_hex(model_bytes))
    assert_ok(p)
    assert dest.read_bytes() == model_bytes


def test_https_without_the_ca_file_fails_with_a_certificate_error(web, run_pull, tmp_path, model_bytes):
    web.route("/model.onnx", body=model_bytes)
    dest = tmp_path / "model.onnx"
    p = run_pull(web.url_for("/model.onnx"), dest, LOCAL, "--retries", 0)
    assert_failed(p, 2, dest, mentions="certificate")
    assert web.gets("/model.onnx") == [], "a request went through an unverified TLS connection"


def test_a_redirect_chain_is_followed_and_authorization_is_dropped_when_the_host_changes(
        web, ca, run_pull, tmp_path, model_bytes):
    with FileServer(tls=ca, name="other-host") as other:
        other.route("/final/model.onnx", body=model_bytes)
        web.route("/start", redirect="/hop")  # relative, same host
        web.route("/hop", redirect=other.url_for("/final/model.onnx", host="localhost"), redirect_status=307)
        token = tmp_path / "token"
        token.write_text("chain-token\n")
        dest = tmp_path / "model.onnx"
        p = run_pull(web.url_for("/start"), dest, LOCAL, "--ca-file", ca.ca_file, "--bearer-token-file", token,
                     "--resolve", "localhost=127.0.0.1")
        assert_ok(p)
        assert dest.read_bytes() == model_bytes
        assert [r.header("authorization") for r in web.gets("/start") + web.gets("/hop")] == ["Bearer chain-token"] * 2
        final = other.gets("/final/model.onnx")
        assert final and all(r.header("authorization") is None for r in final), \
            [r.header("authorization") for r in final]


def test_a_redirect_from_https_to_plain_http_is_refused(web, plain, ca, run_pull, tmp_path, model_bytes):
    plain.route("/model.onnx", body=model_bytes)
    web.route("/model.onnx", redirect=plain.url_for("/model.onnx"))
    dest = tmp_path / "model.onnx"
    p = run_pull(web.url_for("/model.onnx"), dest, LOCAL, "--ca-file", ca.ca_file, "--retries", 0)
    assert_failed(p, 2, dest)
    assert plain.requests == []


def test_more_than_ten_redirects_are_not_followed(plain, run_pull, tmp_path, model_bytes):
    for i in range(15):
        plain.route(f"/r{i}", redirect=f"/r{i + 1}")
    plain.route("/r15", body=model_bytes)
    dest = tmp_path / "model.onnx"
    p = run_pull(plain.url_for("/r0"), dest, LOCAL, "--retries", 0)
    assert_failed(p, 2, dest)
    asked = {r.route for r in plain.requests}
    assert "/r10" in asked and "/r11" not in asked, sorted(asked)


def test_a_redirect_to_a_refused_address_is_refused_at_that_hop(plain, run_pull, tmp_path, model_bytes):
    # 0.0.0.0 (unspecified) stays refused with --allow-private-addresses; on Linux it would reach this host.
    plain.route("/model.onnx", redirect=f"http://0.0.0.0:{plain.port}/elsewhere.onnx")
    plain.route("/elsewhere.onnx", body=model_bytes)
    dest = tmp_path / "model.onnx"
    p = run_pull(plain.url_for("/model.onnx"), dest, LOCAL, "--retries", 0)
    assert_failed(p, 8, dest, mentions=r"0\.0\.0\.0")
    assert plain.gets("/elsewhere.onnx") == []


def test_a_dropped_connection_resumes_with_a_range_request(web, ca, run_pull, tmp_path):
    body = np.random.default_rng(5).bytes(3 << 20)
    cut = 1_000_000
    route = web.route("/weights.bin", body=body, drop_after=cut)
    dest = tmp_path / "weights.bin"
    p = run_pull(web.url_for("/weights.bin"), dest, LOCAL, "--ca-file", ca.ca_file, "--retries", 3,
                 "--sha256", sha256_hex(body))
    assert_ok(p)
    assert dest.read_bytes() == body
    first, second, *rest = web.gets("/weights.bin")
    assert first.header("range") is None and first.sent == cut
    assert second.header("range") == f"bytes={cut}-", second.headers
    assert second.header("if-range") == route.etag_value()
    assert second.status == 206 and rest == []


def test_a_resume_answered_with_200_restarts_from_zero(plain, run_pull, tmp_path):
    body = np.random.default_rng(6).bytes(2 << 20)
    plain.route("/weights.bin", body=body, drop_after=700_000, ranges=False)
    dest = tmp_path / "weights.bin"
    p = run_pull(plain.url_for("/weights.bin"), dest, LOCAL, "--retries", 3)
    assert_ok(p)
    assert dest.read_bytes() == body
    gets = plain.gets("/weights.bin")
    assert len(gets) == 2 and gets[1].status == 200, [(g.header("range"), g.status) for g in gets]
    assert p.record["bytes"] == len(body)


def test_an_object_changed_between_attempts_is_downloaded_again_from_zero(plain, run_pull, tmp_path):
    """The retry carries If-Range with the first ETag; the server's content changed, so it answers 200
    with the new content, which must replace (not extend) what the first attempt wrote."""
    old, new = np.random.default_rng(9).bytes(2 << 20), np.random.default_rng(10).bytes(2 << 20)
    route = plain.route("/weights.bin", body=old, drop_after=600_000, changed_body=new)
    dest = tmp_path / "weights.bin"
    p = run_pull(plain.url_for("/weights.bin"), dest, LOCAL, "--retries", 3, "--sha256", sha256_hex(new))
    assert_ok(p)
    assert dest.read_bytes() == new
    first, second = plain.gets("/weights.bin")
    assert second.header("if-range") == route.etag_value(old) and second.status == 200


def test_a_resumed_range_of_a_changed_object_from_a_server_ignoring_if_range_is_not_spliced(
        plain, run_pull, tmp_path):
    # A server (or cache) that ignores If-Range answers 206 with bytes of the new version: its ETag
    # says so, and the file must start again rather than join two versions (no --sha256 here to
    # catch it afterwards).
    old, new = np.random.default_rng(11).bytes(2 << 20), np.random.default_rng(12).bytes(2 << 20)
    plain.route("/weights.bin", body=old, drop_after=600_000, changed_body=new, if_range=False)
    dest = tmp_path / "weights.bin"
    p = run_pull(plain.url_for("/weights.bin"), dest, LOCAL, "--retries", 3)
    assert_ok(p)
    assert dest.read_bytes() == new
    assert [g.status for g in plain.gets("/weights.bin")] == [200, 206, 200]


@pytest.mark.parametrize("status,code", [(404, 5), (403, 6), (401, 6)])
def test_an_http_client_error_maps_to_its_exit_code_without_retrying(plain, run_pull, tmp_path, status, code):
    plain.route("/model.onnx", status=status)
    dest = tmp_path / "model.onnx"
    p = run_pull(plain.url_for("/model.onnx"), dest, LOCAL, "--retries", 3)
    assert_failed(p, code, dest, mentions=str(status))
    methods = [r.method for r in plain.requests]
    assert methods and len(methods) == len(set(methods)), f"retried: {methods}"


def test_two_503_answers_then_200_succeed_with_three_retries(plain, run_pull, tmp_path, model_bytes):
    plain.route("/model.onnx", body=model_bytes, fail_first=[503, 503])
    dest = tmp_path / "model.onnx"
    p = run_pull(plain.url_for("/model.onnx"), dest, LOCAL, "--retries", 3)
    assert_ok(p)
    assert dest.read_bytes() == model_bytes
    assert [r.status for r in plain.gets("/model.onnx")] == [503, 503, 200]


def test_500_429_and_408_are_retried_as_transient(plain, run_pull, tmp_path, model_bytes):
    plain.route("/model.onnx", body=model_bytes, fail_first=[500, 429, 408])
    dest = tmp_path / "model.onnx"
    assert_ok(run_pull(plain.url_for("/model.onnx"), dest, LOCAL, "--retries", 3))
    assert [r.status for r in plain.gets("/model.onnx")] == [500, 429, 408, 200]


def test_a_busy_server_s_retry_after_is_waited_out_in_seconds_or_as_a_date(plain, run_pull, tmp_path, model_bytes):
    # A 429 or 503 that says when to come back (Retry-After: seconds, or an HTTP date) is retried no
    # sooner; the backoff alone would have come back after 0.5 s and then 1 s, into the same refusal.
    start = time.monotonic()
    date = email.utils.formatdate(time.time() + 7, usegmt=True)
    plain.route("/model.onnx", body=model_bytes,
                fail_first=[(429, {"Retry-After": "3"}), (503, {"Retry-After": date})])
    dest = tmp_path / "model.onnx"
    p = run_pull(plain.url_for("/model.onnx"), dest, LOCAL, "--retries", 3, timeout=60)
    assert_ok(p)
    assert dest.read_bytes() == model_bytes
    first, second, third = plain.gets("/model.onnx")
    assert [first.status, second.status, third.status] == [429, 503, 200]
    assert second.at - first.at >= 2.9, second.at - first.at
    # The date has whole seconds: it was at least 6 s after the start.
    assert third.at - start >= 5.9, third.at - start


def test_a_hub_listing_s_retry_after_is_waited_out(plain, run_pull, tmp_path, model_bytes):
    listing = json.dumps([{"type": "file", "path": "model.onnx", "size": len(model_bytes)}]).encode()
    plain.route("/api/models/o/r/tree/main", body=listing, fail_first=[(429, {"Retry-After": "2"})])
    plain.route("/o/r/resolve/main/model.onnx", body=model_bytes)
    dest = tmp_path / "snapshot"
    p = run_pull("hf://o/r", dest, LOCAL, "--retries", 2, env={"HF_ENDPOINT": plain.url}, timeout=60)
    assert_ok(p)
    first, second = plain.gets("/api/models/o/r/tree/main")
    assert second.at - first.at >= 1.9, second.at - first.at


def test_a_retry_after_beyond_the_timeout_fails_at_once_saying_so(plain, run_pull, tmp_path):
    # Waiting an hour inside a 20 s --timeout helps nobody: it fails now, and says what was asked.
    plain.route("/model.onnx", body=b"x", fail_first=[(503, {"Retry-After": "3600"})])
    dest = tmp_path / "model.onnx"
    p = run_pull(plain.url_for("/model.onnx"), dest, LOCAL, "--retries", 3, "--timeout", 20, timeout=60)
    assert_failed(p, 2, dest, mentions="Retry-After")
    assert p.seconds < 10, p.explain()
    assert len(plain.gets("/model.onnx")) == 1


def test_a_server_error_outlasting_the_retries_exits_2_after_retries_plus_one_attempts(plain, run_pull, tmp_path):
    plain.route("/model.onnx", status=503)
    dest = tmp_path / "model.onnx"
    p = run_pull(plain.url_for("/model.onnx"), dest, LOCAL, "--retries", 2)
    assert_failed(p, 2, dest, mentions="503")
    assert len(plain.gets("/model.onnx")) == 3


def test_a_stalled_body_fails_after_the_read_timeout(plain, run_pull, tmp_path, model_bytes):
    plain.route("/model.onnx", body=model_bytes, stall_after=0)
    dest = tmp_path / "model.onnx"
    p = run_pull(plain.url_for("/model.onnx"), dest, LOCAL, "--read-timeout", 1, "--retries", 1, timeout=60)
    assert_failed(p, 2, dest)
    assert p.seconds < 10, p.explain()
    assert len(plain.gets("/model.onnx")) == 2  # a read timeout is transient: retried once


def test_bytes_fetched_again_from_the_start_are_not_progress_that_renews_the_retries(
        plain, run_pull, tmp_path, model_bytes):
    # A store that cannot resume and stalls at the same place every time: each retry starts from
    # byte 0 and gets no further, so --retries 1 means two attempts, not a loop until --timeout.
    plain.route("/model.onnx", body=model_bytes, stall_after=100_000, ranges=False)
    dest = tmp_path / "model.onnx"
    p = run_pull(plain.url_for("/model.onnx"), dest, LOCAL, "--read-timeout", 1, "--retries", 1,
                 "--timeout", 30, timeout=60)
    assert_failed(p, 2, dest, mentions="gave up after 1 retries")
    assert len(plain.gets("/model.onnx")) == 2, p.explain()


def test_an_error_page_is_read_only_as_far_as_its_message_needs(plain, run_pull, tmp_path):
    # The first line of a plain error answer goes into the message; the whole body was read into
    # memory first, however large (an init container has a memory limit).
    page = b"upstream says no\n" + b"x" * (64 << 20)
    plain.route("/model.onnx", status=500, error_body=page)
    dest = tmp_path / "model.onnx"
    p = run_pull(plain.url_for("/model.onnx"), dest, LOCAL, "--retries", 0, timeout=60)
    assert_failed(p, 2, dest, mentions="upstream says no")
    sent = [r.sent for r in plain.gets("/model.onnx")]
    assert sent and all(n < len(page) for n in sent), (sent, len(page))


def test_a_listing_page_past_16_mib_is_refused_not_held(plain, run_pull, tmp_path):
    # A Hub page lists a few hundred files in a few hundred KB; a larger answer is not a listing.
    plain.route("/api/models/o/r/tree/main", body=b"[" + b" " * (17 << 20) + b"]")
    dest = tmp_path / "snapshot"
    p = run_pull("hf://o/r", dest, LOCAL, "--retries", 0, env={"HF_ENDPOINT": plain.url})
    assert_failed(p, 2, dest, mentions="larger than 16 MiB")


def test_the_overall_timeout_ends_a_stalled_download(plain, run_pull, tmp_path, model_bytes):
    plain.route("/model.onnx", body=model_bytes, stall_after=4096)
    dest = tmp_path / "model.onnx"
    p = run_pull(plain.url_for("/model.onnx"), dest, LOCAL, "--timeout", 2, "--read-timeout", 60, timeout=60)
    assert_failed(p, 2, dest)
    assert p.seconds < 10, p.explain()


def test_max_bytes_smaller_than_content_length_exits_7_before_reading_the_body(plain, run_pull, tmp_path):
    # The body never comes: a pull that waited for it would run into the read timeout (exit 2).
    plain.route("/model.onnx", body=b"\0" * (10 << 20), stall_after=0)
    dest = tmp_path / "model.onnx"
    p = run_pull(plain.url_for("/model.onnx"), dest, LOCAL, "--max-bytes", 1000, "--read-timeout", 20, timeout=60)
    assert_failed(p, 7, dest)
    assert p.seconds < 10, p.explain()


@pytest.mark.parametrize("length", ["chunked", "close"])
def test_max_bytes_without_content_length_exits_7_once_the_limit_is_passed(plain, run_pull, tmp_path, length):
    body = np.random.default_rng(8).bytes(2 << 20)
    plain.route("/weights.bin", body=body, length=length)
    dest = tmp_path / "weights.bin"
    p = run_pull(plain.url_for("/weights.bin"), dest, LOCAL, "--max-bytes", 1 << 20)
    assert_failed(p, 7, dest)


@pytest.mark.parametrize("length", ["content-length", "chunked"])
def test_max_bytes_equal_to_the_size_is_accepted(plain, run_pull, tmp_path, model_bytes, length):
    plain.route("/model.onnx", body=model_bytes, length=length)
    dest = tmp_path / "model.onnx"
    assert_ok(run_pull(plain.url_for("/model.onnx"), dest, LOCAL, "--max-bytes", len(model_bytes)))
    assert dest.read_bytes() == model_bytes


def test_the_bearer_token_file_is_sent_as_an_authorization_header(web, ca, run_pull, tmp_path, model_bytes):
    web.route("/model.onnx", body=model_bytes, token="file-token")
    token = tmp_path / "token-file"
    token.write_text("  file-token\n")
    dest = tmp_path / "model.onnx"
    assert_ok(run_pull(web.url_for("/model.onnx"), dest, LOCAL, "--ca-file", ca.ca_file, "--bearer-token-file", token))
    assert dest.read_bytes() == model_bytes
    assert [r.header("authorization") for r in web.gets("/model.onnx")] == ["Bearer file-token"]


def test_the_token_in_the_credentials_dir_is_sent_to_an_http_server(plain, run_pull, tmp_path, model_bytes):
    plain.route("/model.onnx", body=model_bytes, token="dir-token")
    creds = tmp_path / "secret"
    creds.mkdir()
    (creds / "token").write_text("dir-token\n")
    dest = tmp_path / "model.onnx"
    assert_ok(run_pull(plain.url_for("/model.onnx"), dest, LOCAL, "--credentials-dir", creds))
    assert dest.read_bytes() == model_bytes


def test_proxy_variables_are_ignored_so_the_guard_sees_the_real_destination(plain, run_pull, tmp_path, model_bytes):
    # A proxy would connect on pull's behalf, out of the address guard's sight: none is used.
    plain.route("/model.onnx", body=model_bytes)
    with FileServer(name="proxy") as proxy:
        env = {k: proxy.url for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")}
        dest = tmp_path / "model.onnx"
        p = run_pull(plain.url_for("/model.onnx"), dest, LOCAL, env=env)
        assert_ok(p)
        assert dest.read_bytes() == model_bytes
        assert proxy.requests == [], proxy.requests
        assert len(plain.gets("/model.onnx")) == 1


def test_plain_loopback_without_allow_private_addresses_exits_8(plain, run_pull, tmp_path, model_bytes):
    plain.route("/model.onnx", body=model_bytes)
    dest = tmp_path / "model.onnx"
    p = run_pull(plain.url_for("/model.onnx"), dest, "--retries", 0)
    assert_failed(p, 8, dest, mentions=r"127\.0\.0\.1")
    assert plain.requests == []


@pytest.mark.parametrize("uri,flags,address", [
    ("http://metadata.test/model.onnx", ["--resolve", "metadata.test=169.254.169.254"], "169.254.169.254"),
    ("http://169.254.169.254/latest/meta-data/", [], "169.254.169.254"),
    ("http://[fd00:ec2::254]/latest/meta-data/", [], "fd00:ec2::254"),
    ("http://100.100.100.200/latest/meta-data/", [], "100.100.100.200"),
    ("http://[fe80::1]/model.onnx", [], "fe80::1"),
])
def test_metadata_and_link_local_addresses_exit_8_without_connecting(run_pull, tmp_path, uri, flags, address):
    """Run without a network: were the guard missing, the connection would fail (exit 2) instead."""
    dest = tmp_path / "model.onnx"
    p = run_pull(uri, dest, LOCAL, *flags, "--connect-timeout", 2, "--retries", 0, timeout=60, network=False)
    assert_failed(p, 8, dest, mentions=re.escape(address))
    assert p.seconds < 10, p.explain()


# --------------------------------------------------------------------------------------------------
# Hugging Face Hub


def test_a_whole_hf_repository_is_pulled_into_a_directory(hub, run_pull, tmp_path):
    dest = tmp_path / "repo" / "ocr" / "1"
    p = run_pull(f"hf://{HUB_REPO}", dest, LOCAL, env=hub_env(hub))
    assert_ok(p)
    assert tree(dest) == hub.files
    assert p.record["files"] == len(hub.files) and p.record["sha256"] == tree_sha256(dest)
    # the LFS files came from the second server, through the Hub's 302
    lfs = {f"/repos/{HUB_REPO}/{sha256_hex(hub.files[f])}" for f in ("model.onnx", "onnx/model.onnx.data")}
    assert {r.route for r in hub.lfs.requests if r.method == "GET"} == lfs


def test_the_hf_tree_listing_follows_every_pagination_link(hub, run_pull, tmp_path):
    dest = tmp_path / "snapshot"
    assert_ok(run_pull(f"hf://{HUB_REPO}", dest, LOCAL, env=hub_env(hub)))
    listings = hub.listing_requests(HUB_REPO)
    # 5 files + 1 directory, 2 per page: 3 pages
    assert len(listings) == 3, [r.path for r in listings]
    assert [r.query.get("cursor") for r in listings] == [None, "2", "4"]
    assert all(r.query.get("recursive") == "true" for r in listings)
    assert tree(dest) == hub.files


def test_a_listing_refused_for_now_is_retried_like_a_download(plain, run_pull, tmp_path, model_bytes):
    # The Hub answers 429 or 503 under load; the listing failed at once, whatever --retries said.
    listing = json.dumps([{"type": "file", "path": "model.onnx", "size": len(model_bytes)}]).encode()
    plain.route("/api/models/o/r/tree/main", body=listing, fail_first=[503, 429])
    plain.route("/o/r/resolve/main/model.onnx", body=model_bytes)
    dest = tmp_path / "snapshot"
    p = run_pull("hf://o/r", dest, LOCAL, "--retries", 3, env={"HF_ENDPOINT": plain.url})
    assert_ok(p)
    assert (dest / "model.onnx").read_bytes() == model_bytes
    assert len(plain.gets("/api/models/o/r/tree/main")) == 3
    # And the budget holds: with one retry, two refusals fail the pull.
    plain.route("/api/models/o/r/tree/main", body=listing, fail_first=[503, 503])
    dest = tmp_path / "again"
    p = run_pull("hf://o/r", dest, LOCAL, "--retries", 1, env={"HF_ENDPOINT": plain.url})
    assert_failed(p, 2, dest, mentions="gave up after 1 retries")


def pull_past_a_stall(run_pull, uri, dest, env):
    """Pulls with a 1 s read timeout and two retries, well inside --timeout: it must succeed in
    seconds, so a stalled request was given up and retried, not waited out."""
    p = run_pull(uri, dest, LOCAL, "--read-timeout", 1, "--retries", 2, "--timeout", 30, env=env, timeout=60)
    assert_ok(p)
    assert p.seconds < 10, p.explain()


def test_a_listing_that_never_answers_is_retried_after_the_read_timeout(plain, run_pull, tmp_path, model_bytes):
    # A Hub listing accepted and never answered hung the pull until --timeout; a stalled
    # listing is a stalled read like any other, retried on a new connection.
    listing = json.dumps([{"type": "file", "path": "model.onnx", "size": len(model_bytes)}]).encode()
    plain.route("/api/models/o/r/tree/main", body=listing, fail_first=["stall"])
    plain.route("/o/r/resolve/main/model.onnx", body=model_bytes)
    dest = tmp_path / "snapshot"
    pull_past_a_stall(run_pull, "hf://o/r", dest, {"HF_ENDPOINT": plain.url})
    assert (dest / "model.onnx").read_bytes() == model_bytes
    assert len(plain.gets("/api/models/o/r/tree/main")) == 2


def test_an_s3_listing_that_never_answers_is_retried_after_the_read_timeout(plain, run_pull, tmp_path, model_bytes):
    # The same through object_store, against a recording server speaking just enough S3.
    listing = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>models</Name>'
        '<Prefix>ocr/</Prefix><KeyCount>1</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>'
        f'<Contents><Key>ocr/model.onnx</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified>'
        f'<ETag>"e"</ETag><Size>{len(model_bytes)}</Size><StorageClass>STANDARD</StorageClass></Contents>'
        '</ListBucketResult>').encode()
    plain.route("/models", body=listing, fail_first=["stall"], headers={"Content-Type": "application/xml"})
    plain.route("/models/ocr/model.onnx", body=model_bytes)
    dest = tmp_path / "ocr"
    pull_past_a_stall(run_pull, "s3://models/ocr/", dest, s3_on(plain))
    assert (dest / "model.onnx").read_bytes() == model_bytes
    assert len(plain.gets("/models")) == 2


def test_an_s3_head_that_never_answers_is_retried_after_the_read_timeout(plain, run_pull, tmp_path, model_bytes):
    # A single object is asked for its size first (HEAD): the same stall, the same retry.
    plain.route("/models/ocr/model.onnx", body=model_bytes, stall_heads=1)
    dest = tmp_path / "model.onnx"
    pull_past_a_stall(run_pull, "s3://models/ocr/model.onnx", dest, s3_on(plain))
    assert dest.read_bytes() == model_bytes
    assert len(plain.requests_for("/models/ocr/model.onnx", "HEAD")) == 2


def test_an_hf_subdirectory_is_pulled_relative_to_it_and_served(hub, run_pull, tmp_path, external_model):
    dest = tmp_path / "repo" / "cls" / "1"
    p = run_pull(f"hf://{HUB_REPO}/onnx/", dest, LOCAL, env=hub_env(hub))
    assert_ok(p)
    assert tree(dest) == tree(external_model)
    assert p.record["sha256"] == tree_sha256(external_model)
    assert_serves_like_onnxruntime(tmp_path / "repo", "cls", MODEL, tmp_path / "server.log")


def test_a_single_hf_file_is_pulled_through_the_lfs_redirect(hub, run_pull, tmp_path, model_bytes):
    dest = tmp_path / "model.onnx"
    p = run_pull(f"hf://{HUB_REPO}/model.onnx", dest, LOCAL, "--sha256", sha256_hex(model_bytes), env=hub_env(hub))
    assert_ok(p)
    assert dest.read_bytes() == model_bytes
    assert [r.status for r in hub.gets(f"/{HUB_REPO}/resolve/main/model.onnx")] == [302]
    assert hub.lfs.requests and all(r.status in (200, 206) for r in hub.lfs.requests)


def test_an_hf_revision_with_a_slash_is_percent_encoded(hub, run_pull, tmp_path):
    dest = tmp_path / "pr1"
    p = run_pull(f"hf://{HUB_REPO}@refs/pr/1", dest, LOCAL, env=hub_env(hub))
    assert_ok(p)
    assert (dest / "config.json").read_bytes() == b'{"task": "from pull request 1"}\n'
    assert sorted(tree(dest)) == ["config.json", "model.onnx"]
    raw = [r.path for r in hub.requests]
    assert any(path.startswith(f"/api/models/{HUB_REPO}/tree/refs%2Fpr%2F1") for path in raw), raw
    assert f"/{HUB_REPO}/resolve/refs%2Fpr%2F1/config.json" in raw, raw
    file_dest = tmp_path / "config.json"
    assert_ok(run_pull(f"hf://{HUB_REPO}/config.json@refs/pr/1", file_dest, LOCAL, env=hub_env(hub)))
    assert file_dest.read_bytes() == b'{"task": "from pull request 1"}\n'


def test_a_private_hf_repo_without_a_token_exits_6(hub, run_pull, tmp_path):
    dest = tmp_path / "private"
    assert_failed(run_pull("hf://kubemaas/private", dest, LOCAL, env=hub_env(hub)), 6, dest)


def test_a_private_hf_repo_is_pulled_with_hf_token_which_never_reaches_the_lfs_host(
        hub, run_pull, tmp_path, model_bytes):
    hub.lfs_host = "localhost"  # the LFS redirect changes host, as the Hub's CDN redirects do
    dest = tmp_path / "private"
    p = run_pull("hf://kubemaas/private", dest, LOCAL, "--resolve", "localhost=127.0.0.1",
                 env=hub_env(hub, HF_TOKEN="hf_test_token"))
    assert_ok(p)
    assert tree(dest) == {"model.onnx": model_bytes}
    assert hub.requests and all(r.header("authorization") == "Bearer hf_test_token" for r in hub.requests)
    assert hub.lfs.requests and all(r.header("authorization") is None for r in hub.lfs.requests)
    assert all(r.header("host").startswith("localhost:") for r in hub.lfs.requests)


def test_the_token_in_the_credentials_dir_opens_a_private_hf_repo(hub, run_pull, tmp_path, model_bytes):
    creds = tmp_path / "secret"
    creds.mkdir()
    (creds / "token").write_text("hf_test_token\n")
    dest = tmp_path / "model.onnx"
    p = run_pull("hf://kubemaas/private/model.onnx", dest, LOCAL, "--credentials-dir", creds, env=hub_env(hub))
    assert_ok(p)
    assert dest.read_bytes() == model_bytes


@pytest.mark.parametrize("uri", [f"hf://{HUB_REPO}/missing.onnx", f"hf://{HUB_REPO}/model.onnx@no-such-branch"])
def test_a_missing_hf_file_or_revision_exits_5(hub, run_pull, tmp_path, uri):
    dest = tmp_path / "model.onnx"
    assert_failed(run_pull(uri, dest, LOCAL, env=hub_env(hub)), 5, dest)


def test_an_hf_endpoint_on_loopback_is_refused_without_allow_private_addresses(hub, run_pull, tmp_path):
    dest = tmp_path / "model.onnx"
    assert_failed(run_pull(f"hf://{HUB_REPO}/model.onnx", dest, "--retries", 0, env=hub_env(hub)), 8, dest)
    assert hub.requests == []


# --------------------------------------------------------------------------------------------------
# PVC


@pytest.fixture
def pvcs(tmp_path, model_bytes, external_model):
    """--pvc-root with a claim `claim` (a file, a nested directory) and a secret outside the claim."""
    root = tmp_path / "pvcs"
    claim = root / "claim"
    (claim / "models" / "cls" / "extra").mkdir(parents=True)
    (claim / "model.onnx").write_bytes(model_bytes)
    for f in ("model.onnx", "model.onnx.data"):
        shutil.copy(external_model / f, claim / "models" / "cls" / f)
    (claim / "models" / "cls" / "extra" / "labels.txt").write_text("0\n180\n")
    (root / "secret.txt").write_text("not part of the claim\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.onnx").write_bytes(model_bytes)
    return root


def test_a_pvc_file_is_copied_from_the_mounted_claim(pvcs, run_pull, tmp_path, model_bytes):
    dest = tmp_path / "repo" / "m" / "1" / "model.onnx"
    p = run_pull("pvc://claim/model.onnx", dest, "--pvc-root", pvcs, "--sha256", sha256_hex(model_bytes))
    assert_ok(p)
    assert dest.read_bytes() == model_bytes


def test_a_pvc_directory_is_copied_with_its_tree(pvcs, run_pull, tmp_path):
    dest = tmp_path / "repo" / "cls" / "1"
    src = pvcs / "claim" / "models" / "cls"
    p = run_pull("pvc://claim/models/cls/", dest, "--pvc-root", pvcs, "--sha256", tree_sha256(src))
    assert_ok(p)
    assert tree(dest) == tree(src)


@pytest.mark.parametrize("uri", ["pvc://claim/../../etc/passwd", "pvc://claim/../secret.txt",
                                 "pvc://claim//etc/passwd"])
def test_a_pvc_path_climbing_out_of_the_claim_is_refused(pvcs, run_pull, tmp_path, uri):
    dest = tmp_path / "out" / "model.onnx"
    assert_failed(run_pull(uri, dest, "--pvc-root", pvcs), 2, dest)


def test_a_directory_link_that_loops_is_refused_not_followed_forever(pvcs, run_pull, tmp_path):
    # `loop -> .` stays inside the claim, so it passed the confinement check and was walked as
    # loop/loop/loop/... until the stack overflowed.
    (pvcs / "claim" / "models" / "cls" / "loop").symlink_to(".")
    dest = tmp_path / "out" / "m" / "1"
    p = run_pull("pvc://claim/models/cls/", dest, "--pvc-root", pvcs)
    assert_failed(p, 2, dest, mentions="loop")
    # Two directories linking to each other loop too.
    (pvcs / "claim" / "a").mkdir()
    (pvcs / "claim" / "b").mkdir()
    (pvcs / "claim" / "a" / "to_b").symlink_to(pvcs / "claim" / "b")
    (pvcs / "claim" / "b" / "to_a").symlink_to(pvcs / "claim" / "a")
    p = run_pull("pvc://claim/a/", dest, "--pvc-root", pvcs)
    assert_failed(p, 2, dest, mentions="loop")
    # A link to a directory elsewhere in the claim is no loop: its files are copied.
    (pvcs / "claim" / "c").mkdir()
    (pvcs / "claim" / "c" / "model.onnx").write_bytes(b"x")
    (pvcs / "claim" / "c" / "shared").symlink_to(pvcs / "claim" / "models" / "cls" / "extra")
    assert_ok(run_pull("pvc://claim/c/", dest, "--pvc-root", pvcs))
    assert (dest / "shared" / "labels.txt").read_text() == "0\n180\n"


@pytest.mark.parametrize("layout", ["file link", "directory link", "link inside a directory"])
def test_a_symlink_inside_the_claim_pointing_outside_it_is_refused(pvcs, run_pull, tmp_path, layout):
    claim = pvcs / "claim"
    outside = tmp_path / "outside"
    if layout == "file link":
        (claim / "escape.onnx").symlink_to(outside / "model.onnx")
        uri, dest = "pvc://claim/escape.onnx", tmp_path / "out" / "model.onnx"
    elif layout == "directory link":
        (claim / "escape").symlink_to(outside)
        uri, dest = "pvc://claim/escape/", tmp_path / "out" / "m" / "1"
    else:
        (claim / "mixed").mkdir()
        (claim / "mixed" / "config.json").write_text("{}")
        (claim / "mixed" / "model.onnx").symlink_to(outside / "model.onnx")
        uri, dest = "pvc://claim/mixed/", tmp_path / "out" / "m" / "1"
    assert_failed(run_pull(uri, dest, "--pvc-root", pvcs), 2, dest)


def test_a_symlink_that_stays_inside_the_claim_is_followed(pvcs, run_pull, tmp_path, model_bytes):
    # the layout of a Hugging Face cache on a volume: snapshots/<rev>/file -> ../../blobs/<sha>
    claim = pvcs / "claim"
    (claim / "blobs").mkdir()
    (claim / "blobs" / sha256_hex(model_bytes)).write_bytes(model_bytes)
    (claim / "snapshots" / "main").mkdir(parents=True)
    (claim / "snapshots" / "main" / "model.onnx").symlink_to(Path("../../blobs") / sha256_hex(model_bytes))
    dest = tmp_path / "repo" / "m" / "1"
    assert_ok(run_pull("pvc://claim/snapshots/main/", dest, "--pvc-root", pvcs))
    assert tree(dest) == {"model.onnx": model_bytes}
    assert not (dest / "model.onnx").is_symlink()


def test_pulling_again_into_an_existing_dest_leaves_exactly_the_new_artifact(pvcs, run_pull, tmp_path):
    """An init container that restarts pulls again into the same volume."""
    src = pvcs / "claim" / "models" / "cls"
    dest = tmp_path / "repo" / "cls" / "1"
    assert_ok(run_pull("pvc://claim/models/cls/", dest, "--pvc-root", pvcs))
    (dest / "stale.onnx").write_bytes(b"left from an earlier pull")
    (src / "extra" / "labels.txt").write_text("0\n90\n180\n270\n")
    p = run_pull("pvc://claim/models/cls/", dest, "--pvc-root", pvcs)
    assert_ok(p)
    assert tree(dest) == tree(src)
    assert p.record["sha256"] == tree_sha256(src)


def test_a_missing_pvc_path_exits_5(pvcs, run_pull, tmp_path):
    dest = tmp_path / "model.onnx"
    assert_failed(run_pull("pvc://claim/missing.onnx", dest, "--pvc-root", pvcs), 5, dest)


# --------------------------------------------------------------------------------------------------
# What a successful pull reports


def test_the_final_json_line_and_kubemaas_pull_json_describe_a_file_pull(plain, run_pull, tmp_path, model_bytes):
    plain.route("/model.onnx", body=model_bytes)
    uri = plain.url_for("/model.onnx")
    dest = tmp_path / "repo" / "ocr" / "1" / "model.onnx"
    p = run_pull(uri, dest, LOCAL)
    assert_ok(p)
    rec = p.record
    assert set(rec) == {"uri", "sha256", "bytes", "files", "seconds"}, rec
    assert rec["uri"] == uri and rec["sha256"] == sha256_hex(model_bytes)
    assert rec["bytes"] == len(model_bytes) and rec["files"] == 1
    assert isinstance(rec["seconds"], (int, float)) and 0 <= rec["seconds"] <= p.seconds
    assert json.loads((dest.parent / RECORD).read_text()) == rec
    assert sorted(x.name for x in dest.parent.iterdir()) == sorted(["model.onnx", RECORD])


def test_kubemaas_pull_json_of_a_directory_pull_lies_inside_it(pvcs, run_pull, tmp_path):
    src = pvcs / "claim" / "models" / "cls"
    dest = tmp_path / "repo" / "cls" / "1"
    p = run_pull("pvc://claim/models/cls/", dest, "--pvc-root", pvcs)
    assert_ok(p)
    files = tree(src)
    rec = p.record
    assert rec["uri"] == "pvc://claim/models/cls/" and rec["sha256"] == tree_sha256(src)
    assert rec["files"] == len(files) == 3 and rec["bytes"] == sum(map(len, files.values()))
    assert json.loads((dest / RECORD).read_text()) == rec


def test_progress_lines_go_to_stderr_every_progress_seconds(plain, run_pull, tmp_path, model_bytes):
    """A body that pauses 2.5 s half-way: with --progress-seconds 1 stderr gets at least two more lines
    than with --progress-seconds 100, and stdout holds only the JSON record either way."""
    plain.route("/model.onnx", body=model_bytes, pause=(len(model_bytes) // 2, 2.5))
    lines = {}
    for every in (100, 1):
        p = run_pull(plain.url_for("/model.onnx"), tmp_path / str(every) / "model.onnx", LOCAL,
                     "--progress-seconds", every)
        assert_ok(p)
        assert len([line for line in p.stdout.splitlines() if line.strip()]) == 1, p.stdout
        assert p.record["bytes"] == len(model_bytes)
        lines[every] = len([line for line in p.stderr.splitlines() if line.strip()])
    assert lines[1] >= lines[100] + 2, lines


# --------------------------------------------------------------------------------------------------
# --cache-dir


def cache_entries(cache: Path, content: bytes) -> list:
    return [p for p in cache.rglob("*")
            if p.is_file() and p.stat().st_size == len(content) and p.read_bytes() == content]


def test_a_cached_artifact_serves_a_second_pull_when_the_origin_fails(plain, run_pull, tmp_path, model_bytes):
    plain.route("/model.onnx", body=model_bytes)
    cache = tmp_path / "cache"
    digest = sha256_hex(model_bytes)
    first = tmp_path / "first" / "model.onnx"
    assert_ok(run_pull(plain.url_for("/model.onnx"), first, LOCAL, "--sha256", digest, "--cache-dir", cache))
    assert cache_entries(cache, model_bytes), f"nothing cached under {cache}: {list(cache.rglob('*'))}"
    plain.update("/model.onnx", status=500)
    second = tmp_path / "second" / "model.onnx"
    p = run_pull(plain.url_for("/model.onnx"), second, LOCAL, "--sha256", digest, "--cache-dir", cache, "--retries", 0)
    assert_ok(p)
    assert second.read_bytes() == model_bytes
    assert p.record["sha256"] == digest


def test_copies_left_in_the_cache_by_killed_pulls_are_swept_and_live_ones_kept(plain, run_pull, tmp_path, model_bytes):
    # A pod killed while it copied into the shared cache (evicted, OOM, its --timeout) leaves its
    # half-written entry behind; nothing else ever removes it, and each one is a model's size.
    cache = tmp_path / "cache"
    entries = cache / "sha256"
    entries.mkdir(parents=True)
    hour_ago = time.time() - 2 * 3600
    stale_file = entries / ("a" * 64 + ".1.00000000deadbeef.incoming")
    stale_file.write_bytes(b"half a model")
    stale_dir = entries / ("b" * 64 + ".1.00000000cafef00d.incoming")
    (stale_dir / "sub").mkdir(parents=True)
    (stale_dir / "sub" / "weights.bin").write_bytes(b"half")
    for p in [stale_dir / "sub" / "weights.bin", stale_dir / "sub", stale_dir, stale_file]:
        os.utime(p, (hour_ago, hour_ago))
    # Another pod's copy in progress: a directory whose newest file was written a moment ago.
    live_dir = entries / ("c" * 64 + ".1.0000000012345678.incoming")
    (live_dir / "sub").mkdir(parents=True)
    os.utime(live_dir, (hour_ago, hour_ago))
    (live_dir / "sub" / "weights.bin").write_bytes(b"still coming")
    # Not ours to judge: a name the cache never writes.
    other = entries / "notes.txt"
    other.write_text("kept")
    os.utime(other, (hour_ago, hour_ago))
    plain.route("/model.onnx", body=model_bytes)
    digest = sha256_hex(model_bytes)
    dest = tmp_path / "out" / "model.onnx"
    assert_ok(run_pull(plain.url_for("/model.onnx"), dest, LOCAL, "--sha256", digest, "--cache-dir", cache))
    assert (entries / digest).read_bytes() == model_bytes
    assert not stale_file.exists() and not stale_dir.exists(), sorted(x.name for x in entries.iterdir())
    assert (live_dir / "sub" / "weights.bin").read_bytes() == b"still coming"
    assert other.read_text() == "kept"
    # A pull served from the cache sweeps too.
    stale_file.write_bytes(b"another half")
    os.utime(stale_file, (hour_ago, hour_ago))
    plain.update("/model.onnx", status=500)
    again = tmp_path / "again" / "model.onnx"
    assert_ok(run_pull(plain.url_for("/model.onnx"), again, LOCAL, "--sha256", digest, "--cache-dir", cache))
    assert again.read_bytes() == model_bytes and not stale_file.exists()


def test_a_directory_artifact_is_cached_and_serves_the_next_pull_when_the_origin_fails(
        plain, run_pull, tmp_path, model_bytes):
    files = {"model.onnx": model_bytes, "tokenizer/vocab.txt": b"a\nb\n"}
    listing = json.dumps([{"type": "file", "path": p, "size": len(b)} for p, b in files.items()]).encode()
    plain.route("/api/models/o/r/tree/main", body=listing)
    for p, b in files.items():
        plain.route(f"/o/r/resolve/main/{p}", body=b)
    src = tmp_path / "src"
    for p, b in files.items():
        (src / p).parent.mkdir(parents=True, exist_ok=True)
        (src / p).write_bytes(b)
    digest = tree_sha256(src)
    cache = tmp_path / "cache"
    env = {"HF_ENDPOINT": plain.url}
    first = tmp_path / "first"
    assert_ok(run_pull("hf://o/r", first, LOCAL, "--sha256", digest, "--cache-dir", cache, env=env))
    assert tree_sha256(cache / "sha256" / digest) == digest, sorted(x.name for x in (cache / "sha256").iterdir())
    plain.update("/o/r/resolve/main/model.onnx", status=500)
    second = tmp_path / "second"
    p = run_pull("hf://o/r", second, LOCAL, "--sha256", digest, "--cache-dir", cache, "--retries", 0, env=env)
    assert_ok(p)
    assert tree(second) == tree(src) and p.record["sha256"] == digest


def filled_cache(plain, run_pull, tmp_path, model_bytes):
    """Serves the model at /model.onnx and pulls it once with --cache-dir: (cache, sha256)."""
    plain.route("/model.onnx", body=model_bytes)
    cache = tmp_path / "cache"
    digest = sha256_hex(model_bytes)
    assert_ok(run_pull(plain.url_for("/model.onnx"), tmp_path / "a" / "model.onnx", LOCAL, "--sha256", digest,
                       "--cache-dir", cache))
    return cache, digest


def test_a_cache_hit_that_fails_for_a_reason_of_its_own_pod_keeps_the_shared_entry(
        plain, run_pull, tmp_path, model_bytes):
    # The cache is shared by every pod; one pod's smaller --max-bytes (or full disk) says nothing
    # about the entry, which other pods may be copying from.
    cache, digest = filled_cache(plain, run_pull, tmp_path, model_bytes)
    dest = tmp_path / "b" / "model.onnx"
    p = run_pull(plain.url_for("/model.onnx"), dest, LOCAL, "--sha256", digest, "--cache-dir", cache,
                 "--max-bytes", 10)
    assert_failed(p, 7, dest)
    assert cache_entries(cache, model_bytes), f"the entry was removed: {list(cache.rglob('*'))}"
    assert len(plain.gets("/model.onnx")) == 1, "too large is too large: no second download"


def corrupt_cache(cache: Path, content: bytes):
    entries = cache_entries(cache, content)
    assert entries, f"nothing cached under {cache}: {list(cache.rglob('*'))}"
    for e in entries:
        e.chmod(0o644)
        e.write_bytes(bytes(b ^ 0xFF for b in content[:64]) + content[64:])


def test_a_corrupted_cache_entry_is_not_served_and_the_artifact_is_fetched_again(
        plain, run_pull, tmp_path, model_bytes):
    cache, digest = filled_cache(plain, run_pull, tmp_path, model_bytes)
    corrupt_cache(cache, model_bytes)
    dest = tmp_path / "b" / "model.onnx"
    assert_ok(run_pull(plain.url_for("/model.onnx"), dest, LOCAL, "--sha256", digest, "--cache-dir", cache))
    assert dest.read_bytes() == model_bytes
    assert [r.status for r in plain.gets("/model.onnx")] == [200, 200]


def test_a_corrupted_cache_entry_is_never_served_even_when_the_origin_fails(plain, run_pull, tmp_path, model_bytes):
    cache, digest = filled_cache(plain, run_pull, tmp_path, model_bytes)
    corrupt_cache(cache, model_bytes)
    plain.update("/model.onnx", status=500)
    dest = tmp_path / "b" / "model.onnx"
    p = run_pull(plain.url_for("/model.onnx"), dest, LOCAL, "--sha256", digest, "--cache-dir", cache, "--retries", 0)
    assert_failed(p, 2, dest)


# --------------------------------------------------------------------------------------------------
# S3 with IRSA: a web identity token file and a role, exchanged at STS, no static key anywhere.
# object_store calls STS over https only, with the action in the query string, which moto's server
# cannot route when unsigned (and, with authentication enforced, cannot answer at all). So a small
# HTTPS front on loopback plays STS: it checks the web identity token against the one the "issuer"
# wrote, then mints real temporary credentials at moto (AssumeRole on the same role), which moto then
# enforces on every S3 request, session token included.


class StsFront:
    def __init__(self, store, ca, token):
        self.token = token
        import http.server
        import ssl
        import threading
        import urllib.parse

        self.calls = []
        self.errors = []
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
                front.calls.append(q)
                sts = store._client("sts", store.access_key, store.secret_key)
                try:
                    if q.get("WebIdentityToken") != front.token:
                        raise PermissionError("InvalidIdentityToken: the token is not the one the issuer wrote")
                    c = sts.assume_role(RoleArn=q["RoleArn"], RoleSessionName=q["RoleSessionName"])["Credentials"]
                except Exception as e:  # noqa: BLE001 (answered as STS would)
                    front.errors.append(repr(e))
                    msg = str(e).encode()
                    self.send_response(403)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                body = (
                    "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">"
                    "<AssumeRoleWithWebIdentityResult><Credentials>"
                    f"<AccessKeyId>{c['AccessKeyId']}</AccessKeyId><SecretAccessKey>{c['SecretAccessKey']}</SecretAccessKey>"
                    f"<SessionToken>{c['SessionToken']}</SessionToken>"
                    f"<Expiration>{c['Expiration'].strftime('%Y-%m-%dT%H:%M:%SZ')}</Expiration>"
                    "</Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>"
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = ca.server_context().wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_s3_credentials_come_from_a_web_identity_token_file_irsa(s3, run_pull, tmp_path, ca, model_bytes):
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6bWw6cHVsbGVyIn0.c2ln"
    sts = StsFront(s3, ca, jwt)
    try:
        token = tmp_path / "token"
        token.write_text(jwt)  # a projected ServiceAccount token, as the kubelet writes it (no newline)
        env = {"AWS_ENDPOINT_URL": s3.url, "AWS_ENDPOINT_URL_STS": sts.url, "AWS_REGION": s3.region,
               "AWS_WEB_IDENTITY_TOKEN_FILE": str(token), "AWS_ROLE_ARN": s3.role_arn()}
        dest = tmp_path / "m.onnx"
        p = run_pull("s3://models/ocr/model.onnx", dest, "--ca-file", str(ca.ca_file), env=env)
        assert not sts.errors, sts.errors
        assert_ok(p)
        assert dest.read_bytes() == model_bytes
        assert [c["Action"] for c in sts.calls] == ["AssumeRoleWithWebIdentity"]
        assert sts.calls[0]["WebIdentityToken"] == jwt
        assert sts.calls[0]["RoleArn"] == env["AWS_ROLE_ARN"]
        # Without the token file the requests go unsigned, and the authenticated store refuses them.
        del env["AWS_WEB_IDENTITY_TOKEN_FILE"], env["AWS_ROLE_ARN"]
        p = run_pull("s3://models/ocr/model.onnx", tmp_path / "n.onnx", env=env)
        assert p.returncode == 6, p.explain()
    finally:
        sts.close()


def test_a_presigned_urls_signature_and_a_password_never_leave_the_pull(plain, run_pull, tmp_path, model_bytes):
    # A presigned URL carries its credential in the query; a URL may carry a password. The pull
    # record is served as model metadata, also on the metrics port, which asks no API key, and a
    # failure's message becomes the ModelDeployment's condition: neither may repeat them.
    secret = "X-Amz-Credential=AKIDEXAMPLE%2F20261130&X-Amz-Signature=0123456789abcdefsecret"
    plain.route("/model.onnx", body=model_bytes)
    repo = tmp_path / "repo"
    dest = repo / "cls" / "1" / "model.onnx"
    p = run_pull(plain.url_for("/model.onnx") + "?" + secret, dest, LOCAL)
    assert_ok(p)
    assert plain.gets("/model.onnx")[0].query["X-Amz-Signature"] == "0123456789abcdefsecret", "the query reached the store"
    assert "secret" not in p.stdout + p.stderr, p.explain()
    assert p.record["uri"] == plain.url_for("/model.onnx") + "?redacted", p.record
    s = Server(["--model-repository", str(repo)], tmp_path / "server.log")
    try:
        s.wait_loaded()
        for base in (s.url, s.metrics_url):
            meta = requests.get(f"{base}/v2/models/cls/versions/1", timeout=10)
            assert meta.status_code == 200 and "secret" not in meta.text, meta.text
    finally:
        assert s.stop() == 0

    plain.route("/missing.onnx", status=404)
    dest = tmp_path / "missing" / "model.onnx"
    p = run_pull(plain.url_for("/missing.onnx") + "?" + secret, dest, LOCAL, "--retries", 0)
    assert_failed(p, 5, dest, mentions="404")
    assert "secret" not in p.termination + p.stdout + p.stderr, p.explain()
    assert "missing.onnx?redacted" in p.termination, p.termination

    # Nor the warning of a retry, which names the file being fetched.
    plain.route("/flaky.onnx", body=model_bytes, fail_first=[503])
    dest = tmp_path / "flaky" / "model.onnx"
    p = run_pull(plain.url_for("/flaky.onnx") + "?" + secret, dest, LOCAL, "--retries", 1)
    assert_ok(p)
    assert "retrying" in p.stderr and "flaky.onnx?redacted" in p.stderr, p.explain()
    assert "secret" not in p.stdout + p.stderr, p.explain()

    # Nor a URL the server redirected to: a CDN's signed URL is a credential too.
    plain.route("/moved.onnx", redirect="/signed.onnx?X-Amz-Signature=redirectedsecret")
    plain.route("/signed.onnx", status=403)
    dest = tmp_path / "moved" / "model.onnx"
    p = run_pull(plain.url_for("/moved.onnx"), dest, LOCAL, "--retries", 0)
    assert_failed(p, 6, dest, mentions="403")
    assert "secret" not in p.termination + p.stdout + p.stderr, p.explain()
    assert "signed.onnx?redacted" in p.termination, p.termination

    # Nor the warning about a cache entry that cannot be used.
    cache = tmp_path / "cache"
    digest = sha256_hex(model_bytes)
    p = run_pull(plain.url_for("/model.onnx") + "?" + secret, tmp_path / "cached" / "model.onnx", LOCAL,
                 "--sha256", digest, "--cache-dir", cache)
    assert_ok(p)
    entry = cache / "sha256" / digest
    assert entry.exists(), list(cache.rglob("*"))
    entry.write_bytes(b"not the model")
    p = run_pull(plain.url_for("/model.onnx") + "?" + secret, tmp_path / "again" / "model.onnx", LOCAL,
                 "--sha256", digest, "--cache-dir", cache)
    assert_ok(p)
    assert "cache entry corrupt" in p.stderr, p.explain()
    assert "secret" not in p.stdout + p.stderr, p.explain()

    # A password in the URL is refused (credentials go in files), and not repeated in the refusal.
    dest = tmp_path / "password" / "model.onnx"
    with_password = plain.url_for("/missing.onnx").replace("://", "://reader:hunter2secret@")
    p = run_pull(with_password, dest, LOCAL, "--retries", 0)
    assert_failed(p, 2, dest, mentions="credentials inside the URL are refused")
    assert "secret" not in p.termination + p.stdout + p.stderr, p.explain()
    assert "reader:redacted@" in p.termination, p.termination
