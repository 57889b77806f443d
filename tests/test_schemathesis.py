"""Schemathesis against our OpenAPI description of the REST surface (docs/openapi/v2-rest.yaml).

One seeded `schemathesis run` (all four phases: examples, coverage, fuzzing, stateful) drives the
real server on 127.0.0.1 with at least 1,000 generated requests. The HAR report it writes holds
every request and response; from it the tests check that no answer was a 5xx, that every 4xx
carries `{"error": "<string>"}`, and that the run was that big. Schemathesis' own checks verify
that the server answers what the description says (status codes, content types, schemas, and that
schema-violating requests are refused). Afterwards the server must still be live, infer correctly
and shut down cleanly.

The description is generic: model names and input names are any strings, so nearly every
generated name would be answered 404 / 400 before any tensor is decoded. For the run only, a copy
of it offers the served models' names, versions and input names (and small shapes and data) as
alternatives next to the generic schemas, so that generated requests also reach decoding and
ONNX Runtime; and the versioned inference route goes without the optional
Inference-Header-Content-Length (see run_spec).

Deterministic for CI: a fixed seed, no example database, one worker. Schemathesis' `too_slow`
health check is suppressed: it times data generation, which depends on the machine's load, not on
the server. The other health checks stay on.

On a failure the assertion lists each offending exchange (method, URL, headers, body, answer),
ready to replay with curl.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from conftest import ROOT, Server

SPEC = ROOT / "docs" / "openapi" / "v2-rest.yaml"
SEED = 20240514
MAX_EXAMPLES = 30          # per operation and phase; about 1,500 requests in all
MIN_REQUESTS = 1000
# Schemathesis' checks that compare the server with the description. Left out:
# positive_data_acceptance (a schema-valid request for another model's inputs is rightly 400: the
# description cannot know each model's signature).
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance", "negative_data_rejection",
          "missing_required_header", "use_after_free", "ensure_resource_availability",
          "unsupported_method", "allow_header_conformance"]

# Served models (tests/models/make_models.py and the committed quick-start model): every tensor
# type, one and two inputs, two versions, and a model whose shape comes from an input.
MODELS = ["row-stats", "model", "arith", "dtypes", "versioned", "reshape"]
INPUTS = ["x", "a", "b", "shape"] + [f"in_{t}" for t in (
    "bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
    "fp16", "bf16", "fp32", "fp64", "bytes")]
ROW_STATS_REQUEST = {"inputs": [{"name": "x", "shape": [1, 10], "datatype": "FP32", "data": list(range(1, 11))}]}


def st_binary():
    exe = Path(sys.executable).with_name("schemathesis")
    if not exe.exists():
        pytest.fail(f"{exe} missing: schemathesis is in tests/requirements.txt; run scripts/setup.sh --test")
    return exe


def run_spec(tmp: Path) -> Path:
    """The description with the served names offered beside the generic schemas."""
    spec = yaml.safe_load(SPEC.read_text())
    params = spec["components"]["parameters"]
    schemas = spec["components"]["schemas"]

    def also(values, generic):
        return {"anyOf": [{"type": "string", "enum": values}, generic]}

    for p in ("ModelName", "V1ModelName"):
        params[p]["schema"] = also(MODELS + ["no-such-model"], params[p]["schema"])
    for p in ("ModelVersion", "V1ModelVersion"):
        params[p]["schema"] = also(["1", "2", "3"], params[p]["schema"])
    inp = schemas["InferenceRequestInput"]["properties"]
    inp["name"] = also(INPUTS, inp["name"])
    inp["shape"] = {"anyOf": [
        {"type": "array", "maxItems": 3, "items": {"type": "integer", "minimum": 0, "maximum": 3}},
        inp["shape"]]}
    data = schemas["TensorData"]
    schemas["TensorData"] = {"anyOf": [
        {"type": "array", "maxItems": 6, "items": {"type": "integer", "minimum": -3, "maximum": 3}},
        {k: v for k, v in data.items() if k != "nullable"}],
        "nullable": True, "description": data["description"]}
    # Schemathesis sends the optional Inference-Header-Content-Length on most requests, and almost
    # any value cuts the JSON short (400 before anything else is read). The unversioned route keeps
    # it; the versioned one goes without, so its bodies are read as JSON.
    versioned_infer = spec["paths"]["/v2/models/{model_name}/versions/{model_version}/infer"]["post"]
    versioned_infer["parameters"] = [p for p in versioned_infer["parameters"]
                                     if p != {"$ref": "#/components/parameters/InferenceHeaderContentLength"}]
    out = tmp / "v2-rest.run.yaml"
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def describe(entry) -> str:
    """An exchange from the HAR report, as a reproduction."""
    req, resp = entry["request"], entry["response"]
    skip = {"user-agent", "accept-encoding", "accept", "connection", "content-length", "x-schemathesis-testcaseid"}
    headers = {h["name"]: h["value"] for h in req["headers"] if h["name"].lower() not in skip}
    body = req.get("postData", {}).get("text")
    text = resp.get("content", {}).get("text", "")
    return (f"{req['method']} {req['url']}\n  headers: {json.dumps(headers)}\n  body: {body!r}\n"
            f"  -> {resp['status']} {resp.get('content', {}).get('mimeType')} {text[:300]!r}")


@pytest.fixture(scope="module")
def fuzzed(repo_dir, tmp_path_factory):
    """Runs schemathesis once against a fresh server; yields (server, HAR entries, st output, rc)."""
    d = tmp_path_factory.mktemp("schemathesis")
    repo = d / "repository"
    for m in MODELS:
        if m == "row-stats":
            (repo / m / "1").mkdir(parents=True)
            (repo / m / "1" / "model.onnx").symlink_to(ROOT / "models" / "row-stats" / "1" / "model.onnx")
        else:
            (repo / m).mkdir(parents=True)
            for version in (repo_dir / m).iterdir():
                (repo / m / version.name).symlink_to(version, target_is_directory=True)
    s = Server(["--model-repository", str(repo), "--instances", "1",
                "--max-request-bytes", str(1 << 20)], d / "server.log")
    try:
        index = s.wait_loaded()
        assert all(m["state"] == "READY" for m in index), index
        spec = run_spec(d)
        report = d / "report"
        cmd = [str(st_binary()), "--no-color", "run", str(spec), "--url", s.url,
               "--seed", str(SEED), "--max-examples", str(MAX_EXAMPLES), "--workers", "1",
               "--generation-database", "none", "--suppress-health-check", "too_slow",
               "--checks", ",".join(CHECKS), "--request-timeout", "30",
               "--report", "har,junit", "--report-dir", str(report),
               "--report-har-path", str(report / "run.har"), "--report-junit-path", str(report / "junit.xml")]
        started = time.monotonic()
        # cwd: a fresh folder, so no schemathesis.toml or .hypothesis of the checkout is picked up.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SCHEMATHESIS_", "HYPOTHESIS_"))}
        env.update(NO_PROXY="127.0.0.1", no_proxy="127.0.0.1", COLUMNS="120")
        p = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=600)
        elapsed = time.monotonic() - started
        (d / "st.log").write_text(p.stdout + p.stderr)
        har = report / "run.har"
        assert har.exists(), f"schemathesis wrote no report (rc {p.returncode}):\n{p.stdout[-5000:]}\n{p.stderr[-5000:]}"
        entries = json.loads(har.read_text())["log"]["entries"]
        print(f"schemathesis: {len(entries)} requests in {elapsed:.1f} s, rc {p.returncode}; log {d / 'st.log'}")
        yield s, entries, p.stdout + p.stderr, p.returncode
    finally:
        code = s.stop()
    assert code == 0, f"server exited with {code}; log at {s.log_path}"


def test_at_least_1000_requests_were_generated(fuzzed):
    _, entries, out, _ = fuzzed
    assert len(entries) >= MIN_REQUESTS, out[-3000:]
    operations = {(e["request"]["method"], e["request"]["url"].split("/")[3]) for e in entries}
    assert {("GET", "v2"), ("POST", "v2"), ("GET", "v1"), ("POST", "v1")} <= operations


def test_no_response_is_a_server_error(fuzzed):
    _, entries, _, _ = fuzzed
    bad = [describe(e) for e in entries if e["response"]["status"] >= 500 or e["response"]["status"] == 0]
    assert not bad, f"{len(bad)} server errors:\n" + "\n".join(bad[:20])


def test_every_4xx_is_a_json_error_object(fuzzed):
    _, entries, _, _ = fuzzed
    bad = []
    for e in entries:
        resp = e["response"]
        if not 400 <= resp["status"] < 500:
            continue
        content = resp.get("content", {})
        try:
            ok = (content.get("mimeType", "").startswith("application/json")
                  and isinstance(json.loads(content.get("text", ""))["error"], str))
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            bad.append(describe(e))
    assert not bad, f"{len(bad)} 4xx answers without {{\"error\": str}}:\n" + "\n".join(bad[:20])


def test_generated_requests_reach_the_models(fuzzed):
    # Not only 404s: inference requests got through to decoding and to ONNX Runtime.
    _, entries, _, _ = fuzzed
    infer = [e for e in entries if e["request"]["method"] == "POST" and e["request"]["url"].endswith(("/infer", ":predict"))]
    statuses = {e["response"]["status"] for e in infer}
    assert {200, 400, 404} <= statuses, statuses
    ran = sum(e["response"]["status"] == 200 for e in infer)
    assert ran >= 20, f"only {ran} generated inference requests succeeded"


def test_the_server_answers_as_described(fuzzed):
    # Schemathesis' conformance checks (CHECKS): a failure here means the server and
    # docs/openapi/v2-rest.yaml disagree (or a check above already failed).
    _, _, out, rc = fuzzed
    assert rc == 0, out[-12000:]


def test_server_is_alive_and_infers_correctly_after_the_run(fuzzed):
    s = fuzzed[0]
    assert s.alive()
    assert requests.get(f"{s.url}/v2/health/live", timeout=5).json() == {"live": True}
    r = requests.post(f"{s.url}/v2/models/row-stats/infer", json=ROW_STATS_REQUEST, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["name"] == "stats" and out["shape"] == [1, 3] and out["data"] == [55.0, 5.5, 10.0]
    r = requests.post(f"{s.url}/v1/models/row-stats:predict", json={"instances": [list(range(1, 11))]}, timeout=30)
    assert r.status_code == 200 and r.json() == {"predictions": [[55.0, 5.5, 10.0]]}, r.text


def test_undeclared_methods_get_405_with_allow_and_json_errors(fuzzed):
    # Every known route answers an undeclared method with 405, an Allow header naming what it
    # serves, and {"error": ...}; unknown paths are 404. (Before, only model routes said 405, with
    # no Allow header, and the TF-Serving status and metadata routes answered any method.)
    s = fuzzed[0]
    routes = {"/v2/health/live": "GET, HEAD", "/v2": "GET, HEAD", "/v2/models/row-stats": "GET, HEAD",
              "/v2/models/row-stats/infer": "POST", "/v2/repository/index": "GET, HEAD, POST",
              "/v1/models/row-stats": "GET, HEAD", "/v1/models/row-stats/metadata": "GET, HEAD",
              "/v1/models/row-stats:predict": "POST"}
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "POST", "GET"):
        for path, allow in routes.items():
            if method in allow.split(", "):
                continue
            r = requests.request(method, f"{s.url}{path}", timeout=5)
            assert r.status_code == 405, (method, path, r.status_code)
            assert r.headers["Allow"] == allow, (method, path, r.headers)
            assert isinstance(r.json()["error"], str)
    r = requests.put(f"{s.url}/v2/nothing/here", timeout=5)
    assert r.status_code == 404 and "error" in r.json()


def test_the_description_is_valid_openapi():
    from openapi_spec_validator import validate
    validate(yaml.safe_load(SPEC.read_text()))


def test_the_description_covers_every_rest_route():
    paths = set(yaml.safe_load(SPEC.read_text())["paths"])
    for model in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}"):
        for tail in ("", "/ready", "/infer"):
            assert model + tail in paths
    assert {"/v2/health/live", "/v2/health/ready", "/v2", "/v1/models/{model_name}",
            "/v1/models/{model_name}/metadata", "/v1/models/{model_name}:predict"} <= paths


def test_the_run_spec_only_adds_alternatives(tmp_path):
    # The names offered for the run are alternatives: the generic schemas stay reachable.
    run = yaml.safe_load(run_spec(tmp_path).read_text())
    original = yaml.safe_load(SPEC.read_text())
    infer = "/v2/models/{model_name}/versions/{model_version}/infer"
    assert {p: v for p, v in run["paths"].items() if p != infer} == {p: v for p, v in original["paths"].items() if p != infer}
    assert run["paths"][infer]["post"]["requestBody"] == original["paths"][infer]["post"]["requestBody"]
    name = run["components"]["parameters"]["ModelName"]["schema"]
    assert name["anyOf"][1] == original["components"]["parameters"]["ModelName"]["schema"]
    assert run["components"]["schemas"]["Error"] == original["components"]["schemas"]["Error"]
