"""The Helm chart: lint --strict, every values file renders to objects that validate strictly
against Kubernetes 1.37, the schema rejects wrong types, RBAC is least privilege, and the chart's
CRD copy is the generated one."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "kubemaas"
VALUES = [None, *sorted((CHART / "ci").glob("*.yaml"))]
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"


def helm(*args):
    h = os.environ.get("KUBEMAAS_HELM")
    if not h:
        pytest.fail("KUBEMAAS_HELM unset: run through `make test` (scripts/setup.sh --test installs helm)")
    return subprocess.run([h, *args], capture_output=True, text=True, timeout=120)


def render(values=None, *extra):
    args = ["template", "kubemaas", str(CHART), "-n", "kubemaas-system", *extra]
    if values:
        args += ["-f", str(values)]
    return helm(*args)


def test_chart_lints_strictly():
    p = helm("lint", "--strict", str(CHART))
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("values", VALUES, ids=["defaults", *[v.stem for v in VALUES[1:]]])
def test_rendered_chart_validates_strictly(values, tmp_path):
    p = render(values)
    assert p.returncode == 0, p.stderr
    # ServiceMonitor is a Prometheus Operator CRD: kubernetes-validate has no schema for it.
    docs = [d for d in yaml.safe_load_all(p.stdout) if d and d["kind"] != "ServiceMonitor"]
    out = tmp_path / "chart.yaml"
    out.write_text(yaml.safe_dump_all(docs))
    v = subprocess.run([str(VALIDATE), "--strict", "-k", "1.37.0", str(out)], capture_output=True, text=True, timeout=120)
    assert v.returncode == 0, v.stdout + v.stderr


def docs_of(*args):
    p = render(None, *args)
    assert p.returncode == 0, p.stderr
    return [d for d in yaml.safe_load_all(p.stdout) if d]


def test_defaults_run_two_replicas_restricted_and_read_only():
    d = next(x for x in docs_of() if x["kind"] == "Deployment")
    assert d["spec"]["replicas"] == 2
    pod = d["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["KUBEMAAS_LEADER_ELECT"] == "true" and env["KUBEMAAS_SERVER_IMAGE"] == "kubemaas/server:0.1.0"


def test_rbac_has_no_wildcards_and_no_secret_access():
    for d in docs_of():
        for rule in d.get("rules", []) if d["kind"] in ("ClusterRole", "Role") else []:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], rule
            assert "secrets" not in rule["resources"], rule


def test_watch_namespace_turns_the_cluster_role_into_a_role():
    kinds = {d["kind"] for d in docs_of("--set", "operator.watchNamespace=models")}
    assert "ClusterRole" not in kinds and "Role" in kinds


@pytest.mark.parametrize("bad", ["operator.replicas=two", "operator.logFormat=xml", "metrics.port=70000", "nonsense=1"])
def test_schema_rejects_wrong_values(bad):
    p = render(None, "--set", bad)
    assert p.returncode != 0 and "values don't meet the specifications of the schema" in p.stderr, p.stderr


def test_chart_crd_is_the_generated_one_and_is_kept_on_uninstall():
    generated = (ROOT / "crds" / "generated" / "modeldeployments.kubemaas.io.yaml").read_text()
    assert (CHART / "files" / "modeldeployments.kubemaas.io.yaml").read_text() == generated, \
        "copy crds/generated/*.yaml to charts/kubemaas/files/"
    crd = next(d for d in docs_of() if d["kind"] == "CustomResourceDefinition")
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crd["spec"] == yaml.safe_load(generated)["spec"]


def operator_env(*args, release="kubemaas"):
    p = helm("template", release, str(CHART), "-n", "kubemaas-system", *args)
    assert p.returncode == 0, p.stderr
    d = next(x for x in yaml.safe_load_all(p.stdout) if x and x["kind"] == "Deployment")
    return {e["name"]: e.get("value") for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_two_releases_in_one_namespace_elect_their_leaders_apart():
    # Both took the Lease "kubemaas-operator": one tenant's operator never acted, without an error.
    a = operator_env("--set", "operator.watchNamespace=team-a", release="team-a")
    b = operator_env("--set", "operator.watchNamespace=team-b", release="team-b")
    assert a["KUBEMAAS_LEADER_ELECTION_NAME"] != b["KUBEMAAS_LEADER_ELECTION_NAME"], (a, b)
    # The default release keeps the earlier charts' Lease: an upgrade never elects two leaders.
    assert operator_env()["KUBEMAAS_LEADER_ELECTION_NAME"] == "kubemaas-operator"


def test_large_numbers_from_a_values_file_reach_the_operator_as_integers(tmp_path):
    # A values file's numbers are floats to Helm: `quote` wrote 1000000 as "1e+06", which the
    # operator cannot parse as seconds, and crash-looped.
    values = tmp_path / "values.yaml"
    values.write_text("operator:\n  resyncSeconds: 1000000\n")
    assert operator_env("-f", str(values))["KUBEMAAS_RESYNC_SECONDS"] == "1000000"


def test_owner_references_that_block_deletion_are_allowed_by_rbac():
    # Children carry blockOwnerDeletion; with OwnerReferencesPermissionEnforcement (OpenShift)
    # that needs update on modeldeployments/finalizers, else every child is refused.
    role = next(d for d in docs_of() if d["kind"] == "ClusterRole")
    assert any("modeldeployments/finalizers" in r["resources"] and "update" in r["verbs"] for r in role["rules"]), \
        role["rules"]


def test_a_long_release_name_keeps_every_object_name_within_63_characters():
    p = helm("template", "x" * 50, str(CHART), "-n", "kubemaas-system")
    assert p.returncode == 0, p.stderr
    long = [(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(p.stdout)
            if d and d["kind"] in ("Service", "Deployment", "ServiceAccount", "NetworkPolicy")
            and len(d["metadata"]["name"]) > 63]
    assert not long, long


def test_every_operator_setting_can_be_given_and_extra_env_reaches_the_container():
    # A gRPC OTLP collector needs OTEL_EXPORTER_OTLP_PROTOCOL, which the chart could not set; nor
    # the reconcile concurrency or the lease duration.
    env = operator_env("--set", "operator.extraEnv[0].name=OTEL_EXPORTER_OTLP_PROTOCOL",
                       "--set", "operator.extraEnv[0].value=grpc",
                       "--set", "operator.maxConcurrentReconciles=32", "--set", "operator.leaseDurationSeconds=30")
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc", env
    assert env["KUBEMAAS_MAX_CONCURRENT_RECONCILES"] == "32", env
    assert env["KUBEMAAS_LEASE_DURATION"] == "30", env


@pytest.mark.parametrize("bad", ["operator.watchNamespace=Team_A", "serviceAccount.name=Bad Name",
                                 "operator.resources.limit.cpu=1", "operator.maxConcurrentReconciles=0",
                                 "operator.leaseDurationSeconds=2"])
def test_schema_rejects_names_and_settings_kubernetes_or_the_operator_would_refuse(bad):
    p = render(None, "--set", bad)
    assert p.returncode != 0 and "values don't meet the specifications of the schema" in p.stderr, p.stderr


def test_service_monitor_labels_may_name_a_chart_label_without_a_duplicate_key():
    p = render(None, "--set", "metrics.serviceMonitor.enabled=true",
               "--set", "metrics.serviceMonitor.labels.release=prom",
               "--set", "metrics.serviceMonitor.labels.app\\.kubernetes\\.io/name=ops")
    assert p.returncode == 0, p.stderr
    doc = next(d for d in p.stdout.split("\n---") if "kind: ServiceMonitor" in d)
    meta = doc.split("spec:")[0]
    assert meta.count("app.kubernetes.io/name:") == 1, meta
    labels = yaml.safe_load(doc)["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "ops" and labels["release"] == "prom", labels


def test_the_notes_send_the_first_model_to_the_namespace_the_operator_watches():
    # With watchNamespace set, the example applied in the current namespace was never reconciled.
    p = helm("install", "--dry-run=client", "kubemaas", str(CHART), "-n", "ops", "--set", "operator.watchNamespace=models")
    assert p.returncode == 0, p.stderr
    notes = p.stdout.split("NOTES:", 1)[1]
    assert "kubectl apply -n models -f -" in notes and "kubectl wait -n models" in notes, notes


def test_kustomize_base_is_the_rendered_chart():
    p = render(None)
    assert p.returncode == 0, p.stderr
    committed = (ROOT / "deploy" / "base" / "install.yaml").read_text().split("\n", 1)[1]
    assert committed == p.stdout, "deploy/base/install.yaml drifted from the chart: run `make manifests`"


def test_kustomize_build_validates_strictly(tmp_path):
    kubectl = Path(sys.executable).parent / "kubectl"
    p = subprocess.run([str(kubectl), "kustomize", str(ROOT / "deploy")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "kustomized.yaml"
    out.write_text(p.stdout)
    v = subprocess.run([str(VALIDATE), "--strict", "-k", "1.37.0", str(out)], capture_output=True, text=True, timeout=120)
    assert v.returncode == 0, v.stdout + v.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(p.stdout) if d)
    assert kinds == sorted(["Namespace", "ServiceAccount", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding",
                            "Role", "RoleBinding", "Service", "Deployment", "PodDisruptionBudget"])


def test_network_policy_admits_only_monitoring_to_the_metrics_port():
    assert not [d for d in docs_of() if d["kind"] == "NetworkPolicy"], "off by default"
    docs = docs_of("--set", "networkPolicy.enabled=true", "--set", "networkPolicy.monitoringNamespace=obs")
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    assert policy["spec"]["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": 8090, "protocol": "TCP"}]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "obs"}}}]
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBEMAAS_MONITORING_NAMESPACE"] == "obs"
    rules = [r for d in docs if d["kind"] == "ClusterRole" for r in d["rules"]]
    assert {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
            "verbs": ["get", "list", "watch", "create", "patch", "delete"]} in rules


def test_the_chart_keeps_the_operators_default_log_filter():
    # The chart always sets KUBEMAAS_LOG; a plain `info` brought back the per-request error line
    # of kube's client that the operator's own default silences (each failure is logged once).
    help_text = subprocess.run([str(ROOT / "target" / "debug" / "kubemaas-operator"), "--help"],
                               capture_output=True, text=True, timeout=60).stdout
    default = help_text.split("--log-level", 1)[1].split("[default: ", 1)[1].split("]", 1)[0]
    d = next(x for x in docs_of() if x["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBEMAAS_LOG"] == default == "info,kube_client::client::builder=off", (env["KUBEMAAS_LOG"], default)


def test_the_operator_listens_where_its_pod_ip_is_ipv4_or_ipv6():
    # The kubelet probes the operator at its pod IP; `[::]` takes both families (and IPv4 alone on
    # a node without IPv6), as the operator's own default does.
    help_text = subprocess.run([str(ROOT / "target" / "debug" / "kubemaas-operator"), "run", "--help"],
                               capture_output=True, text=True, timeout=60).stdout
    default = re.search(r"--metrics-addr[\s\S]*?\[default: (.*)\]", help_text).group(1)
    assert default == "[::]:8090", help_text
    assert operator_env()["KUBEMAAS_METRICS_ADDR"] == default
    assert operator_env("--set", "metrics.port=9100")["KUBEMAAS_METRICS_ADDR"] == "[::]:9100"


def pod_spec_of(values_yaml, tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(values_yaml)
    d = next(x for x in docs_of("-f", str(values)) if x["kind"] == "Deployment")
    return d["spec"]["template"]["spec"]


def test_image_pull_secrets_may_be_names_or_references(tmp_path):
    # `[regcred]` is the commonest way to write it; it rendered a list of strings, which the
    # apiserver refuses ("cannot unmarshal string into ... LocalObjectReference").
    spec = pod_spec_of("operator:\n  imagePullSecrets: [regcred, {name: mirror}]\n", tmp_path)
    assert spec["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]


@pytest.mark.parametrize("bad", [
    # A misspelt field is dropped by the apiserver, leaving a toleration of every effect.
    "operator:\n  tolerations: [{key: gpu, operator: Exists, efect: NoSchedule}]\n",
    "operator:\n  tolerations: [{key: gpu, operator: Exist}]\n",
    "operator:\n  tolerations: [{key: gpu, effect: NoSchedul}]\n",
    "operator:\n  tolerations: [{key: gpu, tolerationSeconds: soon}]\n",
    "operator:\n  tolerations: [NoSchedule]\n",
    "operator:\n  imagePullSecrets: [{secret: regcred}]\n",
    "operator:\n  imagePullSecrets: [Reg_Cred]\n",
    "operator:\n  imagePullSecrets: [42]\n",
])
def test_schema_rejects_tolerations_and_pull_secrets_kubernetes_would_misread(bad, tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(bad)
    p = render(values)
    assert p.returncode != 0 and "values don't meet the specifications of the schema" in p.stderr, (bad, p.stderr)


def test_well_formed_tolerations_render_as_given(tmp_path):
    given = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
             {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
              "tolerationSeconds": 30},
             {"key": "team", "operator": "Equal", "value": "ml"}]
    spec = pod_spec_of(yaml.safe_dump({"operator": {"tolerations": given}}), tmp_path)
    assert spec["tolerations"] == given


def test_image_references_follow_the_crds_rule_and_the_operator_may_be_pinned_by_digest():
    crd = yaml.safe_load((ROOT / "crds" / "generated" / "modeldeployments.kubemaas.io.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    rule = spec["image"]["x-kubernetes-validations"][0]["rule"]
    schema = json.loads((CHART / "values.schema.json").read_text())
    server = schema["properties"]["server"]["properties"]
    assert rule == f"self.matches('{server['image']['pattern']}')" == f"self.matches('{server['cudaImage']['pattern']}')"
    digest = "sha256:" + "ab" * 32
    d = next(x for x in docs_of("--set", f"operator.image.digest={digest}", "--set", "operator.image.tag=9.9")
             if x["kind"] == "Deployment")
    assert d["spec"]["template"]["spec"]["containers"][0]["image"] == f"kubemaas/operator@{digest}"
    d = next(x for x in docs_of("--set", "operator.image.repository=registry.example.com:5000/ml/operator")
             if x["kind"] == "Deployment")
    assert d["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example.com:5000/ml/operator:0.1.0"


@pytest.mark.parametrize("bad", ["server.image=kubemaas/server: 0.2", "server.cudaImage=KubeMaaS/server-cuda",
                                 "operator.image.repository=kubemaas/operator:0.1", "operator.image.tag=v 1",
                                 "operator.image.digest=sha256:abc"])
def test_schema_rejects_images_the_kubelet_cannot_pull(bad):
    p = render(None, "--set", bad)
    assert p.returncode != 0 and "values don't meet the specifications of the schema" in p.stderr, p.stderr


@pytest.mark.parametrize("env", [
    [{"name": "DEBUG", "value": True}],                    # the apiserver wants a string
    [{"name": "B", "valu": "x"}],                          # dropped by the apiserver: B is empty
    [{"name": "KUBEMAAS_LOG", "value": "debug"}],          # the chart sets it (use operator.logLevel)
    [{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://b:4317"}],
    # The chart grants the Lease in the release namespace only: elsewhere every replica would
    # wait for leadership forever on forbidden errors.
    [{"name": "KUBEMAAS_LEADER_ELECTION_NAMESPACE", "value": "elsewhere"}],
], ids=["not a string", "misspelt key", "set by the chart", "set by the chart when given", "lease moved off its role"])
def test_schema_rejects_extra_env_the_apiserver_would_refuse_or_drop(env, tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"operator": {"extraEnv": env}}))
    p = render(values)
    assert p.returncode != 0 and "values don't meet the specifications of the schema" in p.stderr, p.stderr


def test_extra_env_may_take_values_from_the_downward_api_or_a_secret(tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"operator": {"extraEnv": [
        {"name": "OTEL_EXPORTER_OTLP_PROTOCOL", "value": "grpc"},
        {"name": "OTEL_EXPORTER_OTLP_HEADERS", "valueFrom": {"secretKeyRef": {"name": "otel", "key": "headers"}}},
    ]}}))
    p = render(values)
    assert p.returncode == 0, p.stderr


def test_two_replicas_get_a_disruption_budget_and_prefer_different_nodes():
    # Without either, both replicas could share one node and one drain would take leader and
    # standby together.
    docs = docs_of()
    d = next(x for x in docs if x["kind"] == "Deployment")
    pdb = next(x for x in docs if x["kind"] == "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == d["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 1
    spread = d["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    term = spread[0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == d["spec"]["selector"]["matchLabels"]
    # One replica: nothing to keep apart, and a budget of one would block every drain.
    one = docs_of("--set", "operator.replicas=1")
    assert not any(x["kind"] == "PodDisruptionBudget" for x in one)
    assert "affinity" not in next(x for x in one if x["kind"] == "Deployment")["spec"]["template"]["spec"]
    # An affinity given replaces the default.
    given = docs_of("--set", "operator.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
                    ".nodeSelectorTerms[0].matchExpressions[0].key=pool",
                    "--set", "operator.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
                    ".nodeSelectorTerms[0].matchExpressions[0].operator=Exists")
    affinity = next(x for x in given if x["kind"] == "Deployment")["spec"]["template"]["spec"]["affinity"]
    assert list(affinity) == ["nodeAffinity"]


def test_an_existing_service_account_may_be_used_and_annotated_accounts_created():
    docs = docs_of("--set", "serviceAccount.create=false", "--set", "serviceAccount.name=existing")
    assert not any(x["kind"] == "ServiceAccount" for x in docs)
    d = next(x for x in docs if x["kind"] == "Deployment")
    assert d["spec"]["template"]["spec"]["serviceAccountName"] == "existing"
    bound = [s["name"] for x in docs if x["kind"] in ("RoleBinding", "ClusterRoleBinding") for s in x["subjects"]]
    assert bound and set(bound) == {"existing"}, bound
    # Workload identity (IRSA, GKE) is an annotation on the account.
    docs = docs_of("--set", "serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::1:role/x")
    sa = next(x for x in docs if x["kind"] == "ServiceAccount")
    assert sa["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}
    # Not creating one needs its name, and annotations for an account the chart does not create
    # would do nothing.
    p = render(None, "--set", "serviceAccount.create=false")
    assert p.returncode != 0 and "serviceAccount.name" in p.stderr, p.stderr
    p = render(None, "--set", "serviceAccount.create=false", "--set", "serviceAccount.name=existing",
               "--set", "serviceAccount.annotations.a=b")
    assert p.returncode != 0 and "serviceAccount.annotations" in p.stderr, p.stderr


def test_the_pod_security_context_may_leave_the_user_to_the_platform():
    # OpenShift's restricted SCC assigns each namespace its own UID range and refuses 65532.
    d = next(x for x in docs_of("--set", "operator.podSecurityContext.runAsUser=null",
                                "--set", "operator.podSecurityContext.runAsGroup=null") if x["kind"] == "Deployment")
    ctx = d["spec"]["template"]["spec"]["securityContext"]
    assert "runAsUser" not in ctx and "runAsGroup" not in ctx and ctx["runAsNonRoot"] is True, ctx
    d = next(x for x in docs_of() if x["kind"] == "Deployment")
    assert d["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 65532


@pytest.mark.parametrize("bad", ["often", "", "30"])
def test_schema_rejects_a_scrape_interval_prometheus_would_refuse(bad):
    p = render(None, "--set", "metrics.serviceMonitor.enabled=true", "--set", f"metrics.serviceMonitor.interval={bad}")
    assert p.returncode != 0 and "values don't meet the specifications of the schema" in p.stderr, p.stderr


def test_a_fractional_scrape_interval_may_be_given_with_set():
    # `--set` passes 0.5 to the schema as a string; the schema refused it ("got string, want
    # number") although a values file with the same number works.
    for how in (["--set", "operator.metricsIntervalSeconds=0.5"], ["--set-json", "operator.metricsIntervalSeconds=0.5"]):
        assert operator_env(*how)["KUBEMAAS_METRICS_INTERVAL"] == "0.5", how
    for bad in ("0", "-1", "fast", "90000", "90000.5", "86400.5"):
        p = render(None, "--set", f"operator.metricsIntervalSeconds={bad}")
        assert p.returncode != 0 and "values don't meet the specifications of the schema" in p.stderr, (bad, p.stderr)
    # A string over the operator's limit (86400) was let through by the pattern, and the operator
    # then refused it at start: a crash-looping pod instead of a failed install.
    for bad in ("99999", "86401", "86400.01"):
        p = render(None, "--set-string", f"operator.metricsIntervalSeconds={bad}")
        assert p.returncode != 0 and "values don't meet the specifications of the schema" in p.stderr, (bad, p.stderr)
    for good in ("86400", "86399.5", "79999.9", "1.25", "0.01"):
        assert operator_env("--set-string", f"operator.metricsIntervalSeconds={good}")["KUBEMAAS_METRICS_INTERVAL"] == good


def test_the_operator_pod_mounts_its_token_even_under_an_account_that_turns_it_off():
    # With serviceAccount.create=false and an existing account set to automountServiceAccountToken:
    # false (a common hardening), the pod got no token and the operator could not reach the
    # apiserver; the pod's own setting wins over the account's.
    for args in ((), ("--set", "serviceAccount.create=false", "--set", "serviceAccount.name=existing")):
        d = next(x for x in docs_of(*args) if x["kind"] == "Deployment")
        assert d["spec"]["template"]["spec"]["automountServiceAccountToken"] is True, args
        assert d["spec"]["template"]["spec"]["serviceAccountName"] != "", args
