//! ModelDeployments applied at once all reach Ready: 200 in `make test`, 1,000 in `make scale`
//! (`KUBEMAAS_SCALE_COUNT`). The time to converge is reported, not asserted (it depends on the
//! machine); the operator's peak RSS is asserted against `KUBEMAAS_SCALE_MAX_RSS_MIB` when set
//! (`make scale` sets 128).

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a panic is a failed test

use std::time::{Duration, Instant};

use kube::Api;
use kube::api::ListParams;
use kubemaas_crds::v1alpha1::ModelDeployment;
use kubemaas_e2e::*;
use serde_json::json;

#[tokio::test]
async fn many_model_deployments_all_reach_ready_within_the_memory_budget() {
    let count: usize = std::env::var("KUBEMAAS_SCALE_COUNT")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(200);
    let budget_mib: Option<f64> = std::env::var("KUBEMAAS_SCALE_MAX_RSS_MIB")
        .ok()
        .and_then(|c| c.parse().ok());
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, "scale").await;
    // On 2 cores shared by etcd, the apiserver and a thousand concurrent creates, a lease renewal
    // took longer than the 6.7 s renew deadline of a 10 s lease, and the operator correctly
    // stepped down. A 30 s lease (20 s renew deadline) measures the steady work instead.
    let op = Operator::start(&ns.name, "op-scale", &["--lease-duration-seconds", "30"]);
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let start = Instant::now();
    let mut creates = Vec::new();
    for i in 0..count {
        let api = api.clone();
        creates.push(tokio::spawn(async move {
            let md = json!({"apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelDeployment",
                "metadata": {"name": format!("m{i:04}")},
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
                (n == count).then_some(n)
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
    if let Some(budget) = budget_mib {
        let peak = peak_rss as f64 / 1024.0;
        assert!(
            peak < budget,
            "operator peak RSS {peak:.1} MiB at {count} ModelDeployments, budget {budget} MiB"
        );
    }
}
