"""The container images `make images` builds (images/build.py, no container engine): each OCI
archive is a valid image layout whose name and tag are what the chart deploys; its root filesystem,
unpacked layer by layer, runs its entrypoint under chroot as the non-root user (with its own /proc,
as a container runtime gives it); the server image serves a model and answers an inference; and two
builds give the same digests.

The test builds from the debug binaries (stripped), so it needs no release build; `make images`
builds from the release ones and prints the sizes.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "images" / "build.py"
ORT = Path(os.environ.get("ORT_DYLIB_PATH", Path.home() / ".cache" / "kubemaas" / "ort" / "1.31.1" / "libonnxruntime.so"))
VERSION = re.search(r'^\[workspace\.package\][^\[]*?^version = "([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M | re.S).group(1)


def build(out: Path):
    p = subprocess.run([sys.executable, str(BUILD), "--bin-dir", str(ROOT / "target" / "debug"), "--ort-library", str(ORT),
                        "--out", str(out), "--json"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return {r["image"]: r for r in json.loads(p.stdout)}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return build(tmp_path_factory.mktemp("images"))


def open_layout(archive: Path, into: Path):
    """(config, manifest) of the archive's one image, unpacked into `into`."""
    with tarfile.open(archive) as t:
        t.extractall(into, filter="data")
    assert json.loads((into / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((into / "index.json").read_text())
    [entry] = index["manifests"]
    blob = lambda d: into / "blobs" / "sha256" / d.split(":", 1)[1]  # noqa: E731
    manifest = json.loads(blob(entry["digest"]).read_text())
    config = json.loads(blob(manifest["config"]["digest"]).read_text())
    # Every descriptor's digest and size match its blob.
    import hashlib
    for d in [entry, manifest["config"], *manifest["layers"]]:
        data = blob(d["digest"]).read_bytes()
        assert len(data) == d["size"] and "sha256:" + hashlib.sha256(data).hexdigest() == d["digest"]
    # Docker's manifest.json names the same config and layers (`docker load`).
    [docker] = json.loads((into / "manifest.json").read_text())
    assert docker["Config"] == "blobs/sha256/" + manifest["config"]["digest"][7:]
    assert docker["Layers"] == ["blobs/sha256/" + layer["digest"][7:] for layer in manifest["layers"]]
    return entry, manifest, config, docker, blob


def rootfs(archive: Path, tmp: Path):
    layout = tmp / "layout"
    entry, manifest, config, docker, blob = open_layout(archive, layout)
    root = tmp / "rootfs"
    root.mkdir()
    for layer in manifest["layers"]:
        assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        with tarfile.open(blob(layer["digest"])) as t:
            # Absolute symlinks (the loader's) point inside the image once chrooted.
            t.extractall(root, filter="fully_trusted")
    (root / "proc").mkdir(exist_ok=True)
    return root, config


def in_image(root: Path, config: dict, args, **kw):
    """Runs the entrypoint with `args` as the image's user, in the image's root, with its env."""
    c = config["config"]
    user = c["User"]
    env = dict(e.split("=", 1) for e in c["Env"])
    chroot, unshare = shutil.which("chroot"), shutil.which("unshare")
    if os.getuid() == 0:
        cmd = [unshare, "--mount", "--pid", "--fork", "--kill-child=SIGTERM", f"--mount-proc={root / 'proc'}", chroot, f"--userspec={user}", str(root)]
    else:
        cmd = [unshare, "--user", "--map-root-user", "--mount", "--pid", "--fork", "--kill-child=SIGTERM", f"--mount-proc={root / 'proc'}", chroot, str(root)]
    return cmd + c["Entrypoint"] + list(args), env


def chart_images():
    values = yaml.safe_load((ROOT / "charts" / "kubemaas" / "values.yaml").read_text())
    chart = yaml.safe_load((ROOT / "charts" / "kubemaas" / "Chart.yaml").read_text())
    op = values["operator"]["image"]
    return {
        "operator": f"{op['repository']}:{op.get('tag') or chart['appVersion']}",
        "server": values["server"]["image"],
    }


def test_image_names_and_tags_are_what_the_chart_and_operator_deploy(images):
    assert set(images) == {f"kubemaas/operator:{VERSION}", f"kubemaas/server:{VERSION}"}
    deployed = chart_images()
    assert deployed["operator"] in images and deployed["server"] in images, deployed
    # The operator's own default for serving pods is the same image.
    helptext = subprocess.run([str(ROOT / "target" / "debug" / "kubemaas-operator"), "render", "--help"],
                              capture_output=True, text=True, timeout=60).stdout
    assert f"[default: kubemaas/server:{VERSION}]" in helptext


@pytest.mark.parametrize("name", ["operator", "server"])
def test_layout_is_valid_and_runs_help_as_nonroot(name, images, tmp_path):
    archive = Path(images[f"kubemaas/{name}:{VERSION}"]["archive"])
    entry, manifest, config, docker, _ = open_layout(archive, tmp_path / "check")
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == VERSION
    assert docker["RepoTags"] == [f"kubemaas/{name}:{VERSION}"]
    assert config["config"]["User"] == "65532:65532" and config["os"] == "linux"
    root, config = rootfs(archive, tmp_path)
    # Nothing in the image but what was put there: no shell, no package manager.
    assert not (root / "bin" / "sh").exists() and not (root / "usr" / "bin").exists()
    cmd, env = in_image(root, config, ["--help"])
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert f"Usage: kubemaas-{name}" in p.stdout


def test_server_image_serves_a_model_and_pulls_nothing_it_lacks(images, tmp_path):
    root, config = rootfs(Path(images[f"kubemaas/server:{VERSION}"]["archive"]), tmp_path)
    (root / "models" / "row-stats" / "1").mkdir(parents=True)
    shutil.copy(ROOT / "models" / "row-stats" / "1" / "model.onnx", root / "models" / "row-stats" / "1" / "model.onnx")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The image's default command (serve the /models repository), on loopback.
    args = config["config"]["Cmd"] + ["--host", "127.0.0.1", "--http-port", str(port), "--grpc-port", "0", "--metrics-port", "0"]
    cmd, env = in_image(root, config, args)
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        # A session of its own: unshare does not pass SIGTERM on, so the group is signalled.
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out, start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        r = requests.post(f"http://127.0.0.1:{port}/v1/models/row-stats:predict",
                          json={"instances": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]}, timeout=10)
        assert r.status_code == 200 and r.json() == {"predictions": [[55.0, 5.5, 10.0]]}, r.text
        meta = requests.get(f"http://127.0.0.1:{port}/v2/models/row-stats", timeout=10).json()
        assert meta["parameters"]["execution_provider"] == "CPUExecutionProvider"
        # The CPU feature detection found /proc/cpuinfo, as in a real container.
        assert "cpuinfo" not in log.read_text(), log.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            assert proc.wait(30) == 0, log.read_text()
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise


def test_two_builds_give_the_same_digests(images, tmp_path):
    again = build(tmp_path / "again")
    assert {k: v["manifest"] for k, v in again.items()} == {k: v["manifest"] for k, v in images.items()}
