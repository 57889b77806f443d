//! `ModelDeployment.status`: the truth about the serving pods, written only by the operator.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Observed state.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Serving pods (any state), as counted by the Deployment.
    #[serde(default)]
    pub replicas: i32,
    /// Pods whose model is loaded and ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Pods running the latest pod template.
    #[serde(default)]
    pub updated_replicas: i32,
    /// Label selector of the pods, for the scale subresource (and HPAs targeting it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Scheduled, ModelLoaded, Ready, Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Where clients reach the model inside the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Endpoints>,
    /// Execution provider the pods really use: `CUDAExecutionProvider` or `CPUExecutionProvider`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<String>,
    /// The served model as the server reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelStatus>,
    /// Traffic over the last scrape window, from the ready serving pods' own counters (the
    /// operator scrapes their `/metrics` every `--metrics-interval`). Rewritten only when a value
    /// changed meaningfully, so an idle ModelDeployment costs no writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<TrafficMetrics>,
    /// The autoscaler's last decision: the operator's own for `autoscaling.metric` `concurrency`
    /// or `rps`; the HorizontalPodAutoscaler's for `cpu` or `memory`, including why it cannot
    /// scale (no metrics API, pods without a request of that resource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
}

/// What the autoscaler decided, and why.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// Replicas the autoscaler wants.
    pub desired_replicas: i32,
    /// When it last changed the replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// The numbers behind the decision, e.g. `concurrency 7.900 in all over 1 ready pods (7.900
    /// per pod), averaged over 60 s (6 s panic window: 7.900); target 2 per pod: 4 pods`.
    pub reason: String,
    /// Whether the panic window drives decisions now (a burst).
    pub panic: bool,
}

/// Traffic of all ready serving pods together, over one scrape window.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrafficMetrics {
    /// Requests finished per second (successes and failures).
    pub requests_per_second: f64,
    /// Failed requests per second: refused (invalid, queue full), failed in the runtime, timed
    /// out, or abandoned by a client that left before its answer (Triton's `CANCELED`).
    pub errors_per_second: f64,
    /// Median request latency in milliseconds, from the latency histogram's buckets (absent when
    /// no request completed in the window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_p50_ms: Option<f64>,
    /// 99th-percentile request latency in milliseconds (absent when no request completed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_p99_ms: Option<f64>,
    /// Requests accepted and not yet answered, at the scrape.
    pub inflight_requests: i64,
    /// Requests waiting for an instance or for their batch, at the scrape.
    pub queue_depth: i64,
    /// Average concurrency over the window: requests in flight, weighted by time (what
    /// `autoscaling.metric: concurrency` scales on).
    pub concurrency: f64,
    /// Average rows per model execution, whether the clients sent batches or the server's dynamic
    /// batcher formed them (absent when every execution ran one row).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size_avg: Option<f64>,
    /// Mean GPU utilisation (0–1) of the pods' GPUs, when the servers report it (NVML).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_utilization: Option<f64>,
    /// GPU memory in use on the pods' GPUs, when the servers report it (NVML).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_used_bytes: Option<i64>,
    /// Ready pods these numbers stand for: those measured, and those measured before whose scrape
    /// failed this round (counted at the average of the others).
    pub pods: i32,
    /// Length of the window in seconds.
    pub window_seconds: f64,
    /// When these numbers were measured.
    pub last_scrape_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
}

/// In-cluster endpoints.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Endpoints {
    /// KServe V2 / TF-Serving REST base URL.
    pub rest: String,
    /// gRPC address.
    pub grpc: String,
}

/// The served model.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct ModelStatus {
    /// Served name.
    pub name: String,
    /// Served version.
    pub version: String,
    /// SHA-256 of the artifact as pulled: what the pod fetched (`artifact.sha256`), else the
    /// pinned `spec.model.sha256` (a mismatch is never served). With `spec.model.compression` the
    /// pod serves a model compressed from it, which `compression` describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// What `kubemaas-server pull` fetched, as the serving pod reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<ArtifactStatus>,
    /// The compression the pod applied after the download (`spec.model.compression`), as
    /// measured there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<CompressionStatus>,
    /// Inputs.
    #[serde(default)]
    pub inputs: Vec<TensorInfo>,
    /// Outputs.
    #[serde(default)]
    pub outputs: Vec<TensorInfo>,
}

/// The artifact a serving pod pulled, from the record `kubemaas-server pull` leaves next to the
/// model (`kubemaas-pull.json`) and the server reports in its model metadata
/// (`parameters.artifact`).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactStatus {
    /// The URI it was pulled from.
    pub uri: String,
    /// SHA-256 of the file, or for a directory of its manifest (the `sha256sum` lines of its
    /// files, sorted by path), as `spec.model.sha256` pins it.
    pub sha256: String,
    /// Bytes pulled (all files of a directory together).
    pub bytes: i64,
    /// Number of files (1 for a single ONNX file).
    pub files: i64,
    /// Seconds the pull took (download or cache copy, and verification).
    pub pulled_seconds: f64,
}

/// What compressing the model did, measured in the pod against the original.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CompressionStatus {
    /// `int8-dynamic` or `fp16`.
    pub mode: String,
    /// Bytes of the original (model and external data).
    pub bytes_before: i64,
    /// Bytes of the served, compressed model.
    pub bytes_after: i64,
    /// bytesAfter ÷ bytesBefore.
    pub size_ratio: f64,
    /// The lowest cosine similarity of an output to the original's, over the evaluation inputs.
    pub cosine: f64,
    /// For classifier-shaped outputs: the lowest share of rows whose top class is unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<f64>,
    /// Original latency ÷ compressed latency in the pod (ONNX Runtime on CPU); above 1 is faster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speedup: Option<f64>,
    /// The evaluation inputs, e.g. `4 random samples`.
    pub inputs: String,
}

/// A model input or output.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct TensorInfo {
    /// Tensor name.
    pub name: String,
    /// KServe V2 datatype, e.g. `FP32`.
    pub datatype: String,
    /// Dimensions, -1 where dynamic.
    pub shape: Vec<i64>,
}
