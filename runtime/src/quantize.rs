//! Quantization at load: turns a model's weights into the types `quantization` /
//! `resident_quantization` ask for (bf16, GGML q8_0 or q4_K), held in RAM.
//!
//! One traversal decides which tensors change: expert projections follow `quantization` (an
//! expert's bias vectors keep their type); attention, dense and shared-expert projections and
//! the output head follow `resident_quantization`. Routers, norms and embeddings keep their type
//! (routing decisions and lookups stay exact). A tensor whose row length is not a multiple of
//! the block size keeps its type and is reported. A dry run gives the sizes the planner needs
//! before any weight is read.
//!
//! The real pass quantizes the chosen tensors in parallel (tensors across threads, and each
//! tensor's rows across threads); the quantizers are in `moe_kernels::quant`.
//!
//! Invariants: the dry run and the real pass make the same decisions (they share `decide`);
//! the result does not depend on the thread count or the order tensors finish in.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::layers::Linear;
use crate::model::{DecoderLayer, Ffn, Mixer, ModelWeights};
use crate::store::PartRole;
use crate::weights::{Dtype, TensorRef};

/// How weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Quantization {
    /// As stored in the files (`"none"`).
    #[default]
    #[serde(rename = "none")]
    None,
    /// bf16 (`"bf16"`): f32 and f16 weights converted.
    #[serde(rename = "bf16")]
    Bf16,
    /// GGML Q8_0, 8.5 bits per weight (`"q8_0"`).
    #[serde(rename = "q8_0")]
    Q8_0,
    /// GGML Q4_K, 4.5 bits per weight (`"q4_k"`).
    #[serde(rename = "q4_k")]
    Q4K,
}

impl std::str::FromStr for Quantization {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Quantization::None),
            "bf16" => Ok(Quantization::Bf16),
            "q8_0" => Ok(Quantization::Q8_0),
            "q4_k" => Ok(Quantization::Q4K),
            other => Err(format!(
                "`{other}` is not a quantization (none, bf16, q8_0, q4_k)"
            )),
        }
    }
}

/// What a quantization pass did (or would do).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QuantReport {
    /// Bytes the resident weights lose (source minus quantized).
    pub resident_saved_bytes: u64,
    /// Bytes the experts lose.
    pub expert_saved_bytes: u64,
    /// Tensors that keep their source type because their rows do not fit the block size.
    pub kept: Vec<String>,
    /// Tensors asked to become q4_k whose rows do not fit its 256-value blocks: q8_0 instead.
    pub fallback: Vec<String>,
    pub quantized_tensors: usize,
    /// Pre-quantized weights among them (converted whatever `quantization` says).
    pub prequant_tensors: usize,
    /// Bytes conversions add to the resident weights and to the experts (a pre-quantized
    /// weight can grow: its scales widened to f32 beside the codes, or dequantized to f32 when
    /// its rows do not fall on whole blocks).
    pub resident_added_bytes: u64,
    pub expert_added_bytes: u64,
    /// What converting pre-quantized weights to the requested quantization changed against
    /// their exact values (the real pass only; None when nothing lossy was done).
    pub prequant_error: Option<crate::weights::prequant::ErrorSummary>,
}

/// What the expert projections become: one type for every expert, or per-expert precision
/// tiers (the hot set in one type, the rest in another).
#[derive(Clone, Debug, PartialEq)]
pub enum ExpertTypes {
    Uniform(Quantization),
    Tiered {
        hot: Quantization,
        cold: Quantization,
        /// Per layer, per expert: whether it is hot.
        hot_set: Vec<Vec<bool>>,
    },
}

impl ExpertTypes {
    /// The type of expert `expert` of `layer`.
    pub fn of(&self, layer: usize, expert: usize) -> Quantization {
        match self {
            ExpertTypes::Uniform(q) => *q,
            ExpertTypes::Tiered { hot, cold, hot_set } => {
                let is_hot = hot_set
                    .get(layer)
                    .and_then(|l| l.get(expert))
                    .copied()
                    .unwrap_or(false);
                if is_hot {
                    *hot
                } else {
                    *cold
                }
            }
        }
    }

    /// Every type an expert may take, hot first, without repeats (what a cache must hold).
    pub fn held(&self) -> Vec<Quantization> {
        match self {
            ExpertTypes::Uniform(q) => vec![*q],
            ExpertTypes::Tiered { hot, cold, .. } if hot == cold => vec![*hot],
            ExpertTypes::Tiered { hot, cold, .. } => vec![*hot, *cold],
        }
    }

    /// Whether any expert changes type.
    pub fn changes_anything(&self) -> bool {
        self.held().iter().any(|q| *q != Quantization::None)
    }

    /// Hot experts per layer: the `fraction` most popular of each layer (ties to the lower
    /// index; experts never routed are never hot). `counts` is the recorded popularity.
    pub fn hot_set_from(counts: &[Vec<u64>], fraction: f64) -> Vec<Vec<bool>> {
        counts
            .iter()
            .map(|layer| {
                let n = layer.len();
                let take = ((n as f64 * fraction).ceil() as usize).min(n);
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by(|&a, &b| layer[b].cmp(&layer[a]).then(a.cmp(&b)));
                let mut hot = vec![false; n];
                for &e in order.iter().take(take) {
                    if layer[e] > 0 {
                        hot[e] = true;
                    }
                }
                hot
            })
            .collect()
    }
}

/// The type tensor `t` takes under `q` (its own type when `q` changes nothing or its rows do
/// not fit the block size; q4_k rows that are not whole 256-value blocks take q8_0, see
/// [`fitting`]). A pre-quantized weight always changes type: to `q`'s when it applies, else
/// to the type that holds it without loss.
pub fn target_dtype(t: &TensorRef, q: Quantization) -> Dtype {
    if let Some(lossless) = t.lossless_dtype() {
        return prequant_target(t, target(q), lossless);
    }
    match target(q).and_then(|to| fitting(t, to)) {
        Some(to) if t.dtype != to => to,
        _ => t.dtype,
    }
}

/// The type a float weight asked to become `to` takes: `to` when its rows fit the blocks,
/// else for q4_k the 32-value blocks of q8_0 (as llama.cpp falls back to a smaller block for
/// such rows: GLM-4.5-Air's experts of 1408, gpt-oss's of 2880), else None (it keeps its type).
fn fitting(t: &TensorRef, to: Dtype) -> Option<Dtype> {
    if size_as(t, to).is_some() {
        Some(to)
    } else if to == Dtype::Q4K && size_as(t, Dtype::Q8_0).is_some() {
        Some(Dtype::Q8_0)
    } else {
        None
    }
}

/// A pre-quantized weight's type: `to` (the requested quantization's) when its rows fit it,
/// else `lossless`, the type that holds it without loss.
fn prequant_target(t: &TensorRef, to: Option<Dtype>, lossless: Dtype) -> Dtype {
    match to {
        Some(to) if t.converted_row_bytes(to).is_some() => to,
        _ => lossless,
    }
}

/// The type part `role` of an expert takes under `q`: a projection follows `q` (see
/// [`target_dtype`]); a bias keeps its stored type (a pre-quantized one its lossless type).
pub fn expert_part_target(t: &TensorRef, role: PartRole, q: Quantization) -> Dtype {
    if role.is_bias() {
        target_dtype(t, Quantization::None)
    } else {
        target_dtype(t, q)
    }
}

/// The type a resident tensor takes: projections follow `resident`, kept tensors keep their
/// stored type (a pre-quantized one its lossless type: routers stay exact).
pub fn resident_target(t: &TensorRef, role: ResidentRole, resident: Quantization) -> Dtype {
    match role {
        ResidentRole::Projection => target_dtype(t, resident),
        ResidentRole::Kept => target_dtype(t, Quantization::None),
    }
}

fn target(q: Quantization) -> Option<Dtype> {
    match q {
        Quantization::None => None,
        Quantization::Bf16 => Some(Dtype::Bf16),
        Quantization::Q8_0 => Some(Dtype::Q8_0),
        Quantization::Q4K => Some(Dtype::Q4K),
    }
}

/// Bytes of a `[n, k]` weight in `to`, or None when its rows do not fit the block size.
fn size_as(t: &TensorRef, to: Dtype) -> Option<u64> {
    if t.shape.len() != 2 {
        return None;
    }
    if t.is_prequant() {
        return t
            .converted_row_bytes(to)
            .map(|r| r as u64 * t.shape[0] as u64);
    }
    let (n, k) = (t.shape[0] as u64, t.shape[1] as u64);
    match to {
        Dtype::Bf16 if t.dtype != Dtype::Bf16 => Some(n * k * 2),
        Dtype::Q8_0 if k % 32 == 0 && k > 0 => Some(n * k / 32 * 34),
        Dtype::Q4K if k % 256 == 0 && k > 0 => Some(n * k / 256 * 144),
        _ => None,
    }
}

/// Accounts for one tensor: the type it changes to, if any (rows that do not fit the block size
/// keep the source type and are reported).
fn decide(
    t: &TensorRef,
    to: Option<Dtype>,
    (saved, added): (&mut u64, &mut u64),
    report: &mut QuantReport,
) -> Option<Dtype> {
    if let Some(lossless) = t.lossless_dtype() {
        // Always converted: to the requested type when it applies, else without loss.
        let new_to = prequant_target(t, to, lossless);
        let new = size_as(t, new_to).unwrap_or(t.size_bytes() as u64);
        *added += new.saturating_sub(t.size_bytes() as u64);
        *saved += (t.size_bytes() as u64).saturating_sub(new);
        report.quantized_tensors += 1;
        report.prequant_tensors += 1;
        if to.is_some_and(|to| to != new_to) {
            report.kept.push(t.name.clone());
        }
        return Some(new_to);
    }
    let to = to?;
    if t.dtype == to {
        return None;
    }
    match fitting(t, to) {
        Some(fit) if fit == t.dtype => None,
        Some(fit) => {
            let new = size_as(t, fit).unwrap_or(t.size_bytes() as u64);
            *saved += (t.size_bytes() as u64).saturating_sub(new);
            report.quantized_tensors += 1;
            if fit != to {
                report.fallback.push(t.name.clone());
            }
            Some(fit)
        }
        None => {
            if to != Dtype::Bf16 {
                report.kept.push(t.name.clone());
            }
            None
        }
    }
}

/// How a resident tensor is treated by quantization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResidentRole {
    /// A projection outside the experts: follows `resident_quantization`.
    Projection,
    /// Keeps its stored type: embeddings, routers, shared-expert gates, a tied head.
    Kept,
}

/// Every projection outside the experts (attention, dense and shared-expert MLPs, the head),
/// in model order.
pub(crate) fn linears(w: &mut ModelWeights) -> Vec<&mut Linear> {
    linears_of(&mut w.layers, &mut w.lm_head)
}

/// [`linears`] over the fields it reads, leaving the experts free to borrow beside them.
fn linears_of<'a>(layers: &'a mut [DecoderLayer], lm_head: &'a mut Linear) -> Vec<&'a mut Linear> {
    resident_linears(layers, lm_head)
        .into_iter()
        .filter(|(_, role)| *role == ResidentRole::Projection)
        .map(|(l, _)| l)
        .collect()
}

/// Every `Linear` outside the experts with its role, in model order (routers and
/// shared-expert gates included).
fn resident_linears<'a>(
    layers: &'a mut [DecoderLayer],
    lm_head: &'a mut Linear,
) -> Vec<(&'a mut Linear, ResidentRole)> {
    use ResidentRole::{Kept, Projection};
    let mut out: Vec<(&mut Linear, ResidentRole)> = Vec::new();
    for layer in layers {
        match &mut layer.mixer {
            Mixer::Attention(a) => {
                out.extend(
                    [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj]
                        .map(|l| (l, Projection)),
                );
            }
            Mixer::Latent(a) => out.extend(a.linears_mut().into_iter().map(|l| (l, Projection))),
            Mixer::Linear(d) => {
                out.extend([&mut d.in_proj_qkvz, &mut d.out_proj].map(|l| (l, Projection)));
                // Its rows set each head's write strength and decay: kept exact, like a router.
                out.push((&mut d.in_proj_ba, Kept));
            }
        }
        match &mut layer.ffn {
            Ffn::Dense(m) => {
                out.extend([&mut m.gate, &mut m.up, &mut m.down].map(|l| (l, Projection)))
            }
            Ffn::Moe(moe) => {
                out.push((&mut moe.router.gate, Kept));
                if let Some(s) = &mut moe.shared {
                    out.extend(
                        [&mut s.mlp.gate, &mut s.mlp.up, &mut s.mlp.down].map(|l| (l, Projection)),
                    );
                    if let Some(g) = &mut s.gate {
                        out.push((g, Kept));
                    }
                }
            }
        }
    }
    out.push((lm_head, Projection));
    out
}

/// Every weight tensor outside the experts that the model reads through a view, with its role,
/// in model order: the embedding table first, then per layer, then the head. A head tied to
/// the embedding is listed (as `Kept`) with the embedding's name.
pub(crate) fn resident_tensors(w: &mut ModelWeights) -> Vec<(&mut TensorRef, ResidentRole)> {
    resident_tensors_of(&mut w.embed, &mut w.layers, &mut w.lm_head)
}

/// [`resident_tensors`] over the fields it reads, leaving the experts free to borrow beside them.
fn resident_tensors_of<'a>(
    embed: &'a mut TensorRef,
    layers: &'a mut [DecoderLayer],
    lm_head: &'a mut Linear,
) -> Vec<(&'a mut TensorRef, ResidentRole)> {
    let embed_name = embed.name.clone();
    let mut out = vec![(embed, ResidentRole::Kept)];
    for (l, role) in resident_linears(layers, lm_head) {
        let role = if l.weight.name == embed_name {
            ResidentRole::Kept
        } else {
            role
        };
        out.push((&mut l.weight, role));
    }
    out
}

/// Applies (or, with `dry_run`, sizes) the quantization of a built model.
pub fn quantize_model(
    w: &mut ModelWeights,
    experts: &ExpertTypes,
    resident: Quantization,
    dry_run: bool,
) -> Result<QuantReport> {
    let mut report = QuantReport::default();
    let rt = target(resident);
    let embed_name = w.embed.name.clone();
    // Every tensor that changes, with its new type, in model order.
    let mut jobs: Vec<(&mut TensorRef, Dtype)> = Vec::new();
    let (mut saved, mut added) = (0, 0);
    for (t, role) in resident_tensors_of(&mut w.embed, &mut w.layers, &mut w.lm_head) {
        // A tied head is the embedding table itself: quantizing it would also need a quantized
        // row lookup; keep it as stored. Kept tensors keep their type (a pre-quantized one is
        // converted without loss).
        let to = match role {
            ResidentRole::Projection if t.name != embed_name => rt,
            _ if t.is_prequant() => None,
            _ => continue,
        };
        if let Some(to) = decide(t, to, (&mut saved, &mut added), &mut report) {
            jobs.push((t, to));
        }
    }
    report.resident_saved_bytes = saved;
    report.resident_added_bytes = added;
    let (mut saved, mut added) = (0, 0);
    for (l, layer) in w.experts.iter_mut().enumerate() {
        for (i, e) in layer.iter_mut().enumerate() {
            let et = target(experts.of(l, i));
            for (role, t) in e.with_roles_mut() {
                // Biases stay at full precision (a pre-quantized one is still converted).
                let to = if role.is_bias() { None } else { et };
                if let Some(to) = decide(t, to, (&mut saved, &mut added), &mut report) {
                    jobs.push((t, to));
                }
            }
        }
    }
    report.expert_saved_bytes = saved;
    report.expert_added_bytes = added;
    if !report.fallback.is_empty() {
        tracing::info!(
            "{} tensor(s) take q8_0 instead of q4_k: rows do not fit q4_k's 256-value blocks \
             (e.g. `{}`)",
            report.fallback.len(),
            report.fallback[0]
        );
    }
    if !report.kept.is_empty() {
        tracing::warn!(
            "{} tensor(s) keep their stored type (pre-quantized ones: their exact values): rows \
             do not fit the block size (e.g. `{}`)",
            report.kept.len(),
            report.kept[0]
        );
    }
    if !dry_run {
        // Tensors run in parallel, and each splits its rows across threads too, so small
        // tensors (attention, narrow experts) keep every core busy. Every tensor's result is
        // independent of the others and of the thread count; the first error in model order
        // is the one reported.
        let error = crate::weights::prequant::ConversionError::default();
        let results: Vec<Result<()>> = jobs
            .into_par_iter()
            .map(|(t, to)| {
                if let Some(q) = t.quantize_measured(to, Some(&error))? {
                    // The source is no longer read: let its pages leave the resident set.
                    t.release_pages();
                    *t = q;
                }
                Ok(())
            })
            .collect();
        results.into_iter().collect::<Result<()>>()?;
        report.prequant_error = error.summary();
        if let Some(e) = report.prequant_error {
            tracing::info!(
                "pre-quantized weights converted at load: {e} against their exact values"
            );
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::Storage;
    use std::sync::Arc;

    /// A zero f32 weight `[n, k]` held in memory.
    fn weight(n: usize, k: usize) -> TensorRef {
        let len = n * k * 4;
        TensorRef::in_storage(
            format!("w{n}x{k}"),
            Arc::new(std::path::PathBuf::from("/m/model.safetensors")),
            Dtype::F32,
            vec![n, k],
            Arc::new(Storage::Words {
                words: vec![0u64; len.div_ceil(8)],
                len,
            }),
            0,
            len,
        )
    }

    #[test]
    fn q4_k_rows_that_are_not_whole_blocks_take_q8_0() {
        // Whole 256-value blocks: q4_k. GLM-4.5-Air's 1408 (44 blocks of 32): q8_0. Rows of 100
        // fit neither: the stored type.
        assert_eq!(target_dtype(&weight(4, 512), Quantization::Q4K), Dtype::Q4K);
        assert_eq!(
            target_dtype(&weight(4, 1408), Quantization::Q4K),
            Dtype::Q8_0
        );
        assert_eq!(target_dtype(&weight(4, 100), Quantization::Q4K), Dtype::F32);
        // q8_0 itself falls back to nothing.
        assert_eq!(
            target_dtype(&weight(4, 100), Quantization::Q8_0),
            Dtype::F32
        );

        let mut report = QuantReport::default();
        let (mut saved, mut added) = (0, 0);
        for (w, want) in [
            (weight(4, 512), Some(Dtype::Q4K)),
            (weight(4, 1408), Some(Dtype::Q8_0)),
            (weight(4, 100), None),
        ] {
            let got = decide(&w, Some(Dtype::Q4K), (&mut saved, &mut added), &mut report);
            assert_eq!(got, want, "{}", w.name);
        }
        assert_eq!(report.fallback, vec!["w4x1408".to_string()]);
        assert_eq!(report.kept, vec!["w4x100".to_string()]);
        assert_eq!(report.quantized_tensors, 2);
        // f32 -> q4_k (144 bytes per 256) and f32 -> q8_0 (34 bytes per 32).
        let want_saved = (4 * 512 * 4 - 4 * 2 * 144) + (4 * 1408 * 4 - 4 * 44 * 34);
        assert_eq!(saved, want_saved as u64);
    }
}
