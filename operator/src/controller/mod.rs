//! The ModelDeployment controller: watches (by label) what it owns and reconciles
//! validate → build → apply → status.

pub mod apply;
pub mod autoscale;
pub mod build;
pub mod drift;
pub mod probe;
pub mod reconcile;
pub mod scrape;
pub mod status;
pub mod validate;

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use kubemaas_crds::v1alpha1::ModelDeployment;
use serde::de::DeserializeOwned;

use crate::metrics::Metrics;

/// How often a reconcile dropped because its object was not in the cache is retried (a second
/// apart) before the object is taken as deleted.
const MISSING_RETRIES: u32 = 10;

/// The ModelDeployment an erased reference (as the controller's errors carry it) names.
fn model_deployment_ref(erased: &ObjectRef<kube::core::DynamicObject>) -> ObjectRef<ModelDeployment> {
    let mut obj = ObjectRef::new(&erased.name);
    obj.namespace = erased.namespace.clone();
    obj
}

/// Per ModelDeployment, the reconciles dropped in a row because it was not in the cache.
#[derive(Default)]
struct Missing(std::sync::Mutex<std::collections::HashMap<ObjectRef<ModelDeployment>, u32>>);

impl Missing {
    /// One more drop of `obj`: whether to retry it. After [`MISSING_RETRIES`] in a row it is taken
    /// as deleted and forgotten (and so is everything, should the lock be poisoned).
    fn dropped(&self, obj: &ObjectRef<ModelDeployment>) -> bool {
        let Ok(mut m) = self.0.lock() else {
            return false;
        };
        let tries = m.entry(obj.clone()).or_insert(0);
        *tries += 1;
        if *tries > MISSING_RETRIES {
            m.remove(obj);
            return false;
        }
        true
    }

    /// `obj` was found (reconciled, or failed in the reconciler): its count starts again.
    fn found(&self, obj: &ObjectRef<ModelDeployment>) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(obj);
        }
    }

    /// How many objects are being retried.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().map_or(0, |m| m.len())
    }
}

/// Reconcile errors. Each maps to a metric label and an Event reason.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Server-side apply of a child failed.
    #[error("failed to apply {kind} {name}: {source}")]
    Apply {
        /// Child kind.
        kind: String,
        /// Child name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Deleting an unwanted child failed.
    #[error("failed to delete {kind} {name}: {source}")]
    Delete {
        /// Child kind.
        kind: String,
        /// Child name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Patching the status failed.
    #[error("failed to patch status of ModelDeployment {name}: {source}")]
    Status {
        /// ModelDeployment name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// A namespaced object came without a namespace.
    #[error("failed to reconcile: the object has no namespace")]
    MissingNamespace,
}

impl Error {
    /// Short PascalCase label for metrics and Event reasons.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Apply { .. } => "ApplyFailed",
            Error::Delete { .. } => "DeleteFailed",
            Error::Status { .. } => "StatusPatchFailed",
            Error::MissingNamespace => "MissingNamespace",
        }
    }
}

impl Error {
    /// Whether a retry soon is likely to succeed: a conflict (someone wrote first), throttling,
    /// a server error or a connection problem, as opposed to a refusal (quota, RBAC, validation).
    pub fn is_transient(&self) -> bool {
        let source = match self {
            Error::Apply { source, .. } | Error::Delete { source, .. } | Error::Status { source, .. } => {
                source
            }
            Error::MissingNamespace => return false,
        };
        transient(source)
    }
}

/// Whether an apiserver error is worth an immediate retry: a conflict, throttling, a server error,
/// or no answer at all.
fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code == 409 || s.code == 429 || s.code >= 500,
        _ => true,
    }
}

/// Attempts one write gets before the reconcile fails (and is retried with backoff).
const ATTEMPTS: u32 = 6;

/// Runs `call` again on transient errors, up to [`ATTEMPTS`] times, 25 ms doubling between tries:
/// client-go's `RetryOnConflict`, extended to 5xx. Each retry is counted in
/// `kubemaas_operator_api_retries_total`.
pub async fn retrying<T, F, Fut>(mut call: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let mut delay = std::time::Duration::from_millis(25);
    for _ in 1..ATTEMPTS {
        match call().await {
            Err(e) if transient(&e) => {
                tracing::debug!(error = %e, retry_in = ?delay, "transient apiserver error");
                crate::metrics::API_RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            done => return done,
        }
    }
    call().await
}

/// A reconcile error as a status message: the apiserver's own words (e.g. `exceeded quota: …`)
/// rather than the client's wrapping of them.
pub fn status_message(e: &Error) -> String {
    let words = |source: &kube::Error| match source {
        kube::Error::Api(status) if !status.message.is_empty() => status.message.clone(),
        other => other.to_string(),
    };
    match e {
        Error::Apply { kind, name, source } => format!("failed to apply {kind} {name}: {}", words(source)),
        Error::Delete { kind, name, source } => format!("failed to delete {kind} {name}: {}", words(source)),
        other => other.to_string(),
    }
}

/// Caches of the children, filled by label-selected watches.
#[derive(Clone)]
pub struct Stores {
    /// Deployments.
    pub deployments: Store<Deployment>,
    /// Services.
    pub services: Store<Service>,
    /// HPAs.
    pub hpas: Store<HorizontalPodAutoscaler>,
    /// PDBs.
    pub pdbs: Store<PodDisruptionBudget>,
    /// NetworkPolicies.
    pub network_policies: Store<NetworkPolicy>,
    /// Pods.
    pub pods: Store<Pod>,
    /// True once every cache above has seen its first full list.
    ready: tokio::sync::watch::Receiver<bool>,
}

impl Stores {
    /// Bundles the caches and starts the one task that waits for them to fill.
    ///
    /// A store's `wait_until_ready` wakes only its most recent waiter (it keeps one waker), so
    /// reconciles that waited on it directly slept out their whole timeout after a restart or a
    /// leader change; a watch channel wakes every waiter.
    pub fn new(
        deployments: Store<Deployment>,
        services: Store<Service>,
        hpas: Store<HorizontalPodAutoscaler>,
        pdbs: Store<PodDisruptionBudget>,
        network_policies: Store<NetworkPolicy>,
        pods: Store<Pod>,
    ) -> Stores {
        let (tx, ready) = tokio::sync::watch::channel(false);
        let (d, s, h, p, n, o) = (
            deployments.clone(),
            services.clone(),
            hpas.clone(),
            pdbs.clone(),
            network_policies.clone(),
            pods.clone(),
        );
        tokio::spawn(async move {
            let _ = d.wait_until_ready().await;
            let _ = s.wait_until_ready().await;
            let _ = h.wait_until_ready().await;
            let _ = p.wait_until_ready().await;
            let _ = n.wait_until_ready().await;
            let _ = o.wait_until_ready().await;
            let _ = tx.send(true);
        });
        Stores {
            deployments,
            services,
            hpas,
            pdbs,
            network_policies,
            pods,
            ready,
        }
    }

    /// Waits until every cache is filled, at most `limit`: before that every child would look
    /// missing and be re-applied. Returns whether they are.
    pub async fn wait_until_ready(&self, limit: std::time::Duration) -> bool {
        let mut ready = self.ready.clone();
        matches!(
            tokio::time::timeout(limit, ready.wait_for(|r| *r)).await,
            Ok(Ok(_))
        )
    }
}

/// Shared state of every reconcile.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Builder settings.
    pub build: build::BuildConfig,
    /// Child caches.
    pub stores: Stores,
    /// Event recorder.
    pub recorder: Recorder,
    /// Operator metrics.
    pub metrics: Arc<Metrics>,
    /// Pod metadata prober.
    pub prober: probe::Prober,
    /// Serving pods' metrics, scraped on an interval.
    pub scraper: Arc<scrape::Scraper>,
    /// Periodic resync of every ModelDeployment.
    pub resync: std::time::Duration,
    /// Consecutive failures per object (`namespace/name`), for exponential backoff.
    pub failures: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

/// Where to watch.
#[derive(Debug, Clone)]
pub struct Scope {
    /// One namespace, or all when None.
    pub namespace: Option<String>,
}

fn api<K>(client: &Client, scope: &Scope) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    match &scope.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// What the caches drop from every object before keeping it: at 1,000 ModelDeployments the
/// operator holds about 6,000 objects, and much of each is bookkeeping nothing here reads.
pub mod trim {
    use k8s_openapi::api::core::v1::{Pod, PodSpec};
    use kube::{Resource, ResourceExt};

    /// `kubectl apply`'s copy of the whole object, kept in an annotation.
    const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

    /// Drops `managedFields` (often larger than the spec) and `kubectl apply`'s last-applied copy.
    pub fn meta<K: Resource>(o: &mut K) {
        o.meta_mut().managed_fields = None;
        if let Some(a) = o.meta_mut().annotations.as_mut() {
            a.remove(LAST_APPLIED);
        }
    }

    /// Pods: status reads only their metadata name and labels, the template they were made from,
    /// the node they are bound to, and their status; the spec (containers, volumes, env) and the
    /// other annotations are dropped.
    pub fn pod(p: &mut Pod) {
        meta(p);
        p.annotations_mut()
            .retain(|k, _| k == super::build::labels::TEMPLATE_HASH);
        p.meta_mut().owner_references = None;
        let node_name = p.spec.as_ref().and_then(|s| s.node_name.clone());
        p.spec = Some(PodSpec {
            node_name,
            ..PodSpec::default()
        });
    }
}

/// Maps a child to its ModelDeployment through the `kubemaas.io/model-deployment` label.
fn owner_of<K: Resource>(obj: K) -> Option<ObjectRef<ModelDeployment>> {
    let name = obj.labels().get(build::labels::MODEL_DEPLOYMENT)?.clone();
    Some(ObjectRef::new(&name).within(&obj.namespace()?))
}

/// How the controller paces itself.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// Periodic resync of every ModelDeployment.
    pub resync: std::time::Duration,
    /// ModelDeployments reconciled at once.
    pub concurrency: u16,
    /// Time between scrapes of the serving pods' metrics.
    pub metrics_interval: std::time::Duration,
}

/// Who publishes the operator's Events: the controller name and, in a pod, the pod's name.
pub fn reporter() -> Reporter {
    Reporter {
        controller: "kubemaas-operator".into(),
        instance: std::env::var("POD_NAME").ok(),
    }
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    scope: Scope,
    build: build::BuildConfig,
    metrics: Arc<Metrics>,
    tuning: Tuning,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    // Only what carries our label is watched, so memory stays flat however many unrelated objects
    // the cluster holds.
    let owned = watcher::Config::default().labels(build::labels::MANAGED_SELECTOR);
    // Deletions count too (`touched_objects`): a pod that goes, or a Deployment deleted without
    // its pods, changes what status must say, and nothing else would reconcile until the resync.
    macro_rules! cached {
        ($ty:ty, $trim:expr) => {{
            let (store, writer) = reflector::store::<$ty>();
            let stream = watcher(api::<$ty>(&client, &scope), owned.clone())
                .default_backoff()
                .modify($trim)
                .reflect(writer)
                .touched_objects();
            (store, stream)
        }};
    }
    let (deployments, deploy_stream) = cached!(Deployment, trim::meta::<Deployment>);
    let (services, svc_stream) = cached!(Service, trim::meta::<Service>);
    let (hpas, hpa_stream) = cached!(HorizontalPodAutoscaler, trim::meta::<HorizontalPodAutoscaler>);
    let (pdbs, pdb_stream) = cached!(PodDisruptionBudget, trim::meta::<PodDisruptionBudget>);
    let (network_policies, netpol_stream) = cached!(NetworkPolicy, trim::meta::<NetworkPolicy>);
    let (pods, pod_stream) = cached!(Pod, trim::pod);
    let stores = Stores::new(deployments, services, hpas, pdbs, network_policies, pods);
    let reporter = reporter();
    let ctx = Arc::new(Context {
        client: client.clone(),
        build,
        stores,
        recorder: Recorder::new(client.clone(), reporter),
        metrics,
        prober: probe::Prober::default(),
        scraper: Arc::new(scrape::Scraper::new(
            tuning.metrics_interval,
            std::time::Duration::from_secs(2),
        )),
        resync: tuning.resync,
        failures: Default::default(),
    });
    let (md_store, md_writer) = reflector::store::<ModelDeployment>();
    // Scraped metrics that changed trigger a reconcile of their ModelDeployment, which writes them.
    let (scraped_tx, scraped_rx) = futures::channel::mpsc::channel(1024);
    let scraping = scrape::run(
        ctx.scraper.clone(),
        md_store.clone(),
        ctx.stores.clone(),
        ctx.metrics.clone(),
        scraped_tx,
    );
    let md_stream = watcher(
        api::<ModelDeployment>(&client, &scope),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(trim::meta::<ModelDeployment>)
    .reflect(md_writer)
    .applied_objects();
    // A reconcile that comes due while the watch re-lists can find its object missing from the
    // store (the reflector swaps the new list in only once it is whole), and the runtime then drops
    // it without calling the error policy (in one fault e2e run, 3 such drops came with 3 of 50
    // ModelDeployments never Ready). Such an object is retried a few times, a second apart.
    let (missing_tx, missing_rx) = futures::channel::mpsc::unbounded::<ObjectRef<ModelDeployment>>();
    let missing = Arc::new(Missing::default());
    let controller = Controller::for_stream(md_stream, md_store)
        .with_config(kube::runtime::controller::Config::default().concurrency(tuning.concurrency))
        .watches_stream(deploy_stream, owner_of)
        .watches_stream(svc_stream, owner_of)
        .watches_stream(hpa_stream, owner_of)
        .watches_stream(pdb_stream, owner_of)
        .watches_stream(netpol_stream, owner_of)
        .watches_stream(pod_stream, owner_of)
        .reconcile_on(scraped_rx)
        .reconcile_on(missing_rx)
        .graceful_shutdown_on(shutdown)
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(move |res| {
            let (missing, missing_tx) = (missing.clone(), missing_tx.clone());
            async move {
                use kube::runtime::controller::Error as RunError;
                match res {
                    Ok((obj, _)) => {
                        missing.found(&obj);
                        tracing::debug!(object = %obj.name, "reconciled")
                    }
                    Err(RunError::ObjectNotFound(erased)) => {
                        let obj = model_deployment_ref(&erased);
                        if !missing.dropped(&obj) {
                            tracing::debug!(object = %erased, "not in the cache after retries: deleted");
                            return;
                        }
                        tokio::spawn(async move {
                            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                            let _ = missing_tx.unbounded_send(obj);
                        });
                    }
                    Err(e) => {
                        if let RunError::ReconcilerFailed(_, obj) = &e {
                            missing.found(&model_deployment_ref(obj));
                        }
                        tracing::warn!(error = %e, "reconcile failed")
                    }
                }
            }
        });
    // The scrape loop never ends by itself; it stops with the controller.
    tokio::select! {
        _ = controller => {}
        _ = scraping => {}
    }
}

/// Waits until the ModelDeployment CRD is served, saying how to install it meanwhile (instead of
/// a watch failing with a bare 404 in a loop). It lists where the operator watches: under a
/// namespaced Role a cluster-wide list is forbidden.
pub async fn wait_for_crd(client: &kube::Client, namespace: Option<&str>) {
    let api: kube::Api<ModelDeployment> = match namespace {
        Some(ns) => kube::Api::namespaced(client.clone(), ns),
        None => kube::Api::all(client.clone()),
    };
    let mut delay = std::time::Duration::from_secs(1);
    loop {
        match api.list(&kube::api::ListParams::default().limit(1)).await {
            Ok(_) => return,
            Err(kube::Error::Api(e)) if e.code == 404 => tracing::error!(
                "the ModelDeployment CRD is not installed: `kubemaas-operator crd | kubectl apply -f -` (or helm/kustomize install); retrying"
            ),
            // Other errors (RBAC, network) are reported by the controller itself.
            Err(_) => return,
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(std::time::Duration::from_secs(30));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_object_is_retried_ten_times_in_a_row_then_forgotten() {
        let missing = Missing::default();
        let a = ObjectRef::<ModelDeployment>::new("a").within("ns");
        let b = ObjectRef::<ModelDeployment>::new("b").within("ns");
        for _ in 0..MISSING_RETRIES {
            assert!(missing.dropped(&a));
        }
        assert!(missing.dropped(&b), "each object has its own count");
        assert!(
            !missing.dropped(&a),
            "the 11th drop in a row is taken as a deletion"
        );
        assert_eq!(missing.len(), 1, "a deleted object is forgotten");
        // Seen again after all (it came back), it is retried from the start.
        assert!(missing.dropped(&a));
        assert_eq!(missing.len(), 2);
    }

    #[test]
    fn an_object_found_starts_its_count_again() {
        let missing = Missing::default();
        let a = ObjectRef::<ModelDeployment>::new("a").within("ns");
        for _ in 0..MISSING_RETRIES {
            assert!(missing.dropped(&a));
        }
        missing.found(&a);
        assert_eq!(missing.len(), 0);
        for _ in 0..MISSING_RETRIES {
            assert!(missing.dropped(&a));
        }
        assert!(!missing.dropped(&a));
    }

    #[test]
    fn the_pod_cache_keeps_the_template_hash_and_drops_the_other_annotations() {
        let mut p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "m-1", "labels": {"app": "a"}, "annotations": {
                build::labels::TEMPLATE_HASH: "abc", "prometheus.io/port": "9090"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "server", "image": "i"}]}}))
        .unwrap();
        trim::pod(&mut p);
        assert_eq!(
            p.annotations().clone(),
            [(build::labels::TEMPLATE_HASH.to_string(), "abc".to_string())].into()
        );
        let spec = p.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("n1"));
        assert!(spec.containers.is_empty());
    }

    #[test]
    fn an_erased_reference_names_the_same_model_deployment() {
        let a = ObjectRef::<ModelDeployment>::new("a").within("ns");
        assert_eq!(model_deployment_ref(&a.clone().erase()), a);
    }
}
