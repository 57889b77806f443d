"""The README's examples, run as written against what `make run` serves (scripts/quickstart.sh).

Every fenced `sh` and `python` block of the README's "Examples" section is extracted and run: shell
commands one by one with bash, Python blocks with the virtualenv's interpreter (what `make
client-tools` sets up). The only rewrite is the port: the README says `localhost:8080` and
`localhost:9090`, the test's server listens on ports the OS picked. A comment right after a command
that holds JSON (`# {...}`) is that command's expected output, compared as JSON; a Python block's
trailing comment lines are its expected standard output. Each command must exit 0, and an HTTP
answer must not be an error.
"""

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BINARY = Path(os.environ.get("KUBEMAAS_SERVER_BIN", ROOT / "target" / "debug" / "kubemaas-server"))


def section(text: str, title: str) -> str:
    """The body of the `## title` section."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def blocks(text: str):
    """(language, code) of every fenced block."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def shell_commands(code: str):
    """(command, expected JSON or None) for each command of a shell block; `\\` continues a line."""
    out, cmd = [], ""
    for line in code.splitlines():
        if cmd.endswith("\\"):
            cmd = cmd + "\n" + line
            continue
        if cmd:
            out.append([cmd, None])
            cmd = ""
        stripped = line.strip()
        if stripped.startswith("#"):
            comment = stripped.lstrip("#").strip()
            if out and comment.startswith("{") and out[-1][1] is None:
                out[-1][1] = json.loads(comment.split("  ")[0])
            continue
        if stripped:
            cmd = line
    if cmd:
        out.append([cmd, None])
    return [tuple(c) for c in out]


def python_expected(code: str) -> str:
    """The trailing comment lines of a Python block: its expected output."""
    tail = []
    for line in reversed(code.rstrip().splitlines()):
        if not line.startswith("# "):
            break
        tail.append(line[2:])
    return "\n".join(reversed(tail))


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """scripts/quickstart.sh (what `make run` execs) with the debug build and OS-picked ports."""
    log_path = tmp_path_factory.mktemp("readme") / "server.log"
    env = {**os.environ, "KUBEMAAS_SERVER": str(BINARY), "KUBEMAAS_HTTP_PORT": "0",
           "KUBEMAAS_GRPC_PORT": "0", "KUBEMAAS_METRICS_PORT": "0", "KUBEMAAS_LOG_FORMAT": "json"}
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "quickstart.sh")], env=env, cwd=ROOT,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    ports, ready = {}, threading.Event()
    log = open(log_path, "w")

    def pump():
        for line in proc.stderr:
            log.write(line)
            log.flush()
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("message") == "listening":
                ports["http"], ports["grpc"], ports["metrics"] = ev["http"], ev["grpc"], ev["metrics"]
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(60):
        proc.kill()
        pytest.fail(f"quickstart did not start:\n{log_path.read_text()}")
    url = f"http://{ports['http']}"
    for _ in range(600):
        if requests.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
            break
        threading.Event().wait(0.1)
    else:
        pytest.fail("quickstart models never became ready")
    yield ports
    proc.terminate()
    proc.wait(30)
    log.close()


def localise(cmd: str, ports) -> str:
    return (cmd.replace("localhost:8080", ports["http"]).replace("localhost:8081", ports["grpc"])
            .replace("localhost:9090", ports["metrics"]))


def readme_examples():
    return blocks(section(README.read_text(), "Examples"))


def test_the_examples_section_has_shell_and_python_examples():
    langs = [lang for lang, _ in readme_examples()]
    assert langs.count("sh") >= 2 and "python" in langs, langs


def test_quickstart_is_what_make_run_serves_on_the_readme_ports():
    make = (ROOT / "Makefile").read_text()
    run = re.search(r"^run:.*?\n((?:\t.*\n)+)", make, re.M)
    assert run and "--release -p kubemaas-server" in run.group(1) and "scripts/quickstart.sh" in run.group(1)
    script = (ROOT / "scripts" / "quickstart.sh").read_text()
    assert 'KUBEMAAS_HTTP_PORT:-8080' in script and 'KUBEMAAS_METRICS_PORT:-9090' in script
    assert 'KUBEMAAS_GRPC_PORT:-8081' in script
    assert "--host 127.0.0.1" in script
    # The README talks to exactly those ports and nothing else.
    hosts = set(re.findall(r"localhost:\d+", section(README.read_text(), "Examples")))
    assert hosts <= {"localhost:8080", "localhost:8081", "localhost:9090"}, hosts


@pytest.mark.parametrize("index", range(len(readme_examples())))
def test_readme_example_runs_as_written(index, quickstart):
    lang, code = readme_examples()[index]
    if lang == "python":
        python = Path(os.environ.get("KUBEMAAS_VENV", ROOT / ".venv")) / "bin" / "python"
        p = subprocess.run([str(python if python.exists() else sys.executable), "-c", localise(code, quickstart)],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert p.returncode == 0, p.stderr
        expected = python_expected(code)
        assert expected, "a Python example must end with its expected output as comments"
        assert p.stdout.strip() == expected.strip()
        return
    assert lang == "sh", f"unexpected block language {lang!r} in the Examples section"
    for cmd, expected in shell_commands(code):
        p = subprocess.run(["bash", "-o", "pipefail", "-c", localise(cmd, quickstart)],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert p.returncode == 0, f"{cmd}\n{p.stdout}\n{p.stderr}"
        out = p.stdout.strip()
        assert out, f"{cmd} printed nothing"
        if out.startswith("{"):
            try:
                body = json.loads(out)
            except ValueError as e:
                pytest.fail(f"{cmd}: not JSON ({e}): {out[:300]}")
            assert "error" not in body, f"{cmd}: {out}"
            if expected is not None:
                assert body == expected, f"{cmd}: {out}"
        else:
            assert expected is None, f"{cmd}: expected JSON {expected}, got {out[:200]}"


def test_the_committed_quickstart_model_is_what_the_generator_writes(tmp_path):
    out = tmp_path / "row-stats.onnx"
    subprocess.run([sys.executable, str(ROOT / "tests" / "models" / "make_models.py"), "--row-stats", str(out)], check=True)
    assert out.read_bytes() == (ROOT / "models" / "row-stats" / "1" / "model.onnx").read_bytes()
    # And ONNX Runtime itself computes what the README shows.
    import numpy as np
    import onnxruntime as ort
    x = np.arange(1, 21, dtype=np.float32).reshape(2, 10)
    [stats] = ort.InferenceSession(str(out)).run(None, {"x": x})
    np.testing.assert_allclose(stats, [[55, 5.5, 10], [155, 15.5, 20]])
