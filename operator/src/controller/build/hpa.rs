//! The HorizontalPodAutoscaler (autoscaling/v2), only when `autoscaling` is set.

use k8s_openapi::api::autoscaling::v2::{
    ContainerResourceMetricSource, CrossVersionObjectReference, HPAScalingRules, HorizontalPodAutoscaler,
    HorizontalPodAutoscalerBehavior, HorizontalPodAutoscalerSpec, MetricSpec, MetricTarget,
};
use kube::ResourceExt;
use kubemaas_crds::v1alpha1::{AutoscalingMetric, ModelDeployment};

use super::child_meta;

/// The HPA scaling the Deployment on CPU or memory utilisation of the server container. None for
/// request-driven metrics, which the operator scales on itself.
pub fn hpa(md: &ModelDeployment) -> Option<HorizontalPodAutoscaler> {
    let a = md.spec.autoscaling.as_ref()?;
    let resource = match a.metric {
        AutoscalingMetric::Cpu => "cpu",
        AutoscalingMetric::Memory => "memory",
        AutoscalingMetric::Concurrency | AutoscalingMetric::Rps => return None,
    };
    Some(HorizontalPodAutoscaler {
        metadata: child_meta(md),
        spec: HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: md.name_any(),
            },
            min_replicas: Some(a.min_replicas),
            max_replicas: a.max_replicas,
            // The server container's own utilisation (autoscaling/v2 ContainerResource, GA in
            // Kubernetes 1.30): a Resource metric averages over every container of the pod, so a
            // mesh sidecar would weigh in, and one without a request would stop the HPA.
            metrics: Some(vec![MetricSpec {
                type_: "ContainerResource".into(),
                container_resource: Some(ContainerResourceMetricSource {
                    container: super::deployment::SERVER_CONTAINER.into(),
                    name: resource.into(),
                    target: MetricTarget {
                        type_: "Utilization".into(),
                        average_utilization: Some(a.target),
                        ..MetricTarget::default()
                    },
                }),
                ..MetricSpec::default()
            }]),
            behavior: Some(HorizontalPodAutoscalerBehavior {
                scale_down: Some(HPAScalingRules {
                    stabilization_window_seconds: Some(a.scale_down_stabilization_seconds),
                    ..HPAScalingRules::default()
                }),
                scale_up: None,
            }),
        },
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::md;
    use super::*;

    #[test]
    fn hpa_targets_the_deployment_with_the_chosen_metric() {
        let m = md(serde_json::json!({"model": {"uri": "s3://models/m.onnx"},
            "autoscaling": {"minReplicas": 2, "maxReplicas": 7, "metric": "memory", "target": 80}}));
        let spec = hpa(&m).unwrap().spec;
        assert_eq!((spec.min_replicas, spec.max_replicas), (Some(2), 7));
        assert_eq!(spec.scale_target_ref.kind, "Deployment");
        // The server container's utilisation, as the field says: a Resource metric would average
        // over every container of the pod, a mesh sidecar's too (and stop if it has no request).
        let metric = &spec.metrics.unwrap()[0];
        assert_eq!(metric.type_, "ContainerResource");
        let r = metric.container_resource.clone().unwrap();
        assert_eq!(
            (
                r.container.as_str(),
                r.name.as_str(),
                r.target.average_utilization
            ),
            ("server", "memory", Some(80))
        );
        assert!(hpa(&md(serde_json::json!({"model": {"uri": "s3://models/m.onnx"}}))).is_none());
        let down = spec.behavior.unwrap().scale_down.unwrap();
        assert_eq!(down.stabilization_window_seconds, Some(300), "the default");
        let kpa = md(serde_json::json!({"model": {"uri": "s3://models/m.onnx"},
            "autoscaling": {"maxReplicas": 7, "metric": "concurrency", "target": 2}}));
        assert!(hpa(&kpa).is_none(), "the operator scales on requests itself");
    }
}
