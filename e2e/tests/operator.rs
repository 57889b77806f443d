//! The operator against a real control plane: CRD admission, reconcile to Ready, GPU scheduling,
//! scale/rollout/cleanup, crash recovery, zero-write resyncs and leader election.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a panic is a failed test

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use kubemaas_crds::v1alpha1::ModelDeployment;
use kubemaas_e2e::*;
use serde_json::json;

const LONG: Duration = Duration::from_secs(120);

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test]
async fn crd_is_accepted_examples_apply_and_cel_rejects_invalid_manifests() {
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, "admission").await;
    let env = env();
    let mut examples: Vec<_> = std::fs::read_dir(env.root.join("deploy/examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    examples.sort();
    assert!(examples.len() >= 6);
    for ex in &examples {
        let out = kubectl(&["apply", "-n", &ns.name, "-f", ex.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "kubectl apply {} failed: {}",
            ex.display(),
            stderr(&out)
        );
    }
    let mut invalid: Vec<_> = std::fs::read_dir(env.root.join("deploy/invalid"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    invalid.sort();
    assert!(invalid.len() >= 5);
    for bad in &invalid {
        let text = std::fs::read_to_string(bad).unwrap();
        let expected = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .expect("invalid manifest declares its message");
        let out = kubectl(&["apply", "-n", &ns.name, "-f", bad.to_str().unwrap()]);
        assert!(!out.status.success(), "{} was accepted", bad.display());
        assert!(
            stderr(&out).contains(expected),
            "{}: kubectl said {:?}, expected {expected:?}",
            bad.display(),
            stderr(&out)
        );
    }
    // Defaults come from the schema: the stored object has them, nobody wrote them.
    let md: ModelDeployment = Api::namespaced(client.clone(), &ns.name)
        .get("text-classifier")
        .await
        .unwrap();
    assert_eq!(
        (md.spec.startup_timeout_seconds, md.spec.model.version.as_str()),
        (600, "1")
    );
    let out = kubectl(&["explain", "modeldeployments.spec.gpu.resourceName"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("MIG profile"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn the_apiserver_and_client_side_validation_agree_on_every_uri_rule() {
    // The rules are RE2 in the apiserver and Rust regex in `validate_cel` (tests, `render`).
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, "uris").await;
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let dry = kube::api::PostParams {
        dry_run: true,
        ..Default::default()
    };
    let cases = [
        ("s3://models/resnet/1/", true),
        ("gs://my_bucket.example.com/m.onnx", true),
        ("https://[::1]:8443/m.onnx?sig=a/../b", true),
        ("hf://org/repo/onnx/model.onnx@refs/pr/1", true),
        ("hf://org/repo", true),
        ("pvc://model-store/dir/", true),
        ("ftp://example.com/m.onnx", false),
        ("s3://b/m.onnx", false),
        ("s3://127.0.0.9/m.onnx", false),
        ("gs://google-models/m.onnx", false),
        ("https://h.example.com/a/%2E%2e/m.onnx", false),
        ("https://user:pw@h.example.com/m.onnx", false),
        ("https://h.example.com:70000/m.onnx", false),
        ("hf://org/repo/x.onnx@..", false),
        ("pvc://claim//etc/passwd", false),
        ("pvc://claim/a\\b", false),
        ("s3://models/m\u{1}.onnx", false),
    ];
    // A presigned URL with a session token is a few thousand characters.
    let presigned = format!(
        "https://models.s3.eu-west-1.amazonaws.com/m.onnx?X-Amz-Security-Token={}&X-Amz-Signature={}",
        "A".repeat(3000),
        "f".repeat(64)
    );
    let cases = cases
        .iter()
        .map(|(u, ok)| (u.to_string(), *ok))
        .chain([(presigned, true)]);
    for (i, (uri, ok)) in cases.enumerate() {
        let md: ModelDeployment =
            serde_json::from_value(md_json(&format!("u{i}"), json!({"model": {"uri": uri}}))).unwrap();
        let client_side = md.validate_cel();
        let server_side = api.create(&dry, &md).await;
        assert_eq!(client_side.is_ok(), ok, "client side on {uri:?}: {client_side:?}");
        assert_eq!(
            server_side.is_ok(),
            ok,
            "apiserver on {uri:?}: {:?}",
            server_side.err()
        );
    }
    // maxLength is an OpenAPI check, which validate_cel (CEL rules only) does not make.
    let long: ModelDeployment = serde_json::from_value(md_json(
        "too-long",
        json!({"model": {"uri": format!("s3://models/{}", "k".repeat(8200))}}),
    ))
    .unwrap();
    let err = api.create(&dry, &long).await.err().map(|e| e.to_string());
    assert!(
        err.as_deref().is_some_and(|e| e.contains("8192")),
        "an over-long uri: {:?}",
        err.map(|e| e.chars().take(300).collect::<String>())
    );
}

#[tokio::test]
async fn cpu_model_deployment_becomes_ready_with_owned_children() {
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, "cpu").await;
    let op = Operator::start(&ns.name, "op-cpu", &[]);
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let created = create_md(
        &api,
        md_json(
            "classifier",
            json!({"model": {"uri": "s3://models/m.onnx"}, "replicas": 2,
        "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}}}),
        ),
    )
    .await;
    let md = wait_md(&api, "classifier", "Ready=True", LONG, Some(&op), is_ready).await;
    let st = md.status.clone().unwrap();
    assert_eq!(
        (st.replicas, st.ready_replicas, st.observed_generation),
        (2, 2, md.metadata.generation)
    );
    assert_eq!(condition(&md, "Scheduled").unwrap().0, "True");
    assert_eq!(condition(&md, "Degraded").unwrap().0, "False");
    let uid = created.uid().unwrap();
    let owned_by_md = |refs: Option<&Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>| {
        refs.is_some_and(|r| r.iter().any(|o| o.uid == uid && o.controller == Some(true)))
    };
    let d: Deployment = Api::namespaced(client.clone(), &ns.name)
        .get("classifier")
        .await
        .unwrap();
    assert!(owned_by_md(d.metadata.owner_references.as_ref()));
    let s: Service = Api::namespaced(client.clone(), &ns.name)
        .get("classifier")
        .await
        .unwrap();
    assert!(owned_by_md(s.metadata.owner_references.as_ref()));
    let pdb: PodDisruptionBudget = Api::namespaced(client.clone(), &ns.name)
        .get("classifier")
        .await
        .unwrap();
    assert!(owned_by_md(pdb.metadata.owner_references.as_ref()));
    // The controller-manager made the ReplicaSet, the scheduler bound the pods, kwok runs them.
    let pods = pods_of(&client, &ns.name, "classifier").await;
    assert_eq!(pods.len(), 2);
    for p in &pods {
        let node = p.spec.as_ref().unwrap().node_name.clone().unwrap();
        assert!(node.starts_with("cpu-"), "CPU pod on {node}");
        let ip = p.status.as_ref().unwrap().pod_ip.clone().unwrap();
        assert!(ip.starts_with("127."), "fake pod IP {ip} must stay on loopback");
    }
    let out = kubectl(&[
        "wait",
        "-n",
        &ns.name,
        "--for=condition=Ready",
        "mdep/classifier",
        "--timeout=30s",
    ]);
    assert!(out.status.success(), "kubectl wait: {}", stderr(&out));
    let out = kubectl(&["get", "-n", &ns.name, "mdep", "classifier"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("MODEL") && table.contains("ACCELERATOR") && table.contains("s3://models/m.onnx"),
        "{table}"
    );
    let events = kubectl(&[
        "get",
        "events",
        "-n",
        &ns.name,
        "--field-selector",
        "involvedObject.kind=ModelDeployment",
    ]);
    assert!(String::from_utf8_lossy(&events.stdout).contains("MinimumReplicasAvailable"));
}

#[tokio::test]
async fn gpu_pods_land_on_matching_nodes_and_overcommit_reports_the_scheduler() {
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, "gpu").await;
    let op = Operator::start(&ns.name, "op-gpu", &[]);
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    create_md(
        &api,
        md_json(
            "h100",
            json!({"model": {"uri": "s3://models/m.onnx"}, "accelerator": "cuda", "replicas": 2,
        "gpu": {"count": 4, "product": "NVIDIA-H100-80GB-HBM3"}}),
        ),
    )
    .await;
    create_md(
        &api,
        md_json(
            "mig",
            json!({"model": {"uri": "s3://models/m.onnx"}, "accelerator": "cuda",
        "gpu": {"resourceName": "nvidia.com/mig-1g.10gb"}}),
        ),
    )
    .await;
    create_md(
        &api,
        md_json(
            "greedy",
            json!({"model": {"uri": "s3://models/m.onnx"}, "accelerator": "cuda", "gpu": {"count": 9}}),
        ),
    )
    .await;
    wait_md(&api, "h100", "Ready=True", LONG, Some(&op), is_ready).await;
    for p in pods_of(&client, &ns.name, "h100").await {
        let node = p.spec.unwrap().node_name.unwrap();
        assert!(node.starts_with("gpu-"), "H100 pod on {node}");
    }
    wait_md(&api, "mig", "Ready=True", LONG, Some(&op), is_ready).await;
    for p in pods_of(&client, &ns.name, "mig").await {
        assert_eq!(p.spec.unwrap().node_name.as_deref(), Some("mig-0"));
    }
    let md = wait_md(&api, "greedy", "Scheduled=False", LONG, Some(&op), |m| {
        condition(m, "Scheduled").is_some_and(|c| c.0 == "False")
    })
    .await;
    let (_, reason, message) = condition(&md, "Scheduled").unwrap();
    assert_eq!(reason, "Unschedulable");
    assert!(message.contains("Insufficient nvidia.com/gpu"), "{message}");
    assert_eq!(condition(&md, "Ready").unwrap().0, "False");
}

#[tokio::test]
async fn scale_subresource_uri_rollout_autoscaling_removal_and_garbage_collection() {
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, "lifecycle").await;
    let op = Operator::start(&ns.name, "op-life", &[]);
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns.name);
    create_md(
        &api,
        md_json("life", json!({"model": {"uri": "s3://models/v1.onnx"}})),
    )
    .await;
    wait_md(&api, "life", "Ready", LONG, Some(&op), is_ready).await;

    let out = kubectl(&["scale", "-n", &ns.name, "mdep/life", "--replicas=3"]);
    assert!(out.status.success(), "kubectl scale: {}", stderr(&out));
    let md = wait_md(&api, "life", "3 ready replicas", LONG, Some(&op), |m| {
        is_ready(m) && m.status.as_ref().unwrap().ready_replicas == 3
    })
    .await;
    assert_eq!(md.spec.replicas, 3);
    assert_eq!(deployments.get("life").await.unwrap().spec.replicas, Some(3));

    let before = deployments.get("life").await.unwrap();
    let patch = json!({"spec": {"model": {"uri": "s3://models/v2.onnx"}}});
    api.patch("life", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let md = wait_md(&api, "life", "Ready after the URI change", LONG, Some(&op), |m| {
        m.metadata.generation == Some(3) && is_ready(m)
    })
    .await;
    let after = deployments.get("life").await.unwrap();
    assert!(
        after.metadata.generation > before.metadata.generation,
        "the Deployment rolled"
    );
    let args = after.spec.template.spec.unwrap().init_containers.unwrap()[0]
        .args
        .clone()
        .unwrap();
    assert_eq!(args[1], "s3://models/v2.onnx");
    let rs = Api::<ReplicaSet>::namespaced(client.clone(), &ns.name)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(rs.items.len() >= 2, "a new ReplicaSet for the new template");
    assert_eq!(md.status.unwrap().observed_generation, Some(3));

    let patch = json!({"spec": {"autoscaling": {"minReplicas": 1, "maxReplicas": 4}}});
    api.patch("life", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    wait_for(
        "the HPA",
        LONG,
        || op.log_tail(),
        || async { hpas.get_opt("life").await.ok().flatten() },
    )
    .await;
    // The HPA scales on CPU utilisation; this control plane has no metrics API, so it cannot. That
    // must show in the ModelDeployment's status (and as a Warning Event), in the HPA's own words,
    // not only in an object the user never looks at.
    let active = wait_for(
        "the HPA's ScalingActive condition",
        LONG,
        || op.log_tail(),
        || async {
            let hpa = hpas.get_opt("life").await.ok().flatten()?;
            hpa.status?
                .conditions?
                .into_iter()
                .find(|c| c.type_ == "ScalingActive")
        },
    )
    .await;
    assert_eq!(active.status, "False", "no metrics API here: {active:?}");
    let said = active.message.clone().unwrap_or_default();
    let why = active.reason.clone().unwrap_or_default();
    let md = wait_md(
        &api,
        "life",
        "status.autoscaling from the HPA",
        LONG,
        Some(&op),
        |m| {
            m.status
                .as_ref()
                .and_then(|s| s.autoscaling.as_ref())
                .is_some_and(|a| a.reason.contains(&said) && a.reason.contains(&why))
        },
    )
    .await;
    let a = md.status.unwrap().autoscaling.unwrap();
    assert!(a.reason.contains("HorizontalPodAutoscaler cannot scale"), "{a:?}");
    let hpa_status = hpas.get("life").await.unwrap().status.unwrap();
    assert_eq!(
        a.desired_replicas, hpa_status.desired_replicas,
        "{a:?} {hpa_status:?}"
    );
    let warned = wait_for(
        "an AutoscalingFailed Event",
        LONG,
        || op.log_tail(),
        || async {
            let out = kubectl(&[
                "get",
                "events",
                "-n",
                &ns.name,
                "--field-selector",
                "reason=AutoscalingFailed",
                "-o",
                "jsonpath={range .items[*]}{.type}:{.note}{.message}{\"\\n\"}{end}",
            ]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.contains("Warning:").then_some(text)
        },
    )
    .await;
    assert!(warned.contains(&said), "{warned}");
    let patch = json!({"spec": {"autoscaling": null}});
    api.patch("life", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    wait_for(
        "the HPA to be deleted",
        LONG,
        || op.log_tail(),
        || async { matches!(hpas.get_opt("life").await, Ok(None)).then_some(()) },
    )
    .await;

    delete_md(&api, "life").await;
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    wait_for(
        "every child garbage-collected",
        LONG,
        || op.log_tail(),
        || async {
            let d = deployments.get_opt("life").await.ok()?;
            let s = services.get_opt("life").await.ok()?;
            let p = pods.list(&ListParams::default()).await.ok()?;
            (d.is_none() && s.is_none() && p.items.is_empty()).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn killed_operator_converges_without_duplicates_and_a_resync_writes_nothing() {
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, "restart").await;
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let names: Vec<String> = (0..8).map(|i| format!("m{i}")).collect();
    let mut op = Operator::start(&ns.name, "op-restart-1", &[]);
    for n in &names {
        create_md(&api, md_json(n, json!({"model": {"uri": "s3://models/m.onnx"}, "autoscaling": {"minReplicas": 1, "maxReplicas": 2}}))).await;
    }
    // Kill it mid-flight: as soon as the first Deployment exists.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    wait_for(
        "a first Deployment",
        LONG,
        || op.log_tail(),
        || async {
            (!deployments
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .is_empty())
            .then_some(())
        },
    )
    .await;
    op.kill();
    let op = Operator::start(&ns.name, "op-restart-2", &["--resync-seconds", "2"]);
    for n in &names {
        wait_md(&api, n, "Ready after restart", LONG, Some(&op), is_ready).await;
    }
    let count = |items: usize| items == names.len();
    assert!(count(
        deployments
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len()
    ));
    assert!(count(
        Api::<Service>::namespaced(client.clone(), &ns.name)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len()
    ));
    assert!(count(
        Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), &ns.name)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len()
    ));
    assert!(count(
        Api::<ReplicaSet>::namespaced(client.clone(), &ns.name)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len()
    ));

    // Let the world settle (every status final), then watch several resyncs of everything.
    let mut quiet_since = Instant::now();
    let mut mark = audit_len();
    wait_for(
        "two seconds without an operator write",
        LONG,
        || op.log_tail(),
        || {
            if !audited_writes(&ns.name, "kubemaas-operator", mark).is_empty() {
                mark = audit_len();
                quiet_since = Instant::now();
            }
            let settled = quiet_since.elapsed() > Duration::from_secs(2);
            async move { settled.then_some(()) }
        },
    )
    .await;
    let start = audit_len();
    let reconciles = || op.metric("kubemaas_operator_reconciles_total").unwrap_or(0.0);
    let want = reconciles() + 3.0 * names.len() as f64;
    wait_for(
        "three resyncs of every ModelDeployment",
        LONG,
        || op.log_tail(),
        || {
            let done = reconciles() >= want;
            async move { done.then_some(()) }
        },
    )
    .await;
    let writes = audited_writes(&ns.name, "kubemaas-operator", start);
    assert!(writes.is_empty(), "a no-op resync wrote: {writes:?}");
}

#[tokio::test]
async fn two_replicas_elect_one_leader_and_the_other_takes_over() {
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, "leader").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let mut a = Operator::start(&ns.name, "op-a", &[]);
    let holder = wait_for(
        "a leader",
        LONG,
        || a.log_tail(),
        || async {
            leases
                .get_opt("kubemaas-operator")
                .await
                .ok()
                .flatten()?
                .spec?
                .holder_identity
        },
    )
    .await;
    assert_eq!(holder, "op-a");
    let b = Operator::start(&ns.name, "op-b", &[]);
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    create_md(
        &api,
        md_json("first", json!({"model": {"uri": "s3://models/m.onnx"}})),
    )
    .await;
    wait_md(&api, "first", "Ready under op-a", LONG, Some(&a), is_ready).await;
    assert!(
        std::fs::read_to_string(&b.log)
            .unwrap()
            .contains("waiting for leadership")
    );
    assert!(
        !std::fs::read_to_string(&b.log).unwrap().contains("became leader"),
        "only one leader"
    );

    let killed = Instant::now();
    a.kill();
    let holder = wait_for(
        "op-b to take over",
        Duration::from_secs(30),
        || b.log_tail(),
        || async {
            let h = leases
                .get_opt("kubemaas-operator")
                .await
                .ok()
                .flatten()?
                .spec?
                .holder_identity?;
            (h == "op-b").then_some(h)
        },
    )
    .await;
    let took = killed.elapsed();
    println!("leader failover took {took:?}");
    assert_eq!(holder, "op-b");
    create_md(
        &api,
        md_json("second", json!({"model": {"uri": "s3://models/m.onnx"}})),
    )
    .await;
    wait_md(&api, "second", "Ready under op-b", LONG, Some(&b), is_ready).await;
}

#[tokio::test]
async fn status_reports_what_a_real_server_at_the_pod_address_says() {
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, "probe").await;
    let op = Operator::start(&ns.name, "op-probe", &["--resync-seconds", "2"]);
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    create_md(
        &api,
        md_json(
            "ocr",
            json!({"model": {"uri": "s3://models/m.onnx", "sha256": "a".repeat(64)}}),
        ),
    )
    .await;
    wait_md(&api, "ocr", "Ready", LONG, Some(&op), is_ready).await;
    // kwok runs pods on paper at a loopback address; put a real kubemaas-server there.
    let pod = pods_of(&client, &ns.name, "ocr").await.pop().unwrap();
    let ip = pod.status.unwrap().pod_ip.unwrap();
    assert!(ip.starts_with("127."));
    let env = env();
    let models = std::env::var("KUBEMAAS_MODELS").expect("KUBEMAAS_MODELS from scripts/setup.sh");
    let log = env.root.join(format!("target/e2e/server-{}.log", ns.name));
    let mut server = std::process::Command::new(env.root.join("target/debug/kubemaas-server"))
        .args([
            "serve",
            "--host",
            &ip,
            "--http-port",
            "8080",
            "--metrics-port",
            "9090",
            "--execution-provider",
            "auto",
        ])
        .arg("--model")
        .arg(format!("ocr={models}/ocr-cls/1/model.onnx"))
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("server starts");
    let md = wait_md(
        &api,
        "ocr",
        "status.accelerator and status.model from the server",
        LONG,
        Some(&op),
        |m| {
            m.status
                .as_ref()
                .is_some_and(|s| s.accelerator.is_some() && s.model.is_some())
        },
    )
    .await;
    let _ = server.kill();
    let _ = server.wait();
    let st = md.status.unwrap();
    assert_eq!(
        st.accelerator.as_deref(),
        Some("CPUExecutionProvider"),
        "auto without a GPU falls back to CPU"
    );
    let model = st.model.unwrap();
    assert_eq!((model.name.as_str(), model.version.as_str()), ("ocr", "1"));
    assert_eq!(model.sha256, Some("a".repeat(64)));
    assert_eq!(model.inputs[0].name, "x");
    assert_eq!(model.inputs[0].shape, vec![-1, 3, -1, -1]);
    assert_eq!(model.outputs[0].datatype, "FP32");
    let out = kubectl(&[
        "get",
        "-n",
        &ns.name,
        "mdep",
        "ocr",
        "-o",
        "jsonpath={.status.accelerator}",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "CPUExecutionProvider");
}

/// (path, body) of every request an OTLP receiver got.
type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// A minimal OTLP/HTTP receiver on loopback: records the path and body of every POST.
fn otlp_receiver() -> (String, Received) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen: Received = Default::default();
    let record = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut len = 0usize;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len];
            let _ = reader.read_exact(&mut body);
            record.lock().unwrap().push((path, body));
            let mut stream = reader.into_inner();
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (addr, seen)
}

/// A minimal OTLP/gRPC receiver on loopback (HTTP/2 without TLS): records the path and body of
/// every request and answers each with an empty `ExportTraceServiceResponse` and grpc-status 0.
/// It runs on a thread of its own: the operator flushes its spans while the test waits for it to
/// exit, when the test's runtime runs nothing.
fn otlp_grpc_receiver() -> (String, Received) {
    use http_body_util::BodyExt as _;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen: Received = Default::default();
    let record = seen.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((stream, _)) = listener.accept().await {
                let record = record.clone();
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let record = record.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let body = req.into_body().collect().await.map(|b| b.to_bytes().to_vec());
                        record.lock().unwrap().push((path, body.unwrap_or_default()));
                        let mut trailers = hyper::HeaderMap::new();
                        trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
                        // One message of length 0 (an empty response), then the status.
                        let frames = futures::stream::iter([
                            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                                hyper::body::Bytes::from_static(&[0; 5]),
                            )),
                            Ok(hyper::body::Frame::trailers(trailers)),
                        ]);
                        hyper::Response::builder()
                            .header("content-type", "application/grpc")
                            .body(http_body_util::StreamBody::new(frames))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc),
                );
            }
        });
    });
    (addr, seen)
}

#[tokio::test]
async fn reconcile_spans_are_exported_over_otlp_http() {
    let (addr, seen) = otlp_receiver();
    spans_reach_the_collector("otlp", "http/protobuf", &addr, &seen, "/v1/traces").await;
}

/// The chart's values suggest `OTEL_EXPORTER_OTLP_PROTOCOL=grpc` for a collector on :4317: the
/// operator must start with it (it once panicked building the exporter) and export through it.
#[tokio::test]
async fn reconcile_spans_are_exported_over_otlp_grpc() {
    let (addr, seen) = otlp_grpc_receiver();
    spans_reach_the_collector(
        "otlp-grpc",
        "grpc",
        &addr,
        &seen,
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    )
    .await;
}

/// Runs an operator exporting to the collector at `addr` over `protocol`, reconciles one object
/// to Ready, stops the operator and checks what reached `path`.
async fn spans_reach_the_collector(test: &str, protocol: &str, addr: &str, seen: &Received, path: &str) {
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, test).await;
    let endpoint = format!("http://{addr}");
    let mut op = Operator::start_with_env(
        &ns.name,
        &format!("op-{test}"),
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
        ],
    );
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    create_md(
        &api,
        md_json("traced", json!({"model": {"uri": "s3://models/m.onnx"}})),
    )
    .await;
    wait_md(&api, "traced", "Ready", LONG, Some(&op), is_ready).await;
    assert!(
        op.terminate(),
        "operator exits cleanly on SIGTERM:\n{}",
        op.log_tail()
    );
    let seen = seen.lock().unwrap().clone();
    let traces: Vec<&Vec<u8>> = seen.iter().filter(|(p, _)| p == path).map(|(_, b)| b).collect();
    assert!(
        !traces.is_empty(),
        "no OTLP export received at {path}; got {:?}",
        seen.iter().map(|s| &s.0).collect::<Vec<_>>()
    );
    let all: Vec<u8> = traces.into_iter().flatten().copied().collect();
    let has = |needle: &str| all.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(has("kubemaas-operator"), "service.name in the resource");
    assert!(has("reconcile"), "the reconcile span");
    assert!(has("traced"), "the object's name as a span attribute");
}

#[tokio::test]
async fn kustomize_install_grants_the_operator_enough_and_it_never_writes_spec() {
    install_crd();
    let out = kubectl(&["apply", "-k", env().root.join("deploy").to_str().unwrap()]);
    assert!(out.status.success(), "kubectl apply -k deploy/: {}", stderr(&out));
    let client = client().await;
    let ns = TestNs::new(&client, "rbac").await;
    // The operator runs as a process (images cannot run on fake nodes) with the identity and RBAC
    // the install created: its ServiceAccount's token, nothing else.
    let kubeconfig = env().root.join(format!("target/e2e/kubeconfig-{}-sa", ns.name));
    service_account_kubeconfig("kubemaas-system", "kubemaas", &kubeconfig);
    let op = Operator::start_with_env(
        &ns.name,
        "op-rbac",
        &[
            "--leader-election-namespace",
            "kubemaas-system",
            "--leader-election-name",
            &format!("e2e-{}", ns.name),
        ],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    create_md(
        &api,
        md_json(
            "rbac",
            json!({"model": {"uri": "s3://models/m.onnx"}, "replicas": 2,
        "autoscaling": {"minReplicas": 2, "maxReplicas": 3}}),
        ),
    )
    .await;
    wait_md(
        &api,
        "rbac",
        "Ready with the chart's permissions",
        LONG,
        Some(&op),
        is_ready,
    )
    .await;
    // Removing autoscaling exercises delete (HPA) under the same identity.
    let patch = json!({"spec": {"autoscaling": null}});
    api.patch("rbac", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns.name);
    wait_for(
        "the HPA deleted by the operator",
        LONG,
        || op.log_tail(),
        || async { matches!(hpas.get_opt("rbac").await, Ok(None)).then_some(()) },
    )
    .await;
    let md = wait_md(&api, "rbac", "Ready again", LONG, Some(&op), |m| {
        m.metadata.generation == Some(2) && is_ready(m)
    })
    .await;
    let log = std::fs::read_to_string(&op.log).unwrap();
    assert!(
        !log.contains("forbidden"),
        "the chart's RBAC was not enough:\n{}",
        op.log_tail()
    );
    // GitOps: the operator's field ownership on the ModelDeployment is status only.
    let mine: Vec<_> = md
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.manager.as_deref() == Some("kubemaas-operator"))
        .collect();
    assert!(!mine.is_empty(), "the operator's status writes are recorded");
    for m in mine {
        assert_eq!(
            m.subresource.as_deref(),
            Some("status"),
            "operator wrote outside status: {m:?}"
        );
        let fields = serde_json::to_value(&m.fields_v1).unwrap();
        assert!(
            fields.get("f:spec").is_none(),
            "operator owns spec fields: {fields}"
        );
    }
    let events = kubectl(&[
        "get",
        "events",
        "-n",
        &ns.name,
        "--field-selector",
        "involvedObject.name=rbac",
    ]);
    assert!(
        String::from_utf8_lossy(&events.stdout).contains("MinimumReplicasAvailable"),
        "events written"
    );
}

#[tokio::test]
async fn applying_the_same_manifest_twice_changes_nothing() {
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, "gitops").await;
    let op = Operator::start(&ns.name, "op-gitops", &[]);
    let manifest = env().root.join("deploy/examples/autoscaled.yaml");
    let first = kubectl(&["apply", "-n", &ns.name, "-f", manifest.to_str().unwrap()]);
    assert!(first.status.success(), "{}", stderr(&first));
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let before = wait_md(&api, "detector", "Ready", LONG, Some(&op), is_ready).await;
    // What a GitOps sync does on every interval: apply again, and again server-side.
    let again = kubectl(&["apply", "-n", &ns.name, "-f", manifest.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("unchanged"),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
    let diff = kubectl(&["diff", "-n", &ns.name, "-f", manifest.to_str().unwrap()]);
    assert_eq!(
        diff.status.code(),
        Some(0),
        "kubectl diff shows drift: {}",
        String::from_utf8_lossy(&diff.stdout)
    );
    let after = api.get("detector").await.unwrap();
    assert_eq!(
        after.metadata.generation, before.metadata.generation,
        "spec never changed"
    );
    assert_eq!(after.spec, before.spec);
}

#[tokio::test]
async fn tls_and_network_policy_reach_the_cluster_and_the_policy_goes_with_the_field() {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, "netpol").await;
    let op = Operator::start(&ns.name, "op-netpol", &[]);
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns.name);
    create_md(
        &api,
        md_json(
            "ranker",
            json!({"model": {"uri": "s3://models/m.onnx"},
                   "tls": {"secretName": "ranker-tls", "clientCA": {"secretName": "ranker-ca", "key": "bundle.pem"}},
                   "networkPolicy": {"inferenceFrom": [{"namespaceSelector": {"matchLabels": {"team": "search"}}}]}}),
        ),
    )
    .await;
    wait_md(&api, "ranker", "Ready", LONG, Some(&op), is_ready).await;
    // The apiserver accepted the policy as built: it selects the pods and admits what was asked.
    let policy = policies.get("ranker").await.unwrap();
    let p = serde_json::to_value(&policy).unwrap();
    assert_eq!(
        p["spec"]["podSelector"]["matchLabels"]["kubemaas.io/model-deployment"],
        "ranker"
    );
    assert_eq!(p["spec"]["policyTypes"], json!(["Ingress"]));
    let rules = p["spec"]["ingress"].as_array().unwrap();
    assert_eq!(
        rules[0]["from"],
        json!([{"namespaceSelector": {"matchLabels": {"team": "search"}}}])
    );
    assert_eq!(
        rules[0]["ports"],
        json!([{"port": 8080, "protocol": "TCP"}, {"port": 8081, "protocol": "TCP"}])
    );
    assert_eq!(rules[1]["ports"], json!([{"port": 9090, "protocol": "TCP"}]));
    assert_eq!(
        rules[1]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "monitoring"
    );
    assert!(
        policy
            .metadata
            .owner_references
            .unwrap()
            .iter()
            .any(|o| o.kind == "ModelDeployment")
    );
    // The pods mount the certificate Secrets and are probed on the plain metrics port.
    let pods = pods_of(&client, &ns.name, "ranker").await;
    let spec = pods[0].spec.clone().unwrap();
    let server = &spec.containers[0];
    let args = server.args.clone().unwrap();
    assert!(
        args.windows(2)
            .any(|w| w == ["--tls-client-ca", "/var/run/secrets/kubemaas/client-ca/ca.crt"])
    );
    let secrets: Vec<String> = spec
        .volumes
        .unwrap()
        .iter()
        .filter_map(|v| v.secret.as_ref().and_then(|s| s.secret_name.clone()))
        .collect();
    assert_eq!(secrets, ["ranker-tls", "ranker-ca"]);
    let probe = server.readiness_probe.clone().unwrap().http_get.unwrap();
    assert_eq!(
        probe.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("metrics".into())
    );
    // Removing the field removes the policy.
    let patch = json!({"spec": {"networkPolicy": null}});
    api.patch("ranker", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    wait_for(
        "the NetworkPolicy to be deleted",
        LONG,
        || op.log_tail(),
        || async { matches!(policies.get_opt("ranker").await, Ok(None)).then_some(()) },
    )
    .await;
}
