//! One reconcile: validate → build → apply → observe → status, with a contract per step:
//! validate and build are pure; apply is the only step writing children; status is computed purely
//! and patched once, only when it changed. A reconcile of an unchanged object writes nothing.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use kubemaas_crds::conditions::{self, reason};
use kubemaas_crds::v1alpha1::{ModelDeployment, ModelDeploymentStatus};

use super::build::{self, labels};
use super::status::{self, Observed};
use super::{Context, Error, apply, validate};

/// Now, to the second (what the apiserver keeps).
pub fn now() -> Time {
    // The apiserver keeps seconds: truncate so a round trip compares equal.
    let ts = k8s_openapi::jiff::Timestamp::now();
    Time(k8s_openapi::jiff::Timestamp::from_second(ts.as_second()).unwrap_or(ts))
}

fn pods_of(ctx: &Context, md: &ModelDeployment) -> Vec<Pod> {
    let (ns, name) = (md.namespace(), md.name_any());
    ctx.stores
        .pods
        .state()
        .into_iter()
        .filter(|p| p.namespace() == ns && p.labels().get(labels::MODEL_DEPLOYMENT) == Some(&name))
        .map(|p| (*p).clone())
        .collect()
}

/// Reconciles one ModelDeployment.
#[tracing::instrument(skip_all, fields(namespace = %md.namespace().unwrap_or_default(), name = %md.name_any(), generation = md.metadata.generation))]
pub async fn reconcile(md: Arc<ModelDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started();
    if md.meta().deletion_timestamp.is_some() {
        // Children are garbage-collected through their owner references.
        return Ok(Action::await_change());
    }
    // Fault injection for the e2e suite, compiled into debug builds only: a reconcile that
    // panics, to prove the process exits (and a standby takes over) when its controller dies.
    #[cfg(debug_assertions)]
    if std::env::var("KUBEMAAS_E2E_PANIC_ON").is_ok_and(|n| n == md.name_any()) {
        panic!(
            "KUBEMAAS_E2E_PANIC_ON: the reconcile of {} panics on purpose",
            md.name_any()
        );
    }
    if !ctx.stores.wait_until_ready(Duration::from_secs(30)).await {
        tracing::warn!("the child caches are not filled after 30 s; reconciling anyway");
    }
    if let Err(invalid) = validate::validate(&md) {
        let (status, next) = not_applied_status(&ctx, &md, reason::INVALID_SPEC, &invalid.to_string()).await;
        write_status(&ctx, &md, status).await?;
        // What runs goes on changing: look again as for any object.
        return Ok(Action::requeue(next));
    }
    let children = build::children(&md, &ctx.build);
    let applied = match apply::apply_children(&ctx.client, &ctx.stores, &md, children).await {
        Ok(a) => a,
        Err(e) => {
            // The apiserver's words belong in status too (quota, admission webhooks, RBAC):
            // `kubectl wait` and GitOps tools read conditions, not Events.
            let (status, _) =
                not_applied_status(&ctx, &md, reason::APPLY_FAILED, &super::status_message(&e)).await;
            if let Err(se) = write_status(&ctx, &md, status).await {
                tracing::warn!(error = %se, "could not report the apply failure in status");
            }
            return Err(e);
        }
    };
    ctx.metrics.child_writes(applied.writes);
    for kind in &applied.drift {
        ctx.metrics.drift_corrected(kind);
    }

    let ns = md.namespace().unwrap_or_default();
    // What was just written is newer than the cache: a changed template must read as rolling out.
    let Looked {
        status: mut new,
        deployment,
        next,
    } = look(&ctx, &md, applied.deployment, false).await;
    if super::autoscale::Params::of(&md).is_some()
        && let Some(d) = ctx.scraper.decision(&md)
    {
        let running = deployment.as_deref().and_then(|live| live.spec.replicas);
        let mut last_scale_time = new.autoscaling.as_ref().and_then(|a| a.last_scale_time.clone());
        // A stale decision is reported, not enforced (see `Scraper::decision`).
        if let Some(from) = running.filter(|r| *r != d.desired && !d.stale) {
            apply::hand_over_replicas(&ctx.client, &ns, &md.name_any(), d.desired).await?;
            ctx.metrics.child_writes(1);
            last_scale_time = Some(now());
            let event = Event {
                type_: EventType::Normal,
                reason: "Scaled".into(),
                note: Some(format!(
                    "scaled from {from} to {} replicas: {}",
                    d.desired, d.reason
                )),
                action: "Scale".into(),
                secondary: None,
            };
            // The shared recorder folds events of the same reason and action into one series
            // that keeps the first note; every decision has its own numbers, so each gets its
            // own Event from a recorder without history.
            let recorder = Recorder::new(ctx.client.clone(), super::reporter());
            if let Err(e) = recorder.publish(&event, &md.object_ref(&())).await {
                tracing::debug!(error = %e, "failed to publish event");
            }
        }
        new.autoscaling = Some(kubemaas_crds::v1alpha1::AutoscalingStatus {
            desired_replicas: if d.stale {
                running.unwrap_or(d.desired)
            } else {
                d.desired
            },
            last_scale_time,
            reason: d.reason,
            panic: d.panic,
        });
    }
    // CPU or memory autoscaling: the HPA decides, and says so in its status, which users do not
    // read; its decision, or why it cannot scale, goes into ours (and a failure into an Event).
    if md
        .spec
        .autoscaling
        .as_ref()
        .is_some_and(|a| !a.metric.is_request_driven())
        && let Some(hpa) = ctx.stores.hpas.get(&ObjectRef::new(&md.name_any()).within(&ns))
    {
        new.autoscaling = status::autoscaling_from_hpa(&hpa);
        let before = md.status.as_ref().and_then(|s| s.autoscaling.as_ref());
        if let Some(failure) = status::hpa_failure(&hpa)
            && before.is_none_or(|b| b.reason != failure)
        {
            let event = Event {
                type_: EventType::Warning,
                reason: "AutoscalingFailed".into(),
                note: Some(failure),
                action: "Scale".into(),
                secondary: None,
            };
            if let Err(e) = ctx.recorder.publish(&event, &md.object_ref(&())).await {
                tracing::debug!(error = %e, "failed to publish event");
            }
        }
    }
    new.metrics = published_metrics(&ctx, &md);
    write_status(&ctx, &md, new).await?;
    if let Ok(mut f) = ctx.failures.lock() {
        f.remove(&key(&md));
    }
    // Periodic resync; a resync of an unchanged object costs reads only.
    Ok(Action::requeue(next))
}

/// Why a pod's volumes are not ready, in the Events that say it: the kubelet's `FailedMount` (a
/// missing Secret or key) and the attach/detach controller's `FailedAttachVolume` (a
/// ReadWriteOnce claim attached to another node: "Multi-Attach error"), which no container state
/// shows.
const VOLUME_EVENT_REASONS: [&str; 2] = ["FailedMount", "FailedAttachVolume"];

/// The latest volume failure message (see [`VOLUME_EVENT_REASONS`]) for each of (at most three
/// of) the pods not started yet. Events may not be listable (an older install's RBAC): then
/// nothing is said, as before.
async fn mount_failures(
    client: &kube::Client,
    ns: &str,
    not_started: &[(String, String)],
) -> Vec<(String, String)> {
    let events: kube::Api<k8s_openapi::api::core::v1::Event> = kube::Api::namespaced(client.clone(), ns);
    let mut found = Vec::new();
    for (pod, uid) in not_started.iter().take(3) {
        // A field selector cannot say "one of two reasons": the pod's Events are few, so all are
        // listed and the reasons picked here.
        let lp = kube::api::ListParams::default().fields(&format!("involvedObject.uid={uid}"));
        match events.list(&lp).await {
            Ok(list) => {
                let latest = list
                    .items
                    .into_iter()
                    .filter(|e| {
                        e.reason
                            .as_deref()
                            .is_some_and(|r| VOLUME_EVENT_REASONS.contains(&r))
                    })
                    .max_by_key(|e| e.last_timestamp.as_ref().map(|t| t.0.as_second()).unwrap_or(0));
                if let Some(message) = latest.and_then(|e| e.message) {
                    found.push((pod.clone(), message));
                }
            }
            Err(e) => tracing::debug!(error = %e, pod, "cannot list the pod's events"),
        }
    }
    found
}

/// The status computed from the children as they run now, and when to look again.
struct Looked {
    status: ModelDeploymentStatus,
    deployment: Option<Arc<Deployment>>,
    next: Duration,
}

/// Reads the Deployment (`applied` if just written: it is newer than the cache), the pods, what
/// ready pods report and why pods cannot start, and computes the status from them. While the spec
/// is `unapplied`, the pods run an earlier one and are not asked about this one.
async fn look(ctx: &Context, md: &ModelDeployment, applied: Option<Deployment>, unapplied: bool) -> Looked {
    let ns = md.namespace().unwrap_or_default();
    let deployment = applied.map(Arc::new).or_else(|| {
        ctx.stores
            .deployments
            .get(&ObjectRef::new(&md.name_any()).within(&ns))
    });
    let pods = pods_of(ctx, md);
    // Only a pod of the current template serves what the spec now asks for.
    let current = status::current_pods(deployment.as_deref(), &pods);
    let probed = if unapplied {
        None
    } else {
        ctx.prober
            .probe(&current, &build::model_name(md), &md.spec.model.version)
            .await
    };
    let looked_into = status::not_started(&pods, &now(), status::NOT_STARTED_AFTER);
    let observed = Observed {
        deployment: deployment.as_deref(),
        pods: &pods,
        probed,
        mount_failures: mount_failures(&ctx.client, &ns, &looked_into).await,
        unapplied,
    };
    // A pod not started yet may be about to show why (a FailedMount Event), which no watch
    // reports: look again soon rather than at the next resync.
    let waiting = !status::not_started(&pods, &now(), Duration::ZERO).is_empty();
    let next = if waiting && observed.mount_failures.is_empty() {
        ctx.resync.min(Duration::from_secs(10))
    } else {
        ctx.resync
    };
    Looked {
        status: status::compute(md, &observed, &now()),
        deployment,
        next,
    }
}

/// Traffic as last scraped; after an operator restart, what status showed until a new window.
fn published_metrics(ctx: &Context, md: &ModelDeployment) -> Option<kubemaas_crds::v1alpha1::TrafficMetrics> {
    ctx.scraper
        .published(&key(md))
        .or_else(|| md.status.as_ref().and_then(|s| s.metrics.clone()))
}

/// The status while the spec cannot be applied (invalid, or refused by the apiserver): `Ready=False`
/// for `why`, and everything else read from what runs, the children of the last spec applied, so
/// pods that crash or stop meanwhile still show; and when to look again.
async fn not_applied_status(
    ctx: &Context,
    md: &ModelDeployment,
    why: &str,
    message: &str,
) -> (ModelDeploymentStatus, Duration) {
    let Looked {
        status: mut s, next, ..
    } = look(ctx, md, None, true).await;
    s.metrics = published_metrics(ctx, md);
    // The HPA of the last spec applied still scales what runs.
    if md
        .spec
        .autoscaling
        .as_ref()
        .is_some_and(|a| !a.metric.is_request_driven())
    {
        let ns = md.namespace().unwrap_or_default();
        s.autoscaling = match ctx.stores.hpas.get(&ObjectRef::new(&md.name_any()).within(&ns)) {
            Some(hpa) => status::autoscaling_from_hpa(&hpa),
            None => md.status.as_ref().and_then(|o| o.autoscaling.clone()),
        };
    }
    let before = md
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == conditions::READY));
    let ready = Condition {
        type_: conditions::READY.into(),
        status: "False".into(),
        reason: why.into(),
        message: message.into(),
        // The time Ready last changed status, as for every other condition.
        last_transition_time: before
            .filter(|b| b.status == "False")
            .map_or_else(now, |b| b.last_transition_time.clone()),
        observed_generation: md.metadata.generation,
    };
    match s.conditions.iter_mut().find(|c| c.type_ == conditions::READY) {
        Some(c) => *c = ready,
        None => s.conditions.push(ready),
    }
    (s, next)
}

/// Patches the status only when it differs, and publishes an Event per changed condition.
async fn write_status(ctx: &Context, md: &ModelDeployment, new: ModelDeploymentStatus) -> Result<(), Error> {
    if md.status.as_ref() == Some(&new) {
        return Ok(());
    }
    let name = md.name_any();
    let api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &md.namespace().unwrap_or_default());
    let patch = Patch::Merge(status_patch(md.status.as_ref(), &new));
    let params = PatchParams::default();
    super::retrying(|| api.patch_status(&name, &params, &patch))
        .await
        .map_err(|source| Error::Status {
            name: name.clone(),
            source,
        })?;
    ctx.metrics.child_writes(1);
    let reference = md.object_ref(&());
    for c in status::changed_conditions(md.status.as_ref(), &new) {
        let before = md
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|o| o.type_ == c.type_));
        let Some(warning) = status::event_for(c, before) else {
            continue;
        };
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: c.reason.clone(),
            note: Some(format!("{} is {}: {}", c.type_, c.status, c.message)),
            action: format!("Set{}", c.type_),
            secondary: None,
        };
        // An event that cannot be published must not fail the reconcile.
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            tracing::debug!(error = %e, "failed to publish event");
        }
    }
    Ok(())
}

/// The merge patch that makes the stored status `old` into `new`. Optional fields are left out of
/// `new`'s JSON when unset, and a merge patch leaves what it omits as it was, so a field that went
/// away (autoscaling removed, latencies of a model gone idle) is set to null explicitly.
fn status_patch(old: Option<&ModelDeploymentStatus>, new: &ModelDeploymentStatus) -> serde_json::Value {
    let new = serde_json::to_value(new).unwrap_or_default();
    let old = old.and_then(|o| serde_json::to_value(o).ok()).unwrap_or_default();
    serde_json::json!({ "status": merge_diff(&old, &new) })
}

/// An RFC 7386 merge patch from `old` to `new`: changed and new keys, and null for keys `new` no
/// longer has; arrays and scalars are replaced whole.
fn merge_diff(old: &serde_json::Value, new: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let mut out = serde_json::Map::new();
            for (k, nv) in n {
                match o.get(k) {
                    Some(ov) if ov == nv => {}
                    Some(ov) => {
                        out.insert(k.clone(), merge_diff(ov, nv));
                    }
                    None => {
                        out.insert(k.clone(), nv.clone());
                    }
                }
            }
            for k in o.keys().filter(|k| !n.contains_key(*k)) {
                out.insert(k.clone(), Value::Null);
            }
            Value::Object(out)
        }
        _ => new.clone(),
    }
}

fn key(md: &ModelDeployment) -> String {
    super::scrape::key(&md.namespace().unwrap_or_default(), &md.name_any())
}

/// Delay before retry number `attempt` (1-based): 5 s doubling up to 5 minutes.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(
        5u64.saturating_mul(1u64 << attempt.saturating_sub(1).min(6))
            .min(300),
    )
}

/// Delay before retry number `attempt` after a transient error (a conflict, a 5xx): 1 s doubling
/// up to 30 s, since the next try usually succeeds.
pub fn transient_backoff(attempt: u32) -> Duration {
    Duration::from_secs((1u64 << attempt.saturating_sub(1).min(5)).min(30))
}

/// Retries failed reconciles with exponential backoff; the failure is counted and published as an
/// Event.
pub fn error_policy(md: Arc<ModelDeployment>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(err.reason());
    let attempt = ctx
        .failures
        .lock()
        .map(|mut f| {
            let n = f.entry(key(&md)).or_insert(0);
            *n += 1;
            *n
        })
        .unwrap_or(1);
    tracing::warn!(name = %md.name_any(), error = %err, "reconcile failed");
    let recorder = ctx.recorder.clone();
    let reference = md.object_ref(&());
    let event = Event {
        type_: EventType::Warning,
        reason: err.reason().into(),
        note: Some(err.to_string()),
        action: "Reconcile".into(),
        secondary: None,
    };
    tokio::spawn(async move {
        let _ = recorder.publish(&event, &reference).await;
    });
    Action::requeue(if err.is_transient() {
        transient_backoff(attempt)
    } else {
        backoff(attempt)
    })
}

#[cfg(test)]
mod tests {
    use super::backoff;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_from_five_seconds_up_to_five_minutes() {
        let secs: Vec<u64> = (1..=9).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(secs, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(backoff(0), Duration::from_secs(5));
    }

    #[test]
    fn a_status_field_that_went_away_is_removed_by_the_patch() {
        use kubemaas_crds::v1alpha1::{AutoscalingStatus, ModelDeploymentStatus};
        let old = ModelDeploymentStatus {
            replicas: 3,
            autoscaling: Some(AutoscalingStatus {
                desired_replicas: 3,
                last_scale_time: None,
                reason: "average concurrency 5.0".into(),
                panic: false,
            }),
            ..Default::default()
        };
        let new = ModelDeploymentStatus {
            replicas: 2,
            ..Default::default()
        };
        // A merge patch leaves keys it omits as they are: a field that became None must be null.
        let patch = super::status_patch(Some(&old), &new);
        assert_eq!(patch["status"]["autoscaling"], serde_json::Value::Null, "{patch}");
        assert!(
            patch["status"]
                .as_object()
                .is_some_and(|s| s.contains_key("autoscaling")),
            "{patch}"
        );
        assert_eq!(patch["status"]["replicas"], 2);
        // Applying it to the stored status gives exactly the new one.
        let mut stored = serde_json::json!({ "status": old });
        json_patch::merge(&mut stored, &patch);
        assert_eq!(stored, serde_json::json!({ "status": new }));
    }

    #[test]
    fn transient_errors_retry_from_one_second_up_to_thirty() {
        let secs: Vec<u64> = (1..=8).map(|a| super::transient_backoff(a).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
    }
}
