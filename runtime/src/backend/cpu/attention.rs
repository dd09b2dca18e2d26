//! The CPU KV cache ([`KvCache`]) and causal attention over it ([`attend`]).
//!
//! Invariants: compute is f32 whatever the cache stores; a 2-byte cache rounds values once, when
//! stored; scores are scaled by `head_dim^-1/2` and soft-maxed per query row in f32 (with a
//! head's sink logit, when the layer has sinks, in the maximum and the denominator but weighing
//! no value); the `group` query heads that share a KV head read each cached row once.

use rayon::prelude::*;

use crate::backend::{AttnShape, KvElem};

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

/// The `group` query heads `qg` (`[group, hd]`) that share one KV head, attending over `n`
/// cached positions: `ck` / `cv` start at that head's values in the first attended row, rows
/// `kvr` apart. Scores are scaled by `scale` and soft-maxed in f32 with the maximum subtracted;
/// `sinks` (one logit per head of the group, gpt-oss) join the maximum and the denominator as
/// one more position whose value is zero.
#[allow(clippy::too_many_arguments)]
pub fn attend_group(
    qg: &[f32],
    group: usize,
    hd: usize,
    ck: &[f32],
    cv: &[f32],
    kvr: usize,
    n: usize,
    scale: f32,
    sinks: Option<&[f32]>,
    out: &mut [f32],
) {
    let mut scores = vec![0f32; group * n];
    moe_kernels::dot_rows_strided(qg, group, hd, ck, kvr, n, &mut scores);
    for (h, row) in scores.chunks_exact_mut(n).enumerate() {
        let sink = sinks.map(|s| s[h]);
        let mut max = sink.unwrap_or(f32::NEG_INFINITY);
        for s in row.iter_mut() {
            *s *= scale;
            max = max.max(*s);
        }
        let mut sum = 0f32;
        for s in row.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        if let Some(sink) = sink {
            sum += (sink - max).exp();
        }
        for s in row.iter_mut() {
            *s /= sum;
        }
    }
    moe_kernels::weighted_sum_strided(&scores, group, n, cv, kvr, hd, out);
}

/// `src` in a cache's element type, as stored bytes (what [`KvData`] holds for it).
pub fn encode_kv(elem: KvElem, src: &[f32]) -> Vec<u8> {
    match elem {
        KvElem::F32 => bytemuck::cast_slice(src).to_vec(),
        KvElem::Bf16 => src
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
            .collect(),
        KvElem::F16 => src
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes())
            .collect(),
    }
}

/// Stored cache bytes of element type `elem` widened to f32 (as attention reads them).
pub fn decode_kv(elem: KvElem, bytes: &[u8]) -> Vec<f32> {
    match elem {
        KvElem::F32 => bytemuck::pod_collect_to_vec(bytes),
        KvElem::Bf16 | KvElem::F16 => {
            let bits: Vec<u16> = bytemuck::pod_collect_to_vec(bytes);
            let mut out = vec![0f32; bits.len()];
            let w = if elem == KvElem::Bf16 {
                moe_kernels::Weights::Bf16(bytemuck::cast_slice(&bits))
            } else {
                moe_kernels::Weights::F16(bytemuck::cast_slice(&bits))
            };
            if !out.is_empty() {
                moe_kernels::row_to_f32(w, 0, out.len(), &mut out);
            }
            out
        }
    }
}

/// See [`crate::backend::Backend::attend`].
pub fn attend(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    lens: &[usize],
    caches: &mut [&mut KvCache],
    shape: &AttnShape,
    sinks: Option<&[f32]>,
) -> Vec<f32> {
    debug_assert_eq!(lens.len(), caches.len());
    let (nh, hd, nkv) = (shape.num_heads, shape.head_dim, shape.num_kv_heads);
    let kvr = nkv * hd;
    let t: usize = lens.iter().sum();
    // Row r belongs to sequence seq_of[r] at position pos_of[r].
    let mut seq_of = Vec::with_capacity(t);
    let mut pos_of = Vec::with_capacity(t);
    for (s, (&n, cache)) in lens.iter().zip(caches.iter()).enumerate() {
        seq_of.extend(std::iter::repeat_n(s, n));
        pos_of.extend(cache.len..cache.len + n);
    }
    let window = shape.sliding_window;
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
    let group = nh / nkv;
    let mut attn = vec![0f32; t * nh * hd];
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
            let sg = sinks.map(|s| &s[kvh * group..][..group]);
            attend_group(
                qg,
                group,
                hd,
                &ck[base..],
                &cv[base..],
                kvr,
                n,
                scale,
                sg,
                out,
            );
        });
    attn
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain softmax attention of one query head over `keys` / `values` rows, the sink (if any)
    /// one more logit whose value is zero.
    fn naive(q: &[f32], keys: &[&[f32]], values: &[&[f32]], sink: Option<f32>) -> Vec<f32> {
        let scale = (q.len() as f32).powf(-0.5);
        let mut logits: Vec<f64> = keys
            .iter()
            .map(|k| {
                q.iter().zip(*k).map(|(a, b)| f64::from(a * b)).sum::<f64>() * f64::from(scale)
            })
            .collect();
        if let Some(s) = sink {
            logits.push(f64::from(s));
        }
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        (0..q.len())
            .map(|d| {
                values
                    .iter()
                    .zip(&exps)
                    .map(|(v, e)| f64::from(v[d]) * e / sum)
                    .sum::<f64>() as f32
            })
            .collect()
    }

    #[test]
    fn sinks_take_probability_mass_without_a_value() {
        let (nh, nkv, hd, n) = (4usize, 2usize, 8usize, 5usize);
        let kvr = nkv * hd;
        let val = |i: usize| (i as f32 * 0.731).sin() * 1.5;
        let q: Vec<f32> = (0..n * nh * hd).map(|i| val(i + 7)).collect();
        let k: Vec<f32> = (0..n * kvr).map(|i| val(3 * i + 1)).collect();
        let v: Vec<f32> = (0..n * kvr).map(|i| val(5 * i + 2)).collect();
        let shape = AttnShape {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            sliding_window: None,
        };
        // Large sinks soak up most of the mass; a very negative one changes nothing.
        let sinks = vec![2.0f32, -1.0, 4.0, -80.0];
        let mut cache = KvCache::new(KvElem::F32);
        let got = attend(&q, &k, &v, &[n], &mut [&mut cache], &shape, Some(&sinks));
        let mut plain_cache = KvCache::new(KvElem::F32);
        let plain = attend(&q, &k, &v, &[n], &mut [&mut plain_cache], &shape, None);
        let group = nh / nkv;
        for r in 0..n {
            for h in 0..nh {
                let kvh = h / group;
                let keys: Vec<&[f32]> = (0..=r).map(|t| &k[t * kvr + kvh * hd..][..hd]).collect();
                let values: Vec<&[f32]> = (0..=r).map(|t| &v[t * kvr + kvh * hd..][..hd]).collect();
                let qh = &q[(r * nh + h) * hd..][..hd];
                let want = naive(qh, &keys, &values, Some(sinks[h]));
                let row = &got[(r * nh + h) * hd..][..hd];
                for (a, b) in row.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "row {r} head {h}: {a} vs {b}");
                }
                let p = &plain[(r * nh + h) * hd..][..hd];
                if h == 3 {
                    assert_eq!(row, p, "a sink at -80 weighs nothing");
                } else {
                    assert!(row.iter().zip(p).any(|(a, b)| (a - b).abs() > 1e-3));
                }
            }
        }
    }
}
