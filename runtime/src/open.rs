//! Opening a model: the one pipeline from [`Settings`] to everything a load, a plan or a cache
//! command needs (files, config, weights, pre-quantized sources, the decoder skeleton, what each
//! expert becomes, and the dry-run quantization report), plus the cache commands built on it
//! (`moe-serve cache build|verify|info|clear`).
//!
//! [`open`] is used by [`crate::Model::load`], [`crate::plan_model`] and the cache commands
//! alike, so the three cannot disagree on how a model is located, parsed or sized.
//!
//! Invariants: opening reads headers and small files only (config.json, safetensors headers,
//! the hot-set file), never a weight byte; the quantization report is a dry run, so budgets are
//! checked (by the planner, on the report) before any weight byte is read; nothing here imports
//! the engine (it sits below it).

use std::path::{Path, PathBuf};

use crate::arch::{self, Arch};
use crate::cache::{CacheKey, CacheOptions, ProgressSink};
use crate::config::{ModelConfig, RawConfig};
use crate::error::{Error, Result};
use crate::mapguard::FileWatch;
use crate::model::ModelWeights;
use crate::plan::PlanRequest;
use crate::quantize::{quantize_model, ExpertTypes, QuantReport};
use crate::runconfig::{
    Activations, ConfigFileError, DeviceKind, ExpertsConfig, KvDtype, Quantization, RunConfig,
    SimConfig,
};
use crate::weights::{ModelFiles, WeightSet};

/// The context rule lives with the model config, below the run configuration that uses it too.
pub use crate::config::{context_tokens, DEFAULT_MAX_CONTEXT_TOKENS};

/// How to load a model: the settings of a config file (see [`RunConfig`]) as a plain struct.
#[derive(Clone, Debug)]
pub struct Settings {
    /// A folder or a Hub id in the local cache; `None` = the bundled demo model.
    pub model: Option<String>,
    /// Compute threads; `None` = all cores.
    pub threads: Option<usize>,
    /// Longest sequence (prompt + generated); `None` = min(max_position_embeddings, 4096).
    pub max_context: Option<usize>,
    pub device: DeviceKind,
    /// Device-side budget in bytes (cuda/sim).
    pub vram_budget: Option<u64>,
    /// Host-side budget in bytes; on cpu it caps everything the process holds. `None` = what
    /// the machine has available minus a margin.
    pub ram_budget: Option<u64>,
    /// Sequences served at once (sizes the KV cache in the plan); `None` = what the plan fits
    /// (see [`crate::plan::make_plan`]). Default 1: one sequence, as [`crate::Model::generate`]
    /// decodes; a run configuration without `max_batch` leaves it to the plan.
    pub max_batch: Option<usize>,
    pub kv_dtype: KvDtype,
    /// How expert weights are held in memory (quantized at load).
    pub quantization: Quantization,
    /// How resident weights are held; `None` = as `quantization`.
    pub resident_quantization: Option<Quantization>,
    /// How activations meet quantized weights (f32, or q8 with integer dot products).
    pub activations: Activations,
    /// Where learned state (expert popularity, calibration) is kept; `None` = per-user folder.
    pub state_dir: Option<PathBuf>,
    /// Persist quantized weights in `cache_dir` on the first start and map them afterwards;
    /// `false` quantizes at load on every start and holds the result in RAM.
    pub cache: bool,
    /// Folder of the quantized weight cache; `None` = the per-user cache folder.
    pub cache_dir: Option<PathBuf>,
    /// Rebuild a damaged cache (or its damaged tensors); `false` fails naming the file.
    pub cache_rebuild: bool,
    /// Called as a cache build progresses (the CLI draws a progress bar with it).
    pub cache_progress: Option<ProgressSink>,
    /// Test hook: cache builds fail writing past this many bytes.
    #[doc(hidden)]
    pub cache_fail_after_bytes: Option<u64>,
    pub experts: ExpertsConfig,
    pub sim: SimConfig,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            model: None,
            threads: None,
            max_context: None,
            device: DeviceKind::Cpu,
            vram_budget: None,
            ram_budget: None,
            max_batch: Some(1),
            kv_dtype: KvDtype::F32,
            quantization: Quantization::None,
            resident_quantization: None,
            activations: Activations::Auto,
            state_dir: None,
            cache: true,
            cache_dir: None,
            cache_rebuild: true,
            cache_progress: None,
            cache_fail_after_bytes: None,
            experts: ExpertsConfig::default(),
            sim: SimConfig::default(),
        }
    }
}

/// Choices laid over a config file (the command line's flags, or a caller's): each `Some`
/// replaces the file's value, and the result is checked by the file's own rules (one exception:
/// `threads` from a flag may exceed the file's bound; it is capped at the cores with a warning).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub model: Option<String>,
    pub device: Option<DeviceKind>,
    pub ram_budget: Option<u64>,
    pub vram_budget: Option<u64>,
    pub max_context: Option<usize>,
    pub threads: Option<usize>,
    pub max_batch: Option<usize>,
    pub quantization: Option<Quantization>,
    pub resident_quantization: Option<Quantization>,
    pub activations: Option<Activations>,
    pub cache_dir: Option<PathBuf>,
    pub cache: Option<bool>,
    pub cache_rebuild: Option<bool>,
}

impl Overrides {
    /// Lays every `Some` over `c`.
    pub fn apply(&self, c: &mut RunConfig) {
        use crate::runconfig::ByteSize;
        if let Some(m) = &self.model {
            c.model = m.clone();
        }
        set(&mut c.device, self.device);
        set_some(&mut c.ram_budget, self.ram_budget.map(ByteSize));
        set_some(&mut c.vram_budget, self.vram_budget.map(ByteSize));
        set_some(&mut c.max_context, self.max_context);
        set_some(&mut c.threads, self.threads);
        set_some(&mut c.max_batch, self.max_batch);
        set(&mut c.quantization, self.quantization);
        set_some(&mut c.resident_quantization, self.resident_quantization);
        set(&mut c.activations, self.activations);
        set_some(&mut c.cache_dir, self.cache_dir.clone());
        set(&mut c.cache, self.cache);
        set(&mut c.cache_rebuild, self.cache_rebuild);
    }

    /// The flag that set `key`, when one did (for error messages).
    fn flag_for(&self, key: &str) -> Option<&'static str> {
        [
            ("model", "--model", self.model.is_some()),
            ("device", "--device", self.device.is_some()),
            ("ram_budget", "--ram-budget", self.ram_budget.is_some()),
            ("vram_budget", "--vram-budget", self.vram_budget.is_some()),
            ("max_context", "--max-context", self.max_context.is_some()),
            ("threads", "--threads", self.threads.is_some()),
            ("max_batch", "--max-batch", self.max_batch.is_some()),
            (
                "quantization",
                "--quantization",
                self.quantization.is_some(),
            ),
            (
                "resident_quantization",
                "--resident-quantization",
                self.resident_quantization.is_some(),
            ),
            ("activations", "--activations", self.activations.is_some()),
            ("cache_dir", "--cache-dir", self.cache_dir.is_some()),
        ]
        .into_iter()
        .find(|&(k, _, set)| set && k == key)
        .map(|(_, flag, _)| flag)
    }
}

fn set<T>(field: &mut T, v: Option<T>) {
    if let Some(v) = v {
        *field = v;
    }
}

fn set_some<T>(field: &mut Option<T>, v: Option<T>) {
    if v.is_some() {
        *field = v;
    }
}

/// Settings read once: the config file (or the defaults), then the overrides laid over it, then
/// every rule checked on the result, so a flag obeys exactly what the same key in a file obeys.
pub struct Resolved {
    pub settings: Settings,
    /// The run configuration the settings came from (its `[server]` table included).
    pub config: RunConfig,
}

/// The one way settings are read (see [`Resolved`]). Without a file and without a model the
/// settings name the bundled demo model. A broken rule names the flag that set the value, or
/// else the file and key.
pub fn resolve(
    file: Option<&Path>,
    o: &Overrides,
) -> std::result::Result<Resolved, ConfigFileError> {
    // The demo model has no name in a run configuration: a stand-in passes the model rule.
    let demo = file.is_none() && o.model.is_none();
    let mut config = match file {
        Some(path) => RunConfig::from_file(path)?,
        None => RunConfig::for_model(o.model.clone().unwrap_or_else(|| "demo".into())),
    };
    // `--threads` above the cores runs on the cores with a warning (a file's `threads` is
    // bounded at MAX_THREADS); 0 is refused either way.
    if o.threads == Some(0) {
        return Err(ConfigFileError::Invalid {
            path: PathBuf::from("command line"),
            key: "--threads".into(),
            message: "must be at least 1 (got 0; leave it out to use all cores)".into(),
        });
    }
    Overrides {
        threads: None,
        ..o.clone()
    }
    .apply(&mut config);
    config.validate().map_err(|e| match o.flag_for(&e.key) {
        Some(flag) => ConfigFileError::Invalid {
            path: PathBuf::from("command line"),
            key: flag.to_string(),
            message: e.message,
        },
        None => ConfigFileError::Invalid {
            path: file.map_or_else(|| PathBuf::from("settings"), Path::to_path_buf),
            key: e.key,
            message: e.message,
        },
    })?;
    if o.threads.is_some() {
        config.threads = o.threads;
    }
    let mut settings = Settings::from_run_config(&config);
    if file.is_none() {
        // Without a file the folders stay unset: they resolve per model when used, as the
        // defaults of a file naming the same model would.
        settings.state_dir = None;
        settings.cache_dir = o.cache_dir.clone();
    }
    if demo {
        settings.model = None;
    }
    Ok(Resolved { settings, config })
}

impl Settings {
    /// The settings a config file describes.
    pub fn from_run_config(c: &RunConfig) -> Settings {
        Settings {
            model: Some(c.model.clone()),
            threads: c.threads,
            max_context: c.max_context,
            device: c.device,
            vram_budget: c.vram_budget.map(|b| b.0),
            ram_budget: c.ram_budget.map(|b| b.0),
            max_batch: c.max_batch,
            kv_dtype: c.kv_dtype,
            quantization: c.quantization,
            resident_quantization: c.resident_quantization,
            activations: c.activations,
            state_dir: Some(c.resolved_state_dir()),
            cache: c.cache,
            cache_dir: Some(c.resolved_cache_dir()),
            cache_rebuild: c.cache_rebuild,
            cache_progress: None,
            cache_fail_after_bytes: None,
            experts: c.experts.clone(),
            sim: c.sim.clone(),
        }
    }

    /// The state folder (as a config file would resolve it).
    pub fn resolved_state_dir(&self) -> PathBuf {
        match &self.state_dir {
            Some(d) => d.clone(),
            None => {
                RunConfig::for_model(self.model.clone().unwrap_or_default()).resolved_state_dir()
            }
        }
    }

    /// The cache folder (as a config file would resolve it).
    pub fn resolved_cache_dir(&self) -> PathBuf {
        match &self.cache_dir {
            Some(d) => d.clone(),
            None => {
                let model_dir = self
                    .model
                    .as_deref()
                    .map(std::path::Path::new)
                    .filter(|p| p.is_dir());
                crate::runconfig::default_cache_dir(model_dir)
            }
        }
    }

    /// How the cache is used, when it is.
    pub(crate) fn cache_options(&self) -> CacheOptions {
        CacheOptions {
            dir: self.resolved_cache_dir(),
            rebuild: self.cache_rebuild,
            progress: self.cache_progress.clone(),
            fail_after_bytes: self.cache_fail_after_bytes,
        }
    }

    /// The longest sequence: `max_context`, or min(max_position_embeddings, 4096).
    pub fn max_context_for(&self, config: &ModelConfig) -> usize {
        context_tokens(self.max_context, config.max_position_embeddings)
    }

    /// The resident weights' quantization.
    pub fn resident_quantization(&self) -> Quantization {
        self.resident_quantization.unwrap_or(self.quantization)
    }

    /// What each expert becomes: `quantization`, or the hot / cold tiers with the hot set
    /// taken from the recorded popularity (`None`: nothing recorded, every expert is cold).
    pub fn expert_types(
        &self,
        popularity: Option<&[Vec<u64>]>,
        experts_per_layer: &[usize],
    ) -> ExpertTypes {
        match self.experts.tiers(self.quantization) {
            None => ExpertTypes::Uniform(self.quantization),
            Some((hot, cold)) => ExpertTypes::Tiered {
                hot,
                cold,
                hot_set: match popularity {
                    Some(counts) => ExpertTypes::hot_set_from(counts, self.experts.hot_fraction),
                    None => experts_per_layer.iter().map(|&n| vec![false; n]).collect(),
                },
            },
        }
    }

    /// Whether any weight changes type under these settings (what a cache would hold).
    pub fn quantizes(&self, types: &ExpertTypes) -> bool {
        types.changes_anything() || self.resident_quantization() != Quantization::None
    }

    /// Whether these settings map weights from the quantized cache.
    pub fn uses_cache(&self, types: &ExpertTypes) -> bool {
        self.uses_cache_for(types, false)
    }

    /// Whether these settings map weights from the quantized cache for a model that holds
    /// pre-quantized weights (`prequant`: those are always converted, so cached too).
    pub fn uses_cache_for(&self, types: &ExpertTypes, prequant: bool) -> bool {
        self.cache && (self.quantizes(types) || prequant)
    }

    /// The planner's request; converted experts must fit RAM only when converted at load (no
    /// cache file to read them from).
    pub(crate) fn plan_request(
        &self,
        max_context: usize,
        types: &ExpertTypes,
        prequant: bool,
    ) -> Result<PlanRequest> {
        let experts_in_ram =
            !self.uses_cache_for(types, prequant) && (types.changes_anything() || prequant);
        let kv_elem_bytes = self.kv_dtype.elem_bytes();
        let device = match self.device {
            DeviceKind::Cuda => DeviceKind::Cuda,
            d => d.resolve()?,
        };
        // A GPU's free memory is the default `vram_budget`. Without a GPU here, a plan for a
        // card of `vram_budget` is still a plan (loading then says what is missing).
        let device_free_bytes = match device {
            DeviceKind::Cuda => match crate::backend::probe(0) {
                Ok(dev) => Some(dev.free_bytes),
                Err(_) if self.vram_budget.is_some() => None,
                Err(e) => return Err(e),
            },
            _ => None,
        };
        // A measured link (`calibrate` on a GPU machine) for CUDA; the stated one otherwise.
        let measured_link = match device {
            DeviceKind::Cuda => {
                crate::plan::Profile::load(&self.resolved_state_dir()).link_pinned_bytes_per_s
            }
            _ => None,
        };
        Ok(PlanRequest {
            device,
            device_free_bytes,
            vram_budget_bytes: self.vram_budget,
            ram_budget_bytes: self.ram_budget,
            max_context,
            max_batch: self.max_batch.map(|b| b.max(1)),
            slots_per_layer: self.experts.slots_per_layer,
            link_bytes_per_s: measured_link.unwrap_or(self.sim.link_gb_per_s * 1e9),
            link_measured: measured_link.is_some(),
            copy_latency_s: self.sim.copy_latency_us * 1e-6,
            loader_threads: LOADER_THREADS,
            kv_elem_bytes,
            experts_in_ram,
        })
    }
}

/// Threads that read and copy experts (I/O-bound; two keep a disk and a link busy).
pub const LOADER_THREADS: usize = 2;

/// What opening is for; it decides where the files come from and whether popularity is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Loading to generate: a folder, a Hub id or the demo; the hot set is read.
    Load,
    /// Planning: as `Load`, and also a bare `config.json` (a folder without weights, or the
    /// file itself), sized from the config alone.
    Plan,
    /// A cache command: the cache file does not depend on the hot set (it holds every tier's
    /// type), so none is read and every expert counts as cold.
    Cache,
}

/// The model's hot-set file, its fingerprint and the popularity it holds (if any).
#[derive(Clone, Debug)]
pub struct HotSet {
    pub path: PathBuf,
    pub fingerprint: String,
    pub counts: Option<Vec<Vec<u64>>>,
}

/// An opened model: everything known from its headers, before any weight byte is read.
pub struct Opened {
    pub files: ModelFiles,
    /// The bytes of config.json (they key the cache and the hot set).
    pub config_bytes: Vec<u8>,
    pub raw: RawConfig,
    pub arch: &'static Arch,
    pub config: ModelConfig,
    /// Mapped weight files, with their pre-quantized sources set (virtual when planned from a
    /// config alone).
    pub weights: WeightSet,
    /// The decoder's weights as references into `weights`, not yet quantized (the dry run
    /// only sized them).
    pub skeleton: ModelWeights,
    pub experts_per_layer: Vec<usize>,
    /// `None` when not read (`Purpose::Cache`, or sized from a config alone).
    pub hot_set: Option<HotSet>,
    /// What each expert becomes under the settings.
    pub expert_types: ExpertTypes,
    /// What quantizing would do (a dry run: sizes only).
    pub dry: QuantReport,
    /// Watches the weight files from the moment they were mapped (see [`crate::mapguard`]).
    pub files_watch: FileWatch,
    /// True when sizes come from config.json alone (no weight files).
    pub from_config_only: bool,
}

impl Opened {
    /// Whether the checkpoint holds pre-quantized weights.
    pub fn prequant(&self) -> bool {
        self.dry.prequant_tensors > 0
    }

    /// The key of this model's cache file under `settings`.
    pub fn cache_key(&self, settings: &Settings) -> CacheKey {
        CacheKey::new(
            &self.files,
            &self.config_bytes,
            &self.weights,
            &self.expert_types,
            settings.resident_quantization(),
        )
    }
}

/// Opens the model `settings.model` names for `purpose` (see [`Opened`]).
pub fn open(settings: &Settings, purpose: Purpose) -> Result<Opened> {
    let spec = settings.model.as_deref();
    if purpose == Purpose::Plan {
        if let Some(s) = spec.filter(|s| s.ends_with(".json") && Path::new(s).is_file()) {
            // A config file named directly means "plan from the config alone", even beside
            // weights.
            let p = Path::new(s);
            let dir = p
                .parent()
                .map(|d| d.to_path_buf())
                .unwrap_or_else(|| ".".into());
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            return open_inner(ModelFiles::Dir(dir), &name, settings, purpose, true);
        }
    }
    open_files(model_files(settings)?, settings, purpose)
}

/// Opens already-located files (a folder or the embedded demo) for `purpose`.
pub fn open_files(files: ModelFiles, settings: &Settings, purpose: Purpose) -> Result<Opened> {
    let config_only = purpose == Purpose::Plan
        && settings
            .model
            .as_deref()
            .is_some_and(|s| s.ends_with(".json"));
    open_inner(files, "config.json", settings, purpose, config_only)
}

fn open_inner(
    files: ModelFiles,
    config_name: &str,
    settings: &Settings,
    purpose: Purpose,
    config_only: bool,
) -> Result<Opened> {
    let (config_bytes, raw, arch, config) = read_config(&files, config_name)?;
    let has_weights = !config_only
        && (purpose != Purpose::Plan
            || files.exists("model.safetensors")
            || files.exists("model.safetensors.index.json"));
    let weights = if has_weights {
        open_weights(&files, &raw)?
    } else {
        let dtype = match raw.opt_str(&["torch_dtype", "dtype"])? {
            Some("float32") => crate::weights::Dtype::F32,
            Some("float16") => crate::weights::Dtype::F16,
            _ => crate::weights::Dtype::Bf16,
        };
        let mut w = WeightSet::virtual_set(dtype, files.label());
        w.set_prequant(crate::weights::prequant::PrequantConfig::parse(&raw)?);
        w
    };
    // Watching from here: a file changed while loading reads it fails the load.
    let files_watch = FileWatch::new(weights.files.iter().map(|f| f.path.clone()).collect());
    let mut skeleton = arch::build_decoder(&config, &weights, arch.names)?;
    let experts_per_layer: Vec<usize> = skeleton.experts.iter().map(Vec::len).collect();
    let hot_set = (purpose != Purpose::Cache && !weights.is_virtual()).then(|| {
        read_hot_set(
            &settings.resolved_state_dir(),
            &config_bytes,
            &weights,
            &experts_per_layer,
        )
    });
    let expert_types = settings.expert_types(
        hot_set.as_ref().and_then(|h| h.counts.as_deref()),
        &experts_per_layer,
    );
    let dry = quantize_model(
        &mut skeleton,
        &expert_types,
        settings.resident_quantization(),
        true,
    )?;
    Ok(Opened {
        files,
        config_bytes,
        raw,
        arch,
        config,
        weights,
        skeleton,
        experts_per_layer,
        hot_set,
        expert_types,
        dry,
        files_watch,
        from_config_only: !has_weights,
    })
}

/// Reads and checks the config file `name`: its bytes, the parsed file, the architecture and
/// its config.
fn read_config(
    files: &ModelFiles,
    name: &str,
) -> Result<(Vec<u8>, RawConfig, &'static Arch, ModelConfig)> {
    let cfg_bytes = files
        .read_small(name)?
        .ok_or_else(|| Error::ModelNotFound {
            spec: files.label(),
            reason: format!("no {name}"),
        })?;
    let raw = RawConfig::parse(files.path_of(name), &cfg_bytes)?;
    let arch = arch::lookup(&raw)?;
    let config = (arch.parse_config)(&raw)?;
    // Refuses a pre-quantized format this build cannot read, naming it.
    crate::weights::prequant::PrequantConfig::parse(&raw)?;
    config.validate(&raw)?;
    Ok((cfg_bytes, raw, arch, config))
}

/// Opens a model's weight files, reading pre-quantized weights as `quantization_config` says.
fn open_weights(files: &ModelFiles, raw: &RawConfig) -> Result<WeightSet> {
    let mut weights = WeightSet::open(files)?;
    weights.set_prequant(crate::weights::prequant::PrequantConfig::parse(raw)?);
    Ok(weights)
}

/// The model's hot-set file, its fingerprint and the popularity it holds (if any).
fn read_hot_set(
    state_dir: &Path,
    cfg_bytes: &[u8],
    weights: &WeightSet,
    experts_per_layer: &[usize],
) -> HotSet {
    let fingerprint = crate::hotset::fingerprint(cfg_bytes, weights);
    let path = crate::hotset::path(state_dir, &fingerprint);
    let counts = crate::hotset::load(&path, &fingerprint, experts_per_layer);
    HotSet {
        path,
        fingerprint,
        counts,
    }
}

/// The files `settings.model` names (the demo model when none).
pub fn model_files(settings: &Settings) -> Result<ModelFiles> {
    Ok(match &settings.model {
        None => crate::demo::files(),
        Some(spec) => ModelFiles::Dir(crate::hub::resolve(spec)?),
    })
}

/// The cache commands of the embedded API (`moe-serve cache build|verify|info|clear`) for the
/// model a [`Settings`] names: each opens the model's headers only, never its weights, except
/// to build. The work on the cache file itself is [`crate::cache::api`]'s.
pub mod cache_cmd {
    use std::path::PathBuf;

    use super::{model_files, open, Purpose, Settings};
    use crate::cache::api::{build_plan, clear_dir, verify_plan};
    pub use crate::cache::api::{info, BuildOutcome, CacheInfo, TensorRow, VerifyReport};
    use crate::cache::CachePlan;
    use crate::error::{Error, Result};

    /// The cache plan of the model `settings` name (path, tensors), from its headers.
    pub fn plan_for(settings: &Settings) -> Result<CachePlan> {
        let mut o = open(settings, Purpose::Cache)?;
        if !settings.quantizes(&o.expert_types) && !o.prequant() {
            return Err(Error::InvalidRequest(
                "quantization = \"none\": nothing is quantized, so nothing is cached (set quantization, e.g. \"q8_0\")".into(),
            ));
        }
        let key = o.cache_key(settings);
        CachePlan::new(
            &mut o.skeleton,
            key,
            &o.expert_types,
            settings.cache_options(),
        )
    }

    /// Builds the cache of the model `settings` name, unless an intact one exists (`force`
    /// rebuilds it anyway).
    pub fn build(settings: &Settings, force: bool) -> Result<BuildOutcome> {
        build_plan(&plan_for(settings)?, force)
    }

    /// Reads the whole cache file of the model `settings` name and checks every checksum, and
    /// hashes every weight file of the model again to check the cache was built from its bytes.
    pub fn verify(settings: &Settings) -> Result<VerifyReport> {
        verify_plan(&plan_for(settings)?)
    }

    /// Removes the cache files of the model `settings` name (every quantization, fingerprint
    /// and version built from its folder), or with `all` every cache file in `cache_dir`, with
    /// their lock and temporary files. Returns each removed cache file and its size.
    pub fn clear(settings: &Settings, all: bool) -> Result<Vec<(PathBuf, u64)>> {
        let source = if all {
            None
        } else {
            Some(crate::cache::source_of(&model_files(settings)?))
        };
        clear_dir(&settings.resolved_cache_dir(), source.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::KvElem;

    /// Settings for the demo model that quantize, with state and cache in `dir`.
    fn demo_settings(dir: &Path) -> Settings {
        Settings {
            quantization: Quantization::Q8_0,
            state_dir: Some(dir.join("state")),
            cache_dir: Some(dir.join("cache")),
            ..Settings::default()
        }
    }

    #[test]
    fn flags_lay_over_the_file_and_obey_its_rules() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("run.toml");
        std::fs::write(
            &file,
            "model = \"org/name\"\nthreads = 4\nmax_context = 512\n",
        )
        .unwrap();
        // No override: the file's values.
        let r = resolve(Some(&file), &Overrides::default()).unwrap();
        assert_eq!(
            (r.settings.threads, r.settings.max_context),
            (Some(4), Some(512))
        );
        assert_eq!(r.settings.model.as_deref(), Some("org/name"));
        // An override wins; what it does not name stays the file's.
        let o = Overrides {
            threads: Some(2),
            quantization: Some(Quantization::Q8_0),
            cache: Some(false),
            ..Default::default()
        };
        let r = resolve(Some(&file), &o).unwrap();
        assert_eq!(
            (r.settings.threads, r.settings.max_context),
            (Some(2), Some(512))
        );
        assert_eq!(r.settings.quantization, Quantization::Q8_0);
        assert!(!r.settings.cache);
        assert_eq!(r.config.threads, Some(2));
        // A broken rule names the flag when a flag set the value...
        let o = Overrides {
            max_batch: Some(0),
            ..Default::default()
        };
        let e = resolve(Some(&file), &o).err().unwrap().to_string();
        assert!(
            e.contains("command line") && e.contains("--max-batch"),
            "{e}"
        );
        // ...and without a file, the demo model is the default.
        let r = resolve(None, &Overrides::default()).unwrap();
        assert_eq!(r.settings.model, None);
        assert_eq!(r.settings.state_dir, None);
        let o = Overrides {
            model: Some("org/other".into()),
            ..Default::default()
        };
        assert_eq!(
            resolve(None, &o).unwrap().settings.model.as_deref(),
            Some("org/other")
        );
    }

    #[test]
    fn every_purpose_opens_the_same_model_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = demo_settings(dir.path());
        let load = open(&s, Purpose::Load).unwrap();
        let plan = open(&s, Purpose::Plan).unwrap();
        let cache = open(&s, Purpose::Cache).unwrap();
        for o in [&plan, &cache] {
            assert_eq!(o.config_bytes, load.config_bytes);
            assert_eq!(o.config.hidden_size, load.config.hidden_size);
            assert_eq!(o.experts_per_layer, load.experts_per_layer);
            assert_eq!(o.dry, load.dry);
            assert!(!o.from_config_only);
            assert_eq!(o.files.label(), load.files.label());
        }
        assert!(load.dry.quantized_tensors > 0, "q8_0 quantizes the demo");
        // Loading and planning read the (absent) hot set; a cache command never does.
        assert!(load.hot_set.as_ref().is_some_and(|h| h.counts.is_none()));
        assert!(plan.hot_set.is_some());
        assert!(cache.hot_set.is_none());
        // Opening reads headers only: no cache file, no state.
        assert!(!dir.path().join("cache").exists());
        assert!(!dir.path().join("state").exists());
        let (a, b) = (load.cache_key(&s), cache.cache_key(&s));
        assert_eq!(
            (a.fingerprint, a.expert_types, a.resident),
            (b.fingerprint, b.expert_types, b.resident)
        );
    }

    #[test]
    fn a_named_config_file_plans_from_the_config_alone() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::demo::files()
            .read_small("config.json")
            .unwrap()
            .unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, &cfg).unwrap();
        let mut s = demo_settings(dir.path());
        s.model = Some(path.to_string_lossy().into_owned());
        let plan = open(&s, Purpose::Plan).unwrap();
        assert!(plan.from_config_only);
        assert!(plan.weights.is_virtual());
        assert!(plan.hot_set.is_none());
        // Loading needs the weights: the same folder without them is refused.
        s.model = Some(dir.path().to_string_lossy().into_owned());
        assert!(open(&s, Purpose::Load).is_err());
        // Planning the folder also sizes from its config alone.
        assert!(open(&s, Purpose::Plan).unwrap().from_config_only);
    }

    #[test]
    fn nothing_quantized_is_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let s = Settings {
            quantization: Quantization::None,
            ..demo_settings(dir.path())
        };
        let e = cache_cmd::plan_for(&s).err().expect("nothing to cache");
        assert!(e.to_string().contains("nothing is cached"), "{e}");
    }

    /// The cache module sits below the engine and the opening pipeline: its commands' file
    /// work must not import them back.
    #[test]
    fn the_cache_commands_do_not_import_the_engine_or_this_module() {
        let src = include_str!("cache/api.rs");
        for (n, line) in src.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for upward in ["crate::engine", "crate::open", "Settings"] {
                assert!(
                    !code.contains(upward),
                    "cache/api.rs:{}: `{upward}` is an upward import: {line}",
                    n + 1
                );
            }
        }
    }

    #[test]
    fn kv_dtype_is_the_kv_cache_element_type() {
        let c = RunConfig::for_model("m");
        let elem: KvElem = c.kv_dtype;
        assert_eq!(elem, KvElem::F32);
        for (name, kv, bytes) in [
            ("f32", KvElem::F32, 4),
            ("bf16", KvElem::Bf16, 2),
            ("f16", KvElem::F16, 2),
        ] {
            let parsed: KvDtype = serde_json::from_str(&format!("\"{name}\"")).unwrap();
            assert_eq!(parsed, kv);
            assert_eq!(kv.elem_bytes(), bytes);
            let s = Settings {
                kv_dtype: kv,
                ..Settings::default()
            };
            let types = s.expert_types(None, &[]);
            assert_eq!(
                s.plan_request(8, &types, false).unwrap().kv_elem_bytes,
                bytes
            );
        }
    }
}
