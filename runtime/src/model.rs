//! The decoder stack and its forward pass over the new tokens of one or several sequences.
//!
//! A layer is a token mixer (attention over a KV cache, or gated DeltaNet linear attention over a
//! fixed-size recurrent state; each keeps its per-sequence state in [`MixerState`]) followed by a feed-forward block (dense MLP or sparse
//! MoE through the expert store). Prefill runs all prompt tokens through each layer at once
//! (matrix-matrix), decode one token at a time; both use the same code.
//!
//! Invariants: a sequence's state ([`SeqState`]) holds everything that depends on its past
//! tokens, one entry per layer, so several sequences can share one model; the forward pass
//! never reads expert weights except through the [`ExpertStore`]; a state with recurrent layers
//! only rolls back to a [`Snapshot`] taken at that length (a KV cache can be cut anywhere).

use crate::deltanet::{GatedDeltaNet, LinearState};
use crate::error::{Error, Result};
use crate::layers::{Attention, KvCache, KvElem, Linear, Mlp, RmsNorm};
use crate::moe::{MoeBlock, Routing};
use crate::store::{ExpertStore, ExpertWeights};
use crate::weights::TensorRef;

/// Mixes information across positions.
// One value per layer, built once at load: the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Mixer {
    Attention(Attention),
    Linear(GatedDeltaNet),
}

/// Per-sequence state of one mixer.
#[derive(Clone)]
pub enum MixerState {
    Kv(KvCache),
    Linear(LinearState),
}

/// Mixes information across channels.
// One value per layer, built once at load: the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Ffn {
    Dense(Mlp),
    Moe(MoeBlock),
}

/// A pre-norm decoder layer: `x += mixer(norm(x)); x += ffn(norm(x))`.
pub struct DecoderLayer {
    pub input_norm: RmsNorm,
    pub mixer: Mixer,
    pub post_norm: RmsNorm,
    pub ffn: Ffn,
}

/// Everything an architecture file builds.
pub struct ModelWeights {
    pub embed: TensorRef,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    pub lm_head: Linear,
    /// Per layer, its experts (empty for dense layers): moved into the expert store at load
    /// (empty afterwards).
    pub experts: Vec<Vec<ExpertWeights>>,
}

/// The per-sequence state: position and one mixer state per layer.
#[derive(Clone)]
pub struct SeqState {
    pub layers: Vec<MixerState>,
    pub len: usize,
}

impl SeqState {
    /// Bytes held by the caches.
    pub fn size_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                MixerState::Kv(kv) => kv.size_bytes(),
                MixerState::Linear(st) => st.size_bytes(),
            })
            .sum()
    }
}

/// Which logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position (generation).
    Last,
    /// Every position (`--logits-out`, parity tests).
    All,
}

/// Intermediate values recorded on request (parity tests, debugging).
#[derive(Default, Debug, Clone)]
pub struct Trace {
    /// Per layer, its output `[tokens, hidden]` (before the final norm).
    pub hidden: Vec<Vec<f32>>,
    /// Per layer, its routing (None for dense layers).
    pub routing: Vec<Option<Routing>>,
}

/// The decoder: weights plus the expert store its sparse layers use.
pub struct Decoder {
    pub w: ModelWeights,
    pub store: Box<dyn ExpertStore>,
    pub hidden_size: usize,
    pub vocab_size: usize,
    /// Element type of new sequences' KV caches.
    pub kv_elem: KvElem,
}

impl Decoder {
    /// A fresh state for one sequence.
    pub fn new_state(&self) -> SeqState {
        SeqState {
            layers: self
                .w
                .layers
                .iter()
                .map(|l| match &l.mixer {
                    Mixer::Attention(_) => MixerState::Kv(KvCache::new(self.kv_elem)),
                    Mixer::Linear(d) => MixerState::Linear(d.new_state()),
                })
                .collect(),
            len: 0,
        }
    }

    /// Runs `tokens` (the next tokens of the sequence) through the model, appending to `state`.
    /// Returns logits `[1, vocab]` or `[tokens, vocab]`.
    pub fn forward(
        &self,
        tokens: &[u32],
        state: &mut SeqState,
        logits: Logits,
        trace: Option<&mut Trace>,
    ) -> Result<Vec<f32>> {
        let mut segs = [Segment {
            tokens,
            state,
            logits: Some(logits),
        }];
        let mut out = self.forward_batch(&mut segs, trace)?;
        Ok(out.pop().flatten().expect("logits were asked for"))
    }

    /// Runs the next tokens of several sequences as one batch: their rows go through every
    /// projection, router and expert together (an expert that several sequences route to is
    /// fetched and computed once per layer for all of them); attention stays per sequence.
    /// Returns, per segment, the logits it asked for.
    pub fn forward_batch(
        &self,
        segs: &mut [Segment<'_>],
        mut trace: Option<&mut Trace>,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let h = self.hidden_size;
        let lens: Vec<usize> = segs.iter().map(|s| s.tokens.len()).collect();
        let t: usize = lens.iter().sum();
        if segs.is_empty() || lens.contains(&0) {
            return Err(Error::InvalidRequest("no tokens to process".into()));
        }
        let mut x = vec![0f32; t * h];
        let ids = segs.iter().flat_map(|s| s.tokens.iter());
        for (row, &id) in x.chunks_exact_mut(h).zip(ids) {
            if id as usize >= self.vocab_size {
                return Err(Error::InvalidRequest(format!(
                    "token id {id} is outside the vocabulary (vocab_size {})",
                    self.vocab_size
                )));
            }
            moe_kernels::row_to_f32(self.w.embed.weights(), id as usize, h, row);
        }
        let lookahead = if self.store.wants_prefetch() {
            self.store.prefetch_depth()
        } else {
            0
        };
        for (l, layer) in self.w.layers.iter().enumerate() {
            for ahead in 1..=lookahead {
                self.predict_and_prefetch(l + ahead, &x, t);
            }
            let normed = layer.input_norm.forward(&x);
            let mixed = match &layer.mixer {
                Mixer::Attention(a) => {
                    let mut caches: Vec<&mut KvCache> = segs
                        .iter_mut()
                        .map(|s| match &mut s.state.layers[l] {
                            MixerState::Kv(kv) => kv,
                            MixerState::Linear(_) => unreachable!("state built for this model"),
                        })
                        .collect();
                    a.forward_batch(&normed, &lens, &mut caches)
                }
                Mixer::Linear(d) => {
                    let mut states: Vec<&mut LinearState> = segs
                        .iter_mut()
                        .map(|s| match &mut s.state.layers[l] {
                            MixerState::Linear(st) => st,
                            MixerState::Kv(_) => unreachable!("state built for this model"),
                        })
                        .collect();
                    d.forward_batch(&normed, &lens, &mut states)
                }
            };
            add_inplace(&mut x, &mixed);
            let normed = layer.post_norm.forward(&x);
            let (y, routing) = match &layer.ffn {
                Ffn::Dense(mlp) => (mlp.forward(&normed, t), None),
                Ffn::Moe(moe) => {
                    let (y, r) = moe.forward(&normed, t, h, self.store.as_ref())?;
                    (y, Some(r))
                }
            };
            add_inplace(&mut x, &y);
            if let Some(tr) = trace.as_deref_mut() {
                if tr.hidden.len() <= l {
                    tr.hidden.resize(l + 1, Vec::new());
                    tr.routing.resize(l + 1, None);
                }
                tr.hidden[l] = x.clone();
                tr.routing[l] = routing;
            }
        }
        // The rows whose logits are wanted, gathered so the head runs once over all of them.
        let mut rows = Vec::new();
        let mut counts = Vec::with_capacity(segs.len());
        let mut row0 = 0;
        for (seg, &n) in segs.iter_mut().zip(&lens) {
            seg.state.len += n;
            let take = match seg.logits {
                None => 0..0,
                Some(Logits::Last) => row0 + n - 1..row0 + n,
                Some(Logits::All) => row0..row0 + n,
            };
            counts.push(take.len());
            rows.extend_from_slice(&x[take.start * h..take.end * h]);
            row0 += n;
        }
        let m = rows.len() / h;
        let all = if m > 0 {
            let normed = self.w.norm.forward(&rows);
            self.w.lm_head.forward(&normed, m)
        } else {
            Vec::new()
        };
        let vocab = self.vocab_size;
        let mut out = Vec::with_capacity(segs.len());
        let mut at = 0;
        for (seg, n) in segs.iter().zip(counts) {
            out.push(
                seg.logits
                    .map(|_| all[at * vocab..(at + n) * vocab].to_vec()),
            );
            at += n;
        }
        Ok(out)
    }

    /// Whether any state of this model can be cut back to any earlier length (no recurrent
    /// layers); otherwise only to a [`Snapshot`].
    pub fn can_truncate(&self) -> bool {
        !self
            .w
            .layers
            .iter()
            .any(|l| matches!(l.mixer, Mixer::Linear(_)))
    }

    /// Forgets everything after the first `len` positions of `state` (prefix reuse). Returns
    /// false, changing nothing, when that would need a recurrent layer's past state
    /// (`len < state.len` in a model where [`Decoder::can_truncate`] is false).
    #[must_use]
    pub fn truncate(&self, state: &mut SeqState, len: usize) -> bool {
        if len >= state.len {
            return true;
        }
        if !self.can_truncate() {
            return false;
        }
        self.cut_kv(state, len);
        true
    }

    fn cut_kv(&self, state: &mut SeqState, len: usize) {
        for (layer, st) in self.w.layers.iter().zip(&mut state.layers) {
            if let (Mixer::Attention(a), MixerState::Kv(kv)) = (&layer.mixer, st) {
                kv.truncate(len, a.num_kv_heads * a.head_dim)
            }
        }
        state.len = state.len.min(len);
    }

    /// What [`Decoder::restore`] needs to bring `state` back to where it is now: its length,
    /// plus a copy of its recurrent layers' states (none in attention-only models).
    pub fn snapshot(&self, state: &SeqState) -> Snapshot {
        Snapshot {
            len: state.len,
            linear: state
                .layers
                .iter()
                .map(|l| match l {
                    MixerState::Linear(st) => Some(st.clone()),
                    MixerState::Kv(_) => None,
                })
                .collect(),
        }
    }

    /// Rolls `state` back to `snap`, taken from it earlier (rollback of a failed step).
    pub fn restore(&self, state: &mut SeqState, snap: Snapshot) {
        self.cut_kv(state, snap.len);
        for (st, saved) in state.layers.iter_mut().zip(snap.linear) {
            if let (MixerState::Linear(st), Some(saved)) = (st, saved) {
                *st = saved;
            }
        }
        state.len = snap.len;
    }
}

/// A sequence state's length and recurrent parts at one moment (see [`Decoder::snapshot`]).
pub struct Snapshot {
    len: usize,
    linear: Vec<Option<LinearState>>,
}

/// The next tokens of one sequence in a batched forward pass.
pub struct Segment<'a> {
    pub tokens: &'a [u32],
    pub state: &'a mut SeqState,
    /// Which logits to return; `None` = none (a prefill chunk that is not the prompt's last).
    pub logits: Option<Logits>,
}

impl Decoder {
    /// Router lookahead: runs layer `target`'s router on the current hidden state (through that
    /// layer's own pre-FFN norm) and asks the store to start loading the experts it picks.
    fn predict_and_prefetch(&self, target: usize, x: &[f32], t: usize) {
        let Some(layer) = self.w.layers.get(target) else {
            return;
        };
        let Ffn::Moe(moe) = &layer.ffn else {
            return;
        };
        let normed = layer.post_norm.forward(x);
        let routing = moe.router.route(&normed, t);
        let mut experts: Vec<usize> = routing.indices.iter().map(|&e| e as usize).collect();
        experts.sort_unstable();
        experts.dedup();
        self.store.prefetch(target, &experts);
    }
}

fn add_inplace(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
