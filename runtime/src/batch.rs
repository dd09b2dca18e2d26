//! Continuous batching: many requests share one loaded model through one scheduler thread.
//!
//! Requests join the running batch between steps and leave it the step they finish. Each step
//! runs one forward pass over the next token of every decoding sequence plus a bounded chunk of
//! prompt tokens of the sequences still in prefill (chunked prefill keeps running streams
//! flowing while a long prompt is read). All rows of a step go through the model together, so
//! an expert that several sequences route to is fetched and computed once per layer per step.
//! A prompt that shares a prefix with an earlier sequence (a system prompt, a previous turn)
//! starts from a copy of that sequence's KV cache (in models with recurrent layers, only when
//! the whole cached sequence is a prefix of the new prompt: a recurrent state cannot be cut).
//!
//! Invariants: at most `max_batch` sequences run and at most `max_queue` wait, everything beyond
//! is refused at once ([`Refused::QueueFull`]); a sequence whose client is gone ([`Sink::closed`])
//! is dropped with its KV cache before the next step, and a waiting request whose client is gone
//! leaves the queue at the scheduler's next turn, or at once when [`Batcher::submit`] finds the
//! queue full (so departed clients never cause a 429); running KV caches plus cached prefixes stay
//! within `kv_budget` bytes; a panic or error inside a step fails only the sequences that cause it
//! (the batch is rolled back and retried one sequence at a time) and never stops the scheduler;
//! streamed text never ends inside a UTF-8 character nor shows any part of a stop string. Each
//! sequence's tokens and text come from one [`SeqDecoder`] ([`crate::sequence`]), as in
//! [`Model::generate`], so a request gives the same tokens and text through both.
//!
//! ```
//! use moe_runtime::batch::{BatchConfig, Batcher, Event, RequestParams};
//! use moe_runtime::{Model, Prompt, Settings};
//!
//! let model = std::sync::Arc::new(Model::load(&Settings::default())?);
//! let batcher = Batcher::start(model.clone(), BatchConfig::for_model(&model, 64));
//! let (tx, rx) = crossbeam_channel::unbounded();
//! let ids = model.encode_prompt(&Prompt::Text("Hello".into()))?;
//! let mut params = RequestParams::default();
//! params.generate.max_tokens = Some(4);
//! batcher.validate(&ids, &params)?;
//! batcher.submit(ids, params, Box::new(tx))?; // Err: queue full, or shutting down
//! let mut text = String::new();
//! for event in rx {
//!     match event {
//!         Event::Token(t) => text.push_str(&t.text),
//!         Event::Done { text: rest, .. } => {
//!             text.push_str(&rest);
//!             break;
//!         }
//!         Event::Failed(why) => panic!("{why}"),
//!     }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::dispatch::{Segment, SeqState};
use crate::engine::{FinishReason, GenerateParams, Model};
use crate::error::{Error, Result};
use crate::model::Logits;
use crate::sequence::SeqDecoder;
pub use crate::sequence::{TokenLogprob, MAX_TOP_LOGPROBS};

/// How the scheduler shares the model.
#[derive(Clone, Debug)]
pub struct BatchConfig {
    /// Sequences running at once.
    pub max_batch: usize,
    /// Requests that may wait for a slot; beyond it [`Batcher::submit`] refuses.
    pub max_queue: usize,
    /// Prompt tokens prefilled per step, over all sequences in prefill.
    pub prefill_chunk: usize,
    /// Bytes of KV cache for running sequences and cached prefixes together.
    pub kv_budget: u64,
    /// Reuse the KV cache of a shared prompt prefix.
    pub prefix_cache: bool,
    /// Test hook: a step whose batch holds a prompt containing this token id panics.
    #[doc(hidden)]
    pub fault_panic_token: Option<u32>,
}

impl BatchConfig {
    /// Defaults for `model`: its planned batch size and KV cache.
    pub fn for_model(model: &Model, max_queue: usize) -> BatchConfig {
        let max_batch = model.max_batch.max(1);
        BatchConfig {
            max_batch,
            max_queue,
            prefill_chunk: 256,
            kv_budget: model.plan.kv_bytes,
            prefix_cache: true,
            fault_panic_token: None,
        }
    }
}

/// One request's settings beyond [`GenerateParams`] (which holds the stop strings and the
/// penalties, shared with [`Model::generate`]).
#[derive(Clone, Debug, Default)]
pub struct RequestParams {
    pub generate: GenerateParams,
    /// Report the chosen token's log-probability and this many alternatives (0..=20).
    pub logprobs: Option<usize>,
}

/// One generated token.
#[derive(Clone, Debug)]
pub struct TokenOut {
    pub id: u32,
    /// Text this token released: complete characters, stop strings held back.
    pub text: String,
    /// With `logprobs`: the token's own and the top alternatives.
    pub logprob: Option<(TokenLogprob, Vec<TokenLogprob>)>,
}

/// Token counts and timings of a finished request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV cache came from an earlier sequence.
    pub cached_tokens: usize,
    /// Generated tokens, the stop token included.
    pub completion_tokens: usize,
    /// From submission to the first token.
    pub time_to_first_token: Duration,
    /// From the first token to the last.
    pub decode_time: Duration,
    /// From submission to admission into the batch.
    pub queue_time: Duration,
}

/// What a request's sink receives, in order: tokens, then exactly one `Done` or `Failed`.
#[derive(Debug)]
pub enum Event {
    Token(TokenOut),
    /// Generation ended; `text` is what was held back and is released now (may be empty).
    Done {
        finish: FinishReason,
        text: String,
        usage: Usage,
    },
    /// The request failed inside the scheduler; the error keeps its kind (a bad request, an
    /// expert that could not be loaded, model files changed on disk, an internal fault).
    Failed(Error),
}

/// Where a request's events go.
pub trait Sink: Send {
    /// Delivers an event; `false` = the receiver is gone (the sequence is dropped).
    fn send(&mut self, event: Event) -> bool;
    /// Whether the receiver is gone (checked before every step).
    fn closed(&self) -> bool;
}

impl Sink for crossbeam_channel::Sender<Event> {
    fn send(&mut self, event: Event) -> bool {
        crossbeam_channel::Sender::send(self, event).is_ok()
    }
    fn closed(&self) -> bool {
        // A crossbeam sender cannot see its receiver go; the next send tells.
        false
    }
}

/// Why a request was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the server is busy: {running} requests running and {queued} waiting (max_queue {max_queue}); retry later")]
    QueueFull {
        running: usize,
        queued: usize,
        max_queue: usize,
    },
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// Live counters of the scheduler (read by metrics).
#[derive(Debug, Default)]
pub struct BatchCounters {
    pub queued: AtomicUsize,
    pub running: AtomicUsize,
    /// Rows (tokens) of the last step.
    pub last_step_tokens: AtomicUsize,
    /// Sequences in the last step.
    pub last_step_sequences: AtomicUsize,
    pub steps: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub cached_prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Bytes of KV cache held by cached prefixes.
    pub prefix_cache_bytes: AtomicU64,
    /// Sequences failed by a panic or an error inside a step.
    pub failed: AtomicU64,
}

struct Job {
    prompt: Vec<u32>,
    params: RequestParams,
    sink: Box<dyn Sink>,
    submitted: Instant,
}

/// How long the idle scheduler sleeps before it looks at `stop` again (a new job wakes it at
/// once): short enough that shutdown is prompt, long enough that idling costs nothing.
const IDLE_WAIT: Duration = Duration::from_millis(50);

/// The requests waiting for a batch slot, shared by [`Batcher::submit`] (which appends, and
/// prunes departed clients when the queue is full) and the scheduler (which admits and prunes).
struct Queue {
    state: Mutex<QueueState>,
    /// Signalled when a job arrives or the queue closes.
    arrived: Condvar,
}

struct QueueState {
    jobs: VecDeque<Job>,
    /// False once the scheduler stops: submissions are refused from then on.
    open: bool,
}

impl Queue {
    /// Drops the waiting jobs whose clients are gone; keeps `counters.queued` equal to the
    /// queue's length.
    fn prune(state: &mut QueueState, counters: &BatchCounters) {
        if state.jobs.iter().any(|j| j.sink.closed()) {
            state.jobs.retain(|j| !j.sink.closed());
        }
        counters.queued.store(state.jobs.len(), Relaxed);
    }

    /// Refuses further jobs and takes the waiting ones.
    fn close(&self, counters: &BatchCounters) -> VecDeque<Job> {
        let mut q = self.state.lock();
        q.open = false;
        counters.queued.store(0, Relaxed);
        let jobs = std::mem::take(&mut q.jobs);
        drop(q);
        self.arrived.notify_all();
        jobs
    }
}

/// Closes the queue when the scheduler thread ends, even by a panic, so that no request waits
/// for a scheduler that is gone.
struct CloseOnExit(Arc<Queue>, Arc<BatchCounters>);

impl Drop for CloseOnExit {
    fn drop(&mut self) {
        for job in self.0.close(&self.1) {
            let mut sink = job.sink;
            sink.send(Event::Done {
                finish: FinishReason::Cancelled,
                text: String::new(),
                usage: Usage::default(),
            });
        }
    }
}

/// The scheduler: owns a thread that runs the model for every submitted request.
pub struct Batcher {
    queue: Arc<Queue>,
    counters: Arc<BatchCounters>,
    config: BatchConfig,
    model: Arc<Model>,
    accepting: AtomicBool,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Batcher {
    /// Starts the scheduler thread.
    pub fn start(model: Arc<Model>, config: BatchConfig) -> Batcher {
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState {
                jobs: VecDeque::new(),
                open: true,
            }),
            arrived: Condvar::new(),
        });
        let counters = Arc::new(BatchCounters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (model, config, counters, stop, queue) = (
                model.clone(),
                config.clone(),
                counters.clone(),
                stop.clone(),
                queue.clone(),
            );
            std::thread::Builder::new()
                .name("moe-batch".into())
                .spawn(move || {
                    let _close = CloseOnExit(queue.clone(), counters.clone());
                    Scheduler::new(&model, config, counters, stop).run(&queue)
                })
                .expect("spawn the batch scheduler thread")
        };
        Batcher {
            queue,
            counters,
            config,
            model,
            accepting: AtomicBool::new(true),
            stop,
            thread: Mutex::new(Some(thread)),
        }
    }

    pub fn config(&self) -> &BatchConfig {
        &self.config
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn counters(&self) -> &BatchCounters {
        &self.counters
    }

    /// Checks a request against the model before it is queued: sampling settings, penalties,
    /// logprobs, and that the prompt plus `max_tokens` fit the context.
    pub fn validate(&self, prompt: &[u32], params: &RequestParams) -> Result<()> {
        let m = &self.model;
        // A model whose files changed on disk serves nothing more (the error names the file).
        m.check_files()?;
        m.request_sampling(&params.generate, params.logprobs)?;
        if prompt.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(bad) = prompt.iter().find(|&&i| i as usize >= m.config.vocab_size) {
            return Err(Error::InvalidRequest(format!(
                "prompt token id {bad} is outside the vocabulary (vocab_size {})",
                m.config.vocab_size
            )));
        }
        let new = params.generate.max_tokens.unwrap_or(1).max(1);
        if prompt.len() + new > m.max_context {
            return Err(Error::ContextOverflow {
                needed_tokens: prompt.len() + new,
                max_context_tokens: m.max_context,
            });
        }
        Ok(())
    }

    /// Queues a request (validated with [`Batcher::validate`] first); its events go to `sink`.
    /// A full queue is first pruned of requests whose clients are gone.
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        params: RequestParams,
        sink: Box<dyn Sink>,
    ) -> std::result::Result<(), Refused> {
        if !self.accepting.load(Relaxed) {
            return Err(Refused::ShuttingDown);
        }
        let c = &self.counters;
        let mut q = self.queue.state.lock();
        if !q.open {
            return Err(Refused::ShuttingDown);
        }
        if q.jobs.len() >= self.config.max_queue {
            Queue::prune(&mut q, c);
        }
        let queued = q.jobs.len();
        if queued >= self.config.max_queue {
            return Err(Refused::QueueFull {
                running: c.running.load(Relaxed),
                queued,
                max_queue: self.config.max_queue,
            });
        }
        q.jobs.push_back(Job {
            prompt,
            params,
            sink,
            submitted: Instant::now(),
        });
        c.queued.store(q.jobs.len(), Relaxed);
        drop(q);
        self.queue.arrived.notify_one();
        Ok(())
    }

    /// Whether the scheduler thread is still serving (false after shutdown, or if it died).
    pub fn is_running(&self) -> bool {
        self.thread
            .lock()
            .as_ref()
            .is_some_and(|t| !t.is_finished())
    }

    /// Requests waiting plus running.
    pub fn in_flight(&self) -> usize {
        self.counters.queued.load(Relaxed) + self.counters.running.load(Relaxed)
    }

    /// Stops accepting, lets queued and running requests finish until `deadline`, then cancels
    /// the rest (their sinks get `Done` with [`FinishReason::Cancelled`]) and joins the thread.
    pub fn shutdown(&self, deadline: Duration) {
        self.accepting.store(false, Relaxed);
        let t0 = Instant::now();
        while self.in_flight() > 0 && t0.elapsed() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.stop.store(true, Relaxed);
        self.queue.arrived.notify_all();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.shutdown(Duration::ZERO);
    }
}

/// One running request.
struct Seq<'m> {
    prompt: Vec<u32>,
    sink: Box<dyn Sink>,
    state: SeqState,
    /// Prompt tokens already in `state`.
    fed: usize,
    cached: usize,
    /// Sampling, EOS, stop strings, penalties, logprobs, token limit and text.
    seq: SeqDecoder<'m>,
    /// The sampled token to feed next step.
    next: Option<u32>,
    submitted: Instant,
    admitted: Instant,
    first_token: Option<Instant>,
}

impl Seq<'_> {
    fn in_prefill(&self) -> bool {
        self.fed < self.prompt.len()
    }
}

/// A finished sequence's KV cache, kept for later prompts that start the same way.
struct Prefix {
    tokens: Vec<u32>,
    state: SeqState,
    last_used: u64,
}

struct Scheduler<'m> {
    model: &'m Model,
    config: BatchConfig,
    counters: Arc<BatchCounters>,
    stop: Arc<AtomicBool>,
    running: Vec<Seq<'m>>,
    prefixes: Vec<Prefix>,
    clock: u64,
}

impl<'m> Scheduler<'m> {
    fn new(
        model: &'m Model,
        config: BatchConfig,
        counters: Arc<BatchCounters>,
        stop: Arc<AtomicBool>,
    ) -> Self {
        Scheduler {
            model,
            config,
            counters,
            stop,
            running: Vec::new(),
            prefixes: Vec::new(),
            clock: 0,
        }
    }

    fn run(mut self, queue: &Queue) {
        loop {
            if self.stop.load(Relaxed) {
                break;
            }
            {
                let mut q = queue.state.lock();
                // Every turn: waiting requests whose clients left give up their places.
                Queue::prune(&mut q, &self.counters);
                if self.running.is_empty() && q.jobs.is_empty() {
                    queue.arrived.wait_for(&mut q, IDLE_WAIT);
                    continue;
                }
            }
            self.admit(queue);
            self.drop_closed();
            if !self.running.is_empty() {
                self.step();
            }
        }
        // Cancel whatever is left (the waiting jobs when the queue closes, on the way out).
        for i in (0..self.running.len()).rev() {
            self.finish(i, FinishReason::Cancelled);
        }
    }

    /// Moves waiting requests into free batch slots, reusing cached prefixes.
    fn admit(&mut self, queue: &Queue) {
        while self.running.len() < self.config.max_batch {
            let job = {
                let mut q = queue.state.lock();
                let job = q.jobs.pop_front();
                self.counters.queued.store(q.jobs.len(), Relaxed);
                job
            };
            let Some(job) = job else {
                break;
            };
            if job.sink.closed() {
                continue;
            }
            match self.start_seq(job) {
                Ok(seq) => {
                    self.running.push(seq);
                    self.counters.running.fetch_add(1, Relaxed);
                }
                Err((mut sink, e)) => {
                    sink.send(Event::Failed(e));
                }
            }
        }
    }

    fn start_seq(&mut self, job: Job) -> std::result::Result<Seq<'m>, (Box<dyn Sink>, Error)> {
        let seq = match self.model.seq_decoder(
            job.prompt.len(),
            &job.params.generate,
            job.params.logprobs,
        ) {
            Ok(s) => s,
            Err(e) => return Err((job.sink, e)),
        };
        let (state, cached) = self.reuse_prefix(&job.prompt);
        self.counters
            .prompt_tokens
            .fetch_add(job.prompt.len() as u64, Relaxed);
        self.counters
            .cached_prompt_tokens
            .fetch_add(cached as u64, Relaxed);
        Ok(Seq {
            state,
            fed: cached,
            cached,
            seq,
            next: None,
            submitted: job.submitted,
            admitted: Instant::now(),
            first_token: None,
            prompt: job.prompt,
            sink: job.sink,
        })
    }

    /// A state holding the longest cached prefix of `prompt` (at least one prompt token is left
    /// to compute, so the last position's logits come from this request's own pass).
    fn reuse_prefix(&mut self, prompt: &[u32]) -> (SeqState, usize) {
        self.clock += 1;
        let can_cut = self.model.decoder.can_truncate();
        let best = self
            .prefixes
            .iter_mut()
            .map(|p| {
                let mut n = common_prefix(&p.tokens, prompt).min(prompt.len() - 1);
                // A recurrent state holds exactly its own tokens: usable only whole.
                if !can_cut && n < p.tokens.len() {
                    n = 0;
                }
                (n, p)
            })
            .max_by_key(|(n, _)| *n);
        match best {
            Some((n, p)) if self.config.prefix_cache && n > 0 => {
                p.last_used = self.clock;
                let mut state = p.state.clone();
                let cut = self.model.decoder.truncate(&mut state, n);
                debug_assert!(cut, "only whole recurrent prefixes are picked");
                (state, n)
            }
            _ => (self.model.new_state(), 0),
        }
    }

    /// Keeps `state` (which holds `tokens`) for later prompts, within the KV budget.
    fn remember(&mut self, tokens: Vec<u32>, state: SeqState) {
        if !self.config.prefix_cache || tokens.is_empty() {
            return;
        }
        debug_assert_eq!(tokens.len(), state.len());
        self.clock += 1;
        // A prefix of the new entry is redundant; the new entry is redundant under a longer one.
        self.prefixes
            .retain(|p| common_prefix(&p.tokens, &tokens) < p.tokens.len());
        if let Some(p) = self
            .prefixes
            .iter_mut()
            .find(|p| common_prefix(&p.tokens, &tokens) == tokens.len())
        {
            p.last_used = self.clock;
            return;
        }
        self.prefixes.push(Prefix {
            tokens,
            state,
            last_used: self.clock,
        });
        self.fit_budget();
    }

    /// Evicts least recently used prefixes until running and cached KV fit the budget.
    fn fit_budget(&mut self) {
        let dec = &self.model.decoder;
        let running: u64 = self
            .running
            .iter()
            .map(|s| dec.state_bytes(&s.state) as u64)
            .sum();
        let allowed = self.config.kv_budget.saturating_sub(running);
        let mut cached: u64 = self
            .prefixes
            .iter()
            .map(|p| dec.state_bytes(&p.state) as u64)
            .sum();
        while cached > allowed && !self.prefixes.is_empty() {
            let (i, _) = self
                .prefixes
                .iter()
                .enumerate()
                .min_by_key(|(_, p)| p.last_used)
                .expect("not empty");
            cached -= dec.state_bytes(&self.prefixes.swap_remove(i).state) as u64;
        }
        self.counters.prefix_cache_bytes.store(cached, Relaxed);
    }

    /// Drops sequences whose clients are gone, freeing their KV caches.
    fn drop_closed(&mut self) {
        let before = self.running.len();
        self.running.retain(|s| !s.sink.closed());
        let gone = before - self.running.len();
        if gone > 0 {
            self.counters.running.fetch_sub(gone, Relaxed);
        }
    }

    /// One forward pass over the batch, then one token for every sequence that has logits.
    fn step(&mut self) {
        // Decode rows first, then prompt chunks (FIFO) up to the prefill budget.
        let mut feeds: Vec<(usize, Vec<u32>, bool)> = Vec::new();
        let mut budget = self.config.prefill_chunk.max(1);
        for (i, s) in self.running.iter().enumerate() {
            if let Some(t) = s.next {
                feeds.push((i, vec![t], true));
            }
        }
        for (i, s) in self.running.iter().enumerate() {
            if s.in_prefill() && budget > 0 {
                let n = (s.prompt.len() - s.fed).min(budget);
                budget -= n;
                let last = s.fed + n == s.prompt.len();
                feeds.push((i, s.prompt[s.fed..s.fed + n].to_vec(), last));
            }
        }
        if feeds.is_empty() {
            return;
        }
        self.counters.steps.fetch_add(1, Relaxed);
        self.counters
            .last_step_sequences
            .store(feeds.len(), Relaxed);
        self.counters
            .last_step_tokens
            .store(feeds.iter().map(|f| f.1.len()).sum(), Relaxed);
        let results = match self.forward(&feeds) {
            Ok(r) => r,
            Err(_) => self.isolate(&feeds),
        };
        let mut done: Vec<(usize, FinishReason)> = Vec::new();
        let mut failed: Vec<(usize, Error)> = Vec::new();
        for ((i, tokens, _), res) in feeds.iter().zip(results) {
            let s = &mut self.running[*i];
            match res {
                Err(msg) => failed.push((*i, msg)),
                Ok(logits) => {
                    if s.in_prefill() {
                        s.fed += tokens.len();
                        if !s.in_prefill() && self.config.prefix_cache {
                            let (tokens, state) = (s.prompt.clone(), s.state.clone());
                            self.remember(tokens, state);
                        }
                    }
                    let s = &mut self.running[*i];
                    if let Some(logits) = logits {
                        self.counters.generated_tokens.fetch_add(1, Relaxed);
                        match catch_unwind(AssertUnwindSafe(|| emit_token(s, &logits))) {
                            Ok(Ok(Some(reason))) => done.push((*i, reason)),
                            Ok(Ok(None)) => {}
                            Ok(Err(msg)) => failed.push((*i, msg)),
                            Err(p) => failed.push((*i, panic_error(&p))),
                        }
                    }
                }
            }
        }
        let mut ends: Vec<(usize, std::result::Result<FinishReason, Error>)> = done
            .into_iter()
            .map(|(i, r)| (i, Ok(r)))
            .chain(failed.into_iter().map(|(i, m)| (i, Err(m))))
            .collect();
        // Remove from the back so indices stay valid.
        ends.sort_by_key(|e| std::cmp::Reverse(e.0));
        ends.dedup_by_key(|e| e.0);
        for (i, end) in ends {
            match end {
                Ok(reason) => self.finish(i, reason),
                Err(e) => {
                    let mut s = self.running.swap_remove(i);
                    self.counters.running.fetch_sub(1, Relaxed);
                    self.counters.failed.fetch_add(1, Relaxed);
                    tracing::error!("request failed inside the scheduler: {e}");
                    s.sink.send(Event::Failed(e));
                }
            }
        }
        self.fit_budget();
    }

    /// Runs `feeds` as one batch; a panic or an error rolls every state back.
    #[allow(clippy::type_complexity)]
    fn forward(
        &mut self,
        feeds: &[(usize, Vec<u32>, bool)],
    ) -> std::result::Result<Vec<std::result::Result<Option<Vec<f32>>, Error>>, Error> {
        let model = self.model;
        let snaps: Vec<_> = feeds
            .iter()
            .map(|f| model.decoder.snapshot(&self.running[f.0].state))
            .collect();
        let fault = self
            .config
            .fault_panic_token
            .is_some_and(|t| feeds.iter().any(|f| self.running[f.0].prompt.contains(&t)));
        let mut states: Vec<Option<&mut SeqState>> = self
            .running
            .iter_mut()
            .map(|s| Some(&mut s.state))
            .collect();
        let mut segs: Vec<Segment<'_>> = feeds
            .iter()
            .map(|(i, tokens, last)| Segment {
                tokens,
                state: states[*i].take().expect("one feed per sequence"),
                logits: last.then_some(Logits::Last),
            })
            .collect();
        let out = catch_unwind(AssertUnwindSafe(|| {
            let r = model.forward_batch(&mut segs);
            if fault {
                panic!("injected fault: a prompt holds the fault token");
            }
            r
        }));
        let err = match out {
            Ok(Ok(logits)) => return Ok(logits.into_iter().map(Ok).collect()),
            Ok(Err(e)) => e,
            Err(p) => panic_error(&p),
        };
        drop(segs);
        for (f, snap) in feeds.iter().zip(snaps) {
            model.decoder.restore(&mut self.running[f.0].state, snap);
        }
        Err(err)
    }

    /// After a failed batch: runs each sequence alone so only the ones that fail are failed.
    fn isolate(
        &mut self,
        feeds: &[(usize, Vec<u32>, bool)],
    ) -> Vec<std::result::Result<Option<Vec<f32>>, Error>> {
        feeds
            .iter()
            .map(|f| match self.forward(std::slice::from_ref(f)) {
                Ok(mut r) => r.pop().expect("one result"),
                Err(msg) => Err(msg),
            })
            .collect()
    }

    /// Ends sequence `i`: releases held text, reports usage, keeps its KV cache as a prefix.
    fn finish(&mut self, i: usize, reason: FinishReason) {
        let mut s = self.running.swap_remove(i);
        self.counters.running.fetch_sub(1, Relaxed);
        let text = match s.seq.finish(reason) {
            Ok(text) => text,
            Err(e) => {
                self.counters.failed.fetch_add(1, Relaxed);
                tracing::error!("request failed inside the scheduler: {e}");
                s.sink.send(Event::Failed(e));
                return;
            }
        };
        let now = Instant::now();
        let first = s.first_token.unwrap_or(now);
        let usage = Usage {
            prompt_tokens: s.prompt.len(),
            cached_tokens: s.cached,
            completion_tokens: s.seq.generated().len(),
            time_to_first_token: first - s.submitted,
            decode_time: now - first,
            queue_time: s.admitted - s.submitted,
        };
        s.sink.send(Event::Done {
            finish: reason,
            text,
            usage,
        });
        if self.config.prefix_cache && !s.state.is_empty() {
            let mut tokens = s.prompt;
            tokens.extend_from_slice(s.seq.generated());
            tokens.truncate(s.state.len());
            if tokens.len() == s.state.len() {
                self.remember(tokens, s.state);
            }
        }
    }
}

/// Samples the next token of `s` from `logits`, sends it, and says whether `s` is done; logits
/// no token can be drawn from, or a token that cannot be decoded, fail this sequence alone (the
/// error says why).
fn emit_token(s: &mut Seq<'_>, logits: &[f32]) -> Result<Option<FinishReason>> {
    let step = s.seq.on_logits(logits)?;
    s.first_token.get_or_insert_with(Instant::now);
    s.next = step.finish.is_none().then_some(step.id);
    let alive = s.sink.send(Event::Token(TokenOut {
        id: step.id,
        text: step.text,
        logprob: step.logprob,
    }));
    if !alive {
        return Ok(Some(FinishReason::Cancelled));
    }
    Ok(step.finish)
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// A panic caught while generating, as the internal error it is.
fn panic_error(p: &Box<dyn std::any::Any + Send>) -> Error {
    let what = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    Error::Internal(format!("a panic while generating: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink whose client can be made to leave.
    struct Leaving(Arc<AtomicBool>);

    impl Sink for Leaving {
        fn send(&mut self, _: Event) -> bool {
            !self.0.load(Relaxed)
        }
        fn closed(&self) -> bool {
            self.0.load(Relaxed)
        }
    }

    #[test]
    fn waiting_requests_whose_clients_left_free_the_queue() {
        let model = Arc::new(Model::load(&crate::Settings::default()).unwrap());
        let mut cfg = BatchConfig::for_model(&model, 2);
        cfg.max_batch = 1;
        let batcher = Batcher::start(model.clone(), cfg);
        let prompt = model
            .encode_prompt(&crate::Prompt::Text("hold".into()))
            .unwrap();
        let mut long = RequestParams::default();
        long.generate.max_tokens = Some(model.max_context - prompt.len());
        long.generate.ignore_eos = true;
        let (tx, rx) = crossbeam_channel::unbounded();
        batcher
            .submit(prompt.clone(), long.clone(), Box::new(tx))
            .unwrap();
        // The long request runs; two more fill the queue, then their clients leave.
        assert!(matches!(rx.recv(), Ok(Event::Token(_))));
        let gone = Arc::new(AtomicBool::new(false));
        for _ in 0..2 {
            let sink = Box::new(Leaving(gone.clone()));
            batcher.submit(prompt.clone(), long.clone(), sink).unwrap();
        }
        let (tx2, _rx2) = crossbeam_channel::unbounded();
        assert!(matches!(
            batcher.submit(prompt.clone(), long.clone(), Box::new(tx2)),
            Err(Refused::QueueFull { queued: 2, .. })
        ));
        gone.store(true, Relaxed);
        // At once, while the long request still runs, a new request finds room.
        let (tx3, _rx3) = crossbeam_channel::unbounded();
        assert_eq!(
            batcher.submit(prompt.clone(), long.clone(), Box::new(tx3)),
            Ok(())
        );
        assert_eq!(batcher.counters().running.load(Relaxed), 1);
        assert_eq!(batcher.counters().queued.load(Relaxed), 1);
        drop(rx);
        batcher.shutdown(Duration::ZERO);
        assert_eq!(batcher.counters().queued.load(Relaxed), 0);
    }

    #[test]
    fn common_prefix_counts_equal_leading_tokens() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
    }
}
