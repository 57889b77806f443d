//! The NetworkPolicy of `spec.networkPolicy`: ingress to the serving pods only on the inference
//! ports from the chosen peers, and on the metrics port from monitoring and the operator.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kubemaas_crds::v1alpha1::ModelDeployment;

use super::{BuildConfig, child_meta, ports, selector_labels};

/// The label every namespace carries with its own name (set by the apiserver).
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

fn namespace_named(name: &str) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(NAMESPACE_NAME_LABEL.into(), name.into())])),
            ..LabelSelector::default()
        }),
        ..NetworkPolicyPeer::default()
    }
}

fn tcp(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        ..NetworkPolicyPort::default()
    }
}

/// The policy, when `spec.networkPolicy` is set. Selecting the pods makes every ingress that no
/// rule allows refused (default deny); egress is left alone (the init container downloads the
/// model from wherever it lives).
pub fn network_policy(md: &ModelDeployment, cfg: &BuildConfig) -> Option<NetworkPolicy> {
    let np = md.spec.network_policy.as_ref()?;
    let inference_from = if np.inference_from.is_empty() {
        // Pods of the ModelDeployment's own namespace.
        vec![NetworkPolicyPeer {
            pod_selector: Some(LabelSelector::default()),
            ..NetworkPolicyPeer::default()
        }]
    } else {
        np.inference_from.clone()
    };
    let mut metrics_from = if np.metrics_from.is_empty() {
        vec![namespace_named(&cfg.monitoring_namespace)]
    } else {
        np.metrics_from.clone()
    };
    // The operator reads readiness, model metadata and metrics on this port.
    if let Some(ns) = &cfg.operator_namespace {
        metrics_from.push(namespace_named(ns));
    }
    Some(NetworkPolicy {
        metadata: child_meta(md),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(md)),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: Some(inference_from),
                    ports: Some(vec![tcp(ports::HTTP), tcp(ports::GRPC)]),
                },
                NetworkPolicyIngressRule {
                    from: Some(metrics_from),
                    ports: Some(vec![tcp(ports::METRICS)]),
                },
            ]),
            ..NetworkPolicySpec::default()
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::md;
    use super::*;

    #[test]
    fn no_policy_without_the_field() {
        let m = md(serde_json::json!({"model": {"uri": "s3://b/m.onnx"}}));
        assert!(network_policy(&m, &BuildConfig::default()).is_none());
    }

    #[test]
    fn defaults_allow_the_namespace_monitoring_and_the_operator() {
        let m = md(serde_json::json!({"model": {"uri": "s3://b/m.onnx"}, "networkPolicy": {}}));
        let cfg = BuildConfig {
            operator_namespace: Some("kubemaas-system".into()),
            ..BuildConfig::default()
        };
        let p = serde_json::to_value(network_policy(&m, &cfg).unwrap()).unwrap();
        assert_eq!(p["metadata"]["name"], "resnet");
        assert_eq!(p["metadata"]["ownerReferences"][0]["kind"], "ModelDeployment");
        assert_eq!(p["spec"]["policyTypes"], serde_json::json!(["Ingress"]));
        assert_eq!(
            p["spec"]["podSelector"]["matchLabels"]["kubemaas.io/model-deployment"],
            "resnet"
        );
        let rules = &p["spec"]["ingress"];
        assert_eq!(rules[0]["from"], serde_json::json!([{"podSelector": {}}]));
        assert_eq!(
            rules[0]["ports"],
            serde_json::json!([{"port": 8080, "protocol": "TCP"}, {"port": 8081, "protocol": "TCP"}])
        );
        assert_eq!(
            rules[1]["ports"],
            serde_json::json!([{"port": 9090, "protocol": "TCP"}])
        );
        let ns = |i: usize| {
            rules[1]["from"][i]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"].clone()
        };
        assert_eq!((ns(0), ns(1)), ("monitoring".into(), "kubemaas-system".into()));
    }

    #[test]
    fn chosen_peers_replace_the_defaults() {
        let m = md(
            serde_json::json!({"model": {"uri": "s3://b/m.onnx"}, "networkPolicy": {
            "inferenceFrom": [{"namespaceSelector": {"matchLabels": {"team": "search"}}}],
            "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "obs"}}}]}}),
        );
        let p = serde_json::to_value(network_policy(&m, &BuildConfig::default()).unwrap()).unwrap();
        let rules = &p["spec"]["ingress"];
        assert_eq!(
            rules[0]["from"][0]["namespaceSelector"]["matchLabels"]["team"],
            "search"
        );
        assert_eq!(rules[1]["from"].as_array().unwrap().len(), 1);
        assert_eq!(
            rules[1]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
            "obs"
        );
    }
}
