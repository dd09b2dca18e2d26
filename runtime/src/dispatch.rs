//! The decoder on the backend chosen at run time: [`AnyDecoder`] holds a [`Decoder`] on the CPU
//! or on CUDA, and [`SeqState`] / [`Snapshot`] / [`Segment`] the per-sequence values that go
//! with it, so the engine, the batcher and the server are written once for every backend.
//!
//! Invariants: a state is made by the decoder that uses it ([`AnyDecoder::new_state`]), so its
//! backend always matches; passing a state of the other backend is an internal error, never a
//! silent conversion.

use crate::backend::{Cpu, Cuda};
use crate::error::{Error, Result};
use crate::model::{self, Decoder, Logits, Trace};
use crate::store::ExpertSource;

/// A decoder on the CPU or on CUDA.
pub enum AnyDecoder {
    Cpu(Decoder<Cpu>),
    Cuda(Decoder<Cuda>),
}

/// One sequence's state, on its decoder's backend.
pub enum SeqState {
    Cpu(model::SeqState<Cpu>),
    Cuda(model::SeqState<Cuda>),
}

impl Clone for SeqState {
    fn clone(&self) -> Self {
        match self {
            SeqState::Cpu(s) => SeqState::Cpu(s.clone()),
            SeqState::Cuda(s) => SeqState::Cuda(s.clone()),
        }
    }
}

impl SeqState {
    /// Positions held.
    pub fn len(&self) -> usize {
        match self {
            SeqState::Cpu(s) => s.len,
            SeqState::Cuda(s) => s.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A state's length and recurrent parts at one moment (see [`AnyDecoder::snapshot`]).
pub enum Snapshot {
    Cpu(model::Snapshot<Cpu>),
    Cuda(model::Snapshot<Cuda>),
}

/// The next tokens of one sequence in a batched forward pass.
pub struct Segment<'a> {
    pub tokens: &'a [u32],
    pub state: &'a mut SeqState,
    /// Which logits to return; `None` = none (a prefill chunk that is not the prompt's last).
    pub logits: Option<Logits>,
}

fn mismatch() -> Error {
    Error::Internal("a sequence state of another backend was passed to the decoder".into())
}

impl AnyDecoder {
    /// The backend's name (`cpu`, `cuda`).
    pub fn backend_name(&self) -> &'static str {
        use crate::backend::Backend;
        match self {
            AnyDecoder::Cpu(d) => d.backend.name(),
            AnyDecoder::Cuda(d) => d.backend.name(),
        }
    }

    /// The expert store's backend-free side (counters, popularity).
    pub fn store(&self) -> &dyn ExpertSource {
        match self {
            AnyDecoder::Cpu(d) => d.store.as_ref(),
            AnyDecoder::Cuda(d) => d.store.as_ref(),
        }
    }

    /// The CUDA decoder, when the model runs on CUDA.
    pub fn cuda(&self) -> Option<&Decoder<Cuda>> {
        match self {
            AnyDecoder::Cuda(d) => Some(d),
            AnyDecoder::Cpu(_) => None,
        }
    }

    /// A fresh state for one sequence.
    pub fn new_state(&self) -> SeqState {
        match self {
            AnyDecoder::Cpu(d) => SeqState::Cpu(d.new_state()),
            AnyDecoder::Cuda(d) => SeqState::Cuda(d.new_state()),
        }
    }

    /// Bytes held by a sequence's caches.
    pub fn state_bytes(&self, state: &SeqState) -> usize {
        match (self, state) {
            (AnyDecoder::Cpu(d), SeqState::Cpu(s)) => d.state_bytes(s),
            (AnyDecoder::Cuda(d), SeqState::Cuda(s)) => d.state_bytes(s),
            _ => 0,
        }
    }

    /// See [`Decoder::forward`].
    pub fn forward(
        &self,
        tokens: &[u32],
        state: &mut SeqState,
        logits: Logits,
        trace: Option<&mut Trace>,
    ) -> Result<Vec<f32>> {
        match (self, state) {
            (AnyDecoder::Cpu(d), SeqState::Cpu(s)) => d.forward(tokens, s, logits, trace),
            (AnyDecoder::Cuda(d), SeqState::Cuda(s)) => d.forward(tokens, s, logits, trace),
            _ => Err(mismatch()),
        }
    }

    /// See [`Decoder::forward_batch`].
    pub fn forward_batch(
        &self,
        segs: &mut [Segment<'_>],
        trace: Option<&mut Trace>,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        match self {
            AnyDecoder::Cpu(d) => {
                let mut inner = segs
                    .iter_mut()
                    .map(|s| match &mut *s.state {
                        SeqState::Cpu(st) => Ok(model::Segment {
                            tokens: s.tokens,
                            state: st,
                            logits: s.logits,
                        }),
                        SeqState::Cuda(_) => Err(mismatch()),
                    })
                    .collect::<Result<Vec<_>>>()?;
                d.forward_batch(&mut inner, trace)
            }
            AnyDecoder::Cuda(d) => {
                let mut inner = segs
                    .iter_mut()
                    .map(|s| match &mut *s.state {
                        SeqState::Cuda(st) => Ok(model::Segment {
                            tokens: s.tokens,
                            state: st,
                            logits: s.logits,
                        }),
                        SeqState::Cpu(_) => Err(mismatch()),
                    })
                    .collect::<Result<Vec<_>>>()?;
                d.forward_batch(&mut inner, trace)
            }
        }
    }

    /// See [`Decoder::can_truncate`].
    pub fn can_truncate(&self) -> bool {
        match self {
            AnyDecoder::Cpu(d) => d.can_truncate(),
            AnyDecoder::Cuda(d) => d.can_truncate(),
        }
    }

    /// See [`Decoder::truncate`] (false for a state of another backend).
    #[must_use]
    pub fn truncate(&self, state: &mut SeqState, len: usize) -> bool {
        match (self, state) {
            (AnyDecoder::Cpu(d), SeqState::Cpu(s)) => d.truncate(s, len),
            (AnyDecoder::Cuda(d), SeqState::Cuda(s)) => d.truncate(s, len),
            _ => false,
        }
    }

    /// See [`Decoder::snapshot`].
    pub fn snapshot(&self, state: &SeqState) -> Snapshot {
        match state {
            SeqState::Cpu(s) => Snapshot::Cpu(match self {
                AnyDecoder::Cpu(d) => d.snapshot(s),
                AnyDecoder::Cuda(_) => model::Snapshot::of_len(s.len),
            }),
            SeqState::Cuda(s) => Snapshot::Cuda(match self {
                AnyDecoder::Cuda(d) => d.snapshot(s),
                AnyDecoder::Cpu(_) => model::Snapshot::of_len(s.len),
            }),
        }
    }

    /// See [`Decoder::restore`] (nothing for a state of another backend).
    pub fn restore(&self, state: &mut SeqState, snap: Snapshot) {
        match (self, state, snap) {
            (AnyDecoder::Cpu(d), SeqState::Cpu(s), Snapshot::Cpu(snap)) => d.restore(s, snap),
            (AnyDecoder::Cuda(d), SeqState::Cuda(s), Snapshot::Cuda(snap)) => d.restore(s, snap),
            _ => {}
        }
    }
}
