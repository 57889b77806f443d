"""Fixtures that run the real kubemaas-server binary on 127.0.0.1 with OS-assigned ports."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("KUBEMAAS_CACHE", Path.home() / ".cache" / "kubemaas"))
MODELS = CACHE / "models"
BINARY = Path(os.environ.get("KUBEMAAS_SERVER_BIN", ROOT / "target" / "debug" / "kubemaas-server"))


class Server:
    """A running kubemaas-server process."""

    def __init__(self, args, log_path: Path):
        self.log_path = log_path
        self.log = open(log_path, "w")
        cmd = [str(BINARY), "--log-format", "json", "serve", "--host", "127.0.0.1",
               "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=self.log, text=True)
        self.http = self.grpc = self.metrics = None
        ready = threading.Event()

        def pump():
            for line in self.proc.stderr:
                self.log.write(line)
                self.log.flush()
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if ev.get("message") == "listening":
                    self.http, self.grpc, self.metrics = ev["http"], ev["grpc"], ev["metrics"]
                    ready.set()

        self.pump = threading.Thread(target=pump, daemon=True)
        self.pump.start()
        if not ready.wait(30):
            self.stop()
            raise RuntimeError(f"server did not start; log:\n{log_path.read_text()}")
        self.url = f"http://{self.http}"
        self.metrics_url = f"http://{self.metrics}"

    def wait_loaded(self, timeout=300):
        """Waits until no model is still loading."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            index = requests.post(f"{self.url}/v2/repository/index", timeout=5).json()
            if all(m["state"] != "LOADING" for m in index):
                return index
            time.sleep(0.1)
        raise TimeoutError("models still loading")

    def alive(self):
        return self.proc.poll() is None and requests.get(f"{self.url}/v2/health/live", timeout=5).ok

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.pump.join(5)
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def repo_dir(tmp_path_factory):
    """Generated models plus real models from PyPI wheels (fetched by scripts/setup.sh)."""
    out = tmp_path_factory.mktemp("repository")
    subprocess.run([sys.executable, str(ROOT / "tests" / "models" / "make_models.py"), str(out)], check=True)
    for real in ("ocr-cls", "minilm"):
        src = MODELS / real / "1" / "model.onnx"
        assert src.exists(), f"{src} missing: run scripts/setup.sh --test"
        (out / real / "1").mkdir(parents=True)
        (out / real / "1" / "model.onnx").symlink_to(src)
    return out


@pytest.fixture(scope="session")
def busy_model(tmp_path_factory):
    """A model that keeps an instance busy for about a second per 256 rows from a small request
    (`make_models.py --busy`), for tests about queueing, cancellation and draining: unlike
    MatMul-heavy models, its run time does not shrink much on a faster CPU."""
    path = tmp_path_factory.mktemp("busy") / "model.onnx"
    subprocess.run([sys.executable, str(ROOT / "tests" / "models" / "make_models.py"), "--busy", str(path)],
                   check=True)
    return path


@pytest.fixture(scope="session")
def server(repo_dir, tmp_path_factory):
    """One server for the whole session, serving every test model with 2 instances."""
    s = Server(["--model-repository", str(repo_dir), "--instances", "2",
                "--max-request-bytes", str(8 * 1024 * 1024)],
               tmp_path_factory.mktemp("logs") / "server.log")
    s.wait_loaded()
    yield s
    code = s.stop()
    assert code == 0, f"server exited with {code}; log at {s.log_path}"
