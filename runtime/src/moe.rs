//! Sparse MoE blocks: the router (softmax over experts, top-k, optional renormalisation) and the
//! dispatch of routed token rows to the expert store, plus Qwen2-MoE's gated shared expert.
//!
//! Invariants: router logits, probabilities and weights are f32; top-k order is descending
//! probability with ties broken towards the lower expert index (as `torch.topk` on CPU does for
//! distinct values); the block never touches expert weights itself, only through [`ExpertStore`].

use std::collections::BTreeMap;

use crate::config::RouterConfig;
use crate::error::Result;
use crate::layers::{Linear, Mlp};
use crate::store::{ExpertBatch, ExpertStore};

/// Routing decisions of one layer for `tokens` rows.
#[derive(Clone, Debug, Default)]
pub struct Routing {
    /// `[tokens, top_k]` expert indices, best first.
    pub indices: Vec<u32>,
    /// `[tokens, top_k]` routing weights actually applied.
    pub weights: Vec<f32>,
    /// `[tokens, num_experts]` raw router logits.
    pub logits: Vec<f32>,
}

/// The gate projection and the top-k rule.
pub struct Router {
    pub gate: Linear,
    pub cfg: RouterConfig,
}

impl Router {
    /// Routes `t` rows of `x` (`[t, hidden]`).
    pub fn route(&self, x: &[f32], t: usize) -> Routing {
        let e = self.cfg.num_experts;
        let k = self.cfg.top_k;
        let logits = self.gate.forward(x, t);
        let mut indices = Vec::with_capacity(t * k);
        let mut weights = Vec::with_capacity(t * k);
        let mut order: Vec<usize> = Vec::with_capacity(e);
        for row in logits.chunks_exact(e) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = row.iter().map(|&l| (l - max).exp()).collect();
            let sum: f32 = exps.iter().sum();
            let probs: Vec<f32> = exps.iter().map(|x| x / sum).collect();
            order.clear();
            order.extend(0..e);
            // Stable sort: equal probabilities keep ascending expert order.
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
            let top = &order[..k];
            let denom: f32 = if self.cfg.norm_topk_prob {
                top.iter().map(|&i| probs[i]).sum()
            } else {
                1.0
            };
            for &i in top {
                indices.push(i as u32);
                weights.push(probs[i] / denom);
            }
        }
        Routing {
            indices,
            weights,
            logits,
        }
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

/// An always-on expert whose output is scaled by `sigmoid(gate(x))` (Qwen2-MoE).
pub struct SharedExpert {
    pub mlp: Mlp,
    pub gate: Linear,
}

/// A sparse MoE feed-forward block.
pub struct MoeBlock {
    /// Model layer index: the store's address for this block's experts.
    pub layer: usize,
    pub router: Router,
    pub shared: Option<SharedExpert>,
}

impl MoeBlock {
    /// `x` is `[t, hidden]`; returns `[t, hidden]` and the routing decisions.
    pub fn forward(
        &self,
        x: &[f32],
        t: usize,
        hidden: usize,
        store: &dyn ExpertStore,
    ) -> Result<(Vec<f32>, Routing)> {
        let routing = self.router.route(x, t);
        let batches = group_by_expert(&routing, self.router.cfg.top_k);
        let mut out = vec![0f32; t * hidden];
        store.compute(self.layer, &batches, x, hidden, &mut out)?;
        if let Some(s) = &self.shared {
            let y = s.mlp.forward(x, t);
            let g = s.gate.forward(x, t);
            for ((o, yr), g) in out
                .chunks_exact_mut(hidden)
                .zip(y.chunks_exact(hidden))
                .zip(g)
            {
                let sig = 1.0 / (1.0 + (-g).exp());
                for (o, y) in o.iter_mut().zip(yr) {
                    *o += sig * y;
                }
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
