//! Text side of a model folder: `tokenizer.json` (encode / decode through the Hugging Face
//! `tokenizers` pipeline), `tokenizer_config.json` (special token names, BOS/EOS policy, chat
//! template) and `chat_template.jinja`, chat-template rendering with the Python-flavoured Jinja
//! that Hugging Face templates are written in, and incremental detokenisation for streaming.
//!
//! What must always hold:
//! - Decoded text never splits a UTF-8 character: [`IncrementalDecoder::push`] only returns
//!   text once every character in it is complete, and the concatenation of all pushes plus
//!   [`IncrementalDecoder::finish`] equals [`Tokenizer::decode`] of the whole id sequence with
//!   `skip_special_tokens = false`.
//! - No panic on any input: malformed files, any token id sequence (unknown ids are an
//!   [`TokenizerError::UnknownTokenId`]) and any chat template give an error, never a panic.
//! - Encoding follows `transformers`: truncation and padding stored in `tokenizer.json` are
//!   ignored, and an explicit `add_bos_token` / `add_eos_token` in `tokenizer_config.json`
//!   replaces the post-processor, as the tokenizers backend of `transformers` does.
//! - Bounded encoding ([`Tokenizer::encode_within`], [`Tokenizer::encode_chat_within`]) does
//!   work proportional to its token limit, not to the text: text longer than the limit can hold
//!   is refused from its length alone where the pipeline proves a token covers at most so many
//!   bytes, else counted in pieces that stop once the count is surely over. It never refuses
//!   text that fits (each piece boundary is allowed a slack), and what it accepts it encodes in
//!   one call, exactly as [`Tokenizer::encode`] does.
//! - Chat-template rendering is bounded: an instruction and data budget (minijinja fuel) that
//!   grows with the messages, a recursion limit, and an output cap derived from the token limit;
//!   each failure is an error naming the chat template.
//! - The template helpers print what `transformers`' do: `tojson` is Python's `json.dumps`
//!   (serde_json with a formatter for Python's separators, indent, `ensure_ascii` and float
//!   `repr`), `strftime_now` is C `strftime` in the C locale (chrono's calendar, UTC).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{context, Environment, ErrorKind, Value};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{ModelWrapper, PostProcessor};

/// Name under which the chat template is registered in its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// Largest token id accepted (vocabularies in use stay well below a million).
const MAX_TOKEN_ID: usize = 1 << 24;

/// Longest text encoded in one call when it may hold more tokens than allowed: one piece's
/// encoding (ids, offsets, token strings, alignments) stays within a few tens of MiB, and a
/// piece holds more tokens than most contexts, so the first piece usually decides.
const COUNT_PIECE_BYTES: usize = 64 * 1024;

/// How far back from a piece's end a better cut is looked for (a quarter of the piece keeps
/// pieces large while a cut at whitespace is almost always found).
const CUT_SEARCH_BYTES: usize = COUNT_PIECE_BYTES / 4;

/// Tokens by which cutting text at whitespace or a change of character class may raise the
/// count of the pieces above the count of the whole (a prefix the normalizer adds to each
/// piece, a split regex that sees the piece's edge). Generous: it only delays a refusal.
const CUT_SLACK_TOKENS: usize = 16;

/// How many bytes one token can stand for is multiplied by this for Unicode normalization
/// (NFC, NFKC, ...) and lower-casing, which can shrink text: NFKC maps a 4-byte mathematical
/// letter to a 1-byte ASCII one.
const NORMALIZE_SHRINK: usize = 4;

/// Instructions a chat template may run for one render before the per-message and per-byte
/// allowances: known templates use a few thousand for a short chat, and at the engine's speed
/// this is tens of milliseconds, with about 64 MiB of data (one fuel pays for 64 bytes).
const TEMPLATE_FUEL_BASE: u64 = 1_000_000;

/// Extra instructions per message (known templates use a few hundred per message, more with
/// tools or reasoning content).
const TEMPLATE_FUEL_PER_MESSAGE: u64 = 4_000;

/// Extra fuel per byte of message content, as a divisor: a template may copy, trim and split
/// each message several times (one fuel pays for 64 bytes, so 1/8 a byte is eight copies).
const TEMPLATE_FUEL_CONTENT_DIVISOR: u64 = 8;

/// Nested blocks, macro calls and includes a chat template may stack: known templates nest a
/// few levels (a macro that prints a JSON schema recurses with its depth), and this keeps the
/// stack well inside a 2 MiB thread (minijinja's own cap is 500).
const TEMPLATE_RECURSION_LIMIT: usize = 100;

/// Bytes a token is assumed to stand for when capping a chat template's output for a tokenizer
/// whose pipeline gives no proven bound (a normalizer or pre-tokenizer that drops text).
const FALLBACK_BYTES_PER_TOKEN: usize = 64;

/// Keys of `tokenizer_config.json` that `transformers` passes to chat templates (its
/// `special_tokens_map`), when they are set.
const TEMPLATE_TOKEN_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// Everything that can go wrong while loading, encoding, decoding or rendering.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file could not be read or parsed; `path` names it.
    #[error("cannot load {path}: {reason}")]
    Load { path: String, reason: String },
    /// The tokenizer pipeline failed to encode the text.
    #[error("encoding failed: {0}")]
    Encode(String),
    /// The tokenizer pipeline failed to decode the ids.
    #[error("decoding failed: {0}")]
    Decode(String),
    /// An id that the tokenizer does not know.
    #[error("token id {id} is not in the vocabulary ({vocab_size} ids)")]
    UnknownTokenId { id: u32, vocab_size: usize },
    /// Neither `tokenizer_config.json` nor `chat_template.jinja` provides a chat template.
    #[error("the tokenizer has no chat template")]
    NoChatTemplate,
    /// The chat template could not be compiled or rendered.
    #[error("chat template error: {reason}")]
    Template { reason: String },
    /// The chat template called `raise_exception(message)`.
    #[error("chat template raised an exception: {message}")]
    TemplateException { message: String },
    /// The text holds more tokens than allowed. Counting stops as soon as that is certain, so
    /// `at_least_tokens` is a lower bound (exact when the whole text was encoded).
    #[error("the text is at least {at_least_tokens} tokens, over the limit of {max_tokens}")]
    TooLong {
        at_least_tokens: usize,
        max_tokens: usize,
    },
}

/// One chat turn, as passed to chat templates (`message.role`, `message.content`, and any
/// further fields as given: `tool_calls`, `tool_call_id`, `name`, `reasoning_content`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// More fields of the message, handed to the template as they are (`role` and `content`
    /// here are ignored: the fields above win).
    #[serde(flatten, default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            extra: serde_json::Map::new(),
        }
    }

    /// This message with `key` set to `value` for the template (e.g. an assistant turn's
    /// `tool_calls`, a tool result's `tool_call_id`).
    pub fn with(mut self, key: impl Into<String>, value: serde_json::Value) -> Self {
        self.extra.insert(key.into(), value);
        self
    }
}

/// State of the chat template found at load time.
enum ChatTemplate {
    None,
    Ready(Box<Environment<'static>>),
    /// A template exists but cannot be used (syntax error, no default among several).
    Broken(String),
}

/// A loaded tokenizer with its chat template and special tokens.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat: ChatTemplate,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// Special tokens handed to the chat template, in `transformers`' naming.
    template_tokens: BTreeMap<String, Value>,
    /// `known[id]` is true for every id the tokenizer can decode.
    known: Vec<bool>,
    vocab_size: usize,
    /// `Some` when the decoder fuses `<0xNN>` byte tokens: marks those ids. Text that ends in
    /// such a token may still change (a later byte can make the group invalid), so streaming
    /// holds it back until a different token follows.
    byte_fallback_ids: Option<Vec<bool>>,
    /// Most bytes of input text one token can stand for, when the pipeline proves a bound
    /// ([`proven_bytes_per_token`]); text longer than `limit * this` cannot fit `limit` tokens.
    bytes_per_token: Option<usize>,
    /// Characters of the longest vocabulary entry: the slack of a cut inside a word.
    longest_token_chars: usize,
    /// Added tokens longer than one byte: a piece is never cut inside one of them.
    added_contents: Vec<String>,
    /// The chat template's text.
    template_source: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("has_chat_template", &self.has_chat_template())
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Builds a tokenizer from `tokenizer.json` bytes, optional `tokenizer_config.json` bytes and
    /// optional separate chat template text (the content of `chat_template.jinja`, which takes
    /// precedence over a template in the config).
    pub fn from_bytes(
        tokenizer_json: &[u8],
        tokenizer_config_json: Option<&[u8]>,
        chat_template: Option<&str>,
    ) -> Result<Self, TokenizerError> {
        Self::build(
            tokenizer_json,
            "tokenizer.json",
            tokenizer_config_json.map(|c| (c, "tokenizer_config.json")),
            chat_template,
        )
    }

    /// Reads `tokenizer.json`, and if present `tokenizer_config.json` and `chat_template.jinja`,
    /// from a model folder. Errors name the file.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer_json = read_file(&tokenizer_path)?;
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.exists() {
            Some(read_file(&config_path)?)
        } else {
            None
        };
        let template_path = dir.join("chat_template.jinja");
        let template = if template_path.exists() {
            let bytes = read_file(&template_path)?;
            Some(String::from_utf8(bytes).map_err(|e| TokenizerError::Load {
                path: template_path.display().to_string(),
                reason: format!("not UTF-8: {e}"),
            })?)
        } else {
            None
        };
        let config_label = config_path.display().to_string();
        Self::build(
            &tokenizer_json,
            &tokenizer_path.display().to_string(),
            config.as_deref().map(|c| (c, config_label.as_str())),
            template.as_deref(),
        )
    }

    fn build(
        tokenizer_json: &[u8],
        tokenizer_label: &str,
        config: Option<(&[u8], &str)>,
        chat_template: Option<&str>,
    ) -> Result<Self, TokenizerError> {
        let load_err = |path: &str, reason: String| TokenizerError::Load {
            path: path.to_string(),
            reason,
        };

        let mut inner = parse_tokenizer_json(tokenizer_json)
            .map_err(|reason| load_err(tokenizer_label, reason))?;
        // `transformers` encodes without the truncation and padding a tokenizer.json may carry.
        inner
            .with_truncation(None)
            .map_err(|e| load_err(tokenizer_label, e.to_string()))?;
        inner.with_padding(None);

        let config_label = config.map_or("tokenizer_config.json", |(_, label)| label);
        let config: serde_json::Map<String, serde_json::Value> = match config {
            None => serde_json::Map::new(),
            Some((bytes, label)) => match serde_json::from_slice::<serde_json::Value>(bytes) {
                Ok(serde_json::Value::Object(map)) => map,
                Ok(other) => {
                    return Err(load_err(
                        label,
                        format!("expected a JSON object, found {}", json_kind(&other)),
                    ))
                }
                Err(e) => return Err(load_err(label, e.to_string())),
            },
        };

        let bos_token = config_token(&config, "bos_token");
        let eos_token = config_token(&config, "eos_token");
        let mut template_tokens = BTreeMap::new();
        for key in TEMPLATE_TOKEN_KEYS {
            if let Some(token) = config_token(&config, key) {
                template_tokens.insert(key.to_string(), Value::from(token));
            }
        }
        if let Some(serde_json::Value::Array(extra)) = config.get("additional_special_tokens") {
            let extra: Vec<Value> = extra
                .iter()
                .filter_map(token_string)
                .map(Value::from)
                .collect();
            template_tokens.insert("additional_special_tokens".to_string(), Value::from(extra));
        }

        apply_bos_eos_policy(
            &mut inner,
            &config,
            bos_token.as_deref(),
            eos_token.as_deref(),
        )
        .map_err(|reason| load_err(config_label, reason))?;

        let vocab = inner.get_vocab(true);
        let vocab_size = vocab.len();
        let max_id = vocab.values().copied().max().map_or(0, |m| m as usize + 1);
        if max_id > MAX_TOKEN_ID {
            return Err(load_err(
                tokenizer_label,
                format!("token id {} is implausibly large", max_id - 1),
            ));
        }
        let mut known = vec![false; max_id];
        for &id in vocab.values() {
            known[id as usize] = true;
        }
        let byte_fallback_ids = inner
            .get_decoder()
            .is_some_and(decoder_fuses_bytes)
            .then(|| {
                let mut marks = vec![false; max_id];
                for (token, &id) in &vocab {
                    if byte_fallback_value(token).is_some() {
                        marks[id as usize] = true;
                    }
                }
                marks
            });

        let longest_token_chars = vocab.keys().map(|t| t.chars().count()).max().unwrap_or(1);
        let bytes_per_token = proven_bytes_per_token(&inner, &vocab);
        let mut added_contents: Vec<String> = inner
            .get_added_tokens_decoder()
            .into_values()
            .map(|t| t.content)
            .filter(|c| c.len() > 1)
            .collect();
        added_contents.sort();
        added_contents.dedup();

        let template_source = match chat_template {
            Some(text) => Some(Ok(text.to_string())),
            None => config_chat_template(config.get("chat_template")),
        };
        let template_text = template_source.clone().and_then(Result::ok);
        let chat = match template_source {
            None => ChatTemplate::None,
            Some(Err(reason)) => {
                tracing::warn!("unusable chat template: {reason}");
                ChatTemplate::Broken(reason)
            }
            Some(Ok(source)) => match compile_template(&source) {
                Ok(env) => ChatTemplate::Ready(Box::new(env)),
                Err(reason) => {
                    tracing::warn!("chat template does not compile: {reason}");
                    ChatTemplate::Broken(reason)
                }
            },
        };

        Ok(Self {
            inner,
            chat,
            bos_token,
            eos_token,
            template_tokens,
            known,
            vocab_size,
            byte_fallback_ids,
            bytes_per_token,
            longest_token_chars,
            added_contents,
            template_source: template_text,
        })
    }

    /// Encodes text as `tokenizer(text)` in `transformers` does: `add_special_tokens = true`
    /// applies the post-processor (e.g. BOS for Llama/Mistral tokenizers).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = guarded(|| self.inner.encode_fast(text, add_special_tokens))
            .map_err(TokenizerError::Encode)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Encodes as [`Tokenizer::encode`] does, but refuses text of more than `max_tokens` tokens
    /// with [`TokenizerError::TooLong`] after work proportional to `max_tokens`, not to the
    /// text: first from the text's length alone (where the pipeline bounds the bytes a token
    /// stands for), then, for text longer than a piece and than `max_tokens` bytes, by counting
    /// pieces of at most [`COUNT_PIECE_BYTES`] until the count, less a slack per cut, is over.
    /// Text that may fit is encoded whole, so accepted text gets exactly the ids
    /// [`Tokenizer::encode`] gives.
    pub fn encode_within(
        &self,
        text: &str,
        add_special_tokens: bool,
        max_tokens: usize,
    ) -> Result<Vec<u32>, TokenizerError> {
        let special = if add_special_tokens {
            self.special_token_count()
        } else {
            0
        };
        if let Some(per_token) = self.bytes_per_token {
            let at_least_tokens = text.len().div_ceil(per_token) + special;
            if at_least_tokens > max_tokens {
                return Err(TokenizerError::TooLong {
                    at_least_tokens,
                    max_tokens,
                });
            }
        }
        // Text of at most `max_tokens` bytes costs no more to encode whole than an accepted
        // prompt does: counting it first would only tokenize it twice.
        if text.len() > COUNT_PIECE_BYTES.max(max_tokens) {
            self.count_in_pieces(text, special, COUNT_PIECE_BYTES, Some(max_tokens))?;
        }
        let ids = self.encode(text, add_special_tokens)?;
        if ids.len() > max_tokens {
            return Err(TokenizerError::TooLong {
                at_least_tokens: ids.len(),
                max_tokens,
            });
        }
        Ok(ids)
    }

    /// Tokens the post-processor adds to a single sequence (BOS, EOS).
    fn special_token_count(&self) -> usize {
        self.inner
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false))
    }

    /// Counts the tokens of `text` piece by piece (pieces of at most `piece_bytes`, cut by
    /// [`Tokenizer::cut`]) plus `special`, and returns `(count, slack)`: the whole text's count
    /// lies within `slack` of `count`. With `max_tokens`, stops with
    /// [`TokenizerError::TooLong`] as soon as `count - slack` (the cuts made so far, including
    /// the one after the last piece counted) is over it.
    fn count_in_pieces(
        &self,
        text: &str,
        special: usize,
        piece_bytes: usize,
        max_tokens: Option<usize>,
    ) -> Result<(usize, usize), TokenizerError> {
        let (mut count, mut slack) = (special, 0usize);
        let mut start = 0;
        while start < text.len() {
            let end = if text.len() - start <= piece_bytes {
                text.len()
            } else {
                let (end, cut_slack) = self.cut(text, start, start + piece_bytes);
                slack += cut_slack;
                end
            };
            let piece = &text[start..end];
            let encoding =
                guarded(|| self.inner.encode_fast(piece, false)).map_err(TokenizerError::Encode)?;
            count += encoding.len();
            drop(encoding);
            start = end;
            if let Some(max_tokens) = max_tokens {
                let at_least_tokens = count.saturating_sub(slack);
                if at_least_tokens > max_tokens {
                    return Err(TokenizerError::TooLong {
                        at_least_tokens,
                        max_tokens,
                    });
                }
            }
        }
        Ok((count, slack))
    }

    /// Where to end a piece that starts at `start` and may reach `limit` (both char boundaries
    /// or `limit` past one), and the slack that cut needs. Prefers, looking back from `limit`
    /// at most [`CUT_SEARCH_BYTES`]: just before whitespace that follows non-whitespace (where
    /// pre-tokenizers split anyway), then a change between alphanumeric and other characters,
    /// then any character boundary (a cut inside a word, whose slack is one longest token more).
    /// Never inside an added token.
    fn cut(&self, text: &str, start: usize, limit: usize) -> (usize, usize) {
        let mut hi = limit.min(text.len());
        while !text.is_char_boundary(hi) {
            hi -= 1;
        }
        let lo = hi.saturating_sub(CUT_SEARCH_BYTES).max(start + 1);
        let boundaries = || (lo..=hi).rev().filter(|&i| text.is_char_boundary(i));
        let around = |i: usize| (text[..i].chars().next_back(), text[i..].chars().next());
        let whitespace_cut = |i: usize| matches!(around(i), (Some(a), Some(b)) if !a.is_whitespace() && b.is_whitespace());
        let class_cut = |i: usize| matches!(around(i), (Some(a), Some(b)) if a.is_alphanumeric() != b.is_alphanumeric());
        for rule in [&whitespace_cut as &dyn Fn(usize) -> bool, &class_cut] {
            if let Some(i) = boundaries().find(|&i| rule(i) && !self.inside_added(text, i)) {
                return (i, CUT_SLACK_TOKENS);
            }
        }
        let i = boundaries()
            .find(|&i| !self.inside_added(text, i))
            .unwrap_or(hi);
        (i, CUT_SLACK_TOKENS + self.longest_token_chars)
    }

    /// Whether byte offset `i` falls strictly inside an occurrence of an added token.
    fn inside_added(&self, text: &str, i: usize) -> bool {
        let bytes = text.as_bytes();
        self.added_contents.iter().any(|token| {
            let t = token.as_bytes();
            (i.saturating_sub(t.len() - 1)..i).any(|j| bytes.get(j..j + t.len()) == Some(t))
        })
    }

    /// Decodes ids to text. Unknown ids are an error.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        for &id in ids {
            self.check_id(id)?;
        }
        self.decode_known(ids, skip_special_tokens)
    }

    fn decode_known(
        &self,
        ids: &[u32],
        skip_special_tokens: bool,
    ) -> Result<String, TokenizerError> {
        guarded(|| self.inner.decode(ids, skip_special_tokens)).map_err(TokenizerError::Decode)
    }

    fn check_id(&self, id: u32) -> Result<(), TokenizerError> {
        if self.known.get(id as usize).copied().unwrap_or(false) {
            Ok(())
        } else {
            Err(TokenizerError::UnknownTokenId {
                id,
                vocab_size: self.vocab_size,
            })
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of ids the tokenizer knows (base vocab + added tokens).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Whether the chat template writes `<think>` ... `</think>` blocks: a thinking model, whose
    /// answers start with their reasoning (Qwen3, DeepSeek-R1, GLM-4.5).
    pub fn template_thinks(&self) -> bool {
        match &self.chat {
            ChatTemplate::Ready(env) => env
                .get_template(TEMPLATE_NAME)
                .is_ok_and(|t| t.source().contains("</think>")),
            _ => false,
        }
    }

    /// True when a chat template was found (it may still fail to compile or render).
    pub fn has_chat_template(&self) -> bool {
        !matches!(self.chat, ChatTemplate::None)
    }

    /// Renders the chat template as `transformers`' `apply_chat_template(messages,
    /// add_generation_prompt=..., tokenize=False)` does, within the template's instruction and
    /// data budget.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        self.render_chat(
            messages,
            add_generation_prompt,
            None,
            &TemplateKwargs::new(),
            None,
        )
    }

    /// [`Tokenizer::apply_chat_template`] with `kwargs` as more template variables (see
    /// [`Tokenizer::encode_chat_with`]).
    pub fn apply_chat_template_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        kwargs: &TemplateKwargs,
    ) -> Result<String, TokenizerError> {
        self.render_chat(messages, add_generation_prompt, None, kwargs, None)
    }

    /// Renders the chat template and encodes the text without special tokens, refusing more
    /// than `max_tokens` tokens ([`TokenizerError::TooLong`]) as [`Tokenizer::encode_within`]
    /// does; rendering stops once its output is longer than `max_tokens` tokens can be.
    pub fn encode_chat_within(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        max_tokens: usize,
    ) -> Result<Vec<u32>, TokenizerError> {
        self.encode_chat_with(
            messages,
            add_generation_prompt,
            &TemplateKwargs::new(),
            max_tokens,
        )
    }

    /// [`Tokenizer::encode_chat_within`] with `kwargs` as more template variables (as
    /// `apply_chat_template(..., **kwargs)` passes them: `enable_thinking`, ...). A key the
    /// renderer itself sets (`messages`, `add_generation_prompt`, `tools`, `documents`) is an
    /// error naming it.
    pub fn encode_chat_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        kwargs: &TemplateKwargs,
        max_tokens: usize,
    ) -> Result<Vec<u32>, TokenizerError> {
        self.encode_chat_tools(messages, add_generation_prompt, kwargs, None, max_tokens)
    }

    /// [`Tokenizer::encode_chat_with`] with the `tools` template variable: function
    /// definitions in OpenAI's form (`{"type": "function", "function": {"name", "description",
    /// "parameters"}}`), as `apply_chat_template(tools=...)` passes them.
    pub fn encode_chat_tools(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        kwargs: &TemplateKwargs,
        tools: Option<&[serde_json::Value]>,
        max_tokens: usize,
    ) -> Result<Vec<u32>, TokenizerError> {
        let text = self.render_chat(
            messages,
            add_generation_prompt,
            Some(max_tokens),
            kwargs,
            tools,
        )?;
        self.encode_within(&text, false, max_tokens)
    }

    /// The chat template's source text, when one compiled.
    pub fn chat_template_source(&self) -> Option<&str> {
        match &self.chat {
            ChatTemplate::Ready(_) => self.template_source.as_deref(),
            _ => None,
        }
    }

    /// Renders the chat template with fuel for the messages' number and size and, with
    /// `max_tokens`, an output cap of `max_tokens` times the bytes a token can stand for.
    fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        max_tokens: Option<usize>,
        kwargs: &TemplateKwargs,
        tools: Option<&[serde_json::Value]>,
    ) -> Result<String, TokenizerError> {
        if let Some(k) = kwargs
            .keys()
            .find(|k| RESERVED_TEMPLATE_KEYS.contains(&k.as_str()))
        {
            return Err(TokenizerError::Template {
                reason: format!(
                    "chat_template_kwargs may not set `{k}`: the request's own fields give it"
                ),
            });
        }
        let env = match &self.chat {
            ChatTemplate::None => return Err(TokenizerError::NoChatTemplate),
            ChatTemplate::Broken(reason) => {
                return Err(TokenizerError::Template {
                    reason: reason.clone(),
                })
            }
            ChatTemplate::Ready(env) => env,
        };
        let extra_bytes = |v: &serde_json::Map<String, serde_json::Value>| {
            if v.is_empty() {
                0
            } else {
                serde_json::to_string(v).map_or(0, |s| s.len())
            }
        };
        let tools_bytes = tools.map_or(0, |t| serde_json::to_string(t).map_or(0, |s| s.len()));
        let content_bytes: usize = messages
            .iter()
            .map(|m| m.role.len() + m.content.len() + extra_bytes(&m.extra))
            .sum::<usize>()
            + tools_bytes;
        let fuel = TEMPLATE_FUEL_BASE
            .saturating_add(TEMPLATE_FUEL_PER_MESSAGE.saturating_mul(messages.len() as u64))
            .saturating_add(content_bytes as u64 / TEMPLATE_FUEL_CONTENT_DIVISOR);
        let message_count = messages.len();
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                let base = context! {
                    role => m.role.as_str(),
                    content => m.content.as_str(),
                };
                if m.extra.is_empty() {
                    base
                } else {
                    context! { ..base, ..Value::from(minijinja::value::Serde(&m.extra)) }
                }
            })
            .collect();
        let tools = match tools {
            Some(t) => Value::from(minijinja::value::Serde(t)),
            None => Value::from(()),
        };
        // The model's special tokens, then the caller's variables over them (as transformers
        // passes `**special_tokens, **kwargs`).
        let mut vars = self.template_tokens.clone();
        for (k, v) in kwargs {
            vars.insert(k.clone(), Value::from(minijinja::value::Serde(v)));
        }
        let ctx = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            tools => tools,
            documents => (),
            ..Value::from(vars)
        };
        let mut env = Environment::clone(env);
        env.set_fuel(Some(fuel));
        let cap_bytes = max_tokens.map_or(usize::MAX, |m| {
            m.saturating_mul(self.bytes_per_token.unwrap_or(FALLBACK_BYTES_PER_TOKEN))
        });
        let mut out = CappedWriter {
            bytes: Vec::new(),
            cap_bytes,
            over: false,
        };
        let template = env.get_template(TEMPLATE_NAME).map_err(template_error)?;
        let rendered = guarded_render(|| template.render_captured_to(ctx, &mut out).map(|_| ()));
        match (rendered, max_tokens) {
            (Err(_), Some(max_tokens)) if out.over => Err(match self.bytes_per_token {
                Some(_) => TokenizerError::TooLong {
                    at_least_tokens: max_tokens + 1,
                    max_tokens,
                },
                None => TokenizerError::Template {
                    reason: format!(
                        "the chat template's output passed {cap_bytes} bytes, the most allowed \
                         for {max_tokens} tokens: shorten the messages"
                    ),
                },
            }),
            (Err(TokenizerError::Template { reason }), _) if reason == OUT_OF_FUEL => {
                Err(TokenizerError::Template {
                    reason: format!(
                        "rendering ran past its budget of {fuel} steps for {} message(s) \
                         ({content_bytes} bytes): the template loops or builds data without \
                         bound; fix the chat template",
                        message_count
                    ),
                })
            }
            (Err(e), _) => Err(e),
            (Ok(()), _) => String::from_utf8(out.bytes).map_err(|e| TokenizerError::Template {
                reason: format!("the output is not UTF-8: {e}"),
            }),
        }
    }

    /// Renders the chat template and encodes it without adding special tokens, as
    /// `apply_chat_template(tokenize=True)` does.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let text = self.apply_chat_template(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }

    /// `eos_token` of `tokenizer_config.json`.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// `bos_token` of `tokenizer_config.json`.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The bytes every token id stands for, indexed by id (empty for ids the tokenizer lacks),
    /// as a grammar engine matches them: byte-level tokens mapped back through the byte
    /// alphabet, `<0xNN>` byte-fallback tokens as their byte, sentencepiece's `▁` as a space,
    /// and special added tokens as [`SPECIAL_TOKEN_MARKER`] followed by their text (so no text
    /// the model writes can spell one). A token none of these rules covers is decoded alone.
    pub fn token_bytes(&self) -> Vec<Vec<u8>> {
        let mut out = vec![Vec::new(); self.known.len()];
        let byte_level = self.inner.get_decoder().is_some_and(decoder_is_byte_level);
        let alphabet = byte_level_chars();
        let added = self.inner.get_added_tokens_decoder();
        for (token, id) in self.inner.get_vocab(true) {
            let Some(slot) = out.get_mut(id as usize) else {
                continue;
            };
            *slot = if let Some(t) = added.get(&id) {
                let mut b = Vec::with_capacity(t.content.len() + 1);
                if t.special {
                    b.push(SPECIAL_TOKEN_MARKER);
                }
                b.extend_from_slice(t.content.as_bytes());
                b
            } else if let Some(byte) = self.byte_fallback_ids.as_ref().and_then(|marks| {
                marks
                    .get(id as usize)
                    .copied()
                    .unwrap_or(false)
                    .then(|| byte_fallback_value(&token))
                    .flatten()
            }) {
                vec![byte]
            } else if byte_level {
                match token
                    .chars()
                    .map(|c| alphabet.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                {
                    Some(b) => b,
                    None => self
                        .decode_known(&[id], false)
                        .unwrap_or_default()
                        .into_bytes(),
                }
            } else if token.contains('\u{2581}') {
                token.replace('\u{2581}', " ").into_bytes()
            } else {
                self.decode_known(&[id], false)
                    .unwrap_or_default()
                    .into_bytes()
            };
        }
        out
    }

    /// A fresh streaming detokeniser.
    pub fn decoder(&self) -> IncrementalDecoder<'_> {
        IncrementalDecoder {
            tokenizer: self,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }
}

/// Streams text token by token; never emits a partial UTF-8 character (byte-level BPE tokens can
/// split one), never panics.
///
/// It keeps the ids from `prefix_offset` on. The text of `ids[prefix_offset..read_offset]` was
/// already emitted; each push decodes `ids[prefix_offset..]` and emits what lies beyond the
/// decoded prefix, once that text is final. Decoding a window that starts a little before the
/// new ids (rather than the new ids alone) keeps context-dependent spacing right, e.g. the
/// leading-space rules of sentencepiece-style decoders.
pub struct IncrementalDecoder<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl std::fmt::Debug for IncrementalDecoder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncrementalDecoder")
            .field("ids", &self.ids)
            .field("prefix_offset", &self.prefix_offset)
            .field("read_offset", &self.read_offset)
            .finish()
    }
}

impl IncrementalDecoder<'_> {
    /// Feeds one generated token id; returns the newly completed text (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.tokenizer.check_id(id)?;
        self.ids.push(id);
        if self.ends_in_open_byte_group() {
            return Ok(String::new());
        }
        let (prefix_text, new_text) = match self.window_texts() {
            Ok(texts) => texts,
            Err(e) => {
                self.ids.pop();
                return Err(e);
            }
        };
        if new_text.len() <= prefix_text.len() || new_text.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(String::new());
        }
        match suffix_after(&new_text, &prefix_text) {
            Some(text) => {
                let text = text.to_string();
                self.advance();
                Ok(text)
            }
            None => Ok(String::new()),
        }
    }

    /// End of stream: returns whatever is left (incomplete trailing bytes become U+FFFD, as a
    /// full decode would give). Pushing more ids afterwards continues the same text.
    pub fn finish(&mut self) -> Result<String, TokenizerError> {
        if self.read_offset >= self.ids.len() {
            return Ok(String::new());
        }
        let (prefix_text, new_text) = self.window_texts()?;
        let text = suffix_after(&new_text, &prefix_text)
            .unwrap_or_default()
            .to_string();
        self.advance();
        Ok(text)
    }

    /// Decoded text of the already-emitted part of the window and of the whole window.
    fn window_texts(&self) -> Result<(String, String), TokenizerError> {
        let prefix = self
            .tokenizer
            .decode_known(&self.ids[self.prefix_offset..self.read_offset], false)?;
        let full = self
            .tokenizer
            .decode_known(&self.ids[self.prefix_offset..], false)?;
        Ok((prefix, full))
    }

    /// Marks everything pushed so far as emitted and drops ids the window no longer needs.
    fn advance(&mut self) {
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.ids.drain(..self.prefix_offset);
        self.read_offset -= self.prefix_offset;
        self.prefix_offset = 0;
    }

    fn ends_in_open_byte_group(&self) -> bool {
        match (&self.tokenizer.byte_fallback_ids, self.ids.last()) {
            (Some(marks), Some(&last)) => marks.get(last as usize).copied().unwrap_or(false),
            _ => false,
        }
    }
}

/// `full` minus its leading `prefix`, if `full` does start with it.
fn suffix_after<'s>(full: &'s str, prefix: &str) -> Option<&'s str> {
    full.strip_prefix(prefix)
}

/// Top-level keys of `tokenizer.json` that the tokenizer library reads.
const TOKENIZER_JSON_KEYS: [&str; 9] = [
    "version",
    "truncation",
    "padding",
    "added_tokens",
    "normalizer",
    "pre_tokenizer",
    "post_processor",
    "decoder",
    "model",
];

/// Parses `tokenizer.json`. The library's parser fails on top-level keys it does not know, so
/// when the direct parse fails, the document is parsed again with only the known keys kept.
fn parse_tokenizer_json(bytes: &[u8]) -> Result<tokenizers::Tokenizer, String> {
    let first_error = match guarded(|| tokenizers::Tokenizer::from_bytes(bytes)) {
        Ok(tokenizer) => return Ok(tokenizer),
        Err(e) => e,
    };
    let document: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let serde_json::Value::Object(mut map) = document else {
        return Err(first_error);
    };
    let before = map.len();
    map.retain(|key, _| TOKENIZER_JSON_KEYS.contains(&key.as_str()));
    if map.len() == before {
        return Err(first_error);
    }
    tracing::debug!(
        "ignoring {} unknown top-level key(s) in tokenizer.json",
        before - map.len()
    );
    guarded(|| serde_json::from_value::<tokenizers::Tokenizer>(serde_json::Value::Object(map)))
}

/// Runs a call into the tokenizer library, turning both its errors and any panic into a message.
fn guarded<T, E: std::fmt::Display>(f: impl FnOnce() -> Result<T, E>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.to_string()),
        Err(payload) => Err(format!("internal panic: {}", panic_text(payload.as_ref()))),
    }
}

fn guarded_render<T>(f: impl FnOnce() -> Result<T, minijinja::Error>) -> Result<T, TokenizerError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(template_error(e)),
        Err(payload) => Err(TokenizerError::Template {
            reason: format!("internal panic: {}", panic_text(payload.as_ref())),
        }),
    }
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TokenizerError> {
    std::fs::read(path).map_err(|e| TokenizerError::Load {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A token named in `tokenizer_config.json`: a string, or an object with `content`.
fn token_string(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(map) => map
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

fn config_token(config: &serde_json::Map<String, serde_json::Value>, key: &str) -> Option<String> {
    config.get(key).and_then(token_string)
}

/// The chat template stored in `tokenizer_config.json`: a string, or a list of
/// `{name, template}` from which `default` is taken.
fn config_chat_template(value: Option<&serde_json::Value>) -> Option<Result<String, String>> {
    match value? {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(Ok(s.clone())),
        serde_json::Value::Array(entries) => {
            let mut names = Vec::new();
            for entry in entries {
                let name = entry.get("name").and_then(|n| n.as_str());
                let template = entry.get("template").and_then(|t| t.as_str());
                if let (Some(name), Some(template)) = (name, template) {
                    if name == "default" {
                        return Some(Ok(template.to_string()));
                    }
                    names.push(name.to_string());
                }
            }
            Some(Err(format!(
                "tokenizer_config.json lists chat templates [{}] but none is named \"default\"",
                names.join(", ")
            )))
        }
        other => Some(Err(format!(
            "chat_template in tokenizer_config.json is {}, expected a string or a list",
            json_kind(other)
        ))),
    }
}

/// An explicit `add_bos_token` / `add_eos_token` in `tokenizer_config.json` replaces the
/// post-processor with a template that adds exactly those tokens, as `transformers` does.
fn apply_bos_eos_policy(
    inner: &mut tokenizers::Tokenizer,
    config: &serde_json::Map<String, serde_json::Value>,
    bos: Option<&str>,
    eos: Option<&str>,
) -> Result<(), String> {
    let add_bos = config.get("add_bos_token").and_then(|v| v.as_bool());
    let add_eos = config.get("add_eos_token").and_then(|v| v.as_bool());
    if add_bos.is_none() && add_eos.is_none() {
        return Ok(());
    }
    let resolve = |wanted: Option<bool>, token: Option<&str>, key: &str| -> Option<(String, u32)> {
        if wanted != Some(true) {
            return None;
        }
        let Some(token) = token else {
            tracing::warn!("tokenizer_config.json sets add_{key}=true but names no {key}");
            return None;
        };
        match inner.token_to_id(token) {
            Some(id) => Some((token.to_string(), id)),
            None => {
                tracing::warn!("{key} {token:?} is not in the vocabulary; not adding it");
                None
            }
        }
    };
    let bos = resolve(add_bos, bos, "bos_token");
    let eos = resolve(add_eos, eos, "eos_token");

    let special = |token: &str, type_id: u32| serde_json::json!({ "SpecialToken": { "id": token, "type_id": type_id } });
    let sequence = |id: &str, type_id: u32| serde_json::json!({ "Sequence": { "id": id, "type_id": type_id } });
    let mut single = Vec::new();
    let mut pair = Vec::new();
    for (seq, type_id) in [("A", 0u32), ("B", 1u32)] {
        let target: &mut Vec<serde_json::Value> = if seq == "A" { &mut single } else { &mut pair };
        if let Some((token, _)) = &bos {
            target.push(special(token, type_id));
        }
        target.push(sequence(seq, type_id));
        if let Some((token, _)) = &eos {
            target.push(special(token, type_id));
        }
    }
    let pair: Vec<serde_json::Value> = single.iter().cloned().chain(pair).collect();
    let mut special_tokens = serde_json::Map::new();
    for (token, id) in bos.iter().chain(eos.iter()) {
        special_tokens.insert(
            token.clone(),
            serde_json::json!({ "id": token, "ids": [id], "tokens": [token] }),
        );
    }
    let processor = serde_json::json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": special_tokens,
    });
    let processor: PostProcessorWrapper = serde_json::from_value(processor)
        .map_err(|e| format!("cannot build the BOS/EOS post-processor: {e}"))?;
    inner.with_post_processor(Some(processor));
    Ok(())
}

/// Whether the decoder pipeline turns `<0xNN>` tokens into bytes.
fn decoder_fuses_bytes(decoder: &DecoderWrapper) -> bool {
    match decoder {
        DecoderWrapper::ByteFallback(_) => true,
        DecoderWrapper::Sequence(seq) => seq.get_decoders().iter().any(decoder_fuses_bytes),
        _ => false,
    }
}

/// The first byte of a special token's bytes in [`Tokenizer::token_bytes`]: never valid UTF-8,
/// so no generated text can spell a special token (the convention of the grammar engine).
pub const SPECIAL_TOKEN_MARKER: u8 = 0xFF;

/// Whether the decoder maps byte-level alphabet characters back to bytes (GPT-2 style BPE).
fn decoder_is_byte_level(decoder: &DecoderWrapper) -> bool {
    match decoder {
        DecoderWrapper::ByteLevel(_) => true,
        DecoderWrapper::Sequence(seq) => seq.get_decoders().iter().any(decoder_is_byte_level),
        _ => false,
    }
}

/// The byte-level alphabet's character of every byte, inverted: printable Latin-1 bytes stand
/// for themselves, the other bytes for the characters from U+0100 on, in byte order.
fn byte_level_chars() -> std::collections::HashMap<char, u8> {
    let mut next = 0x100u32;
    (0..=255u8)
        .map(|b| {
            let c = b as char;
            let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
            if printable {
                (c, b)
            } else {
                next += 1;
                (char::from_u32(next - 1).unwrap_or(c), b)
            }
        })
        .collect()
}

/// The byte of a `<0xNN>` byte-fallback token.
fn byte_fallback_value(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

// ---------------------------------------------------------------------------------------------
// Chat templates
// ---------------------------------------------------------------------------------------------

/// More variables for a chat template, by name (`chat_template_kwargs`).
pub type TemplateKwargs = serde_json::Map<String, serde_json::Value>;

/// Template variables the renderer sets itself; a caller's kwargs may not.
const RESERVED_TEMPLATE_KEYS: &[&str] =
    &["messages", "add_generation_prompt", "tools", "documents"];

/// Error carried as the source of the template error raised by `raise_exception`.
#[derive(Debug)]
struct RaisedException(String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

/// The reason [`template_error`] gives when rendering runs out of fuel ([`render_chat`] replaces
/// it with one that names the budget).
///
/// [`render_chat`]: Tokenizer::render_chat
const OUT_OF_FUEL: &str = "out of fuel";

fn template_error(err: minijinja::Error) -> TokenizerError {
    if err.kind() == ErrorKind::OutOfFuel {
        return TokenizerError::Template {
            reason: OUT_OF_FUEL.to_string(),
        };
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = source {
        if let Some(raised) = e.downcast_ref::<RaisedException>() {
            return TokenizerError::TemplateException {
                message: raised.0.clone(),
            };
        }
        source = e.source();
    }
    TokenizerError::Template {
        reason: err.to_string(),
    }
}

/// A render target that refuses to grow past `cap_bytes` (and records that it did).
struct CappedWriter {
    bytes: Vec<u8>,
    cap_bytes: usize,
    over: bool,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len().saturating_add(buf.len()) > self.cap_bytes {
            self.over = true;
            return Err(std::io::Error::other("chat template output over its cap"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Most bytes of input one token can stand for, when the pipeline proves it: a BPE model whose
/// every input character has a token (a complete byte-level alphabet, complete `<0xNN>` byte
/// fallback, or an unknown token that is not fused), a normalizer and pre-tokenizer that never
/// drop text, and a bound on how much the normalizer can shrink it. `None` for any other
/// pipeline (WordPiece, Unigram, a normalizer that strips accents or control characters, a
/// pre-tokenizer that drops whitespace): such text is counted, never judged by its length.
fn proven_bytes_per_token(
    inner: &tokenizers::Tokenizer,
    vocab: &std::collections::HashMap<String, u32>,
) -> Option<usize> {
    let ModelWrapper::BPE(bpe) = inner.get_model() else {
        return None;
    };
    let (shrink, normalizer_byte_level) = match inner.get_normalizer() {
        None => (1, false),
        Some(n) => normalizer_shrink(&serde_json::to_value(n).ok()?)?,
    };
    let pre_byte_level = match inner.get_pre_tokenizer() {
        None => false,
        Some(p) => pre_tokenizer_keeps_text(&serde_json::to_value(p).ok()?)?,
    };
    let byte_level_alphabet = || {
        tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
            .iter()
            .all(|c| vocab.contains_key(&c.to_string()))
    };
    let byte_fallback_alphabet =
        || (0..=255u8).all(|b| vocab.contains_key(&format!("<0x{b:02X}>")));
    let every_char_has_a_token = ((pre_byte_level || normalizer_byte_level)
        && byte_level_alphabet())
        || (bpe.byte_fallback && byte_fallback_alphabet())
        || (bpe.unk_token.is_some() && !bpe.fuse_unk);
    if !every_char_has_a_token {
        return None;
    }
    // An unknown character (up to 4 bytes) becomes one token.
    let longest = vocab.keys().map(String::len).max()?.max(4);
    longest.checked_mul(shrink)
}

/// How many times a normalizer can shrink text (and whether it maps bytes to the byte-level
/// alphabet); `None` when it can drop text or its effect is not known.
fn normalizer_shrink(n: &serde_json::Value) -> Option<(usize, bool)> {
    match n.get("type")?.as_str()? {
        "NFC" | "NFD" | "NFKC" | "NFKD" | "Lowercase" => Some((NORMALIZE_SHRINK, false)),
        "Prepend" => Some((1, false)),
        "ByteLevel" => Some((1, true)),
        "Replace" => {
            let pattern = n.get("pattern")?.get("String")?.as_str()?;
            let content = n.get("content")?.as_str()?;
            (!content.is_empty()).then(|| (pattern.len().div_ceil(content.len()).max(1), false))
        }
        "Sequence" => n.get("normalizers")?.as_array()?.iter().try_fold(
            (1usize, false),
            |(shrink, byte_level), n| {
                let (s, b) = normalizer_shrink(n)?;
                Some((shrink.checked_mul(s)?, byte_level || b))
            },
        ),
        _ => None,
    }
}

/// Whether a pre-tokenizer keeps every byte of its input (`Some(uses byte-level)`), or `None`
/// when it can drop some (whitespace splitters, `Removed` splits) or is not known.
fn pre_tokenizer_keeps_text(p: &serde_json::Value) -> Option<bool> {
    match p.get("type")?.as_str()? {
        "ByteLevel" => Some(true),
        "Metaspace" | "Digits" | "FixedLength" => Some(false),
        "Split" | "Punctuation" => {
            (p.get("behavior").and_then(|b| b.as_str()) != Some("Removed")).then_some(false)
        }
        "Sequence" => p
            .get("pretokenizers")?
            .as_array()?
            .iter()
            .try_fold(false, |byte_level, p| {
                Some(byte_level || pre_tokenizer_keeps_text(p)?)
            }),
        _ => None,
    }
}

/// Compiles a chat template in an environment configured like the one `transformers` uses
/// (trim_blocks, lstrip_blocks, loop controls, Python string/dict/list methods,
/// `raise_exception`, `strftime_now`, and a `tojson` that behaves like Python's `json.dumps`).
fn compile_template(source: &str) -> Result<Environment<'static>, String> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .keep_trailing_newline(false)
        .build()
        .map_err(|e| e.to_string())?;
    env.set_syntax(syntax);
    env.set_recursion_limit(TEMPLATE_RECURSION_LIMIT);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.set_unknown_method_callback(|state, value, method, args| {
        // `str.title()` capitalises after any uncased character (`bar_baz` → `Bar_Baz`);
        // the Python-compat layer splits on whitespace only.
        if let ("title", [], Some(s)) = (method, args, value.as_str()) {
            return Ok(Value::from(python_title(s)));
        }
        minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
    });
    env.add_function(
        "raise_exception",
        |message: String| -> Result<Value, minijinja::Error> {
            Err(
                minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
                    .with_source(RaisedException(message)),
            )
        },
    );
    env.add_function("strftime_now", |format: String| -> String {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        strftime_utc(&format, secs)
    });
    env.add_filter("tojson", tojson_filter);
    env.set_formatter(python_formatter);
    // Jinja2 reads `\r\n` and `\r` in templates (text and string literals) as `\n`.
    let source = source.replace("\r\n", "\n").replace('\r', "\n");
    env.add_template_owned(TEMPLATE_NAME, neutralise_generation_tags(&source))
        .map_err(|e| e.to_string())?;
    Ok(env)
}

/// Prints values the way Jinja2 on Python does: `True`, `False`, `None`, Python float `repr`,
/// and lists / dicts as their Python `repr`. Strings print as they are.
fn python_formatter(
    out: &mut minijinja::Output<'_>,
    state: &mut minijinja::State<'_, '_>,
    value: &Value,
) -> Result<(), minijinja::Error> {
    let text = match value.kind() {
        ValueKind::Bool | ValueKind::None | ValueKind::Seq | ValueKind::Map => {
            python_repr(value, 0)
        }
        ValueKind::Number if !value.is_integer() => python_repr(value, 0),
        _ => return minijinja::escape_formatter(out, state, value),
    };
    out.write_str(&text).map_err(minijinja::Error::from)
}

/// Python's `str.title()`: a cased character is upper-cased after an uncased one, lower-cased
/// otherwise.
fn python_title(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut previous_cased = false;
    for c in s.chars() {
        if previous_cased {
            out.extend(c.to_lowercase());
        } else {
            out.extend(c.to_uppercase());
        }
        previous_cased = c.is_lowercase() || c.is_uppercase();
    }
    out
}

/// Python's `repr` of a template value (strings quoted, containers recursively).
fn python_repr(value: &Value, depth: usize) -> String {
    if depth > MAX_JSON_DEPTH {
        return "...".to_string();
    }
    match value.kind() {
        ValueKind::None => "None".to_string(),
        ValueKind::Bool => if value.is_true() { "True" } else { "False" }.to_string(),
        ValueKind::Number => match f64::try_from(value.clone()) {
            Ok(f) if !value.is_integer() => {
                if f.is_nan() {
                    "nan".to_string()
                } else if f.is_infinite() {
                    if f > 0.0 { "inf" } else { "-inf" }.to_string()
                } else {
                    python_float_repr(f)
                }
            }
            _ => value.to_string(),
        },
        ValueKind::String => python_str_repr(value.as_str().unwrap_or_default()),
        ValueKind::Seq => {
            let items: Vec<String> = value
                .try_iter()
                .map(|iter| iter.map(|v| python_repr(&v, depth + 1)).collect())
                .unwrap_or_default();
            if value.is_tuple() {
                if items.len() == 1 {
                    format!("({},)", items[0])
                } else {
                    format!("({})", items.join(", "))
                }
            } else {
                format!("[{}]", items.join(", "))
            }
        }
        ValueKind::Map => {
            let items: Vec<String> = value
                .try_iter()
                .map(|iter| {
                    iter.map(|k| {
                        let v = value.get_item(&k).unwrap_or_default();
                        format!(
                            "{}: {}",
                            python_repr(&k, depth + 1),
                            python_repr(&v, depth + 1)
                        )
                    })
                    .collect()
                })
                .unwrap_or_default();
            format!("{{{}}}", items.join(", "))
        }
        _ => value.to_string(),
    }
}

/// Python's `repr` of a string: single quotes unless the text has `'` but no `"`.
fn python_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..0xa0).contains(&(c as u32)) => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            '\u{2028}' | '\u{2029}' => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// `transformers` parses `{% generation %}` … `{% endgeneration %}` (marking assistant spans
/// for training masks); for rendering they are transparent. They become `{% if true %}` …
/// `{% endif %}`, keeping their whitespace-control markers.
fn neutralise_generation_tags(source: &str) -> String {
    if !source.contains("generation") {
        return source.to_string();
    }
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else {
            break;
        };
        let tag = &rest[start..start + len + 2];
        let inner = &tag[2..tag.len() - 2];
        let (lead, body) = match inner.chars().next() {
            Some(c @ ('-' | '+')) => (Some(c), &inner[1..]),
            _ => (None, inner),
        };
        let (body, trail) = match body.chars().last() {
            Some(c @ ('-' | '+')) => (&body[..body.len() - 1], Some(c)),
            _ => (body, None),
        };
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        out.push_str(&rest[..start]);
        match replacement {
            Some(statement) => {
                out.push_str("{%");
                out.extend(lead);
                out.push(' ');
                out.push_str(statement);
                out.push(' ');
                out.extend(trail);
                out.push_str("%}");
            }
            None => out.push_str(tag),
        }
        rest = &rest[start + tag.len()..];
    }
    out.push_str(rest);
    out
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, the `tojson` that `transformers` installs.
fn tojson_filter(value: &Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;

    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => {
            if let Some(s) = v.as_str() {
                Some(s.to_string())
            } else if let Some(n) = v.as_i64() {
                Some(" ".repeat(n.max(0) as usize))
            } else {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ));
            }
        }
    };
    let (item_sep, key_sep) = match separators {
        Some(seps) if !seps.is_none() => {
            let parts: Vec<Value> = seps.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] => match (a.as_str(), b.as_str()) {
                    (Some(a), Some(b)) => (a.to_string(), b.to_string()),
                    _ => return Err(bad_separators()),
                },
                _ => return Err(bad_separators()),
            }
        }
        _ => (
            if indent.is_some() { "," } else { ", " }.to_string(),
            ": ".to_string(),
        ),
    };
    let options = JsonOptions {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    to_python_json(value, &options).map(Value::from)
}

fn bad_separators() -> minijinja::Error {
    minijinja::Error::new(
        ErrorKind::InvalidOperation,
        "tojson: separators must be a pair of strings",
    )
}

struct JsonOptions {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

const MAX_JSON_DEPTH: usize = 256;

/// `value` written by serde_json in the shape of Python's `json.dumps` (see [`PythonJson`]).
fn to_python_json(value: &Value, opts: &JsonOptions) -> Result<String, minijinja::Error> {
    let state = JsonState {
        sort_keys: opts.sort_keys,
        error: RefCell::new(None),
        non_finite: Cell::new(None),
    };
    let mut out = Vec::new();
    let formatter = PythonJson {
        opts,
        non_finite: &state.non_finite,
        depth: 0,
        has_value: false,
    };
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
    let written = serde::Serialize::serialize(
        &JsonValue {
            value,
            depth: 0,
            state: &state,
        },
        &mut serializer,
    );
    if let Err(e) = written {
        return Err(state.error.take().unwrap_or_else(|| {
            minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}"))
        }));
    }
    // Everything written is UTF-8: strings as given, escapes and numbers in ASCII.
    String::from_utf8(out)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))
}

/// What [`JsonValue`] and [`PythonJson`] share while one value is written.
struct JsonState {
    sort_keys: bool,
    /// The template error that stopped serialisation (serde's error type cannot carry it).
    error: RefCell<Option<minijinja::Error>>,
    /// A NaN or infinity being written: serde_json writes those through `write_null`, and Python
    /// writes `NaN`, `Infinity` and `-Infinity`.
    non_finite: Cell<Option<f64>>,
}

/// A template value as Python's `json` module sees it: keys made strings, tuples and iterables
/// as arrays, undefined refused.
struct JsonValue<'a> {
    value: &'a Value,
    depth: usize,
    state: &'a JsonState,
}

impl JsonValue<'_> {
    fn fail<E: serde::ser::Error>(&self, error: minijinja::Error) -> E {
        let message = error.to_string();
        *self.state.error.borrow_mut() = Some(error);
        E::custom(message)
    }

    fn child<'b>(&'b self, value: &'b Value) -> JsonValue<'b> {
        JsonValue {
            value,
            depth: self.depth + 1,
            state: self.state,
        }
    }
}

impl serde::Serialize for JsonValue<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        if self.depth > MAX_JSON_DEPTH {
            return Err(self.fail(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: value is nested too deeply",
            )));
        }
        let value = self.value;
        match value.kind() {
            ValueKind::Undefined => Err(self.fail(minijinja::Error::new(
                ErrorKind::UndefinedError,
                "tojson: value is undefined",
            ))),
            ValueKind::None => serializer.serialize_unit(),
            ValueKind::Bool => serializer.serialize_bool(value.is_true()),
            ValueKind::Number if value.is_integer() => {
                if let Ok(n) = i64::try_from(value.clone()) {
                    serializer.serialize_i64(n)
                } else if let Ok(n) = u64::try_from(value.clone()) {
                    serializer.serialize_u64(n)
                } else if let Ok(n) = i128::try_from(value.clone()) {
                    serializer.serialize_i128(n)
                } else {
                    match u128::try_from(value.clone()) {
                        Ok(n) => serializer.serialize_u128(n),
                        Err(e) => Err(self.fail(e)),
                    }
                }
            }
            ValueKind::Number => match f64::try_from(value.clone()) {
                Ok(f) => {
                    if !f.is_finite() {
                        self.state.non_finite.set(Some(f));
                    }
                    serializer.serialize_f64(f)
                }
                Err(e) => Err(self.fail(e)),
            },
            ValueKind::String => serializer.serialize_str(value.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter().map_err(|e| self.fail(e))?.collect();
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in &items {
                    seq.serialize_element(&self.child(item))?;
                }
                seq.end()
            }
            ValueKind::Map | ValueKind::Plain => {
                let mut entries: Vec<(String, Value)> = Vec::new();
                for key in value.try_iter().map_err(|e| self.fail(e))? {
                    let item = value.get_item(&key).map_err(|e| self.fail(e))?;
                    entries.push((json_key(&key).map_err(|e| self.fail(e))?, item));
                }
                if self.state.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                let mut map = serializer.serialize_map(Some(entries.len()))?;
                for (key, item) in &entries {
                    map.serialize_entry(key, &self.child(item))?;
                }
                map.end()
            }
            other => Err(self.fail(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialise a value of type {other}"),
            ))),
        }
    }
}

/// serde_json output in Python's `json.dumps` shape: the item and key separators as given
/// (`", "` and `": "` by default), an indent string repeated per level with a newline before
/// each item and before the closing bracket of a non-empty container, every character outside
/// printable ASCII escaped (UTF-16 units, lowercase hex) when `ensure_ascii`, floats as
/// Python's `repr`, and NaN / infinities as `NaN` / `Infinity` / `-Infinity`. Control
/// characters, quotes and backslashes are escaped by serde_json exactly as Python does.
struct PythonJson<'a> {
    opts: &'a JsonOptions,
    non_finite: &'a Cell<Option<f64>>,
    /// Containers open around the item being written.
    depth: usize,
    /// Whether the innermost open container has an item yet.
    has_value: bool,
}

impl PythonJson<'_> {
    fn open<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        bracket: &[u8],
    ) -> std::io::Result<()> {
        self.depth += 1;
        self.has_value = false;
        w.write_all(bracket)
    }

    fn item<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if !first {
            w.write_all(self.opts.item_sep.as_bytes())?;
        }
        self.newline(w, self.depth)
    }

    fn close<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        bracket: &[u8],
    ) -> std::io::Result<()> {
        self.depth -= 1;
        if self.has_value {
            self.newline(w, self.depth)?;
        }
        w.write_all(bracket)
    }

    fn newline<W: ?Sized + std::io::Write>(&self, w: &mut W, depth: usize) -> std::io::Result<()> {
        if let Some(indent) = &self.opts.indent {
            w.write_all(b"\n")?;
            for _ in 0..depth {
                w.write_all(indent.as_bytes())?;
            }
        }
        Ok(())
    }
}

impl serde_json::ser::Formatter for PythonJson<'_> {
    fn write_null<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        match self.non_finite.take() {
            Some(f) => w.write_all(python_float_repr(f).as_bytes()),
            None => w.write_all(b"null"),
        }
    }

    fn write_f64<W: ?Sized + std::io::Write>(&mut self, w: &mut W, f: f64) -> std::io::Result<()> {
        w.write_all(python_float_repr(f).as_bytes())
    }

    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        if !self.opts.ensure_ascii {
            return w.write_all(fragment.as_bytes());
        }
        for c in fragment.chars() {
            if (' '..='~').contains(&c) {
                w.write_all(&[c as u8])?;
            } else {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    write!(w, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }

    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.open(w, b"[")
    }

    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"]")
    }

    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.item(w, first)
    }

    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }

    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.open(w, b"{")
    }

    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"}")
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.item(w, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(self.opts.key_sep.as_bytes())
    }

    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

/// Python turns non-string keys into strings the way it writes them as values.
fn json_key(key: &Value) -> Result<String, minijinja::Error> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_string()),
        ValueKind::Number => Ok(python_number(key)),
        ValueKind::Bool => Ok(if key.is_true() { "true" } else { "false" }.to_string()),
        ValueKind::None => Ok("null".to_string()),
        other => Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: keys must be str, int, float, bool or None, not {other}"),
        )),
    }
}

/// A number as Python's `json.dumps` writes it (`repr` for floats).
fn python_number(value: &Value) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    match f64::try_from(value.clone()) {
        Ok(f) => python_float_repr(f),
        Err(_) => value.to_string(),
    }
}

fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".to_string();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    // Rust's `Debug` gives the shortest round-trip digits and switches to exponent notation
    // at the same thresholds as Python's `repr`; Python writes the exponent with a sign and at
    // least two digits.
    let s = format!("{f:?}");
    match s.split_once('e') {
        None => s,
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
    }
}

/// C `strftime` (C locale) of a UTC Unix time, covering the conversions chat templates use,
/// with chrono's calendar and conversions. A `-` flag (`%-d`) drops a number's padding, as glibc
/// does, and is ignored elsewhere; an unknown conversion is written as it stands. Years print
/// without padding (`%Y` of year 1 is `1`), as glibc does. Times outside Python's `datetime`
/// (what `strftime_now` calls in `transformers`), years 1 to 9999, are clamped into it.
fn strftime_utc(format: &str, unix_secs: i64) -> String {
    use std::fmt::Write as _;
    // Python's `datetime` range (years 1 to 9999); the clock never leaves it.
    const FIRST_SECS: i64 = -62_135_596_800; // 0001-01-01T00:00:00Z
    const LAST_SECS: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let time = chrono::DateTime::from_timestamp(unix_secs.clamp(FIRST_SECS, LAST_SECS), 0)
        .unwrap_or_default();
    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let Some(conversion) = chars.next() else {
            out.push('%');
            if no_pad {
                out.push('-');
            }
            break;
        };
        match c_conversion(conversion) {
            Some((padded, unpadded)) => {
                let spec = if no_pad { unpadded } else { padded };
                // Every spec in the table is one chrono knows, so writing cannot fail.
                let _ = write!(out, "{}", time.format(spec));
            }
            None => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(conversion);
            }
        }
    }
    out
}

/// The chrono format of a C `strftime` conversion (C locale, UTC): (as written, with the `-`
/// flag). `None` for a conversion the chat templates do not use.
fn c_conversion(conversion: char) -> Option<(&'static str, &'static str)> {
    Some(match conversion {
        'Y' => ("%-Y", "%-Y"),
        'C' => ("%C", "%-C"),
        'y' => ("%y", "%-y"),
        'm' => ("%m", "%-m"),
        'd' => ("%d", "%-d"),
        'e' => ("%e", "%-e"),
        'j' => ("%j", "%-j"),
        'H' => ("%H", "%-H"),
        'I' => ("%I", "%-I"),
        'M' => ("%M", "%-M"),
        'S' => ("%S", "%-S"),
        'u' => ("%u", "%-u"),
        'w' => ("%w", "%-w"),
        'p' => ("%p", "%p"),
        'B' => ("%B", "%B"),
        'b' | 'h' => ("%b", "%b"),
        'A' => ("%A", "%A"),
        'a' => ("%a", "%a"),
        'F' => ("%Y-%m-%d", "%Y-%m-%d"),
        'D' | 'x' => ("%m/%d/%y", "%m/%d/%y"),
        'T' | 'X' => ("%H:%M:%S", "%H:%M:%S"),
        'R' => ("%H:%M", "%H:%M"),
        'c' => ("%a %b %e %H:%M:%S %-Y", "%a %b %e %H:%M:%S %-Y"),
        'Z' => ("%Z", "%Z"),
        'z' => ("%z", "%z"),
        'n' => ("%n", "%n"),
        't' => ("%t", "%t"),
        '%' => ("%%", "%%"),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // -----------------------------------------------------------------------------------------
    // Test tokenizers
    // -----------------------------------------------------------------------------------------

    /// GPT-2's byte-to-unicode table: printable Latin-1 bytes map to themselves, the rest to
    /// U+0100 onwards in byte order.
    fn byte_chars() -> [char; 256] {
        let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~'))
            .chain(0xA1..=0xAC)
            .chain(0xAE..=0xFF)
            .collect();
        let mut chars: Vec<u32> = printable.clone();
        let mut next = 0;
        for b in 0..256u32 {
            if !printable.contains(&b) {
                printable.push(b);
                chars.push(256 + next);
                next += 1;
            }
        }
        let mut table = ['\0'; 256];
        for (b, c) in printable.iter().zip(chars) {
            table[*b as usize] = char::from_u32(c).unwrap();
        }
        table
    }

    fn bstr(bytes: &[u8]) -> String {
        let table = byte_chars();
        bytes.iter().map(|&b| table[b as usize]).collect()
    }

    fn added(id: u32, content: &str) -> serde_json::Value {
        json!({
            "id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        })
    }

    const QWEN_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    // Byte-level BPE ids: bytes 0..=255 are ids 0..=255, then the merges below, then
    // <|endoftext|> = 268, <|im_start|> = 269, <|im_end|> = 270.
    const ENDOFTEXT: u32 = 268;
    const IM_START: u32 = 269;
    const IM_END: u32 = 270;

    /// A byte-level BPE tokenizer.json. `qwen_split` selects a regex Split + ByteLevel
    /// pre-tokenizer (Qwen2 / Llama 3 style) instead of the GPT-2 ByteLevel regex.
    fn byte_level_json(qwen_split: bool, tweak: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut vocab = serde_json::Map::new();
        for b in 0..=255u8 {
            vocab.insert(bstr(&[b]), json!(b));
        }
        let merges: Vec<(String, String)> = vec![
            ("h".into(), "e".into()),
            ("l".into(), "l".into()),
            ("he".into(), "ll".into()),
            ("hell".into(), "o".into()),
            ("Ġ".into(), "w".into()),
            ("o".into(), "r".into()),
            ("Ġw".into(), "or".into()),
            ("l".into(), "d".into()),
            ("Ġwor".into(), "ld".into()),
            (bstr(&[0xE4]), bstr(&[0xB8])),
            (bstr(&[0xE4, 0xB8]), bstr(&[0xAD])),
            (bstr(&[0xF0]), bstr(&[0x9F])),
        ];
        for (i, (a, b)) in merges.iter().enumerate() {
            vocab.insert(format!("{a}{b}"), json!(256 + i));
        }
        let merges: Vec<String> = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
        let pre_tokenizer = if qwen_split {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN_SPLIT}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
            ]})
        } else {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
        };
        let mut doc = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [added(ENDOFTEXT, "<|endoftext|>"), added(IM_START, "<|im_start|>"), added(IM_END, "<|im_end|>")],
            "normalizer": if qwen_split { json!({"type": "NFC"}) } else { json!(null) },
            "pre_tokenizer": pre_tokenizer,
            "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": false, "vocab": vocab, "merges": merges
            },
            "an_unknown_key": {"is": "ignored"}
        });
        tweak(&mut doc);
        doc.to_string()
    }

    fn byte_level(config: Option<serde_json::Value>) -> Tokenizer {
        let config = config.map(|c| c.to_string());
        Tokenizer::from_bytes(
            byte_level_json(false, |_| {}).as_bytes(),
            config.as_deref().map(str::as_bytes),
            None,
        )
        .unwrap()
    }

    // Sentencepiece-style ids: <unk> 0, <s> 1, </s> 2, <0x00>..<0xFF> = 3..=258, then pieces.
    const BOS: u32 = 1;
    const EOS: u32 = 2;
    const SP_SPACE: u32 = 259;
    const SP_HELLO: u32 = 271;
    const SP_WORLD: u32 = 276;
    const SP_ZHONG: u32 = 277;

    fn sp_byte(b: u8) -> u32 {
        3 + u32::from(b)
    }

    #[derive(Clone, Copy)]
    enum SpDecoder {
        /// Llama / Mistral: Replace(▁→space), ByteFallback, Fuse, Strip(1 leading space).
        Llama,
        /// A plain Metaspace decoder.
        Metaspace,
    }

    fn sp_json(decoder: SpDecoder) -> String {
        let mut vocab = serde_json::Map::new();
        vocab.insert("<unk>".into(), json!(0));
        vocab.insert("<s>".into(), json!(BOS));
        vocab.insert("</s>".into(), json!(EOS));
        for b in 0..=255u8 {
            vocab.insert(format!("<0x{b:02X}>"), json!(sp_byte(b)));
        }
        let pieces = [
            "▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "el", "lo", "▁hel", "▁hello", "▁w", "or",
            "▁wor", "ld", "▁world", "中",
        ];
        for (i, p) in pieces.iter().enumerate() {
            vocab.insert((*p).into(), json!(SP_SPACE as usize + i));
        }
        let merges = [
            "▁ h",
            "e l",
            "l o",
            "▁h el",
            "▁hel lo",
            "▁ w",
            "o r",
            "▁w or",
            "l d",
            "▁wor ld",
        ];
        let decoder = match decoder {
            SpDecoder::Llama => json!({"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}
            ]}),
            SpDecoder::Metaspace => {
                json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false})
            }
        };
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [added(0, "<unk>"), added(BOS, "<s>"), added(EOS, "</s>")],
            "normalizer": null,
            "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [
                    {"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}
                ],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS], "tokens": ["<s>"]}}
            },
            "decoder": decoder,
            "model": {
                "type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                "ignore_merges": false, "vocab": vocab, "merges": merges
            }
        })
        .to_string()
    }

    fn sp(decoder: SpDecoder, config: Option<serde_json::Value>) -> Tokenizer {
        let config = config.map(|c| c.to_string());
        Tokenizer::from_bytes(
            sp_json(decoder).as_bytes(),
            config.as_deref().map(str::as_bytes),
            None,
        )
        .unwrap()
    }

    fn with_template(template: &str) -> Tokenizer {
        let config = json!({
            "bos_token": "<|endoftext|>",
            "eos_token": {"content": "<|im_end|>", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true},
            "chat_template": template,
            "model_max_length": 32768
        });
        byte_level(Some(config))
    }

    fn msgs(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
        pairs
            .iter()
            .map(|(r, c)| ChatMessage::new(*r, *c))
            .collect()
    }

    fn render(template: &str, messages: &[(&str, &str)], add_generation_prompt: bool) -> String {
        with_template(template)
            .apply_chat_template(&msgs(messages), add_generation_prompt)
            .unwrap()
    }

    /// Small deterministic generator (xorshift64*).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    const SAMPLE_TEXTS: [&str; 8] = [
        "hello world",
        "Hello, World! It's 12345 o'clock.",
        "中中文 and 😀 emoji 👩‍💻!",
        "naïve café — über",
        "tab\tnew\nline\r\n  spaced   out  ",
        "日本語のテキスト、한국어 텍스트",
        "",
        "<|im_start|>user\nhi<|im_end|>",
    ];

    // -----------------------------------------------------------------------------------------
    // Encoding and decoding
    // -----------------------------------------------------------------------------------------

    #[test]
    fn byte_level_encodes_with_merges_and_round_trips() {
        let tok = byte_level(None);
        assert_eq!(tok.encode("hello world", false).unwrap(), vec![259, 264]);
        assert_eq!(tok.encode("中中", false).unwrap(), vec![266, 266]);
        assert_eq!(tok.encode("😀", false).unwrap(), vec![267, 0x98, 0x80]);
        assert_eq!(
            tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap(),
            vec![IM_START, 117, 115, 101, 114, 10, 104, 105, IM_END]
        );
        for text in SAMPLE_TEXTS {
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(tok.decode(&ids, false).unwrap(), text, "{ids:?}");
        }
        let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
        assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi");
        assert_eq!(tok.vocab_size(), 271);
        assert_eq!(tok.token_to_id("Ġworld"), Some(264));
        assert_eq!(tok.id_to_token(IM_END).as_deref(), Some("<|im_end|>"));
        assert_eq!(tok.id_to_token(100_000), None);
    }

    #[test]
    fn regex_split_pre_tokenizer_works() {
        let tok =
            Tokenizer::from_bytes(byte_level_json(true, |_| {}).as_bytes(), None, None).unwrap();
        assert_eq!(tok.encode("hello world", false).unwrap(), vec![259, 264]);
        // "I'm" splits into "I" + "'m"; digits split in groups of three.
        let ids = tok.encode("I'm 12345", false).unwrap();
        let pieces: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
        assert_eq!(pieces, ["I", "'", "m", "Ġ", "1", "2", "3", "4", "5"]);
        for text in SAMPLE_TEXTS {
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(tok.decode(&ids, false).unwrap(), text);
        }
    }

    #[test]
    fn byte_level_post_processor_adds_nothing() {
        let tok = byte_level(None);
        for text in SAMPLE_TEXTS {
            assert_eq!(
                tok.encode(text, true).unwrap(),
                tok.encode(text, false).unwrap()
            );
        }
        assert_eq!(tok.bos_token(), None);
        assert_eq!(tok.eos_token(), None);
    }

    #[test]
    fn sentencepiece_bos_from_post_processor() {
        for decoder in [SpDecoder::Llama, SpDecoder::Metaspace] {
            let tok = sp(decoder, None);
            assert_eq!(
                tok.encode("hello world", true).unwrap(),
                vec![BOS, SP_HELLO, SP_WORLD]
            );
            assert_eq!(
                tok.encode("hello world", false).unwrap(),
                vec![SP_HELLO, SP_WORLD]
            );
            assert_eq!(
                tok.decode(&[BOS, SP_HELLO, SP_WORLD], false).unwrap(),
                "<s> hello world"
            );
            assert_eq!(
                tok.decode(&[BOS, SP_HELLO, SP_WORLD], true).unwrap(),
                "hello world"
            );
            assert_eq!(
                tok.decode(&[SP_HELLO, SP_WORLD, EOS], false).unwrap(),
                "hello world</s>"
            );
        }
    }

    #[test]
    fn sentencepiece_byte_fallback_round_trips() {
        let tok = sp(SpDecoder::Llama, None);
        // 文 is not in the vocabulary: U+6587 = E6 96 87 through byte-fallback tokens.
        assert_eq!(
            tok.encode("中文", false).unwrap(),
            vec![
                SP_SPACE,
                SP_ZHONG,
                sp_byte(0xE6),
                sp_byte(0x96),
                sp_byte(0x87)
            ]
        );
        for text in [
            "hello world",
            "中文 hello 😀",
            "über café",
            "hello  world",
            "x",
        ] {
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(tok.decode(&ids, false).unwrap(), text, "{ids:?}");
        }
    }

    #[test]
    fn config_add_bos_eos_replaces_post_processor() {
        let tok = byte_level(Some(json!({
            "add_bos_token": true,
            "add_eos_token": true,
            "bos_token": "<|endoftext|>",
            "eos_token": {"content": "<|im_end|>", "special": true}
        })));
        assert_eq!(
            tok.encode("hello world", true).unwrap(),
            vec![ENDOFTEXT, 259, 264, IM_END]
        );
        assert_eq!(tok.encode("hello world", false).unwrap(), vec![259, 264]);
        assert_eq!(tok.bos_token(), Some("<|endoftext|>"));
        assert_eq!(tok.eos_token(), Some("<|im_end|>"));

        let tok = sp(
            SpDecoder::Llama,
            Some(json!({"add_bos_token": false, "bos_token": "<s>", "eos_token": "</s>"})),
        );
        assert_eq!(
            tok.encode("hello world", true).unwrap(),
            vec![SP_HELLO, SP_WORLD]
        );

        // Without the keys the tokenizer.json post-processor stays.
        let tok = sp(
            SpDecoder::Llama,
            Some(json!({"bos_token": "<s>", "eos_token": "</s>"})),
        );
        assert_eq!(
            tok.encode("hello world", true).unwrap(),
            vec![BOS, SP_HELLO, SP_WORLD]
        );
    }

    #[test]
    fn stored_truncation_and_padding_are_ignored() {
        let json = byte_level_json(false, |doc| {
            doc["truncation"] = json!({"direction": "Right", "max_length": 1, "strategy": "LongestFirst", "stride": 0});
            doc["padding"] = json!({
                "strategy": {"Fixed": 8}, "direction": "Right", "pad_to_multiple_of": null,
                "pad_id": ENDOFTEXT, "pad_type_id": 0, "pad_token": "<|endoftext|>"
            });
        });
        let tok = Tokenizer::from_bytes(json.as_bytes(), None, None).unwrap();
        assert_eq!(tok.encode("hello world", true).unwrap(), vec![259, 264]);
    }

    #[test]
    fn unknown_ids_are_errors() {
        let tok = byte_level(None);
        let err = tok.decode(&[259, 271], false).unwrap_err();
        assert!(
            matches!(
                err,
                TokenizerError::UnknownTokenId {
                    id: 271,
                    vocab_size: 271
                }
            ),
            "{err}"
        );
        assert!(tok.decode(&[u32::MAX], true).is_err());
        let mut dec = tok.decoder();
        assert_eq!(dec.push(259).unwrap(), "hello");
        assert!(matches!(
            dec.push(5000),
            Err(TokenizerError::UnknownTokenId { id: 5000, .. })
        ));
        // The failed push left no trace.
        assert_eq!(dec.push(264).unwrap(), " world");
        assert_eq!(dec.finish().unwrap(), "");
    }

    // -----------------------------------------------------------------------------------------
    // Incremental decoding
    // -----------------------------------------------------------------------------------------

    /// Streams `ids`, checks the concatenation equals the full decode, returns the chunks.
    fn stream(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
        let mut dec = tok.decoder();
        let mut chunks: Vec<String> = ids.iter().map(|&id| dec.push(id).unwrap()).collect();
        chunks.push(dec.finish().unwrap());
        let expected = tok.decode(ids, false).unwrap();
        assert_eq!(chunks.concat(), expected, "ids {ids:?}, chunks {chunks:?}");
        chunks
    }

    fn all_tokenizers() -> Vec<(&'static str, Tokenizer)> {
        vec![
            ("byte-level", byte_level(None)),
            ("sentencepiece/llama", sp(SpDecoder::Llama, None)),
            ("sentencepiece/metaspace", sp(SpDecoder::Metaspace, None)),
        ]
    }

    #[test]
    fn incremental_matches_full_decode_on_random_ids() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for (name, tok) in all_tokenizers() {
            let n = tok.vocab_size();
            for round in 0..400 {
                let len = rng.below(40);
                let ids: Vec<u32> = (0..len)
                    .map(|_| {
                        // Bias towards byte tokens so that characters get split often.
                        if round % 2 == 0 && rng.below(3) > 0 {
                            let b = 0x80 + rng.below(0x80) as u8;
                            if name == "byte-level" {
                                u32::from(b)
                            } else {
                                sp_byte(b)
                            }
                        } else {
                            rng.below(n) as u32
                        }
                    })
                    .collect();
                stream(&tok, &ids);
            }
        }
    }

    #[test]
    fn incremental_never_emits_partial_characters() {
        let mut rng = Rng(42);
        let byte_tok = byte_level(None);
        let sp_tok = sp(SpDecoder::Llama, None);
        for text in SAMPLE_TEXTS.iter().chain(["中😀é", "👩‍💻文"].iter()) {
            // Every byte its own token: each multi-byte character is split across tokens.
            let byte_ids: Vec<u32> = text.bytes().map(u32::from).collect();
            // Text as encoded, and as a random mix of merged and byte tokens.
            let encoded = byte_tok.encode(text, false).unwrap();
            let mut mixed = Vec::new();
            for &id in &encoded {
                if rng.below(2) == 0 {
                    mixed.push(id);
                } else {
                    let piece = byte_tok.decode(&[id], false).unwrap();
                    if piece.contains(char::REPLACEMENT_CHARACTER) || id >= ENDOFTEXT {
                        mixed.push(id);
                    } else {
                        mixed.extend(piece.bytes().map(u32::from));
                    }
                }
            }
            let sp_bytes: Vec<u32> = text.bytes().map(sp_byte).collect();
            let sp_encoded = sp_tok.encode(text, false).unwrap();
            for (tok, ids) in [
                (&byte_tok, &byte_ids),
                (&byte_tok, &encoded),
                (&byte_tok, &mixed),
                (&sp_tok, &sp_bytes),
                (&sp_tok, &sp_encoded),
            ] {
                let chunks = stream(tok, ids);
                for chunk in &chunks {
                    assert!(
                        !chunk.contains(char::REPLACEMENT_CHARACTER),
                        "partial character in {chunk:?} for {text:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn incremental_emits_as_soon_as_a_character_completes() {
        let tok = byte_level(None);
        let mut dec = tok.decoder();
        // 中 = E4 B8 AD, 😀 = F0 9F 98 80
        assert_eq!(dec.push(259).unwrap(), "hello");
        assert_eq!(dec.push(0xE4).unwrap(), "");
        assert_eq!(dec.push(0xB8).unwrap(), "");
        assert_eq!(dec.push(0xAD).unwrap(), "中");
        assert_eq!(dec.push(267).unwrap(), "");
        assert_eq!(dec.push(0x98).unwrap(), "");
        assert_eq!(dec.push(0x80).unwrap(), "😀");
        assert_eq!(dec.push(264).unwrap(), " world");
        assert_eq!(dec.push(IM_END).unwrap(), "<|im_end|>");
        // A dangling lead byte is flushed as U+FFFD at the end, like a full decode.
        assert_eq!(dec.push(0xE4).unwrap(), "");
        assert_eq!(dec.finish().unwrap(), "\u{FFFD}");
        assert_eq!(dec.finish().unwrap(), "");
    }

    #[test]
    fn incremental_sentencepiece_spacing_and_byte_groups() {
        let tok = sp(SpDecoder::Llama, None);
        let mut dec = tok.decoder();
        assert_eq!(dec.push(BOS).unwrap(), "<s>");
        assert_eq!(dec.push(SP_HELLO).unwrap(), " hello");
        assert_eq!(dec.push(SP_WORLD).unwrap(), " world");
        // Byte tokens are held until a non-byte token follows, since a later byte could turn
        // the whole group into replacement characters.
        assert_eq!(dec.push(sp_byte(0xE6)).unwrap(), "");
        assert_eq!(dec.push(sp_byte(0x96)).unwrap(), "");
        assert_eq!(dec.push(sp_byte(0x87)).unwrap(), "");
        assert_eq!(dec.push(SP_HELLO).unwrap(), "文 hello");
        assert_eq!(dec.push(sp_byte(0x87)).unwrap(), "");
        assert_eq!(dec.finish().unwrap(), "\u{FFFD}");

        // First token of the stream: its leading space is stripped, as in a full decode.
        let mut dec = tok.decoder();
        assert_eq!(dec.push(SP_HELLO).unwrap(), "hello");
        assert_eq!(dec.push(SP_HELLO).unwrap(), " hello");

        // A valid group followed by a stray byte: the full decode turns the whole group into
        // replacement characters, and so must the stream.
        let ids = [
            sp_byte(0xE4),
            sp_byte(0xB8),
            sp_byte(0xAD),
            sp_byte(0xE4),
            SP_HELLO,
        ];
        let chunks = stream(&tok, &ids);
        assert_eq!(chunks.concat(), "\u{FFFD}\u{FFFD}\u{FFFD}\u{FFFD} hello");
    }

    // -----------------------------------------------------------------------------------------
    // Chat templates
    // -----------------------------------------------------------------------------------------

    const CHATML: &str = r#"{%- set ns = namespace(last_user=-1) %}
{%- for m in messages[::-1] %}
    {%- if ns.last_user == -1 and m.role == 'user' %}
        {%- set ns.last_user = messages|length - 1 - loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- if messages[0].role != 'system' %}
    {{- '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message.role) }}
    {%- endif %}
    {%- set content = message.content.strip() %}
    {%- if message.role == 'assistant' and content.startswith('<think>') %}
        {%- set content = content.split('</think>')[-1].lstrip() %}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\n' + content }}
    {%- if loop.index0 == ns.last_user %}{{- ' (last)' }}{%- endif %}
    {{- '<|im_end|>' }}
    {%- if not loop.last %}{{- '\n' }}{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '\n<|im_start|>assistant\n' }}
{%- endif %}
"#;

    /// A template in the shape of gpt-oss's harmony template (our own text): a system header
    /// built by a macro with the current date and a reasoning level that is not defined by the
    /// caller, developer instructions from a system message, channels on assistant turns,
    /// tools as JSON, namespace state carried across the loop. The expected text is what
    /// transformers' own renderer (`chat_template_utils._compile_jinja_template`) gives.
    const HARMONY_SHAPED: &str = r##"{%- macro header(effort) -%}
    {{- "<|start|>system<|message|>You are a model.\n" -}}
    {{- "Current date: " + strftime_now("%Y-%m-%d") + "\n\n" -}}
    {{- "Reasoning: " + effort + "\n\n" -}}
    {{- "# Valid channels: analysis, commentary, final.<|end|>" -}}
{%- endmacro -%}
{%- if reasoning_effort is not defined %}{%- set reasoning_effort = "medium" %}{%- endif %}
{{- header(reasoning_effort) }}
{%- set ns = namespace(developer=none, seen=0) %}
{%- for m in messages %}
    {%- if m.role == "system" %}{%- set ns.developer = m.content %}{%- endif %}
{%- endfor %}
{%- if ns.developer is not none or tools %}
    {{- "<|start|>developer<|message|># Instructions\n\n" + ns.developer|trim }}
    {%- if tools %}{{- "\n\n# Tools\n" + tools|tojson(indent=2) }}{%- endif %}
    {{- "<|end|>" }}
{%- endif %}
{%- for m in messages if m.role != "system" %}
    {%- set ns.seen = ns.seen + 1 %}
    {%- if m.role == "assistant" %}
        {%- if "thinking" in m and m.thinking %}
            {{- "<|start|>assistant<|channel|>analysis<|message|>" + m.thinking + "<|end|>" }}
        {%- endif %}
        {{- "<|start|>assistant<|channel|>final<|message|>" + m.content + ("<|return|>" if loop.last else "<|end|>") }}
    {%- else %}
        {{- "<|start|>" + m.role + "<|message|>" + m.content + "<|end|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- "<|start|>assistant" }}{%- endif %}
"##;

    #[test]
    fn a_harmony_shaped_template_renders_as_transformers_would() {
        let today = || {
            let secs = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            strftime_utc("%Y-%m-%d", secs)
        };
        let before = today();
        let out = render(
            HARMONY_SHAPED,
            &[
                ("system", "  Answer briefly. "),
                ("user", "Hi"),
                ("assistant", "Hello."),
                ("user", "2+2?"),
            ],
            true,
        );
        let after = today();
        let want = |date: &str| {
            format!(
                "<|start|>system<|message|>You are a model.\nCurrent date: {date}\n\n\
                 Reasoning: medium\n\n# Valid channels: analysis, commentary, final.<|end|>\
                 <|start|>developer<|message|># Instructions\n\nAnswer briefly.<|end|>\
                 <|start|>user<|message|>Hi<|end|>\
                 <|start|>assistant<|channel|>final<|message|>Hello.<|end|>\
                 <|start|>user<|message|>2+2?<|end|><|start|>assistant"
            )
        };
        assert!(out == want(&before) || out == want(&after), "{out}");
    }

    #[test]
    fn chat_template_kwargs_are_template_variables_and_cannot_replace_the_request() {
        let template = "{%- for m in messages %}{{ m.content }}{% endfor %}\
            {%- if enable_thinking is defined and not enable_thinking %}/no_think{% endif %}\
            {{- ' ' + eos_token }}";
        let tok = with_template(template);
        let msgs = msgs(&[("user", "hi")]);
        let mut kwargs = TemplateKwargs::new();
        assert_eq!(
            tok.apply_chat_template_with(&msgs, true, &kwargs).unwrap(),
            "hi <|im_end|>"
        );
        kwargs.insert("enable_thinking".into(), json!(false));
        assert_eq!(
            tok.apply_chat_template_with(&msgs, true, &kwargs).unwrap(),
            "hi/no_think <|im_end|>"
        );
        // A caller's variable shadows a special token, as in transformers.
        kwargs.insert("eos_token".into(), json!("<end>"));
        assert_eq!(
            tok.apply_chat_template_with(&msgs, true, &kwargs).unwrap(),
            "hi/no_think <end>"
        );
        for key in ["messages", "add_generation_prompt", "tools", "documents"] {
            let mut bad = TemplateKwargs::new();
            bad.insert(key.into(), json!(1));
            let e = tok
                .apply_chat_template_with(&msgs, true, &bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains(key) && e.contains("chat_template_kwargs"), "{e}");
        }
    }

    #[test]
    fn chatml_template_with_python_isms() {
        let conversation = [
            ("user", "  Hello  "),
            ("assistant", "<think>plan</think>\n  Hi there "),
            ("user", "What is 2+2?\n"),
        ];
        let body = "<|im_start|>system\nYou are helpful.<|im_end|>\n\
                    <|im_start|>user\nHello<|im_end|>\n\
                    <|im_start|>assistant\nHi there<|im_end|>\n\
                    <|im_start|>user\nWhat is 2+2? (last)<|im_end|>";
        assert_eq!(render(CHATML, &conversation, false), body);
        assert_eq!(
            render(CHATML, &conversation, true),
            format!("{body}\n<|im_start|>assistant\n")
        );
        assert_eq!(
            render(CHATML, &[("system", " Be terse. "), ("user", "x")], true),
            "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nx (last)<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_becomes_an_error_with_its_message() {
        let tok = with_template(CHATML);
        let err = tok
            .apply_chat_template(&msgs(&[("user", "a"), ("tool", "b")]), true)
            .unwrap_err();
        match err {
            TokenizerError::TemplateException { message } => {
                assert_eq!(message, "Unknown role: tool")
            }
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn encode_chat_renders_then_encodes_without_special_tokens() {
        let tok = Tokenizer::from_bytes(
            byte_level_json(false, |_| {}).as_bytes(),
            Some(
                json!({"add_bos_token": true, "bos_token": "<|endoftext|>", "chat_template": CHATML})
                    .to_string()
                    .as_bytes(),
            ),
            None,
        )
        .unwrap();
        let messages = msgs(&[("system", "s"), ("user", "hi")]);
        let text = tok.apply_chat_template(&messages, true).unwrap();
        let ids = tok.encode_chat(&messages, true).unwrap();
        assert_eq!(ids, tok.encode(&text, false).unwrap());
        assert_eq!(ids[0], IM_START);
        assert_eq!(tok.encode(&text, true).unwrap()[0], ENDOFTEXT);
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }

    #[test]
    fn trim_and_lstrip_blocks_as_in_transformers() {
        let template = "{% for message in messages %}\n    {% if message.role == 'user' %}\n[U] {{ message.content }}\n    {% else %}\n[A] {{ message.content }}\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\n[A]\n{% endif %}\n";
        let conversation = [("user", "hi"), ("assistant", "yo")];
        assert_eq!(
            render(template, &conversation, true),
            "[U] hi\n[A] yo\n[A]\n"
        );
        assert_eq!(render(template, &conversation, false), "[U] hi\n[A] yo\n");
    }

    #[test]
    fn template_context_has_special_tokens_and_none_tools() {
        let template = "{{ bos_token }}|{{ eos_token }}|{{ tools is none }}|{{ documents is none }}|{{ unk_token is defined }}|{{ messages|length }}|{{ add_generation_prompt }}";
        assert_eq!(
            render(template, &[("user", "a")], true),
            "<|endoftext|>|<|im_end|>|True|True|False|1|True"
        );
    }

    #[test]
    fn python_methods_filters_and_printing() {
        let template = concat!(
            "{{ 'a,b,c'.split(',')|join('-') }}",
            "|{% for k, v in {'x': 1, 'y': 2}.items() %}{{ k }}={{ v }};{% endfor %}",
            "|{{ {'x': 1}.get('z', 'dflt') }}",
            "|{{ 'abc'.upper() }}",
            "|{{ messages[1:]|length }}",
            "|{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}",
            "|{{ messages[0].content is string }}",
            "|{{ None is none and True }}",
            "|{{ '  pad '.rstrip() }}.",
            "|{{ 'Hello'.endswith('lo') }}",
            "|{{ messages[-1].role }}",
            "|{{ (messages|map(attribute='role')|list)[::-1]|join(',') }}",
            "|{{ messages|selectattr('role', 'equalto', 'user')|list|length }}",
            "|{{ ['a', \"it's\", none, 2.5, {'k': false}] }}",
            "|{{ 0.1 + 0.2 }}",
            "|{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{{ loop.index }}{{ loop.previtem.role[0] }}{% endfor %}",
        );
        let conversation = [("user", "u1"), ("assistant", "a1"), ("user", "u2")];
        assert_eq!(
            render(template, &conversation, false),
            "a-b-c|x=1;y=2;|dflt|ABC|2|01|True|True|  pad.|True|user|user,assistant,user|2\
             |['a', \"it's\", None, 2.5, {'k': False}]|0.30000000000000004|2u3a"
        );
    }

    #[test]
    fn crlf_templates_and_str_title_follow_python() {
        assert_eq!(render("A\r\nB{{ 'x\r\ny' }}\rC", &[], false), "A\nBx\ny\nC");
        assert_eq!(
            render("{{ 'hello wORLD-foo bar_baz 3rd'.title() }}", &[], false),
            "Hello World-Foo Bar_Baz 3Rd"
        );
    }

    #[test]
    fn tojson_behaves_like_python_json_dumps() {
        let value = "{'b': 1, 'a': [1.5, 'x\"y', none, true]}";
        let cases = [
            (
                format!("{{{{ {value}|tojson }}}}"),
                r#"{"b": 1, "a": [1.5, "x\"y", null, true]}"#.to_string(),
            ),
            (
                format!("{{{{ {value}|tojson(indent=2) }}}}"),
                "{\n  \"b\": 1,\n  \"a\": [\n    1.5,\n    \"x\\\"y\",\n    null,\n    true\n  ]\n}"
                    .to_string(),
            ),
            (
                format!("{{{{ {value}|tojson(separators=(',', ':'), sort_keys=true) }}}}"),
                r#"{"a":[1.5,"x\"y",null,true],"b":1}"#.to_string(),
            ),
            (
                "{{ {'e': [], 'f': {}}|tojson(indent=2) }}".to_string(),
                "{\n  \"e\": [],\n  \"f\": {}\n}".to_string(),
            ),
            (
                "{{ messages[0]|tojson }}".to_string(),
                r#"{"role": "user", "content": "é😀<b>\u0001"}"#.to_string(),
            ),
            (
                "{{ messages[0].content|tojson(ensure_ascii=true) }}".to_string(),
                r#""\u00e9\ud83d\ude00<b>\u0001""#.to_string(),
            ),
        ];
        for (template, expected) in cases {
            assert_eq!(
                render(&template, &[("user", "é😀<b>\u{1}")], false),
                expected,
                "{template}"
            );
        }

        // Keys, numbers, escapes, indents and separators as Python writes them.
        let more = [
            (
                "{{ {1: 'a', 2.5: 'b', none: 'd'}|tojson }}",
                r#"{"1": "a", "2.5": "b", "null": "d"}"#,
            ),
            (
                "{{ [1e400, -1e400, 2.0, 1e16, 1e-7, -0.0, 12345678901234567890, -12345678901234567890]|tojson }}",
                "[Infinity, -Infinity, 2.0, 1e+16, 1e-07, -0.0, 12345678901234567890, -12345678901234567890]",
            ),
            ("{{ [(1e400 - 1e400), none]|tojson }}", "[NaN, null]"),
            ("{{ (0.1 + 0.2)|tojson }}", "0.30000000000000004"),
            (
                "{{ {'a': [1, {'b': []}]}|tojson(indent='\t') }}",
                "{\n\t\"a\": [\n\t\t1,\n\t\t{\n\t\t\t\"b\": []\n\t\t}\n\t]\n}",
            ),
            (
                "{{ {'b': 1, 'a': {'d': 1, 'c': 2}}|tojson(indent=1, sort_keys=true) }}",
                "{\n \"a\": {\n  \"c\": 2,\n  \"d\": 1\n },\n \"b\": 1\n}",
            ),
            (
                "{{ {'a': [1, 2]}|tojson(indent=2, separators=(';', '=')) }}",
                "{\n  \"a\"=[\n    1;\n    2\n  ]\n}",
            ),
            ("{{ [1,[2]]|tojson(indent=-1) }}", "[\n1,\n[\n2\n]\n]"),
            ("{{ 3|tojson(indent=-1) }}", "3"),
            ("{{ []|tojson }}{{ {}|tojson }}{{ [[]]|tojson(indent=0) }}", "[]{}[\n[]\n]"),
            (
                "{{ 'x\u{7f}\u{8}\u{c}\n\t\u{1f}é'|tojson(ensure_ascii=true) }}",
                r#""x\u007f\b\f\n\t\u001f\u00e9""#,
            ),
            (
                "{{ 'x\u{7f}\u{8}\u{c}\n\t\u{1f}é/'|tojson }}",
                "\"x\u{7f}\\b\\f\\n\\t\\u001fé/\"",
            ),
            ("{{ {'é': 1}|tojson(ensure_ascii=true) }}", r#"{"\u00e9": 1}"#),
            ("{{ (1, 2)|tojson }}{{ range(3)|tojson }}", "[1, 2][0, 1, 2]"),
            ("{{ {'a': 1}.items()|tojson }}", r#"[["a", 1]]"#),
            ("{{ 'abc'|list|tojson }}", r#"["a", "b", "c"]"#),
            ("{{ namespace(a=1)|tojson }}", r#"{"a": 1}"#),
        ];
        for (template, expected) in more {
            assert_eq!(render(template, &[], false), expected, "{template}");
        }
        for (template, expected) in [
            ("{{ undefined_thing|tojson }}", "undefined value: tojson: value is undefined"),
            ("{{ [undefined_thing]|tojson }}", "undefined value: tojson: value is undefined"),
            (
                "{{ {(1,2): 1}|tojson }}",
                "tojson: keys must be str, int, float, bool or None, not sequence",
            ),
            ("{{ [1]|tojson(indent=1.5) }}", "tojson: indent must be an integer or a string"),
            ("{{ [1]|tojson(separators=[',']) }}", "tojson: separators must be a pair of strings"),
            (
                "{% set ns = namespace(v=[]) %}{% for _ in range(300) %}{% set ns.v = [ns.v] %}{% endfor %}{{ ns.v|tojson }}",
                "tojson: value is nested too deeply",
            ),
        ] {
            let err = with_template(template)
                .apply_chat_template(&[], false)
                .expect_err(template)
                .to_string();
            assert!(err.contains(expected), "{template}: {err}");
        }
    }

    #[test]
    fn python_float_repr_matches_python() {
        for (f, expected) in [
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1.5e300, "1.5e+300"),
            (-2.5e-7, "-2.5e-07"),
            (123_456_789_012_345_680.0, "1.2345678901234568e+17"),
            (1.0, "1.0"),
            (0.1, "0.1"),
            (f64::INFINITY, "Infinity"),
        ] {
            assert_eq!(python_float_repr(f), expected);
        }
    }

    #[test]
    fn strftime_formats_like_c_strftime() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(
            strftime_utc("%Y-%m-%d %H:%M:%S %a %A %b %B %j %-d|%e|%I %p %y %% %F %T %D %u %w", t),
            "2024-02-29 13:05:09 Thu Thursday Feb February 060 29|29|01 PM 24 % 2024-02-29 13:05:09 02/29/24 4 4"
        );
        assert_eq!(strftime_utc("%c", t), "Thu Feb 29 13:05:09 2024");
        assert_eq!(strftime_utc("%F %a %j", -86_400), "1969-12-31 Wed 365");
        assert_eq!(strftime_utc("%F %a %j", 951_782_400), "2000-02-29 Tue 060");
        assert_eq!(strftime_utc("%d %b %Y %q %", 0), "01 Jan 1970 %q %");
        // Every conversion, padded and with the `-` flag, at midnight, in the morning and at
        // the ends of the years Python's datetime holds.
        let all = "%C|%h|%x|%X|%R|%Z|%z|%n|%t|%M|%S";
        let unpadded = "%-m|%-H|%-I|%-j|%-e|%-y|%-C|%-p|%-Y|%-%|%-M|%-S|%-d";
        let unknown = "%-q|%E|%k|%l|%P|%s|%U|%G|%r|%f";
        let cases: [(i64, &str, &str); 14] = [
            (
                0,
                all,
                "19|Jan|01/01/70|00:00:00|00:00|UTC|+0000|\n|\t|00|00",
            ),
            (0, unpadded, "1|0|12|1|1|70|19|AM|1970|%|0|0|1"),
            (0, "%I %p %u %w %a", "12 AM 4 4 Thu"),
            (t, unpadded, "2|13|1|60|29|24|20|PM|2024|%|5|9|29"),
            (
                1_699_953_200,
                all,
                "20|Nov|11/14/23|09:13:20|09:13|UTC|+0000|\n|\t|13|20",
            ),
            (
                1_699_953_200,
                unpadded,
                "11|9|9|318|14|23|20|AM|2023|%|13|20|14",
            ),
            (1_699_953_200, "%I %p %u %w %a", "09 AM 2 2 Tue"),
            (
                1_735_689_599,
                "%Y %C %y %F %D %c %j",
                "2024 20 24 2024-12-31 12/31/24 Tue Dec 31 23:59:59 2024 366",
            ),
            (
                -62_135_596_800,
                "%Y %C %y %F %D %c %j",
                "1 00 01 0001-01-01 01/01/01 Mon Jan  1 00:00:00 1 001",
            ),
            (-62_135_596_800, unpadded, "1|0|12|1|1|1|0|AM|1|%|0|0|1"),
            (
                -30_000_000_000,
                "%Y %C %y %F %D %c %j %u",
                "1019 10 19 1019-05-04 05/04/19 Tue May  4 18:40:00 1019 124 2",
            ),
            (
                253_402_300_799,
                "%Y %C %y %F %D %c %j",
                "9999 99 99 9999-12-31 12/31/99 Fri Dec 31 23:59:59 9999 365",
            ),
            (1_735_689_599, unknown, unknown),
            (0, "%-|%", "%-|%"),
        ];
        for (secs, format, expected) in cases {
            assert_eq!(strftime_utc(format, secs), expected, "{format} at {secs}");
        }
        // Outside Python's years, the nearest time it holds.
        assert_eq!(
            strftime_utc("%F %T", -70_000_000_000),
            "0001-01-01 00:00:00"
        );
        assert_eq!(strftime_utc("%F %T", i64::MAX), "9999-12-31 23:59:59");
        let rendered = render("{{ strftime_now('%Y') }}", &[], false);
        assert_eq!(rendered.len(), 4);
        assert!(rendered.chars().all(|c| c.is_ascii_digit()), "{rendered}");
    }

    #[test]
    fn generation_tags_are_transparent() {
        assert_eq!(
            render("A{% generation %}B{% endgeneration %}C", &[], false),
            "ABC"
        );
        assert_eq!(
            render(
                "A {%- generation -%} B {%- endgeneration %}C{{ 'generation' }}",
                &[],
                false
            ),
            "ABCgeneration"
        );
    }

    #[test]
    fn template_sources_and_precedence() {
        let json = byte_level_json(false, |_| {});
        let list_config = json!({"chat_template": [
            {"name": "tool_use", "template": "T"},
            {"name": "default", "template": "D{{ messages|length }}"}
        ]})
        .to_string();
        let tok =
            Tokenizer::from_bytes(json.as_bytes(), Some(list_config.as_bytes()), None).unwrap();
        assert_eq!(
            tok.apply_chat_template(&msgs(&[("user", "a")]), false)
                .unwrap(),
            "D1"
        );

        let tok = Tokenizer::from_bytes(
            json.as_bytes(),
            Some(list_config.as_bytes()),
            Some("J{{ add_generation_prompt }}"),
        )
        .unwrap();
        assert_eq!(tok.apply_chat_template(&[], true).unwrap(), "JTrue");

        let no_default =
            json!({"chat_template": [{"name": "tool_use", "template": "T"}]}).to_string();
        let tok =
            Tokenizer::from_bytes(json.as_bytes(), Some(no_default.as_bytes()), None).unwrap();
        assert!(tok.has_chat_template());
        assert!(matches!(
            tok.apply_chat_template(&[], false),
            Err(TokenizerError::Template { .. })
        ));
    }

    #[test]
    fn missing_template_is_no_chat_template() {
        let tok = byte_level(Some(
            json!({"eos_token": "<|im_end|>", "chat_template": null}),
        ));
        assert!(!tok.has_chat_template());
        assert!(matches!(
            tok.apply_chat_template(&msgs(&[("user", "a")]), true),
            Err(TokenizerError::NoChatTemplate)
        ));
        assert!(matches!(
            tok.encode_chat(&msgs(&[("user", "a")]), true),
            Err(TokenizerError::NoChatTemplate)
        ));
    }

    #[test]
    fn broken_template_loads_but_errors_on_use() {
        let tok = with_template("{% for %}");
        assert!(tok.has_chat_template());
        assert!(matches!(
            tok.apply_chat_template(&[], false),
            Err(TokenizerError::Template { .. })
        ));
        // Attribute access on an undefined value fails at render time, as in Jinja2.
        let tok = with_template("{{ messages[0].nope.deeper }}");
        assert!(matches!(
            tok.apply_chat_template(&msgs(&[("user", "a")]), false),
            Err(TokenizerError::Template { .. })
        ));
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let json = byte_level_json(false, |_| {});
        for garbage in [
            &b"{not json"[..],
            b"",
            b"[]",
            b"null",
            &[0xFF, 0xFE, 0x00],
            br#"{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}}"#,
        ] {
            match Tokenizer::from_bytes(garbage, None, None) {
                Err(TokenizerError::Load { path, .. }) => assert_eq!(path, "tokenizer.json"),
                other => panic!("expected a load error, got {other:?}"),
            }
        }
        for garbage in [&b"[1, 2"[..], b"[]", b"\"x\"", &[0xC3]] {
            match Tokenizer::from_bytes(json.as_bytes(), Some(garbage), None) {
                Err(TokenizerError::Load { path, .. }) => {
                    assert_eq!(path, "tokenizer_config.json")
                }
                other => panic!("expected a load error, got {other:?}"),
            }
        }
        // A post-processor that refers to a second sequence for single inputs.
        let bad_template = sp_json(SpDecoder::Llama).replace(
            r#""single":[{"SpecialToken":{"id":"<s>","type_id":0}},{"Sequence":{"id":"A","type_id":0}}]"#,
            r#""single":[{"Sequence":{"id":"B","type_id":0}}]"#,
        );
        assert_ne!(bad_template, sp_json(SpDecoder::Llama));
        let tok = Tokenizer::from_bytes(bad_template.as_bytes(), None, None).unwrap();
        assert!(matches!(
            tok.encode("hello", true),
            Err(TokenizerError::Encode(_))
        ));
        // Absurd ids in the vocabulary are refused instead of sizing tables by them.
        let huge = byte_level_json(false, |doc| {
            doc["model"]["vocab"]["<|huge|>"] = json!(u32::MAX - 1);
        });
        assert!(matches!(
            Tokenizer::from_bytes(huge.as_bytes(), None, None),
            Err(TokenizerError::Load { .. })
        ));
    }

    #[test]
    fn from_dir_reads_files_and_names_them_in_errors() {
        let dir = std::env::temp_dir().join(format!("tokenizer-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = Tokenizer::from_dir(&dir).unwrap_err();
        match &missing {
            TokenizerError::Load { path, .. } => {
                assert!(path.ends_with("tokenizer.json"), "{path}")
            }
            other => panic!("unexpected {other:?}"),
        }
        std::fs::write(dir.join("tokenizer.json"), byte_level_json(false, |_| {})).unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            json!({"eos_token": "<|im_end|>", "chat_template": "config"}).to_string(),
        )
        .unwrap();
        let tok = Tokenizer::from_dir(&dir).unwrap();
        assert_eq!(tok.apply_chat_template(&[], false).unwrap(), "config");
        assert_eq!(tok.eos_token(), Some("<|im_end|>"));

        std::fs::write(dir.join("chat_template.jinja"), "file {{ eos_token }}\n").unwrap();
        let tok = Tokenizer::from_dir(&dir).unwrap();
        assert_eq!(
            tok.apply_chat_template(&[], false).unwrap(),
            "file <|im_end|>"
        );

        std::fs::write(dir.join("tokenizer_config.json"), "{oops").unwrap();
        match Tokenizer::from_dir(&dir).unwrap_err() {
            TokenizerError::Load { path, .. } => {
                assert!(path.ends_with("tokenizer_config.json"), "{path}")
            }
            other => panic!("unexpected {other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tokenizer_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
    }

    // -----------------------------------------------------------------------------------------
    // Bounded encoding and rendering
    // -----------------------------------------------------------------------------------------

    /// The demo model's tokenizer (Qwen2 style: NFC, regex split, byte-level BPE).
    fn demo() -> Tokenizer {
        Tokenizer::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("demo")).unwrap()
    }

    /// Mistral style: no pre-tokenizer, a normalizer that prepends `▁` and replaces spaces,
    /// byte fallback.
    fn sp_normalized() -> Tokenizer {
        let mut doc: serde_json::Value = serde_json::from_str(&sp_json(SpDecoder::Llama)).unwrap();
        doc["pre_tokenizer"] = json!(null);
        doc["normalizer"] = json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
        ]});
        Tokenizer::from_bytes(doc.to_string().as_bytes(), None, None).unwrap()
    }

    fn bounded_tokenizers() -> Vec<(&'static str, Tokenizer)> {
        let gpt2 = byte_level(None);
        let qwen =
            Tokenizer::from_bytes(byte_level_json(true, |_| {}).as_bytes(), None, None).unwrap();
        vec![
            ("demo", demo()),
            ("byte-level/gpt2", gpt2),
            ("byte-level/qwen", qwen),
            ("sentencepiece/llama", sp(SpDecoder::Llama, None)),
            ("sentencepiece/normalizer", sp_normalized()),
        ]
    }

    const FRAGMENTS: [&str; 24] = [
        "hello",
        "world",
        "Hello",
        " ",
        "  ",
        "   ",
        "\n",
        "\n\n",
        "\t",
        " \n ",
        "中文",
        "日本語",
        "😀",
        "naïve",
        "café",
        ",",
        ". ",
        "'s",
        "123",
        "<|im_start|>",
        "<|im_end|>",
        "<s>",
        "aaaaaaaaaaaaaaaaaaaa",
        "=====",
    ];

    /// Random text from [`FRAGMENTS`] and random characters, about `bytes` long.
    fn random_text(rng: &mut Rng, bytes: usize) -> String {
        let mut text = String::new();
        while text.len() < bytes {
            match rng.below(10) {
                0 => text.push(char::from_u32(0x20 + rng.below(0x3000) as u32).unwrap_or('?')),
                1 => text.push(' '),
                _ => text.push_str(FRAGMENTS[rng.below(FRAGMENTS.len())]),
            }
        }
        text
    }

    /// Runs `f` on a thread with a 2 MiB stack (as tokio's blocking threads have) and fails if
    /// it takes longer than `limit`.
    fn within<T: Send + 'static>(
        limit: std::time::Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let _ = tx.send(f());
            })
            .unwrap();
        rx.recv_timeout(limit)
            .unwrap_or_else(|e| panic!("not done within {limit:?}: {e}"))
    }

    #[test]
    fn byte_bound_only_for_pipelines_that_keep_every_byte() {
        // The demo: longest entry 14 bytes, NFC may shrink text up to 4 times.
        assert_eq!(demo().bytes_per_token, Some(14 * NORMALIZE_SHRINK));
        for (name, tok) in bounded_tokenizers() {
            assert!(tok.bytes_per_token.is_some(), "{name}");
        }
        let tweaked = |f: &dyn Fn(&mut serde_json::Value)| {
            let json = byte_level_json(true, |d| f(d));
            Tokenizer::from_bytes(json.as_bytes(), None, None)
                .unwrap()
                .bytes_per_token
        };
        assert!(tweaked(&|_| {}).is_some());
        // Text that a pipeline can drop is never judged by its length.
        assert_eq!(
            tweaked(&|d| d["normalizer"] = json!({"type": "StripAccents"})),
            None
        );
        assert_eq!(
            tweaked(&|d| d["normalizer"] =
                json!({"type": "Replace", "pattern": {"String": " "}, "content": ""})),
            None
        );
        assert_eq!(
            tweaked(&|d| d["pre_tokenizer"] = json!({"type": "Whitespace"})),
            None
        );
        assert_eq!(
            tweaked(&|d| d["pre_tokenizer"]["pretokenizers"][0]["behavior"] = json!("Removed")),
            None
        );
        // Without the byte-level pre-tokenizer, characters outside the vocabulary are dropped.
        assert_eq!(
            tweaked(&|d| d["pre_tokenizer"] = json!({"type": "Digits", "individual_digits": false})),
            None
        );
        // A fused unknown token can stand for any length of text.
        let mut doc: serde_json::Value = serde_json::from_str(&sp_json(SpDecoder::Llama)).unwrap();
        doc["model"]["byte_fallback"] = json!(false);
        let fused = Tokenizer::from_bytes(doc.to_string().as_bytes(), None, None).unwrap();
        assert_eq!(fused.bytes_per_token, None);
        // A normalizer that replaces 3 bytes by 1 triples the bound.
        let replaced = tweaked(&|d| {
            d["normalizer"] =
                json!({"type": "Replace", "pattern": {"String": "abc"}, "content": "x"})
        });
        assert_eq!(
            replaced,
            tweaked(&|d| d["normalizer"] = json!(null)).map(|b| b * 3)
        );
    }

    /// The count of text cut into pieces lies within the cuts' slack of the whole text's count,
    /// so a refusal from pieces is never wrong (random text, fixed cases, many cuts per text).
    #[test]
    fn piece_counts_agree_with_the_whole_within_the_slack() {
        let mut rng = Rng(0x51A0_C0DE_0000_0001);
        for (name, tok) in bounded_tokenizers() {
            for case in 0..150 {
                let bytes = 1 + rng.below(2000);
                let text = random_text(&mut rng, bytes);
                let piece_bytes = 4 + rng.below(300);
                let add_special = case % 2 == 0;
                let special = if add_special {
                    tok.special_token_count()
                } else {
                    0
                };
                let (count, slack) = tok
                    .count_in_pieces(&text, special, piece_bytes, None)
                    .unwrap();
                let whole = tok.encode(&text, add_special).unwrap().len();
                assert!(
                    count.abs_diff(whole) <= slack,
                    "{name} case {case}: pieces of {piece_bytes} bytes count {count}, the whole \
                     {whole}, slack {slack}: {text:?}"
                );
            }
        }
    }

    #[test]
    fn pieces_are_never_cut_inside_an_added_token() {
        let tok = demo();
        let text = "<|im_start|>".repeat(1000);
        let mut start = 0;
        while start < text.len() {
            let (end, _) = tok.cut(&text, start, (start + 100).min(text.len()));
            assert!(end > start);
            assert_eq!(end % "<|im_start|>".len(), 0, "cut at {end}");
            start = end;
            if text.len() - start <= 100 {
                break;
            }
        }
    }

    #[test]
    fn accepted_text_encodes_exactly_as_before() {
        let mut rng = Rng(0xACCE_9750_0000_0002);
        for (name, tok) in bounded_tokenizers() {
            for case in 0..12 {
                // Short texts and texts over one piece (counted first, then encoded whole).
                let bytes = if case % 3 == 0 {
                    70_000 + rng.below(60_000)
                } else {
                    rng.below(3000)
                };
                let text = random_text(&mut rng, bytes);
                let add_special = case % 2 == 0;
                let expected = tok.encode(&text, add_special).unwrap();
                assert_eq!(
                    tok.encode_within(&text, add_special, expected.len())
                        .unwrap(),
                    expected,
                    "{name} case {case}"
                );
                assert_eq!(
                    tok.encode_within(&text, add_special, usize::MAX / 2)
                        .unwrap(),
                    expected,
                    "{name} case {case}"
                );
                if !expected.is_empty() {
                    match tok.encode_within(&text, add_special, expected.len() - 1) {
                        Err(TokenizerError::TooLong {
                            at_least_tokens,
                            max_tokens,
                        }) => {
                            assert!(at_least_tokens > max_tokens, "{name} case {case}");
                            assert!(at_least_tokens <= expected.len(), "{name} case {case}");
                        }
                        other => panic!("{name} case {case}: {other:?}"),
                    }
                }
            }
        }
    }

    /// A prompt far over the limit is refused after work proportional to the limit: from its
    /// length where the pipeline bounds a token's bytes, else after the first pieces.
    #[test]
    fn long_text_is_refused_after_bounded_work() {
        let mut rng = Rng(0x1009_0000_0000_0003);
        let text = random_text(&mut rng, 8 << 20);
        for (name, mut tok) in bounded_tokenizers() {
            for proven in [true, false] {
                if !proven {
                    tok.bytes_per_token = None;
                }
                let t0 = std::time::Instant::now();
                match tok.encode_within(&text, true, 4095) {
                    Err(TokenizerError::TooLong {
                        at_least_tokens,
                        max_tokens: 4095,
                    }) => {
                        assert!(at_least_tokens > 4095, "{name}");
                        if let Some(per_token) = tok.bytes_per_token {
                            // Refused from the length alone.
                            let special = tok.special_token_count();
                            assert_eq!(at_least_tokens, text.len().div_ceil(per_token) + special);
                        } else {
                            // The whole text is millions of tokens; a few pieces are under 100k.
                            assert!(
                                at_least_tokens < 250_000,
                                "{name} counted {at_least_tokens} tokens"
                            );
                        }
                    }
                    other => panic!("{name}: {other:?}"),
                }
                let took = t0.elapsed();
                assert!(
                    took.as_secs_f64() < 2.0,
                    "{name} (proven bound: {proven}) took {took:?}"
                );
            }
        }
        let err = demo()
            .encode_within(&text, true, 4095)
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least"), "{err}");
    }

    #[test]
    fn chat_output_is_capped_by_the_token_limit() {
        let tok = demo();
        let long = "word ".repeat(1 << 20);
        let messages = vec![ChatMessage::new("user", long.as_str())];
        match tok.encode_chat_within(&messages, true, 4095) {
            Err(TokenizerError::TooLong {
                at_least_tokens,
                max_tokens: 4095,
            }) => assert!(at_least_tokens > 4095),
            other => panic!("{other:?}"),
        }
        // A template that repeats a short message is stopped by the cap as soon as its output
        // cannot fit, long before it ends (240 MB).
        let flood = with_template(
            "{% for i in range(100000) %}{% for j in range(100) %}{{ messages[0]['content'] }}{% endfor %}{% endfor %}",
        );
        let refused = within(std::time::Duration::from_secs(10), move || {
            flood.encode_chat_within(&msgs(&[("user", "hello world, hello world")]), true, 100)
        });
        match refused {
            Err(TokenizerError::TooLong {
                at_least_tokens: 101,
                max_tokens: 100,
            }) => {}
            other => panic!("{other:?}"),
        }
        // What fits renders and encodes as the unbounded calls do.
        let messages = msgs(&[("system", "be terse"), ("user", "hello world")]);
        assert_eq!(
            tok.encode_chat_within(&messages, true, 4095).unwrap(),
            tok.encode_chat(&messages, true).unwrap()
        );
    }

    /// Templates that loop without end, build data without bound or recurse without end fail
    /// quickly with an error that names the chat template.
    #[test]
    fn runaway_templates_fail_quickly_naming_the_chat_template() {
        let limit = std::time::Duration::from_secs(10);
        let templates = [
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            "{% set s = namespace(v='abcdefgh') %}{% for i in range(64) %}{% set s.v = s.v ~ s.v %}{% endfor %}{{ s.v|length }}",
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "{% for m in messages recursive %}{{ loop([m]) }}{% endfor %}",
        ];
        for template in templates {
            let t0 = std::time::Instant::now();
            let err = within(limit, move || {
                with_template(template)
                    .apply_chat_template(&msgs(&[("user", "hi")]), true)
                    .unwrap_err()
            });
            let took = t0.elapsed();
            let text = err.to_string();
            assert!(text.contains("chat template"), "{template}: {text}");
            assert!(took.as_secs_f64() < 5.0, "{template} took {took:?}");
        }
        let err = with_template(templates[0])
            .apply_chat_template(&msgs(&[("user", "hi")]), true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("budget") && err.contains("steps"), "{err}");
    }

    /// Long conversations with the demo's and a Python-flavoured template stay well inside the
    /// rendering budget, and render exactly as without one.
    #[test]
    fn normal_templates_render_unchanged_within_the_budget() {
        let tok = demo();
        let messages: Vec<ChatMessage> = (0..2000)
            .map(|i| {
                ChatMessage::new(
                    ["user", "assistant"][i % 2],
                    format!("message {i} ").repeat(20),
                )
            })
            .collect();
        let text = tok.apply_chat_template(&messages, true).unwrap();
        let mut expected = String::new();
        for m in &messages {
            expected.push_str(&format!(
                "<|im_start|>{}\n{}<|im_end|>\n",
                m.role, m.content
            ));
        }
        expected.push_str("<|im_start|>assistant\n");
        assert_eq!(text, expected);
        assert_eq!(
            render(CHATML, &[("system", "s"), ("user", "Hi")], true),
            "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nHi (last)<|im_end|>\n<|im_start|>assistant\n"
        );
        let long: Vec<(&str, &str)> = (0..2000)
            .map(|i| {
                if i % 2 == 0 {
                    ("user", "Hello there, how are you?")
                } else {
                    ("assistant", "Fine.")
                }
            })
            .collect();
        assert!(render(CHATML, &long, true).ends_with("<|im_start|>assistant\n"));
    }

    #[test]
    fn byte_level_chars_invert_the_byte_level_alphabet() {
        let chars = byte_level_chars();
        assert_eq!(chars.len(), 256);
        let alphabet = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet();
        assert!(chars.keys().all(|c| alphabet.contains(c)));
        // Every byte appears once; the space byte is the alphabet's `Ġ`.
        let mut bytes: Vec<u8> = chars.values().copied().collect();
        bytes.sort_unstable();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
        assert_eq!(chars[&'Ġ'], b' ');
        assert_eq!(chars[&'Ċ'], b'\n');
    }
}
