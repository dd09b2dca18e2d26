//! The one error type of the runtime crate.
//!
//! Every failure a user can cause (a bad file, a wrong config, an impossible request) is a
//! structured variant whose `Display` is a single line naming the file, tensor or field at fault.
//! Nothing in the runtime panics on user input; panics are reserved for broken internal invariants.
//!
//! Errors are sorted by kind, and callers (the server's status codes, the CLI's exit lines) rely
//! on it: [`Error::InvalidRequest`] and [`Error::ContextOverflow`] are the only variants a request
//! itself causes (with [`Error::Tokenizer`] when a request's text or template fails); a failure
//! to load an expert is [`Error::ExpertLoad`] carrying its cause, never a request error; a
//! failure of the process (a thread that cannot start, a broken internal invariant reached
//! without a panic) is [`Error::Internal`]; a plan that does not fit its memory is
//! [`Error::BudgetExceeded`] with the budget, the bytes and the remedy as fields.

use std::path::PathBuf;
use std::sync::Arc;

use crate::size::ByteSize;

/// Result alias used throughout the runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while opening a model or generating from it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O failure on a named file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file that is not what it claims to be (truncated, bad header, offsets past the end...).
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    /// A config.json (or generation_config.json) that cannot be used.
    #[error("{path}: {reason}")]
    BadConfig { path: PathBuf, reason: String },
    /// A field the architecture needs is absent from config.json.
    #[error("{path}: missing required field `{field}`")]
    MissingField { path: PathBuf, field: String },
    /// `architectures` / `model_type` names something we do not implement.
    #[error("unsupported architecture `{name}` (supported: {supported})")]
    UnknownArchitecture { name: String, supported: String },
    /// A tensor the architecture needs is in no weight file.
    #[error("missing tensor `{name}` (looked in {files})")]
    MissingTensor { name: String, files: String },
    /// The index names a shard file that does not exist.
    #[error("{index}: shard `{shard}` named by the index does not exist")]
    MissingShard { index: PathBuf, shard: String },
    /// A tensor whose shape is not what the config implies.
    #[error("tensor `{name}` in {path}: shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A tensor whose dtype we cannot compute with.
    #[error("tensor `{name}` in {path}: dtype {dtype} is not supported here (f32, bf16, f16)")]
    UnsupportedDtype {
        name: String,
        path: PathBuf,
        dtype: String,
    },
    /// `--model` is neither a folder nor a Hub id present in the local cache.
    #[error("model `{spec}` not found: {reason}")]
    ModelNotFound { spec: String, reason: String },
    /// A pre-quantized tensor whose parts do not agree (scales, codes, block sizes); `name` is the
    /// tensor.
    #[error("tensor `{name}`: {reason}")]
    BadTensor { name: String, reason: String },
    /// A request the model cannot serve (bad ids, too long, bad sampling settings). Only
    /// requests: a failure of the files or the process is another variant.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The prompt plus generation would exceed the context (`needed_tokens` is a lower bound
    /// when counting stopped early).
    #[error(
        "context overflow: at least {needed_tokens} tokens needed, max_context is {max_context_tokens}"
    )]
    ContextOverflow {
        needed_tokens: usize,
        max_context_tokens: usize,
    },
    /// A plan that does not fit a memory budget: `budget` names it (the config key, or the free
    /// memory when none is set), `needed_bytes` is what the part in `need` takes, `limit_bytes`
    /// the budget, and `remedy` says what to change.
    #[error("{}", need.message(budget, *needed_bytes, *limit_bytes, remedy))]
    BudgetExceeded {
        budget: &'static str,
        needed_bytes: u64,
        limit_bytes: u64,
        need: BudgetNeed,
        remedy: String,
    },
    /// Settings no plan can be made from, with no byte count to give (a missing budget, a KV
    /// cache beyond any memory, a device this build lacks); the message says what to change.
    #[error("{0}")]
    Unplannable(String),
    /// An expert's bytes could not be brought in (I/O error, checksum failure of the cache file,
    /// a file changed on disk): the model, not the request, is at fault. `source` is shared
    /// because every computation waiting on the expert receives it.
    #[error("expert {expert} of layer {layer} could not be loaded: {source}")]
    ExpertLoad {
        layer: usize,
        expert: usize,
        #[source]
        source: Arc<Error>,
    },
    /// A failure of the process rather than of the files or the request (a thread pool that
    /// cannot start, an internal invariant found broken).
    #[error("internal error: {0}")]
    Internal(String),
    /// The compute backend a setting asks for cannot be opened here (the reason says what to
    /// set instead).
    #[error("{backend} backend unavailable: {reason}")]
    BackendUnavailable { backend: String, reason: String },
    /// The GPU failed an operation, or an allocation would pass the VRAM budget at run time.
    /// `fatal`: the device context is unusable (a kernel fault); the model must be reloaded.
    #[error("cuda device: {reason}")]
    Device { reason: String, fatal: bool },
    /// The quantized weight cache cannot be used or written (the message says what to do).
    #[error("quantized weight cache {}: {reason}", path.display())]
    Cache { path: PathBuf, reason: String },
    /// A mapped model or cache file changed on disk while in use (see [`crate::mapguard`]): the
    /// model is unusable until the process restarts.
    #[error(
        "the {role} {} changed on disk while in use ({change}); restart moe-serve to load it",
        path.display()
    )]
    FileChanged {
        path: PathBuf,
        /// "model file" or "quantized weight cache file".
        role: &'static str,
        /// "truncated", "modified in place", ...
        change: &'static str,
    },
    /// The forward pass produced logits no token can be drawn from (NaN or +infinity).
    #[error(
        "the model produced non-finite logits at step {step} ({logit}); its weights or config \
         are likely corrupt"
    )]
    NonFiniteLogits {
        /// Generated tokens before it (0: the logits of the prompt's last token).
        step: usize,
        logit: crate::sampler::NonFiniteLogit,
    },
    /// Tokenizer or chat-template failure.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
}

/// What a [`Error::BudgetExceeded`] refusal needed the bytes for; it shapes the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BudgetNeed {
    /// Weights and KV cache that must stay on the device; `detail` splits the bytes.
    DeviceResident { detail: String },
    /// What must stay in RAM (resident weights, KV cache, expert buffers); `detail` splits it.
    HostResident { detail: String },
    /// Quantized experts held in RAM (no cache file to stream them from): `fit` of `total` fit.
    QuantizedExperts { fit: usize, total: usize },
    /// `slots` device slots per layer (`slots_per_layer`) in what the resident set leaves of the
    /// device budget, `free_bytes`.
    DeviceSlots { slots: usize, free_bytes: u64 },
}

impl BudgetNeed {
    /// The one-line refusal (the planner's wording; the CLI and tests read it).
    fn message(&self, budget: &str, needed_bytes: u64, limit_bytes: u64, remedy: &str) -> String {
        let (needed, limit) = (ByteSize(needed_bytes), ByteSize(limit_bytes));
        match self {
            BudgetNeed::DeviceResident { detail } => format!(
                "{budget} {limit} is below the resident set: {needed} needed ({detail}); {remedy}"
            ),
            BudgetNeed::HostResident { detail } => format!(
                "{budget} {limit} is below what must stay in RAM: {needed} needed ({detail}); \
                 {remedy}"
            ),
            BudgetNeed::QuantizedExperts { fit, total } => format!(
                "quantized experts are held in RAM (quantized at load, cache = false): {needed} \
                 needed, but {budget} {limit} leaves room for {fit} of {total}; {remedy}"
            ),
            BudgetNeed::DeviceSlots { slots, free_bytes } => format!(
                "slots_per_layer = {slots} needs {needed} of device memory for experts, but \
                 {budget} {limit} leaves {} after the resident set; {remedy}",
                ByteSize(*free_bytes)
            ),
        }
    }
}

impl Error {
    /// Whether the request itself is at fault (the server answers 400), as opposed to the
    /// model's files or the process (500 or 503). Tokenizer failures are not counted: one may be
    /// the request's text or a tokenizer file, and only the caller knows which.
    pub fn is_request_error(&self) -> bool {
        matches!(
            self,
            Error::InvalidRequest(_) | Error::ContextOverflow { .. }
        )
    }

    /// Whether the model cannot serve anything until the process restarts: a mapped file changed
    /// on disk, found directly or as the cause of an expert that could not be loaded.
    pub fn model_unusable(&self) -> bool {
        match self {
            Error::FileChanged { .. } | Error::Device { fatal: true, .. } => true,
            Error::ExpertLoad { source, .. } => source.model_unusable(),
            _ => false,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn bad_file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn bad_config(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::BadConfig {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
