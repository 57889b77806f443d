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
        json!({"model": {"uri": "gs://models/o.onnx", "sha256": "a".repeat(64), "name": "resnet", "version": "3"}}),
        json!({"model": {"uri": "https://example.test/m.onnx"}, "accelerator": "cuda", "gpu": {"count": 2}}),
        json!({"model": {"uri": "pvc://claim/dir/m.onnx"}, "accelerator": "auto", "gpu": {"resourceName": "nvidia.com/mig-1g.10gb"}}),
        json!({"model": {"uri": "hf://org/repo/model.onnx"}, "autoscaling": {"minReplicas": 2, "maxReplicas": 2}}),
    ] {
        assert_eq!(rejection(spec.clone()), "accepted", "{spec}");
    }
}

#[test]
fn gpu_block_with_cpu_accelerator_is_rejected() {
    let msg = rejection(json!({"model": {"uri": "s3://models/m.onnx"}, "gpu": {"count": 1}}));
    assert!(
        msg.contains("a gpu block needs accelerator: cuda or auto"),
        "{msg}"
    );
}

#[test]
fn gpu_count_below_one_is_rejected() {
    let msg = rejection(
        json!({"model": {"uri": "s3://models/m.onnx"}, "accelerator": "cuda", "gpu": {"count": 0}}),
    );
    assert!(msg.contains("gpu.count must be between 1 and 16"), "{msg}");
}

#[test]
fn min_replicas_above_max_is_rejected() {
    let msg = rejection(
        json!({"model": {"uri": "s3://models/m.onnx"}, "autoscaling": {"minReplicas": 5, "maxReplicas": 2}}),
    );
    assert!(
        msg.contains("minReplicas must not be greater than maxReplicas"),
        "{msg}"
    );
}

/// The URI rules a URI breaks, by the start of their messages; empty when it breaks none.
fn uri_verdict(uri: &str) -> Vec<&'static str> {
    let msg = rejection(json!({"model": {"uri": uri}}));
    let broken: Vec<&str> = [
        ("uri must be s3://", "shape"),
        ("uri names an invalid bucket or claim", "names"),
        ("uri must not contain backslashes", "backslash"),
        ("uri must not contain empty path components", "empty"),
        ("uri must not contain '.' or '..' path components", "dots"),
    ]
    .into_iter()
    .filter(|(start, _)| msg.contains(start))
    .map(|(_, rule)| rule)
    .collect();
    assert!(
        !broken.is_empty() || msg == "accepted",
        "{uri}: rejected by another rule: {msg}"
    );
    broken
}

/// Asserts that `uri` breaks `rule` (and possibly others).
fn assert_breaks(uri: &str, rule: &str) {
    let broken = uri_verdict(uri);
    assert!(
        broken.contains(&rule),
        "{uri:?} should break {rule}, breaks {broken:?}"
    );
}

#[test]
fn every_uri_shape_that_pull_implements_is_accepted() {
    for uri in [
        "s3://models/resnet/1/model.onnx",
        "s3://my.bucket-01/a/b/c/model.onnx",
        "s3://models/resnet/1/",
        "s3://models/key with space.onnx",
        "gs://models/minilm/1/model.onnx",
        "gs://my_bucket.example.com/prefix/",
        "http://127.0.0.5:8080/models/m.onnx",
        "https://models.example.com/ocr-cls/1/model.onnx",
        "https://models.example.com/m.onnx?X-Amz-Signature=abc&X-Amz-Expires=600",
        "https://[::1]:443/m.onnx",
        "https://host_internal/m.onnx#fragment",
        "hf://org/repo",
        "hf://org/repo@v1.0",
        "hf://Org-1/repo.name_2/",
        "hf://org/repo/model.onnx",
        "hf://org/repo/onnx/model.onnx@main",
        "hf://org/repo/onnx/@0123abcd",
        "hf://org/repo/onnx/model.onnx@refs/pr/1",
        "pvc://models/resnet/model.onnx",
        "pvc://model-store.team-a/dir/",
        "pvc://claim/model..onnx",
    ] {
        assert_eq!(uri_verdict(uri), Vec::<&str>::new(), "{uri}");
    }
}

#[test]
fn unsupported_schemes_and_shapes_are_rejected_with_the_forms_that_work() {
    for uri in [
        "ftp://x/m.onnx",
        "file:///m.onnx",
        "/local/file.onnx",
        "",
        "S3://models/m.onnx",
        "s3://bucket-only",
        "s3://models/",
        "s3://b/m.onnx",
        "s3://Models/m.onnx",
        "s3://-models/m.onnx",
        "s3://models-/m.onnx",
        "s3://my_bucket/m.onnx",
        &format!("s3://{}/m.onnx", "a".repeat(64)),
        "gs://models",
        "gs://go/m.onnx",
        "https://models.example.com",
        "https://models.example.com/",
        "https://models.example.com/dir/",
        "https://models.example.com/dir/?x=1",
        "https://user:password@models.example.com/m.onnx",
        "https://models.example.com:65536/m.onnx",
        "https:///m.onnx",
        "http//models.example.com/m.onnx",
        "hf://just-a-name",
        "hf://org/-repo",
        "hf://org/repo-",
        "hf://org/repo/a@b@main",
        "hf://org/repo@",
        "hf://org/repo@main/",
        "hf://org/repo@bad revision",
        "pvc://Claim/m.onnx",
        "pvc://claim_1/m.onnx",
        "pvc://claim",
        "pvc://claim/",
        "pvc://-claim/m.onnx",
    ] {
        assert_breaks(uri, "shape");
    }
    let msg = rejection(json!({"model": {"uri": "ftp://example.com/m.onnx"}}));
    for form in [
        "s3://<bucket>/<key>",
        "gs://<bucket>/<object>",
        "http(s)://<host>/<path to a file>",
        "hf://<org>/<repo>[/<path>][@<revision>]",
        "pvc://<claim>/<path>",
        "s3://<bucket>/<prefix>/",
    ] {
        assert!(msg.contains(form), "{form}: {msg}");
    }
}

#[test]
fn bucket_and_claim_names_follow_the_store_naming_rules() {
    for uri in [
        "s3://my..bucket/m.onnx",
        "s3://127.0.0.10/m.onnx",
        "s3://xn--bucket/m.onnx",
        "s3://sthree-bucket/m.onnx",
        "s3://amzn-s3-demo-bucket/m.onnx",
        "s3://bucket-s3alias/m.onnx",
        "s3://bucket--ol-s3/m.onnx",
        "s3://bucket.mrap/m.onnx",
        "s3://bucket--x-s3/m.onnx",
        "s3://bucket--table-s3/m.onnx",
        "gs://my..bucket/m.onnx",
        "gs://127.0.0.1/m.onnx",
        "gs://google-models/m.onnx",
        "gs://my-g00gle-models/m.onnx",
        "gs://goog-models/m.onnx",
        &format!("gs://{}/m.onnx", "a".repeat(64)),
        &format!("pvc://{}/m.onnx", "a".repeat(254)),
    ] {
        assert_breaks(uri, "names");
    }
    for uri in [
        format!("s3://{}/m.onnx", "a".repeat(63)),
        format!("gs://{}.{}/m.onnx", "a".repeat(63), "b".repeat(63)),
        format!("pvc://{}/m.onnx", "a".repeat(253)),
    ] {
        assert_eq!(uri_verdict(&uri), Vec::<&str>::new(), "{uri}");
    }
}

#[test]
fn dot_components_anywhere_in_the_path_are_rejected_and_say_so() {
    for uri in [
        "s3://models/../other/model.onnx",
        "s3://models/a/..",
        "s3://models/./m.onnx",
        "gs://models/a/../../x.onnx",
        "https://models.example.com/a/../b.onnx",
        "https://models.example.com/../b.onnx",
        "https://models.example.com/a/%2e%2E/b.onnx",
        "https://models.example.com/a/%2E/b.onnx?x=1",
        "hf://org/repo/../x.onnx",
        "hf://org/repo/onnx/..@main",
        "hf://org/repo/x.onnx@..",
        "hf://org/repo@refs/../main",
        "pvc://claim/../../proc/self/environ",
        "pvc://claim/dir/../",
    ] {
        assert_breaks(uri, "dots");
    }
    let msg = rejection(json!({"model": {"uri": "pvc://claim/../etc/passwd"}}));
    assert!(msg.contains("write the artifact's real path"), "{msg}");
    // A query is not a path: a presigned URL may carry anything there.
    assert!(uri_verdict("https://h.example.com/m.onnx?next=/a/../b").is_empty());
}

#[test]
fn empty_components_and_backslashes_are_rejected_and_say_so() {
    for uri in [
        "s3://models//abs/model.onnx",
        "s3://models/a//b.onnx",
        "s3://models/dir//",
        "gs://models/a//",
        "https://models.example.com//m.onnx",
        "https://models.example.com/a//m.onnx",
        "hf://org/repo//m.onnx",
        "hf://org/repo/x.onnx@refs//main",
        "pvc://claim//etc/passwd",
    ] {
        assert_breaks(uri, "empty");
    }
    let msg = rejection(json!({"model": {"uri": "pvc://claim//etc/passwd"}}));
    assert!(msg.contains("remove the extra '/'"), "{msg}");
    for uri in [
        "pvc://claim/a\\..\\b",
        "s3://models/dir\\m.onnx",
        "https://h.example.com/m.onnx?x=\\",
        "s3://models/m\n.onnx",
    ] {
        assert_breaks(uri, "backslash");
    }
}

#[test]
fn directory_uris_accepted_by_the_schema_are_the_ones_pull_treats_as_directories() {
    use kubemaas_crds::artifact::is_directory_uri;
    for (uri, dir) in [
        ("s3://models/resnet/", true),
        ("s3://models/resnet/model.onnx", false),
        ("gs://models/minilm/", true),
        ("https://h.example.com/m.onnx", false),
        ("hf://org/repo", true),
        ("hf://org/repo/@v1", true),
        ("hf://org/repo/onnx/@main", true),
        ("hf://org/repo/onnx/model.onnx@main", false),
        ("pvc://claim/dir/", true),
        ("pvc://claim/dir/model.onnx", false),
    ] {
        assert_eq!(uri_verdict(uri), Vec::<&str>::new(), "{uri}");
        assert_eq!(is_directory_uri(uri), dir, "{uri}");
    }
}

#[test]
fn cache_needs_a_pinned_sha256_because_it_is_keyed_by_it() {
    let msg =
        rejection(json!({"model": {"uri": "s3://models/m.onnx", "cache": {"claimName": "model-cache"}}}));
    assert!(
        msg.contains("model.cache needs model.sha256: the cache is keyed by the pinned digest"),
        "{msg}"
    );
    assert_eq!(
        rejection(
            json!({"model": {"uri": "s3://models/m.onnx", "sha256": "a".repeat(64), "cache": {"claimName": "model-cache"}}})
        ),
        "accepted"
    );
    let msg = rejection(
        json!({"model": {"uri": "s3://models/m.onnx", "sha256": "a".repeat(64), "cache": {"claimName": "Model_Cache"}}}),
    );
    assert!(
        msg.contains("cache.claimName must be a PersistentVolumeClaim name"),
        "{msg}"
    );
}

#[test]
fn max_bytes_below_one_is_rejected() {
    for n in [0, -5] {
        let msg = rejection(json!({"model": {"uri": "s3://models/m.onnx", "maxBytes": n}}));
        assert!(msg.contains("model.maxBytes must be at least 1"), "{n}: {msg}");
    }
    assert_eq!(
        rejection(json!({"model": {"uri": "s3://models/m.onnx", "maxBytes": 1_i64 << 40}})),
        "accepted"
    );
}

#[test]
fn download_options_default_to_the_safe_side_in_the_schema() {
    let crd = serde_json::to_value(ModelDeployment::crd()).unwrap();
    let model = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["model"]["properties"];
    assert_eq!(model["allowPrivateAddresses"]["default"], false);
    assert_eq!(model["maxBytes"]["format"], "int64");
    assert_eq!(model["uri"]["maxLength"], 8192, "room for presigned URLs");
    assert_eq!(
        model["cache"]["required"],
        json!(["claimName"]),
        "a cache names its claim"
    );
    let md: ModelDeployment = serde_json::from_value(json!({"apiVersion": "kubemaas.io/v1alpha1",
        "kind": "ModelDeployment", "metadata": {"name": "m"}, "spec": {"model": {"uri": "s3://models/m.onnx"}}}))
    .unwrap();
    assert!(!md.spec.model.allow_private_addresses);
    assert_eq!((md.spec.model.max_bytes, md.spec.model.cache), (None, None));
}

#[test]
fn malformed_sha256_is_rejected() {
    for sha in ["abc", &"A".repeat(64), &"g".repeat(64), &"a".repeat(65)] {
        let msg = rejection(json!({"model": {"uri": "s3://models/m.onnx", "sha256": sha}}));
        assert!(
            msg.contains("sha256 must be 64 lower-case hexadecimal"),
            "{sha}: {msg}"
        );
    }
}

#[test]
fn bad_model_version_and_name_are_rejected() {
    let msg = rejection(json!({"model": {"uri": "s3://models/m.onnx", "version": "latest"}}));
    assert!(msg.contains("model.version must be a positive integer"), "{msg}");
    let msg = rejection(json!({"model": {"uri": "s3://models/m.onnx", "name": "has/slash"}}));
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
    assert_eq!(
        cols,
        [
            "Model",
            "Accelerator",
            "Replicas",
            "Ready",
            "Reason",
            "RPS",
            "P99(ms)",
            "Age"
        ]
    );
    let wide: Vec<i64> = v["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["priority"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(
        wide,
        [0, 0, 0, 0, 0, 1, 1, 0],
        "traffic columns show with -o wide"
    );
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

#[test]
fn compression_accepts_the_modes_pull_implements_and_a_min_cosine_in_range() {
    for mode in ["int8-dynamic", "fp16"] {
        let spec = json!({"model": {"uri": "s3://models/m.onnx",
            "compression": {"mode": mode, "minCosine": 0.999, "inputShapes": {"x": [1, 3, 48, 320]}}}});
        assert_eq!(rejection(spec), "accepted", "{mode}");
    }
    for bad in [0.0, -0.5, 1.5] {
        let msg = rejection(json!({"model": {"uri": "s3://models/m.onnx",
            "compression": {"mode": "fp16", "minCosine": bad}}}));
        assert!(
            msg.contains("compression.minCosine must be greater than 0 and at most 1"),
            "{bad}: {msg}"
        );
    }
    for shapes in [json!({"x": [1, 0]}), json!({"x": []}), json!({"a=b": [1]})] {
        let msg = rejection(json!({"model": {"uri": "s3://models/m.onnx",
            "compression": {"mode": "fp16", "inputShapes": shapes}}}));
        assert!(
            msg.contains("compression.inputShapes maps an input name"),
            "{shapes}: {msg}"
        );
    }
}

#[test]
fn network_policy_peers_the_apiserver_would_refuse_are_refused_at_admission() {
    // Accepted here, the NetworkPolicy is refused when applied, and nothing is rolled out.
    for field in ["inferenceFrom", "metricsFrom"] {
        let with = |peers: Value| {
            rejection(json!({"model": {"uri": "s3://models/m.onnx"}, "networkPolicy": {field: peers}}))
        };
        let msg = with(json!([{}]));
        assert!(
            msg.contains("needs podSelector, namespaceSelector or ipBlock"),
            "{field}: {msg}"
        );
        let msg = with(json!([{"ipBlock": {"cidr": "127.0.0.0/8"}, "namespaceSelector": {}}]));
        assert!(msg.contains("ipBlock may not be combined"), "{field}: {msg}");
        for ok in [
            json!([{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "gw"}}}]),
            json!([{"ipBlock": {"cidr": "127.0.0.0/8"}}, {"podSelector": {}}]),
        ] {
            assert_eq!(with(ok.clone()), "accepted", "{field}: {ok}");
        }
    }
}

#[test]
fn an_empty_gpu_product_is_refused() {
    // It would become a nodeSelector no node carries: the pod never schedules.
    let msg = rejection(
        json!({"model": {"uri": "s3://models/m.onnx"}, "accelerator": "cuda", "gpu": {"product": ""}}),
    );
    assert!(msg.contains("gpu.product must be a label value"), "{msg}");
}

#[test]
fn fewer_instances_than_gpus_is_rejected_because_a_gpu_would_sit_idle() {
    // Instances are spread over the pod's GPUs in turn: with 1 instance and 2 GPUs, GPU 1 is
    // requested from the scheduler, paid for, and never used.
    let msg = rejection(
        json!({"model": {"uri": "s3://models/m.onnx"}, "accelerator": "cuda",
        "gpu": {"count": 2}, "runtime": {"instances": 1}}),
    );
    assert!(msg.contains("runtime.instances is fewer than gpu.count"), "{msg}");
    for fine in [
        json!({"model": {"uri": "s3://models/m.onnx"}, "accelerator": "cuda", "gpu": {"count": 2}, "runtime": {"instances": 2}}),
        json!({"model": {"uri": "s3://models/m.onnx"}, "accelerator": "cuda", "gpu": {"count": 2}, "runtime": {"instances": 0}}),
        json!({"model": {"uri": "s3://models/m.onnx"}, "accelerator": "cuda", "gpu": {"count": 2}, "runtime": {"intraOpThreads": 2}}),
        json!({"model": {"uri": "s3://models/m.onnx"}, "accelerator": "auto", "gpu": {}, "runtime": {"instances": 1}}),
        json!({"model": {"uri": "s3://models/m.onnx"}, "runtime": {"instances": 1}}),
    ] {
        assert_eq!(rejection(fine.clone()), "accepted", "{fine}");
    }
}
