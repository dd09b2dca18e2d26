//! The preflight planner: where every byte of a model will live, decided from the architecture's
//! tensor map and the file headers only, before anything is loaded.
//!
//! Sizes come from building the decoder over a [`WeightSet`] (real headers, or size-only tensors
//! for a bare config.json): the architecture file is the one place that knows tensor names and
//! shapes, and the planner never repeats that arithmetic.
//!
//! Invariants: a plan that cannot fit is an error naming the budget, the bytes needed and what to
//! change; planning never reads weight bytes and never runs a measurement; fewer device slots than
//! `top_k` is a warning, never a refusal.

use std::path::Path;

use crate::config::ModelConfig;
use crate::error::{BudgetNeed, Error, Result};
use crate::model::ModelWeights;
use crate::store::{DeviceTierConfig, HostTierConfig};
use crate::weights::WeightSet;

/// Process memory outside the budgets (code, tokenizer, thread stacks, activations, allocator
/// slack). The RAM budget promise is "budget + at most this".
pub const FIXED_OVERHEAD_BYTES: u64 = 256 << 20;

/// Margin kept free when a budget is taken from what the machine has available.
pub const AUTO_BUDGET_MARGIN_BYTES: u64 = 1 << 30;
/// Left free on a GPU when `vram_budget` is not set: the CUDA context, library workspaces and
/// allocator slack (the CUDA context alone is ~0.5 GiB on current drivers).
pub const VRAM_MARGIN_BYTES: u64 = 1 << 30;
/// Device memory a CUDA step needs besides weights, caches and slots: a prefill chunk's
/// activations (512 x hidden x 4 B: a few MiB), its attention scores (32 heads x 512 x 512 x 4 B
/// = 32 MiB) and the cuBLAS workspace (32 MiB), rounded up (a bound until measured on a GPU).
pub const DEVICE_SCRATCH_BYTES: u64 = 256 << 20;

pub use crate::backend::DeviceKind as Device;

fn device_name(d: Device) -> &'static str {
    match d {
        Device::Cpu => "cpu",
        Device::Cuda => "cuda",
        Device::Sim => "sim",
        Device::Auto => "auto",
    }
}

/// Bandwidths the estimate uses, bytes per second. `moe-serve calibrate` measures them.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Profile {
    /// Host compute over weights in RAM (matvec streaming), bytes/s.
    pub ram_compute_bytes_per_s: f64,
    /// Reading expert bytes from model files (cold), bytes/s.
    pub file_read_bytes_per_s: f64,
    /// Device compute over weights in device memory, bytes/s.
    pub device_compute_bytes_per_s: f64,
    /// Host-to-device copies from pinned memory (the expert copy path), bytes/s, where a GPU
    /// was measured; the CUDA plan assumes it for the link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_pinned_bytes_per_s: Option<f64>,
    /// Host-to-device copies from pageable memory, bytes/s, where a GPU was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_pageable_bytes_per_s: Option<f64>,
    /// Where the numbers come from ("defaults" or the calibration's date).
    pub source: String,
}

impl Default for Profile {
    fn default() -> Self {
        // Stated defaults: a 2-channel DDR4/5 server core pair, an NVMe SSD, an H100-class GPU.
        Profile {
            ram_compute_bytes_per_s: 20e9,
            file_read_bytes_per_s: 2e9,
            device_compute_bytes_per_s: 2000e9,
            link_pinned_bytes_per_s: None,
            link_pageable_bytes_per_s: None,
            source: "defaults".into(),
        }
    }
}

impl Profile {
    /// The profile saved by `calibrate` in `state_dir`, or the defaults (a damaged file is
    /// ignored with a warning).
    pub fn load(state_dir: &Path) -> Profile {
        let path = state_dir.join("profile.json");
        match std::fs::read(&path) {
            Ok(b) => match serde_json::from_slice::<Profile>(&b) {
                Ok(p) if p.ram_compute_bytes_per_s > 0.0 && p.file_read_bytes_per_s > 0.0 => p,
                _ => {
                    tracing::warn!("{}: unreadable profile, using defaults", path.display());
                    Profile::default()
                }
            },
            Err(_) => Profile::default(),
        }
    }
}

/// What the user asked for (budgets and shape of the workload).
#[derive(Clone, Debug, PartialEq)]
pub struct PlanRequest {
    pub device: Device,
    pub vram_budget_bytes: Option<u64>,
    pub ram_budget_bytes: Option<u64>,
    pub max_context: usize,
    /// Sequences to size the KV cache for; `None`: the most the plan fits (see [`make_plan`]).
    pub max_batch: Option<usize>,
    pub slots_per_layer: Option<usize>,
    pub link_bytes_per_s: f64,
    /// Whether `link_bytes_per_s` was measured (`calibrate` on a GPU) rather than stated.
    pub link_measured: bool,
    pub copy_latency_s: f64,
    pub loader_threads: usize,
    /// Bytes per KV element.
    pub kv_elem_bytes: u64,
    /// Every expert must be held in RAM (quantized at load with `cache = false`: there is no
    /// file to read them from).
    pub experts_in_ram: bool,
    /// Free memory of the GPU (`device = "cuda"`, probed; `None` without one): the default
    /// `vram_budget` is this minus [`VRAM_MARGIN_BYTES`].
    pub device_free_bytes: Option<u64>,
}

/// Sizes of a model, from its tensor map.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ModelSizes {
    /// Everything but the experts: attention, norms, embeddings, routers, shared experts, dense MLPs.
    pub resident_bytes: u64,
    /// Bytes of one expert (the largest, if they differ).
    pub expert_bytes: u64,
    pub total_expert_bytes: u64,
    pub moe_layers: usize,
    pub experts_per_layer: usize,
    pub top_k: usize,
    /// KV bytes per token of context (attention layers only).
    pub kv_bytes_per_token: u64,
    /// Bytes of fixed-size recurrent state per sequence (linear-attention layers), whatever
    /// its length.
    pub state_bytes_per_sequence: u64,
    /// Resident bytes read per decoded token (all but the embedding table).
    pub resident_read_per_token_bytes: u64,
}

impl ModelSizes {
    /// Sizes of a built (not yet quantized) model; `quant` is the dry run of the quantization
    /// it will get, whose savings are taken off.
    pub fn measure(
        cfg: &ModelConfig,
        w: &WeightSet,
        mw: &ModelWeights,
        kv_elem_bytes: u64,
        quant: &crate::quantize::QuantReport,
    ) -> ModelSizes {
        let experts: Vec<&crate::store::ExpertWeights> = mw.experts.iter().flatten().collect();
        let source_expert_bytes: u64 = experts.iter().map(|e| e.size_bytes() as u64).sum();
        // The scales and tables beside pre-quantized experts' codes: read while converting,
        // never held.
        let expert_aux_bytes: u64 = experts
            .iter()
            .flat_map(|e| &e.parts)
            .map(|t| t.prequant_aux_bytes())
            .sum();
        let total_expert_bytes = (source_expert_bytes + quant.expert_added_bytes)
            .saturating_sub(quant.expert_saved_bytes);
        // Experts of one model share shapes and types: scale the largest by the same ratio.
        let expert_bytes = experts
            .iter()
            .map(|e| e.size_bytes() as u64)
            .max()
            .unwrap_or(0);
        let expert_bytes = if source_expert_bytes > 0 {
            (expert_bytes as u128 * total_expert_bytes as u128 / source_expert_bytes as u128) as u64
        } else {
            0
        };
        let resident_bytes = (w.used_bytes() + quant.resident_added_bytes)
            .saturating_sub(source_expert_bytes + expert_aux_bytes)
            .saturating_sub(quant.resident_saved_bytes);
        let embed_bytes = mw.embed.size_bytes() as u64;
        // Tied embeddings: the output projection reads the whole table every token.
        let tied = cfg.tie_word_embeddings;
        let attention_layers = cfg
            .mixers
            .iter()
            .filter(|m| **m == crate::config::MixerKind::Attention)
            .count();
        ModelSizes {
            resident_bytes,
            expert_bytes,
            total_expert_bytes,
            moe_layers: mw.experts.iter().filter(|e| !e.is_empty()).count(),
            experts_per_layer: mw.experts.iter().map(Vec::len).max().unwrap_or(0),
            top_k: cfg.router.top_k,
            kv_bytes_per_token: (attention_layers * cfg.kv_values_per_token()) as u64
                * kv_elem_bytes,
            state_bytes_per_sequence: match cfg.linear_attention {
                Some(la) => ((cfg.num_layers - attention_layers) * la.state_floats() * 4) as u64,
                None => 0,
            },
            resident_read_per_token_bytes: if tied {
                resident_bytes
            } else {
                resident_bytes.saturating_sub(embed_bytes)
            },
        }
    }
}

/// The decided placement.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Plan {
    pub device: Device,
    pub sizes: ModelSizes,
    /// Sequences served at once: `max_batch` as set, or what the plan chose for an unset one.
    pub max_batch: usize,
    /// Whether `max_batch` was chosen by the plan (no `max_batch` set).
    pub max_batch_auto: bool,
    pub kv_bytes: u64,
    /// Device-side budget and use (GPU / sim).
    pub vram_budget_bytes: Option<u64>,
    pub vram_used_bytes: u64,
    /// Host-to-device copy rate the estimates assume, bytes/s (device plans only; the
    /// `[sim] link_gb_per_s` setting until a GPU's copies are measured).
    pub link_bytes_per_s: Option<f64>,
    /// Whether the link rate was measured (`calibrate`) rather than stated (`[sim]`).
    pub link_measured: bool,
    pub ram_budget_bytes: u64,
    /// Whether the RAM budget came from the machine (no `ram_budget` key).
    pub ram_budget_auto: bool,
    pub ram_used_bytes: u64,
    pub slots_per_layer: usize,
    pub device_experts: usize,
    pub ram_experts: usize,
    pub file_experts: usize,
    /// Buffers for experts in flight (loads and computations), counted in the host budget.
    pub transient_bytes: u64,
    pub hit_rate_low: f64,
    pub hit_rate_high: f64,
    pub decode_tokens_per_s_low: f64,
    pub decode_tokens_per_s_high: f64,
    pub profile_source: String,
    pub warnings: Vec<String>,
}

impl Plan {
    /// The expert store configuration this plan implies.
    pub fn host_tier(&self) -> HostTierConfig {
        let total = self.sizes.moe_layers * self.sizes.experts_per_layer;
        if self.ram_experts >= total {
            HostTierConfig::Mapped
        } else {
            HostTierConfig::Pool {
                experts: self.ram_experts,
            }
        }
    }

    pub fn device_tier(&self, req: &PlanRequest, profile: &Profile) -> Option<DeviceTierConfig> {
        match self.device {
            Device::Cpu | Device::Auto => None,
            Device::Sim | Device::Cuda => Some(DeviceTierConfig {
                slots_per_layer: self.slots_per_layer,
                link_bytes_per_s: req.link_bytes_per_s,
                copy_latency: std::time::Duration::from_secs_f64(req.copy_latency_s),
                host_compute_bytes_per_s: profile.ram_compute_bytes_per_s,
            }),
        }
    }

    /// A one-screen human summary.
    pub fn render(&self) -> String {
        let gib = gb;
        let s = &self.sizes;
        let total = s.moe_layers * s.experts_per_layer;
        let mut out = String::new();
        use std::fmt::Write as _;
        let _ = writeln!(out, "device: {}", device_name(self.device));
        let _ = writeln!(
            out,
            "resident set: {} (attention, norms, embeddings, routers, shared/dense MLPs)",
            gib(s.resident_bytes)
        );
        if s.state_bytes_per_sequence > 0 {
            let _ = writeln!(
                out,
                "KV cache + recurrent state: {} (max_context x max_batch {}{}; {} of \
                 linear-attention state per sequence)",
                gib(self.kv_bytes),
                self.max_batch,
                if self.max_batch_auto {
                    ", chosen by the plan"
                } else {
                    ""
                },
                gib(s.state_bytes_per_sequence)
            );
        } else {
            let _ = writeln!(
                out,
                "KV cache: {} (max_context x max_batch {}{})",
                gib(self.kv_bytes),
                self.max_batch,
                if self.max_batch_auto {
                    ", chosen by the plan"
                } else {
                    ""
                }
            );
        }
        let _ = writeln!(
            out,
            "experts: {} layers x {} = {} experts of {}, top-{} ({} in all)",
            s.moe_layers,
            s.experts_per_layer,
            total,
            gb(s.expert_bytes),
            s.top_k,
            gib(s.total_expert_bytes)
        );
        if let Some(v) = self.vram_budget_bytes {
            let _ = writeln!(
                out,
                "device: {} of {} budget; {} slots per layer ({} experts)",
                gib(self.vram_used_bytes),
                gib(v),
                self.slots_per_layer,
                self.device_experts
            );
        }
        if let Some(link) = self.link_bytes_per_s {
            let _ = writeln!(
                out,
                "link: {:.1} GB/s host to device {}",
                link / 1e9,
                if self.link_measured {
                    "measured (calibrate, pinned copies)"
                } else {
                    "assumed ([sim] link_gb_per_s)"
                }
            );
        }
        let _ = writeln!(
            out,
            "RAM: {} of {} budget{}; {} experts in RAM, {} read from files",
            gib(self.ram_used_bytes),
            gib(self.ram_budget_bytes),
            if self.ram_budget_auto {
                " (from free memory)"
            } else {
                ""
            },
            self.ram_experts,
            self.file_experts
        );
        let _ = writeln!(
            out,
            "expected hit rate {:.0}%..{:.0}%; decode {:.2}..{:.2} tokens/s ({} bandwidths)",
            self.hit_rate_low * 100.0,
            self.hit_rate_high * 100.0,
            self.decode_tokens_per_s_low,
            self.decode_tokens_per_s_high,
            self.profile_source
        );
        for w in &self.warnings {
            let _ = writeln!(out, "warning: {w}");
        }
        out
    }
}

/// Memory the machine has available now (Linux `MemAvailable`), bytes.
pub fn available_memory_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn gb(b: u64) -> String {
    crate::size::ByteSize(b).to_string()
}

/// Most sequences an unset `max_batch` plans for: concurrent users of one host are served
/// together, and a step's cost stays dominated by its expert reads, which the sequences share.
pub const AUTO_MAX_BATCH: usize = 8;

/// Share of the one-sequence plan's expert residency (experts in RAM, device slots per layer)
/// that a plan-chosen batch may give up to its KV cache: a few percent of hits buys concurrent
/// users, more would slow every step.
const AUTO_BATCH_EXPERT_LOSS: f64 = 0.05;

/// Decides the placement or explains why it cannot fit. With `max_batch` unset it also chooses
/// the batch: the most sequences, up to [`AUTO_MAX_BATCH`], whose KV caches fit while the
/// plan keeps at least 95% of the experts in RAM and of the device slots that one sequence's
/// plan has and adds no warning; one sequence if no larger batch does (its errors are the
/// ones reported).
pub fn make_plan(sizes: &ModelSizes, req: &PlanRequest, profile: &Profile) -> Result<Plan> {
    let Some(batch) = req.max_batch else {
        let one = plan_for_batch(sizes, req, profile, 1, true)?;
        let keeps = |p: &Plan| {
            let kept =
                |got: usize, had: usize| got as f64 >= had as f64 * (1.0 - AUTO_BATCH_EXPERT_LOSS);
            kept(p.ram_experts, one.ram_experts)
                && kept(p.slots_per_layer, one.slots_per_layer)
                && p.warnings.len() <= one.warnings.len()
        };
        for b in (2..=AUTO_MAX_BATCH).rev() {
            if let Ok(p) = plan_for_batch(sizes, req, profile, b, true) {
                if keeps(&p) {
                    return Ok(p);
                }
            }
        }
        return Ok(one);
    };
    plan_for_batch(sizes, req, profile, batch, false)
}

/// The placement for `batch` sequences (`auto`: the batch was chosen by [`make_plan`]).
fn plan_for_batch(
    sizes: &ModelSizes,
    req: &PlanRequest,
    profile: &Profile,
    batch: usize,
    auto: bool,
) -> Result<Plan> {
    let mut warnings = Vec::new();
    let total_experts = sizes.moe_layers * sizes.experts_per_layer;
    // Checked: `max_context` and `max_batch` may come from flags, and a product that wraps
    // would plan a KV cache far too small.
    let kv_bytes = sizes
        .kv_bytes_per_token
        .checked_mul(req.max_context as u64)
        .and_then(|b| b.checked_add(sizes.state_bytes_per_sequence))
        .and_then(|b| b.checked_mul(batch as u64))
        .ok_or_else(|| {
            Error::Unplannable(format!(
                "max_context {} x max_batch {} sequences of KV cache ({} bytes per token) is \
                 beyond any memory: lower max_context or max_batch",
                req.max_context, batch, sizes.kv_bytes_per_token
            ))
        })?;
    // Experts in flight: one per loader thread plus one being computed (and one being copied
    // into a device slot).
    let transient_bytes = if total_experts > 0 {
        (req.loader_threads as u64 + 2) * sizes.expert_bytes
    } else {
        0
    };
    let (ram_budget, ram_auto) = match req.ram_budget_bytes {
        Some(b) => (b, false),
        None => {
            let avail = available_memory_bytes().unwrap_or(8 << 30);
            (
                avail.saturating_sub(AUTO_BUDGET_MARGIN_BYTES + FIXED_OVERHEAD_BYTES),
                true,
            )
        }
    };
    let ram_key = if ram_auto {
        "the free memory (no ram_budget set)"
    } else {
        "ram_budget"
    };
    // Worth suggesting a smaller context when the KV cache is a large share of what is needed.
    let context_hint = |kv: u64| {
        if kv.saturating_mul(4) > sizes.resident_bytes.saturating_add(kv) {
            format!(", a smaller max_context (the KV cache takes {})", gb(kv))
        } else {
            String::new()
        }
    };

    let vram_budget = match (req.device, req.vram_budget_bytes, req.device_free_bytes) {
        (Device::Cpu | Device::Auto, _, _) => None,
        (_, Some(v), _) => Some(v),
        (Device::Cuda, None, Some(free)) => Some(free.saturating_sub(VRAM_MARGIN_BYTES)),
        (Device::Cuda, None, None) => {
            return Err(Error::Unplannable(
                "device = \"cuda\" without a GPU to measure needs vram_budget (the \
                 card's memory to plan for), e.g. vram_budget = \"22GiB\""
                    .into(),
            ))
        }
        _ => {
            return Err(Error::Unplannable(
                "device = \"sim\" needs vram_budget (the simulated GPU's memory), e.g. vram_budget = \"8GiB\"".into(),
            ))
        }
    };
    let (vram_used, slots, device_experts, host_fixed) = match req.device {
        Device::Cpu => (
            0,
            0,
            0,
            sizes
                .resident_bytes
                .saturating_add(kv_bytes)
                .saturating_add(transient_bytes),
        ),
        Device::Auto => {
            return Err(Error::Internal(
                "device = \"auto\" reached the planner unresolved (Settings::plan_request \
                 resolves it)"
                    .into(),
            ))
        }
        Device::Sim | Device::Cuda => {
            let vram = vram_budget.unwrap_or_default();
            // A real GPU also needs room for a step's activations and workspaces.
            let scratch = if req.device == Device::Cuda {
                DEVICE_SCRATCH_BYTES
            } else {
                0
            };
            let fixed = sizes
                .resident_bytes
                .saturating_add(kv_bytes)
                .saturating_add(scratch);
            if fixed > vram {
                return Err(Error::BudgetExceeded {
                    budget: "vram_budget",
                    needed_bytes: fixed,
                    limit_bytes: vram,
                    need: BudgetNeed::DeviceResident {
                        detail: if scratch > 0 {
                            format!(
                                "{} weights + {} KV cache + {} scratch",
                                gb(sizes.resident_bytes),
                                gb(kv_bytes),
                                gb(scratch)
                            )
                        } else {
                            format!(
                                "{} weights + {} KV cache",
                                gb(sizes.resident_bytes),
                                gb(kv_bytes)
                            )
                        },
                    },
                    remedy: format!(
                        "raise vram_budget{}, or use a quantized cache",
                        context_hint(kv_bytes)
                    ),
                });
            }
            let per_slot_row = sizes.expert_bytes * sizes.moe_layers as u64;
            let fit = (vram - fixed).checked_div(per_slot_row).unwrap_or(0) as usize;
            let slots = match req.slots_per_layer {
                Some(s) if s > fit => {
                    return Err(Error::BudgetExceeded {
                        budget: "vram_budget",
                        needed_bytes: (s as u64).saturating_mul(per_slot_row),
                        limit_bytes: vram,
                        need: BudgetNeed::DeviceSlots {
                            slots: s,
                            free_bytes: vram - fixed,
                        },
                        remedy: format!("at most {fit} slots fit"),
                    })
                }
                Some(s) => s,
                None => fit,
            }
            .min(sizes.experts_per_layer);
            (
                fixed + slots as u64 * per_slot_row,
                slots,
                slots * sizes.moe_layers,
                transient_bytes,
            )
        }
    };
    if host_fixed > ram_budget {
        let what = if req.device == Device::Cpu {
            format!(
                "{} resident weights + {} KV cache + {} expert buffers",
                gb(sizes.resident_bytes),
                gb(kv_bytes),
                gb(transient_bytes)
            )
        } else {
            format!("{} expert buffers", gb(transient_bytes))
        };
        return Err(Error::BudgetExceeded {
            budget: ram_key,
            needed_bytes: host_fixed,
            limit_bytes: ram_budget,
            need: BudgetNeed::HostResident { detail: what },
            remedy: format!(
                "raise ram_budget{}, or use a quantized cache",
                context_hint(kv_bytes)
            ),
        });
    }
    let ram_experts = (ram_budget - host_fixed)
        .checked_div(sizes.expert_bytes)
        .map_or(0, |n| (n as usize).min(total_experts));
    let file_experts = total_experts - ram_experts.min(total_experts);
    if req.experts_in_ram && file_experts > 0 {
        return Err(Error::BudgetExceeded {
            budget: ram_key,
            needed_bytes: sizes.total_expert_bytes + host_fixed,
            limit_bytes: ram_budget,
            need: BudgetNeed::QuantizedExperts {
                fit: ram_experts,
                total: total_experts,
            },
            remedy: "raise ram_budget, set cache = true (experts then stream from the cache \
                     file) or use quantization = \"none\""
                .into(),
        });
    }
    if matches!(req.device, Device::Sim | Device::Cuda) && slots < sizes.top_k && total_experts > 0
    {
        warnings.push(format!(
            "{slots} device slots per layer is fewer than top_k = {}: experts run in waves or where they lie",
            sizes.top_k
        ));
    }
    if req.device == Device::Cpu && file_experts > 0 && ram_experts < sizes.top_k {
        warnings.push(format!(
            "only {ram_experts} experts fit in RAM, fewer than top_k = {}: every token reads experts from the files",
            sizes.top_k
        ));
    }
    let ram_used = host_fixed + ram_experts as u64 * sizes.expert_bytes;

    // Hit rates: the fastest tier's share of experts under uniform routing (low) and under
    // routing concentrated on the cached experts (high).
    let cached = if req.device == Device::Cpu {
        ram_experts
    } else {
        device_experts
    };
    let (hit_low, hit_high) = if total_experts == 0 {
        (1.0, 1.0)
    } else {
        let frac = cached as f64 / total_experts as f64;
        let per_layer = cached as f64 / sizes.moe_layers.max(1) as f64;
        (
            frac,
            (per_layer / sizes.top_k.max(1) as f64).min(1.0).max(frac),
        )
    };
    let expert_traffic = (sizes.top_k * sizes.moe_layers) as u64 * sizes.expert_bytes;
    let tps = |hit: f64| -> f64 {
        let miss_bytes = expert_traffic as f64 * (1.0 - hit);
        let hit_bytes = expert_traffic as f64 * hit;
        let secs = match req.device {
            Device::Cpu => {
                (sizes.resident_read_per_token_bytes as f64 + hit_bytes)
                    / profile.ram_compute_bytes_per_s
                    + miss_bytes
                        / profile
                            .file_read_bytes_per_s
                            .min(profile.ram_compute_bytes_per_s)
            }
            _ => {
                let host_side = if ram_experts >= total_experts {
                    req.link_bytes_per_s
                } else {
                    req.link_bytes_per_s.min(profile.file_read_bytes_per_s)
                };
                (sizes.resident_read_per_token_bytes as f64 + hit_bytes)
                    / profile.device_compute_bytes_per_s
                    + miss_bytes / host_side
            }
        };
        if secs > 0.0 {
            1.0 / secs
        } else {
            0.0
        }
    };
    Ok(Plan {
        device: req.device,
        sizes: sizes.clone(),
        max_batch: batch,
        max_batch_auto: auto,
        kv_bytes,
        vram_budget_bytes: vram_budget,
        vram_used_bytes: vram_used,
        link_bytes_per_s: vram_budget.map(|_| req.link_bytes_per_s),
        link_measured: req.link_measured,
        ram_budget_bytes: ram_budget,
        ram_budget_auto: ram_auto,
        ram_used_bytes: ram_used,
        slots_per_layer: slots,
        device_experts,
        ram_experts,
        file_experts,
        transient_bytes,
        hit_rate_low: hit_low,
        hit_rate_high: hit_high,
        decode_tokens_per_s_low: tps(hit_low),
        decode_tokens_per_s_high: tps(hit_high),
        profile_source: profile.source.clone(),
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes() -> ModelSizes {
        ModelSizes {
            resident_bytes: 1 << 30,
            expert_bytes: 10 << 20,
            total_expert_bytes: 24 * 64 * (10 << 20),
            moe_layers: 24,
            experts_per_layer: 64,
            top_k: 8,
            kv_bytes_per_token: 24 * 2 * 4 * 128 * 4,
            state_bytes_per_sequence: 0,
            resident_read_per_token_bytes: (1 << 30) - (100 << 20),
        }
    }

    fn req(device: Device) -> PlanRequest {
        PlanRequest {
            device,
            vram_budget_bytes: Some(4 << 30),
            ram_budget_bytes: Some(6 << 30),
            max_context: 4096,
            max_batch: Some(1),
            slots_per_layer: None,
            link_bytes_per_s: 25e9,
            link_measured: false,
            copy_latency_s: 10e-6,
            loader_threads: 2,
            kv_elem_bytes: 4,
            experts_in_ram: false,
            device_free_bytes: None,
        }
    }

    #[test]
    fn cpu_plan_splits_ram_and_files() {
        let p = make_plan(&sizes(), &req(Device::Cpu), &Profile::default()).unwrap();
        let kv = sizes().kv_bytes_per_token * 4096;
        let fixed = (1u64 << 30) + kv + 4 * (10 << 20);
        assert_eq!(p.ram_experts as u64, ((6u64 << 30) - fixed) / (10 << 20));
        assert_eq!(p.ram_experts + p.file_experts, 24 * 64);
        assert!(p.ram_used_bytes <= 6 << 30);
        assert!(matches!(p.host_tier(), HostTierConfig::Pool { .. }));
        assert!(p.decode_tokens_per_s_low <= p.decode_tokens_per_s_high);
    }

    #[test]
    fn an_unset_max_batch_takes_what_the_budget_leaves_the_experts() {
        let per_seq = sizes().kv_bytes_per_token * 4096;
        let plan = |ram: u64, batch: Option<usize>| {
            let mut r = req(Device::Cpu);
            r.ram_budget_bytes = Some(ram);
            r.max_batch = batch;
            make_plan(&sizes(), &r, &Profile::default()).unwrap()
        };
        // Room for every expert and eight sequences: eight, chosen by the plan.
        let p = plan(40 << 30, None);
        assert_eq!((p.max_batch, p.max_batch_auto), (AUTO_MAX_BATCH, true));
        assert_eq!(p.kv_bytes, 8 * per_seq);
        assert_eq!(p.file_experts, 0);
        // A budget where each sequence's KV cache (402 MB) displaces 38 of ~470 experts in
        // RAM: one sequence.
        let p = plan(6 << 30, None);
        assert_eq!((p.max_batch, p.max_batch_auto), (1, true));
        assert_eq!(p.ram_experts, plan(6 << 30, Some(1)).ram_experts);
        // Every expert in RAM with room for one more sequence: a third gives up 39 of the 1536
        // experts (under 5%), a fourth would give up 77 (over).
        let all = plan(40 << 30, Some(1));
        let budget = all.ram_used_bytes + per_seq;
        let p = plan(budget, None);
        assert_eq!(p.max_batch, 3, "{p:?}");
        assert_eq!(p.file_experts, 39);
        assert_eq!(plan(budget, Some(4)).file_experts, 77);
        // A set max_batch is kept as it is, even where it costs experts.
        let p = plan(6 << 30, Some(3));
        assert_eq!((p.max_batch, p.max_batch_auto), (3, false));
        assert_eq!(p.kv_bytes, 3 * per_seq);
    }

    #[test]
    fn too_small_budget_names_budget_and_bytes() {
        let mut r = req(Device::Cpu);
        r.ram_budget_bytes = Some(512 << 20);
        let e = make_plan(&sizes(), &r, &Profile::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ram_budget") && e.contains("512.00 MiB") && e.contains("needed"),
            "{e}"
        );
        let mut r = req(Device::Sim);
        r.vram_budget_bytes = Some(256 << 20);
        let e = make_plan(&sizes(), &r, &Profile::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("vram_budget") && e.contains("resident set"),
            "{e}"
        );
    }

    #[test]
    fn sim_slots_follow_the_budget_and_few_slots_warn() {
        let p = make_plan(&sizes(), &req(Device::Sim), &Profile::default()).unwrap();
        let kv = sizes().kv_bytes_per_token * 4096;
        let free = (4u64 << 30) - (1 << 30) - kv;
        assert_eq!(p.slots_per_layer as u64, (free / (24 * (10 << 20))).min(64));
        let mut r = req(Device::Sim);
        r.slots_per_layer = Some(2);
        let p = make_plan(&sizes(), &r, &Profile::default()).unwrap();
        assert_eq!(p.slots_per_layer, 2);
        assert!(p.warnings.iter().any(|w| w.contains("fewer than top_k")));
        r.slots_per_layer = Some(60);
        assert!(make_plan(&sizes(), &r, &Profile::default()).is_err());
    }

    #[test]
    fn a_context_and_batch_beyond_any_memory_are_refused_not_wrapped() {
        for device in [Device::Cpu, Device::Sim] {
            let mut r = req(device);
            r.max_context = usize::MAX / 2;
            r.max_batch = Some(1 << 20);
            let e = make_plan(&sizes(), &r, &Profile::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("max_context") && e.contains("max_batch"), "{e}");
        }
    }

    #[test]
    fn budget_refusals_carry_budget_bytes_and_remedy_in_the_planner_wording() {
        let refuse = |r: &PlanRequest| make_plan(&sizes(), r, &Profile::default()).unwrap_err();
        // (request, budget, needed bytes, limit bytes, the message word for word)
        let mut ram = req(Device::Cpu);
        ram.ram_budget_bytes = Some(512 << 20);
        let mut vram = req(Device::Sim);
        vram.vram_budget_bytes = Some(256 << 20);
        let mut slots = req(Device::Sim);
        slots.slots_per_layer = Some(60);
        let mut in_ram = req(Device::Cpu);
        in_ram.experts_in_ram = true;
        let kv = sizes().kv_bytes_per_token * 4096;
        let host_fixed = (1 << 30) + kv + 4 * (10 << 20);
        let cases = [
            (
                ram,
                "ram_budget",
                host_fixed,
                512 << 20,
                "ram_budget 512.00 MiB is below what must stay in RAM: 1.41 GiB needed (1.00 GiB \
                 resident weights + 384.00 MiB KV cache + 40.00 MiB expert buffers); raise \
                 ram_budget, a smaller max_context (the KV cache takes 384.00 MiB), or use a \
                 quantized cache",
            ),
            (
                vram,
                "vram_budget",
                (1 << 30) + kv,
                256 << 20,
                "vram_budget 256.00 MiB is below the resident set: 1.38 GiB needed (1.00 GiB \
                 weights + 384.00 MiB KV cache); raise vram_budget, a smaller max_context (the \
                 KV cache takes 384.00 MiB), or use a quantized cache",
            ),
            (
                slots,
                "vram_budget",
                60 * 24 * (10 << 20),
                4 << 30,
                "slots_per_layer = 60 needs 14.06 GiB of device memory for experts, but \
                 vram_budget 4.00 GiB leaves 2.62 GiB after the resident set; at most 11 slots fit",
            ),
            (
                in_ram,
                "ram_budget",
                sizes().total_expert_bytes + host_fixed,
                6 << 30,
                "quantized experts are held in RAM (quantized at load, cache = false): 16.41 GiB \
                 needed, but ram_budget 6.00 GiB leaves room for 469 of 1536; raise ram_budget, \
                 set cache = true (experts then stream from the cache file) or use quantization \
                 = \"none\"",
            ),
        ];
        for (r, want_budget, want_needed, want_limit, want_text) in cases {
            let e = refuse(&r);
            assert_eq!(e.to_string(), want_text);
            let Error::BudgetExceeded {
                budget,
                needed_bytes,
                limit_bytes,
                remedy,
                ..
            } = e
            else {
                panic!("not a structured budget refusal: {e:?}");
            };
            assert_eq!(
                (budget, needed_bytes, limit_bytes),
                (want_budget, want_needed, want_limit)
            );
            assert!(
                !remedy.is_empty() && want_text.ends_with(&remedy),
                "{remedy}"
            );
            assert!(needed_bytes > 0 && limit_bytes > 0);
        }
        // Without a budget set, the refusal names the free memory as the budget.
        let mut auto = req(Device::Cpu);
        auto.ram_budget_bytes = None;
        auto.max_context = 1 << 30;
        match refuse(&auto) {
            Error::BudgetExceeded { budget, .. } => {
                assert_eq!(budget, "the free memory (no ram_budget set)")
            }
            other => panic!("{other:?}"),
        }
        // Refusals with no byte count are a separate kind.
        let mut no_budget = req(Device::Cuda);
        no_budget.vram_budget_bytes = None;
        assert!(matches!(refuse(&no_budget), Error::Unplannable(_)));
    }

    #[test]
    fn budget_messages_write_sizes_as_the_config_does() {
        for b in [
            0,
            1,
            1023,
            1024,
            1536,
            (1 << 20) - 1,
            3 << 20,
            1 << 30,
            (1 << 30) * 5 / 4,
        ]
        .into_iter()
        .chain([u64::MAX, (1 << 40) + 12345, 12 << 30])
        {
            let e = Error::BudgetExceeded {
                budget: "ram_budget",
                needed_bytes: b,
                limit_bytes: b,
                need: crate::error::BudgetNeed::DeviceResident { detail: "d".into() },
                remedy: "r".into(),
            };
            let size = crate::size::ByteSize(b).to_string();
            assert_eq!(
                e.to_string(),
                format!("ram_budget {size} is below the resident set: {size} needed (d); r")
            );
        }
    }

    #[test]
    fn cuda_plans_like_a_real_card_from_its_free_memory_or_the_budget() {
        let profile = Profile::default();
        // With vram_budget: the same placement as `sim`, minus the scratch a real GPU needs.
        let sim = make_plan(&sizes(), &req(Device::Sim), &profile).unwrap();
        let cuda = make_plan(&sizes(), &req(Device::Cuda), &profile).unwrap();
        assert_eq!(cuda.vram_budget_bytes, Some(4 << 30));
        assert!(cuda.vram_used_bytes <= 4 << 30);
        let per_slot_row = sizes().expert_bytes * sizes().moe_layers as u64;
        let slots_lost = DEVICE_SCRATCH_BYTES.div_ceil(per_slot_row) as usize;
        assert!(cuda.slots_per_layer + slots_lost >= sim.slots_per_layer);
        assert!(cuda.slots_per_layer < sim.slots_per_layer);
        // Without vram_budget: the probed free memory minus the margin.
        let mut r = req(Device::Cuda);
        r.vram_budget_bytes = None;
        r.device_free_bytes = Some(6 << 30);
        let p = make_plan(&sizes(), &r, &profile).unwrap();
        assert_eq!(p.vram_budget_bytes, Some((6 << 30) - VRAM_MARGIN_BYTES));
        assert!(p.vram_used_bytes <= (6 << 30) - VRAM_MARGIN_BYTES);
        // Neither a budget nor a GPU: say what to set.
        r.device_free_bytes = None;
        let e = make_plan(&sizes(), &r, &profile).unwrap_err().to_string();
        assert!(e.contains("vram_budget") && e.contains("cuda"), "{e}");
        // A card too small for the resident set, the KV cache and the scratch: refused naming
        // all three and the budget.
        r.device_free_bytes = Some(VRAM_MARGIN_BYTES + (1 << 30));
        let e = make_plan(&sizes(), &r, &profile).unwrap_err();
        assert!(
            matches!(
                e,
                Error::BudgetExceeded {
                    budget: "vram_budget",
                    ..
                }
            ),
            "{e}"
        );
        let e = e.to_string();
        assert!(e.contains("scratch") && e.contains("KV cache"), "{e}");
    }
}
