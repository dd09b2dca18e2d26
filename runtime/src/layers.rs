//! Building blocks that architecture files compose: linear projections, RMSNorm, rotary
//! embeddings, attention over a KV cache, and the dense gated MLP, generic over the compute
//! [`Backend`].
//!
//! Invariants: activations, norms, softmax and accumulation are f32 whatever the weights' dtype;
//! weights are read in place (no copies of large tensors); every computation goes through the
//! backend (this file names no kernel and no device). Row-major layouts: activations
//! `[tokens, width]`, weights `[out, in]` as Hugging Face stores them. The host form of a block
//! (`X<Host>`, what architecture files load) becomes another backend's by `upload`.

use crate::backend::{AttnShape, Backend, Glu, Host};
use crate::error::Result;
use crate::weights::WeightSet;

/// `y = x · Wᵀ (+ b)`.
pub struct Linear<B: Backend = Host> {
    pub weight: B::Weight,
    pub bias: Option<B::Vector>,
    pub in_features: usize,
    pub out_features: usize,
}

impl Linear<Host> {
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
        })
    }

    /// From an existing `[out, in]` view (e.g. one expert of a stacked tensor).
    pub fn from_view(weight: crate::weights::TensorRef) -> Linear {
        Linear {
            in_features: weight.shape[1],
            out_features: weight.shape[0],
            weight,
            bias: None,
        }
    }

    /// The same projection on backend `b`.
    pub fn upload<B: Backend>(self, b: &B) -> Result<Linear<B>> {
        Ok(Linear {
            weight: b.upload_weight(self.weight)?,
            bias: self.bias.map(|v| b.upload_vector(v)).transpose()?,
            in_features: self.in_features,
            out_features: self.out_features,
        })
    }
}

impl<B: Backend> Linear<B> {
    /// `x` is `[m, in]`; returns `[m, out]`.
    pub fn forward(&self, b: &B, x: &B::Act, m: usize) -> B::Act {
        b.matmul(
            x,
            m,
            &self.weight,
            self.in_features,
            self.out_features,
            self.bias.as_ref(),
        )
    }
}

/// Root-mean-square norm: `x / sqrt(mean(x²) + eps) * w`.
pub struct RmsNorm<B: Backend = Host> {
    pub weight: B::Vector,
    /// Width of the rows it normalises (the weight's length).
    pub dim: usize,
    pub eps: f32,
}

impl RmsNorm<Host> {
    pub fn load(w: &WeightSet, name: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: w.compute(name, &[dim])?.to_f32_vec()?,
            dim,
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

    /// The same norm on backend `b`.
    pub fn upload<B: Backend>(self, b: &B) -> Result<RmsNorm<B>> {
        Ok(RmsNorm {
            weight: b.upload_vector(self.weight)?,
            dim: self.dim,
            eps: self.eps,
        })
    }
}

impl<B: Backend> RmsNorm<B> {
    /// Normalises every `dim`-wide row of `x` in place.
    pub fn forward_inplace(&self, b: &B, x: &mut B::Act) {
        b.rms_norm(x, &self.weight, self.dim, self.eps)
    }

    /// A normalised copy of `x`.
    pub fn forward(&self, b: &B, x: &B::Act) -> B::Act {
        let mut y = b.copy(x);
        self.forward_inplace(b, &mut y);
        y
    }
}

/// Rotary frequency tables (derived from the config; the backend's `rope` op applies them).
pub use crate::config::Rope;

/// How q and k are normalised (see [`crate::config::QkNorm`]), with the norm weights.
pub enum QkNormLayer<B: Backend = Host> {
    None,
    PerHead { q: RmsNorm<B>, k: RmsNorm<B> },
    FullWidth { q: RmsNorm<B>, k: RmsNorm<B> },
}

impl QkNormLayer<Host> {
    fn upload<B: Backend>(self, b: &B) -> Result<QkNormLayer<B>> {
        Ok(match self {
            QkNormLayer::None => QkNormLayer::None,
            QkNormLayer::PerHead { q, k } => QkNormLayer::PerHead {
                q: q.upload(b)?,
                k: k.upload(b)?,
            },
            QkNormLayer::FullWidth { q, k } => QkNormLayer::FullWidth {
                q: q.upload(b)?,
                k: k.upload(b)?,
            },
        })
    }
}

/// Multi-head causal self-attention with GQA, optional q/k norm, clipping, sliding window and
/// output gate.
pub struct Attention<B: Backend = Host> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub qk_norm: QkNormLayer<B>,
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
    /// One learned logit per head that joins the softmax as a position without a value
    /// (gpt-oss's attention sinks).
    pub sinks: Option<B::Vector>,
}

impl Attention<Host> {
    /// The same layer on backend `b`.
    pub fn upload<B: Backend>(self, b: &B) -> Result<Attention<B>> {
        Ok(Attention {
            q_proj: self.q_proj.upload(b)?,
            k_proj: self.k_proj.upload(b)?,
            v_proj: self.v_proj.upload(b)?,
            o_proj: self.o_proj.upload(b)?,
            qk_norm: self.qk_norm.upload(b)?,
            clip_qkv: self.clip_qkv,
            num_heads: self.num_heads,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            sliding_window: self.sliding_window,
            rope: self.rope,
            output_gate: self.output_gate,
            sinks: self.sinks.map(|s| b.upload_vector(s)).transpose()?,
        })
    }
}

impl<B: Backend> Attention<B> {
    /// Values per position in the KV cache.
    pub fn kv_row(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Several sequences at once: `x` holds `lens[s]` rows of sequence `s` after those of the
    /// sequences before it, each continuing its own `caches[s]`. The projections run over all
    /// rows together (one pass over each weight); scores and mixing stay within a sequence.
    pub fn forward_batch(
        &self,
        b: &B,
        x: &B::Act,
        lens: &[usize],
        caches: &mut [&mut B::Kv],
    ) -> B::Act {
        debug_assert_eq!(lens.len(), caches.len());
        let hd = self.head_dim;
        let t: usize = lens.iter().sum();
        let mut q = self.q_proj.forward(b, x, t);
        let gate = if self.output_gate {
            let (qs, gs) = b.split_halves(&q, hd);
            q = qs;
            Some(gs)
        } else {
            None
        };
        let mut k = self.k_proj.forward(b, x, t);
        let mut v = self.v_proj.forward(b, x, t);
        match &self.qk_norm {
            QkNormLayer::None => {}
            // Per-head norms see `head_dim`-wide rows, full-width norms whole projections: the
            // norm's weight length decides the row width.
            QkNormLayer::PerHead { q: qn, k: kn } | QkNormLayer::FullWidth { q: qn, k: kn } => {
                qn.forward_inplace(b, &mut q);
                kn.forward_inplace(b, &mut k);
            }
        }
        if let Some(c) = self.clip_qkv {
            for a in [&mut q, &mut k, &mut v] {
                b.clamp(a, c);
            }
        }
        // Row r's absolute position: its sequence's cached length plus its index there.
        let mut positions = Vec::with_capacity(t);
        for (&n, cache) in lens.iter().zip(caches.iter()) {
            let len = b.kv_len(cache);
            positions.extend(len..len + n);
        }
        b.rope(&mut q, &mut k, hd, &positions, &self.rope);
        let shape = AttnShape::standard(self.num_heads, self.num_kv_heads, hd, self.sliding_window);
        let mut attn = b.attend(&q, &k, Some(&v), lens, caches, &shape, self.sinks.as_ref());
        if let Some(gate) = gate {
            b.mul_sigmoid(&mut attn, &gate);
        }
        self.o_proj.forward(b, &attn, t)
    }
}

/// Gated MLP: `down(act(gate(x)) * up(x))` (SwiGLU unless an architecture says otherwise).
pub struct Mlp<B: Backend = Host> {
    pub gate: Linear<B>,
    pub up: Linear<B>,
    pub down: Linear<B>,
    pub glu: Glu,
}

impl Mlp<Host> {
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
            glu: Glu::SwiGlu,
        })
    }

    /// The same block on backend `b`.
    pub fn upload<B: Backend>(self, b: &B) -> Result<Mlp<B>> {
        Ok(Mlp {
            gate: self.gate.upload(b)?,
            up: self.up.upload(b)?,
            down: self.down.upload(b)?,
            glu: self.glu,
        })
    }
}

impl<B: Backend> Mlp<B> {
    /// `x` is `[m, hidden]`; returns `[m, hidden]`.
    pub fn forward(&self, b: &B, x: &B::Act, m: usize) -> B::Act {
        let g = self.gate.forward(b, x, m);
        let mut u = self.up.forward(b, x, m);
        b.glu(&g, &mut u, self.glu);
        self.down.forward(b, &u, m)
    }
}
