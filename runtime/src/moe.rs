//! Sparse MoE blocks: the router (a gate projection and a [`RouterRule`]) and the dispatch of
//! routed token rows to the expert store, plus Qwen2-MoE's gated shared expert.
//!
//! Invariants: router logits, scores and weights are f32 and the rule is data (the backend's
//! `route` op computes any of them); top-k order is descending score with ties broken towards
//! the lower expert index (as `torch.topk` on CPU does for distinct values); the block never
//! touches expert weights itself, only through [`ExpertStore`].

use std::collections::BTreeMap;

pub use crate::backend::Routing;
use crate::backend::{Backend, Host, RouterRule};
use crate::error::Result;
use crate::layers::{Linear, Mlp};
use crate::store::{ExpertBatch, ExpertStore};

/// The gate projection and the routing rule.
pub struct Router<B: Backend = Host> {
    pub gate: Linear<B>,
    pub rule: RouterRule,
    /// Added to the scores when choosing experts, never to the weights (DeepSeek-V3's
    /// `e_score_correction_bias`); one per expert.
    pub selection_bias: Option<B::Vector>,
}

impl Router<Host> {
    /// The same router on backend `b`.
    pub fn upload<B: Backend>(self, b: &B) -> Result<Router<B>> {
        Ok(Router {
            gate: self.gate.upload(b)?,
            rule: self.rule,
            selection_bias: self
                .selection_bias
                .map(|v| b.upload_vector(v))
                .transpose()?,
        })
    }
}

impl<B: Backend> Router<B> {
    /// Routes `t` rows of `x` (`[t, hidden]`).
    pub fn route(&self, b: &B, x: &B::Act, t: usize) -> Routing {
        let logits = self.gate.forward(b, x, t);
        b.route(logits, &self.rule, self.selection_bias.as_ref())
    }
}

/// Groups routed rows by expert, ascending expert order (the store's contract).
pub fn group_by_expert(r: &Routing, top_k: usize) -> Vec<ExpertBatch> {
    let mut by: BTreeMap<usize, ExpertBatch> = BTreeMap::new();
    for (i, (idx, w)) in r.indices.iter().zip(&r.weights).enumerate() {
        let b = by.entry(*idx as usize).or_insert_with(|| ExpertBatch {
            expert: *idx as usize,
            rows: Vec::new(),
            weights: Vec::new(),
        });
        b.rows.push(i / top_k);
        b.weights.push(*w);
    }
    by.into_values().collect()
}

/// An always-on expert added to the routed experts' sum: scaled by `sigmoid(gate(x))` when it
/// has a gate (Qwen2-MoE, Qwen3-Next), added as it is otherwise (GLM-4.5, DeepSeek-V3).
pub struct SharedExpert<B: Backend = Host> {
    pub mlp: Mlp<B>,
    pub gate: Option<Linear<B>>,
}

/// A sparse MoE feed-forward block.
pub struct MoeBlock<B: Backend = Host> {
    /// Model layer index: the store's address for this block's experts.
    pub layer: usize,
    pub router: Router<B>,
    pub shared: Option<SharedExpert<B>>,
}

impl MoeBlock<Host> {
    /// The same block on backend `b`.
    pub fn upload<B: Backend>(self, b: &B) -> Result<MoeBlock<B>> {
        Ok(MoeBlock {
            layer: self.layer,
            router: self.router.upload(b)?,
            shared: match self.shared {
                Some(s) => Some(SharedExpert {
                    mlp: s.mlp.upload(b)?,
                    gate: s.gate.map(|g| g.upload(b)).transpose()?,
                }),
                None => None,
            },
        })
    }
}

impl<B: Backend> MoeBlock<B> {
    /// `x` is `[t, hidden]`; returns `[t, hidden]` and the routing decisions.
    pub fn forward(
        &self,
        b: &B,
        x: &B::Act,
        t: usize,
        hidden: usize,
        store: &dyn ExpertStore<B>,
    ) -> Result<(B::Act, Routing)> {
        let routing = self.router.route(b, x, t);
        let batches = group_by_expert(&routing, self.router.rule.top_k);
        let mut out = store.compute(b, self.layer, &batches, x, hidden)?;
        if let Some(s) = &self.shared {
            let y = s.mlp.forward(b, x, t);
            match &s.gate {
                Some(gate) => {
                    let g = gate.forward(b, x, t);
                    b.add_gated_rows(&mut out, &y, &g, hidden);
                }
                None => b.add(&mut out, &y),
            }
        }
        Ok((out, routing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouping_keeps_rows_and_weights() {
        let r = Routing {
            indices: vec![3, 1, 1, 0],
            weights: vec![0.6, 0.4, 0.7, 0.3],
            logits: vec![],
        };
        let g = group_by_expert(&r, 2);
        let experts: Vec<usize> = g.iter().map(|b| b.expert).collect();
        assert_eq!(experts, vec![0, 1, 3]);
        assert_eq!(g[1].rows, vec![0, 1]);
        assert_eq!(g[1].weights, vec![0.4, 0.7]);
        assert_eq!(g[0].rows, vec![1]);
    }
}
