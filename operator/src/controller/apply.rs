//! The only step that writes children: server-side apply of what changed or drifted, deletion of
//! what is no longer wanted. A child whose hash and owned fields match costs no request at all.

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use kubemaas_crds::v1alpha1::ModelDeployment;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::build::{Children, labels, stamp_hash};
use super::{Error, Stores, drift, retrying};

/// Field manager of every write.
pub const FIELD_MANAGER: &str = "kubemaas-operator";

/// Field manager that keeps `spec.replicas` while autoscaling takes over (see [`hand_over_replicas`]).
pub const HANDOVER_MANAGER: &str = "kubemaas-operator-handover";

fn observed<K>(store: &Store<K>, name: &str, ns: &str) -> Option<std::sync::Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store.get(&ObjectRef::new(name).within(ns))
}

/// What one apply did.
struct Written<K> {
    /// The object as the apiserver answered (fresher than the cache, which may lag).
    object: K,
    /// The hash matched, but a field we own had been changed by someone else.
    drifted: bool,
}

/// Applies `desired` (already stamped with its hash) unless the observed copy carries the same
/// hash and every field we set still holds our value.
async fn apply_one<K>(
    client: &Client,
    store: &Store<K>,
    ns: &str,
    desired: K,
) -> Result<Option<Written<K>>, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug
        + 'static,
{
    let name = desired.name_any();
    let failed = |source| Error::Apply {
        kind: K::kind(&()).to_string(),
        name: name.clone(),
        source,
    };
    let hash = desired.annotations().get(labels::SPEC_HASH);
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let mut drifted = false;
    if let Some(live) = observed(store, &name, ns)
        && hash.is_some()
        && live.annotations().get(labels::SPEC_HASH) == hash
    {
        let mut want = serde_json::to_value(&desired).unwrap_or_default();
        let Some(path) = drift::first_difference(&serde_json::to_value(&*live).unwrap_or_default(), &want)
        else {
            return Ok(None);
        };
        tracing::info!(kind = %K::kind(&()), name = %name, field = %path, "correcting drift");
        drifted = true;
        // An apply cannot take back a list entry another manager rewrote (a Service port edited
        // from 8080 to 9999 is a new entry it owns; applying 8080 adds a duplicate the apiserver
        // refuses). A merge patch replaces our lists wholesale; the apply then owns them again.
        if let Some(spec) = want.get_mut("spec").map(serde_json::Value::take) {
            let params = PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..PatchParams::default()
            };
            let merge = Patch::Merge(serde_json::json!({ "spec": spec }));
            retrying(|| api.patch(&name, &params, &merge))
                .await
                .map_err(failed)?;
        }
    }
    let (params, patch) = (PatchParams::apply(FIELD_MANAGER).force(), Patch::Apply(&desired));
    let object = retrying(|| api.patch(&name, &params, &patch))
        .await
        .map_err(failed)?;
    Ok(Some(Written { object, drifted }))
}

/// Deletes the child if the store shows it exists (so an absent child costs no request).
async fn delete_if_present<K>(client: &Client, store: &Store<K>, ns: &str, name: &str) -> Result<bool, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + 'static,
{
    if observed(store, name, ns).is_none() {
        return Ok(false);
    }
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let params = DeleteParams::background();
    match retrying(|| api.delete(name, &params)).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(source) => Err(Error::Delete {
            kind: K::kind(&()).to_string(),
            name: name.into(),
            source,
        }),
    }
}

/// Makes a second field manager co-own `spec.replicas` at `replicas`.
///
/// Server-side apply resets a field to its default when its only applier stops sending it. With
/// autoscaling the operator stops sending `spec.replicas`; if it was the only owner, a running
/// Deployment of 10 would drop to 1 before the HPA acts. Applying the value under another manager
/// first (the ownership transfer the Kubernetes server-side apply docs describe) keeps it until
/// the HPA writes its own. The built-in autoscaler sets the replicas the same way, so one manager
/// owns the field whichever autoscaler is in charge.
pub async fn hand_over_replicas(client: &Client, ns: &str, name: &str, replicas: i32) -> Result<(), Error> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let body = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"replicas": replicas},
    });
    let (params, patch) = (PatchParams::apply(HANDOVER_MANAGER).force(), Patch::Apply(&body));
    retrying(|| api.patch(name, &params, &patch))
        .await
        .map(|_| ())
        .map_err(|source| Error::Apply {
            kind: "Deployment".into(),
            name: name.into(),
            source,
        })
}

/// What [`apply_children`] did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Write requests sent.
    pub writes: usize,
    /// The Deployment as the apiserver answered, when it was written: status must be computed from
    /// it (new generation, old rollout state), not from a cache that has not seen the write yet.
    pub deployment: Option<Deployment>,
    /// Kinds of the children whose drift was corrected (the field is logged where it was found).
    pub drift: Vec<String>,
}

impl Applied {
    fn count<K>(&mut self, w: Option<Written<K>>) -> Option<K>
    where
        K: Resource<DynamicType = ()>,
    {
        let w = w?;
        self.writes += 1;
        if w.drifted {
            self.writes += 1; // the merge patch before the apply
            self.drift.push(K::kind(&()).to_string());
        }
        Some(w.object)
    }
}

/// Applies every wanted child and removes the unwanted ones.
pub async fn apply_children(
    client: &Client,
    stores: &Stores,
    md: &ModelDeployment,
    children: Children,
) -> Result<Applied, Error> {
    let ns = md.namespace().ok_or(Error::MissingNamespace)?;
    let name = md.name_any();
    let mut done = Applied::default();
    let requests_policy = children.network_policy.is_some();
    // A requested NetworkPolicy goes first: if the apiserver refuses it (an invalid ipBlock), the
    // reconcile stops before new pods could serve to the whole cluster without it.
    if let Some(p) = children.network_policy {
        let policy = apply_one(client, &stores.network_policies, &ns, stamp_hash(p)).await?;
        done.count(policy);
    }
    // The HPA goes before the Deployment takes `spec.replicas` back, so the two never fight.
    if children.hpa.is_none() {
        done.writes += usize::from(delete_if_present(client, &stores.hpas, &ns, &name).await?);
    }

    let mut deployment = stamp_hash(children.deployment);
    let live = observed(&stores.deployments, &name, &ns);
    // Who owns `spec.replicas` changes only when the annotation does: then hand it over.
    let handover = md.spec.autoscaling.as_ref().and_then(|a| {
        let already = live.as_ref().is_some_and(|d| {
            d.annotations().get(labels::REPLICAS_BY).map(String::as_str)
                == Some(labels::REPLICAS_BY_AUTOSCALER)
        });
        // The bounds as the autoscaler reads them (`autoscale::Params`), so the two never write
        // different counts for an object stored before the rules refusing min < 1 or min > max;
        // not `clamp`, which panics on min > max.
        let (lo, hi) = (a.min_replicas.max(1), a.max_replicas.max(a.min_replicas.max(1)));
        let bounded = |r: i32| r.max(lo).min(hi);
        let current = live.as_ref().and_then(|d| d.spec.replicas);
        if !already {
            // Keep what runs (within the new bounds): the autoscaler scales from there.
            return Some(bounded(current.unwrap_or(a.min_replicas)));
        }
        // The built-in autoscaler decides only from measurements; an HPA moves the count into
        // changed bounds without any, and so must it: bounds changed while no pod can be
        // measured (none ready, metrics blocked) hold at once.
        let current = current?;
        (a.metric.is_request_driven() && bounded(current) != current).then(|| bounded(current))
    });
    match (handover, &live) {
        (Some(replicas), Some(_)) => {
            hand_over_replicas(client, &ns, &name, replicas).await?;
            done.writes += 1;
        }
        // A new Deployment starts at the count autoscaling asks for, not at the default of 1.
        // The hash stays that of the built object, so the next reconcile sees no change.
        (Some(replicas), None) => deployment.spec.replicas = Some(replicas),
        (None, _) => {}
    }
    let written = apply_one(client, &stores.deployments, &ns, deployment).await?;
    done.deployment = done.count(written);
    if let (Some(replicas), None) = (handover, &live) {
        hand_over_replicas(client, &ns, &name, replicas).await?;
        done.writes += 1;
    }

    let service = apply_one(client, &stores.services, &ns, stamp_hash(children.service)).await?;
    done.count(service);
    if let Some(h) = children.hpa {
        let hpa = apply_one(client, &stores.hpas, &ns, stamp_hash(h)).await?;
        done.count(hpa);
    }
    match children.pdb {
        Some(p) => {
            let pdb = apply_one(client, &stores.pdbs, &ns, stamp_hash(p)).await?;
            done.count(pdb);
        }
        None => done.writes += usize::from(delete_if_present(client, &stores.pdbs, &ns, &name).await?),
    }
    if !requests_policy {
        done.writes += usize::from(delete_if_present(client, &stores.network_policies, &ns, &name).await?);
    }
    Ok(done)
}
