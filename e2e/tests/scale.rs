//! 200 ModelDeployments applied at once all reach Ready. The time to converge and the operator's
//! peak RSS are reported, not asserted (they depend on the machine).

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a panic is a failed test

use std::time::{Duration, Instant};

use kube::Api;
use kube::api::ListParams;
use kubemaas_crds::v1alpha1::ModelDeployment;
use kubemaas_e2e::*;
use serde_json::json;

const COUNT: usize = 200;

#[tokio::test]
async fn two_hundred_model_deployments_all_reach_ready() {
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, "scale").await;
    let op = Operator::start(&ns.name, "op-scale", &[]);
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let start = Instant::now();
    let mut creates = Vec::new();
    for i in 0..COUNT {
        let api = api.clone();
        creates.push(tokio::spawn(async move {
            let md = json!({"apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelDeployment",
                "metadata": {"name": format!("m{i:03}")},
                "spec": {"model": {"uri": "s3://models/m.onnx"}, "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}});
            create_md(&api, md).await;
        }));
    }
    for c in creates {
        c.await.unwrap();
    }
    let applied = start.elapsed();
    let mut peak_rss = 0;
    let ready = wait_for(
        "all ModelDeployments Ready",
        Duration::from_secs(600),
        || op.log_tail(),
        || {
            peak_rss = peak_rss.max(op.peak_rss_kib().unwrap_or(0));
            let api = api.clone();
            async move {
                let list = api.list(&ListParams::default()).await.ok()?;
                let n = list.items.iter().filter(|m| is_ready(m)).count();
                (n == COUNT).then_some(n)
            }
        },
    )
    .await;
    let converged = start.elapsed();
    peak_rss = peak_rss.max(op.peak_rss_kib().unwrap_or(0));
    let reconciles = op.metric("kubemaas_operator_reconciles_total").unwrap_or(0.0);
    let writes = op.metric("kubemaas_operator_write_requests_total").unwrap_or(0.0);
    println!(
        "SCALE REPORT: {ready} ModelDeployments applied in {:.1}s, all Ready after {:.1}s; operator peak RSS {:.1} MiB; {reconciles} reconciles, {writes} write requests",
        applied.as_secs_f64(),
        converged.as_secs_f64(),
        peak_rss as f64 / 1024.0
    );
}
