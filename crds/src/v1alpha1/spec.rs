//! `ModelDeployment.spec`: what the user asks for.
//!
//! Defaults live in the schema (`#[serde(default = ...)]` becomes the OpenAPI `default`), so the
//! apiserver fills them in and the operator never writes `spec`: a GitOps sync shows no drift.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, EnvVar, LocalObjectReference, ResourceRequirements, Toleration};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::status::ModelDeploymentStatus;

/// A model served by autoscaled KubeMaaS server pods.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kubemaas.io",
    version = "v1alpha1",
    kind = "ModelDeployment",
    plural = "modeldeployments",
    shortname = "mdep",
    namespaced,
    cel,
    doc = "A ModelDeployment serves an ONNX model from autoscaled KubeMaaS server pods (KServe V2, TF-Serving REST) and reports in status whether it is scheduled, loaded and ready.",
    status = "ModelDeploymentStatus",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".spec.model.uri","description":"Model artifact URI"}"#,
    printcolumn = r#"{"name":"Accelerator","type":"string","jsonPath":".status.accelerator","description":"Execution provider the pods really use"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".status.replicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("!has(self.gpu) || self.accelerator != 'cpu'")
    .message("a gpu block needs accelerator: cuda or auto; remove gpu or change accelerator")
    .field_path(".gpu"))]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentSpec {
    /// The model artifact and the name it is served under.
    pub model: ModelSource,

    /// Where the model runs: `cpu`, `cuda` (NVIDIA GPU, required), or `auto` (GPU when the pod
    /// gets one and CUDA registers, otherwise CPU). `status.accelerator` reports what is really used.
    #[serde(default)]
    pub accelerator: Accelerator,

    /// GPU request; only with accelerator `cuda` or `auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuSpec>,

    /// ONNX Runtime settings of the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeSpec>,

    /// CPU and memory requests and limits of the server container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Number of serving pods when `autoscaling` is not set. `kubectl scale` writes it through the
    /// scale subresource.
    #[serde(default = "default_replicas")]
    #[x_kube(validation = Rule::new("self >= 0").message("replicas must not be negative"))]
    pub replicas: i32,

    /// Autoscale between minReplicas and maxReplicas (a HorizontalPodAutoscaler); replaces `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,

    /// Seconds a pod may take to download and load the model before it is restarted (startup probe).
    #[serde(default = "default_startup_timeout")]
    #[x_kube(validation = Rule::new("self >= 10").message("startupTimeoutSeconds must be at least 10"))]
    pub startup_timeout_seconds: i32,

    /// Server image override; by default the operator's configured CPU or CUDA image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// Pod settings merged on top of what the operator generates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template: Option<PodTemplateOverrides>,
}

fn default_replicas() -> i32 {
    1
}

fn default_startup_timeout() -> i32 {
    600
}

/// The model artifact.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    /// Where to download the ONNX file from: `s3://bucket/key`, `gs://bucket/object`,
    /// `http(s)://...`, `pvc://<claim>/<path>` or `hf://<repo>/<file>`.
    #[x_kube(validation = Rule::new("self.matches('^(s3://[^/]+/.+|gs://[^/]+/.+|https?://.+|pvc://[^/]+/.+|hf://.+/.+)$')")
        .message("uri must be s3://bucket/key, gs://bucket/object, http(s)://..., pvc://<claim>/<path> or hf://<repo>/<file>"))]
    pub uri: String,

    /// Expected SHA-256 of the artifact, 64 lower-case hex characters; the pod refuses to serve a
    /// file that does not match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[a-f0-9]{64}$')")
        .message("sha256 must be 64 lower-case hexadecimal characters"))]
    pub sha256: Option<String>,

    /// Name the model is served under (default: the ModelDeployment's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$')")
        .message("model.name must be 1-63 letters, digits, '_', '.' or '-', starting with a letter or digit"))]
    pub name: Option<String>,

    /// Model version, a positive integer (Triton's version layout).
    #[serde(default = "default_version")]
    #[x_kube(validation = Rule::new("self.matches('^[1-9][0-9]{0,8}$')").message("model.version must be a positive integer such as \"1\""))]
    pub version: String,

    /// Secret with download credentials (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, HF_TOKEN);
    /// only the download init container sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
}

fn default_version() -> String {
    "1".into()
}

/// A Secret in the same namespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct SecretRef {
    /// Secret name.
    pub name: String,
}

/// Execution target.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// CPU only.
    #[default]
    Cpu,
    /// NVIDIA GPU through CUDA; the pod fails to load the model without one.
    Cuda,
    /// GPU when available, else CPU.
    Auto,
}

/// GPU request.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GpuSpec {
    /// GPUs per pod (limits of `resourceName`).
    #[serde(default = "default_one")]
    #[x_kube(validation = Rule::new("self >= 1").message("gpu.count must be at least 1"))]
    pub count: i32,

    /// Extended resource to request: `nvidia.com/gpu`, or a MIG profile such as
    /// `nvidia.com/mig-1g.10gb`.
    #[serde(default = "default_gpu_resource")]
    pub resource_name: String,

    /// GPU model to require (node label `nvidia.com/gpu.product`), e.g. `NVIDIA-H100-80GB-HBM3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
}

fn default_one() -> i32 {
    1
}

fn default_gpu_resource() -> String {
    "nvidia.com/gpu".into()
}

/// ONNX Runtime settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeSpec {
    /// ONNX Runtime sessions per pod: requests run in parallel up to this many.
    #[serde(default = "default_one")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 64").message("runtime.instances must be between 1 and 64"))]
    pub instances: i32,

    /// Intra-op threads per session; 0 derives it from the CPU limit.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0").message("runtime.intraOpThreads must not be negative"))]
    pub intra_op_threads: i32,

    /// Dynamic batching of concurrent requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batching: Option<BatchingSpec>,
}

/// Dynamic batching.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BatchingSpec {
    /// Largest batch formed.
    #[serde(default = "default_max_batch")]
    #[x_kube(validation = Rule::new("self >= 1").message("batching.maxBatchSize must be at least 1"))]
    pub max_batch_size: i32,

    /// Longest a request waits for others to join its batch, in microseconds.
    #[serde(default = "default_queue_delay")]
    #[x_kube(validation = Rule::new("self >= 0").message("batching.maxQueueDelayMicroseconds must not be negative"))]
    pub max_queue_delay_microseconds: i64,

    /// Requests queued beyond this are rejected with 503.
    #[serde(default = "default_queue_size")]
    #[x_kube(validation = Rule::new("self >= 1").message("batching.maxQueueSize must be at least 1"))]
    pub max_queue_size: i32,
}

fn default_max_batch() -> i32 {
    8
}

fn default_queue_delay() -> i64 {
    1000
}

fn default_queue_size() -> i32 {
    256
}

/// Autoscaling.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas")
    .message("autoscaling.minReplicas must not be greater than maxReplicas"))]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Fewest pods.
    #[serde(default = "default_one")]
    #[x_kube(validation = Rule::new("self >= 1").message("autoscaling.minReplicas must be at least 1"))]
    pub min_replicas: i32,

    /// Most pods.
    pub max_replicas: i32,

    /// What to scale on: `cpu` or `memory` utilisation of the server container.
    #[serde(default)]
    pub metric: AutoscalingMetric,

    /// Target average utilisation in percent of the container's request.
    #[serde(default = "default_target")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000").message("autoscaling.target must be between 1 and 1000 (percent)"))]
    pub target: i32,
}

fn default_target() -> i32 {
    70
}

/// Autoscaling metric.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AutoscalingMetric {
    /// CPU utilisation.
    #[default]
    Cpu,
    /// Memory utilisation.
    Memory,
}

/// Pod settings merged on top of the generated pod.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplateOverrides {
    /// Extra node selector entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Extra tolerations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Affinity (replaces the generated one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// RuntimeClass, e.g. `nvidia`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_class_name: Option<String>,
    /// PriorityClass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Pull secrets for the server image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secrets: Option<Vec<LocalObjectReference>>,
    /// ServiceAccount of the pods (its token is still not mounted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Extra pod labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Extra pod annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    /// Extra environment variables of the server container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<EnvVar>>,
}
