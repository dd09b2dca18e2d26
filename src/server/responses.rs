//! `POST /v1/responses`: OpenAI's Responses API, for clients that default to it. Text in (a
//! string, or message items with text parts, after `instructions` as the system message) goes
//! through the model's chat template; text out is one assistant message of one `output_text`
//! part, whole or streamed as the API's named events (`response.created` ...
//! `response.output_text.delta` ... `response.completed`).
//!
//! Invariants: the field policy of the chat route holds here too (a field is honoured, ignored
//! as metadata, or a 400 naming it); a response cut by `max_output_tokens` is `incomplete` with
//! that reason; events carry increasing `sequence_number`s; usage counts input and output
//! tokens as chat's `usage` does.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};
use moe_runtime::batch::{Event, Usage};
use moe_runtime::{ChatMessage, FinishReason, Prompt};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::errors::ApiError;
use super::{admit, encode, new_id, openai, record_usage, submit, unix_now, App, LoggedAtEnd};

const PATH: &str = "/v1/responses";

#[derive(Deserialize, Debug)]
pub struct ResponsesRequest {
    pub model: String,
    pub input: Input,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub stream: Option<bool>,
    /// `{"format": {"type": "text" | "json_object" | "json_schema", ...}}`: the reply's form,
    /// enforced by a grammar as the chat route's `response_format`.
    pub text: Option<Value>,
    /// Every other field (checked by [`FIELDS`]).
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// `input`: a string (one user message) or a list of message items.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Input {
    Text(String),
    Items(Vec<Item>),
}

#[derive(Deserialize, Debug)]
pub struct Item {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub role: Option<String>,
    /// Text, or parts (the chat route's shapes).
    pub content: Option<openai::Content>,
}

/// The Responses API's field policy (as the chat route's, with its own fields).
const FIELDS: openai::FieldPolicy = openai::FieldPolicy {
    metadata: &[
        "user",
        "metadata",
        "store",
        "service_tier",
        "safety_identifier",
        "prompt_cache_key",
    ],
    unsupported: &[
        ("tools", "tool calling is not supported"),
        ("tool_choice", "tool calling is not supported"),
        ("max_tool_calls", "tool calling is not supported"),
        ("reasoning", "reasoning settings are not supported"),
        (
            "previous_response_id",
            "responses are not stored: send the whole conversation as `input`",
        ),
        (
            "conversation",
            "responses are not stored: send the whole conversation as `input`",
        ),
        ("background", "background responses are not supported"),
        (
            "top_logprobs",
            "log-probabilities are served by /v1/chat/completions",
        ),
        ("prompt", "prompt templates are not supported"),
    ],
    neutral,
};

/// A neutral value of an unsupported Responses field: no tools, a text format, no truncation,
/// no background run.
fn neutral(key: &str, value: &Value) -> bool {
    match key {
        "tools" | "include" => value.as_array().is_some_and(Vec::is_empty),
        "tool_choice" => matches!(value.as_str(), Some("none") | Some("auto")),
        "parallel_tool_calls" => value.is_boolean(),
        "truncation" => value.as_str() == Some("disabled"),
        "background" => value == &json!(false),
        _ => false,
    }
}

impl ResponsesRequest {
    /// The conversation as chat messages: `instructions` first (as a system message).
    fn messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        let mut out = Vec::new();
        if let Some(i) = &self.instructions {
            out.push(ChatMessage::new("system".to_string(), i.clone()));
        }
        let items = match &self.input {
            Input::Text(t) => {
                out.push(ChatMessage::new("user".to_string(), t.clone()));
                return Ok(out);
            }
            Input::Items(items) => items,
        };
        if items.is_empty() {
            return Err(ApiError::bad_request("`input` must not be empty").param("input"));
        }
        for (n, item) in items.iter().enumerate() {
            if item.kind.as_deref().is_some_and(|k| k != "message") {
                return Err(ApiError::bad_request(format!(
                    "`input[{n}]` is a `{}` item: only message items are supported",
                    item.kind.as_deref().unwrap_or_default()
                ))
                .param("input"));
            }
            let role = match item.role.as_deref() {
                Some("developer") => "system",
                Some(r @ ("system" | "user" | "assistant")) => r,
                other => {
                    return Err(ApiError::bad_request(format!(
                        "`input[{n}].role` is {other:?}: user, assistant, system or developer"
                    ))
                    .param("input"))
                }
            };
            let text = match &item.content {
                None => String::new(),
                Some(openai::Content::Text(t)) => t.clone(),
                Some(openai::Content::Parts(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("input_text" | "output_text" | "text", Some(t)) => s.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::bad_request(format!(
                                    "`input[{n}].content` parts of type `{kind}` are not \
                                     supported (text only)"
                                ))
                                .param("input"))
                            }
                        }
                    }
                    s
                }
            };
            out.push(ChatMessage::new(role.to_string(), text));
        }
        Ok(out)
    }

    fn sampling(&self) -> openai::Sampling {
        openai::Sampling {
            temperature: self.temperature,
            top_p: self.top_p,
            stream: self.stream,
            ..Default::default()
        }
    }
}

pub(super) async fn responses(
    State(app): State<Arc<App>>,
    body: Result<Json<ResponsesRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let t0 = Instant::now();
    let Json(req) = body?;
    FIELDS.check(&req.other)?;
    let max = req.max_output_tokens;
    if max.is_some_and(|m| m < 1) {
        return Err(
            ApiError::bad_request("`max_output_tokens` must be at least 1")
                .param("max_output_tokens"),
        );
    }
    let (engine, mut params) = admit(&app, &req.model, req.sampling().request_params(max))?;
    params.generate.grammar = text_format(req.text.as_ref())?;
    if let Some(g) = &params.generate.grammar {
        engine
            .model
            .constraint(g)
            .map_err(|e| ApiError::from(e).param("text"))?;
    }
    let messages = req.messages()?;
    let ids = encode(engine, Prompt::Chat(messages), "input").await?;
    let rx = submit(engine, ids, params)?;
    let head = Head {
        id: new_id("resp"),
        item: new_id("msg"),
        created: unix_now(),
        model: app.model_name.clone(),
        request: json!({
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "text": req.text.clone().unwrap_or_else(|| json!({"format": {"type": "text"}})),
        }),
    };
    if req.stream.unwrap_or(false) {
        let s = event_stream(app, rx, head, t0);
        let mut r = Sse::new(s).keep_alive(KeepAlive::default()).into_response();
        r.extensions_mut().insert(LoggedAtEnd);
        return Ok(r);
    }
    let (text, finish, usage) = collect(&app, rx, t0).await?;
    let mut r = Json(head.response(&text, Some((finish, &usage)))).into_response();
    r.extensions_mut().insert(LoggedAtEnd);
    Ok(r)
}

/// The grammar of a Responses `text.format`: the chat route's `response_format` with the
/// schema's fields beside `type` rather than under `json_schema`.
fn text_format(text: Option<&Value>) -> Result<Option<moe_runtime::constrain::Grammar>, ApiError> {
    let Some(format) = text.filter(|t| !t.is_null()).and_then(|t| t.get("format")) else {
        return Ok(None);
    };
    let as_chat = match format.get("type").and_then(Value::as_str) {
        Some("json_schema") => json!({"type": "json_schema", "json_schema": format}),
        _ => format.clone(),
    };
    super::tools::response_format(Some(&as_chat)).map_err(|e| e.param("text"))
}

/// What every form of one response repeats.
struct Head {
    id: String,
    item: String,
    created: u64,
    model: String,
    /// The request's settings, echoed as the API does.
    request: Value,
}

impl Head {
    /// The output message; `end`: its finish, `None` while it is being written.
    fn item(&self, text: &str, end: Option<FinishReason>) -> Value {
        let status = match end {
            None => "in_progress",
            Some(FinishReason::Stop) => "completed",
            Some(_) => "incomplete",
        };
        json!({
            "type": "message",
            "id": self.item,
            "status": status,
            "role": "assistant",
            "content": if end.is_some() || !text.is_empty() { json!([part(text)]) } else { json!([]) },
        })
    }

    /// The response object: in progress (no end yet) or ended with its finish and usage.
    fn response(&self, text: &str, end: Option<(FinishReason, &Usage)>) -> Value {
        let (status, incomplete, output, usage) = match end {
            None => ("in_progress", Value::Null, json!([]), Value::Null),
            Some((finish, u)) => {
                let cut = finish != FinishReason::Stop;
                (
                    if cut { "incomplete" } else { "completed" },
                    if cut {
                        json!({"reason": "max_output_tokens"})
                    } else {
                        Value::Null
                    },
                    json!([self.item(text, Some(finish))]),
                    json!({
                        "input_tokens": u.prompt_tokens,
                        "input_tokens_details": {"cached_tokens": u.cached_tokens},
                        "output_tokens": u.completion_tokens,
                        "output_tokens_details": {"reasoning_tokens": 0},
                        "total_tokens": u.prompt_tokens + u.completion_tokens,
                    }),
                )
            }
        };
        let mut v = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": null,
            "incomplete_details": incomplete,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": false,
            "tool_choice": "none",
            "tools": [],
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "metadata": {},
            "usage": usage,
        });
        for (k, x) in self.request.as_object().into_iter().flatten() {
            v[k] = x.clone();
        }
        v
    }
}

fn part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": []})
}

/// Waits for the whole answer.
async fn collect(
    app: &App,
    mut rx: UnboundedReceiver<Event>,
    t0: Instant,
) -> Result<(String, FinishReason, Usage), ApiError> {
    let mut text = String::new();
    let mut ttft = None;
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token(t) => {
                if ttft.is_none() {
                    app.metrics.ttft_seconds.observe(t0.elapsed().as_secs_f64());
                    ttft = Some(t0.elapsed());
                }
                text.push_str(&t.text);
            }
            Event::Done {
                finish,
                text: rest,
                usage,
            } => {
                text.push_str(&rest);
                record_usage(app, &usage);
                super::log_generation(PATH, false, Some(&usage), ttft, t0, None);
                return Ok((text, finish, usage));
            }
            Event::Failed(e) => return Err(ApiError::from(e)),
        }
    }
    Err(ApiError::internal("the request ended without a result"))
}

/// The stream's state: what was sent, what is left.
struct EventState {
    app: Arc<App>,
    rx: UnboundedReceiver<Event>,
    head: Head,
    t0: Instant,
    ttft: Option<std::time::Duration>,
    text: String,
    seq: u64,
    out: std::collections::VecDeque<SseEvent>,
    finished: bool,
}

impl EventState {
    /// Queues event `kind` with `fields` (its `type` and `sequence_number` added).
    fn emit(&mut self, kind: &str, mut fields: Value) {
        fields["type"] = json!(kind);
        fields["sequence_number"] = json!(self.seq);
        self.seq += 1;
        self.out
            .push_back(SseEvent::default().event(kind).data(fields.to_string()));
    }

    fn opening(&mut self) {
        let r = self.head.response("", None);
        self.emit("response.created", json!({"response": r}));
        let r = self.head.response("", None);
        self.emit("response.in_progress", json!({"response": r}));
        let item = self.head.item("", None);
        self.emit(
            "response.output_item.added",
            json!({"output_index": 0, "item": item}),
        );
        let id = self.head.item.clone();
        self.emit(
            "response.content_part.added",
            json!({"item_id": id, "output_index": 0, "content_index": 0, "part": part("")}),
        );
    }

    fn delta(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        self.text.push_str(text);
        let id = self.head.item.clone();
        self.emit(
            "response.output_text.delta",
            json!({"item_id": id, "output_index": 0, "content_index": 0, "delta": text, "logprobs": []}),
        );
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Token(t) => {
                if self.ttft.is_none() {
                    self.app
                        .metrics
                        .ttft_seconds
                        .observe(self.t0.elapsed().as_secs_f64());
                    self.ttft = Some(self.t0.elapsed());
                }
                self.delta(&t.text);
            }
            Event::Done {
                finish,
                text,
                usage,
            } => {
                self.delta(&text);
                record_usage(&self.app, &usage);
                super::log_generation(PATH, true, Some(&usage), self.ttft, self.t0, None);
                let (id, full) = (self.head.item.clone(), self.text.clone());
                self.emit(
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": 0, "content_index": 0, "text": full, "logprobs": []}),
                );
                self.emit(
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": 0, "content_index": 0, "part": part(&full)}),
                );
                let item = self.head.item(&full, Some(finish));
                self.emit(
                    "response.output_item.done",
                    json!({"output_index": 0, "item": item}),
                );
                let r = self.head.response(&full, Some((finish, &usage)));
                let kind = if finish == FinishReason::Stop {
                    "response.completed"
                } else {
                    "response.incomplete"
                };
                self.emit(kind, json!({"response": r}));
                self.finished = true;
            }
            Event::Failed(e) => {
                let err = ApiError::from(e);
                let why = err.body().to_string();
                super::log_generation(PATH, true, None, self.ttft, self.t0, Some(&why));
                let body = err.body();
                self.emit(
                    "error",
                    json!({"code": body["error"]["code"], "message": body["error"]["message"], "param": null}),
                );
                self.finished = true;
            }
        }
    }
}

fn event_stream(
    app: Arc<App>,
    rx: UnboundedReceiver<Event>,
    head: Head,
    t0: Instant,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let mut st = EventState {
        app,
        rx,
        head,
        t0,
        ttft: None,
        text: String::new(),
        seq: 0,
        out: Default::default(),
        finished: false,
    };
    st.opening();
    stream::unfold(st, |mut st| async move {
        loop {
            if let Some(e) = st.out.pop_front() {
                return Some((e, st));
            }
            if st.finished {
                return None;
            }
            match st.rx.recv().await {
                Some(ev) => st.on_event(ev),
                None => st.on_event(Event::Failed(moe_runtime::Error::Internal(
                    "the request ended without a result".into(),
                ))),
            }
        }
    })
    .map(Ok)
}
