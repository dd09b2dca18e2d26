//! Constrained decoding: a grammar (a JSON schema, any JSON object, or a Lark grammar) that the
//! generated text must follow, enforced token by token by masking the logits of every token that
//! cannot continue it (the llguidance engine, which llama.cpp and vLLM use too).
//!
//! [`GrammarEngine`] is built once per model from its tokenizer (each token's bytes, see
//! [`Tokenizer::token_bytes`]) and its EOS set; [`GrammarEngine::compile`] turns a [`Grammar`]
//! into a [`Constraint`], one per sequence, which the sequence's decoder asks for a mask before
//! every choice and tells the chosen token after it.
//!
//! Invariants:
//! - A constrained sequence only ever samples a token the grammar allows: its text is always a
//!   prefix of a sentence of the grammar, and a sequence that ends by its grammar (EOS allowed
//!   only once the grammar is complete) holds a whole sentence.
//! - Logit rows past the tokenizer's vocabulary (padded embedding rows) are never allowed.
//! - A grammar that cannot be compiled is an [`Error::InvalidRequest`] naming why, before any
//!   token is generated; a state from which no token can follow is an error for that sequence
//!   alone, never a silent unconstrained token.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::earley::SlicedBiasComputer;
use llguidance::{Matcher, ParserFactory};
use toktrie::{ApproximateTokEnv, InferenceCapabilities, TokEnv, TokRxInfo, TokTrie};

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// What the generated text must be.
#[derive(Clone, Debug, PartialEq)]
pub enum Grammar {
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON value valid against this JSON schema (`json_schema` response formats, tool
    /// arguments).
    JsonSchema(serde_json::Value),
    /// A grammar in llguidance's Lark dialect (it may embed JSON schemas with `%json { .. }`).
    Lark(String),
}

impl Grammar {
    fn top_level(&self) -> TopLevelGrammar {
        match self {
            Grammar::JsonObject => TopLevelGrammar::from_json_schema(json_layout(
                serde_json::json!({"type": "object"}),
            )),
            Grammar::JsonSchema(schema) => {
                TopLevelGrammar::from_json_schema(json_layout(schema.clone()))
            }
            Grammar::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
        }
    }
}

/// The layout JSON is written in unless the schema sets its own (`x-guidance`): one line, `", "`
/// between items and `": "` after keys, as Python's `json.dumps` writes it and as models
/// trained on it write JSON. Free whitespace would let a model pad its reply without end.
/// `oneOf` is read as `anyOf` (what schemas generated from typed unions mean).
pub const JSON_LAYOUT: &str = r#"{"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": ", "coerce_one_of": true}"#;

fn json_layout(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(o) = schema.as_object_mut() {
        if !o.contains_key("x-guidance") {
            let layout: serde_json::Value =
                serde_json::from_str(JSON_LAYOUT).unwrap_or(serde_json::Value::Null);
            o.insert("x-guidance".into(), layout);
        }
    }
    schema
}

/// The grammar engine of one model: its tokens as bytes, its EOS set.
pub struct GrammarEngine {
    factory: ParserFactory,
    /// Logit rows (the model's vocabulary, at least the tokenizer's).
    rows: usize,
    /// The tokens that end a sequence.
    eos: Vec<u32>,
}

impl std::fmt::Debug for GrammarEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarEngine")
            .field("rows", &self.rows)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

impl GrammarEngine {
    /// The engine for a model with `rows` logit rows, `tokenizer`'s tokens and the EOS tokens
    /// `eos` (may be empty: a grammar then ends the sequence when it is complete).
    pub fn new(tokenizer: &Tokenizer, rows: usize, eos: &[u32]) -> Result<GrammarEngine> {
        let mut words = tokenizer.token_bytes();
        words.truncate(rows);
        words.resize(rows, Vec::new());
        // One more id than the model has: the engine's own end-of-text token, so there is one
        // even when the model's EOS set is empty. It never reaches the logits.
        let end = rows as u32;
        words.push(Vec::new());
        let mut eos_ids = vec![end];
        eos_ids.extend(eos.iter().copied().filter(|&e| (e as usize) < rows));
        let info = TokRxInfo::new(words.len() as u32, end);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&eos_ids);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new(
            &env,
            InferenceCapabilities::default(),
            &SlicedBiasComputer::general_slices(),
        )
        .map_err(|e| Error::Internal(format!("cannot build the grammar engine: {e}")))?;
        // The engine's own limits (lexer fuel per step, Earley items per mask, grammar size)
        // stop a hostile schema with an error rather than stalling the batch.
        factory.quiet();
        Ok(GrammarEngine {
            factory,
            rows,
            eos: eos_ids[1..].to_vec(),
        })
    }

    /// A fresh constraint for one sequence; a grammar that does not compile (a schema feature
    /// the engine lacks, a Lark syntax error) is an [`Error::InvalidRequest`] saying why.
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint> {
        let parser = self
            .factory
            .create_parser(grammar.top_level())
            .map_err(|e| Error::InvalidRequest(format!("the grammar is not usable: {e}")))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(Error::InvalidRequest(format!(
                "the grammar is not usable: {e}"
            )));
        }
        Ok(Constraint {
            matcher,
            rows: self.rows,
            eos: self.eos.clone(),
        })
    }
}

/// One sequence's place in its grammar.
pub struct Constraint {
    matcher: Matcher,
    rows: usize,
    eos: Vec<u32>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("done", &self.is_done())
            .finish_non_exhaustive()
    }
}

impl Constraint {
    /// Sets the logit of every token the grammar does not allow next to minus infinity (EOS
    /// tokens are allowed once the grammar is complete). Errors when no token may follow.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let mask = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| Error::Internal(format!("grammar engine: {e}")))?;
        let end = self.rows as u32;
        let ends = mask.is_allowed(end) || self.eos.iter().any(|&e| mask.is_allowed(e));
        let mut any = false;
        for (id, l) in logits.iter_mut().enumerate() {
            let id = id as u32;
            let ok = if self.eos.contains(&id) {
                ends
            } else {
                (id as usize) < self.rows && mask.is_allowed(id)
            };
            if ok {
                any |= *l > f32::NEG_INFINITY;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        if !any {
            return Err(Error::Internal(
                "the grammar allows no token the model can produce here".into(),
            ));
        }
        Ok(())
    }

    /// Advances past the chosen token (one [`Constraint::mask`] allowed).
    pub fn accept(&mut self, id: u32) -> Result<()> {
        if self.eos.contains(&id) {
            // An EOS token ends the sequence; the grammar is complete (the mask allowed it).
            return Ok(());
        }
        self.matcher
            .consume_token(id)
            .map_err(|e| Error::Internal(format!("grammar engine: token {id}: {e}")))
    }

    /// The grammar is complete and admits no more text: the sequence ends here.
    pub fn is_done(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// The grammar could end here (EOS would be allowed).
    pub fn can_end(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        let files = crate::demo::files();
        let get = |name: &str| match &files {
            crate::weights::ModelFiles::Embedded { files, .. } => files
                .iter()
                .find(|f| f.name == name)
                .map(|f| f.bytes.to_vec()),
            _ => None,
        };
        Tokenizer::from_bytes(
            &get("tokenizer.json").expect("demo tokenizer"),
            get("tokenizer_config.json").as_deref(),
            None,
        )
        .expect("demo tokenizer loads")
    }

    /// Greedy decoding over pseudo-random logits under `grammar`: the text it produces.
    fn generate(
        engine: &GrammarEngine,
        tok: &Tokenizer,
        grammar: &Grammar,
        seed: u64,
    ) -> (String, bool) {
        let mut c = engine.compile(grammar).expect("compiles");
        let mut ids = Vec::new();
        let mut rng = crate::sampler::Rng::new(seed);
        for _ in 0..400 {
            let mut logits: Vec<f32> = (0..engine.rows)
                .map(|_| (rng.next_u64() % 10_000) as f32 / 1000.0)
                .collect();
            c.mask(&mut logits).expect("a token is allowed");
            let id = (0..logits.len())
                .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
                .unwrap() as u32;
            if engine.eos.contains(&id) {
                return (tok.decode(&ids, false).unwrap(), true);
            }
            c.accept(id).unwrap();
            ids.push(id);
            if c.is_done() {
                return (tok.decode(&ids, false).unwrap(), true);
            }
        }
        (tok.decode(&ids, false).unwrap(), false)
    }

    #[test]
    fn token_bytes_spell_the_encoded_text() {
        let tok = tokenizer();
        let bytes = tok.token_bytes();
        let text = "Hello wörld <|im_end|> 42 ✓";
        let ids = tok.encode(text, false).unwrap();
        let spelled: Vec<u8> = ids
            .iter()
            .flat_map(|&i| {
                let b = &bytes[i as usize];
                if b.first() == Some(&crate::tokenizer::SPECIAL_TOKEN_MARKER) {
                    b[1..].to_vec()
                } else {
                    b.clone()
                }
            })
            .collect();
        assert_eq!(String::from_utf8(spelled).unwrap(), text);
        let im_end = tok.token_to_id("<|im_end|>").unwrap();
        assert_eq!(
            bytes[im_end as usize][0],
            crate::tokenizer::SPECIAL_TOKEN_MARKER
        );
    }

    #[test]
    fn random_logits_under_a_schema_give_valid_json() {
        let tok = tokenizer();
        let eos = tok.token_to_id("<|im_end|>").unwrap();
        let rows = tok.vocab_size() + 5;
        let engine = GrammarEngine::new(&tok, rows, &[eos]).unwrap();
        let schema = serde_json::json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 6},
                "age": {"type": "integer", "minimum": 0, "maximum": 99},
                "color": {"enum": ["red", "green", "blue"]},
            },
            "required": ["name", "age", "color"],
            "additionalProperties": false,
        });
        for seed in 1..6 {
            let (text, ended) = generate(&engine, &tok, &Grammar::JsonSchema(schema.clone()), seed);
            assert!(ended, "the bounded schema ends: {text:?}");
            let v: serde_json::Value = serde_json::from_str(&text).expect(&text);
            assert!(v["name"].as_str().unwrap().chars().count() <= 6, "{text}");
            let age = v["age"].as_i64().unwrap();
            assert!((0..=99).contains(&age), "{text}");
            assert!(["red", "green", "blue"].contains(&v["color"].as_str().unwrap()));
            assert_eq!(v.as_object().unwrap().len(), 3);
        }
    }

    #[test]
    fn lark_grammars_hold_and_end_without_an_eos_token() {
        let tok = tokenizer();
        let engine = GrammarEngine::new(&tok, tok.vocab_size(), &[]).unwrap();
        let g = Grammar::Lark(r#"start: "yes" | "no" | "maybe""#.into());
        for seed in 1..4 {
            let (text, ended) = generate(&engine, &tok, &g, seed);
            assert!(ended);
            assert!(["yes", "no", "maybe"].contains(&text.as_str()), "{text}");
        }
    }

    #[test]
    fn bad_grammars_are_invalid_requests() {
        let tok = tokenizer();
        let engine = GrammarEngine::new(&tok, tok.vocab_size(), &[]).unwrap();
        for g in [
            Grammar::Lark("start: ( ".into()),
            Grammar::JsonSchema(serde_json::json!({"type": "no-such-type"})),
            Grammar::JsonSchema(serde_json::json!({"$ref": "#/nowhere"})),
        ] {
            match engine.compile(&g) {
                Err(Error::InvalidRequest(why)) => assert!(why.contains("grammar"), "{why}"),
                other => panic!("{g:?}: {other:?}"),
            }
        }
    }
}
