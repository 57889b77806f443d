//! `ModelDeployment.spec`: what the user asks for.
//!
//! Defaults live in the schema (`#[serde(default = ...)]` becomes the OpenAPI `default`), so the
//! apiserver fills them in and the operator never writes `spec`: a GitOps sync shows no drift.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, EnvVar, LocalObjectReference, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::Rule;
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
    doc = "A ModelDeployment serves an ONNX model from autoscaled KubeMaaS server pods (KServe V2 / Triton REST and gRPC, TF-Serving REST) and reports in status whether it is scheduled, loaded and ready.",
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
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason","description":"Why Ready is what it is, e.g. RolloutInProgress, ScaledToZero, InvalidSpec"}"#,
    printcolumn = r#"{"name":"RPS","type":"number","jsonPath":".status.metrics.requestsPerSecond","priority":1,"description":"Requests per second over the last scrape window"}"#,
    printcolumn = r#"{"name":"P99(ms)","type":"number","jsonPath":".status.metrics.latencyP99Ms","priority":1,"description":"99th-percentile latency over the last scrape window"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    // The name names the Service (a DNS-1035 label): refuse at admission what could never serve,
    // rather than accept it and sit in InvalidSpec.
    validation = Rule::new("size(self.metadata.name) <= 63 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("metadata.name must be a DNS-1035 label because it names the Service: at most 63 characters, lower-case letters, digits and '-', starting with a letter and ending with a letter or digit")
)]
#[x_kube(validation = Rule::new("!has(self.resources) || !has(self.resources.claims) || size(self.resources.claims) == 0")
    .message("resources.claims is not supported: a ModelDeployment's pods set no resourceClaims; use resources.requests and limits, and spec.gpu for GPUs")
    .field_path(".resources.claims"))]
#[x_kube(validation = Rule::new("!has(self.resources) || ((!has(self.resources.limits) || !self.resources.limits.exists(k, k.startsWith('nvidia.com/'))) && (!has(self.resources.requests) || !self.resources.requests.exists(k, k.startsWith('nvidia.com/'))))")
    .message("request GPUs with spec.gpu (count and resourceName), not spec.resources: the operator sets the GPU limit from spec.gpu")
    .field_path(".resources"))]
#[x_kube(validation = Rule::new("!has(self.gpu) || self.accelerator != 'cpu'")
    .message("a gpu block needs accelerator: cuda or auto; remove gpu or change accelerator")
    .field_path(".gpu"))]
// Instances are spread over the GPUs in turn: fewer instances than GPUs leaves a GPU requested,
// paid for and never used.
#[x_kube(validation = Rule::new("!has(self.gpu) || !has(self.runtime) || !has(self.runtime.instances) || self.runtime.instances == 0 || self.runtime.instances >= (has(self.gpu.count) ? self.gpu.count : 1)")
    .message("runtime.instances is fewer than gpu.count, so a GPU would have no instance and sit idle: set runtime.instances to at least gpu.count (a multiple of it spreads evenly), or 0 to let the server choose (4 per GPU)")
    .field_path(".runtime.instances"))]
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

    /// Autoscale between minReplicas and maxReplicas; replaces `replicas`. A
    /// HorizontalPodAutoscaler scales on `cpu` and `memory`; the operator itself scales on
    /// `concurrency` and `rps` (no HPA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,

    /// How pods are replaced when the spec changes. By default one extra pod is started first
    /// (maxSurge 1, maxUnavailable 0), except when pods request GPUs: then one old pod is stopped
    /// first (maxSurge 0, maxUnavailable 1), because on a cluster whose GPUs are all in use an
    /// extra GPU pod never schedules and the rollout would never end. A bound set to 0 with the
    /// other left out makes the other 1 (maxSurge 0: one pod replaced at a time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,

    /// Seconds the model download may take (the download init container gives up then, and the
    /// pod retries), and then, counted afresh, seconds the server may take to load the model and
    /// report ready before it is restarted (startup probe). With `model.cache`, storing the
    /// download in the cache has its own bound of as long (a copy that runs out is dropped, not
    /// fatal). `model.compression` runs between download and load and is not bounded by it. The
    /// Deployment's progress deadline allows each of these steps this long, plus a minute, and
    /// never less than 10 minutes in all.
    #[serde(default = "default_startup_timeout")]
    #[x_kube(validation = Rule::new("self >= 10 && self <= 86400").message("startupTimeoutSeconds must be between 10 and 86400 (a day)"))]
    pub startup_timeout_seconds: i32,

    /// Server image override (`[registry/]repository[:tag][@digest]`); by default the operator's
    /// configured CPU or CUDA image. As for the kubelet, a first component is a registry only
    /// with a `.`, a port or as `localhost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    #[x_kube(validation = Rule::new(format!("self.matches('{IMAGE_REFERENCE}')"))
        .message("image must be an image reference such as registry.example.com/kubemaas/server:0.1.0 or ...@sha256:<64 hex digits> (the repository in lower case, no spaces)"))]
    pub image: Option<String>,

    /// Pod settings merged on top of what the operator generates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template: Option<PodTemplateOverrides>,

    /// Who may call the model. Unset: anyone who can reach the Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,

    /// TLS on the inference ports (HTTP and gRPC). Unset: plain HTTP and gRPC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,

    /// A NetworkPolicy for the serving pods: everything is refused except the inference ports from
    /// `inferenceFrom` and the metrics port from `metricsFrom` and the operator. Unset: no policy
    /// (whatever the namespace's own policies allow). Takes effect only where the cluster's network
    /// plugin enforces NetworkPolicies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<NetworkPolicySpec>,
}

/// TLS of the serving pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// A Secret of type `kubernetes.io/tls` in the same namespace (entries `tls.crt`, the chain
    /// leaf first, and `tls.key`), such as cert-manager writes. The server re-reads it when the
    /// Secret changes, so certificates rotate without a restart. Probes use the plain metrics port.
    /// A pod whose Secret is missing does not start.
    #[x_kube(validation = Rule::new("size(self) >= 1 && size(self) <= 253 && self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')")
        .message("tls.secretName must be a Secret name: lower-case letters, digits, '-' and '.', at most 253 characters"))]
    pub secret_name: String,

    /// Mutual TLS: clients must present a certificate signed by a CA in this Secret entry (PEM).
    /// Unset: any client may connect (authenticate callers with `auth` instead, or as well).
    #[serde(default, rename = "clientCA", skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<ClientCaRef>,
}

/// The Secret entry holding the CA bundle that signs client certificates.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ClientCaRef {
    /// Secret name (may be the same Secret as `secretName`).
    #[x_kube(validation = Rule::new("size(self) >= 1 && size(self) <= 253 && self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')")
        .message("tls.clientCA.secretName must be a Secret name: lower-case letters, digits, '-' and '.', at most 253 characters"))]
    pub secret_name: String,
    /// The entry (data key) with the PEM CA bundle.
    #[serde(default = "default_client_ca_entry")]
    #[x_kube(validation = Rule::new("size(self) >= 1 && size(self) <= 253 && self.matches('^[-._a-zA-Z0-9]+$')")
        .message("tls.clientCA.key must be a Secret data key: letters, digits, '-', '_' and '.', at most 253 characters"))]
    pub key: String,
}

fn default_client_ca_entry() -> String {
    "ca.crt".into()
}

/// Who may reach the serving pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Who may reach the inference ports (HTTP 8080 and gRPC 8081), as NetworkPolicy peers
    /// (`namespaceSelector`, `podSelector`, `ipBlock`). Empty: pods of the same namespace only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new("self.all(p, has(p.podSelector) || has(p.namespaceSelector) || has(p.ipBlock))")
        .message("each networkPolicy peer needs podSelector, namespaceSelector or ipBlock ({} is no peer; leave the list out for the default)"))]
    #[x_kube(validation = Rule::new("self.all(p, !has(p.ipBlock) || (!has(p.podSelector) && !has(p.namespaceSelector)))")
        .message("in a networkPolicy peer, ipBlock may not be combined with podSelector or namespaceSelector: write them as two peers"))]
    #[schemars(length(max = 256))]
    pub inference_from: Vec<k8s_openapi::api::networking::v1::NetworkPolicyPeer>,

    /// Who may reach the metrics port (9090) besides the operator. Empty: the namespace named by
    /// the operator's `--monitoring-namespace` (default `monitoring`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new("self.all(p, has(p.podSelector) || has(p.namespaceSelector) || has(p.ipBlock))")
        .message("each networkPolicy peer needs podSelector, namespaceSelector or ipBlock ({} is no peer; leave the list out for the default)"))]
    #[x_kube(validation = Rule::new("self.all(p, !has(p.ipBlock) || (!has(p.podSelector) && !has(p.namespaceSelector)))")
        .message("in a networkPolicy peer, ipBlock may not be combined with podSelector or namespaceSelector: write them as two peers"))]
    #[schemars(length(max = 256))]
    pub metrics_from: Vec<k8s_openapi::api::networking::v1::NetworkPolicyPeer>,
}

/// Access control of the serving pods.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// API keys from a Secret in the same namespace, mounted into the server container (never the
    /// init container) and re-read by the server when the Secret changes, so keys rotate without
    /// a restart. Every inference and metadata request of every protocol on the inference ports
    /// must then send `Authorization: Bearer KEY` (gRPC: `authorization` metadata); health and
    /// readiness stay open for the kubelet, and so does the metrics port (9090: `/metrics`,
    /// health and model metadata, which the operator and Prometheus read; limit who reaches it
    /// with `networkPolicy.metricsFrom`). The Secret's entry holds one key per line: `KEY`, `ID:KEY`, or
    /// `ID:KEY:MODEL[,MODEL...]` to allow only those models. A pod whose Secret is missing does
    /// not start.
    pub api_keys_secret_ref: ApiKeysSecretRef,
}

/// The Secret entry that holds the API keys.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct ApiKeysSecretRef {
    /// Secret name.
    #[x_kube(validation = Rule::new("size(self) >= 1 && size(self) <= 253 && self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')")
        .message("auth.apiKeysSecretRef.name must be a Secret name: lower-case letters, digits, '-' and '.', at most 253 characters"))]
    pub name: String,
    /// The entry (data key) of the Secret with the key lines.
    #[serde(default = "default_api_keys_entry")]
    #[x_kube(validation = Rule::new("size(self) >= 1 && size(self) <= 253 && self.matches('^[-._a-zA-Z0-9]+$')")
        .message("auth.apiKeysSecretRef.key must be a Secret data key: letters, digits, '-', '_' and '.', at most 253 characters"))]
    pub key: String,
}

fn default_api_keys_entry() -> String {
    "keys".into()
}

fn default_replicas() -> i32 {
    1
}

fn default_startup_timeout() -> i32 {
    600
}

/// The model artifact.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("!has(self.cache) || has(self.sha256)")
    .message("model.cache needs model.sha256: the cache is keyed by the pinned digest, so an unpinned artifact can be neither found in it nor verified against it; set sha256 (sha256sum model.onnx) or remove cache")
    .field_path(".cache"))]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    /// Where `kubemaas-server pull` downloads the model from. One file (the ONNX model):
    /// `s3://<bucket>/<key>`, `gs://<bucket>/<object>`, `http(s)://<host>/<path>`,
    /// `hf://<org>/<repo>/<file>[@<revision>]` or `pvc://<claim>/<path>` (read from that
    /// PersistentVolumeClaim, mounted read-only). A directory (`model.onnx` plus its external-data
    /// files): `s3://<bucket>/<prefix>/`, `gs://<bucket>/<prefix>/`, `hf://<org>/<repo>` (the whole
    /// repository), `hf://<org>/<repo>/<dir>/[@<revision>]` or `pvc://<claim>/<dir>/`; a directory
    /// URI ends in `/`, except a whole Hugging Face repository. `@<revision>` (branch, tag or
    /// commit; default `main`) is for `hf://` only. Bucket names follow the S3 and GCS naming rules,
    /// the claim is a DNS-1123 name; `.` and `..` path components, empty components (`//`) and
    /// backslashes are refused.
    #[schemars(length(max = 8192))]
    #[x_kube(validation = uri_shape_rule())]
    #[x_kube(validation = uri_names_rule())]
    #[x_kube(validation = uri_host_rule())]
    #[x_kube(validation = Rule::new("!self.contains('\\\\') && !self.matches('[[:cntrl:]]')")
        .message("uri must not contain backslashes or control characters: separate path components with '/'"))]
    #[x_kube(validation = uri_empty_component_rule())]
    #[x_kube(validation = uri_dot_component_rule())]
    pub uri: String,

    /// Expected SHA-256 of the artifact, 64 lower-case hex characters: of the file, or for a
    /// directory of its manifest (the `sha256sum` lines `<hex>  <path>` of its files, sorted by
    /// path). The pod refuses to serve an artifact that does not match (status: ModelLoaded=False,
    /// reason ChecksumMismatch).
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

    /// Secret with download credentials; only the download init container sees it, never the
    /// serving container. Keys that are environment variable names (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`, `HF_TOKEN`, ...) become its
    /// environment; the Secret is also mounted read-only there as files, so the keys `credentials`
    /// (an AWS shared credentials file), `service-account.json` (a GCS service account key) and
    /// `token` (a bearer token for http(s):// and the Hugging Face token) are used when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,

    /// Allow `http(s)://` and `hf://` hosts that resolve to private addresses (RFC 1918, the
    /// RFC 6598 shared space, loopback, IPv6 unique-local), e.g. an on-premises model store. Refused
    /// by default (status: ModelLoaded=False, reason AddressRefused); link-local and cloud metadata
    /// addresses are refused even when this is true. `s3://`, `gs://` and `pvc://` are not affected.
    #[serde(default)]
    pub allow_private_addresses: bool,

    /// Largest artifact the download accepts, in bytes (for a directory, all its files together);
    /// a larger one fails the download (status: ModelLoaded=False, reason ArtifactTooLarge).
    /// Unlimited when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("model.maxBytes must be at least 1"))]
    pub max_bytes: Option<i64>,

    /// A shared artifact cache: an existing ReadWriteMany PersistentVolumeClaim, keyed by
    /// `sha256` (required with it). A pod whose artifact is in the cache copies it from there (and
    /// verifies it again) instead of downloading; a pod that downloads stores it there. Only the
    /// download init container mounts it (read-write, at /cache).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<ArtifactCache>,

    /// Compress the model in the pod, after the download and its verification and before the
    /// server loads it (`kubemaas-server pull --compress`). The compressed model is measured
    /// against the original on seeded random inputs within the model's declared shapes; if an
    /// output's cosine similarity falls under `minCosine`, the pod serves nothing (status:
    /// ModelLoaded=False, reason CompressionRejected, with the numbers). The measured report is in
    /// `status.model.compression`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
}

/// How the model is compressed at deploy time.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Compression {
    /// `int8-dynamic`: int8 weights; MatMul and Gemm run in int8 with activations quantized per
    /// request, Conv/ConvTranspose/Gather weights are stored in int8 (about 4x smaller artifact),
    /// computed in float. `fp16`: float16 weights and activations with float32 inputs and outputs
    /// kept (half the size; for GPUs).
    pub mode: CompressionMode,
    /// The cosine similarity to the original's outputs every output must reach, in (0, 1].
    #[serde(default = "default_min_cosine")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1.0")
        .message("compression.minCosine must be greater than 0 and at most 1, e.g. 0.99"))]
    pub min_cosine: f64,
    /// Sizes of the model's dynamic dimensions for the evaluation inputs, per input name, e.g.
    /// `{x: [1, 3, 48, 320]}` for an image model whose height and width are dynamic. Inputs not
    /// named here take 1 for a dynamic first (batch) dimension and 32 for other dynamic ones.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    #[x_kube(validation = Rule::new("self.all(k, !k.contains('=') && size(self[k]) >= 1 && self[k].all(d, d >= 1 && d <= 65536))")
        .message("compression.inputShapes maps an input name (without '=') to its dimensions, each from 1 to 65536, e.g. {x: [1, 3, 48, 320]}"))]
    pub input_shapes: BTreeMap<String, Dims>,
}

/// A tensor's dimensions, at most 16.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(transparent)]
pub struct Dims(#[schemars(length(max = 16))] pub Vec<i64>);

/// Compression modes a ModelDeployment accepts.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionMode {
    /// int8 weights, dynamic activation quantization.
    #[serde(rename = "int8-dynamic")]
    Int8Dynamic,
    /// float16.
    #[serde(rename = "fp16")]
    Fp16,
}

impl CompressionMode {
    /// The name `kubemaas-server pull --compress` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            CompressionMode::Int8Dynamic => "int8-dynamic",
            CompressionMode::Fp16 => "fp16",
        }
    }
}

fn default_min_cosine() -> f64 {
    0.99
}

/// A PersistentVolumeClaim shared by the model's pods as a sha256-keyed artifact cache.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactCache {
    /// Name of an existing ReadWriteMany PersistentVolumeClaim in the ModelDeployment's namespace.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$') && size(self) <= 253")
        .message("cache.claimName must be a PersistentVolumeClaim name: lower-case letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters"))]
    pub claim_name: String,
}

fn default_version() -> String {
    "1".into()
}

// The model URI, checked at admission to accept exactly what `kubemaas-server pull` fetches. The
// regular expressions are RE2 (the apiserver) and Rust `regex` (client-side validation, tests);
// they use `[.]` rather than `\.` so that the rules read the same in Rust, YAML and CEL.

/// An S3 bucket: 3-63 lower-case letters, digits, `.` and `-`, starting and ending with a letter
/// or digit (the remaining S3 rules are in [`uri_names_rule`]).
const S3_BUCKET: &str = "[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]";
/// A GCS bucket: lower-case letters, digits, `-`, `_` and `.`, starting and ending with a letter
/// or digit, 3-222 characters (at most 63 between dots: [`uri_names_rule`]).
const GCS_BUCKET: &str = "[a-z0-9][a-z0-9_.-]{1,220}[a-z0-9]";
/// A host name, IPv4 or bracketed IPv6 address, with an optional port; no user information.
const HTTP_AUTHORITY: &str = r"([A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?|\\[[0-9A-Fa-f:.]+\\])(:([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?";
/// A Hugging Face user, organisation or repository name.
const HF_NAME: &str = "[A-Za-z0-9]([A-Za-z0-9_.-]{0,94}[A-Za-z0-9])?";
/// A Hugging Face revision: a branch, tag or commit (branches may contain `/`).
const HF_REVISION: &str = "[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*";
/// A PersistentVolumeClaim name (DNS-1123 subdomain; its length is in [`uri_names_rule`]).
const CLAIM: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*";
/// Where a URI's path starts, for the path rules: after the authority (before any query) for
/// http(s), right after the scheme for the others (their keys may contain `?` and `#`).
const PATH_PREFIX: &str = "^(https?://[^?#]*|(s3|gs|hf|pvc)://.*)";

/// Scheme and shape: what each scheme's `pull` accepts.
fn uri_shape_rule() -> Rule {
    let shape = format!(
        "^(s3://{S3_BUCKET}/.+|gs://{GCS_BUCKET}/.+|https?://{HTTP_AUTHORITY}/[^?#]*[^/?#]([?#].*)?|hf://{HF_NAME}/{HF_NAME}(/[^@]*)?(@{HF_REVISION})?|pvc://{CLAIM}/.+)$"
    );
    Rule::new(format!("self.matches('{shape}')")).message(
        "uri must be s3://<bucket>/<key>, gs://<bucket>/<object>, http(s)://<host>/<path to a file>, \
         hf://<org>/<repo>[/<path>][@<revision>] or pvc://<claim>/<path>; a directory (model.onnx and its \
         external data) is s3://<bucket>/<prefix>/, gs://<bucket>/<prefix>/, hf://<org>/<repo>[/<dir>/] or \
         pvc://<claim>/<dir>/ (bucket and claim names are lower-case; no user:password@ in URLs)",
    )
}

/// An IPv4 octet, 0-255 without leading zeros.
const OCTET: &str = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])";

/// What the shape lets through as an http(s) host but a URL parser refuses (WHATWG, as `pull`
/// parses): a host whose last label is a number is an IPv4 address and must be a dotted quad of
/// octets (`999.1.1.1`, `1.2.3.4.5` and `host.123` are not), and a bracketed IPv6 address must
/// be eight groups of 1-4 hex digits (the last two may be an IPv4 address), or fewer around one
/// `::`, with at most eight colons in all. Shorthand IPv4 forms a URL parser also reads (`0x7f.1`,
/// `1.2.3`) are refused on purpose.
fn uri_host_rule() -> Rule {
    let ipv4 = format!("({OCTET}[.]){{3}}{OCTET}");
    let numeric_last = r"^https?://([^/:?#\\[]*[.])?([0-9]+|0[xX][0-9A-Fa-f]*)(:[0-9]*)?/";
    let dotted_quad = format!(r"^https?://{ipv4}(:[0-9]*)?/");
    let group = "[0-9A-Fa-f]{1,4}";
    let v6_full = format!(r"^https?://\\[(({group}:){{7}}{group}|({group}:){{6}}{ipv4})\\]");
    let v6_short = format!(r"^https?://\\[({group}(:{group})*)?::(({group}:)*({group}|{ipv4}))?\\]");
    Rule::new(format!(
        "(!self.matches('{numeric_last}') || self.matches('{dotted_quad}')) \
         && (!self.matches('^https?://\\\\[') || ((self.matches('{v6_full}') || self.matches('{v6_short}')) \
         && !self.matches('^https?://\\\\[([0-9A-Fa-f.]*:){{9}}')))"
    ))
    .message(
        "uri's host is not a valid address: a host ending in a number must be an IPv4 address of four \
         numbers 0-255 separated by dots, and an IPv6 address in brackets is eight groups of 1-4 hex digits, \
         or fewer around one '::' (e.g. [2001:db8::7])",
    )
}

/// The naming rules of S3 and GCS buckets and of claims that the shape cannot express.
fn uri_names_rule() -> Rule {
    Rule::new(
        "!self.matches('^(s3|gs)://[^/]*[.][.]') \
         && !self.matches('^(s3|gs)://[0-9]+[.][0-9]+[.][0-9]+[.][0-9]+/') \
         && !self.matches('^s3://(xn--|sthree-|amzn-s3-demo-)') \
         && !self.matches('^s3://[^/]*(-s3alias|--ol-s3|[.]mrap|--x-s3|--table-s3)/') \
         && !self.matches('^gs://[^/]*[a-z0-9_-]{64}') \
         && !self.matches('^gs://(goog|[^/]*g[o0][o0]gle)') \
         && !self.matches('^pvc://[^/]{254}')",
    )
    .message(
        "uri names an invalid bucket or claim: an s3:// bucket has no '..', is not an IP address and has no \
         reserved prefix (xn--, sthree-, amzn-s3-demo-) or suffix (-s3alias, --ol-s3, .mrap, --x-s3, --table-s3); \
         a gs:// bucket has no '..', at most 63 characters between dots, is not an IP address, does not start \
         with 'goog' or contain 'google'; a pvc:// claim has at most 253 characters",
    )
}

/// Empty path components (`//`), which `pull` refuses.
fn uri_empty_component_rule() -> Rule {
    Rule::new(format!("!self.matches('{PATH_PREFIX}//')")).message(
        "uri must not contain empty path components ('//'): remove the extra '/' (an absolute path inside the \
         bucket, repository or claim is written without its leading '/')",
    )
}

/// `.` and `..` path components (also percent-encoded, also as a Hugging Face revision), which
/// `pull` refuses rather than resolve.
fn uri_dot_component_rule() -> Rule {
    Rule::new(format!(
        "!self.matches('{PATH_PREFIX}[/@]([.]|%2[eE]){{1,2}}([/@?#]|$)')"
    ))
    .message(
        "uri must not contain '.' or '..' path components: write the artifact's real path inside the bucket, \
         repository or claim (pull never resolves them)",
    )
}

/// A Secret in the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct SecretRef {
    /// Secret name.
    #[x_kube(validation = Rule::new("size(self) >= 1 && size(self) <= 253 && self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')")
        .message("model.credentialsSecretRef.name must be a Secret name: lower-case letters, digits, '-' and '.', at most 253 characters"))]
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
    /// CUDA when the pod gets a GPU, else the CPU. It requests one only with a `gpu` block: without
    /// one the pod is a CPU pod (CPU image, no GPU requested).
    Auto,
}

/// Rolling-update bounds of the Deployment (each a count such as `1` or a percentage such as
/// `25%` of the replicas). A bound left out takes the default described on `spec.rollout`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.maxSurge) || !has(self.maxUnavailable) || !(string(self.maxSurge).matches('^0+%?$') && string(self.maxUnavailable).matches('^0+%?$'))")
    .message("rollout.maxSurge and rollout.maxUnavailable cannot both be 0: the rollout could never replace a pod"))]
pub struct RolloutSpec {
    /// Pods started above the replica count during a rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("string(self).matches('^[0-9]+%?$')")
        .message("rollout.maxSurge must be a non-negative count or a percentage such as 25%"))]
    pub max_surge: Option<IntOrString>,

    /// Pods that may be unavailable during a rollout (a percentage at most 100%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("string(self).matches('^([0-9]+|0*([0-9]{1,2}|100)%)$')")
        .message("rollout.maxUnavailable must be a non-negative count or a percentage of at most 100%, such as 25%"))]
    pub max_unavailable: Option<IntOrString>,
}

/// GPU request.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.count == 1 || !self.resourceName.startsWith('nvidia.com/mig-')")
    .message("a MIG profile (nvidia.com/mig-*) allows gpu.count 1 only: a CUDA process sees one MIG device"))]
pub struct GpuSpec {
    /// GPUs per pod (limits of `resourceName`), 1 to 16. The server spreads its instances over all
    /// of them in turn (four per GPU unless `runtime.instances` says how many in all, which must
    /// then be at least this count).
    #[serde(default = "default_one")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 16").message("gpu.count must be between 1 and 16"))]
    pub count: i32,

    /// NVIDIA extended resource to request: `nvidia.com/gpu`, or a MIG profile such as
    /// `nvidia.com/mig-1g.10gb` (then `count` is 1: a CUDA process sees one MIG device). The
    /// server runs CUDA, so other vendors' resources are refused.
    #[serde(default = "default_gpu_resource")]
    #[x_kube(validation = Rule::new("size(self) <= 253 && self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$') && !self.matches('^([^/]*[.])?kubernetes[.]io/') && !self.startsWith('requests.')")
        .message("gpu.resourceName must be an extended resource such as nvidia.com/gpu or nvidia.com/mig-1g.10gb (a domain, '/', a name)"))]
    #[x_kube(validation = Rule::new("self.startsWith('nvidia.com/')")
        .message("gpu.resourceName must be an NVIDIA resource (nvidia.com/...): the server runs CUDA"))]
    pub resource_name: String,

    /// GPU model to require (node label `nvidia.com/gpu.product`), e.g. `NVIDIA-H100-80GB-HBM3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("size(self) <= 63 && self.matches('^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$')")
        .message("gpu.product must be a label value such as NVIDIA-H100-80GB-HBM3 (letters, digits, '-', '_', '.', at most 63)"))]
    pub product: Option<String>,
}

/// What an image reference must look like (`[registry/]repository[:tag][@digest]`, as the
/// kubelet parses it: a first component is a registry only with a `.`, a port or as `localhost`,
/// and repositories are lower case). RE2 and ECMAScript alike, so the chart's schema uses it too.
pub const IMAGE_REFERENCE: &str = "^(((localhost|([a-zA-Z0-9]|[a-zA-Z0-9][-a-zA-Z0-9]*[a-zA-Z0-9])([.]([a-zA-Z0-9]|[a-zA-Z0-9][-a-zA-Z0-9]*[a-zA-Z0-9]))+)(:[0-9]+)?|([a-zA-Z0-9]|[a-zA-Z0-9][-a-zA-Z0-9]*[a-zA-Z0-9]):[0-9]+)/)?[a-z0-9]+(([.]|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+(([.]|_|__|-+)[a-z0-9]+)*)*(:[A-Za-z0-9_][-A-Za-z0-9_.]{0,127})?(@[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$";

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
    /// ONNX Runtime sessions per pod, each with its own thread: requests run in parallel up to
    /// this many. 0 (the default) lets the server choose: on a CPU one per core of the pod's CPU
    /// limit (else request), at most 4, or with `intraOpThreads` set the cores divided by it (1
    /// to 4); on CUDA 4 per GPU, spread over the pod's GPUs.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 64").message("runtime.instances must be between 0 (the server chooses) and 64"))]
    pub instances: i32,

    /// Intra-op threads per session, at most 1024; 0 shares the pod's CPU limit (else request)
    /// among the instances.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 1024").message("runtime.intraOpThreads must be between 0 (the server shares the CPU limit) and 1024"))]
    pub intra_op_threads: i32,

    /// Dynamic batching of concurrent requests (Triton's semantics): requests are joined along
    /// their first dimension into one execution. Applies to models whose inputs and outputs all
    /// have a dynamic first dimension, and whose outputs keep it (none begins with a later
    /// dimension of an input, as a transpose's would); others are served unbatched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batching: Option<BatchingSpec>,
}

/// Dynamic batching.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.preferredBatchSizes) || self.preferredBatchSizes.all(n, n >= 1 && n <= self.maxBatchSize)")
    .message("batching.preferredBatchSizes must each be between 1 and maxBatchSize"))]
pub struct BatchingSpec {
    /// Most rows in one execution; a request with more rows is refused (400).
    #[serde(default = "default_max_batch")]
    #[x_kube(validation = Rule::new("self >= 1").message("batching.maxBatchSize must be at least 1"))]
    pub max_batch_size: i32,

    /// Longest a request waits for others to join its batch, in microseconds (at most a day).
    #[serde(default = "default_queue_delay")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 86400000000").message("batching.maxQueueDelayMicroseconds must be between 0 and 86400000000 (a day)"))]
    pub max_queue_delay_microseconds: i64,

    /// Requests queued beyond this are refused at once with 503 and Retry-After.
    #[serde(default = "default_queue_size")]
    #[x_kube(validation = Rule::new("self >= 1").message("batching.maxQueueSize must be at least 1"))]
    pub max_queue_size: i32,

    /// Batch sizes (rows) dispatched as soon as a batch reaches one, without waiting out the
    /// queue delay (Triton's `preferred_batch_size`); each at most maxBatchSize.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub preferred_batch_sizes: Vec<i32>,
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
#[x_kube(validation = Rule::new("!has(self.stableWindowSeconds) || self.metric in ['concurrency', 'rps']")
    .message("autoscaling.stableWindowSeconds applies to metric concurrency or rps only (an HPA scales cpu and memory)")
    .field_path(".stableWindowSeconds"))]
#[x_kube(validation = Rule::new("!(self.metric in ['cpu', 'memory']) || self.target <= 1000")
    .message("autoscaling.target is a utilisation percentage for cpu and memory: at most 1000")
    .field_path(".target"))]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Fewest pods. Bounds hold at once when changed, even before any pod is measured.
    #[serde(default = "default_one")]
    #[x_kube(validation = Rule::new("self >= 1").message("autoscaling.minReplicas must be at least 1"))]
    pub min_replicas: i32,

    /// Most pods.
    pub max_replicas: i32,

    /// What to scale on. `cpu` or `memory`: utilisation of the server container, through a
    /// HorizontalPodAutoscaler. `concurrency` (requests in flight per pod) or `rps` (requests
    /// per second per pod): measured from the pods' own counters by the operator, which sets the
    /// replicas itself (no HPA, no metrics adapter), with a stable and a panic window like
    /// Knative's autoscaler.
    #[serde(default)]
    pub metric: AutoscalingMetric,

    /// Target per pod: utilisation in percent of the container's request for `cpu`/`memory`
    /// (1–1000; the pods need a request of that resource, from `resources` or a LimitRange, or the
    /// HPA cannot scale and status says so), in-flight requests for `concurrency`, requests per
    /// second for `rps`.
    #[serde(default = "default_target")]
    #[x_kube(validation = Rule::new("self >= 1").message("autoscaling.target must be at least 1"))]
    pub target: i32,

    /// `concurrency`/`rps` only (default 60): seconds of traffic averaged for a decision (the
    /// stable window). A tenth of it is the panic window: when that short average asks for twice
    /// the ready pods or more, the autoscaler scales up at once and does not scale down until a
    /// stable window has passed without panic. Both windows hold at least the latest scrape
    /// (the operator's `--metrics-interval`, 15 s by default), so a panic window shorter than
    /// that interval acts on one scrape. The HPA behind `cpu`/`memory` has no such window, so it
    /// is refused there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 6 && self <= 3600").message("autoscaling.stableWindowSeconds must be between 6 and 3600"))]
    pub stable_window_seconds: Option<i32>,

    /// Seconds a scale-down waits: the replicas never drop below the highest count recommended
    /// within this period (for `cpu`/`memory` the HPA's `behavior.scaleDown` stabilization). For
    /// `concurrency`/`rps`, one decision also removes at most half the ready pods (as Knative's
    /// max scale-down rate), so even with 0 a scale-down from 20 pods goes 10, 5, 2, 1.
    #[serde(default = "default_scale_down_stabilization")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 3600").message("autoscaling.scaleDownStabilizationSeconds must be between 0 and 3600"))]
    pub scale_down_stabilization_seconds: i32,
}

fn default_target() -> i32 {
    70
}

fn default_scale_down_stabilization() -> i32 {
    300
}

/// Autoscaling metric.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AutoscalingMetric {
    /// CPU utilisation (HPA).
    #[default]
    Cpu,
    /// Memory utilisation (HPA).
    Memory,
    /// Requests in flight per pod (the operator's own autoscaler).
    Concurrency,
    /// Requests per second per pod (the operator's own autoscaler).
    Rps,
}

impl AutoscalingMetric {
    /// Whether the operator scales on this metric itself (rather than through an HPA).
    pub fn is_request_driven(self) -> bool {
        matches!(self, AutoscalingMetric::Concurrency | AutoscalingMetric::Rps)
    }
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
    /// Affinity (the operator sets none of its own).
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
    /// Extra pod labels (the operator's own labels win over these keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Extra pod annotations (the operator's `prometheus.io/*` annotations and template hash win
    /// over these keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    /// Extra environment variables of the server container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<EnvVar>>,
}
