//! Tool calls in model output: the call formats of the chat templates we serve.
//!
//! Owns, for each format ([`ToolFormat`]): recognising it from a chat template's source
//! ([`ToolFormat::detect`]), splitting a whole output into content, reasoning and calls
//! ([`ToolFormat::parse`]), the same split done incrementally while the output is generated
//! ([`ToolStream`]), and the Lark grammar (llguidance dialect) that makes constrained decoding
//! produce exactly one call, or one or more ([`ToolFormat::call_grammar`]). Pure text: no I/O, no
//! tokenizer. The text seen is the decoded output with special tokens kept and the final EOS left
//! out; a think block has already been split off (Harmony excepted: its reasoning is a channel).
//!
//! What must always hold:
//! - Any input is accepted without a panic: the text is model output, arbitrary.
//! - Nothing is lost: text that does not form a valid call (bad JSON, a missing name, a call cut
//!   off before it closes and not valid as it stands) comes back as content, markers included.
//!   Only whitespace between a call and the text around it is dropped.
//! - Streaming equals parsing: for any way of cutting a text into pieces, the [`ToolStream`]
//!   deltas concatenate to what [`ToolFormat::parse`] returns for the whole text. Both run the
//!   one [`Scanner`]; the stream holds back whatever is still undecided (a possible marker start,
//!   an open call, trailing whitespace) until more text or the end decides it.
//! - Arguments are normalised JSON object text (`serde_json::to_string` of the parsed value).

use serde_json::{Map, Value};

/// The tool-call format a chat template teaches its model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ToolFormat {
    /// `<tool_call>\n{"name": .., "arguments": {..}}\n</tool_call>` (Qwen2.5, Qwen3, ...).
    Hermes,
    /// `<tool_call>name\n<arg_key>k</arg_key>\n<arg_value>v</arg_value>\n</tool_call>` (GLM-4.5/4.6).
    Glm45,
    /// `[TOOL_CALLS] [{"name": .., "arguments": {..}}]` or `[TOOL_CALLS]name[ARGS]{..}` (Mistral).
    Mistral,
    /// DeepSeek-V3 / R1: `function<｜tool▁sep｜>name` and a fenced JSON block per call.
    DeepSeekV3,
    /// DeepSeek-V3.1 / V3.2: `name<｜tool▁sep｜>{..}` per call.
    DeepSeekV31,
    /// gpt-oss: channels and recipients (`to=functions.name`).
    Harmony,
}

/// A tool offered to the model: its name and the JSON schema of its arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    /// JSON schema of the arguments; `{}` or `null` means any JSON object.
    pub parameters: Value,
}

/// One call the model made.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// JSON object text, normalised.
    pub arguments: String,
}

/// A whole output, split.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Parsed {
    pub content: String,
    /// Harmony's analysis channel; empty for the other formats.
    pub reasoning: String,
    pub calls: Vec<ToolCall>,
}

/// What a [`ToolStream`] releases.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolDelta {
    Content(String),
    Reasoning(String),
    /// Call `index` (0, 1, ... in output order) begins.
    CallStart {
        index: usize,
        name: String,
    },
    /// A piece of call `index`'s arguments (JSON text; the pieces concatenate to the whole).
    Arguments {
        index: usize,
        text: String,
    },
}

// Markers. DeepSeek's use U+FF5C (｜) and U+2581 (▁).
const TOOL_CALL_OPEN: &str = "<tool_call>";
const TOOL_CALL_CLOSE: &str = "</tool_call>";
const ARG_KEY_OPEN: &str = "<arg_key>";
const ARG_KEY_CLOSE: &str = "</arg_key>";
const ARG_VALUE_OPEN: &str = "<arg_value>";
const ARG_VALUE_CLOSE: &str = "</arg_value>";
const MISTRAL_CALLS: &str = "[TOOL_CALLS]";
const MISTRAL_ARGS: &str = "[ARGS]";
const MISTRAL_CALL_ID: &str = "[CALL_ID]";
const DS_CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
const DS_CALLS_END: &str = "<｜tool▁calls▁end｜>";
const DS_CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
const DS_CALL_END: &str = "<｜tool▁call▁end｜>";
const DS_SEP: &str = "<｜tool▁sep｜>";
const H_START: &str = "<|start|>";
const H_CHANNEL: &str = "<|channel|>";
const H_MESSAGE: &str = "<|message|>";
const H_CONSTRAIN: &str = "<|constrain|>";
const H_END: &str = "<|end|>";
const H_CALL: &str = "<|call|>";
const H_RETURN: &str = "<|return|>";
/// Ends a Harmony message and is consumed with it.
const H_ENDS: [&str; 3] = [H_END, H_CALL, H_RETURN];
/// Every marker that ends a Harmony message body.
const H_BODY_STOPS: [&str; 5] = [H_END, H_CALL, H_RETURN, H_START, H_CHANNEL];
/// Longest Harmony header (role, channel, recipient, constraint) before `<|message|>`.
const H_HEADER_MAX: usize = 1024;
/// Longest function name accepted where the name is free text.
const NAME_MAX: usize = 256;

impl ToolFormat {
    /// From the chat template's source text; None = the template renders no tools (a 400 for
    /// requests with tools).
    pub fn detect(template: &str) -> Option<ToolFormat> {
        if template.contains(H_CALL)
            || template.contains("to=functions.")
            || template.contains(H_CHANNEL)
        {
            Some(ToolFormat::Harmony)
        } else if template.contains(ARG_KEY_OPEN) {
            // Before Hermes: GLM writes `<tool_call>` too.
            Some(ToolFormat::Glm45)
        } else if template.contains(MISTRAL_CALLS) {
            Some(ToolFormat::Mistral)
        } else if template.contains("tool▁calls▁begin") {
            // V3 writes the call type before the separator and fences the arguments.
            if template.contains("```json") || template.contains("function<｜tool▁sep｜>") {
                Some(ToolFormat::DeepSeekV3)
            } else {
                Some(ToolFormat::DeepSeekV31)
            }
        } else if template.contains(TOOL_CALL_OPEN) {
            Some(ToolFormat::Hermes)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ToolFormat::Hermes => "hermes",
            ToolFormat::Glm45 => "glm45",
            ToolFormat::Mistral => "mistral",
            ToolFormat::DeepSeekV3 => "deepseek_v3",
            ToolFormat::DeepSeekV31 => "deepseek_v31",
            ToolFormat::Harmony => "harmony",
        }
    }

    /// Whole output -> content, reasoning (Harmony only; else empty), calls.
    pub fn parse(self, text: &str) -> Parsed {
        let mut segs = Vec::new();
        Scanner::new(self).run(text, true, &mut segs);
        let mut parsed = Parsed::default();
        for seg in segs {
            match seg {
                Seg::Content(s) => parsed.content.push_str(&s),
                Seg::Reasoning(s) => parsed.reasoning.push_str(&s),
                Seg::Call(call) => parsed.calls.push(call),
            }
        }
        parsed
    }

    /// Lark grammar (llguidance dialect) that admits exactly one call (or, with `parallel`, one or
    /// more) to one of `tools` (its arguments matching the tool's JSON schema via `%json { ... }`),
    /// and nothing else. Whitespace and JSON separators are fixed to the template's own form.
    /// Markers are written as string literals (see [`ToolFormat::call_grammar_special_tokens`]).
    ///
    /// Per format: Hermes `<tool_call>\n{"name": "f", "arguments": {..}}\n</tool_call>`, calls
    /// joined by `\n`; GLM the declared properties in the schema's order (required ones always,
    /// the others optional; string-typed or untyped values raw up to `</arg_value>`, the others
    /// `%json`; any keys with raw values when the schema declares no properties); Mistral the
    /// list form `[TOOL_CALLS] [{..}, {..}]` (the space as the v3 tokenizers decode it); DeepSeek
    /// the template's block, V3 calls joined by `\n`; Harmony one call only (its `<|call|>` ends
    /// generation), from `<|channel|>commentary to=functions.f <|constrain|>json<|message|>`
    /// (the generation prompt ends with `<|start|>assistant`), compact JSON. JSON separators are
    /// `, ` and `: ` (Harmony `,` and `:`), no other whitespace. With no tools, the grammar admits
    /// nothing but the empty text.
    pub fn call_grammar(self, tools: &[ToolSpec], parallel: bool) -> String {
        grammar::build(self, tools, parallel, grammar::Markers::Spelled)
    }

    /// As [`ToolFormat::call_grammar`], but the markers that are special tokens in the model's
    /// tokenizer and that Lark can name (`<|channel|>`, `<｜tool▁sep｜>`, ...) are written as
    /// special-token references, which match the single token and not its spelling. Needs a
    /// tokenizer environment that has these tokens. Mistral's `[TOOL_CALLS]` stays a literal:
    /// llguidance reads `<[...]>` as token ids, so it cannot be named.
    pub fn call_grammar_special_tokens(self, tools: &[ToolSpec], parallel: bool) -> String {
        grammar::build(self, tools, parallel, grammar::Markers::Named)
    }

    /// As [`ToolFormat::call_grammar`], but every marker that `token_id` maps to a token of the
    /// model's vocabulary (`[TOOL_CALLS]`, `<tool_call>`, `<｜tool▁sep｜>`, `<|channel|>`, ...)
    /// is written as that token (`<[id]>`), so the model writes the one token it was trained
    /// on rather than its spelling; markers it does not map stay literal text.
    pub fn call_grammar_tokens(
        self,
        tools: &[ToolSpec],
        parallel: bool,
        token_id: &dyn Fn(&str) -> Option<u32>,
    ) -> String {
        grammar::build(self, tools, parallel, grammar::Markers::Ids(token_id))
    }

    /// The markers that open a call in text (not used by Harmony).
    fn start_markers(self) -> &'static [&'static str] {
        match self {
            ToolFormat::Hermes | ToolFormat::Glm45 => &[TOOL_CALL_OPEN],
            ToolFormat::Mistral => &[MISTRAL_CALLS],
            ToolFormat::DeepSeekV3 | ToolFormat::DeepSeekV31 => &[DS_CALLS_BEGIN, DS_CALL_BEGIN],
            ToolFormat::Harmony => &[],
        }
    }
}

/// Incremental parser for streaming: feed text pieces as they are generated.
#[derive(Debug)]
pub struct ToolStream {
    scanner: Scanner,
    /// Text not decided yet.
    pending: String,
    next_index: usize,
    finished: bool,
}

impl ToolStream {
    pub fn new(format: ToolFormat) -> ToolStream {
        ToolStream {
            scanner: Scanner::new(format),
            pending: String::new(),
            next_index: 0,
            finished: false,
        }
    }

    /// The next piece of output: whatever is decided now. Nothing after [`ToolStream::finish`].
    pub fn push(&mut self, text: &str) -> Vec<ToolDelta> {
        if self.finished {
            return Vec::new();
        }
        self.pending.push_str(text);
        self.drain(false)
    }

    /// End of output: releases what was held back (an incomplete call as content, as `parse`
    /// would).
    pub fn finish(&mut self) -> Vec<ToolDelta> {
        if self.finished {
            return Vec::new();
        }
        let out = self.drain(true);
        self.finished = true;
        out
    }

    fn drain(&mut self, at_end: bool) -> Vec<ToolDelta> {
        let mut segs = Vec::new();
        let used = self.scanner.run(&self.pending, at_end, &mut segs);
        self.pending.drain(..used);
        let mut out = Vec::new();
        for seg in segs {
            match seg {
                Seg::Content(s) => out.push(ToolDelta::Content(s)),
                Seg::Reasoning(s) => out.push(ToolDelta::Reasoning(s)),
                Seg::Call(call) => {
                    let index = self.next_index;
                    self.next_index += 1;
                    out.push(ToolDelta::CallStart {
                        index,
                        name: call.name,
                    });
                    out.push(ToolDelta::Arguments {
                        index,
                        text: call.arguments,
                    });
                }
            }
        }
        out
    }
}

/// A decided part of the output.
#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Content(String),
    Reasoning(String),
    Call(ToolCall),
}

/// Appends text to the last segment when it is of the same kind; empty text is dropped.
fn emit_text(out: &mut Vec<Seg>, s: &str, reasoning: bool) {
    if s.is_empty() {
        return;
    }
    match (out.last_mut(), reasoning) {
        (Some(Seg::Content(last)), false) | (Some(Seg::Reasoning(last)), true) => last.push_str(s),
        _ => out.push(if reasoning {
            Seg::Reasoning(s.to_string())
        } else {
            Seg::Content(s.to_string())
        }),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Ordinary text, looking for a call marker.
    Text,
    /// Inside DeepSeek's `<｜tool▁calls▁begin｜>` block.
    DsBlock,
    /// Harmony: a message header is next.
    HStart,
    /// Harmony: a message body.
    HBody(BodyKind),
    /// Harmony output that does not follow the format: the rest is content.
    HPlain,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum BodyKind {
    Content,
    Reasoning,
    Call,
}

/// What a call marker at the start of a text turned out to be.
enum Attempt {
    /// Undecided until more text comes.
    Wait,
    /// Not a call: the marker is content.
    Invalid,
    /// Calls (maybe none yet), the bytes they take, the state after them.
    Calls(Vec<ToolCall>, usize, State),
}

/// The one parser behind [`ToolFormat::parse`] and [`ToolStream`]: a state machine over the text
/// that consumes what is decided and leaves the rest for later (or, at the end, decides it).
#[derive(Debug)]
struct Scanner {
    format: ToolFormat,
    state: State,
    /// The last thing out was a call: leading whitespace is dropped.
    after_call: bool,
    /// Harmony: the name of the call whose body is being read.
    call_name: String,
}

impl Scanner {
    fn new(format: ToolFormat) -> Scanner {
        Scanner {
            format,
            state: if format == ToolFormat::Harmony {
                State::HStart
            } else {
                State::Text
            },
            after_call: false,
            call_name: String::new(),
        }
    }

    /// Decides what it can of `text` (everything when `at_end`) into `out`; returns the bytes
    /// consumed, always on a char boundary.
    fn run(&mut self, text: &str, at_end: bool, out: &mut Vec<Seg>) -> usize {
        let mut pos = 0;
        let mut idle = 0;
        while let Some(rest) = text.get(pos..) {
            match self.step(rest, at_end, out) {
                None => break,
                Some(0) => {
                    // A state change without progress; more than a few in a row cannot happen
                    // (each state change leads to consumption), but never loop on it.
                    idle += 1;
                    if idle > 8 {
                        break;
                    }
                }
                Some(n) => {
                    idle = 0;
                    pos += n.min(rest.len());
                }
            }
        }
        if at_end && pos < text.len() {
            // Unreachable by construction; nothing is lost even so.
            emit_text(out, text.get(pos..).unwrap_or(""), false);
            pos = text.len();
        }
        pos
    }

    /// One step: `Some(bytes consumed)` (0 with a state change), or `None` when nothing more can
    /// be decided.
    fn step(&mut self, rest: &str, at_end: bool, out: &mut Vec<Seg>) -> Option<usize> {
        if rest.is_empty() {
            return None;
        }
        match self.state {
            State::Text => self.step_text(rest, at_end, out),
            State::DsBlock => self.step_ds_block(rest, at_end, out),
            State::HStart => self.step_h_start(rest, at_end),
            State::HBody(kind) => self.step_h_body(rest, kind, at_end, out),
            State::HPlain => {
                emit_text(out, rest, false);
                Some(rest.len())
            }
        }
    }

    fn content(&mut self, out: &mut Vec<Seg>, s: &str) {
        if !s.is_empty() {
            emit_text(out, s, false);
            self.after_call = false;
        }
    }

    fn step_text(&mut self, rest: &str, at_end: bool, out: &mut Vec<Seg>) -> Option<usize> {
        if self.after_call {
            let ws = rest.len() - rest.trim_start().len();
            if ws > 0 {
                return Some(ws);
            }
        }
        let markers = self.format.start_markers();
        let Some((at, marker)) = find_first(rest, markers) else {
            if at_end {
                self.content(out, rest);
                return Some(rest.len());
            }
            // Hold a possible marker start and trailing whitespace (it may precede a call).
            let held = partial_suffix(rest, markers);
            let ready = rest[..rest.len() - held].trim_end();
            if ready.is_empty() {
                return None;
            }
            self.content(out, ready);
            return Some(ready.len());
        };
        let before = &rest[..at];
        match self.attempt(&rest[at..], marker, at_end) {
            Attempt::Wait => {
                let ready = before.trim_end();
                if ready.is_empty() {
                    return None;
                }
                self.content(out, ready);
                Some(ready.len())
            }
            Attempt::Invalid => {
                self.content(out, &rest[..at + marker.len()]);
                Some(at + marker.len())
            }
            Attempt::Calls(calls, len, state) => {
                self.content(out, before.trim_end());
                out.extend(calls.into_iter().map(Seg::Call));
                self.after_call = true;
                self.state = state;
                Some(at + len)
            }
        }
    }

    /// `s` starts with `marker`.
    fn attempt(&self, s: &str, marker: &str, at_end: bool) -> Attempt {
        let body = &s[marker.len()..];
        match self.format {
            ToolFormat::Hermes | ToolFormat::Glm45 => {
                let parse = |inner: &str| {
                    if self.format == ToolFormat::Hermes {
                        parse_hermes(inner)
                    } else {
                        // GLM models sometimes answer in Hermes's JSON form.
                        parse_glm(inner).or_else(|| parse_hermes(inner))
                    }
                };
                match body.find(TOOL_CALL_CLOSE) {
                    Some(close) => match parse(&body[..close]) {
                        Some(call) => Attempt::Calls(
                            vec![call],
                            marker.len() + close + TOOL_CALL_CLOSE.len(),
                            State::Text,
                        ),
                        None => Attempt::Invalid,
                    },
                    None if !at_end => Attempt::Wait,
                    // Cut off before the close: valid as it stands, or content.
                    None => match parse(strip_partial_suffix(body, TOOL_CALL_CLOSE)) {
                        Some(call) => Attempt::Calls(vec![call], s.len(), State::Text),
                        None => Attempt::Invalid,
                    },
                }
            }
            ToolFormat::Mistral => attempt_mistral(body, at_end),
            ToolFormat::DeepSeekV3 | ToolFormat::DeepSeekV31 => {
                if marker == DS_CALL_BEGIN {
                    // A call without the block around it: read it as if the block were there.
                    return Attempt::Calls(Vec::new(), 0, State::DsBlock);
                }
                let next = body.trim_start();
                if next.starts_with(DS_CALL_BEGIN) || next.starts_with(DS_CALLS_END) {
                    Attempt::Calls(Vec::new(), marker.len(), State::DsBlock)
                } else if !at_end
                    && (DS_CALL_BEGIN.starts_with(next) || DS_CALLS_END.starts_with(next))
                {
                    Attempt::Wait
                } else {
                    Attempt::Invalid
                }
            }
            ToolFormat::Harmony => Attempt::Invalid,
        }
    }

    fn step_ds_block(&mut self, rest: &str, at_end: bool, out: &mut Vec<Seg>) -> Option<usize> {
        let ws = rest.len() - rest.trim_start().len();
        if ws > 0 {
            return Some(ws);
        }
        if rest.starts_with(DS_CALLS_END) {
            self.state = State::Text;
            self.after_call = true;
            return Some(DS_CALLS_END.len());
        }
        let v3 = self.format == ToolFormat::DeepSeekV3;
        if let Some(body) = rest.strip_prefix(DS_CALL_BEGIN) {
            let (inner, len) = match body.find(DS_CALL_END) {
                Some(end) => (&body[..end], DS_CALL_BEGIN.len() + end + DS_CALL_END.len()),
                None if !at_end => return None,
                None => (strip_partial_suffix(body, DS_CALL_END), rest.len()),
            };
            match parse_deepseek(inner, v3) {
                Some(call) => {
                    out.push(Seg::Call(call));
                    self.after_call = true;
                }
                None => self.content(out, &rest[..len]),
            }
            return Some(len);
        }
        if !at_end && (DS_CALLS_END.starts_with(rest) || DS_CALL_BEGIN.starts_with(rest)) {
            return None;
        }
        // Something else inside the block: it ends here, the rest is ordinary text.
        self.state = State::Text;
        Some(0)
    }

    fn step_h_start(&mut self, rest: &str, at_end: bool) -> Option<usize> {
        match harmony_head_ok(rest) {
            Some(true) => {}
            Some(false) => {
                self.state = State::HPlain;
                return Some(0);
            }
            None if at_end => {
                self.state = State::HPlain;
                return Some(0);
            }
            None => return None,
        }
        let Some(at) = rest.find(H_MESSAGE) else {
            if at_end
                || rest.len() > H_HEADER_MAX + H_MESSAGE.len()
                || header_has_stop(rest.strip_prefix(H_START).unwrap_or(rest))
            {
                self.state = State::HPlain;
                return Some(0);
            }
            return None;
        };
        match (at <= H_HEADER_MAX)
            .then(|| parse_harmony_header(&rest[..at]))
            .flatten()
        {
            Some((kind, name)) => {
                self.state = State::HBody(kind);
                self.call_name = name;
                Some(at + H_MESSAGE.len())
            }
            None => {
                self.state = State::HPlain;
                Some(0)
            }
        }
    }

    fn step_h_body(
        &mut self,
        rest: &str,
        kind: BodyKind,
        at_end: bool,
        out: &mut Vec<Seg>,
    ) -> Option<usize> {
        let (body, len) = match find_first(rest, &H_BODY_STOPS) {
            Some((at, stop)) => {
                let len = if H_ENDS.contains(&stop) {
                    at + stop.len()
                } else {
                    at
                };
                (&rest[..at], len)
            }
            None if at_end => (rest, rest.len()),
            None => {
                if kind == BodyKind::Call {
                    return None;
                }
                let ready = &rest[..rest.len() - partial_suffix(rest, &H_BODY_STOPS)];
                if ready.is_empty() {
                    return None;
                }
                emit_text(out, ready, kind == BodyKind::Reasoning);
                return Some(ready.len());
            }
        };
        match kind {
            BodyKind::Content => emit_text(out, body, false),
            BodyKind::Reasoning => emit_text(out, body, true),
            BodyKind::Call => match json_object_text(body) {
                Some(arguments) => out.push(Seg::Call(ToolCall {
                    name: std::mem::take(&mut self.call_name),
                    arguments,
                })),
                None => emit_text(out, body, false),
            },
        }
        self.state = State::HStart;
        Some(len)
    }
}

/// The earliest occurrence of any of `markers` in `s`: (byte offset, marker).
fn find_first<'m>(s: &str, markers: &[&'m str]) -> Option<(usize, &'m str)> {
    markers
        .iter()
        .filter_map(|m| s.find(m).map(|at| (at, *m)))
        .min_by_key(|(at, _)| *at)
}

/// The length of the longest suffix of `s` that is a proper prefix of one of `markers`.
fn partial_suffix(s: &str, markers: &[&str]) -> usize {
    let longest = markers.iter().map(|m| m.len()).max().unwrap_or(0);
    let from = s.len().saturating_sub(longest.saturating_sub(1));
    (from..s.len())
        .filter(|&at| s.is_char_boundary(at))
        .map(|at| &s[at..])
        .find(|tail| {
            markers
                .iter()
                .any(|m| m.len() > tail.len() && m.starts_with(tail))
        })
        .map_or(0, str::len)
}

/// `s` without a trailing proper prefix of `marker` (a close cut off by the end of output).
fn strip_partial_suffix<'a>(s: &'a str, marker: &str) -> &'a str {
    &s[..s.len() - partial_suffix(s, &[marker])]
}

/// A function name written as free text: non-empty, short, no whitespace or markup.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_MAX
        && !name
            .chars()
            .any(|c| c.is_whitespace() || "<>{}[]\"'`".contains(c))
}

/// Arguments as normalised JSON object text: an object, `null` (= `{}`), or a string holding an
/// object (some models quote their arguments).
fn normalise_arguments(v: Value) -> Option<String> {
    match v {
        Value::Object(_) => serde_json::to_string(&v).ok(),
        Value::Null => Some("{}".to_string()),
        Value::String(s) => json_object_text(&s),
        _ => None,
    }
}

/// `s` (trimmed) as a JSON object, normalised.
fn json_object_text(s: &str) -> Option<String> {
    match serde_json::from_str::<Value>(s.trim()) {
        Ok(v @ Value::Object(_)) => serde_json::to_string(&v).ok(),
        _ => None,
    }
}

/// `{"name": .., "arguments": {..}}` (or `parameters`); missing arguments are `{}`.
fn call_from_object(v: Value) -> Option<ToolCall> {
    let Value::Object(mut obj) = v else {
        return None;
    };
    let name = match obj.remove("name") {
        Some(Value::String(name)) if !name.is_empty() => name,
        _ => return None,
    };
    let args = obj
        .remove("arguments")
        .or_else(|| obj.remove("parameters"))
        .unwrap_or(Value::Null);
    Some(ToolCall {
        name,
        arguments: normalise_arguments(args)?,
    })
}

fn parse_hermes(inner: &str) -> Option<ToolCall> {
    call_from_object(serde_json::from_str(inner.trim()).ok()?)
}

fn parse_glm(inner: &str) -> Option<ToolCall> {
    let (name, mut rest) = match inner.find(ARG_KEY_OPEN) {
        Some(at) => (&inner[..at], &inner[at..]),
        None => (inner, ""),
    };
    let name = name.trim();
    if !valid_name(name) {
        return None;
    }
    let mut args = Map::new();
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        rest = rest.strip_prefix(ARG_KEY_OPEN)?;
        let end = rest.find(ARG_KEY_CLOSE)?;
        let key = rest[..end].trim();
        if key.is_empty() {
            return None;
        }
        rest = rest[end + ARG_KEY_CLOSE.len()..].trim_start();
        rest = rest.strip_prefix(ARG_VALUE_OPEN)?;
        let end = rest.find(ARG_VALUE_CLOSE)?;
        let raw = &rest[..end];
        rest = &rest[end + ARG_VALUE_CLOSE.len()..];
        let value = serde_json::from_str::<Value>(raw.trim())
            .unwrap_or_else(|_| Value::String(raw.to_string()));
        args.insert(key.to_string(), value);
    }
    Some(ToolCall {
        name: name.to_string(),
        arguments: serde_json::to_string(&Value::Object(args)).ok()?,
    })
}

/// `s` without a Markdown code fence (```json ... ```) around it.
fn strip_fence(s: &str) -> &str {
    let s = s.trim();
    let s = s
        .strip_prefix("```json")
        .or_else(|| s.strip_prefix("```"))
        .unwrap_or(s);
    s.strip_suffix("```").unwrap_or(s).trim()
}

/// One DeepSeek call between `<｜tool▁call▁begin｜>` and `<｜tool▁call▁end｜>`; each version's
/// form is tried first, then the other's.
fn parse_deepseek(inner: &str, v3: bool) -> Option<ToolCall> {
    let (left, right) = inner.split_once(DS_SEP)?;
    let as_v3 = || {
        let (name, args) = right.split_once('\n')?;
        let name = name.trim();
        valid_name(name).then_some(())?;
        Some(ToolCall {
            name: name.to_string(),
            arguments: json_object_text(strip_fence(args))?,
        })
    };
    let as_v31 = || {
        let name = left.trim();
        valid_name(name).then_some(())?;
        Some(ToolCall {
            name: name.to_string(),
            arguments: json_object_text(strip_fence(right))?,
        })
    };
    if v3 {
        as_v3().or_else(as_v31)
    } else {
        as_v31().or_else(as_v3)
    }
}

/// A JSON value at the start of a text that may go on.
enum JsonPrefix {
    Value(Value, usize),
    /// The text ends inside the value.
    Open,
    Bad,
}

fn json_prefix(s: &str) -> JsonPrefix {
    let mut values = serde_json::Deserializer::from_str(s).into_iter::<Value>();
    match values.next() {
        Some(Ok(v)) => JsonPrefix::Value(v, values.byte_offset()),
        Some(Err(e)) if e.is_eof() => JsonPrefix::Open,
        Some(Err(_)) => JsonPrefix::Bad,
        None => JsonPrefix::Open,
    }
}

/// After `[TOOL_CALLS]`: a JSON list of calls (or one call object), or `name[ARGS]{..}` (with an
/// optional `[CALL_ID]id` before `[ARGS]`).
fn attempt_mistral(body: &str, at_end: bool) -> Attempt {
    let start = body.len() - body.trim_start().len();
    let s = &body[start..];
    let open = |at_end: bool| {
        if at_end {
            Attempt::Invalid
        } else {
            Attempt::Wait
        }
    };
    if s.is_empty() {
        return open(at_end);
    }
    if s.starts_with('[') || s.starts_with('{') {
        return match json_prefix(s) {
            JsonPrefix::Value(v, len) => {
                let items = match v {
                    Value::Array(items) => items,
                    v => vec![v],
                };
                let calls: Option<Vec<ToolCall>> =
                    items.into_iter().map(call_from_object).collect();
                match calls {
                    Some(calls) if !calls.is_empty() => {
                        Attempt::Calls(calls, MISTRAL_CALLS.len() + start + len, State::Text)
                    }
                    _ => Attempt::Invalid,
                }
            }
            JsonPrefix::Open => open(at_end),
            JsonPrefix::Bad => Attempt::Invalid,
        };
    }
    // name [CALL_ID]id [ARGS] {..}
    let name_len = s.find(|c: char| !name_char(c)).unwrap_or(s.len());
    let name = &s[..name_len];
    let mut rest = &s[name_len..];
    if let Some(after) = rest.strip_prefix(MISTRAL_CALL_ID) {
        rest = &after[after.find(|c: char| !name_char(c)).unwrap_or(after.len())..];
    } else if MISTRAL_CALL_ID.starts_with(rest) && rest.len() < MISTRAL_CALL_ID.len() {
        return open(at_end);
    }
    let Some(args) = rest.strip_prefix(MISTRAL_ARGS) else {
        return if MISTRAL_ARGS.starts_with(rest) {
            open(at_end)
        } else {
            Attempt::Invalid
        };
    };
    if !valid_name(name) {
        return Attempt::Invalid;
    }
    let args_at = s.len() - args.len();
    match json_prefix(args) {
        JsonPrefix::Value(v @ Value::Object(_), len) => match serde_json::to_string(&v) {
            Ok(arguments) => Attempt::Calls(
                vec![ToolCall {
                    name: name.to_string(),
                    arguments,
                }],
                MISTRAL_CALLS.len() + start + args_at + len,
                State::Text,
            ),
            Err(_) => Attempt::Invalid,
        },
        JsonPrefix::Open if args.trim_start().is_empty() || args.trim_start().starts_with('{') => {
            open(at_end)
        }
        _ => Attempt::Invalid,
    }
}

fn name_char(c: char) -> bool {
    !(c.is_whitespace() || "<>{}[]\"'`".contains(c))
}

/// Whether the text can be a Harmony message header: `[<|start|>][assistant][ ]` then
/// `<|channel|>` or `to=`. None: too short to tell.
fn harmony_head_ok(s: &str) -> Option<bool> {
    let mut t = s;
    for prefix in [H_START, "assistant"] {
        if let Some(rest) = t.strip_prefix(prefix) {
            t = rest;
        } else if prefix.starts_with(t) {
            return None;
        }
    }
    let t = t.trim_start_matches(' ');
    if t.starts_with(H_CHANNEL) || t.starts_with("to=") {
        Some(true)
    } else if H_CHANNEL.starts_with(t) || "to=".starts_with(t) {
        None
    } else {
        Some(false)
    }
}

/// Whether a header holds a marker that cannot be in one.
fn header_has_stop(h: &str) -> bool {
    [H_END, H_CALL, H_RETURN, H_START, H_MESSAGE]
        .iter()
        .any(|m| h.contains(m))
}

/// `[<|start|>][assistant][ to=R]<|channel|>C[ to=R][ <|constrain|>json| json]` -> what the body
/// is; for a call, the function name (`functions.` taken off).
fn parse_harmony_header(head: &str) -> Option<(BodyKind, String)> {
    let h = head.strip_prefix(H_START).unwrap_or(head);
    let h = h.strip_prefix("assistant").unwrap_or(h);
    if header_has_stop(h) {
        return None;
    }
    let word = |s: &str| -> String {
        s.split(|c: char| c.is_whitespace() || c == '<')
            .next()
            .unwrap_or("")
            .to_string()
    };
    let channel = h.find(H_CHANNEL).map(|at| word(&h[at + H_CHANNEL.len()..]));
    let recipient = h.find("to=").map(|at| word(&h[at + 3..]));
    match (channel, recipient) {
        (_, Some(r)) if !r.is_empty() => {
            let name = r.strip_prefix("functions.").unwrap_or(&r);
            valid_name(name).then(|| (BodyKind::Call, name.to_string()))
        }
        (Some(c), _) if c == "analysis" => Some((BodyKind::Reasoning, String::new())),
        (Some(c), _) if !c.is_empty() => Some((BodyKind::Content, String::new())),
        _ => None,
    }
}

mod grammar {
    //! The Lark text of [`ToolFormat::call_grammar`].

    use super::*;

    /// A piece of a rule: literal text, a marker (a special token in the model's tokenizer), a
    /// tag (a marker that may be one token, but is never named as a special token), or a rule
    /// or terminal name.
    enum Piece {
        Lit(String),
        Marker(&'static str),
        Tag(&'static str),
        Rule(String),
    }

    /// How markers are written.
    #[derive(Clone, Copy)]
    pub(super) enum Markers<'a> {
        /// As text.
        Spelled,
        /// As special-token names where Lark can name them.
        Named,
        /// As token ids where the vocabulary has them as one token.
        Ids(&'a dyn Fn(&str) -> Option<u32>),
    }

    fn lit(s: impl Into<String>) -> Piece {
        Piece::Lit(s.into())
    }

    /// A Lark string literal (JSON string syntax; DEL escaped too, which the Lark lexer needs).
    pub(super) fn lark_string(s: &str) -> String {
        let mut out = String::with_capacity(s.len() + 2);
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                    out.push_str(&format!("\\u{:04x}", c as u32))
                }
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    /// A marker as a special-token reference, when Lark can name it (`<...>` without spaces,
    /// not `<[...]>`, which means token ids).
    fn nameable(marker: &str) -> bool {
        marker.starts_with('<')
            && marker.ends_with('>')
            && !marker.starts_with("<[")
            && marker.len() > 2
            && !marker[1..marker.len() - 1]
                .contains(|c: char| c == '<' || c == '>' || c.is_whitespace())
    }

    /// A rule body from pieces; adjacent literal text is merged.
    fn render(pieces: Vec<Piece>, markers: Markers<'_>) -> String {
        let mut parts: Vec<String> = Vec::new();
        let mut text = String::new();
        for piece in pieces {
            let token = match (&piece, markers) {
                (Piece::Marker(m), Markers::Named) if nameable(m) => Some(m.to_string()),
                (Piece::Marker(m) | Piece::Tag(m), Markers::Ids(id)) => {
                    id(m).map(|id| format!("<[{id}]>"))
                }
                _ => None,
            };
            match piece {
                Piece::Lit(s) => text.push_str(&s),
                Piece::Marker(m) | Piece::Tag(m) if token.is_none() => text.push_str(m),
                Piece::Marker(_) | Piece::Tag(_) => {
                    if !text.is_empty() {
                        parts.push(lark_string(&std::mem::take(&mut text)));
                    }
                    parts.extend(token);
                }
                Piece::Rule(r) => {
                    if !text.is_empty() {
                        parts.push(lark_string(&std::mem::take(&mut text)));
                    }
                    parts.push(r);
                }
            }
        }
        if !text.is_empty() {
            parts.push(lark_string(&text));
        }
        if parts.is_empty() {
            "\"\"".to_string()
        } else {
            parts.join(" ")
        }
    }

    /// A schema with the JSON separators fixed (no free whitespace).
    fn with_separators(schema: &Value, item: &str, key: &str) -> Value {
        let mut schema = match schema {
            Value::Object(m) => m.clone(),
            _ => Map::new(),
        };
        let mut opts = Map::new();
        opts.insert("whitespace_flexible".into(), Value::Bool(false));
        opts.insert("item_separator".into(), Value::String(item.into()));
        opts.insert("key_separator".into(), Value::String(key.into()));
        schema.insert("x-guidance".into(), Value::Object(opts));
        Value::Object(schema)
    }

    /// The arguments' schema for `%json`: `{}`/missing = any object.
    fn args_schema(parameters: &Value, item: &str, key: &str) -> Value {
        let mut schema = with_separators(parameters, item, key);
        if let Value::Object(m) = &mut schema {
            m.entry("type").or_insert(Value::String("object".into()));
        }
        schema
    }

    fn json_rule(rules: &mut Vec<String>, name: &str, schema: &Value) {
        let text = serde_json::to_string(schema).unwrap_or_else(|_| "{}".to_string());
        rules.push(format!("{name}: %json {text}"));
    }

    /// JSON text of a string (the name inside Hermes/Mistral call objects).
    fn json_str(s: &str) -> String {
        serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string())
    }

    /// Whether a GLM argument value is written raw (a string, or of no declared type). A local
    /// `$ref` (`#/$defs/x`, `#/definitions/x`) is followed once, against the tool's schema.
    fn glm_raw(schema: &Value, parameters: &Value) -> bool {
        let target = schema
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix('#'))
            .and_then(|pointer| parameters.pointer(pointer));
        let schema = match target {
            Some(t) => t,
            None if schema.get("$ref").is_some() => return false,
            None => schema,
        };
        match schema.get("type") {
            None => schema.get("enum").is_none() && schema.get("const").is_none(),
            Some(Value::String(t)) => t == "string",
            Some(Value::Array(ts)) => ts.iter().any(|t| t == "string"),
            _ => false,
        }
    }

    /// The rule of a raw GLM string value (closing tag included) that keeps the property's
    /// string schema: one of its `enum` strings, or a length within `minLength..=maxLength`;
    /// any text up to the closing tag otherwise.
    fn glm_str(rules: &mut Vec<String>, i: usize, k: usize, schema: &Value) -> String {
        let strings: Option<Vec<&str>> = schema
            .get("enum")
            .and_then(Value::as_array)
            .and_then(|e| e.iter().map(Value::as_str).collect());
        if let Some(options) = strings.filter(|o| !o.is_empty()) {
            let name = format!("glm_{i}_{k}_s");
            let alts: Vec<String> = options.iter().map(|o| lark_string(o)).collect();
            rules.push(format!(
                "{name}: ({}) {}",
                alts.join(" | "),
                lark_string(ARG_VALUE_CLOSE)
            ));
            return name;
        }
        let bound = |key: &str| schema.get(key).and_then(Value::as_u64);
        let (min, max) = (bound("minLength"), bound("maxLength"));
        if min.is_none() && max.is_none() {
            return "GLM_STR".to_string();
        }
        let name = format!("GLM_{i}_{k}");
        let (min, max) = (
            min.unwrap_or(0),
            max.map_or(String::new(), |m| m.to_string()),
        );
        rules.push(format!(
            r"{name}: /(?s:.{{{min},{max}}})<\/arg_value>/ & ~/(?s:.*)<\/arg_value>(?s:.+)/"
        ));
        name
    }

    /// GLM's argument pairs for tool `i`: the declared properties in schema order (required
    /// ones always, the others optional); any keys when the schema declares none.
    fn glm_args(
        rules: &mut Vec<String>,
        i: usize,
        parameters: &Value,
        markers: Markers<'_>,
    ) -> Vec<Piece> {
        let props = parameters.get("properties").and_then(Value::as_object);
        let required: Vec<&str> = parameters
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let Some(props) = props else {
            return vec![Piece::Rule("glm_any*".to_string())];
        };
        let mut pieces = Vec::new();
        for (k, (key, schema)) in props.iter().enumerate() {
            let rule = format!("glm_{i}_{k}");
            let mut body = vec![lit(format!(
                "\n{ARG_KEY_OPEN}{key}{ARG_KEY_CLOSE}\n{ARG_VALUE_OPEN}"
            ))];
            if glm_raw(schema, parameters) {
                body.push(Piece::Rule(glm_str(rules, i, k, schema)));
            } else {
                let value = format!("glm_{i}_{k}_v");
                let mut schema = with_separators(schema, ", ", ": ");
                // The property's schema stands alone: bring the tool's definitions along so
                // its `$ref`s resolve.
                if let Value::Object(m) = &mut schema {
                    for defs in ["$defs", "definitions"] {
                        if let Some(d) = parameters.get(defs) {
                            m.entry(defs).or_insert_with(|| d.clone());
                        }
                    }
                }
                json_rule(rules, &value, &schema);
                body.push(Piece::Rule(value));
                body.push(lit(ARG_VALUE_CLOSE));
            }
            rules.push(format!("{rule}: {}", render(body, markers)));
            let optional = if required.contains(&key.as_str()) {
                ""
            } else {
                "?"
            };
            pieces.push(Piece::Rule(format!("{rule}{optional}")));
        }
        pieces
    }

    pub(super) fn build(
        format: ToolFormat,
        tools: &[ToolSpec],
        parallel: bool,
        markers: Markers<'_>,
    ) -> String {
        let mut rules = Vec::new();
        let mut calls = Vec::new();
        let (item, key) = if format == ToolFormat::Harmony {
            (",", ":")
        } else {
            (", ", ": ")
        };
        for (i, tool) in tools.iter().enumerate() {
            let args = format!("args_{i}");
            let name = &tool.name;
            let body: Vec<Piece> = match format {
                ToolFormat::Hermes => vec![
                    Piece::Tag(TOOL_CALL_OPEN),
                    lit(format!("\n{{\"name\": {}, \"arguments\": ", json_str(name))),
                    Piece::Rule(args.clone()),
                    lit("}\n"),
                    Piece::Tag(TOOL_CALL_CLOSE),
                ],
                ToolFormat::Mistral => vec![
                    lit(format!("{{\"name\": {}, \"arguments\": ", json_str(name))),
                    Piece::Rule(args.clone()),
                    lit("}"),
                ],
                ToolFormat::Glm45 => {
                    let mut body = vec![Piece::Tag(TOOL_CALL_OPEN), lit(name.as_str())];
                    body.extend(glm_args(&mut rules, i, &tool.parameters, markers));
                    body.push(lit("\n"));
                    body.push(Piece::Tag(TOOL_CALL_CLOSE));
                    body
                }
                ToolFormat::DeepSeekV3 => vec![
                    Piece::Marker(DS_CALL_BEGIN),
                    lit("function"),
                    Piece::Marker(DS_SEP),
                    lit(format!("{name}\n```json\n")),
                    Piece::Rule(args.clone()),
                    lit("\n```"),
                    Piece::Marker(DS_CALL_END),
                ],
                ToolFormat::DeepSeekV31 => vec![
                    Piece::Marker(DS_CALL_BEGIN),
                    lit(name.as_str()),
                    Piece::Marker(DS_SEP),
                    Piece::Rule(args.clone()),
                    Piece::Marker(DS_CALL_END),
                ],
                ToolFormat::Harmony => vec![
                    Piece::Marker(H_CHANNEL),
                    lit(format!("commentary to=functions.{name} ")),
                    Piece::Marker(H_CONSTRAIN),
                    lit("json"),
                    Piece::Marker(H_MESSAGE),
                    Piece::Rule(args.clone()),
                ],
            };
            if format != ToolFormat::Glm45 {
                json_rule(&mut rules, &args, &args_schema(&tool.parameters, item, key));
            }
            rules.push(format!("call_{i}: {}", render(body, markers)));
            calls.push(format!("call_{i}"));
        }
        if format == ToolFormat::Glm45 {
            rules.push(format!(
                "glm_any: {} GLM_KEY {} GLM_STR",
                lark_string(&format!("\n{ARG_KEY_OPEN}")),
                lark_string(&format!("{ARG_KEY_CLOSE}\n{ARG_VALUE_OPEN}"))
            ));
            rules.push(r"GLM_KEY: /[^<>\s]+/".to_string());
            rules.push(
                r"GLM_STR: /(?s:.*)<\/arg_value>/ & ~/(?s:.*)<\/arg_value>(?s:.+)/".to_string(),
            );
        }
        if calls.is_empty() {
            return "start: \"\"\n".to_string();
        }
        let call = "call".to_string();
        let many = parallel && format != ToolFormat::Harmony;
        let start: Vec<Piece> = match format {
            ToolFormat::Hermes | ToolFormat::Glm45 => {
                if many {
                    vec![
                        Piece::Rule(call.clone()),
                        Piece::Rule("(\"\\n\" call)*".into()),
                    ]
                } else {
                    vec![Piece::Rule(call.clone())]
                }
            }
            ToolFormat::Mistral => {
                let mut v = vec![
                    Piece::Marker(MISTRAL_CALLS),
                    lit(" ["),
                    Piece::Rule(call.clone()),
                ];
                if many {
                    v.push(Piece::Rule("(\", \" call)*".into()));
                }
                v.push(lit("]"));
                v
            }
            ToolFormat::DeepSeekV3 | ToolFormat::DeepSeekV31 => {
                let sep = if format == ToolFormat::DeepSeekV3 {
                    "(\"\\n\" call)*"
                } else {
                    "call*"
                };
                let mut v = vec![Piece::Marker(DS_CALLS_BEGIN), Piece::Rule(call.clone())];
                if many {
                    v.push(Piece::Rule(sep.into()));
                }
                v.push(Piece::Marker(DS_CALLS_END));
                v
            }
            ToolFormat::Harmony => vec![Piece::Rule(call.clone())],
        };
        let mut out = format!("start: {}\n", render(start, markers));
        out.push_str(&format!("call: {}\n", calls.join(" | ")));
        for r in rules {
            out.push_str(&r);
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llguidance::api::TopLevelGrammar;
    use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
    use llguidance::{Matcher, ParserFactory};
    use serde_json::json;
    use std::sync::Arc;

    const ALL: [ToolFormat; 6] = [
        ToolFormat::Hermes,
        ToolFormat::Glm45,
        ToolFormat::Mistral,
        ToolFormat::DeepSeekV3,
        ToolFormat::DeepSeekV31,
        ToolFormat::Harmony,
    ];

    fn norm(json: &str) -> String {
        serde_json::to_string(&serde_json::from_str::<Value>(json).expect("test JSON"))
            .expect("json")
    }

    fn call(name: &str, args: &str) -> ToolCall {
        ToolCall {
            name: name.to_string(),
            arguments: norm(args),
        }
    }

    /// The stream's deltas gathered the way a client would.
    fn gather(deltas: Vec<ToolDelta>) -> Parsed {
        let mut p = Parsed::default();
        for d in deltas {
            match d {
                ToolDelta::Content(s) => p.content.push_str(&s),
                ToolDelta::Reasoning(s) => p.reasoning.push_str(&s),
                ToolDelta::CallStart { index, name } => {
                    assert_eq!(index, p.calls.len(), "calls start in order");
                    p.calls.push(ToolCall {
                        name,
                        arguments: String::new(),
                    });
                }
                ToolDelta::Arguments { index, text } => p.calls[index].arguments.push_str(&text),
            }
        }
        p
    }

    fn stream(format: ToolFormat, pieces: &[&str]) -> Parsed {
        let mut s = ToolStream::new(format);
        let mut deltas = Vec::new();
        for piece in pieces {
            deltas.extend(s.push(piece));
        }
        deltas.extend(s.finish());
        assert!(s.push("late").is_empty() && s.finish().is_empty());
        gather(deltas)
    }

    /// Every cut into two pieces, and one char at a time, streams to `parse` of the whole.
    fn assert_stream_matches(format: ToolFormat, text: &str) -> Parsed {
        let whole = format.parse(text);
        for (at, _) in text.char_indices().skip(1) {
            let (a, b) = text.split_at(at);
            assert_eq!(
                stream(format, &[a, b]),
                whole,
                "{format:?} cut at {at}: {text:?}"
            );
        }
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(
            stream(format, &pieces),
            whole,
            "{format:?} char by char: {text:?}"
        );
        whole
    }

    fn check(format: ToolFormat, text: &str, content: &str, reasoning: &str, calls: &[ToolCall]) {
        let got = assert_stream_matches(format, text);
        assert_eq!(
            got,
            Parsed {
                content: content.to_string(),
                reasoning: reasoning.to_string(),
                calls: calls.to_vec(),
            },
            "{format:?}: {text:?}"
        );
    }

    #[test]
    fn hermes_calls_content_and_leniency() {
        let f = ToolFormat::Hermes;
        check(
            f,
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": -1.5e3}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\"}\n</tool_call>",
            "Let me check.",
            "",
            &[call("get_weather", r#"{"city":"Paris","days":-1500.0}"#), call("get_time", "{}")],
        );
        // Lenient whitespace, arguments as a JSON string, text after the calls.
        check(
            f,
            "<tool_call>{\"name\":\"f\",\"arguments\":\"{\\\"a\\\": [1, 2]}\"}</tool_call>\n\nDone.  ",
            "Done.  ",
            "",
            &[call("f", r#"{"a":[1,2]}"#)],
        );
        // A call whose JSON does not parse stays content, untouched.
        let bad = "A <tool_call>\n{\"name\": oops}\n</tool_call> B";
        check(f, bad, bad, "", &[]);
        // Arguments that are not an object: content.
        let bad = "<tool_call>{\"name\": \"f\", \"arguments\": 3}</tool_call>";
        check(f, bad, bad, "", &[]);
        // Cut off by length: valid JSON is a call, anything else content.
        check(
            f,
            "Hi <tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_",
            "Hi",
            "",
            &[call("f", r#"{"a":1}"#)],
        );
        let cut = "x <tool_call>\n{\"name\": \"f\", \"argu";
        check(f, cut, cut, "", &[]);
        // Marker look-alikes are text.
        let text = "a < b, <tool and <tool_cal> are text\n";
        check(f, text, text, "", &[]);
        check(f, "", "", "", &[]);
    }

    #[test]
    fn glm45_key_value_calls() {
        let f = ToolFormat::Glm45;
        check(
            f,
            "I'll look.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n<arg_key>opts</arg_key>\n<arg_value>{\"unit\": \"C\", \"x\": true}</arg_value>\n</tool_call>\n<tool_call>get_time\n</tool_call>",
            "I'll look.",
            "",
            &[
                call("get_weather", r#"{"city":"Paris","days":3,"opts":{"unit":"C","x":true}}"#),
                call("get_time", "{}"),
            ],
        );
        // A value that is not JSON is a string, kept as written.
        check(
            f,
            "<tool_call>note\n<arg_key>text</arg_key>\n<arg_value>a < b {</arg_value>\n</tool_call>",
            "",
            "",
            &[call("note", r#"{"text":"a < b {"}"#)],
        );
        for bad in [
            "<tool_call>get weather\n</tool_call>",
            "<tool_call>f\n<arg_key>a</arg_key>\n</tool_call>",
            "<tool_call>f\n<arg_key>a</arg_key><arg_value>1</arg_value>junk</tool_call>",
            "<tool_call>f\n<arg_key>a</arg_key>\n<arg_value>Par",
        ] {
            check(f, bad, bad, "", &[]);
        }
    }

    #[test]
    fn mistral_list_and_args_forms() {
        let f = ToolFormat::Mistral;
        check(
            f,
            "Sure. [TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}, {\"name\": \"get_time\", \"arguments\": {}}]",
            "Sure.",
            "",
            &[call("get_weather", r#"{"city":"Paris"}"#), call("get_time", "{}")],
        );
        check(
            f,
            "[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {\"n\": 0.5}}]",
            "",
            "",
            &[call("f", r#"{"n":0.5}"#)],
        );
        check(
            f,
            "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"}[TOOL_CALLS]get_time[CALL_ID]a1B2c3D4e[ARGS]{} ok",
            "ok",
            "",
            &[call("get_weather", r#"{"city":"Paris"}"#), call("get_time", "{}")],
        );
        for bad in [
            "[TOOL_CALLS] [{\"name\": \"f\", \"argum",
            "[TOOL_CALLS] not a call",
            "[TOOL_CALLS] []",
            "x [TOOL_CALLS]f[ARGS][1]",
            "[TOOL_CALLS]f[ARGS]{\"a\": ",
            "[TOOL_CALLS]",
        ] {
            check(f, bad, bad, "", &[]);
        }
    }

    #[test]
    fn deepseek_v3_and_v31_blocks() {
        check(
            ToolFormat::DeepSeekV3,
            "Checking.\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
            "Checking.",
            "",
            &[call("get_weather", r#"{"city":"Paris"}"#), call("get_time", "{}")],
        );
        check(
            ToolFormat::DeepSeekV31,
            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Paris\"}<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
            "",
            "",
            &[call("get_weather", r#"{"city":"Paris"}"#), call("get_time", "{}")],
        );
        // A bad call inside the block is content, the good one a call.
        let bad =
            "<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{bad\n```<｜tool▁call▁end｜>";
        check(
            ToolFormat::DeepSeekV3,
            &format!("<｜tool▁calls▁begin｜>{bad}<｜tool▁call▁begin｜>function<｜tool▁sep｜>g\n```json\n{{\"a\": 1}}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
            bad,
            "",
            &[call("g", r#"{"a":1}"#)],
        );
        // Cut off inside a call: valid JSON is a call, else the call text is content.
        check(
            ToolFormat::DeepSeekV31,
            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{\"a\": 2}<｜tool▁call",
            "",
            "",
            &[call("f", r#"{"a":2}"#)],
        );
        check(
            ToolFormat::DeepSeekV31,
            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{\"a\": \"Pa",
            "<｜tool▁call▁begin｜>f<｜tool▁sep｜>{\"a\": \"Pa",
            "",
            &[],
        );
        let stray = "x <｜tool▁calls▁begin｜> y";
        check(ToolFormat::DeepSeekV31, stray, stray, "", &[]);
    }

    #[test]
    fn harmony_channels_and_calls() {
        let f = ToolFormat::Harmony;
        check(
            f,
            "<|channel|>analysis<|message|>User wants weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\":\"Paris\"}",
            "",
            "User wants weather.",
            &[call("get_weather", r#"{"city":"Paris"}"#)],
        );
        check(
            f,
            "<|channel|>analysis<|message|>2+2<|end|><|start|>assistant<|channel|>final<|message|>The answer is 4.",
            "The answer is 4.",
            "2+2",
            &[],
        );
        check(
            f,
            " to=functions.get_time<|channel|>commentary json<|message|>{}<|call|>",
            "",
            "",
            &[call("get_time", "{}")],
        );
        check(
            f,
            "<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant to=functions.f<|channel|>commentary json<|message|>{\"a\": [1, {\"b\": null}]}<|call|>",
            "Checking.",
            "",
            &[call("f", r#"{"a":[1,{"b":null}]}"#)],
        );
        // A call body that is not a JSON object is content.
        check(
            f,
            "<|channel|>commentary to=functions.f <|constrain|>json<|message|>{oops",
            "{oops",
            "",
            &[],
        );
        let plain = "Just text, no channels. <|end|>";
        check(f, plain, plain, "", &[]);
        check(f, "an answer", "an answer", "", &[]);
        let cut = "<|channel|>analys";
        check(f, cut, cut, "", &[]);
    }

    #[test]
    fn arguments_are_normalised_in_both_paths() {
        let text = "<tool_call>\n{\"name\": \"f\", \"arguments\": {  \"b\" :1 ,\n \"a\":\"\\u00e9\" }}\n</tool_call>";
        let parsed = assert_stream_matches(ToolFormat::Hermes, text);
        let expected = serde_json::to_string(&json!({"b": 1, "a": "é"})).expect("json");
        assert_eq!(parsed.calls[0].arguments, expected);
    }

    #[test]
    fn detect_picks_each_family() {
        let qwen = r#"{%- if tools %}{{- '<|im_start|>system\n# Tools\n<tools>' }}{%- for tool in tools %}{{- tool | tojson }}{%- endfor %}{{- '</tools>\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' }}{%- endif %}"#;
        let glm = r#"{%- if tools %}<|system|>\n# Tools\n{% for tool in tools %}{{ tool | tojson }}{% endfor %}\nFormat: <tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}</arg_value>\n</tool_call>{%- endif %}"#;
        let mistral = r#"{%- if tools %}[AVAILABLE_TOOLS] {{ tools | tojson }}[/AVAILABLE_TOOLS]{%- endif %}{%- for m in messages %}{%- if m.tool_calls %}[TOOL_CALLS] {{ m.tool_calls | tojson }}{%- endif %}{%- endfor %}"#;
        let ds3 = r#"{%- for tool in message['tool_calls'] %}{{- '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>' }}{%- endfor %}"#;
        let ds31 = r#"{%- for tool in message['tool_calls'] %}{{- '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['function']['name'] + '<｜tool▁sep｜>' + tool['function']['arguments'] + '<｜tool▁call▁end｜>' }}{%- endfor %}"#;
        let harmony = r#"{%- for m in messages %}<|start|>assistant<|channel|>commentary to=functions.{{ m.name }} <|constrain|>json<|message|>{{ m.args }}<|call|>{%- endfor %}"#;
        let plain = r#"{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}"#;
        assert_eq!(ToolFormat::detect(qwen), Some(ToolFormat::Hermes));
        assert_eq!(ToolFormat::detect(glm), Some(ToolFormat::Glm45));
        assert_eq!(ToolFormat::detect(mistral), Some(ToolFormat::Mistral));
        assert_eq!(ToolFormat::detect(ds3), Some(ToolFormat::DeepSeekV3));
        assert_eq!(ToolFormat::detect(ds31), Some(ToolFormat::DeepSeekV31));
        assert_eq!(ToolFormat::detect(harmony), Some(ToolFormat::Harmony));
        assert_eq!(ToolFormat::detect(plain), None);
        let names: Vec<&str> = ALL.iter().map(|f| f.name()).collect();
        assert_eq!(
            names,
            [
                "hermes",
                "glm45",
                "mistral",
                "deepseek_v3",
                "deepseek_v31",
                "harmony"
            ]
        );
    }

    /// A small xorshift generator: fixed seed, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    const FRAGMENTS: &[&str] = &[
        "<tool_call>",
        "</tool_call>",
        "<tool_",
        "</tool",
        "<arg_key>",
        "</arg_key>",
        "<arg_value>",
        "</arg_value>",
        "[TOOL_CALLS]",
        "[TOOL_",
        "[ARGS]",
        "[CALL_ID]",
        "<｜tool▁calls▁begin｜>",
        "<｜tool▁calls▁end｜>",
        "<｜tool▁call▁begin｜>",
        "<｜tool▁call▁end｜>",
        "<｜tool▁sep｜>",
        "<｜tool",
        "function",
        "```json",
        "```",
        "<|start|>",
        "assistant",
        "<|channel|>",
        "analysis",
        "final",
        "commentary",
        " to=functions.f",
        "to=",
        " <|constrain|>json",
        "<|message|>",
        "<|end|>",
        "<|call|>",
        "<|return|>",
        "<|",
        "{\"name\": \"f\", \"arguments\": {\"a\": 1}}",
        "{\"name\": \"g\"}",
        "{\"a\": [1, 2.5e-3, null]}",
        "{",
        "}",
        "[",
        "]",
        "\"",
        "\\",
        ":",
        ",",
        "get_weather",
        "f",
        " ",
        "\n",
        "\t",
        "é",
        "🔵",
        "text",
        "1.",
        "-",
        "tru",
        "\"x",
        "{\"a\": \"",
        "[{\"name\": \"f\"}]",
    ];

    #[test]
    fn garbled_input_never_panics_and_streams_like_parse() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let samples: Vec<String> = ALL
            .iter()
            .map(|&f| {
                let (weather, time, open, sep, close) = call_texts(f);
                match f {
                    ToolFormat::Harmony => format!(
                        "<|channel|>analysis<|message|>hm<|end|><|start|>assistant{weather}<|call|>"
                    ),
                    _ => format!("Hi. {open}{weather}{sep}{time}{close} bye"),
                }
            })
            .collect();
        let mut calls_seen = [0usize; 6];
        for case in 0..6000 {
            let which = case % ALL.len();
            let format = ALL[which];
            let text: String = if (case / ALL.len()).is_multiple_of(2) {
                // Random marker fragments.
                let n = 1 + rng.below(14);
                (0..n)
                    .map(|_| FRAGMENTS[rng.below(FRAGMENTS.len())])
                    .collect()
            } else {
                // A valid sample with a few random edits: cut, inserted fragment, repeat.
                let mut t = samples[which].clone();
                for _ in 0..1 + rng.below(3) {
                    let bounds: Vec<usize> =
                        t.char_indices().map(|(i, _)| i).chain([t.len()]).collect();
                    let mut a = bounds[rng.below(bounds.len())];
                    let mut b = bounds[rng.below(bounds.len())];
                    if a > b {
                        std::mem::swap(&mut a, &mut b);
                    }
                    t = match rng.below(3) {
                        0 => format!("{}{}", &t[..a], &t[b..]),
                        1 => format!(
                            "{}{}{}",
                            &t[..a],
                            FRAGMENTS[rng.below(FRAGMENTS.len())],
                            &t[a..]
                        ),
                        _ => format!("{}{}", &t[..b], &t[a..]),
                    };
                }
                t
            };
            let whole = format.parse(&text);
            calls_seen[which] += whole.calls.len();
            // Three pieces cut at random char boundaries, and one char at a time.
            let bounds: Vec<usize> = text
                .char_indices()
                .map(|(i, _)| i)
                .chain([text.len()])
                .collect();
            let mut cuts = [
                bounds[rng.below(bounds.len())],
                bounds[rng.below(bounds.len())],
            ];
            cuts.sort_unstable();
            let pieces = [&text[..cuts[0]], &text[cuts[0]..cuts[1]], &text[cuts[1]..]];
            assert_eq!(
                stream(format, &pieces),
                whole,
                "{format:?}: {text:?} cut at {cuts:?}"
            );
            let chars: Vec<String> = text.chars().map(String::from).collect();
            let chars: Vec<&str> = chars.iter().map(String::as_str).collect();
            assert_eq!(
                stream(format, &chars),
                whole,
                "{format:?} char by char: {text:?}"
            );
            for c in &whole.calls {
                assert!(serde_json::from_str::<Map<String, Value>>(&c.arguments).is_ok());
            }
        }
        // The edited samples do reach the call paths of every format.
        for (f, n) in ALL.iter().zip(calls_seen) {
            assert!(n > 100, "{f:?}: only {n} calls parsed");
        }
    }

    // ---- grammars ----

    fn tools() -> Vec<ToolSpec> {
        vec![
            ToolSpec {
                name: "get_weather".into(),
                parameters: json!({
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                    "required": ["city"]
                }),
            },
            ToolSpec {
                name: "get_time".into(),
                parameters: Value::Null,
            },
        ]
    }

    fn factory(env: &TokEnv) -> ParserFactory {
        let mut f = ParserFactory::new_simple(env).expect("parser factory");
        f.quiet();
        f
    }

    /// Feeds `tokens`; the index of the first one the grammar refuses, or None when all pass.
    fn feed(m: &mut Matcher, tokens: &[u32]) -> Option<usize> {
        for (i, &t) in tokens.iter().enumerate() {
            let mask = m.compute_mask_or_eos().expect("mask");
            if !mask.is_allowed(t) {
                return Some(i);
            }
            m.consume_token(t).expect("consume");
        }
        None
    }

    fn bytes(text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    fn matcher(fact: &ParserFactory, grammar: &str) -> Matcher {
        let parser = fact.create_parser(TopLevelGrammar::from_lark(grammar.to_string()));
        let m = Matcher::new(parser);
        assert!(
            !m.is_error(),
            "grammar does not compile: {:?}\n{grammar}",
            m.get_error()
        );
        m
    }

    /// `text` is admitted to the end, after which EOS is (and, with `only_eos`, nothing else).
    fn assert_admits(
        fact: &ParserFactory,
        grammar: &str,
        tokens: &[u32],
        only_eos: bool,
        what: &str,
    ) {
        let mut m = matcher(fact, grammar);
        assert_eq!(feed(&mut m, tokens), None, "{what} refused\n{grammar}");
        assert!(
            m.is_accepting().expect("accepting"),
            "{what} not complete\n{grammar}"
        );
        let mask = m.compute_mask_or_eos().expect("mask");
        let eos = fact.tok_env().tok_trie().eos_token();
        assert!(
            mask.is_allowed(eos) && (!only_eos || mask.num_set() == 1),
            "{what}: more than EOS allowed after the call"
        );
    }

    fn assert_refuses_at(
        fact: &ParserFactory,
        grammar: &str,
        tokens: &[u32],
        at: usize,
        what: &str,
    ) {
        let mut m = matcher(fact, grammar);
        assert_eq!(feed(&mut m, tokens), Some(at), "{what}\n{grammar}");
    }

    /// One valid call text per format, for tool `get_weather` (city Paris, days 3) and
    /// `get_time` (no arguments), and how two calls are joined.
    fn call_texts(
        format: ToolFormat,
    ) -> (String, String, &'static str, &'static str, &'static str) {
        match format {
            ToolFormat::Hermes => (
                "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 3}}\n</tool_call>".into(),
                "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>".into(),
                "",
                "\n",
                "",
            ),
            ToolFormat::Glm45 => (
                "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>".into(),
                "<tool_call>get_time\n<arg_key>zone</arg_key>\n<arg_value>UTC+1</arg_value>\n</tool_call>".into(),
                "",
                "\n",
                "",
            ),
            ToolFormat::Mistral => (
                "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 3}}".into(),
                "{\"name\": \"get_time\", \"arguments\": {}}".into(),
                "[TOOL_CALLS] [",
                ", ",
                "]",
            ),
            ToolFormat::DeepSeekV3 => (
                "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\", \"days\": 3}\n```<｜tool▁call▁end｜>".into(),
                "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{}\n```<｜tool▁call▁end｜>".into(),
                "<｜tool▁calls▁begin｜>",
                "\n",
                "<｜tool▁calls▁end｜>",
            ),
            ToolFormat::DeepSeekV31 => (
                "<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Paris\", \"days\": 3}<｜tool▁call▁end｜>".into(),
                "<｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{}<｜tool▁call▁end｜>".into(),
                "<｜tool▁calls▁begin｜>",
                "",
                "<｜tool▁calls▁end｜>",
            ),
            ToolFormat::Harmony => (
                "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\":\"Paris\",\"days\":3}".into(),
                "<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>{}".into(),
                "",
                "",
                "",
            ),
        }
    }

    /// GLM writes string values raw: their `maxLength` / `minLength` and `enum` still hold.
    #[test]
    fn glm_raw_strings_keep_their_length_and_enum() {
        let env = ApproximateTokEnv::single_byte_env();
        let fact = factory(&env);
        let tools = [ToolSpec {
            name: "f".into(),
            parameters: json!({"type": "object", "properties": {
                "s": {"type": "string", "minLength": 1, "maxLength": 3},
                "u": {"type": "string", "enum": ["c", "f"]}},
                "required": ["s", "u"]}),
        }];
        let g = ToolFormat::Glm45.call_grammar(&tools, false);
        let text = |s: &str, u: &str| {
            format!("<tool_call>f\n<arg_key>s</arg_key>\n<arg_value>{s}</arg_value>\n<arg_key>u</arg_key>\n<arg_value>{u}</arg_value>\n</tool_call>")
        };
        assert_admits(&fact, &g, &bytes(&text("abc", "f")), true, "in bounds");
        let head = "<tool_call>f\n<arg_key>s</arg_key>\n<arg_value>".len();
        // A fourth character, where only the closing tag may come.
        assert_refuses_at(&fact, &g, &bytes(&text("abcd", "f")), head + 3, "too long");
        // An empty value: the closing tag cannot come first (it may be read as the value's
        // first characters, so the refusal comes a little later).
        let mut m = matcher(&fact, &g);
        assert!(feed(&mut m, &bytes(&text("", "f"))).is_some(), "too short");
        let at =
            text("abc", "").find("<arg_key>u").unwrap() + "<arg_key>u</arg_key>\n<arg_value>".len();
        assert_refuses_at(&fact, &g, &bytes(&text("abc", "x")), at, "not in the enum");
        assert_eq!(
            ToolFormat::Glm45.parse(&text("abc", "f")).calls,
            [call("f", r#"{"s":"abc","u":"f"}"#)]
        );
    }

    #[test]
    fn grammars_admit_exactly_the_calls() {
        let env = ApproximateTokEnv::single_byte_env();
        let fact = factory(&env);
        let tools = tools();
        for format in ALL {
            let (weather, time, open, sep, close) = call_texts(format);
            let one = format.call_grammar(&tools, false);
            let many = format.call_grammar(&tools, true);
            let single = format!("{open}{weather}{close}");
            let double = format!("{open}{weather}{sep}{time}{close}");
            // After a closed list (or Harmony's one call) only EOS may come; else another call.
            let closed = !close.is_empty() || format == ToolFormat::Harmony;
            assert_admits(
                &fact,
                &one,
                &bytes(&single),
                true,
                &format!("{format:?} one call"),
            );
            assert_admits(
                &fact,
                &many,
                &bytes(&single),
                closed,
                &format!("{format:?} one call, parallel"),
            );
            // What the grammar admits parses back to the call.
            let parsed = format.parse(&single);
            assert_eq!(
                parsed.calls,
                [call("get_weather", r#"{"city":"Paris","days":3}"#)],
                "{format:?}"
            );
            assert_eq!(parsed.content, "", "{format:?}");
            if format != ToolFormat::Harmony {
                assert_admits(
                    &fact,
                    &many,
                    &bytes(&double),
                    closed,
                    &format!("{format:?} two calls"),
                );
                assert_eq!(format.parse(&double).calls.len(), 2, "{format:?}");
                // Without `parallel`, the second call is refused where it leaves the one-call
                // text (DeepSeek's call and block markers share a prefix).
                let at = single
                    .bytes()
                    .zip(double.bytes())
                    .position(|(x, y)| x != y)
                    .unwrap_or(single.len());
                assert!(at >= format!("{open}{weather}").len());
                assert_refuses_at(
                    &fact,
                    &one,
                    &bytes(&double),
                    at,
                    &format!("{format:?} second call"),
                );
            }
            // A wrong tool name is refused at its first wrong byte.
            let wrong = single.replacen("get_weather", "get_wind", 1);
            let at = single.find("get_weather").expect("name") + "get_w".len();
            assert_refuses_at(
                &fact,
                &one,
                &bytes(&wrong),
                at,
                &format!("{format:?} wrong name"),
            );
            // Arguments against the schema (days must be an integer) are refused at the value.
            let bad = single.replacen("3", "x", 1);
            let at = single.find('3').expect("days");
            assert_refuses_at(
                &fact,
                &one,
                &bytes(&bad),
                at,
                &format!("{format:?} bad arguments"),
            );
            // Free whitespace is refused.
            if format != ToolFormat::Glm45 {
                let loose = single.replacen("\"Paris\"", " \"Paris\"", 1);
                let at = single.find("\"Paris\"").expect("city");
                assert_refuses_at(
                    &fact,
                    &one,
                    &bytes(&loose),
                    at,
                    &format!("{format:?} loose space"),
                );
            }
            // Content before the call is refused.
            assert_refuses_at(
                &fact,
                &one,
                &bytes(&format!("Hi{single}")),
                0,
                &format!("{format:?} content"),
            );
        }
    }

    #[test]
    fn grammar_requires_required_arguments_and_escapes_names() {
        let env = ApproximateTokEnv::single_byte_env();
        let fact = factory(&env);
        let g = ToolFormat::Hermes.call_grammar(&tools(), false);
        let text =
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"days\": 3}}\n</tool_call>";
        let at = text.find("\"days\"").expect("days") + 1;
        assert_refuses_at(&fact, &g, &bytes(text), at, "missing required city");
        let g = ToolFormat::Glm45.call_grammar(&tools(), false);
        let text = "<tool_call>get_weather\n<arg_key>days</arg_key>";
        let at = text.find("days").expect("days");
        assert_refuses_at(&fact, &g, &bytes(text), at, "GLM missing required city");
        // A property's `$ref` into the tool's definitions resolves.
        let defs = [ToolSpec {
            name: "f".into(),
            parameters: json!({
                "type": "object",
                "$defs": {"n": {"type": "integer"}, "s": {"type": "string"}},
                "properties": {"a": {"$ref": "#/$defs/n"}, "b": {"$ref": "#/$defs/s"}},
                "required": ["a", "b"]
            }),
        }];
        let g = ToolFormat::Glm45.call_grammar(&defs, false);
        let text = "<tool_call>f\n<arg_key>a</arg_key>\n<arg_value>7</arg_value>\n<arg_key>b</arg_key>\n<arg_value>raw text</arg_value>\n</tool_call>";
        assert_admits(&fact, &g, &bytes(text), true, "GLM $ref");
        let bad = text.replacen('7', "x", 1);
        assert_refuses_at(
            &fact,
            &g,
            &bytes(&bad),
            text.find('7').expect("7"),
            "GLM $ref integer",
        );
        // Odd names and no tools still make grammars that compile.
        let odd = vec![ToolSpec {
            name: "we\"ird\\na\u{7f}me".into(),
            parameters: json!({}),
        }];
        for format in ALL {
            matcher(&fact, &format.call_grammar(&odd, true));
            matcher(&fact, &format.call_grammar(&[], true));
        }
    }

    #[test]
    fn grammar_text_is_as_documented() {
        let time = [ToolSpec {
            name: "get_time".into(),
            parameters: json!({}),
        }];
        let sep = r#""x-guidance":{"whitespace_flexible":false,"item_separator":", ","key_separator":": "}"#;
        let hermes = [
            r#"start: call ("\n" call)*"#.to_string(),
            "call: call_0".into(),
            format!(r#"args_0: %json {{{sep},"type":"object"}}"#),
            r#"call_0: "<tool_call>\n{\"name\": \"get_time\", \"arguments\": " args_0 "}\n</tool_call>""#.into(),
        ];
        assert_eq!(
            ToolFormat::Hermes.call_grammar(&time, true),
            hermes.join("\n") + "\n"
        );
        let glm = [
            "start: call".to_string(),
            "call: call_0 | call_1".into(),
            r#"glm_0_0: "\n<arg_key>city</arg_key>\n<arg_value>" GLM_STR"#.into(),
            format!(r#"glm_0_1_v: %json {{"type":"integer",{sep}}}"#),
            r#"glm_0_1: "\n<arg_key>days</arg_key>\n<arg_value>" glm_0_1_v "</arg_value>""#.into(),
            r#"call_0: "<tool_call>get_weather" glm_0_0 glm_0_1? "\n</tool_call>""#.into(),
            r#"call_1: "<tool_call>get_time" glm_any* "\n</tool_call>""#.into(),
            r#"glm_any: "\n<arg_key>" GLM_KEY "</arg_key>\n<arg_value>" GLM_STR"#.into(),
            r"GLM_KEY: /[^<>\s]+/".into(),
            r"GLM_STR: /(?s:.*)<\/arg_value>/ & ~/(?s:.*)<\/arg_value>(?s:.+)/".into(),
        ];
        assert_eq!(
            ToolFormat::Glm45.call_grammar(&tools(), false),
            glm.join("\n") + "\n"
        );
        let compact = sep.replace(", ", ",").replace(": ", ":");
        let harmony = [
            "start: call".to_string(),
            "call: call_0".into(),
            format!(r#"args_0: %json {{{compact},"type":"object"}}"#),
            r#"call_0: <|channel|> "commentary to=functions.get_time " <|constrain|> "json" <|message|> args_0"#.into(),
        ];
        assert_eq!(
            ToolFormat::Harmony.call_grammar_special_tokens(&time, false),
            harmony.join("\n") + "\n"
        );
    }

    /// A byte-level environment that also has the formats' special tokens.
    fn env_with_specials(specials: &[&str]) -> TokEnv {
        let mut words: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for s in specials {
            let mut w = vec![0xFFu8];
            w.extend_from_slice(s.as_bytes());
            words.push(w);
        }
        words.push(b"\xFF<|eos|>".to_vec());
        let info = TokRxInfo {
            vocab_size: words.len() as u32,
            tok_eos: words.len() as u32 - 1,
            tok_bos: None,
            tok_pad: None,
            tok_unk: None,
            tok_end_of_turn: None,
        };
        Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &words)))
    }

    /// `text` as tokens: each special marker one token, everything else bytes.
    fn tokens(text: &str, specials: &[&str]) -> Vec<u32> {
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            if let Some((i, s)) = specials
                .iter()
                .enumerate()
                .find(|(_, s)| rest.starts_with(**s))
            {
                out.push(256 + i as u32);
                rest = &rest[s.len()..];
            } else {
                let c = rest.chars().next().expect("non-empty");
                out.extend(bytes(&rest[..c.len_utf8()]));
                rest = &rest[c.len_utf8()..];
            }
        }
        out
    }

    /// The markers a test vocabulary holds as single special tokens (ids 256, 257, ...).
    const MARKER_TOKENS: [&str; 11] = [
        DS_CALLS_BEGIN,
        DS_CALLS_END,
        DS_CALL_BEGIN,
        DS_CALL_END,
        DS_SEP,
        H_CHANNEL,
        H_CONSTRAIN,
        H_MESSAGE,
        MISTRAL_CALLS,
        TOOL_CALL_OPEN,
        TOOL_CALL_CLOSE,
    ];

    /// With token ids, every marker the vocabulary has as one token is that token, in every
    /// format: Mistral's `[TOOL_CALLS]` and Hermes' `<tool_call>` included.
    #[test]
    fn token_id_grammars_take_each_format_s_marker_tokens() {
        let specials = MARKER_TOKENS;
        let env = env_with_specials(&specials);
        let fact = factory(&env);
        let id = |m: &str| {
            specials
                .iter()
                .position(|s| *s == m)
                .map(|i| 256 + i as u32)
        };
        for format in ALL {
            let (weather, _, open, _, close) = call_texts(format);
            let text = format!("{open}{weather}{close}");
            let g = format.call_grammar_tokens(&tools(), false, &id);
            assert_admits(
                &fact,
                &g,
                &tokens(&text, &specials),
                true,
                &format!("{format:?} ids"),
            );
            assert!(g.contains("<["), "{format:?}: {g}");
            // The first marker spelled out in bytes is refused.
            assert_refuses_at(&fact, &g, &bytes(&text), 0, &format!("{format:?} spelled"));
        }
        // Markers the vocabulary lacks stay text: the spelled grammar.
        for format in ALL {
            assert_eq!(
                format.call_grammar_tokens(&tools(), true, &|_| None),
                format.call_grammar(&tools(), true)
            );
        }
    }

    #[test]
    fn special_token_grammars_take_the_tokens_not_their_spelling() {
        let specials = MARKER_TOKENS;
        let env = env_with_specials(&specials);
        let fact = factory(&env);
        for format in [
            ToolFormat::DeepSeekV3,
            ToolFormat::DeepSeekV31,
            ToolFormat::Harmony,
        ] {
            let (weather, _, open, _, close) = call_texts(format);
            let text = format!("{open}{weather}{close}");
            let g = format.call_grammar_special_tokens(&tools(), false);
            assert_admits(
                &fact,
                &g,
                &tokens(&text, &specials),
                true,
                &format!("{format:?} special"),
            );
            // The marker spelled out in bytes is refused.
            assert_refuses_at(&fact, &g, &bytes(&text), 0, &format!("{format:?} spelled"));
        }
        // Formats without nameable markers are the same either way.
        for format in [ToolFormat::Hermes, ToolFormat::Glm45, ToolFormat::Mistral] {
            assert_eq!(
                format.call_grammar(&tools(), true),
                format.call_grammar_special_tokens(&tools(), true)
            );
        }
    }
}
