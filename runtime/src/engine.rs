//! The embedded API: load a model from [`Settings`], then [`Model::generate`] a stream of tokens.
//!
//! The CLI and the server go through exactly this path. Loading maps the weights and parses
//! headers; it never reads the weights' bytes. Generation prefills the prompt in one batched pass,
//! then decodes token by token with the KV cache, checking a [`CancelToken`] between steps.
//! Each token is chosen, checked against EOS, stop strings and the token limit, and turned into
//! text by one [`SeqDecoder`] ([`crate::sequence`]), the same one the batcher drives per request.
//!
//! Invariants: flags not given take their values from `generation_config.json`; EOS is the union
//! of `eos_token_id` in `generation_config.json` and `config.json`; a prompt that does not fit the
//! context is an error before any compute; nothing here panics on user input.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::cpu::{activation_path_covers, bf16_activations_supported};
use crate::backend::{select, Activations, AnyBackend};
use crate::cache::{CacheHandle, CacheKey, CachePlan};
use crate::config::{GenerationConfig, ModelConfig, RawConfig};
use crate::dispatch::{AnyDecoder, Segment, SeqState};
use crate::error::{Error, Result};
use crate::model::{Decoder, Logits, ModelWeights, Trace};
use crate::open::{model_files, open, open_files, HotSet, Opened, Purpose};
pub use crate::open::{Settings, DEFAULT_MAX_CONTEXT_TOKENS, LOADER_THREADS};
use crate::plan::{make_plan, ModelSizes, Plan, Profile};
use crate::quantize::{quantize_model, ExpertTypes};
use crate::runconfig::Quantization;
use crate::sampler::SamplingParams;
use crate::sequence::{SeqDecoder, SeqSettings};
use crate::store::{TieredStore, TieredStoreConfig};
use crate::tokenizer::{ChatMessage, Tokenizer};
use crate::weights::ModelFiles;
use std::path::PathBuf;

/// A loaded model, ready to generate. Cheap to share behind an `Arc`.
pub struct Model {
    pub config: ModelConfig,
    pub generation_config: GenerationConfig,
    pub tokenizer: Option<Tokenizer>,
    pub decoder: AnyDecoder,
    pub files: ModelFiles,
    pub max_context: usize,
    /// Sequences the plan sized the KV cache for (`Settings::max_batch`, or what the plan chose
    /// for an unset one).
    pub max_batch: usize,
    /// Tensors present in the files that the architecture does not use.
    pub unused_tensors: Vec<String>,
    /// Where every byte lives.
    pub plan: Plan,
    /// The hot-set file of this model and the counts it held at load.
    hotset: (PathBuf, String, Option<Vec<Vec<u64>>>),
    /// The quantized weight cache the weights are mapped from, if any.
    cache: Option<Arc<CacheHandle>>,
    /// What building the cache took, when this load built it.
    cache_build: Option<crate::cache::BuildReport>,
    /// The checkpoint's pre-quantized weights, when it has any.
    prequant: Option<PrequantInfo>,
    pool: rayon::ThreadPool,
    /// The mapped files, checked after every forward pass (see [`crate::mapguard`]).
    files_watch: crate::mapguard::FileWatch,
    /// The grammar engine over this model's tokens, built at the first constrained request.
    grammar: std::sync::OnceLock<std::result::Result<crate::constrain::GrammarEngine, String>>,
}

/// What loading did with a checkpoint's pre-quantized weights.
#[derive(Clone, Debug, PartialEq)]
pub struct PrequantInfo {
    /// The format, e.g. `fp8 e4m3, 128x128 blocks` or `bitsandbytes nf4, double quant`.
    pub format: String,
    /// Weights stored pre-quantized.
    pub tensors: usize,
    /// The error converting them to the requested quantization added against their exact
    /// values, when this load converted them (None: kept without loss, or mapped from a cache
    /// built earlier).
    pub conversion_error: Option<crate::weights::prequant::ErrorSummary>,
}

/// What to generate from.
#[derive(Clone, Debug)]
pub enum Prompt {
    /// Text, tokenized as `tokenizer(text)` (special tokens added).
    Text(String),
    /// Token ids used verbatim.
    Ids(Vec<u32>),
    /// Messages rendered through the model's chat template (with the generation prompt).
    Chat(Vec<ChatMessage>),
    /// [`Prompt::Chat`] with more template variables (`chat_template_kwargs`, such as
    /// `enable_thinking`).
    ChatWith(Vec<ChatMessage>, crate::tokenizer::TemplateKwargs),
    /// [`Prompt::ChatWith`] with function definitions for the template's `tools` variable.
    ChatTools(
        Vec<ChatMessage>,
        crate::tokenizer::TemplateKwargs,
        Vec<serde_json::Value>,
    ),
}

/// Per-request generation settings; `None` fields come from `generation_config.json`.
#[derive(Clone, Debug, Default)]
pub struct GenerateParams {
    pub max_tokens: Option<usize>,
    /// 0 = greedy.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub min_p: Option<f64>,
    pub seed: Option<u64>,
    pub ignore_eos: bool,
    /// Keep the prefill logits of every prompt position ([`Generation::prompt_logits`]).
    pub return_prompt_logits: bool,
    /// Record which experts every token was routed to ([`Generation::routing_trace`]).
    pub record_routing: bool,
    /// Generation stops before the first occurrence of any of these (not included in the
    /// text); empty = none.
    pub stop: Vec<String>,
    /// Subtracted once from the logit of every token already generated (-2..=2; 0 = off).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit per time it was generated (-2..=2; 0 = off).
    pub frequency_penalty: f32,
    /// Added to the logits of these tokens before every choice (-100..=100 each, as OpenAI's
    /// `logit_bias`; -100 in effect bans a token, 100 forces it); empty = none.
    pub logit_bias: Vec<(u32, f32)>,
    /// The text must follow this grammar (a JSON schema, any JSON object, a Lark grammar):
    /// every token is chosen among those it allows, and generation ends when it is complete.
    pub grammar: Option<crate::constrain::Grammar>,
}

/// One routing decision: a token's experts in one layer.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RoutingRecord {
    pub layer: usize,
    /// Position of the token in the sequence.
    pub token: usize,
    pub experts: Vec<u32>,
}

/// Default number of new tokens when neither the request nor generation_config says.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 128;

/// Shared flag to stop a generation between steps.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Why generation ended (owned by the per-sequence state machine).
pub use crate::sequence::FinishReason;

/// One generated token and the text it released: complete characters, with any text that may
/// begin a stop string held back (empty mid-character, while held, and for an EOS token).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenEvent {
    pub id: u32,
    pub text: String,
}

impl Model {
    /// Loads the model named by `settings` (headers and small files only; weights are mapped).
    pub fn load(settings: &Settings) -> Result<Model> {
        Self::load_files(model_files(settings)?, settings)
    }

    /// Loads the model named by `settings` onto `backend` (tests pass the CUDA backend on the
    /// mock device here).
    pub fn load_on(settings: &Settings, backend: AnyBackend) -> Result<Model> {
        Self::load_files_on(model_files(settings)?, settings, backend)
    }

    /// Loads from already-located files (a folder or the embedded demo).
    pub fn load_files(files: ModelFiles, settings: &Settings) -> Result<Model> {
        // The backend first: a device that cannot open fails before the model is opened.
        let backend = select(
            settings.device,
            settings.activations,
            &settings.resolved_cache_dir(),
        )?;
        Self::load_files_on(files, settings, backend)
    }

    /// Loads from already-located files onto `backend` (tests pass the CUDA backend on the
    /// mock device here).
    pub fn load_files_on(
        files: ModelFiles,
        settings: &Settings,
        mut backend: AnyBackend,
    ) -> Result<Model> {
        let Opened {
            files,
            config_bytes,
            raw: _,
            arch: _,
            config,
            weights,
            skeleton: mut mw,
            experts_per_layer,
            hot_set,
            expert_types,
            dry: quant,
            mut files_watch,
            from_config_only: _,
        } = open_files(files, settings, Purpose::Load)?;
        let generation_config = read_generation_config(&files)?;
        let max_context = settings.max_context_for(&config);
        if max_context < 2 {
            return Err(Error::InvalidRequest(
                "max_context must be at least 2".into(),
            ));
        }
        let resident_q = settings.resident_quantization();
        let profile = Profile::load(&settings.resolved_state_dir());
        let HotSet {
            path: hotset_path,
            fingerprint,
            counts: hot_counts,
        } = hot_set
            .ok_or_else(|| Error::Internal("opened for loading without a hot set".into()))?;
        log_tiers(&expert_types, &experts_per_layer, hot_counts.is_some());
        let prequant = quant.prequant_tensors > 0;
        let use_cache = settings.uses_cache_for(&expert_types, prequant);
        let request = settings.plan_request(max_context, &expert_types, prequant)?;
        if prequant {
            log_prequant(&weights, quant.prequant_tensors, settings.quantization);
        }
        let sizes = ModelSizes::measure(&config, &weights, &mw, request.kv_elem_bytes, &quant);
        // Refuse before anything but headers has been read.
        let plan = make_plan(&sizes, &request, &profile)?;
        if let AnyBackend::Cuda(cuda) = &mut backend {
            // Every device allocation stays within the planned budget.
            if let Some(cap) = plan.vram_budget_bytes {
                cuda.set_vram_cap(cap);
            }
        }
        for w in &plan.warnings {
            tracing::warn!("{w}");
        }
        let Finished {
            cache,
            cache_build,
            conversion_error,
        } = if use_cache {
            let key = CacheKey::new(&files, &config_bytes, &weights, &expert_types, resident_q);
            finish_from_cache(&mut mw, key, &expert_types, settings)?
        } else {
            finish_in_memory(&mut mw, &expert_types, resident_q, quant.quantized_tensors)?
        };
        warn_if_activations_change_nothing(settings.activations, &mut mw);
        let unused_tensors = weights.unused();
        warn_unused(&unused_tensors, config.arch);
        let check = cache
            .clone()
            .map(|c| c as Arc<dyn crate::store::ExpertCheck>);
        let experts = std::mem::take(&mut mw.experts);
        let (hidden, inter) = (config.hidden_size, config.moe_intermediate_size);
        let store_config = |device| TieredStoreConfig {
            host: plan.host_tier(),
            device,
            policy: settings.experts.policy,
            prefetch: settings.experts.prefetch,
            prefetch_depth: settings.experts.prefetch_depth,
            loader_threads: LOADER_THREADS,
            hot: hot_counts
                .as_deref()
                .map(crate::hotset::ranking)
                .unwrap_or_default(),
            activations: settings.activations,
        };
        let device_tier = plan.device_tier(&request, &profile);
        let decoder = match backend {
            AnyBackend::Cpu(cpu) => {
                let store = TieredStore::with_check(
                    experts,
                    hidden,
                    inter,
                    store_config(device_tier),
                    check,
                )?;
                AnyDecoder::Cpu(decoder_on_backend(
                    settings,
                    &config,
                    mw,
                    Box::new(store),
                    cpu,
                )?)
            }
            AnyBackend::Cuda(cuda) => {
                // Expert slots in VRAM when the plan gives any and the model has experts; else
                // every expert is computed on the host.
                let has_experts = experts.iter().flatten().next().is_some();
                let tier = device_tier
                    .as_ref()
                    .filter(|_| has_experts)
                    .map(|d| crate::store::CudaTier::new(&cuda, d.link_bytes_per_s));
                let device = device_tier.filter(|_| tier.is_some());
                tracing::info!(
                    "computing on {} within a {} VRAM budget; {}",
                    cuda.describe(),
                    crate::size::ByteSize(cuda.vram_usage().cap_bytes),
                    match &device {
                        Some(d) => format!("{} expert slots per layer in VRAM", d.slots_per_layer),
                        None => "experts are computed on the CPU".to_string(),
                    }
                );
                let store = TieredStore::with_tier(
                    experts,
                    hidden,
                    inter,
                    store_config(device),
                    check,
                    tier,
                )?;
                AnyDecoder::Cuda(decoder_on_backend(
                    settings,
                    &config,
                    mw,
                    Box::new(store),
                    cuda,
                )?)
            }
        };
        let tokenizer = read_tokenizer(&files)?;
        if let Some(c) = &cache {
            files_watch.add(c.path().to_path_buf());
        }
        files_watch.check()?;
        let pool = compute_pool(settings.threads)?;
        Ok(Model {
            config,
            generation_config,
            tokenizer,
            decoder,
            files,
            max_context,
            max_batch: plan.max_batch.max(1),
            unused_tensors,
            plan,
            hotset: (hotset_path, fingerprint, hot_counts),
            cache,
            cache_build,
            prequant: prequant.then(|| PrequantInfo {
                format: weights.prequant_label(),
                tensors: quant.prequant_tensors,
                conversion_error,
            }),
            pool,
            files_watch,
            grammar: std::sync::OnceLock::new(),
        })
    }

    /// `Err(`[`Error::FileChanged`]`)` when a file this model maps was truncated or modified
    /// on disk since it was opened (the model is unusable until restarted); stats the files
    /// first (rate-limited), so a change is seen before a read trips on it.
    pub fn check_files(&self) -> Result<()> {
        self.files_watch.check_now()
    }

    /// What building the quantized weight cache took, when this load built it.
    pub fn cache_build_report(&self) -> Option<&crate::cache::BuildReport> {
        self.cache_build.as_ref()
    }

    /// What loading did with the checkpoint's pre-quantized weights (None: it has none).
    pub fn prequant(&self) -> Option<&PrequantInfo> {
        self.prequant.as_ref()
    }

    /// The quantized weight cache file the weights are mapped from, if any.
    pub fn cache_path(&self) -> Option<&std::path::Path> {
        self.cache.as_deref().map(CacheHandle::path)
    }

    /// Waits until a repair of the cache file started by this run (after a damaged tensor was
    /// found) has replaced the file. Returns at once when there is none.
    pub fn wait_for_cache_repair(&self) {
        if let Some(c) = &self.cache {
            c.wait_for_repair();
        }
    }

    /// Remembers this run's expert popularity in `state_dir` for the next start.
    pub fn save_hot_set(&self) -> Result<()> {
        let run = self.decoder.store().popularity();
        if run.iter().flatten().all(|&c| c == 0) {
            return Ok(());
        }
        let (path, fp, old) = &self.hotset;
        crate::hotset::save(path, fp, old.as_deref(), &run)
    }

    /// Where the hot set is kept.
    pub fn hot_set_path(&self) -> &std::path::Path {
        &self.hotset.0
    }

    /// Compute threads in use.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// The EOS ids: union of generation_config.json and config.json.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let mut v = self.generation_config.eos_token_ids.clone();
        for id in &self.config.eos_token_ids {
            if !v.contains(id) {
                v.push(*id);
            }
        }
        v
    }

    fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::InvalidRequest(format!(
                "{} has no tokenizer.json: pass token ids instead of text",
                self.files.label()
            ))
        })
    }

    /// Turns a prompt into token ids. Text and chat prompts are tokenized within the context
    /// (one new token must fit): a longer one is refused with [`Error::ContextOverflow`] after
    /// work and memory proportional to `max_context`, not to the prompt
    /// ([`Tokenizer::encode_within`]); its `needed_tokens` is then a lower bound.
    pub fn encode_prompt(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let max_prompt_tokens = self.max_context - 1;
        let encoded = match prompt {
            Prompt::Ids(ids) => Ok(ids.clone()),
            Prompt::Text(t) => self.tokenizer()?.encode_within(t, true, max_prompt_tokens),
            Prompt::Chat(m) => self
                .tokenizer()?
                .encode_chat_within(m, true, max_prompt_tokens),
            Prompt::ChatWith(m, kwargs) => {
                self.tokenizer()?
                    .encode_chat_with(m, true, kwargs, max_prompt_tokens)
            }
            Prompt::ChatTools(m, kwargs, tools) => {
                self.tokenizer()?
                    .encode_chat_tools(m, true, kwargs, Some(tools), max_prompt_tokens)
            }
        };
        let ids = match encoded {
            Ok(ids) => ids,
            Err(crate::tokenizer::TokenizerError::TooLong {
                at_least_tokens, ..
            }) => {
                return Err(Error::ContextOverflow {
                    needed_tokens: at_least_tokens + 1,
                    max_context_tokens: self.max_context,
                })
            }
            Err(e) => return Err(e.into()),
        };
        if ids.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.config.vocab_size) {
            return Err(Error::InvalidRequest(format!(
                "prompt token id {bad} is outside the vocabulary (vocab_size {})",
                self.config.vocab_size
            )));
        }
        // At least one new token must fit.
        if ids.len() >= self.max_context {
            return Err(Error::ContextOverflow {
                needed_tokens: ids.len() + 1,
                max_context_tokens: self.max_context,
            });
        }
        Ok(ids)
    }

    /// Resolves sampling settings: request first, then generation_config.json, then greedy.
    pub fn sampling_params(&self, p: &GenerateParams) -> Result<SamplingParams> {
        let g = &self.generation_config;
        // transformers samples only when do_sample is true; a request temperature > 0 asks for it.
        let sample_by_default = g.do_sample.unwrap_or(false);
        let temperature = match p.temperature {
            Some(t) => t,
            None if sample_by_default => g.temperature.unwrap_or(1.0),
            None => 0.0,
        };
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(Error::InvalidRequest(format!(
                "temperature must be >= 0, got {temperature}"
            )));
        }
        let top_p = p.top_p.or(g.top_p).unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(Error::InvalidRequest(format!(
                "top_p must be in (0, 1], got {top_p}"
            )));
        }
        let min_p = p.min_p.or(g.min_p).unwrap_or(0.0);
        if !(0.0..=1.0).contains(&min_p) {
            return Err(Error::InvalidRequest(format!(
                "min_p must be in [0, 1], got {min_p}"
            )));
        }
        let seed = p.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        Ok(SamplingParams {
            temperature,
            top_k: p.top_k.or(g.top_k).unwrap_or(0),
            top_p,
            min_p,
            seed,
        })
    }

    /// Checks a request's per-sequence settings (sampling, stop strings, penalties, logprobs)
    /// and resolves its sampling: the one check behind [`Model::seq_decoder`] and the batcher's
    /// admission.
    pub fn request_sampling(
        &self,
        params: &GenerateParams,
        logprobs: Option<usize>,
    ) -> Result<SamplingParams> {
        let sampling = self.sampling_params(params)?;
        crate::sequence::validate(
            &params.stop,
            params.presence_penalty,
            params.frequency_penalty,
            logprobs,
        )?;
        crate::sequence::validate_logit_bias(&params.logit_bias, self.config.vocab_size)?;
        if let Some(g) = &params.grammar {
            self.constraint(g)?;
        }
        Ok(sampling)
    }

    /// A fresh constraint for `grammar` (the model's grammar engine is built on first use);
    /// a grammar that does not compile, or a model without a tokenizer, is an
    /// [`Error::InvalidRequest`] saying why.
    pub fn constraint(
        &self,
        grammar: &crate::constrain::Grammar,
    ) -> Result<crate::constrain::Constraint> {
        let tokenizer = self.tokenizer()?;
        let engine = self.grammar.get_or_init(|| {
            let started = std::time::Instant::now();
            let engine = crate::constrain::GrammarEngine::new(
                tokenizer,
                self.config.vocab_size,
                &self.eos_token_ids(),
            )
            .map_err(|e| e.to_string());
            tracing::info!(
                "grammar engine over {} tokens built in {} ms",
                self.config.vocab_size,
                started.elapsed().as_millis()
            );
            engine
        });
        match engine {
            Ok(engine) => engine.compile(grammar),
            Err(why) => Err(Error::InvalidRequest(format!(
                "constrained decoding is not available for this model: {why}"
            ))),
        }
    }

    /// The per-token state machine of one request whose prompt holds `prompt_tokens` tokens:
    /// sampling settings resolved as [`Model::sampling_params`] does, the token limit
    /// (request, then generation_config.json, then [`DEFAULT_MAX_NEW_TOKENS`], and never past
    /// the context), the EOS set (none with `ignore_eos`), stop strings and penalties.
    pub fn seq_decoder(
        &self,
        prompt_tokens: usize,
        params: &GenerateParams,
        logprobs: Option<usize>,
    ) -> Result<SeqDecoder<'_>> {
        let sampling = self.request_sampling(params, logprobs)?;
        let max_new = params
            .max_tokens
            .or(self.generation_config.max_new_tokens)
            .unwrap_or(DEFAULT_MAX_NEW_TOKENS);
        let eos = if params.ignore_eos {
            Vec::new()
        } else {
            self.eos_token_ids()
        };
        let settings = SeqSettings {
            eos,
            max_new_tokens: max_new.min(self.max_context.saturating_sub(prompt_tokens)),
            stop: params.stop.clone(),
            presence_penalty: params.presence_penalty,
            frequency_penalty: params.frequency_penalty,
            logit_bias: params.logit_bias.clone(),
            logprobs,
        };
        let seq = SeqDecoder::new(sampling, settings, self.tokenizer.as_ref());
        Ok(match &params.grammar {
            Some(g) => seq.with_constraint(self.constraint(g)?),
            None => seq,
        })
    }

    /// Runs a forward pass on this model's thread pool.
    pub fn forward(
        &self,
        tokens: &[u32],
        state: &mut SeqState,
        logits: Logits,
        trace: Option<&mut Trace>,
    ) -> Result<Vec<f32>> {
        if state.len() + tokens.len() > self.max_context {
            return Err(Error::ContextOverflow {
                needed_tokens: state.len() + tokens.len(),
                max_context_tokens: self.max_context,
            });
        }
        self.files_watch.check()?;
        let out = self
            .pool
            .install(|| self.decoder.forward(tokens, state, logits, trace));
        // A pass that read a changed file (zeros past a truncated end) fails whole.
        self.files_watch.check()?;
        out
    }

    /// Runs several sequences' next tokens as one batch on this model's thread pool (see
    /// [`Decoder::forward_batch`]).
    pub fn forward_batch(&self, segs: &mut [Segment<'_>]) -> Result<Vec<Option<Vec<f32>>>> {
        for s in segs.iter() {
            if s.state.len() + s.tokens.len() > self.max_context {
                return Err(Error::ContextOverflow {
                    needed_tokens: s.state.len() + s.tokens.len(),
                    max_context_tokens: self.max_context,
                });
            }
        }
        self.files_watch.check()?;
        let out = self.pool.install(|| self.decoder.forward_batch(segs, None));
        // A pass that read a changed file (zeros past a truncated end) fails whole.
        self.files_watch.check()?;
        out
    }

    /// A fresh per-sequence state.
    pub fn new_state(&self) -> SeqState {
        self.decoder.new_state()
    }

    /// Starts generating. The returned iterator yields one [`TokenEvent`] per generated token;
    /// the prompt is prefilled on the first call to `next`.
    pub fn generate(
        &self,
        prompt: &Prompt,
        params: &GenerateParams,
        cancel: CancelToken,
    ) -> Result<Generation<'_>> {
        self.check_files()?;
        let prompt_ids = self.encode_prompt(prompt)?;
        let seq = self.seq_decoder(prompt_ids.len(), params, None)?;
        Ok(Generation {
            model: self,
            state: self.new_state(),
            prompt_ids,
            seq,
            cancel,
            pending: None,
            finish: None,
            return_prompt_logits: params.return_prompt_logits,
            prompt_logits: None,
            routing: params.record_routing.then(Vec::new),
            prefill_time: Duration::ZERO,
            decode_time: Duration::ZERO,
        })
    }
}

/// What `plan` reports: the model's normalised config and the placement.
pub struct PlanReport {
    pub config: ModelConfig,
    pub plan: Plan,
    /// True when sizes came from config.json alone (no weight files).
    pub from_config_only: bool,
    pub label: String,
}

/// What finishing the weights (converting, quantizing or mapping them from the cache) left.
struct Finished {
    cache: Option<Arc<CacheHandle>>,
    cache_build: Option<crate::cache::BuildReport>,
    conversion_error: Option<crate::weights::prequant::ErrorSummary>,
}

/// Points the weights at the quantized weight cache, building it first when needed.
fn finish_from_cache(
    mw: &mut ModelWeights,
    key: CacheKey,
    expert_types: &ExpertTypes,
    settings: &Settings,
) -> Result<Finished> {
    let cache_plan = CachePlan::new(mw, key, expert_types, settings.cache_options())?;
    let (handle, report) = CacheHandle::attach(mw, cache_plan, expert_types)?;
    Ok(Finished {
        cache: Some(Arc::new(handle)),
        conversion_error: report.as_ref().and_then(|r| r.prequant_error),
        cache_build: report,
    })
}

/// Converts and quantizes the weights in memory (the cache is off), when anything changes.
fn finish_in_memory(
    mw: &mut ModelWeights,
    expert_types: &ExpertTypes,
    resident_q: Quantization,
    quantized_tensors: usize,
) -> Result<Finished> {
    let mut conversion_error = None;
    if quantized_tensors > 0 {
        let t0 = Instant::now();
        conversion_error = quantize_model(mw, expert_types, resident_q, false)?.prequant_error;
        tracing::info!(
            "quantized {quantized_tensors} tensors in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(Finished {
        cache: None,
        cache_build: None,
        conversion_error,
    })
}

/// `generation_config.json`, or the defaults without one.
fn read_generation_config(files: &ModelFiles) -> Result<GenerationConfig> {
    Ok(match files.read_small("generation_config.json")? {
        Some(b) => GenerationConfig::parse(&RawConfig::parse(
            files.path_of("generation_config.json"),
            &b,
        )?)?,
        None => GenerationConfig::default(),
    })
}

/// The tokenizer, when the model has one.
fn read_tokenizer(files: &ModelFiles) -> Result<Option<Tokenizer>> {
    if !files.exists("tokenizer.json") {
        return Ok(None);
    }
    let tj = files.read_small("tokenizer.json")?.unwrap_or_default();
    let tc = files.read_small("tokenizer_config.json")?;
    let ct = files
        .read_small("chat_template.jinja")?
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    Ok(Some(Tokenizer::from_bytes(
        &tj,
        tc.as_deref(),
        ct.as_deref(),
    )?))
}

/// The decoder on `backend`.
fn decoder_on_backend<B: crate::backend::Backend>(
    settings: &Settings,
    config: &ModelConfig,
    mw: ModelWeights,
    store: Box<dyn crate::store::ExpertStore<B>>,
    backend: B,
) -> Result<Decoder<B>> {
    Ok(Decoder {
        hidden_size: config.hidden_size,
        vocab_size: config.vocab_size,
        store,
        w: mw.upload(&backend)?,
        backend,
        kv_elem: settings.kv_dtype,
    })
}

/// The compute threads (`threads`, capped at the cores).
fn compute_pool(requested: Option<usize>) -> Result<rayon::ThreadPool> {
    let threads = crate::runconfig::compute_threads(requested);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("moe-compute-{i}"))
        .build()
        .map_err(|e| Error::Internal(format!("cannot start {threads} threads: {e}")))
}

/// One line on the precision tiers, when experts are tiered.
fn log_tiers(expert_types: &ExpertTypes, experts_per_layer: &[usize], recorded: bool) {
    if let ExpertTypes::Tiered { hot, hot_set, .. } = expert_types {
        let n_hot = hot_set.iter().flatten().filter(|h| **h).count();
        let n_all: usize = experts_per_layer.iter().sum();
        tracing::info!(
            "precision tiers: {n_hot} of {n_all} experts hot ({}){}",
            crate::cache::quantization_name(*hot),
            if recorded {
                ""
            } else {
                "; no expert popularity recorded yet, so every expert starts cold"
            }
        );
    }
}

/// One line on what becomes of a pre-quantized checkpoint's weights.
fn log_prequant(weights: &crate::weights::WeightSet, tensors: usize, q: Quantization) {
    tracing::info!(
        "pre-quantized checkpoint ({}): {tensors} weight(s) {}",
        weights.prequant_label(),
        match q {
            Quantization::None => "kept without loss in their own blocks".to_string(),
            q => format!(
                "converted to {} where rows fit its blocks (quantization), else kept without \
                 loss",
                crate::cache::quantization_name(q)
            ),
        }
    );
}

/// A warning when an `activations` setting meets no weight it applies to.
fn warn_if_activations_change_nothing(act: Activations, mw: &mut ModelWeights) {
    let mut covered = 0usize;
    for l in crate::quantize::linears(mw) {
        covered += usize::from(activation_path_covers(act, l.weight.dtype));
    }
    covered += mw
        .experts
        .iter()
        .flatten()
        .filter(|e| activation_path_covers(act, e.first_matrix().dtype))
        .count();
    if covered > 0 {
        return;
    }
    let why = match act {
        // The default and the exact mode: nothing was asked of any weight type.
        Activations::Auto | Activations::F32 => None,
        Activations::Q8 => Some(
            "activations = \"q8\" changes nothing: the model holds no q8_0 / q4_k weights (set \
             quantization = \"q8_0\" or \"q4_k\")",
        ),
        Activations::Bf16 if !bf16_activations_supported() => {
            Some("activations = \"bf16\" changes nothing: this CPU lacks AVX512_BF16")
        }
        Activations::Bf16 => {
            Some("activations = \"bf16\" changes nothing: the model holds no bf16 weights")
        }
    };
    if let Some(why) = why {
        tracing::warn!("{why}; every matmul stays f32");
    }
}

/// A warning naming tensors present in the files that the architecture does not use.
fn warn_unused(unused: &[String], arch: &str) {
    let Some(first) = unused.first() else {
        return;
    };
    // Multi-token-prediction heads (`mtp.*`, Qwen3-Next's release) are a known extra.
    let mtp = unused.iter().filter(|n| n.starts_with("mtp.")).count();
    let why = if mtp > 0 {
        format!("; {mtp} of them are multi-token-prediction heads (mtp.*), unused here")
    } else {
        String::new()
    };
    tracing::warn!(
        "ignoring {} tensor(s) that {arch} does not use (e.g. `{first}`){why}",
        unused.len()
    );
}

/// Plans a model without loading it: from its headers, or from a bare `config.json` (a folder
/// without weights, or the file itself) so a user can ask whether a model fits before
/// downloading it. Never reads weight bytes, never measures anything.
pub fn plan_model(settings: &Settings) -> Result<PlanReport> {
    let o = open(settings, Purpose::Plan)?;
    let max_context = settings.max_context_for(&o.config);
    let request = settings.plan_request(max_context, &o.expert_types, o.prequant())?;
    let sizes = ModelSizes::measure(
        &o.config,
        &o.weights,
        &o.skeleton,
        request.kv_elem_bytes,
        &o.dry,
    );
    let profile = Profile::load(&settings.resolved_state_dir());
    let plan = make_plan(&sizes, &request, &profile)?;
    Ok(PlanReport {
        config: o.config,
        plan,
        from_config_only: o.from_config_only,
        label: o.files.label(),
    })
}

/// A running generation: an iterator of tokens with timing and the finish reason.
pub struct Generation<'m> {
    model: &'m Model,
    state: SeqState,
    prompt_ids: Vec<u32>,
    /// Sampling, EOS, stop strings, penalties, token limit and text.
    seq: SeqDecoder<'m>,
    cancel: CancelToken,
    /// Logits for the next token, from the last forward pass.
    pending: Option<Vec<f32>>,
    finish: Option<FinishReason>,
    return_prompt_logits: bool,
    prompt_logits: Option<Vec<f32>>,
    routing: Option<Vec<RoutingRecord>>,
    prefill_time: Duration,
    decode_time: Duration,
}

impl Generation<'_> {
    pub fn prompt_ids(&self) -> &[u32] {
        &self.prompt_ids
    }
    pub fn generated(&self) -> &[u32] {
        self.seq.generated()
    }
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }
    /// `[prompt_tokens, vocab]` prefill logits, when requested.
    pub fn prompt_logits(&self) -> Option<&[f32]> {
        self.prompt_logits.as_deref()
    }
    /// Routing decisions so far, when requested.
    pub fn routing_trace(&self) -> Option<&[RoutingRecord]> {
        self.routing.as_deref()
    }

    /// Runs the model, recording routing when asked.
    fn forward(&mut self, tokens: &[u32], logits: Logits) -> Result<Vec<f32>> {
        let pos0 = self.state.len();
        let top_k = self.model.config.router.top_k;
        if self.routing.is_none() {
            return self.model.forward(tokens, &mut self.state, logits, None);
        }
        let mut trace = Trace::default();
        let out = self
            .model
            .forward(tokens, &mut self.state, logits, Some(&mut trace))?;
        let rec = self.routing.as_mut().expect("routing on");
        for (layer, r) in trace.routing.iter().enumerate() {
            if let Some(r) = r {
                for (i, ex) in r.indices.chunks(top_k).enumerate() {
                    rec.push(RoutingRecord {
                        layer,
                        token: pos0 + i,
                        experts: ex.to_vec(),
                    });
                }
            }
        }
        Ok(out)
    }

    pub fn prefill_time(&self) -> Duration {
        self.prefill_time
    }
    /// Time spent after prefill: sampling plus the forward passes of all but the first token.
    pub fn decode_time(&self) -> Duration {
        self.decode_time
    }
    /// Text still held when generation ended: a partial stop-string match that never completed
    /// and an incomplete character at the end (empty after a stop string). Call it once the
    /// iterator is exhausted.
    pub fn flush_text(&mut self) -> Result<String> {
        let reason = self.finish.unwrap_or(FinishReason::Cancelled);
        self.seq.finish(reason)
    }

    fn step(&mut self) -> Result<Option<TokenEvent>> {
        if self.finish.is_some() {
            return Ok(None);
        }
        if self.cancel.is_cancelled() {
            self.finish = Some(FinishReason::Cancelled);
            return Ok(None);
        }
        if self.pending.is_none() {
            // Prefill.
            let t0 = Instant::now();
            let vocab = self.model.config.vocab_size;
            let mode = if self.return_prompt_logits {
                Logits::All
            } else {
                Logits::Last
            };
            let prompt = self.prompt_ids.clone();
            let logits = self.forward(&prompt, mode)?;
            let last = logits[logits.len() - vocab..].to_vec();
            if self.return_prompt_logits {
                self.prompt_logits = Some(logits);
            }
            self.pending = Some(last);
            self.prefill_time = t0.elapsed();
        }
        if self.seq.generated().len() >= self.seq.max_new_tokens() {
            self.finish = Some(FinishReason::Length);
            return Ok(None);
        }
        let t0 = Instant::now();
        let logits = self.pending.take().expect("logits after prefill");
        let step = self.seq.on_logits(&logits)?;
        if let Some(f) = step.finish {
            self.finish = Some(f);
        } else if !self.cancel.is_cancelled() {
            self.pending = Some(self.forward(&[step.id], Logits::Last)?);
        } else {
            self.finish = Some(FinishReason::Cancelled);
        }
        self.decode_time += t0.elapsed();
        Ok(Some(TokenEvent {
            id: step.id,
            text: step.text,
        }))
    }
}

impl Iterator for Generation<'_> {
    type Item = Result<TokenEvent>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.step() {
            Ok(Some(ev)) => Some(Ok(ev)),
            Ok(None) => None,
            Err(e) => {
                self.finish.get_or_insert(FinishReason::Cancelled);
                Some(Err(e))
            }
        }
    }
}
