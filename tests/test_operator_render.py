"""`kubemaas-operator render` on every example: the output is valid Kubernetes (kubernetes-validate
--strict), carries what the use case needs, and invalid manifests are refused with the CRD's message."""

import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
OPERATOR = ROOT / "target" / "debug" / "kubemaas-operator"
EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
INVALID = sorted((ROOT / "deploy" / "invalid").glob("*.yaml"))
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"


def render(path: Path):
    p = subprocess.run([str(OPERATOR), "render", "-f", str(path)], capture_output=True, text=True, timeout=60)
    return p


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
def test_render_output_validates_strictly(example, tmp_path):
    p = render(example)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "rendered.yaml"
    out.write_text(p.stdout)
    v = subprocess.run([str(VALIDATE), "--strict", "-k", "1.37.0", str(out)], capture_output=True, text=True, timeout=120)
    assert v.returncode == 0, v.stdout + v.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(p.stdout) if d]
    assert kinds[:2] == ["Deployment", "Service"]
    assert v.stdout.count("passed") == len(kinds)


def children(name):
    p = render(ROOT / "deploy" / "examples" / f"{name}.yaml")
    assert p.returncode == 0, p.stderr
    return {d["kind"]: d for d in yaml.safe_load_all(p.stdout) if d}


def test_cuda_example_requests_a_gpu_on_the_named_product():
    pod = children("cuda")["Deployment"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_mig_example_requests_the_mig_resource():
    limits = children("mig")["Deployment"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/mig-1g.10gb"] == "1" and "nvidia.com/gpu" not in limits


def test_autoscaled_example_has_hpa_and_pdb_and_leaves_replicas_to_the_hpa():
    c = children("autoscaled")
    assert c["HorizontalPodAutoscaler"]["spec"]["maxReplicas"] == 10
    assert c["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    assert "replicas" not in c["Deployment"]["spec"]


def test_credentials_reach_only_the_download_container():
    pod = children("s3-credentials")["Deployment"]["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["envFrom"] == [{"secretRef": {"name": "s3-creds", "optional": False}}]
    assert "envFrom" not in pod["containers"][0]


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
def test_examples_validate_against_the_crd_schema(example):
    crd = yaml.safe_load((ROOT / "crds" / "generated" / "modeldeployments.kubemaas.io.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for doc in yaml.safe_load_all(example.read_text()):
        if doc and doc["kind"] == "ModelDeployment":
            jsonschema.validate(doc, schema)


@pytest.mark.parametrize("manifest", INVALID, ids=[e.stem for e in INVALID])
def test_invalid_manifests_are_refused_with_the_crd_message(manifest):
    expected = next(ln for ln in manifest.read_text().splitlines() if ln.startswith("# expect: "))[len("# expect: "):]
    p = render(manifest)
    assert p.returncode != 0
    assert expected in p.stderr, p.stderr
