//! One sequence's per-token state machine: from the logits of the next position to the token,
//! the text that may be shown now, and whether the sequence is finished.
//!
//! [`SeqDecoder`] owns the sampler, the presence and frequency penalties, the EOS set, the stop
//! strings, the incremental detokenizer, the log-probabilities and the token limit. The
//! library's [`Model::generate`](crate::Model::generate) and the batcher ([`crate::batch`]) both
//! drive one per sequence, so they share every rule below.
//!
//! Invariants:
//! - The same request (prompt ids, sampling settings and seed, stop strings, penalties) gives
//!   the same tokens and the same text through `Model::generate` and the batcher.
//! - Shown text never ends inside a UTF-8 character and never shows any part of a stop string:
//!   text that could begin one is held back until it is decided. A stop string ends the
//!   sequence with [`FinishReason::Stop`]; neither it nor anything after it is shown.
//! - An EOS token ends the sequence with [`FinishReason::Stop`]; its text is not shown, and it
//!   counts as a generated token (it is in [`SeqDecoder::generated`]).
//! - Logits no token can be drawn from (NaN, +infinity, none finite) are an error
//!   ([`Error::NonFiniteLogits`]), never a token; a token the tokenizer cannot decode is an
//!   error, never an empty string.
//! - Penalties change only the choice of token; log-probabilities are those of the model's own
//!   logits (before penalties and temperature).
//! - With a grammar ([`SeqDecoder::with_constraint`]) every token is one the grammar allows
//!   (masked after penalties and biases), and the sequence ends with [`FinishReason::Stop`]
//!   once the grammar is complete.

use std::collections::HashMap;

use crate::constrain::Constraint;
use crate::error::{Error, Result};
use crate::sampler::{check_logits, Sampler, SamplingParams};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS token was generated, or a stop string was reached.
    Stop,
    /// `max_tokens` or the context was reached.
    Length,
    /// The cancel token was set.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Most alternatives a request may ask for per token (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Penalties are bounded as OpenAI bounds them: beyond ±2 they swamp the logits.
pub const MAX_ABS_PENALTY: f32 = 2.0;

/// What a sequence needs to know beyond its sampler (resolved from the request and the model).
#[derive(Clone, Debug, Default)]
pub struct SeqSettings {
    /// Tokens that end the sequence (empty: ignore EOS).
    pub eos: Vec<u32>,
    /// Most new tokens, the EOS token included (the context limit already folded in).
    pub max_new_tokens: usize,
    /// Generation stops before the first occurrence of any of these.
    pub stop: Vec<String>,
    /// Subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit per time it was generated.
    pub frequency_penalty: f32,
    /// Added to these tokens' logits before every choice.
    pub logit_bias: Vec<(u32, f32)>,
    /// Report the chosen token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
}

/// Checks stop strings, penalties and the number of alternatives asked for; the message names
/// the request field and its allowed range.
pub fn validate(
    stop: &[String],
    presence_penalty: f32,
    frequency_penalty: f32,
    logprobs: Option<usize>,
) -> Result<()> {
    for (name, v) in [
        ("presence_penalty", presence_penalty),
        ("frequency_penalty", frequency_penalty),
    ] {
        if !(-MAX_ABS_PENALTY..=MAX_ABS_PENALTY).contains(&v) {
            return Err(Error::InvalidRequest(format!(
                "{name} must be between -2 and 2, got {v}"
            )));
        }
    }
    if let Some(n) = logprobs {
        if n > MAX_TOP_LOGPROBS {
            return Err(Error::InvalidRequest(format!(
                "top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {n}"
            )));
        }
    }
    if stop.iter().any(String::is_empty) {
        return Err(Error::InvalidRequest(
            "stop strings must not be empty".into(),
        ));
    }
    Ok(())
}

/// The most a `logit_bias` entry may add or subtract (OpenAI's range).
const MAX_ABS_LOGIT_BIAS: f32 = 100.0;

/// Checks `logit_bias`: every token inside the vocabulary of `vocab` tokens, every bias a
/// number within -100..=100; the message names the field, the token and the bound.
pub fn validate_logit_bias(bias: &[(u32, f32)], vocab: usize) -> Result<()> {
    for &(tok, b) in bias {
        if tok as usize >= vocab {
            return Err(Error::InvalidRequest(format!(
                "logit_bias names token {tok}, past the vocabulary of {vocab} tokens"
            )));
        }
        if !(-MAX_ABS_LOGIT_BIAS..=MAX_ABS_LOGIT_BIAS).contains(&b) {
            return Err(Error::InvalidRequest(format!(
                "logit_bias for token {tok} must be between -100 and 100, got {b}"
            )));
        }
    }
    Ok(())
}

/// A token's log-probability under the model (before penalties and temperature).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    /// The token alone, decoded (may hold U+FFFD for part of a character).
    pub text: String,
    pub logprob: f32,
}

/// What one set of logits produced.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub id: u32,
    /// Text that may be shown now: complete characters, stop strings held back.
    pub text: String,
    /// With `logprobs`: the token's own and the top alternatives.
    pub logprob: Option<(TokenLogprob, Vec<TokenLogprob>)>,
    /// Set when this token ends the sequence.
    pub finish: Option<FinishReason>,
}

/// One sequence's sampling, stopping and detokenization (see the module doc).
pub struct SeqDecoder<'t> {
    settings: SeqSettings,
    sampler: Sampler,
    tokenizer: Option<&'t Tokenizer>,
    detok: Option<IncrementalDecoder<'t>>,
    generated: Vec<u32>,
    counts: HashMap<u32, u32>,
    /// Text decoded but not yet shown (it may be the start of a stop string).
    held: String,
    /// Ended on a stop string: the text after it is dropped.
    hit_stop: bool,
    finish: Option<FinishReason>,
    /// The grammar the text must follow, if any.
    constraint: Option<Constraint>,
}

impl<'t> SeqDecoder<'t> {
    /// A sequence sampling with `sampling`; without a tokenizer no text is produced.
    pub fn new(
        sampling: SamplingParams,
        settings: SeqSettings,
        tokenizer: Option<&'t Tokenizer>,
    ) -> SeqDecoder<'t> {
        SeqDecoder {
            settings,
            sampler: Sampler::new(sampling),
            tokenizer,
            detok: tokenizer.map(Tokenizer::decoder),
            generated: Vec::new(),
            counts: HashMap::new(),
            held: String::new(),
            hit_stop: false,
            finish: None,
            constraint: None,
        }
    }

    /// This sequence's text must follow `constraint`: every token is chosen among those its
    /// grammar allows, and the sequence ends ([`FinishReason::Stop`]) when the grammar is
    /// complete and admits nothing more.
    pub fn with_constraint(mut self, constraint: Constraint) -> SeqDecoder<'t> {
        self.constraint = Some(constraint);
        self
    }

    /// Tokens generated so far (the EOS token included).
    pub fn generated(&self) -> &[u32] {
        &self.generated
    }

    /// Why the sequence ended, once it has.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Most new tokens this sequence may generate.
    pub fn max_new_tokens(&self) -> usize {
        self.settings.max_new_tokens
    }

    /// Chooses the next token from the logits of the next position, and says what text may be
    /// shown and whether the sequence is done. Callers stop at the first [`Step::finish`].
    pub fn on_logits(&mut self, logits: &[f32]) -> Result<Step> {
        let step = self.generated.len();
        let non_finite = |logit| Error::NonFiniteLogits { step, logit };
        check_logits(logits).map_err(non_finite)?;
        let lp = self.settings.logprobs.map(|n| top_logprobs(logits, n));
        let (pres, freq) = (
            self.settings.presence_penalty,
            self.settings.frequency_penalty,
        );
        let id = if pres != 0.0
            || freq != 0.0
            || !self.settings.logit_bias.is_empty()
            || self.constraint.is_some()
        {
            let mut l = logits.to_vec();
            for (&tok, &c) in &self.counts {
                if let Some(x) = l.get_mut(tok as usize) {
                    *x -= pres + freq * c as f32;
                }
            }
            for &(tok, b) in &self.settings.logit_bias {
                if let Some(x) = l.get_mut(tok as usize) {
                    *x += b;
                }
            }
            if let Some(c) = &mut self.constraint {
                c.mask(&mut l)?;
            }
            self.sampler.sample(&l)
        } else {
            self.sampler.sample(logits)
        }
        .map_err(non_finite)?;
        if let Some(c) = &mut self.constraint {
            c.accept(id)?;
        }
        let is_eos = self.settings.eos.contains(&id);
        let mut text = String::new();
        let mut finish = None;
        if !is_eos {
            // Decode before recording, so a failed decode leaves the sequence unchanged.
            let piece = match &mut self.detok {
                Some(d) => d.push(id)?,
                None => String::new(),
            };
            self.held.push_str(&piece);
            match find_stop(&self.held, &self.settings.stop) {
                Some(at) => {
                    text = self.held[..at].to_string();
                    self.held.clear();
                    self.hit_stop = true;
                    finish = Some(FinishReason::Stop);
                }
                None => {
                    let show = self.held.len() - held_back(&self.held, &self.settings.stop);
                    text = self.held[..show].to_string();
                    self.held.drain(..show);
                }
            }
        }
        self.generated.push(id);
        *self.counts.entry(id).or_insert(0) += 1;
        let grammar_done = self.constraint.as_ref().is_some_and(Constraint::is_done);
        if is_eos || (finish.is_none() && grammar_done) {
            finish = Some(FinishReason::Stop);
        } else if finish.is_none() && self.generated.len() >= self.settings.max_new_tokens {
            finish = Some(FinishReason::Length);
        }
        self.finish = finish;
        let logprob = match lp {
            None => None,
            Some((lse, top)) => {
                let own = TokenLogprob {
                    id,
                    text: self.token_text(id),
                    logprob: logits
                        .get(id as usize)
                        .copied()
                        .unwrap_or(f32::NEG_INFINITY)
                        - lse,
                };
                let top = top
                    .into_iter()
                    .map(|(id, logprob)| TokenLogprob {
                        id,
                        text: self.token_text(id),
                        logprob,
                    })
                    .collect();
                Some((own, top))
            }
        };
        Ok(Step {
            id,
            text,
            logprob,
            finish,
        })
    }

    /// Ends the sequence (`reason` unless a token already ended it) and returns the text still
    /// held: a partial stop-string match that never completed and any incomplete character
    /// (as U+FFFD, as a full decode gives). Empty after a stop string. Idempotent.
    pub fn finish(&mut self, reason: FinishReason) -> Result<String> {
        self.finish.get_or_insert(reason);
        if self.hit_stop {
            return Ok(String::new());
        }
        let mut text = std::mem::take(&mut self.held);
        if let Some(d) = &mut self.detok {
            text.push_str(&d.finish()?);
        }
        Ok(text)
    }

    /// The token alone, decoded, for log-probability reports. Ids the tokenizer does not know
    /// (rows of a vocabulary padded past the tokenizer's) have no text: an empty string.
    fn token_text(&self, id: u32) -> String {
        self.tokenizer
            .and_then(|t| t.decode(&[id], false).ok())
            .unwrap_or_default()
    }
}

/// Log-sum-exp of `logits` and the `n` most likely tokens with their log-probabilities.
fn top_logprobs(logits: &[f32], n: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let n = n.min(idx.len());
    let order = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if n > 0 {
        idx.select_nth_unstable_by(n - 1, order);
    }
    idx.truncate(n);
    idx.sort_by(order);
    let top = idx
        .into_iter()
        .map(|id| (id, logits[id as usize] - lse))
        .collect();
    (lse, top)
}

/// Byte offset of the earliest stop string in `text`.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// Bytes at the end of `text` that could begin a stop string (held back until decided).
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut keep = 0;
    for s in stops {
        for (i, _) in text.char_indices() {
            let tail = &text[i..];
            if tail.len() <= keep {
                break;
            }
            if s.starts_with(tail) {
                keep = tail.len();
                break;
            }
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Id of the end-of-sequence token of [`bytes_tokenizer`].
    const END: u32 = 256;
    const VOCAB: usize = 257;

    /// GPT-2's byte-to-character map, as byte-level BPE vocabularies spell bytes.
    fn byte_char(b: u8) -> char {
        let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        if printable(b) {
            return char::from(b);
        }
        let n = (0..b).filter(|&x| !printable(x)).count() as u32;
        char::from_u32(256 + n).unwrap()
    }

    /// A byte-level tokenizer: token `b` is byte `b`, token 256 is `<|end|>`.
    fn bytes_tokenizer() -> Tokenizer {
        let vocab: serde_json::Map<String, serde_json::Value> = (0..=255u8)
            .map(|b| (byte_char(b).to_string(), serde_json::json!(b)))
            .collect();
        let doc = serde_json::json!({
            "version": "1.0",
            "added_tokens": [{"id": END, "content": "<|end|>", "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false,
                "trim_offsets": true, "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true,
                "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "vocab": vocab, "merges": []}
        });
        Tokenizer::from_bytes(doc.to_string().as_bytes(), None, None).unwrap()
    }

    /// Logits whose greedy choice is `id`.
    fn pick(id: u32) -> Vec<f32> {
        let mut l = vec![0.0; VOCAB];
        l[id as usize] = 10.0;
        l
    }

    fn settings(stop: &[&str], max_new_tokens: usize) -> SeqSettings {
        SeqSettings {
            eos: vec![END],
            max_new_tokens,
            stop: stop.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// Feeds the bytes of `text` one token each; returns each step's text and finish.
    fn feed(seq: &mut SeqDecoder<'_>, ids: &[u32]) -> Vec<(String, Option<FinishReason>)> {
        ids.iter()
            .map(|&id| {
                let s = seq.on_logits(&pick(id)).unwrap();
                assert_eq!(s.id, id);
                (s.text, s.finish)
            })
            .collect()
    }

    fn ids(text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    #[test]
    fn a_stop_string_split_over_tokens_is_never_shown() {
        let tok = bytes_tokenizer();
        let mut seq = SeqDecoder::new(SamplingParams::greedy(), settings(&["END"], 99), Some(&tok));
        let steps = feed(&mut seq, &ids("ab EN"));
        let shown: Vec<&str> = steps.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(shown, ["a", "b", " ", "", ""]);
        assert!(steps.iter().all(|s| s.1.is_none()));
        let last = seq.on_logits(&pick(b'D'.into())).unwrap();
        assert_eq!(
            (last.text.as_str(), last.finish),
            ("", Some(FinishReason::Stop))
        );
        assert_eq!(seq.finish(FinishReason::Length).unwrap(), "");
        assert_eq!(seq.finish_reason(), Some(FinishReason::Stop));
        assert_eq!(seq.generated(), ids("ab END").as_slice());

        // A partial match that does not complete is released, text before a stop is shown.
        let mut seq = SeqDecoder::new(SamplingParams::greedy(), settings(&["END"], 99), Some(&tok));
        let steps = feed(&mut seq, &ids("xEx"));
        let shown: Vec<&str> = steps.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(shown, ["x", "", "Ex"]);
        let mut seq = SeqDecoder::new(SamplingParams::greedy(), settings(&["ND"], 99), Some(&tok));
        let steps = feed(&mut seq, &ids("aEND"));
        let shown: String = steps.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(shown, "aE");
        assert_eq!(steps.last().unwrap().1, Some(FinishReason::Stop));
    }

    #[test]
    fn eos_ends_without_its_text_and_releases_what_was_held() {
        let tok = bytes_tokenizer();
        let mut seq = SeqDecoder::new(SamplingParams::greedy(), settings(&["END"], 99), Some(&tok));
        let mut steps = feed(&mut seq, &ids("hiE"));
        let eos = seq.on_logits(&pick(END)).unwrap();
        steps.push((eos.text.clone(), eos.finish));
        assert_eq!(eos.text, "");
        assert_eq!(eos.finish, Some(FinishReason::Stop));
        // The held "E" was no stop string after all.
        assert_eq!(seq.finish(FinishReason::Stop).unwrap(), "E");
        // The EOS token counts as generated.
        assert_eq!(
            seq.generated(),
            &[b'h'.into(), b'i'.into(), b'E'.into(), END]
        );
        let shown: String = steps.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(shown, "hi");

        // Without an EOS set the token is text like any other.
        let mut s = settings(&[], 99);
        s.eos.clear();
        let mut seq = SeqDecoder::new(SamplingParams::greedy(), s, Some(&tok));
        let step = seq.on_logits(&pick(END)).unwrap();
        assert_eq!((step.text.as_str(), step.finish), ("<|end|>", None));
    }

    #[test]
    fn max_new_tokens_ends_with_length() {
        let tok = bytes_tokenizer();
        let mut seq = SeqDecoder::new(SamplingParams::greedy(), settings(&[], 3), Some(&tok));
        let steps = feed(&mut seq, &ids("abc"));
        let finishes: Vec<_> = steps.iter().map(|s| s.1).collect();
        assert_eq!(finishes, [None, None, Some(FinishReason::Length)]);
        assert_eq!(seq.max_new_tokens(), 3);
        // An EOS token as the last allowed token is a stop, not a length finish.
        let mut seq = SeqDecoder::new(SamplingParams::greedy(), settings(&[], 1), Some(&tok));
        let step = seq.on_logits(&pick(END)).unwrap();
        assert_eq!(step.finish, Some(FinishReason::Stop));
    }

    #[test]
    fn penalties_lower_the_logits_of_generated_tokens() {
        let tok = bytes_tokenizer();
        let mut logits = vec![0.0f32; VOCAB];
        logits[usize::from(b'a')] = 3.0;
        logits[usize::from(b'b')] = 2.6;
        logits[usize::from(b'c')] = 2.0;
        let run = |presence: f32, frequency: f32| {
            let mut s = settings(&[], 4);
            s.presence_penalty = presence;
            s.frequency_penalty = frequency;
            let mut seq = SeqDecoder::new(SamplingParams::greedy(), s, Some(&tok));
            let text: String = (0..4)
                .map(|_| seq.on_logits(&logits).unwrap().text)
                .collect();
            text
        };
        assert_eq!(run(0.0, 0.0), "aaaa");
        // a: 3 - 0.5 = 2.5 < 2.6, then b: 2.1 < 2.5, then a again (one use only: presence).
        assert_eq!(run(0.5, 0.0), "abaa");
        // Frequency grows with every use: a 3, then b 2.6 > a 2.5, a 2.5 > b 2.1, b 2.1 > a 2.0.
        assert_eq!(run(0.0, 0.5), "abab");
        assert_eq!(run(0.0, 0.0), run(0.0, 0.0));
    }

    #[test]
    fn utf8_split_over_tokens_is_shown_whole() {
        let tok = bytes_tokenizer();
        let mut seq = SeqDecoder::new(SamplingParams::greedy(), settings(&[], 99), Some(&tok));
        let steps = feed(&mut seq, &ids("aé€"));
        let shown: Vec<&str> = steps.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(shown, ["a", "", "é", "", "", "€"]);
        // A character cut off by the end comes out as U+FFFD, as a full decode gives.
        let mut seq = SeqDecoder::new(SamplingParams::greedy(), settings(&[], 99), Some(&tok));
        let steps = feed(&mut seq, &ids("é")[..1]);
        assert_eq!(steps[0].0, "");
        assert_eq!(seq.finish(FinishReason::Length).unwrap(), "\u{FFFD}");
        // A stop string that starts with a multi-byte character is held whole.
        let mut seq = SeqDecoder::new(SamplingParams::greedy(), settings(&["é!"], 99), Some(&tok));
        let steps = feed(&mut seq, &ids("café!"));
        let shown: String = steps.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(shown, "caf");
        assert_eq!(steps.last().unwrap().1, Some(FinishReason::Stop));
    }

    #[test]
    fn broken_logits_and_undecodable_tokens_are_errors() {
        let tok = bytes_tokenizer();
        let mut seq = SeqDecoder::new(SamplingParams::greedy(), settings(&[], 99), Some(&tok));
        feed(&mut seq, &ids("ab"));
        let mut l = pick(b'c'.into());
        l[5] = f32::NAN;
        match seq.on_logits(&l) {
            Err(Error::NonFiniteLogits { step: 2, logit }) => assert_eq!(logit.token, 5),
            other => panic!("{other:?}"),
        }
        // A token the tokenizer does not know (a padded vocabulary row) is an error, not "".
        let mut l = vec![0.0; VOCAB + 10];
        l[VOCAB + 3] = 10.0;
        let e = seq.on_logits(&l).unwrap_err();
        assert!(matches!(e, Error::Tokenizer(_)), "{e}");
        assert_eq!(seq.generated().len(), 2, "a failed token is not recorded");
    }

    #[test]
    fn logprobs_are_the_models_before_penalties() {
        let tok = bytes_tokenizer();
        let mut s = settings(&[], 99);
        s.logprobs = Some(2);
        s.presence_penalty = 2.0;
        let mut seq = SeqDecoder::new(SamplingParams::greedy(), s, Some(&tok));
        let mut logits = vec![f32::NEG_INFINITY; VOCAB];
        logits[usize::from(b'x')] = 1.0;
        logits[usize::from(b'y')] = 0.0;
        let lse = (1f32.exp() + 1.0).ln();
        let first = seq.on_logits(&logits).unwrap();
        let (own, top) = first.logprob.unwrap();
        assert_eq!((own.id, own.text.as_str()), (u32::from(b'x'), "x"));
        assert!((own.logprob - (1.0 - lse)).abs() < 1e-6);
        assert_eq!(top.len(), 2);
        assert_eq!(top[1].id, u32::from(b'y'));
        // The penalty picks y next, but its reported log-probability is the model's.
        let second = seq.on_logits(&logits).unwrap();
        let (own, _) = second.logprob.unwrap();
        assert_eq!(own.id, u32::from(b'y'));
        assert!((own.logprob - (0.0 - lse)).abs() < 1e-6);
    }

    #[test]
    fn settings_out_of_range_are_refused_with_the_field_name() {
        assert!(validate(&[], 0.0, 0.0, Some(20)).is_ok());
        let e = validate(&[], 2.5, 0.0, None).unwrap_err().to_string();
        assert!(e.contains("presence_penalty"), "{e}");
        let e = validate(&[], 0.0, -3.0, None).unwrap_err().to_string();
        assert!(e.contains("frequency_penalty"), "{e}");
        let e = validate(&[], 0.0, 0.0, Some(21)).unwrap_err().to_string();
        assert!(e.contains("top_logprobs"), "{e}");
        let e = validate(&[String::new()], 0.0, 0.0, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("stop"), "{e}");
    }

    #[test]
    fn stop_strings_are_found_and_partial_matches_held() {
        let stops = vec!["END".to_string(), "\n\n".to_string()];
        assert_eq!(find_stop("abc END x", &stops), Some(4));
        assert_eq!(find_stop("a\n\nEND", &stops), Some(1));
        assert_eq!(find_stop("abc", &stops), None);
        assert_eq!(held_back("abc EN", &stops), 2);
        assert_eq!(held_back("abc E", &stops), 1);
        assert_eq!(held_back("abc\n", &stops), 1);
        assert_eq!(held_back("abc", &stops), 0);
        // Multi-byte characters: never split.
        let stops = vec!["é!".to_string()];
        assert_eq!(held_back("café", &stops), "é".len());
    }
}
