//! `moe-serve`: the command line and the OpenAI-compatible HTTP server over the `moe-runtime`
//! library.
//!
//! Contract (relied on outside this repository; add, never rename):
//! `moe-serve run [--model DIR|HUB_ID] (--prompt TEXT | --prompt-ids 1,2,3) [--chat]
//! [--max-tokens N] [--temperature T] [--top-p P] [--top-k K] [--min-p P] [--seed S]
//! [--ignore-eos] [--stop TEXT]... [--presence-penalty P] [--frequency-penalty P] [--threads N]
//! [--json] [--logits-out FILE]`, and
//! `moe-serve synth --arch qwen3_moe|qwen3_next|glm4_moe|gpt_oss|deepseek_v3 --preset NAME --out DIR [--layers N] [--gguf PATH]`,
//! and
//! `moe-serve cache build [--force] | verify | info [--json] [--file PATH] | clear [--all]`, and
//! `moe-serve serve [--host H] [--port P] [--max-batch N] [--max-queue N] [--model-name NAME]
//! [--api-key KEY] [--log-json]` (127.0.0.1:8080 by default; `[server]` config keys; bearer key from
//! `--api-key`, else `MOE_SERVE_API_KEY`, else `[server] api_key`; routes `/health`,
//! `/v1/models`, `/v1/chat/completions`, `/v1/completions`, the same three without `/v1`,
//! `/metrics`; see `server`).
//! `run`, `plan`, `cache` and `serve` take the same model flags (`--config FILE`, `--model`,
//! `--quantization`, `--cache-dir DIR`, `--no-cache`, `--no-cache-rebuild`, ...).
//! Without `--json`, generated text streams to stdout and timings go to stderr; with `--json`,
//! stdout is exactly one JSON line (`run --json` adds `"cache"`: the quantized weight cache
//! file, or null; and `"prequant"`: null, or the stored format, the number of pre-quantized
//! weights and the `conversion_error` a requested quantization added in this run). A cache build draws a progress bar on stderr when it is a terminal and
//! ends with one plain line (path, size, seconds, GB/s of source read) on stderr for `run`,
//! on stdout for `cache build`. `cache verify` exits non-zero unless the file is intact.
//! `run`'s text follows the same per-sequence rules as the server (`moe_runtime::sequence`): an
//! EOS token ends it without its text (the token still counts in `completion_tokens`), and a
//! `--stop` string ends it with neither it nor what follows printed.
//! Errors: one line on stderr, non-zero exit, never a panic.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod server;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use moe_runtime::cache::{BuildProgress, ProgressSink};
use moe_runtime::open::cache_cmd as cache_api;
use moe_runtime::open::{Overrides, Resolved};
use moe_runtime::runconfig::{Activations, ByteSize, ConfigFileError, DeviceKind, Quantization};
use moe_runtime::synth::{synth, synth_gguf, SynthOptions};
use moe_runtime::weights::{safetensors_bytes, Dtype};
use moe_runtime::{
    plan_model, CancelToken, ChatMessage, GenerateParams, Model, Prompt, RunConfig, Settings,
};

#[derive(Parser)]
#[command(
    name = "moe-serve",
    version,
    about = "Run Mixture-of-Experts language models larger than the machine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate from a prompt (with no --model: the bundled demo model).
    Run(RunArgs),
    /// Show where every byte of a model would live under the budgets, without loading it.
    Plan(PlanArgs),
    /// Measure RAM compute and file read bandwidths; save them for `plan` in state_dir.
    Calibrate(CalibrateArgs),
    /// Write a random-weight model in Hugging Face layout (for tests and benchmarks).
    Synth(SynthArgs),
    /// Build, check, describe or remove the persisted quantized weight cache.
    Cache(CacheArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (with no flags: the demo model on
    /// 127.0.0.1:8080).
    Serve(ServeArgs),
}

/// Model location and budgets: a config file, overridden by flags.
#[derive(Args)]
struct ModelArgs {
    /// Model folder, or a Hub id (`org/name`) already in the local Hugging Face cache.
    /// Overrides the config file's `model`.
    #[arg(long)]
    model: Option<String>,
    /// A TOML run configuration (budgets, device, experts); see configs/.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where compute happens: cpu, cuda, sim, or auto (cuda when a usable GPU is present, else
    /// cpu).
    #[arg(long, value_parser = ["cpu", "cuda", "sim", "auto"])]
    device: Option<String>,
    /// Host memory budget, e.g. 12GiB (on cpu: everything the process holds).
    #[arg(long, value_parser = parse_size)]
    ram_budget: Option<u64>,
    /// Device memory budget, e.g. 22GiB.
    #[arg(long, value_parser = parse_size)]
    vram_budget: Option<u64>,
    /// Longest sequence, prompt plus generated (default: min(max_position_embeddings, 4096)).
    #[arg(long)]
    max_context: Option<usize>,
    /// Compute threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// How expert weights are held: none (as stored), bf16, q8_0, q4_k (quantized at load).
    #[arg(long)]
    quantization: Option<Quantization>,
    /// How resident weights are held (default: as --quantization).
    #[arg(long)]
    resident_quantization: Option<Quantization>,
    /// How activations meet the weights: auto (default: the fast arithmetic for each weight
    /// type: bf16 dot products for bf16 weights, integer dot products for q8_0/q4_k), f32
    /// (exact: f32 activations and accumulation for every weight), q8 (q8_0/q4_k weights only)
    /// or bf16 (bf16 weights only).
    #[arg(long)]
    activations: Option<Activations>,
    /// Folder of the quantized weight cache (default: the config's `cache_dir`, else
    /// $XDG_CACHE_HOME/moe-offload or ~/.cache/moe-offload).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Quantize at load on every start instead of persisting the result (cache = false).
    #[arg(long)]
    no_cache: bool,
    /// Fail, naming the file, when the cache is damaged instead of rebuilding it
    /// (cache_rebuild = false).
    #[arg(long)]
    no_cache_rebuild: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    ByteSize::parse(s).map(|b| b.0)
}

impl ModelArgs {
    /// The flags as an overlay on the config file.
    fn overrides(&self) -> Overrides {
        Overrides {
            model: self.model.clone(),
            device: self.device.as_deref().map(|d| match d {
                "cuda" => DeviceKind::Cuda,
                "sim" => DeviceKind::Sim,
                "auto" => DeviceKind::Auto,
                _ => DeviceKind::Cpu,
            }),
            ram_budget: self.ram_budget,
            vram_budget: self.vram_budget,
            max_context: self.max_context,
            threads: self.threads,
            max_batch: None,
            quantization: self.quantization,
            resident_quantization: self.resident_quantization,
            activations: self.activations,
            cache_dir: self.cache_dir.clone(),
            cache: self.no_cache.then_some(false),
            cache_rebuild: self.no_cache_rebuild.then_some(false),
        }
    }

    /// The config file, then the flags, read once and checked by one set of rules.
    fn resolve(&self, extra: impl FnOnce(&mut Overrides)) -> Result<Resolved, ConfigFileError> {
        let mut o = self.overrides();
        extra(&mut o);
        moe_runtime::open::resolve(self.config.as_deref(), &o)
    }

    fn settings(&self) -> Result<Settings, Box<dyn std::error::Error>> {
        Ok(self.resolve(|_| {})?.settings)
    }
}

#[derive(Args)]
struct CalibrateArgs {
    /// A run configuration (its state_dir and model folder are used).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where to save profile.json (default: the per-user state folder).
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

#[derive(Args)]
struct PlanArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Print the plan as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt text (tokenized with special tokens, as `tokenizer(text)` does).
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt token ids, used verbatim: `--prompt-ids 1,2,3`.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    prompt_ids: Option<Vec<u32>>,
    /// Render the prompt as a user message through the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Maximum number of new tokens.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Sampling temperature; 0 = greedy. Default: generation_config.json.
    #[arg(long)]
    temperature: Option<f64>,
    /// Nucleus sampling: keep the most likely tokens up to this total probability, in (0, 1]
    /// (default: generation_config.json's, else 1).
    #[arg(long)]
    top_p: Option<f64>,
    /// Sample among this many of the most likely tokens; 0 = all (default:
    /// generation_config.json's, else all).
    #[arg(long)]
    top_k: Option<usize>,
    /// Drop tokens less likely than this fraction of the most likely one, in [0, 1] (default:
    /// generation_config.json's, else 0).
    #[arg(long)]
    min_p: Option<f64>,
    /// Seed of the sampler: the same seed gives the same tokens (default: a fresh one).
    #[arg(long)]
    seed: Option<u64>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Stop before the first occurrence of TEXT (not printed); repeat for several.
    #[arg(long, value_name = "TEXT")]
    stop: Vec<String>,
    /// Subtracted once from the logit of every token already generated (-2..=2).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// Subtracted from a token's logit per time it was generated (-2..=2).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// Constrain the output to JSON valid against this JSON schema (a file, or the schema
    /// itself when it starts with `{`).
    #[arg(long, value_name = "FILE|JSON", conflicts_with = "grammar")]
    json_schema: Option<String>,
    /// Constrain the output to this grammar (a file in llguidance's Lark dialect).
    #[arg(long, value_name = "FILE")]
    grammar: Option<PathBuf>,
    /// Print one JSON object on stdout instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Write the prefill logits of every prompt position to this safetensors file.
    #[arg(long)]
    logits_out: Option<PathBuf>,
    /// Write the routing trace (one JSON line per layer and token: layer, token, experts).
    #[arg(long)]
    trace: Option<PathBuf>,
}

#[derive(Args)]
struct SynthArgs {
    /// Architecture to write: qwen3_moe, qwen3_next, glm4_moe, gpt_oss or deepseek_v3.
    #[arg(long, default_value = "qwen3_moe")]
    arch: String,
    /// Size preset: demo, mini, bench-m (qwen3_moe); next-demo, next-shape (48 layers x 512
    /// experts, ~76k tensors, small dimensions), next-bench (the same shape, 12.6 GB) (qwen3_next);
    /// glm45-demo, glm45-air-shape (glm4_moe); gpt-oss-demo, gpt-oss-20b-shape,
    /// gpt-oss-120b-shape (gpt_oss, MXFP4 experts); deepseek-v3-demo, deepseek-v3-shape (bf16)
    /// (deepseek_v3). The *-shape presets are the released dimensions: cut them with --layers.
    #[arg(long, default_value = "demo")]
    preset: String,
    /// Output folder (created; must be empty unless --overwrite).
    #[arg(long)]
    out: PathBuf,
    /// Override the preset's layer count.
    #[arg(long)]
    layers: Option<usize>,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Largest shard in bytes (default: 5 GB, as the Hub).
    #[arg(long)]
    shard_bytes: Option<u64>,
    /// Replace files in a non-empty output folder.
    #[arg(long)]
    overwrite: bool,
    /// Also write the same weights as one llama.cpp GGUF file to PATH (qwen3moe, glm4moe,
    /// deepseek2: BF16; gpt-oss: BF16 with MXFP4 experts); not for qwen3_next.
    #[arg(long, value_name = "PATH")]
    gguf: Option<PathBuf>,
    /// Write only the --gguf twin (same preset, layers and seed), leaving --out untouched: for
    /// a twin of a model written earlier.
    #[arg(long, requires = "gguf")]
    gguf_only: bool,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on (default: the config's `[server] host`, else 127.0.0.1).
    #[arg(long)]
    host: Option<String>,
    /// TCP port (default: the config's `[server] port`, else 8080; 0 picks a free port).
    #[arg(long)]
    port: Option<u16>,
    /// Sequences decoded together (default: the config's `max_batch`, else what the memory
    /// plan fits, up to 8).
    #[arg(long)]
    max_batch: Option<usize>,
    /// Requests that may wait for a slot before new ones get 429 (default: `[server]
    /// max_queue`, else 64).
    #[arg(long)]
    max_queue: Option<usize>,
    /// Name reported by /v1/models and required in requests (default: `[server] model_name`,
    /// else the Hub id the model was opened by, else the model folder's name; requests may
    /// also name the repository or folder).
    #[arg(long)]
    model_name: Option<String>,
    /// Bearer key every route but /health requires (wins over `MOE_SERVE_API_KEY`, which wins
    /// over `[server] api_key`; none: no key).
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// Write logs (one line per request among them) as JSON objects, one per line.
    #[arg(long)]
    log_json: bool,
}

#[derive(Args)]
struct CacheArgs {
    #[command(subcommand)]
    action: CacheAction,
}

#[derive(Subcommand)]
enum CacheAction {
    /// Build the model's cache file now (nothing to do when an intact one exists).
    Build(CacheBuildArgs),
    /// Read every tensor of the cache file and check its checksum; non-zero exit unless intact.
    Verify(CacheModelArgs),
    /// Describe a cache file: its header and every tensor's type, shape and size.
    Info(CacheInfoArgs),
    /// Remove this model's cache files (or, with --all, every cache file in the cache folder).
    Clear(CacheClearArgs),
}

#[derive(Args)]
struct CacheModelArgs {
    #[command(flatten)]
    model: ModelArgs,
}

#[derive(Args)]
struct CacheBuildArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Rebuild even an intact file.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct CacheInfoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Describe this cache file instead of the model's.
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct CacheClearArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Remove every cache file in the cache folder, of any model.
    #[arg(long)]
    all: bool,
}

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("error: internal error{at}: {msg}");
    }));
    let cli = Cli::parse();
    // `serve` logs one line per request (target `request`) by default; RUST_LOG overrides.
    let (default_filter, json) = match &cli.command {
        Command::Serve(a) => ("warn,request=info,progress=info", a.log_json),
        _ => ("warn", false),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    if json {
        // One JSON object per line, with a timestamp, for log collectors.
        logs.json().with_current_span(false).init();
    } else {
        logs.with_target(false)
            .without_time()
            // Colour codes only for a terminal: piped stderr (logs, tests) stays plain text.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    // SAFETY: setting a signal's disposition to SIG_IGN runs no code of ours in a signal
    // context and touches no Rust state. Ignored, SIGXFSZ no longer kills the process when a
    // write passes RLIMIT_FSIZE: the write fails with EFBIG ("File too large"), which the
    // cache reports as one error line naming the file.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let result = std::panic::catch_unwind(|| match cli.command {
        Command::Run(a) => run(a),
        Command::Plan(a) => plan_cmd(a),
        Command::Calibrate(a) => calibrate_cmd(a),
        Command::Synth(a) => synth_cmd(a),
        Command::Cache(a) => cache_cmd(a),
        Command::Serve(a) => serve_cmd(a),
    });
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
        Err(_) => ExitCode::FAILURE,
    }
}

fn serve_cmd(a: ServeArgs) -> Result<(), Box<dyn std::error::Error>> {
    let Resolved {
        mut settings,
        config: RunConfig { mut server, .. },
    } = a.model.resolve(|o| o.max_batch = a.max_batch)?;
    // A cache built on the first start is reported as it goes (a server's stderr is rarely a
    // terminal, so log lines rather than a bar).
    settings.cache_progress = Some(progress_log());
    if let Some(h) = a.host {
        server.host = h;
    }
    if let Some(p) = a.port {
        server.port = p;
    }
    if let Some(q) = a.max_queue {
        if q == 0 {
            return Err("--max-queue must be at least 1".into());
        }
        server.max_queue = q;
    }
    if a.model_name.is_some() {
        server.model_name = a.model_name;
    }
    // The bearer key: the flag, else the variable, else the config's.
    let env_key = std::env::var("MOE_SERVE_API_KEY").ok();
    if let Some(k) = a.api_key.or(env_key).filter(|k| !k.is_empty()) {
        server.api_key = Some(k);
    }
    let fault_panic_token = std::env::var("MOE_SERVE_FAULT_PANIC_TOKEN")
        .ok()
        .and_then(|v| v.parse().ok());
    let load_delay = std::env::var("MOE_SERVE_FAULT_LOAD_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or_default();
    server::serve(server::ServeOptions {
        settings,
        server,
        fault_panic_token,
        load_delay,
    })
}

/// A `/proc/self/status` field in bytes (Linux).
fn status_bytes(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resident set size now (file-backed pages included).
fn rss_bytes() -> Option<u64> {
    status_bytes("VmRSS:")
}

/// Major page faults of this process so far (pages that had to be read from disk).
fn major_page_faults() -> Option<u64> {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a full rusage into the pointer it is given; the zeroed
    // MaybeUninit is a valid place for it and is only read after a successful call.
    let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) } == 0;
    // SAFETY: initialised by the successful call above (and zeroed before it anyway).
    ok.then(|| unsafe { ru.assume_init() }.ru_majflt as u64)
}

/// Peak resident set size (VmHWM, file-backed pages included).
fn peak_rss_bytes() -> Option<u64> {
    status_bytes("VmHWM:")
}

fn calibrate_cmd(a: CalibrateArgs) -> Result<(), Box<dyn std::error::Error>> {
    let settings = moe_runtime::open::resolve(a.config.as_deref(), &Default::default())?.settings;
    let state_dir = a
        .state_dir
        .clone()
        .unwrap_or_else(|| settings.resolved_state_dir());
    let model_dir = settings
        .model
        .as_deref()
        .and_then(|m| moe_runtime::hub::resolve(m).ok());
    eprintln!("measuring (about 10 s)...");
    let p = moe_runtime::calibrate::calibrate(&state_dir, model_dir.as_deref())?;
    let link = match (p.link_pinned_bytes_per_s, p.link_pageable_bytes_per_s) {
        (Some(pinned), Some(pageable)) => format!(
            ", host-to-device {:.1} GB/s pinned / {:.1} GB/s pageable",
            pinned / 1e9,
            pageable / 1e9
        ),
        _ => String::new(),
    };
    println!(
        "RAM compute {:.1} GB/s, file read {:.2} GB/s{link}; saved to {}",
        p.ram_compute_bytes_per_s / 1e9,
        p.file_read_bytes_per_s / 1e9,
        state_dir.join("profile.json").display()
    );
    Ok(())
}

fn plan_cmd(a: PlanArgs) -> Result<(), Box<dyn std::error::Error>> {
    let settings = a.model.settings()?;
    let report = plan_model(&settings)?;
    if a.json {
        let v = serde_json::json!({
            "model": report.label,
            "arch": report.config.arch,
            "from_config_only": report.from_config_only,
            "plan": report.plan,
        });
        write_stdout(format!("{v}\n").as_bytes())?;
    } else {
        write_stdout(
            format!(
                "model: {} ({}{})\n{}",
                report.label,
                report.config.arch,
                if report.from_config_only {
                    ", sizes from config.json"
                } else {
                    ""
                },
                report.plan.render()
            )
            .as_bytes(),
        )?;
    }
    Ok(())
}

/// Bytes for people: kB, MB or GB (powers of 1000, as the GB/s figures).
fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.1} kB", b / 1e3)
    }
}

/// The plain line that ends a cache build.
fn build_line(path: &Path, file_bytes: u64, source_bytes: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    format!(
        "built {} ({}) in {:.2} s, {:.2} GB/s of source read",
        path.display(),
        human_bytes(file_bytes),
        secs,
        source_bytes as f64 / 1e9 / secs.max(1e-9)
    )
}

/// What a [`BuildMeter`] draws.
struct MeterState {
    /// Hidden until the first progress report: a run that builds nothing draws nothing.
    bar: ProgressBar,
    shown: bool,
}

/// A progress bar on stderr (bytes, rate, ETA; hidden when stderr is not a terminal) for cache
/// builds made by the thread that created the meter. Repairs, which the library runs on a
/// background thread while tokens are generated, draw nothing.
struct BuildMeter {
    owner: std::thread::ThreadId,
    state: Arc<Mutex<MeterState>>,
}

impl BuildMeter {
    fn new() -> BuildMeter {
        // Created now, so its rate counts from the start of the build, not from the first
        // report (which comes after a whole batch is converted).
        let bar = ProgressBar::hidden();
        let style = ProgressStyle::with_template(
            "building cache {bar:30} {decimal_bytes}/{decimal_total_bytes} {decimal_bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        BuildMeter {
            owner: std::thread::current().id(),
            state: Arc::new(Mutex::new(MeterState { bar, shown: false })),
        }
    }

    /// The callback for `Settings::cache_progress`.
    fn sink(&self) -> ProgressSink {
        let (owner, state) = (self.owner, self.state.clone());
        ProgressSink(Arc::new(move |p: BuildProgress| {
            if std::thread::current().id() != owner {
                return;
            }
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            st.bar.set_length(p.total_bytes);
            st.bar.set_position(p.done_bytes);
            if !st.shown {
                st.shown = true;
                st.bar
                    .set_draw_target(indicatif::ProgressDrawTarget::stderr());
            }
        }))
    }

    /// Clears the bar.
    fn finish(&self) {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.bar.finish_and_clear();
    }
}

/// Least change in percent between two progress lines, and most seconds between them.
const PROGRESS_STEP_PERCENT: u64 = 10;
const PROGRESS_EVERY_S: u64 = 10;

/// A cache-build progress callback that logs one line (target `progress`) per
/// [`PROGRESS_STEP_PERCENT`] done or every [`PROGRESS_EVERY_S`] seconds, with the rate.
fn progress_log() -> ProgressSink {
    let started = Instant::now();
    let last = Mutex::new((0u64, Instant::now()));
    ProgressSink(Arc::new(move |p: BuildProgress| {
        let pct = p
            .done_bytes
            .saturating_mul(100)
            .checked_div(p.total_bytes)
            .unwrap_or(100);
        let mut l = last.lock().unwrap_or_else(|e| e.into_inner());
        let due = pct >= l.0 + PROGRESS_STEP_PERCENT
            || (pct == 100 && l.0 < 100)
            || l.1.elapsed().as_secs() >= PROGRESS_EVERY_S;
        if !due {
            return;
        }
        *l = (pct, Instant::now());
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        tracing::info!(
            target: "progress",
            "building the expert cache: {pct}% ({:.2} of {:.2} GB, {:.2} GB/s)",
            p.done_bytes as f64 / 1e9,
            p.total_bytes as f64 / 1e9,
            p.done_bytes as f64 / 1e9 / secs
        );
    }))
}

/// Writes `bytes` to stdout and flushes: a full disk or a closed pipe is one error line
/// (`cannot write the output: ...`) and a non-zero exit, never a panic as `println!` gives.
/// The grammar of `--json-schema` / `--grammar`, read and checked as JSON; errors name the flag.
fn run_grammar(
    a: &RunArgs,
) -> Result<Option<moe_runtime::constrain::Grammar>, Box<dyn std::error::Error>> {
    use moe_runtime::constrain::Grammar;
    if let Some(spec) = &a.json_schema {
        let text = if spec.trim_start().starts_with('{') {
            spec.clone()
        } else {
            std::fs::read_to_string(spec).map_err(|e| format!("--json-schema {spec}: {e}"))?
        };
        let schema: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("--json-schema {spec}: not JSON: {e}"))?;
        return Ok(Some(Grammar::JsonSchema(schema)));
    }
    if let Some(path) = &a.grammar {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--grammar {}: {e}", path.display()))?;
        return Ok(Some(Grammar::Lark(text)));
    }
    Ok(None)
}

fn write_stdout(bytes: &[u8]) -> Result<(), Box<dyn std::error::Error>> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| format!("cannot write the output: {e}").into())
}

fn run(a: RunArgs) -> Result<(), Box<dyn std::error::Error>> {
    let t_load = Instant::now();
    let mut settings = a.model.settings()?;
    // One sequence: no KV cache is planned for others (a config's `max_batch` still counts).
    settings.max_batch.get_or_insert(1);
    let meter = BuildMeter::new();
    settings.cache_progress = Some(meter.sink());
    let loaded = Model::load(&settings);
    meter.finish();
    let model = loaded?;
    let load_ms = t_load.elapsed().as_secs_f64() * 1e3;
    if let Some(r) = model.cache_build_report() {
        eprintln!(
            "{}",
            build_line(&r.path, r.file_bytes, r.source_bytes, r.elapsed)
        );
        if let Some(e) = r.prequant_error {
            eprintln!("pre-quantized weights converted: {e} against their exact values");
        }
    }
    let load_rss = rss_bytes();

    let prompt = match (&a.prompt, &a.prompt_ids) {
        (Some(text), _) if a.chat => Prompt::Chat(vec![ChatMessage::new("user", text.clone())]),
        (Some(text), _) => Prompt::Text(text.clone()),
        (None, Some(ids)) if a.chat => {
            return Err("--chat needs --prompt TEXT (token ids are used verbatim)".into())
        }
        (None, Some(ids)) => Prompt::Ids(ids.clone()),
        (None, None) => return Err("give a prompt: --prompt TEXT or --prompt-ids 1,2,3".into()),
    };
    let params = GenerateParams {
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        min_p: a.min_p,
        seed: a.seed,
        ignore_eos: a.ignore_eos,
        return_prompt_logits: a.logits_out.is_some(),
        record_routing: a.trace.is_some(),
        stop: a.stop.clone(),
        presence_penalty: a.presence_penalty,
        frequency_penalty: a.frequency_penalty,
        logit_bias: Vec::new(),
        grammar: run_grammar(&a)?,
    };
    let mut generation = model.generate(&prompt, &params, CancelToken::new())?;
    let mut text = String::new();
    for ev in generation.by_ref() {
        let ev = ev?;
        if !a.json {
            write_stdout(ev.text.as_bytes())?;
        }
        text.push_str(&ev.text);
    }
    let tail = generation.flush_text()?;
    if !a.json {
        write_stdout(format!("{tail}\n").as_bytes())?;
    }
    text.push_str(&tail);
    // A damaged tensor found while generating is being repaired in the background: let the
    // repaired file land before the process exits.
    model.wait_for_cache_repair();

    let prompt_tokens = generation.prompt_ids().len();
    let tokens = generation.generated().to_vec();
    let prefill_s = generation.prefill_time().as_secs_f64();
    let decode_s = generation.decode_time().as_secs_f64();
    let prefill_tps = if prefill_s > 0.0 {
        prompt_tokens as f64 / prefill_s
    } else {
        0.0
    };
    // The first token comes from the prefill pass; the rest each cost one decode step.
    let decode_steps = tokens.len().saturating_sub(1);
    let decode_tps = if decode_s > 0.0 && decode_steps > 0 {
        decode_steps as f64 / decode_s
    } else {
        0.0
    };
    let finish = generation
        .finish_reason()
        .map(|f| f.as_str())
        .unwrap_or("length");

    if let Some(path) = &a.logits_out {
        let logits = generation
            .prompt_logits()
            .ok_or("no prompt logits were computed")?;
        let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
        let ids: Vec<u8> = generation
            .prompt_ids()
            .iter()
            .flat_map(|&v| (v as i64).to_le_bytes())
            .collect();
        let img = safetensors_bytes(&[
            (
                "logits",
                Dtype::F32,
                &[prompt_tokens, model.config.vocab_size],
                &bytes,
            ),
            ("input_ids", Dtype::I64, &[prompt_tokens], &ids),
        ]);
        moe_runtime::fsutil::write_atomic(path, &img)?;
    }

    if let (Some(path), Some(trace)) = (&a.trace, generation.routing_trace()) {
        let mut text = String::new();
        for r in trace {
            text.push_str(&serde_json::to_string(r)?);
            text.push('\n');
        }
        moe_runtime::fsutil::write_atomic(path, text.as_bytes())?;
    }
    let stats = model.decoder.store().stats();
    if let Err(e) = model.save_hot_set() {
        tracing::warn!("could not save the hot set: {e}");
    }
    if a.json {
        let v = serde_json::json!({
            "tokens": tokens,
            "text": text,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": tokens.len(),
            "finish_reason": finish,
            "load_ms": load_ms,
            "prefill_ms": prefill_s * 1e3,
            "decode_ms": decode_s * 1e3,
            "prefill_tokens_per_s": prefill_tps,
            "decode_tokens_per_s": decode_tps,
            "model": model.files.label(),
            "arch": model.config.arch,
            "threads": model.threads(),
            "load_rss_bytes": load_rss,
            "rss_bytes": rss_bytes(),
            "peak_rss_bytes": peak_rss_bytes(),
            "major_page_faults": major_page_faults(),
            "experts": stats,
            "device": model.plan.device,
            "vram": model.decoder.cuda().map(|d| {
                let u = d.backend.vram_usage();
                serde_json::json!({
                    "gpu": d.backend.describe(),
                    "budget_bytes": u.cap_bytes,
                    "held_bytes": u.held_bytes,
                    "peak_live_bytes": u.peak_live_bytes,
                })
            }),
            "quantization": settings.quantization,
            "activations": settings.activations,
            "cache": model.cache_path().map(|p| p.display().to_string()),
            "prequant": model.prequant().map(|p| serde_json::json!({
                "format": p.format,
                "tensors": p.tensors,
                "conversion_error": p.conversion_error.map(|e| serde_json::json!({
                    "rel_rms": e.rel_rms,
                    "max_abs": e.max_abs,
                    "values": e.values,
                })),
            })),
        });
        write_stdout(format!("{v}\n").as_bytes())?;
    } else {
        eprintln!(
            "[{}] load {:.0} ms | prefill {} tokens {:.1} tok/s | decode {} tokens {:.1} tok/s | finish: {}",
            model.config.arch,
            load_ms,
            prompt_tokens,
            prefill_tps,
            tokens.len(),
            decode_tps,
            finish
        );
    }
    Ok(())
}

fn cache_cmd(a: CacheArgs) -> Result<(), Box<dyn std::error::Error>> {
    match a.action {
        CacheAction::Build(b) => cache_build(b),
        CacheAction::Verify(v) => cache_verify(v),
        CacheAction::Info(i) => cache_info(i),
        CacheAction::Clear(c) => cache_clear(c),
    }
}

fn cache_build(a: CacheBuildArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut settings = a.model.settings()?;
    let meter = BuildMeter::new();
    settings.cache_progress = Some(meter.sink());
    let outcome = cache_api::build(&settings, a.force);
    meter.finish();
    let outcome = outcome?;
    match &outcome.report {
        Some(r) => {
            println!(
                "{}",
                build_line(&r.path, r.file_bytes, r.source_bytes, r.elapsed)
            );
            if let Some(e) = r.prequant_error {
                println!("pre-quantized weights converted: {e} against their exact values");
            }
        }
        None => println!(
            "{}: already built ({})",
            outcome.path.display(),
            human_bytes(outcome.file_bytes)
        ),
    }
    Ok(())
}

fn cache_verify(a: CacheModelArgs) -> Result<(), Box<dyn std::error::Error>> {
    let settings = a.model.settings()?;
    let r = cache_api::verify(&settings)?;
    let path = r.path.display();
    if r.ok() {
        println!(
            "{path}: ok ({} tensors, {})",
            r.tensors,
            human_bytes(r.file_bytes)
        );
        return Ok(());
    }
    let why = match &r.problem {
        Some(_) if !r.path.exists() => {
            "absent: not built yet (build it with `moe-serve cache build`)".to_string()
        }
        Some(p) => format!("{p} (rebuild it with `moe-serve cache build --force`)"),
        None => format!(
            "{} of {} tensors fail their checksum: {} (the next run repairs it, or rebuild it with `moe-serve cache build --force`)",
            r.damaged.len(),
            r.tensors,
            r.damaged.join(", ")
        ),
    };
    println!("{path}: {why}");
    Err(format!("quantized weight cache {path}: not intact: {why}").into())
}

fn cache_info(a: CacheInfoArgs) -> Result<(), Box<dyn std::error::Error>> {
    let path = match &a.file {
        Some(f) => f.clone(),
        None => cache_api::plan_for(&a.model.settings()?)?.path,
    };
    let info = cache_api::info(&path)?;
    if a.json {
        println!("{}", serde_json::to_string(&info)?);
        return Ok(());
    }
    println!("path: {}", info.path.display());
    println!(
        "size: {} ({} bytes)",
        human_bytes(info.file_bytes),
        info.file_bytes
    );
    println!("version: {}", info.version);
    println!("fingerprint: {}", info.fingerprint);
    println!("source: {}", info.source);
    println!("expert types: {}", info.expert_types.join(", "));
    println!("resident type: {}", info.resident_type);
    println!("tensors: {}", info.tensors.len());
    let shapes: Vec<String> = info
        .tensors
        .iter()
        .map(|t| {
            let dims: Vec<String> = t.shape.iter().map(u64::to_string).collect();
            format!("[{}]", dims.join(", "))
        })
        .collect();
    let name_w = info.tensors.iter().map(|t| t.name.len()).max().unwrap_or(0);
    let type_w = info
        .tensors
        .iter()
        .map(|t| t.dtype.len())
        .max()
        .unwrap_or(0);
    let shape_w = shapes.iter().map(String::len).max().unwrap_or(0);
    let mut out = std::io::stdout().lock();
    for (t, shape) in info.tensors.iter().zip(&shapes) {
        let kept = if t.kept {
            format!("  (kept {})", t.source_dtype)
        } else {
            String::new()
        };
        writeln!(
            out,
            "  {:name_w$}  {:type_w$}  {:shape_w$}  {:>12} bytes{kept}",
            t.name, t.dtype, shape, t.bytes
        )?;
    }
    Ok(())
}

fn cache_clear(a: CacheClearArgs) -> Result<(), Box<dyn std::error::Error>> {
    let settings = a.model.settings()?;
    let removed = cache_api::clear(&settings, a.all)?;
    if removed.is_empty() {
        println!(
            "nothing to remove in {}",
            settings.resolved_cache_dir().display()
        );
        return Ok(());
    }
    let mut freed = 0u64;
    for (path, bytes) in &removed {
        println!("removed {} ({})", path.display(), human_bytes(*bytes));
        freed += bytes;
    }
    println!("freed {} in {} file(s)", human_bytes(freed), removed.len());
    Ok(())
}

/// Writes the Hugging Face folder, with progress.
fn synth_hf(opts: &SynthOptions) -> Result<(), Box<dyn std::error::Error>> {
    let t0 = Instant::now();
    let mut last_report = Instant::now();
    let report = synth(opts, &mut |done, total| {
        if last_report.elapsed().as_millis() >= 1000 || done == total {
            last_report = Instant::now();
            eprint!(
                "\rwriting {:.2} / {:.2} GB",
                done as f64 / 1e9,
                total as f64 / 1e9
            );
        }
    })?;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!();
    eprintln!(
        "wrote {} tensors, {:.3} B parameters, {:.2} GB in {} files to {} ({:.1} s, {:.0} MB/s)",
        report.tensors,
        report.params as f64 / 1e9,
        report.weight_bytes as f64 / 1e9,
        report.files.len(),
        opts.out.display(),
        secs,
        report.weight_bytes as f64 / 1e6 / secs.max(1e-9)
    );
    Ok(())
}

fn synth_cmd(a: SynthArgs) -> Result<(), Box<dyn std::error::Error>> {
    let opts = SynthOptions {
        arch: a.arch,
        preset: a.preset,
        layers: a.layers,
        seed: a.seed,
        out: a.out.clone(),
        shard_bytes: a.shard_bytes,
        overwrite: a.overwrite,
    };
    if !a.gguf_only {
        synth_hf(&opts)?;
    }
    if let Some(path) = &a.gguf {
        let t0 = Instant::now();
        let mut last_report = Instant::now();
        let report = synth_gguf(&opts, path, &mut |done, total| {
            if last_report.elapsed().as_millis() >= 1000 || done == total {
                last_report = Instant::now();
                eprint!(
                    "\rwriting GGUF {:.2} / {:.2} GB",
                    done as f64 / 1e9,
                    total as f64 / 1e9
                );
            }
        })?;
        eprintln!();
        eprintln!(
            "wrote {} tensors, {:.2} GB to {} ({:.1} s)",
            report.tensors,
            report.weight_bytes as f64 / 1e9,
            path.display(),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every subcommand and every flag of every subcommand says what it does in `--help`.
    #[test]
    fn every_command_and_flag_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                let has = arg
                    .get_help()
                    .is_some_and(|h| !h.to_string().trim().is_empty())
                    || arg
                        .get_long_help()
                        .is_some_and(|h| !h.to_string().trim().is_empty());
                if !has {
                    missing.push(format!("{path} --{id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_name() == "help" {
                    continue;
                }
                let p = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(format!("{p} (the command itself)"));
                }
                walk(sub, &p, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "moe-serve", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }
}
