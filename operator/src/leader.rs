//! Leader election on a `coordination.k8s.io/v1` Lease: one active replica, the others wait and
//! take over when the holder stops renewing.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::{Api, Client};

/// Lease settings.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Lease namespace.
    pub namespace: String,
    /// Lease name.
    pub name: String,
    /// This replica's identity.
    pub identity: String,
    /// How long a lease is valid without renewal.
    pub duration: Duration,
    /// How often to try to acquire or renew.
    pub retry: Duration,
}

/// Errors of the election loop.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The lease could not be read or written.
    #[error("failed to access Lease {name}: {source}")]
    Api {
        /// Lease name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
}

/// Outcome of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// This replica holds the lease.
    Leader,
    /// Another replica does.
    Follower,
}

fn desired(cfg: &LeaseConfig, existing: Option<&Lease>, now: Timestamp) -> Lease {
    let prev = existing.and_then(|l| l.spec.clone()).unwrap_or_default();
    let same_holder = prev.holder_identity.as_deref() == Some(cfg.identity.as_str());
    Lease {
        metadata: ObjectMeta {
            name: Some(cfg.name.clone()),
            namespace: Some(cfg.namespace.clone()),
            resource_version: existing.and_then(|l| l.metadata.resource_version.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(cfg.identity.clone()),
            lease_duration_seconds: Some(cfg.duration.as_secs() as i32),
            acquire_time: if same_holder {
                prev.acquire_time.clone()
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(
                prev.lease_transitions.unwrap_or(0) + i32::from(!same_holder && existing.is_some()),
            ),
            ..LeaseSpec::default()
        }),
    }
}

fn expired(lease: &Lease, now: Timestamp) -> bool {
    let Some(spec) = &lease.spec else { return true };
    let Some(renew) = &spec.renew_time else {
        return true;
    };
    let dur = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    renew.0.checked_add(dur).map(|t| t < now).unwrap_or(true)
}

/// One acquire-or-renew attempt. Conflicts (another replica wrote first) mean Follower.
pub async fn try_acquire(client: &Client, cfg: &LeaseConfig) -> Result<Role, LeaderError> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let err = |source| LeaderError::Api {
        name: cfg.name.clone(),
        source,
    };
    let now = Timestamp::now();
    let existing = api.get_opt(&cfg.name).await.map_err(err)?;
    let result = match &existing {
        None => api.create(&PostParams::default(), &desired(cfg, None, now)).await,
        Some(l) => {
            let mine =
                l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(cfg.identity.as_str());
            if !mine && !expired(l, now) {
                return Ok(Role::Follower);
            }
            api.replace(&cfg.name, &PostParams::default(), &desired(cfg, Some(l), now))
                .await
        }
    };
    match result {
        Ok(_) => Ok(Role::Leader),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(Role::Follower),
        Err(e) => Err(err(e)),
    }
}

/// Gives the lease up (holder cleared) if this replica still holds it.
pub async fn release(client: &Client, cfg: &LeaseConfig) -> Result<(), LeaderError> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let err = |source| LeaderError::Api {
        name: cfg.name.clone(),
        source,
    };
    let Some(mut lease) = api.get_opt(&cfg.name).await.map_err(err)? else {
        return Ok(());
    };
    let Some(spec) = lease.spec.as_mut() else {
        return Ok(());
    };
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(err(e)),
    }
}

/// Blocks until this replica becomes leader.
pub async fn acquire(client: &Client, cfg: &LeaseConfig) {
    loop {
        match try_acquire(client, cfg).await {
            Ok(Role::Leader) => return,
            Ok(Role::Follower) => {}
            Err(e) => tracing::warn!(error = %e, "leader election attempt failed"),
        }
        tokio::time::sleep(cfg.retry).await;
    }
}

/// Renews the lease until it is lost (another holder, or renewal failing past the lease duration).
pub async fn hold(client: &Client, cfg: &LeaseConfig) {
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(cfg.retry).await;
        match try_acquire(client, cfg).await {
            Ok(Role::Leader) => last_ok = tokio::time::Instant::now(),
            Ok(Role::Follower) => return,
            Err(e) => {
                tracing::warn!(error = %e, "lease renewal failed");
                if last_ok.elapsed() > cfg.duration {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(id: &str) -> LeaseConfig {
        LeaseConfig {
            namespace: "ns".into(),
            name: "l".into(),
            identity: id.into(),
            duration: Duration::from_secs(15),
            retry: Duration::from_secs(2),
        }
    }

    #[test]
    fn takeover_bumps_transitions_and_renewal_keeps_acquire_time() {
        let t0 = Timestamp::from_second(1_800_000_000).unwrap();
        let a = desired(&cfg("a"), None, t0);
        assert_eq!(a.spec.as_ref().unwrap().lease_transitions, Some(0));
        let t1 = Timestamp::from_second(1_800_000_005).unwrap();
        let renewed = desired(&cfg("a"), Some(&a), t1);
        assert_eq!(
            renewed.spec.as_ref().unwrap().acquire_time,
            a.spec.as_ref().unwrap().acquire_time
        );
        assert!(!expired(&renewed, Timestamp::from_second(1_800_000_010).unwrap()));
        assert!(expired(&renewed, Timestamp::from_second(1_800_000_030).unwrap()));
        let b = desired(
            &cfg("b"),
            Some(&renewed),
            Timestamp::from_second(1_800_000_030).unwrap(),
        );
        assert_eq!(b.spec.as_ref().unwrap().lease_transitions, Some(1));
        assert_eq!(b.spec.as_ref().unwrap().holder_identity.as_deref(), Some("b"));
    }
}
