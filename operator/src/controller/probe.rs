//! Asks a ready serving pod what it really runs (model metadata and execution provider), so the
//! status reports the truth rather than the request. Results are cached per pod UID and container
//! restarts.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kubemaas_crds::v1alpha1::{ArtifactStatus, CompressionStatus, ModelStatus, TensorInfo};

use super::build::ports;
use super::status::Probed;

/// Probe client with a per-pod cache.
pub struct Prober {
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    cache: Mutex<HashMap<String, Probed>>,
    timeout: Duration,
    /// The pods' metrics port (another in tests, where a local server plays the pod).
    port: i32,
}

impl Default for Prober {
    fn default() -> Self {
        Prober {
            client: Client::builder(TokioExecutor::new()).build_http(),
            cache: Mutex::new(HashMap::new()),
            timeout: Duration::from_secs(2),
            port: ports::METRICS,
        }
    }
}

/// Whether the pod's Ready condition is True.
pub fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The pull record as the server reports it in `parameters.artifact` (`kubemaas-pull.json`).
#[derive(serde::Deserialize)]
struct PullRecord {
    uri: String,
    sha256: String,
    bytes: u64,
    files: u64,
    seconds: f64,
    #[serde(default)]
    compression: Option<CompressionRecord>,
}

/// The `compress` report inside the pull record (the fields status shows).
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct CompressionRecord {
    mode: String,
    bytes_before: u64,
    bytes_after: u64,
    size_ratio: f64,
    cosine: f64,
    #[serde(default)]
    top1_agreement: Option<f64>,
    #[serde(default)]
    latency: Option<LatencyRecord>,
    inputs: String,
}

#[derive(serde::Deserialize)]
struct LatencyRecord {
    speedup: f64,
}

/// `parameters.artifact.compression` of the model metadata.
fn compression(v: &serde_json::Value) -> Option<CompressionStatus> {
    let r: PullRecord = serde_json::from_value(v["parameters"]["artifact"].clone()).ok()?;
    let c = r.compression?;
    Some(CompressionStatus {
        mode: c.mode,
        bytes_before: i64::try_from(c.bytes_before).unwrap_or(i64::MAX),
        bytes_after: i64::try_from(c.bytes_after).unwrap_or(i64::MAX),
        size_ratio: c.size_ratio,
        cosine: c.cosine,
        top1_agreement: c.top1_agreement,
        speedup: c.latency.map(|l| l.speedup),
        inputs: c.inputs,
    })
}

/// `parameters.artifact` of the model metadata; None when absent or not a pull record.
fn artifact(v: &serde_json::Value) -> Option<ArtifactStatus> {
    let r: PullRecord = serde_json::from_value(v["parameters"]["artifact"].clone()).ok()?;
    Some(ArtifactStatus {
        uri: r.uri,
        sha256: r.sha256,
        bytes: i64::try_from(r.bytes).unwrap_or(i64::MAX),
        files: i64::try_from(r.files).unwrap_or(i64::MAX),
        pulled_seconds: r.seconds,
    })
}

fn parse(v: &serde_json::Value, version: &str, pod: &str) -> Probed {
    let tensors = |key: &str| -> Vec<TensorInfo> {
        v[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| serde_json::from_value(t.clone()).ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    Probed {
        pod: pod.into(),
        fallback: v["parameters"]["execution_provider_fallback"]
            .as_str()
            .map(String::from),
        accelerator: v["parameters"]["execution_provider"].as_str().map(String::from),
        model: v["name"].as_str().map(|name| ModelStatus {
            name: name.into(),
            version: version.into(),
            sha256: None,
            artifact: artifact(v),
            compression: compression(v),
            inputs: tensors("inputs"),
            outputs: tensors("outputs"),
        }),
    }
}

/// `http://IP:PORT/PATH` for a pod address (IPv6 addresses in brackets).
pub fn pod_uri(ip: &str, port: i32, path: &str) -> Option<http::Uri> {
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    };
    format!("http://{host}:{port}{path}").parse().ok()
}

/// The metadata URL of a pod: on the metrics port, which needs no API key (`spec.auth`).
pub fn metadata_uri(ip: &str, port: i32, model: &str, version: &str) -> Option<http::Uri> {
    pod_uri(ip, port, &format!("/v2/models/{model}/versions/{version}"))
}

/// What an answer is kept under: the pod and how often its containers restarted. A restarted
/// server may serve otherwise (`accelerator: auto` back on the CPU provider when the GPU was lost).
fn cache_key(pod: &Pod) -> String {
    let restarts: i64 = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |c| c.iter().map(|c| i64::from(c.restart_count)).sum());
    format!("{}/{restarts}", pod.uid().unwrap_or_default())
}

/// Pods asked at once: enough that one slow pod does not hold the status back.
const PARALLEL: usize = 4;

impl Prober {
    /// Metadata from a ready pod that answers (cached per pod, asked a few at a time, so one
    /// unresponsive pod costs one timeout, not one per pod); None when none does.
    pub async fn probe(&self, pods: &[Pod], model: &str, version: &str) -> Option<Probed> {
        let ready: Vec<&Pod> = pods
            .iter()
            .filter(|p| is_ready(p) && p.metadata.deletion_timestamp.is_none())
            .collect();
        for pod in &ready {
            if let Some(hit) = self
                .cache
                .lock()
                .ok()
                .and_then(|c| c.get(&cache_key(pod)).cloned())
            {
                return Some(hit);
            }
        }
        for batch in ready.chunks(PARALLEL) {
            let answers = futures::future::join_all(batch.iter().map(|p| self.ask(p, model, version))).await;
            if let Some(hit) = answers.into_iter().flatten().next() {
                return Some(hit);
            }
        }
        None
    }

    async fn ask(&self, pod: &Pod, model: &str, version: &str) -> Option<Probed> {
        let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone())?;
        let uri = metadata_uri(&ip, self.port, model, version)?;
        let v = tokio::time::timeout(self.timeout, async {
            let resp = self.client.get(uri).await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            let body = resp.into_body().collect().await.ok()?.to_bytes();
            serde_json::from_slice::<serde_json::Value>(&body).ok()
        })
        .await
        .ok()
        .flatten()?;
        let probed = parse(&v, version, &pod.name_any());
        if let Ok(mut c) = self.cache.lock() {
            // Bounded: entries of gone pods are dropped when the cache grows.
            if c.len() > 4096 {
                c.clear();
            }
            c.insert(cache_key(pod), probed.clone());
        }
        Some(probed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server on loopback answering model metadata with the execution provider in `provider`.
    async fn metadata_server(provider: std::sync::Arc<Mutex<&'static str>>) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut buf = vec![0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let ep = *provider.lock().unwrap();
                let body = serde_json::json!({"name": "m", "versions": ["1"],
                    "parameters": {"execution_provider": ep}, "inputs": [], "outputs": []})
                .to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(resp.as_bytes()).await;
            }
        });
        port
    }

    fn ready_pod(restarts: i32) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "p", "uid": "u1"},
            "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "server", "image": "i", "imageID": "", "ready": true,
                    "restartCount": restarts}]}}))
        .unwrap()
    }

    #[tokio::test]
    async fn a_server_container_that_restarted_is_asked_again() {
        // With `accelerator: auto`, a server that restarts may come back on the CPU provider (the
        // GPU was lost): what the pod said before its restart is not what it serves now.
        let provider = std::sync::Arc::new(Mutex::new("CUDAExecutionProvider"));
        let prober = Prober {
            port: metadata_server(provider.clone()).await.into(),
            ..Prober::default()
        };
        let said = |p: Option<Probed>| p.and_then(|p| p.accelerator);
        assert_eq!(
            said(prober.probe(&[ready_pod(0)], "m", "1").await).as_deref(),
            Some("CUDAExecutionProvider")
        );
        *provider.lock().unwrap() = "CPUExecutionProvider";
        // The same container: its answer is kept (no request per reconcile).
        assert_eq!(
            said(prober.probe(&[ready_pod(0)], "m", "1").await).as_deref(),
            Some("CUDAExecutionProvider")
        );
        // Restarted: asked again.
        assert_eq!(
            said(prober.probe(&[ready_pod(1)], "m", "1").await).as_deref(),
            Some("CPUExecutionProvider")
        );
    }

    #[test]
    fn pod_addresses_make_valid_urls_for_ipv4_and_ipv6() {
        assert_eq!(
            metadata_uri("127.1.2.3", ports::METRICS, "m", "1")
                .unwrap()
                .to_string(),
            "http://127.1.2.3:9090/v2/models/m/versions/1"
        );
        assert_eq!(
            metadata_uri("::1", ports::METRICS, "m", "1").unwrap().to_string(),
            "http://[::1]:9090/v2/models/m/versions/1"
        );
    }

    #[test]
    fn metadata_maps_to_status_fields() {
        let v = serde_json::json!({"name": "resnet", "versions": ["1"], "platform": "onnxruntime_onnx",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1000]}],
            "parameters": {"execution_provider": "CUDAExecutionProvider"}});
        let p = parse(&v, "1", "p");
        assert_eq!(p.accelerator.as_deref(), Some("CUDAExecutionProvider"));
        let m = p.model.unwrap();
        assert_eq!(m.inputs[0].shape, vec![-1, 3, 224, 224]);
        assert_eq!(m.outputs[0].datatype, "FP32");
        assert_eq!(
            m.artifact, None,
            "a server that pulled nothing reports no artifact"
        );
    }

    #[test]
    fn the_pull_record_in_model_metadata_becomes_the_artifact_status() {
        let v = serde_json::json!({"name": "embedder", "versions": ["2"],
            "inputs": [], "outputs": [],
            "parameters": {"execution_provider": "CPUExecutionProvider",
                "artifact": {"uri": "s3://models/embedder/2/", "sha256": "b".repeat(64),
                    "bytes": 5_368_709_120_u64, "files": 2, "seconds": 41.25}}});
        let m = parse(&v, "2", "p").model.unwrap();
        assert_eq!(
            m.artifact,
            Some(ArtifactStatus {
                uri: "s3://models/embedder/2/".into(),
                sha256: "b".repeat(64),
                bytes: 5_368_709_120,
                files: 2,
                pulled_seconds: 41.25,
            })
        );
        let garbled = serde_json::json!({"name": "m", "parameters": {"artifact": {"uri": 3}}});
        assert_eq!(parse(&garbled, "1", "p").model.unwrap().artifact, None);
        assert_eq!(m.compression, None, "not compressed");
    }

    #[test]
    fn the_compression_report_in_the_pull_record_becomes_status_model_compression() {
        // As `pull --compress` writes it (abridged: outputs and nodes are not shown in status).
        let v = serde_json::json!({"name": "ocr", "inputs": [], "outputs": [],
            "parameters": {"artifact": {"uri": "http://h/m.onnx", "sha256": "c".repeat(64),
                "bytes": 10857958, "files": 1, "seconds": 0.5,
                "compression": {"mode": "int8-dynamic", "bytesBefore": 10857958, "bytesAfter": 2910463,
                    "sizeRatio": 0.268, "nodes": {"int8Compute": 9}, "skipped": [],
                    "inputs": "4 random samples", "outputs": [{"name": "y", "cosine": 0.9987, "maxAbsError": 0.1}],
                    "cosine": 0.9987, "top1Agreement": 1.0,
                    "latency": {"beforeMs": 30.0, "afterMs": 27.7, "speedup": 1.083, "runs": 10, "threads": 0},
                    "minCosine": 0.99, "passed": true}}}});
        let m = parse(&v, "1", "p").model.unwrap();
        assert_eq!(
            m.compression,
            Some(CompressionStatus {
                mode: "int8-dynamic".into(),
                bytes_before: 10857958,
                bytes_after: 2910463,
                size_ratio: 0.268,
                cosine: 0.9987,
                top1_agreement: Some(1.0),
                speedup: Some(1.083),
                inputs: "4 random samples".into(),
            })
        );
        assert!(m.artifact.is_some(), "the artifact is still reported");
    }
}
