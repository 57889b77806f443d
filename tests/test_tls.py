"""TLS on the HTTP and gRPC ports: a test CA, certificate rotation without a restart, mutual TLS."""

import os
import shutil
import ssl
import subprocess
import time

import numpy as np
import pytest
import requests

from artifact_servers import TestCA
from conftest import BINARY, Server


def dense_request():
    return {"inputs": [{"name": "x", "shape": [1, 10], "datatype": "FP32", "data": list(range(10))}]}


@pytest.fixture
def pki(tmp_path):
    """The files the server reads (as a mounted Secret would hold them) and the CA that signed them."""
    ca = TestCA(tmp_path / "ca1")
    live = tmp_path / "live"
    live.mkdir()
    for src, dst in [(ca.cert_file, "tls.crt"), (ca.key_file, "tls.key"), (ca.ca_file, "ca.crt")]:
        shutil.copy(src, live / dst)
    return ca, live


def start(repo_dir, tmp_path, live, *flags):
    s = Server(["--model", f"dense={repo_dir / 'model' / '1' / 'model.onnx'}",
                "--tls-cert", str(live / "tls.crt"), "--tls-key", str(live / "tls.key"), *flags],
               tmp_path / "server.log")
    https = f"https://{s.http}"
    return s, https


def wait_ready(https, verify, cert=None):
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if requests.get(f"{https}/v2/models/dense/ready", verify=verify, cert=cert, timeout=5).ok:
                return
        except requests.exceptions.ConnectionError:
            pass
        time.sleep(0.1)
    raise TimeoutError("not ready over TLS")


def test_https_and_grpc_over_tls_with_a_test_ca_while_metrics_stay_plain(repo_dir, tmp_path, pki):
    import tritonclient.grpc as grpcclient

    ca, live = pki
    s, https = start(repo_dir, tmp_path, live)
    try:
        wait_ready(https, str(ca.ca_file))
        r = requests.post(f"{https}/v2/models/dense/infer", json=dense_request(), verify=str(ca.ca_file), timeout=10)
        assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [1, 3], r.text
        # Plain HTTP on the TLS port gets no answer; the metrics port is plain for probes and scrapers.
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"http://{s.http}/v2/health/live", timeout=5)
        assert requests.get(f"{s.metrics_url}/metrics", timeout=5).ok
        # gRPC with TLS (tritonclient verifies against the test CA).
        client = grpcclient.InferenceServerClient(s.grpc, ssl=True, root_certificates=str(ca.ca_file))
        x = grpcclient.InferInput("x", [1, 10], "FP32")
        x.set_data_from_numpy(np.arange(10, dtype=np.float32).reshape(1, 10))
        out = client.infer("dense", [x]).as_numpy("y")
        assert np.allclose(out, np.array(r.json()["outputs"][0]["data"]).reshape(1, 3))
        # A client that does not trust the CA refuses the server.
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{https}/v2/health/live", timeout=5)
    finally:
        assert s.stop() == 0


def test_a_rotated_certificate_is_served_without_a_restart_and_a_broken_one_is_not(repo_dir, tmp_path, pki):
    ca, live = pki
    s, https = start(repo_dir, tmp_path, live)
    try:
        wait_ready(https, str(ca.ca_file))
        keep_alive = requests.Session()
        assert keep_alive.get(f"{https}/v2/health/live", verify=str(ca.ca_file), timeout=5).ok
        # cert-manager renews: a new key pair from a new CA, swapped in atomically as kubelet does.
        ca2 = TestCA(tmp_path / "ca2")
        for src, dst in [(ca2.cert_file, "tls.crt"), (ca2.key_file, "tls.key")]:
            shutil.copy(src, live / (dst + ".new"))
            os.replace(live / (dst + ".new"), live / dst)
        deadline = time.time() + 10
        while True:
            try:
                requests.get(f"{https}/v2/health/live", verify=str(ca2.ca_file), timeout=5)
                break
            except requests.exceptions.SSLError:
                assert time.time() < deadline, "the new certificate was not picked up"
                time.sleep(0.2)
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{https}/v2/health/live", verify=str(ca.ca_file), timeout=5)
        # The connection made before the rotation keeps working.
        assert keep_alive.get(f"{https}/v2/health/live", verify=str(ca.ca_file), timeout=5).ok
        # A broken update (a truncated key) keeps the certificate in force.
        (live / "tls.key").write_text("-----BEGIN PRIVATE KEY-----\ntruncated\n")
        time.sleep(2.5)
        r = requests.post(f"{https}/v2/models/dense/infer", json=dense_request(), verify=str(ca2.ca_file), timeout=10)
        assert r.status_code == 200, r.text
        assert "keeping the previous TLS certificate" in s.log_path.read_text()
        assert s.proc.poll() is None
    finally:
        assert s.stop() == 0


def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_client_ca(repo_dir, tmp_path, pki):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    ca, live = pki
    client_cert = ca.issue_client("caller")
    stranger = TestCA(tmp_path / "other").issue_client("stranger")
    s, https = start(repo_dir, tmp_path, live, "--tls-client-ca", str(live / "ca.crt"))
    try:
        wait_ready(https, str(ca.ca_file), cert=tuple(map(str, client_cert)))
        ok = requests.post(f"{https}/v2/models/dense/infer", json=dense_request(), verify=str(ca.ca_file),
                           cert=tuple(map(str, client_cert)), timeout=10)
        assert ok.status_code == 200, ok.text
        for cert in (None, tuple(map(str, stranger))):
            with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
                requests.get(f"{https}/v2/health/live", verify=str(ca.ca_file), cert=cert, timeout=5)
        x = grpcclient.InferInput("x", [1, 10], "FP32")
        x.set_data_from_numpy(np.zeros((1, 10), np.float32))
        good = grpcclient.InferenceServerClient(s.grpc, ssl=True, root_certificates=str(ca.ca_file),
                                                certificate_chain=str(client_cert[0]),
                                                private_key=str(client_cert[1]))
        assert good.infer("dense", [x]).as_numpy("y").shape == (1, 3)
        anonymous = grpcclient.InferenceServerClient(s.grpc, ssl=True, root_certificates=str(ca.ca_file))
        with pytest.raises(InferenceServerException):
            anonymous.infer("dense", [x], client_timeout=10)
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("case", ["missing key", "not pem", "key without cert"])
def test_bad_tls_files_stop_the_server_with_a_clear_error(repo_dir, tmp_path, pki, case):
    ca, live = pki
    (tmp_path / "junk.pem").write_text("hello\n")
    flags = {
        "missing key": ["--tls-cert", str(live / "tls.crt"), "--tls-key", str(tmp_path / "nope.pem")],
        "not pem": ["--tls-cert", str(tmp_path / "junk.pem"), "--tls-key", str(live / "tls.key")],
        "key without cert": ["--tls-key", str(live / "tls.key")],
    }[case]
    want = {
        "missing key": "cannot read --tls-key",
        "not pem": "holds no certificate in PEM form",
        "key without cert": "--tls-cert",
    }[case]
    r = subprocess.run([str(BINARY), "serve", "--model", f"dense={repo_dir / 'model' / '1' / 'model.onnx'}",
                        "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", *flags],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert want in r.stderr, r.stderr


def test_a_client_silent_after_its_tls_handshake_is_closed(repo_dir, tmp_path, pki):
    # The handshake is timed by the accept loop; after it, until the first bytes say which HTTP
    # version the client speaks, nothing was: a client that shook hands and said nothing stayed.
    import socket

    from test_limits import closed_within

    ca, live = pki
    s, https = start(repo_dir, tmp_path, live, "--header-read-timeout", "2")
    try:
        wait_ready(https, str(ca.ca_file))
        for port, alpn in ((s.http, "http/1.1"), (s.http, "h2"), (s.grpc, "h2")):
            context = ssl.create_default_context(cafile=str(ca.ca_file))
            context.set_alpn_protocols([alpn])
            host, p = port.rsplit(":", 1)
            raw = socket.create_connection((host, int(p)))
            c = context.wrap_socket(raw, server_hostname="localhost")
            try:
                assert closed_within(c, 6), f"{port} with {alpn} kept a silent TLS client"
            finally:
                c.close()
    finally:
        assert s.stop() == 0
