//! The runtime boundary: a loaded model that turns input [`Tensor`]s into output tensors.
//!
//! Protocols and the batcher see only [`Backend`]; ONNX Runtime specifics live in [`ort`].

pub mod ort;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::tensor::{DataType, Tensor};

/// Name, type and shape of one model input or output; `-1` marks a dynamic dimension.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// Tensor name in the model.
    pub name: String,
    /// Element type.
    pub datatype: DataType,
    /// Dimensions, `-1` where dynamic.
    pub shape: Vec<i64>,
}

/// Inputs and outputs of a model, read from the model itself.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Signature {
    /// Model inputs, in model order.
    pub inputs: Vec<TensorSpec>,
    /// Model outputs, in model order.
    pub outputs: Vec<TensorSpec>,
    /// Why an output's first dimension is not the batch dimension, as the model's dimension
    /// names tell: it is named as a later dimension of an input (a transpose, say). Batching such
    /// a model would hand one request rows made of others'. `None` when the names say nothing
    /// against it (names differ between exporters, so a mere difference proves nothing).
    pub leading_dim_conflict: Option<String>,
}

/// Time spent in each phase of one execution (Triton's compute_input / compute_infer / compute_output).
#[derive(Debug, Clone, Copy, Default)]
pub struct PhaseTimes {
    /// Converting request tensors into runtime values.
    pub input: Duration,
    /// The runtime's own execution.
    pub infer: Duration,
    /// Converting runtime values back into tensors.
    pub output: Duration,
}

/// Errors raised by a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The ONNX Runtime library could not be loaded.
    #[error("failed to load the ONNX Runtime library: {0}")]
    Library(String),
    /// The model could not be loaded.
    #[error("failed to load model from {path}: {message}")]
    Load {
        /// Model file.
        path: String,
        /// Why.
        message: String,
    },
    /// The request's tensors are not acceptable to the model (a client error).
    #[error("{0}")]
    InvalidInput(String),
    /// The runtime failed while executing (a server error).
    #[error("inference failed: {0}")]
    Runtime(String),
}

/// What an execution returns: the outputs asked for, and the time each phase took.
pub type Outcome = Result<(Vec<Tensor>, PhaseTimes), BackendError>;

/// Where an execution's outcome goes.
pub enum Reply {
    /// To an async caller. If the caller has gone (its client disconnected) when an instance picks
    /// the work up, the work is dropped without running.
    Async(tokio::sync::oneshot::Sender<Outcome>),
    /// To a thread blocked until the outcome comes.
    Blocking(std::sync::mpsc::SyncSender<Outcome>),
}

impl Reply {
    /// Whether nobody waits for the outcome any more.
    pub fn abandoned(&self) -> bool {
        match self {
            Reply::Async(tx) => tx.is_closed(),
            Reply::Blocking(_) => false,
        }
    }

    /// Delivers the outcome; a caller that has gone is not an error.
    pub fn send(self, outcome: Outcome) {
        match self {
            Reply::Async(tx) => {
                let _ = tx.send(outcome);
            }
            Reply::Blocking(tx) => {
                let _ = tx.send(outcome);
            }
        }
    }
}

/// Called on the instance's thread after a successful run, with its phases.
pub type OnRun = Box<dyn FnOnce(&PhaseTimes) + Send>;

/// One execution handed to a model's instances.
pub struct Work {
    /// Inputs, validated against the signature.
    pub inputs: Vec<Tensor>,
    /// Outputs asked for (all when empty), in the order asked.
    pub outputs: Vec<String>,
    /// Where the outcome goes.
    pub reply: Reply,
    /// Runs after a successful run and before the reply, whether or not anyone still waits: an
    /// execution that happened is counted even when its client left.
    pub on_run: Option<OnRun>,
    /// The caller's place in the model's instance bound, released only once the instance is free
    /// again, so a client that disconnects mid-run never lets another execution start beside it.
    pub permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// For work queued with [`Backend::enqueue`]: decides between the instance starting it and
    /// its caller giving up (timeout, or the client left), whichever comes first. It holds the
    /// inputs (`inputs` is then empty).
    pub claim: Option<Arc<Claim>>,
}

/// Shared by queued work and its caller, and holding the work's inputs. Whoever takes it first
/// decides: the instance (it gets the inputs and runs them) or the caller (the work never runs,
/// and its inputs are freed at once rather than when an instance reaches it in the queue). Either
/// way, what was held until then (the pending gauge) is released at once.
pub struct Claim {
    started: OnceLock<Instant>,
    held: Mutex<Option<Held>>,
}

/// What a [`Claim`] holds for whoever takes it: something released then, and the inputs.
type Held = (Box<dyn Send>, Vec<Tensor>);

impl Claim {
    /// A claim holding `held` and the work's `inputs` until the work starts or its caller gives up.
    pub fn new(held: Box<dyn Send>, inputs: Vec<Tensor>) -> Claim {
        Claim {
            started: OnceLock::new(),
            held: Mutex::new(Some((held, inputs))),
        }
    }

    /// What was held, to whoever takes the claim first; `None` to the other. The lock decides:
    /// a separate "taken" flag let the loser reach the lock first and drop what the winner was
    /// owed, so that neither side won.
    fn take(&self) -> Option<Held> {
        self.held.lock().ok()?.take()
    }

    /// The instance's side: the inputs, when the work is its to run.
    pub fn start(&self) -> Option<Vec<Tensor>> {
        let (_, inputs) = self.take()?;
        let _ = self.started.set(Instant::now());
        Some(inputs)
    }

    /// The caller's side: true when the work will now never run.
    pub fn cancel(&self) -> bool {
        self.take().is_some()
    }

    /// When an instance started the work.
    pub fn started(&self) -> Option<Instant> {
        self.started.get().copied()
    }
}

impl Work {
    /// Work whose outcome a thread waits for on the returned receiver (warm-up, tools).
    pub fn blocking(inputs: Vec<Tensor>, outputs: Vec<String>) -> (Work, std::sync::mpsc::Receiver<Outcome>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let work = Work {
            inputs,
            outputs,
            reply: Reply::Blocking(tx),
            on_run: None,
            permit: None,
            claim: None,
        };
        (work, rx)
    }
}

/// Waits for the outcome of [`Work::blocking`]; a thread that ended without answering is an error.
fn wait(rx: std::sync::mpsc::Receiver<Outcome>) -> Outcome {
    rx.recv().unwrap_or_else(|_| {
        Err(BackendError::Runtime(
            "the model's instance stopped before answering".into(),
        ))
    })
}

/// A loaded model ready to execute. Each instance runs on its own thread; callers hand it [`Work`].
pub trait Backend: Send + Sync {
    /// Inputs and outputs as declared by the model.
    fn signature(&self) -> &Signature;
    /// The execution provider really in use, e.g. `CPUExecutionProvider`.
    fn execution_provider(&self) -> &str;
    /// Why CUDA was tried and not used (`--execution-provider auto` on a machine where CUDA
    /// failed), in the runtime's words; None when nothing fell back.
    fn execution_provider_fallback(&self) -> Option<&str> {
        None
    }
    /// Number of executions that may run at once.
    fn instances(&self) -> usize;
    /// The CUDA device of each instance, in order; empty when they run on the CPU.
    fn gpu_devices(&self) -> &[i32] {
        &[]
    }
    /// Hands `work` to instance `instance`, or to any free one when None, waiting while none is
    /// free. A caller holding a permit of the model's instance bound (one per instance) never
    /// waits: an instance is free again before its permit is released.
    fn submit(&self, work: Work, instance: Option<usize>);
    /// Hands `work` to a free instance, where it starts at once, or queues it for the first
    /// instance to come free, which takes it as soon as its run ends (no hand-over through the
    /// caller). Never waits. For work outside the instance permits; its `claim` lets the caller
    /// withdraw it while it is queued.
    fn enqueue(&self, work: Work);
    /// Runs the model on any free instance and waits for the outcome. Blocking: call it off the
    /// async reactor.
    fn infer(&self, inputs: Vec<Tensor>, outputs: &[String]) -> Outcome {
        let (work, rx) = Work::blocking(inputs, outputs.to_vec());
        self.submit(work, None);
        wait(rx)
    }
    /// Runs `inputs` once on every instance, all at once, and waits for them: warm-up before the
    /// model is served. The first error, if any. Blocking.
    fn infer_on_every_instance(&self, inputs: &[Tensor]) -> Result<(), BackendError> {
        let waiting: Vec<_> = (0..self.instances())
            .map(|k| {
                let (work, rx) = Work::blocking(inputs.to_vec(), Vec::new());
                self.submit(work, Some(k));
                rx
            })
            .collect();
        // Every run is waited for, even after an error: none is left running behind the caller.
        let outcomes: Vec<Outcome> = waiting.into_iter().map(wait).collect();
        outcomes.into_iter().find_map(Result::err).map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicI64;
    use std::sync::atomic::Ordering;

    /// Counts itself in a gauge while alive, like the pending gauge a claim holds.
    struct Gauged(Arc<AtomicI64>);

    impl Drop for Gauged {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn claim() -> (Arc<Claim>, Arc<AtomicI64>) {
        let gauge = Arc::new(AtomicI64::new(1));
        (
            Arc::new(Claim::new(Box::new(Gauged(gauge.clone())), Vec::new())),
            gauge,
        )
    }

    #[test]
    fn a_claim_goes_to_whoever_takes_it_first_and_releases_what_it_held_once() {
        let (c, gauge) = claim();
        assert!(c.start().is_some() && c.started().is_some());
        assert!(!c.cancel(), "a started run cannot be withdrawn");
        assert_eq!(gauge.load(Ordering::SeqCst), 0);

        let (c, gauge) = claim();
        assert!(c.cancel());
        assert!(
            c.start().is_none() && c.started().is_none(),
            "withdrawn work never runs"
        );
        assert!(!c.cancel());
        assert_eq!(gauge.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn racing_instances_and_callers_never_both_win() {
        for _ in 0..2_000 {
            let (c, gauge) = claim();
            let (a, b) = (c.clone(), c.clone());
            let starter = std::thread::spawn(move || a.start().is_some());
            let canceller = std::thread::spawn(move || b.cancel());
            let (started, cancelled) = (starter.join().unwrap(), canceller.join().unwrap());
            assert!(started != cancelled, "exactly one side wins");
            assert_eq!(started, c.started().is_some());
            assert_eq!(gauge.load(Ordering::SeqCst), 0);
        }
    }
}
