"""What a user sees when something is wrong around the binaries: the operator's readiness with no
apiserver, errors printed once and without a backtrace, and `make help` listing every target."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import Server

ROOT = Path(__file__).resolve().parent.parent
OPERATOR = ROOT / "target" / "debug" / "kubemaas-operator"
SERVER = Path(os.environ.get("KUBEMAAS_SERVER_BIN", ROOT / "target" / "debug" / "kubemaas-server"))
ROW_STATS = ROOT / "models" / "row-stats" / "1" / "model.onnx"


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def unreachable_kubeconfig(tmp_path):
    """A kubeconfig naming an apiserver on a closed loopback port, and that apiserver's URL."""
    api = f"https://127.0.0.1:{closed_port()}"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "{api}", insecure-skip-tls-verify: true}}}}]
users: [{{name: u, user: {{token: t}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u}}}}]
current-context: x
""")
    return kubeconfig, api


def test_operator_is_not_ready_while_the_apiserver_is_unreachable_and_says_where(tmp_path):
    kubeconfig, api = unreachable_kubeconfig(tmp_path)
    log = tmp_path / "operator.log"
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "RUST_BACKTRACE": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([str(OPERATOR), "--log-format", "json", "run", "--metrics-addr", "127.0.0.1:0"],
                                env=env, stderr=out, stdout=out, text=True)
    try:
        addr = None
        for _ in range(300):
            m = re.search(r'"metrics":"([0-9.:]+)"', log.read_text())
            if m:
                addr = m.group(1)
                break
            time.sleep(0.1)
        assert addr, log.read_text()
        # Give the probe time to run (it answers within 5 s) and check several times.
        deadline = time.time() + 12
        seen = []
        while time.time() < deadline:
            seen.append(requests.get(f"http://{addr}/readyz", timeout=5).status_code)
            assert requests.get(f"http://{addr}/healthz", timeout=5).status_code == 200
            time.sleep(1)
        assert set(seen) == {503}, seen
        text = log.read_text()
        assert "cannot reach the apiserver" in text and api in text and "Connection refused" in text, text
        # Said once, not every retry period.
        assert text.count("leader election attempt failed") == 1, text
        assert proc.poll() is None, "the operator must keep running and retrying"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_port_in_use_is_one_line_with_advice_and_no_backtrace():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = subprocess.run([str(SERVER), "serve", "--host", "127.0.0.1", "--http-port", str(port), "--grpc-port", "0", "--metrics-port", "0",
                            "--model", f"m={ROW_STATS}"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "RUST_BACKTRACE": "1"})
    assert p.returncode == 1
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: failed to listen on 127.0.0.1:{port}: Address already in use (os error 98) "
                      "(another process listens there: stop it, or choose other ports with --http-port, --grpc-port and "
                      "--metrics-port; 0 picks free ones)"], p.stderr
    assert "backtrace" not in p.stderr.lower() and "caused by" not in p.stderr.lower(), p.stderr


def test_an_empty_ort_dylib_path_means_unset_and_a_bad_one_says_why(tmp_path):
    # Empty: the cached library is used, the server starts.
    env = {**os.environ, "ORT_DYLIB_PATH": ""}
    proc = subprocess.Popen([str(SERVER), "--log-format", "json", "serve", "--host", "127.0.0.1", "--http-port", "0",
                             "--grpc-port", "0", "--metrics-port", "0", "--model", f"m={ROW_STATS}"], env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stderr:
            if '"listening"' in line:
                break
        else:
            raise AssertionError("server did not start with ORT_DYLIB_PATH empty")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    # Not a library: the loader's bare "dlopen failed" comes with a reason.
    bogus = tmp_path / "libonnxruntime.so"
    bogus.write_text("not a library")
    p = subprocess.run([str(SERVER), "serve", "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", "--model", f"m={ROW_STATS}"],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "ORT_DYLIB_PATH": str(bogus)})
    assert p.returncode == 1
    assert "the file is not a shared library (no ELF header)" in p.stderr, p.stderr
    assert p.stderr.count("failed to load the ONNX Runtime library") == 1, p.stderr


def test_make_help_lists_every_target():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z0-9][a-z0-9-]*):", makefile, re.M))
    phony = set(" ".join(re.findall(r"^\.PHONY:(.*)$", makefile, re.M)).split())
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    listed = set(re.findall(r"^  make (\S+)", out, re.M))
    assert listed == targets, f"not listed: {targets - listed}; listed but not targets: {listed - targets}"
    assert phony == targets, f"not .PHONY: {targets - phony}; .PHONY but no rule: {phony - targets}"


def test_text_logs_carry_no_colour_codes_when_not_a_terminal(tmp_path):
    # Pod logs are files, not terminals: ANSI escapes there are noise.
    for binary, args in ((SERVER, ["serve", "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0",
                                   "--metrics-port", "0", "--model", f"m={ROW_STATS}"]),
                         (OPERATOR, ["run", "--metrics-addr", "127.0.0.1:0"])):
        env = {**os.environ, "KUBECONFIG": str(tmp_path / "missing-kubeconfig")}
        proc = subprocess.Popen([str(binary), "--log-format", "text", *args], env=env,
                                stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert err.strip(), binary
        assert b"\x1b[" not in err, (binary, err[:300])


@pytest.mark.parametrize("flags, instances, threads, io", [
    (["--cpus", "3"], 3, 1, 1),
    (["--cpus", "16"], 4, 4, 4),
    (["--cpus", "8", "--instances", "2"], 2, 4, 2),
    (["--cpus", "8", "--intra-op-threads", "4"], 2, 4, 2),
    (["--cpus", "2", "--io-threads", "3"], 2, 1, 3),
    ([], min(len(os.sched_getaffinity(0)), 4), 1, max(1, len(os.sched_getaffinity(0)) // 4)),
], ids=["3-cores", "16-cores", "8-cores-2-instances", "8-cores-4-threads", "3-io-threads", "usable-cores"])
def test_the_server_plans_instances_and_threads_for_the_cores_it_is_given(tmp_path, flags, instances, threads, io):
    # What the operator relies on when it passes a pod's cores (--cpus) and leaves the rest at 0:
    # the instances really serve (/config's instance_group) and instances x threads fit the cores;
    # the I/O threads (the async runtime's workers, as it counts them) are one per 4 cores unless
    # --io-threads says.
    s = Server(["--model", f"row-stats={ROW_STATS}", "--execution-provider", "cpu", *flags], tmp_path / "server.log")
    try:
        s.wait_loaded()
        config = requests.get(f"{s.url}/v2/models/row-stats/config", timeout=10).json()
        assert config["instance_group"][0]["count"] == instances, config
        events = [json.loads(line) for line in s.log_path.read_text().splitlines() if line.startswith("{")]
        [plan] = [e for e in events if e.get("message") == "sessions"]
        assert (plan["instances"], plan["intra_op_threads"]) == (instances, threads), plan
        [listening] = [e for e in events if e.get("message") == "listening"]
        assert listening["io_threads"] == io, listening
    finally:
        assert s.stop() == 0


def test_gpu_devices_are_a_list_and_a_bad_one_is_refused_by_name(tmp_path):
    # --gpu-device takes the pod's GPUs as a list (the operator passes 0,1 for gpu.count 2); a
    # negative ordinal is refused before anything loads; on this machine without CUDA a `cuda`
    # load names the device it tried first.
    bad = subprocess.run([str(SERVER), "serve", "--model", f"m={ROW_STATS}", "--gpu-device", "0,-1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--gpu-device" in bad.stderr and "-1" in bad.stderr, bad.stderr
    p = subprocess.run([str(SERVER), "serve", "--host", "127.0.0.1", "--model", f"m={ROW_STATS}", "--http-port", "0", "--grpc-port", "0",
                        "--metrics-port", "0", "--execution-provider", "cuda", "--gpu-device", "3,1",
                        "--exit-on-load-failure"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 4, p.stderr
    assert "CUDA execution provider requested on device 3 but unavailable" in p.stderr, p.stderr[-2000:]


def test_intra_op_threads_past_1024_are_refused_at_start(tmp_path):
    # 100,000 was accepted, and every session started that many threads: the model stayed
    # "loading" while the server started hundreds of thousands of threads.
    p = subprocess.run([str(SERVER), "serve", "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0",
                        "--metrics-port", "0", "--model", f"m={ROW_STATS}", "--intra-op-threads", "100000"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--intra-op-threads" in p.stderr and "1024" in p.stderr, p.stderr


@pytest.mark.parametrize("flag", ["--body-read-timeout", "--header-read-timeout"])
def test_a_read_timeout_past_a_day_is_refused_at_start_not_on_the_first_request(flag, tmp_path):
    # 10**19 s was accepted, and adding it to the clock panicked on every request with a body.
    p = subprocess.run([str(SERVER), "serve", "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0",
                        "--metrics-port", "0", "--model", f"m={ROW_STATS}", flag, str(10**19)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and flag in p.stderr and "86400" in p.stderr, p.stderr
    s = Server(["--model", f"m={ROW_STATS}", flag, "86400"], tmp_path / "server.log")
    try:
        s.wait_loaded()
        body = {"inputs": [{"name": "x", "shape": [2, 10], "datatype": "FP32", "data": list(range(20))}]}
        assert requests.post(f"{s.url}/v2/models/m/infer", json=body, timeout=30).status_code == 200
    finally:
        assert s.stop() == 0


# A server on loopback and free ports, should one get past its flags.
SERVE = ["serve", "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
         "--model", f"m={ROW_STATS}"]
# A source on a PVC root that does not exist: a pull that got past its flags fails here, locally.
PULL = ["pull", "pvc://claim/m.onnx", "/nonexistent/kubemaas/dest", "--pvc-root", "/nonexistent/kubemaas/pvcs"]


@pytest.mark.parametrize("args, flag, says", [
    # Clamped to 1, or NaN: every compression rejected (exit 9) whatever it measured.
    ([*PULL, "--compress", "int8-dynamic", "--min-cosine", "1.5"], "--min-cosine", "from 0 to 1"),
    ([*PULL, "--compress", "int8-dynamic", "--min-cosine", "NaN"], "--min-cosine", "from 0 to 1"),
    # Wrapped through ONNX Runtime's C int: 4294967297 threads became 1.
    ([*PULL, "--compress-threads", "4294967297"], "--compress-threads", "1024"),
    (["compress", "/tmp/in.onnx", "/tmp/out.onnx", "--threads", "4294967297"], "--threads", "1024"),
    # A capacity overflow panic, not an error.
    (["compress", "/tmp/in.onnx", "/tmp/out.onnx", "--timing-runs", str(2**64 - 1)], "--timing-runs", "10000"),
    # Accepted, then every pull or request failed.
    ([*PULL, "--timeout", "0"], "--timeout", "0"),
    ([*PULL, "--read-timeout", "0"], "--read-timeout", "0"),
    ([*PULL, "--connect-timeout", "0"], "--connect-timeout", "0"),
    ([*SERVE, "--max-request-bytes", "0"], "--max-request-bytes", "0"),
    # Accepted and never used: a preferred size is a batch size the batcher can form.
    ([*SERVE, "--max-batch-size", "4", "--preferred-batch-size", "8"],
     "--preferred-batch-size", "--max-batch-size"),
    ([*SERVE, "--max-batch-size", "4", "--preferred-batch-size", "0"],
     "--preferred-batch-size", "0"),
    # Settings of something not asked for were accepted and ignored.
    ([*PULL, "--min-cosine", "0.9"], "--min-cosine", "--compress"),
    ([*PULL, "--input-shape", "x=1x3"], "--input-shape", "--compress"),
    ([*SERVE, "--preferred-batch-size", "4"], "--preferred-batch-size", "--max-batch-size"),
    ([*SERVE, "--max-queue-delay-us", "500"], "--max-queue-delay-us", "--max-batch-size"),
    # A device listed twice doubled the instances on it, unasked.
    ([*SERVE, "--gpu-device", "0,1,0"], "--gpu-device", "0 is listed twice"),
    # config.pbtxt refuses a queue delay over a day; the flag took any.
    ([*SERVE, "--max-queue-delay-us", str(10**12)], "--max-queue-delay-us", "86400000000"),
], ids=["min-cosine-1.5", "min-cosine-nan", "pull-compress-threads", "compress-threads", "timing-runs",
        "pull-timeout-0", "read-timeout-0", "connect-timeout-0", "max-request-bytes-0", "preferred-over-max",
        "preferred-0", "min-cosine-without-compress", "input-shape-without-compress", "preferred-without-batching",
        "queue-delay-without-batching", "gpu-device-twice", "queue-delay-past-a-day"])
def test_flag_values_that_cannot_be_honoured_are_refused_by_name(args, flag, says):
    p = subprocess.run([str(SERVER), *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    # Refused as a usage error (a failed pull exits 2 as well, and says "--timeout" too).
    assert "For more information, try '--help'." in p.stderr, p.stderr[-2000:]
    assert flag in p.stderr and says in p.stderr, p.stderr[-2000:]
    assert "panicked" not in p.stderr, p.stderr[-2000:]


def answers_on_both_loopbacks(port):
    """Whether a TCP listener on `port` accepts on 127.0.0.1 and on ::1 (both loopback)."""
    seen = {}
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family) as s:
            s.settimeout(5)
            seen[host] = s.connect_ex((host, port)) == 0
    return seen


def test_by_default_the_server_listens_on_ipv4_and_ipv6(tmp_path):
    # On an IPv6 (or dual-stack, IPv6-first) cluster the pod IP is IPv6: a server listening on
    # 0.0.0.0 alone is never probed ready there.
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(SERVER), "--log-format", "json", "serve", "--http-port", "0", "--grpc-port", "0",
                                 "--metrics-port", "0", "--model", f"m={ROW_STATS}"], stderr=out, stdout=out)
    try:
        event = None
        for _ in range(300):
            events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
            event = next((e for e in events if e.get("message") == "listening"), None)
            if event:
                break
            time.sleep(0.1)
        assert event, log.read_text()
        for surface in ("http", "grpc", "metrics"):
            port = int(event[surface].rsplit(":", 1)[1])
            assert answers_on_both_loopbacks(port) == {"127.0.0.1": True, "::1": True}, (surface, event)
        port = int(event["http"].rsplit(":", 1)[1])
        ready = requests.get(f"http://[::1]:{port}/v2/health/live", timeout=5)
        assert ready.status_code == 200, ready.text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_an_explicit_ipv4_host_listens_on_ipv4_only(tmp_path):
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(SERVER), "--log-format", "json", "serve", "--host", "0.0.0.0", "--http-port", "0",
                                 "--grpc-port", "0", "--metrics-port", "0", "--model", f"m={ROW_STATS}"],
                                stderr=out, stdout=out)
    try:
        port = None
        for _ in range(300):
            m = re.search(r'"http":"0\.0\.0\.0:(\d+)"', log.read_text())
            if m:
                port = int(m.group(1))
                break
            time.sleep(0.1)
        assert port, log.read_text()
        assert answers_on_both_loopbacks(port) == {"127.0.0.1": True, "::1": False}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_by_default_the_operator_listens_on_ipv4_and_ipv6(tmp_path):
    # The kubelet probes the operator at its pod IP, IPv4 or IPv6. The default port, 8090, is
    # one no other test uses.
    log = tmp_path / "operator.log"
    env = {**os.environ, "KUBECONFIG": str(unreachable_kubeconfig(tmp_path)[0])}
    env.pop("KUBEMAAS_METRICS_ADDR", None)
    with open(log, "w") as out:
        proc = subprocess.Popen([str(OPERATOR), "--log-format", "json", "run"], env=env, stderr=out, stdout=out)
    try:
        port = None
        for _ in range(300):
            m = re.search(r'"metrics":"\[::\]:(\d+)"', log.read_text())
            if m:
                port = int(m.group(1))
                break
            time.sleep(0.1)
        assert port, log.read_text()
        assert answers_on_both_loopbacks(port) == {"127.0.0.1": True, "::1": True}
        assert requests.get(f"http://[::1]:{port}/healthz", timeout=5).status_code == 200
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@pytest.mark.parametrize("flag", ["--server-image", "--server-cuda-image"])
def test_a_server_image_the_kubelet_cannot_pull_stops_the_operator_at_start(flag, tmp_path):
    # Every ModelDeployment's pods would sit in InvalidImageName.
    for sub in (["run"], ["render", "-f", str(ROOT / "deploy" / "examples" / "autoscaled.yaml")]):
        p = subprocess.run([str(OPERATOR), *sub, flag, "kubemaas/server: 0.2"], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "KUBECONFIG": str(tmp_path / "none")})
        assert p.returncode == 2, (sub, p.stderr)
        assert f"invalid value 'kubemaas/server: 0.2' for '{flag}" in p.stderr, p.stderr
        assert "not an image reference" in p.stderr, p.stderr


def test_the_default_listen_address_serves_ipv4_where_pods_have_ipv6_switched_off(tmp_path):
    # Some CNIs switch IPv6 off in every pod (net.ipv6.conf.all.disable_ipv6=1). The server must
    # still start on its default address and answer on the pod's IPv4 address. A network namespace
    # of its own gives the test such a pod without touching this machine's network.
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no network namespaces here: {probe.stderr.decode()[:200]}")
    script = f"""
set -e
ip link set lo up
sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 net.ipv6.conf.lo.disable_ipv6=1
! grep -q . /proc/net/if_inet6
{SERVER} --log-format json serve --http-port 18080 --grpc-port 18081 --metrics-port 19090 --model m={ROW_STATS} 2>{tmp_path}/server.log &
for i in $(seq 100); do
  {sys.executable} -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:18080/v2/health/ready').status)" 2>/dev/null && break
  sleep 0.2
done
kill %1
"""
    p = subprocess.run(["unshare", "-n", "bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip().endswith("200"), (p.stdout, p.stderr, (tmp_path / "server.log").read_text())
    assert '"http":"[::]:18080"' in (tmp_path / "server.log").read_text()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_an_otlp_collector_of_either_protocol_does_not_stop_the_operator(protocol):
    # The chart's values suggest OTEL_EXPORTER_OTLP_PROTOCOL=grpc for a collector on :4317; the
    # gRPC exporter needs a Tokio runtime when it is built, and without one the operator panicked
    # before doing anything, so an install following that advice crash-looped.
    env = dict(os.environ,
               OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{closed_port()}",
               OTEL_EXPORTER_OTLP_PROTOCOL=protocol)
    out = subprocess.run([OPERATOR, "crd"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "panicked" not in out.stderr, out.stderr
    assert "kind: CustomResourceDefinition" in out.stdout
