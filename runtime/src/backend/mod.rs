//! Compute backends: the one interface through which the decoder computes, and the types that
//! say where and how (`DeviceKind`, `Activations`, `KvElem`, `RouterRule`, `Glu`).
//!
//! Layers, attention, the router, DeltaNet and the model stack (`layers`, `moe`, `deltanet`,
//! `model`, `arch`) are generic over a [`Backend`] and never name a kernel or a device: they hold
//! their weights as the backend's [`Backend::Weight`] / [`Backend::Vector`], pass activations as
//! [`Backend::Act`] (`[rows, width]` f32 on the backend's device) and keep per-sequence state as
//! [`Backend::Kv`] / [`Backend::Recurrent`]. [`Cpu`] holds the host code (`moe_kernels` and the
//! loops over f32 slices); [`Cuda`] is the GPU backend's place, a stub in builds without one whose
//! constructor fails with a clear error, so call sites carry no `cfg`. [`select`] is the one
//! place that turns a `device` setting into a backend.
//!
//! Invariants: every op computes what the CPU reference computes (f32 arithmetic, the same
//! reduction order within a row where results must match bit for bit); an op reads and writes
//! only its own arguments; results that decide control flow (routing, logits) come back to the
//! host as plain values; the host form of a model (what architecture files build and the
//! quantizer and the cache rewrite) is the CPU backend's form, and [`Backend::upload_weight`]
//! moves it onto a device once, at load.

pub mod cpu;
pub mod cuda;
#[cfg(test)]
mod traced;

use std::borrow::Cow;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::config::Rope;
use crate::config::{LinearAttentionConfig, RouterConfig};
use crate::error::Result;
use crate::weights::TensorRef;

pub use cpu::Cpu;
pub use cuda::{probe, CubinCache, Cuda, CudaDevice};

/// The host form of a model: what architecture files build and the quantizer and the cache
/// rewrite (weights as mapped or converted host tensors). It is the CPU backend's own form, so
/// on the CPU uploading is a move.
pub type Host = Cpu;

/// Where the model computes (`device`): the backend, and for experts where they are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// Everything on the CPU (`"cpu"`).
    #[default]
    Cpu,
    /// An NVIDIA GPU through CUDA (`"cuda"`).
    Cuda,
    /// A simulated device: CPU compute with device memory and link costs modelled (`"sim"`).
    Sim,
    /// `cuda` when a usable GPU and CUDA backend are present, else `cpu` (`"auto"`).
    Auto,
}

impl DeviceKind {
    /// The device a setting means on this machine: `auto` becomes `cuda` when the CUDA backend
    /// opens and `cpu` otherwise (saying why once); `cuda` where it cannot open is an error
    /// naming what is missing; `cpu` and `sim` are themselves.
    pub fn resolve(self) -> Result<DeviceKind> {
        match self {
            DeviceKind::Cpu | DeviceKind::Sim => Ok(self),
            DeviceKind::Cuda => cuda::usable(0).map(|_| DeviceKind::Cuda),
            DeviceKind::Auto => Ok(match cuda::usable(0) {
                Ok(_) => DeviceKind::Cuda,
                Err(e) => {
                    tracing::info!("device = \"auto\": {e}; computing on the CPU");
                    DeviceKind::Cpu
                }
            }),
        }
    }
}

/// How activations meet the weights on the CPU (`activations`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activations {
    /// The fast arithmetic for each weight type (`"auto"`, the default): bf16 weights meet
    /// bf16 activations (on CPUs with AVX512_BF16), q8_0 / q4_k weights 8-bit activations with
    /// integer dot products; every other weight the f32 path.
    #[default]
    Auto,
    /// f32 activations, f32 accumulation (`"f32"`): the exact mode.
    F32,
    /// Activations quantized to 8 bits, integer dot products (`"q8"`), for q8_0 / q4_k weights.
    Q8,
    /// Activations rounded to bf16, bf16 dot products (`"bf16"`), for bf16 weights on CPUs
    /// with AVX512_BF16.
    Bf16,
}

impl Activations {
    /// Whether q8_0 / q4_k weights take 8-bit activations.
    pub fn integer(self) -> bool {
        matches!(self, Activations::Q8 | Activations::Auto)
    }

    /// Whether bf16 weights take bf16 activations (where the CPU has the instructions).
    pub fn bf16(self) -> bool {
        matches!(self, Activations::Bf16 | Activations::Auto)
    }
}

impl std::str::FromStr for Activations {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Activations::Auto),
            "f32" => Ok(Activations::F32),
            "q8" => Ok(Activations::Q8),
            "bf16" => Ok(Activations::Bf16),
            other => Err(format!(
                "`{other}` is not an activation type (auto, f32, q8, bf16)"
            )),
        }
    }
}

/// Element type the KV cache stores (compute is f32 either way); the config key `kv_dtype`
/// names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvElem {
    /// Exact; 4 bytes per element (`"f32"`).
    #[default]
    F32,
    /// Half the bytes, 8-bit exponent; values rounded to bf16 when stored (`"bf16"`).
    Bf16,
    /// Half the bytes, 5-bit exponent; values rounded to f16 when stored (`"f16"`).
    F16,
}

impl KvElem {
    /// Bytes one element takes in the cache.
    pub fn elem_bytes(self) -> u64 {
        match self {
            KvElem::F32 => 4,
            KvElem::Bf16 | KvElem::F16 => 2,
        }
    }
}

/// The gated activation between an FFN's gate/up and down projections: `up = act(gate) * up`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Glu {
    /// `silu(g) * u` (SwiGLU: Llama, Mixtral, Qwen, OLMoE).
    SwiGlu,
    /// gpt-oss's clamped form: `g' = min(g, limit)`, `u' = clamp(u, -limit, limit)`,
    /// `(u' + 1) * g' * sigmoid(alpha * g')`.
    ClampedSwiGlu { limit: f32, alpha: f32 },
}

/// How router logits become scores (part of a model's description, so it lives in `config`).
pub use crate::config::Scoring;

/// Routing decisions of one layer for `rows` token rows.
#[derive(Clone, Debug, Default)]
pub struct Routing {
    /// `[rows, top_k]` expert indices, best first.
    pub indices: Vec<u32>,
    /// `[rows, top_k]` routing weights actually applied.
    pub weights: Vec<f32>,
    /// `[rows, num_experts]` raw router logits.
    pub logits: Vec<f32>,
}

/// A router's rule: scoring, selection and the weights applied, as data (one op computes any
/// of them).
#[derive(Clone, Debug, PartialEq)]
pub struct RouterRule {
    pub num_experts: usize,
    pub top_k: usize,
    pub scoring: Scoring,
    /// Divide the selected weights by their sum.
    pub renormalize: bool,
    /// Group-limited selection: experts fall into `groups` equal groups, a group scores the sum
    /// of its best two (selection) scores, and only the best `keep` groups compete
    /// (DeepSeek-V3's `n_group` / `topk_group`); `None` = all experts compete.
    pub groups: Option<(usize, usize)>,
    /// Multiplies the final weights (`routed_scaling_factor`; 1 otherwise).
    pub scale: f32,
}

impl From<&RouterConfig> for RouterRule {
    fn from(c: &RouterConfig) -> RouterRule {
        RouterRule {
            num_experts: c.num_experts,
            top_k: c.top_k,
            scoring: c.scoring,
            renormalize: c.norm_topk_prob,
            groups: c.groups,
            scale: c.scale,
        }
    }
}

/// Shape and options of one attention op.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// Width of one query / key head.
    pub head_dim: usize,
    /// Width of one value head: `head_dim`, or with values read from the keys (latent
    /// attention) the leading `value_dim` values of each key head.
    pub value_dim: usize,
    /// Multiplies the scores before the softmax (`head_dim^-1/2` for most architectures).
    pub scale: f32,
    /// Keys older than this many positions are not attended to (None = full causal).
    pub sliding_window: Option<usize>,
}

impl AttnShape {
    /// Standard multi-head attention: values as wide as keys, scores scaled by `head_dim^-1/2`.
    pub fn standard(
        num_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
        sliding_window: Option<usize>,
    ) -> AttnShape {
        AttnShape {
            num_heads,
            num_kv_heads,
            head_dim,
            value_dim: head_dim,
            scale: (head_dim as f32).powf(-0.5),
            sliding_window,
        }
    }
}

/// The row blocks of one weight that [`Backend::head_matmul`] gives each head: head `h` uses
/// rows `h * stride + offset .. h * stride + offset + len` of a `[.., cols]` weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadBlocks {
    pub heads: usize,
    pub stride: usize,
    pub offset: usize,
    pub len: usize,
    pub cols: usize,
}

/// One gated DeltaNet layer's parameters, as the backend holds them.
pub struct DeltaNetParams<'a, B: Backend> {
    pub dims: LinearAttentionConfig,
    /// `[conv_dim, kernel]`.
    pub conv_weight: &'a B::Vector,
    /// `-exp(A_log)` per value head.
    pub neg_a: &'a B::Vector,
    pub dt_bias: &'a B::Vector,
    /// The per-head output norm's weight (`value_head_dim`) and epsilon.
    pub norm: &'a B::Vector,
    pub norm_eps: f32,
}

/// The operations the decoder needs, over data that lives on the backend's device.
pub trait Backend: Send + Sync + Sized + 'static {
    /// One resident weight matrix `[out, in]` in its stored type.
    type Weight: Send + Sync;
    /// A small f32 parameter vector (norm weights, biases, per-head constants).
    type Vector: Send + Sync;
    /// Activations `[rows, width]`, f32 (the width is the caller's to know).
    type Act: Send + Sync;
    /// One attention layer's KV cache for one sequence.
    type Kv: Clone + Send + Sync;
    /// One recurrent (DeltaNet) layer's state for one sequence.
    type Recurrent: Clone + Send + Sync;

    /// Short name for logs and reports.
    fn name(&self) -> &'static str;

    /// The first failure of an operation since the last call, if any. Ops cannot return
    /// errors (a device reports them late), so a backend keeps the first and the decoder asks
    /// at the end of every forward pass. Default: none (the CPU's ops cannot fail).
    fn check(&self) -> Result<()> {
        Ok(())
    }

    /// Makes a host weight (mapped, converted or cached) resident on this backend.
    fn upload_weight(&self, t: TensorRef) -> Result<Self::Weight>;
    /// Makes a small host vector resident on this backend.
    fn upload_vector(&self, v: Vec<f32>) -> Result<Self::Vector>;
    /// Host rows as activations.
    fn act_from_host(&self, v: Vec<f32>) -> Self::Act;
    /// Activations as host rows (borrowed where they already live on the host).
    fn to_host<'a>(&self, x: &'a Self::Act) -> Cow<'a, [f32]>;

    /// Rows `ids` of the `[vocab, width]` table, as f32.
    fn embed(&self, table: &Self::Weight, ids: &[u32], width: usize) -> Self::Act;
    /// `x · wᵀ (+ bias)` for `x` `[rows, n_in]`, `w` `[n_out, n_in]`; returns `[rows, n_out]`.
    fn matmul(
        &self,
        x: &Self::Act,
        rows: usize,
        w: &Self::Weight,
        n_in: usize,
        n_out: usize,
        bias: Option<&Self::Vector>,
    ) -> Self::Act;
    /// RMSNorm of every `width`-wide row in place: `x / sqrt(mean(x²) + eps) * w`.
    fn rms_norm(&self, x: &mut Self::Act, w: &Self::Vector, width: usize, eps: f32);
    /// A copy of `x` (to normalise without losing the residual).
    fn copy(&self, x: &Self::Act) -> Self::Act;
    /// `x += y`.
    fn add(&self, x: &mut Self::Act, y: &Self::Act);
    /// The rows `ranges` of `x` (`width` wide), one after another.
    fn take_rows(&self, x: &Self::Act, width: usize, ranges: &[Range<usize>]) -> Self::Act;
    /// Rows of `heads` blocks `[first d | second d]` split into two `[rows, heads * d]` arrays.
    fn split_halves(&self, x: &Self::Act, d: usize) -> (Self::Act, Self::Act);
    /// Rows of `heads` blocks `[first a | then b]` split into `[rows, heads * a]` and
    /// `[rows, heads * b]` (the heads counted from the row width).
    fn split_heads(&self, x: &Self::Act, a: usize, b: usize) -> (Self::Act, Self::Act);
    /// The inverse of [`Backend::split_heads`]: head `h` of a row is `x`'s head `h` (`a` wide)
    /// then `y`'s (`b` wide).
    fn join_heads(&self, x: &Self::Act, y: &Self::Act, a: usize, b: usize) -> Self::Act;
    /// Products of each head with its own row block of `w` (MLA's absorbed `kv_b_proj`), per
    /// [`HeadBlocks`]. Not `transposed`: `x` is `[rows, heads * cols]` and
    /// `out[r, h, o] = Σ_c x[r, h, c] · w[block_h + o, c]` (`[rows, heads * len]`); `transposed`:
    /// `x` is `[rows, heads * len]` and `out[r, h, c] = Σ_o x[r, h, o] · w[block_h + o, c]`
    /// (`[rows, heads * cols]`).
    fn head_matmul(
        &self,
        x: &Self::Act,
        rows: usize,
        w: &Self::Weight,
        blocks: &HeadBlocks,
        transposed: bool,
    ) -> Self::Act;
    /// `x = clamp(x, -limit, limit)`.
    fn clamp(&self, x: &mut Self::Act, limit: f32);
    /// Rotary embedding of every `head_dim`-wide head of `q` and `k`, row `r` at position
    /// `positions[r]`.
    fn rope(
        &self,
        q: &mut Self::Act,
        k: &mut Self::Act,
        head_dim: usize,
        positions: &[usize],
        rope: &Rope,
    );
    /// `x *= sigmoid(gate)` elementwise.
    fn mul_sigmoid(&self, x: &mut Self::Act, gate: &Self::Act);
    /// `up = act(gate) * up` elementwise.
    fn glu(&self, gate: &Self::Act, up: &mut Self::Act, kind: Glu);
    /// `out[r] += sigmoid(gate[r]) * y[r]` for `width`-wide rows and one gate value per row.
    fn add_gated_rows(&self, out: &mut Self::Act, y: &Self::Act, gate: &Self::Act, width: usize);
    /// Routing decisions for `[rows, num_experts]` logits under `rule`; `selection_bias` (one
    /// per expert) is added to the scores for choosing experts only, never to the weights.
    fn route(
        &self,
        logits: Self::Act,
        rule: &RouterRule,
        selection_bias: Option<&Self::Vector>,
    ) -> Routing;

    /// An empty KV cache storing `elem`.
    fn kv_new(&self, elem: KvElem) -> Self::Kv;
    /// Positions held.
    fn kv_len(&self, kv: &Self::Kv) -> usize;
    /// Drops everything after the first `len` positions (`row` values per position).
    fn kv_truncate(&self, kv: &mut Self::Kv, len: usize, row: usize);
    /// Bytes held.
    fn kv_bytes(&self, kv: &Self::Kv) -> usize;
    /// Causal attention of several sequences: rows `lens[0]` of `q`/`k`/`v` belong to sequence 0
    /// and so on; each sequence's new `k`/`v` rows are appended to its cache, then its queries
    /// attend over the cache (within the sliding window). Without `v` (latent attention) the
    /// cache holds keys only and each head's values are the leading `shape.value_dim` values
    /// of its key. `sinks` (one learned logit per head, gpt-oss) join each head's softmax as a
    /// position without a value. Returns `[rows, heads * value_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &Self::Act,
        k: &Self::Act,
        v: Option<&Self::Act>,
        lens: &[usize],
        caches: &mut [&mut Self::Kv],
        shape: &AttnShape,
        sinks: Option<&Self::Vector>,
    ) -> Self::Act;

    /// A zero recurrent state of `conv` convolution and `ssm` recurrence values.
    fn recurrent_new(&self, conv: usize, ssm: usize) -> Self::Recurrent;
    /// Bytes held.
    fn recurrent_bytes(&self, st: &Self::Recurrent) -> usize;
    /// Gated DeltaNet from the two input projections (`qkvz`, `ba`, in the checkpoint's
    /// interleaved order) to the gated, normalised core output `[rows, nv * dv]` (before
    /// `out_proj`), per sequence continuing `states[s]`.
    fn delta_net(
        &self,
        qkvz: &Self::Act,
        ba: &Self::Act,
        p: &DeltaNetParams<'_, Self>,
        lens: &[usize],
        states: &mut [&mut Self::Recurrent],
    ) -> Self::Act;
}

/// A backend chosen at run time.
pub enum AnyBackend {
    Cpu(Cpu),
    Cuda(Cuda),
}

/// The one place a `device` setting picks a backend: `cpu` and `sim` compute on the CPU (with
/// `activations`); `cuda` opens the GPU backend (kernels compiled into `cache_dir`), which fails
/// with a clear error where the machine has none; `auto` takes the GPU when it opens, else the
/// CPU (the planner's [`DeviceKind::resolve`] says why, once). The GPU is probed once per call.
pub fn select(
    device: DeviceKind,
    activations: Activations,
    cache_dir: &std::path::Path,
) -> Result<AnyBackend> {
    let cpu = || AnyBackend::Cpu(Cpu::new(activations));
    Ok(match device {
        DeviceKind::Cpu | DeviceKind::Sim => cpu(),
        DeviceKind::Cuda => AnyBackend::Cuda(Cuda::new(0, cache_dir)?),
        DeviceKind::Auto => Cuda::new(0, cache_dir).map_or_else(|_| cpu(), AnyBackend::Cuda),
    })
}
