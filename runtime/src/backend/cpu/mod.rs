//! The CPU backend: activations, weights and per-sequence state in host memory, computed by
//! `moe_kernels` and the loops here. Weights stay where the loader put them (mapped files, the
//! cache or converted buffers): uploading is a move.
//!
//! Invariants: every op is the code the model ran before the backend seam, unchanged (the parity
//! suite pins it); parallel ops split work over the current rayon pool without changing results;
//! nothing here allocates per weight (views only).

pub mod attention;
pub mod deltanet;
pub mod matmul;
pub mod route;

use std::borrow::Cow;
use std::ops::Range;

use rayon::prelude::*;

pub use attention::{KvCache, KvData};
pub use deltanet::LinearState;
pub use matmul::{activation_path_covers, bf16_activations_supported, Input};

use crate::backend::{
    Activations, AttnShape, Backend, DeltaNetParams, Glu, HeadBlocks, KvElem, RouterRule, Routing,
};
use crate::config::Rope;
use crate::error::Result;
use crate::weights::TensorRef;

/// Host compute under an `activations` setting; `Cpu::default()` is the exact f32 path.
#[derive(Clone, Copy, Debug)]
pub struct Cpu {
    pub activations: Activations,
}

impl Default for Cpu {
    fn default() -> Cpu {
        Cpu::new(Activations::F32)
    }
}

impl Cpu {
    pub fn new(activations: Activations) -> Cpu {
        Cpu { activations }
    }
}

/// RMSNorm of every `d`-wide row of `x` in place.
pub fn rms_norm_rows(x: &mut [f32], w: &[f32], d: usize, eps: f32) {
    for row in x.chunks_exact_mut(d) {
        let ss: f32 = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let r = 1.0 / (ss + eps).sqrt();
        for (v, w) in row.iter_mut().zip(w) {
            *v = *w * (*v * r);
        }
    }
}

/// The logistic function.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `u[i] = silu(g[i]) * u[i]`.
pub fn silu_mul(g: &[f32], u: &mut [f32]) {
    for (u, &g) in u.iter_mut().zip(g) {
        *u *= g / (1.0 + (-g).exp());
    }
}

/// `up = act(gate) * up` for any [`Glu`].
pub fn glu(g: &[f32], u: &mut [f32], kind: Glu) {
    match kind {
        Glu::SwiGlu => silu_mul(g, u),
        Glu::ClampedSwiGlu { limit, alpha } => {
            for (u, &g) in u.iter_mut().zip(g) {
                let g = g.min(limit);
                let up = u.clamp(-limit, limit);
                *u = (up + 1.0) * g * sigmoid(alpha * g);
            }
        }
    }
}

/// `out[r] += sigmoid(gate[r]) * y[r]` for `width`-wide rows (the backend's `add_gated_rows`).
pub fn add_gated_rows(out: &mut [f32], y: &[f32], gate: &[f32], width: usize) {
    for ((o, yr), g) in out
        .chunks_exact_mut(width)
        .zip(y.chunks_exact(width))
        .zip(gate)
    {
        let sig = 1.0 / (1.0 + (-g).exp());
        for (o, y) in o.iter_mut().zip(yr) {
            *o += sig * y;
        }
    }
}

/// Adds `b` to every `b.len()`-wide row of `x` (a matmul's bias).
pub fn add_bias_rows(x: &mut [f32], b: &[f32]) {
    for row in x.chunks_exact_mut(b.len()) {
        for (o, b) in row.iter_mut().zip(b) {
            *o += b;
        }
    }
}

/// `x = clamp(x, -limit, limit)` (NaN stays NaN).
pub fn clamp(x: &mut [f32], limit: f32) {
    for v in x.iter_mut() {
        *v = v.clamp(-limit, limit);
    }
}

/// Splits every `2d`-wide block of `x` into its first and second halves, gathered.
pub fn split_halves(x: &[f32], d: usize) -> (Vec<f32>, Vec<f32>) {
    split_heads(x, d, d)
}

/// Rows of `heads` blocks `[a values | b values]` split into `[rows, heads * a]` and
/// `[rows, heads * b]`.
pub fn split_heads(x: &[f32], a: usize, b: usize) -> (Vec<f32>, Vec<f32>) {
    let heads = x.len() / (a + b).max(1);
    let mut first = Vec::with_capacity(heads * a);
    let mut second = Vec::with_capacity(heads * b);
    for block in x.chunks_exact(a + b) {
        first.extend_from_slice(&block[..a]);
        second.extend_from_slice(&block[a..]);
    }
    (first, second)
}

/// The inverse of [`split_heads`].
pub fn join_heads(x: &[f32], y: &[f32], a: usize, b: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len() + y.len());
    for (xa, yb) in x.chunks_exact(a.max(1)).zip(y.chunks_exact(b.max(1))) {
        out.extend_from_slice(&xa[..a]);
        out.extend_from_slice(&yb[..b]);
    }
    out
}

/// [`crate::backend::Backend::head_matmul`] with `row(i, out)` writing row `i` of the weight as
/// f32: per head, each row of its block is read once; a product sums in ascending order of the
/// summed index, in f32.
pub fn head_matmul_rows(
    x: &[f32],
    rows: usize,
    blocks: &HeadBlocks,
    transposed: bool,
    row: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let HeadBlocks {
        heads,
        stride,
        offset,
        len,
        cols,
    } = *blocks;
    let (x_width, out_width) = if transposed { (len, cols) } else { (cols, len) };
    let per_head: Vec<Vec<f32>> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let mut acc = vec![0f32; rows * out_width];
            let mut w = vec![0f32; cols];
            for o in 0..len {
                row(h * stride + offset + o, &mut w);
                for r in 0..rows {
                    let xr = &x[(r * heads + h) * x_width..][..x_width];
                    let out = &mut acc[r * out_width..][..out_width];
                    if transposed {
                        let xo = xr[o];
                        for (a, wc) in out.iter_mut().zip(&w) {
                            *a += xo * wc;
                        }
                    } else {
                        out[o] = xr.iter().zip(&w).fold(0f32, |s, (a, b)| s + a * b);
                    }
                }
            }
            acc
        })
        .collect();
    let mut out = vec![0f32; rows * heads * out_width];
    for (h, acc) in per_head.iter().enumerate() {
        for r in 0..rows {
            out[(r * heads + h) * out_width..][..out_width]
                .copy_from_slice(&acc[r * out_width..][..out_width]);
        }
    }
    out
}

/// Rotates every `head_dim`-wide head of `row` for absolute position `pos`: over the first
/// `rot_dim` values of each head, pairs `(i, i + rot_dim / 2)` (rotate-half) or, for an
/// interleaved rope, `(2i, 2i + 1)`, both turned by frequency `i`.
pub fn rope_row(rope: &Rope, row: &mut [f32], head_dim: usize, pos: usize) {
    let half = rope.rot_dim / 2;
    let (cos, sin): (Vec<f32>, Vec<f32>) = rope
        .inv_freq
        .iter()
        .map(|f| {
            let a = f * pos as f32;
            (
                (a as f64).cos() as f32 * rope.attention_scaling,
                (a as f64).sin() as f32 * rope.attention_scaling,
            )
        })
        .unzip();
    for head in row.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let (a, b) = if rope.interleaved {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + half)
            };
            let x1 = head[a];
            let x2 = head[b];
            head[a] = x1 * cos[i] - x2 * sin[i];
            head[b] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

impl Backend for Cpu {
    type Weight = TensorRef;
    type Vector = Vec<f32>;
    type Act = Vec<f32>;
    type Kv = KvCache;
    type Recurrent = LinearState;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn upload_weight(&self, t: TensorRef) -> Result<TensorRef> {
        Ok(t)
    }

    fn upload_vector(&self, v: Vec<f32>) -> Result<Vec<f32>> {
        Ok(v)
    }

    fn act_from_host(&self, v: Vec<f32>) -> Vec<f32> {
        v
    }

    fn to_host<'a>(&self, x: &'a Vec<f32>) -> Cow<'a, [f32]> {
        Cow::Borrowed(x)
    }

    fn embed(&self, table: &TensorRef, ids: &[u32], width: usize) -> Vec<f32> {
        let mut x = vec![0f32; ids.len() * width];
        let w = table.weights();
        for (row, &id) in x.chunks_exact_mut(width).zip(ids) {
            moe_kernels::row_to_f32(w, id as usize, width, row);
        }
        x
    }

    fn matmul(
        &self,
        x: &Vec<f32>,
        rows: usize,
        w: &TensorRef,
        n_in: usize,
        n_out: usize,
        bias: Option<&Vec<f32>>,
    ) -> Vec<f32> {
        let mut out = vec![0f32; rows * n_out];
        let wk = w.weights();
        Input::new(x, rows, n_in, self.activations, &[wk]).matmul(wk, n_out, &mut out, true);
        if let Some(b) = bias {
            add_bias_rows(&mut out, b);
        }
        out
    }

    fn rms_norm(&self, x: &mut Vec<f32>, w: &Vec<f32>, width: usize, eps: f32) {
        rms_norm_rows(x, w, width, eps)
    }

    fn copy(&self, x: &Vec<f32>) -> Vec<f32> {
        x.clone()
    }

    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>) {
        for (a, b) in x.iter_mut().zip(y) {
            *a += b;
        }
    }

    fn take_rows(&self, x: &Vec<f32>, width: usize, ranges: &[Range<usize>]) -> Vec<f32> {
        let mut out = Vec::with_capacity(ranges.iter().map(|r| r.len()).sum::<usize>() * width);
        for r in ranges {
            out.extend_from_slice(&x[r.start * width..r.end * width]);
        }
        out
    }

    fn split_halves(&self, x: &Vec<f32>, d: usize) -> (Vec<f32>, Vec<f32>) {
        split_halves(x, d)
    }

    fn split_heads(&self, x: &Vec<f32>, a: usize, b: usize) -> (Vec<f32>, Vec<f32>) {
        split_heads(x, a, b)
    }

    fn join_heads(&self, x: &Vec<f32>, y: &Vec<f32>, a: usize, b: usize) -> Vec<f32> {
        join_heads(x, y, a, b)
    }

    fn head_matmul(
        &self,
        x: &Vec<f32>,
        rows: usize,
        w: &TensorRef,
        blocks: &HeadBlocks,
        transposed: bool,
    ) -> Vec<f32> {
        if transposed {
            let wk = w.weights();
            return head_matmul_rows(x, rows, blocks, true, |i, out| {
                moe_kernels::row_to_f32(wk, i, blocks.cols, out)
            });
        }
        // Not transposed, each head is an ordinary product with its row block: the matmul
        // kernels read the weight's own type (SIMD, the activation setting applied).
        let HeadBlocks {
            heads,
            stride,
            offset,
            len,
            cols,
        } = *blocks;
        let mut out = vec![0f32; rows * heads * len];
        let per_head: Vec<Vec<f32>> = (0..heads)
            .map(|h| {
                let xh: Vec<f32> = (0..rows)
                    .flat_map(|r| x[(r * heads + h) * cols..][..cols].iter().copied())
                    .collect();
                let wh = w.narrow(h * stride + offset, len);
                self.matmul(&xh, rows, &wh, cols, len, None)
            })
            .collect();
        for (h, yh) in per_head.iter().enumerate() {
            for r in 0..rows {
                out[(r * heads + h) * len..][..len].copy_from_slice(&yh[r * len..][..len]);
            }
        }
        out
    }

    fn clamp(&self, x: &mut Vec<f32>, limit: f32) {
        clamp(x, limit)
    }

    fn rope(
        &self,
        q: &mut Vec<f32>,
        k: &mut Vec<f32>,
        head_dim: usize,
        positions: &[usize],
        rope: &Rope,
    ) {
        let rows = positions.len().max(1);
        let (qw, kw) = (q.len() / rows, k.len() / rows);
        q.par_chunks_mut(qw)
            .zip(k.par_chunks_mut(kw))
            .zip(positions.par_iter())
            .for_each(|((qr, kr), &pos)| {
                rope_row(rope, qr, head_dim, pos);
                rope_row(rope, kr, head_dim, pos);
            });
    }

    fn mul_sigmoid(&self, x: &mut Vec<f32>, gate: &Vec<f32>) {
        for (a, g) in x.iter_mut().zip(gate) {
            *a *= sigmoid(*g);
        }
    }

    fn glu(&self, gate: &Vec<f32>, up: &mut Vec<f32>, kind: Glu) {
        glu(gate, up, kind)
    }

    fn add_gated_rows(&self, out: &mut Vec<f32>, y: &Vec<f32>, gate: &Vec<f32>, width: usize) {
        add_gated_rows(out, y, gate, width)
    }

    fn route(
        &self,
        logits: Vec<f32>,
        rule: &RouterRule,
        selection_bias: Option<&Vec<f32>>,
    ) -> Routing {
        route::route(logits, rule, selection_bias.map(|b| &b[..]))
    }

    fn kv_new(&self, elem: KvElem) -> KvCache {
        KvCache::new(elem)
    }

    fn kv_len(&self, kv: &KvCache) -> usize {
        kv.len
    }

    fn kv_truncate(&self, kv: &mut KvCache, len: usize, row: usize) {
        kv.truncate(len, row)
    }

    fn kv_bytes(&self, kv: &KvCache) -> usize {
        kv.size_bytes()
    }

    fn attend(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: Option<&Vec<f32>>,
        lens: &[usize],
        caches: &mut [&mut KvCache],
        shape: &AttnShape,
        sinks: Option<&Vec<f32>>,
    ) -> Vec<f32> {
        attention::attend(
            q,
            k,
            v.map(Vec::as_slice),
            lens,
            caches,
            shape,
            sinks.map(Vec::as_slice),
        )
    }

    fn recurrent_new(&self, conv: usize, ssm: usize) -> LinearState {
        LinearState {
            conv: vec![0.0; conv],
            ssm: vec![0.0; ssm],
        }
    }

    fn recurrent_bytes(&self, st: &LinearState) -> usize {
        st.size_bytes()
    }

    fn delta_net(
        &self,
        qkvz: &Vec<f32>,
        ba: &Vec<f32>,
        p: &DeltaNetParams<'_, Cpu>,
        lens: &[usize],
        states: &mut [&mut LinearState],
    ) -> Vec<f32> {
        deltanet::delta_net(qkvz, ba, p, lens, states)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RopeConfig, RopeScaling};

    fn wave(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7 + seed * 13) as f32 * 0.377).sin() * 1.3)
            .collect()
    }

    #[test]
    fn interleaved_rope_is_rotate_half_over_deinterleaved_pairs() {
        let cfg = RopeConfig {
            theta: 10000.0,
            scaling: RopeScaling::Default,
            partial_rotary_factor: 1.0,
        };
        let (hd, heads) = (8usize, 3usize);
        let half_rope = Rope::new(&cfg, hd);
        let mut pair_rope = Rope::new(&cfg, hd);
        pair_rope.interleaved = true;
        let x = wave(hd * heads, 1);
        // Even values then odd values of each head: the order transformers' interleaved rope
        // leaves them in.
        let deinterleave = |v: &[f32]| -> Vec<f32> {
            v.chunks_exact(hd)
                .flat_map(|h| {
                    let evens = h.iter().step_by(2).copied();
                    evens
                        .chain(h.iter().skip(1).step_by(2).copied())
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        for pos in [0usize, 3, 77] {
            let mut a = x.clone();
            rope_row(&pair_rope, &mut a, hd, pos);
            let mut b = deinterleave(&x);
            rope_row(&half_rope, &mut b, hd, pos);
            assert_eq!(deinterleave(&a), b, "position {pos}");
        }
    }

    #[test]
    fn split_and_join_heads_are_inverse() {
        let (a, b, heads, rows) = (5usize, 3usize, 4usize, 2usize);
        let x = wave(rows * heads * (a + b), 2);
        let (first, second) = split_heads(&x, a, b);
        assert_eq!(
            (first.len(), second.len()),
            (rows * heads * a, rows * heads * b)
        );
        // Head 1 of row 1: its `a` values, then its `b` values.
        let h = heads + 1;
        assert_eq!(first[h * a..][..a], x[h * (a + b)..][..a]);
        assert_eq!(second[h * b..][..b], x[h * (a + b) + a..][..b]);
        assert_eq!(join_heads(&first, &second, a, b), x);
    }

    #[test]
    fn head_matmul_uses_each_heads_block_of_rows() {
        let (heads, stride, cols, rows) = (3usize, 7usize, 5usize, 2usize);
        let w = wave(heads * stride * cols, 3);
        let blocks = HeadBlocks {
            heads,
            stride,
            offset: 2,
            len: 4,
            cols,
        };
        let weight = |r: usize, c: usize| f64::from(w[r * cols + c]);
        // Not transposed: x [rows, heads * cols] -> [rows, heads * len].
        let x = wave(rows * heads * cols, 4);
        let got = head_matmul_rows(&x, rows, &blocks, false, |i, out| {
            out.copy_from_slice(&w[i * cols..][..cols])
        });
        for r in 0..rows {
            for h in 0..heads {
                for o in 0..4 {
                    let want: f64 = (0..cols)
                        .map(|c| {
                            f64::from(x[(r * heads + h) * cols + c]) * weight(h * stride + 2 + o, c)
                        })
                        .sum();
                    let g = got[(r * heads + h) * 4 + o];
                    assert!(
                        (f64::from(g) - want).abs() < 1e-5,
                        "{r} {h} {o}: {g} vs {want}"
                    );
                }
            }
        }
        // Transposed: x [rows, heads * len] -> [rows, heads * cols].
        let x = wave(rows * heads * 4, 5);
        let got = head_matmul_rows(&x, rows, &blocks, true, |i, out| {
            out.copy_from_slice(&w[i * cols..][..cols])
        });
        for r in 0..rows {
            for h in 0..heads {
                for c in 0..cols {
                    let want: f64 = (0..4)
                        .map(|o| {
                            f64::from(x[(r * heads + h) * 4 + o]) * weight(h * stride + 2 + o, c)
                        })
                        .sum();
                    let g = got[(r * heads + h) * cols + c];
                    assert!(
                        (f64::from(g) - want).abs() < 1e-5,
                        "{r} {h} {c}: {g} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_backends_head_matmul_reads_any_weight_type_as_the_row_twin_does() {
        use crate::weights::{Dtype, Storage};
        let (heads, stride, cols, rows) = (4usize, 6usize, 64usize, 3usize);
        let data = wave(heads * stride * cols, 6);
        let mut words = vec![0u64; data.len().div_ceil(2)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..data.len() * 4]
            .copy_from_slice(bytemuck::cast_slice(&data));
        let f32_weight = TensorRef::in_storage(
            "kv_b_proj.weight".into(),
            std::sync::Arc::new("/m/model.safetensors".into()),
            Dtype::F32,
            vec![heads * stride, cols],
            std::sync::Arc::new(Storage::Words {
                words,
                len: data.len() * 4,
            }),
            0,
            data.len() * 4,
        );
        let q8_weight = f32_weight.quantize(Dtype::Q8_0).unwrap().unwrap();
        let cpu = Cpu::new(Activations::F32);
        for w in [&f32_weight, &q8_weight] {
            for (offset, len, transposed) in [(0usize, 4usize, true), (4, 2, false)] {
                let blocks = HeadBlocks {
                    heads,
                    stride,
                    offset,
                    len,
                    cols,
                };
                let width = if transposed { len } else { cols };
                let x = wave(rows * heads * width, 7);
                let got = cpu.head_matmul(&x, rows, w, &blocks, transposed);
                let wk = w.weights();
                let want = head_matmul_rows(&x, rows, &blocks, transposed, |i, out| {
                    moe_kernels::row_to_f32(wk, i, cols, out)
                });
                assert_eq!(got.len(), want.len());
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst < 1e-4,
                    "{:?} transposed {transposed}: {worst}",
                    w.dtype
                );
            }
        }
    }

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
        rope_row(&rope, &mut y, 8, 5);
        // Position 5, pair 1: angle = 5 / 10000^(2/8).
        let a = 5.0f64 / 10000f64.powf(0.25);
        let (x1, x2) = (x[1] as f64, x[5] as f64);
        assert!((y[1] as f64 - (x1 * a.cos() - x2 * a.sin())).abs() < 1e-5);
        assert!((y[5] as f64 - (x2 * a.cos() + x1 * a.sin())).abs() < 1e-5);
        let n0: f32 = x.iter().map(|v| v * v).sum();
        let n1: f32 = y.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4);
        let mut z = x.clone();
        rope_row(&rope, &mut z, 8, 0);
        assert_eq!(z, x);
    }

    #[test]
    fn rmsnorm_unit_rms() {
        let mut y = vec![1.0, -2.0, 3.0, -4.0, 2.0, 2.0, 2.0, 2.0];
        rms_norm_rows(&mut y, &[1.0; 4], 4, 0.0);
        for row in y.chunks(4) {
            let rms = (row.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
            assert!((rms - 1.0).abs() < 1e-6);
        }
        assert!((y[4] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn clamped_swiglu_matches_its_formula() {
        let g = [-9.0f32, -1.0, 0.5, 8.0];
        let mut u = [10.0f32, -0.5, 0.25, -8.0];
        let (limit, alpha) = (7.0f32, 1.702f32);
        let want: Vec<f32> = g
            .iter()
            .zip(u)
            .map(|(&g, u)| {
                let g = g.min(limit);
                let u = u.clamp(-limit, limit);
                (u + 1.0) * g / (1.0 + (-alpha * g).exp())
            })
            .collect();
        glu(&g, &mut u, Glu::ClampedSwiGlu { limit, alpha });
        for (got, want) in u.iter().zip(&want) {
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{got} vs {want}"
            );
        }
        // The limit binds: g = 8 acts as 7, u = 10 as 7 and u = -8 as -7.
        assert!((u[3] - (-6.0 * 7.0 * sigmoid(alpha * 7.0))).abs() < 1e-5);
        let mut u2 = [1.0f32, 1.0, 1.0, 1.0];
        glu(&g, &mut u2, Glu::SwiGlu);
        assert!((u2[2] - 0.5 / (1.0 + (-0.5f32).exp())).abs() < 1e-7);
    }
}
