//! Operator metrics (Prometheus text): reconciles, errors by reason, duration histogram, writes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// Reconciles started.
pub const RECONCILES: &str = "kubemaas_operator_reconciles_total";
/// Failed reconciles by reason.
pub const FAILURES: &str = "kubemaas_operator_reconcile_errors_total";
/// Reconcile duration.
pub const DURATION: &str = "kubemaas_operator_reconcile_duration_seconds";
/// Write requests sent (children applied or deleted, status patches).
pub const WRITES: &str = "kubemaas_operator_write_requests_total";
/// Children re-applied because a field the operator sets had been changed by someone else.
pub const DRIFT: &str = "kubemaas_operator_drift_corrections_total";
/// Apiserver requests retried at once after a transient error (conflict, 5xx, no answer).
pub const RETRIES: &str = "kubemaas_operator_api_retries_total";

/// Count behind [`RETRIES`]; process-wide, as the retry helper runs below the reconcile context.
pub static API_RETRIES: AtomicU64 = AtomicU64::new(0);

/// Serving pods' `/metrics` scraped.
pub const SCRAPES: &str = "kubemaas_operator_scrapes_total";
/// Scrapes that failed, by reason (timeout, connect, status, parse).
pub const SCRAPE_ERRORS: &str = "kubemaas_operator_scrape_errors_total";

/// 1 while this replica leads.
pub const LEADER: &str = "kubemaas_operator_leader";

const BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Operator counters.
#[derive(Default, Debug)]
pub struct Metrics {
    reconciles: AtomicU64,
    writes: AtomicU64,
    leader: AtomicU64,
    failures: Mutex<BTreeMap<&'static str, u64>>,
    drift: Mutex<BTreeMap<String, u64>>,
    scrapes: AtomicU64,
    scrape_errors: Mutex<BTreeMap<String, u64>>,
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

/// Observes a reconcile's duration when dropped.
pub struct Timer<'a> {
    metrics: &'a Metrics,
    start: Instant,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        let s = self.start.elapsed().as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.metrics.buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.metrics.count.fetch_add(1, Relaxed);
        self.metrics.sum_us.fetch_add((s * 1e6) as u64, Relaxed);
    }
}

impl Metrics {
    /// Counts a reconcile and times it until the returned guard drops.
    pub fn reconcile_started(&self) -> Timer<'_> {
        self.reconciles.fetch_add(1, Relaxed);
        Timer {
            metrics: self,
            start: Instant::now(),
        }
    }

    /// Counts a failure.
    pub fn reconcile_failed(&self, reason: &'static str) {
        if let Ok(mut f) = self.failures.lock() {
            *f.entry(reason).or_default() += 1;
        }
    }

    /// Counts a drift correction of a child of `kind`.
    pub fn drift_corrected(&self, kind: &str) {
        if let Ok(mut d) = self.drift.lock() {
            *d.entry(kind.to_string()).or_default() += 1;
        }
    }

    /// Counts a scrape of a serving pod, and its failure if it failed.
    pub fn scraped(&self, error: Option<crate::controller::scrape::ScrapeError>) {
        self.scrapes.fetch_add(1, Relaxed);
        if let Some(e) = error
            && let Ok(mut m) = self.scrape_errors.lock()
        {
            *m.entry(e.to_string()).or_default() += 1;
        }
    }

    /// Counts write requests.
    pub fn child_writes(&self, n: usize) {
        self.writes.fetch_add(n as u64, Relaxed);
    }

    /// Sets leadership.
    pub fn set_leader(&self, leader: bool) {
        self.leader.store(u64::from(leader), Relaxed);
    }

    /// Write requests sent so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Relaxed)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# HELP {RECONCILES} Reconciles started.\n# TYPE {RECONCILES} counter\n{RECONCILES} {}",
            self.reconciles.load(Relaxed)
        );
        let _ = writeln!(
            o,
            "# HELP {FAILURES} Failed reconciles by reason.\n# TYPE {FAILURES} counter"
        );
        by_label(&mut o, FAILURES, "reason", &self.failures);
        let _ = writeln!(
            o,
            "# HELP {WRITES} Write requests sent to the apiserver.\n# TYPE {WRITES} counter\n{WRITES} {}",
            self.writes()
        );
        let _ = writeln!(
            o,
            "# HELP {DRIFT} Children re-applied because someone else changed a field the operator sets.\n# TYPE {DRIFT} counter"
        );
        by_label(&mut o, DRIFT, "kind", &self.drift);
        let _ = writeln!(
            o,
            "# HELP {RETRIES} Apiserver requests retried after a transient error.\n# TYPE {RETRIES} counter\n{RETRIES} {}",
            API_RETRIES.load(Relaxed)
        );
        let _ = writeln!(
            o,
            "# HELP {SCRAPES} Serving pods' /metrics scraped.\n# TYPE {SCRAPES} counter\n{SCRAPES} {}",
            self.scrapes.load(Relaxed)
        );
        let _ = writeln!(
            o,
            "# HELP {SCRAPE_ERRORS} Scrapes of serving pods that failed, by reason.\n# TYPE {SCRAPE_ERRORS} counter"
        );
        by_label(&mut o, SCRAPE_ERRORS, "reason", &self.scrape_errors);
        let _ = writeln!(
            o,
            "# HELP {LEADER} 1 while this replica holds the leader lease.\n# TYPE {LEADER} gauge\n{LEADER} {}",
            self.leader.load(Relaxed)
        );
        let _ = writeln!(
            o,
            "# HELP {DURATION} Reconcile duration.\n# TYPE {DURATION} histogram"
        );
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                o,
                "{DURATION}_bucket{{le=\"{b}\"}} {}",
                self.buckets[i].load(Relaxed)
            );
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(
            o,
            "{DURATION}_bucket{{le=\"+Inf\"}} {count}\n{DURATION}_sum {}\n{DURATION}_count {count}",
            self.sum_us.load(Relaxed) as f64 / 1e6
        );
        o
    }
}

/// One sample of `name` per entry of `counts`, labelled `label`.
fn by_label<K: std::fmt::Display>(o: &mut String, name: &str, label: &str, counts: &Mutex<BTreeMap<K, u64>>) {
    if let Ok(m) = counts.lock() {
        for (value, n) in m.iter() {
            let _ = writeln!(o, "{name}{{{label}=\"{value}\"}} {n}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_and_failures_show_in_the_exposition() {
        let m = Metrics::default();
        drop(m.reconcile_started());
        m.reconcile_failed("ApplyFailed");
        m.child_writes(2);
        m.drift_corrected("Deployment");
        m.scraped(None);
        m.scraped(Some(crate::controller::scrape::ScrapeError::Timeout));
        let t = m.render();
        assert!(t.contains("kubemaas_operator_scrapes_total 2\n"));
        assert!(t.contains("kubemaas_operator_scrape_errors_total{reason=\"timeout\"} 1\n"));
        assert!(t.contains("kubemaas_operator_drift_corrections_total{kind=\"Deployment\"} 1\n"));
        assert!(t.contains("kubemaas_operator_reconciles_total 1\n"));
        assert!(t.contains("kubemaas_operator_reconcile_errors_total{reason=\"ApplyFailed\"} 1\n"));
        assert!(t.contains("kubemaas_operator_reconcile_duration_seconds_count 1\n"));
        assert!(t.contains("kubemaas_operator_write_requests_total 2\n"));
    }
}
