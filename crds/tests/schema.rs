//! The generated CRD: drift against the committed YAML, CEL rules evaluated without a cluster, and
//! the schema shape kubectl and the apiserver rely on.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a panic is a failed test
use kube::CustomResourceExt;
use kubemaas_crds::v1alpha1::{ModelDeployment, ModelDeploymentSpec};
use serde_json::{Value, json};

fn md(spec: Value) -> ModelDeployment {
    let spec: ModelDeploymentSpec = serde_json::from_value(spec).expect("spec deserialises");
    ModelDeployment::new("resnet", spec)
}

fn rejection(spec: Value) -> String {
    match md(spec).validate_cel() {
        Ok(()) => String::from("accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn committed_crd_yaml_matches_the_rust_types() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/generated/modeldeployments.kubemaas.io.yaml"
    );
    let committed = std::fs::read_to_string(path).expect("generated CRD is committed");
    assert!(
        committed == kubemaas_crds::crds_yaml().unwrap(),
        "crds/generated is stale: run `cargo run -p kubemaas-crds --bin crdgen` and commit"
    );
}

#[test]
fn crd_is_small_enough_for_client_side_apply() {
    // kubectl apply stores the object in an annotation limited to 256 KiB.
    let size = serde_json::to_string(&ModelDeployment::crd()).unwrap().len();
    assert!(size < 200 * 1024, "CRD is {size} bytes");
}

#[test]
fn valid_manifests_pass_every_rule() {
    for spec in [
        json!({"model": {"uri": "s3://models/resnet/1/model.onnx"}}),
        json!({"model": {"uri": "gs://b/o.onnx", "sha256": "a".repeat(64), "name": "resnet", "version": "3"}}),
        json!({"model": {"uri": "https://example.test/m.onnx"}, "accelerator": "cuda", "gpu": {"count": 2}}),
        json!({"model": {"uri": "pvc://claim/dir/m.onnx"}, "accelerator": "auto", "gpu": {"resourceName": "nvidia.com/mig-1g.10gb"}}),
        json!({"model": {"uri": "hf://org/repo/model.onnx"}, "autoscaling": {"minReplicas": 2, "maxReplicas": 2}}),
    ] {
        assert_eq!(rejection(spec.clone()), "accepted", "{spec}");
    }
}

#[test]
fn gpu_block_with_cpu_accelerator_is_rejected() {
    let msg = rejection(json!({"model": {"uri": "s3://b/m.onnx"}, "gpu": {"count": 1}}));
    assert!(
        msg.contains("a gpu block needs accelerator: cuda or auto"),
        "{msg}"
    );
}

#[test]
fn gpu_count_below_one_is_rejected() {
    let msg =
        rejection(json!({"model": {"uri": "s3://b/m.onnx"}, "accelerator": "cuda", "gpu": {"count": 0}}));
    assert!(msg.contains("gpu.count must be at least 1"), "{msg}");
}

#[test]
fn min_replicas_above_max_is_rejected() {
    let msg = rejection(
        json!({"model": {"uri": "s3://b/m.onnx"}, "autoscaling": {"minReplicas": 5, "maxReplicas": 2}}),
    );
    assert!(
        msg.contains("minReplicas must not be greater than maxReplicas"),
        "{msg}"
    );
}

#[test]
fn unsupported_uri_schemes_are_rejected() {
    for uri in [
        "ftp://x/m.onnx",
        "/local/file.onnx",
        "s3://bucket-only",
        "file:///m.onnx",
        "",
    ] {
        let msg = rejection(json!({"model": {"uri": uri}}));
        assert!(msg.contains("uri must be s3://bucket/key"), "{uri}: {msg}");
    }
}

#[test]
fn malformed_sha256_is_rejected() {
    for sha in ["abc", &"A".repeat(64), &"g".repeat(64), &"a".repeat(65)] {
        let msg = rejection(json!({"model": {"uri": "s3://b/m.onnx", "sha256": sha}}));
        assert!(
            msg.contains("sha256 must be 64 lower-case hexadecimal"),
            "{sha}: {msg}"
        );
    }
}

#[test]
fn bad_model_version_and_name_are_rejected() {
    let msg = rejection(json!({"model": {"uri": "s3://b/m.onnx", "version": "latest"}}));
    assert!(msg.contains("model.version must be a positive integer"), "{msg}");
    let msg = rejection(json!({"model": {"uri": "s3://b/m.onnx", "name": "has/slash"}}));
    assert!(msg.contains("model.name must be"), "{msg}");
}

#[test]
fn schema_has_status_and_scale_subresources_and_printer_columns() {
    let crd = serde_json::to_value(ModelDeployment::crd()).unwrap();
    let v = &crd["spec"]["versions"][0];
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["mdep"]));
    assert_eq!(v["subresources"]["status"], json!({}));
    assert_eq!(v["subresources"]["scale"]["specReplicasPath"], ".spec.replicas");
    assert_eq!(
        v["subresources"]["scale"]["labelSelectorPath"],
        ".status.selector"
    );
    let cols: Vec<&str> = v["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(cols, ["Model", "Accelerator", "Replicas", "Ready", "Age"]);
}

#[test]
fn every_spec_field_has_a_description_and_defaults_live_in_the_schema() {
    let crd = serde_json::to_value(ModelDeployment::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    fn walk(path: &str, s: &Value, missing: &mut Vec<String>) {
        if let Some(props) = s.get("properties").and_then(Value::as_object) {
            for (k, v) in props {
                let p = format!("{path}.{k}");
                if v.get("description").is_none() {
                    missing.push(p.clone());
                }
                walk(&p, v, missing);
            }
        }
    }
    let mut missing = Vec::new();
    // Our own fields; embedded Kubernetes types (resources, affinity, ...) carry upstream docs.
    for k in ["model", "gpu", "runtime", "autoscaling"] {
        walk(&format!("spec.{k}"), &spec["properties"][k], &mut missing);
    }
    assert!(missing.is_empty(), "fields without description: {missing:?}");
    assert_eq!(spec["properties"]["accelerator"]["default"], "cpu");
    assert_eq!(spec["properties"]["replicas"]["default"], 1);
    assert_eq!(spec["properties"]["startupTimeoutSeconds"]["default"], 600);
    assert_eq!(
        spec["properties"]["model"]["properties"]["version"]["default"],
        "1"
    );
}
