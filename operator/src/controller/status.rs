//! Status: a pure function from what was observed (the Deployment and *all* pods) to
//! `ModelDeployment.status`. The reconcile patches it once, and only when it changed.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use kubemaas_crds::artifact::exit;
use kubemaas_crds::conditions::{self, reason};
use kubemaas_crds::v1alpha1::{
    AutoscalingStatus, Endpoints, ModelDeployment, ModelDeploymentStatus, ModelStatus,
};

use super::build::{PULL_CONTAINER, labels, model_name, ports, selector_string};
use super::probe::is_ready;

/// What a serving pod reports about itself over HTTP (model metadata), when it could be asked.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Probed {
    /// Execution provider in use.
    pub accelerator: Option<String>,
    /// Model as served.
    pub model: Option<ModelStatus>,
    /// The pod that answered.
    pub pod: String,
    /// Why the server runs on CPU although it tried CUDA, in its own words.
    pub fallback: Option<String>,
}

/// Everything the status is computed from.
#[derive(Default)]
pub struct Observed<'a> {
    /// The Deployment, if it exists.
    pub deployment: Option<&'a Deployment>,
    /// Every pod of this ModelDeployment.
    pub pods: &'a [Pod],
    /// What a ready pod reported, if asked.
    pub probed: Option<Probed>,
    /// Pods whose volumes cannot be attached or mounted: (pod, the latest `FailedMount` or
    /// `FailedAttachVolume` message).
    pub mount_failures: Vec<(String, String)>,
    /// The spec did not reach the children (invalid, or refused by the apiserver): the Deployment
    /// and pods run an earlier spec, so what compares them with this one (the replicas wanted,
    /// the accelerator, the model's name, the endpoints) is read from the Deployment or kept
    /// from the last status rather than judged against a spec they were never given.
    pub unapplied: bool,
}

/// How long a pod may sit with no container started before the reconcile looks for a
/// `FailedMount` Event: the kubelet reports one within its first mount attempt.
pub const NOT_STARTED_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// Pods at least `min_age` old whose containers have not started (all waiting in
/// `PodInitializing` or `ContainerCreating`): (name, uid). A volume the kubelet cannot mount, such
/// as a missing Secret, leaves a pod so, and says why only in an Event.
pub fn not_started(pods: &[Pod], now: &Time, min_age: std::time::Duration) -> Vec<(String, String)> {
    pods.iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .filter(|pod| {
            pod.metadata
                .creation_timestamp
                .as_ref()
                .is_some_and(|created| now.0.as_second() - created.0.as_second() >= min_age.as_secs() as i64)
        })
        .filter(|pod| {
            let st = pod.status.as_ref();
            let pending = st.and_then(|s| s.phase.as_deref()) == Some("Pending");
            let all = statuses(pod, true)
                .into_iter()
                .chain(statuses(pod, false))
                .collect::<Vec<_>>();
            let waiting = !all.is_empty()
                && all.iter().all(|s| {
                    let reason = s
                        .state
                        .as_ref()
                        .and_then(|st| st.waiting.as_ref())
                        .and_then(|w| w.reason.as_deref());
                    matches!(reason, Some("PodInitializing" | "ContainerCreating"))
                });
            pending && waiting
        })
        .filter_map(|pod| Some((pod.name_any(), pod.metadata.uid.clone()?)))
        .collect()
}

struct Cond {
    type_: &'static str,
    status: &'static str,
    reason: &'static str,
    message: String,
}

fn cond(type_: &'static str, ok: Option<bool>, reason: &'static str, message: impl Into<String>) -> Cond {
    let status = match ok {
        Some(true) => "True",
        Some(false) => "False",
        None => "Unknown",
    };
    Cond {
        type_,
        status,
        reason,
        message: message.into(),
    }
}

fn statuses(pod: &Pod, init: bool) -> Vec<ContainerStatus> {
    let s = pod.status.as_ref();
    let list = if init {
        s.and_then(|s| s.init_container_statuses.clone())
    } else {
        s.and_then(|s| s.container_statuses.clone())
    };
    list.unwrap_or_default()
}

fn scheduled(pods: &[Pod], desired: i32, deployment: Option<&Deployment>) -> Cond {
    for pod in pods {
        let conds = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        if let Some(c) = conds
            .iter()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        {
            return cond(
                conditions::SCHEDULED,
                Some(false),
                reason::UNSCHEDULABLE,
                format!(
                    "pod {}: {}",
                    pod.name_any(),
                    c.message.clone().unwrap_or_else(|| "unschedulable".into())
                ),
            );
        }
    }
    let bound = pods
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some())
        .count();
    if pods.is_empty() && desired > 0 {
        if let Some(why) = deployment.and_then(cannot_create) {
            return cond(conditions::SCHEDULED, Some(false), reason::PODS_NOT_CREATED, why);
        }
        return cond(
            conditions::SCHEDULED,
            None,
            reason::NO_PODS,
            "no pods created yet",
        );
    }
    if bound < pods.len() {
        return cond(
            conditions::SCHEDULED,
            None,
            reason::PENDING,
            format!("{bound}/{} pods bound to nodes", pods.len()),
        );
    }
    cond(
        conditions::SCHEDULED,
        Some(true),
        reason::ALL_PODS_SCHEDULED,
        format!("{bound}/{} pods bound to nodes", pods.len()),
    )
}

/// The `ModelLoaded=False` reason for an exit code of `kubemaas-server pull`. Codes outside the
/// contract (killed, out of memory) are download failures too.
fn pull_failure_reason(exit_code: i32) -> &'static str {
    match u8::try_from(exit_code) {
        Ok(exit::CHECKSUM_MISMATCH) => reason::CHECKSUM_MISMATCH,
        Ok(exit::NOT_FOUND) => reason::ARTIFACT_NOT_FOUND,
        Ok(exit::ACCESS_DENIED) => reason::ACCESS_DENIED,
        Ok(exit::TOO_LARGE) => reason::ARTIFACT_TOO_LARGE,
        Ok(exit::ADDRESS_REFUSED) => reason::ADDRESS_REFUSED,
        Ok(exit::COMPRESSION_REJECTED) => reason::COMPRESSION_REJECTED,
        Ok(exit::COMPRESSION_FAILED) => reason::COMPRESSION_FAILED,
        _ => reason::DOWNLOAD_FAILED,
    }
}

/// The download's failure, if it is failing *now*: terminated non-zero, or waiting to be
/// restarted after a non-zero exit (CrashLoopBackOff, PodInitializing). Once a retry completed
/// (exit 0) or runs, the kubelet's lastState is history, not the pod's state.
fn current_pull_failure(s: &ContainerStatus) -> Option<ContainerStateTerminated> {
    let state = s.state.as_ref()?;
    if let Some(t) = &state.terminated {
        return (t.exit_code != 0).then(|| t.clone());
    }
    state.waiting.as_ref()?;
    s.last_state
        .as_ref()?
        .terminated
        .clone()
        .filter(|t| t.exit_code != 0)
}

/// How long a termination the kubelet keeps in `lastState` still counts for a container that runs
/// again: long enough to see a crash and its restart, short enough that one OOMKill or one failed
/// load does not mark a pod that has served for hours.
pub const RECENT_TERMINATION_SECONDS: i64 = 600;

/// The server container's termination, if it is a *current* failure: it is terminated now, or
/// waiting to restart, or it was restarted within [`RECENT_TERMINATION_SECONDS`], or it has not
/// started since. A container that has run and served since an old termination is not failing.
fn current_termination(s: &ContainerStatus, now: &Time) -> Option<ContainerStateTerminated> {
    let state = s.state.as_ref();
    if let Some(t) = state.and_then(|st| st.terminated.clone()) {
        return Some(t);
    }
    let last = s.last_state.as_ref()?.terminated.clone()?;
    let waiting = state.is_some_and(|st| st.waiting.is_some());
    let recent = last
        .finished_at
        .as_ref()
        .is_none_or(|f| now.0.duration_since(f.0).as_secs() < RECENT_TERMINATION_SECONDS);
    let starting = !s.started.unwrap_or(false);
    (waiting || recent || starting).then_some(last)
}

/// Whether a server's run ended by a signal after its models had loaded, as it writes in its
/// termination log (a liveness-probe restart, unlike a startup-probe kill).
fn stopped_after_loading(t: &ContainerStateTerminated) -> bool {
    t.message
        .as_deref()
        .is_some_and(|m| m.contains(kubemaas_crds::artifact::STOPPED_AFTER_LOADING))
}

/// `ModelLoaded`, of the current template's `pods` (`ready` of them Ready); `older_serving` pods
/// of the previous template are still Ready, which the messages say while the new model loads;
/// `parked`: no replica is asked for.
fn model_loaded(pods: &[Pod], ready: i32, older_serving: usize, parked: bool, now: &Time) -> Cond {
    // Failures first: one failing pod is news even while others serve.
    for pod in pods {
        let pull = statuses(pod, true).into_iter().find(|s| s.name == PULL_CONTAINER);
        if let Some(t) = pull.as_ref().and_then(current_pull_failure) {
            // The termination message is what pull wrote to /dev/termination-log.
            let why = match t.message.as_deref().map(str::trim) {
                Some(m) if !m.is_empty() => m.to_string(),
                _ => format!(
                    "{PULL_CONTAINER} exited with code {}{}",
                    t.exit_code,
                    t.reason.map(|r| format!(" ({r})")).unwrap_or_default()
                ),
            };
            return cond(
                conditions::MODEL_LOADED,
                Some(false),
                pull_failure_reason(t.exit_code),
                format!("pod {}: {why}", pod.name_any()),
            );
        }
        for s in statuses(pod, false) {
            if let Some(t) = current_termination(&s, now) {
                // A load that failed before a restart that has loaded since is history: the
                // container started (its startup probe passed) after it.
                if t.exit_code == i32::from(exit::LOAD_FAILED) && !s.started.unwrap_or(false) {
                    let why = t
                        .message
                        .clone()
                        .unwrap_or_else(|| "the server could not load the model".into());
                    return cond(
                        conditions::MODEL_LOADED,
                        Some(false),
                        reason::LOAD_FAILED,
                        format!("pod {}: {}", pod.name_any(), why.trim()),
                    );
                }
                // A run that ended after its models had loaded (its termination message says
                // so) was not cut short by the startup budget: see `degraded`.
                let before_ready = !s.started.unwrap_or(false)
                    && t.reason.as_deref() != Some("OOMKilled")
                    && s.restart_count > 0
                    && !stopped_after_loading(&t);
                // A startup probe kill ends the server through SIGTERM (a clean exit while
                // loading) or SIGKILL past the grace period; any other code is the server's own
                // failure, which says nothing about the startup budget.
                if before_ready && ![0, 137, 143].contains(&t.exit_code) {
                    let words = t.message.as_deref().map(str::trim).filter(|m| !m.is_empty());
                    return cond(
                        conditions::MODEL_LOADED,
                        Some(false),
                        reason::SERVER_EXITED,
                        format!(
                            "pod {}: the server exited with exit code {} before it was ready (restarted {} times): {}",
                            pod.name_any(),
                            t.exit_code,
                            s.restart_count,
                            words.unwrap_or("it left no message; see the container's log")
                        ),
                    );
                }
                // Killed by the startup probe before the model became ready.
                if before_ready {
                    return cond(
                        conditions::MODEL_LOADED,
                        Some(false),
                        reason::STARTUP_TIMEOUT,
                        format!(
                            "pod {}: the model did not become ready within startupTimeoutSeconds (restarted {} times)",
                            pod.name_any(),
                            s.restart_count
                        ),
                    );
                }
            }
        }
    }
    let older = match older_serving {
        0 => String::new(),
        1 => "; 1 pod of the previous template still serves".into(),
        n => format!("; {n} pods of the previous template still serve"),
    };
    if ready > 0 {
        let msg = if ready as usize >= pods.len() {
            format!("model loaded in {ready} ready pod{}", plural(ready))
        } else {
            format!("model loaded in {ready} of {} pods", pods.len())
        };
        return cond(conditions::MODEL_LOADED, Some(true), reason::LOADED, msg + &older);
    }
    if pods.is_empty() && parked {
        return cond(
            conditions::MODEL_LOADED,
            Some(false),
            reason::SCALED_TO_ZERO,
            format!("0 replicas asked for: no pod holds the model{older}"),
        );
    }
    if pods.is_empty() {
        let msg = format!("no pods of the current template yet{older}");
        return cond(conditions::MODEL_LOADED, None, reason::NO_PODS, msg);
    }
    let downloading = pods.iter().any(|p| {
        statuses(p, true)
            .iter()
            .any(|s| s.state.as_ref().is_some_and(|st| st.running.is_some()))
    });
    if downloading {
        return cond(
            conditions::MODEL_LOADED,
            None,
            reason::DOWNLOADING,
            format!("downloading the model{older}"),
        );
    }
    cond(
        conditions::MODEL_LOADED,
        None,
        reason::LOADING,
        format!("waiting for the model to load{older}"),
    )
}

fn plural(n: i32) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// A `cuda` ModelDeployment whose pod reports the CPU provider is not what was asked for, even
/// though it serves.
fn accelerator_fallback(md: &ModelDeployment, probed: Option<&Probed>) -> Option<Cond> {
    let p = probed?;
    let on_cpu = p.accelerator.as_deref() == Some("CPUExecutionProvider");
    if md.spec.accelerator != kubemaas_crds::v1alpha1::Accelerator::Cuda || !on_cpu {
        return None;
    }
    let why = p
        .fallback
        .clone()
        .unwrap_or_else(|| "the server did not say why".into());
    Some(cond(
        conditions::DEGRADED,
        Some(true),
        reason::ACCELERATOR_FALLBACK,
        format!(
            "pod {} runs on CPUExecutionProvider although accelerator is cuda: {why}",
            p.pod
        ),
    ))
}

fn degraded(md: &ModelDeployment, observed: &Observed<'_>, now: &Time) -> Cond {
    let (pods, probed) = (observed.pods, observed.probed.as_ref());
    if let Some((pod, message)) = observed.mount_failures.first() {
        return cond(
            conditions::DEGRADED,
            Some(true),
            reason::VOLUME_MOUNT_FAILED,
            format!("pod {pod}: {message}"),
        );
    }
    if let Some(why) = observed.deployment.and_then(cannot_create) {
        return cond(conditions::DEGRADED, Some(true), reason::PODS_NOT_CREATED, why);
    }
    for pod in pods {
        for s in statuses(pod, true).into_iter().chain(statuses(pod, false)) {
            let who = format!("pod {} container {}", pod.name_any(), s.name);
            if let Some(w) = s.state.as_ref().and_then(|st| st.waiting.clone()) {
                let msg = w.message.clone().unwrap_or_default();
                match w.reason.as_deref() {
                    Some("CrashLoopBackOff") => {
                        let last = s
                            .last_state
                            .as_ref()
                            .and_then(|l| l.terminated.as_ref())
                            .map(|t| {
                                format!(
                                    " (last exit {}: {})",
                                    t.exit_code,
                                    t.reason.clone().unwrap_or_default()
                                )
                            })
                            .unwrap_or_default();
                        return cond(
                            conditions::DEGRADED,
                            Some(true),
                            reason::CRASH_LOOP_BACK_OFF,
                            format!("{who}: {msg}{last}"),
                        );
                    }
                    Some(
                        why @ ("CreateContainerConfigError"
                        | "CreateContainerError"
                        | "RunContainerError"
                        | "PreStartHookError"
                        | "PostStartHookError"),
                    ) => {
                        return cond(
                            conditions::DEGRADED,
                            Some(true),
                            reason::CONTAINER_NOT_CREATED,
                            format!("{who}: {why}: {msg}"),
                        );
                    }
                    Some("ImagePullBackOff") | Some("ErrImagePull") | Some("InvalidImageName") => {
                        return cond(
                            conditions::DEGRADED,
                            Some(true),
                            reason::IMAGE_PULL_BACK_OFF,
                            format!("{who}: {msg}"),
                        );
                    }
                    _ => {}
                }
            }
            let oom = |t: &k8s_openapi::api::core::v1::ContainerStateTerminated| {
                t.reason.as_deref() == Some("OOMKilled")
            };
            let terminated = current_termination(&s, now).filter(oom);
            if terminated.is_some() {
                return cond(
                    conditions::DEGRADED,
                    Some(true),
                    reason::OOM_KILLED,
                    format!("{who} was OOMKilled: raise resources.limits.memory"),
                );
            }
            if s.restart_count > 0 && current_termination(&s, now).is_some_and(|t| stopped_after_loading(&t))
            {
                return cond(
                    conditions::DEGRADED,
                    Some(true),
                    reason::SERVER_RESTARTED,
                    format!(
                        "{who} was restarted after its models had loaded (restarted {} times): most likely its \
                         liveness probe (/v2/health/live) went unanswered; see the container's previous log",
                        s.restart_count
                    ),
                );
            }
        }
    }
    if let Some(c) = accelerator_fallback(md, probed) {
        return c;
    }
    cond(
        conditions::DEGRADED,
        Some(false),
        reason::HEALTHY,
        "no failing containers",
    )
}

/// The words (message, else reason) of the Deployment's condition `type_` when its status is
/// `status`.
fn deployment_says(d: &Deployment, type_: &str, status: &str) -> Option<String> {
    let c = d
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_.as_deref() == Some(type_) && c.status.as_deref() == Some(status))?;
    Some(
        c.message
            .clone()
            .unwrap_or_else(|| c.reason.clone().unwrap_or_default()),
    )
}

/// The Deployment's own word that it gave up (`Progressing=False`, the progress deadline passed).
fn gave_up(d: &Deployment) -> Option<String> {
    deployment_says(d, "Progressing", "False").map(|w| format!("the rollout stopped: {w}"))
}

/// The apiserver's words when the Deployment cannot create pods (`ReplicaFailure=True`, copied
/// from its ReplicaSet: a missing ServiceAccount or PriorityClass, a quota). No pod exists to say
/// anything else.
fn cannot_create(d: &Deployment) -> Option<String> {
    deployment_says(d, "ReplicaFailure", "True").map(|w| format!("the Deployment cannot create pods: {w}"))
}

/// Why a rollout cannot progress, if it cannot: the Deployment gave up (progress deadline) or
/// cannot create pods, or a pod cannot be scheduled (on a full GPU cluster, a surge pod never is).
fn stuck(d: &Deployment, pods: &[Pod]) -> Option<String> {
    if let Some(why) = gave_up(d).or_else(|| cannot_create(d)) {
        return Some(why);
    }
    pods.iter().find_map(|pod| {
        let conds = pod.status.as_ref()?.conditions.clone()?;
        let c = conds
            .iter()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
        Some(format!(
            "the rollout cannot progress: pod {} cannot be scheduled: {}",
            pod.name_any(),
            c.message.clone().unwrap_or_else(|| "unschedulable".into())
        ))
    })
}

fn ready(md: &ModelDeployment, deployment: Option<&Deployment>, desired: i32, pods: &[Pod]) -> Cond {
    let Some(d) = deployment else {
        return cond(
            conditions::READY,
            Some(false),
            reason::ROLLOUT_IN_PROGRESS,
            "the Deployment does not exist yet",
        );
    };
    let st = d.status.clone().unwrap_or_default();
    let ready = st.ready_replicas.unwrap_or(0);
    if desired == 0 {
        let stopping = match st.replicas.unwrap_or(0) {
            0 => String::new(),
            n => format!(" ({n} pods still stopping)"),
        };
        return cond(
            conditions::READY,
            Some(false),
            reason::SCALED_TO_ZERO,
            format!(
                "0 replicas asked for: nothing serves{stopping}; `kubectl scale modeldeployment/{} --replicas=N` serves again",
                md.name_any()
            ),
        );
    }
    let lagging = st.observed_generation.unwrap_or(0) < d.metadata.generation.unwrap_or(0);
    // A generation the Deployment controller has not observed yet is a rollout only if the
    // template may have changed: when every pod runs the current template, only the count did
    // (the autoscaler or an HPA scaled it), and the pods serve all along.
    let only_scaled = lagging
        && template_hash(Some(d)).is_some()
        && !pods.is_empty()
        && current_pods(Some(d), pods).len() == pods.len();
    let rolled_out = (!lagging || only_scaled)
        && st.updated_replicas.unwrap_or(0) >= st.replicas.unwrap_or(0).min(desired)
        && st.replicas.unwrap_or(0) <= st.updated_replicas.unwrap_or(0).max(desired);
    if ready < desired {
        // Past its deadline, the Deployment's giving up is the news, with the count beside it;
        // so is a Deployment that cannot create pods at all.
        if let Some(why) = gave_up(d).or_else(|| cannot_create(d)) {
            return cond(
                conditions::READY,
                Some(false),
                reason::ROLLOUT_STUCK,
                format!("{why} ({ready}/{desired} replicas ready)"),
            );
        }
        return cond(
            conditions::READY,
            Some(false),
            reason::INSUFFICIENT_REPLICAS,
            format!("{ready}/{desired} replicas ready"),
        );
    }
    if !rolled_out {
        if let Some(why) = stuck(d, pods) {
            return cond(conditions::READY, Some(false), reason::ROLLOUT_STUCK, why);
        }
        return cond(
            conditions::READY,
            Some(false),
            reason::ROLLOUT_IN_PROGRESS,
            format!(
                "{}/{} replicas updated to generation {}",
                st.updated_replicas.unwrap_or(0),
                st.replicas.unwrap_or(0),
                md.metadata.generation.unwrap_or(0)
            ),
        );
    }
    cond(
        conditions::READY,
        Some(true),
        reason::MINIMUM_REPLICAS_AVAILABLE,
        format!("{ready}/{desired} replicas ready"),
    )
}

/// The hash of the Deployment's pod template ([`labels::TEMPLATE_HASH`]), if it carries one.
fn template_hash(deployment: Option<&Deployment>) -> Option<&String> {
    deployment?
        .spec
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(labels::TEMPLATE_HASH)
}

/// The pods of the Deployment's current pod template: during a rollout the others run the
/// previous spec (an older model, other flags) and say nothing about this one. A Deployment whose
/// template carries no hash (written by an older operator) makes every pod current.
pub fn current_pods(deployment: Option<&Deployment>, pods: &[Pod]) -> Vec<Pod> {
    let Some(hash) = template_hash(deployment) else {
        return pods.to_vec();
    };
    pods.iter()
        .filter(|p| p.annotations().get(labels::TEMPLATE_HASH) == Some(hash))
        .cloned()
        .collect()
}

/// Replicas the user wants at least.
pub fn desired_replicas(md: &ModelDeployment) -> i32 {
    md.spec
        .autoscaling
        .as_ref()
        .map(|a| a.min_replicas)
        .unwrap_or(md.spec.replicas)
}

/// Computes the new status. Conditions whose status did not change keep their
/// `lastTransitionTime`; everything else is derived from `observed` alone.
pub fn compute(md: &ModelDeployment, observed: &Observed<'_>, now: &Time) -> ModelDeploymentStatus {
    // A pod being deleted serves no more and says nothing of the model: a scaled-down pod's
    // stopped server would read as a failure, and an old one as still serving.
    let staying: Vec<Pod> = observed
        .pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .cloned()
        .collect();
    let observed = &Observed {
        deployment: observed.deployment,
        pods: &staying,
        probed: observed.probed.clone(),
        mount_failures: observed.mount_failures.clone(),
        unapplied: observed.unapplied,
    };
    let old = md.status.clone().unwrap_or_default();
    let generation = md.metadata.generation;
    let desired = match observed.deployment {
        // What the running Deployment was last asked for.
        Some(d) if observed.unapplied => d.spec.replicas.unwrap_or_else(|| desired_replicas(md)),
        _ => desired_replicas(md),
    };
    let dst = observed
        .deployment
        .and_then(|d| d.status.clone())
        .unwrap_or_default();
    let ready_replicas = dst.ready_replicas.unwrap_or(0);
    let current = current_pods(observed.deployment, observed.pods);
    let (current_ready, older_serving) = if template_hash(observed.deployment).is_some() {
        let ready_current = current.iter().filter(|p| is_ready(p)).count();
        let ready_all = observed.pods.iter().filter(|p| is_ready(p)).count();
        (
            i32::try_from(ready_current).unwrap_or(i32::MAX),
            ready_all.saturating_sub(ready_current),
        )
    } else {
        (ready_replicas, 0)
    };
    let new = [
        scheduled(observed.pods, desired, observed.deployment),
        model_loaded(&current, current_ready, older_serving, desired == 0, now),
        ready(md, observed.deployment, desired, observed.pods),
        degraded_or_kept(md, observed, &old, now),
    ];
    let conditions = new
        .into_iter()
        .map(|c| {
            let previous = old.conditions.iter().find(|o| o.type_ == c.type_);
            let last_transition_time = match previous {
                Some(p) if p.status == c.status => p.last_transition_time.clone(),
                _ => now.clone(),
            };
            Condition {
                type_: c.type_.into(),
                status: c.status.into(),
                reason: c.reason.into(),
                message: c.message,
                last_transition_time,
                observed_generation: generation,
            }
        })
        .collect();
    let name = md.name_any();
    let ns = md.namespace().unwrap_or_else(|| "default".into());
    let probed = observed.probed.clone().unwrap_or_default();
    ModelDeploymentStatus {
        observed_generation: generation,
        replicas: dst.replicas.unwrap_or(0),
        ready_replicas,
        updated_replicas: dst.updated_replicas.unwrap_or(0),
        selector: Some(selector_string(md)),
        conditions,
        endpoints: old.endpoints.filter(|_| observed.unapplied).or_else(|| {
            Some(Endpoints {
                rest: format!(
                    "{}://{name}.{ns}.svc:{}",
                    if md.spec.tls.is_some() { "https" } else { "http" },
                    ports::HTTP
                ),
                grpc: format!("{name}.{ns}.svc:{}", ports::GRPC),
            })
        }),
        // Only what a pod really reported; an earlier report stays until a new one replaces it.
        accelerator: probed.accelerator.or(old.accelerator),
        // A report kept from earlier stays as it was: it describes what those pods served, under
        // the name they served it (a spec that renames the model has no pod answering yet).
        model: probed
            .model
            .map(|mut m| {
                m.name = model_name(md);
                // What the pod pulled; else what was pinned (a mismatch is never served).
                m.sha256 = m
                    .artifact
                    .as_ref()
                    .map(|a| a.sha256.clone())
                    .or_else(|| md.spec.model.sha256.clone());
                m
            })
            .or(old.model),
        // Set by the reconcile from the scraper, which this pure function does not see.
        metrics: old.metrics,
        autoscaling: old.autoscaling.filter(|_| {
            observed.unapplied
                || md
                    .spec
                    .autoscaling
                    .as_ref()
                    .is_some_and(|a| a.metric.is_request_driven())
        }),
    }
}

/// [`degraded`]; while the spec is unapplied nothing is probed (the pods would be asked about a
/// spec they do not run), so an `AcceleratorFallback` found earlier on the same pods stays.
fn degraded_or_kept(
    md: &ModelDeployment,
    observed: &Observed<'_>,
    old: &ModelDeploymentStatus,
    now: &Time,
) -> Cond {
    let found = degraded(md, observed, now);
    if !observed.unapplied || found.reason != reason::HEALTHY {
        return found;
    }
    old.conditions
        .iter()
        .find(|c| c.type_ == conditions::DEGRADED && c.reason == reason::ACCELERATOR_FALLBACK)
        .map_or(found, |c| {
            cond(
                conditions::DEGRADED,
                Some(true),
                reason::ACCELERATOR_FALLBACK,
                c.message.clone(),
            )
        })
}

/// Why the HorizontalPodAutoscaler cannot scale (its `ScalingActive` condition is False, e.g. no
/// metrics API, or pods without a request of the metric's resource), in its own words.
pub fn hpa_failure(hpa: &HorizontalPodAutoscaler) -> Option<String> {
    let c = hpa
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "ScalingActive" && c.status == "False")?;
    Some(format!(
        "the HorizontalPodAutoscaler cannot scale ({}): {}",
        c.reason.as_deref().unwrap_or("unknown reason"),
        c.message.as_deref().unwrap_or("no message")
    ))
}

/// `status.autoscaling` for CPU or memory autoscaling, which the HPA decides: its desired replicas
/// and last scale time, and why: the utilisation against the target, or why it cannot scale.
/// None until the HPA has a status.
pub fn autoscaling_from_hpa(hpa: &HorizontalPodAutoscaler) -> Option<AutoscalingStatus> {
    let st = hpa.status.as_ref()?;
    let reason = hpa_failure(hpa).unwrap_or_else(|| {
        // The server container's metric (ContainerResource), or the pod's (Resource) in an HPA
        // an older operator wrote.
        let target = hpa.spec.metrics.as_ref().and_then(|m| m.first()).and_then(|m| {
            m.container_resource
                .as_ref()
                .map(|c| (&c.name, &c.target))
                .or_else(|| m.resource.as_ref().map(|r| (&r.name, &r.target)))
        });
        let current = st.current_metrics.as_ref().and_then(|m| m.first()).and_then(|m| {
            m.container_resource
                .as_ref()
                .map(|c| &c.current)
                .or_else(|| m.resource.as_ref().map(|r| &r.current))
        });
        let mut why = match (target, current.and_then(|c| c.average_utilization)) {
            (Some((name, t)), Some(u)) => format!(
                "average {name} utilisation {u}% of the request, target {}%: {} replicas",
                t.average_utilization.unwrap_or(0),
                st.desired_replicas
            ),
            _ => format!("{} replicas (no utilisation measured yet)", st.desired_replicas),
        };
        // At the minimum or the maximum: the HPA says which.
        if let Some(limited) = st
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "ScalingLimited" && c.status == "True")
        {
            why.push_str(&format!(
                "; {}",
                limited
                    .message
                    .as_deref()
                    .unwrap_or("limited by minReplicas or maxReplicas")
            ));
        }
        why
    });
    Some(AutoscalingStatus {
        desired_replicas: st.desired_replicas,
        last_scale_time: st.last_scale_time.clone(),
        reason,
        panic: false,
    })
}

/// Conditions whose status or reason changed between `old` and `new`: each becomes an Event.
pub fn changed_conditions<'a>(
    old: Option<&ModelDeploymentStatus>,
    new: &'a ModelDeploymentStatus,
) -> Vec<&'a Condition> {
    new.conditions
        .iter()
        .filter(|c| {
            !old.map(|o| &o.conditions).is_some_and(|o| {
                o.iter()
                    .any(|p| p.type_ == c.type_ && p.status == c.status && p.reason == c.reason)
            })
        })
        .collect()
}

/// Whether a condition is good news (Normal event) or bad (Warning).
pub fn is_healthy(c: &Condition) -> bool {
    if c.type_ == conditions::DEGRADED {
        c.status == "False"
    } else {
        c.status == "True"
    }
}

/// Reasons that are a problem a person should look at, whenever they appear.
const PROBLEMS: [&str; 21] = [
    reason::SERVER_EXITED,
    reason::SERVER_RESTARTED,
    reason::CONTAINER_NOT_CREATED,
    reason::VOLUME_MOUNT_FAILED,
    reason::PODS_NOT_CREATED,
    reason::UNSCHEDULABLE,
    reason::ROLLOUT_STUCK,
    reason::DOWNLOAD_FAILED,
    reason::CHECKSUM_MISMATCH,
    reason::ARTIFACT_NOT_FOUND,
    reason::ACCESS_DENIED,
    reason::ARTIFACT_TOO_LARGE,
    reason::ADDRESS_REFUSED,
    reason::LOAD_FAILED,
    reason::STARTUP_TIMEOUT,
    reason::CRASH_LOOP_BACK_OFF,
    reason::OOM_KILLED,
    reason::IMAGE_PULL_BACK_OFF,
    reason::INVALID_SPEC,
    reason::APPLY_FAILED,
    reason::RECONCILE_FAILED,
];

/// The Event a condition change deserves: `Some(true)` a Warning, `Some(false)` a Normal event,
/// `None` none. At scale every Event is a write, so the expected, brief states on the way to
/// Ready (no pods yet, pending, downloading, loading, replicas coming up, a rollout) say nothing,
/// also when a pod waits for the scheduler after all were placed (start-up, scale-up); reaching a
/// good state is Normal; a problem reason, or losing any other good state, is a Warning.
pub fn event_for(c: &Condition, before: Option<&Condition>) -> Option<bool> {
    if is_healthy(c) {
        // Degraded=False is only news as a recovery.
        let recovered = before.is_some_and(|b| !is_healthy(b));
        return (c.type_ != conditions::DEGRADED || recovered).then_some(false);
    }
    if PROBLEMS.contains(&c.reason.as_str()) {
        return Some(true);
    }
    // A rollout (and the new template's model on its way while the old pods serve), and pods
    // waiting for the scheduler, are on the way somewhere; if they get stuck, their own reasons
    // (RolloutStuck, Unschedulable, a download or load failure) warn.
    let expected = [
        reason::ROLLOUT_IN_PROGRESS,
        reason::PENDING,
        reason::NO_PODS,
        reason::DOWNLOADING,
        reason::LOADING,
        reason::SCALED_TO_ZERO,
    ]
    .contains(&c.reason.as_str());
    (!expected && before.is_some_and(is_healthy)).then_some(true)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use serde_json::json;

    use kubemaas_crds::v1alpha1::ArtifactStatus;

    use super::super::build::tests::md;
    use super::*;

    fn now() -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap())
    }

    /// An HPA as kube-controller-manager writes it, scaling on CPU with `conditions` and `current`.
    fn hpa(conditions: serde_json::Value, current: serde_json::Value) -> HorizontalPodAutoscaler {
        serde_json::from_value(json!({
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "m", "namespace": "ns"},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "m"},
                "minReplicas": 1, "maxReplicas": 4,
                "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": 70}}}]},
            "status": {"currentReplicas": 2, "desiredReplicas": 3, "conditions": conditions,
                "currentMetrics": current}
        }))
        .unwrap()
    }

    #[test]
    fn cpu_autoscaling_reports_what_the_hpa_decided_and_why_it_cannot_scale() {
        let failing = hpa(
            json!([
                {"type": "AbleToScale", "status": "True", "reason": "SucceededGetScale",
                 "message": "the HPA controller was able to get the target's current scale"},
                {"type": "ScalingActive", "status": "False", "reason": "FailedGetResourceMetric",
                 "message": "the HPA was unable to compute the replica count: failed to get cpu utilization: missing request for cpu in container server of Pod m-1"}
            ]),
            json!(null),
        );
        let a = autoscaling_from_hpa(&failing).unwrap();
        assert_eq!(a.desired_replicas, 3);
        assert_eq!(
            a.reason,
            "the HorizontalPodAutoscaler cannot scale (FailedGetResourceMetric): the HPA was unable to compute the replica count: failed to get cpu utilization: missing request for cpu in container server of Pod m-1"
        );
        assert_eq!(hpa_failure(&failing).as_deref(), Some(a.reason.as_str()));

        let scaling = hpa(
            json!([
                {"type": "ScalingActive", "status": "True", "reason": "ValidMetricFound", "message": "ok"},
                {"type": "ScalingLimited", "status": "True", "reason": "TooManyReplicas",
                 "message": "the desired replica count is more than the maximum replica count"}
            ]),
            json!([{"type": "Resource", "resource": {"name": "cpu", "current": {"averageUtilization": 95, "averageValue": "950m"}}}]),
        );
        let a = autoscaling_from_hpa(&scaling).unwrap();
        assert_eq!(
            a.reason,
            "average cpu utilisation 95% of the request, target 70%: 3 replicas; the desired replica count is more than the maximum replica count"
        );
        assert!(hpa_failure(&scaling).is_none());

        // The same, as an HPA on the server container writes it.
        let mut container = scaling.clone();
        let metric = json!({"type": "ContainerResource", "containerResource": {"name": "cpu", "container": "server",
            "target": {"type": "Utilization", "averageUtilization": 70}}});
        container.spec.metrics = Some(vec![serde_json::from_value(metric).unwrap()]);
        let current = json!({"type": "ContainerResource", "containerResource": {"name": "cpu", "container": "server",
            "current": {"averageUtilization": 95, "averageValue": "950m"}}});
        if let Some(st) = container.status.as_mut() {
            st.current_metrics = Some(vec![serde_json::from_value(current).unwrap()]);
        }
        assert_eq!(autoscaling_from_hpa(&container).unwrap().reason, a.reason);

        let mut fresh = scaling.clone();
        fresh.status = None;
        assert!(
            autoscaling_from_hpa(&fresh).is_none(),
            "nothing to say before the HPA's first sync"
        );
    }

    fn c(type_: &str, status: &str, reason: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: String::new(),
            last_transition_time: now(),
            observed_generation: None,
        }
    }

    #[test]
    fn events_warn_on_problems_and_losses_and_stay_quiet_on_the_way_to_ready() {
        use conditions::{DEGRADED, MODEL_LOADED, READY, SCHEDULED};
        // The way to Ready: nothing.
        for (t, st, r) in [
            (SCHEDULED, "Unknown", reason::PENDING),
            (MODEL_LOADED, "Unknown", reason::LOADING),
            (MODEL_LOADED, "Unknown", reason::DOWNLOADING),
            (READY, "False", reason::INSUFFICIENT_REPLICAS),
            (DEGRADED, "False", reason::HEALTHY),
        ] {
            assert_eq!(event_for(&c(t, st, r), None), None, "{t} {r}");
        }
        assert_eq!(
            event_for(&c(READY, "True", reason::MINIMUM_REPLICAS_AVAILABLE), None),
            Some(false)
        );
        // Problems warn whatever came before; losing Ready warns; a rollout does not.
        assert_eq!(
            event_for(&c(MODEL_LOADED, "False", reason::ACCESS_DENIED), None),
            Some(true)
        );
        assert_eq!(
            event_for(&c(SCHEDULED, "False", reason::UNSCHEDULABLE), None),
            Some(true)
        );
        let was_ready = c(READY, "True", reason::MINIMUM_REPLICAS_AVAILABLE);
        assert_eq!(
            event_for(
                &c(READY, "False", reason::INSUFFICIENT_REPLICAS),
                Some(&was_ready)
            ),
            Some(true)
        );
        assert_eq!(
            event_for(&c(READY, "False", reason::ROLLOUT_IN_PROGRESS), Some(&was_ready)),
            None
        );
        // Nor does a new model on its way in a rollout, while the old pods serve.
        let was_loaded = c(MODEL_LOADED, "True", reason::LOADED);
        for r in [reason::NO_PODS, reason::DOWNLOADING, reason::LOADING] {
            assert_eq!(
                event_for(&c(MODEL_LOADED, "Unknown", r), Some(&was_loaded)),
                None,
                "{r}"
            );
        }
        // A new pod waiting for the scheduler (start-up, scale-up) is on the way, not a loss: the
        // e2e healthy start once warned "Scheduled is Unknown: 1/2 pods bound to nodes" when the
        // second replica appeared after the first was bound. Unschedulable still warns.
        let was_scheduled = c(SCHEDULED, "True", reason::ALL_PODS_SCHEDULED);
        assert_eq!(
            event_for(&c(SCHEDULED, "Unknown", reason::PENDING), Some(&was_scheduled)),
            None
        );
        // Recovering from Degraded is news.
        let was_degraded = c(DEGRADED, "True", reason::OOM_KILLED);
        assert_eq!(
            event_for(&c(DEGRADED, "False", reason::HEALTHY), Some(&was_degraded)),
            Some(false)
        );
    }

    fn pod(v: serde_json::Value) -> Pod {
        let mut base =
            json!({"metadata": {"name": "resnet-abc"}, "spec": {"containers": [{"name": "server"}]}});
        if let (Some(b), Some(o)) = (base.as_object_mut(), v.as_object()) {
            for (k, val) in o {
                b.insert(k.clone(), val.clone());
            }
        }
        serde_json::from_value(base).unwrap()
    }

    fn deployment(replicas: i32, ready: i32, updated: i32) -> Deployment {
        serde_json::from_value(json!({"metadata": {"name": "resnet", "generation": 2},
            "spec": {"selector": {}, "template": {}},
            "status": {"observedGeneration": 2, "replicas": replicas, "readyReplicas": ready, "updatedReplicas": updated}}))
        .unwrap()
    }

    /// The status of `spec()` observing `d` and `pods`, nothing probed.
    fn status_of(d: &Deployment, pods: &[Pod]) -> ModelDeploymentStatus {
        compute(
            &spec(),
            &Observed {
                deployment: Some(d),
                pods,
                probed: None,
                ..Default::default()
            },
            &now(),
        )
    }

    fn get<'a>(s: &'a ModelDeploymentStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    fn spec() -> ModelDeployment {
        md(json!({"model": {"uri": "s3://models/m.onnx"}, "replicas": 2}))
    }

    #[test]
    fn pending_unschedulable_pod_surfaces_the_scheduler_message() {
        let p = pod(
            json!({"status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/5 nodes are available: 3 Insufficient nvidia.com/gpu, 2 node(s) had untolerated taint."}]}}),
        );
        let d = deployment(1, 0, 1);
        let s = status_of(&d, &[p]);
        let c = get(&s, "Scheduled");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Unschedulable"));
        assert!(
            c.message.contains("3 Insufficient nvidia.com/gpu"),
            "{}",
            c.message
        );
        assert_eq!(get(&s, "Ready").status, "False");
    }

    /// A pod whose download init container is in `state`, after `last`.
    fn pulling(state: serde_json::Value, last: serde_json::Value) -> Pod {
        pod(
            json!({"spec": {"nodeName": "n1", "containers": [{"name": "server"}]}, "status": {"initContainerStatuses": [{"name": "model-pull", "image": "i", "imageID": "", "ready": false, "restartCount": 1,
            "state": state, "lastState": last}],
            "containerStatuses": [{"name": "server", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "PodInitializing"}}}]}}),
        )
    }

    fn failed(code: u8, message: &str) -> serde_json::Value {
        json!({"terminated": {"exitCode": code, "reason": "Error", "message": message}})
    }

    fn model_loaded_of(p: Pod) -> (String, String, String) {
        let d = deployment(1, 0, 1);
        let s = status_of(&d, &[p]);
        let c = get(&s, "ModelLoaded");
        (c.status.clone(), c.reason.clone(), c.message.clone())
    }

    #[test]
    fn every_pull_exit_code_becomes_its_model_loaded_reason_with_the_termination_message() {
        for (code, want, message) in [
            (
                exit::DOWNLOAD_FAILED,
                "DownloadFailed",
                "failed to download s3://models/m.onnx: connection reset (5 retries)",
            ),
            (
                exit::CHECKSUM_MISMATCH,
                "ChecksumMismatch",
                "checksum mismatch for s3://models/m.onnx: expected sha256 aaaa, got bbbb",
            ),
            (
                exit::NOT_FOUND,
                "ArtifactNotFound",
                "s3://models/m.onnx: no such object",
            ),
            (
                exit::ACCESS_DENIED,
                "AccessDenied",
                "s3://models/m.onnx: 403 Forbidden (InvalidAccessKeyId)",
            ),
            (
                exit::TOO_LARGE,
                "ArtifactTooLarge",
                "s3://models/m.onnx is 9000000000 bytes, more than --max-bytes 1000",
            ),
            (
                exit::ADDRESS_REFUSED,
                "AddressRefused",
                "models.example.com resolves to 169.254.169.254, a refused address",
            ),
            (
                exit::COMPRESSION_REJECTED,
                "CompressionRejected",
                "s3://models/m.onnx: compression rejected: cosine similarity 0.98 to the original is under the required 0.999 (mode int8-dynamic, size ratio 0.27, inputs: 4 random samples)",
            ),
            (
                exit::COMPRESSION_FAILED,
                "CompressionFailed",
                "failed to compress s3://models/m.onnx: node \"loop\" (op Loop): fp16 does not convert models with control flow (subgraphs)",
            ),
        ] {
            // Failed just now, and waiting in back-off after that failure: both are current.
            for p in [
                pulling(failed(code, &format!("{message}\n")), json!({})),
                pulling(
                    json!({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}}),
                    failed(code, message),
                ),
                pulling(
                    json!({"waiting": {"reason": "PodInitializing"}}),
                    failed(code, message),
                ),
            ] {
                let (status, reason, shown) = model_loaded_of(p);
                assert_eq!((status.as_str(), reason.as_str()), ("False", want), "exit {code}");
                assert_eq!(shown, format!("pod resnet-abc: {message}"), "exit {code}");
            }
        }
    }

    #[test]
    fn an_exit_code_outside_the_contract_is_a_download_failure_named_by_its_code() {
        let killed = json!({"terminated": {"exitCode": 137, "reason": "OOMKilled"}});
        let (status, reason, shown) = model_loaded_of(pulling(killed, json!({})));
        assert_eq!((status.as_str(), reason.as_str()), ("False", "DownloadFailed"));
        assert_eq!(
            shown,
            "pod resnet-abc: model-pull exited with code 137 (OOMKilled)"
        );
    }

    #[test]
    fn a_retry_in_progress_is_downloading_not_the_old_failure() {
        let running = json!({"running": {"startedAt": "2026-01-01T00:00:00Z"}});
        let (status, reason, _) =
            model_loaded_of(pulling(running, failed(exit::ACCESS_DENIED, "403 Forbidden")));
        assert_eq!((status.as_str(), reason.as_str()), ("Unknown", "Downloading"));
    }

    #[test]
    fn a_failed_download_also_reports_the_crash_loop_as_degraded() {
        let p = pulling(
            json!({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}}),
            failed(
                exit::DOWNLOAD_FAILED,
                "failed to download s3://models/m.onnx: 403 Forbidden",
            ),
        );
        let d = deployment(1, 0, 1);
        let s = status_of(&d, &[p]);
        assert_eq!(get(&s, "Degraded").reason, "CrashLoopBackOff");
        assert!(get(&s, "ModelLoaded").message.contains("403 Forbidden"));
    }

    #[test]
    fn crash_loop_and_oom_killed_mark_degraded_with_the_container_message() {
        let crash = pod(
            json!({"status": {"containerStatuses": [{"name": "server", "image": "i", "imageID": "", "ready": false, "restartCount": 4,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
            "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}}),
        );
        let d = deployment(1, 0, 1);
        let s = status_of(&d, std::slice::from_ref(&crash));
        let c = get(&s, "Degraded");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "CrashLoopBackOff")
        );
        assert!(c.message.contains("back-off 40s"));
        let oom = pod(
            json!({"status": {"containerStatuses": [{"name": "server", "image": "i", "imageID": "", "ready": true, "restartCount": 1, "started": true,
            "state": {"running": {}}, "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}}),
        );
        let s = status_of(&d, &[oom]);
        assert_eq!(get(&s, "Degraded").reason, "OOMKilled");
        let pull = pod(
            json!({"status": {"containerStatuses": [{"name": "server", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"kubemaas/server:nope\""}}}]}}),
        );
        let s = status_of(&d, &[pull]);
        let c = get(&s, "Degraded");
        assert_eq!(c.reason, "ImagePullBackOff");
        assert!(c.message.contains("kubemaas/server:nope"));
    }

    #[test]
    fn an_old_termination_of_a_container_that_serves_again_is_history() {
        let d = deployment(1, 1, 1);
        let at = |minutes_ago: i64| {
            let t = now().0 - k8s_openapi::jiff::SignedDuration::from_mins(minutes_ago);
            t.to_string()
        };
        let serving_after = |last: serde_json::Value| {
            pod(
                json!({"status": {"containerStatuses": [{"name": "server", "image": "i", "imageID": "", "ready": true,
                "restartCount": 1, "started": true, "state": {"running": {}}, "lastState": {"terminated": last}}]}}),
            )
        };
        let of = |p: Pod| {
            let s = status_of(&d, &[p]);
            (
                get(&s, "Degraded").reason.clone(),
                get(&s, "ModelLoaded").reason.clone(),
            )
        };
        let oom = |ago| json!({"exitCode": 137, "reason": "OOMKilled", "finishedAt": at(ago)});
        assert_eq!(of(serving_after(oom(120))), ("Healthy".into(), "Loaded".into()));
        assert_eq!(
            of(serving_after(oom(2))).0,
            "OOMKilled",
            "a restart 2 minutes ago is news"
        );
        let load = |ago| json!({"exitCode": i32::from(exit::LOAD_FAILED), "reason": "Error", "finishedAt": at(ago), "message": "bad model"});
        assert_eq!(of(serving_after(load(120))).1, "Loaded");
        // A load that failed 2 minutes ago and succeeded on the restart: the model is loaded
        // and the pod is Ready; ModelLoaded=False beside Ready=True told two stories.
        assert_eq!(of(serving_after(load(2))).1, "Loaded");
        // Loading again after it (running, not started): the last attempt's failure is news.
        let retrying = pod(
            json!({"status": {"containerStatuses": [{"name": "server", "image": "i", "imageID": "",
            "ready": false, "restartCount": 1, "started": false, "state": {"running": {}},
            "lastState": {"terminated": load(2)}}]}}),
        );
        assert_eq!(of(retrying).1, "LoadFailed");
    }

    #[test]
    fn pods_the_deployment_cannot_create_are_named_with_the_apiservers_words() {
        // A misspelt serviceAccountName or priorityClassName, or a ResourceQuota: the ReplicaSet
        // cannot create pods, and only the Deployment's ReplicaFailure condition says why.
        let mut d = deployment(0, 0, 0);
        let words = "pods \"resnet-7d9-\" is forbidden: error looking up service account default/typo: serviceaccount \"typo\" not found";
        if let Some(st) = d.status.as_mut() {
            st.conditions = Some(vec![
                serde_json::from_value(json!({"type": "ReplicaFailure", "status": "True",
                    "reason": "FailedCreate", "message": words}))
                .unwrap(),
            ]);
        }
        let s = status_of(&d, &[]);
        let degraded = get(&s, "Degraded");
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "PodsNotCreated")
        );
        assert!(
            degraded.message.contains("serviceaccount \"typo\" not found"),
            "{}",
            degraded.message
        );
        let ready = get(&s, "Ready");
        assert_eq!(ready.reason, "RolloutStuck");
        assert!(
            ready.message.contains("serviceaccount \"typo\" not found"),
            "{}",
            ready.message
        );
        assert!(
            get(&s, "Scheduled").message.contains("cannot create pods"),
            "{}",
            get(&s, "Scheduled").message
        );
    }

    #[test]
    fn partial_readiness_is_not_ready_but_model_loaded() {
        let ok = pod(
            json!({"spec": {"nodeName": "n1", "containers": [{"name": "server"}]}, "status": {"containerStatuses": [{"name": "server", "image": "i", "imageID": "", "ready": true, "restartCount": 0, "started": true, "state": {"running": {}}}]}}),
        );
        let d = deployment(2, 1, 2);
        let s = status_of(&d, &[ok.clone(), ok]);
        assert_eq!(get(&s, "Ready").reason, "InsufficientReplicas");
        assert_eq!(get(&s, "Ready").message, "1/2 replicas ready");
        assert_eq!(get(&s, "ModelLoaded").status, "True");
        assert_eq!((s.replicas, s.ready_replicas), (2, 1));
    }

    /// A pod of the pod template whose hash is `hash`, Ready or still downloading its model.
    fn of_template(name: &str, hash: &str, ready: bool) -> Pod {
        let (init, server) = if ready {
            (
                json!({"terminated": {"exitCode": 0, "reason": "Completed"}}),
                json!({"running": {}}),
            )
        } else {
            (
                json!({"running": {}}),
                json!({"waiting": {"reason": "PodInitializing"}}),
            )
        };
        pod(
            json!({"metadata": {"name": name, "annotations": {labels::TEMPLATE_HASH: hash}},
            "spec": {"nodeName": "n1", "containers": [{"name": "server"}]},
            "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
                "initContainerStatuses": [{"name": "model-pull", "image": "i", "imageID": "", "ready": ready, "restartCount": 0, "state": init}],
                "containerStatuses": [{"name": "server", "image": "i", "imageID": "", "ready": ready, "restartCount": 0, "started": ready, "state": server}]}}),
        )
    }

    /// A Deployment rolling out the template whose hash is `hash`.
    fn rolling_out(hash: &str, replicas: i32, ready: i32, updated: i32) -> Deployment {
        let mut d = deployment(replicas, ready, updated);
        d.spec.template.metadata = Some(ObjectMeta {
            annotations: Some([(labels::TEMPLATE_HASH.to_string(), hash.to_string())].into()),
            ..ObjectMeta::default()
        });
        d
    }

    #[test]
    fn a_scale_the_deployment_controller_has_not_observed_yet_is_not_a_rollout() {
        // The autoscaler (or an HPA) changed spec.replicas: the generation moved and
        // observedGeneration lags a moment, but every pod runs the current template. Ready went
        // False RolloutInProgress for that moment (seen in the e2e autoscaling test).
        let mut d = rolling_out("cur", 2, 2, 2);
        d.metadata.generation = Some(3);
        let pods = [of_template("a", "cur", true), of_template("b", "cur", true)];
        let c = get(&status_of(&d, &pods), "Ready").clone();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "MinimumReplicasAvailable"),
            "{}",
            c.message
        );
        // A pod of another template: the lag may hide a template change, so it is a rollout.
        let pods = [of_template("a", "cur", true), of_template("b", "old", true)];
        let c = get(&status_of(&d, &pods), "Ready").clone();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "RolloutInProgress"),
            "{}",
            c.message
        );
    }

    #[test]
    fn pods_whose_containers_never_started_are_looked_into_after_a_while() {
        let at = |secs: i64| Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + secs).unwrap());
        let stuck = |name: &str, reason: &str| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": name, "uid": format!("uid-{name}"),
                "creationTimestamp": "2027-01-15T08:00:00Z"},
                "status": {"phase": "Pending",
                    "initContainerStatuses": [{"name": "pull", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                        "state": {"waiting": {"reason": "PodInitializing"}}}],
                    "containerStatuses": [{"name": "server", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                        "state": {"waiting": {"reason": reason}}}]}}))
            .unwrap()
        };
        // 2027-01-15T08:00:00Z is 1_800_000_000 s after the epoch.
        let pods = [stuck("a", "PodInitializing"), stuck("b", "CrashLoopBackOff")];
        let a = vec![("a".to_string(), "uid-a".to_string())];
        assert!(
            not_started(&pods, &at(2), NOT_STARTED_AFTER).is_empty(),
            "too young to tell"
        );
        assert_eq!(not_started(&pods, &at(2), std::time::Duration::ZERO), a);
        assert_eq!(not_started(&pods, &at(6), NOT_STARTED_AFTER), a);
        // What the kubelet said becomes Degraded, a problem worth a Warning.
        let d = deployment(1, 0, 1);
        let observed = Observed {
            deployment: Some(&d),
            pods: &pods[..1],
            mount_failures: vec![(
                "a".into(),
                "MountVolume.SetUp failed for volume \"credentials\" : secret \"nope\" not found".into(),
            )],
            ..Default::default()
        };
        let s = compute(&spec(), &observed, &now());
        let c = get(&s, "Degraded");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "VolumeMountFailed")
        );
        assert_eq!(
            c.message,
            "pod a: MountVolume.SetUp failed for volume \"credentials\" : secret \"nope\" not found"
        );
        assert_eq!(event_for(c, None), Some(true));
    }

    #[test]
    fn a_deployment_past_its_progress_deadline_says_so_even_with_too_few_pods_ready() {
        // Pods that never get ready (a model that loads forever, a probe that never passes): the
        // Deployment gives up after progressDeadlineSeconds, and that is the news, not the count.
        let mut d = deployment(2, 0, 2);
        if let Some(st) = d.status.as_mut() {
            st.conditions = Some(vec![
                serde_json::from_value(json!({"type": "Progressing", "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": "ReplicaSet \"resnet-5d9c\" has timed out progressing."}))
                .unwrap(),
            ]);
        }
        let s = status_of(&d, &[]);
        let c = get(&s, "Ready");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "RolloutStuck"),
            "{}",
            c.message
        );
        assert!(
            c.message.contains("has timed out progressing") && c.message.contains("0/2 replicas ready"),
            "{}",
            c.message
        );
    }

    #[test]
    fn scaled_to_zero_is_not_ready_and_says_so_without_a_warning() {
        // `kubectl scale --replicas=0` parks a model: nothing answers, so Ready must not be True
        // (kubectl wait and GitOps health would pass with no pod serving).
        let m = md(json!({"model": {"uri": "s3://models/m.onnx"}, "replicas": 0}));
        let d = deployment(0, 0, 0);
        let observed = Observed {
            deployment: Some(&d),
            pods: &[],
            probed: None,
            ..Default::default()
        };
        let s = compute(&m, &observed, &now());
        let c = get(&s, "Ready");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "ScaledToZero"),
            "{}",
            c.message
        );
        assert!(c.message.contains("--replicas"), "{}", c.message);
        // No pod holds the model, and none is coming: not "no pods of the current template
        // yet" (Unknown), which reads as pods on their way.
        let c = get(&s, "ModelLoaded");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "ScaledToZero"),
            "{}",
            c.message
        );
        assert_eq!(event_for(c, None), None, "no Event for a parked model");
        // Parking a model that served is a choice, not a problem: no Warning Event.
        let serving = deployment(2, 2, 2);
        let before = status_of(&serving, &[]);
        let before = get(&before, "Ready");
        assert_eq!(before.status, "True");
        assert_eq!(event_for(c, Some(before)), None);
    }

    #[test]
    fn a_model_report_kept_from_earlier_keeps_the_name_it_was_served_under() {
        // The pods served `a`; the spec now names `b` and no pod answered yet: the report kept
        // describes `a`, which is what is served (`/v2/models/a`), not `b` with `a`'s tensors.
        let mut m = md(json!({"model": {"uri": "s3://models/m.onnx", "name": "b"}, "replicas": 1}));
        m.status = Some(ModelDeploymentStatus {
            model: Some(ModelStatus {
                name: "a".into(),
                version: "1".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        let d = deployment(1, 1, 1);
        let observed = Observed {
            deployment: Some(&d),
            pods: &[],
            probed: None,
            ..Default::default()
        };
        let s = compute(&m, &observed, &now());
        assert_eq!(s.model.map(|r| r.name).as_deref(), Some("a"));
    }

    #[test]
    fn model_loaded_speaks_of_the_current_template_not_of_pods_left_from_the_previous_one() {
        // The model changed: two pods of the old template serve the old model, the first pod of
        // the new template is still downloading the new one.
        let old = [
            of_template("ranker-old-1", "old", true),
            of_template("ranker-old-2", "old", true),
        ];
        let mut pods = old.to_vec();
        pods.push(of_template("ranker-new-1", "new", false));
        let d = rolling_out("new", 3, 2, 1);
        let observe = |pods: &[Pod]| status_of(&d, pods);
        let s = observe(&pods);
        let c = get(&s, "ModelLoaded");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("Unknown", "Downloading"),
            "{}",
            c.message
        );
        assert!(
            c.message.contains("2 pods of the previous template still serve"),
            "{}",
            c.message
        );
        // The first new pod is ready: loaded, in 1 of the new template's pods.
        pods[2] = of_template("ranker-new-1", "new", true);
        let c = get(&observe(&pods), "ModelLoaded").clone();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Loaded"));
        assert!(
            c.message.starts_with("model loaded in 1 ready pod"),
            "{}",
            c.message
        );
        // A pull failure of a pod of the previous template is history: the new one loaded.
        pods[0] = pulling(failed(exit::NOT_FOUND, "404 for s3://models/m.onnx"), json!({}));
        let c = get(&observe(&pods), "ModelLoaded").clone();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "Loaded"),
            "{}",
            c.message
        );
        // Only pods of the current template are asked what they serve.
        let names: Vec<String> = current_pods(Some(&d), &pods)
            .iter()
            .map(|p| p.name_any())
            .collect();
        assert_eq!(names, ["ranker-new-1"]);
        // A Deployment written before templates carried their hash: every pod is current.
        assert_eq!(current_pods(Some(&deployment(3, 2, 1)), &pods).len(), 3);
    }

    #[test]
    fn a_rollout_that_cannot_schedule_or_passed_its_deadline_is_stuck_with_the_reason() {
        // spec() wants 2: both old pods ready, the surge pod of the new template cannot schedule.
        let mut d = deployment(3, 2, 1);
        d.status.as_mut().unwrap().ready_replicas = Some(2);
        let surge = pod(
            json!({"status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
            "reason": "Unschedulable", "message": "0/6 nodes are available: 2 Insufficient nvidia.com/gpu."}]}}),
        );
        let observed = |d, pods| Observed {
            deployment: Some(d),
            pods,
            probed: None,
            ..Default::default()
        };
        let s = compute(&spec(), &observed(&d, std::slice::from_ref(&surge)), &now());
        let r = get(&s, "Ready");
        assert_eq!((r.status.as_str(), r.reason.as_str()), ("False", "RolloutStuck"));
        assert!(r.message.contains("Insufficient nvidia.com/gpu"), "{}", r.message);
        let mut gave_up = deployment(3, 2, 1);
        gave_up.status.as_mut().unwrap().ready_replicas = Some(2);
        gave_up.status.as_mut().unwrap().conditions = Some(vec![serde_json::from_value(json!({"type": "Progressing",
            "status": "False", "reason": "ProgressDeadlineExceeded", "message": "ReplicaSet \"resnet-1\" has timed out progressing."})).unwrap()]);
        let s = compute(&spec(), &observed(&gave_up, &[]), &now());
        assert_eq!(get(&s, "Ready").reason, "RolloutStuck");
        assert!(get(&s, "Ready").message.contains("timed out progressing"));
        assert_eq!(
            event_for(get(&s, "Ready"), None),
            Some(true),
            "a stuck rollout warns"
        );
    }

    #[test]
    fn rollout_in_progress_is_not_ready_until_updated() {
        let mut d = deployment(3, 2, 1);
        d.status.as_mut().unwrap().ready_replicas = Some(3);
        let s = status_of(&d, &[]);
        assert_eq!(get(&s, "Ready").reason, "RolloutInProgress");
        let mut stale = deployment(2, 2, 2);
        stale.metadata.generation = Some(3);
        let s = status_of(&stale, &[]);
        assert_eq!(get(&s, "Ready").reason, "RolloutInProgress");
    }

    #[test]
    fn ready_when_enough_replicas_and_rolled_out_and_transition_time_is_kept() {
        let ok = pod(
            json!({"spec": {"nodeName": "n1", "containers": [{"name": "server"}]}, "status": {"containerStatuses": [{"name": "server", "image": "i", "imageID": "", "ready": true, "restartCount": 0, "started": true, "state": {"running": {}}}]}}),
        );
        let d = deployment(2, 2, 2);
        let mut m = spec();
        let s1 = compute(
            &m,
            &Observed {
                deployment: Some(&d),
                pods: &[ok.clone(), ok.clone()],
                probed: None,
                ..Default::default()
            },
            &now(),
        );
        let r = get(&s1, "Ready");
        assert_eq!((r.status.as_str(), r.observed_generation), ("True", Some(3)));
        assert_eq!(
            s1.selector.as_deref(),
            Some("app.kubernetes.io/name=kubemaas-server,kubemaas.io/model-deployment=resnet")
        );
        assert_eq!(s1.endpoints.as_ref().unwrap().rest, "http://resnet.ml.svc:8080");
        m.status = Some(s1.clone());
        let later = Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_500).unwrap());
        let s2 = compute(
            &m,
            &Observed {
                deployment: Some(&d),
                pods: &[ok.clone(), ok],
                probed: None,
                ..Default::default()
            },
            &later,
        );
        assert_eq!(
            s1, s2,
            "an unchanged world yields an identical status (so nothing is patched)"
        );
        assert!(changed_conditions(m.status.as_ref(), &s2).is_empty());
    }

    #[test]
    fn a_pod_being_deleted_says_nothing_of_the_model_or_the_rollout() {
        // A scale-down: the removed pod (restarted once, long ago) was stopped by SIGTERM and
        // has not started since. Counted, it read as a startup-probe kill (ModelLoaded=False,
        // StartupTimeout, a Warning) while the other pod served.
        let serving = pod(json!({"metadata": {"name": "resnet-a"},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "server", "image": "i", "imageID": "", "ready": true,
                "restartCount": 0, "started": true, "state": {"running": {}}}]}}));
        let leaving = pod(
            json!({"metadata": {"name": "resnet-b", "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"phase": "Running", "containerStatuses": [{"name": "server", "image": "i", "imageID": "",
                "ready": false, "restartCount": 1, "started": false,
                "state": {"terminated": {"exitCode": 143, "reason": "Error"}}}]}}),
        );
        let d = deployment(1, 1, 1);
        let s = status_of(&d, &[serving, leaving]);
        let c = get(&s, "ModelLoaded");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "Loaded"),
            "{}",
            c.message
        );
        assert_eq!(c.message, "model loaded in 1 ready pod");
        assert_eq!(
            get(&s, "Degraded").status,
            "False",
            "{}",
            get(&s, "Degraded").message
        );
    }

    #[test]
    fn a_server_stopped_after_it_had_loaded_is_a_restart_not_a_startup_timeout() {
        // A liveness-probe kill of a server that served for hours: the restarted container is
        // loading again (not started), and the run before ended by SIGTERM with exit 0, as a
        // startup-probe kill does. Its termination message tells them apart.
        let ago = (now().0 - k8s_openapi::jiff::SignedDuration::from_mins(1)).to_string();
        let words = format!(
            "{} (7200 s after it started)",
            kubemaas_crds::artifact::STOPPED_AFTER_LOADING
        );
        let p = pod(
            json!({"status": {"containerStatuses": [{"name": "server", "image": "i", "imageID": "",
            "ready": false, "restartCount": 1, "started": false, "state": {"running": {}},
            "lastState": {"terminated": {"exitCode": 0, "reason": "Completed", "finishedAt": ago, "message": words}}}]}}),
        );
        let d = deployment(1, 0, 1);
        let s = status_of(&d, std::slice::from_ref(&p));
        let c = get(&s, "ModelLoaded");
        assert_eq!(c.reason, "Loading", "{}", c.message);
        let c = get(&s, "Degraded");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "ServerRestarted"),
            "{}",
            c.message
        );
        assert!(c.message.contains("liveness"), "{}", c.message);
        // Stopped while loading (the startup probe's kill) is still a startup timeout.
        let mut loading = p;
        if let Some(cs) = loading
            .status
            .as_mut()
            .and_then(|st| st.container_statuses.as_mut())
        {
            cs[0].last_state = serde_json::from_value(json!({"terminated": {"exitCode": 0,
                "message": kubemaas_crds::artifact::STOPPED_WHILE_LOADING}}))
            .unwrap();
        }
        assert_eq!(
            get(&status_of(&d, &[loading]), "ModelLoaded").reason,
            "StartupTimeout"
        );
    }

    #[test]
    fn startup_probe_kills_before_ready_are_startup_timeout() {
        let p = pod(
            json!({"status": {"containerStatuses": [{"name": "server", "image": "i", "imageID": "", "ready": false, "restartCount": 2, "started": false,
            "state": {"running": {}}, "lastState": {"terminated": {"exitCode": 137, "reason": "Error"}}}]}}),
        );
        let d = deployment(1, 0, 1);
        let s = status_of(&d, &[p]);
        assert_eq!(get(&s, "ModelLoaded").reason, "StartupTimeout");
    }

    #[test]
    fn a_server_that_exits_with_an_error_before_ready_is_not_a_startup_timeout() {
        // A bad TLS certificate ends the server with exit 1 within seconds: not the startup budget.
        let p = pod(
            json!({"status": {"containerStatuses": [{"name": "server", "image": "i", "imageID": "", "ready": false, "restartCount": 4, "started": false,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
            "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": "Error: failed to read TLS certificate /tls/tls.crt: no PEM certificate"}}}]}}),
        );
        let d = deployment(1, 0, 1);
        let s = status_of(&d, &[p]);
        let c = get(&s, "ModelLoaded");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "ServerExited"),
            "{}",
            c.message
        );
        assert!(
            c.message.contains("exit code 1") && c.message.contains("no PEM certificate"),
            "{}",
            c.message
        );
        assert_eq!(event_for(c, None), Some(true), "a Warning Event");
    }

    #[test]
    fn a_container_that_cannot_be_created_marks_degraded_with_the_kubelets_message() {
        let p = pod(
            json!({"status": {"containerStatuses": [{"name": "server", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "CreateContainerConfigError", "message": "secret \"nope\" not found"}}}]}}),
        );
        let d = deployment(1, 0, 1);
        let s = status_of(&d, &[p]);
        let c = get(&s, "Degraded");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "ContainerNotCreated"),
            "{}",
            c.message
        );
        assert!(
            c.message.contains("CreateContainerConfigError")
                && c.message.contains("secret \"nope\" not found"),
            "{}",
            c.message
        );
        assert_eq!(event_for(c, None), Some(true), "a Warning Event");
    }

    #[test]
    fn probed_accelerator_and_model_are_reported_and_kept() {
        let d = deployment(1, 1, 1);
        let probed = Probed {
            accelerator: Some("CUDAExecutionProvider".into()),
            model: Some(ModelStatus {
                name: "x".into(),
                version: "1".into(),
                ..ModelStatus::default()
            }),
            ..Probed::default()
        };
        let mut m = spec();
        let s = compute(
            &m,
            &Observed {
                deployment: Some(&d),
                pods: &[],
                probed: Some(probed),
                ..Default::default()
            },
            &now(),
        );
        assert_eq!(s.accelerator.as_deref(), Some("CUDAExecutionProvider"));
        assert_eq!(s.model.as_ref().unwrap().name, "resnet");
        m.status = Some(s);
        let s = compute(
            &m,
            &Observed {
                deployment: Some(&d),
                pods: &[],
                probed: None,
                ..Default::default()
            },
            &now(),
        );
        assert_eq!(s.accelerator.as_deref(), Some("CUDAExecutionProvider"));
    }

    #[test]
    fn a_cuda_model_deployment_served_on_cpu_is_degraded_with_the_pods_words() {
        let d = deployment(1, 1, 1);
        let on_cpu = Probed {
            accelerator: Some("CPUExecutionProvider".into()),
            pod: "resnet-abc".into(),
            fallback: Some("libcudart.so.12: cannot open shared object file".into()),
            ..Probed::default()
        };
        let status_for = |accelerator: &str, p: &Probed| {
            let mut m = spec();
            m.spec.accelerator = serde_json::from_value(json!(accelerator)).unwrap();
            let s = compute(
                &m,
                &Observed {
                    deployment: Some(&d),
                    pods: &[],
                    probed: Some(p.clone()),
                    ..Default::default()
                },
                &now(),
            );
            get(&s, "Degraded").clone()
        };
        let c = status_for("cuda", &on_cpu);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "AcceleratorFallback")
        );
        assert!(
            c.message.contains("pod resnet-abc") && c.message.contains("libcudart.so.12"),
            "{}",
            c.message
        );
        assert_eq!(
            status_for("auto", &on_cpu).reason,
            "Healthy",
            "auto may run on CPU"
        );
        let on_gpu = Probed {
            accelerator: Some("CUDAExecutionProvider".into()),
            ..on_cpu.clone()
        };
        assert_eq!(status_for("cuda", &on_gpu).reason, "Healthy");
    }

    #[test]
    fn a_download_failure_that_a_retry_fixed_does_not_stick() {
        // The kubelet keeps the failed attempt in lastState after the retry completed.
        let recovered = |ready: bool| {
            pod(
                json!({"spec": {"nodeName": "n1", "containers": [{"name": "server"}]}, "status": {
                "initContainerStatuses": [{"name": "model-pull", "image": "i", "imageID": "", "ready": true, "restartCount": 1,
                    "state": {"terminated": {"exitCode": 0, "reason": "Completed"}},
                    "lastState": {"terminated": {"exitCode": 2, "reason": "Error", "message": "failed to download s3://models/m.onnx: connection reset"}}}],
                "containerStatuses": [{"name": "server", "image": "i", "imageID": "", "ready": ready, "restartCount": 0, "started": ready,
                    "state": {"running": {}}}]}}),
            )
        };
        let d = deployment(1, 0, 1);
        let s = status_of(&d, &[recovered(false)]);
        let c = get(&s, "ModelLoaded");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("Unknown", "Loading"),
            "{}",
            c.message
        );
        let d = deployment(1, 1, 1);
        let s = status_of(&d, &[recovered(true)]);
        let c = get(&s, "ModelLoaded");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "Loaded"),
            "{}",
            c.message
        );
    }

    #[test]
    fn status_model_reports_the_pulled_artifact_and_its_sha256() {
        let d = deployment(1, 1, 1);
        let artifact = ArtifactStatus {
            uri: "s3://models/m.onnx".into(),
            sha256: "c".repeat(64),
            bytes: 1234,
            files: 1,
            pulled_seconds: 0.5,
        };
        let probed = |artifact: Option<ArtifactStatus>| Probed {
            accelerator: Some("CPUExecutionProvider".into()),
            model: Some(ModelStatus {
                name: "resnet".into(),
                version: "1".into(),
                artifact,
                ..ModelStatus::default()
            }),
            ..Probed::default()
        };
        let observe = |m: &ModelDeployment, p: Probed| {
            compute(
                m,
                &Observed {
                    deployment: Some(&d),
                    pods: &[],
                    probed: Some(p),
                    ..Default::default()
                },
                &now(),
            )
        };
        let s = observe(&spec(), probed(Some(artifact.clone())));
        let model = s.model.unwrap();
        assert_eq!(model.artifact, Some(artifact.clone()));
        assert_eq!(model.sha256, Some("c".repeat(64)), "unpinned: what was pulled");
        let pinned = md(json!({"model": {"uri": "s3://models/m.onnx", "sha256": "a".repeat(64)}}));
        let s = observe(&pinned, probed(None));
        assert_eq!(
            s.model.unwrap().sha256,
            Some("a".repeat(64)),
            "a server without a pull record: the pinned digest, which pull verified"
        );
    }
}

#[cfg(test)]
mod unapplied_tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use serde_json::json;

    use super::super::build::tests::md;
    use super::*;

    /// While a spec is unapplied, what compares the pods with it is not judged against it: the
    /// pods run the last spec applied.
    #[test]
    fn an_unapplied_spec_is_not_held_against_the_pods_of_the_last_one() {
        let now = Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap());
        // Asked now: 5 replicas, TLS, CUDA. Running: 2 CPU pods serving plain HTTP.
        let mut m = md(
            json!({"model": {"uri": "s3://models/m.onnx"}, "replicas": 5, "accelerator": "cuda",
            "tls": {"secretName": "t"}}),
        );
        let d: Deployment = serde_json::from_value(json!({"metadata": {"name": "resnet", "generation": 1},
            "spec": {"replicas": 2, "selector": {}, "template": {}},
            "status": {"observedGeneration": 1, "replicas": 2, "readyReplicas": 2, "updatedReplicas": 2}}))
        .unwrap();
        let fallback = Condition {
            type_: conditions::DEGRADED.into(),
            status: "True".into(),
            reason: reason::ACCELERATOR_FALLBACK.into(),
            message: "pod a runs on CPUExecutionProvider although accelerator is cuda: no GPU".into(),
            last_transition_time: now.clone(),
            observed_generation: Some(1),
        };
        m.status = Some(ModelDeploymentStatus {
            conditions: vec![fallback],
            endpoints: Some(Endpoints {
                rest: "http://resnet.default.svc:8080".into(),
                grpc: "resnet.default.svc:8081".into(),
            }),
            ..Default::default()
        });
        let of = |unapplied| {
            compute(
                &m,
                &Observed {
                    deployment: Some(&d),
                    unapplied,
                    ..Default::default()
                },
                &now,
            )
        };
        let s = of(true);
        let get =
            |s: &ModelDeploymentStatus, t: &str| s.conditions.iter().find(|c| c.type_ == t).cloned().unwrap();
        assert_eq!(
            s.endpoints.as_ref().map(|e| e.rest.as_str()),
            Some("http://resnet.default.svc:8080")
        );
        // Found on these pods before, and nothing asked them since.
        assert_eq!(get(&s, "Degraded").reason, reason::ACCELERATOR_FALLBACK);
        // 2 of the 2 the Deployment was asked for: not "2/5".
        assert_eq!(get(&s, "Ready").reason, reason::MINIMUM_REPLICAS_AVAILABLE);
        // Applied, the same observation reads against the spec.
        let s = of(false);
        assert!(
            s.endpoints
                .as_ref()
                .is_some_and(|e| e.rest.starts_with("https://"))
        );
        assert_ne!(get(&s, "Ready").reason, reason::MINIMUM_REPLICAS_AVAILABLE);
    }
}
