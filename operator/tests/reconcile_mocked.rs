//! Reconcile error paths against a mocked apiserver (tower-test behind `kube::Client::new`): every
//! request the reconcile sends is recorded and answered by the scenario.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a panic is a failed test

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use kube::{Client, Resource};
use kubemaas_crds::v1alpha1::{ModelDeployment, ModelDeploymentSpec};
use kubemaas_operator::controller::build::{self, BuildConfig, stamp_hash};
use kubemaas_operator::controller::status::{self, Observed};
use kubemaas_operator::controller::{Context, Error, Stores, probe::Prober, reconcile};
use kubemaas_operator::metrics::Metrics;

type Log = Arc<Mutex<Vec<String>>>;
/// ("METHOD path", body) of every request.
type Bodies = Arc<Mutex<Vec<(String, String)>>>;

fn md(spec: serde_json::Value) -> ModelDeployment {
    let spec: ModelDeploymentSpec = serde_json::from_value(spec).unwrap();
    let mut md = ModelDeployment::new("resnet", spec);
    md.metadata.namespace = Some("ml".into());
    md.metadata.uid = Some("uid-1".into());
    md.metadata.generation = Some(1);
    md.metadata.resource_version = Some("10".into());
    md
}

fn filled<K>(items: Vec<K>) -> (reflector::Store<K>, Writer<K>)
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let (store, mut writer) = reflector::store::<K>();
    writer.apply_watcher_event(&watcher::Event::Init);
    for i in items {
        writer.apply_watcher_event(&watcher::Event::InitApply(i));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    (store, writer)
}

/// A mocked apiserver answering with `answer(method, path)`; returns the client and the request log.
fn mock(answer: impl Fn(&str, &str) -> (StatusCode, String) + Send + 'static) -> (Client, Log) {
    let (client, log, _) = mock_reading_bodies(answer);
    (client, log)
}

/// [`mock`], also keeping each request's body beside its "METHOD path".
fn mock_reading_bodies(
    answer: impl Fn(&str, &str) -> (StatusCode, String) + Send + 'static,
) -> (Client, Log, Bodies) {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let log: Log = Arc::default();
    let bodies: Bodies = Arc::default();
    let (seen, kept) = (log.clone(), bodies.clone());
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let line = format!("{} {}", req.method(), req.uri().path());
            seen.lock().unwrap().push(line.clone());
            let (status, body) = answer(req.method().as_str(), req.uri().path());
            let sent = req.into_body().collect_bytes().await.unwrap_or_default();
            kept.lock()
                .unwrap()
                .push((line, String::from_utf8_lossy(&sent).into_owned()));
            send.send_response(
                Response::builder()
                    .status(status)
                    .body(Body::from(body.into_bytes()))
                    .unwrap(),
            );
        }
    });
    (Client::new(svc, "default"), log, bodies)
}

fn api_error(code: u16, reason: &str) -> String {
    serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": format!("mock {reason}"),
        "reason": reason, "code": code})
    .to_string()
}

struct World {
    deployments: Vec<Deployment>,
    services: Vec<Service>,
    hpas: Vec<HorizontalPodAutoscaler>,
    pods: Vec<Pod>,
}

fn context(client: Client, w: World) -> (Arc<Context>, Vec<Box<dyn std::any::Any>>) {
    let (deployments, a) = filled(w.deployments);
    let (services, b) = filled(w.services);
    let (hpas, c) = filled(w.hpas);
    let (pdbs, d) = filled::<PodDisruptionBudget>(vec![]);
    let (pods, e) = filled(w.pods);
    let (network_policies, f) = filled::<NetworkPolicy>(vec![]);
    let keep: Vec<Box<dyn std::any::Any>> = vec![
        Box::new(a),
        Box::new(b),
        Box::new(c),
        Box::new(d),
        Box::new(e),
        Box::new(f),
    ];
    let ctx = Context {
        client: client.clone(),
        build: BuildConfig::default(),
        stores: Stores::new(deployments, services, hpas, pdbs, network_policies, pods),
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "kubemaas-operator".into(),
                instance: None,
            },
        ),
        metrics: Arc::new(Metrics::default()),
        prober: Prober::default(),
        scraper: Arc::new(kubemaas_operator::controller::scrape::Scraper::new(
            Duration::from_secs(15),
            Duration::from_secs(2),
        )),
        resync: Duration::from_secs(300),
        failures: Default::default(),
    };
    (Arc::new(ctx), keep)
}

/// The children as they would look in the cluster after a successful apply.
fn applied_world(m: &ModelDeployment) -> World {
    let c = build::children(m, &BuildConfig::default());
    let mut d = stamp_hash(c.deployment);
    d.status = Some(serde_json::from_value(serde_json::json!({"observedGeneration": 1, "replicas": 1, "readyReplicas": 1, "updatedReplicas": 1})).unwrap());
    d.metadata.generation = Some(1);
    World {
        deployments: vec![d],
        services: vec![stamp_hash(c.service)],
        hpas: vec![],
        pods: vec![],
    }
}

async fn run(m: ModelDeployment, ctx: Arc<Context>) -> Result<kube::runtime::controller::Action, Error> {
    tokio::time::timeout(Duration::from_secs(10), reconcile::reconcile(Arc::new(m), ctx))
        .await
        .expect("reconcile hung")
}

#[tokio::test]
async fn no_op_reconcile_sends_no_request_at_all() {
    let mut m = md(serde_json::json!({"model": {"uri": "s3://models/m.onnx"}}));
    let world = applied_world(&m);
    // The status the operator would have written last time.
    let now = Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap());
    m.status = Some(status::compute(
        &m,
        &Observed {
            deployment: world.deployments.first(),
            pods: &[],
            probed: None,
            ..Default::default()
        },
        &now,
    ));
    let (client, log) = mock(|_, _| (StatusCode::INTERNAL_SERVER_ERROR, api_error(500, "InternalError")));
    let (ctx, _keep) = context(client, world);
    run(m, ctx.clone()).await.expect("no-op reconcile succeeds");
    assert!(
        log.lock().unwrap().is_empty(),
        "requests sent: {:?}",
        log.lock().unwrap()
    );
    assert_eq!(ctx.metrics.writes(), 0);
}

#[tokio::test]
async fn first_reconcile_applies_children_then_patches_status_once() {
    let m = md(
        serde_json::json!({"model": {"uri": "s3://models/m.onnx"}, "replicas": 2, "autoscaling": {"maxReplicas": 3}}),
    );
    let (client, log) = mock(|method, path| match method {
        "PATCH" if path.ends_with("/status") => (
            StatusCode::OK,
            serde_json::to_string(&md(serde_json::json!({"model": {"uri": "s3://models/m.onnx"}}))).unwrap(),
        ),
        "PATCH" => (StatusCode::OK, "{}".into()),
        _ => (StatusCode::CREATED, "{}".into()),
    });
    let (ctx, _keep) = context(
        client,
        World {
            deployments: vec![],
            services: vec![],
            hpas: vec![],
            pods: vec![],
        },
    );
    run(m, ctx).await.expect("reconcile succeeds");
    let log = log.lock().unwrap().clone();
    let patches: Vec<&String> = log.iter().filter(|l| l.starts_with("PATCH")).collect();
    assert_eq!(
        patches,
        [
            "PATCH /apis/apps/v1/namespaces/ml/deployments/resnet",
            // Autoscaled: the starting count is co-owned by the hand-over manager, so a later
            // apply without `spec.replicas` does not reset it.
            "PATCH /apis/apps/v1/namespaces/ml/deployments/resnet",
            "PATCH /api/v1/namespaces/ml/services/resnet",
            "PATCH /apis/autoscaling/v2/namespaces/ml/horizontalpodautoscalers/resnet",
            "PATCH /apis/kubemaas.io/v1alpha1/namespaces/ml/modeldeployments/resnet/status",
        ]
    );
    // Every condition is new, but each is an expected state on the way to Ready (no pods yet):
    // no Event at all (at scale every Event is a write).
    assert_eq!(
        log.iter()
            .filter(|l| l.starts_with("POST") && l.contains("/events"))
            .count(),
        0
    );
}

#[tokio::test]
async fn apply_conflict_is_an_error_that_names_the_child_and_is_retried() {
    let m = md(serde_json::json!({"model": {"uri": "s3://models/m.onnx"}}));
    let (client, _log) = mock(|method, _| match method {
        "PATCH" => (StatusCode::CONFLICT, api_error(409, "Conflict")),
        _ => (StatusCode::CREATED, "{}".into()),
    });
    let (ctx, _keep) = context(
        client,
        World {
            deployments: vec![],
            services: vec![],
            hpas: vec![],
            pods: vec![],
        },
    );
    let err = run(m.clone(), ctx.clone()).await.expect_err("conflict surfaces");
    assert!(
        matches!(err, Error::Apply { ref kind, .. } if kind == "Deployment"),
        "{err}"
    );
    assert!(
        err.to_string().starts_with("failed to apply Deployment resnet"),
        "{err}"
    );
    let m = Arc::new(m);
    let first = reconcile::error_policy(m.clone(), &err, ctx.clone());
    let second = reconcile::error_policy(m, &err, ctx.clone());
    let requeue = |s| {
        format!(
            "{:?}",
            kube::runtime::controller::Action::requeue(Duration::from_secs(s))
        )
    };
    assert_eq!(
        (format!("{first:?}"), format!("{second:?}")),
        (requeue(1), requeue(2)),
        "a conflict is transient: exponential backoff from 1 s"
    );
    assert!(
        ctx.metrics
            .render()
            .contains("kubemaas_operator_reconcile_errors_total{reason=\"ApplyFailed\"} 2")
    );
}

#[tokio::test]
async fn server_error_on_status_patch_is_reported_not_panicked() {
    let m = md(serde_json::json!({"model": {"uri": "s3://models/m.onnx"}}));
    let world = applied_world(&m);
    let (client, _log) = mock(|method, path| match (method, path.ends_with("/status")) {
        ("PATCH", true) => (
            StatusCode::SERVICE_UNAVAILABLE,
            api_error(503, "ServiceUnavailable"),
        ),
        _ => (StatusCode::OK, "{}".into()),
    });
    let (ctx, _keep) = context(client, world);
    let err = run(m, ctx).await.expect_err("5xx surfaces");
    assert!(matches!(err, Error::Status { .. }), "{err}");
}

#[tokio::test]
async fn hpa_already_gone_when_autoscaling_is_removed_is_not_an_error() {
    let m = md(serde_json::json!({"model": {"uri": "s3://models/m.onnx"}}));
    let mut world = applied_world(&m);
    // The cache still shows an HPA that the apiserver has already deleted.
    let with_hpa =
        md(serde_json::json!({"model": {"uri": "s3://models/m.onnx"}, "autoscaling": {"maxReplicas": 3}}));
    world.hpas.push(build::hpa(&with_hpa).unwrap());
    let (client, log) = mock(|method, _| match method {
        "DELETE" => (StatusCode::NOT_FOUND, api_error(404, "NotFound")),
        _ => (
            StatusCode::OK,
            serde_json::to_string(&md(serde_json::json!({"model": {"uri": "s3://models/m.onnx"}}))).unwrap(),
        ),
    });
    let (ctx, _keep) = context(client, world);
    run(m, ctx).await.expect("404 on delete means done");
    assert!(
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l == "DELETE /apis/autoscaling/v2/namespaces/ml/horizontalpodautoscalers/resnet")
    );
}

/// Under a namespaced Role (`--watch-namespace`, the chart's `watchNamespace`) a cluster-wide
/// list is forbidden: the wait for the CRD must ask in the watched namespace, or it gives up at
/// once and the missing CRD shows only as the controller's bare 404s.
#[tokio::test(start_paused = true)]
async fn the_wait_for_the_crd_asks_in_the_watched_namespace_until_it_is_installed() {
    let calls = Arc::new(Mutex::new(0));
    let counted = calls.clone();
    let (client, log) = mock(move |_, path| {
        if path == "/apis/kubemaas.io/v1alpha1/modeldeployments" {
            return (StatusCode::FORBIDDEN, api_error(403, "Forbidden"));
        }
        let mut n = counted.lock().unwrap();
        *n += 1;
        if *n < 3 {
            (StatusCode::NOT_FOUND, api_error(404, "NotFound"))
        } else {
            (StatusCode::OK, r#"{"apiVersion":"kubemaas.io/v1alpha1","kind":"ModelDeploymentList","metadata":{},"items":[]}"#.into())
        }
    });
    kubemaas_operator::controller::wait_for_crd(&client, Some("models")).await;
    let log = log.lock().unwrap().clone();
    assert_eq!(
        log,
        vec!["GET /apis/kubemaas.io/v1alpha1/namespaces/models/modeldeployments"; 3],
        "asked in the namespace until the CRD was served"
    );
}

/// A NetworkPolicy the apiserver refuses (an admission policy, a quota on policies, a field the
/// operator's own checks do not know) must not leave new pods serving to the whole cluster: it is
/// applied first, and its refusal stops the reconcile before the Deployment exists.
#[tokio::test]
async fn a_refused_network_policy_stops_the_reconcile_before_any_pod_could_serve_unguarded() {
    let m = md(serde_json::json!({"model": {"uri": "s3://models/m.onnx"},
        "networkPolicy": {"inferenceFrom": [{"ipBlock": {"cidr": "127.0.0.0/8"}}]}}));
    let (client, log) = mock(|method, path| match method {
        "PATCH" if path.contains("/networkpolicies/") => {
            (StatusCode::UNPROCESSABLE_ENTITY, api_error(422, "Invalid"))
        }
        "PATCH" => (StatusCode::OK, "{}".into()),
        _ => (StatusCode::CREATED, "{}".into()),
    });
    let (ctx, _keep) = context(
        client,
        World {
            deployments: vec![],
            services: vec![],
            hpas: vec![],
            pods: vec![],
        },
    );
    let err = run(m, ctx).await.expect_err("the refusal surfaces");
    assert!(err.to_string().contains("NetworkPolicy"), "{err}");
    let log = log.lock().unwrap().clone();
    assert!(
        !log.iter().any(|l| l.contains("/deployments/")),
        "no Deployment before its NetworkPolicy: {log:?}"
    );
}

/// The pod of the last spec applied (`before`), ready or crash-looping.
fn pod_of(world: &World, ready: bool) -> Pod {
    use build::labels;
    let hash = world.deployments[0]
        .spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap()[labels::TEMPLATE_HASH]
        .clone();
    let state = if ready {
        serde_json::json!({"running": {}})
    } else {
        serde_json::json!({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}})
    };
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": "resnet-abc", "namespace": "ml",
            "labels": {labels::MODEL_DEPLOYMENT: "resnet"}, "annotations": {labels::TEMPLATE_HASH: hash}},
        "spec": {"containers": [{"name": "server"}], "nodeName": "node-1"},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
            "containerStatuses": [{"name": "server", "image": "i", "imageID": "", "ready": ready, "restartCount": 3,
                "started": ready, "state": state,
                "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}}))
    .unwrap()
}

/// A spec that cannot reach the children (`after`, generation 2), whose status is what the last
/// successful reconcile of `before` saw (its pod ready, healthy), and a world where that pod has
/// crash-looped since. Runs one reconcile against `answer` and returns its result and the status
/// as the patch it wrote leaves it.
async fn reconcile_unapplied(
    after: serde_json::Value,
    answer: impl Fn(&str, &str) -> (StatusCode, String) + Send + 'static,
) -> (
    Result<kube::runtime::controller::Action, Error>,
    serde_json::Value,
) {
    let before = md(serde_json::json!({"model": {"uri": "s3://models/m.onnx"}}));
    let mut world = applied_world(&before);
    let serving = pod_of(&world, true);
    let mut m = md(after);
    m.metadata.generation = Some(2);
    let mut last = status::compute(
        &before,
        &Observed {
            deployment: world.deployments.first(),
            pods: std::slice::from_ref(&serving),
            probed: None,
            ..Default::default()
        },
        &Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap()),
    );
    // Ready was already False (a rollout), since a time the next status must keep.
    for c in last.conditions.iter_mut().filter(|c| c.type_ == "Ready") {
        c.status = "False".into();
        c.reason = "RolloutInProgress".into();
    }
    m.status = Some(last);
    world.pods = vec![pod_of(&world, false)];
    world.deployments[0].status = Some(
        serde_json::from_value(serde_json::json!({"observedGeneration": 1, "replicas": 1, "readyReplicas": 0, "updatedReplicas": 1}))
            .unwrap(),
    );
    let (client, _log, bodies) = mock_reading_bodies(answer);
    let (ctx, _keep) = context(client, world);
    let result = run(m.clone(), ctx).await;
    let patch = bodies
        .lock()
        .unwrap()
        .iter()
        .find(|(line, _)| line.ends_with("/modeldeployments/resnet/status"))
        .map(|(_, body)| serde_json::from_str::<serde_json::Value>(body).unwrap())
        .expect("the status is written");
    let mut stored = serde_json::json!({ "status": m.status });
    json_patch::merge(&mut stored, &patch);
    (result, stored["status"].clone())
}

fn condition_of(status: &serde_json::Value, t: &str) -> (String, String, String) {
    let c = status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == t))
        .cloned()
        .unwrap_or_default();
    let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
    (s("status"), s("reason"), s("lastTransitionTime"))
}

/// While a spec cannot be applied, what runs still changes: the pods of the last spec applied keep
/// serving, or stop. A pod that starts crash-looping must show in status beside `Ready=False
/// ApplyFailed`, not hide behind the conditions and counts of the last successful reconcile.
#[tokio::test]
async fn a_refused_apply_still_reports_what_the_running_pods_do() {
    let (result, status) = reconcile_unapplied(
        serde_json::json!({"model": {"uri": "s3://models/other.onnx"}}),
        |method, path| match method {
            "PATCH" if path.ends_with("/deployments/resnet") => {
                (StatusCode::FORBIDDEN, api_error(403, "Forbidden"))
            }
            _ => (StatusCode::OK, "{}".into()),
        },
    )
    .await;
    result.expect_err("the refused apply is an error");
    let (ready, why, since) = condition_of(&status, "Ready");
    assert_eq!(
        (ready.as_str(), why.as_str()),
        ("False", "ApplyFailed"),
        "{status:#}"
    );
    assert_eq!(
        since, "2027-01-15T08:00:00Z",
        "Ready stayed False: its transition time stays"
    );
    let (degraded, why, _) = condition_of(&status, "Degraded");
    assert_eq!(
        (degraded.as_str(), why.as_str()),
        ("True", "CrashLoopBackOff"),
        "the crash loop since the last reconcile shows: {status:#}"
    );
    assert_eq!(status["readyReplicas"], 0, "{status:#}");
    assert_eq!(status["observedGeneration"], 2, "{status:#}");
}

/// The same for a spec the operator's own checks refuse; and it is looked at again, as pods
/// that go on changing would otherwise wait for a watch event to show.
#[tokio::test]
async fn an_invalid_spec_still_reports_what_the_running_pods_do_and_looks_again() {
    let (result, status) = reconcile_unapplied(
        serde_json::json!({"model": {"uri": "s3://models/m.onnx"}, "tls": {"secretName": "t"},
            "networkPolicy": {"inferenceFrom": [{"ipBlock": {"cidr": "not-an-address"}}]}}),
        |_, _| {
            let stored = md(serde_json::json!({"model": {"uri": "s3://models/m.onnx"}}));
            (StatusCode::OK, serde_json::to_string(&stored).unwrap())
        },
    )
    .await;
    let action = result.expect("an invalid spec is reported, not retried as an error");
    assert_eq!(
        format!("{action:?}"),
        format!(
            "{:?}",
            kube::runtime::controller::Action::requeue(Duration::from_secs(300))
        )
    );
    let (ready, why, since) = condition_of(&status, "Ready");
    assert_eq!(
        (ready.as_str(), why.as_str()),
        ("False", "InvalidSpec"),
        "{status:#}"
    );
    assert_eq!(since, "2027-01-15T08:00:00Z");
    assert_eq!(
        condition_of(&status, "Degraded").1,
        "CrashLoopBackOff",
        "{status:#}"
    );
    // The pods serve plain HTTP still: the endpoints say what runs, not the TLS asked for.
    assert!(
        status["endpoints"]["rest"]
            .as_str()
            .is_some_and(|e| e.starts_with("http://")),
        "{status:#}"
    );
}
