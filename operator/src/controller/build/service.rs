//! The Service in front of the serving pods.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kubemaas_crds::v1alpha1::ModelDeployment;

use super::{child_meta, ports, selector_labels};

/// ClusterIP Service with the http, grpc and metrics ports. Each declares its `appProtocol`, which
/// meshes and Gateway API implementations follow: with `spec.tls` the inference ports speak TLS
/// (`https`), else HTTP/1.1 and cleartext HTTP/2; the metrics port is always plain HTTP.
pub fn service(md: &ModelDeployment) -> Service {
    let tls = md.spec.tls.is_some();
    let port = |name: &str, p: i32| ServicePort {
        name: Some(name.into()),
        port: p,
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        app_protocol: Some(
            match (name, tls) {
                ("metrics", _) => "http",
                (_, true) => "https",
                ("grpc", false) => "kubernetes.io/h2c",
                _ => "http",
            }
            .into(),
        ),
        ..ServicePort::default()
    };
    Service {
        metadata: child_meta(md),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(md)),
            ports: Some(vec![
                port("http", ports::HTTP),
                port("grpc", ports::GRPC),
                port("metrics", ports::METRICS),
            ]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::md;
    use super::*;

    #[test]
    fn with_tls_the_inference_ports_declare_tls_and_the_metrics_port_stays_plain() {
        let protocols = |spec: serde_json::Value| -> Vec<String> {
            service(&md(spec))
                .spec
                .unwrap()
                .ports
                .unwrap()
                .into_iter()
                .map(|p| p.app_protocol.unwrap())
                .collect()
        };
        let uri = serde_json::json!({"uri": "s3://models/m.onnx"});
        assert_eq!(
            protocols(serde_json::json!({"model": uri})),
            ["http", "kubernetes.io/h2c", "http"]
        );
        // A mesh or gateway that honours appProtocol must not speak plaintext to a TLS listener.
        assert_eq!(
            protocols(serde_json::json!({"model": uri, "tls": {"secretName": "serving-cert"}})),
            ["https", "https", "http"]
        );
    }

    #[test]
    fn service_exposes_http_grpc_and_metrics_by_name() {
        let s = service(&md(serde_json::json!({"model": {"uri": "s3://models/m.onnx"}})));
        let spec = s.spec.unwrap();
        let ports: Vec<(String, i32)> = spec
            .ports
            .unwrap()
            .into_iter()
            .map(|p| (p.name.unwrap(), p.port))
            .collect();
        assert_eq!(
            ports,
            [
                ("http".into(), 8080),
                ("grpc".into(), 8081),
                ("metrics".into(), 9090)
            ]
        );
        assert_eq!(spec.selector.unwrap()["kubemaas.io/model-deployment"], "resnet");
    }
}
