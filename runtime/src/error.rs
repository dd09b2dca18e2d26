//! The one error type of the runtime crate.
//!
//! Every failure a user can cause (a bad file, a wrong config, an impossible request) is a
//! structured variant whose `Display` is a single line naming the file, tensor or field at fault.
//! Nothing in the runtime panics on user input; panics are reserved for broken internal invariants.

use std::path::PathBuf;

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
    /// A request the model cannot serve (bad ids, too long, bad sampling settings).
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
    /// A plan that cannot fit its budgets (the message names the budget, bytes and remedy).
    #[error("{0}")]
    Budget(String),
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
    /// Synthetic model writer failure.
    #[error(transparent)]
    Synth(#[from] crate::synth::SynthError),
}

impl Error {
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
