//! An expert's layout as data: which parts it stores, in what order and shape, and which gated
//! activation joins them. One [`ExpertLayout`] describes every expert of a model; the loader
//! builds it, the store carries it, and every tier computes an expert through it.
//!
//! Parts, in their fixed order (an expert's `parts` follow it exactly):
//! - [`GateUp::Separate`]: gate `[I, H]`, up `[I, H]`, down `[H, I]`;
//! - [`GateUp::Fused`] / [`GateUp::FusedInterleaved`]: gate_up `[2I, H]`, down `[H, I]`;
//! - with `bias`, then the bias vectors: gate `[I]` and up `[I]` (separate) or gate_up `[2I]`
//!   (fused), then down `[H]`.
//!
//! Invariants: the order above never changes (cache files and the checksum check index parts
//! by it, and the `Separate` parts keep their names `gate`, `up`, `down`); a fused part's rows
//! are gate rows then up rows (`Fused`) or alternate gate, up (`FusedInterleaved`: row 2j is
//! gate j, row 2j+1 up j), so each output value is the same dot product as in the separate
//! layout; biases are full-precision vectors (f32, bf16 or f16), never quantized.

use crate::backend::Glu;
use crate::error::{Error, Result};
use crate::weights::{Dtype, TensorRef};

/// How the gate and up projections are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateUp {
    /// Two matrices, gate `[I, H]` and up `[I, H]`.
    Separate,
    /// One matrix `[2I, H]`: the I gate rows, then the I up rows.
    Fused,
    /// One matrix `[2I, H]` whose rows alternate: row 2j is gate j, row 2j+1 is up j (gpt-oss).
    FusedInterleaved,
}

/// What one stored part of an expert is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PartRole {
    Gate,
    Up,
    GateUp,
    Down,
    GateBias,
    UpBias,
    GateUpBias,
    DownBias,
}

impl PartRole {
    /// The part's name in tensor names (cache files, errors): `gate`, `up`, `down` as before,
    /// `gate_up` and the `*_bias` vectors for the other layouts.
    pub fn name(self) -> &'static str {
        match self {
            PartRole::Gate => "gate",
            PartRole::Up => "up",
            PartRole::GateUp => "gate_up",
            PartRole::Down => "down",
            PartRole::GateBias => "gate_bias",
            PartRole::UpBias => "up_bias",
            PartRole::GateUpBias => "gate_up_bias",
            PartRole::DownBias => "down_bias",
        }
    }

    /// Whether the part is a bias vector (kept at full precision, added after its matmul).
    pub fn is_bias(self) -> bool {
        matches!(
            self,
            PartRole::GateBias | PartRole::UpBias | PartRole::GateUpBias | PartRole::DownBias
        )
    }
}

/// Every expert of a model: its sizes, how gate and up are stored, whether it has biases and
/// the activation between gate/up and down.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExpertLayout {
    pub hidden: usize,
    pub inter: usize,
    pub gate_up: GateUp,
    pub bias: bool,
    pub glu: Glu,
}

impl ExpertLayout {
    /// Separate gate, up and down, no biases, SwiGLU: every architecture loaded today.
    pub fn swiglu(hidden: usize, inter: usize) -> ExpertLayout {
        ExpertLayout {
            hidden,
            inter,
            gate_up: GateUp::Separate,
            bias: false,
            glu: Glu::SwiGlu,
        }
    }

    /// The parts in their stored order.
    pub fn roles(&self) -> &'static [PartRole] {
        use PartRole as R;
        match (self.gate_up, self.bias) {
            (GateUp::Separate, false) => &[R::Gate, R::Up, R::Down],
            (GateUp::Separate, true) => {
                &[R::Gate, R::Up, R::Down, R::GateBias, R::UpBias, R::DownBias]
            }
            (GateUp::Fused | GateUp::FusedInterleaved, false) => &[R::GateUp, R::Down],
            (GateUp::Fused | GateUp::FusedInterleaved, true) => {
                &[R::GateUp, R::Down, R::GateUpBias, R::DownBias]
            }
        }
    }

    /// The shape part `role` must have.
    pub fn shape(&self, role: PartRole) -> Vec<usize> {
        let (h, i) = (self.hidden, self.inter);
        match role {
            PartRole::Gate | PartRole::Up => vec![i, h],
            PartRole::GateUp => vec![2 * i, h],
            PartRole::Down => vec![h, i],
            PartRole::GateBias | PartRole::UpBias => vec![i],
            PartRole::GateUpBias => vec![2 * i],
            PartRole::DownBias => vec![h],
        }
    }

    /// Index of the down projection among the parts (after gate and up, or after gate_up).
    pub fn down_index(&self) -> usize {
        match self.gate_up {
            GateUp::Separate => 2,
            GateUp::Fused | GateUp::FusedInterleaved => 1,
        }
    }

    /// Index of `role` among the parts, if the layout has it.
    pub fn index_of(&self, role: PartRole) -> Option<usize> {
        self.roles().iter().position(|r| *r == role)
    }

    /// Checks `parts` against the layout: their number, each one's shape and a bias's dtype.
    /// The error names the tensor and what it should be.
    pub fn check(&self, parts: &[TensorRef]) -> Result<()> {
        let roles = self.roles();
        if parts.len() != roles.len() {
            let names: Vec<&str> = parts.iter().map(|t| t.name.as_str()).collect();
            return Err(Error::Internal(format!(
                "an expert holds {} part(s) ({}) but its layout ({:?}, bias {}) has {}: {}",
                parts.len(),
                names.join(", "),
                self.gate_up,
                self.bias,
                roles.len(),
                roles
                    .iter()
                    .map(|r| r.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        for (t, &role) in parts.iter().zip(roles) {
            let shape = self.shape(role);
            if t.shape != shape {
                return Err(Error::ShapeMismatch {
                    name: t.name.clone(),
                    path: (*t.path).clone(),
                    expected: shape,
                    found: t.shape.clone(),
                });
            }
            if role.is_bias() && !matches!(t.dtype, Dtype::F32 | Dtype::Bf16 | Dtype::F16) {
                return Err(Error::UnsupportedDtype {
                    name: t.name.clone(),
                    path: (*t.path).clone(),
                    dtype: t.dtype.name().to_string(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::backend::Activations;
    use crate::store::{ExpertParts, ExpertWeights};
    use crate::weights::Storage;

    /// An owned f32 tensor of `shape` holding `data`.
    fn f32_tensor(name: &str, shape: &[usize], data: &[f32]) -> TensorRef {
        assert_eq!(shape.iter().product::<usize>(), data.len());
        let mut words = vec![0u64; data.len().div_ceil(2)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..data.len() * 4]
            .copy_from_slice(bytemuck::cast_slice(data));
        let len = data.len() * 4;
        TensorRef::in_storage(
            name.into(),
            Arc::new("/models/t/experts.safetensors".into()),
            Dtype::F32,
            shape.to_vec(),
            Arc::new(Storage::Words { words, len }),
            0,
            len,
        )
    }

    /// `t` converted to `dtype` by the load-time quantizers (f32 stays as it is).
    fn in_dtype(t: TensorRef, dtype: Dtype) -> TensorRef {
        if dtype == Dtype::F32 {
            return t;
        }
        t.quantize(dtype).unwrap().expect("rows fit the block size")
    }

    /// Deterministic values in [-scale, scale).
    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// One random expert's rows: gate `[I, H]`, up `[I, H]`, down `[H, I]` and the biases.
    struct Rows {
        h: usize,
        i: usize,
        gate: Vec<f32>,
        up: Vec<f32>,
        down: Vec<f32>,
        gate_bias: Vec<f32>,
        up_bias: Vec<f32>,
        down_bias: Vec<f32>,
    }

    impl Rows {
        fn new(h: usize, i: usize, seed: u64, scale: f32) -> Rows {
            Rows {
                h,
                i,
                gate: values(i * h, seed, scale),
                up: values(i * h, seed + 1, scale),
                down: values(h * i, seed + 2, scale),
                gate_bias: values(i, seed + 3, 1.0),
                up_bias: values(i, seed + 4, 1.0),
                down_bias: values(h, seed + 5, 1.0),
            }
        }

        /// The expert in `gate_up` storage (matrices in `dtype`, biases f32).
        fn expert(&self, gate_up: GateUp, bias: bool, glu: Glu, dtype: Dtype) -> ExpertWeights {
            let (h, i) = (self.h, self.i);
            let layout = ExpertLayout {
                hidden: h,
                inter: i,
                gate_up,
                bias,
                glu,
            };
            let m = |name: &str, shape: &[usize], data: &[f32]| {
                in_dtype(f32_tensor(name, shape, data), dtype)
            };
            let interleave = |a: &[f32], b: &[f32], w: usize| -> Vec<f32> {
                a.chunks(w)
                    .zip(b.chunks(w))
                    .flat_map(|(a, b)| a.iter().chain(b).copied())
                    .collect()
            };
            let mut parts = match gate_up {
                GateUp::Separate => vec![
                    m("e0.gate", &[i, h], &self.gate),
                    m("e0.up", &[i, h], &self.up),
                ],
                GateUp::Fused => {
                    let gu = [self.gate.as_slice(), &self.up].concat();
                    vec![m("e0.gate_up", &[2 * i, h], &gu)]
                }
                GateUp::FusedInterleaved => {
                    let gu = interleave(&self.gate, &self.up, h);
                    vec![m("e0.gate_up", &[2 * i, h], &gu)]
                }
            };
            parts.push(m("e0.down", &[h, i], &self.down));
            if bias {
                match gate_up {
                    GateUp::Separate => {
                        parts.push(f32_tensor("e0.gate_bias", &[i], &self.gate_bias));
                        parts.push(f32_tensor("e0.up_bias", &[i], &self.up_bias));
                    }
                    GateUp::Fused => parts.push(f32_tensor(
                        "e0.gate_up_bias",
                        &[2 * i],
                        &[self.gate_bias.as_slice(), &self.up_bias].concat(),
                    )),
                    GateUp::FusedInterleaved => parts.push(f32_tensor(
                        "e0.gate_up_bias",
                        &[2 * i],
                        &interleave(&self.gate_bias, &self.up_bias, 1),
                    )),
                }
                parts.push(f32_tensor("e0.down_bias", &[h], &self.down_bias));
            }
            let e = ExpertWeights::new(layout, parts);
            layout.check(&e.parts).unwrap();
            e
        }

        /// The expert's output for one input row, from the formula in f64.
        fn reference(&self, x: &[f32], bias: bool, glu: Glu) -> Vec<f32> {
            let (h, i) = (self.h, self.i);
            let dot = |w: &[f32], v: &[f32]| -> f64 {
                w.iter().zip(v).map(|(a, b)| *a as f64 * *b as f64).sum()
            };
            let b = |v: &[f32], j: usize| if bias { v[j] as f64 } else { 0.0 };
            let act: Vec<f32> = (0..i)
                .map(|j| {
                    let g = dot(&self.gate[j * h..(j + 1) * h], x) + b(&self.gate_bias, j);
                    let u = dot(&self.up[j * h..(j + 1) * h], x) + b(&self.up_bias, j);
                    let sigmoid = |v: f64| 1.0 / (1.0 + (-v).exp());
                    (match glu {
                        Glu::SwiGlu => g * sigmoid(g) * u,
                        Glu::ClampedSwiGlu { limit, alpha } => {
                            let (limit, alpha) = (limit as f64, alpha as f64);
                            let g = g.min(limit);
                            let u = u.clamp(-limit, limit);
                            (u + 1.0) * g * sigmoid(alpha * g)
                        }
                    }) as f32
                })
                .collect();
            (0..h)
                .map(|r| (dot(&self.down[r * i..(r + 1) * i], &act) + b(&self.down_bias, r)) as f32)
                .collect()
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|v| v.to_bits()).collect()
    }

    const H: usize = 64;
    const I: usize = 32;
    const CLAMPED: Glu = Glu::ClampedSwiGlu {
        limit: 7.0,
        alpha: 1.702,
    };

    #[test]
    fn fused_layouts_give_the_separate_output_bit_for_bit() {
        let rows = Rows::new(H, I, 7, 0.5);
        let tokens = 12;
        let x = values(tokens * H, 99, 1.0);
        // A decode-sized gather (matrix-vector kernels) and a prefill-sized one (GEMM).
        let gathers: [Vec<usize>; 2] = [vec![5, 0], (0..tokens).rev().collect()];
        for dtype in [Dtype::F32, Dtype::Bf16, Dtype::Q8_0] {
            for act in [Activations::F32, Activations::Q8, Activations::Bf16] {
                for bias in [false, true] {
                    for glu in [Glu::SwiGlu, CLAMPED] {
                        let separate = rows.expert(GateUp::Separate, bias, glu, dtype);
                        for gate_up in [GateUp::Fused, GateUp::FusedInterleaved] {
                            let fused = rows.expert(gate_up, bias, glu, dtype);
                            for g in &gathers {
                                for parallel in [false, true] {
                                    let want = separate.ffn_rows(g, &x, H, parallel, act);
                                    let got = fused.ffn_rows(g, &x, H, parallel, act);
                                    assert_eq!(
                                        bits(&got),
                                        bits(&want),
                                        "{gate_up:?} {dtype:?} {act:?} bias {bias} {glu:?} \
                                         {} rows",
                                        g.len()
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn biases_and_the_clamped_activation_follow_their_formula() {
        // Weights large enough that the clamp binds for some gate and up values.
        let rows = Rows::new(H, I, 3, 1.5);
        let x = values(3 * H, 11, 1.0);
        let mut clamped = 0;
        for j in 0..I {
            let g: f32 = (0..H).map(|k| rows.gate[j * H + k] * x[k]).sum();
            let u: f32 = (0..H).map(|k| rows.up[j * H + k] * x[k]).sum();
            clamped += usize::from(g > 7.0) + usize::from(u.abs() > 7.0);
        }
        assert!(clamped > 0, "the test's inputs never reach the limit");
        for gate_up in [GateUp::Separate, GateUp::Fused, GateUp::FusedInterleaved] {
            for (bias, glu) in [(true, Glu::SwiGlu), (false, CLAMPED), (true, CLAMPED)] {
                let e = rows.expert(gate_up, bias, glu, Dtype::F32);
                let y = e.ffn_rows(&[0, 2], &x, H, true, Activations::F32);
                for (n, &r) in [0usize, 2].iter().enumerate() {
                    let want = rows.reference(&x[r * H..(r + 1) * H], bias, glu);
                    for (k, (got, want)) in y[n * H..(n + 1) * H].iter().zip(&want).enumerate() {
                        assert!(
                            (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                            "{gate_up:?} bias {bias} {glu:?} row {r} value {k}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_fused_expert_with_biases_round_trips_through_an_owned_buffer() {
        let rows = Rows::new(H, I, 5, 0.5);
        let x = values(4 * H, 13, 1.0);
        for dtype in [Dtype::F32, Dtype::Q8_0] {
            let e = rows.expert(GateUp::FusedInterleaved, true, CLAMPED, dtype);
            let buf = e.read_owned().unwrap();
            assert_eq!(buf.num_parts(), 4);
            assert_eq!(ExpertParts::layout(&buf), &e.layout);
            for (i, t) in e.parts.iter().enumerate() {
                assert_eq!(buf.part_bytes(i), t.bytes(), "part {i} ({})", t.name);
            }
            assert_eq!(buf.all_part_bytes().len(), 4);
            let want = e.ffn_rows(&[3, 1], &x, H, true, Activations::F32);
            let got = buf.ffn_rows(&[3, 1], &x, H, true, Activations::F32);
            assert_eq!(bits(&got), bits(&want), "{dtype:?}");
        }
    }

    #[test]
    fn a_part_of_the_wrong_shape_or_type_is_refused_by_name() {
        let rows = Rows::new(H, I, 1, 0.5);
        let e = rows.expert(GateUp::Fused, true, Glu::SwiGlu, Dtype::F32);
        // gate_up with only I rows (the separate gate's shape).
        let mut bad = e.clone();
        bad.parts[0] = f32_tensor("e0.gate_up", &[I, H], &rows.gate);
        let err = e.layout.check(&bad.parts).unwrap_err().to_string();
        assert!(
            err.contains("`e0.gate_up`") && err.contains(&format!("[{}, {H}]", 2 * I)),
            "{err}"
        );
        // A down bias of the inter size.
        let mut bad = e.clone();
        bad.parts[3] = f32_tensor("e0.down_bias", &[I], &rows.up_bias);
        let err = e.layout.check(&bad.parts).unwrap_err().to_string();
        assert!(
            err.contains("`e0.down_bias`") && err.contains(&format!("[{H}]")),
            "{err}"
        );
        // A quantized bias.
        let mut bad = e.clone();
        bad.parts[3] = in_dtype(
            f32_tensor("e0.down_bias", &[1, H], &rows.down_bias),
            Dtype::Q8_0,
        );
        bad.parts[3].shape = vec![H];
        let err = e.layout.check(&bad.parts).unwrap_err().to_string();
        assert!(
            err.contains("`e0.down_bias`") && err.to_lowercase().contains("q8_0"),
            "{err}"
        );
        // A missing part.
        let mut bad = e.clone();
        bad.parts.pop();
        let err = e.layout.check(&bad.parts).unwrap_err().to_string();
        assert!(err.contains("down_bias"), "{err}");
        // The store refuses the expert at build time, naming the tensor.
        let mut bad = e.clone();
        bad.parts[1] = f32_tensor("e0.down", &[H, I + 1], &values(H * (I + 1), 2, 1.0));
        let err = crate::store::TieredStore::new(
            vec![vec![e.clone(), bad]],
            H,
            I,
            crate::store::TieredStoreConfig::default(),
        )
        .err()
        .expect("refused")
        .to_string();
        assert!(err.contains("`e0.down`"), "{err}");
    }
}
