//! The gated delta rule against transformers' own `torch_chunk_gated_delta_rule` and
//! `torch_recurrent_gated_delta_rule` (tests/fixtures/deltanet_reference.py): GQA heads, 70 tokens
//! across a 64-token chunk boundary, a non-zero initial state, q/k l2-normalised; and the short
//! causal convolution against its `causal_conv1d_fn`.

mod common;

use common::{fixtures, max_abs_diff, Reference};
use moe_runtime::backend::cpu::deltanet::{causal_conv1d_silu, chunked, recurrent, HeadInput};

/// transformers' `l2norm`: `x * rsqrt(sum(x^2) + 1e-6)`.
fn l2norm(row: &[f32]) -> Vec<f32> {
    let inv = 1.0 / (row.iter().map(|x| x * x).sum::<f32>() + 1e-6).sqrt();
    row.iter().map(|x| x * inv).collect()
}

#[test]
fn gated_delta_rule_matches_transformers() {
    let r = Reference::open(&fixtures().join("deltanet/reference.safetensors"));
    let [t, nk, dk] = r.shape("q")[..] else {
        panic!("q: [T, NK, DK]")
    };
    let [_, nv, dv] = r.shape("v")[..] else {
        panic!("v: [T, NV, DV]")
    };
    let (q, k, v, g, beta) = (
        r.f32("q"),
        r.f32("k"),
        r.f32("v"),
        r.f32("g"),
        r.f32("beta"),
    );
    let init = r.f32("initial_state");
    let scale = (dk as f32).powf(-0.5);
    for (form, out_name, state_name) in [
        ("chunked", "chunk_out", "chunk_state"),
        ("recurrent", "recurrent_out", "recurrent_state"),
    ] {
        let (want_out, want_state) = (r.f32(out_name), r.f32(state_name));
        for h in 0..nv {
            // Value head h reads key head h / (nv / nk), as repeat_interleave arranges.
            let kh = h / (nv / nk);
            let rows = |x: &[f32], heads: usize, d: usize, head: usize| -> Vec<f32> {
                (0..t)
                    .flat_map(|i| x[(i * heads + head) * d..][..d].to_vec())
                    .collect()
            };
            let qh: Vec<f32> = rows(&q, nk, dk, kh)
                .chunks_exact(dk)
                .flat_map(|row| l2norm(row).into_iter().map(|x| x * scale))
                .collect();
            let kh_rows: Vec<f32> = rows(&k, nk, dk, kh)
                .chunks_exact(dk)
                .flat_map(l2norm)
                .collect();
            let vh = rows(&v, nv, dv, h);
            let gh: Vec<f32> = (0..t).map(|i| g[i * nv + h]).collect();
            let bh: Vec<f32> = (0..t).map(|i| beta[i * nv + h]).collect();
            let x = HeadInput {
                q: &qh,
                k: &kh_rows,
                v: &vh,
                g: &gh,
                beta: &bh,
            };
            let mut state = init[h * dk * dv..][..dk * dv].to_vec();
            let mut out = vec![0f32; t * dv];
            if form == "chunked" {
                chunked(&x, dk, dv, 64, &mut state, &mut out);
            } else {
                recurrent(&x, dk, dv, &mut state, &mut out);
            }
            let want_o = rows(&want_out, nv, dv, h);
            let eo = max_abs_diff(&out, &want_o);
            let es = max_abs_diff(&state, &want_state[h * dk * dv..][..dk * dv]);
            assert!(
                eo <= 1e-5 && es <= 1e-5,
                "{form} head {h}: out {eo}, state {es}"
            );
        }
    }
}

#[test]
fn causal_convolution_matches_transformers() {
    let r = Reference::open(&fixtures().join("deltanet/reference.safetensors"));
    let [t, c] = r.shape("conv_x")[..] else {
        panic!("conv_x: [T, C]")
    };
    let k = r.shape("conv_w")[1];
    let (x, w, want) = (r.f32("conv_x"), r.f32("conv_w"), r.f32("conv_out"));
    // In two calls (a prefill, then the rest from the carried state), as a sequence runs.
    let split = 41;
    let mut state = vec![0f32; (k - 1) * c];
    let mut out = vec![0f32; t * c];
    causal_conv1d_silu(&x[..split * c], c, &w, k, &mut state, &mut out[..split * c]);
    causal_conv1d_silu(&x[split * c..], c, &w, k, &mut state, &mut out[split * c..]);
    let e = max_abs_diff(&out, &want);
    assert!(e <= 1e-5, "conv: {e}");
}
