//! The CPU KV cache ([`KvCache`]) and causal attention over it ([`attend`]).
//!
//! Invariants: compute is f32 whatever the cache stores; a 2-byte cache rounds values once, when
//! stored; scores are scaled by the shape's `scale` (`head_dim^-1/2` unless the architecture
//! says otherwise) and soft-maxed per query row in f32 (with a head's sink logit, when the layer
//! has sinks, in the maximum and the denominator but weighing no value); the `group` query
//! heads that share a KV head read each cached row once. A latent cache (no values given) holds
//! keys only: each head's values are the leading `value_dim` values of its key.

use rayon::prelude::*;

use crate::backend::{AttnShape, KvElem};

/// One of the cache's two tensors, `[tokens, kv_heads * head_dim]` in its element type (the
/// values stay empty in a latent cache).
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
/// cached positions: `ck` / `cv` start at that head's keys / values in the first attended row,
/// rows `kvr` apart, values `vd` wide (`out` is `[group, vd]`). Scores are scaled by `scale`
/// and soft-maxed in f32 with the maximum subtracted; `sinks` (one logit per head of the group,
/// gpt-oss) join the maximum and the denominator as one more position whose value is zero.
#[allow(clippy::too_many_arguments)]
pub fn attend_group(
    qg: &[f32],
    group: usize,
    hd: usize,
    vd: usize,
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
    moe_kernels::weighted_sum_strided(&scores, group, n, cv, kvr, vd, out);
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
    v: Option<&[f32]>,
    lens: &[usize],
    caches: &mut [&mut KvCache],
    shape: &AttnShape,
    sinks: Option<&[f32]>,
) -> Vec<f32> {
    debug_assert_eq!(lens.len(), caches.len());
    let (nh, hd, nkv) = (shape.num_heads, shape.head_dim, shape.num_kv_heads);
    let vd = shape.value_dim;
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
        if let Some(v) = v {
            cache.v.extend(&v[row0 * kvr..(row0 + n) * kvr]);
        }
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
            let keys = cache.k.f32_range(lo * kvr, cache.len * kvr);
            // A latent cache's values are read from its keys.
            let values = v.map(|_| cache.v.f32_range(lo * kvr, cache.len * kvr));
            (keys, values)
        })
        .collect();
    let group = nh / nkv;
    let mut attn = vec![0f32; t * nh * vd];
    // One task per (row, KV head): the `group` query heads that share a KV head are scored
    // together, so each cached key and value row is read once for all of them.
    attn.par_chunks_mut(group * vd)
        .enumerate()
        .for_each(|(c, out)| {
            let (r, kvh) = (c / nkv, c % nkv);
            let (s, pos) = (seq_of[r], pos_of[r]);
            let ck = &views[s].0[..];
            let cv = views[s].1.as_deref().unwrap_or(ck);
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
                vd,
                &ck[base..],
                &cv[base..],
                kvr,
                n,
                shape.scale,
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
        let shape = AttnShape::standard(nh, nkv, hd, None);
        // Large sinks soak up most of the mass; a very negative one changes nothing.
        let sinks = vec![2.0f32, -1.0, 4.0, -80.0];
        let mut cache = KvCache::new(KvElem::F32);
        let got = attend(
            &q,
            &k,
            Some(&v),
            &[n],
            &mut [&mut cache],
            &shape,
            Some(&sinks),
        );
        let mut plain_cache = KvCache::new(KvElem::F32);
        let plain = attend(
            &q,
            &k,
            Some(&v),
            &[n],
            &mut [&mut plain_cache],
            &shape,
            None,
        );
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

    #[test]
    fn a_latent_cache_reads_values_from_its_keys() {
        // One key head of width 6 whose leading 4 values are the values; 3 query heads; a
        // 2-byte cache; two sequences in one call, then one more row for the first.
        let (nh, hd, vd) = (3usize, 6usize, 4usize);
        let shape = AttnShape {
            value_dim: vd,
            scale: 0.37,
            ..AttnShape::standard(nh, 1, hd, None)
        };
        let val = |i: usize| (i as f32 * 0.913).cos() * 1.2;
        let lens = [4usize, 3];
        let t: usize = lens.iter().sum();
        let q: Vec<f32> = (0..t * nh * hd).map(|i| val(i + 3)).collect();
        let k: Vec<f32> = (0..t * hd).map(|i| val(2 * i + 1)).collect();
        let (mut a, mut b) = (KvCache::new(KvElem::Bf16), KvCache::new(KvElem::Bf16));
        let got = attend(&q, &k, None, &lens, &mut [&mut a, &mut b], &shape, None);
        assert_eq!(got.len(), t * nh * vd);
        assert!(
            matches!(&a.v, KvData::Bf16(v) if v.is_empty()),
            "no values are stored"
        );
        // The same attention with the values given separately, as the keys' leading values.
        let v: Vec<f32> = k.clone();
        let (mut a2, mut b2) = (KvCache::new(KvElem::Bf16), KvCache::new(KvElem::Bf16));
        let full = attend(
            &q,
            &k,
            Some(&v),
            &lens,
            &mut [&mut a2, &mut b2],
            &AttnShape {
                value_dim: hd,
                ..shape
            },
            None,
        );
        for r in 0..t {
            for h in 0..nh {
                assert_eq!(
                    got[(r * nh + h) * vd..][..vd],
                    full[(r * nh + h) * hd..][..vd],
                    "row {r} head {h}"
                );
            }
        }
        // Decode one more row of sequence 0 against its cache.
        let q1: Vec<f32> = (0..nh * hd).map(|i| val(i + 101)).collect();
        let k1: Vec<f32> = (0..hd).map(|i| val(i + 57)).collect();
        let one = attend(&q1, &k1, None, &[1], &mut [&mut a], &shape, None);
        let two = attend(
            &q1,
            &k1,
            Some(&k1),
            &[1],
            &mut [&mut a2],
            &AttnShape {
                value_dim: hd,
                ..shape
            },
            None,
        );
        for h in 0..nh {
            assert_eq!(one[h * vd..][..vd], two[h * hd..][..vd], "decode head {h}");
        }
        assert_eq!(a.len, 5);
    }
}
