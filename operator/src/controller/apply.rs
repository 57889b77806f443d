//! The only step that writes children: server-side apply of what changed, deletion of what is no
//! longer wanted. Unchanged children (same spec hash as observed) cost no request at all.

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use kubemaas_crds::v1alpha1::ModelDeployment;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::build::{Children, labels, stamp_hash};
use super::{Error, Stores};

/// Field manager of every write.
pub const FIELD_MANAGER: &str = "kubemaas-operator";

fn observed_hash<K>(store: &Store<K>, name: &str, ns: &str) -> Option<String>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store
        .get(&ObjectRef::new(name).within(ns))
        .and_then(|o| o.annotations().get(labels::SPEC_HASH).cloned())
}

/// Applies `desired` unless the observed copy already carries the same hash. Returns the object
/// as the apiserver answered when a request was sent (fresher than the cache, which may lag).
async fn apply_one<K>(client: &Client, store: &Store<K>, ns: &str, desired: K) -> Result<Option<K>, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug
        + 'static,
{
    let desired = stamp_hash(desired);
    let name = desired.name_any();
    let hash = desired.annotations().get(labels::SPEC_HASH).cloned();
    if hash.is_some() && observed_hash(store, &name, ns) == hash {
        return Ok(None);
    }
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let applied = api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&desired),
        )
        .await
        .map_err(|source| Error::Apply {
            kind: K::kind(&()).to_string(),
            name: name.clone(),
            source,
        })?;
    Ok(Some(applied))
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
    if store.get(&ObjectRef::new(name).within(ns)).is_none() {
        return Ok(false);
    }
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(source) => Err(Error::Delete {
            kind: K::kind(&()).to_string(),
            name: name.into(),
            source,
        }),
    }
}

/// What [`apply_children`] did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Write requests sent.
    pub writes: usize,
    /// The Deployment as the apiserver answered, when it was written: status must be computed from
    /// it (new generation, old rollout state), not from a cache that has not seen the write yet.
    pub deployment: Option<Deployment>,
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
    let deployment = apply_one(client, &stores.deployments, &ns, children.deployment).await?;
    let mut writes = usize::from(deployment.is_some());
    writes += usize::from(
        apply_one(client, &stores.services, &ns, children.service)
            .await?
            .is_some(),
    );
    writes += usize::from(match children.hpa {
        Some(h) => apply_one(client, &stores.hpas, &ns, h).await?.is_some(),
        None => delete_if_present(client, &stores.hpas, &ns, &name).await?,
    });
    writes += usize::from(match children.pdb {
        Some(p) => apply_one(client, &stores.pdbs, &ns, p).await?.is_some(),
        None => delete_if_present(client, &stores.pdbs, &ns, &name).await?,
    });
    Ok(Applied { writes, deployment })
}
