//! Router scoring and expert selection on the CPU for any [`RouterRule`].
//!
//! Invariants: logits, scores and weights are f32; selection order is descending selection score
//! with ties broken towards the lower expert index (as `torch.topk` on CPU does for distinct
//! values); a selection bias changes which experts are chosen, never their weights.

use crate::backend::{RouterRule, Routing, Scoring};

/// See [`crate::backend::Backend::route`]; `logits` is `[rows, num_experts]`.
pub fn route(logits: Vec<f32>, rule: &RouterRule, bias: Option<&[f32]>) -> Routing {
    let (e, k) = (rule.num_experts, rule.top_k);
    let rows = logits.len() / e.max(1);
    let mut indices = Vec::with_capacity(rows * k);
    let mut weights = Vec::with_capacity(rows * k);
    let mut order: Vec<usize> = Vec::with_capacity(e);
    let mut choice = vec![0f32; e];
    for row in logits.chunks_exact(e) {
        // Scores that become weights, and (with the bias) the scores experts are chosen by.
        let scores: Vec<f32> = match rule.scoring {
            Scoring::Softmax => softmax(row),
            Scoring::TopKThenSoftmax => row.to_vec(),
            Scoring::Sigmoid => row.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect(),
        };
        match bias {
            Some(b) => {
                for ((c, s), b) in choice.iter_mut().zip(&scores).zip(b) {
                    *c = s + b;
                }
            }
            None => choice.copy_from_slice(&scores),
        }
        if let Some((groups, keep)) = rule.groups {
            limit_groups(&mut choice, groups, keep);
        }
        order.clear();
        order.extend(0..e);
        // Stable sort: equal scores keep ascending expert order.
        order.sort_by(|&a, &b| choice[b].total_cmp(&choice[a]));
        let top = &order[..k];
        let picked: Vec<f32> = match rule.scoring {
            Scoring::TopKThenSoftmax => {
                softmax(&top.iter().map(|&i| scores[i]).collect::<Vec<_>>())
            }
            Scoring::Softmax | Scoring::Sigmoid => top.iter().map(|&i| scores[i]).collect(),
        };
        let denom: f32 = match (rule.renormalize, rule.scoring) {
            // The sigmoid rule's reference adds 1e-20 so an all-zero selection stays finite.
            (true, Scoring::Sigmoid) => picked.iter().sum::<f32>() + 1e-20,
            (true, _) => picked.iter().sum(),
            (false, _) => 1.0,
        };
        for (&i, p) in top.iter().zip(picked) {
            indices.push(i as u32);
            let w = p / denom;
            weights.push(if rule.scale == 1.0 { w } else { w * rule.scale });
        }
    }
    Routing {
        indices,
        weights,
        logits,
    }
}

/// `exp(x - max) / sum`, in f32.
fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = row.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter().map(|x| x / sum).collect()
}

/// Group-limited selection: each of `groups` equal groups scores the sum of its best two
/// choice scores; the experts outside the best `keep` groups get a choice score of -inf (as
/// transformers' DeepSeek-V3 and GLM-4.5 routers mask them), so they are never chosen even when
/// a selection bias makes the kept scores negative.
fn limit_groups(choice: &mut [f32], groups: usize, keep: usize) {
    if groups <= 1 || keep >= groups {
        return;
    }
    let per = choice.len() / groups;
    let mut group_score: Vec<(usize, f32)> = choice
        .chunks_exact(per)
        .enumerate()
        .map(|(g, c)| {
            let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
            for &v in c {
                if v > a {
                    b = a;
                    a = v;
                } else if v > b {
                    b = v;
                }
            }
            (g, if per >= 2 { a + b } else { a })
        })
        .collect();
    group_score.sort_by(|x, y| y.1.total_cmp(&x.1));
    let mut kept = vec![false; groups];
    for &(g, _) in &group_score[..keep] {
        kept[g] = true;
    }
    for (g, c) in choice.chunks_exact_mut(per).enumerate() {
        if !kept[g] {
            c.fill(f32::NEG_INFINITY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(scoring: Scoring, e: usize, k: usize, renormalize: bool) -> RouterRule {
        RouterRule {
            num_experts: e,
            top_k: k,
            scoring,
            renormalize,
            groups: None,
            scale: 1.0,
        }
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    }

    #[test]
    fn softmax_then_top_k_with_and_without_renormalisation() {
        let logits = vec![0.1, 2.0, -1.0, 1.0];
        let p = softmax(&logits);
        let r = route(logits.clone(), &rule(Scoring::Softmax, 4, 2, false), None);
        assert_eq!(r.indices, vec![1, 3]);
        assert!(close(&r.weights, &[p[1], p[3]]));
        assert_eq!(r.logits, logits);
        let r = route(logits, &rule(Scoring::Softmax, 4, 2, true), None);
        let s = p[1] + p[3];
        assert!(close(&r.weights, &[p[1] / s, p[3] / s]));
    }

    #[test]
    fn top_k_then_softmax_weights_sum_to_one_over_the_chosen() {
        let logits = vec![3.0, -2.0, 1.0, 0.5, 2.5, 0.0];
        let r = route(logits, &rule(Scoring::TopKThenSoftmax, 6, 3, false), None);
        assert_eq!(r.indices, vec![0, 4, 2]);
        let want = softmax(&[3.0, 2.5, 1.0]);
        assert!(close(&r.weights, &want), "{:?}", r.weights);
    }

    #[test]
    fn ties_go_to_the_lower_expert() {
        let r = route(
            vec![1.0, 1.0, 1.0],
            &rule(Scoring::Softmax, 3, 2, false),
            None,
        );
        assert_eq!(r.indices, vec![0, 1]);
    }

    #[test]
    fn sigmoid_with_selection_bias_groups_and_scale() {
        // 8 experts in 4 groups of 2; keep 2 groups, choose 2 experts, renormalise, scale 2.5.
        let logits: Vec<f32> = vec![0.0, 0.1, 2.0, -3.0, 1.0, 1.0, -1.0, 0.5];
        let sig: Vec<f32> = logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect();
        // The bias lifts expert 7 for selection: group 3 = {6, 7} then outscores group 1.
        let bias = vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0];
        let mut r = rule(Scoring::Sigmoid, 8, 2, true);
        r.groups = Some((4, 2));
        r.scale = 2.5;
        let out = route(logits, &r, Some(&bias));
        // Choice scores: g0 = s0+s1, g1 = s2+s3, g2 = s4+s5, g3 = s6+s7+1. Best two: g3, g2.
        // Within them by choice score: 7 (s7 + 1) then 4 (s4 == s5, lower index).
        assert_eq!(out.indices, vec![7, 4]);
        let denom = sig[7] + sig[4] + 1e-20;
        let want = [sig[7] / denom * 2.5, sig[4] / denom * 2.5];
        assert!(close(&out.weights, &want), "{:?} vs {want:?}", out.weights);
    }

    #[test]
    fn group_limit_masks_all_but_the_best_groups() {
        let mut c = vec![0.9, 0.1, 0.5, 0.5, 0.2, 0.3];
        limit_groups(&mut c, 3, 1);
        // Group sums: 1.0, 1.0, 0.5: the first best (group 0) is kept.
        let inf = f32::NEG_INFINITY;
        assert_eq!(c, vec![0.9, 0.1, inf, inf, inf, inf]);
        // Negative kept scores (a selection bias below -1 after a sigmoid) still win over the
        // masked groups.
        let mut c = vec![-0.4, -0.6, 0.5, -2.0, -0.5, -0.5];
        limit_groups(&mut c, 3, 1);
        assert_eq!(c, vec![-0.4, -0.6, inf, inf, inf, inf]);
        let r = route(
            vec![0.0; 6],
            &RouterRule {
                groups: Some((3, 1)),
                ..rule(Scoring::Sigmoid, 6, 2, false)
            },
            Some(&[-1.0, -1.2, 0.0, -3.0, -1.1, -1.1]),
        );
        assert_eq!(r.indices, vec![0, 1]);
    }
}
