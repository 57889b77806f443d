//! Leader election on a `coordination.k8s.io/v1` Lease: one active replica, the others wait and
//! take over when the holder stops renewing.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::time::Instant;

/// Lease settings. The rules are client-go's: a leader that has not renewed within
/// `renew_deadline` stops acting, which is well before a standby, counting `duration` from when
/// *it* last saw the lease change, takes over.
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
    /// How long the leader keeps acting without a successful renewal (less than `duration`).
    pub renew_deadline: Duration,
    /// How often to try to acquire or renew.
    pub retry: Duration,
}

impl LeaseConfig {
    /// Settings for a lease of `duration`: renew deadline 2/3 of it, retries at 1/5 (client-go's
    /// 15 s / 10 s / 2 s, scaled).
    pub fn new(namespace: String, name: String, identity: String, duration: Duration) -> LeaseConfig {
        let duration = duration.max(Duration::from_secs(3));
        LeaseConfig {
            namespace,
            name,
            identity,
            renew_deadline: duration * 2 / 3,
            retry: (duration / 5).clamp(Duration::from_millis(500), Duration::from_secs(5)),
            duration,
        }
    }
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
    /// The apiserver did not answer in time.
    #[error("Lease {name}: no answer within {after:?}")]
    Timeout {
        /// Lease name.
        name: String,
        /// The bound.
        after: Duration,
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
            lease_duration_seconds: Some(cfg.duration.as_secs().max(1) as i32),
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

/// The lease record as last seen, and when (by this process's clock): another replica's clock is
/// never trusted, only whether the record changed.
#[derive(Debug, Clone)]
struct Seen {
    record: (Option<String>, Option<String>, Option<i32>),
    at: Instant,
}

fn record(l: &Lease) -> (Option<String>, Option<String>, Option<i32>) {
    let spec = l.spec.clone().unwrap_or_default();
    (
        spec.holder_identity,
        spec.renew_time.map(|t| t.0.to_string()),
        spec.lease_duration_seconds,
    )
}

/// Judges another holder's lease by this process's clock.
#[derive(Debug, Default)]
struct Expiry {
    seen: Option<Seen>,
}

impl Expiry {
    /// Whether the lease has run out: its duration has passed, on this process's clock, since the
    /// record was first seen as it is now. A released lease (no holder) is free at once.
    fn expired(&mut self, lease: &Lease, now: Instant, fallback: Duration) -> bool {
        let rec = record(lease);
        if rec.0.as_deref().is_none_or(str::is_empty) {
            return true;
        }
        let seen = match &self.seen {
            Some(s) if s.record == rec => s.clone(),
            _ => {
                let s = Seen { record: rec, at: now };
                self.seen = Some(s.clone());
                s
            }
        };
        let duration = seen
            .record
            .2
            .map(|d| Duration::from_secs(d.max(1) as u64))
            .unwrap_or(fallback);
        now.duration_since(seen.at) >= duration
    }
}

/// One replica's view of the election.
pub struct Elector {
    client: Client,
    cfg: LeaseConfig,
    expiry: Expiry,
}

impl Elector {
    /// An elector for `cfg`.
    pub fn new(client: Client, cfg: LeaseConfig) -> Elector {
        Elector {
            client,
            cfg,
            expiry: Expiry::default(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    async fn attempt(&mut self) -> Result<Role, LeaderError> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &self.cfg.namespace);
        let name = self.cfg.name.clone();
        let err = |source| LeaderError::Api {
            name: name.clone(),
            source,
        };
        let existing = api.get_opt(&self.cfg.name).await.map_err(err)?;
        let now = Timestamp::now();
        let result = match &existing {
            None => {
                api.create(&PostParams::default(), &desired(&self.cfg, None, now))
                    .await
            }
            Some(l) => {
                let mine = l.spec.as_ref().and_then(|s| s.holder_identity.as_deref())
                    == Some(self.cfg.identity.as_str());
                if !mine && !self.expiry.expired(l, Instant::now(), self.cfg.duration) {
                    return Ok(Role::Follower);
                }
                // The resourceVersion makes this a compare-and-swap: of two replicas that both
                // judged the lease expired, one wins.
                api.replace(
                    &self.cfg.name,
                    &PostParams::default(),
                    &desired(&self.cfg, Some(l), now),
                )
                .await
            }
        };
        match result {
            Ok(_) => Ok(Role::Leader),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Role::Follower),
            Err(e) => Err(err(e)),
        }
    }

    /// One acquire-or-renew attempt, bounded by `limit` (the client would otherwise retry an
    /// overloaded apiserver for minutes).
    pub async fn try_acquire(&mut self, limit: Duration) -> Result<Role, LeaderError> {
        match tokio::time::timeout(limit, self.attempt()).await {
            Ok(r) => r,
            Err(_) => Err(LeaderError::Timeout {
                name: self.cfg.name.clone(),
                after: limit,
            }),
        }
    }

    /// Blocks until this replica becomes leader; returns when the winning attempt was started
    /// (the lease counts from then, not from when the answer came).
    pub async fn acquire(&mut self) -> Instant {
        // The same failure every retry period (an unreachable apiserver) is said once, then
        // counted at debug level until something changes.
        let mut last_error: Option<String> = None;
        loop {
            let started = Instant::now();
            match self.try_acquire(self.cfg.renew_deadline).await {
                Ok(Role::Leader) => return started,
                Ok(Role::Follower) => last_error = None,
                Err(e) => {
                    let text = kubemaas_crds::report::chain(&e);
                    if last_error.as_ref() == Some(&text) {
                        tracing::debug!(error = %text, "leader election attempt failed again");
                    } else {
                        tracing::warn!(error = %text, "leader election attempt failed; retrying every {:?}", self.cfg.retry);
                        last_error = Some(text);
                    }
                }
            }
            tokio::time::sleep(self.cfg.retry).await;
        }
    }

    /// Renews the lease until it is lost: another holder, or no successful renewal within the
    /// renew deadline counted from `renewed` (each attempt is cut off when the deadline comes).
    pub async fn hold(&mut self, mut renewed: Instant) {
        loop {
            // Never sleep past the deadline: stepping down late is what lets two leaders overlap.
            let left = self.cfg.renew_deadline.saturating_sub(renewed.elapsed());
            tokio::time::sleep(self.cfg.retry.min(left)).await;
            let left = self.cfg.renew_deadline.saturating_sub(renewed.elapsed());
            if left.is_zero() {
                tracing::warn!(deadline = ?self.cfg.renew_deadline, "no lease renewal within the renew deadline");
                return;
            }
            let started = Instant::now();
            match self.try_acquire(left).await {
                Ok(Role::Leader) => renewed = started,
                Ok(Role::Follower) => {
                    tracing::warn!("another replica holds the lease");
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
            }
        }
    }

    /// Gives the lease up (holder cleared) if this replica still holds it, within `limit`.
    pub async fn release(&self, limit: Duration) -> Result<(), LeaderError> {
        let name = self.cfg.name.clone();
        match tokio::time::timeout(limit, release(&self.client, &self.cfg)).await {
            Ok(r) => r,
            Err(_) => Err(LeaderError::Timeout { name, after: limit }),
        }
    }
}

async fn release(client: &Client, cfg: &LeaseConfig) -> Result<(), LeaderError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(id: &str) -> LeaseConfig {
        LeaseConfig::new("ns".into(), "l".into(), id.into(), Duration::from_secs(15))
    }

    #[test]
    fn defaults_follow_client_go() {
        let c = cfg("a");
        assert_eq!(
            (c.duration, c.renew_deadline, c.retry),
            (
                Duration::from_secs(15),
                Duration::from_secs(10),
                Duration::from_secs(3)
            )
        );
        let short = LeaseConfig::new("n".into(), "l".into(), "a".into(), Duration::from_secs(1));
        assert!(short.renew_deadline < short.duration && short.retry < short.renew_deadline);
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
        let b = desired(
            &cfg("b"),
            Some(&renewed),
            Timestamp::from_second(1_800_000_030).unwrap(),
        );
        assert_eq!(b.spec.as_ref().unwrap().lease_transitions, Some(1));
        assert_eq!(b.spec.as_ref().unwrap().holder_identity.as_deref(), Some("b"));
    }

    #[test]
    fn expiry_is_judged_by_the_local_clock_from_when_the_record_changed() {
        let mut e = Expiry::default();
        let t = Instant::now();
        let fallback = Duration::from_secs(15);
        // The holder's renewTime says 2001: a skewed clock must not make it look expired.
        let old = desired(&cfg("a"), None, Timestamp::from_second(1_000_000_000).unwrap());
        assert!(!e.expired(&old, t, fallback));
        assert!(!e.expired(&old, t + Duration::from_secs(14), fallback));
        assert!(e.expired(&old, t + Duration::from_secs(15), fallback));
        // A renewal (a changed record) restarts the count.
        let renewed = desired(
            &cfg("a"),
            Some(&old),
            Timestamp::from_second(1_000_000_002).unwrap(),
        );
        assert!(!e.expired(&renewed, t + Duration::from_secs(16), fallback));
        assert!(e.expired(&renewed, t + Duration::from_secs(31), fallback));
        // Released: free at once.
        let mut released = renewed.clone();
        released.spec.as_mut().unwrap().holder_identity = None;
        assert!(e.expired(&released, t + Duration::from_secs(31), fallback));
    }
}
