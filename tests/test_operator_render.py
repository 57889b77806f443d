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


def test_cuda_example_batching_reaches_the_server_flags():
    args = children("cuda")["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    flags = dict(zip(args, args[1:]))
    assert (flags["--max-batch-size"], flags["--max-queue-delay-us"], flags["--max-queue-size"]) == ("32", "2000", "512")


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


MD_HEAD = "apiVersion: kubemaas.io/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: m\nspec:\n  model:\n    uri: s3://models/m.onnx\n"


def render_text(text: str, tmp_path):
    f = tmp_path / "in.yaml"
    f.write_text(text)
    return render(f)


@pytest.mark.parametrize("extra,expected", [
    ("  acelerator: cuda\n", 'unknown field "spec.acelerator" (did you mean "accelerator"?)'),
    ("  replcas: 2\n", 'unknown field "spec.replcas" (did you mean "replicas"?)'),
    ("  gpu:\n    cuont: 1\n", 'unknown field "spec.gpu.cuont" (did you mean "count"?)'),
    ("  replicas: \"3\"\n", 'spec.replicas: expected integer, got string "3"'),
    ("  runtime:\n    instances: many\n", 'spec.runtime.instances: expected integer, got string "many"'),
    ("  rollout:\n    maxSurge: true\n", "spec.rollout.maxSurge: expected integer or string, got boolean true"),
], ids=["accelerator-typo", "replicas-typo", "nested-typo", "quoted-int", "word-for-int", "bool-for-int-or-string"])
def test_render_refuses_unknown_fields_and_wrong_types_naming_the_path(extra, expected, tmp_path):
    # What the apiserver's strict field validation (kubectl apply's default) refuses.
    p = render_text(MD_HEAD + extra, tmp_path)
    assert p.returncode == 1, p.stdout
    assert expected in p.stderr, p.stderr
    assert p.stdout == ""
    assert "backtrace" not in p.stderr.lower()


@pytest.mark.parametrize("text,expected", [
    ("", "holds no ModelDeployment"),
    ("# only a comment\n---\n", "holds no ModelDeployment"),
    ("apiVersion: v1\nkind: Secret\nmetadata:\n  name: s3-creds\n", "found Secret/s3-creds"),
    (MD_HEAD.replace("v1alpha1", "v1beta1"), 'apiVersion: expected "kubemaas.io/v1alpha1"'),
], ids=["empty", "comment-only", "other-kind", "other-version"])
def test_render_errors_on_input_without_a_model_deployment(text, expected, tmp_path):
    p = render_text(text, tmp_path)
    assert p.returncode == 1
    assert expected in p.stderr, p.stderr


def test_render_still_renders_a_manifest_with_a_secret_beside_it(tmp_path):
    p = render_text("apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\n---\n" + MD_HEAD, tmp_path)
    assert p.returncode == 0, p.stderr
    assert [d["kind"] for d in yaml.safe_load_all(p.stdout) if d] == ["Deployment", "Service"]


def test_api_keys_example_mounts_the_secret_in_the_server_only():
    d = children("api-keys")["Deployment"]["spec"]["template"]["spec"]
    server, pull = d["containers"][0], d["initContainers"][0]
    assert "--api-keys-file" in server["args"]
    assert server["args"][server["args"].index("--api-keys-file") + 1] == "/var/run/secrets/kubemaas/api-keys/keys"
    assert any(m["name"] == "api-keys" and "subPath" not in m for m in server["volumeMounts"])
    assert not any(m["name"] == "api-keys" for m in pull["volumeMounts"])
    vol = next(v for v in d["volumes"] if v["name"] == "api-keys")
    assert vol["secret"]["secretName"] == "classifier-callers"
    assert vol["secret"]["items"] == [{"key": "keys", "path": "keys"}]


def test_tls_example_mounts_the_certificates_probes_the_metrics_port_and_isolates_the_pods():
    objs = children("tls-network-policy")
    d = objs["Deployment"]["spec"]["template"]["spec"]
    server, pull = d["containers"][0], d["initContainers"][0]
    args = server["args"]
    flag = lambda f: args[args.index(f) + 1]  # noqa: E731
    assert flag("--tls-cert") == "/var/run/secrets/kubemaas/tls/tls.crt"
    assert flag("--tls-key") == "/var/run/secrets/kubemaas/tls/tls.key"
    assert flag("--tls-client-ca") == "/var/run/secrets/kubemaas/client-ca/ca.crt"
    vols = {v["name"]: v["secret"] for v in d["volumes"] if "secret" in v}
    assert vols["tls"]["secretName"] == "ranker-tls" and vols["client-ca"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    assert not any(m["name"] in ("tls", "client-ca") for m in pull["volumeMounts"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"]["port"] == "metrics", probe
    policy = objs["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"]["kubemaas.io/model-deployment"] == "ranker"
    inference, metrics = policy["ingress"]
    assert inference["from"] == [{"namespaceSelector": {"matchLabels": {"team": "search"}}}]
    assert [p["port"] for p in inference["ports"]] == [8080, 8081]
    assert metrics["from"][0] == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    assert [p["port"] for p in metrics["ports"]] == [9090]


def test_every_example_has_its_own_name_so_all_can_be_applied_together():
    names = [d["metadata"]["name"] for e in EXAMPLES for d in yaml.safe_load_all(e.read_text())
             if d and d["kind"] == "ModelDeployment"]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


HTTP_HOSTS = ["http://999.1.1.1/m.onnx", "http://1.2.3.4.5/m.onnx", "https://[:::]/m.onnx",
              "https://[1::2::3]/m.onnx", "http://host.123/m.onnx", "http://256.0.0.1:8080/m.onnx",
              "http://127.0.0.2/m.onnx", "http://127.255.255.254/m.onnx", "https://[::1]:8443/m.onnx",
              "https://[0:0::1]/m.onnx", "https://models.example.com/m.onnx", "http://a-1.b_2.example/m.onnx",
              "https://[12345::1]/m.onnx", "https://[1:2:3:4:5:6:7:8:9]/m.onnx", "https://[1:2:3]/m.onnx",
              "https://[::ffff:127.0.0.7]/m.onnx", "https://[0:0:0:0:0:0:0::]/m.onnx", "https://[::]/m.onnx",
              "https://[0:0:0:0:0:0:0:1]/m.onnx"]


@pytest.mark.parametrize("uri", HTTP_HOSTS)
def test_the_crd_accepts_exactly_the_http_hosts_the_puller_can_parse(uri, tmp_path):
    # The CRD's URI rule and `pull`'s URL parser must agree: a host the rule lets through but the
    # parser refuses surfaces only later, as DownloadFailed. (Shorthand IPv4 forms a URL parser
    # also reads, such as 0x7f.1 or 1.2.3, are refused on purpose: no one means them.) In a
    # network namespace of its own (unshare), a parseable URI fails to connect or is refused as
    # private, never as an invalid URI.
    accepted = render_text(MD_HEAD.replace("s3://models/m.onnx", uri), tmp_path).returncode == 0
    server = ROOT / "target" / "debug" / "kubemaas-server"
    # Every valid address here is a loopback one and host names are pinned to loopback, so nothing
    # is looked up and nothing could leave the machine even outside the network namespace.
    pinned = [f"--resolve={h}=127.0.0.1" for h in ("models.example.com", "a-1.b_2.example")]
    p = subprocess.run(["unshare", "--net", "--", str(server), "pull", uri, str(tmp_path / "m.onnx"),
                        "--retries", "0", "--termination-log", str(tmp_path / "t"), *pinned],
                       capture_output=True, text=True, timeout=60)
    parsed = "invalid model URI" not in p.stderr
    assert p.returncode != 0, p.stderr
    assert accepted == parsed, f"CRD {'accepts' if accepted else 'refuses'}, pull says: {p.stderr.strip()}"


@pytest.mark.parametrize("image", [
    "kubemaas/server:0.1.0", "server", "registry.example.com:5000/team/kubemaas-server:v1.2_rc.3",
    "ghcr.io/org/kubemaas__server@sha256:" + "a" * 64, "localhost/ns/server:0.1@sha256:" + "0f" * 32,
    "registry-1.docker.io/library/server:LATEST",
])
def test_image_references_the_kubelet_can_pull_are_accepted(image, tmp_path):
    p = render_text(MD_HEAD + f"  image: \"{image}\"\n", tmp_path)
    assert p.returncode == 0, p.stderr
    d = next(d for d in yaml.safe_load_all(p.stdout) if d and d["kind"] == "Deployment")
    assert d["spec"]["template"]["spec"]["containers"][0]["image"] == image


def test_render_refuses_an_ip_block_the_apiserver_would_refuse(tmp_path):
    # The NetworkPolicy is applied before the Deployment; a CIDR it cannot hold is refused here,
    # in GitOps CI, and as InvalidSpec in status, instead of at apply time.
    p = render_text(MD_HEAD + "  networkPolicy:\n    inferenceFrom:\n    - ipBlock: {cidr: 127.0.0.0/8, except: ['2001:db8::/32']}\n",
                    tmp_path)
    assert p.returncode == 1 and p.stdout == "", p.stdout
    assert 'networkPolicy.inferenceFrom[0].ipBlock.except[0] "2001:db8::/32" must lie inside' in p.stderr, p.stderr
