//! One replica's model: a [`Plan`] on one of the engines (ONNX Runtime or tract)
//! and a dynamic batcher.
//!
//! ```text
//!  infer() ─ check against the signature ─► queue (queue_capacity; full: 429)
//!     ▲                                        │
//!     │                                        ▼  one thread at a time forms a batch:
//!     │                              first request, then every queued one that fits
//!     │                              max_batch_size rows; waits for more at most
//!     │                              max_queue_delay after the first was queued
//!     │                                        │
//!     │                                        ▼  that thread runs it (`threads` OS
//!     └─ oneshot ◄─ each request's rows ◄─ the engine, inputs joined along dim 0
//! ```
//!
//! Forming a batch is serialised (the `forming` lock) so that two idle threads do
//! not split arriving requests into two half batches; running is not, so one thread
//! computes while the next gathers. Requests whose deadline passes in the queue are
//! answered `Timeout` without running; a batch that fails or panics in the engine
//! fails only its own requests (`Internal`). Dropping the last [`Engine`] handle, or
//! [`Engine::shutdown`], answers queued requests `Unavailable` and stops the threads
//! after their current batch.
//!
//! How requests are checked, joined and cut apart is in `plan` (no threads, no
//! clocks); what an engine is, in `backend`; how each engine loads and runs a
//! model, in `onnxruntime` and `tract`.

mod backend;
pub mod onnxruntime;
mod plan;
mod tract;

use std::collections::VecDeque;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use backend::Session;
use kiln_common::{Error, Result};
pub use kiln_proto::v1::Batching;
pub use plan::{
    inspect, inspect_declared, registration, EngineKind, ModelFiles, Plan, Registration,
};
use tokio::sync::oneshot;

use super::monitor::Monitor;
use super::{Signature, Tensor};
use kiln_common::drift::LATENCY_BUCKETS_MS;

// Tensors carry little-endian bytes, which are copied into tract's tensors as they
// are: kiln serves from little-endian machines only.
const _: () = assert!(cfg!(target_endian = "little"));

/// The longest `max_queue_delay` accepted: a batcher that holds requests longer is
/// a misconfiguration, not a latency trade.
pub const MAX_QUEUE_DELAY: Duration = Duration::from_secs(1);

/// How a replica batches and bounds its work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Most rows in one run of the model (and in one request).
    pub max_batch_size: usize,
    /// Longest a batch waits for more requests after its first was queued; zero
    /// batches only what is already queued.
    pub max_queue_delay: Duration,
    /// Most requests waiting; one more is refused with `ResourceExhausted`.
    pub queue_capacity: usize,
    /// Threads the replica computes with: tract runs this many batches at once,
    /// one per thread; ONNX Runtime runs one batch at a time on all of them.
    pub threads: usize,
    /// The engine; `None` is the preferred one ([`EngineKind::preferred`]).
    pub engine: Option<EngineKind>,
    /// How requests are joined, as the deployment declared it (Triton's
    /// max_batch_size): probed, off, or declared up to `max_batch_size`.
    pub batching: Batching,
    /// Batch sizes that run as soon as they form, unless requests already
    /// queued make a larger one.
    pub preferred_batch_sizes: Vec<usize>,
    /// Model instances, each running one batch at once with `threads /
    /// instances` threads; `None`: the engine's count.
    pub instances: Option<usize>,
    /// The most each named input's dimensions may be (`None`: no limit on that
    /// dimension); a request beyond them is refused.
    pub input_limits: Vec<(String, Vec<Option<usize>>)>,
    /// The GPU the model runs on (ONNX Runtime's CUDA execution provider, which
    /// the library must have); `None`: CPUs.
    pub gpu: Option<u32>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch_size: 64,
            max_queue_delay: Duration::from_micros(500),
            queue_capacity: 1024,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            engine: None,
            batching: Batching::Probed,
            preferred_batch_sizes: Vec::new(),
            instances: None,
            input_limits: Vec::new(),
            gpu: None,
        }
    }
}

impl EngineConfig {
    /// Refuses zero sizes and a delay over [`MAX_QUEUE_DELAY`].
    pub fn validate(&self) -> Result<()> {
        for (name, value) in [
            ("max_batch_size", self.max_batch_size),
            ("queue_capacity", self.queue_capacity),
            ("threads", self.threads),
        ] {
            if value == 0 {
                return Err(Error::InvalidArgument(format!(
                    "{name} must be at least 1, got 0"
                )));
            }
        }
        if self.instances == Some(0) {
            return Err(Error::InvalidArgument(
                "instances must be at least 1, got 0".into(),
            ));
        }
        if let Some(bad) = self
            .preferred_batch_sizes
            .iter()
            .find(|&&s| s == 0 || s > self.max_batch_size)
        {
            return Err(Error::InvalidArgument(format!(
                "a preferred batch size is 1 to max_batch_size ({}), not {bad}",
                self.max_batch_size
            )));
        }
        if self.max_queue_delay > MAX_QUEUE_DELAY {
            return Err(Error::InvalidArgument(format!(
                "max_queue_delay must be at most {MAX_QUEUE_DELAY:?}, got {:?}",
                self.max_queue_delay
            )));
        }
        Ok(())
    }
}

/// A snapshot of a replica's counters, cumulative since it loaded (the Triton
/// metrics they feed are in parentheses).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Requests answered with outputs (`nv_inference_request_success`).
    pub requests: u64,
    /// Requests answered with an error of any kind, those below included
    /// (`nv_inference_request_failure`).
    pub failures: u64,
    /// Requests refused because the queue was full.
    pub rejected: u64,
    /// Requests refused as malformed: not what the model takes (400).
    pub invalid: u64,
    /// Requests whose deadline passed before they ran.
    pub timeouts: u64,
    /// Batches run successfully (`nv_inference_exec_count`).
    pub inferences: u64,
    /// Rows in those batches (`nv_inference_count`).
    pub rows: u64,
    /// Time requests spent queued, summed over requests
    /// (`nv_inference_queue_duration_us`).
    pub queue_us: u64,
    /// Time batches spent running, counted once per request in the batch as Triton
    /// does (`nv_inference_compute_infer_duration_us`).
    pub compute_us: u64,
    /// Requests waiting now.
    pub queue_len: usize,
    /// Requests accepted and not yet answered (queued or running).
    pub in_flight: usize,
    /// Answered requests by latency (queue and compute): `latency_counts[i]` took
    /// at most `LATENCY_BUCKETS_MS[i]`, the last entry longer.
    pub latency_counts: Vec<u64>,
    /// Their latency, summed.
    pub latency_us: u64,
}

/// A loaded model and its batching threads; clones share them.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Handle>,
}

/// Closes the engine when the last [`Engine`] clone drops; the threads hold the
/// [`Shared`] state, not this.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.close();
    }
}

/// What the handles and the threads share.
struct Shared {
    model: String,
    plan: Plan,
    config: EngineConfig,
    queue: Mutex<Queue>,
    /// Signalled when a request arrives while the forming thread waits.
    arrived: Condvar,
    /// Held by the thread forming a batch.
    forming: Mutex<()>,
    counters: Counters,
    /// Counts served values for drift, once attached.
    monitor: OnceLock<Arc<Monitor>>,
    /// Threads still running; the last one out closes the queue.
    threads_alive: AtomicUsize,
    /// Lets tests hold the threads between forming a batch and running it.
    #[cfg(test)]
    gate: Mutex<()>,
}

struct Queue {
    requests: VecDeque<Request>,
    open: bool,
    /// The forming thread waits on `arrived` (so a push must signal).
    waiting: bool,
}

/// A checked request waiting for a thread.
struct Request {
    /// In the model's input order.
    inputs: Vec<Tensor>,
    /// Indices of the outputs to return, in the order to return them.
    outputs: Vec<usize>,
    rows: usize,
    deadline: Instant,
    queued: Instant,
    reply: oneshot::Sender<Result<Vec<Tensor>>>,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    failures: AtomicU64,
    rejected: AtomicU64,
    invalid: AtomicU64,
    timeouts: AtomicU64,
    inferences: AtomicU64,
    rows: AtomicU64,
    queue_us: AtomicU64,
    compute_us: AtomicU64,
    in_flight: AtomicUsize,
    latency: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    latency_us: AtomicU64,
}

impl Engine {
    /// Loads an ONNX model on the configured engine, runs it once on a batch of
    /// one row of zeros (so a replica is ready only once the model has run) and
    /// starts the inference threads. Blocking: call it off the async executor.
    pub fn load(onnx: &[u8], name: &str, config: EngineConfig) -> Result<Engine> {
        Engine::load_files(&ModelFiles::inline(onnx), name, config)
    }

    /// [`Engine::load`] for a model that may keep tensors in external data files.
    pub fn load_files(model: &ModelFiles, name: &str, config: EngineConfig) -> Result<Engine> {
        config.validate()?;
        let kind = config.engine.unwrap_or_else(EngineKind::preferred);
        let per_instance = match config.instances {
            Some(instances) => (config.threads / instances).max(1),
            None => config.threads,
        };
        let mut plan = inspect_declared(model, kind, per_instance, config.gpu, config.batching)?;
        plan.limit_inputs(&config.input_limits)?;
        plan.warm_up()?;
        let threads = config
            .instances
            .unwrap_or_else(|| plan.instances(config.threads));
        let shared = Arc::new(Shared {
            model: name.to_string(),
            plan,
            queue: Mutex::new(Queue {
                requests: VecDeque::with_capacity(config.queue_capacity),
                open: true,
                waiting: false,
            }),
            config,
            arrived: Condvar::new(),
            forming: Mutex::new(()),
            counters: Counters::default(),
            monitor: OnceLock::new(),
            threads_alive: AtomicUsize::new(0),
            #[cfg(test)]
            gate: Mutex::new(()),
        });
        // Built first: if a thread fails to start, dropping it stops the others.
        let engine = Engine {
            inner: Arc::new(Handle {
                shared: shared.clone(),
            }),
        };
        for thread in 0..threads {
            let serving = shared.clone();
            shared.threads_alive.fetch_add(1, Relaxed);
            let started = std::thread::Builder::new()
                .name(format!("kiln-infer-{thread}"))
                .spawn(move || serving.serve());
            if let Err(e) = started {
                shared.threads_alive.fetch_sub(1, Relaxed);
                return Err(Error::Internal(format!(
                    "start inference thread {thread} of model {name}: {e}"
                )));
            }
        }
        Ok(engine)
    }

    /// The name the engine was loaded under.
    pub fn name(&self) -> &str {
        &self.inner.shared.model
    }

    /// What the model takes and gives.
    pub fn signature(&self) -> &Signature {
        self.inner.shared.plan.signature()
    }

    /// The engine that runs the model.
    pub fn kind(&self) -> EngineKind {
        self.inner.shared.plan.kind()
    }

    /// Returns true when requests are joined into batches.
    pub fn batched(&self) -> bool {
        self.inner.shared.plan.batched()
    }

    /// Why requests are not joined into batches; `None` when they are.
    pub fn unbatched_reason(&self) -> Option<&str> {
        self.inner.shared.plan.unbatched_reason()
    }

    /// The limits the engine was loaded with.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.shared.config
    }

    /// Runs a request through the batcher: checks it against the signature, queues
    /// it and waits for its outputs (the requested ones in the requested order, or
    /// all in the model's order). A deadline that passes gives `Timeout`, whether
    /// the request is queued or running (a batch that runs on is not stopped; its
    /// answer to this request is dropped).
    pub async fn infer(
        &self,
        inputs: Vec<Tensor>,
        outputs: Option<Vec<String>>,
        deadline: Instant,
    ) -> Result<Vec<Tensor>> {
        let shared = &self.inner.shared;
        let started = Instant::now();
        let result = match shared.enqueue(inputs, outputs, deadline) {
            Ok((answer, _in_flight)) => {
                match tokio::time::timeout_at(deadline.into(), answer).await {
                    Ok(answer) => answer.unwrap_or_else(|_| Err(shared.stopped())),
                    Err(_) => Err(shared.overran()),
                }
            }
            Err(e) => Err(e),
        };
        shared.counters.record(&result, started.elapsed());
        result
    }

    /// Runs one request on the calling thread, past the queue and the batcher, and
    /// returns every output in the model's order: the ceiling the server is measured
    /// against. Not counted in [`Engine::stats`].
    pub fn run_batch_blocking(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let shared = &self.inner.shared;
        let checked = shared
            .plan
            .check(inputs, None, shared.config.max_batch_size)?;
        shared.plan.run_alone(checked).map_err(|e| {
            Error::Internal(format!("inference of model {} failed: {e:#}", shared.model))
        })
    }

    /// The counters now.
    pub fn stats(&self) -> EngineStats {
        let shared = &self.inner.shared;
        let c = &shared.counters;
        EngineStats {
            requests: c.requests.load(Relaxed),
            failures: c.failures.load(Relaxed),
            rejected: c.rejected.load(Relaxed),
            invalid: c.invalid.load(Relaxed),
            timeouts: c.timeouts.load(Relaxed),
            inferences: c.inferences.load(Relaxed),
            rows: c.rows.load(Relaxed),
            queue_us: c.queue_us.load(Relaxed),
            compute_us: c.compute_us.load(Relaxed),
            queue_len: lock(&shared.queue).requests.len(),
            in_flight: c.in_flight.load(Relaxed),
            latency_counts: c.latency.iter().map(|b| b.load(Relaxed)).collect(),
            latency_us: c.latency_us.load(Relaxed),
        }
    }

    /// Counts every answered batch's inputs and outputs into `monitor` from now
    /// on; an engine takes one monitor (false when it already has one).
    pub fn attach_monitor(&self, monitor: Arc<Monitor>) -> bool {
        self.inner.shared.monitor.set(monitor).is_ok()
    }

    /// The monitor attached, if any.
    pub fn monitor(&self) -> Option<&Arc<Monitor>> {
        self.inner.shared.monitor.get()
    }

    /// Refuses new requests, answers queued ones `Unavailable` and lets the threads
    /// stop after their current batch; what else the handles do then fails the same.
    pub fn shutdown(&self) {
        self.inner.shared.close();
    }
}

impl Shared {
    /// Checks a request and queues it; returns where its answer will come and a
    /// guard that counts it in flight until dropped.
    fn enqueue(
        &self,
        inputs: Vec<Tensor>,
        outputs: Option<Vec<String>>,
        deadline: Instant,
    ) -> Result<(oneshot::Receiver<Result<Vec<Tensor>>>, InFlight<'_>)> {
        let checked = self
            .plan
            .check(inputs, outputs, self.config.max_batch_size)?;
        let queued = Instant::now();
        if deadline <= queued {
            return Err(Error::Timeout(format!(
                "the deadline of a request to model {} passed before it was queued",
                self.model
            )));
        }
        let (reply, answer) = oneshot::channel();
        let in_flight = InFlight::new(&self.counters.in_flight);
        self.push(Request {
            inputs: checked.inputs,
            outputs: checked.outputs,
            rows: checked.rows,
            deadline,
            queued,
            reply,
        })?;
        Ok((answer, in_flight))
    }

    /// Appends a request to the queue, or refuses it when the queue is full or
    /// closed.
    fn push(&self, request: Request) -> Result<()> {
        let mut queue = lock(&self.queue);
        if !queue.open {
            return Err(self.stopped());
        }
        if queue.requests.len() >= self.config.queue_capacity {
            return Err(Error::ResourceExhausted(format!(
                "queue of model {} is full ({} requests)",
                self.model, self.config.queue_capacity
            )));
        }
        queue.requests.push_back(request);
        let wake = queue.waiting;
        drop(queue);
        if wake {
            self.arrived.notify_one();
        }
        Ok(())
    }

    /// One inference thread: forms batches and runs them until the queue closes.
    fn serve(self: Arc<Self>) {
        let _exit = Exit(&self);
        let span = tracing::info_span!("engine", model = %self.model);
        let _entered = span.enter();
        let mut state = match self.plan.session() {
            Ok(state) => state,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "inference thread cannot start");
                return;
            }
        };
        let mut batch = Vec::with_capacity(self.config.max_batch_size);
        while self.collect(&mut batch) {
            #[cfg(test)]
            let _gate = lock(&self.gate);
            self.execute(&mut state, &mut batch);
        }
    }

    /// Fills `batch` (empty on entry) with the next batch; returns false once the
    /// queue is closed and nothing was collected.
    ///
    /// Requests are taken in order while their rows fit `max_batch_size` (a request
    /// that does not fit, or cannot join, starts the next batch). Queued requests
    /// are always taken at once; the batch waits for more only while other
    /// requests are in flight, and only until `max_queue_delay` after its first
    /// request was queued. A batch that reaches a preferred size runs at once,
    /// unless the requests queued behind it make a larger preferred size.
    fn collect(&self, batch: &mut Vec<Request>) -> bool {
        let _forming = lock(&self.forming);
        let mut queue = lock(&self.queue);
        let mut rows = 0;
        let mut close_at = None;
        loop {
            if !queue.open {
                return !batch.is_empty();
            }
            let now = Instant::now();
            let fits = queue.requests.front().map(|next| match batch.first() {
                None => true,
                Some(first) => {
                    rows + next.rows <= self.config.max_batch_size
                        && self.plan.joinable(&first.inputs, &next.inputs)
                }
            });
            match (fits, close_at) {
                (Some(true), _) => {
                    let request = queue.requests.pop_front().expect("the front was just seen");
                    if request.reply.is_closed() {
                        continue; // its caller stopped waiting
                    }
                    if request.deadline <= now {
                        let _ = request.reply.send(Err(self.expired()));
                        continue;
                    }
                    rows += request.rows;
                    close_at.get_or_insert(request.queued + self.config.max_queue_delay);
                    batch.push(request);
                    if !self.plan.batched() || rows >= self.config.max_batch_size {
                        return true;
                    }
                    if self.config.preferred_batch_sizes.contains(&rows)
                        && !self.larger_preferred_queued(&queue, batch, rows)
                    {
                        return true;
                    }
                }
                (Some(false), _) => return true,
                (None, None) => queue = self.wait(queue, None),
                (None, Some(close_at)) if now < close_at && self.company_expected(batch.len()) => {
                    queue = self.wait(queue, Some(close_at - now));
                }
                (None, Some(_)) => return true,
            }
        }
    }

    /// Returns true when the requests queued, taken in order, would grow a batch
    /// of `rows` rows to a larger preferred size.
    fn larger_preferred_queued(&self, queue: &Queue, batch: &[Request], rows: usize) -> bool {
        let Some(first) = batch.first() else {
            return false;
        };
        let mut total = rows;
        for next in &queue.requests {
            if !self.plan.joinable(&first.inputs, &next.inputs) {
                return false;
            }
            total += next.rows;
            if total > self.config.max_batch_size {
                return false;
            }
            if self.config.preferred_batch_sizes.contains(&total) {
                return true;
            }
        }
        false
    }

    /// Returns true when requests other than the `batched` ones are in flight
    /// (queued or running): their callers are active, so more may come. A request
    /// alone in the engine runs at once, whatever `max_queue_delay` says.
    fn company_expected(&self, batched: usize) -> bool {
        self.counters.in_flight.load(Relaxed) > batched
    }

    /// Waits for a push (at most `timeout`) with the queue unlocked meanwhile.
    fn wait<'q>(
        &self,
        mut queue: MutexGuard<'q, Queue>,
        timeout: Option<Duration>,
    ) -> MutexGuard<'q, Queue> {
        queue.waiting = true;
        let mut queue = match timeout {
            None => self
                .arrived
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner),
            Some(timeout) => {
                self.arrived
                    .wait_timeout(queue, timeout)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
        };
        queue.waiting = false;
        queue
    }

    /// Runs a batch and answers its requests (emptying `batch`). A failure or a
    /// panic in the engine gives the thread a fresh session and runs each request
    /// of the batch alone; a request that fails alone is answered `Internal`.
    fn execute(&self, state: &mut Box<dyn Session>, batch: &mut Vec<Request>) {
        let started = Instant::now();
        let rows: usize = batch.iter().map(|r| r.rows).sum();
        let answers = panic::catch_unwind(AssertUnwindSafe(|| {
            self.answers(state.as_mut(), batch, rows)
        }));
        let computed = started.elapsed();
        let failure = match answers {
            Ok(Ok(answers)) => {
                if let Some(monitor) = self.monitor.get() {
                    monitor.observe(
                        batch
                            .iter()
                            .zip(&answers)
                            .map(|(r, a)| (r.inputs.as_slice(), a.as_slice())),
                    );
                }
                self.counters.inferences.fetch_add(1, Relaxed);
                self.counters.rows.fetch_add(rows as u64, Relaxed);
                for (request, answer) in batch.drain(..).zip(answers) {
                    self.account(&request, started, computed);
                    let _ = request.reply.send(Ok(answer));
                }
                return;
            }
            Ok(Err(e)) => format!("inference of model {} failed: {e:#}", self.model),
            Err(panic) => format!(
                "inference of model {} panicked: {}",
                self.model,
                kiln_common::panic_message(&*panic)
            ),
        };
        tracing::warn!(requests = batch.len(), rows, error = %failure, "batch failed");
        if let Ok(fresh) = self.plan.session() {
            *state = fresh;
        }
        if batch.len() > 1 {
            // One member's data may be what failed the batch: each runs alone, so
            // only the requests at fault fail.
            for member in std::mem::take(batch) {
                self.execute(state, &mut vec![member]);
            }
            return;
        }
        for request in batch.drain(..) {
            self.account(&request, started, computed);
            let _ = request.reply.send(Err(Error::Internal(failure.clone())));
        }
    }

    /// Runs the batch's requests together and cuts each one's outputs out.
    fn answers(
        &self,
        state: &mut dyn Session,
        batch: &[Request],
        rows: usize,
    ) -> anyhow::Result<Vec<Vec<Tensor>>> {
        let mut outputs = self
            .plan
            .run(state, batch.iter().map(|r| r.inputs.as_slice()), rows)?;
        let mut start = 0;
        let mut answers = Vec::with_capacity(batch.len());
        for request in batch {
            let tensors = request
                .outputs
                .iter()
                .map(|&o| outputs.cut(o, start, request.rows))
                .collect::<anyhow::Result<Vec<_>>>()?;
            answers.push(tensors);
            start += request.rows;
        }
        Ok(answers)
    }

    /// Adds a run request's queue and compute time to the counters.
    fn account(&self, request: &Request, started: Instant, computed: Duration) {
        let queued = started.saturating_duration_since(request.queued);
        self.counters
            .queue_us
            .fetch_add(queued.as_micros() as u64, Relaxed);
        self.counters
            .compute_us
            .fetch_add(computed.as_micros() as u64, Relaxed);
    }

    /// Refuses new requests and answers the queued ones `Unavailable`.
    fn close(&self) {
        let drained = {
            let mut queue = lock(&self.queue);
            queue.open = false;
            std::mem::take(&mut queue.requests)
        };
        self.arrived.notify_all();
        for request in drained {
            let _ = request.reply.send(Err(self.stopped()));
        }
    }

    fn stopped(&self) -> Error {
        Error::Unavailable(format!("model {} is shutting down", self.model))
    }

    fn overran(&self) -> Error {
        Error::Timeout(format!(
            "the deadline of a request to model {} passed before it was answered",
            self.model
        ))
    }

    fn expired(&self) -> Error {
        Error::Timeout(format!(
            "the deadline of a request to model {} passed while it was queued",
            self.model
        ))
    }
}

impl Counters {
    /// Counts a request's answer and, when it succeeded, its latency.
    fn record(&self, result: &Result<Vec<Tensor>>, latency: Duration) {
        let Err(error) = result else {
            self.requests.fetch_add(1, Relaxed);
            let ms = latency.as_secs_f64() * 1e3;
            let bucket = LATENCY_BUCKETS_MS.partition_point(|&le| le < ms);
            self.latency[bucket].fetch_add(1, Relaxed);
            self.latency_us
                .fetch_add(latency.as_micros() as u64, Relaxed);
            return;
        };
        self.failures.fetch_add(1, Relaxed);
        match error {
            Error::ResourceExhausted(_) => self.rejected.fetch_add(1, Relaxed),
            Error::InvalidArgument(_) => self.invalid.fetch_add(1, Relaxed),
            Error::Timeout(_) => self.timeouts.fetch_add(1, Relaxed),
            _ => 0,
        };
    }
}

/// Counts a request in flight while it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(gauge: &'a AtomicUsize) -> Self {
        gauge.fetch_add(1, Relaxed);
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Marks an inference thread gone, however it ends; the last one closes the queue
/// so that no request waits for threads that are not there.
struct Exit<'a>(&'a Shared);

impl Drop for Exit<'_> {
    fn drop(&mut self) {
        if self.0.threads_alive.fetch_sub(1, Relaxed) == 1 {
            self.0.close();
        }
    }
}

/// Locks a mutex, ignoring poisoning: every critical section here leaves its data
/// consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::serving::{DataType, Spec};
    use crate::train::arch::{Arch, Task};
    use crate::train::data::Standardizer;
    use crate::train::onnx::{export, ExportMeta};
    use kiln_common::jobspec::Activation;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use tract_onnx::prelude::{
        self as tract, tvec, Framework as _, InferenceModelExt as _, IntoRunnable as _,
    };

    const FEATURES: usize = 4;
    const CLASSES: usize = 3;
    const MODEL: &str = "iris";

    /// An exported `features → hidden… → classes` classifier with random weights
    /// and outputs `output` (probabilities) and `logits`.
    pub(in crate::serving) fn classifier(
        features: usize,
        hidden: &[usize],
        classes: usize,
        seed: u64,
    ) -> Vec<u8> {
        let mut rng = StdRng::seed_from_u64(seed);
        let arch = Arch {
            inputs: features,
            hidden: hidden.to_vec(),
            activation: Activation::Relu,
            task: Task::Classification {
                classes: (0..classes).map(|c| format!("c{c}")).collect(),
            },
        };
        let flat: Vec<f32> = (0..arch.parameter_count())
            .map(|_| rng.gen_range(-1.0..1.0))
            .collect();
        let standardizer = Standardizer {
            mean: (0..features).map(|_| rng.gen_range(-2.0..2.0)).collect(),
            std: (0..features).map(|_| rng.gen_range(0.5..2.0)).collect(),
        };
        let meta = ExportMeta {
            features: (0..features).map(|f| format!("f{f}")).collect(),
            ..Default::default()
        };
        let layers = arch.split(&flat).expect("the right length");
        export(&arch, &layers, &standardizer, &meta).expect("export")
    }

    fn iris() -> Vec<u8> {
        classifier(FEATURES, &[8, 6], CLASSES, 1)
    }

    /// tract, named: a test that loads ONNX Runtime makes it the preferred engine
    /// for every test in this process.
    fn config(threads: usize, max_queue_delay: Duration) -> EngineConfig {
        EngineConfig {
            threads,
            max_queue_delay,
            engine: Some(EngineKind::Tract),
            ..EngineConfig::default()
        }
    }

    fn load(onnx: &[u8], config: EngineConfig) -> Engine {
        Engine::load(onnx, MODEL, config).expect("the engine loads")
    }

    /// `rows × features` values around the standardizer's range.
    fn random_rows(rng: &mut StdRng, rows: usize, features: usize) -> Vec<f32> {
        (0..rows * features)
            .map(|_| rng.gen_range(-4.0..4.0))
            .collect()
    }

    /// An FP32 `[rows, values / rows]` tensor.
    pub(in crate::serving) fn fp32(name: &str, rows: usize, values: &[f32]) -> Tensor {
        Tensor {
            name: name.into(),
            datatype: DataType::Fp32,
            shape: vec![rows, values.len() / rows],
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    fn floats(tensor: &Tensor) -> Vec<f32> {
        tensor
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()
    }

    /// Every output of the model, run by tract directly on `x` (`rows` rows).
    fn tract_outputs(onnx: &[u8], rows: usize, x: &[f32]) -> Vec<Vec<f32>> {
        let plan = tract_onnx::onnx()
            .model_for_read(&mut &onnx[..])
            .expect("tract parses the model")
            .into_optimized()
            .expect("tract optimises it")
            .into_runnable()
            .expect("a plan");
        let input = tract::Tensor::from_shape(&[rows, x.len() / rows], x).expect("a tensor");
        plan.run(tvec!(input.into()))
            .expect("the model runs")
            .iter()
            .map(|o| {
                let view = o.to_plain_array_view::<f32>().expect("f32 output");
                view.iter().copied().collect()
            })
            .collect()
    }

    fn assert_near(got: &[f32], want: &[f32], tolerance: f32) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= tolerance, "got {got:?}, want {want:?}");
        }
    }

    fn assert_close(got: &[f32], want: &[f32]) {
        assert_near(got, want, 1e-6);
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime")
    }

    /// Polls `done` every millisecond for up to 10 s.
    fn wait_until(what: &str, done: impl Fn() -> bool) {
        let give_up = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < give_up, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Starts `infer` for one row on the runtime.
    fn spawn_row(
        rt: &tokio::runtime::Runtime,
        engine: &Engine,
        row: &[f32],
        deadline: Instant,
    ) -> tokio::task::JoinHandle<Result<Vec<Tensor>>> {
        let engine = engine.clone();
        let input = fp32("input", 1, row);
        rt.spawn(async move { engine.infer(vec![input], None, deadline).await })
    }

    /// Holds the engine's threads after they form their next batch; with one
    /// thread and a zero delay, the next request is taken alone and the ones after
    /// it stay queued.
    fn hold(shared: &Shared) -> MutexGuard<'_, ()> {
        lock(&shared.gate)
    }

    /// Waits until one request is taken and held, none queued.
    fn wait_held(engine: &Engine) {
        wait_until("the first request is held", || {
            let stats = engine.stats();
            stats.in_flight == 1 && stats.queue_len == 0
        });
    }

    #[test]
    fn one_request_gives_what_tract_gives() {
        let onnx = iris();
        let engine = load(&onnx, config(1, Duration::ZERO));
        let mut rng = StdRng::seed_from_u64(2);
        let x = random_rows(&mut rng, 3, FEATURES);
        let want = tract_outputs(&onnx, 3, &x);
        let rt = runtime();

        let all = rt
            .block_on(engine.infer(vec![fp32("input", 3, &x)], None, far()))
            .expect("an answer");
        let names: Vec<&str> = all.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["output", "logits"]);
        for (tensor, want) in all.iter().zip(&want) {
            assert_eq!(tensor.datatype, DataType::Fp32);
            assert_eq!(tensor.shape, [3, CLASSES]);
            assert_close(&floats(tensor), want);
        }

        let requested = vec!["logits".to_string(), "output".to_string()];
        let reversed = rt
            .block_on(engine.infer(vec![fp32("input", 3, &x)], Some(requested), far()))
            .expect("an answer");
        assert_eq!(reversed[0].name, "logits");
        assert_close(&floats(&reversed[0]), &want[1]);
        assert_close(&floats(&reversed[1]), &want[0]);

        let direct = engine
            .run_batch_blocking(vec![fp32("input", 3, &x)])
            .expect("a direct run");
        assert_eq!(direct, all);

        let stats = engine.stats();
        assert_eq!((stats.requests, stats.inferences, stats.rows), (2, 2, 6));
        assert_eq!(
            (stats.failures, stats.queue_len, stats.in_flight),
            (0, 0, 0)
        );
    }

    #[test]
    fn concurrent_one_row_requests_are_batched_and_each_gets_its_own_rows() {
        let onnx = iris();
        let engine = load(&onnx, config(1, Duration::ZERO));
        let mut rng = StdRng::seed_from_u64(3);
        let x = random_rows(&mut rng, 64, FEATURES);
        let rows: Vec<&[f32]> = x.chunks(FEATURES).collect();
        let rt = runtime();

        let held = hold(&engine.inner.shared);
        let first = spawn_row(&rt, &engine, rows[0], far());
        wait_held(&engine);
        let rest: Vec<_> = rows[1..]
            .iter()
            .map(|row| spawn_row(&rt, &engine, row, far()))
            .collect();
        wait_until("63 requests are queued", || engine.stats().queue_len == 63);
        drop(held);

        let answers: Vec<Vec<Tensor>> = rt.block_on(async {
            let mut answers = Vec::new();
            for task in std::iter::once(first).chain(rest) {
                answers.push(task.await.expect("the task ends").expect("an answer"));
            }
            answers
        });
        // Each row against tract on that row alone and on all 64 at once.
        let batch = tract_outputs(&onnx, 64, &x);
        for (i, (answer, row)) in answers.iter().zip(&rows).enumerate() {
            let alone = tract_outputs(&onnx, 1, row);
            for (output, tensor) in answer.iter().enumerate() {
                assert_eq!(tensor.shape, [1, CLASSES]);
                assert_close(&floats(tensor), &alone[output]);
                assert_close(
                    &floats(tensor),
                    &batch[output][i * CLASSES..(i + 1) * CLASSES],
                );
            }
        }
        let stats = engine.stats();
        assert_eq!((stats.requests, stats.rows), (64, 64));
        assert_eq!(stats.inferences, 2, "the first alone, then 63 together");
    }

    #[test]
    fn a_batch_waits_for_more_requests_up_to_the_delay_while_others_are_in_flight() {
        let engine = load(&iris(), config(2, Duration::from_millis(300)));
        let rt = runtime();
        let row = [0.5; FEATURES];
        // One request held in one thread keeps the engine busy; the other thread
        // takes the next request and waits for company.
        let held = hold(&engine.inner.shared);
        let busy = spawn_row(&rt, &engine, &row, far());
        wait_held(&engine);
        let first = spawn_row(&rt, &engine, &row, far());
        std::thread::sleep(Duration::from_millis(30));
        let second = spawn_row(&rt, &engine, &row, far());
        wait_until("both are taken", || engine.stats().queue_len == 0);
        std::thread::sleep(Duration::from_millis(400));
        drop(held);
        rt.block_on(async {
            for task in [busy, first, second] {
                task.await.expect("ends").expect("an answer");
            }
        });
        let stats = engine.stats();
        assert_eq!((stats.requests, stats.inferences, stats.rows), (3, 2, 3));
    }

    #[test]
    fn a_batch_of_a_preferred_size_runs_at_once_and_instances_are_as_declared() {
        let engine = load(
            &iris(),
            EngineConfig {
                max_batch_size: 8,
                preferred_batch_sizes: vec![2],
                instances: Some(1),
                ..config(2, Duration::from_millis(300))
            },
        );
        // One instance, though the replica has two threads.
        assert_eq!(engine.inner.shared.threads_alive.load(Relaxed), 1);
        let rt = runtime();
        let row = [0.5; FEATURES];
        let held = hold(&engine.inner.shared);
        let first = spawn_row(&rt, &engine, &row, far());
        wait_held(&engine);
        let rest: Vec<_> = (0..4)
            .map(|_| spawn_row(&rt, &engine, &row, far()))
            .collect();
        wait_until("4 requests are queued", || engine.stats().queue_len == 4);
        drop(held);
        rt.block_on(async {
            for task in std::iter::once(first).chain(rest) {
                task.await.expect("ends").expect("an answer");
            }
        });
        // 1 alone, then batches of the preferred 2 (not one of 4).
        let stats = engine.stats();
        assert_eq!((stats.requests, stats.inferences, stats.rows), (5, 3, 5));
    }

    #[test]
    fn a_deadline_that_passes_while_the_batch_runs_answers_timeout_at_once() {
        let engine = load(&iris(), config(1, Duration::ZERO));
        let rt = runtime();
        let row = [0.5; FEATURES];
        // The batch is held running past the request's deadline.
        let held = hold(&engine.inner.shared);
        let started = Instant::now();
        let task = spawn_row(&rt, &engine, &row, started + Duration::from_millis(100));
        wait_held(&engine);
        let answer = rt.block_on(task).expect("the task ends");
        assert!(
            matches!(&answer, Err(Error::Timeout(m)) if m.contains("before it was answered")),
            "{answer:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "answered at the deadline"
        );
        drop(held);
        assert_eq!(engine.stats().timeouts, 1);
    }

    #[test]
    fn a_lone_request_runs_at_once_whatever_the_delay() {
        let engine = load(&iris(), config(1, Duration::from_millis(900)));
        let rt = runtime();
        let row = [0.5; FEATURES];
        for _ in 0..3 {
            let started = Instant::now();
            rt.block_on(spawn_row(&rt, &engine, &row, far()))
                .expect("ends")
                .expect("an answer");
            assert!(
                started.elapsed() < Duration::from_millis(300),
                "a request alone in the engine waited {:?} for company",
                started.elapsed()
            );
        }
        let stats = engine.stats();
        assert_eq!((stats.requests, stats.inferences), (3, 3));
        assert!(stats.queue_us < 300_000, "{stats:?}");
    }

    #[test]
    fn malformed_requests_are_refused_with_what_was_expected() {
        let engine = load(
            &iris(),
            EngineConfig {
                max_batch_size: 8,
                ..config(1, Duration::ZERO)
            },
        );
        let rt = runtime();
        let row = [0.25; FEATURES];
        let good = || fp32("input", 1, &row);
        let invalid = |m: &str| Error::InvalidArgument(m.to_string());
        let cases: Vec<(Vec<Tensor>, Option<Vec<String>>, Error)> = vec![
            (
                vec![fp32("features", 1, &row)],
                None,
                invalid(r#"input "features" is not an input of the model; it takes "input""#),
            ),
            (
                vec![],
                None,
                invalid(r#"input "input" is missing; the model takes "input""#),
            ),
            (
                vec![good(), good()],
                None,
                invalid(r#"input "input" is given twice"#),
            ),
            (
                vec![Tensor {
                    datatype: DataType::Int32,
                    ..good()
                }],
                None,
                invalid(r#"input "input": expected datatype FP32, got INT32"#),
            ),
            (
                vec![fp32("input", 1, &[0.0; FEATURES + 1])],
                None,
                invalid(r#"input "input": expected shape [-1, 4], got [1, 5]"#),
            ),
            (
                vec![fp32("input", 1, &[0.0; FEATURES * 2]).with_shape(vec![2, 2, 4])],
                None,
                invalid(r#"input "input": expected shape [-1, 4], got [2, 2, 4]"#),
            ),
            (
                vec![good().with_shape(vec![0, FEATURES])],
                None,
                invalid(r#"input "input": expected at least one row, got shape [0, 4]"#),
            ),
            (
                vec![good().with_shape(vec![2, FEATURES])],
                None,
                invalid(r#"input "input": shape [2, 4] of FP32 takes 32 bytes, got 16"#),
            ),
            (
                vec![fp32("input", 9, &[0.0; 9 * FEATURES])],
                None,
                invalid(r#"input "input": 9 rows exceed the max batch size (8)"#),
            ),
            (
                vec![good()],
                Some(vec!["probabilities".into()]),
                invalid(
                    r#"output "probabilities" is not an output of the model; it gives "output", "logits""#,
                ),
            ),
            (
                vec![good()],
                Some(vec!["logits".into(), "logits".into()]),
                invalid(r#"output "logits" is requested twice"#),
            ),
        ];
        let count = cases.len() as u64;
        for (inputs, outputs, want) in cases {
            let got = rt.block_on(engine.infer(inputs, outputs, far()));
            assert_eq!(got, Err(want));
        }
        let answer = rt
            .block_on(engine.infer(vec![good()], Some(vec!["output".into()]), far()))
            .expect("a good request is answered");
        assert_eq!(answer.len(), 1);
        let stats = engine.stats();
        assert_eq!(
            (stats.failures, stats.invalid, stats.requests),
            (count, count, 1)
        );
        assert_eq!(stats.inferences, 1, "nothing malformed reached the model");
    }

    impl Tensor {
        fn with_shape(self, shape: Vec<usize>) -> Tensor {
            Tensor { shape, ..self }
        }
    }

    #[test]
    fn a_full_queue_refuses_with_resource_exhausted() {
        let engine = load(
            &iris(),
            EngineConfig {
                queue_capacity: 2,
                ..config(1, Duration::ZERO)
            },
        );
        let rt = runtime();
        let row = [1.0; FEATURES];
        let held = hold(&engine.inner.shared);
        let mut tasks = vec![spawn_row(&rt, &engine, &row, far())];
        wait_held(&engine);
        tasks.push(spawn_row(&rt, &engine, &row, far()));
        tasks.push(spawn_row(&rt, &engine, &row, far()));
        wait_until("two requests are queued", || engine.stats().queue_len == 2);

        let refused = rt.block_on(engine.infer(vec![fp32("input", 1, &row)], None, far()));
        assert_eq!(
            refused,
            Err(Error::ResourceExhausted(
                "queue of model iris is full (2 requests)".into()
            ))
        );
        drop(held);
        for task in tasks {
            rt.block_on(task)
                .expect("ends")
                .expect("a queued request is answered");
        }
        let stats = engine.stats();
        assert_eq!((stats.requests, stats.rejected, stats.failures), (3, 1, 1));
    }

    #[test]
    fn an_expired_deadline_times_out_without_running() {
        let engine = load(&iris(), config(1, Duration::ZERO));
        let rt = runtime();
        let row = [1.0; FEATURES];
        let past = Instant::now() - Duration::from_millis(1);
        let late = rt.block_on(engine.infer(vec![fp32("input", 1, &row)], None, past));
        assert!(matches!(late, Err(Error::Timeout(_))), "{late:?}");

        let held = hold(&engine.inner.shared);
        let first = spawn_row(&rt, &engine, &row, far());
        wait_held(&engine);
        let soon = spawn_row(
            &rt,
            &engine,
            &row,
            Instant::now() + Duration::from_millis(50),
        );
        wait_until("the second is queued", || engine.stats().queue_len == 1);
        std::thread::sleep(Duration::from_millis(100));
        drop(held);
        rt.block_on(first).expect("ends").expect("the first runs");
        assert_eq!(
            rt.block_on(soon).expect("ends"),
            Err(Error::Timeout(
                "the deadline of a request to model iris passed before it was answered".into()
            ))
        );
        let stats = engine.stats();
        assert_eq!((stats.timeouts, stats.inferences, stats.rows), (2, 1, 1));
    }

    #[test]
    fn shutdown_answers_queued_requests_unavailable_and_stops_the_threads() {
        let engine = load(&iris(), config(2, Duration::ZERO));
        let rt = runtime();
        let row = [1.0; FEATURES];
        let held = hold(&engine.inner.shared);
        let running = spawn_row(&rt, &engine, &row, far());
        wait_held(&engine);
        // The second thread takes the next one and waits at the gate too.
        let mut later = vec![spawn_row(&rt, &engine, &row, far())];
        wait_until("the second is held", || {
            let stats = engine.stats();
            stats.in_flight == 2 && stats.queue_len == 0
        });
        later.push(spawn_row(&rt, &engine, &row, far()));
        later.push(spawn_row(&rt, &engine, &row, far()));
        wait_until("two are queued", || engine.stats().queue_len == 2);
        engine.shutdown();
        drop(held);
        rt.block_on(running)
            .expect("ends")
            .expect("a running batch completes");
        let unavailable = Err(Error::Unavailable("model iris is shutting down".into()));
        let answers: Vec<_> = later
            .into_iter()
            .map(|task| rt.block_on(task).expect("ends"))
            .collect();
        assert!(
            answers[0].is_ok(),
            "the formed batch completes: {:?}",
            answers[0]
        );
        assert_eq!(answers[1..], [unavailable.clone(), unavailable.clone()]);
        let after = rt.block_on(engine.infer(vec![fp32("input", 1, &row)], None, far()));
        assert_eq!(after, unavailable);

        let shared = Arc::downgrade(&engine.inner.shared);
        drop(engine);
        wait_until("the threads stop", || shared.upgrade().is_none());
    }

    /// Queues a request without checks or a handle; returns where its answer comes.
    fn push_unchecked(
        shared: &Shared,
        inputs: Vec<Tensor>,
        rows: usize,
        outputs: Vec<usize>,
    ) -> oneshot::Receiver<Result<Vec<Tensor>>> {
        let (reply, answer) = oneshot::channel();
        let request = Request {
            inputs,
            outputs,
            rows,
            deadline: far(),
            queued: Instant::now(),
            reply,
        };
        shared.push(request).expect("queued");
        answer
    }

    #[test]
    fn dropping_the_last_handle_answers_queued_requests_unavailable() {
        let engine = load(&iris(), config(1, Duration::ZERO));
        let clone = engine.clone();
        let shared = engine.inner.shared.clone();
        let rt = runtime();
        let row = || vec![fp32("input", 1, &[1.0; FEATURES])];
        let held = hold(&shared);
        let running = push_unchecked(&shared, row(), 1, vec![0]);
        wait_until("the first is taken", || {
            lock(&shared.queue).requests.is_empty()
        });
        let queued = push_unchecked(&shared, row(), 1, vec![0]);
        drop(engine);
        assert_eq!(
            lock(&shared.queue).requests.len(),
            1,
            "a clone keeps it open"
        );
        drop(clone);
        assert_eq!(
            rt.block_on(queued).expect("answered"),
            Err(Error::Unavailable("model iris is shutting down".into()))
        );
        drop(held);
        rt.block_on(running)
            .expect("answered")
            .expect("the running request completes");
        let weak = Arc::downgrade(&shared);
        drop(shared);
        wait_until("the threads stop", || weak.upgrade().is_none());
    }

    #[test]
    fn a_failing_batch_fails_only_its_requests() {
        let engine = load(&iris(), config(1, Duration::ZERO));
        let rt = runtime();
        let shared = &engine.inner.shared;
        // Requests that skipped the checks: rows that the data does not fill (the
        // engine refuses the input), and an output index past the model's (a panic).
        let unchecked = |rows: usize, outputs: Vec<usize>| {
            let inputs = vec![fp32("input", 1, &[1.0; FEATURES]).with_shape(vec![rows, FEATURES])];
            rt.block_on(push_unchecked(shared, inputs, rows, outputs))
                .expect("answered")
        };
        let underfilled = unchecked(2, vec![0]);
        assert!(
            matches!(&underfilled, Err(Error::Internal(m)) if m.contains("holds 16 bytes for shape [2, 4]")),
            "{underfilled:?}"
        );
        let panicked = unchecked(1, vec![7]);
        assert!(
            matches!(&panicked, Err(Error::Internal(m)) if m.contains("panicked")),
            "{panicked:?}"
        );
        let good = rt.block_on(engine.infer(vec![fp32("input", 1, &[1.0; FEATURES])], None, far()));
        assert!(good.is_ok(), "{good:?}");
    }

    #[test]
    fn a_request_that_fails_a_batch_fails_alone_and_the_others_are_answered() {
        let engine = load(&iris(), config(1, Duration::ZERO));
        let rt = runtime();
        let shared = &engine.inner.shared;
        let held = hold(shared);
        let first = spawn_row(&rt, &engine, &[0.5; FEATURES], far());
        wait_held(&engine);
        // Queued behind it, so they form one batch: a good row, one whose data
        // does not fill its two rows (it skipped the checks), another good row.
        let good = || fp32("input", 1, &[0.25; FEATURES]);
        let bad = fp32("input", 1, &[1.0; FEATURES]).with_shape(vec![2, FEATURES]);
        let answers = [
            push_unchecked(shared, vec![good()], 1, vec![0]),
            push_unchecked(shared, vec![bad], 2, vec![0]),
            push_unchecked(shared, vec![good()], 1, vec![0]),
        ];
        wait_until("three are queued", || engine.stats().queue_len == 3);
        drop(held);
        rt.block_on(first)
            .expect("ends")
            .expect("the first is answered");
        let [before, bad, after] = answers.map(|a| rt.block_on(a).expect("answered"));
        let want = tract_outputs(&iris(), 1, &[0.25; FEATURES]);
        for good in [before, after] {
            let good = good.expect("a good request in a failed batch is answered");
            assert_close(&floats(&good[0]), &want[0]);
        }
        assert!(
            matches!(&bad, Err(Error::Internal(m)) if m.contains("holds 16 bytes for shape [2, 4]")),
            "{bad:?}"
        );
    }

    #[test]
    fn a_file_that_is_not_onnx_is_refused_with_tracts_reason() {
        for refused in [
            inspect(
                &ModelFiles::inline(b"not an onnx model"),
                EngineKind::Tract,
                1,
            )
            .map(drop),
            Engine::load(b"not an onnx model", MODEL, config(1, Duration::ZERO)).map(drop),
        ] {
            let Err(Error::InvalidArgument(message)) = refused else {
                panic!("expected InvalidArgument, got {refused:?}");
            };
            assert!(
                message.starts_with("tract cannot load the model: ") && message.contains("decode"),
                "{message}"
            );
        }
    }

    #[test]
    fn registration_gives_the_inputs_and_outputs() {
        let spec = |name: &str, width: i64| Spec {
            name: name.into(),
            datatype: DataType::Fp32,
            shape: vec![-1, width],
        };
        let registered =
            registration(&ModelFiles::inline(&classifier(7, &[5], 2, 4))).expect("a signature");
        assert!(registered.refused.is_empty(), "{registered:?}");
        assert_eq!(
            registered.signature,
            Signature {
                inputs: vec![spec("input", 7)],
                outputs: vec![spec("output", 2), spec("logits", 2)],
            }
        );
        let engine = load(&iris(), config(1, Duration::ZERO));
        assert_eq!(engine.signature().inputs, vec![spec("input", 4)]);
    }

    #[test]
    fn configs_with_zeros_or_a_long_delay_are_refused() {
        assert_eq!(EngineConfig::default().validate(), Ok(()));
        assert!(EngineConfig::default().threads >= 1);
        for (config, message) in [
            (
                EngineConfig {
                    max_batch_size: 0,
                    ..EngineConfig::default()
                },
                "max_batch_size must be at least 1, got 0",
            ),
            (
                EngineConfig {
                    queue_capacity: 0,
                    ..EngineConfig::default()
                },
                "queue_capacity must be at least 1, got 0",
            ),
            (
                EngineConfig {
                    threads: 0,
                    ..EngineConfig::default()
                },
                "threads must be at least 1, got 0",
            ),
            (
                EngineConfig {
                    max_queue_delay: Duration::from_secs(2),
                    ..EngineConfig::default()
                },
                "max_queue_delay must be at most 1s, got 2s",
            ),
        ] {
            assert_eq!(
                Engine::load(&iris(), MODEL, config).map(drop),
                Err(Error::InvalidArgument(message.into()))
            );
        }
    }

    /// Loads ONNX Runtime from `KILN_ONNXRUNTIME_LIB` (scripts/test.sh installs
    /// the wheel's library and sets it); false, with a note, where it is not set.
    fn with_onnxruntime() -> bool {
        let Some(path) = std::env::var_os("KILN_ONNXRUNTIME_LIB") else {
            eprintln!("SKIPPED: KILN_ONNXRUNTIME_LIB is not set; ONNX Runtime is not tested");
            return false;
        };
        let loaded = onnxruntime::init(Some(std::path::Path::new(&path)));
        assert!(matches!(loaded, Ok(Some(_))), "{loaded:?}");
        true
    }

    #[test]
    fn onnxruntime_gives_what_tract_gives_alone_and_in_batches() {
        if !with_onnxruntime() {
            return;
        }
        let onnx = classifier(FEATURES, &[16, 8], CLASSES, 11);
        let on = |engine| EngineConfig {
            engine: Some(engine),
            threads: 2,
            ..config(1, Duration::from_millis(2))
        };
        let ort = load(&onnx, on(EngineKind::OnnxRuntime));
        let tract = load(&onnx, on(EngineKind::Tract));
        assert_eq!(ort.kind(), EngineKind::OnnxRuntime);
        assert_eq!(tract.kind(), EngineKind::Tract);
        assert!(ort.batched());
        assert_eq!(ort.signature(), tract.signature());

        let mut rng = StdRng::seed_from_u64(12);
        let x = random_rows(&mut rng, 5, FEATURES);
        let want = tract_outputs(&onnx, 5, &x);
        let got = ort
            .run_batch_blocking(vec![fp32("input", 5, &x)])
            .expect("a direct run");
        for (tensor, want) in got.iter().zip(&want) {
            assert_eq!(tensor.shape, [5, CLASSES]);
            assert_near(&floats(tensor), want, 1e-5);
        }

        // Concurrent one-row requests, joined into batches by the batcher.
        let rt = runtime();
        let x = random_rows(&mut rng, 48, FEATURES);
        let rows: Vec<&[f32]> = x.chunks(FEATURES).collect();
        let tasks: Vec<_> = rows
            .iter()
            .map(|row| spawn_row(&rt, &ort, row, far()))
            .collect();
        for (task, row) in tasks.into_iter().zip(&rows) {
            let answer = rt
                .block_on(task)
                .expect("the task ends")
                .expect("an answer");
            let alone = tract_outputs(&onnx, 1, row);
            for (tensor, want) in answer.iter().zip(&alone) {
                assert_eq!(tensor.shape, [1, CLASSES]);
                assert_near(&floats(tensor), want, 1e-5);
            }
        }
        let stats = ort.stats();
        assert_eq!((stats.requests, stats.rows, stats.failures), (48, 48, 0));
    }

    #[test]
    fn a_replica_on_a_gpu_needs_onnxruntime_with_cuda_and_never_falls_back_to_cpus() {
        let onnx = classifier(FEATURES, &[8], CLASSES, 3);
        let on_gpu = |engine| EngineConfig {
            engine: Some(engine),
            gpu: Some(0),
            ..config(1, Duration::from_millis(2))
        };
        let tract = Engine::load(&onnx, "m", on_gpu(EngineKind::Tract)).map(|_| ());
        assert!(
            matches!(&tract, Err(Error::InvalidArgument(m)) if m.contains("tract serves on CPUs only")),
            "{tract:?}"
        );
        if !with_onnxruntime() {
            return;
        }
        if onnxruntime::has_cuda() {
            eprintln!(
                "SKIPPED: this ONNX Runtime library has CUDA; the refusal is for one without"
            );
            return;
        }
        let ort = Engine::load(&onnx, "m", on_gpu(EngineKind::OnnxRuntime)).map(|_| ());
        assert!(
            matches!(&ort, Err(Error::Unavailable(m))
                if m.contains("has no CUDA execution provider")
                    && m.contains("cannot serve on GPU 0")
                    && m.contains("onnxruntime-gpu")),
            "{ort:?}"
        );
    }

    /// A model of ONNX Runtime's other kinds of values: `text` (strings,
    /// `[batch, 1]`) comes back as `same` (Identity), and `scores` (`[batch, 3]`
    /// floats) as `probabilities`, a sequence of maps from the classes 30, 10 and
    /// 20 (ZipMap, as skl2onnx ends a classifier).
    fn strings_and_zipmap() -> Vec<u8> {
        use kiln_proto::onnx::tensor_proto::DataType as Elem;
        use kiln_proto::onnx::tensor_shape_proto::{dimension::Value as D, Dimension};
        use kiln_proto::onnx::{
            attribute_proto::AttributeType, type_proto, AttributeProto, GraphProto, ModelProto,
            NodeProto, OperatorSetIdProto, TensorShapeProto, TypeProto, ValueInfoProto,
        };
        use prost::Message as _;
        let tensor = |elem: Elem, dims: Option<Vec<D>>| TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem as i32,
                shape: dims.map(|dims| TensorShapeProto {
                    dim: dims
                        .into_iter()
                        .map(|d| Dimension {
                            value: Some(d),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        };
        let batch = || D::DimParam("batch".into());
        let maps = TypeProto {
            value: Some(type_proto::Value::SequenceType(Box::new(
                type_proto::Sequence {
                    elem_type: Some(Box::new(TypeProto {
                        value: Some(type_proto::Value::MapType(Box::new(type_proto::Map {
                            key_type: Elem::Int64 as i32,
                            value_type: Some(Box::new(tensor(Elem::Float, None))),
                        }))),
                        ..Default::default()
                    })),
                },
            ))),
            ..Default::default()
        };
        let info = |name: &str, ty: TypeProto| ValueInfoProto {
            name: name.into(),
            r#type: Some(ty),
            ..Default::default()
        };
        let node = |op: &str, domain: &str, input: &str, output: &str, attribute| NodeProto {
            op_type: op.into(),
            domain: domain.into(),
            input: vec![input.into()],
            output: vec![output.into()],
            name: output.into(),
            attribute,
            ..Default::default()
        };
        let labels = AttributeProto {
            name: "classlabels_int64s".into(),
            ints: vec![30, 10, 20],
            r#type: AttributeType::Ints as i32,
            ..Default::default()
        };
        let opset = |domain: &str, version| OperatorSetIdProto {
            domain: domain.into(),
            version,
        };
        ModelProto {
            ir_version: 8,
            opset_import: vec![opset("", 17), opset("ai.onnx.ml", 3)],
            graph: Some(GraphProto {
                name: "strings_and_zipmap".into(),
                node: vec![
                    node("Identity", "", "text", "same", vec![]),
                    node(
                        "ZipMap",
                        "ai.onnx.ml",
                        "scores",
                        "probabilities",
                        vec![labels],
                    ),
                ],
                input: vec![
                    info(
                        "text",
                        tensor(Elem::String, Some(vec![batch(), D::DimValue(1)])),
                    ),
                    info(
                        "scores",
                        tensor(Elem::Float, Some(vec![batch(), D::DimValue(3)])),
                    ),
                ],
                output: vec![
                    info(
                        "same",
                        tensor(Elem::String, Some(vec![batch(), D::DimValue(1)])),
                    ),
                    info("probabilities", maps),
                ],
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// One row of [`strings_and_zipmap`]'s inputs: a text of its own length.
    fn text_row(i: usize) -> Vec<Tensor> {
        let mut text = Vec::new();
        crate::serving::push_bytes_element(
            &mut text,
            format!("row {i} {}", "x".repeat(i)).as_bytes(),
        );
        vec![
            Tensor {
                name: "text".into(),
                datatype: DataType::Bytes,
                shape: vec![1, 1],
                data: text.into(),
            },
            fp32("scores", 1, &[i as f32, 0.5, -0.25]),
        ]
    }

    #[test]
    fn onnxruntime_serves_strings_and_zipmaps_alone_and_in_batches() {
        if !with_onnxruntime() {
            return;
        }
        let onnx = strings_and_zipmap();
        let refused = Engine::load(&onnx, MODEL, config(1, Duration::ZERO)).map(drop);
        assert!(
            matches!(&refused, Err(Error::InvalidArgument(m)) if m.contains("ONNX Runtime")),
            "tract refuses strings, naming the engine that serves them: {refused:?}"
        );
        let engine = load(
            &onnx,
            EngineConfig {
                engine: Some(EngineKind::OnnxRuntime),
                ..config(1, Duration::ZERO)
            },
        );
        assert!(engine.batched());
        let spec = |name: &str, datatype, shape: &[i64]| Spec {
            name: name.into(),
            datatype,
            shape: shape.to_vec(),
        };
        assert_eq!(
            engine.signature().inputs,
            [
                spec("text", DataType::Bytes, &[-1, 1]),
                spec("scores", DataType::Fp32, &[-1, 3])
            ]
        );
        assert_eq!(
            engine.signature().outputs,
            [
                spec("same", DataType::Bytes, &[-1, 1]),
                spec("probabilities", DataType::Fp32, &[-1, -1])
            ]
        );

        // One request held, the others queued and then joined into one batch:
        // each gets its own text and scores back, in the classes' sorted order
        // (10, 20, 30).
        let rt = runtime();
        let spawn = |i: usize| {
            let engine = engine.clone();
            rt.spawn(async move { engine.infer(text_row(i), None, far()).await })
        };
        let held = hold(&engine.inner.shared);
        let first = spawn(0);
        wait_held(&engine);
        let rest: Vec<_> = (1..12).map(spawn).collect();
        wait_until("11 requests are queued", || engine.stats().queue_len == 11);
        drop(held);
        for (i, task) in std::iter::once(first).chain(rest).enumerate() {
            let answer = rt
                .block_on(task)
                .expect("the task ends")
                .expect("an answer");
            let row = text_row(i);
            assert_eq!(answer[0].datatype, DataType::Bytes);
            assert_eq!(
                (&answer[0].shape, &answer[0].data),
                (&row[0].shape, &row[0].data)
            );
            assert_eq!(answer[1].shape, [1, 3]);
            assert_eq!(floats(&answer[1]), [0.5, -0.25, i as f32]);
        }
        let stats = engine.stats();
        assert_eq!((stats.requests, stats.inferences, stats.rows), (12, 2, 12));

        // Strings ONNX Runtime cannot take are refused with the element at
        // fault before they reach a batch.
        for (bytes, why) in [
            (&b"a\0b"[..], "element 0 holds a NUL character"),
            (&[0xff, 0xfe][..], "element 0 is not UTF-8 text"),
        ] {
            let mut row = text_row(1);
            let mut data = Vec::new();
            crate::serving::push_bytes_element(&mut data, bytes);
            row[0].data = data.into();
            let refused = rt.block_on(engine.infer(row, None, far()));
            assert!(
                matches!(&refused, Err(Error::InvalidArgument(m)) if m.contains(why) && m.contains("\"text\"")),
                "{refused:?}"
            );
        }
        assert_eq!(engine.stats().inferences, 2, "nothing more ran");
    }

    #[test]
    fn a_missing_onnxruntime_library_is_refused_with_its_path_and_the_fix() {
        let missing = std::path::Path::new("/nonexistent/libonnxruntime.so.1.32.0");
        let Err(Error::InvalidArgument(message)) = onnxruntime::init(Some(missing)) else {
            panic!("a missing library must be refused");
        };
        assert!(
            message.contains("/nonexistent/libonnxruntime.so.1.32.0 does not exist")
                && message.contains("--onnxruntime-lib"),
            "{message}"
        );
    }

    /// Prints rows/s of an MLP 32-256-256-10 run directly (batch 1 and 64) and
    /// through the batcher (one-row requests from 256 concurrent tasks), and checks
    /// that the batcher joins concurrent requests. The figures mean something only
    /// when it runs alone: `--nocapture --test-threads=1`.
    #[test]
    fn throughput_of_an_mlp_32_256_256_10() {
        const SECONDS: f64 = 1.0;
        let onnx = classifier(32, &[256, 256], 10, 5);
        let engine = load(
            &onnx,
            EngineConfig {
                engine: Some(EngineKind::Tract),
                ..EngineConfig::default()
            },
        );
        let mut rng = StdRng::seed_from_u64(6);
        for rows in [1, 64] {
            let x = random_rows(&mut rng, rows, 32);
            let started = Instant::now();
            let mut runs = 0;
            while started.elapsed().as_secs_f64() < SECONDS {
                engine
                    .run_batch_blocking(vec![fp32("input", rows, &x)])
                    .expect("a run");
                runs += 1;
            }
            let elapsed = started.elapsed().as_secs_f64();
            println!(
                "run_batch_blocking, batch {rows}: {:.0} rows/s ({:.1} µs per run)",
                (runs * rows) as f64 / elapsed,
                elapsed * 1e6 / runs as f64
            );
        }

        let rt = runtime();
        let x = random_rows(&mut rng, 1, 32);
        let before = engine.stats();
        let started = Instant::now();
        let requests: usize = rt.block_on(async {
            let tasks: Vec<_> = (0..256)
                .map(|_| {
                    let engine = engine.clone();
                    let x = x.clone();
                    tokio::spawn(async move {
                        let mut done = 0;
                        while started.elapsed().as_secs_f64() < SECONDS {
                            let input = fp32("input", 1, &x);
                            engine
                                .infer(vec![input], None, far())
                                .await
                                .expect("an answer");
                            done += 1;
                        }
                        done
                    })
                })
                .collect();
            let mut total = 0;
            for task in tasks {
                total += task.await.expect("the task ends");
            }
            total
        });
        let elapsed = started.elapsed().as_secs_f64();
        let stats = engine.stats();
        let batches = stats.inferences - before.inferences;
        println!(
            "infer, 256 concurrent one-row requests, {} threads: {:.0} requests/s, \
             {:.1} rows per batch, mean queue {:.0} µs, mean compute {:.0} µs",
            engine.config().threads,
            requests as f64 / elapsed,
            requests as f64 / batches as f64,
            (stats.queue_us - before.queue_us) as f64 / requests as f64,
            (stats.compute_us - before.compute_us) as f64 / requests as f64,
        );
        assert!(
            requests as u64 > 4 * batches,
            "concurrent requests are joined: {requests} requests in {batches} batches"
        );
    }
}
