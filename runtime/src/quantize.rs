//! Quantization at load: turns a model's weights into the types `quantization` /
//! `resident_quantization` ask for (bf16, GGML q8_0 or q4_K), held in RAM.
//!
//! One traversal decides which tensors change: expert projections follow `quantization`;
//! attention, dense and shared-expert projections and the output head follow
//! `resident_quantization`. Routers, norms and embeddings keep their type (routing decisions and
//! lookups stay exact). A tensor whose row length is not a multiple of the block size keeps its
//! type and is reported. A dry run gives the sizes the planner needs before any weight is read.
//!
//! Invariant: the dry run and the real pass make the same decisions (they share `decide`).

use crate::error::Result;
use crate::layers::Linear;
use crate::model::{Ffn, Mixer, ModelWeights};
use crate::runconfig::Quantization;
use crate::weights::{Dtype, TensorRef};

/// What a quantization pass did (or would do).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QuantReport {
    /// Bytes the resident weights lose (source minus quantized).
    pub resident_saved_bytes: u64,
    /// Bytes the experts lose.
    pub expert_saved_bytes: u64,
    /// Tensors that keep their source type because their rows do not fit the block size.
    pub kept: Vec<String>,
    pub quantized_tensors: usize,
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
    let (n, k) = (t.shape[0] as u64, t.shape[1] as u64);
    match to {
        Dtype::Bf16 if t.dtype != Dtype::Bf16 => Some(n * k * 2),
        Dtype::Q8_0 if k % 32 == 0 && k > 0 => Some(n * k / 32 * 34),
        Dtype::Q4K if k % 256 == 0 && k > 0 => Some(n * k / 256 * 144),
        _ => None,
    }
}

/// Quantizes one tensor (or, in a dry run, only accounts for it).
fn decide(
    t: &mut TensorRef,
    to: Option<Dtype>,
    dry_run: bool,
    saved: &mut u64,
    report: &mut QuantReport,
) -> Result<()> {
    let Some(to) = to else {
        return Ok(());
    };
    if t.dtype == to {
        return Ok(());
    }
    match size_as(t, to) {
        Some(new) => {
            *saved += (t.size_bytes() as u64).saturating_sub(new);
            report.quantized_tensors += 1;
            if !dry_run {
                if let Some(q) = t.quantize(to)? {
                    *t = q;
                }
            }
        }
        None => {
            if to != Dtype::Bf16 {
                report.kept.push(t.name.clone());
            }
        }
    }
    Ok(())
}

fn linears(w: &mut ModelWeights) -> Vec<&mut Linear> {
    let mut out: Vec<&mut Linear> = Vec::new();
    for layer in &mut w.layers {
        match &mut layer.mixer {
            Mixer::Attention(a) => {
                out.extend([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj]);
            }
        }
        match &mut layer.ffn {
            Ffn::Dense(m) => out.extend([&mut m.gate, &mut m.up, &mut m.down]),
            Ffn::Moe(moe) => {
                if let Some(s) = &mut moe.shared {
                    out.extend([&mut s.mlp.gate, &mut s.mlp.up, &mut s.mlp.down]);
                }
            }
        }
    }
    out.push(&mut w.lm_head);
    out
}

/// Applies (or, with `dry_run`, sizes) the quantization of a built model.
pub fn quantize_model(
    w: &mut ModelWeights,
    experts: Quantization,
    resident: Quantization,
    dry_run: bool,
) -> Result<QuantReport> {
    let mut report = QuantReport::default();
    let (et, rt) = (target(experts), target(resident));
    let embed_name = w.embed.name.clone();
    let mut saved = 0;
    for l in linears(w) {
        // A tied head is the embedding table itself: quantizing it would also need a quantized
        // row lookup; keep it as stored.
        if l.weight.name == embed_name {
            continue;
        }
        decide(&mut l.weight, rt, dry_run, &mut saved, &mut report)?;
    }
    report.resident_saved_bytes = saved;
    let mut saved = 0;
    for e in w.experts.iter_mut().flatten() {
        for t in [&mut e.gate, &mut e.up, &mut e.down] {
            decide(t, et, dry_run, &mut saved, &mut report)?;
        }
    }
    report.expert_saved_bytes = saved;
    if !report.kept.is_empty() {
        tracing::warn!(
            "{} tensor(s) keep their stored type: rows do not fit the block size (e.g. `{}`)",
            report.kept.len(),
            report.kept[0]
        );
    }
    Ok(report)
}
