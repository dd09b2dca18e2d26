//! Gated DeltaNet on the CPU: the short causal convolution over the q/k/v projections and the
//! gated delta rule per head, in a recurrent form for decode and a chunked form for prefill that
//! compute the same thing, and the whole mixing step from the input projections to the gated,
//! normalised core output ([`delta_net`]).
//!
//! For each token `t`, with a `[dk, dv]` state `S`, a log-space decay `g_t <= 0` and a write
//! strength `beta_t`:
//!
//! ```text
//! S   = exp(g_t) * S
//! S  += k_t ⊗ (beta_t * (v_t - Sᵀ k_t))      (the delta rule: write only the correction)
//! o_t = Sᵀ q_t
//! ```
//!
//! The chunked form condenses the updates of a chunk into small triangular solves and matrix
//! products (the UT transform of the DeltaNet paper), as transformers' `torch_chunk_gated_delta_rule`
//! does; a last chunk shorter than the chunk size is processed as is (transformers pads it with
//! zeros, which changes nothing).
//!
//! Invariants: all arithmetic is f32; `q` arrives already scaled (and l2-normalised when the model
//! asks for it), the caller owns head grouping; the state after a chunked pass equals the state
//! after the same tokens run one by one (up to rounding), so prefill can be chunked and decode
//! recurrent over one state.

use rayon::prelude::*;

use super::{rms_norm_rows, sigmoid};
use crate::backend::DeltaNetParams;
use crate::config::LinearAttentionConfig;

/// Depthwise causal convolution with SiLU over `t` rows of `c` channels (`x`, `[t, c]`),
/// continuing from `state` (the previous `k - 1` input rows, oldest first, `[k - 1, c]`; zeros for a
/// new sequence), which it then advances. `w` is `[c, k]` (a depthwise `Conv1d` weight without its
/// middle axis); tap `k - 1` multiplies the current row.
pub fn causal_conv1d_silu(
    x: &[f32],
    c: usize,
    w: &[f32],
    k: usize,
    state: &mut [f32],
    out: &mut [f32],
) {
    debug_assert_eq!(state.len(), (k - 1) * c);
    debug_assert_eq!(w.len(), c * k);
    let t = x.len() / c;
    // The window: the state rows, then this call's rows.
    let mut win = Vec::with_capacity((k - 1 + t) * c);
    win.extend_from_slice(state);
    win.extend_from_slice(x);
    for r in 0..t {
        let o = &mut out[r * c..][..c];
        for (ch, o) in o.iter_mut().enumerate() {
            let taps = &w[ch * k..][..k];
            let mut acc = 0f32;
            for (j, &wj) in taps.iter().enumerate() {
                acc += wj * win[(r + j) * c + ch];
            }
            *o = acc / (1.0 + (-acc).exp());
        }
    }
    state.copy_from_slice(&win[t * c..]);
}

/// One head's inputs for `t` tokens: `q`, `k` are `[t, dk]`, `v` is `[t, dv]`, `g`, `beta` are `[t]`.
pub struct HeadInput<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub g: &'a [f32],
    pub beta: &'a [f32],
}

impl HeadInput<'_> {
    fn tokens(&self) -> usize {
        self.g.len()
    }
}

/// Token by token: updates `state` (`[dk, dv]`, row-major) and writes `out` (`[t, dv]`).
pub fn recurrent(x: &HeadInput<'_>, dk: usize, dv: usize, state: &mut [f32], out: &mut [f32]) {
    debug_assert_eq!(state.len(), dk * dv);
    let mut delta = vec![0f32; dv];
    for t in 0..x.tokens() {
        let (q, k, v) = (
            &x.q[t * dk..][..dk],
            &x.k[t * dk..][..dk],
            &x.v[t * dv..][..dv],
        );
        let decay = x.g[t].exp();
        state.iter_mut().for_each(|s| *s *= decay);
        // delta = beta * (v - Sᵀ k)
        delta.copy_from_slice(v);
        for (i, &ki) in k.iter().enumerate() {
            for (d, s) in delta.iter_mut().zip(&state[i * dv..][..dv]) {
                *d -= s * ki;
            }
        }
        delta.iter_mut().for_each(|d| *d *= x.beta[t]);
        for (i, &ki) in k.iter().enumerate() {
            for (s, d) in state[i * dv..][..dv].iter_mut().zip(&delta) {
                *s += ki * d;
            }
        }
        let o = &mut out[t * dv..][..dv];
        o.fill(0.0);
        for (i, &qi) in q.iter().enumerate() {
            for (o, s) in o.iter_mut().zip(&state[i * dv..][..dv]) {
                *o += s * qi;
            }
        }
    }
}

/// Chunk by chunk (`chunk` tokens each): same contract as [`recurrent`].
pub fn chunked(
    x: &HeadInput<'_>,
    dk: usize,
    dv: usize,
    chunk: usize,
    state: &mut [f32],
    out: &mut [f32],
) {
    debug_assert_eq!(state.len(), dk * dv);
    let t_all = x.tokens();
    let mut c0 = 0;
    while c0 < t_all {
        let n = chunk.min(t_all - c0);
        let q = &x.q[c0 * dk..(c0 + n) * dk];
        let k = &x.k[c0 * dk..(c0 + n) * dk];
        let v = &x.v[c0 * dv..(c0 + n) * dv];
        let beta = &x.beta[c0..c0 + n];
        // Cumulative log decay within the chunk.
        let mut cum = vec![0f32; n];
        let mut acc = 0f32;
        for (c, g) in cum.iter_mut().zip(&x.g[c0..c0 + n]) {
            acc += g;
            *c = acc;
        }
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        // Strictly lower part of the unit lower-triangular UT system:
        // T[i][j] = beta_i (k_i · k_j) exp(cum_i - cum_j), j < i.
        let mut tri = vec![0f32; n * n];
        for i in 0..n {
            for j in 0..i {
                tri[i * n + j] =
                    beta[i] * dot(&k[i * dk..][..dk], &k[j * dk..][..dk]) * (cum[i] - cum[j]).exp();
            }
        }
        // Solve T X = B by forward substitution, for B = beta * v (-> u) and
        // B = beta * exp(cum) * k (-> w).
        let solve = |b: &mut [f32], width: usize| {
            for i in 0..n {
                for j in 0..i {
                    let f = tri[i * n + j];
                    if f != 0.0 {
                        let (done, row) = b.split_at_mut(i * width);
                        for (r, d) in row[..width].iter_mut().zip(&done[j * width..][..width]) {
                            *r -= f * d;
                        }
                    }
                }
            }
        };
        let mut u: Vec<f32> = v
            .chunks_exact(dv)
            .zip(beta)
            .flat_map(|(row, &b)| row.iter().map(move |x| x * b))
            .collect();
        solve(&mut u, dv);
        let mut w: Vec<f32> = k
            .chunks_exact(dk)
            .zip(beta.iter().zip(&cum))
            .flat_map(|(row, (&b, &c))| {
                let f = b * c.exp();
                row.iter().map(move |x| x * f)
            })
            .collect();
        solve(&mut w, dk);
        // v_new = u - w S
        let mut v_new = u;
        for t in 0..n {
            let row = &mut v_new[t * dv..][..dv];
            for (i, &wi) in w[t * dk..][..dk].iter().enumerate() {
                for (r, s) in row.iter_mut().zip(&state[i * dv..][..dv]) {
                    *r -= wi * s;
                }
            }
        }
        // o_t = exp(cum_t) Sᵀ q_t + Σ_{j<=t} (q_t · k_j) exp(cum_t - cum_j) v_new_j
        for t in 0..n {
            let o = &mut out[(c0 + t) * dv..][..dv];
            o.fill(0.0);
            let qt = &q[t * dk..][..dk];
            let e = cum[t].exp();
            for (i, &qi) in qt.iter().enumerate() {
                let f = qi * e;
                for (o, s) in o.iter_mut().zip(&state[i * dv..][..dv]) {
                    *o += f * s;
                }
            }
            for j in 0..=t {
                let a = dot(qt, &k[j * dk..][..dk]) * (cum[t] - cum[j]).exp();
                for (o, x) in o.iter_mut().zip(&v_new[j * dv..][..dv]) {
                    *o += a * x;
                }
            }
        }
        // S = exp(cum_last) S + Σ_t exp(cum_last - cum_t) k_t ⊗ v_new_t
        let last = cum[n - 1];
        let e = last.exp();
        state.iter_mut().for_each(|s| *s *= e);
        for t in 0..n {
            let f = (last - cum[t]).exp();
            for (i, &ki) in k[t * dk..][..dk].iter().enumerate() {
                let fk = f * ki;
                for (s, x) in state[i * dv..][..dv].iter_mut().zip(&v_new[t * dv..][..dv]) {
                    *s += fk * x;
                }
            }
        }
        c0 += n;
    }
}

/// Tokens per chunk of the chunked form (transformers' and the FLA kernels' default).
pub const CHUNK: usize = 64;

/// Per-sequence state of one linear-attention layer; fixed size whatever the context length.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearState {
    /// The convolution's last `kernel - 1` input rows, oldest first, `[kernel - 1, conv_dim]`.
    pub conv: Vec<f32>,
    /// One `[dk, dv]` matrix per value head.
    pub ssm: Vec<f32>,
}

impl LinearState {
    pub fn size_bytes(&self) -> usize {
        (self.conv.capacity() + self.ssm.capacity()) * 4
    }
}

/// See [`crate::backend::Backend::delta_net`].
pub fn delta_net(
    qkvz: &[f32],
    ba: &[f32],
    p: &DeltaNetParams<'_, super::Cpu>,
    lens: &[usize],
    states: &mut [&mut LinearState],
) -> Vec<f32> {
    debug_assert_eq!(lens.len(), states.len());
    let LinearAttentionConfig {
        num_key_heads: nk,
        num_value_heads: nv,
        key_head_dim: dk,
        value_head_dim: dv,
        conv_kernel: kernel,
    } = p.dims;
    let group = nv / nk;
    let (key_dim, value_dim) = (nk * dk, nv * dv);
    let conv_dim = p.dims.conv_dim();
    let t: usize = lens.iter().sum();
    let (mixed, z, beta, g) = split_inputs(qkvz, ba, p.neg_a, p.dt_bias, &p.dims, t);
    // The convolution per sequence (it carries the previous rows); then q and k
    // l2-normalised and q scaled, in f32 as the model computes them.
    let mut conv_out = vec![0f32; t * conv_dim];
    let mut row0 = 0;
    for (&n, st) in lens.iter().zip(states.iter_mut()) {
        let rows = row0 * conv_dim..(row0 + n) * conv_dim;
        causal_conv1d_silu(
            &mixed[rows.clone()],
            conv_dim,
            p.conv_weight,
            kernel,
            &mut st.conv,
            &mut conv_out[rows],
        );
        row0 += n;
    }
    normalize_qk(&mut conv_out, conv_dim, nk, dk, (dk as f32).powf(-0.5));
    // One task per (sequence, value head), each owning that head's slice of the state.
    let mut tasks = Vec::with_capacity(lens.len() * nv);
    let mut row0 = 0;
    for (&n, st) in lens.iter().zip(states.iter_mut()) {
        for (vh, s) in st.ssm.chunks_exact_mut(dk * dv).enumerate() {
            tasks.push((row0, n, vh, s));
        }
        row0 += n;
    }
    let conv_out = &conv_out;
    let (g, beta) = (&g, &beta);
    let outs: Vec<Vec<f32>> = tasks
        .into_par_iter()
        .map(|(row0, n, vh, state)| {
            let kh = vh / group;
            let gather = |off: usize, d: usize| -> Vec<f32> {
                (row0..row0 + n)
                    .flat_map(|r| conv_out[r * conv_dim + off..][..d].iter().copied())
                    .collect()
            };
            let q = gather(kh * dk, dk);
            let k = gather(key_dim + kh * dk, dk);
            let v = gather(2 * key_dim + vh * dv, dv);
            let gh: Vec<f32> = (row0..row0 + n).map(|r| g[r * nv + vh]).collect();
            let bh: Vec<f32> = (row0..row0 + n).map(|r| beta[r * nv + vh]).collect();
            let input = HeadInput {
                q: &q,
                k: &k,
                v: &v,
                g: &gh,
                beta: &bh,
            };
            let mut out = vec![0f32; n * dv];
            if n == 1 {
                recurrent(&input, dk, dv, state, &mut out);
            } else {
                chunked(&input, dk, dv, CHUNK, state, &mut out);
            }
            out
        })
        .collect();
    // Back to `[t, nv * dv]`, then the norm of each head's output gated by silu(z).
    let mut core = vec![0f32; t * value_dim];
    let mut outs = outs.iter();
    let mut row0 = 0;
    for &n in lens {
        for vh in 0..nv {
            let o = outs.next().expect("one output per task");
            for (j, row) in o.chunks_exact(dv).enumerate() {
                core[(row0 + j) * value_dim + vh * dv..][..dv].copy_from_slice(row);
            }
        }
        row0 += n;
    }
    rms_norm_rows(&mut core, p.norm, dv, p.norm_eps);
    mul_silu(&mut core, &z);
    core
}

/// De-interleaves `t` rows of the input projections (`qkvz`, per key head `[q | k | v | z]`;
/// `ba`, per key head `[b | a]`) into the convolution's channel order (`mixed`: every q head,
/// every k head, every v head), the output gate `z`, and per value head `beta = sigmoid(b)`
/// and `g = neg_a * softplus(a + dt_bias)`.
#[allow(clippy::type_complexity)]
pub fn split_inputs(
    qkvz: &[f32],
    ba: &[f32],
    neg_a: &[f32],
    dt_bias: &[f32],
    dims: &LinearAttentionConfig,
    t: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let (nk, nv, dk, dv) = (
        dims.num_key_heads,
        dims.num_value_heads,
        dims.key_head_dim,
        dims.value_head_dim,
    );
    let group = nv / nk;
    let (key_dim, value_dim) = (nk * dk, nv * dv);
    let conv_dim = dims.conv_dim();
    let mut mixed = vec![0f32; t * conv_dim];
    let mut z = vec![0f32; t * value_dim];
    let mut beta = vec![0f32; t * nv];
    let mut g = vec![0f32; t * nv];
    let per_k = 2 * dk + 2 * group * dv;
    for r in 0..t {
        let src = &qkvz[r * nk * per_k..][..nk * per_k];
        let dst = &mut mixed[r * conv_dim..][..conv_dim];
        let zr = &mut z[r * value_dim..][..value_dim];
        for h in 0..nk {
            let s = &src[h * per_k..][..per_k];
            dst[h * dk..][..dk].copy_from_slice(&s[..dk]);
            dst[key_dim + h * dk..][..dk].copy_from_slice(&s[dk..2 * dk]);
            dst[2 * key_dim + h * group * dv..][..group * dv]
                .copy_from_slice(&s[2 * dk..2 * dk + group * dv]);
            zr[h * group * dv..][..group * dv].copy_from_slice(&s[2 * dk + group * dv..]);
        }
        let bar = &ba[r * 2 * nv..][..2 * nv];
        for h in 0..nk {
            let s = &bar[h * 2 * group..][..2 * group];
            for j in 0..group {
                let vh = h * group + j;
                beta[r * nv + vh] = sigmoid(s[j]);
                g[r * nv + vh] = neg_a[vh] * softplus(s[group + j] + dt_bias[vh]);
            }
        }
    }
    (mixed, z, beta, g)
}

/// l2-normalises the `nk` q heads and `nk` k heads (`dk` values each) at the start of every
/// `stride`-wide row of `x`, the q heads also scaled by `scale`.
pub fn normalize_qk(x: &mut [f32], stride: usize, nk: usize, dk: usize, scale: f32) {
    for row in x.chunks_exact_mut(stride) {
        for (h, head) in row[..2 * nk * dk].chunks_exact_mut(dk).enumerate() {
            let inv = 1.0 / (head.iter().map(|v| v * v).sum::<f32>() + 1e-6).sqrt();
            let f = if h < nk { inv * scale } else { inv };
            head.iter_mut().for_each(|v| *v *= f);
        }
    }
}

/// `x *= z * sigmoid(z)` elementwise (the output gate).
pub fn mul_silu(x: &mut [f32], z: &[f32]) {
    for (c, zv) in x.iter_mut().zip(z) {
        *c *= zv * sigmoid(*zv);
    }
}

/// `log(1 + exp(x))`, linear above 20 as torch's `softplus` is.
fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::Rng;

    fn random(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * scale)
            .collect()
    }

    /// Rows scaled to unit length (the model l2-normalises q and k).
    fn unit_rows(mut v: Vec<f32>, d: usize) -> Vec<f32> {
        for row in v.chunks_exact_mut(d) {
            let n = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
            row.iter_mut().for_each(|x| *x /= n);
        }
        v
    }

    struct Case {
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        g: Vec<f32>,
        beta: Vec<f32>,
    }

    fn case(seed: u64, t: usize, dk: usize, dv: usize) -> Case {
        let mut rng = Rng::new(seed);
        let scale = (dk as f32).powf(-0.5);
        let q = unit_rows(random(&mut rng, t * dk, 1.0), dk)
            .into_iter()
            .map(|x| x * scale)
            .collect();
        let k = unit_rows(random(&mut rng, t * dk, 1.0), dk);
        let v = random(&mut rng, t * dv, 1.0);
        // Decays in (-1, 0): exp(g) in (0.37, 1); beta in (0, 1) as sigmoid gives.
        let g = random(&mut rng, t, 0.5)
            .into_iter()
            .map(|x| x - 0.5)
            .collect();
        let beta = random(&mut rng, t, 0.5)
            .into_iter()
            .map(|x| x + 0.5)
            .collect();
        Case { q, k, v, g, beta }
    }

    fn input(c: &Case) -> HeadInput<'_> {
        HeadInput {
            q: &c.q,
            k: &c.k,
            v: &c.v,
            g: &c.g,
            beta: &c.beta,
        }
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn chunked_equals_recurrent_across_chunk_boundaries_and_from_a_state() {
        let (dk, dv) = (16, 24);
        for (seed, t, chunk) in [(1, 1, 64), (2, 7, 4), (3, 64, 64), (4, 150, 64), (5, 33, 8)] {
            let c = case(seed, t, dk, dv);
            let mut rng = Rng::new(seed + 100);
            let init = random(&mut rng, dk * dv, 0.3);
            let (mut s_rec, mut s_chk) = (init.clone(), init.clone());
            let (mut o_rec, mut o_chk) = (vec![0f32; t * dv], vec![0f32; t * dv]);
            recurrent(&input(&c), dk, dv, &mut s_rec, &mut o_rec);
            chunked(&input(&c), dk, dv, chunk, &mut s_chk, &mut o_chk);
            let (eo, es) = (max_diff(&o_rec, &o_chk), max_diff(&s_rec, &s_chk));
            assert!(
                eo < 1e-4 && es < 1e-4,
                "t {t} chunk {chunk}: out {eo}, state {es}"
            );
        }
    }

    #[test]
    fn prefill_chunked_then_decode_recurrent_equals_all_recurrent() {
        let (dk, dv, t, split) = (8, 8, 40, 29);
        let c = case(9, t, dk, dv);
        let mut s_all = vec![0f32; dk * dv];
        let mut o_all = vec![0f32; t * dv];
        recurrent(&input(&c), dk, dv, &mut s_all, &mut o_all);
        let head = HeadInput {
            q: &c.q[..split * dk],
            k: &c.k[..split * dk],
            v: &c.v[..split * dv],
            g: &c.g[..split],
            beta: &c.beta[..split],
        };
        let tail = HeadInput {
            q: &c.q[split * dk..],
            k: &c.k[split * dk..],
            v: &c.v[split * dv..],
            g: &c.g[split..],
            beta: &c.beta[split..],
        };
        let mut s = vec![0f32; dk * dv];
        let mut o = vec![0f32; t * dv];
        chunked(&head, dk, dv, 8, &mut s, &mut o[..split * dv]);
        recurrent(&tail, dk, dv, &mut s, &mut o[split * dv..]);
        assert!(max_diff(&o, &o_all) < 1e-4);
        assert!(max_diff(&s, &s_all) < 1e-4);
    }

    #[test]
    fn convolution_continues_from_its_state() {
        let (c, k, t, split) = (5, 4, 23, 9);
        let mut rng = Rng::new(3);
        let x = random(&mut rng, t * c, 1.0);
        let w = random(&mut rng, c * k, 0.7);
        let mut s_all = vec![0f32; (k - 1) * c];
        let mut o_all = vec![0f32; t * c];
        causal_conv1d_silu(&x, c, &w, k, &mut s_all, &mut o_all);
        let mut s = vec![0f32; (k - 1) * c];
        let mut o = vec![0f32; t * c];
        causal_conv1d_silu(&x[..split * c], c, &w, k, &mut s, &mut o[..split * c]);
        for r in split..t {
            let (row, out) = (&x[r * c..][..c], &mut o[r * c..][..c]);
            causal_conv1d_silu(row, c, &w, k, &mut s, out);
        }
        assert_eq!(o, o_all);
        assert_eq!(s, s_all);
        assert_eq!(&s[..], &x[(t - k + 1) * c..]);
        // Row 0 sees only its own input through the last tap.
        let pre = w[k - 1] * x[0];
        assert!((o_all[0] - pre / (1.0 + (-pre).exp())).abs() < 1e-6);
    }

    #[test]
    fn one_token_by_hand() {
        // dk = dv = 1: S' = e^g S + k beta (v - e^g S k); o = S' q.
        let (s0, q, k, v, g, beta) = (0.5f32, 0.8f32, 1.0f32, 2.0f32, -0.1f32, 0.6f32);
        let sd = g.exp() * s0;
        let want_s = sd + k * beta * (v - sd * k);
        let x = HeadInput {
            q: &[q],
            k: &[k],
            v: &[v],
            g: &[g],
            beta: &[beta],
        };
        for chunked_form in [false, true] {
            let mut s = [s0];
            let mut o = [0f32];
            if chunked_form {
                chunked(&x, 1, 1, 64, &mut s, &mut o);
            } else {
                recurrent(&x, 1, 1, &mut s, &mut o);
            }
            assert!((s[0] - want_s).abs() < 1e-6, "{} vs {want_s}", s[0]);
            assert!((o[0] - want_s * q).abs() < 1e-6);
        }
    }
}
