//! Scrapes the ready serving pods' own `/metrics` (port 9090) on an interval and turns the
//! counters' deltas into `status.metrics`: request and error rates, latency quantiles from the
//! histogram, in-flight requests, queue depth, average concurrency and batch size.
//!
//! Pods are asked a bounded number at a time, each with a short timeout, so a pod that hangs or
//! answers garbage costs one timeout and never holds back other ModelDeployments. The numbers are
//! rounded and published (a reconcile is triggered) only when one changed meaningfully: an idle
//! ModelDeployment costs no writes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use kubemaas_crds::v1alpha1::{ModelDeployment, TrafficMetrics};

use super::build::{labels, ports};
use crate::metrics::Metrics;

/// Why a scrape failed; the label of `kubemaas_operator_scrape_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, thiserror::Error)]
pub enum ScrapeError {
    /// No answer within the timeout.
    #[error("timeout")]
    Timeout,
    /// Connection refused or reset.
    #[error("connect")]
    Connect,
    /// An HTTP status other than 200.
    #[error("status")]
    Status,
    /// A body too large, or not a KubeMaaS server's exposition.
    #[error("parse")]
    Parse,
}

/// One pod's counters and gauges at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    /// Successful requests.
    pub success: f64,
    /// Failed requests (all reasons).
    pub failure: f64,
    /// Cumulative request time in microseconds.
    pub duration_us: f64,
    /// Time-weighted in-flight requests in seconds (its rate is the average concurrency).
    pub inflight_seconds: Option<f64>,
    /// The server's own clock at rendering (`kubemaas_uptime_seconds`).
    pub uptime: Option<f64>,
    /// Rows inferred.
    pub inferences: f64,
    /// Model executions.
    pub executions: f64,
    /// Cumulative latency histogram: (upper bound in seconds, count), ascending, `+Inf` last.
    pub buckets: Vec<(f64, f64)>,
    /// Requests in flight.
    pub inflight: f64,
    /// Requests queued.
    pub queue: f64,
    /// Per-GPU utilisation (0–1), when reported.
    pub gpu_utilization: Vec<f64>,
    /// Per-GPU memory used in bytes, when reported.
    pub gpu_memory_used: Vec<f64>,
}

/// The value of `name="…"` in a label set, if present.
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
    let end = labels[start..].find('"')?;
    Some(&labels[start..start + end])
}

/// Parses a KubeMaaS server's exposition (sums over the models it serves). Text without the
/// server's request counter is not one, and is an error rather than zeros.
pub fn parse(text: &str) -> Result<Sample, ScrapeError> {
    let mut s = Sample::default();
    let mut seen_requests = false;
    let mut buckets: HashMap<String, f64> = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, rest) = match line.find('}') {
            Some(i) => (&line[..=i], line[i + 1..].trim()),
            None => match line.split_once(' ') {
                Some((n, r)) => (n, r.trim()),
                None => return Err(ScrapeError::Parse),
            },
        };
        let (name, labels) = match series.find('{') {
            Some(i) => (&series[..i], &series[i..]),
            None => (series, ""),
        };
        let value: f64 = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or(ScrapeError::Parse)?;
        if !value.is_finite() || value < 0.0 {
            return Err(ScrapeError::Parse);
        }
        match name {
            "nv_inference_request_success" => {
                seen_requests = true;
                s.success += value;
            }
            "nv_inference_request_failure" => s.failure += value,
            "nv_inference_request_duration_us" => s.duration_us += value,
            "kubemaas_uptime_seconds" => s.uptime = Some(value),
            "kubemaas_inflight_request_seconds_total" => {
                *s.inflight_seconds.get_or_insert(0.0) += value;
            }
            "nv_inference_count" => s.inferences += value,
            "nv_inference_exec_count" => s.executions += value,
            "nv_inference_pending_request_count" => s.inflight += value,
            "kubemaas_inference_queue_depth" => s.queue += value,
            "nv_gpu_utilization" => s.gpu_utilization.push(value),
            "nv_gpu_memory_used_bytes" => s.gpu_memory_used.push(value),
            "kubemaas_request_duration_seconds_bucket" => {
                let le = label(labels, "le").ok_or(ScrapeError::Parse)?;
                *buckets.entry(le.to_string()).or_default() += value;
            }
            _ => {}
        }
    }
    if !seen_requests {
        return Err(ScrapeError::Parse);
    }
    let mut b: Vec<(f64, f64)> = buckets
        .into_iter()
        .map(|(le, n)| {
            let bound = if le == "+Inf" {
                Ok(f64::INFINITY)
            } else {
                le.parse::<f64>()
            };
            bound.map(|b| (b, n)).map_err(|_| ScrapeError::Parse)
        })
        .collect::<Result<_, _>>()?;
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    s.buckets = b;
    Ok(s)
}

/// The increase of a counter; a counter that went down was reset (the server restarted), so all
/// of its current value is new, as Prometheus' `rate()` counts it.
fn increase(before: f64, now: f64) -> f64 {
    if now >= before { now - before } else { now }
}

/// The `q` quantile (0–1) of a cumulative histogram by linear interpolation within the bucket,
/// as Prometheus' `histogram_quantile` computes it. None without observations.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                // Past the last finite bucket nothing is known but its bound.
                return Some(lower);
            }
            let share = if count > below {
                (rank - below) / (count - below)
            } else {
                0.0
            };
            return Some(lower + (bound - lower) * share);
        }
        lower = bound;
        below = count;
    }
    Some(lower)
}

/// Rounds to three significant digits: a status reader needs no more, and fewer digits mean fewer
/// meaningless changes.
pub fn round3(v: f64) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return 0.0;
    }
    let digits = 2 - v.abs().log10().floor() as i32;
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// What one scrape round measured for one ModelDeployment, before rounding.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    /// Requests per second.
    pub rps: f64,
    /// Failures per second.
    pub eps: f64,
    /// Latency quantiles in seconds.
    pub p50: Option<f64>,
    /// 99th percentile in seconds.
    pub p99: Option<f64>,
    /// Requests in flight now.
    pub inflight: f64,
    /// Requests queued now.
    pub queue: f64,
    /// Average concurrency (request-seconds per second).
    pub concurrency: f64,
    /// Rows per execution, when executions ran in batches.
    pub batch_avg: Option<f64>,
    /// Mean GPU utilisation.
    pub gpu_utilization: Option<f64>,
    /// GPU memory in use.
    pub gpu_memory_used: Option<f64>,
    /// Pods counted.
    pub pods: usize,
    /// Mean window length in seconds.
    pub seconds: f64,
}

/// Combines every pod's (previous, current) samples; the window of each pod is its own.
pub fn combine(pairs: &[(&Sample, &Sample, f64)]) -> Window {
    let mut w = Window {
        pods: pairs.len(),
        ..Window::default()
    };
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    let (mut inferences, mut executions) = (0.0, 0.0);
    let (mut util, mut mem): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
    for (before, now, secs) in pairs {
        // A server whose uptime went down restarted within the window: every counter began again
        // at zero then, even one that reads higher than before, and the window is its uptime.
        let restarted = matches!((before.uptime, now.uptime), (Some(b), Some(n)) if n < b);
        let increase = |b: f64, n: f64| if restarted { n } else { increase(b, n) };
        // The server's clock measures the window exactly; the operator's includes however long
        // each answer took to arrive, which varies under load and inflates or deflates every rate.
        let secs = match (before.uptime, now.uptime) {
            (Some(b), Some(n)) if n > b => n - b,
            (Some(_), Some(n)) if restarted && n > 0.0 => n,
            _ => *secs,
        }
        .max(1e-3);
        w.rps += (increase(before.success, now.success) + increase(before.failure, now.failure)) / secs;
        w.eps += increase(before.failure, now.failure) / secs;
        // The time-weighted in-flight count is exact; request durations counted at completion
        // (Little's law) can exceed the true concurrency within one window.
        w.concurrency += match (before.inflight_seconds, now.inflight_seconds) {
            (Some(b), Some(n)) => increase(b, n) / secs,
            _ => increase(before.duration_us, now.duration_us) / 1e6 / secs,
        };
        w.inflight += now.inflight;
        w.queue += now.queue;
        w.seconds += secs / pairs.len() as f64;
        inferences += increase(before.inferences, now.inferences);
        executions += increase(before.executions, now.executions);
        util.extend(&now.gpu_utilization);
        mem.extend(&now.gpu_memory_used);
        for &(bound, count) in &now.buckets {
            let prior = before
                .buckets
                .iter()
                .find(|(b, _)| *b == bound)
                .map(|(_, c)| *c)
                .unwrap_or(0.0);
            let delta = if !restarted && now.success + now.failure >= before.success + before.failure {
                (count - prior).max(0.0)
            } else {
                count
            };
            match buckets.iter_mut().find(|(b, _)| *b == bound) {
                Some(e) => e.1 += delta,
                None => buckets.push((bound, delta)),
            }
        }
    }
    buckets.sort_by(|x, y| x.0.total_cmp(&y.0));
    w.p50 = quantile(0.5, &buckets);
    w.p99 = quantile(0.99, &buckets);
    // A batch is more than one row per execution; unbatched models run one request per execution.
    if executions > 0.0 && inferences > executions {
        w.batch_avg = Some(inferences / executions);
    }
    if !util.is_empty() {
        w.gpu_utilization = Some(util.iter().sum::<f64>() / util.len() as f64);
    }
    if !mem.is_empty() {
        w.gpu_memory_used = Some(mem.iter().sum());
    }
    w
}

/// The status form of a window, rounded.
pub fn to_status(w: &Window, at: Time) -> TrafficMetrics {
    TrafficMetrics {
        requests_per_second: round3(w.rps),
        errors_per_second: round3(w.eps),
        latency_p50_ms: w.p50.map(|s| round3(s * 1e3)),
        latency_p99_ms: w.p99.map(|s| round3(s * 1e3)),
        inflight_requests: w.inflight.round() as i64,
        queue_depth: w.queue.round() as i64,
        concurrency: round3(w.concurrency),
        batch_size_avg: w.batch_avg.map(round3),
        gpu_utilization: w.gpu_utilization.map(round3),
        gpu_memory_used_bytes: w.gpu_memory_used.map(|b| b.round() as i64),
        pods: i32::try_from(w.pods).unwrap_or(i32::MAX),
        window_seconds: round3(w.seconds),
        last_scrape_time: at,
    }
}

/// Whether `new` differs from what status shows enough to be worth a write: a value appearing or
/// vanishing, a pod count change, or a change of more than 10 % (and more than one request in
/// flight or queued). The scrape time alone never is.
pub fn meaningful(old: Option<&TrafficMetrics>, new: &TrafficMetrics) -> bool {
    let Some(old) = old else { return true };
    let far = |a: f64, b: f64| (a - b).abs() > 0.1 * a.abs().max(b.abs()) && (a - b).abs() > 1e-9;
    let far_opt = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => far(a, b),
        (None, None) => false,
        _ => true,
    };
    let far_int = |a: i64, b: i64| (a - b).abs() > 1 && far(a as f64, b as f64);
    old.pods != new.pods
        || far(old.requests_per_second, new.requests_per_second)
        || far(old.errors_per_second, new.errors_per_second)
        || far(old.concurrency, new.concurrency)
        || far_opt(old.latency_p50_ms, new.latency_p50_ms)
        || far_opt(old.latency_p99_ms, new.latency_p99_ms)
        || far_opt(old.batch_size_avg, new.batch_size_avg)
        || far_opt(old.gpu_utilization, new.gpu_utilization)
        || far_opt(
            old.gpu_memory_used_bytes.map(|b| b as f64),
            new.gpu_memory_used_bytes.map(|b| b as f64),
        )
        || far_int(old.inflight_requests, new.inflight_requests)
        || far_int(old.queue_depth, new.queue_depth)
}

/// This round's window for a ModelDeployment whose pods `ready` are ready, from the pods that
/// answered (`samples`) and their previous samples (`previous`). A pod that was measured before
/// and did not answer now (a scrape that timed out) served through the window too, so it is taken
/// to carry the average load of those that answered: leaving it out would tell the autoscaler the
/// load fell. A pod answering for the first time has no previous sample, but its counters began at
/// zero when its server started: its load is what it counted over `ready_for` seconds (by UID,
/// only for pods that turned ready within the last rounds: [`first_window`]; traffic reaches a pod
/// through its Service only once ready), and no longer than its uptime. A ready pod
/// with neither a previous sample nor such a start is not counted. A round in which no ready pod gave
/// a rate measures nothing; with no ready pod at all, zero is the truth for status (the
/// autoscaler does not take it: see [`observe`]).
fn measure(
    previous: &HashMap<String, (Instant, Sample)>,
    samples: &[(String, Instant, Sample)],
    ready: &HashSet<&str>,
    ready_for: &HashMap<&str, f64>,
) -> Option<Window> {
    // The state of a first-time pod's server when it turned ready: counters at zero, its clock
    // at its uptime less the time it has been ready. Only beside pods measured before: in a
    // round where none was (a new leader's first), the first-time pods may be a few of many,
    // and their load alone is not the total.
    let watched = previous.keys().any(|uid| ready.contains(uid.as_str()));
    let starts: Vec<Option<Sample>> = samples
        .iter()
        .map(|(uid, _, s)| {
            if previous.contains_key(uid) || !watched {
                return None;
            }
            let uptime = s.uptime.filter(|u| *u > 0.0)?;
            let ready = ready_for.get(uid.as_str())?.max(1.0).min(uptime);
            Some(Sample {
                uptime: Some(uptime - ready),
                inflight_seconds: s.inflight_seconds.map(|_| 0.0),
                ..Sample::default()
            })
        })
        .collect();
    let pairs: Vec<(&Sample, &Sample, f64)> = samples
        .iter()
        .zip(&starts)
        .filter_map(|((uid, at, s), start)| match (previous.get(uid), start) {
            (Some((then, before)), _) => Some((before, s, at.duration_since(*then).as_secs_f64())),
            (None, Some(start)) => Some((start, s, 0.0)),
            (None, None) => None,
        })
        .collect();
    if pairs.is_empty() {
        return ready.is_empty().then(|| combine(&[]));
    }
    let mut w = combine(&pairs);
    let answered: HashSet<&str> = samples.iter().map(|(uid, _, _)| uid.as_str()).collect();
    // Pods counted: those measured now, and those measured before that did not answer.
    let silent = ready
        .iter()
        .filter(|uid| previous.contains_key(**uid) && !answered.contains(**uid))
        .count();
    let serving = pairs.len() + silent;
    if serving > pairs.len() {
        let k = serving as f64 / pairs.len() as f64;
        w.rps *= k;
        w.eps *= k;
        w.concurrency *= k;
        w.inflight *= k;
        w.queue *= k;
        // The totals stand for every serving pod; the autoscaler divides by this count.
        w.pods = serving;
    }
    Some(w)
}

/// One round of one ModelDeployment: the window from this round's `samples` and the pods'
/// previous ones, which this round's then replace. `members`: the ready pods (UID, address, how
/// long ready if recently); `existing`: every pod of it, ready or not.
fn step(
    pods: &mut HashMap<String, (Instant, Sample)>,
    samples: Vec<(String, Instant, Sample)>,
    members: &[(String, String, Option<f64>)],
    existing: &HashSet<&str>,
) -> Option<Window> {
    let ready: HashSet<&str> = members.iter().map(|(uid, _, _)| uid.as_str()).collect();
    let ready_for: HashMap<&str, f64> = members
        .iter()
        .filter_map(|(uid, _, secs)| Some((uid.as_str(), (*secs)?)))
        .collect();
    let window = measure(pods, &samples, &ready, &ready_for);
    remember(pods, samples, existing);
    window
}

/// Keeps this round's samples as the previous ones of the next round. A pod that did not answer,
/// or is not ready now, keeps its last sample: its counters give a rate over the longer window
/// when it answers again (its server did not start afresh; one that did says so by its uptime).
/// Pods that no longer exist (`existing`) are forgotten.
fn remember(
    pods: &mut HashMap<String, (Instant, Sample)>,
    samples: Vec<(String, Instant, Sample)>,
    existing: &HashSet<&str>,
) {
    pods.retain(|uid, _| existing.contains(uid.as_str()));
    pods.extend(samples.into_iter().map(|(uid, at, s)| (uid, (at, s))));
}

/// What the scraper keeps per ModelDeployment.
#[derive(Default)]
struct Entry {
    /// Last sample per pod UID, with when it was taken.
    pods: HashMap<String, (Instant, Sample)>,
    /// What status should show.
    published: Option<TrafficMetrics>,
    /// Windows measured (not only published ones), newest last, as far back as the autoscaler
    /// reads ([`history_kept`]).
    history: std::collections::VecDeque<(Instant, Window)>,
    /// The built-in autoscaler's memory and last decision.
    autoscale: super::autoscale::State,
    /// The UID of the object measured.
    owner: Option<String>,
    /// The autoscaling `autoscale` was kept for.
    params: Option<super::autoscale::Params>,
}

/// Windows kept per ModelDeployment for the autoscaler.
/// Only request-driven autoscaling reads past windows, and only as far back as its stable window
/// or its scale-down stabilization reaches (at most an hour each): others keep none, so a
/// thousand ModelDeployments cost no history.
fn history_kept(md: &ModelDeployment) -> Duration {
    super::autoscale::Params::of(md)
        .map(|p| p.stable.max(p.scale_down))
        .unwrap_or_default()
}

/// Pods asked at once across all ModelDeployments.
const PARALLEL: usize = 16;

/// Largest exposition read from a pod.
const MAX_BODY: usize = 1 << 20;

/// Scrapes serving pods and keeps what status and the autoscaler read.
pub struct Scraper {
    client: Client<HttpConnector, Empty<Bytes>>,
    /// Time between scrape rounds.
    pub interval: Duration,
    timeout: Duration,
    state: Mutex<HashMap<String, Entry>>,
}

/// The scraper's key for a ModelDeployment.
pub fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// How long `p` has been ready, in seconds, when it turned ready at most `recent` before `now`.
/// The condition's time keeps whole seconds: one more second is added, so the time is never
/// shorter than the truth and a first-time pod's load is never overstated.
fn ready_for(p: &Pod, now: k8s_openapi::jiff::Timestamp, recent: Duration) -> Option<f64> {
    let since = p
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")?
        .last_transition_time
        .as_ref()?;
    let secs = (now.as_second() - since.0.as_second()).max(0) as f64 + 1.0;
    (secs <= recent.as_secs_f64() + 1.0).then_some(secs)
}

/// The seconds a pod answering for the first time is taken to have served, when it turned ready
/// since the round before last: how long it has been ready, but at least one scrape interval, the
/// window every other pod's rate is averaged over. Its share of that window's load is then exact,
/// and a Ready time that reads short (the scrape came later, the kubelet's clock runs ahead) cannot
/// inflate it.
fn first_window(p: &Pod, now: k8s_openapi::jiff::Timestamp, interval: Duration) -> Option<f64> {
    ready_for(p, now, 2 * interval).map(|secs| secs.max(interval.as_secs_f64()))
}

/// The address of a ready pod that is not being deleted.
fn ready_ip(p: &Pod) -> Option<String> {
    if !super::probe::is_ready(p) || p.metadata.deletion_timestamp.is_some() {
        return None;
    }
    p.status.as_ref()?.pod_ip.clone()
}

impl Scraper {
    /// A scraper that runs a round every `interval`, giving each pod `timeout`.
    pub fn new(interval: Duration, timeout: Duration) -> Scraper {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        Scraper {
            client: Client::builder(TokioExecutor::new()).build(connector),
            interval,
            timeout,
            state: Mutex::new(HashMap::new()),
        }
    }

    /// What status should show for the ModelDeployment `key` (None before two scrapes).
    pub fn published(&self, key: &str) -> Option<TrafficMetrics> {
        self.state.lock().ok()?.get(key)?.published.clone()
    }

    /// The built-in autoscaler's last decision for `md`.
    pub fn decision(&self, md: &ModelDeployment) -> Option<super::autoscale::Decision> {
        let ns = md.namespace()?;
        let state = self.state.lock().ok()?;
        let entry = state.get(&key(&ns, &md.name_any()))?;
        // Made for this object (not one deleted and created again under its name) and for the
        // autoscaling it has now (not the metric it had before a switch).
        if entry.owner != md.uid() || entry.params != super::autoscale::Params::of(md) {
            return None;
        }
        let mut d = entry.autoscale.decision.clone()?;
        // With no pod measured for four rounds (or a stable window, if longer), the decision
        // is too old to enforce: it would hold a count, and revert any `kubectl scale`, on no
        // evidence. As an HPA without metrics, the replicas are left as they are, and status
        // says why.
        let measured = entry.history.back().map(|(t, _)| t.elapsed());
        let limit = entry
            .params
            .as_ref()
            .map_or(Duration::ZERO, |p| p.stable)
            .max(self.interval * 4);
        if let Some(age) = measured.filter(|age| *age > limit) {
            d.stale = true;
            d.reason = format!(
                "no metrics from the pods for {} s (their /metrics on port {} did not answer, or no pod is ready): replicas left as they are; the last decision was {}: {}",
                age.as_secs(),
                ports::METRICS,
                d.desired,
                d.reason
            );
        }
        Some(d)
    }

    async fn fetch(&self, ip: &str) -> Result<Sample, ScrapeError> {
        let uri = super::probe::pod_uri(ip, ports::METRICS, "/metrics").ok_or(ScrapeError::Connect)?;
        let text = tokio::time::timeout(self.timeout, async {
            let resp = self.client.get(uri).await.map_err(|_| ScrapeError::Connect)?;
            if resp.status() != http::StatusCode::OK {
                return Err(ScrapeError::Status);
            }
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|_| ScrapeError::Parse)?
                .to_bytes();
            String::from_utf8(body.to_vec()).map_err(|_| ScrapeError::Parse)
        })
        .await
        .map_err(|_| ScrapeError::Timeout)??;
        parse(&text)
    }

    /// One round: scrapes every ready pod of every ModelDeployment and returns those whose
    /// published metrics changed.
    pub async fn round(
        &self,
        mds: &Store<ModelDeployment>,
        stores: &super::Stores,
        metrics: &Metrics,
    ) -> Vec<ObjectRef<ModelDeployment>> {
        // Pods by ModelDeployment key: UID, address, and how long ready if it turned ready since
        // the round before last.
        let mut members: HashMap<String, Vec<(String, String, Option<f64>)>> = HashMap::new();
        let mut existing: HashMap<String, HashSet<String>> = HashMap::new();
        let wall = k8s_openapi::jiff::Timestamp::now();
        for p in stores.pods.state() {
            let (Some(ns), Some(md)) = (p.namespace(), p.labels().get(labels::MODEL_DEPLOYMENT)) else {
                continue;
            };
            existing
                .entry(key(&ns, md))
                .or_default()
                .insert(p.uid().unwrap_or_default());
            if let Some(ip) = ready_ip(&p) {
                members.entry(key(&ns, md)).or_default().push((
                    p.uid().unwrap_or_default(),
                    ip,
                    first_window(&p, wall, self.interval),
                ));
            }
        }
        let wanted: Vec<(String, ObjectRef<ModelDeployment>, Arc<ModelDeployment>)> = mds
            .state()
            .into_iter()
            .filter_map(|m| {
                let ns = m.namespace()?;
                Some((key(&ns, &m.name_any()), ObjectRef::from_obj(m.as_ref()), m))
            })
            .collect();
        let targets: Vec<(String, String, String)> = wanted
            .iter()
            .flat_map(|(k, _, _)| {
                members
                    .get(k)
                    .into_iter()
                    .flatten()
                    .map(move |(uid, ip, _)| (k.clone(), uid.clone(), ip.clone()))
            })
            .collect();
        let results: Vec<(String, String, Result<Sample, ScrapeError>, Instant)> =
            futures::stream::iter(targets)
                .map(|(k, uid, ip)| async move {
                    let r = self.fetch(&ip).await;
                    (k, uid, r, Instant::now())
                })
                .buffer_unordered(PARALLEL)
                .collect()
                .await;
        let mut fresh: HashMap<String, Vec<(String, Instant, Sample)>> = HashMap::new();
        for (k, uid, r, at) in results {
            metrics.scraped(r.as_ref().err().copied());
            if let Ok(s) = r {
                fresh.entry(k).or_default().push((uid, at, s));
            }
        }
        let now = Instant::now();
        let stamp = super::reconcile::now();
        let Ok(mut state) = self.state.lock() else {
            return Vec::new();
        };
        let live: HashSet<&String> = wanted.iter().map(|(k, _, _)| k).collect();
        state.retain(|k, _| live.contains(k));
        let mut changed = Vec::new();
        for (k, md, obj) in &wanted {
            let entry = state.entry(k.clone()).or_default();
            // An object deleted and created again under the same name starts afresh; a change of
            // autoscaling starts the autoscaler's memory afresh.
            if entry.owner != obj.uid() {
                *entry = Entry {
                    owner: obj.uid(),
                    ..Entry::default()
                };
            }
            let params = super::autoscale::Params::of(obj);
            if entry.params != params {
                entry.autoscale = super::autoscale::State::default();
                entry.params = params;
            }
            let samples = fresh.remove(k).unwrap_or_default();
            let members = members.get(k).map(Vec::as_slice).unwrap_or_default();
            let existing: HashSet<&str> = existing
                .get(k)
                .into_iter()
                .flatten()
                .map(String::as_str)
                .collect();
            let Some(w) = step(&mut entry.pods, samples, members, &existing) else {
                continue;
            };
            if observe(entry, obj, w, now, &stamp, running_replicas(stores, obj)) {
                changed.push(md.clone());
            }
        }
        changed
    }
}

/// The Deployment's `spec.replicas`, from the cache.
fn running_replicas(stores: &super::Stores, md: &ModelDeployment) -> Option<i32> {
    let at = ObjectRef::new(&md.name_any()).within(&md.namespace().unwrap_or_default());
    replicas_if_owned(stores.deployments.get(&at)?.as_ref(), md)
}

/// `spec.replicas` of `d` when `md` owns it: one left by an object deleted and created again
/// under the same name (not yet garbage-collected) does not say what runs for this one.
fn replicas_if_owned(d: &k8s_openapi::api::apps::v1::Deployment, md: &ModelDeployment) -> Option<i32> {
    let uid = md.uid()?;
    d.owner_references()
        .iter()
        .any(|o| o.uid == uid)
        .then_some(d.spec.replicas)
        .flatten()
}

/// Decides from the entry's windows; true when a reconcile must apply the decision: it differs
/// from the last one or from what runs.
/// Takes this round's window `w` of `obj` into its entry: what status shows, and the autoscaler's
/// history and decision (`running`: the replicas running now). True when status changed.
fn observe(
    entry: &mut Entry,
    obj: &ModelDeployment,
    w: Window,
    now: Instant,
    stamp: &Time,
    running: Option<i32>,
) -> bool {
    // A ModelDeployment that never had a ready pod has no numbers to publish yet; but where its
    // status shows traffic (written before this process led), no pod now is the news.
    let shown = obj.status.as_ref().and_then(|s| s.metrics.as_ref());
    if entry.published.is_none() && w.pods == 0 && shown.is_none_or(|m| m.pods == 0) {
        return false;
    }
    let status = to_status(&w, stamp.clone());
    let publish = meaningful(entry.published.as_ref(), &status);
    if publish {
        entry.published = Some(status);
    }
    // With no ready pod, status says so (nothing serves), but the autoscaler learns nothing: the
    // load did not go away because the pods did (an overload that fails readiness, a node pool
    // lost). Taking it as zero scaled such a model down to minReplicas. As an HPA without
    // metrics, it keeps its last decision.
    if w.pods == 0 {
        return publish;
    }
    entry.history.push_back((now, w));
    let kept = history_kept(obj);
    while entry
        .history
        .front()
        .is_some_and(|(t, _)| now.duration_since(*t) > kept)
    {
        entry.history.pop_front();
    }
    match super::autoscale::Params::of(obj) {
        Some(p) => autoscale_step(&p, entry, now, running) | publish,
        None => publish,
    }
}

fn autoscale_step(
    p: &super::autoscale::Params,
    entry: &mut Entry,
    now: Instant,
    running: Option<i32>,
) -> bool {
    let key = |d: &super::autoscale::Decision| (d.desired, d.panic);
    let before = entry.autoscale.decision.as_ref().map(key);
    entry.autoscale.take_over(p, running, now);
    let decided = super::autoscale::decide(p, entry.history.make_contiguous(), now, &mut entry.autoscale);
    decided.as_ref().map(key) != before || decided.is_some_and(|d| running.is_some_and(|r| r != d.desired))
}

/// Runs scrape rounds every `scraper.interval` until dropped; each ModelDeployment whose metrics
/// changed is sent to `changed` (to be reconciled, which writes them).
pub async fn run(
    scraper: Arc<Scraper>,
    mds: Store<ModelDeployment>,
    stores: super::Stores,
    metrics: Arc<Metrics>,
    mut changed: futures::channel::mpsc::Sender<ObjectRef<ModelDeployment>>,
) {
    let mut tick = tokio::time::interval(scraper.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for md in scraper.round(&mds, &stores, &metrics).await {
            if changed.try_send(md).is_err() {
                // The controller is gone or busy; the next round or resync writes it.
                tracing::debug!("scrape trigger dropped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP nv_inference_request_success x\n# TYPE nv_inference_request_success counter\n\
nv_inference_request_success{model=\"m\",version=\"1\"} 100\n\
nv_inference_request_failure{model=\"m\",version=\"1\",reason=\"REJECTED\"} 3\n\
nv_inference_request_failure{model=\"m\",version=\"1\",reason=\"BACKEND\"} 1\n\
nv_inference_request_duration_us{model=\"m\",version=\"1\"} 2000000\n\
nv_inference_count{model=\"m\",version=\"1\"} 400\n\
nv_inference_exec_count{model=\"m\",version=\"1\"} 100\n\
nv_inference_pending_request_count{model=\"m\",version=\"1\"} 5\n\
kubemaas_inference_queue_depth{model=\"m\",version=\"1\"} 2\n\
kubemaas_request_duration_seconds_bucket{model=\"m\",version=\"1\",execution_provider=\"CPUExecutionProvider\",le=\"0.01\"} 50\n\
kubemaas_request_duration_seconds_bucket{model=\"m\",version=\"1\",execution_provider=\"CPUExecutionProvider\",le=\"0.1\"} 104\n\
kubemaas_request_duration_seconds_bucket{model=\"m\",version=\"1\",execution_provider=\"CPUExecutionProvider\",le=\"+Inf\"} 104\n";

    #[test]
    fn the_server_exposition_parses_and_sums_over_labels() {
        let s = parse(TEXT).unwrap();
        assert_eq!(
            (s.success, s.failure, s.inflight, s.queue),
            (100.0, 4.0, 5.0, 2.0)
        );
        assert_eq!(
            s.buckets,
            vec![(0.01, 50.0), (0.1, 104.0), (f64::INFINITY, 104.0)]
        );
        assert!(s.gpu_utilization.is_empty(), "no NVML, no GPU numbers");
    }

    #[test]
    fn gpu_families_become_mean_utilization_and_summed_memory() {
        let text = format!(
            "{TEXT}nv_gpu_utilization{{gpu_uuid=\"GPU-a\"}} 0.5\nnv_gpu_utilization{{gpu_uuid=\"GPU-b\"}} 0.75\n\
nv_gpu_memory_used_bytes{{gpu_uuid=\"GPU-a\"}} 1000\nnv_gpu_memory_used_bytes{{gpu_uuid=\"GPU-b\"}} 500\n"
        );
        let s = parse(&text).unwrap();
        let w = combine(&[(&s, &s, 1.0)]);
        assert_eq!(w.gpu_utilization, Some(0.625));
        assert_eq!(w.gpu_memory_used, Some(1500.0));
        let st = to_status(&w, super::super::reconcile::now());
        assert_eq!(
            (st.gpu_utilization, st.gpu_memory_used_bytes),
            (Some(0.625), Some(1500))
        );
    }

    /// A pod's sample after `secs` seconds at `concurrency` requests in flight on average.
    fn busy(secs: f64, concurrency: f64) -> Sample {
        Sample {
            uptime: Some(100.0 + secs),
            inflight_seconds: Some(concurrency * secs),
            success: 10.0 * secs,
            ..Sample::default()
        }
    }

    /// A ModelDeployment autoscaled on concurrency 2 per pod, 1 to 10 pods.
    fn autoscaled() -> ModelDeployment {
        super::super::build::tests::md(serde_json::json!({"model": {"uri": "s3://models/m.onnx"},
            "autoscaling": {"minReplicas": 1, "maxReplicas": 10, "metric": "concurrency", "target": 2}}))
    }

    /// The scraper's entry for `obj`, with `desired` as its last decision when given.
    fn entry_for(obj: &ModelDeployment, desired: Option<i32>) -> Entry {
        let mut entry = Entry {
            owner: obj.uid(),
            params: super::super::autoscale::Params::of(obj),
            ..Entry::default()
        };
        entry.autoscale.decision = desired.map(|desired| super::super::autoscale::Decision {
            desired,
            panic: false,
            reason: format!("average concurrency {}", desired * 2),
            stale: false,
        });
        entry
    }

    #[test]
    fn a_decision_with_no_measurement_since_is_stale_and_says_so() {
        // Every pod's /metrics stopped answering (a NetworkPolicy, a CNI fault): the last decision
        // must not be enforced for ever, reverting any `kubectl scale`, without a word.
        let obj = autoscaled();
        let scraper = Scraper::new(Duration::from_secs(15), Duration::from_secs(2));
        let mut entry = entry_for(&obj, Some(1));
        let long_ago = Instant::now().checked_sub(Duration::from_secs(600)).unwrap();
        entry.history.push_back((long_ago, Window::default()));
        scraper.state.lock().unwrap().insert(key("ml", "resnet"), entry);
        let d = scraper.decision(&obj).unwrap();
        assert!(d.stale, "{d:?}");
        assert!(
            d.reason.contains("no metrics from the pods for 600 s"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn a_server_that_restarted_between_scrapes_counts_from_its_start() {
        // Its uptime went down: every counter started again from zero 8 s ago, even one that
        // happens to read higher than before (50 against 10).
        let before = Sample {
            uptime: Some(100.0),
            success: 10.0,
            inflight_seconds: Some(30.0),
            buckets: vec![(0.1, 10.0), (f64::INFINITY, 10.0)],
            ..Sample::default()
        };
        let now = Sample {
            uptime: Some(8.0),
            success: 50.0,
            inflight_seconds: Some(16.0),
            buckets: vec![(0.1, 50.0), (f64::INFINITY, 50.0)],
            ..Sample::default()
        };
        let w = combine(&[(&before, &now, 15.0)]);
        assert!((w.rps - 6.25).abs() < 1e-9, "{w:?}");
        assert!((w.concurrency - 2.0).abs() < 1e-9, "{w:?}");
        assert!((w.seconds - 8.0).abs() < 1e-9, "{w:?}");
        assert!(w.p99.is_some_and(|p| p <= 0.1), "{w:?}");
    }

    #[test]
    fn pods_that_did_not_answer_count_at_the_average_of_those_that_did() {
        // Four ready pods at concurrency 2 each; one's /metrics timed out this round. Leaving it
        // out told the autoscaler the load was 6, and it settled on 3 pods for a load of 8.
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(15);
        let uid = |i: usize| format!("pod-{i}");
        let mut pods: HashMap<String, (Instant, Sample)> =
            (0..4).map(|i| (uid(i), (t0, busy(0.0, 2.0)))).collect();
        let answered: Vec<(String, Instant, Sample)> =
            (0..3).map(|i| (uid(i), t1, busy(15.0, 2.0))).collect();
        let ready: HashSet<&str> = ["pod-0", "pod-1", "pod-2", "pod-3"].into_iter().collect();
        let w = measure(&pods, &answered, &ready, &HashMap::new()).unwrap();
        assert!((w.concurrency - 8.0).abs() < 1e-9, "{w:?}");
        assert!((w.rps - 40.0).abs() < 1e-9, "{w:?}");
        // The totals stand for four pods: the autoscaler's panic check divides by this count,
        // and one answer out of four read as a fourfold burst on one pod.
        assert_eq!(w.pods, 4);
        remember(&mut pods, answered, &ready);
        // The pod that did not answer keeps its last sample, for a rate when it answers again.
        assert_eq!(pods.len(), 4);
        assert_eq!(pods["pod-3"].0, t0);
        // A pod that no longer exists is forgotten.
        let existing: HashSet<&str> = ["pod-0", "pod-1", "pod-2"].into_iter().collect();
        remember(&mut pods, Vec::new(), &existing);
        assert_eq!(pods.len(), 3);
    }

    #[test]
    fn a_round_where_no_ready_pod_answered_measures_nothing_rather_than_zero() {
        // Zero would let the autoscaler scale down to minReplicas at peak load.
        let t0 = Instant::now();
        let pods: HashMap<String, (Instant, Sample)> = [("pod-0".to_string(), (t0, busy(0.0, 2.0)))].into();
        let ready: HashSet<&str> = ["pod-0", "pod-1"].into_iter().collect();
        assert!(measure(&pods, &[], &ready, &HashMap::new()).is_none());
        // With no ready pod at all, zero is the truth.
        assert_eq!(
            measure(&pods, &[], &HashSet::new(), &HashMap::new()).map(|w| w.pods),
            Some(0)
        );
    }

    #[test]
    fn no_ready_pod_is_no_news_to_the_autoscaler() {
        // 8 pods at concurrency 16 (target 2), then every pod fails readiness for 6 minutes:
        // the load did not leave, the pods did. The decision must stay at 8, not fall to 1.
        let obj = autoscaled();
        let stamp = super::super::reconcile::now();
        let mut entry = entry_for(&obj, None);
        let t0 = Instant::now();
        let at = |round: u64| t0 + Duration::from_secs(15 * round);
        let busy = Window {
            concurrency: 16.0,
            rps: 1600.0,
            pods: 8,
            ..Window::default()
        };
        for round in 0..8 {
            observe(&mut entry, &obj, busy.clone(), at(round), &stamp, Some(8));
        }
        assert_eq!(entry.autoscale.decision.as_ref().map(|d| d.desired), Some(8));
        for round in 8..33 {
            observe(&mut entry, &obj, combine(&[]), at(round), &stamp, Some(8));
        }
        assert_eq!(entry.autoscale.decision.as_ref().map(|d| d.desired), Some(8));
        // Status still says that nothing is ready.
        assert_eq!(entry.published.as_ref().map(|m| m.pods), Some(0));
    }

    #[test]
    fn a_pod_just_ready_counts_the_load_it_carried_since_it_turned_ready() {
        // A scale-up from 1 pod at concurrency 8. new-1 turned ready 5 s ago (after 35 s of
        // loading) and has carried concurrency 2 since: its counters began at zero when it
        // started. Leaving it out until its second round told the autoscaler the load was 8 when
        // it was 10. new-2 and new-3 are ready but did not answer: with no sample they carried
        // nothing that can be known, and counting them at the old pod's average made it 32 and
        // overshot to 6 pods (e2e).
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(15);
        let pods: HashMap<String, (Instant, Sample)> = [("old".to_string(), (t0, busy(0.0, 8.0)))].into();
        let new_one = Sample {
            uptime: Some(40.0),
            inflight_seconds: Some(10.0),
            success: 50.0,
            ..Sample::default()
        };
        let answered = vec![
            ("old".to_string(), t1, busy(15.0, 8.0)),
            ("new-1".to_string(), t1, new_one.clone()),
        ];
        let ready: HashSet<&str> = ["old", "new-1", "new-2", "new-3"].into_iter().collect();
        let since: HashMap<&str, f64> = [("new-1", 5.0), ("old", 60.0)].into();
        let w = measure(&pods, &answered, &ready, &since).unwrap();
        assert!((w.concurrency - 10.0).abs() < 1e-9, "{w:?}");
        assert!((w.rps - 20.0).abs() < 1e-9, "{w:?}");
        assert_eq!(w.pods, 2, "the two pods measured");
        // Ready for longer than its uptime says it ran (clocks apart): its uptime bounds it.
        let long: HashMap<&str, f64> = [("new-1", 80.0)].into();
        let w = measure(&pods, &answered, &ready, &long).unwrap();
        assert!((w.concurrency - 8.25).abs() < 1e-9, "{w:?}");
        // A pod whose Ready time is not known to be recent (ready long before the operator
        // watched it) gives no window: not counted.
        let w = measure(&pods, &answered, &ready, &HashMap::new()).unwrap();
        assert!((w.concurrency - 8.0).abs() < 1e-9, "{w:?}");
        // With no pod measured before (a new leader's first round), first-time pods are not the
        // whole load: nothing is measured rather than a part.
        assert!(measure(&HashMap::new(), &answered, &ready, &since).is_none());
        // A server that does not report its uptime gives no window to divide by: not counted.
        let no_clock = vec![
            ("old".to_string(), t1, busy(15.0, 8.0)),
            (
                "new-1".to_string(),
                t1,
                Sample {
                    uptime: None,
                    ..new_one
                },
            ),
        ];
        let w = measure(&pods, &no_clock, &ready, &since).unwrap();
        assert!((w.concurrency - 8.0).abs() < 1e-9, "{w:?}");
        assert_eq!(w.pods, 1);
    }

    #[test]
    fn a_pod_back_from_unready_pairs_with_its_last_sample_not_a_fresh_start() {
        // Pod b failed readiness for a round (overloaded) and came back. Its server did not
        // restart: its counters hold everything since it started. Forgotten while unready, it
        // read as a first-time pod, and 60 request-seconds over its 5 s of readiness as
        // concurrency 12: a burst that panicked the autoscaler to maxReplicas.
        let t0 = Instant::now();
        let (t1, t2) = (t0 + Duration::from_secs(15), t0 + Duration::from_secs(30));
        let member = |uid: &str, ready: Option<f64>| (uid.to_string(), "127.0.0.1".to_string(), ready);
        let existing: HashSet<&str> = ["a", "b"].into_iter().collect();
        let mut pods: HashMap<String, (Instant, Sample)> = HashMap::new();
        let both = [member("a", None), member("b", None)];
        step(
            &mut pods,
            vec![("a".into(), t0, busy(0.0, 2.0)), ("b".into(), t0, busy(0.0, 2.0))],
            &both,
            &existing,
        );
        step(
            &mut pods,
            vec![("a".into(), t1, busy(15.0, 2.0))],
            &[member("a", None)],
            &existing,
        );
        let back = [member("a", None), member("b", Some(5.0))];
        let w = step(
            &mut pods,
            vec![
                ("a".into(), t2, busy(30.0, 2.0)),
                ("b".into(), t2, busy(30.0, 2.0)),
            ],
            &back,
            &existing,
        )
        .unwrap();
        assert!((w.concurrency - 4.0).abs() < 1e-9, "{w:?}");
        // A pod that is gone is forgotten.
        let only_a: HashSet<&str> = ["a"].into_iter().collect();
        step(&mut pods, Vec::new(), &[member("a", None)], &only_a);
        assert!(!pods.contains_key("b"));
    }

    #[test]
    fn a_pods_ready_time_counts_only_when_recent_and_is_never_short() {
        let now = k8s_openapi::jiff::Timestamp::from_second(1_000_000).unwrap();
        let pod = |status: &str, secs_ago: i64| -> Pod {
            serde_json::from_value(serde_json::json!({"status": {"conditions": [
                {"type": "Ready", "status": status,
                 "lastTransitionTime": Time(k8s_openapi::jiff::Timestamp::from_second(1_000_000 - secs_ago).unwrap())}
            ]}}))
            .unwrap()
        };
        let recent = Duration::from_secs(30);
        assert_eq!(ready_for(&pod("True", 5), now, recent), Some(6.0));
        assert_eq!(
            ready_for(&pod("True", 100), now, recent),
            None,
            "ready before the last rounds"
        );
        assert_eq!(ready_for(&pod("False", 5), now, recent), None);
        assert_eq!(ready_for(&Pod::default(), now, recent), None);
        // The window a first-time pod's counters cover is at least the scrape interval.
        let interval = Duration::from_secs(15);
        assert_eq!(first_window(&pod("True", 5), now, interval), Some(15.0));
        assert_eq!(first_window(&pod("True", 20), now, interval), Some(21.0));
        assert_eq!(first_window(&pod("True", 40), now, interval), None);
    }

    #[test]
    fn a_decision_serves_only_the_object_and_the_autoscaling_it_was_made_for() {
        let concurrency = autoscaled();
        let scraper = Scraper::new(Duration::from_secs(15), Duration::from_secs(2));
        let mut entry = entry_for(&concurrency, Some(8));
        entry.history.push_back((Instant::now(), Window::default()));
        scraper.state.lock().unwrap().insert(key("ml", "resnet"), entry);
        assert_eq!(scraper.decision(&concurrency).map(|d| d.desired), Some(8));
        assert_eq!(scraper.decision(&concurrency).map(|d| d.stale), Some(false));
        // Switched to rps: the concurrency decision is not the rps autoscaler's.
        let mut rps = concurrency.clone();
        rps.spec.autoscaling.as_mut().unwrap().metric = kubemaas_crds::v1alpha1::AutoscalingMetric::Rps;
        assert!(scraper.decision(&rps).is_none());
        // Deleted and created again under the same name: a new object, with no decision yet.
        let mut again = concurrency.clone();
        again.metadata.uid = Some("2222-3333".into());
        assert!(scraper.decision(&again).is_none());
    }

    #[test]
    fn a_fresh_autoscaler_holds_the_running_replicas_through_the_scale_down_stabilization() {
        // A new leader (or a changed target) starts with no memory. What runs counts as a
        // recommendation made at take-over, as the HPA does: a calm first window does not cut
        // 5 pods to 1 at once, which every operator upgrade (a leader change) would do.
        use super::super::autoscale::Params;
        let p = Params {
            metric: kubemaas_crds::v1alpha1::AutoscalingMetric::Concurrency,
            target: 2.0,
            min: 1,
            max: 10,
            stable: Duration::from_secs(60),
            scale_down: Duration::from_secs(120),
        };
        let calm = Window {
            concurrency: 0.5,
            pods: 5,
            ..Window::default()
        };
        let start = Instant::now();
        let mut entry = Entry::default();
        let mut step = |at: u64, running: i32| {
            let now = start + Duration::from_secs(at);
            entry.history.push_back((now, calm.clone()));
            autoscale_step(&p, &mut entry, now, Some(running));
            entry.autoscale.decision.clone().unwrap()
        };
        let first = step(0, 5);
        assert_eq!(first.desired, 5, "{}", first.reason);
        assert!(first.reason.contains("holding 5"), "{}", first.reason);
        assert_eq!(step(60, 5).desired, 5);
        // Past the stabilization window, the calm measurement decides, half the pods at a time.
        assert_eq!(step(121, 5).desired, 2);
        // Without a stabilization window there is nothing to hold but the rate: half the pods.
        let mut entry = Entry::default();
        let now = start;
        entry.history.push_back((now, calm.clone()));
        let p0 = Params {
            scale_down: Duration::ZERO,
            ..p.clone()
        };
        autoscale_step(&p0, &mut entry, now, Some(5));
        assert_eq!(entry.autoscale.decision.unwrap().desired, 2);
    }

    #[test]
    fn only_the_deployment_of_this_object_counts_as_what_runs() {
        // Deleted and created again under the same name, the new object's autoscaler must not take
        // over the old Deployment's count (garbage collection has not removed it yet).
        use super::super::build::tests::md;
        let m = md(serde_json::json!({"model": {"uri": "s3://models/m.onnx"}}));
        let uid = m.uid().unwrap();
        let deployment = |owner: &str| -> k8s_openapi::api::apps::v1::Deployment {
            serde_json::from_value(serde_json::json!({"metadata": {"name": "resnet", "ownerReferences": [
                {"apiVersion": "kubemaas.io/v1alpha1", "kind": "ModelDeployment", "name": "resnet", "uid": owner}]},
                "spec": {"replicas": 7, "selector": {}, "template": {}}}))
            .unwrap()
        };
        assert_eq!(replicas_if_owned(&deployment(&uid), &m), Some(7));
        assert_eq!(replicas_if_owned(&deployment("an-older-object"), &m), None);
    }

    #[test]
    fn garbage_is_an_error_not_zeros() {
        assert_eq!(parse("<html>hello</html>"), Err(ScrapeError::Parse));
        assert_eq!(parse("process_cpu_seconds_total 3\n"), Err(ScrapeError::Parse));
        assert_eq!(
            parse("nv_inference_request_success{model=\"m\"} banana\n"),
            Err(ScrapeError::Parse)
        );
    }

    #[test]
    fn quantiles_interpolate_within_buckets_like_prometheus() {
        let b = [(0.01, 50.0), (0.1, 100.0), (f64::INFINITY, 100.0)];
        assert!((quantile(0.5, &b).unwrap() - 0.01).abs() < 1e-12);
        assert!((quantile(0.75, &b).unwrap() - 0.055).abs() < 1e-12);
        assert_eq!(quantile(0.5, &[(0.1, 0.0), (f64::INFINITY, 0.0)]), None);
        // Everything beyond the last finite bucket: its bound is all that is known.
        assert_eq!(quantile(0.99, &[(0.1, 0.0), (f64::INFINITY, 4.0)]), Some(0.1));
    }

    #[test]
    fn a_window_is_the_deltas_over_each_pods_own_time() {
        let before = parse(TEXT).unwrap();
        let mut now = before.clone();
        now.success += 200.0;
        now.failure += 20.0;
        now.duration_us += 4_000_000.0; // 4 request-seconds in 2 s: concurrency 2
        now.inferences += 800.0;
        now.executions += 200.0;
        now.buckets = vec![(0.01, 160.0), (0.1, 324.0), (f64::INFINITY, 324.0)];
        let w = combine(&[(&before, &now, 2.0)]);
        assert!((w.rps - 110.0).abs() < 1e-9, "{w:?}");
        assert!((w.eps - 10.0).abs() < 1e-9);
        assert!((w.concurrency - 2.0).abs() < 1e-9);
        assert_eq!(w.batch_avg, Some(4.0));
        // The server's time-weighted in-flight count wins over completed durations.
        let (mut b2, mut n2) = (before.clone(), now.clone());
        b2.inflight_seconds = Some(10.0);
        n2.inflight_seconds = Some(13.0);
        assert!((combine(&[(&b2, &n2, 2.0)]).concurrency - 1.5).abs() < 1e-9);
        // The server's clock wins over when the answers arrived.
        b2.uptime = Some(100.0);
        n2.uptime = Some(103.0);
        let w = combine(&[(&b2, &n2, 1.2)]);
        assert!(
            (w.concurrency - 1.0).abs() < 1e-9 && (w.seconds - 3.0).abs() < 1e-9,
            "{w:?}"
        );
        assert!(w.p50.unwrap() <= 0.01 + 1e-12);
        // A restarted server's counters start again from zero: its whole value is new.
        let restarted = Sample {
            success: 10.0,
            buckets: vec![(0.01, 10.0), (f64::INFINITY, 10.0)],
            ..Sample::default()
        };
        let w = combine(&[(&before, &restarted, 1.0)]);
        assert!((w.rps - 10.0).abs() < 1e-9, "{w:?}");
    }

    #[test]
    fn history_is_kept_only_as_far_back_as_request_driven_autoscaling_reads() {
        let md = |autoscaling: serde_json::Value| {
            super::super::build::tests::md(
                serde_json::json!({"model": {"uri": "s3://m/m.onnx"}, "autoscaling": autoscaling}),
            )
        };
        assert_eq!(history_kept(&md(serde_json::json!(null))), Duration::ZERO);
        assert_eq!(
            history_kept(&md(serde_json::json!({"maxReplicas": 3}))),
            Duration::ZERO,
            "cpu: the HPA's job"
        );
        let kpa = md(
            serde_json::json!({"maxReplicas": 3, "metric": "rps", "target": 50,
            "stableWindowSeconds": 120, "scaleDownStabilizationSeconds": 30}),
        );
        assert_eq!(history_kept(&kpa), Duration::from_secs(120));
    }

    fn status(rps: f64, inflight: i64) -> TrafficMetrics {
        to_status(
            &Window {
                rps,
                inflight: inflight as f64,
                pods: 1,
                seconds: 15.0,
                ..Window::default()
            },
            super::super::reconcile::now(),
        )
    }

    #[test]
    fn a_new_leader_with_no_ready_pod_replaces_the_traffic_status_says_is_flowing() {
        // status.metrics says 3 pods serve 40 requests/s (written by the previous leader); the
        // model was scaled to zero since. A new leader's first window has no pod: it must say
        // so, not leave the old numbers standing for ever.
        let mut obj = autoscaled();
        let mut shown = status(40.0, 3);
        shown.pods = 3;
        obj.status = Some(kubemaas_crds::v1alpha1::ModelDeploymentStatus {
            metrics: Some(shown),
            ..Default::default()
        });
        let mut entry = entry_for(&obj, None);
        let stamp = super::super::reconcile::now();
        assert!(observe(
            &mut entry,
            &obj,
            combine(&[]),
            Instant::now(),
            &stamp,
            Some(0)
        ));
        assert_eq!(
            entry.published.as_ref().map(|m| (m.pods, m.requests_per_second)),
            Some((0, 0.0))
        );
        // With nothing shown before, there is still nothing to publish.
        let fresh = autoscaled();
        let mut entry = entry_for(&fresh, None);
        assert!(!observe(
            &mut entry,
            &fresh,
            combine(&[]),
            Instant::now(),
            &stamp,
            Some(0)
        ));
        assert!(entry.published.is_none());
    }

    #[test]
    fn only_meaningful_changes_are_published() {
        let a = status(100.0, 4);
        assert!(meaningful(None, &a));
        assert!(
            !meaningful(Some(&a), &status(105.0, 5)),
            "5 % and one request is noise"
        );
        assert!(meaningful(Some(&a), &status(120.0, 4)));
        assert!(meaningful(Some(&a), &status(100.0, 9)));
        assert!(
            meaningful(Some(&status(3.0, 0)), &status(0.0, 0)),
            "traffic stopping shows"
        );
        assert!(
            !meaningful(Some(&status(0.0, 0)), &status(0.0, 0)),
            "idle writes nothing"
        );
        assert_eq!(round3(1234.5), 1230.0);
        assert_eq!(round3(0.012345), 0.0123);
    }
}
