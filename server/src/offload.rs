//! CPU-heavy request work off the I/O threads.
//!
//! The async runtime has few worker threads (`--io-threads`; on 2 cores, one): they accept
//! connections and move bytes, and inference runs on the instances' own threads. Parsing or
//! writing a large JSON body takes milliseconds of one core (about 1 ms per MB), during which an
//! I/O thread would serve no other connection. Such work runs here instead, at most one job per
//! core at a time; small bodies are handled in place, where a hand-over would cost more than it
//! saves.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::protocol::error::ApiError;

/// JSON this long or longer is parsed or written off the I/O threads: about 60 µs of work, several
/// times what handing it over costs.
pub const OFFLOAD_BYTES: usize = 64 * 1024;

/// A bounded pool for CPU-heavy request work.
#[derive(Clone)]
pub struct Offload {
    /// One permit per core: more jobs at once would only share the cores, each slower.
    permits: Arc<Semaphore>,
    threshold: usize,
}

impl Offload {
    /// At most `cores` jobs at once; work on fewer than `threshold` bytes runs in place.
    pub fn new(cores: usize, threshold: usize) -> Offload {
        Offload {
            permits: Arc::new(Semaphore::new(cores.max(1))),
            threshold,
        }
    }

    /// Runs `work`, which handles about `bytes` bytes: in place when small, else on a blocking
    /// thread once a core's permit is free.
    pub async fn run<T, F>(&self, bytes: usize, work: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        if bytes < self.threshold {
            return Ok(work());
        }
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::Unavailable("the server is shutting down".into()))?;
        // The permit goes with the work: a caller that goes away (its client left) cannot stop a
        // blocking job, and the job still occupies its core until it ends.
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await
        .map_err(|e| ApiError::Internal(format!("request work failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn small_work_runs_in_place_and_large_work_on_another_thread() {
        let pool = Offload::new(1, 100);
        let here = std::thread::current().id();
        let small = pool.run(99, std::thread::current).await.map(|t| t.id());
        let large = pool.run(100, std::thread::current).await.map(|t| t.id());
        assert_eq!(small.ok(), Some(here));
        assert!(large.is_ok_and(|id| id != here));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_more_jobs_run_at_once_than_permits() {
        let pool = Offload::new(2, 0);
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let jobs: Vec<_> = (0..12)
            .map(|_| {
                let (pool, running, most) = (pool.clone(), running.clone(), most.clone());
                tokio::spawn(async move {
                    pool.run(1, move || {
                        use std::sync::atomic::Ordering::SeqCst;
                        let now = running.fetch_add(1, SeqCst) + 1;
                        most.fetch_max(now, SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(5));
                        running.fetch_sub(1, SeqCst);
                    })
                    .await
                })
            })
            .collect();
        for j in jobs {
            assert!(matches!(j.await, Ok(Ok(()))));
        }
        let most = most.load(std::sync::atomic::Ordering::SeqCst);
        assert!((1..=2).contains(&most), "{most} jobs ran at once with 2 permits");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_whose_caller_left_keeps_its_core_until_it_ends() {
        use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
        let pool = Offload::new(1, 0);
        let base = std::time::Instant::now();
        let (first_ended, second_started) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let first = {
            let (pool, ended) = (pool.clone(), first_ended.clone());
            tokio::spawn(async move {
                pool.run(1, move || {
                    std::thread::sleep(std::time::Duration::from_millis(60));
                    ended.store(base.elapsed().as_nanos() as u64, SeqCst);
                })
                .await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(15)).await;
        first.abort();
        let started = second_started.clone();
        let second = pool
            .run(1, move || started.store(base.elapsed().as_nanos() as u64, SeqCst))
            .await;
        assert!(second.is_ok());
        let (ended, started) = (first_ended.load(SeqCst), second_started.load(SeqCst));
        assert!(
            ended > 0 && ended <= started,
            "first job ended at {ended} ns, second started at {started} ns"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_panicking_job_is_an_internal_error_not_a_crash() {
        let pool = Offload::new(1, 0);
        let r: Result<(), ApiError> = pool.run(1, || panic!("boom")).await;
        assert!(matches!(r, Err(ApiError::Internal(_))));
    }
}
