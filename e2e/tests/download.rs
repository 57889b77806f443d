//! A download that really fails reaches the ModelDeployment's status on a real control plane.
//!
//! kwok runs pods on paper, so nothing executes the init container. Here the test plays the
//! kubelet for one pod (labelled so that kwok leaves its status alone, see `e2e/cluster/up`): it
//! runs the real `kubemaas-server pull` with the init container's own arguments against a loopback
//! store, and writes the exit code and termination message into the pod's status through the
//! status subresource, as the kubelet does. The operator must turn that into `ModelLoaded=False`
//! with the pull's reason and message, and let it go once a retry succeeds.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a panic is a failed test

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use kubemaas_crds::artifact::{PULL_RECORD_FILE, exit};
use kubemaas_crds::v1alpha1::ModelDeployment;
use kubemaas_e2e::*;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(120);

/// A loopback HTTP store: every GET answers 404 until `serving` is set, then `path` answers `body`.
fn loopback_store(path: &'static str, body: &'static [u8]) -> (String, Arc<AtomicBool>) {
    let serving = Arc::new(AtomicBool::new(false));
    let on = serving.clone();
    let base = kubemaas_e2e::podrunner::object_store(move |target| {
        (on.load(Ordering::SeqCst) && target == path).then(|| body.to_vec())
    });
    (base, serving)
}

/// What the kubelet runs for the init container, run here: `kubemaas-server` with the container's
/// own arguments, its absolute paths (DEST, --pvc-root, ...) moved under `root`, and the
/// termination log at `root/dev/termination-log`. Returns the exit code and that log.
fn run_init_container(pod: &Pod, root: &Path) -> (i32, String) {
    let init = &pod.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
    let args: Vec<String> = init
        .args
        .clone()
        .unwrap()
        .into_iter()
        .map(|a| match a.strip_prefix('/') {
            Some(abs) => root.join(abs).to_string_lossy().into_owned(),
            None => a,
        })
        .collect();
    assert_eq!(args[0], "pull", "the init container runs pull: {args:?}");
    let log = root.join("dev/termination-log");
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(&log);
    let env = env();
    let out = std::process::Command::new(env.root.join("target/debug/kubemaas-server"))
        .args(&args)
        .arg("--termination-log")
        .arg(&log)
        .output()
        .expect("target/debug/kubemaas-server runs (make e2e builds it)");
    let code = out.status.code().expect("pull exited (not killed)");
    println!(
        "pull {args:?} exited {code}; stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (code, std::fs::read_to_string(&log).unwrap_or_default())
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// A terminated container state as the kubelet reports it (reason Error, or Completed on 0).
fn terminated(code: i32, message: &str) -> Value {
    let mut t = json!({"exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" },
        "startedAt": now(), "finishedAt": now()});
    if !message.is_empty() {
        t["message"] = json!(message);
    }
    json!({"terminated": t})
}

/// Writes the pod's status the way the kubelet does while (or after) the init container runs:
/// `init` is its state, `last` its previous state; the pod is initialized once `init` completed.
async fn kubelet_writes(pods: &Api<Pod>, pod: &Pod, init: Value, last: Value, restarts: i32) {
    let name = pod.metadata.name.clone().unwrap();
    let spec = pod.spec.as_ref().unwrap();
    let initialized = init["terminated"]["exitCode"] == 0;
    let init_container = &spec.init_containers.as_ref().unwrap()[0];
    let server = &spec.containers[0];
    let not = |type_: &str, reason: &str, names: &str| {
        json!({"type": type_, "status": "False", "reason": reason, "lastTransitionTime": now(),
            "message": format!("containers with incomplete status: [{names}]")})
    };
    let conditions = json!([
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": now()},
        if initialized {
            json!({"type": "Initialized", "status": "True", "lastTransitionTime": now()})
        } else {
            not("Initialized", "ContainersNotInitialized", &init_container.name)
        },
        not("ContainersReady", "ContainersNotReady", &server.name),
        not("Ready", "ContainersNotReady", &server.name),
    ]);
    let server_state = if initialized {
        json!({"running": {"startedAt": now()}})
    } else {
        json!({"waiting": {"reason": "PodInitializing"}})
    };
    let status = json!({"status": {
        "phase": if initialized { "Running" } else { "Pending" },
        "conditions": conditions,
        "hostIP": "127.0.0.2",
        "startTime": now(),
        "initContainerStatuses": [{"name": init_container.name, "image": init_container.image, "imageID": "",
            "ready": initialized, "started": false, "restartCount": restarts, "state": init, "lastState": last}],
        "containerStatuses": [{"name": server.name, "image": server.image, "imageID": "",
            "ready": false, "started": false, "restartCount": 0, "state": server_state, "lastState": {}}],
    }});
    pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("pod status patched");
}

/// `kubectl wait` until the ModelLoaded condition has `reason`.
fn kubectl_wait_reason(ns: &str, md: &str, reason: &str) {
    let out = kubectl(&[
        "wait",
        "-n",
        ns,
        &format!("mdep/{md}"),
        &format!("--for=jsonpath={{.status.conditions[?(@.type==\"ModelLoaded\")].reason}}={reason}"),
        "--timeout=60s",
    ]);
    assert!(
        out.status.success(),
        "kubectl wait for ModelLoaded reason {reason}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn an_init_container_that_really_fails_sets_model_loaded_false_with_the_pull_reason_and_message_until_a_retry_succeeds()
 {
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, "pullfail").await;
    let op = Operator::start(&ns.name, "op-pullfail", &[]);
    let (base, serving) = loopback_store("/models/ranker/1/model.onnx", b"not really onnx, but bytes");
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let name = "ranker";
    create_md(
        &api,
        json!({"apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": name},
            "spec": {"model": {"uri": format!("{base}/models/ranker/1/model.onnx"), "allowPrivateAddresses": true},
                "podTemplate": {"labels": {(KUBELET_BY_TEST_LABEL): "test"}}}}),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let lp = ListParams::default().labels(&format!("kubemaas.io/model-deployment={name}"));
    let pod = kubemaas_e2e::bound_pod(&pods, name, LONG, &op).await;
    assert!(
        pod.status
            .as_ref()
            .is_none_or(|s| s.init_container_statuses.is_none() && s.pod_ip.is_none()),
        "kwok left the pod to the test: {:?}",
        pod.status
    );
    let root: PathBuf = env().root.join(format!("target/e2e/kubelet-{}", ns.name));

    // First attempt: the object is not there. The real pull decides the exit code and message.
    let (code, message) = run_init_container(&pod, &root);
    assert_eq!(
        code,
        i32::from(exit::NOT_FOUND),
        "pull's verdict on a 404: {message}"
    );
    assert!(!message.trim().is_empty(), "pull wrote its termination message");
    kubelet_writes(&pods, &pod, terminated(code, &message), json!({}), 0).await;
    let md = wait_md(
        &api,
        name,
        "ModelLoaded=False, ArtifactNotFound",
        LONG,
        Some(&op),
        |m| condition(m, "ModelLoaded").is_some_and(|c| c.0 == "False" && c.1 == "ArtifactNotFound"),
    )
    .await;
    let (_, _, shown) = condition(&md, "ModelLoaded").unwrap();
    assert!(
        shown.contains(message.trim()),
        "the condition carries the termination message {message:?}, got {shown:?}"
    );
    kubectl_wait_reason(&ns.name, name, "ArtifactNotFound");
    let out = kubectl(&[
        "wait",
        "-n",
        &ns.name,
        &format!("mdep/{name}"),
        "--for=condition=ModelLoaded=False",
        "--timeout=10s",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The kubelet backs off: waiting in CrashLoopBackOff with the failure as lastState.
    let backoff = json!({"waiting": {"reason": "CrashLoopBackOff",
        "message": format!("back-off 10s restarting failed container={} pod={}", "model-pull", pod.metadata.name.clone().unwrap())}});
    kubelet_writes(&pods, &pod, backoff, terminated(code, &message), 1).await;
    let md = wait_md(
        &api,
        name,
        "Degraded=True, CrashLoopBackOff",
        LONG,
        Some(&op),
        |m| condition(m, "Degraded").is_some_and(|c| c.1 == "CrashLoopBackOff"),
    )
    .await;
    let (status, reason, shown) = condition(&md, "ModelLoaded").unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("False", "ArtifactNotFound"));
    assert!(shown.contains(message.trim()), "{shown}");

    // The object appears; the retry succeeds. The earlier failure stays in lastState (as the
    // kubelet keeps it) but must not stick in the status.
    serving.store(true, Ordering::SeqCst);
    let (code, retry_message) = run_init_container(&pod, &root);
    assert_eq!(code, 0, "the retry pulls: {retry_message}");
    let version_dir = root.join(format!("models/{name}/1"));
    assert!(version_dir.join("model.onnx").is_file());
    assert!(
        version_dir.join(PULL_RECORD_FILE).is_file(),
        "pull leaves its record"
    );
    kubelet_writes(
        &pods,
        &pod,
        terminated(0, ""),
        terminated(i32::from(exit::NOT_FOUND), &message),
        1,
    )
    .await;
    let md = wait_md(&api, name, "ModelLoaded no longer False", LONG, Some(&op), |m| {
        condition(m, "ModelLoaded").is_some_and(|c| c.0 != "False")
    })
    .await;
    assert_eq!(condition(&md, "ModelLoaded").unwrap().1, "Loading");
    kubectl_wait_reason(&ns.name, name, "Loading");
    // Nobody but the "kubelet" wrote the pod's status: kwok did not make it ready meanwhile.
    let now_pod = pods.get(pod.metadata.name.as_deref().unwrap()).await.unwrap();
    let st = now_pod.status.unwrap();
    let pull = &st.init_container_statuses.unwrap()[0];
    let last = pull.last_state.as_ref().unwrap().terminated.as_ref().unwrap();
    assert_eq!(last.exit_code, i32::from(exit::NOT_FOUND));
    assert!(!st.container_statuses.unwrap()[0].ready, "{:?}", st.conditions);

    // kwok leaves these pods alone, deletion included: once nothing can recreate them, the test
    // finishes what a kubelet would.
    delete_md(&api, name).await;
    let replica_sets: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns.name);
    wait_for(
        "the Deployment and its ReplicaSets garbage-collected",
        LONG,
        || op.log_tail(),
        || async {
            let d = Api::<Deployment>::namespaced(client.clone(), &ns.name)
                .get_opt(name)
                .await
                .ok()?;
            let rs = replica_sets.list(&lp).await.ok()?;
            (d.is_none() && rs.items.is_empty()).then_some(())
        },
    )
    .await;
    let out = kubectl(&[
        "delete",
        "pods",
        "-n",
        &ns.name,
        "-l",
        &format!("kubemaas.io/model-deployment={name}"),
        "--grace-period=0",
        "--force",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&root);
}

/// `spec.model.compression` end to end: a pod's real `pull --compress` compresses the real OCR
/// classifier, the real server serves the result, and the measured report reaches
/// `status.model.compression`; an impossible `minCosine` fails the real pull (exit 9) and becomes
/// `ModelLoaded=False, CompressionRejected` with the numbers.
#[tokio::test]
async fn compression_reaches_ready_with_its_report_and_an_impossible_min_cosine_is_compression_rejected() {
    use kubemaas_e2e::podrunner::{PodRunner, RunnerConfig, file_store};
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, "compress").await;
    let op = Operator::start(&ns.name, "op-compress", &[]);
    let models = PathBuf::from(std::env::var("KUBEMAAS_MODELS").expect("KUBEMAAS_MODELS (make e2e sets it)"));
    let uri = format!("{}/ocr-cls/1/model.onnx", file_store(models));
    let config = RunnerConfig {
        only: Some(vec!["ocr".into()]),
        ..RunnerConfig::for_tests(&ns.name)
    };
    let runner = PodRunner::start(client.clone(), &ns.name, config);
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    // The apiserver itself enforces the CEL rule on inputShapes.
    let bad = serde_json::from_value(md_json(
        "bad-shapes",
        json!({"model": {"uri": uri, "compression": {"mode": "fp16", "inputShapes": {"x": [1, 0]}}}}),
    ))
    .unwrap();
    let err = api
        .create(&Default::default(), &bad)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("compression.inputShapes maps an input name"),
        "{err}"
    );
    create_md(
        &api,
        md_json(
            "ocr",
            json!({"model": {"uri": uri, "allowPrivateAddresses": true,
                "compression": {"mode": "int8-dynamic", "minCosine": 0.99,
                    "inputShapes": {"x": [2, 3, 48, 192]}}}, "replicas": 1}),
        ),
    )
    .await;
    let md = wait_md(
        &api,
        "ocr",
        "Ready with status.model.compression",
        Duration::from_secs(240),
        Some(&op),
        |m| {
            is_ready(m)
                && m.status
                    .as_ref()
                    .and_then(|s| s.model.as_ref())
                    .is_some_and(|m| m.compression.is_some())
        },
    )
    .await;
    let model = md.status.unwrap().model.unwrap();
    let c = model.compression.unwrap();
    println!("status.model.compression: {c:?}");
    assert_eq!(c.mode, "int8-dynamic");
    assert_eq!(c.bytes_before, 585_532, "the real classifier's size");
    assert!(c.size_ratio < 0.6 && c.bytes_after < c.bytes_before, "{c:?}");
    assert!(c.cosine >= 0.99 && c.cosine <= 1.0, "{c:?}");
    assert_eq!(c.inputs, "4 random samples");
    assert!(c.speedup.is_some_and(|s| s > 0.0), "{c:?}");
    assert_eq!(model.outputs.len(), 1, "the compressed model keeps the signature");
    assert_eq!(model.outputs[0].datatype, "FP32");
    assert_eq!(
        model.artifact.unwrap().bytes,
        585_532,
        "the artifact is what was downloaded"
    );
    runner.stop();

    // An impossible bar, with the test as the kubelet (as above): the real pull exits 9.
    let name = "strict";
    create_md(
        &api,
        json!({"apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": name},
            "spec": {"model": {"uri": uri, "allowPrivateAddresses": true,
                    "compression": {"mode": "int8-dynamic", "minCosine": 1.0}},
                "podTemplate": {"labels": {(KUBELET_BY_TEST_LABEL): "test"}}}}),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let pod = kubemaas_e2e::bound_pod(&pods, name, LONG, &op).await;
    let root: PathBuf = env().root.join(format!("target/e2e/kubelet-{}", ns.name));
    let (code, message) = run_init_container(&pod, &root);
    assert_eq!(code, i32::from(exit::COMPRESSION_REJECTED), "{message}");
    assert!(
        message.contains("compression rejected: cosine similarity"),
        "{message}"
    );
    kubelet_writes(&pods, &pod, terminated(code, &message), json!({}), 0).await;
    let md = wait_md(
        &api,
        name,
        "ModelLoaded=False, CompressionRejected",
        LONG,
        Some(&op),
        |m| condition(m, "ModelLoaded").is_some_and(|c| c.0 == "False" && c.1 == "CompressionRejected"),
    )
    .await;
    let (_, _, shown) = condition(&md, "ModelLoaded").unwrap();
    assert!(
        shown.contains("under the required 1"),
        "the numbers are in the condition: {shown}"
    );
    assert!(!is_ready(&md), "nothing wrong is served");
    delete_md(&api, name).await;
    let out = kubectl(&[
        "delete",
        "pods",
        "-n",
        &ns.name,
        "-l",
        &format!("kubemaas.io/model-deployment={name}"),
        "--grace-period=0",
        "--force",
    ]);
    let _ = out;
    let _ = std::fs::remove_dir_all(&root);
}

/// A Secret the pod mounts is missing (a typo in `credentialsSecretRef`): the kubelet never starts
/// a container, so no container state says why; only its `FailedMount` Event does. The operator
/// must read it into `Degraded=True, VolumeMountFailed` with the kubelet's words, not leave
/// "waiting for the model to load" forever. Here the test plays that kubelet: it leaves the
/// containers waiting and writes the Event the kubelet writes.
#[tokio::test]
async fn a_secret_the_pod_cannot_mount_shows_in_degraded_with_the_kubelets_words() {
    a_volume_the_pod_cannot_use_shows_in_degraded(
        "mount",
        json!({"uri": "s3://models/ranker.onnx", "credentialsSecretRef": {"name": "s3-credz"}}),
        "FailedMount",
        "kubelet",
        "MountVolume.SetUp failed for volume \"credentials\" : secret \"s3-credz\" not found",
    )
    .await;
}

/// A ReadWriteOnce claim as the artifact cache of pods on two nodes: the second pod's volume
/// cannot be attached, and the attach/detach controller says so only in a `FailedAttachVolume`
/// Event on the pod (no `FailedMount` follows until it is attached). The operator must show it as
/// it shows a mount failure, not "waiting for the model to load". The claim is bound to a volume
/// made for it, so the pod schedules; the test plays the controller and writes its Event.
#[tokio::test]
async fn a_volume_attached_elsewhere_shows_in_degraded_with_the_controllers_words() {
    a_volume_the_pod_cannot_use_shows_in_degraded(
        "attach",
        json!({"uri": "s3://models/ranker.onnx", "sha256": "a".repeat(64), "cache": {"claimName": "model-cache"}}),
        "FailedAttachVolume",
        "attachdetach-controller",
        "Multi-Attach error for volume \"pvc-0c1d\" Volume is already used by pod(s) ranker-7d9f-x2x4q",
    )
    .await;
}

/// A ReadWriteOnce claim `name` in `ns`, bound to a volume made for it (no provisioner here).
async fn rwo_claim(client: &kube::Client, ns: &str, name: &str) {
    use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
    let pv_name = format!("{ns}-{name}");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pv: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": pv_name},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
            "storageClassName": "", "hostPath": {"path": "/tmp/kubemaas-e2e-cache"},
            "claimRef": {"namespace": ns, "name": name}}
    }))
    .unwrap();
    pvs.create(&kube::api::PostParams::default(), &pv)
        .await
        .expect("the volume");
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": pv_name,
            "resources": {"requests": {"storage": "1Gi"}}}
    }))
    .unwrap();
    pvcs.create(&kube::api::PostParams::default(), &pvc)
        .await
        .expect("the claim");
}

/// Creates a ModelDeployment of `model`, leaves its pod's containers waiting as a kubelet does
/// while a volume is not ready, writes the Event `component` writes with `reason` and `said`, and
/// waits for `Degraded=True, VolumeMountFailed` with those words and the pod's name.
async fn a_volume_the_pod_cannot_use_shows_in_degraded(
    short: &str,
    model: serde_json::Value,
    reason: &str,
    component: &str,
    said: &str,
) {
    install_crd();
    let client = client().await;
    let ns = TestNs::new(&client, short).await;
    if let Some(claim) = model.pointer("/cache/claimName").and_then(|c| c.as_str()) {
        rwo_claim(&client, &ns.name, claim).await;
    }
    let op = Operator::start(&ns.name, &format!("op-{short}"), &[]);
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let name = "ranker";
    create_md(
        &api,
        json!({"apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": name},
            "spec": {"model": model,
                "podTemplate": {"labels": {(KUBELET_BY_TEST_LABEL): "test"}}}}),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let pod = kubemaas_e2e::bound_pod(&pods, name, LONG, &op).await;
    kubelet_writes(
        &pods,
        &pod,
        json!({"waiting": {"reason": "PodInitializing"}}),
        json!({}),
        0,
    )
    .await;
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), &ns.name);
    events
        .create(
            &kube::api::PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"generateName": format!("{}.", pod.metadata.name.clone().unwrap())},
                "involvedObject": {"kind": "Pod", "apiVersion": "v1", "namespace": ns.name,
                    "name": pod.metadata.name, "uid": pod.metadata.uid},
                "reason": reason, "type": "Warning", "message": said,
                "source": {"component": component, "host": "kwok-node-0"},
                "firstTimestamp": now(), "lastTimestamp": now(), "count": 1,
            }))
            .unwrap(),
        )
        .await
        .expect("the Event");
    let md = wait_md(
        &api,
        name,
        "Degraded=True, VolumeMountFailed",
        LONG,
        Some(&op),
        |m| condition(m, "Degraded").is_some_and(|c| c.0 == "True" && c.1 == "VolumeMountFailed"),
    )
    .await;
    let (_, _, shown) = condition(&md, "Degraded").unwrap();
    assert!(shown.contains(said), "the Event's words, got {shown:?}");
    assert!(shown.contains(pod.metadata.name.as_deref().unwrap()), "{shown}");
}
