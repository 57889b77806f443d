//! Per-model statistics and their Prometheus text rendering.
//!
//! One set of atomic counters per model version feeds both Triton's statistics endpoint and
//! `/metrics`, so the two can never disagree. The `nv_*` families keep Triton's names and labels
//! exactly (a Prometheus client library would append `_total` to counters and break Triton
//! dashboards), so the exposition is written here.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Successful requests (Triton name).
pub const REQUEST_SUCCESS: &str = "nv_inference_request_success";
/// Failed requests, by `reason` (Triton name).
pub const REQUEST_FAILURE: &str = "nv_inference_request_failure";
/// Inferences performed; a batched request counts its batch size (Triton name).
pub const INFERENCE_COUNT: &str = "nv_inference_count";
/// Model executions (Triton name).
pub const EXEC_COUNT: &str = "nv_inference_exec_count";
/// Cumulative request duration in microseconds (Triton name).
pub const REQUEST_DURATION_US: &str = "nv_inference_request_duration_us";
/// Cumulative queue time in microseconds (Triton name).
pub const QUEUE_DURATION_US: &str = "nv_inference_queue_duration_us";
/// Cumulative input conversion time in microseconds (Triton name).
pub const COMPUTE_INPUT_US: &str = "nv_inference_compute_input_duration_us";
/// Cumulative execution time in microseconds (Triton name).
pub const COMPUTE_INFER_US: &str = "nv_inference_compute_infer_duration_us";
/// Cumulative output conversion time in microseconds (Triton name).
pub const COMPUTE_OUTPUT_US: &str = "nv_inference_compute_output_duration_us";
/// Requests accepted and not yet answered (Triton name).
pub const PENDING: &str = "nv_inference_pending_request_count";
/// Requests waiting for an instance or for their batch to form (not yet executing).
pub const QUEUE_DEPTH: &str = "kubemaas_inference_queue_depth";
/// Time-weighted in-flight requests: the integral of the in-flight count over time, in seconds.
/// Its rate is the average concurrency, exactly, which the operator's autoscaler scales on.
pub const INFLIGHT_SECONDS: &str = "kubemaas_inflight_request_seconds_total";
/// Seconds since the server started, taken when `/metrics` is rendered: the exact time between
/// two scrapes on the server's own clock, whatever the network delayed.
pub const UPTIME: &str = "kubemaas_uptime_seconds";

static STARTED: std::sync::LazyLock<std::time::Instant> = std::sync::LazyLock::new(std::time::Instant::now);

/// Marks the server's start (the first call fixes it); returns the seconds since.
pub fn uptime() -> f64 {
    STARTED.elapsed().as_secs_f64()
}

/// End-to-end request latency histogram.
pub const REQUEST_DURATION_SECONDS: &str = "kubemaas_request_duration_seconds";
/// Model load time.
pub const MODEL_LOAD_SECONDS: &str = "kubemaas_model_load_duration_seconds";
/// 1 when the model version is ready.
pub const MODEL_READY: &str = "kubemaas_model_ready";
/// Info metric carrying the execution provider in use.
pub const MODEL_INFO: &str = "kubemaas_model_info";

/// Rows per execution of a model with dynamic batching on (histogram).
pub const BATCH_SIZE: &str = "kubemaas_batch_size";
/// Time each successful request waited for an instance or for its batch to form (histogram).
pub const QUEUE_DURATION_SECONDS: &str = "kubemaas_queue_duration_seconds";

/// Histogram bucket upper bounds in seconds.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Batch-size histogram bucket upper bounds, in rows.
pub const BATCH_SIZE_BUCKETS: [f64; 11] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// Adds one observation of `value` to the cumulative bucket `counts` of `bounds`.
fn observe(counts: &[AtomicU64], bounds: &[f64], value: f64) {
    for (count, &bound) in counts.iter().zip(bounds) {
        if value <= bound {
            count.fetch_add(1, Relaxed);
        }
    }
}

/// Why a request failed, as Triton labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FailureReason {
    /// The request was invalid for the model.
    Rejected,
    /// The client left (closed its connection or cancelled its call) before the answer.
    Canceled,
    /// The runtime failed.
    Backend,
    /// Anything else (e.g. not ready).
    Other,
}

impl FailureReason {
    fn label(self) -> &'static str {
        match self {
            FailureReason::Rejected => "REJECTED",
            FailureReason::Canceled => "CANCELED",
            FailureReason::Backend => "BACKEND",
            FailureReason::Other => "OTHER",
        }
    }
}

/// A count and cumulative nanoseconds (Triton's `StatisticDuration`).
#[derive(Debug, Default)]
pub struct Duration2 {
    /// Number of observations.
    pub count: AtomicU64,
    /// Total nanoseconds.
    pub ns: AtomicU64,
}

impl Duration2 {
    fn add(&self, d: Duration) {
        self.count.fetch_add(1, Relaxed);
        self.ns.fetch_add(d.as_nanos() as u64, Relaxed);
    }

    /// JSON form: `{"count": N, "ns": N}`.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"count": self.count.load(Relaxed), "ns": self.ns.load(Relaxed)})
    }
}

/// A count integrated over time.
#[derive(Debug)]
struct Integral {
    since: std::time::Instant,
    level: i64,
    seconds: f64,
}

impl Default for Integral {
    fn default() -> Self {
        Integral {
            since: std::time::Instant::now(),
            level: 0,
            seconds: 0.0,
        }
    }
}

impl Integral {
    /// The integral up to now, after which the level changes by `delta`.
    fn step(&mut self, delta: i64) -> f64 {
        let now = std::time::Instant::now();
        self.seconds += self.level.max(0) as f64 * now.duration_since(self.since).as_secs_f64();
        self.since = now;
        self.level += delta;
        self.seconds
    }
}

/// Counts one request in a gauge until dropped (on every exit path, including a cancelled
/// future or a batch job that is answered without running).
#[derive(Debug)]
pub struct GaugeToken(Arc<AtomicI64>);

impl GaugeToken {
    /// Adds one to `gauge` until the token is dropped.
    pub fn new(gauge: &Arc<AtomicI64>) -> GaugeToken {
        gauge.fetch_add(1, Relaxed);
        GaugeToken(gauge.clone())
    }
}

impl Drop for GaugeToken {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Statistics of one model version.
#[derive(Debug, Default)]
pub struct ModelStats {
    /// Successful requests.
    pub success: Duration2,
    /// Failed requests.
    pub fail: Duration2,
    /// Time waiting for a free instance.
    pub queue: Duration2,
    /// Input conversion.
    pub compute_input: Duration2,
    /// Execution.
    pub compute_infer: Duration2,
    /// Output conversion.
    pub compute_output: Duration2,
    /// Inferences (batch rows).
    pub inference_count: AtomicU64,
    /// Executions.
    pub execution_count: AtomicU64,
    /// Accepted, unanswered requests, and their integral over time (see [`INFLIGHT_SECONDS`]).
    inflight: Mutex<Integral>,
    /// Requests waiting for an instance or a batch (shared with the batcher's queue).
    pub queued: Arc<AtomicI64>,
    /// Unix time in ms of the last inference.
    pub last_inference_ms: AtomicU64,
    failures: Mutex<BTreeMap<FailureReason, u64>>,
    /// Executions per batch size (rows): count and the phases' cumulative times.
    batches: Mutex<BTreeMap<u64, [Duration2; 3]>>,
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    /// The queue-time histogram's buckets (its count and sum are `queue`'s).
    queue_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    /// The batch-size histogram: buckets, batched executions and their rows.
    batch_buckets: [AtomicU64; BATCH_SIZE_BUCKETS.len()],
    batched_executions: AtomicU64,
    batched_rows: AtomicU64,
    /// Recorders share it, a snapshot takes it alone: a reader never sees one request counted in
    /// compute_input but not yet in compute_infer (perf_analyzer aborts on such a snapshot).
    consistent: std::sync::RwLock<()>,
}

impl ModelStats {
    /// A request was accepted (`+1`) or answered (`-1`): the in-flight gauge and its integral.
    pub fn inflight(&self, delta: i64) {
        if let Ok(mut i) = self.inflight.lock() {
            i.step(delta);
        }
    }

    /// Requests accepted and not yet answered.
    pub fn pending(&self) -> i64 {
        self.inflight.lock().map(|i| i.level.max(0)).unwrap_or(0)
    }

    /// Seconds of in-flight requests so far (see [`INFLIGHT_SECONDS`]).
    pub fn inflight_seconds(&self) -> f64 {
        self.inflight.lock().map(|mut i| i.step(0)).unwrap_or(0.0)
    }

    /// Records a successful request with the phases of the execution it ran in.
    pub fn record_success(&self, total: Duration, queue: Duration, phases: crate::backend::PhaseTimes) {
        let _recording = self.consistent.read();
        self.success.add(total);
        self.queue.add(queue);
        observe(&self.queue_buckets, &LATENCY_BUCKETS, queue.as_secs_f64());
        self.compute_input.add(phases.input);
        self.compute_infer.add(phases.infer);
        self.compute_output.add(phases.output);
        self.observe(total);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.last_inference_ms.store(now, Relaxed);
    }

    /// Records one execution of `rows` rows, when it happens: an execution whose clients all left
    /// while it ran still ran and is counted. `batched` also counts it in Triton's `batch_stats`.
    pub fn record_execution(&self, rows: u64, phases: crate::backend::PhaseTimes, batched: bool) {
        let _recording = self.consistent.read();
        self.inference_count.fetch_add(rows, Relaxed);
        self.execution_count.fetch_add(1, Relaxed);
        if batched {
            self.batched_executions.fetch_add(1, Relaxed);
            self.batched_rows.fetch_add(rows, Relaxed);
            observe(&self.batch_buckets, &BATCH_SIZE_BUCKETS, rows as f64);
        }
        if batched && let Ok(mut b) = self.batches.lock() {
            let e = b.entry(rows).or_default();
            e[0].add(phases.input);
            e[1].add(phases.infer);
            e[2].add(phases.output);
        }
    }

    /// Records a failed request.
    pub fn record_failure(&self, total: Duration, reason: FailureReason) {
        let _recording = self.consistent.read();
        self.fail.add(total);
        self.observe(total);
        if let Ok(mut f) = self.failures.lock() {
            *f.entry(reason).or_default() += 1;
        }
    }

    fn observe(&self, d: Duration) {
        observe(&self.buckets, &LATENCY_BUCKETS, d.as_secs_f64());
    }

    /// Triton's `model_stats` entry for this model version, taken while no request is half
    /// recorded.
    pub fn triton_json(&self, name: &str, version: &str) -> serde_json::Value {
        let _snapshot = self.consistent.write();
        serde_json::json!({
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms.load(Relaxed),
            "inference_count": self.inference_count.load(Relaxed),
            "execution_count": self.execution_count.load(Relaxed),
            "inference_stats": self.inference_stats_json(),
            "batch_stats": self.batch_stats_json(),
            "memory_usage": [],
        })
    }

    /// Triton's `batch_stats`: one entry per batch size executed.
    fn batch_stats_json(&self) -> serde_json::Value {
        let batches = self.batches.lock().map(|b| {
            b.iter()
                .map(|(rows, [i, c, o])| {
                    serde_json::json!({"batch_size": rows, "compute_input": i.json(),
                        "compute_infer": c.json(), "compute_output": o.json()})
                })
                .collect::<Vec<_>>()
        });
        serde_json::Value::Array(batches.unwrap_or_default())
    }

    /// Triton's `inference_stats` object.
    pub fn inference_stats_json(&self) -> serde_json::Value {
        let zero = serde_json::json!({"count": 0, "ns": 0});
        serde_json::json!({
            "success": self.success.json(),
            "fail": self.fail.json(),
            "queue": self.queue.json(),
            "compute_input": self.compute_input.json(),
            "compute_infer": self.compute_infer.json(),
            "compute_output": self.compute_output.json(),
            "cache_hit": zero,
            "cache_miss": zero,
        })
    }
}

/// What `/metrics` needs to know about one model version.
pub struct ModelMetricsView<'a> {
    /// Model name.
    pub model: &'a str,
    /// Version.
    pub version: &'a str,
    /// Execution provider (empty if not loaded).
    pub execution_provider: &'a str,
    /// Ready or not.
    pub ready: bool,
    /// Load duration, if loaded.
    pub load_time: Option<Duration>,
    /// Counters.
    pub stats: &'a ModelStats,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Renders the Prometheus text exposition (format 0.0.4) for all models.
pub fn render(models: &[ModelMetricsView<'_>]) -> String {
    let mut out = String::with_capacity(4096);
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(&mut out, UPTIME, "gauge", "Seconds since the server started");
    let _ = writeln!(out, "{UPTIME} {}", uptime());
    let labels =
        |m: &ModelMetricsView<'_>| format!("model=\"{}\",version=\"{}\"", escape(m.model), escape(m.version));
    type Getter = fn(&ModelStats) -> u64;
    let counters: [(&str, &str, Getter); 8] = [
        (REQUEST_SUCCESS, "Number of successful inference requests", |s| {
            s.success.count.load(Relaxed)
        }),
        (INFERENCE_COUNT, "Number of inferences performed", |s| {
            s.inference_count.load(Relaxed)
        }),
        (EXEC_COUNT, "Number of model executions performed", |s| {
            s.execution_count.load(Relaxed)
        }),
        (
            REQUEST_DURATION_US,
            "Cumulative inference request duration in microseconds",
            |s| (s.success.ns.load(Relaxed) + s.fail.ns.load(Relaxed)) / 1000,
        ),
        (
            QUEUE_DURATION_US,
            "Cumulative inference queuing duration in microseconds",
            |s| s.queue.ns.load(Relaxed) / 1000,
        ),
        (
            COMPUTE_INPUT_US,
            "Cumulative compute input duration in microseconds",
            |s| s.compute_input.ns.load(Relaxed) / 1000,
        ),
        (
            COMPUTE_INFER_US,
            "Cumulative compute inference duration in microseconds",
            |s| s.compute_infer.ns.load(Relaxed) / 1000,
        ),
        (
            COMPUTE_OUTPUT_US,
            "Cumulative inference compute output duration in microseconds",
            |s| s.compute_output.ns.load(Relaxed) / 1000,
        ),
    ];
    for (name, help, get) in counters {
        family(&mut out, name, "counter", help);
        for m in models {
            let _ = writeln!(out, "{name}{{{}}} {}", labels(m), get(m.stats));
        }
    }
    family(
        &mut out,
        REQUEST_FAILURE,
        "counter",
        "Number of failed inference requests",
    );
    for m in models {
        let failures = m.stats.failures.lock().map(|f| f.clone()).unwrap_or_default();
        for reason in [
            FailureReason::Rejected,
            FailureReason::Canceled,
            FailureReason::Backend,
            FailureReason::Other,
        ] {
            let n = failures.get(&reason).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "{REQUEST_FAILURE}{{{},reason=\"{}\"}} {n}",
                labels(m),
                reason.label()
            );
        }
    }
    type Gauge = fn(&ModelStats) -> f64;
    let gauges: [(&str, &str, &str, Gauge); 3] = [
        (
            PENDING,
            "gauge",
            "Instantaneous number of pending requests awaiting execution",
            |s| s.pending() as f64,
        ),
        (
            INFLIGHT_SECONDS,
            "counter",
            "Integral of in-flight requests over time in seconds; its rate is the average concurrency",
            ModelStats::inflight_seconds,
        ),
        (
            QUEUE_DEPTH,
            "gauge",
            "Requests waiting for an instance or for their batch to form",
            |s| s.queued.load(Relaxed).max(0) as f64,
        ),
    ];
    for (name, kind, help, get) in gauges {
        family(&mut out, name, kind, help);
        for m in models {
            let _ = writeln!(out, "{name}{{{}}} {}", labels(m), get(m.stats));
        }
    }
    family(
        &mut out,
        REQUEST_DURATION_SECONDS,
        "histogram",
        "End-to-end inference request latency in seconds",
    );
    for m in models {
        let l = format!(
            "{},execution_provider=\"{}\"",
            labels(m),
            escape(m.execution_provider)
        );
        let count = m.stats.success.count.load(Relaxed) + m.stats.fail.count.load(Relaxed);
        let sum_ns = m.stats.success.ns.load(Relaxed) + m.stats.fail.ns.load(Relaxed);
        let buckets = (&LATENCY_BUCKETS[..], &m.stats.buckets[..]);
        histogram(
            &mut out,
            REQUEST_DURATION_SECONDS,
            &l,
            buckets,
            count,
            sum_ns as f64 / 1e9,
        );
    }
    family(
        &mut out,
        QUEUE_DURATION_SECONDS,
        "histogram",
        "Time each successful request waited for an instance or for its batch to form, in seconds",
    );
    for m in models {
        let (count, ns) = (m.stats.queue.count.load(Relaxed), m.stats.queue.ns.load(Relaxed));
        let buckets = (&LATENCY_BUCKETS[..], &m.stats.queue_buckets[..]);
        histogram(
            &mut out,
            QUEUE_DURATION_SECONDS,
            &labels(m),
            buckets,
            count,
            ns as f64 / 1e9,
        );
    }
    family(
        &mut out,
        BATCH_SIZE,
        "histogram",
        "Rows per execution of a model with dynamic batching on (Triton's batch_stats)",
    );
    for m in models {
        let s = m.stats;
        let count = s.batched_executions.load(Relaxed);
        let rows = s.batched_rows.load(Relaxed) as f64;
        let buckets = (&BATCH_SIZE_BUCKETS[..], &s.batch_buckets[..]);
        histogram(&mut out, BATCH_SIZE, &labels(m), buckets, count, rows);
    }
    family(
        &mut out,
        MODEL_LOAD_SECONDS,
        "gauge",
        "Time taken to load and warm up the model version",
    );
    for m in models {
        if let Some(t) = m.load_time {
            let _ = writeln!(out, "{MODEL_LOAD_SECONDS}{{{}}} {}", labels(m), t.as_secs_f64());
        }
    }
    family(
        &mut out,
        MODEL_READY,
        "gauge",
        "1 when the model version is loaded and ready",
    );
    for m in models {
        let _ = writeln!(out, "{MODEL_READY}{{{}}} {}", labels(m), u8::from(m.ready));
    }
    family(
        &mut out,
        MODEL_INFO,
        "gauge",
        "Model version information; the execution provider really in use",
    );
    for m in models {
        if !m.execution_provider.is_empty() {
            let ep = escape(m.execution_provider);
            let _ = writeln!(out, "{MODEL_INFO}{{{},execution_provider=\"{ep}\"}} 1", labels(m));
        }
    }
    out
}

/// Writes one series of a histogram: its cumulative buckets (`bounds` and their counts), `+Inf`
/// (which is `count`), `_sum` and `_count`.
fn histogram(
    out: &mut String,
    name: &str,
    labels: &str,
    buckets: (&[f64], &[AtomicU64]),
    count: u64,
    sum: f64,
) {
    for (bound, n) in buckets.0.iter().zip(buckets.1) {
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels},le=\"{bound}\"}} {}",
            n.load(Relaxed)
        );
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
    let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stats_snapshot_never_sees_a_request_half_recorded() {
        let stats = std::sync::Arc::new(ModelStats::default());
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0..3)
            .map(|_| {
                let (stats, done) = (stats.clone(), done.clone());
                std::thread::spawn(move || {
                    while !done.load(Relaxed) {
                        let phases = crate::backend::PhaseTimes::default();
                        stats.record_execution(1, phases, true);
                        stats.record_success(Duration::from_micros(5), Duration::ZERO, phases);
                    }
                })
            })
            .collect();
        for _ in 0..2_000 {
            let j = stats.triton_json("m", "1");
            let count = |k: &str| j["inference_stats"][k]["count"].as_u64();
            assert_eq!(count("compute_input"), count("compute_infer"), "{j}");
            assert_eq!(count("compute_infer"), count("compute_output"), "{j}");
            assert_eq!(count("success"), count("queue"), "{j}");
            // Executions are counted when they run, before their requests answer.
            assert!(count("success") <= j["execution_count"].as_u64(), "{j}");
            let batched: u64 = j["batch_stats"]
                .as_array()
                .map(|b| {
                    b.iter()
                        .filter_map(|e| e["compute_infer"]["count"].as_u64())
                        .sum()
                })
                .unwrap_or(0);
            assert_eq!(Some(batched), j["execution_count"].as_u64(), "{j}");
        }
        done.store(true, Relaxed);
        for w in writers {
            let _ = w.join();
        }
    }

    #[test]
    fn rendering_keeps_triton_names_without_total_suffix() {
        let stats = ModelStats::default();
        stats.record_execution(2, crate::backend::PhaseTimes::default(), false);
        stats.record_success(
            Duration::from_millis(3),
            Duration::from_micros(10),
            crate::backend::PhaseTimes::default(),
        );
        stats.record_failure(Duration::from_millis(1), FailureReason::Rejected);
        let text = render(&[ModelMetricsView {
            model: "m",
            version: "1",
            execution_provider: "CPUExecutionProvider",
            ready: true,
            load_time: Some(Duration::from_millis(5)),
            stats: &stats,
        }]);
        assert!(text.contains("nv_inference_request_success{model=\"m\",version=\"1\"} 1\n"));
        assert!(text.contains("nv_inference_count{model=\"m\",version=\"1\"} 2\n"));
        assert!(
            text.contains("nv_inference_request_failure{model=\"m\",version=\"1\",reason=\"REJECTED\"} 1\n")
        );
        assert!(text.contains("le=\"0.005\"} 2\n"));
        assert!(
            !text.lines().any(|l| l.starts_with("nv_") && l.contains("_total")),
            "Triton's names have no _total suffix"
        );
        assert!(text.contains("kubemaas_inference_queue_depth{model=\"m\",version=\"1\"} 0\n"));
    }

    #[test]
    fn in_flight_seconds_integrate_the_in_flight_count_over_time() {
        let stats = ModelStats::default();
        let t0 = std::time::Instant::now();
        stats.inflight(1);
        stats.inflight(1);
        let t1 = std::time::Instant::now();
        std::thread::sleep(Duration::from_millis(100));
        let t2 = std::time::Instant::now();
        stats.inflight(-1);
        let t3 = std::time::Instant::now();
        std::thread::sleep(Duration::from_millis(100));
        let t4 = std::time::Instant::now();
        stats.inflight(-1);
        let t5 = std::time::Instant::now();
        assert_eq!(stats.pending(), 0);
        let s = stats.inflight_seconds();
        // 2 in flight, then 1: bounded by the instants taken around each change, however long
        // the sleeps really took.
        let secs = |a: std::time::Instant, b: std::time::Instant| b.duration_since(a).as_secs_f64();
        let low = 2.0 * secs(t1, t2) + secs(t3, t4);
        let high = 2.0 * secs(t0, t3) + secs(t2, t5);
        assert!(low <= s && s <= high, "{low} <= {s} <= {high}");
        assert!(s >= 0.3, "{s}");
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(stats.inflight_seconds(), s, "nothing in flight adds nothing");
        let queued = GaugeToken::new(&stats.queued);
        assert_eq!(stats.queued.load(Relaxed), 1);
        drop(queued);
        assert_eq!(stats.queued.load(Relaxed), 0);
    }
}
