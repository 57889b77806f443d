//! The operator under change (issue 9): status stays honest while a new template rolls out, and a
//! child the apiserver refuses shows up in status, not only in Events.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a panic is a failed test
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kubemaas_crds::v1alpha1::ModelDeployment;
use kubemaas_e2e::{Operator, TestNs, client, condition, create_md, install_crd, is_ready, md_json, wait_md};
use serde_json::json;

#[tokio::test]
async fn a_spec_change_is_not_ready_until_the_deployment_has_rolled_out_the_new_template() {
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, "rollout").await;
    let op = Operator::start(&ns.name, "op-rollout", &[]);
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    create_md(
        &api,
        md_json(
            "ranker",
            json!({"model": {"uri": "s3://models/m.onnx"}, "replicas": 2}),
        ),
    )
    .await;
    wait_md(
        &api,
        "ranker",
        "Ready",
        Duration::from_secs(90),
        Some(&op),
        is_ready,
    )
    .await;

    // Record every status the operator writes from here on.
    let cfg = watcher::Config::default().fields("metadata.name=ranker");
    let mut seen = watcher(api.clone(), cfg).applied_objects().boxed();
    let changed = api
        .patch(
            "ranker",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"model": {"uri": "s3://models/m2.onnx"}}})),
        )
        .await
        .unwrap();
    let generation = changed.metadata.generation.unwrap();
    let first_for_new_generation = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(md) = seen.try_next().await.unwrap() {
            if md.status.as_ref().and_then(|s| s.observed_generation) == Some(generation) {
                return md;
            }
        }
        panic!("watch ended");
    })
    .await
    .expect("a status for the new generation within 60 s");
    let ready = condition(&first_for_new_generation, "Ready").unwrap();
    // The moment the operator first reports the new generation, the Deployment has just been told
    // about it: no new pod can be serving yet.
    assert_eq!(
        (ready.0.as_str(), ready.1.as_str()),
        ("False", "RolloutInProgress"),
        "first status for generation {generation}: {ready:?}"
    );
    // Nor is the new model loaded anywhere yet: the pods that are Ready run the old template.
    let loaded = condition(&first_for_new_generation, "ModelLoaded").unwrap();
    assert_ne!(
        loaded.0, "True",
        "first status for generation {generation}: {loaded:?}"
    );
    assert!(
        loaded.2.ends_with("2 pods of the previous template still serve"),
        "{loaded:?}"
    );
    // And it does become Ready once the rollout is done, with the Deployment agreeing.
    wait_md(
        &api,
        "ranker",
        "Ready after the rollout",
        Duration::from_secs(90),
        Some(&op),
        is_ready,
    )
    .await;
    let done = api.get("ranker").await.unwrap();
    let loaded = condition(&done, "ModelLoaded").unwrap();
    assert_eq!(
        (loaded.0.as_str(), loaded.1.as_str()),
        ("True", "Loaded"),
        "{loaded:?}"
    );
    let d = deployments.get("ranker").await.unwrap();
    let st = d.status.unwrap();
    assert!(st.observed_generation >= d.metadata.generation, "{st:?}");
    assert_eq!(st.updated_replicas, Some(2), "{st:?}");
    // A rollout on time is routine: no Warning on the way.
    let warnings: Vec<String> = model_deployment_events(&client, &ns.name)
        .await
        .into_iter()
        .filter(|e| e.starts_with("Warning "))
        .collect();
    assert!(warnings.is_empty(), "a rollout warned: {warnings:#?}");
}

/// The Events about ModelDeployments in `ns`, as "TYPE REASON: NOTE", once the last ones landed
/// (they are published after the status patch).
async fn model_deployment_events(client: &kube::Client, ns: &str) -> Vec<String> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("ModelDeployment"))
        .map(|e| {
            format!(
                "{} {}: {}",
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default()
            )
        })
        .collect()
}

#[tokio::test]
async fn a_child_the_apiserver_refuses_shows_apply_failed_with_its_message_in_status() {
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, "quota").await;
    // A namespace where no Service may be created.
    let quotas: Api<k8s_openapi::api::core::v1::ResourceQuota> = Api::namespaced(client.clone(), &ns.name);
    quotas
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "no-services"}, "spec": {"hard": {"services": "0"}}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    // Admission enforces a quota once its controller has published the usage.
    kubemaas_e2e::wait_for(
        "the quota to be in force",
        Duration::from_secs(60),
        String::new,
        || async {
            let q = quotas.get("no-services").await.ok()?;
            q.status.and_then(|s| s.hard).is_some().then_some(())
        },
    )
    .await;
    let op = Operator::start(&ns.name, "op-quota", &[]);
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    create_md(
        &api,
        md_json("blocked", json!({"model": {"uri": "s3://models/m.onnx"}})),
    )
    .await;
    let md = wait_md(
        &api,
        "blocked",
        "Ready=False ApplyFailed",
        Duration::from_secs(60),
        Some(&op),
        |md| condition(md, "Ready").is_some_and(|c| c.1 == "ApplyFailed"),
    )
    .await;
    let (status, _, message) = condition(&md, "Ready").unwrap();
    assert_eq!(status, "False");
    assert!(
        message.contains("Service") && message.contains("exceeded quota"),
        "the apiserver's words should reach status: {message}"
    );
    assert_eq!(
        md.status.as_ref().unwrap().observed_generation,
        md.metadata.generation
    );
}

#[tokio::test]
async fn a_healthy_start_emits_no_warning_and_few_events() {
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, "events").await;
    let op = Operator::start(&ns.name, "op-events", &[]);
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    create_md(
        &api,
        md_json(
            "quiet",
            json!({"model": {"uri": "s3://models/m.onnx"}, "replicas": 2}),
        ),
    )
    .await;
    wait_md(
        &api,
        "quiet",
        "Ready",
        Duration::from_secs(90),
        Some(&op),
        is_ready,
    )
    .await;
    let ours = model_deployment_events(&client, &ns.name).await;
    let warnings: Vec<&String> = ours.iter().filter(|e| e.starts_with("Warning ")).collect();
    assert!(warnings.is_empty(), "a healthy start warned: {warnings:#?}");
    // At 1,000 objects every Event is a write: a healthy start says what matters (scheduled,
    // loaded, ready) and nothing about the brief, expected states on the way.
    assert!(ours.len() <= 3, "{} events: {ours:#?}", ours.len());
}

/// Every `spec.replicas` the Deployment `name` takes, as the apiserver announces it, until dropped.
fn record_replicas(
    deployments: &Api<Deployment>,
    name: &str,
) -> (
    std::sync::Arc<std::sync::Mutex<Vec<i32>>>,
    tokio::task::JoinHandle<()>,
) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = watcher(deployments.clone(), cfg).applied_objects().boxed();
    let sink = seen.clone();
    let task = tokio::spawn(async move {
        while let Ok(Some(d)) = stream.try_next().await {
            let r = d.spec.replicas.unwrap_or(-1);
            let mut v = sink.lock().unwrap();
            if v.last() != Some(&r) {
                v.push(r);
            }
        }
    });
    (seen, task)
}

#[tokio::test]
async fn autoscaling_takes_over_and_hands_back_replicas_without_a_dip_or_a_jump() {
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, "handover").await;
    let op = Operator::start(&ns.name, "op-handover", &[]);
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let hpas: Api<k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler> =
        Api::namespaced(client.clone(), &ns.name);
    create_md(
        &api,
        md_json(
            "busy",
            json!({"model": {"uri": "s3://models/m.onnx"}, "replicas": 3}),
        ),
    )
    .await;
    wait_md(
        &api,
        "busy",
        "Ready",
        Duration::from_secs(90),
        Some(&op),
        is_ready,
    )
    .await;
    let (seen, task) = record_replicas(&deployments, "busy");

    // 3 running pods; autoscaling between 2 and 10 must keep them (the HPA decides later).
    api.patch(
        "busy",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"autoscaling": {"minReplicas": 2, "maxReplicas": 10}}})),
    )
    .await
    .unwrap();
    kubemaas_e2e::wait_for(
        "the HPA",
        Duration::from_secs(60),
        || op.log_tail(),
        || async { hpas.get_opt("busy").await.ok().flatten() },
    )
    .await;
    wait_md(
        &api,
        "busy",
        "Ready with the HPA",
        Duration::from_secs(60),
        Some(&op),
        is_ready,
    )
    .await;
    // Give a reset (to the default of 1) time to show up in the watch.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = seen.lock().unwrap().clone();
    assert!(
        during.iter().all(|r| *r == 3),
        "spec.replicas of the Deployment while autoscaling took over: {during:?}"
    );

    // And back: autoscaling removed, 4 replicas asked for. The HPA must be gone before the
    // Deployment is set, or the two fight; the count goes from 3 straight to 4.
    api.patch(
        "busy",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"autoscaling": null, "replicas": 4}})),
    )
    .await
    .unwrap();
    wait_md(
        &api,
        "busy",
        "4 ready replicas",
        Duration::from_secs(90),
        Some(&op),
        |m| is_ready(m) && m.status.as_ref().is_some_and(|s| s.ready_replicas == 4),
    )
    .await;
    assert!(
        hpas.get_opt("busy").await.unwrap().is_none(),
        "the HPA is deleted"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    task.abort();
    let all = seen.lock().unwrap().clone();
    assert_eq!(
        all,
        vec![3, 4],
        "spec.replicas of the Deployment over the whole test"
    );

    // Created autoscaled: the Deployment starts at minReplicas, and a later template change (the
    // operator's apply without spec.replicas) keeps it there.
    let (seen, task) = record_replicas(&deployments, "fresh");
    create_md(
        &api,
        md_json(
            "fresh",
            json!({"model": {"uri": "s3://models/m.onnx"}, "autoscaling": {"minReplicas": 3, "maxReplicas": 6}}),
        ),
    )
    .await;
    wait_md(
        &api,
        "fresh",
        "Ready",
        Duration::from_secs(90),
        Some(&op),
        is_ready,
    )
    .await;
    api.patch(
        "fresh",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"model": {"uri": "s3://models/m2.onnx"}}})),
    )
    .await
    .unwrap();
    wait_md(
        &api,
        "fresh",
        "Ready after a template change",
        Duration::from_secs(90),
        Some(&op),
        |m| is_ready(m) && m.metadata.generation == Some(2),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    task.abort();
    let fresh = seen.lock().unwrap().clone();
    assert_eq!(
        fresh,
        vec![3],
        "spec.replicas of an autoscaled Deployment from its creation"
    );
}

/// The built-in autoscaler decides only from measurements, and here no pod's /metrics answers
/// (nothing listens at the pods' addresses). New bounds must still hold, as an HPA enforces
/// minReplicas and maxReplicas without metrics: 3 running pods and a maxReplicas lowered to 2
/// become 2, and a minReplicas raised to 4 makes 4. Before, the count stayed where it was.
#[tokio::test]
async fn new_autoscaling_bounds_hold_before_any_pod_is_measured() {
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, "bounds").await;
    let op = Operator::start(&ns.name, "op-bounds", &[]);
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let (seen, task) = record_replicas(&deployments, "bounded");
    create_md(
        &api,
        md_json(
            "bounded",
            json!({"model": {"uri": "s3://models/m.onnx"},
                "autoscaling": {"minReplicas": 3, "maxReplicas": 6, "metric": "concurrency", "target": 2}}),
        ),
    )
    .await;
    let replicas = || async {
        deployments
            .get_opt("bounded")
            .await
            .ok()
            .flatten()
            .and_then(|d| d.spec.replicas)
    };
    let wait_replicas = |n: i32, what: &'static str| {
        let op = &op;
        async move {
            kubemaas_e2e::wait_for(
                what,
                Duration::from_secs(60),
                || op.log_tail(),
                || async { replicas().await.filter(|r| *r == n) },
            )
            .await
        }
    };
    wait_replicas(3, "3 replicas at minReplicas").await;
    for (min, max, want, what) in [
        (1, 2, 2, "2 replicas once maxReplicas is 2"),
        (4, 8, 4, "4 replicas once minReplicas is 4"),
    ] {
        api.patch(
            "bounded",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"autoscaling": {"minReplicas": min, "maxReplicas": max}}})),
        )
        .await
        .unwrap();
        wait_replicas(want, what).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    task.abort();
    let all = seen.lock().unwrap().clone();
    assert_eq!(
        all,
        vec![3, 2, 4],
        "spec.replicas of the Deployment over the test"
    );
}

#[tokio::test]
async fn drift_on_owned_fields_is_undone_within_seconds() {
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, "drift").await;
    let op = Operator::start(&ns.name, "op-drift", &[]);
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    create_md(
        &api,
        md_json(
            "steady",
            json!({"model": {"uri": "s3://models/m.onnx"}, "replicas": 2}),
        ),
    )
    .await;
    wait_md(
        &api,
        "steady",
        "Ready",
        Duration::from_secs(90),
        Some(&op),
        is_ready,
    )
    .await;
    let image = |d: &Deployment| {
        d.spec.template.spec.as_ref().unwrap().containers[0]
            .image
            .clone()
            .unwrap()
    };
    let original = image(&deployments.get("steady").await.unwrap());

    let out = kubemaas_e2e::kubectl(&["scale", "-n", &ns.name, "deploy/steady", "--replicas=0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    kubemaas_e2e::wait_for(
        "kubectl scale --replicas=0 to be undone",
        Duration::from_secs(15),
        || op.log_tail(),
        || async {
            let d = deployments.get("steady").await.ok()?;
            (d.spec.replicas == Some(2)).then_some(())
        },
    )
    .await;

    let out = kubemaas_e2e::kubectl(&[
        "set",
        "image",
        "-n",
        &ns.name,
        "deploy/steady",
        "server=example.com/other:1",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    kubemaas_e2e::wait_for(
        "the edited image to be undone",
        Duration::from_secs(15),
        || op.log_tail(),
        || async {
            let d = deployments.get("steady").await.ok()?;
            (image(&d) == original).then_some(())
        },
    )
    .await;

    // A Service port edited by hand comes back too.
    let out = kubemaas_e2e::kubectl(&[
        "patch",
        "-n",
        &ns.name,
        "svc/steady",
        "--type=json",
        "-p",
        r#"[{"op": "replace", "path": "/spec/ports/0/port", "value": 9999}]"#,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let services: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(client.clone(), &ns.name);
    kubemaas_e2e::wait_for(
        "the edited Service port to be undone",
        Duration::from_secs(15),
        || op.log_tail(),
        || async {
            let s = services.get("steady").await.ok()?;
            (s.spec?.ports?[0].port != 9999).then_some(())
        },
    )
    .await;
    wait_md(
        &api,
        "steady",
        "Ready again",
        Duration::from_secs(60),
        Some(&op),
        is_ready,
    )
    .await;
}

#[tokio::test]
async fn after_a_leader_change_the_first_reconciles_start_within_seconds() {
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, "restart").await;
    let mut first = Operator::start(&ns.name, "op-restart-1", &[]);
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let names: Vec<String> = (0..12).map(|i| format!("r{i}")).collect();
    for n in &names {
        create_md(&api, md_json(n, json!({"model": {"uri": "s3://models/m.onnx"}}))).await;
    }
    for n in &names {
        wait_md(&api, n, "Ready", Duration::from_secs(90), Some(&first), is_ready).await;
    }
    let second = Operator::start(&ns.name, "op-restart-2", &[]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(first.terminate(), "a clean shutdown releases the lease");
    // Changed while the standby takes over: it must act on it at once, for all 12.
    for n in &names {
        api.patch(
            n,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await
        .unwrap();
    }
    let started = std::time::Instant::now();
    for n in &names {
        wait_md(
            &api,
            n,
            "the new generation observed",
            Duration::from_secs(60),
            Some(&second),
            |m| m.status.as_ref().and_then(|s| s.observed_generation) == m.metadata.generation,
        )
        .await;
    }
    let took = started.elapsed();
    eprintln!("the new leader observed every change after {took:?}");
    assert!(
        took < Duration::from_secs(10),
        "the new leader took {took:?} to observe every change:\n{}",
        second.log_tail()
    );
}

#[tokio::test]
async fn an_old_oom_kill_in_last_state_does_not_keep_degraded() {
    use k8s_openapi::api::core::v1::Pod;
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, "oldoom").await;
    let op = Operator::start(&ns.name, "op-oldoom", &[]);
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    create_md(
        &api,
        md_json(
            "survivor",
            json!({"model": {"uri": "s3://models/m.onnx"},
                "podTemplate": {"labels": {(kubemaas_e2e::KUBELET_BY_TEST_LABEL): "test"}}}),
        ),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let pod = kubemaas_e2e::bound_pod(&pods, "survivor", Duration::from_secs(60), &op).await;
    // Play the kubelet: the server was OOMKilled once, `ago` minutes ago, restarted and has served
    // since; the kubelet keeps that termination in lastState for the pod's whole life.
    let write = |ago: i64| {
        let pods = pods.clone();
        let pod = pod.clone();
        async move {
            let now = k8s_openapi::jiff::Timestamp::now();
            let then = (now - k8s_openapi::jiff::SignedDuration::from_mins(ago)).to_string();
            let spec = pod.spec.as_ref().unwrap();
            let (init, server) = (&spec.init_containers.as_ref().unwrap()[0], &spec.containers[0]);
            let ok = |t: &str| json!({"type": t, "status": "True", "lastTransitionTime": then});
            let status = json!({"status": {
                "phase": "Running", "hostIP": "127.0.0.2", "startTime": then,
                "conditions": [ok("PodScheduled"), ok("Initialized"), ok("ContainersReady"), ok("Ready")],
                "initContainerStatuses": [{"name": init.name, "image": init.image, "imageID": "", "ready": true,
                    "restartCount": 0, "state": {"terminated": {"exitCode": 0, "reason": "Completed", "finishedAt": then}}}],
                "containerStatuses": [{"name": server.name, "image": server.image, "imageID": "", "ready": true,
                    "started": true, "restartCount": 1, "state": {"running": {"startedAt": then}},
                    "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled", "startedAt": then, "finishedAt": then}}}],
            }});
            pods.patch_status(
                pod.metadata.name.as_deref().unwrap(),
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await
            .expect("pod status patched");
        }
    };
    write(2).await;
    let md = wait_md(
        &api,
        "survivor",
        "Degraded=True OOMKilled for a restart 2 minutes ago",
        Duration::from_secs(60),
        Some(&op),
        |m| condition(m, "Degraded").is_some_and(|c| c.0 == "True" && c.1 == "OOMKilled"),
    )
    .await;
    assert!(condition(&md, "Degraded").unwrap().2.contains("OOMKilled"));
    write(120).await;
    // Two hours later the pod still serves: the kill is history, not the pod's state.
    wait_md(
        &api,
        "survivor",
        "Degraded=False with the same lastState two hours old",
        Duration::from_secs(60),
        Some(&op),
        |m| condition(m, "Degraded").is_some_and(|c| c.0 == "False"),
    )
    .await;
}

#[tokio::test]
async fn a_leader_whose_apiserver_calls_hang_steps_down_before_the_standby_acts() {
    use k8s_openapi::api::coordination::v1::Lease;
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, "hung").await;
    let proxy = kubemaas_e2e::StallingProxy::start().await;
    let kubeconfig = kubemaas_e2e::env()
        .root
        .join(format!("target/e2e/kubeconfig-{}", ns.name));
    proxy.kubeconfig(&kubeconfig);
    let mut hung = Operator::start_with_env(
        &ns.name,
        "op-hung",
        &[],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    create_md(
        &api,
        md_json("kept", json!({"model": {"uri": "s3://models/m.onnx"}})),
    )
    .await;
    wait_md(
        &api,
        "kept",
        "Ready",
        Duration::from_secs(90),
        Some(&hung),
        is_ready,
    )
    .await;
    let standby = Operator::start(&ns.name, "op-standby", &[]);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let holder = || async {
        leases
            .get("kubemaas-operator")
            .await
            .ok()
            .and_then(|l| l.spec?.holder_identity)
    };
    assert_eq!(holder().await.as_deref(), Some("op-hung"));
    // Let the standby see the lease being renewed.
    tokio::time::sleep(Duration::from_secs(3)).await;

    proxy.stall();
    let stalled = std::time::Instant::now();
    let (mut stepped_down, mut taken_over) = (None, None);
    while stalled.elapsed() < Duration::from_secs(60) && (stepped_down.is_none() || taken_over.is_none()) {
        if stepped_down.is_none() && !kubemaas_e2e::process_alive(hung.pid()) {
            stepped_down = Some(stalled.elapsed());
        }
        if taken_over.is_none() && holder().await.as_deref() == Some("op-standby") {
            taken_over = Some(stalled.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = hung.log_tail();
    hung.kill();
    let (Some(down), Some(over)) = (stepped_down, taken_over) else {
        panic!(
            "after 60 s: stepped down {stepped_down:?}, taken over {taken_over:?}\nhung leader's log:\n{log}"
        );
    };
    eprintln!("after the stall: the hung leader exited at {down:?}, the standby took over at {over:?}");
    assert!(
        down < over,
        "the hung leader stopped {down:?} after the stall, the standby took over after {over:?}:\n{log}"
    );
    // And the new leader works.
    api.patch(
        "kept",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 2}})),
    )
    .await
    .unwrap();
    wait_md(
        &api,
        "kept",
        "Ready with 2 replicas under the new leader",
        Duration::from_secs(60),
        Some(&standby),
        |m| is_ready(m) && m.status.as_ref().is_some_and(|s| s.ready_replicas == 2),
    )
    .await;
}

#[tokio::test]
async fn a_dead_controller_makes_the_process_exit_and_the_standby_takes_over() {
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, "deadctl").await;
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    // The debug build's fault hook: the reconcile of "boom" panics.
    let mut doomed =
        Operator::start_with_env(&ns.name, "op-doomed", &[], &[("KUBEMAAS_E2E_PANIC_ON", "boom")]);
    create_md(
        &api,
        md_json("fine", json!({"model": {"uri": "s3://models/m.onnx"}})),
    )
    .await;
    wait_md(
        &api,
        "fine",
        "Ready",
        Duration::from_secs(90),
        Some(&doomed),
        is_ready,
    )
    .await;
    let standby = Operator::start(&ns.name, "op-after", &[]);
    create_md(
        &api,
        md_json("boom", json!({"model": {"uri": "s3://models/m.onnx"}})),
    )
    .await;
    kubemaas_e2e::wait_for(
        "the process whose controller died to exit",
        Duration::from_secs(30),
        || doomed.log_tail(),
        || async { (!kubemaas_e2e::process_alive(doomed.pid())).then_some(()) },
    )
    .await;
    assert!(!doomed.terminate(), "it exits non-zero");
    wait_md(
        &api,
        "boom",
        "Ready under the standby",
        Duration::from_secs(60),
        Some(&standby),
        is_ready,
    )
    .await;
}

/// A fake node of its own with `count` units of an extended resource no other node has, so a test
/// can fill "the cluster's GPUs" without other tests' pods in the way. Deleted when dropped.
struct GpuNode {
    name: String,
}

/// Taint of [`GpuNode`]s; a test's pods tolerate it to land there.
const TAINT: &str = "e2e.kubemaas.io/own-node";

impl GpuNode {
    async fn create(client: &kube::Client, name: &str, resource: &str, count: u32) -> GpuNode {
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
        let capacity = json!({"cpu": "64", "memory": "512Gi", "pods": "110", (resource): count.to_string()});
        let node = json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake"},
                "labels": {"kubernetes.io/hostname": name, "type": "kwok"}},
            // Tainted, so only this test's pods land here (and nothing else is evicted with it).
            "spec": {"taints": [{"key": TAINT, "value": "true", "effect": "NoSchedule"}]},
            "status": {"allocatable": capacity, "capacity": capacity}});
        nodes
            .create(&PostParams::default(), &serde_json::from_value(node).unwrap())
            .await
            .unwrap();
        GpuNode { name: name.into() }
    }
}

impl Drop for GpuNode {
    fn drop(&mut self) {
        let _ = kubemaas_e2e::kubectl(&["delete", "node", &self.name, "--wait=false"]);
    }
}

#[tokio::test]
async fn a_gpu_model_rolls_forward_on_a_full_gpu_cluster_and_a_stuck_surge_shows_the_scheduler() {
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, "gpufull").await;
    // A GPU resource of this test alone (the schema takes NVIDIA resources only).
    let resource = format!("nvidia.com/gpu-{}", ns.name);
    let _node = GpuNode::create(&client, &format!("{}-node", ns.name), &resource, 2).await;
    let op = Operator::start(&ns.name, "op-gpufull", &[]);
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    // Two replicas of one GPU each: every GPU of the cluster (for this resource) is in use.
    create_md(
        &api,
        md_json(
            "fits",
            json!({"model": {"uri": "s3://models/v1.onnx"}, "accelerator": "cuda", "replicas": 2,
                "gpu": {"resourceName": resource, "count": 1},
                "podTemplate": {"tolerations": [{"key": TAINT, "operator": "Exists", "effect": "NoSchedule"}]}}),
        ),
    )
    .await;
    wait_md(
        &api,
        "fits",
        "Ready on both GPUs",
        Duration::from_secs(90),
        Some(&op),
        is_ready,
    )
    .await;

    api.patch(
        "fits",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"model": {"uri": "s3://models/v2.onnx"}}})),
    )
    .await
    .unwrap();
    wait_md(
        &api,
        "fits",
        "Ready after rolling v2 onto the same GPUs",
        Duration::from_secs(90),
        Some(&op),
        |m| is_ready(m) && m.metadata.generation == Some(2),
    )
    .await;
    let d = deployments.get("fits").await.unwrap();
    let init = &d
        .spec
        .template
        .spec
        .as_ref()
        .unwrap()
        .init_containers
        .as_ref()
        .unwrap()[0];
    assert_eq!(init.args.as_ref().unwrap()[1], "s3://models/v2.onnx");

    // Asking for a surge on a full cluster: the rollout cannot progress, and status says why.
    api.patch(
        "fits",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"model": {"uri": "s3://models/v3.onnx"}, "rollout": {"maxSurge": 1, "maxUnavailable": 0}}})),
    )
    .await
    .unwrap();
    let md = wait_md(
        &api,
        "fits",
        "Ready=False RolloutStuck",
        Duration::from_secs(60),
        Some(&op),
        |m| condition(m, "Ready").is_some_and(|c| c.1 == "RolloutStuck"),
    )
    .await;
    let (status, _, message) = condition(&md, "Ready").unwrap();
    assert_eq!(status, "False");
    assert!(message.contains(&format!("Insufficient {resource}")), "{message}");
}

/// Once timed out under CI load: the fault layer answered a resumed watch with an HTTP 410, which
/// kube's watcher retries with the same resource version after a growing backoff (30 s and more),
/// so a watcher stayed blind and only 12 of 50 Deployments were ever created. The apiserver sends
/// a too-old version as a `200` with a 410 `ERROR` event instead; injected that way, the watcher
/// re-lists at once.
#[tokio::test]
async fn fifty_model_deployments_converge_under_conflicts_server_errors_and_cut_watches() {
    use k8s_openapi::api::core::v1::Service;
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, "faults").await;
    // Between the operator and the apiserver (debug build's fault layer): half of all writes get
    // 409, a fifth 5xx, every watch ends after 10 s and every other resumed watch gets 410 Gone.
    let op = Operator::start_with_env(
        &ns.name,
        "op-faults",
        &[],
        &[("KUBEMAAS_E2E_FAULTS", "conflict=0.5,error=0.2,watch=10,gone=1")],
    );
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let names: Vec<String> = (0..50).map(|i| format!("f{i:02}")).collect();
    for n in &names {
        create_md(
            &api,
            md_json(n, json!({"model": {"uri": "s3://models/m.onnx"}, "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}})),
        )
        .await;
    }
    let started = std::time::Instant::now();
    // Progress every 15 s: pods Ready (the cluster's part) against ModelDeployments Ready (the
    // operator's), so a slow run says which side was slow.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns.name);
    let reported = std::sync::Mutex::new(std::time::Instant::now());
    kubemaas_e2e::wait_for(
        "all 50 Ready under faults",
        Duration::from_secs(180),
        || op.log_tail(),
        || async {
            let list = api.list(&Default::default()).await.ok()?;
            let ready = list.items.iter().filter(|m| is_ready(m)).count();
            let due = reported
                .lock()
                .map(|t| t.elapsed() > Duration::from_secs(15))
                .unwrap_or(false);
            if due && ready < names.len() {
                let pods_ready = pods.list(&Default::default()).await.map(|l| {
                    l.items
                        .iter()
                        .filter(|p| {
                            p.status
                                .as_ref()
                                .and_then(|s| s.conditions.as_ref())
                                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                        })
                        .count()
                });
                eprintln!(
                    "after {:?}: {ready}/50 ModelDeployments Ready, pods Ready: {pods_ready:?}",
                    started.elapsed()
                );
                if let Ok(mut t) = reported.lock() {
                    *t = std::time::Instant::now();
                }
            }
            (ready == names.len()).then_some(())
        },
    )
    .await;
    eprintln!(
        "50 ModelDeployments Ready under faults after {:?}",
        started.elapsed()
    );
    // Exactly one child of each kind per ModelDeployment: retries never duplicated anything.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let lp = kube::api::ListParams::default().labels("app.kubernetes.io/managed-by=kubemaas-operator");
    let mut d: Vec<String> = deployments
        .list(&lp)
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|o| o.metadata.name)
        .collect();
    let mut s: Vec<String> = services
        .list(&lp)
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|o| o.metadata.name)
        .collect();
    d.sort();
    s.sort();
    assert_eq!(d, names);
    assert_eq!(s, names);
    // The operator counted what happened to it.
    let failed = |reason: &str| {
        op.metric(&format!(
            "kubemaas_operator_reconcile_errors_total{{reason=\"{reason}\"}}"
        ))
        .unwrap_or(0.0)
    };
    let (apply, status) = (failed("ApplyFailed"), failed("StatusPatchFailed"));
    eprintln!("reconcile errors counted: ApplyFailed {apply}, StatusPatchFailed {status}");
    assert!(
        apply > 0.0 && status > 0.0,
        "ApplyFailed {apply}, StatusPatchFailed {status}"
    );
    let retries = op.metric("kubemaas_operator_api_retries_total").unwrap_or(0.0);
    eprintln!("apiserver requests retried: {retries}");
    assert!(retries > 50.0, "retries {retries}");
    // The watchers met the injected 410 on resume (kube's watcher reports it, then re-lists).
    let log = std::fs::read_to_string(&op.log).unwrap_or_default();
    assert!(
        log.contains("injected: too old resource version"),
        "no 410 reached a watcher"
    );
}
