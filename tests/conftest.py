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


def peak_rss_mib(pid):
    """The process's peak resident memory so far (VmHWM), in MiB."""
    status = open(f"/proc/{pid}/status").read()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024


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


def grpc_open(s, declared, sent, method="ModelInfer", metadata=()):
    """A gRPC ModelInfer call whose message never fully arrives: its 5-byte prefix declares
    `declared` bytes of message and `sent` bytes of body (prefix included) are sent, respecting
    HTTP/2 flow control; `metadata` adds (name, value) headers. Returns (socket, connection, stream id)."""
    import socket

    import h2.config
    import h2.connection
    import h2.events

    host, port = s.grpc.rsplit(":", 1)
    c = socket.create_connection((host, int(port)))
    c.settimeout(10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    c.sendall(conn.data_to_send())
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":authority", "x"),
                            (":path", f"/inference.GRPCInferenceService/{method}"),
                            ("content-type", "application/grpc"), ("te", "trailers"), *metadata])
    c.sendall(conn.data_to_send())
    payload = b"\x00" + declared.to_bytes(4, "big") + b"\x00" * (sent - 5)
    # Events read while waiting for window updates, for grpc_answer: the server may answer (and
    # close the stream) before the body is sent.
    conn.early_events = []
    while payload and not any(isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset))
                              for ev in conn.early_events):
        n = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, len(payload))
        if n == 0:
            conn.early_events += conn.receive_data(c.recv(65536))  # window updates
        else:
            conn.send_data(sid, payload[:n])
            payload = payload[n:]
        c.sendall(conn.data_to_send())
    return c, conn, sid


def grpc_answer(c, conn, sid, timeout=10):
    """The headers and trailers the server sends on stream `sid`, until the stream ends."""
    import h2.events

    c.settimeout(timeout)
    fields = {}
    pending = getattr(conn, "early_events", [])
    while True:
        if pending:
            events, pending = pending, []
        else:
            data = c.recv(65536)
            if not data:
                return fields
            events = conn.receive_data(data)
        for ev in events:
            if isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)) and ev.stream_id == sid:
                fields.update({k.decode(): v.decode() for k, v in ev.headers})
            if isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                return fields
        c.sendall(conn.data_to_send())
