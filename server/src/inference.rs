//! Protocol-neutral request execution: validation against the model signature, queueing for a free
//! instance (or the model's dynamic batcher), running off the async reactor, and statistics. Every
//! protocol goes through here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{Claim, OnRun, PhaseTimes, Reply, Signature, TensorSpec, Work};
use crate::metrics::{FailureReason, ModelStats};
use crate::protocol::error::ApiError;
use crate::repository::LoadedModel;
use crate::tensor::Tensor;

/// Finds the model input called `name`, or explains which inputs exist.
pub fn input_spec<'a>(sig: &'a Signature, name: &str) -> Result<&'a TensorSpec, ApiError> {
    sig.inputs.iter().find(|i| i.name == name).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "unknown input {name:?}; the model's inputs are {}",
            names(&sig.inputs)
        ))
    })
}

fn names(specs: &[TensorSpec]) -> String {
    specs
        .iter()
        .map(|s| format!("{:?}", s.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks that `inputs` are exactly the model's inputs with compatible shapes.
pub fn validate_inputs(sig: &Signature, inputs: &[Tensor]) -> Result<(), ApiError> {
    for (i, t) in inputs.iter().enumerate() {
        if inputs[..i].iter().any(|o| o.name == t.name) {
            return Err(ApiError::BadRequest(format!(
                "input {:?} is given more than once",
                t.name
            )));
        }
        let spec = input_spec(sig, &t.name)?;
        if spec.datatype != t.dtype {
            return Err(ApiError::BadRequest(format!(
                "input {:?} has datatype {} but the model expects {}",
                t.name, t.dtype, spec.datatype
            )));
        }
        let fits = spec.shape.len() == t.shape.len()
            && spec
                .shape
                .iter()
                .zip(&t.shape)
                .all(|(&m, &d)| m < 0 || m as usize == d);
        if !fits {
            return Err(ApiError::BadRequest(format!(
                "input {:?} has shape {:?} but the model expects {:?} (-1 is any size)",
                t.name, t.shape, spec.shape
            )));
        }
    }
    if let Some(missing) = sig
        .inputs
        .iter()
        .find(|s| !inputs.iter().any(|t| t.name == s.name))
    {
        return Err(ApiError::BadRequest(format!(
            "missing input {:?}; the model needs {}",
            missing.name,
            names(&sig.inputs)
        )));
    }
    Ok(())
}

/// Checks requested output names.
pub fn validate_outputs(sig: &Signature, outputs: &[String]) -> Result<(), ApiError> {
    for (i, name) in outputs.iter().enumerate() {
        if !sig.outputs.iter().any(|o| &o.name == name) {
            return Err(ApiError::BadRequest(format!(
                "unknown output {name:?}; the model's outputs are {}",
                names(&sig.outputs)
            )));
        }
        if outputs[..i].contains(name) {
            return Err(ApiError::BadRequest(format!(
                "output {name:?} is requested more than once"
            )));
        }
    }
    Ok(())
}

/// The Triton failure reason for an error.
pub fn failure_reason(e: &ApiError) -> FailureReason {
    match e {
        ApiError::BadRequest(_) | ApiError::PayloadTooLarge(_) | ApiError::QueueFull(_) => {
            FailureReason::Rejected
        }
        ApiError::Internal(_) => FailureReason::Backend,
        _ => FailureReason::Other,
    }
}

/// The span every protocol runs an inference request in (`--log-level debug` shows it), so a log
/// line from anywhere below names the protocol, model and version it served.
pub fn request_span(protocol: &'static str, model: &str, version: Option<&str>) -> tracing::Span {
    tracing::debug_span!("infer", protocol, model, version = version.unwrap_or(""))
}

/// Counts a request as in flight (the pending gauge and its time integral) from when it is
/// routed to its model until it is answered, on every exit path, including a dropped (cancelled)
/// future. Reading and decoding the body count: a client waits through them too.
pub struct InFlight<'a>(&'a ModelStats);

impl<'a> InFlight<'a> {
    /// Starts counting a request of the model with `stats`.
    pub fn enter(stats: &'a ModelStats) -> InFlight<'a> {
        stats.inflight(1);
        InFlight(stats)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.inflight(-1);
    }
}

/// Validates and runs one request on `model`; records statistics (timed from `start`). With a
/// `timeout`, a request still waiting for an instance (or its batch) when it runs out is answered
/// 503 without running.
pub async fn execute(
    model: Arc<LoadedModel>,
    stats: &Arc<ModelStats>,
    start: Instant,
    inputs: Vec<Tensor>,
    outputs: Vec<String>,
    timeout: Option<std::time::Duration>,
) -> Result<Vec<Tensor>, ApiError> {
    let mut left = Canceled(Some((stats, start)));
    let result = execute_inner(model, stats, start, inputs, outputs, timeout).await;
    left.0 = None;
    if let Err(e) = &result {
        stats.record_failure(start.elapsed(), failure_reason(e));
    }
    result
}

/// Counts a request whose client left before its answer (the future dropped unfinished) as a
/// failure, `reason="CANCELED"` as in Triton, so success and failure still add up to the requests
/// the model was given.
struct Canceled<'a>(Option<(&'a Arc<ModelStats>, Instant)>);

impl Drop for Canceled<'_> {
    fn drop(&mut self) {
        if let Some((stats, start)) = self.0.take() {
            stats.record_failure(start.elapsed(), FailureReason::Canceled);
        }
    }
}

async fn execute_inner(
    model: Arc<LoadedModel>,
    stats: &Arc<ModelStats>,
    start: Instant,
    inputs: Vec<Tensor>,
    outputs: Vec<String>,
    timeout: Option<std::time::Duration>,
) -> Result<Vec<Tensor>, ApiError> {
    let sig = model.backend.signature();
    validate_inputs(sig, &inputs)?;
    validate_outputs(sig, &outputs)?;
    let rows = match (sig.inputs.first(), inputs.first()) {
        (Some(spec), Some(t)) if spec.shape.first() == Some(&-1) => {
            t.shape.first().copied().unwrap_or(1) as u64
        }
        _ => 1,
    };
    // Rows are what requests are joined by: a request whose inputs disagree on the first
    // dimension cannot be split back by rows, so it runs alone.
    let uniform = inputs
        .iter()
        .all(|t| t.shape.first() == inputs.first().and_then(|f| f.shape.first()));
    if let Some(batcher) = model.batcher.get().filter(|_| uniform) {
        let queued = crate::metrics::GaugeToken::new(&stats.queued);
        let done = batcher
            .submit(inputs, outputs, rows as usize, timeout, queued)
            .await?;
        stats.record_success(start.elapsed(), done.queue, done.phases);
        return Ok(done.outputs);
    }
    let counted = stats.clone();
    let on_run: OnRun = Box::new(move |phases| counted.record_execution(rows, *phases, false));
    let Some(batcher) = model.batcher.get() else {
        return queue_for_an_instance(&model, stats, start, inputs, outputs, timeout, on_run).await;
    };
    // Run alone, it is still held to the largest batch.
    let most = inputs.iter().filter_map(|t| t.shape.first()).copied().max();
    batcher.check_rows(most.unwrap_or(0))?;
    // A batched model's other requests keep to the instance permits its batcher paces itself by.
    let queued = Instant::now();
    let waiting = crate::metrics::GaugeToken::new(&stats.queued);
    let acquire = model.slots.clone().acquire_owned();
    let permit = match timeout {
        Some(t) => tokio::time::timeout(t, acquire)
            .await
            .map_err(|_| crate::batcher::timed_out(queued.elapsed()))?,
        None => acquire.await,
    }
    .map_err(|_| ApiError::Unavailable("the model is being unloaded".into()))?;
    drop(waiting);
    let queue_time = queued.elapsed();
    // The instance's own thread runs it. The permit goes with the work and is released only when
    // the instance is free again, so a client that disconnects mid-run frees nothing early; one
    // that disconnects before its run starts is dropped unrun.
    let (out, phases) = run_on_instance(&model, inputs, outputs, permit, on_run).await?;
    stats.record_success(start.elapsed(), queue_time, phases);
    Ok(out)
}

/// Withdraws queued work when its caller goes (the client left): it will never run, and it stops
/// counting as pending at once.
struct Withdraw(Arc<Claim>);

impl Drop for Withdraw {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// An unbatched request: queued for the first free instance, which takes it itself the moment its
/// run ends (no hand-over through this task). The instance bound is the instances' own threads;
/// `timeout` withdraws work that has not started by then.
async fn queue_for_an_instance(
    model: &LoadedModel,
    stats: &Arc<ModelStats>,
    start: Instant,
    inputs: Vec<Tensor>,
    outputs: Vec<String>,
    timeout: Option<Duration>,
    on_run: OnRun,
) -> Result<Vec<Tensor>, ApiError> {
    let queued = Instant::now();
    // The claim holds the inputs and the pending gauge until an instance starts the work or
    // this caller withdraws it.
    let pending = Box::new(crate::metrics::GaugeToken::new(&stats.queued));
    let claim = Arc::new(Claim::new(pending, inputs));
    let withdraw = Withdraw(claim.clone());
    let (reply, mut outcome) = tokio::sync::oneshot::channel();
    model.backend.enqueue(Work {
        inputs: Vec::new(),
        outputs,
        reply: Reply::Async(reply),
        on_run: Some(on_run),
        permit: None,
        claim: Some(claim.clone()),
    });
    let outcome = match timeout {
        Some(t) => match tokio::time::timeout(t, &mut outcome).await {
            Ok(outcome) => outcome,
            Err(_) if claim.cancel() => return Err(crate::batcher::timed_out(queued.elapsed())),
            // It started just in time: its answer comes.
            Err(_) => outcome.await,
        },
        None => outcome.await,
    };
    drop(withdraw);
    let (out, phases) = outcome.map_err(stopped)??;
    let queue_time = claim
        .started()
        .map_or(Duration::ZERO, |s| s.saturating_duration_since(queued));
    stats.record_success(start.elapsed(), queue_time, phases);
    Ok(out)
}

/// Hands validated inputs to a free instance of `model` and waits for the outcome. `permit` (the
/// caller's place in the instance bound) is released by the instance's thread once it is free
/// again; `on_run` counts the execution when it happens, whoever is still waiting for it.
pub async fn run_on_instance(
    model: &LoadedModel,
    inputs: Vec<Tensor>,
    outputs: Vec<String>,
    permit: tokio::sync::OwnedSemaphorePermit,
    on_run: OnRun,
) -> Result<(Vec<Tensor>, PhaseTimes), ApiError> {
    let (reply, outcome) = tokio::sync::oneshot::channel();
    let work = Work {
        inputs,
        outputs,
        reply: Reply::Async(reply),
        on_run: Some(on_run),
        permit: Some(permit),
        claim: None,
    };
    model.backend.submit(work, None);
    Ok(outcome.await.map_err(stopped)??)
}

/// An instance's thread ended without answering (it only ends with its model).
fn stopped(_: tokio::sync::oneshot::error::RecvError) -> ApiError {
    ApiError::Internal("the model's instance stopped before answering".into())
}

/// Counts a request that failed before execution (decoding, body limits) as a failure of its model.
pub fn counted<T>(
    stats: &crate::metrics::ModelStats,
    start: Instant,
    r: Result<T, ApiError>,
) -> Result<T, ApiError> {
    if let Err(e) = &r {
        stats.record_failure(start.elapsed(), failure_reason(e));
    }
    r
}

/// Counts a request for a known but unready model as a failure before answering 503.
pub fn count_not_ready(e: crate::repository::LookupError) -> ApiError {
    if let crate::repository::LookupError::NotReady { stats, .. } = &e {
        stats.record_failure(std::time::Duration::ZERO, crate::metrics::FailureReason::Other);
    }
    e.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DataType;

    fn sig() -> Signature {
        Signature {
            inputs: vec![
                TensorSpec {
                    name: "a".into(),
                    datatype: DataType::F32,
                    shape: vec![-1, 3],
                },
                TensorSpec {
                    name: "b".into(),
                    datatype: DataType::I64,
                    shape: vec![2],
                },
            ],
            outputs: vec![TensorSpec {
                name: "y".into(),
                datatype: DataType::F32,
                shape: vec![-1],
            }],
            leading_dim_conflict: None,
        }
    }

    #[test]
    fn inputs_must_match_names_types_and_static_dims() {
        let a = Tensor::zeros("a", DataType::F32, vec![5, 3]);
        let b = Tensor::zeros("b", DataType::I64, vec![2]);
        assert!(validate_inputs(&sig(), &[a.clone(), b.clone()]).is_ok());
        let err = validate_inputs(&sig(), std::slice::from_ref(&a))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing input \"b\""), "{err}");
        let err = validate_inputs(
            &sig(),
            &[Tensor::zeros("a", DataType::F32, vec![5, 4]), b.clone()],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("expects [-1, 3]"), "{err}");
        let err = validate_inputs(&sig(), &[a.clone(), Tensor::zeros("b", DataType::I32, vec![2])])
            .unwrap_err()
            .to_string();
        assert!(err.contains("expects INT64"), "{err}");
        assert!(validate_inputs(&sig(), &[a.clone(), b.clone(), a]).is_err());
    }

    #[test]
    fn outputs_must_exist_and_be_unique() {
        assert!(validate_outputs(&sig(), &["y".into()]).is_ok());
        assert!(validate_outputs(&sig(), &["z".into()]).is_err());
        assert!(validate_outputs(&sig(), &["y".into(), "y".into()]).is_err());
    }
}
