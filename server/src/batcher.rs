//! Dynamic batching with Triton's semantics: requests for one model version queue together; as
//! soon as an instance is free, the queue is drained into one batch of at most `max_batch_size`
//! rows (on the CPU, an even share of the rows queued per instance: see [`split_cap`]),
//! waiting at most `max_queue_delay` (counted from the oldest request's arrival) for more to
//! come, unless the next request would take the batch past that cap: then it goes at once. On
//! the CPU a batch also goes once it holds its even share of the requests in flight (queued and
//! able to join it, or running on the other instances: see [`share_of_flight`]): waiting longer would only idle
//! its core. A request always runs whole, so one larger than its share runs alone. Requests are
//! concatenated along dimension 0 and every output is split back by each
//! request's rows. Requests whose other dimensions, types or requested outputs differ never share
//! a batch. A full queue refuses at once (503); a request whose client went away before its batch
//! formed is dropped without running.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{
    AtomicBool, AtomicUsize,
    Ordering::{AcqRel, Acquire, Relaxed},
};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::backend::{OnRun, PhaseTimes};
use crate::protocol::error::ApiError;
use crate::repository::LoadedModel;
use crate::tensor::{Tensor, TensorData};

/// Batching settings of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchConfig {
    /// Most rows in one execution.
    pub max_batch_size: usize,
    /// Longest the oldest queued request waits for others to join.
    pub max_queue_delay: Duration,
    /// Requests waiting beyond this are refused with 503.
    pub max_queue_size: usize,
    /// Batch sizes dispatched as soon as they are reached, before the delay is up.
    pub preferred_batch_sizes: Vec<usize>,
    /// Whether requests are joined (dynamic batching). False: a model that takes a batch
    /// dimension (Triton's `max_batch_size` without `dynamic_batching`) runs each request as its
    /// client sent it, still held to `max_batch_size` rows.
    pub combine: bool,
    /// Batch sizes a batch is padded up to (zero rows, dropped from the outputs), ascending;
    /// empty: no padding. See [`padding_sizes`]; `--pad-batches` decides per model.
    pub pad_to: Vec<usize>,
}

/// The sizes batches are padded up to: powers of two below `max`, `max`, and the preferred sizes.
///
/// On CUDA the first run of each new input shape in a session is slow (on an H200, PP-OCR cls:
/// 0.1–1.2 s against 2–3 ms, from the batch statistics), and unpadded batches of up to 64 rows
/// have 64 shapes. Padding leaves at most log2(max) + 2 shapes per request shape, each paid for
/// once per instance; the extra rows cost little on a GPU, which is why padding is on for CUDA
/// only unless asked for.
pub fn padding_sizes(max: usize, preferred: &[usize]) -> Vec<usize> {
    let mut sizes: Vec<usize> = std::iter::successors(Some(1usize), |n| n.checked_mul(2))
        .take_while(|&n| n < max)
        .chain(std::iter::once(max))
        .chain(preferred.iter().copied().filter(|&p| p > 0 && p <= max))
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    sizes
}

/// Runs every padded batch size once on every instance before the model is served, so that no
/// request pays for a shape's first run (on an H200, 0.1–1.2 s each for PP-OCR cls). Only for
/// models whose inputs are fixed beyond the first dimension: for the others, the shapes requests
/// will bring are not known. Blocking.
pub fn warm_padded_sizes(backend: &dyn crate::backend::Backend, sizes: &[usize]) -> Result<(), String> {
    let sig = backend.signature();
    if let Some(open) = sig.inputs.iter().find(|i| i.shape.iter().skip(1).any(|&d| d < 0)) {
        return Err(format!(
            "input {:?} has shape {:?}: only inputs fixed beyond the first dimension can be warmed",
            open.name, open.shape
        ));
    }
    for &rows in sizes {
        let inputs: Vec<Tensor> = sig
            .inputs
            .iter()
            .map(|i| {
                let shape = std::iter::once(rows)
                    .chain(i.shape.iter().skip(1).map(|&d| d as usize))
                    .collect();
                Tensor::warm_up_zeros(&i.name, i.datatype, shape)
            })
            .collect::<Result<_, _>>()
            .map_err(|e| format!("batch size {rows}: {e}"))?;
        backend
            .infer_on_every_instance(&inputs)
            .map_err(|e| format!("batch size {rows}: {e}"))?;
    }
    Ok(())
}

/// What a batched request gets back.
pub struct Done {
    /// This request's outputs.
    pub outputs: Vec<Tensor>,
    /// Phases of the whole batch's execution.
    pub phases: PhaseTimes,
    /// From enqueueing until the batch started.
    pub queue: Duration,
}

struct Job {
    inputs: Vec<Tensor>,
    outputs: Vec<String>,
    rows: usize,
    enqueued: Instant,
    /// When the request gives up waiting (`parameters.timeout`).
    deadline: Option<Instant>,
    reply: oneshot::Sender<Result<Done, ApiError>>,
    /// Counts the job in the queue-depth gauge until its batch starts (or it is dropped).
    queued: Option<crate::metrics::GaugeToken>,
    /// Its place in the queue, which it leaves once: to run, or because its caller gave up.
    slot: Arc<Slot>,
}

/// A request's place in a model's queue, counted in `max_queue_size` until it leaves the queue.
/// It leaves once, claimed either by the dispatcher (the request runs) or by the request's own
/// side (its client went away, or its `parameters.timeout` ran out): whoever claims first decides,
/// so a request that timed out never runs and one that runs is never answered "timed out".
struct Slot {
    pending: Arc<AtomicUsize>,
    claimed: AtomicBool,
}

impl Slot {
    /// Takes the request out of the queue; false when it was taken already.
    fn claim(&self) -> bool {
        if self.claimed.swap(true, AcqRel) {
            return false;
        }
        self.pending.fetch_sub(1, Relaxed);
        true
    }
}

/// Claims the slot when the request's side ends first: its client went away before it ran.
struct Withdraw(Arc<Slot>);

impl Drop for Withdraw {
    fn drop(&mut self) {
        self.0.claim();
    }
}

impl Job {
    /// Withdrawn: its client went away or stopped waiting, so it must not run (nor count).
    fn withdrawn(&self) -> bool {
        self.slot.claimed.load(Acquire)
    }

    /// Requests may share a batch when everything but the row count agrees.
    fn fits_with(&self, other: &Job) -> bool {
        self.outputs == other.outputs
            && self.inputs.len() == other.inputs.len()
            && self
                .inputs
                .iter()
                .zip(&other.inputs)
                .all(|(a, b)| a.name == b.name && a.dtype == b.dtype && a.shape.get(1..) == b.shape.get(1..))
    }
}

/// The queue of one model version; dropping it stops its dispatcher.
pub struct Batcher {
    tx: mpsc::UnboundedSender<Job>,
    config: BatchConfig,
    /// Requests in the queue (channel, held back, or waiting for an instance): at most
    /// `max_queue_size`. The channel itself is unbounded; this count is the bound, so requests
    /// held back for another shape and requests whose clients left are counted exactly.
    pending: Arc<AtomicUsize>,
    /// Rows in the channel, not yet taken by the dispatcher: the queue is shared out by rows.
    in_channel: Arc<AtomicUsize>,
}

impl Batcher {
    /// Starts the dispatcher for `model` (which must accept a dynamic first dimension on every
    /// input and output; see [`batchable`]).
    /// Executions are counted in `stats` (the model version's) when they run.
    pub fn start(
        model: std::sync::Weak<LoadedModel>,
        config: BatchConfig,
        stats: Arc<crate::metrics::ModelStats>,
    ) -> Batcher {
        let (tx, rx) = mpsc::unbounded_channel();
        // On the CPU each instance is a core of its own and a batch costs what its rows cost one
        // by one, so the queue is shared over all instances; on a GPU a larger batch comes almost
        // free, and the free instance takes the queue, as Triton's batcher does.
        let sharing = model.upgrade().map_or(0, |m| {
            if m.backend.execution_provider() == crate::backend::ort::CUDA_EP {
                0
            } else {
                m.backend.instances().saturating_sub(1)
            }
        });
        let in_channel = Arc::new(AtomicUsize::new(0));
        let queue = Queue {
            rx,
            rows: in_channel.clone(),
        };
        tokio::spawn(dispatch(model, config.clone(), sharing, stats, queue));
        Batcher {
            tx,
            config,
            pending: Arc::new(AtomicUsize::new(0)),
            in_channel,
        }
    }

    /// The settings.
    pub fn config(&self) -> &BatchConfig {
        &self.config
    }

    /// Refuses a request with more than `max_batch_size` rows in an input: every request of a
    /// batching model is held to it, also one that runs alone (its inputs disagree on rows).
    pub fn check_rows(&self, rows: usize) -> Result<(), ApiError> {
        if rows > self.config.max_batch_size {
            return Err(ApiError::BadRequest(format!(
                "the request has {rows} rows but this model batches at most {} (max_batch_size); split it",
                self.config.max_batch_size
            )));
        }
        Ok(())
    }

    /// Queues a validated request of `rows` rows and waits for its share of a batch.
    pub async fn submit(
        &self,
        inputs: Vec<Tensor>,
        mut outputs: Vec<String>,
        rows: usize,
        timeout: Option<Duration>,
        queued: crate::metrics::GaugeToken,
    ) -> Result<Done, ApiError> {
        self.check_rows(rows)?;
        // Outputs are matched by name, so the order asked for is restored per request below.
        let asked = outputs.clone();
        outputs.sort();
        if self.pending.fetch_add(1, Relaxed) >= self.config.max_queue_size.max(1) {
            self.pending.fetch_sub(1, Relaxed);
            return Err(ApiError::QueueFull(format!(
                "exceeds maximum queue size: the batch queue is full ({} requests waiting); retry shortly",
                self.config.max_queue_size
            )));
        }
        let slot = Arc::new(Slot {
            pending: self.pending.clone(),
            claimed: AtomicBool::new(false),
        });
        // Leaves the queue if this future is dropped (the client went away) before the request ran.
        let _withdraw = Withdraw(slot.clone());
        let (reply, done) = oneshot::channel();
        let enqueued = Instant::now();
        let deadline = timeout.map(|t| enqueued + t);
        let job = Job {
            inputs,
            outputs,
            rows,
            enqueued,
            deadline,
            reply,
            queued: Some(queued),
            slot: slot.clone(),
        };
        // Counted before it can be taken, so the count never goes below zero.
        self.in_channel.fetch_add(rows, Relaxed);
        if self.tx.send(job).is_err() {
            self.in_channel.fetch_sub(rows, Relaxed);
            return Err(ApiError::Unavailable("the model is being unloaded".into()));
        }
        let unloaded = |_| ApiError::Unavailable("the model was unloaded before the request ran".into());
        let mut done = match deadline {
            // The answer comes at the deadline, not when the dispatcher next looks at the queue;
            // unless the request started meanwhile: then it runs to its end.
            Some(at) => {
                tokio::pin!(done);
                tokio::select! {
                    r = &mut done => r.map_err(unloaded)??,
                    () = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {
                        if slot.claim() {
                            return Err(timed_out(enqueued.elapsed()));
                        }
                        done.await.map_err(unloaded)??
                    }
                }
            }
            None => done.await.map_err(unloaded)??,
        };
        if !asked.is_empty() {
            let mut ordered = Vec::with_capacity(asked.len());
            for name in &asked {
                if let Some(i) = done.outputs.iter().position(|t| &t.name == name) {
                    ordered.push(done.outputs.swap_remove(i));
                }
            }
            done.outputs = ordered;
        }
        Ok(done)
    }
}

/// Whether a model can be batched: every input and output has a dynamic first dimension, and no
/// output's first dimension is named as a later dimension of an input.
pub fn batchable(sig: &crate::backend::Signature) -> Result<(), String> {
    let fixed = sig
        .inputs
        .iter()
        .chain(&sig.outputs)
        .find(|t| t.shape.first() != Some(&-1));
    match fixed {
        Some(t) => Err(format!(
            "{:?} has shape {:?}: batching needs a dynamic first dimension on every input and output",
            t.name, t.shape
        )),
        None => match &sig.leading_dim_conflict {
            Some(why) => Err(format!(
                "{why}: batching needs every output to keep the batch dimension"
            )),
            None => Ok(()),
        },
    }
}

/// The dispatcher's end of the channel, with the rows it holds.
struct Queue {
    rx: mpsc::UnboundedReceiver<Job>,
    rows: Arc<AtomicUsize>,
}

/// Requests running on the instances, and a signal each time a batch of them ends.
#[derive(Default)]
struct Running {
    requests: AtomicUsize,
    ended: Notify,
}

/// Counts a batch's requests as running until it is dropped, when its execution ended.
struct RunningBatch {
    requests: usize,
    running: Arc<Running>,
}

impl RunningBatch {
    fn start(running: &Arc<Running>, requests: usize) -> RunningBatch {
        running.requests.fetch_add(requests, Relaxed);
        RunningBatch {
            requests,
            running: running.clone(),
        }
    }
}

impl Drop for RunningBatch {
    fn drop(&mut self) {
        self.running.requests.fetch_sub(self.requests, Relaxed);
        // A permit is stored when the dispatcher is not waiting: it then looks once more, for nothing.
        self.running.ended.notify_one();
    }
}

impl Queue {
    /// The next request still wanted (withdrawn ones are dropped here, with their inputs).
    async fn recv(&mut self) -> Option<Job> {
        loop {
            let job = self.rx.recv().await?;
            self.rows.fetch_sub(job.rows, Relaxed);
            if !job.withdrawn() {
                return Some(job);
            }
        }
    }

    /// Moves every request already in the channel to `held`, dropping withdrawn ones there too.
    fn drain_into(&mut self, held: &mut VecDeque<Job>) {
        held.retain(|j| !j.withdrawn());
        while let Ok(job) = self.rx.try_recv() {
            self.rows.fetch_sub(job.rows, Relaxed);
            if !job.withdrawn() {
                held.push_back(job);
            }
        }
    }
}

/// The longest run of `held` requests that fit `with` (in arrival order) which takes a batch of
/// `rows` rows to a larger preferred size within `cap`: how many of those requests to take.
fn to_larger_preferred(
    held: &VecDeque<Job>,
    with: &Job,
    rows: usize,
    cap: usize,
    preferred: &[usize],
) -> usize {
    let (mut taken, mut best, mut total) = (0, 0, rows);
    for j in held.iter().filter(|j| j.fits_with(with)) {
        total += j.rows;
        if total > cap {
            break;
        }
        taken += 1;
        if preferred.contains(&total) {
            best = taken;
        }
    }
    best
}

/// Rows waiting outside the batch being formed: held back, or still in the channel.
fn waiting(held: &VecDeque<Job>, rx: &Queue) -> usize {
    held.iter().map(|j| j.rows).sum::<usize>() + rx.rows.load(Relaxed)
}

/// `sharing`: how many other instances share the queue ([`split_cap`]).
async fn dispatch(
    model: std::sync::Weak<LoadedModel>,
    config: BatchConfig,
    sharing: usize,
    stats: Arc<crate::metrics::ModelStats>,
    mut rx: Queue,
) {
    // Requests that did not fit the batch being formed wait here, in arrival order.
    let mut held: VecDeque<Job> = VecDeque::new();
    // Requests in batches that are running, and a signal each time one of those batches ends.
    let running = Arc::new(Running::default());
    loop {
        held.retain(|j| !j.withdrawn());
        let first = match held.pop_front() {
            Some(j) => j,
            None => match rx.recv().await {
                Some(j) => j,
                None => return,
            },
        };
        let Some(m) = model.upgrade() else { return };
        // Wait for a free instance first: everything that arrives meanwhile joins this batch.
        // Arrivals are taken off the channel meanwhile, so that the inputs of requests whose
        // clients leave are dropped now, not when an instance frees.
        let acquire = m.slots.clone().acquire_owned();
        tokio::pin!(acquire);
        let permit = loop {
            tokio::select! {
                p = &mut acquire => match p {
                    Ok(p) => break p,
                    Err(_) => return,
                },
                j = rx.recv() => match j {
                    Some(j) => {
                        held.retain(|j| !j.withdrawn());
                        held.push_back(j);
                    }
                    None => return,
                },
            }
        };
        if first.withdrawn() {
            continue;
        }
        let deadline = tokio::time::Instant::from_std(first.enqueued + config.max_queue_delay);
        let cap = if config.combine {
            split_cap(config.max_batch_size, first.rows + waiting(&held, &rx), sharing)
        } else {
            first.rows
        };
        let mut rows = first.rows;
        let mut batch = vec![first];
        // Held requests first (they are older), then new arrivals until full or the delay is up.
        // As in Triton, a batch that the next request it could join would take past its cap is
        // full: it goes at once, not after the delay. Requests of another shape wait their turn.
        let mut full = false;
        let mut i = 0;
        while i < held.len() && rows < cap {
            if held[i].withdrawn() {
                held.remove(i);
            } else if !held[i].fits_with(&batch[0]) {
                i += 1;
            } else if rows + held[i].rows > cap {
                full = true;
                break;
            } else if let Some(j) = held.remove(i) {
                rows += j.rows;
                batch.push(j);
            }
        }
        while !full && rows < cap {
            if config.preferred_batch_sizes.contains(&rows) {
                // As in Triton: the largest preferred size the requests queued now can make, at
                // once, rather than the first one reached.
                rx.drain_into(&mut held);
                let take = to_larger_preferred(&held, &batch[0], rows, cap, &config.preferred_batch_sizes);
                let mut taken = 0;
                let mut i = 0;
                while taken < take && i < held.len() {
                    if held[i].fits_with(&batch[0]) {
                        batch.extend(held.remove(i));
                        taken += 1;
                    } else {
                        i += 1;
                    }
                }
                break;
            }
            if sharing > 0 {
                // Held requests of another shape (another sequence length, other outputs) can
                // never join: waiting for them would only hold this batch and them back.
                let joinable = held.iter().filter(|j| j.fits_with(&batch[0])).count();
                let in_flight = batch.len() + joinable + rx.rx.len() + running.requests.load(Relaxed);
                if batch.len() >= share_of_flight(in_flight, sharing) {
                    break;
                }
            }
            // Looked at again when a request comes, and on the CPU when a batch ends (fewer in flight).
            let next = tokio::select! {
                r = tokio::time::timeout_at(deadline, rx.recv()) => match r {
                    Ok(Some(j)) => j,
                    Ok(None) | Err(_) => break,
                },
                _ = running.ended.notified(), if sharing > 0 => continue,
            };
            if next.fits_with(&batch[0]) {
                if rows + next.rows <= cap {
                    rows += next.rows;
                    batch.push(next);
                    continue;
                }
                full = true;
            }
            held.push_back(next);
        }
        // A client that went away must not cost an execution, nor one that stopped waiting.
        // Claiming takes each request out of the queue; one its own side claimed first (its
        // client left, or its timeout answered it) is dropped.
        let now = Instant::now();
        let (expired, live): (Vec<Job>, Vec<Job>) = batch
            .into_iter()
            .partition(|j| j.deadline.is_some_and(|d| d <= now));
        for j in expired {
            if j.slot.claim() {
                let _ = j.reply.send(Err(timed_out(now - j.enqueued)));
            }
        }
        batch = live;
        batch.retain(|j| j.slot.claim());
        if batch.is_empty() {
            continue;
        }
        let rows: usize = batch.iter().map(|j| j.rows).sum();
        let counted = RunningBatch::start(&running, batch.len());
        tokio::spawn(run(
            m,
            permit,
            batch,
            pad_target(&config.pad_to, rows),
            stats.clone(),
            counted,
        ));
    }
}

/// The rows the batch being formed may take: all of `max`, unless `others` more instances share
/// the queue and more rows are already queued (`queued`, the first request's included) than
/// there are instances. Then the queue is shared out evenly, so that one instance does not run a
/// long batch of everything queued while the others get the crumbs. With little queued the usual
/// rule holds: wait up to the queue delay for more, up to `max`. The first request is taken
/// whole even when it alone is over the cap.
pub fn split_cap(max: usize, queued: usize, others: usize) -> usize {
    let instances = others + 1;
    if others == 0 || queued <= instances {
        return max;
    }
    queued.div_ceil(instances).min(max)
}

/// On the CPU, the requests a batch waits for before it goes: an even share of the requests in
/// flight (`in_flight`: in the batch, queued, and running on the `others` instances; queued
/// requests the batch could never take, of another shape, do not count). Closed-loop
/// clients send again when answered, so a running request is one that will be back; with no more
/// than its share, the batch would only idle its core waiting for requests that the other
/// instances hold, and on the CPU a batch costs what its rows cost one by one. A lone request
/// (one client, or one beside a long request running elsewhere) so runs at once instead of
/// waiting out the queue delay for company, as it would in Triton.
pub fn share_of_flight(in_flight: usize, others: usize) -> usize {
    in_flight.div_ceil(others + 1).max(1)
}

/// The answer to a request whose `parameters.timeout` ran out before it could run.
pub fn timed_out(waited: Duration) -> ApiError {
    ApiError::Unavailable(format!(
        "request timed out after waiting {} µs for an instance (parameters.timeout)",
        waited.as_micros()
    ))
}

async fn run(
    model: Arc<LoadedModel>,
    permit: tokio::sync::OwnedSemaphorePermit,
    mut batch: Vec<Job>,
    padded: usize,
    stats: Arc<crate::metrics::ModelStats>,
    running: RunningBatch,
) {
    let started = Instant::now();
    for j in batch.iter_mut() {
        j.queued = None;
    }
    let rows: Vec<usize> = batch.iter().map(|j| j.rows).collect();
    let total: usize = rows.iter().sum();
    let outputs = batch[0].outputs.clone();
    // Column k holds every request's input k (the same input: `fits_with` checked names).
    let mut columns: Vec<Vec<Tensor>> = (0..batch[0].inputs.len())
        .map(|_| Vec::with_capacity(batch.len()))
        .collect();
    for j in batch.iter_mut() {
        for (column, t) in columns.iter_mut().zip(std::mem::take(&mut j.inputs)) {
            column.push(t);
        }
    }
    let padded = padded.max(total);
    let inputs: Result<Vec<Tensor>, ApiError> = columns
        .into_iter()
        .map(|c| concat(c.into_iter(), padded).and_then(|t| pad(t, padded - total)))
        .collect();
    let result = match inputs {
        Ok(inputs) => {
            let on_run: OnRun = Box::new(move |phases| stats.record_execution(total as u64, *phases, true));
            crate::inference::run_on_instance(&model, inputs, outputs, permit, on_run).await
        }
        Err(e) => Err(e),
    };
    drop(running);
    let (outs, phases) = match result {
        Ok(r) => r,
        Err(e) => {
            for j in batch {
                let _ = j.reply.send(Err(e.clone()));
            }
            return;
        }
    };
    // Split every output by each request's rows.
    let mut per_request: Vec<Vec<Tensor>> = vec![Vec::with_capacity(outs.len()); batch.len()];
    for out in outs {
        match split(&out, &rows, padded) {
            Ok(parts) => {
                for (dest, part) in per_request.iter_mut().zip(parts) {
                    dest.push(part);
                }
            }
            Err(e) => {
                for j in batch {
                    let _ = j.reply.send(Err(e.clone()));
                }
                return;
            }
        }
    }
    for (j, outputs) in batch.into_iter().zip(per_request) {
        let _ = j.reply.send(Ok(Done {
            outputs,
            phases,
            queue: started.saturating_duration_since(j.enqueued),
        }));
    }
}

/// Joins tensors of the same name, type and trailing dimensions along dimension 0, in a buffer with
/// room for `capacity_rows` rows: the padded size, so that padding (`pad`) fills the same buffer
/// instead of copying the whole batch into a second one.
fn concat(parts: impl Iterator<Item = Tensor>, capacity_rows: usize) -> Result<Tensor, ApiError> {
    let parts: Vec<Tensor> = parts.collect();
    let Some(first) = parts.first() else {
        return Err(ApiError::Internal("empty batch".into()));
    };
    if parts.len() == 1 {
        return parts
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::Internal("empty batch".into()));
    }
    let mut shape = first.shape.clone();
    shape[0] = parts.iter().map(|t| t.shape[0]).sum();
    let (name, dtype) = (first.name.clone(), first.dtype);
    let data = match &first.data {
        TensorData::Raw(_) => {
            let len: usize = parts.iter().map(raw_len).sum();
            let row_bytes = len / shape[0].max(1);
            let mut buf = BytesMut::with_capacity(len.max(row_bytes * capacity_rows));
            for t in &parts {
                if let TensorData::Raw(b) = &t.data {
                    buf.extend_from_slice(b);
                }
            }
            TensorData::Raw(buf.freeze())
        }
        TensorData::Strings(_) => TensorData::Strings(
            parts
                .into_iter()
                .flat_map(|t| match t.data {
                    TensorData::Strings(s) => s,
                    TensorData::Raw(_) => Vec::new(),
                })
                .collect(),
        ),
    };
    Tensor::new(name, dtype, shape, data).map_err(|e| ApiError::Internal(format!("batching inputs: {e}")))
}

/// The smallest padding size holding `rows`, or `rows` itself when none does (or none is set).
fn pad_target(sizes: &[usize], rows: usize) -> usize {
    // A batch of no rows stays empty: a padded row of a [0, huge] shape would be huge.
    if rows == 0 {
        return 0;
    }
    sizes.iter().copied().find(|&s| s >= rows).unwrap_or(rows)
}

/// Appends `extra` rows of zeros (empty strings for BYTES) along dimension 0, in place when the
/// buffer is not shared (a joined batch has room for its padded size).
fn pad(t: Tensor, extra: usize) -> Result<Tensor, ApiError> {
    if extra == 0 {
        return Ok(t);
    }
    let per_row: usize = t.shape[1..].iter().product();
    let mut shape = t.shape.clone();
    shape[0] += extra;
    let data = match t.data {
        TensorData::Raw(b) => {
            let row_bytes = t.dtype.size().unwrap_or(1) * per_row;
            let len = b.len() + extra * row_bytes;
            let mut buf = b.try_into_mut().unwrap_or_else(|shared| {
                let mut buf = BytesMut::with_capacity(len);
                buf.extend_from_slice(&shared);
                buf
            });
            buf.resize(len, 0);
            TensorData::Raw(buf.freeze())
        }
        TensorData::Strings(mut v) => {
            v.resize(v.len() + extra * per_row, bytes::Bytes::new());
            TensorData::Strings(v)
        }
    };
    Tensor::new(t.name, t.dtype, shape, data).map_err(|e| ApiError::Internal(format!("padding a batch: {e}")))
}

fn raw_len(t: &Tensor) -> usize {
    match &t.data {
        TensorData::Raw(b) => b.len(),
        TensorData::Strings(_) => 0,
    }
}

/// Cuts `t` along dimension 0 into pieces of `rows` rows each.
fn split(t: &Tensor, rows: &[usize], total: usize) -> Result<Vec<Tensor>, ApiError> {
    if t.shape.first() != Some(&total) {
        return Err(ApiError::Internal(format!(
            "output {:?} has shape {:?}, not {total} rows: the model does not keep the batch dimension, so it cannot be batched",
            t.name, t.shape
        )));
    }
    let per_row: usize = t.shape[1..].iter().product();
    let mut at = 0;
    let mut out = Vec::with_capacity(rows.len());
    for &r in rows {
        let mut shape = t.shape.clone();
        shape[0] = r;
        let data = match &t.data {
            TensorData::Raw(b) => {
                let size = t.dtype.size().unwrap_or(1) * per_row;
                TensorData::Raw(b.slice(at * size..(at + r) * size))
            }
            TensorData::Strings(s) => TensorData::Strings(s[at * per_row..(at + r) * per_row].to_vec()),
        };
        out.push(Tensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape,
            data,
        });
        at += r;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DataType;
    use bytes::Bytes;

    fn f32s(name: &str, rows: usize, cols: usize, start: f32) -> Tensor {
        let v: Vec<u8> = (0..rows * cols)
            .flat_map(|i| (start + i as f32).to_le_bytes())
            .collect();
        Tensor::new(
            name,
            DataType::F32,
            vec![rows, cols],
            TensorData::Raw(Bytes::from(v)),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn the_rows_in_the_channel_are_counted_in_and_out() {
        // A batcher without a dispatcher: this test plays the dispatcher's end of the channel.
        let (tx, rx) = mpsc::unbounded_channel();
        let in_channel = Arc::new(AtomicUsize::new(0));
        let pending = Arc::new(AtomicUsize::new(0));
        let batcher = Arc::new(Batcher {
            tx,
            pending: pending.clone(),
            config: BatchConfig {
                max_batch_size: 8,
                max_queue_delay: Duration::from_millis(1),
                max_queue_size: 2,
                preferred_batch_sizes: vec![],
                combine: true,
                pad_to: vec![],
            },
            in_channel: in_channel.clone(),
        });
        let mut queue = Queue {
            rx,
            rows: in_channel.clone(),
        };
        let gauge = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let submit = |rows: usize| {
            let b = batcher.clone();
            let token = crate::metrics::GaugeToken::new(&gauge);
            tokio::spawn(async move {
                b.submit(vec![f32s("x", rows, 2, 0.0)], vec![], rows, None, token)
                    .await
            })
        };
        let three = submit(3);
        let five = submit(5);
        let counted = |n| {
            let in_channel = in_channel.clone();
            async move {
                for _ in 0..1000 {
                    if in_channel.load(Relaxed) == n {
                        return true;
                    }
                    tokio::task::yield_now().await;
                }
                false
            }
        };
        assert!(counted(8).await, "two requests of 3 and 5 rows in the channel");
        // The queue holds 2: a third request is refused and its rows are not left counted.
        let refused = submit(1).await.unwrap();
        assert!(
            matches!(refused, Err(ApiError::QueueFull(_))),
            "{:?}",
            refused.err()
        );
        assert_eq!(in_channel.load(Relaxed), 8);
        // Taking a job out uncounts its rows, whichever order they come in.
        let first = queue.recv().await.unwrap();
        assert_eq!(in_channel.load(Relaxed), 8 - first.rows);
        let second = queue.recv().await.unwrap();
        assert_eq!(in_channel.load(Relaxed), 0);
        let mut rows = [first.rows, second.rows];
        rows.sort();
        assert_eq!(rows, [3, 5]);
        // A dropped job answers its caller, as when the model is unloaded; nothing stays counted.
        drop((first, second));
        assert!(matches!(three.await.unwrap(), Err(ApiError::Unavailable(_))));
        assert!(matches!(five.await.unwrap(), Err(ApiError::Unavailable(_))));
        assert_eq!(in_channel.load(Relaxed), 0);
        assert_eq!(pending.load(Relaxed), 0, "the requests left the queue");
    }

    #[test]
    fn a_queue_is_shared_out_over_the_instances() {
        // (max, queued rows, other instances sharing the queue) -> rows this batch may take
        for (max, queued, others, cap) in [
            (64, 60, 0, 64), // one instance (or a GPU) takes up to max, as Triton's batcher does
            (64, 60, 1, 30), // two instances: half each
            (64, 61, 1, 31),
            (64, 60, 3, 15),
            (64, 200, 1, 64), // never over max
            (64, 2, 1, 64),   // little queued: wait for more, as usual
            (64, 1, 3, 64),
            (8, 9, 1, 5),
        ] {
            assert_eq!(
                split_cap(max, queued, others),
                cap,
                "max {max} queued {queued} others {others}"
            );
        }
    }

    #[test]
    fn a_batch_waits_for_its_share_of_the_requests_in_flight_and_no_more() {
        // (requests in flight, other instances) -> requests the batch waits for
        for (in_flight, others, share) in [
            (1, 1, 1),  // one client: it runs at once
            (2, 1, 1),  // one running elsewhere, one here: at once
            (4, 1, 2),  // four clients on two instances: pairs
            (16, 1, 8), // sixteen: eight each
            (5, 3, 2),
            (0, 1, 1), // never less than the first request
        ] {
            assert_eq!(
                share_of_flight(in_flight, others),
                share,
                "{in_flight} in flight, {others} others"
            );
        }
    }

    #[tokio::test]
    async fn a_running_batch_is_counted_until_it_ends_and_its_end_is_signalled() {
        let running = Arc::new(Running::default());
        let one = RunningBatch::start(&running, 3);
        let two = RunningBatch::start(&running, 2);
        assert_eq!(running.requests.load(Relaxed), 5);
        drop(one);
        assert_eq!(running.requests.load(Relaxed), 2);
        // The end is stored for a dispatcher that was not waiting yet.
        tokio::time::timeout(Duration::from_secs(1), running.ended.notified())
            .await
            .expect("the end of a batch was not signalled");
        drop(two);
        assert_eq!(running.requests.load(Relaxed), 0);
    }

    #[test]
    fn concat_then_split_gives_back_each_part() {
        let parts = vec![
            f32s("x", 1, 3, 0.0),
            f32s("x", 2, 3, 10.0),
            f32s("x", 3, 3, 100.0),
        ];
        let joined = concat(parts.clone().into_iter(), 0).unwrap();
        assert_eq!(joined.shape, vec![6, 3]);
        let back = split(&joined, &[1, 2, 3], 6).unwrap();
        assert_eq!(back, parts);
        let s = |v: &[&str], rows| {
            Tensor::new(
                "s",
                DataType::Bytes,
                vec![rows, 1],
                TensorData::Strings(v.iter().map(|x| Bytes::from(x.to_string())).collect()),
            )
            .unwrap()
        };
        let strings = vec![s(&["a"], 1), s(&["b", "c"], 2)];
        let joined = concat(strings.clone().into_iter(), 0).unwrap();
        assert_eq!(split(&joined, &[1, 2], 3).unwrap(), strings);
    }

    #[test]
    fn padding_sizes_are_powers_of_two_up_to_the_maximum_and_the_preferred_sizes() {
        assert_eq!(padding_sizes(64, &[]), vec![1, 2, 4, 8, 16, 32, 64]);
        assert_eq!(padding_sizes(48, &[12, 100, 0]), vec![1, 2, 4, 8, 12, 16, 32, 48]);
        assert_eq!(padding_sizes(1, &[]), vec![1]);
        assert_eq!(pad_target(&padding_sizes(48, &[]), 33), 48);
        assert_eq!(pad_target(&padding_sizes(48, &[]), 5), 8);
        assert_eq!(pad_target(&[], 5), 5);
    }

    #[test]
    fn a_joined_batch_has_room_for_its_padding_which_fills_the_same_buffer() {
        let joined = concat([f32s("x", 1, 2, 1.0), f32s("x", 2, 2, 3.0)].into_iter(), 8).unwrap();
        let TensorData::Raw(b) = &joined.data else {
            panic!()
        };
        let (at, data) = (b.as_ptr(), b.to_vec());
        let padded = pad(joined, 5).unwrap();
        assert_eq!(padded.shape, vec![8, 2]);
        let TensorData::Raw(b) = &padded.data else {
            panic!()
        };
        assert_eq!(
            b.as_ptr(),
            at,
            "padded in the joined buffer, not copied into a new one"
        );
        assert_eq!((&b[..24], b.len()), (&data[..], 64));
        assert!(b[24..].iter().all(|&x| x == 0), "the padded rows are zeros");
    }

    #[test]
    fn padded_rows_are_zeros_and_split_drops_them() {
        let joined = concat([f32s("x", 1, 2, 1.0), f32s("x", 2, 2, 3.0)].into_iter(), 0).unwrap();
        let padded = pad(joined.clone(), 1).unwrap();
        assert_eq!(padded.shape, vec![4, 2]);
        let TensorData::Raw(b) = &padded.data else {
            panic!()
        };
        assert!(b[24..].iter().all(|&x| x == 0), "the padded row is zeros");
        let back = split(&padded, &[1, 2], 4).unwrap();
        assert_eq!(back, split(&joined, &[1, 2], 3).unwrap());
        let strings = Tensor::new(
            "s",
            DataType::Bytes,
            vec![1, 2],
            TensorData::Strings(vec!["a".into(), "b".into()]),
        )
        .unwrap();
        let padded = pad(strings, 2).unwrap();
        assert_eq!(padded.shape, vec![3, 2]);
        let TensorData::Strings(v) = &padded.data else {
            panic!()
        };
        assert_eq!(v.len(), 6);
        assert!(v[2..].iter().all(|s| s.is_empty()));
    }

    #[test]
    fn an_output_without_the_batch_dimension_is_an_error_not_a_wrong_answer() {
        let err = split(&f32s("y", 1, 3, 0.0), &[1, 2], 3).unwrap_err().to_string();
        assert!(err.contains("does not keep the batch dimension"), "{err}");
    }

    #[test]
    fn only_requests_that_agree_beyond_dimension_zero_share_a_batch() {
        let job = |t: Tensor, outputs: Vec<&str>| Job {
            rows: t.shape[0],
            inputs: vec![t],
            outputs: outputs.into_iter().map(String::from).collect(),
            enqueued: Instant::now(),
            deadline: None,
            reply: oneshot::channel().0,
            queued: None,
            slot: Arc::new(Slot {
                pending: Arc::new(AtomicUsize::new(1)),
                claimed: AtomicBool::new(false),
            }),
        };
        let a = job(f32s("x", 1, 3, 0.0), vec!["y"]);
        assert!(a.fits_with(&job(f32s("x", 4, 3, 0.0), vec!["y"])));
        assert!(!a.fits_with(&job(f32s("x", 1, 4, 0.0), vec!["y"])));
        assert!(!a.fits_with(&job(f32s("x", 1, 3, 0.0), vec!["y", "z"])));
        assert!(!a.fits_with(&job(f32s("other", 1, 3, 0.0), vec!["y"])));
    }
}
