//! The OpenAI wire format: request bodies of `/v1/chat/completions` and `/v1/completions`, their
//! translation into the scheduler's [`RequestParams`], and the response and stream-chunk bodies.
//!
//! Invariants: no field is dropped silently. A field is honoured (tools and `response_format`
//! through [`super::tools`]), or it is one OpenAI documents as metadata (`user`, `metadata`,
//! `store`, ...: they do not change the output) and ignored, or the request is a 400 naming it:
//! fields we know but cannot honour (`audio`, `echo`, `suffix`, image parts, `best_of` > 1,
//! ...) and fields we do not know; `n` choices are `n` sequences of one prompt (choice `i`
//! seeded `seed + i`); `usage.completion_tokens` counts the stop token (summed over the
//! choices); `finish_reason` is `stop`, `length`, or for chat `tool_calls`.

use moe_runtime::batch::{RequestParams, TokenLogprob, Usage, MAX_TOP_LOGPROBS};
use moe_runtime::{ChatMessage, FinishReason, GenerateParams};
use serde::Deserialize;
use serde_json::{json, Value};

/// Most choices (`n`) one request may ask for: each is a sequence of its own in the batch.
pub const MAX_CHOICES: i64 = 16;

/// Stop strings one request may give: more than OpenAI's 4 (clients of other servers send
/// more), few enough that matching them stays cheap per token.
const MAX_STOP_STRINGS: usize = 64;

use super::errors::ApiError;

/// One string or several.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// Sampling and length fields shared by both endpoints.
#[derive(Deserialize, Debug, Default)]
pub struct Sampling {
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<OneOrMany>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// Token id (as a string, as OpenAI sends it) to a bias added to its logit.
    pub logit_bias: Option<std::collections::BTreeMap<String, f32>>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Keep generating past end-of-sequence tokens (vLLM's extension; benchmarks use it).
    pub ignore_eos: Option<bool>,
}

#[derive(Deserialize, Debug, Default)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Deserialize, Debug)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    /// More chat-template variables (`enable_thinking`, ...), as vLLM and SGLang take them.
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    /// Functions the model may call (checked by [`super::tools::Tools::from_request`]).
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<Value>,
    /// The legacy form of `tools` and `tool_choice`.
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    /// `text`, `json_object` or `json_schema`: the reply's form, enforced by a grammar.
    pub response_format: Option<Value>,
    #[serde(flatten)]
    pub sampling: Sampling,
    /// Every other field (checked by [`CHAT_FIELDS`]).
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

#[derive(Deserialize, Debug)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    /// Every other field of the message (checked in [`ChatRequest::chat_messages`]).
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

/// Message fields handed to the chat template as they are (a template that does not use one
/// ignores it): the participant's `name`, a tool result's `tool_call_id`, an assistant turn's
/// `tool_calls` (legacy: `function_call`) and `reasoning_content`.
const MESSAGE_TEMPLATE_FIELDS: &[&str] = &[
    "name",
    "tool_call_id",
    "tool_calls",
    "function_call",
    "reasoning_content",
];

#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize, Debug)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Deserialize, Debug)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptSpec,
    /// Legacy: how many alternatives to report per token (0..=5 in OpenAI's API).
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
    /// `text`, `json_object` or `json_schema`: the completion's form, enforced by a grammar.
    pub response_format: Option<Value>,
    #[serde(flatten)]
    pub sampling: Sampling,
    /// Every other field (checked by [`CHAT_FIELDS`]).
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

/// Fields OpenAI documents as metadata or routing hints: they do not change what the model
/// generates, so they are accepted and ignored.
const METADATA_FIELDS: &[&str] = &[
    "user",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
];

/// Fields of OpenAI's request schemas this server does not honour, with why: a request that
/// gives one (with anything but its neutral value) is refused naming it.
const UNSUPPORTED_FIELDS: &[(&str, &str)] = &[
    ("audio", "audio output is not supported"),
    ("modalities", "only text output is supported (`[\"text\"]`)"),
    ("prediction", "predicted outputs are not supported"),
    ("web_search_options", "web search is not supported"),
    ("reasoning_effort", "reasoning effort is not supported"),
    ("verbosity", "verbosity is not supported"),
    (
        "continue_final_message",
        "continuing the final assistant message is not supported",
    ),
];

/// How a route treats the request fields that no struct field took.
pub struct FieldPolicy {
    /// Fields that do not change the output: accepted and ignored.
    pub metadata: &'static [&'static str],
    /// Fields the route knows but does not honour, with why.
    pub unsupported: &'static [(&'static str, &'static str)],
    /// Values of such fields that change nothing (`tools: []`, a text format): accepted.
    pub neutral: fn(&str, &Value) -> bool,
}

impl FieldPolicy {
    /// Metadata, null and neutral values pass; anything else is a 400 naming the field.
    pub fn check(&self, other: &serde_json::Map<String, Value>) -> Result<(), ApiError> {
        for (key, value) in other {
            if self.metadata.contains(&key.as_str())
                || value.is_null()
                || (self.neutral)(key, value)
            {
                continue;
            }
            let message = match self.unsupported.iter().find(|(k, _)| k == key) {
                Some((_, why)) => format!("`{key}` is not supported: {why}"),
                None => format!(
                    "unknown field `{key}`: this server does not know it, so it cannot honour \
                     it (leave it out)"
                ),
            };
            return Err(ApiError::bad_request(message).param(key));
        }
        Ok(())
    }
}

/// The chat and completions routes' policy.
pub const CHAT_FIELDS: FieldPolicy = FieldPolicy {
    metadata: METADATA_FIELDS,
    unsupported: UNSUPPORTED_FIELDS,
    neutral: chat_neutral,
};

/// A neutral value of an unsupported chat field: text-only `modalities`.
fn chat_neutral(key: &str, value: &Value) -> bool {
    match key {
        "modalities" => value
            .as_array()
            .is_some_and(|m| m.iter().all(|x| x.as_str() == Some("text"))),
        _ => false,
    }
}

/// A completion prompt: text or token ids, one of them (lists of one are accepted).
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum PromptSpec {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

impl ChatRequest {
    pub fn chat_messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::bad_request("`messages` must not be empty").param("messages"));
        }
        for (i, m) in self.messages.iter().enumerate() {
            for (key, value) in &m.other {
                let empty = value.is_null() || value.as_array().is_some_and(Vec::is_empty);
                if MESSAGE_TEMPLATE_FIELDS.contains(&key.as_str()) || empty {
                    continue;
                }
                let why = match key.as_str() {
                    "audio" => "audio is not supported",
                    _ => "this server does not know it (leave it out)",
                };
                return Err(ApiError::bad_request(format!(
                    "`messages[{i}].{key}` is not supported: {why}"
                ))
                .param("messages"));
            }
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut s = String::new();
                        for p in parts {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) => s.push_str(t),
                                (kind, _) => {
                                    return Err(ApiError::bad_request(format!(
                                    "content parts of type `{kind}` are not supported (text only)"
                                ))
                                    .param("messages"))
                                }
                            }
                        }
                        s
                    }
                };
                // The legacy `function` role is a tool result named by `name`.
                let role = if m.role == "function" {
                    "tool"
                } else {
                    m.role.as_str()
                };
                super::tools::with_tool_fields(
                    ChatMessage::new(role, content),
                    &m.other,
                    &format!("messages[{i}]"),
                )
            })
            .collect()
    }

    /// The request's tools (`None` when it offers none).
    pub fn tools(&self) -> Result<Option<super::tools::Tools>, ApiError> {
        super::tools::Tools::from_request(&super::tools::ToolFields {
            tools: self.tools.as_ref(),
            functions: self.functions.as_ref(),
            tool_choice: self.tool_choice.as_ref(),
            function_call: self.function_call.as_ref(),
            parallel_tool_calls: self.parallel_tool_calls.as_ref(),
        })
    }

    pub fn params(&self) -> Result<RequestParams, ApiError> {
        CHAT_FIELDS.check(&self.other)?;
        let top = match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (false, Some(n)) if n > 0 => {
                return Err(
                    ApiError::bad_request("`top_logprobs` needs `logprobs: true`")
                        .param("top_logprobs"),
                )
            }
            (false, _) => None,
            (true, n) => Some(count("top_logprobs", n.unwrap_or(0), MAX_TOP_LOGPROBS)?),
        };
        let max = self
            .sampling
            .max_completion_tokens
            .or(self.sampling.max_tokens);
        let mut params = self.sampling.params(max, top)?;
        params.generate.grammar = super::tools::response_format(self.response_format.as_ref())?;
        Ok(params)
    }
}

impl CompletionRequest {
    pub fn params(&self) -> Result<RequestParams, ApiError> {
        CHAT_FIELDS.check(&self.other)?;
        if self.echo == Some(true) {
            return Err(ApiError::bad_request("`echo` is not supported").param("echo"));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::bad_request("`suffix` is not supported").param("suffix"));
        }
        if self.best_of.is_some_and(|b| b != 1) {
            return Err(ApiError::bad_request("only `best_of` = 1 is supported").param("best_of"));
        }
        let top = match self.logprobs {
            None => None,
            Some(n) => Some(count("logprobs", n, MAX_TOP_LOGPROBS)?),
        };
        // OpenAI's legacy default for completions is 16 new tokens.
        let max = self
            .sampling
            .max_tokens
            .or(self.sampling.max_completion_tokens)
            .or(Some(16));
        let mut params = self.sampling.params(max, top)?;
        params.generate.grammar = super::tools::response_format(self.response_format.as_ref())?;
        Ok(params)
    }
}

fn count(field: &str, v: i64, max: usize) -> Result<usize, ApiError> {
    if v < 0 || v as u64 > max as u64 {
        return Err(ApiError::bad_request(format!(
            "`{field}` must be between 0 and {max}, got {v}"
        ))
        .param(field));
    }
    Ok(v as usize)
}

impl Sampling {
    pub fn stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// The scheduler's parameters for these settings and at most `max` new tokens (no
    /// logprobs): the Responses route's.
    pub fn request_params(&self, max: Option<i64>) -> Result<RequestParams, ApiError> {
        self.params(max, None)
    }

    /// Choices asked for (`n`, checked by `params`).
    pub fn choices(&self) -> usize {
        self.n.map_or(1, |n| n.clamp(1, MAX_CHOICES) as usize)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }

    fn params(&self, max: Option<i64>, logprobs: Option<usize>) -> Result<RequestParams, ApiError> {
        if let Some(n) = self.n.filter(|n| !(1..=MAX_CHOICES).contains(n)) {
            return Err(ApiError::bad_request(format!(
                "`n` must be between 1 and {MAX_CHOICES}, got {n}"
            ))
            .param("n"));
        }
        let max_tokens = match max {
            Some(m) if m < 1 => {
                return Err(ApiError::bad_request(format!(
                    "`max_tokens` must be at least 1, got {m}"
                ))
                .param("max_tokens"))
            }
            Some(m) => Some(m as usize),
            None => None,
        };
        let top_k = match self.top_k {
            // -1 and 0 mean "off" in vLLM and llama.cpp.
            Some(k) if k <= 0 => Some(0),
            Some(k) => Some(k as usize),
            None => None,
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(OneOrMany::One(s)) => vec![s.clone()],
            Some(OneOrMany::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP_STRINGS {
            return Err(ApiError::bad_request(format!(
                "at most {MAX_STOP_STRINGS} `stop` strings"
            ))
            .param("stop"));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::bad_request("`stop` strings must not be empty").param("stop"));
        }
        let mut logit_bias = Vec::new();
        for (k, &b) in self.logit_bias.iter().flatten() {
            let tok: u32 = k.trim().parse().map_err(|_| {
                ApiError::bad_request(format!("`logit_bias` keys are token ids, got {k:?}"))
                    .param("logit_bias")
            })?;
            logit_bias.push((tok, b));
        }
        Ok(RequestParams {
            generate: GenerateParams {
                logit_bias,
                max_tokens,
                temperature: self.temperature,
                top_p: self.top_p,
                top_k,
                min_p: self.min_p,
                seed: self.seed.map(|s| s as u64),
                ignore_eos: self.ignore_eos.unwrap_or(false),
                stop,
                presence_penalty: self.presence_penalty.unwrap_or(0.0),
                frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
                ..Default::default()
            },
            logprobs,
        })
    }
}

/// OpenAI's finish reasons (a drain that cut a request short reports `length`).
pub fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Cancelled => "length",
    }
}

pub fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

fn lp_entry(t: &TokenLogprob) -> Value {
    json!({"token": t.text, "logprob": t.logprob, "bytes": t.text.as_bytes()})
}

/// One token's entry of a chat `logprobs.content` list.
pub fn chat_logprob(own: &TokenLogprob, top: &[TokenLogprob]) -> Value {
    let mut v = lp_entry(own);
    v["top_logprobs"] = top.iter().map(lp_entry).collect();
    v
}

/// Legacy completion logprobs of several tokens.
#[derive(Default)]
pub struct LegacyLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<f32>,
    top: Vec<Value>,
    offsets: Vec<usize>,
}

impl LegacyLogprobs {
    pub fn push(&mut self, own: &TokenLogprob, top: &[TokenLogprob], offset: usize) {
        self.tokens.push(own.text.clone());
        self.token_logprobs.push(own.logprob);
        let mut m = serde_json::Map::new();
        for t in top {
            m.insert(t.text.clone(), json!(t.logprob));
        }
        self.top.push(Value::Object(m));
        self.offsets.push(offset);
    }

    pub fn json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top,
            "text_offset": self.offsets,
        })
    }
}

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";

/// Splits a thinking model's answer into its reasoning (`reasoning_content`) and its reply
/// (`content`), as vLLM's and llama.cpp's reasoning parsers do: the reasoning is what comes
/// before `</think>` (a leading `<think>` dropped), the reply what follows (leading whitespace
/// dropped). Text arrives in pieces (stream deltas) and a tag may be cut between them: the few
/// bytes that could start one are held back until the next piece or [`ThinkSplit::finish`].
#[derive(Debug)]
pub struct ThinkSplit {
    mode: ThinkMode,
    pending: String,
}

#[derive(Debug, PartialEq)]
enum ThinkMode {
    /// Nothing decided yet: the answer may open with `<think>`.
    Start,
    Reasoning,
    /// The reply; `trim` while its leading whitespace is still being dropped.
    Content {
        trim: bool,
    },
}

impl ThinkSplit {
    /// `reasoning`: the prompt already opened the think block (the template ends the
    /// generation prompt with `<think>`).
    pub fn new(reasoning: bool) -> ThinkSplit {
        ThinkSplit {
            mode: if reasoning {
                ThinkMode::Reasoning
            } else {
                ThinkMode::Start
            },
            pending: String::new(),
        }
    }

    /// The next piece of the answer: `(reasoning, content)` ready to go out.
    pub fn push(&mut self, text: &str) -> (String, String) {
        self.pending.push_str(text);
        self.drain(false)
    }

    /// Whatever is held back, at the end of the answer.
    pub fn finish(&mut self) -> (String, String) {
        self.drain(true)
    }

    fn drain(&mut self, end: bool) -> (String, String) {
        let (mut reasoning, mut content) = (String::new(), String::new());
        loop {
            match self.mode {
                ThinkMode::Start => {
                    let t = self.pending.trim_start();
                    if let Some(rest) = t.strip_prefix(THINK_OPEN) {
                        self.pending = rest.to_string();
                        self.mode = ThinkMode::Reasoning;
                    } else if !end && THINK_OPEN.starts_with(t) {
                        return (reasoning, content);
                    } else {
                        self.mode = ThinkMode::Content { trim: false };
                    }
                }
                ThinkMode::Reasoning => match self.pending.find(THINK_CLOSE) {
                    Some(at) => {
                        reasoning.push_str(&self.pending[..at]);
                        self.pending = self.pending[at + THINK_CLOSE.len()..].to_string();
                        self.mode = ThinkMode::Content { trim: true };
                    }
                    None => {
                        let keep = if end { 0 } else { held_back(&self.pending) };
                        let cut = self.pending.len() - keep;
                        reasoning.push_str(&self.pending[..cut]);
                        self.pending.drain(..cut);
                        return (reasoning, content);
                    }
                },
                ThinkMode::Content { trim } => {
                    let text = std::mem::take(&mut self.pending);
                    let text = if trim { text.trim_start() } else { &text[..] };
                    if !text.is_empty() {
                        self.mode = ThinkMode::Content { trim: false };
                    }
                    content.push_str(text);
                    return (reasoning, content);
                }
            }
        }
    }
}

/// Bytes at the end of `s` that could begin `</think>` (a whole number of characters).
fn held_back(s: &str) -> usize {
    (1..THINK_CLOSE.len())
        .rev()
        .find(|&n| {
            n <= s.len()
                && s.is_char_boundary(s.len() - n)
                && THINK_CLOSE.starts_with(&s[s.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod think_tests {
    use super::ThinkSplit;

    /// Feeds `pieces` and gathers what comes out, finish included.
    fn split(reasoning: bool, pieces: &[&str]) -> (String, String) {
        let mut s = ThinkSplit::new(reasoning);
        let (mut r, mut c) = (String::new(), String::new());
        for p in pieces {
            let (a, b) = s.push(p);
            r.push_str(&a);
            c.push_str(&b);
        }
        let (a, b) = s.finish();
        (r + &a, c + &b)
    }

    #[test]
    fn reasoning_and_reply_split_at_the_closing_tag_however_it_is_cut() {
        let text = "<think>\nLet me see: 2 < 3.\n</think>\n\nThe answer is 3.";
        let want = (
            "\nLet me see: 2 < 3.\n".to_string(),
            "The answer is 3.".to_string(),
        );
        // Every way of cutting the text into two pieces, and one character at a time.
        for cut in 0..=text.len() {
            assert_eq!(
                split(false, &[&text[..cut], &text[cut..]]),
                want,
                "cut at {cut}"
            );
        }
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(split(false, &refs), want);
        // The template opened the block: the answer starts inside it.
        assert_eq!(
            split(true, &["Hmm, ", "é</th", "ink>Yes"]),
            ("Hmm, é".to_string(), "Yes".to_string())
        );
        // Cut short while thinking: everything is reasoning, held-back bytes included.
        assert_eq!(
            split(true, &["a </th"]),
            ("a </th".to_string(), String::new())
        );
        // No think block: all reply, a `<` that starts no tag included.
        assert_eq!(
            split(false, &["<", "b>hi"]),
            (String::new(), "<b>hi".to_string())
        );
        assert_eq!(
            split(false, &["  plain"]),
            (String::new(), "  plain".to_string())
        );
    }
}
