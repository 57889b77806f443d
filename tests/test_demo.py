"""`make demo` run as CI runs it (DEMO_ONESHOT=1): a local control plane, the operator, real servers
behind the fake pods, a ModelDeployment that becomes Ready, predictions, and the status the
operator wrote from the pods' own metrics; then a clean teardown. The first run on a machine
builds the control plane from Go modules (cached for `make e2e` after it)."""

import json
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def leftovers():
    """Processes the demo started that are still running."""
    out = subprocess.run(["pgrep", "-af", "kubemaas-podrunner|run --watch-namespace demo|kubemaas-demo"],
                         capture_output=True, text=True).stdout
    return [l for l in out.splitlines() if "pgrep" not in l]


def test_make_demo_oneshot_serves_predicts_reports_metrics_and_tears_down():
    env = {**os.environ, "DEMO_ONESHOT": "1"}
    p = subprocess.run(["make", "demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "modeldeployment.kubemaas.io/row-stats condition met" in out, out[-4000:]
    # Each of the 2 pods answered a real inference: [sum, mean, max] of each row.
    answers = re.findall(r"^127\.\d+\.\d+\.\d+: (\{.*\})$", out, re.M)
    assert len(answers) == 2, out[-4000:]
    for a in answers:
        assert json.loads(a)["outputs"][0]["data"] == [55.0, 5.5, 10.0, 155.0, 15.5, 20.0]
    # kubectl get mdep -o wide: Ready and why, 2 replicas, a request rate and a p99 from live traffic.
    row = re.search(r"^row-stats\s+(\S+)\s+CPUExecutionProvider\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+\S+$",
                    out, re.M)
    assert row, out[-4000:]
    replicas, ready, reason = row.group(2), row.group(3), row.group(4)
    rps, p99 = float(row.group(5)), float(row.group(6))
    assert (replicas, ready, reason) == ("2", "True", "MinimumReplicasAvailable")
    assert rps > 10 and p99 > 0, row.group(0)
    metrics = json.loads(re.search(r"^status\.metrics: (\{.*\})$", out, re.M).group(1))
    assert metrics["pods"] == 2 and metrics["requestsPerSecond"] == rps, metrics
    inputs = json.loads(re.search(r"^status\.model\.inputs: (\[.*\])$", out, re.M).group(1))
    assert inputs == [{"datatype": "FP32", "name": "x", "shape": [-1, 10]}]
    assert "==> tearing down" in out
    assert leftovers() == [], leftovers()
