"""GitOps and images: the Argo CD health check (run by a real Lua 5.4 interpreter, lupa's) maps our conditions
to Healthy/Progressing/Degraded; the argocd-cm patch carries the same script; every Dockerfile
passes hadolint."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GITOPS = ROOT / "deploy" / "gitops"


def lua_value(v):
    if isinstance(v, dict):
        return "{" + ", ".join(f"[{lua_value(k)}] = {lua_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "{" + ", ".join(lua_value(x) for x in v) + "}"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def health(obj, tmp_path):
    # Argo CD runs health checks with gopher-lua (Lua 5.1 semantics); the script uses nothing that
    # differs between 5.1 and 5.4.
    from lupa.lua54 import LuaRuntime

    lua = LuaRuntime()
    out = lua.execute(f"obj = {lua_value(obj)}\nlocal hs = dofile({lua_value(str(GITOPS / 'argocd-health.lua'))})\n"
                      "return hs.status .. '|' .. hs.message\n")
    return tuple(out.split("|", 1))


def cond(t, s, r, m="msg"):
    return {"type": t, "status": s, "reason": r, "message": m}


@pytest.mark.parametrize("status,generation,expected", [
    (None, 1, "Progressing"),
    ({"observedGeneration": 1, "conditions": [cond("Ready", "True", "MinimumReplicasAvailable"), cond("Degraded", "False", "Healthy")]}, 1, "Healthy"),
    ({"observedGeneration": 1, "conditions": [cond("Ready", "True", "MinimumReplicasAvailable")]}, 2, "Progressing"),
    ({"observedGeneration": 1, "conditions": [cond("Ready", "True", "MinimumReplicasAvailable"), cond("Degraded", "True", "OOMKilled")]}, 1, "Degraded"),
    ({"observedGeneration": 1, "conditions": [cond("ModelLoaded", "False", "ChecksumMismatch"), cond("Ready", "False", "InsufficientReplicas")]}, 1, "Degraded"),
    ({"observedGeneration": 1, "conditions": [cond("Scheduled", "False", "Unschedulable", "0/6 nodes"), cond("Ready", "False", "InsufficientReplicas")]}, 1, "Progressing"),
    ({"observedGeneration": 1, "conditions": [cond("Ready", "False", "InvalidSpec", "bad name")]}, 1, "Degraded"),
    # Parked with `kubectl scale --replicas=0`: nothing serves, by choice (Argo's state for that).
    ({"observedGeneration": 1, "conditions": [cond("Ready", "False", "ScaledToZero"), cond("ModelLoaded", "False", "ScaledToZero")]}, 1, "Suspended"),
    # The same from an operator before ModelLoaded said ScaledToZero.
    ({"observedGeneration": 1, "conditions": [cond("Ready", "False", "ScaledToZero"), cond("ModelLoaded", "Unknown", "NoPods")]}, 1, "Suspended"),
    # The Deployment gave up (its progress deadline), as Argo CD judges a Deployment so: Degraded.
    ({"observedGeneration": 1, "conditions": [cond("Ready", "False", "RolloutStuck", "the rollout stopped")]}, 1, "Degraded"),
], ids=["no-status", "ready", "stale-generation", "oom", "checksum", "unschedulable", "invalid-spec", "scaled-to-zero",
        "scaled-to-zero-before", "rollout-stuck"])
def test_argocd_health_maps_conditions(status, generation, expected, tmp_path):
    obj = {"metadata": {"generation": generation}}
    if status is not None:
        obj["status"] = status
    got, message = health(obj, tmp_path)
    assert got == expected, message
    if expected == "Progressing" and status and "Unschedulable" in str(status):
        assert "Unschedulable: 0/6 nodes" in message


def test_argocd_cm_patch_carries_the_same_script():
    import yaml
    patch = yaml.safe_load((GITOPS / "argocd-cm-patch.yaml").read_text())
    script = patch["data"]["resource.customizations.health.kubemaas.io_ModelDeployment"]
    assert script.strip() == (GITOPS / "argocd-health.lua").read_text().strip()


@pytest.mark.parametrize("dockerfile", sorted((ROOT / "images").glob("*.Dockerfile")), ids=lambda p: p.stem)
def test_dockerfiles_pass_hadolint(dockerfile):
    hadolint = Path(sys.executable).parent / "hadolint"
    p = subprocess.run([str(hadolint), str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    text = dockerfile.read_text()
    assert "USER 65532" in text, "images run as non-root"
