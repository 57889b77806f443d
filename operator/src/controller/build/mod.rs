//! Pure builders: the children of a `ModelDeployment`, as functions of its spec and the operator's
//! configuration. No client, no I/O: unit-tested with plain structs, and reused by `render`.

mod deployment;
mod hpa;
mod network_policy;
mod pdb;
mod service;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use kubemaas_crds::v1alpha1::ModelDeployment;
use serde::Serialize;

pub use deployment::{PULL_CONTAINER, deployment, server_args};
pub use hpa::hpa;
pub use network_policy::network_policy;
pub use pdb::pdb;
pub use service::service;

/// Label keys and values on every child, defined once.
pub mod labels {
    /// `app.kubernetes.io/name`
    pub const NAME: &str = "app.kubernetes.io/name";
    /// Value of [`NAME`].
    pub const NAME_VALUE: &str = "kubemaas-server";
    /// `app.kubernetes.io/instance` = ModelDeployment name.
    pub const INSTANCE: &str = "app.kubernetes.io/instance";
    /// `app.kubernetes.io/managed-by`
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    /// Value of [`MANAGED_BY`].
    pub const MANAGED_BY_VALUE: &str = "kubemaas-operator";
    /// `kubemaas.io/model-deployment` = ModelDeployment name.
    pub const MODEL_DEPLOYMENT: &str = "kubemaas.io/model-deployment";
    /// Annotation holding the hash of the applied child, so unchanged children are not re-sent.
    pub const SPEC_HASH: &str = "kubemaas.io/spec-hash";
    /// Pod template annotation: the hash of the template without it, so the status can tell the
    /// pods of the current template from those left by the previous one during a rollout.
    pub const TEMPLATE_HASH: &str = "kubemaas.io/template-hash";
    /// Deployment annotation saying who sets `spec.replicas`: [`REPLICAS_BY_OPERATOR`] or
    /// [`REPLICAS_BY_AUTOSCALER`]. A change between the two is a hand-over (see `apply`).
    pub const REPLICAS_BY: &str = "kubemaas.io/replicas-set-by";
    /// `spec.replicas` of the ModelDeployment.
    pub const REPLICAS_BY_OPERATOR: &str = "operator";
    /// The HorizontalPodAutoscaler.
    pub const REPLICAS_BY_AUTOSCALER: &str = "autoscaler";
    /// Label selector matching everything the operator manages.
    pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=kubemaas-operator";
}

/// Server ports, defined once.
pub mod ports {
    /// KServe V2 / TF-Serving REST.
    pub const HTTP: i32 = 8080;
    /// gRPC.
    pub const GRPC: i32 = 8081;
    /// Prometheus metrics.
    pub const METRICS: i32 = 9090;
}

/// Where models live inside the pod.
pub const MODELS_DIR: &str = "/models";

/// Operator-wide settings the builders need.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildConfig {
    /// Default CPU server image.
    pub server_image: String,
    /// Default CUDA server image.
    pub server_cuda_image: String,
    /// Seconds the server keeps accepting after SIGTERM while readiness is false.
    pub shutdown_delay_seconds: i64,
    /// Seconds in-flight requests get to finish after that.
    pub shutdown_timeout_seconds: i64,
    /// The operator's own namespace (from `POD_NAMESPACE`): NetworkPolicies let it reach the
    /// metrics port. None outside a pod.
    pub operator_namespace: Option<String>,
    /// Namespace allowed to the metrics port when `networkPolicy.metricsFrom` is empty.
    pub monitoring_namespace: String,
}

impl Default for BuildConfig {
    fn default() -> Self {
        BuildConfig {
            server_image: "kubemaas/server:0.1.0".into(),
            server_cuda_image: "kubemaas/server-cuda:0.1.0".into(),
            shutdown_delay_seconds: 5,
            shutdown_timeout_seconds: 30,
            operator_namespace: None,
            monitoring_namespace: "monitoring".into(),
        }
    }
}

/// Every child the spec asks for. `None` means "must not exist" (apply deletes it).
#[derive(Debug, Clone, PartialEq)]
pub struct Children {
    /// Always.
    pub deployment: Deployment,
    /// Always.
    pub service: Service,
    /// When `autoscaling` is set.
    pub hpa: Option<HorizontalPodAutoscaler>,
    /// When more than one replica is wanted.
    pub pdb: Option<PodDisruptionBudget>,
    /// When `networkPolicy` is set.
    pub network_policy: Option<NetworkPolicy>,
}

/// Builds every child of `md`.
pub fn children(md: &ModelDeployment, cfg: &BuildConfig) -> Children {
    Children {
        deployment: deployment(md, cfg),
        service: service(md),
        hpa: hpa(md),
        pdb: pdb(md),
        network_policy: network_policy(md, cfg),
    }
}

/// The served model name (spec.model.name, else the ModelDeployment's name).
pub fn model_name(md: &ModelDeployment) -> String {
    md.spec.model.name.clone().unwrap_or_else(|| md.name_any())
}

/// Labels on every child and pod.
pub fn child_labels(md: &ModelDeployment) -> BTreeMap<String, String> {
    let name = md.name_any();
    BTreeMap::from([
        (labels::NAME.into(), labels::NAME_VALUE.into()),
        (labels::INSTANCE.into(), name.clone()),
        (labels::MANAGED_BY.into(), labels::MANAGED_BY_VALUE.into()),
        (labels::MODEL_DEPLOYMENT.into(), name),
    ])
}

/// The (immutable) pod selector.
pub fn selector_labels(md: &ModelDeployment) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::NAME.into(), labels::NAME_VALUE.into()),
        (labels::MODEL_DEPLOYMENT.into(), md.name_any()),
    ])
}

/// The selector as a string (`status.selector`, for the scale subresource).
pub fn selector_string(md: &ModelDeployment) -> String {
    selector_labels(md)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn owner_ref(md: &ModelDeployment) -> Option<OwnerReference> {
    md.controller_owner_ref(&())
}

/// Metadata of a child: same name and namespace as the ModelDeployment, owned by it.
pub fn child_meta(md: &ModelDeployment) -> ObjectMeta {
    ObjectMeta {
        name: Some(md.name_any()),
        namespace: md.namespace(),
        labels: Some(child_labels(md)),
        owner_references: owner_ref(md).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// A stable hash of a desired child, stored in [`labels::SPEC_HASH`]: equal hashes mean applying
/// again would change nothing, so no request is sent.
///
/// SHA-256 (first 8 bytes, hex) of the JSON: a fixed algorithm, unlike `DefaultHasher`, whose
/// output may change with a Rust release and would then re-apply every child after an upgrade.
pub fn spec_hash<T: Serialize>(obj: &T) -> String {
    use sha2::Digest;
    let json = serde_json::to_string(obj).unwrap_or_default();
    let digest = sha2::Sha256::digest(json.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Sets [`labels::SPEC_HASH`] on a desired child (computed without the annotation itself).
pub fn stamp_hash<K: Resource + Serialize>(mut obj: K) -> K {
    let hash = spec_hash(&obj);
    obj.meta_mut()
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(labels::SPEC_HASH.into(), hash);
    obj
}

#[cfg(test)]
pub(crate) mod tests {
    use kubemaas_crds::v1alpha1::ModelDeploymentSpec;

    use super::*;

    /// A ModelDeployment from a YAML-like JSON spec, as the apiserver would hand it over.
    pub fn md(spec: serde_json::Value) -> ModelDeployment {
        let spec: ModelDeploymentSpec = serde_json::from_value(spec).unwrap();
        let mut md = ModelDeployment::new("resnet", spec);
        md.metadata.namespace = Some("ml".into());
        md.metadata.uid = Some("0000-1111".into());
        md.metadata.generation = Some(3);
        md
    }

    #[test]
    fn children_are_owned_by_the_model_deployment_and_labelled() {
        let m = md(serde_json::json!({"model": {"uri": "s3://models/m.onnx"}}));
        let c = children(&m, &BuildConfig::default());
        for meta in [&c.deployment.metadata, &c.service.metadata] {
            let owner = &meta.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (owner.kind.as_str(), owner.name.as_str(), owner.controller),
                ("ModelDeployment", "resnet", Some(true))
            );
            let l = meta.labels.as_ref().unwrap();
            assert_eq!(l[labels::MANAGED_BY], "kubemaas-operator");
            assert_eq!(l[labels::MODEL_DEPLOYMENT], "resnet");
            assert_eq!(meta.namespace.as_deref(), Some("ml"));
        }
        assert!(c.hpa.is_none() && c.pdb.is_none());
    }

    #[test]
    fn spec_hash_is_a_fixed_function_of_the_content() {
        // Pinned: a toolchain upgrade must not change it (that would re-apply every child).
        assert_eq!(spec_hash(&serde_json::json!({"a": 1})), "015abd7f5cc57a2d");
    }

    #[test]
    fn spec_hash_changes_with_content_only() {
        let m = md(serde_json::json!({"model": {"uri": "s3://models/m.onnx"}}));
        let a = spec_hash(&deployment(&m, &BuildConfig::default()));
        assert_eq!(a, spec_hash(&deployment(&m, &BuildConfig::default())));
        let m2 = md(serde_json::json!({"model": {"uri": "s3://models/other.onnx"}}));
        assert_ne!(a, spec_hash(&deployment(&m2, &BuildConfig::default())));
    }
}
