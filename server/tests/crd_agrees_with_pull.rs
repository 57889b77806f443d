//! The API and `pull` agree: every model URI the CRD admits is one `pull` parses, with the same
//! verdict on file versus directory (which decides DEST). A URI the schema accepts but the init
//! container cannot fetch would sit in DownloadFailed forever.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a panic is a failed test
use kubemaas_crds::artifact::is_directory_uri;
use kubemaas_crds::v1alpha1::{ModelDeployment, ModelDeploymentSpec};
use kubemaas_server::pull::uri::ArtifactUri;

fn admitted(uri: &str) -> bool {
    let spec: ModelDeploymentSpec =
        serde_json::from_value(serde_json::json!({"model": {"uri": uri}})).expect("spec deserialises");
    ModelDeployment::new("m", spec).validate_cel().is_ok()
}

#[test]
fn every_uri_the_crd_admits_is_fetchable_by_pull_with_the_same_directory_verdict() {
    let corpus = [
        "s3://models/resnet/1/model.onnx",
        "s3://my.bucket-01/a/b/c/model.onnx",
        "s3://models/resnet/1/",
        "s3://models/key with space.onnx",
        "s3://models/../x.onnx",
        "s3://models//x.onnx",
        "s3://models/a/./x.onnx",
        "gs://models/minilm/1/model.onnx",
        "gs://my_bucket.example.com/prefix/",
        "gs://models/a\\b.onnx",
        "http://127.0.0.5:8080/models/m.onnx",
        "https://models.example.com/ocr-cls/1/model.onnx",
        "https://models.example.com/m.onnx?X-Amz-Signature=abc&X-Amz-Expires=600",
        "https://[::1]:443/m.onnx",
        "https://host_internal/m.onnx#fragment",
        "https://models.example.com/a/../m.onnx",
        "https://models.example.com/a/%2e%2e/m.onnx",
        "https://user:pw@models.example.com/m.onnx",
        "hf://org/repo",
        "hf://org/repo@v1.0",
        "hf://Org-1/repo.name_2/",
        "hf://org/repo/model.onnx",
        "hf://org/repo/onnx/model.onnx@main",
        "hf://org/repo/onnx/@0123abcd",
        "hf://org/repo/onnx/model.onnx@refs/pr/1",
        "hf://org/repo/../x@main",
        "hf://org/repo@../main",
        "pvc://models/resnet/model.onnx",
        "pvc://model-store.team-a/dir/",
        "pvc://claim/model..onnx",
        "pvc://claim/../../proc/self/environ",
        "pvc://claim//etc/passwd",
        "ftp://x/m.onnx",
        "file:///etc/passwd",
    ];
    let mut admitted_count = 0;
    for uri in corpus {
        if !admitted(uri) {
            continue;
        }
        admitted_count += 1;
        let parsed = ArtifactUri::parse(uri)
            .unwrap_or_else(|e| panic!("the CRD admits {uri} but pull refuses it: {e}"));
        assert_eq!(
            parsed.is_directory(),
            is_directory_uri(uri),
            "{uri}: the operator and pull disagree on file versus directory"
        );
    }
    // The corpus exercises both sides: many shapes admitted, every traversal refused by the CRD.
    assert!(admitted_count >= 20, "only {admitted_count} admitted");
    for refused in [
        "pvc://claim/../../proc/self/environ",
        "s3://models/../x.onnx",
        "https://models.example.com/a/%2e%2e/m.onnx",
        "ftp://x/m.onnx",
    ] {
        assert!(!admitted(refused), "the CRD admits {refused}");
        assert!(ArtifactUri::parse(refused).is_err(), "pull accepts {refused}");
    }
}
