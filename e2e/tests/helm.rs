//! `helm install`, `helm upgrade` with a changed CRD and `helm uninstall` of charts/kubemaas on the
//! real control plane, with the operator running under the chart's ServiceAccount and RBAC.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a panic is a failed test

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kubemaas_crds::v1alpha1::ModelDeployment;
use kubemaas_e2e::*;
use serde_json::json;

const CRD: &str = "modeldeployments.kubemaas.io";

fn ok(out: std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn helm_install_upgrade_with_a_new_crd_and_uninstall() {
    let client = client().await;
    let release_ns = TestNs::new(&client, "helm").await;
    let models = TestNs::new(&client, "helm-models").await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    // Other tests may have installed the CRD with kubectl: mark it for Helm to adopt.
    let adopted = crds.get_opt(CRD).await.unwrap().is_some();
    if adopted {
        ok(
            kubectl(&[
                "label",
                "crd",
                CRD,
                "app.kubernetes.io/managed-by=Helm",
                "--overwrite",
            ]),
            "label CRD",
        );
        let rel = format!("meta.helm.sh/release-namespace={}", release_ns.name);
        ok(
            kubectl(&[
                "annotate",
                "crd",
                CRD,
                "meta.helm.sh/release-name=kubemaas",
                &rel,
                "--overwrite",
            ]),
            "annotate CRD",
        );
    }
    let chart = env().root.join("charts/kubemaas");
    ok(
        helm(&[
            "install",
            "kubemaas",
            chart.to_str().unwrap(),
            "-n",
            &release_ns.name,
            "--wait=false",
        ]),
        "helm install",
    );
    ok(
        kubectl(&[
            "wait",
            "--for=condition=Established",
            &format!("crd/{CRD}"),
            "--timeout=60s",
        ]),
        "CRD established",
    );
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &release_ns.name);
    let d = deployments
        .get("kubemaas")
        .await
        .expect("operator Deployment installed");
    assert_eq!(d.spec.replicas, Some(2));

    // The operator (as a process: images cannot run on fake nodes) with the chart's identity.
    let kubeconfig = env()
        .root
        .join(format!("target/e2e/kubeconfig-{}-helm", release_ns.name));
    service_account_kubeconfig(&release_ns.name, "kubemaas", &kubeconfig);
    let op = Operator::start_with_env(
        &models.name,
        "op-helm",
        &["--leader-election-namespace", &release_ns.name],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &models.name);
    create_md(
        &api,
        json!({"apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "m"},
        "spec": {"model": {"uri": "s3://models/m.onnx"}}}),
    )
    .await;
    wait_md(
        &api,
        "m",
        "Ready under the chart's RBAC",
        Duration::from_secs(120),
        Some(&op),
        is_ready,
    )
    .await;
    assert!(
        !std::fs::read_to_string(&op.log).unwrap().contains("forbidden"),
        "{}",
        op.log_tail()
    );

    // A new CRD version in the chart reaches the cluster through `helm upgrade`.
    let upgraded = env()
        .root
        .join(format!("target/e2e/chart-upgraded-{}", release_ns.name));
    let _ = std::fs::remove_dir_all(&upgraded);
    ok(
        std::process::Command::new("cp")
            .args(["-r", chart.to_str().unwrap(), upgraded.to_str().unwrap()])
            .output()
            .unwrap(),
        "copy chart",
    );
    let crd_file = upgraded.join("files/modeldeployments.kubemaas.io.yaml");
    let text = std::fs::read_to_string(&crd_file).unwrap().replace(
        "description: Model artifact URI",
        "description: Model artifact URI (upgraded)",
    );
    std::fs::write(&crd_file, text).unwrap();
    // An adopted CRD's fields are still co-owned by kubectl's server-side apply, so changing
    // them conflicts: taking them over is what --force-conflicts is for.
    let mut upgrade = vec![
        "upgrade",
        "kubemaas",
        upgraded.to_str().unwrap(),
        "-n",
        &release_ns.name,
        "--wait=false",
    ];
    if adopted {
        upgrade.push("--force-conflicts");
    }
    ok(helm(&upgrade), "helm upgrade");
    let crd = crds.get(CRD).await.unwrap();
    let cols = crd.spec.versions[0].additional_printer_columns.clone().unwrap();
    assert_eq!(
        cols[0].description.as_deref(),
        Some("Model artifact URI (upgraded)"),
        "helm upgrade updated the CRD"
    );

    // Uninstall removes the operator but keeps the CRD and every ModelDeployment.
    ok(
        helm(&["uninstall", "kubemaas", "-n", &release_ns.name]),
        "helm uninstall",
    );
    wait_for(
        "the operator Deployment to go",
        Duration::from_secs(60),
        String::new,
        || async { matches!(deployments.get_opt("kubemaas").await, Ok(None)).then_some(()) },
    )
    .await;
    assert!(
        crds.get_opt(CRD).await.unwrap().is_some(),
        "CRD kept (helm.sh/resource-policy: keep)"
    );
    assert!(
        api.get_opt("m").await.unwrap().is_some(),
        "ModelDeployments survive uninstall"
    );
    // Leave the CRD as the other tests expect it.
    install_crd();
}
