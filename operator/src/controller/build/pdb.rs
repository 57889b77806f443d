//! The PodDisruptionBudget, only when more than one replica is wanted.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kubemaas_crds::v1alpha1::ModelDeployment;

use super::{child_meta, selector_labels};

/// At most one pod voluntarily disrupted at a time, when there is more than one.
pub fn pdb(md: &ModelDeployment) -> Option<PodDisruptionBudget> {
    let wanted = md
        .spec
        .autoscaling
        .as_ref()
        .map(|a| a.min_replicas)
        .unwrap_or(md.spec.replicas);
    (wanted > 1).then(|| PodDisruptionBudget {
        metadata: child_meta(md),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(md)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::md;
    use super::*;

    #[test]
    fn pdb_exists_only_with_more_than_one_replica() {
        assert!(pdb(&md(serde_json::json!({"model": {"uri": "s3://models/m.onnx"}}))).is_none());
        assert!(
            pdb(&md(
                serde_json::json!({"model": {"uri": "s3://models/m.onnx"}, "replicas": 3})
            ))
            .is_some()
        );
        assert!(pdb(&md(serde_json::json!({"model": {"uri": "s3://models/m.onnx"}, "autoscaling": {"minReplicas": 2, "maxReplicas": 3}}))).is_some());
        assert!(pdb(&md(serde_json::json!({"model": {"uri": "s3://models/m.onnx"}, "replicas": 5, "autoscaling": {"maxReplicas": 3}}))).is_none());
    }
}
