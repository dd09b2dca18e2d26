//! Tool calling and structured output on the chat route: the request's `tools` / `functions`,
//! `tool_choice` / `function_call`, `parallel_tool_calls` and `response_format` turned into
//! template variables and a grammar; the history's tool turns turned into template messages;
//! and each choice's output split into reasoning, content and tool calls ([`ReplySplit`]).
//!
//! Invariants:
//! - A request with tools reaches a model only when its chat template renders tools in a format
//!   we parse ([`ToolFormat::detect`]); otherwise it is a 400 saying so. `tool_choice: "none"`
//!   hides the tools from the model.
//! - `tool_choice: "required"` or a named function constrains decoding to the template's call
//!   form with arguments valid against the function's schema, so the reply IS such a call (one,
//!   or one or more when `parallel_tool_calls` is not false); `response_format` `json_object` /
//!   `json_schema` constrains the reply to JSON (valid against the schema). A forced grammar
//!   turns the thinking split off: the reply starts with the constrained text.
//! - The streamed deltas of a choice concatenate to its whole-response message: the same
//!   [`ReplySplit`] runs in both.
//! - A request with the legacy `functions` gets the legacy reply: one `function_call` (name and
//!   arguments) and `finish_reason: "function_call"`, as OpenAI answers it.

use moe_runtime::constrain::Grammar;
use moe_runtime::toolcall::{ToolDelta, ToolFormat, ToolSpec, ToolStream};
use moe_runtime::ChatMessage;
use serde_json::{json, Value};

use super::errors::ApiError;
use super::openai::ThinkSplit;

/// Most tools one request may offer: each is a schema the grammar engine may compile.
const MAX_TOOLS: usize = 128;

/// Which tool the model must call.
#[derive(Clone, Debug, PartialEq)]
pub enum ToolChoice {
    /// No call: the tools are not shown to the model.
    None,
    /// The model decides; its calls are parsed from what it writes.
    Auto,
    /// At least one call, to any tool (constrained).
    Required,
    /// A call to this function (constrained).
    Named(String),
}

/// The tools of a request, normalised to OpenAI's `{"type": "function", "function": {..}}`.
#[derive(Clone, Debug)]
pub struct Tools {
    /// What the chat template receives as `tools`.
    pub defs: Vec<Value>,
    pub specs: Vec<ToolSpec>,
    pub choice: ToolChoice,
    /// More than one call allowed (`parallel_tool_calls`, default true).
    pub parallel: bool,
    /// Offered as the legacy `functions`: the reply is a `function_call` (one call).
    pub legacy: bool,
}

/// The tool fields of a chat request, as sent.
#[derive(Clone, Copy)]
pub struct ToolFields<'a> {
    pub tools: Option<&'a Value>,
    pub functions: Option<&'a Value>,
    pub tool_choice: Option<&'a Value>,
    pub function_call: Option<&'a Value>,
    pub parallel_tool_calls: Option<&'a Value>,
}

impl Tools {
    /// The request's tools, or `None` when it offers none. Every error names its field.
    pub fn from_request(f: &ToolFields<'_>) -> Result<Option<Tools>, ApiError> {
        let (list, field, legacy) = match (given(f.tools), given(f.functions)) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request(
                    "give `tools` or the legacy `functions`, not both",
                )
                .param("functions"))
            }
            (Some(t), None) => (t, "tools", false),
            (None, Some(t)) => (t, "functions", true),
            (None, None) => {
                // A choice that needs a tool, without tools, cannot be honoured.
                for (name, v) in [
                    ("tool_choice", given(f.tool_choice)),
                    ("function_call", given(f.function_call)),
                ] {
                    if let Some(v) = v {
                        if !matches!(v.as_str(), Some("none") | Some("auto")) {
                            return Err(ApiError::bad_request(format!(
                                "`{name}` names a tool but the request offers none"
                            ))
                            .param(name));
                        }
                    }
                }
                return Ok(None);
            }
        };
        let Some(items) = list.as_array() else {
            return Err(ApiError::bad_request(format!("`{field}` must be a list")).param(field));
        };
        if items.is_empty() {
            // An empty list offers nothing: as if none were given.
            return Tools::from_request(&ToolFields {
                tools: None,
                functions: None,
                ..*f
            });
        }
        if items.len() > MAX_TOOLS {
            return Err(ApiError::bad_request(format!(
                "at most {MAX_TOOLS} tools per request, got {}",
                items.len()
            ))
            .param(field));
        }
        let mut defs = Vec::with_capacity(items.len());
        let mut specs = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let at = format!("{field}[{i}]");
            let function = if legacy {
                item
            } else {
                match item.get("type").and_then(Value::as_str) {
                    Some("function") => {}
                    Some(other) => {
                        return Err(ApiError::bad_request(format!(
                            "`{at}.type` is `{other}`: only `function` tools are supported"
                        ))
                        .param(field))
                    }
                    None => {
                        return Err(ApiError::bad_request(format!(
                            "`{at}.type` is missing: it must be `function`"
                        ))
                        .param(field))
                    }
                }
                item.get("function").ok_or_else(|| {
                    ApiError::bad_request(format!("`{at}.function` is missing")).param(field)
                })?
            };
            let name = function.get("name").and_then(Value::as_str).unwrap_or("");
            if !valid_name(name) {
                return Err(ApiError::bad_request(format!(
                    "`{at}` needs a `name` of 1 to 64 letters, digits, `_`, `-` or `.`, got {name:?}"
                ))
                .param(field));
            }
            let parameters = function.get("parameters").cloned().unwrap_or(Value::Null);
            if !(parameters.is_null() || parameters.is_object()) {
                return Err(ApiError::bad_request(format!(
                    "`{at}.parameters` must be a JSON schema object"
                ))
                .param(field));
            }
            defs.push(json!({"type": "function", "function": function}));
            specs.push(ToolSpec {
                name: name.to_string(),
                parameters,
            });
        }
        let choice = match (given(f.tool_choice), given(f.function_call)) {
            (Some(c), _) => parse_choice(c, "tool_choice", &specs)?,
            (None, Some(c)) => parse_choice(c, "function_call", &specs)?,
            (None, None) => ToolChoice::Auto,
        };
        let parallel = match given(f.parallel_tool_calls) {
            None => !legacy,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(
                    ApiError::bad_request("`parallel_tool_calls` must be true or false")
                        .param("parallel_tool_calls"),
                )
            }
        };
        Ok(Some(Tools {
            defs,
            specs,
            choice,
            parallel: parallel && !legacy,
            legacy,
        }))
    }

    /// The tools are shown to the model (any choice but `none`).
    pub fn shown(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The call grammars for a forced choice: first with each marker the model's vocabulary
    /// has as one token (`token_id`) written as that token, then all spelled out; `None` when
    /// the model chooses.
    pub fn grammars(
        &self,
        format: ToolFormat,
        token_id: &dyn Fn(&str) -> Option<u32>,
    ) -> Option<[Grammar; 2]> {
        let (specs, parallel) = match &self.choice {
            ToolChoice::None | ToolChoice::Auto => return None,
            ToolChoice::Required => (self.specs.clone(), self.parallel),
            ToolChoice::Named(n) => (
                self.specs
                    .iter()
                    .filter(|s| &s.name == n)
                    .cloned()
                    .collect(),
                false,
            ),
        };
        Some([
            Grammar::Lark(format.call_grammar_tokens(&specs, parallel, token_id)),
            Grammar::Lark(format.call_grammar(&specs, parallel)),
        ])
    }
}

/// A field that was sent with a value (`null` is as good as absent).
fn given(v: Option<&Value>) -> Option<&Value> {
    v.filter(|v| !v.is_null())
}

/// OpenAI's function-name rule.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn parse_choice(v: &Value, field: &str, specs: &[ToolSpec]) -> Result<ToolChoice, ApiError> {
    let named = |name: &str| {
        if specs.iter().any(|s| s.name == name) {
            Ok(ToolChoice::Named(name.to_string()))
        } else {
            Err(ApiError::bad_request(format!(
                "`{field}` names `{name}`, which is not among the request's tools"
            ))
            .param(field))
        }
    };
    match v {
        Value::String(s) => match s.as_str() {
            "none" => Ok(ToolChoice::None),
            "auto" => Ok(ToolChoice::Auto),
            "required" if field == "tool_choice" => Ok(ToolChoice::Required),
            other => Err(ApiError::bad_request(format!(
                "`{field}` must be `none`, `auto`{}, or name a function; got {other:?}",
                if field == "tool_choice" {
                    ", `required`"
                } else {
                    ""
                }
            ))
            .param(field)),
        },
        Value::Object(o) => {
            let name = match o.get("type").and_then(Value::as_str) {
                Some("function") => o.get("function").and_then(|f| f.get("name")),
                Some(other) => {
                    return Err(ApiError::bad_request(format!(
                        "`{field}.type` `{other}` is not supported (only `function`)"
                    ))
                    .param(field))
                }
                // The legacy `function_call: {"name": ..}`.
                None => o.get("name"),
            };
            match name.and_then(Value::as_str) {
                Some(n) => named(n),
                None => Err(
                    ApiError::bad_request(format!("`{field}` must name a function")).param(field),
                ),
            }
        }
        _ => Err(
            ApiError::bad_request(format!("`{field}` must be a string or an object")).param(field),
        ),
    }
}

/// The grammar of a `response_format`: none for text, any JSON object for `json_object`, the
/// schema for `json_schema` (strict or not: the schema is always enforced).
pub fn response_format(v: Option<&Value>) -> Result<Option<Grammar>, ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let bad = |m: String| ApiError::bad_request(m).param("response_format");
    match v.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Grammar::JsonObject)),
        Some("json_schema") => {
            let spec = v
                .get("json_schema")
                .ok_or_else(|| bad("`response_format.json_schema` is missing".into()))?;
            match spec.get("schema") {
                Some(s) if s.is_object() => Ok(Some(Grammar::JsonSchema(s.clone()))),
                // A boolean schema: `true` admits any JSON value.
                Some(Value::Bool(true)) | None => Ok(Some(Grammar::JsonSchema(json!({})))),
                Some(_) => Err(bad(
                    "`response_format.json_schema.schema` must be a JSON schema object".into(),
                )),
            }
        }
        Some(other) => Err(bad(format!(
            "`response_format.type` `{other}` is not supported (`text`, `json_object`, \
             `json_schema`)"
        ))),
        None => Err(bad("`response_format.type` is missing".into())),
    }
}

/// An assistant turn's `tool_calls` (or legacy `function_call`) as the templates read them:
/// `{"id", "type": "function", "function": {"name", "arguments"}}` with the arguments as a
/// JSON object when the string holds one (the form chat templates iterate over), else as sent.
pub fn history_tool_calls(calls: &Value, at: &str) -> Result<Value, ApiError> {
    let bad = |m: String| ApiError::bad_request(m).param("messages");
    let list: Vec<Value> = match calls {
        Value::Array(v) => v.clone(),
        // The legacy single `function_call`.
        Value::Object(_) => vec![json!({"type": "function", "function": calls})],
        _ => return Err(bad(format!("`{at}` must be a list of tool calls"))),
    };
    list.into_iter()
        .enumerate()
        .map(|(i, mut call)| {
            let f = call
                .get_mut("function")
                .and_then(Value::as_object_mut)
                .ok_or_else(|| bad(format!("`{at}[{i}].function` is missing")))?;
            if !f.get("name").is_some_and(Value::is_string) {
                return Err(bad(format!("`{at}[{i}].function.name` is missing")));
            }
            if let Some(Value::String(s)) = f.get("arguments") {
                if let Ok(v @ Value::Object(_)) = serde_json::from_str::<Value>(s) {
                    f.insert("arguments".into(), v);
                }
            }
            if call.get("type").is_none() {
                call["type"] = json!("function");
            }
            Ok(call)
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// A history message with its tool fields for the template.
pub fn with_tool_fields(
    mut m: ChatMessage,
    extra: &serde_json::Map<String, Value>,
    at: &str,
) -> Result<ChatMessage, ApiError> {
    for (key, value) in extra {
        if value.is_null() {
            continue;
        }
        match key.as_str() {
            "tool_calls" | "function_call" => {
                let calls = history_tool_calls(value, &format!("{at}.{key}"))?;
                if calls.as_array().is_some_and(|c| !c.is_empty()) {
                    m = m.with("tool_calls", calls);
                }
            }
            "tool_call_id" | "name" | "reasoning_content" => {
                m = m.with(key.clone(), value.clone());
            }
            _ => {}
        }
    }
    Ok(m)
}

/// How a choice's output is read: a thinking model's `<think>` split and a tool-call format.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReplyKind {
    /// For a thinking model: whether the prompt already opened the think block.
    pub think: Option<bool>,
    /// The format tool calls (and, for Harmony, channels) are parsed in.
    pub format: Option<ToolFormat>,
    /// The request used the legacy `functions`: calls go out as one `function_call`.
    pub legacy: bool,
}

/// One choice's output split into reasoning, content and tool calls as it arrives.
#[derive(Debug, Default)]
pub struct ReplySplit {
    think: Option<ThinkSplit>,
    tools: Option<ToolStream>,
    harmony: bool,
    calls: usize,
}

impl ReplySplit {
    pub fn new(kind: ReplyKind) -> ReplySplit {
        ReplySplit {
            think: kind.think.map(ThinkSplit::new),
            tools: kind.format.map(ToolStream::new),
            harmony: kind.format == Some(ToolFormat::Harmony),
            calls: 0,
        }
    }

    /// The next piece of the output (`end`: the last): what is decided now.
    pub fn push(&mut self, text: &str, end: bool) -> Vec<ToolDelta> {
        let mut out = Vec::new();
        let (reasoning, content) = match &mut self.think {
            None => (String::new(), text.to_string()),
            Some(split) => {
                let (mut r, mut c) = split.push(text);
                if end {
                    let (r2, c2) = split.finish();
                    r.push_str(&r2);
                    c.push_str(&c2);
                }
                (r, c)
            }
        };
        if !reasoning.is_empty() {
            out.push(ToolDelta::Reasoning(reasoning));
        }
        match &mut self.tools {
            None => {
                if !content.is_empty() {
                    out.push(ToolDelta::Content(content));
                }
            }
            Some(stream) => {
                let mut deltas = stream.push(&content);
                if end {
                    deltas.extend(stream.finish());
                }
                for d in &deltas {
                    if let ToolDelta::CallStart { index, .. } = d {
                        self.calls = self.calls.max(index + 1);
                    }
                }
                out.extend(deltas);
            }
        }
        out
    }

    /// Tool calls seen so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Whether the output is read for reasoning (a thinking model, or Harmony's channels).
    pub fn reads_reasoning(&self) -> bool {
        self.think.is_some() || self.harmony
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(tools: &Value, choice: Option<&Value>) -> Result<Option<Tools>, ApiError> {
        Tools::from_request(&ToolFields {
            tools: Some(tools),
            functions: None,
            tool_choice: choice,
            function_call: None,
            parallel_tool_calls: None,
        })
    }

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
    }

    #[test]
    fn tool_choices_parse_and_bad_ones_name_their_field() {
        let t = fields(&weather(), None).unwrap().unwrap();
        assert_eq!(t.choice, ToolChoice::Auto);
        assert!(t.parallel);
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let t = fields(&weather(), Some(&named)).unwrap().unwrap();
        assert_eq!(t.choice, ToolChoice::Named("get_weather".into()));
        assert!(t.grammars(ToolFormat::Hermes, &|_| None).is_some());
        assert!(fields(&weather(), Some(&json!("none")))
            .unwrap()
            .is_some_and(|t| !t.shown()));
        for (tools, choice, want) in [
            (
                weather(),
                json!({"type": "function", "function": {"name": "nope"}}),
                "nope",
            ),
            (weather(), json!("sometimes"), "tool_choice"),
            (
                json!([{"type": "retrieval"}]),
                json!("auto"),
                "only `function`",
            ),
            (
                json!([{"type": "function", "function": {"name": "a b"}}]),
                json!("auto"),
                "name",
            ),
            (json!({"a": 1}), json!("auto"), "must be a list"),
        ] {
            let e = fields(&tools, Some(&choice)).unwrap_err();
            let msg = e.body()["error"]["message"].to_string();
            assert!(msg.contains(want), "{msg}");
        }
        // An empty list with a choice that needs a tool: named, as without tools.
        let e = fields(&json!([]), Some(&json!("required"))).unwrap_err();
        assert!(e.body()["error"]["message"]
            .to_string()
            .contains("tool_choice"));
        assert!(fields(&json!([]), Some(&json!("auto"))).unwrap().is_none());
        // Legacy functions: one call at most, function_call names one.
        let f = json!([{"name": "get_weather", "parameters": {}}]);
        let t = Tools::from_request(&ToolFields {
            tools: None,
            functions: Some(&f),
            tool_choice: None,
            function_call: Some(&json!({"name": "get_weather"})),
            parallel_tool_calls: None,
        })
        .unwrap()
        .unwrap();
        assert_eq!(t.choice, ToolChoice::Named("get_weather".into()));
        assert!(!t.parallel && t.legacy);
        assert_eq!(t.defs[0]["type"], "function");
        assert_eq!(t.defs[0]["function"]["name"], "get_weather");
    }

    #[test]
    fn response_formats_map_to_grammars() {
        assert_eq!(
            response_format(Some(&json!({"type": "text"}))).unwrap(),
            None
        );
        assert_eq!(
            response_format(Some(&json!({"type": "json_object"}))).unwrap(),
            Some(Grammar::JsonObject)
        );
        let s = json!({"type": "object"});
        assert_eq!(
            response_format(Some(&json!({"type": "json_schema", "json_schema": {"name": "x", "schema": s, "strict": true}}))).unwrap(),
            Some(Grammar::JsonSchema(s))
        );
        for bad in [
            json!({"type": "regex"}),
            json!({"type": "json_schema"}),
            json!({"type": "json_schema", "json_schema": {"schema": 3}}),
            json!({}),
        ] {
            assert!(response_format(Some(&bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn history_arguments_become_objects_for_the_template() {
        let calls = json!([{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]);
        let v = history_tool_calls(&calls, "messages[1].tool_calls").unwrap();
        assert_eq!(v[0]["function"]["arguments"]["city"], "Paris");
        // Not JSON: kept as sent.
        let calls = json!([{"function": {"name": "f", "arguments": "oops"}}]);
        let v = history_tool_calls(&calls, "m").unwrap();
        assert_eq!(v[0]["function"]["arguments"], "oops");
        assert_eq!(v[0]["type"], "function");
        assert!(history_tool_calls(&json!([{"function": {}}]), "m").is_err());
        assert!(history_tool_calls(&json!(3), "m").is_err());
    }

    #[test]
    fn the_reply_split_reads_thinking_then_calls() {
        let mut s = ReplySplit::new(ReplyKind {
            think: Some(false),
            format: Some(ToolFormat::Hermes),
            legacy: false,
        });
        let text = "<think>\nhmm\n</think>\n\nSure.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>";
        let mut out = Vec::new();
        for ch in text.chars() {
            out.extend(s.push(&ch.to_string(), false));
        }
        out.extend(s.push("", true));
        let (mut r, mut c, mut names, mut args) =
            (String::new(), String::new(), vec![], String::new());
        for d in out {
            match d {
                ToolDelta::Reasoning(t) => r.push_str(&t),
                ToolDelta::Content(t) => c.push_str(&t),
                ToolDelta::CallStart { name, .. } => names.push(name),
                ToolDelta::Arguments { text, .. } => args.push_str(&text),
            }
        }
        assert_eq!(r, "\nhmm\n");
        assert_eq!(c, "Sure.");
        assert_eq!(names, vec!["f".to_string()]);
        assert_eq!(args, "{\"a\":1}");
        assert_eq!(s.calls(), 1);
    }
}
