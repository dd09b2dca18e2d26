//! The run configuration file (TOML): which model to run, on which device, within which memory
//! budgets, and how the expert cache, the quantized weight cache, the transfer simulator and the
//! server behave.
//!
//! This module owns the file format: the structs below, their defaults, the size syntax of
//! [`ByteSize`], the resolution of relative paths, and the validation rules. It reads nothing but
//! the configuration file itself (never the model).
//!
//! Invariants:
//! - Only `model` is required; every other key has the default written on its field, and
//!   [`RunConfig::for_model`] is exactly "the file `model = "..."` and nothing else".
//! - Every table rejects unknown keys, so a typo is an error rather than a silently ignored line.
//! - A [`RunConfig`] returned by [`RunConfig::from_file`] or [`RunConfig::from_toml_str`] has
//!   passed [`RunConfig::validate`], and its relative `model`, `state_dir` and `cache_dir` paths
//!   have been resolved against the configuration file's folder (a Hub id `org/name` is left as
//!   written).
//! - Every error is one line naming the file, the key (dotted, e.g. `experts.policy`, as serde
//!   was reading it) where one is at fault, and the problem, with the line and column where the
//!   TOML parser reports one.
//! - The state folder ([`RunConfig::resolved_state_dir`]) and the cache folder
//!   ([`RunConfig::resolved_cache_dir`], [`default_cache_dir`]) are never inside the model folder:
//!   model folders stay read-only inputs.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Name of the folder, under `$XDG_STATE_HOME` or `~/.local/state`, that holds the per-user state.
pub const STATE_DIR_NAME: &str = "moe-offload";

/// Name of the folder, under `$XDG_CACHE_HOME` or `~/.cache`, that holds the quantized weight
/// cache.
pub const CACHE_DIR_NAME: &str = "moe-offload";

/// A run configuration: the contents of one TOML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Required. A model folder, or a Hub id `org/name` looked up in the local Hugging Face cache.
    /// In a file, a relative path resolves from the file's folder when it starts with `.` or `..`
    /// or names something that exists there; `~/` expands to the home folder. Anything else is
    /// taken as a Hub id.
    pub model: String,
    /// Where the model computes: `"cpu"`, `"cuda"` (a GPU through CUDA, loaded at run time; one
    /// line names what is missing where it cannot open), `"sim"` (a simulated GPU) or `"auto"`
    /// (`cuda` when it opens, else `cpu`). Default `"cpu"`.
    #[serde(default)]
    pub device: DeviceKind,
    /// Device-side memory budget (`cuda`, `sim`), in bytes or a size string such as `"22GiB"`.
    /// Default: unset, meaning what the device has free minus a safety margin. Ignored on `cpu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vram_budget: Option<ByteSize>,
    /// Host-side memory budget, in bytes or a size string such as `"12GiB"`. On `cpu` it caps
    /// everything the process holds. Default: unset, meaning the host's `MemAvailable` minus a
    /// safety margin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_budget: Option<ByteSize>,
    /// Longest sequence (prompt plus generated tokens), in tokens; at least 2 and at most
    /// [`MAX_CONTEXT_TOKENS`]. Default: unset, meaning min(`max_position_embeddings`, 4096); see
    /// [`RunConfig::max_context_for`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_context: Option<usize>,
    /// Sequences decoded together, in sequences; at least 1 and at most [`MAX_BATCH`].
    /// Default: unset, meaning what the memory plan fits (`plan::AUTO_MAX_BATCH` at most: as
    /// many sequences as the KV cache has room for without taking memory the experts would
    /// use; see [`crate::plan::make_plan`]). `moe-serve run` decodes one sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch: Option<usize>,
    /// Compute threads; at least 1 and at most [`MAX_THREADS`]; more than the host's cores are
    /// capped at the cores (with a warning). Default: unset, meaning all cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// Folder for state the runtime keeps between runs (expert statistics, plans). In a file, a
    /// relative path resolves from the file's folder; `~/` expands to the home folder.
    /// Default: unset, meaning `$XDG_STATE_HOME/moe-offload`, else `~/.local/state/moe-offload`
    /// (see [`RunConfig::resolved_state_dir`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// Element type of the KV cache. Default `"f32"` (exact; `"bf16"`/`"f16"` halve its size).
    #[serde(default)]
    pub kv_dtype: KvDtype,
    /// How expert weights are held in memory: "none" (default, as stored), "bf16", "q8_0",
    /// "q4_k". Quantized weights are made once, on the first start, persisted in `cache_dir` and
    /// mapped from there on every later start; with `cache = false` they are made at load on
    /// every start and held in RAM.
    #[serde(default)]
    pub quantization: Quantization,
    /// The same for resident (non-expert) weights; default: as `quantization`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resident_quantization: Option<Quantization>,
    /// Persist quantized weights in `cache_dir` on the first start and map them on every later
    /// start. `false` quantizes at load on every start and holds the result in RAM (for
    /// read-only deployments). Default `true`.
    #[serde(default = "default_true")]
    pub cache: bool,
    /// Folder holding the quantized weight cache files (one file per model and quantization);
    /// created if missing; not empty, and never inside the model folder. In a file, a relative
    /// path resolves from the file's folder; `~/` expands to the home folder.
    /// Default: unset, meaning `$XDG_CACHE_HOME/moe-offload`, else `~/.cache/moe-offload`
    /// (see [`RunConfig::resolved_cache_dir`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    /// When a cache file is damaged (checksum mismatch, truncated, wrong version, stale): `true`
    /// rebuilds the damaged part from the source and replaces the file atomically; `false` makes
    /// the run fail, naming the cache file. Default `true`.
    #[serde(default = "default_true")]
    pub cache_rebuild: bool,
    /// How activations meet the weights: "auto" (default: "bf16" for bf16 weights and "q8" for
    /// q8_0 / q4_k weights, f32 for the rest), "f32" (exact f32 activations and accumulation
    /// for every weight), "q8" (for q8_0 / q4_k weights: activations rounded to 8
    /// bits per 32-value block, integer dot products) or "bf16" (for bf16 weights on CPUs with
    /// AVX512_BF16: activations rounded to bf16, bf16 dot products). The lower-precision paths
    /// are faster and slightly less exact (`cargo bench --bench quality` measures them);
    /// weights a setting does not cover keep the f32 path.
    #[serde(default)]
    pub activations: Activations,
    /// The `[experts]` table: the expert cache.
    #[serde(default)]
    pub experts: ExpertsConfig,
    /// The `[sim]` table: the simulated device link (`device = "sim"`).
    #[serde(default)]
    pub sim: SimConfig,
    /// The `[server]` table: the OpenAI-compatible HTTP server.
    #[serde(default)]
    pub server: ServerConfig,
}

fn default_true() -> bool {
    true
}

/// Where the model computes (`device`): owned by the backend module, named here.
pub use crate::backend::DeviceKind;

/// How weights are held in memory (`quantization`, `resident_quantization`, ...); the
/// quantizer owns the type.
pub use crate::quantize::Quantization;

/// How activations meet quantized weights (`activations`): owned by the backend module.
pub use crate::backend::Activations;

/// Element type of the KV cache (`kv_dtype`): the KV cache's own type, named here.
pub use crate::backend::KvElem as KvDtype;

/// Which cached expert gives up its slot (`[experts] policy`): owned by the slot pool.
pub use crate::store::EvictionPolicy;

/// The `[experts]` table: the expert cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExpertsConfig {
    /// Expert slots per layer on the fast tier, in experts; at least 1.
    /// Default: unset, meaning what the memory plan derives from the budgets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slots_per_layer: Option<usize>,
    /// Load the experts the next layers are likely to need while the current layer computes.
    /// Default `true`.
    pub prefetch: bool,
    /// How many layers ahead prefetching looks, in layers; at most 4. Default 1.
    pub prefetch_depth: usize,
    /// Which cached expert is evicted first. Default `"lru"`.
    pub policy: EvictionPolicy,
    /// Precision of the hot experts. When this or `cold_quantization` is set, the hottest
    /// experts of each layer (by the popularity recorded in `state_dir`) use `hot_quantization`
    /// and the others `cold_quantization`; an unset one means the top-level `quantization`. The
    /// cache holds every expert in both types, so a changing hot set never forces a rebuild.
    /// Default: unset (every expert uses `quantization`); see [`ExpertsConfig::tiers`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hot_quantization: Option<Quantization>,
    /// Precision of the other (cold) experts; see `hot_quantization`. Default: unset (every
    /// expert uses `quantization`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cold_quantization: Option<Quantization>,
    /// Share of each layer's experts that are hot when `hot_quantization` or `cold_quantization`
    /// is set, as a fraction; finite and from 0 to 1. Default 0.25.
    pub hot_fraction: f64,
}

impl Default for ExpertsConfig {
    fn default() -> Self {
        ExpertsConfig {
            slots_per_layer: None,
            prefetch: true,
            prefetch_depth: 1,
            policy: EvictionPolicy::Lru,
            hot_quantization: None,
            cold_quantization: None,
            hot_fraction: 0.25,
        }
    }
}

impl ExpertsConfig {
    /// The `(hot, cold)` expert types when either tier key is set (an unset one resolved to
    /// `quantization`, the top-level key); `None` when neither is set or both resolve to the same
    /// type (every expert then uses one type).
    pub fn tiers(&self, quantization: Quantization) -> Option<(Quantization, Quantization)> {
        if self.hot_quantization.is_none() && self.cold_quantization.is_none() {
            return None;
        }
        let hot = self.hot_quantization.unwrap_or(quantization);
        let cold = self.cold_quantization.unwrap_or(quantization);
        (hot != cold).then_some((hot, cold))
    }
}

/// Largest accepted `experts.prefetch_depth`, in layers.
pub const MAX_PREFETCH_DEPTH: usize = 4;

/// Largest accepted `threads`: far above any host's cores, far below the thread counts that
/// exhaust the process's thread or memory limits.
pub const MAX_THREADS: usize = 4096;

/// Largest accepted `max_context`, in tokens: the largest `max_position_embeddings` a model may
/// declare ([`crate::config::MAX_POSITIONS`]); KV sizes computed from it stay far from overflow.
pub const MAX_CONTEXT_TOKENS: usize = crate::config::MAX_POSITIONS;

/// Largest accepted `max_batch`, in sequences: far above what one host decodes together, and
/// small enough that per-sequence sizes multiplied by it stay far from overflow.
pub const MAX_BATCH: usize = 65_536;

/// The compute threads to start for a requested count (`threads`, `--threads`): all cores
/// when unset or 0, and never more than the cores: a larger request is capped, with one
/// warning naming the value and the cap (more threads than cores only contend).
pub fn compute_threads(requested: Option<usize>) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match requested {
        None | Some(0) => cores,
        Some(n) if n > cores => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!("threads = {n} is more than the {cores} cores here; using {cores}")
            });
            cores
        }
        Some(n) => n,
    }
}

/// The `[sim]` table: the link of the simulated device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimConfig {
    /// Host-to-device bandwidth, in gigabytes (1e9 bytes) per second; finite and above 0.
    /// Default 25.0 (a PCIe 4.0 x16 link in practice).
    pub link_gb_per_s: f64,
    /// Fixed cost of each copy, in microseconds; finite and at least 0. Default 10.0.
    pub copy_latency_us: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            link_gb_per_s: 25.0,
            copy_latency_us: 10.0,
        }
    }
}

/// The `[server]` table: the OpenAI-compatible HTTP server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on; not empty. Default `"127.0.0.1"` (this machine only).
    pub host: String,
    /// TCP port; not 0. Default 8080.
    pub port: u16,
    /// Bearer token clients must send; not empty when set. Default: unset (no authentication).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// Model name reported by the API; not empty when set. Default: unset, meaning the model's
    /// folder name or Hub id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_name: Option<String>,
    /// Requests that may wait for a batch slot, in requests; beyond it new requests are refused.
    /// Default 64.
    pub max_queue: usize,
    /// Prompt tokens prefilled per batched step over all requests, at least 1: smaller keeps
    /// running streams smoother while a long prompt is read, larger reads prompts faster.
    /// Default 256.
    pub prefill_chunk: usize,
    /// Reuse the KV cache of a prompt prefix seen before (a shared system prompt, an earlier
    /// turn), within the KV cache the plan sized. Default true.
    pub prefix_cache: bool,
    /// Largest request body accepted; larger bodies get 413. Default 8 MiB.
    pub max_request_bytes: ByteSize,
    /// On SIGTERM, seconds running requests get to finish before they are cut short; at this
    /// deadline every connection, half-sent requests included, is closed. Default 30.
    pub drain_timeout_s: u64,
    /// Seconds a client has to send a whole request head (request line and headers), counted
    /// from its connection's start or, on a kept-alive connection, from the head's first byte;
    /// then the connection is closed. At least 1. Default 10.
    pub header_timeout_s: u64,
    /// Seconds a client has to send a whole request body once its head has arrived; then it gets
    /// 408 and the connection is closed. At least 1. Default 30.
    pub body_timeout_s: u64,
    /// Seconds a kept-alive connection may wait for its next request before it is closed. At
    /// least 1. Default 60.
    pub idle_timeout_s: u64,
    /// Open connections at most; at the cap a new connection closes the oldest one that has
    /// not delivered a complete request (idle or slow), so slow clients cannot lock others
    /// out. At least 1. Default: unset, meaning derived from the open-file limit (raised to its
    /// hard limit at start) less a reserve for model and cache files, at most 4096.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Browser origins allowed to call the API across origins (CORS), each
    /// `scheme://host[:port]`, or `["*"]` for any origin. Default: empty, meaning no CORS
    /// headers (browsers refuse cross-origin calls).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cors_origins: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".to_string(),
            port: 8080,
            api_key: None,
            model_name: None,
            max_queue: 64,
            prefill_chunk: 256,
            prefix_cache: true,
            max_request_bytes: ByteSize(8 << 20),
            drain_timeout_s: 30,
            header_timeout_s: 10,
            body_timeout_s: 30,
            idle_timeout_s: 60,
            max_connections: None,
            cors_origins: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sizes

/// Byte sizes as people write them (`"12GiB"`): owned by `size`, named here.
pub use crate::size::ByteSize;

// ---------------------------------------------------------------------------------------------
// Errors

/// Why a configuration file could not be used. `Display` is one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML, or a value of the wrong type or form. `message` starts with the line and
    /// column, then names the dotted key when one is at fault.
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    /// Well-formed, but a value breaks a rule (or a required key is missing).
    #[error("{}: {key}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// A rule broken by one key of a [`RunConfig`] (from [`RunConfig::validate`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct InvalidKey {
    /// Dotted key, e.g. `experts.prefetch_depth`.
    pub key: String,
    /// What is wrong, e.g. `must be at least 1 (got 0)`.
    pub message: String,
}

fn invalid(key: &str, message: impl Into<String>) -> Result<(), InvalidKey> {
    Err(InvalidKey {
        key: key.to_string(),
        message: message.into(),
    })
}

// ---------------------------------------------------------------------------------------------
// Loading

impl RunConfig {
    /// Defaults with just a model: what `--model X` alone means, and what a file holding only
    /// `model = "X"` gives (minus path resolution).
    pub fn for_model(model: impl Into<String>) -> RunConfig {
        RunConfig {
            model: model.into(),
            device: DeviceKind::default(),
            vram_budget: None,
            ram_budget: None,
            max_context: None,
            max_batch: None,
            threads: None,
            state_dir: None,
            kv_dtype: KvDtype::default(),
            quantization: Quantization::None,
            resident_quantization: None,
            cache: true,
            cache_dir: None,
            cache_rebuild: true,
            activations: Activations::Auto,
            experts: ExpertsConfig::default(),
            sim: SimConfig::default(),
            server: ServerConfig::default(),
        }
    }

    /// Reads and validates a TOML file. A relative `model` (one starting with `.` or `..`, or
    /// naming something that exists next to the file) and relative `state_dir` and `cache_dir`
    /// resolve from the file's folder. Errors are one line naming the file, the key and the
    /// problem.
    pub fn from_file(path: &Path) -> Result<RunConfig, ConfigFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let base_dir = match absolute.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        RunConfig::from_toml_str(&text, &base_dir, path)
    }

    /// Parses and validates TOML text as if it were a file in `base_dir`; `origin` is the name
    /// used in error messages.
    pub fn from_toml_str(
        text: &str,
        base_dir: &Path,
        origin: &Path,
    ) -> Result<RunConfig, ConfigFileError> {
        // Syntax first, so a malformed file is reported as such and not as a wrong key.
        if let Err(e) = text.parse::<toml::Table>() {
            return Err(ConfigFileError::Parse {
                path: origin.to_path_buf(),
                message: describe_toml_error(text, &e, None),
            });
        }
        // serde_path_to_error records the dotted key being read when an error is raised; toml's
        // error carries the span that gives the line and column.
        let deserializer = toml::Deserializer::new(text);
        let mut config: RunConfig = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = key_path(e.path());
            let e = e.into_inner();
            if let Some(field) = missing_field(e.message()) {
                ConfigFileError::Invalid {
                    path: origin.to_path_buf(),
                    key: join_key(&path, Some(field)),
                    message: if field == "model" {
                        "is required (a model folder or a Hub id such as \"Qwen/Qwen3-30B-A3B\")"
                            .to_string()
                    } else {
                        "is required".to_string()
                    },
                }
            } else {
                ConfigFileError::Parse {
                    path: origin.to_path_buf(),
                    message: describe_toml_error(text, &e, Some(&path)),
                }
            }
        })?;
        let to_invalid = |e: InvalidKey| ConfigFileError::Invalid {
            path: origin.to_path_buf(),
            key: e.key,
            message: e.message,
        };
        config.resolve_paths(base_dir).map_err(to_invalid)?;
        config.validate().map_err(to_invalid)?;
        Ok(config)
    }

    /// Resolves relative `model`, `state_dir` and `cache_dir` against `base_dir` (see the field
    /// docs).
    fn resolve_paths(&mut self, base_dir: &Path) -> Result<(), InvalidKey> {
        let home = std::env::var_os("HOME");
        if let Some(resolved) = resolve_model(&self.model, base_dir, home.as_deref()) {
            self.model = resolved
                .into_os_string()
                .into_string()
                .map_err(|_| InvalidKey {
                    key: "model".to_string(),
                    message: "the resolved path is not valid UTF-8".to_string(),
                })?;
        }
        for dir in [&mut self.state_dir, &mut self.cache_dir]
            .into_iter()
            .flatten()
        {
            if !dir.as_os_str().is_empty() {
                *dir = resolve_path(dir, base_dir, home.as_deref());
            }
        }
        Ok(())
    }

    /// Checks every rule on the values (see each field's documentation); the first broken one
    /// is returned. Files are validated on loading; call this after overriding fields (flags).
    pub fn validate(&self) -> Result<(), InvalidKey> {
        if self.model.trim().is_empty() {
            return invalid("model", "must not be empty");
        }
        for (key, budget) in [
            ("vram_budget", self.vram_budget),
            ("ram_budget", self.ram_budget),
        ] {
            if budget == Some(ByteSize(0)) {
                return invalid(key, "must be above 0 bytes (leave it out for the default)");
            }
        }
        if let Some(n) = self.max_context {
            if n < 2 {
                return invalid(
                    "max_context",
                    format!("must be at least 2 tokens (got {n})"),
                );
            }
        }
        if let Some(n) = self.max_context {
            if n > MAX_CONTEXT_TOKENS {
                return invalid(
                    "max_context",
                    format!("must be at most {MAX_CONTEXT_TOKENS} tokens (got {n})"),
                );
            }
        }
        if self.max_batch == Some(0) {
            return invalid("max_batch", "must be at least 1 (got 0)");
        }
        if let Some(b) = self.max_batch.filter(|&b| b > MAX_BATCH) {
            return invalid(
                "max_batch",
                format!("must be at most {MAX_BATCH} sequences (got {b})"),
            );
        }
        if self.threads == Some(0) {
            return invalid(
                "threads",
                "must be at least 1 (got 0; leave it out to use all cores)",
            );
        }
        if let Some(n) = self.threads.filter(|&n| n > MAX_THREADS) {
            return invalid(
                "threads",
                format!(
                    "must be at most {MAX_THREADS} (got {n}; threads beyond the cores are \
                     capped at the cores anyway)"
                ),
            );
        }
        for (key, dir, what) in [
            ("state_dir", &self.state_dir, "state"),
            ("cache_dir", &self.cache_dir, "the cache"),
        ] {
            let Some(dir) = dir else { continue };
            if dir.as_os_str().is_empty() {
                return invalid(key, "must not be empty (leave it out for the default)");
            }
            if let Some(model_dir) = self.local_model_dir() {
                if is_within(dir, &model_dir) {
                    return invalid(
                        key,
                        format!(
                            "{} is inside the model folder {}; keep {what} outside it",
                            dir.display(),
                            model_dir.display()
                        ),
                    );
                }
            }
        }
        if self.experts.slots_per_layer == Some(0) {
            return invalid(
                "experts.slots_per_layer",
                "must be at least 1 (got 0; leave it out to let the plan decide)",
            );
        }
        if self.experts.prefetch_depth > MAX_PREFETCH_DEPTH {
            return invalid(
                "experts.prefetch_depth",
                format!(
                    "must be at most {MAX_PREFETCH_DEPTH} layers (got {})",
                    self.experts.prefetch_depth
                ),
            );
        }
        let fraction = self.experts.hot_fraction;
        if !(fraction.is_finite() && (0.0..=1.0).contains(&fraction)) {
            return invalid(
                "experts.hot_fraction",
                format!("must be a finite fraction from 0 to 1 (got {fraction})"),
            );
        }
        let link = self.sim.link_gb_per_s;
        if !(link.is_finite() && link > 0.0) {
            return invalid(
                "sim.link_gb_per_s",
                format!("must be a finite number of GB/s above 0 (got {link})"),
            );
        }
        let latency = self.sim.copy_latency_us;
        if !(latency.is_finite() && latency >= 0.0) {
            return invalid(
                "sim.copy_latency_us",
                format!("must be a finite number of microseconds, 0 or more (got {latency})"),
            );
        }
        if self.server.host.trim().is_empty() {
            return invalid("server.host", "must not be empty");
        }
        if self.server.port == 0 {
            return invalid("server.port", "must not be 0");
        }
        if self.server.max_queue == 0 {
            return invalid("server.max_queue", "must be at least 1 (got 0)");
        }
        if self.server.prefill_chunk == 0 {
            return invalid("server.prefill_chunk", "must be at least 1 token (got 0)");
        }
        if self.server.max_request_bytes.0 < 1024 {
            return invalid(
                "server.max_request_bytes",
                format!(
                    "must be at least 1 KiB (got {} bytes)",
                    self.server.max_request_bytes.0
                ),
            );
        }
        for (key, secs) in [
            ("server.header_timeout_s", self.server.header_timeout_s),
            ("server.body_timeout_s", self.server.body_timeout_s),
            ("server.idle_timeout_s", self.server.idle_timeout_s),
        ] {
            if secs == 0 {
                return invalid(key, "must be at least 1 second (got 0)");
            }
        }
        if self.server.max_connections == Some(0) {
            return invalid(
                "server.max_connections",
                "must be at least 1 (leave it out to derive it from the open-file limit)",
            );
        }
        let origins = &self.server.cors_origins;
        if origins.len() > 1 && origins.iter().any(|o| o == "*") {
            return invalid(
                "server.cors_origins",
                "\"*\" allows any origin and must stand alone",
            );
        }
        if let Some(bad) = origins.iter().find(|o| {
            *o != "*" && !(o.starts_with("http://") || o.starts_with("https://"))
                || o.ends_with('/')
                || o.chars().any(|c| c.is_whitespace() || c.is_control())
        }) {
            return invalid(
                "server.cors_origins",
                format!(
                    "`{bad}` is not an origin: give `scheme://host[:port]` (http or https, no \
                     path, no trailing slash), or \"*\""
                ),
            );
        }
        if self.server.api_key.as_deref().is_some_and(|k| k.is_empty()) {
            return invalid(
                "server.api_key",
                "must not be empty (leave it out to disable authentication)",
            );
        }
        if self
            .server
            .model_name
            .as_deref()
            .is_some_and(|n| n.trim().is_empty())
        {
            return invalid(
                "server.model_name",
                "must not be empty (leave it out for the default)",
            );
        }
        Ok(())
    }

    /// The state folder: `state_dir`, else `$XDG_STATE_HOME/moe-offload` (when that variable is
    /// an absolute path), else `~/.local/state/moe-offload`, else `<temp>/moe-offload-state`.
    /// A candidate inside the model folder is skipped: state never lives in the model folder.
    pub fn resolved_state_dir(&self) -> PathBuf {
        state_dir_from(
            self.state_dir.as_deref(),
            self.local_model_dir().as_deref(),
            std::env::var_os("XDG_STATE_HOME"),
            std::env::var_os("HOME"),
        )
    }

    /// The cache folder: `cache_dir`, else `$XDG_CACHE_HOME/moe-offload` (when that variable is
    /// an absolute path), else `~/.cache/moe-offload`, else `<temp>/moe-offload-cache`.
    /// A candidate inside the model folder is skipped: the cache never lives in the model folder.
    pub fn resolved_cache_dir(&self) -> PathBuf {
        cache_dir_from(
            self.cache_dir.as_deref(),
            self.local_model_dir().as_deref(),
            std::env::var_os("XDG_CACHE_HOME"),
            std::env::var_os("HOME"),
        )
    }

    /// The context length to use for a model whose `max_position_embeddings` is given:
    /// `max_context` when set, else min(`max_position_embeddings`, 4096).
    pub fn max_context_for(&self, max_position_embeddings: usize) -> usize {
        crate::config::context_tokens(self.max_context, max_position_embeddings)
    }

    /// The model folder when `model` is a path on this machine (absolute, or existing relative to
    /// the working folder), made absolute; `None` for a Hub id.
    fn local_model_dir(&self) -> Option<PathBuf> {
        let p = Path::new(&self.model);
        if p.is_absolute() || p.exists() {
            std::path::absolute(p).ok().map(|p| normalize(&p))
        } else {
            None
        }
    }
}

/// The cache folder when no configuration file is used (the embedded API): as
/// [`RunConfig::resolved_cache_dir`] with `cache_dir` unset, reading `XDG_CACHE_HOME` and `HOME`
/// from the environment. `model_dir` is the model folder, if the model is one (a candidate inside
/// it is skipped).
pub fn default_cache_dir(model_dir: Option<&Path>) -> PathBuf {
    cache_dir_from(
        None,
        model_dir,
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    )
}

/// Where a relative `model` from a file in `base_dir` points, or `None` to leave it as written
/// (absolute paths and Hub ids).
fn resolve_model(model: &str, base_dir: &Path, home: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    let p = Path::new(model);
    if let (Some(rest), Some(home)) = (model.strip_prefix("~/"), home) {
        return Some(normalize(&Path::new(home).join(rest)));
    }
    if p.is_absolute() || model.is_empty() {
        return None;
    }
    let explicit = matches!(
        p.components().next(),
        Some(Component::CurDir | Component::ParentDir)
    );
    let candidate = base_dir.join(p);
    if explicit || candidate.exists() {
        Some(normalize(&candidate))
    } else {
        None
    }
}

/// `~/x` under the home folder, a relative path under `base_dir`, an absolute one as is.
fn resolve_path(path: &Path, base_dir: &Path, home: Option<&std::ffi::OsStr>) -> PathBuf {
    if let (Ok(rest), Some(home)) = (path.strip_prefix("~"), home) {
        return normalize(&Path::new(home).join(rest));
    }
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        normalize(&base_dir.join(path))
    }
}

/// Drops `.` components (lexically; `..` is kept, since it may cross a symbolic link).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        if c != Component::CurDir {
            out.push(c.as_os_str());
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// Whether `path` is `dir` or lies under it: compared as absolute paths lexically, and also with
/// symbolic links resolved when both exist.
fn is_within(path: &Path, dir: &Path) -> bool {
    let lexical = match (std::path::absolute(path), std::path::absolute(dir)) {
        (Ok(p), Ok(d)) => normalize(&p).starts_with(normalize(&d)),
        _ => false,
    };
    lexical
        || match (std::fs::canonicalize(path), std::fs::canonicalize(dir)) {
            (Ok(p), Ok(d)) => p.starts_with(d),
            _ => false,
        }
}

/// The state folder from its sources (see [`RunConfig::resolved_state_dir`]).
fn state_dir_from(
    explicit: Option<&Path>,
    model_dir: Option<&Path>,
    xdg_state_home: Option<OsString>,
    home: Option<OsString>,
) -> PathBuf {
    let fallbacks = UserDirFallbacks {
        xdg_home: xdg_state_home,
        home_sub: &[".local", "state"],
        name: STATE_DIR_NAME,
        temp_name: "moe-offload-state",
    };
    user_dir_from(explicit, model_dir, fallbacks, home)
}

/// The cache folder from its sources (see [`RunConfig::resolved_cache_dir`]).
fn cache_dir_from(
    explicit: Option<&Path>,
    model_dir: Option<&Path>,
    xdg_cache_home: Option<OsString>,
    home: Option<OsString>,
) -> PathBuf {
    let fallbacks = UserDirFallbacks {
        xdg_home: xdg_cache_home,
        home_sub: &[".cache"],
        name: CACHE_DIR_NAME,
        temp_name: "moe-offload-cache",
    };
    user_dir_from(explicit, model_dir, fallbacks, home)
}

/// Where a per-user folder goes when the configuration does not say.
struct UserDirFallbacks {
    /// The value of the XDG variable (`XDG_STATE_HOME`, `XDG_CACHE_HOME`).
    xdg_home: Option<OsString>,
    /// The XDG default under the home folder, as components (`[".local", "state"]`).
    home_sub: &'static [&'static str],
    /// The folder's name under the XDG folder.
    name: &'static str,
    /// The folder's name under the temporary folder, the last resort.
    temp_name: &'static str,
}

/// The first of `explicit`, `<xdg_home>/<name>` (when `xdg_home` is absolute) and
/// `<home>/<home_sub>/<name>` that is not inside `model_dir`, else `<temp>/<temp_name>`.
fn user_dir_from(
    explicit: Option<&Path>,
    model_dir: Option<&Path>,
    fallbacks: UserDirFallbacks,
    home: Option<OsString>,
) -> PathBuf {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(dir) = explicit {
        candidates.push(dir.to_path_buf());
    }
    if let Some(xdg) = fallbacks.xdg_home.map(PathBuf::from) {
        // The XDG spec says relative values are invalid and must be ignored.
        if xdg.is_absolute() {
            candidates.push(xdg.join(fallbacks.name));
        }
    }
    if let Some(home) = home.filter(|h| !h.is_empty()) {
        let mut dir = PathBuf::from(home);
        dir.extend(fallbacks.home_sub);
        candidates.push(dir.join(fallbacks.name));
    }
    let last_resort = std::env::temp_dir().join(fallbacks.temp_name);
    candidates
        .into_iter()
        .find(|c| model_dir.is_none_or(|m| !is_within(c, m)))
        .unwrap_or(last_resort)
}

// ---------------------------------------------------------------------------------------------
// Error messages: one line, with the dotted key serde was reading and the error's position.

/// `Some(name)` for serde's "missing field `name`".
fn missing_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.strip_suffix('`'))
}

/// `Some(name)` for serde's "unknown field `name`, expected ...".
fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split_once('`').map(|(name, _)| name)
}

/// The keys of a serde path: table and key names, with an array index written `key[i]`.
fn key_path(path: &serde_path_to_error::Path) -> Vec<String> {
    use serde_path_to_error::Segment;
    let mut keys: Vec<String> = Vec::new();
    for segment in path.iter() {
        match segment {
            Segment::Map { key } => keys.push(key.clone()),
            Segment::Seq { index } => match keys.last_mut() {
                Some(last) => last.push_str(&format!("[{index}]")),
                None => keys.push(format!("[{index}]")),
            },
            // Enum variants and untracked steps name no key.
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    keys
}

fn join_key(container: &[String], last: Option<&str>) -> String {
    let mut parts: Vec<&str> = container.iter().map(String::as_str).collect();
    parts.extend(last);
    parts.join(".")
}

/// One line: `line L, column C: key: message`. `path` is the key serde was reading (none for a
/// syntax error).
fn describe_toml_error(text: &str, error: &toml::de::Error, path: Option<&[String]>) -> String {
    let message = error
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(", ");
    let Some(span) = error.span() else {
        return message;
    };
    let offset = span.start.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit_once('\n')
        .map_or(before, |(_, tail)| tail)
        .chars()
        .count()
        + 1;
    // For an unknown key the path may or may not end with the key itself (serde reads the name
    // before refusing it, except at the top of some tables): name it exactly once.
    let key = path.map(|path| match unknown_field(&message) {
        Some(field) if path.last().map(String::as_str) != Some(field) => {
            join_key(path, Some(field))
        }
        _ => join_key(path, None),
    });
    match key {
        Some(key) if !key.is_empty() => format!("line {line}, column {column}: {key}: {message}"),
        _ => format!("line {line}, column {column}: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RunConfig, ConfigFileError> {
        RunConfig::from_toml_str(text, Path::new("/base"), Path::new("test.toml"))
    }

    fn error_line(text: &str) -> String {
        let e = parse(text).expect_err(text);
        let line = e.to_string();
        assert!(!line.contains('\n'), "multi-line error: {line:?}");
        assert!(line.starts_with("test.toml: "), "no file name: {line:?}");
        line
    }

    fn invalid_key(text: &str) -> (String, String) {
        match parse(text) {
            Err(ConfigFileError::Invalid { key, message, .. }) => (key, message),
            other => panic!("expected Invalid for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn size_strings() {
        let ok: &[(&str, u64)] = &[
            ("1.5GiB", 1_610_612_736),
            ("64KiB", 65_536),
            ("16 GB", 16_000_000_000),
            ("4096", 4096),
            ("0.5KB", 500),
            ("0", 0),
            ("7B", 7),
            ("1 B", 1),
            ("1TB", 1_000_000_000_000),
            ("2TiB", 2 << 40),
            ("3MB", 3_000_000),
            ("5MiB", 5 << 20),
            ("12GiB", 12 << 30),
            ("12gib", 12 << 30),
            ("16gb", 16_000_000_000),
            ("1kb", 1000),
            (".5KiB", 512),
            ("2.", 2),
            // Fractions of a byte round down.
            ("1.1GiB", 1_181_116_006),
            ("0.0001KB", 0),
            ("1.9999B", 1),
            (" 8GiB ", 8 << 30),
            ("18446744073709551615", u64::MAX),
            ("16777215.5TiB", 18_446_743_523_953_737_728),
        ];
        for &(text, bytes) in ok {
            assert_eq!(ByteSize::parse(text), Ok(ByteSize(bytes)), "{text:?}");
        }
        let bad: &[(&str, &str)] = &[
            ("-1GB", "negative"),
            ("12 GX", "is not a size"),
            ("", "is not a size"),
            (" ", "is not a size"),
            ("GB", "is not a size"),
            (".", "is not a size"),
            ("1.2.3GB", "is not a size"),
            ("1e9", "is not a size"),
            ("NaN", "is not a size"),
            ("inf", "is not a size"),
            ("12  GB", "is not a size"),
            ("12Gb", "is not a size"),
            ("12gB", "is not a size"),
            ("12G", "is not a size"),
            ("12 GiBs", "is not a size"),
            ("+5GB", "is not a size"),
            ("1000000000000000000000000000000GB", "too large"),
            ("18446744073709551616", "too large"),
            ("16777216TiB", "too large"),
            ("20000000TB", "too large"),
            ("0.0000000000000000001B", "digits after the point"),
        ];
        for &(text, expected) in bad {
            let e = ByteSize::parse(text).expect_err(text);
            assert!(e.contains(expected), "{text:?}: {e}");
            assert!(e.contains(&format!("{text:?}")), "{text:?} not quoted: {e}");
        }
    }

    #[test]
    fn size_values_in_files() {
        let budget = |value: &str| parse(&format!("model = \"m\"\nram_budget = {value}\n"));
        assert_eq!(
            budget("\"1.5GiB\"").unwrap().ram_budget,
            Some(ByteSize(1_610_612_736))
        );
        assert_eq!(budget("4096").unwrap().ram_budget, Some(ByteSize(4096)));
        assert_eq!(
            budget("16e9").unwrap().ram_budget,
            Some(ByteSize(16_000_000_000))
        );
        assert_eq!(budget("1000.7").unwrap().ram_budget, Some(ByteSize(1000)));
        for (value, expected) in [
            ("\"12 GX\"", "ram_budget: \"12 GX\" is not a size (use e.g."),
            ("-5", "ram_budget: -5 is negative"),
            ("-1.5", "ram_budget: -1.5 is negative"),
            ("nan", "ram_budget: NaN is not a size"),
            (
                "1e30",
                "ram_budget: 1000000000000000000000000000000 is too large",
            ),
            ("\"-1GB\"", "ram_budget: \"-1GB\" is negative"),
            ("\"\"", "ram_budget: \"\" is not a size"),
            ("true", "ram_budget: invalid type: boolean `true`"),
        ] {
            let line = error_line(&format!("model = \"m\"\nram_budget = {value}\n"));
            assert!(line.contains(expected), "{value}: {line}");
            assert!(line.contains("line 2, column 14"), "{value}: {line}");
        }
    }

    #[test]
    fn size_display_and_round_trip() {
        assert_eq!(ByteSize(12 << 30).to_string(), "12.00 GiB");
        assert_eq!(ByteSize(1_610_612_736).to_string(), "1.50 GiB");
        assert_eq!(ByteSize(16_000_000_000).to_string(), "14.90 GiB");
        assert_eq!(ByteSize(65_536).to_string(), "64.00 KiB");
        assert_eq!(ByteSize(3 << 40).to_string(), "3.00 TiB");
        assert_eq!(ByteSize(512).to_string(), "512 B");
        assert_eq!(ByteSize(0).to_string(), "0 B");
        for (bytes, exact) in [
            (0, "0B"),
            (12 << 30, "12GiB"),
            (16_000_000_000, "16GB"),
            (4096, "4KiB"),
            (4097, "4097B"),
            (1 << 40, "1TiB"),
            (u64::MAX, "18446744073709551615B"),
        ] {
            assert_eq!(ByteSize(bytes).to_exact_string(), exact);
            assert_eq!(ByteSize::parse(exact), Ok(ByteSize(bytes)));
        }
        assert_eq!("64KiB".parse::<ByteSize>(), Ok(ByteSize(65_536)));
    }

    #[test]
    fn defaults_for_model() {
        let c = RunConfig::for_model("Qwen/Qwen3-30B-A3B");
        assert_eq!(c.model, "Qwen/Qwen3-30B-A3B");
        assert_eq!(c.device, DeviceKind::Cpu);
        assert_eq!(c.vram_budget, None);
        assert_eq!(c.ram_budget, None);
        assert_eq!(c.max_context, None);
        assert_eq!(c.max_batch, None);
        assert_eq!(c.threads, None);
        assert_eq!(c.state_dir, None);
        assert_eq!(c.kv_dtype, KvDtype::F32);
        assert_eq!(c.quantization, Quantization::None);
        assert_eq!(c.resident_quantization, None);
        assert!(c.cache);
        assert_eq!(c.cache_dir, None);
        assert!(c.cache_rebuild);
        assert_eq!(c.experts.slots_per_layer, None);
        assert!(c.experts.prefetch);
        assert_eq!(c.experts.prefetch_depth, 1);
        assert_eq!(c.experts.policy, EvictionPolicy::Lru);
        assert_eq!(c.experts.hot_quantization, None);
        assert_eq!(c.experts.cold_quantization, None);
        assert_eq!(c.experts.hot_fraction, 0.25);
        assert_eq!(c.experts.tiers(c.quantization), None);
        assert_eq!(c.sim.link_gb_per_s, 25.0);
        assert_eq!(c.sim.copy_latency_us, 10.0);
        assert_eq!(c.server.host, "127.0.0.1");
        assert_eq!(c.server.port, 8080);
        assert_eq!(c.server.api_key, None);
        assert_eq!(c.server.model_name, None);
        assert_eq!(c.server.max_queue, 64);
        assert_eq!(c.server.header_timeout_s, 10);
        assert_eq!(c.server.body_timeout_s, 30);
        assert_eq!(c.server.idle_timeout_s, 60);
        assert_eq!(c.server.max_connections, None);
        assert_eq!(c.validate(), Ok(()));
        // A file with only `model` means the same (a Hub id is not resolved as a path).
        assert_eq!(parse("model = \"Qwen/Qwen3-30B-A3B\"").unwrap(), c);
        // Empty tables mean the defaults too.
        assert_eq!(
            parse("model = \"Qwen/Qwen3-30B-A3B\"\n[experts]\n[sim]\n[server]\n").unwrap(),
            c
        );
    }

    #[test]
    fn max_context_default() {
        let mut c = RunConfig::for_model("m");
        assert_eq!(c.max_context_for(40_960), 4096);
        assert_eq!(c.max_context_for(2048), 2048);
        c.max_context = Some(8192);
        assert_eq!(c.max_context_for(40_960), 8192);
    }

    #[test]
    fn every_key_parses() {
        let text = r#"
model = "org/name"
device = "sim"
vram_budget = "7GiB"
ram_budget = 60000000000
max_context = 8192
max_batch = 4
threads = 8
state_dir = "/var/lib/moe"
kv_dtype = "bf16"
quantization = "q8_0"
resident_quantization = "bf16"
cache = false
cache_dir = "/var/cache/moe"
cache_rebuild = false
activations = "q8"

[experts]
slots_per_layer = 16
prefetch = false
prefetch_depth = 2
policy = "pinned-lru"
hot_quantization = "bf16"
cold_quantization = "q4_k"
hot_fraction = 0.5

[sim]
link_gb_per_s = 12.5
copy_latency_us = 0

[server]
host = "0.0.0.0"
port = 9000
api_key = "secret"
model_name = "local-moe"
max_queue = 8
prefill_chunk = 64
prefix_cache = false
max_request_bytes = "1MiB"
drain_timeout_s = 5
header_timeout_s = 3
body_timeout_s = 7
idle_timeout_s = 11
max_connections = 500
cors_origins = ["http://localhost:3000", "https://app.example.com"]
"#;
        let c = parse(text).unwrap();
        let expected = RunConfig {
            model: "org/name".into(),
            device: DeviceKind::Sim,
            vram_budget: Some(ByteSize(7 << 30)),
            ram_budget: Some(ByteSize(60_000_000_000)),
            max_context: Some(8192),
            max_batch: Some(4),
            threads: Some(8),
            state_dir: Some(PathBuf::from("/var/lib/moe")),
            kv_dtype: KvDtype::Bf16,
            quantization: Quantization::Q8_0,
            resident_quantization: Some(Quantization::Bf16),
            cache: false,
            cache_dir: Some(PathBuf::from("/var/cache/moe")),
            cache_rebuild: false,
            activations: Activations::Q8,
            experts: ExpertsConfig {
                slots_per_layer: Some(16),
                prefetch: false,
                prefetch_depth: 2,
                policy: EvictionPolicy::PinnedLru,
                hot_quantization: Some(Quantization::Bf16),
                cold_quantization: Some(Quantization::Q4K),
                hot_fraction: 0.5,
            },
            sim: SimConfig {
                link_gb_per_s: 12.5,
                copy_latency_us: 0.0,
            },
            server: ServerConfig {
                host: "0.0.0.0".into(),
                port: 9000,
                api_key: Some("secret".into()),
                model_name: Some("local-moe".into()),
                max_queue: 8,
                prefill_chunk: 64,
                prefix_cache: false,
                max_request_bytes: ByteSize(1 << 20),
                drain_timeout_s: 5,
                header_timeout_s: 3,
                body_timeout_s: 7,
                idle_timeout_s: 11,
                max_connections: Some(500),
                cors_origins: vec![
                    "http://localhost:3000".into(),
                    "https://app.example.com".into(),
                ],
            },
        };
        assert_eq!(c, expected);
        // Serialising gives a file that parses back to the same configuration.
        let written = toml::to_string(&c).unwrap();
        assert!(written.contains("vram_budget = \"7GiB\""), "{written}");
        assert!(
            written.contains("cache_dir = \"/var/cache/moe\""),
            "{written}"
        );
        assert!(written.contains("hot_quantization = \"bf16\""), "{written}");
        assert_eq!(parse(&written).unwrap(), c);
        let defaults = RunConfig::for_model("org/name");
        assert_eq!(
            parse(&toml::to_string(&defaults).unwrap()).unwrap(),
            defaults
        );
        // Enum spellings.
        for (value, kind) in [
            ("cpu", DeviceKind::Cpu),
            ("cuda", DeviceKind::Cuda),
            ("sim", DeviceKind::Sim),
            ("auto", DeviceKind::Auto),
        ] {
            let c = parse(&format!("model = \"m\"\ndevice = \"{value}\"")).unwrap();
            assert_eq!(c.device, kind);
        }
        for (value, dtype) in [
            ("f32", KvDtype::F32),
            ("bf16", KvDtype::Bf16),
            ("f16", KvDtype::F16),
        ] {
            let c = parse(&format!("model = \"m\"\nkv_dtype = \"{value}\"")).unwrap();
            assert_eq!(c.kv_dtype, dtype);
        }
        for (value, policy) in [
            ("lru", EvictionPolicy::Lru),
            ("lfu", EvictionPolicy::Lfu),
            ("pinned-lru", EvictionPolicy::PinnedLru),
        ] {
            let c = parse(&format!("model = \"m\"\n[experts]\npolicy = \"{value}\"")).unwrap();
            assert_eq!(c.experts.policy, policy);
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let cases = [
            ("model = \"m\"\nmodle = 1\n", "modle", "line 2, column 1"),
            (
                "model = \"m\"\n[experts]\nprefetch = true\nbogus = 1\n",
                "experts.bogus",
                "line 4",
            ),
            (
                "model = \"m\"\n[sim]\nlink_gbps = 3.0\n",
                "sim.link_gbps",
                "line 3",
            ),
            (
                "model = \"m\"\n[server]\nhost = \"h\"\nportt = 1\n",
                "server.portt",
                "line 4",
            ),
            // Dotted keys and inline tables locate the key too.
            (
                "model = \"m\"\nexperts.bogus = 1\n",
                "experts.bogus",
                "line 2",
            ),
            (
                "model = \"m\"\nserver = { port = 1, bogus = 2 }\n",
                "server.bogus",
                "line 2",
            ),
            // The tier keys did not open [experts] to anything else.
            (
                "model = \"m\"\n[experts]\nhot_quantization = \"q8_0\"\nhot_quant = \"q8_0\"\n",
                "experts.hot_quant",
                "line 4",
            ),
            (
                "model = \"m\"\n[experts]\ncache_dir = \"/c\"\n",
                "experts.cache_dir",
                "line 3",
            ),
            (
                "model = \"m\"\ncache_dirs = \"/c\"\n",
                "cache_dirs",
                "line 2",
            ),
            // A whole unknown table.
            ("model = \"m\"\n[gpu]\nx = 1\n", "gpu", "line 2"),
        ];
        for (text, key, place) in cases {
            let line = error_line(text);
            assert!(
                line.contains(&format!("{key}: unknown field")),
                "{text:?}: {line}"
            );
            assert!(line.contains(place), "{text:?}: {line}");
        }
    }

    #[test]
    fn wrong_types_and_values_are_named() {
        let cases = [
            ("model = 3\n", "line 1, column 9: model: invalid type: integer `3`"),
            ("model = \"m\"\ndevice = \"gpu\"\n", "device: unknown variant `gpu`"),
            ("model = \"m\"\nkv_dtype = \"q8\"\n", "kv_dtype: unknown variant `q8`"),
            ("model = \"m\"\nmax_batch = -1\n", "max_batch: invalid value: integer `-1`"),
            ("model = \"m\"\n[experts]\npolicy = \"fifo\"\n", "experts.policy: unknown variant"),
            ("model = \"m\"\n[server]\nport = 70000\n", "server.port: invalid value"),
            ("model = \"m\"\ncache = \"yes\"\n", "cache: invalid type"),
            ("model = \"m\"\ncache_rebuild = 1\n", "cache_rebuild: invalid type"),
            ("model = \"m\"\ncache_dir = 3\n", "cache_dir: invalid type"),
            (
                "model = \"m\"\n[experts]\nhot_quantization = \"q3\"\n",
                "experts.hot_quantization: unknown variant `q3`",
            ),
            (
                "model = \"m\"\n[experts]\ncold_quantization = 8\n",
                "experts.cold_quantization: wanted string",
            ),
            (
                "model = \"m\"\n[experts]\nhot_fraction = \"a quarter\"\n",
                "experts.hot_fraction: invalid type",
            ),
            ("model = \"m\"\nexperts.prefetch = \"yes\"\n", "experts.prefetch: invalid type"),
            (
                "model = \"m\"\nsim = { copy_latency_us = 1.0, link_gb_per_s = \"fast\" }\n",
                "sim.link_gb_per_s: invalid type",
            ),
            (
                "# a comment with [brackets] and = signs\nmodel = \"a = [b]\"  # x = 1\n[\"server\"]\nport = \"80\"\n",
                "line 4, column 8: server.port: invalid type",
            ),
            (
                "model = '''\nmulti = line\n'''\n[sim]\nlink_gb_per_s = \"x\"\n",
                "line 5, column 17: sim.link_gb_per_s: invalid type",
            ),
        ];
        for (text, expected) in cases {
            let line = error_line(text);
            assert!(line.contains(expected), "{text:?}: {line}");
        }
    }

    #[test]
    fn syntax_errors_are_one_line() {
        for (text, expected) in [
            ("model = [\n", "invalid array"),
            ("model = \"m\"\nmax_batch = \n", "line 2"),
            ("model = \"m\"\nmodel = \"n\"\n", "duplicate key"),
            ("[experts\n", "line 1"),
        ] {
            let e = parse(text).expect_err(text);
            assert!(
                matches!(e, ConfigFileError::Parse { .. }),
                "{text:?}: {e:?}"
            );
            let line = error_line(text);
            assert!(line.contains(expected), "{text:?}: {line}");
        }
    }

    #[test]
    fn missing_model() {
        for text in ["", "max_batch = 2\n", "[experts]\nprefetch = true\n"] {
            let (key, message) = invalid_key(text);
            assert_eq!(key, "model", "{text:?}");
            assert!(message.contains("is required"), "{message}");
            assert!(error_line(text).starts_with("test.toml: model: is required"));
        }
    }

    #[test]
    fn invalid_values() {
        let cases: &[(&str, &str, &str)] = &[
            ("model = \"\"", "model", "must not be empty"),
            (
                "[server]\ncors_origins = [\"*\", \"http://a.example\"]",
                "server.cors_origins",
                "must stand alone",
            ),
            (
                "[server]\ncors_origins = [\"http://a.example/\"]",
                "server.cors_origins",
                "is not an origin",
            ),
            (
                "[server]\ncors_origins = [\"a.example\"]",
                "server.cors_origins",
                "is not an origin",
            ),
            ("max_batch = 0", "max_batch", "at least 1"),
            ("threads = 0", "threads", "at least 1"),
            ("threads = 100000", "threads", "at most 4096 (got 100000"),
            (
                "max_batch = 1000000",
                "max_batch",
                "at most 65536 sequences",
            ),
            (
                "max_context = 100000000000",
                "max_context",
                "at most 268435456 tokens",
            ),
            ("max_context = 1", "max_context", "at least 2"),
            ("max_context = 0", "max_context", "at least 2"),
            ("ram_budget = 0", "ram_budget", "above 0"),
            ("vram_budget = \"0GiB\"", "vram_budget", "above 0"),
            ("state_dir = \"\"", "state_dir", "must not be empty"),
            (
                "cache_dir = \"\"",
                "cache_dir",
                "must not be empty (leave it out for the default)",
            ),
            (
                "[experts]\nhot_fraction = -0.1",
                "experts.hot_fraction",
                "finite fraction from 0 to 1 (got -0.1)",
            ),
            (
                "[experts]\nhot_fraction = 1.5",
                "experts.hot_fraction",
                "finite fraction from 0 to 1 (got 1.5)",
            ),
            (
                "[experts]\nhot_fraction = nan",
                "experts.hot_fraction",
                "(got NaN)",
            ),
            (
                "[experts]\nhot_fraction = inf",
                "experts.hot_fraction",
                "finite fraction",
            ),
            (
                "[experts]\nhot_fraction = -inf",
                "experts.hot_fraction",
                "finite fraction",
            ),
            (
                "[experts]\nslots_per_layer = 0",
                "experts.slots_per_layer",
                "at least 1",
            ),
            (
                "[experts]\nprefetch_depth = 5",
                "experts.prefetch_depth",
                "at most 4",
            ),
            ("[sim]\nlink_gb_per_s = 0.0", "sim.link_gb_per_s", "above 0"),
            (
                "[sim]\nlink_gb_per_s = -3.0",
                "sim.link_gb_per_s",
                "above 0",
            ),
            ("[sim]\nlink_gb_per_s = inf", "sim.link_gb_per_s", "finite"),
            ("[sim]\nlink_gb_per_s = nan", "sim.link_gb_per_s", "finite"),
            (
                "[sim]\ncopy_latency_us = -1.0",
                "sim.copy_latency_us",
                "0 or more",
            ),
            (
                "[sim]\ncopy_latency_us = nan",
                "sim.copy_latency_us",
                "0 or more",
            ),
            ("[server]\nport = 0", "server.port", "must not be 0"),
            ("[server]\nmax_queue = 0", "server.max_queue", "at least 1"),
            (
                "[server]\nprefill_chunk = 0",
                "server.prefill_chunk",
                "at least 1",
            ),
            (
                "[server]\nmax_request_bytes = 100",
                "server.max_request_bytes",
                "at least 1 KiB",
            ),
            ("[server]\nhost = \"\"", "server.host", "must not be empty"),
            (
                "[server]\nheader_timeout_s = 0",
                "server.header_timeout_s",
                "at least 1 second",
            ),
            (
                "[server]\nbody_timeout_s = 0",
                "server.body_timeout_s",
                "at least 1 second",
            ),
            (
                "[server]\nidle_timeout_s = 0",
                "server.idle_timeout_s",
                "at least 1 second",
            ),
            (
                "[server]\nmax_connections = 0",
                "server.max_connections",
                "at least 1",
            ),
            (
                "[server]\napi_key = \"\"",
                "server.api_key",
                "must not be empty",
            ),
            (
                "[server]\nmodel_name = \" \"",
                "server.model_name",
                "must not be empty",
            ),
        ];
        for &(body, key, expected) in cases {
            let text = if body.starts_with("model") {
                body.to_string()
            } else {
                format!("model = \"m\"\n{body}\n")
            };
            let (k, message) = invalid_key(&text);
            assert_eq!(k, key, "{text:?}");
            assert!(message.contains(expected), "{text:?}: {message}");
            assert!(
                error_line(&text).starts_with(&format!("test.toml: {key}: ")),
                "{text:?}"
            );
        }
        // The limits themselves are accepted.
        let edge = "model = \"m\"\nmax_context = 2\nthreads = 1\nram_budget = 1\n\
                    [experts]\nslots_per_layer = 1\nprefetch_depth = 4\n\
                    [sim]\ncopy_latency_us = 0.0\nlink_gb_per_s = 0.001\n[server]\nport = 1\n";
        parse(edge).unwrap();
        for fraction in ["0.0", "1.0", "0", "1"] {
            let c = parse(&format!(
                "model = \"m\"\n[experts]\nhot_fraction = {fraction}\n"
            ));
            assert!(c.is_ok(), "{fraction}: {c:?}");
        }
        // Flags applied after loading are checked by the same rules.
        let mut c = RunConfig::for_model("m");
        c.max_batch = Some(0);
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "max_batch");
        assert_eq!(e.to_string(), "max_batch: must be at least 1 (got 0)");
        let mut c = RunConfig::for_model("m");
        c.experts.hot_fraction = f64::NAN;
        let e = c.validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "experts.hot_fraction: must be a finite fraction from 0 to 1 (got NaN)"
        );
        let mut c = RunConfig::for_model("m");
        c.cache_dir = Some(PathBuf::new());
        assert_eq!(c.validate().unwrap_err().key, "cache_dir");
    }

    #[test]
    fn relative_paths_resolve_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        std::fs::create_dir_all(base.join("models/tiny")).unwrap();
        std::fs::create_dir_all(base.join("conf")).unwrap();
        std::fs::create_dir_all(base.join("conf/local-model")).unwrap();
        let file = base.join("conf/run.toml");

        let write_and_load = |text: &str| {
            std::fs::write(&file, text).unwrap();
            RunConfig::from_file(&file)
        };

        // `..` and `.` paths resolve from the file's folder, whether or not they exist.
        let c = write_and_load("model = \"../models/tiny\"\nstate_dir = \"state\"\n").unwrap();
        assert_eq!(Path::new(&c.model), base.join("conf/../models/tiny"));
        assert!(Path::new(&c.model).join(".").is_dir());
        assert_eq!(
            c.state_dir.as_deref(),
            Some(base.join("conf/state").as_path())
        );
        assert_eq!(c.resolved_state_dir(), base.join("conf/state"));

        let c = write_and_load("model = \"./not-yet\"\nstate_dir = \"./s/../t\"\n").unwrap();
        assert_eq!(Path::new(&c.model), base.join("conf/not-yet"));
        assert_eq!(c.state_dir.unwrap(), base.join("conf/s/../t"));

        // A bare relative name resolves when it exists next to the file...
        let c = write_and_load("model = \"local-model\"\n").unwrap();
        assert_eq!(Path::new(&c.model), base.join("conf/local-model"));
        // ...and is otherwise a Hub id, left as written.
        let c = write_and_load("model = \"Qwen/Qwen3-30B-A3B\"\n").unwrap();
        assert_eq!(c.model, "Qwen/Qwen3-30B-A3B");

        // Absolute paths are kept.
        let abs = base.join("models/tiny");
        let c = write_and_load(&format!(
            "model = {:?}\nstate_dir = {:?}\n",
            abs.to_str().unwrap(),
            base.join("st").to_str().unwrap()
        ))
        .unwrap();
        assert_eq!(Path::new(&c.model), abs);
        assert_eq!(c.state_dir.unwrap(), base.join("st"));

        // A state folder inside the model folder is refused.
        let e =
            write_and_load("model = \"../models/tiny\"\nstate_dir = \"../models/tiny/state\"\n")
                .unwrap_err();
        match &e {
            ConfigFileError::Invalid { key, path, .. } => {
                assert_eq!(key, "state_dir");
                assert_eq!(path, &file);
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
        assert!(e.to_string().contains("inside the model folder"), "{e}");

        // Errors name the file as given.
        let e = write_and_load("model = \"m\"\nbogus = 1\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("{}: line 2", file.display())),
            "{e}"
        );
        let missing = base.join("nope.toml");
        let e = RunConfig::from_file(&missing).unwrap_err();
        assert!(matches!(e, ConfigFileError::Io { .. }));
        assert!(
            e.to_string().starts_with(&missing.display().to_string()),
            "{e}"
        );
    }

    #[test]
    fn home_expansion() {
        let home = std::ffi::OsStr::new("/home/u");
        assert_eq!(
            resolve_model("~/models/x", Path::new("/cfg"), Some(home)),
            Some(PathBuf::from("/home/u/models/x"))
        );
        assert_eq!(
            resolve_path(Path::new("~/st"), Path::new("/cfg"), Some(home)),
            PathBuf::from("/home/u/st")
        );
        assert_eq!(
            resolve_path(Path::new("st"), Path::new("/cfg"), Some(home)),
            PathBuf::from("/cfg/st")
        );
        assert_eq!(
            resolve_model("org/name", Path::new("/cfg"), Some(home)),
            None
        );
        assert_eq!(resolve_model("/abs/m", Path::new("/cfg"), Some(home)), None);
    }

    #[test]
    fn state_dir_sources() {
        let s =
            |explicit: Option<&str>, model: Option<&str>, xdg: Option<&str>, home: Option<&str>| {
                state_dir_from(
                    explicit.map(Path::new),
                    model.map(Path::new),
                    xdg.map(OsString::from),
                    home.map(OsString::from),
                )
            };
        assert_eq!(
            s(Some("/st"), None, Some("/x"), Some("/h")),
            PathBuf::from("/st")
        );
        assert_eq!(
            s(None, None, Some("/x"), Some("/h")),
            PathBuf::from("/x/moe-offload")
        );
        // A relative XDG_STATE_HOME is ignored, as the XDG spec says.
        assert_eq!(
            s(None, None, Some("rel"), Some("/h")),
            PathBuf::from("/h/.local/state/moe-offload")
        );
        assert_eq!(
            s(None, None, None, Some("/h")),
            PathBuf::from("/h/.local/state/moe-offload")
        );
        assert_eq!(
            s(None, None, None, None),
            std::env::temp_dir().join("moe-offload-state")
        );
        // Never inside the model folder.
        assert_eq!(
            s(None, Some("/x"), Some("/x"), Some("/h")),
            PathBuf::from("/h/.local/state/moe-offload")
        );
        assert_eq!(
            s(Some("/m/state"), Some("/m"), None, Some("/h")),
            PathBuf::from("/h/.local/state/moe-offload")
        );
        assert_ne!(
            s(None, Some("/h"), None, Some("/h")),
            PathBuf::from("/h/.local/state/moe-offload")
        );
    }

    #[test]
    fn cache_keys_parse() {
        let c = parse("model = \"m\"\ncache = false\n").unwrap();
        assert!(!c.cache);
        assert!(c.cache_rebuild);
        let c = parse("model = \"m\"\ncache_rebuild = false\n").unwrap();
        assert!(c.cache);
        assert!(!c.cache_rebuild);
        let c = parse("model = \"m\"\ncache = true\ncache_rebuild = true\n").unwrap();
        assert_eq!(c, RunConfig::for_model("m"));
        let c = parse("model = \"m\"\ncache_dir = \"/abs/cache\"\n").unwrap();
        assert_eq!(c.cache_dir, Some(PathBuf::from("/abs/cache")));
        assert_eq!(c.resolved_cache_dir(), PathBuf::from("/abs/cache"));
        for (value, q) in [
            ("none", Quantization::None),
            ("bf16", Quantization::Bf16),
            ("q8_0", Quantization::Q8_0),
            ("q4_k", Quantization::Q4K),
        ] {
            let c = parse(&format!(
                "model = \"m\"\n[experts]\nhot_quantization = \"{value}\"\n"
            ))
            .unwrap();
            assert_eq!(c.experts.hot_quantization, Some(q));
            assert_eq!(c.experts.cold_quantization, None);
            let c = parse(&format!(
                "model = \"m\"\nexperts.cold_quantization = \"{value}\"\n"
            ))
            .unwrap();
            assert_eq!(c.experts.cold_quantization, Some(q));
            assert_eq!(c.experts.hot_quantization, None);
        }
        let c = parse("model = \"m\"\nexperts = { hot_fraction = 0.125 }\n").unwrap();
        assert_eq!(c.experts.hot_fraction, 0.125);
        // An integer is accepted as a fraction.
        let c = parse("model = \"m\"\n[experts]\nhot_fraction = 1\n").unwrap();
        assert_eq!(c.experts.hot_fraction, 1.0);
    }

    #[test]
    fn expert_tiers() {
        use Quantization as Q;
        let tiers = |hot: Option<Q>, cold: Option<Q>, q: Q| {
            ExpertsConfig {
                hot_quantization: hot,
                cold_quantization: cold,
                ..ExpertsConfig::default()
            }
            .tiers(q)
        };
        // Neither set: one type for every expert.
        assert_eq!(tiers(None, None, Q::Q4K), None);
        assert_eq!(tiers(None, None, Q::None), None);
        // Both set.
        assert_eq!(
            tiers(Some(Q::Bf16), Some(Q::Q4K), Q::None),
            Some((Q::Bf16, Q::Q4K))
        );
        assert_eq!(
            tiers(Some(Q::Q4K), Some(Q::Q8_0), Q::Bf16),
            Some((Q::Q4K, Q::Q8_0))
        );
        // One set: the other is `quantization`.
        assert_eq!(tiers(Some(Q::Q8_0), None, Q::Q4K), Some((Q::Q8_0, Q::Q4K)));
        assert_eq!(tiers(None, Some(Q::Q4K), Q::Q8_0), Some((Q::Q8_0, Q::Q4K)));
        assert_eq!(tiers(Some(Q::None), None, Q::Q4K), Some((Q::None, Q::Q4K)));
        // Both resolve to the same type: no tiers.
        assert_eq!(tiers(Some(Q::Q8_0), Some(Q::Q8_0), Q::None), None);
        assert_eq!(tiers(Some(Q::Q4K), None, Q::Q4K), None);
        assert_eq!(tiers(None, Some(Q::None), Q::None), None);
        // From a file, against the top-level key.
        let c = parse(
            "model = \"m\"\nquantization = \"q4_k\"\n[experts]\nhot_quantization = \"q8_0\"\n",
        )
        .unwrap();
        assert_eq!(c.experts.tiers(c.quantization), Some((Q::Q8_0, Q::Q4K)));
    }

    #[test]
    fn cache_dir_resolves_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        std::fs::create_dir_all(base.join("models/tiny")).unwrap();
        std::fs::create_dir_all(base.join("conf")).unwrap();
        let file = base.join("conf/run.toml");
        let write_and_load = |text: &str| {
            std::fs::write(&file, text).unwrap();
            RunConfig::from_file(&file)
        };

        // Relative paths resolve from the file's folder, whether or not they exist.
        let c = write_and_load("model = \"../models/tiny\"\ncache_dir = \"cache\"\n").unwrap();
        assert_eq!(
            c.cache_dir.as_deref(),
            Some(base.join("conf/cache").as_path())
        );
        assert_eq!(c.resolved_cache_dir(), base.join("conf/cache"));
        let c = write_and_load("model = \"m\"\ncache_dir = \"./c/../d\"\n").unwrap();
        assert_eq!(c.cache_dir.unwrap(), base.join("conf/c/../d"));
        let c = write_and_load("model = \"m\"\ncache_dir = \"../shared-cache\"\n").unwrap();
        assert_eq!(c.cache_dir.unwrap(), base.join("conf/../shared-cache"));

        // Absolute paths are kept.
        let abs = base.join("abs-cache");
        let c = write_and_load(&format!(
            "model = \"m\"\ncache_dir = {:?}\n",
            abs.to_str().unwrap()
        ))
        .unwrap();
        assert_eq!(c.cache_dir.unwrap(), abs);

        // `~/` expands to the home folder (from the environment, which is only read here).
        let c = write_and_load("model = \"m\"\ncache_dir = \"~/moe-cache\"\n").unwrap();
        match std::env::var_os("HOME").filter(|h| Path::new(h).is_absolute()) {
            Some(home) => assert_eq!(c.cache_dir.unwrap(), Path::new(&home).join("moe-cache")),
            None => assert_eq!(c.cache_dir.unwrap(), base.join("conf/~/moe-cache")),
        }
        assert_eq!(
            resolve_path(
                Path::new("~/moe-cache"),
                Path::new("/cfg"),
                Some(std::ffi::OsStr::new("/home/u"))
            ),
            PathBuf::from("/home/u/moe-cache")
        );

        // An empty one is refused, with the file named.
        let e = write_and_load("model = \"m\"\ncache_dir = \"\"\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}: cache_dir: must not be empty (leave it out for the default)",
                file.display()
            )
        );

        // A cache folder inside the model folder is refused, however it is written.
        for inside in [
            "../models/tiny/cache",
            "../models/tiny",
            "../models/./tiny/.q",
        ] {
            let e = write_and_load(&format!(
                "model = \"../models/tiny\"\ncache_dir = \"{inside}\"\n"
            ))
            .unwrap_err();
            match &e {
                ConfigFileError::Invalid { key, path, message } => {
                    assert_eq!(key, "cache_dir", "{inside}");
                    assert_eq!(path, &file);
                    assert!(message.contains("is inside the model folder"), "{message}");
                    assert!(message.ends_with("keep the cache outside it"), "{message}");
                }
                other => panic!("{inside}: expected Invalid, got {other:?}"),
            }
        }
        // Next to the model folder is fine.
        let c = write_and_load("model = \"../models/tiny\"\ncache_dir = \"../models/cache\"\n")
            .unwrap();
        assert_eq!(c.resolved_cache_dir(), base.join("conf/../models/cache"));
        // A cache folder set after loading (a flag) is checked by the same rule.
        let mut c = RunConfig::for_model(base.join("models/tiny").to_str().unwrap());
        c.cache_dir = Some(base.join("models/tiny/c"));
        assert_eq!(c.validate().unwrap_err().key, "cache_dir");
        // The resolved default is never inside the model folder either.
        c.cache_dir = None;
        assert!(!is_within(
            &c.resolved_cache_dir(),
            &base.join("models/tiny")
        ));
        assert!(!is_within(
            &default_cache_dir(Some(&base.join("models/tiny"))),
            &base.join("models/tiny")
        ));
    }

    #[test]
    fn cache_dir_sources() {
        let s =
            |explicit: Option<&str>, model: Option<&str>, xdg: Option<&str>, home: Option<&str>| {
                cache_dir_from(
                    explicit.map(Path::new),
                    model.map(Path::new),
                    xdg.map(OsString::from),
                    home.map(OsString::from),
                )
            };
        // The explicit folder first.
        assert_eq!(
            s(Some("/c"), None, Some("/x"), Some("/h")),
            PathBuf::from("/c")
        );
        // Then an absolute XDG_CACHE_HOME.
        assert_eq!(
            s(None, None, Some("/x"), Some("/h")),
            PathBuf::from("/x/moe-offload")
        );
        assert_eq!(
            s(None, None, Some("/x"), None),
            PathBuf::from("/x/moe-offload")
        );
        // A relative XDG_CACHE_HOME is ignored, as the XDG spec says; so is an empty one.
        assert_eq!(
            s(None, None, Some("rel/cache"), Some("/h")),
            PathBuf::from("/h/.cache/moe-offload")
        );
        assert_eq!(
            s(None, None, Some(""), Some("/h")),
            PathBuf::from("/h/.cache/moe-offload")
        );
        // Then the home folder.
        assert_eq!(
            s(None, None, None, Some("/h")),
            PathBuf::from("/h/.cache/moe-offload")
        );
        // Then the temporary folder.
        assert_eq!(
            s(None, None, None, None),
            std::env::temp_dir().join("moe-offload-cache")
        );
        assert_eq!(
            s(None, None, Some("rel"), Some("")),
            std::env::temp_dir().join("moe-offload-cache")
        );
        // Never inside the model folder: such a candidate is skipped.
        assert_eq!(
            s(None, Some("/x"), Some("/x"), Some("/h")),
            PathBuf::from("/h/.cache/moe-offload")
        );
        assert_eq!(
            s(Some("/m/cache"), Some("/m"), None, Some("/h")),
            PathBuf::from("/h/.cache/moe-offload")
        );
        assert_eq!(
            s(None, Some("/h"), None, Some("/h")),
            std::env::temp_dir().join("moe-offload-cache")
        );
        // The state folder uses its own variable and home sub-folder from the same helper.
        assert_eq!(
            state_dir_from(None, None, None, Some(OsString::from("/h"))),
            PathBuf::from("/h/.local/state/moe-offload")
        );
        assert_ne!(
            state_dir_from(None, None, None, None),
            cache_dir_from(None, None, None, None)
        );
    }

    #[test]
    fn default_cache_dir_matches_the_config() {
        // Both read the same environment (read, never changed, here).
        assert_eq!(
            default_cache_dir(None),
            RunConfig::for_model("org/name").resolved_cache_dir()
        );
        assert_eq!(
            default_cache_dir(None),
            cache_dir_from(
                None,
                None,
                std::env::var_os("XDG_CACHE_HOME"),
                std::env::var_os("HOME")
            )
        );
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir_all(&model).unwrap();
        let c = RunConfig::for_model(model.to_str().unwrap());
        assert_eq!(default_cache_dir(Some(&model)), c.resolved_cache_dir());
    }

    #[test]
    fn keys_are_named_in_every_toml_form() {
        let cases = [
            // Quoted table and key names, a dotted key inside a table, an inline table.
            (
                "model = \"m\"\n[\"experts\"]\n\"policy\" = 1\n",
                "line 3, column 12: experts.policy: wanted string",
            ),
            (
                "model = \"m\"\n\"experts\".prefetch = \"yes\"\n",
                "line 2, column 22: experts.prefetch: invalid type",
            ),
            (
                "model = \"m\"\nexperts = { prefetch = \"yes\" }\n",
                "line 2, column 24: experts.prefetch: invalid type",
            ),
            // An array where a number belongs.
            (
                "model = \"m\"\nmax_batch = [1]\n",
                "line 2, column 13: max_batch: invalid type",
            ),
            // Brackets, `=` and `#` inside strings and comments do not move the key.
            (
                "model = \"m = [x]\" # y = {\n[server] # [sim]\nhost = \"#\"\nbogus = 1\n",
                "line 4, column 1: server.bogus: unknown field",
            ),
        ];
        for (text, expected) in cases {
            let line = error_line(text);
            assert!(line.contains(expected), "{text:?}: {line}");
        }

        // Array elements are named with their index.
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Inner {
            b: u32,
        }
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Outer {
            a: Vec<Inner>,
        }
        let text = "a = [{ b = 1 }, { b = \"x\" }]\n";
        let e = serde_path_to_error::deserialize::<_, Outer>(toml::Deserializer::new(text))
            .expect_err("a wrong type");
        assert_eq!(join_key(&key_path(e.path()), None), "a[1].b");
        let message = describe_toml_error(text, e.inner(), Some(&key_path(e.path())));
        assert!(
            message.starts_with("line 1, column 23: a[1].b: invalid type"),
            "{message}"
        );
    }

    #[test]
    fn example_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".toml"))
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "cpu-16gb.toml",
                "deepseek-v3-cpu-768gb.toml",
                "glm45-air-gpu-24gb-ram-64gb.toml",
                "gpt-oss-120b-cpu-64gb.toml",
                "gpt-oss-120b-gpu-8gb-ram-64gb.toml",
                "gpt-oss-20b-cpu-16gb.toml",
                "gpu-24gb.toml",
                "gpu-8gb-ram-64gb.toml",
                "qwen3-next-80b-cpu-64gb.toml",
                "qwen3-next-80b-gpu-24gb-ram-32gb.toml",
                "qwen3-next-80b-gpu-8gb-ram-64gb.toml",
                "sim-demo.toml"
            ]
        );
        let load =
            |name: &str| RunConfig::from_file(&dir.join(name)).unwrap_or_else(|e| panic!("{e}"));

        let c = load("deepseek-v3-cpu-768gb.toml");
        assert_eq!(c.model, "deepseek-ai/DeepSeek-V3");
        assert_eq!(c.device, DeviceKind::Cpu);
        assert_eq!(c.ram_budget, Some(ByteSize(690 << 30)));
        assert_eq!(c.max_context, Some(32768));

        let c = load("glm45-air-gpu-24gb-ram-64gb.toml");
        assert_eq!(c.model, "zai-org/GLM-4.5-Air");
        assert_eq!(c.device, DeviceKind::Cuda);
        assert_eq!(c.vram_budget, Some(ByteSize(21 << 30)));
        assert_eq!(c.ram_budget, Some(ByteSize(56 << 30)));

        let c = load("cpu-16gb.toml");
        assert_eq!(c.model, "Qwen/Qwen3-30B-A3B");
        assert_eq!(c.device, DeviceKind::Cpu);
        assert_eq!(c.ram_budget, Some(ByteSize(12 << 30)));
        assert_eq!(c.vram_budget, None);
        assert_eq!(c.max_context, Some(4096));
        assert_eq!(c.max_batch, Some(1));
        assert_eq!(c.threads, None);
        assert_eq!(c.kv_dtype, KvDtype::Bf16);
        assert_eq!(c.quantization, Quantization::None);
        assert!(c.cache);
        assert_eq!(c.cache_dir, None);
        assert!(c.cache_rebuild);
        assert_eq!(c.experts, ExpertsConfig::default());
        assert_eq!(c.sim, SimConfig::default());
        assert_eq!(c.server, ServerConfig::default());

        let c = load("gpu-24gb.toml");
        assert_eq!(c.model, "Qwen/Qwen3-30B-A3B");
        assert_eq!(c.device, DeviceKind::Cuda);
        assert_eq!(c.vram_budget, Some(ByteSize(22 << 30)));
        assert_eq!(c.ram_budget, Some(ByteSize(24 << 30)));
        assert_eq!(c.max_context, Some(8192));
        assert_eq!(c.max_batch, Some(4));
        assert_eq!(c.kv_dtype, KvDtype::Bf16);
        assert_eq!(c.experts.slots_per_layer, None);
        assert!(c.experts.prefetch);
        assert_eq!(c.experts.prefetch_depth, 1);
        assert_eq!(c.experts.policy, EvictionPolicy::Lru);
        assert_eq!(c.server.host, "127.0.0.1");
        assert_eq!(c.server.port, 8080);
        assert_eq!(c.server.max_queue, 64);

        let c = load("gpu-8gb-ram-64gb.toml");
        assert_eq!(c.model, "Qwen/Qwen3-30B-A3B");
        assert_eq!(c.device, DeviceKind::Cuda);
        assert_eq!(c.vram_budget, Some(ByteSize(7 << 30)));
        assert_eq!(c.ram_budget, Some(ByteSize(56 << 30)));
        assert_eq!(c.max_context, Some(4096));
        assert_eq!(c.max_batch, Some(1));
        assert_eq!(c.kv_dtype, KvDtype::Bf16);
        assert_eq!(c.experts.slots_per_layer, None);
        assert!(c.experts.prefetch);
        assert_eq!(c.experts.prefetch_depth, 2);
        assert_eq!(c.experts.policy, EvictionPolicy::Lfu);

        let c = load("sim-demo.toml");
        assert_eq!(c.device, DeviceKind::Sim);
        assert_eq!(Path::new(&c.model), dir.join("../runtime/demo"));
        assert!(Path::new(&c.model).join("config.json").is_file());
        assert_eq!(c.vram_budget, Some(ByteSize(4 << 20)));
        assert_eq!(c.ram_budget, Some(ByteSize(256 << 20)));
        assert_eq!(c.max_context, Some(512));
        assert_eq!(c.threads, Some(2));
        assert_eq!(c.experts.slots_per_layer, Some(4));
        assert!(c.experts.prefetch);
        assert_eq!(c.experts.prefetch_depth, 1);
        assert_eq!(c.experts.policy, EvictionPolicy::Lru);
        assert_eq!(c.sim.link_gb_per_s, 25.0);
        assert_eq!(c.sim.copy_latency_us, 10.0);
        assert_eq!(c.server.model_name.as_deref(), Some("demo"));

        for (name, device, vram, ram, ctx, batch, policy) in [
            (
                "qwen3-next-80b-cpu-64gb.toml",
                DeviceKind::Cpu,
                None,
                56u64 << 30,
                4096,
                1,
                EvictionPolicy::Lru,
            ),
            (
                "qwen3-next-80b-gpu-24gb-ram-32gb.toml",
                DeviceKind::Cuda,
                Some(ByteSize(22 << 30)),
                28 << 30,
                8192,
                4,
                EvictionPolicy::Lru,
            ),
            (
                "qwen3-next-80b-gpu-8gb-ram-64gb.toml",
                DeviceKind::Cuda,
                Some(ByteSize(7 << 30)),
                56 << 30,
                4096,
                1,
                EvictionPolicy::Lfu,
            ),
        ] {
            let c = load(name);
            assert_eq!(c.model, "Qwen/Qwen3-Next-80B-A3B-Instruct", "{name}");
            assert_eq!(c.device, device, "{name}");
            assert_eq!(c.vram_budget, vram, "{name}");
            assert_eq!(c.ram_budget, Some(ByteSize(ram)), "{name}");
            assert_eq!(c.max_context, Some(ctx), "{name}");
            assert_eq!(c.max_batch, Some(batch), "{name}");
            assert_eq!(c.quantization, Quantization::Q4K, "{name}");
            assert_eq!(c.resident_quantization, Some(Quantization::Q8_0), "{name}");
            assert_eq!(c.experts.policy, policy, "{name}");
        }
    }
}
