//! Next-token choice: greedy, or temperature / top-k / top-p / min-p sampling with a seeded RNG.
//!
//! Invariants: greedy picks the first index of the maximum logit (as `argmax` does); sampling
//! applies temperature, then top-k, then top-p, then min-p (transformers' warper order) and is
//! reproducible for a given seed on every platform (own SplitMix64, no global RNG); logits that
//! are NaN or +infinity are never turned into a token: [`Sampler::sample`] refuses them with
//! [`NonFiniteLogit`] (-infinity is a token that cannot be drawn, as long as one can).

/// Resolved sampling settings (`temperature == 0` means greedy).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f64,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f64,
    /// 0.0 = off.
    pub min_p: f64,
    pub seed: u64,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// SplitMix64: tiny, fast and stable across platforms and versions.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Logits no token can be drawn from: a NaN or +infinity (the first one found), or no finite
/// logit at all. The model's numbers have broken down (corrupt weights or config).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NonFiniteLogit {
    /// Token id of the offending logit.
    pub token: u32,
    pub value: f32,
}

impl std::fmt::Display for NonFiniteLogit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "logit {} for token {}", self.value, self.token)
    }
}

/// The first logit no token can be drawn from (see [`NonFiniteLogit`]), if any.
pub fn check_logits(logits: &[f32]) -> Result<(), NonFiniteLogit> {
    let bad = logits
        .iter()
        .position(|l| l.is_nan() || *l == f32::INFINITY)
        .or_else(|| (!logits.iter().any(|l| l.is_finite())).then_some(0));
    match bad {
        None => Ok(()),
        Some(i) => Err(NonFiniteLogit {
            token: i as u32,
            value: logits.get(i).copied().unwrap_or(f32::NAN),
        }),
    }
}

/// Picks tokens from logits.
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        Sampler {
            rng: Rng::new(params.seed),
            params,
        }
    }

    /// The next token; logits holding a NaN or +infinity, or no finite value, are refused.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32, NonFiniteLogit> {
        check_logits(logits)?;
        Ok(self.draw(logits))
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let mut cand: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l as f64 * inv_t))
            .collect();
        if cand.is_empty() {
            return argmax(logits);
        }
        // Descending by logit; stable so ties keep index order.
        cand.sort_by(|a, b| b.1.total_cmp(&a.1));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= sum);
        if p.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (at least one token).
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep);
            probs.truncate(keep);
        }
        if p.min_p > 0.0 {
            let thresh = p.min_p * probs[0];
            let keep = probs.iter().take_while(|&&q| q >= thresh).count().max(1);
            cand.truncate(keep);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = self.rng.next_f64() * total;
        for (c, q) in cand.iter().zip(&probs) {
            if r < *q {
                return c.0;
            }
            r -= q;
        }
        cand[cand.len() - 1].0
    }
}

/// Index of the first maximum (NaN never wins).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] || v[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_first_max() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.0, 0.5, 0.2]), Ok(1));
        // -infinity is a token that cannot be drawn.
        assert_eq!(s.sample(&[f32::NEG_INFINITY, 0.5, 0.2]), Ok(1));
    }

    #[test]
    fn non_finite_logits_are_refused_not_turned_into_a_token() {
        let sampling = SamplingParams {
            temperature: 0.7,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 3,
        };
        for params in [SamplingParams::greedy(), sampling] {
            let mut s = Sampler::new(params);
            let e = s.sample(&[0.1, f32::NAN, 0.3]).unwrap_err();
            assert_eq!(e.token, 1);
            assert!(e.value.is_nan());
            let e = s.sample(&[0.1, 0.2, f32::INFINITY]).unwrap_err();
            assert_eq!((e.token, e.value), (2, f32::INFINITY));
            assert!(s.sample(&[f32::NAN; 4]).is_err());
            assert!(s.sample(&[f32::NEG_INFINITY; 4]).is_err());
            assert!(s.sample(&[]).is_err());
            assert!(e.to_string().contains("token 2"), "{e}");
        }
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_filters() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 7919) % 13) as f32 * 0.3).collect();
        let params = SamplingParams {
            temperature: 0.8,
            top_k: 5,
            top_p: 0.9,
            min_p: 0.05,
            seed: 42,
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(params.clone());
            (0..200).map(|_| s.sample(&logits).unwrap()).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(params.clone());
            (0..200).map(|_| s.sample(&logits).unwrap()).collect()
        };
        assert_eq!(a, b);
        // Only the top-5 logits may ever be drawn.
        let mut idx: Vec<usize> = (0..50).collect();
        idx.sort_by(|&x, &y| logits[y].total_cmp(&logits[x]));
        let top5: Vec<u32> = idx[..5].iter().map(|&i| i as u32).collect();
        assert!(
            a.iter().all(|t| top5.contains(t)),
            "{a:?} not within {top5:?}"
        );
        // More than one distinct token is drawn at temperature 0.8 over near-equal logits.
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(distinct.len() > 1);
    }

    #[test]
    fn top_p_tiny_keeps_only_best() {
        let logits = [0.0f32, 5.0, 1.0, 4.9];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.01,
            min_p: 0.0,
            seed: 1,
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&logits), Ok(1));
        }
    }
}
