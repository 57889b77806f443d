#!/usr/bin/env python3
"""Builds the KubeMaaS container images as OCI archives, with no container engine.

Each image is assembled file by file from what this machine already has: the release binaries,
ONNX Runtime's shared library (from the official wheel, as `scripts/setup.sh` fetches it), exactly
the shared libraries `ldd` says they need, the CA bundle for HTTPS model pulls, and a passwd entry
for the non-root user 65532. Layers are written reproducibly: sorted entries, owner 0:0, fixed
modification times (SOURCE_DATE_EPOCH, default 0), gzip without a timestamp, so the same inputs
give the same digests.

Each archive is an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/...`) plus Docker's
`manifest.json`, so one file works with `skopeo copy oci-archive:FILE docker://REGISTRY/NAME:TAG`,
`crane push FILE REGISTRY/NAME:TAG` and `docker load -i FILE`.

Usage: images/build.py --bin-dir target/release --ort-library PATH --out target/images [--version V]
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

NONROOT = 65532
EPOCH = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"


class BuildError(Exception):
    pass


def shared_libraries(*binaries: Path) -> dict:
    """{path in the image: file on this machine} for every library `ldd` resolves, and the loader."""
    found = {}
    for b in binaries:
        p = subprocess.run(["ldd", str(b)], capture_output=True, text=True)
        if p.returncode != 0:
            raise BuildError(f"ldd {b} failed: {p.stderr.strip()}")
        for line in p.stdout.splitlines():
            if "not found" in line:
                raise BuildError(f"{b} needs a library this machine lacks: {line.strip()}")
            m = re.search(r"=>\s+(/\S+)", line) or re.match(r"\s*(/\S+)", line)
            if m:
                path = m.group(1)
                found[path] = Path(path).resolve()
    return found


class Layer:
    """One reproducible tar layer, built in memory."""

    def __init__(self, comment: str):
        self.comment = comment
        self.entries = {}  # path in the image -> (kind, payload, mode)
        self.owners = {}  # path -> uid (and gid) when not root

    def dir(self, path: str, mode=0o755, owner=0):
        parts = Path(path.strip("/")).parts
        for i in range(1, len(parts) + 1):
            self.entries.setdefault("/".join(parts[:i]), ("dir", None, mode if i == len(parts) else 0o755))
        if owner:
            self.owners["/".join(parts)] = owner

    def file(self, path: str, data: bytes, mode=0o644):
        path = path.strip("/")
        if "/" in path:
            self.dir(path.rsplit("/", 1)[0])
        self.entries[path] = ("file", data, mode)

    def copy(self, path: str, source: Path, mode=None):
        data = source.read_bytes()
        self.file(path, data, mode if mode is not None else (0o755 if os.access(source, os.X_OK) else 0o644))

    def symlink(self, path: str, target: str):
        path = path.strip("/")
        if "/" in path:
            self.dir(path.rsplit("/", 1)[0])
        self.entries[path] = ("link", target, 0o777)

    def tar(self) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as t:
            for path in sorted(self.entries):
                kind, payload, mode = self.entries[path]
                info = tarfile.TarInfo(path + ("/" if kind == "dir" else ""))
                owner = self.owners.get(path, 0)
                info.mtime, info.mode, info.uid, info.gid = EPOCH, mode, owner, owner
                info.uname = info.gname = ""
                if kind == "dir":
                    info.type = tarfile.DIRTYPE
                    t.addfile(info)
                elif kind == "link":
                    info.type, info.linkname = tarfile.SYMTYPE, payload
                    t.addfile(info)
                else:
                    info.size = len(payload)
                    t.addfile(info, io.BytesIO(payload))
        return out.getvalue()


def gz(data: bytes) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9, mtime=0) as g:
        g.write(data)
    return out.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def base_layer(libraries: dict, with_certs: bool) -> Layer:
    """The C runtime the binaries need, a passwd entry for the non-root user and a writable /tmp."""
    layer = Layer("shared libraries (from ldd), passwd/group for 65532, /tmp" + (", CA bundle" if with_certs else ""))
    for image_path, source in sorted(libraries.items()):
        real = str(source)
        if image_path != real and Path(image_path).resolve() == source:
            # e.g. /lib64/ld-linux-x86-64.so.2 -> the loader's real file: keep the link, as the
            # binaries name the loader by that path.
            layer.copy(real, source, 0o755)
            layer.symlink(image_path, real)
        else:
            layer.copy(image_path, source, 0o755)
    layer.file("etc/passwd", f"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{NONROOT}:{NONROOT}:nonroot:/home/nonroot:/sbin/nologin\n".encode())
    layer.file("etc/group", f"root:x:0:\nnonroot:x:{NONROOT}:\n".encode())
    layer.dir("tmp", 0o1777)
    # ONNX Runtime keeps a small state file under $HOME.
    layer.dir("home/nonroot", 0o700, owner=NONROOT)
    if with_certs:
        if not CA_BUNDLE.is_file():
            raise BuildError(f"{CA_BUNDLE} is missing (Debian's ca-certificates package provides it)")
        layer.copy(str(CA_BUNDLE), CA_BUNDLE, 0o644)
    return layer


def stripped(binary: Path, workdir: Path) -> Path:
    out = workdir / binary.name
    shutil.copy2(binary, out)
    if shutil.which("strip"):
        subprocess.run(["strip", "--strip-unneeded", str(out)], check=True)
    return out


def write_archive(path: Path, name: str, version: str, layers: list, config: dict):
    blobs = {}
    diff_ids, descriptors, history = [], [], []
    for layer in layers:
        raw = layer.tar()
        packed = gz(raw)
        diff_ids.append(sha(raw))
        descriptors.append({"mediaType": MEDIA_LAYER, "digest": sha(packed), "size": len(packed)})
        history.append({"created": "1970-01-01T00:00:00Z", "created_by": f"images/build.py: {layer.comment}"})
        blobs[sha(packed)] = packed
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }
    config_bytes = json.dumps(image_config, sort_keys=True, separators=(",", ":")).encode()
    blobs[sha(config_bytes)] = config_bytes
    ref = f"docker.io/{name}:{version}"
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": sha(config_bytes), "size": len(config_bytes)},
        "layers": descriptors,
        "annotations": {"org.opencontainers.image.version": version},
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    blobs[sha(manifest_bytes)] = manifest_bytes
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{
            "mediaType": MEDIA_MANIFEST, "digest": sha(manifest_bytes), "size": len(manifest_bytes),
            "annotations": {"org.opencontainers.image.ref.name": version, "io.containerd.image.name": ref},
        }],
    }
    docker = [{
        "Config": "blobs/sha256/" + sha(config_bytes)[7:],
        "RepoTags": [f"{name}:{version}"],
        "Layers": ["blobs/sha256/" + d["digest"][7:] for d in descriptors],
    }]
    files = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index, sort_keys=True, separators=(",", ":")).encode(),
        "manifest.json": json.dumps(docker, separators=(",", ":")).encode(),
    }
    for digest, data in blobs.items():
        files["blobs/sha256/" + digest[7:]] = data
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:
        for d in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(d + "/")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, EPOCH
            t.addfile(info)
        for name_in, data in sorted(files.items()):
            info = tarfile.TarInfo(name_in)
            info.size, info.mode, info.mtime = len(data), 0o644, EPOCH
            t.addfile(info, io.BytesIO(data))
    compressed = sum(d["size"] for d in descriptors) + len(config_bytes)
    return {"image": f"{name}:{version}", "archive": str(path), "manifest": sha(manifest_bytes),
            "compressed_bytes": compressed, "layers": [(layer.comment, d["size"]) for layer, d in zip(layers, descriptors)]}


def build(bin_dir: Path, ort_library: Path, out: Path, version: str):
    work = Path(tempfile.mkdtemp(prefix="kubemaas-images-"))
    try:
        results = []
        operator = stripped(bin_dir / "kubemaas-operator", work)
        op_bin = Layer("kubemaas-operator")
        op_bin.copy("kubemaas-operator", operator, 0o755)
        results.append(write_archive(out / f"kubemaas-operator-{version}.oci.tar", "kubemaas/operator", version,
                                     [base_layer(shared_libraries(operator), with_certs=False), op_bin], {
            "User": f"{NONROOT}:{NONROOT}",
            "Entrypoint": ["/kubemaas-operator"],
            "Cmd": ["run"],
            "Env": ["PATH=/", "HOME=/home/nonroot"],
            "ExposedPorts": {"8090/tcp": {}},
            "Labels": {"org.opencontainers.image.title": "kubemaas-operator", "org.opencontainers.image.version": version},
        }))
        server = stripped(bin_dir / "kubemaas-server", work)
        if not ort_library.is_file():
            raise BuildError(f"{ort_library} is missing: run `make setup`")
        ort = Layer(f"ONNX Runtime ({ort_library.name})")
        ort.copy("usr/lib/kubemaas/libonnxruntime.so", ort_library, 0o755)
        srv_bin = Layer("kubemaas-server")
        srv_bin.copy("kubemaas-server", server, 0o755)
        srv_bin.dir("models")
        results.append(write_archive(out / f"kubemaas-server-{version}.oci.tar", "kubemaas/server", version,
                                     [base_layer(shared_libraries(server, ort_library), with_certs=True), ort, srv_bin], {
            "User": f"{NONROOT}:{NONROOT}",
            "Entrypoint": ["/kubemaas-server"],
            "Cmd": ["serve", "--model-repository", "/models"],
            "Env": ["PATH=/", "HOME=/home/nonroot", "ORT_DYLIB_PATH=/usr/lib/kubemaas/libonnxruntime.so",
                    "SSL_CERT_FILE=" + str(CA_BUNDLE)],
            "ExposedPorts": {"8080/tcp": {}, "8081/tcp": {}, "9090/tcp": {}},
            "Labels": {"org.opencontainers.image.title": "kubemaas-server", "org.opencontainers.image.version": version},
        }))
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin-dir", type=Path, required=True, help="directory with kubemaas-server and kubemaas-operator")
    ap.add_argument("--ort-library", type=Path, required=True, help="libonnxruntime.so to ship in the server image")
    ap.add_argument("--out", type=Path, required=True, help="directory for the OCI archives")
    ap.add_argument("--version", default=None, help="image tag (default: the workspace version in Cargo.toml)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = ap.parse_args()
    version = args.version
    if version is None:
        cargo = (Path(__file__).resolve().parent.parent / "Cargo.toml").read_text()
        version = re.search(r'^\[workspace\.package\][^\[]*?^version = "([^"]+)"', cargo, re.M | re.S).group(1)
    try:
        results = build(args.bin_dir, args.ort_library, args.out, version)
    except (BuildError, OSError, subprocess.CalledProcessError) as e:
        print(f"images/build.py: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"{'image':32} {'compressed':>12}  archive")
    for r in results:
        print(f"{r['image']:32} {r['compressed_bytes'] / 1e6:>9.1f} MB  {r['archive']}")
        for comment, size in r["layers"]:
            print(f"  {size / 1e6:>8.1f} MB  {comment}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
