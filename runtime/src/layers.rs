//! Building blocks that architecture files compose: linear projections, RMSNorm, rotary
//! embeddings, attention with its KV cache, and the dense SwiGLU MLP.
//!
//! Invariants: activations, norms, softmax and accumulation are f32 whatever the weights' dtype;
//! weights are read in place through [`TensorRef`] views (no copies of large tensors); every
//! matrix product goes through `moe_kernels`. Row-major layouts: activations `[tokens, width]`,
//! weights `[out, in]` as Hugging Face stores them.

use rayon::prelude::*;

use moe_kernels::Weights;

use crate::config::{RopeConfig, RopeScaling};
use crate::error::Result;
use crate::runconfig::Activations;
use crate::weights::{TensorRef, WeightSet};

/// `y = x · Wᵀ (+ b)`.
pub struct Linear {
    pub weight: TensorRef,
    pub bias: Option<Vec<f32>>,
    pub in_features: usize,
    pub out_features: usize,
    /// How inputs meet the weight (`activations`; see [`Input`]).
    pub activations: Activations,
}

impl Linear {
    /// Loads `{prefix}.weight` `[out, in]` and, when `bias`, `{prefix}.bias` `[out]`.
    pub fn load(
        w: &WeightSet,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Linear> {
        let weight = w.compute(&format!("{prefix}.weight"), &[out_features, in_features])?;
        let bias = if bias {
            Some(
                w.compute(&format!("{prefix}.bias"), &[out_features])?
                    .to_f32_vec()?,
            )
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            in_features,
            out_features,
            activations: Activations::F32,
        })
    }

    /// From an existing `[out, in]` view (e.g. one expert of a stacked tensor).
    pub fn from_view(weight: TensorRef) -> Linear {
        Linear {
            in_features: weight.shape[1],
            out_features: weight.shape[0],
            weight,
            bias: None,
            activations: Activations::F32,
        }
    }

    /// `x` is `[m, in]`; returns `[m, out]`.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * self.out_features];
        self.forward_into(x, m, &mut out);
        out
    }

    pub fn forward_into(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let w = self.weight.weights();
        let input = Input::new(x, m, self.in_features, self.activations, &[w]);
        input.matmul(w, self.out_features, out, true);
        if let Some(b) = &self.bias {
            for row in out.chunks_exact_mut(self.out_features) {
                for (o, b) in row.iter_mut().zip(b) {
                    *o += b;
                }
            }
        }
    }
}

/// Rows of f32 activations on their way into one or more matmuls, under an `activations`
/// setting: `F32` always takes the exact f32 kernels; `Q8` quantizes the rows once (shared by
/// every q8_0 / q4_k weight they meet) for the integer-dot kernels in decode-sized batches (at
/// most `MATVEC_MAX_M` rows; larger ones keep the f32 GEMM); `Bf16` rounds them to bf16
/// for `vdpbf16ps` against bf16 weights where the CPU has it. Weights a setting does not cover
/// (and CPUs without the instructions) fall back to the f32 kernels.
pub struct Input<'a> {
    x: &'a [f32],
    m: usize,
    k: usize,
    act: Activations,
    q8: Option<moe_kernels::Q8Activations>,
}

impl<'a> Input<'a> {
    /// `x` is `[m, k]`; `ws` are the weights it will meet (to decide whether to quantize it).
    pub fn new(x: &'a [f32], m: usize, k: usize, act: Activations, ws: &[Weights<'_>]) -> Self {
        // Prefill-sized batches stay on the f32 GEMM: with per-32 block scales the integer
        // kernels do as much work per weight as f32 FMAs there (measured slower on bench-m).
        let q8 = (act == Activations::Q8
            && m <= moe_kernels::MATVEC_MAX_M
            && ws.iter().any(moe_kernels::q8_activations_supported))
        .then(|| moe_kernels::Q8Activations::new(x, m, k));
        Input { x, m, k, act, q8 }
    }

    /// `out[m, n] = x · wᵀ` by the kernel the setting picks for `w`; `parallel` splits it over
    /// the current rayon pool (same result bit for bit either way).
    pub fn matmul(&self, w: Weights<'_>, n: usize, out: &mut [f32], parallel: bool) {
        let (x, m, k) = (self.x, self.m, self.k);
        match (self.act, w, &self.q8) {
            (Activations::Q8, _, Some(xq)) if moe_kernels::q8_activations_supported(&w) => {
                if parallel {
                    moe_kernels::matmul_q8_par(xq, w, n, out)
                } else {
                    moe_kernels::matmul_q8(xq, w, n, out)
                }
            }
            (Activations::Bf16, Weights::Bf16(wb), _)
                if moe_kernels::bf16_activations_supported() =>
            {
                if parallel {
                    moe_kernels::matmul_bf16_par(x, m, k, wb, n, out)
                } else {
                    moe_kernels::matmul_bf16(x, m, k, wb, n, out)
                }
            }
            _ if parallel => moe_kernels::matmul(x, m, k, w, n, out),
            _ => moe_kernels::matmul_serial(x, m, k, w, n, out),
        }
    }
}

/// Root-mean-square norm: `x / sqrt(mean(x²) + eps) * w`.
pub struct RmsNorm {
    pub weight: Vec<f32>,
    pub eps: f32,
}

impl RmsNorm {
    pub fn load(w: &WeightSet, name: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: w.compute(name, &[dim])?.to_f32_vec()?,
            eps: eps as f32,
        })
    }

    /// A norm whose stored weight is zero-centred (it scales by `1 + w`, as Qwen3-Next's does);
    /// the offset is added once here so the forward pass is the same.
    pub fn load_zero_centred(w: &WeightSet, name: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
        let mut n = Self::load(w, name, dim, eps)?;
        n.weight.iter_mut().for_each(|v| *v += 1.0);
        Ok(n)
    }

    /// Normalises every `weight.len()`-wide row of `x` in place.
    pub fn forward_inplace(&self, x: &mut [f32]) {
        let d = self.weight.len();
        for row in x.chunks_exact_mut(d) {
            let ss: f32 = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let r = 1.0 / (ss + self.eps).sqrt();
            for (v, w) in row.iter_mut().zip(&self.weight) {
                *v = *w * (*v * r);
            }
        }
    }

    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let mut y = x.to_vec();
        self.forward_inplace(&mut y);
        y
    }
}

/// Rotary position embedding (rotate-half convention) with transformers' scaling variants.
pub struct Rope {
    /// Inverse frequencies, `rot_dim / 2` of them.
    inv_freq: Vec<f32>,
    /// Multiplies cos and sin (YaRN's attention factor; 1 otherwise).
    attention_scaling: f32,
    rot_dim: usize,
}

impl Rope {
    /// `cfg` has passed [`crate::config::ModelConfig::validate`]: the rotated width is even and
    /// at most `head_dim`, and every factor is finite and above 0.
    pub fn new(cfg: &RopeConfig, head_dim: usize) -> Rope {
        let dim = cfg.rotary_dim(head_dim).min(head_dim);
        let base = cfg.theta;
        // Exponents are formed in f32 as transformers does (`arange(0, dim, 2).float() / dim`).
        let pos_freq: Vec<f64> = (0..dim / 2)
            .map(|i| base.powf(((2 * i) as f32 / dim as f32) as f64))
            .collect();
        let mut attention_scaling = 1.0f64;
        let inv: Vec<f64> = match &cfg.scaling {
            RopeScaling::Default | RopeScaling::Dynamic { .. } => {
                pos_freq.iter().map(|p| 1.0 / p).collect()
            }
            RopeScaling::Linear { factor } => pos_freq.iter().map(|p| 1.0 / p / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                pos_freq
                    .iter()
                    .map(|p| {
                        let f = 1.0 / p;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen > low_wavelen {
                            f / factor
                        } else if wavelen < high_wavelen {
                            f
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                let get_mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                attention_scaling = match attention_factor {
                    Some(a) => *a,
                    None => match (mscale, mscale_all_dim) {
                        (Some(m), Some(ma)) if *m != 0.0 && *ma != 0.0 => {
                            get_mscale(*factor, *m) / get_mscale(*factor, *ma)
                        }
                        _ => get_mscale(*factor, 1.0),
                    },
                };
                let orig = *original_max_position_embeddings as f64;
                let d = dim as f64;
                let corr = |rot: f64| {
                    (d * (orig / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln())
                };
                let (mut low, mut high) = (corr(*beta_fast), corr(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let mut high = high.min(d - 1.0);
                if low == high {
                    high += 0.001; // transformers: "Prevent singularity"
                }
                pos_freq
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrap_factor = 1.0 - ramp;
                        let interp = 1.0 / (factor * p);
                        let extrap = 1.0 / p;
                        interp * (1.0 - extrap_factor) + extrap * extrap_factor
                    })
                    .collect()
            }
        };
        Rope {
            inv_freq: inv.iter().map(|&f| f as f32).collect(),
            attention_scaling: attention_scaling as f32,
            rot_dim: dim,
        }
    }

    /// Whether every frequency and the attention scaling are finite (a config check: a
    /// non-finite one would turn every attention output into NaN).
    pub fn is_finite(&self) -> bool {
        self.attention_scaling.is_finite() && self.inv_freq.iter().all(|f| f.is_finite())
    }

    /// Rotates every `head_dim`-wide head of `row` for absolute position `pos`.
    pub fn apply(&self, row: &mut [f32], head_dim: usize, pos: usize) {
        let half = self.rot_dim / 2;
        let (cos, sin): (Vec<f32>, Vec<f32>) = self
            .inv_freq
            .iter()
            .map(|f| {
                let a = f * pos as f32;
                (
                    (a as f64).cos() as f32 * self.attention_scaling,
                    (a as f64).sin() as f32 * self.attention_scaling,
                )
            })
            .unzip();
        for head in row.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let x1 = head[i];
                let x2 = head[i + half];
                head[i] = x1 * cos[i] - x2 * sin[i];
                head[i + half] = x2 * cos[i] + x1 * sin[i];
            }
        }
    }
}

/// Element type the KV cache stores (compute is f32 either way); the config key `kv_dtype`
/// names it (`runconfig::KvDtype` is this type).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
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

/// One of the cache's two tensors, `[tokens, kv_heads * head_dim]` in its element type.
#[derive(Clone)]
pub enum KvData {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
    F16(Vec<half::f16>),
}

impl KvData {
    fn new(elem: KvElem) -> KvData {
        match elem {
            KvElem::F32 => KvData::F32(Vec::new()),
            KvElem::Bf16 => KvData::Bf16(Vec::new()),
            KvElem::F16 => KvData::F16(Vec::new()),
        }
    }

    fn extend(&mut self, src: &[f32]) {
        match self {
            KvData::F32(v) => v.extend_from_slice(src),
            KvData::Bf16(v) => v.extend(src.iter().map(|&x| half::bf16::from_f32(x))),
            KvData::F16(v) => v.extend(src.iter().map(|&x| half::f16::from_f32(x))),
        }
    }

    fn truncate(&mut self, n: usize) {
        match self {
            KvData::F32(v) => v.truncate(n),
            KvData::Bf16(v) => v.truncate(n),
            KvData::F16(v) => v.truncate(n),
        }
    }

    fn capacity_bytes(&self) -> usize {
        match self {
            KvData::F32(v) => v.capacity() * 4,
            KvData::Bf16(v) => v.capacity() * 2,
            KvData::F16(v) => v.capacity() * 2,
        }
    }

    /// Elements `[from, to)` as f32: borrowed when stored as f32, widened otherwise.
    fn f32_range(&self, from: usize, to: usize) -> std::borrow::Cow<'_, [f32]> {
        use std::borrow::Cow;
        let widen = |w: moe_kernels::Weights<'_>| {
            let mut out = vec![0f32; to - from];
            if to > from {
                moe_kernels::row_to_f32(w, 0, to - from, &mut out);
            }
            Cow::Owned(out)
        };
        match self {
            KvData::F32(v) => Cow::Borrowed(&v[from..to]),
            KvData::Bf16(v) => widen(moe_kernels::Weights::Bf16(&v[from..to])),
            KvData::F16(v) => widen(moe_kernels::Weights::F16(&v[from..to])),
        }
    }
}

/// Keys and values of one attention layer for one sequence.
#[derive(Clone)]
pub struct KvCache {
    pub k: KvData,
    pub v: KvData,
    pub len: usize,
}

impl Default for KvCache {
    fn default() -> Self {
        KvCache::new(KvElem::F32)
    }
}

impl KvCache {
    pub fn new(elem: KvElem) -> KvCache {
        KvCache {
            k: KvData::new(elem),
            v: KvData::new(elem),
            len: 0,
        }
    }

    /// Drops everything after the first `len` tokens (prefix reuse, rollback).
    pub fn truncate(&mut self, len: usize, row: usize) {
        self.len = self.len.min(len);
        self.k.truncate(self.len * row);
        self.v.truncate(self.len * row);
    }

    pub fn size_bytes(&self) -> usize {
        self.k.capacity_bytes() + self.v.capacity_bytes()
    }
}

/// How q and k are normalised (see [`crate::config::QkNorm`]), with the norm weights.
pub enum QkNormLayer {
    None,
    PerHead { q: RmsNorm, k: RmsNorm },
    FullWidth { q: RmsNorm, k: RmsNorm },
}

/// Multi-head causal self-attention with GQA, optional q/k norm, clipping, sliding window and
/// output gate.
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub qk_norm: QkNormLayer,
    pub clip_qkv: Option<f32>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Keys older than this many positions are not attended to (None = full causal).
    pub sliding_window: Option<usize>,
    pub rope: Rope,
    /// `q_proj` yields, per head, `head_dim` query values then `head_dim` gate values; the
    /// attention output is multiplied by `sigmoid(gate)` before `o_proj` (Qwen3-Next).
    pub output_gate: bool,
}

impl Attention {
    fn kv_row(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// `x` is `[t, hidden]` for positions `cache.len .. cache.len + t`; returns `[t, hidden]`.
    pub fn forward(&self, x: &[f32], t: usize, cache: &mut KvCache) -> Vec<f32> {
        self.forward_batch(x, &[t], &mut [cache])
    }

    /// Several sequences at once: `x` holds `lens[s]` rows of sequence `s` after those of the
    /// sequences before it, each continuing its own `caches[s]`. The projections run over all
    /// rows together (one pass over each weight); scores and mixing stay within a sequence.
    pub fn forward_batch(
        &self,
        x: &[f32],
        lens: &[usize],
        caches: &mut [&mut KvCache],
    ) -> Vec<f32> {
        debug_assert_eq!(lens.len(), caches.len());
        let (nh, hd) = (self.num_heads, self.head_dim);
        let kvr = self.kv_row();
        let t: usize = lens.iter().sum();
        let mut q = self.q_proj.forward(x, t);
        let gate = if self.output_gate {
            let (qs, gs) = split_heads(&q, nh, hd);
            q = qs;
            Some(gs)
        } else {
            None
        };
        let mut k = self.k_proj.forward(x, t);
        let mut v = self.v_proj.forward(x, t);
        match &self.qk_norm {
            QkNormLayer::None => {}
            // Per-head norms see `head_dim`-wide rows, full-width norms whole projections: the
            // norm's weight length decides the row width.
            QkNormLayer::PerHead { q: qn, k: kn } | QkNormLayer::FullWidth { q: qn, k: kn } => {
                qn.forward_inplace(&mut q);
                kn.forward_inplace(&mut k);
            }
        }
        if let Some(c) = self.clip_qkv {
            for val in q.iter_mut().chain(k.iter_mut()).chain(v.iter_mut()) {
                *val = val.clamp(-c, c);
            }
        }
        // Row r belongs to sequence seq_of[r] at position pos_of[r].
        let mut seq_of = Vec::with_capacity(t);
        let mut pos_of = Vec::with_capacity(t);
        for (s, (&n, cache)) in lens.iter().zip(caches.iter()).enumerate() {
            seq_of.extend(std::iter::repeat_n(s, n));
            pos_of.extend(cache.len..cache.len + n);
        }
        q.par_chunks_mut(nh * hd)
            .zip(k.par_chunks_mut(kvr))
            .zip(pos_of.par_iter())
            .for_each(|((qr, kr), &pos)| {
                self.rope.apply(qr, hd, pos);
                self.rope.apply(kr, hd, pos);
            });
        let window = self.sliding_window;
        // Per sequence: its first new position, the first cached position any of its queries
        // attends to, and the keys and values from there on as f32 (a view for an f32 cache;
        // a widened copy of just this window for 2-byte caches).
        let mut row0 = 0;
        let mut firsts = Vec::with_capacity(lens.len());
        for (&n, cache) in lens.iter().zip(caches.iter_mut()) {
            cache.k.extend(&k[row0 * kvr..(row0 + n) * kvr]);
            cache.v.extend(&v[row0 * kvr..(row0 + n) * kvr]);
            let pos0 = cache.len;
            cache.len += n;
            row0 += n;
            let lo = match window {
                Some(w) if w > 0 => (pos0 + 1).saturating_sub(w),
                _ => 0,
            };
            firsts.push(lo);
        }
        let views: Vec<_> = caches
            .iter()
            .zip(&firsts)
            .map(|(cache, &lo)| {
                (
                    cache.k.f32_range(lo * kvr, cache.len * kvr),
                    cache.v.f32_range(lo * kvr, cache.len * kvr),
                )
            })
            .collect();
        let scale = (hd as f32).powf(-0.5);
        let group = nh / self.num_kv_heads;
        let mut attn = vec![0f32; t * nh * hd];
        let nkv = self.num_kv_heads;
        // One task per (row, KV head): the `group` query heads that share a KV head are scored
        // together, so each cached key and value row is read once for all of them.
        attn.par_chunks_mut(group * hd)
            .enumerate()
            .for_each(|(c, out)| {
                let (r, kvh) = (c / nkv, c % nkv);
                let (s, pos) = (seq_of[r], pos_of[r]);
                let (ck, cv) = (&views[s].0[..], &views[s].1[..]);
                let lo = firsts[s];
                let first = match window {
                    Some(w) if w > 0 => (pos + 1).saturating_sub(w),
                    _ => 0,
                };
                let n = pos + 1 - first;
                // Heads kvh·group .. (kvh + 1)·group are adjacent in q's row.
                let qg = &q[r * nh * hd + kvh * group * hd..][..group * hd];
                let base = (first - lo) * kvr + kvh * hd;
                let mut scores = vec![0f32; group * n];
                moe_kernels::dot_rows_strided(qg, group, hd, &ck[base..], kvr, n, &mut scores);
                for row in scores.chunks_exact_mut(n) {
                    let mut max = f32::NEG_INFINITY;
                    for s in row.iter_mut() {
                        *s *= scale;
                        max = max.max(*s);
                    }
                    let mut sum = 0f32;
                    for s in row.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    for s in row.iter_mut() {
                        *s /= sum;
                    }
                }
                moe_kernels::weighted_sum_strided(&scores, group, n, &cv[base..], kvr, hd, out);
            });
        if let Some(gate) = gate {
            for (a, g) in attn.iter_mut().zip(&gate) {
                *a *= sigmoid(*g);
            }
        }
        self.o_proj.forward(&attn, t)
    }
}

/// Splits rows of `heads` blocks of `[first d | second d]` into two `[rows, heads * d]` arrays.
fn split_heads(x: &[f32], heads: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
    let mut a = Vec::with_capacity(x.len() / 2);
    let mut b = Vec::with_capacity(x.len() / 2);
    for block in x.chunks_exact(2 * d) {
        a.extend_from_slice(&block[..d]);
        b.extend_from_slice(&block[d..]);
    }
    debug_assert_eq!(a.len() % (heads * d), 0);
    (a, b)
}

/// The logistic function.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// SiLU-gated MLP: `down(silu(gate(x)) * up(x))`.
pub struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl Mlp {
    pub fn load(
        w: &WeightSet,
        prefix: &str,
        hidden: usize,
        inter: usize,
        names: [&str; 3],
    ) -> Result<Mlp> {
        Ok(Mlp {
            gate: Linear::load(w, &format!("{prefix}.{}", names[0]), hidden, inter, false)?,
            up: Linear::load(w, &format!("{prefix}.{}", names[1]), hidden, inter, false)?,
            down: Linear::load(w, &format!("{prefix}.{}", names[2]), inter, hidden, false)?,
        })
    }

    /// `x` is `[m, hidden]`; returns `[m, hidden]`.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let g = self.gate.forward(x, m);
        let mut u = self.up.forward(x, m);
        silu_mul(&g, &mut u);
        self.down.forward(&u, m)
    }
}

/// `u[i] = silu(g[i]) * u[i]`.
pub fn silu_mul(g: &[f32], u: &mut [f32]) {
    for (u, &g) in u.iter_mut().zip(g) {
        *u *= g / (1.0 + (-g).exp());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rotation_preserves_norm_and_matches_formula() {
        let cfg = RopeConfig {
            theta: 10000.0,
            scaling: RopeScaling::Default,
            partial_rotary_factor: 1.0,
        };
        let rope = Rope::new(&cfg, 8);
        let x: Vec<f32> = (0..16).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut y = x.clone();
        rope.apply(&mut y, 8, 5);
        // Position 5, pair 1: angle = 5 / 10000^(2/8).
        let a = 5.0f64 / 10000f64.powf(0.25);
        let (x1, x2) = (x[1] as f64, x[5] as f64);
        assert!((y[1] as f64 - (x1 * a.cos() - x2 * a.sin())).abs() < 1e-5);
        assert!((y[5] as f64 - (x2 * a.cos() + x1 * a.sin())).abs() < 1e-5);
        let n0: f32 = x.iter().map(|v| v * v).sum();
        let n1: f32 = y.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4);
        let mut z = x.clone();
        rope.apply(&mut z, 8, 0);
        assert_eq!(z, x);
    }

    #[test]
    fn rmsnorm_unit_rms() {
        let n = RmsNorm {
            weight: vec![1.0; 4],
            eps: 0.0,
        };
        let y = n.forward(&[1.0, -2.0, 3.0, -4.0, 2.0, 2.0, 2.0, 2.0]);
        for row in y.chunks(4) {
            let rms = (row.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
            assert!((rms - 1.0).abs() < 1e-6);
        }
        assert!((y[4] - 1.0).abs() < 1e-6);
    }
}
