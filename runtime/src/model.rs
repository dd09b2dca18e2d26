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

use std::ops::Range;

use crate::backend::{Backend, Host, KvElem};
use crate::deltanet::GatedDeltaNet;
use crate::error::{Error, Result};
use crate::layers::{Attention, Linear, Mlp, RmsNorm};
use crate::mla::LatentAttention;
use crate::moe::{MoeBlock, Routing};
use crate::store::{ExpertStore, ExpertWeights};

/// Mixes information across positions.
// One value per layer, built once at load: the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Mixer<B: Backend = Host> {
    Attention(Attention<B>),
    /// Multi-head latent attention over a latent KV cache.
    Latent(LatentAttention<B>),
    Linear(GatedDeltaNet<B>),
}

/// Per-sequence state of one mixer.
pub enum MixerState<B: Backend = Host> {
    Kv(B::Kv),
    Linear(B::Recurrent),
}

impl<B: Backend> Clone for MixerState<B> {
    fn clone(&self) -> Self {
        match self {
            MixerState::Kv(kv) => MixerState::Kv(kv.clone()),
            MixerState::Linear(st) => MixerState::Linear(st.clone()),
        }
    }
}

/// Mixes information across channels.
// One value per layer, built once at load: the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Ffn<B: Backend = Host> {
    Dense(Mlp<B>),
    Moe(MoeBlock<B>),
}

/// A pre-norm decoder layer: `x += mixer(norm(x)); x += ffn(norm(x))`.
pub struct DecoderLayer<B: Backend = Host> {
    pub input_norm: RmsNorm<B>,
    pub mixer: Mixer<B>,
    pub post_norm: RmsNorm<B>,
    pub ffn: Ffn<B>,
}

impl DecoderLayer<Host> {
    /// The same layer on backend `b`.
    pub fn upload<B: Backend>(self, b: &B) -> Result<DecoderLayer<B>> {
        Ok(DecoderLayer {
            input_norm: self.input_norm.upload(b)?,
            mixer: match self.mixer {
                Mixer::Attention(a) => Mixer::Attention(a.upload(b)?),
                Mixer::Latent(a) => Mixer::Latent(a.upload(b)?),
                Mixer::Linear(d) => Mixer::Linear(d.upload(b)?),
            },
            post_norm: self.post_norm.upload(b)?,
            ffn: match self.ffn {
                Ffn::Dense(m) => Ffn::Dense(m.upload(b)?),
                Ffn::Moe(m) => Ffn::Moe(m.upload(b)?),
            },
        })
    }
}

/// Everything an architecture file builds (in host form, `ModelWeights<Host>`; the quantizer and
/// the cache rewrite its weights there before it moves to its backend).
pub struct ModelWeights<B: Backend = Host> {
    pub embed: B::Weight,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    pub lm_head: Linear<B>,
    /// Per layer, its experts (empty for dense layers): moved into the expert store at load
    /// (empty afterwards).
    pub experts: Vec<Vec<ExpertWeights>>,
}

impl ModelWeights<Host> {
    /// The whole resident set on backend `b` (the experts stay host-side, for the store).
    pub fn upload<B: Backend>(self, b: &B) -> Result<ModelWeights<B>> {
        Ok(ModelWeights {
            embed: b.upload_weight(self.embed)?,
            layers: self
                .layers
                .into_iter()
                .map(|l| l.upload(b))
                .collect::<Result<_>>()?,
            norm: self.norm.upload(b)?,
            lm_head: self.lm_head.upload(b)?,
            experts: self.experts,
        })
    }
}

/// The per-sequence state: position and one mixer state per layer.
pub struct SeqState<B: Backend = Host> {
    pub layers: Vec<MixerState<B>>,
    pub len: usize,
}

impl<B: Backend> Clone for SeqState<B> {
    fn clone(&self) -> Self {
        SeqState {
            layers: self.layers.clone(),
            len: self.len,
        }
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

/// The decoder: the backend it computes on, its weights there, and the expert store its
/// sparse layers use.
pub struct Decoder<B: Backend = Host> {
    pub backend: B,
    pub w: ModelWeights<B>,
    pub store: Box<dyn ExpertStore<B>>,
    pub hidden_size: usize,
    pub vocab_size: usize,
    /// Element type of new sequences' KV caches.
    pub kv_elem: KvElem,
}

/// Layer `l`'s KV cache in every sequence's state (an attention layer holds one).
fn layer_kv<'a, B: Backend>(segs: &'a mut [Segment<'_, B>], l: usize) -> Vec<&'a mut B::Kv> {
    segs.iter_mut()
        .map(|s| match &mut s.state.layers[l] {
            MixerState::Kv(kv) => kv,
            MixerState::Linear(_) => unreachable!("state built for this model"),
        })
        .collect()
}

impl<B: Backend> Decoder<B> {
    /// A fresh state for one sequence.
    pub fn new_state(&self) -> SeqState<B> {
        let b = &self.backend;
        SeqState {
            layers: self
                .w
                .layers
                .iter()
                .map(|l| match &l.mixer {
                    Mixer::Attention(_) | Mixer::Latent(_) => {
                        MixerState::Kv(b.kv_new(self.kv_elem))
                    }
                    Mixer::Linear(d) => MixerState::Linear(d.new_state(b)),
                })
                .collect(),
            len: 0,
        }
    }

    /// Bytes held by a sequence's caches.
    pub fn state_bytes(&self, state: &SeqState<B>) -> usize {
        let b = &self.backend;
        state
            .layers
            .iter()
            .map(|l| match l {
                MixerState::Kv(kv) => b.kv_bytes(kv),
                MixerState::Linear(st) => b.recurrent_bytes(st),
            })
            .sum()
    }

    /// Runs `tokens` (the next tokens of the sequence) through the model, appending to `state`.
    /// Returns logits `[1, vocab]` or `[tokens, vocab]`.
    pub fn forward(
        &self,
        tokens: &[u32],
        state: &mut SeqState<B>,
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
        segs: &mut [Segment<'_, B>],
        mut trace: Option<&mut Trace>,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let b = &self.backend;
        let h = self.hidden_size;
        let lens: Vec<usize> = segs.iter().map(|s| s.tokens.len()).collect();
        let t: usize = lens.iter().sum();
        if segs.is_empty() || lens.contains(&0) {
            return Err(Error::InvalidRequest("no tokens to process".into()));
        }
        let ids: Vec<u32> = segs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        if let Some(id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(Error::InvalidRequest(format!(
                "token id {id} is outside the vocabulary (vocab_size {})",
                self.vocab_size
            )));
        }
        // A failure left by an earlier pass that ended early belongs to that pass.
        b.check().ok();
        let mut x = b.embed(&self.w.embed, &ids, h);
        let lookahead = if self.store.wants_prefetch() {
            self.store.prefetch_depth()
        } else {
            0
        };
        for (l, layer) in self.w.layers.iter().enumerate() {
            for ahead in 1..=lookahead {
                self.predict_and_prefetch(l + ahead, &x, t);
            }
            let normed = layer.input_norm.forward(b, &x);
            let mixed = match &layer.mixer {
                Mixer::Attention(a) => a.forward_batch(b, &normed, &lens, &mut layer_kv(segs, l)),
                Mixer::Latent(a) => a.forward_batch(b, &normed, &lens, &mut layer_kv(segs, l)),
                Mixer::Linear(d) => {
                    let mut states: Vec<&mut B::Recurrent> = segs
                        .iter_mut()
                        .map(|s| match &mut s.state.layers[l] {
                            MixerState::Linear(st) => st,
                            MixerState::Kv(_) => unreachable!("state built for this model"),
                        })
                        .collect();
                    d.forward_batch(b, &normed, &lens, &mut states)
                }
            };
            b.add(&mut x, &mixed);
            let normed = layer.post_norm.forward(b, &x);
            let (y, routing) = match &layer.ffn {
                Ffn::Dense(mlp) => (mlp.forward(b, &normed, t), None),
                Ffn::Moe(moe) => {
                    let (y, r) = moe.forward(b, &normed, t, h, self.store.as_ref())?;
                    (y, Some(r))
                }
            };
            b.add(&mut x, &y);
            if let Some(tr) = trace.as_deref_mut() {
                if tr.hidden.len() <= l {
                    tr.hidden.resize(l + 1, Vec::new());
                    tr.routing.resize(l + 1, None);
                }
                tr.hidden[l] = b.to_host(&x).into_owned();
                tr.routing[l] = routing;
            }
        }
        // A failed device operation fails the pass (before the states count the new rows).
        b.check()?;
        // The rows whose logits are wanted, gathered so the head runs once over all of them.
        let mut ranges: Vec<Range<usize>> = Vec::new();
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
            ranges.push(take);
            row0 += n;
        }
        let m: usize = counts.iter().sum();
        let all = if m > 0 {
            let mut rows = b.take_rows(&x, h, &ranges);
            self.w.norm.forward_inplace(b, &mut rows);
            let logits = self.w.lm_head.forward(b, &rows, m);
            b.to_host(&logits).into_owned()
        } else {
            Vec::new()
        };
        b.check()?;
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
    pub fn truncate(&self, state: &mut SeqState<B>, len: usize) -> bool {
        if len >= state.len {
            return true;
        }
        if !self.can_truncate() {
            return false;
        }
        self.cut_kv(state, len);
        true
    }

    fn cut_kv(&self, state: &mut SeqState<B>, len: usize) {
        for (layer, st) in self.w.layers.iter().zip(&mut state.layers) {
            let row = match &layer.mixer {
                Mixer::Attention(a) => a.kv_row(),
                Mixer::Latent(a) => a.kv_row(),
                Mixer::Linear(_) => continue,
            };
            if let MixerState::Kv(kv) = st {
                self.backend.kv_truncate(kv, len, row)
            }
        }
        state.len = state.len.min(len);
    }

    /// What [`Decoder::restore`] needs to bring `state` back to where it is now: its length,
    /// plus a copy of its recurrent layers' states (none in attention-only models).
    pub fn snapshot(&self, state: &SeqState<B>) -> Snapshot<B> {
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
    pub fn restore(&self, state: &mut SeqState<B>, snap: Snapshot<B>) {
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
pub struct Snapshot<B: Backend = Host> {
    len: usize,
    linear: Vec<Option<B::Recurrent>>,
}

impl<B: Backend> Snapshot<B> {
    /// A snapshot of the length alone (restores nothing recurrent).
    pub fn of_len(len: usize) -> Snapshot<B> {
        Snapshot {
            len,
            linear: Vec::new(),
        }
    }
}

/// The next tokens of one sequence in a batched forward pass.
pub struct Segment<'a, B: Backend = Host> {
    pub tokens: &'a [u32],
    pub state: &'a mut SeqState<B>,
    /// Which logits to return; `None` = none (a prefill chunk that is not the prompt's last).
    pub logits: Option<Logits>,
}

impl<B: Backend> Decoder<B> {
    /// Router lookahead: runs layer `target`'s router on the current hidden state (through that
    /// layer's own pre-FFN norm) and asks the store to start loading the experts it picks.
    fn predict_and_prefetch(&self, target: usize, x: &B::Act, t: usize) {
        let Some(layer) = self.w.layers.get(target) else {
            return;
        };
        let Ffn::Moe(moe) = &layer.ffn else {
            return;
        };
        let b = &self.backend;
        let normed = layer.post_norm.forward(b, x);
        let routing = moe.router.route(b, &normed, t);
        let mut experts: Vec<usize> = routing.indices.iter().map(|&e| e as usize).collect();
        experts.sort_unstable();
        experts.dedup();
        self.store.prefetch(target, &experts);
    }
}
