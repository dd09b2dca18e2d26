//! Tool calling and structured output over HTTP on the demo model (random weights): only the
//! grammar can make its replies parse as JSON valid against a schema, or as calls to the
//! offered tools with valid arguments, so every check here fails if constrained decoding or the
//! call parsing breaks. The same for each tool-call format we read (Hermes, Mistral, DeepSeek,
//! GLM-4.5, gpt-oss), through a copy of the demo model whose template speaks that format.

mod common;
#[path = "common/server.rs"]
#[allow(dead_code)]
mod server;

use std::io::{BufRead, BufReader};

use serde_json::{json, Value};
use server::{client, Server};

fn post(s: &Server, path: &str, body: &Value) -> (u16, Value) {
    let r = client().post(s.url(path)).json(body).send().unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

/// The `data:` payloads of a streamed answer, `[DONE]` left out.
fn stream(s: &Server, body: &Value) -> Vec<Value> {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    BufReader::new(r)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .filter(|d| d != "[DONE]")
        .map(|d| serde_json::from_str(&d).unwrap())
        .collect()
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "color": {"enum": ["red", "green", "blue"]},
        },
        "required": ["name", "age", "color"],
        "additionalProperties": false,
    })
}

/// A person as [`person_schema`] describes one, or why not.
fn check_person(text: &str) -> Result<(), String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("{text:?}: {e}"))?;
    let o = v.as_object().ok_or(format!("{text:?}: not an object"))?;
    let name = o["name"].as_str().ok_or("name")?;
    let age = o["age"].as_i64().ok_or("age")?;
    let color = o["color"].as_str().ok_or("color")?;
    if o.len() == 3
        && name.chars().count() <= 8
        && (0..=120).contains(&age)
        && ["red", "green", "blue"].contains(&color)
    {
        Ok(())
    } else {
        Err(format!("{text:?} breaks the schema"))
    }
}

fn chat(content: &str, max_tokens: usize, seed: u64) -> Value {
    json!({
        "model": "demo",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": seed,
    })
}

#[test]
fn json_schemas_and_json_objects_are_enforced() {
    let s = Server::ready(&[], &[]);
    let format = json!({"type": "json_schema",
                        "json_schema": {"name": "person", "strict": true, "schema": person_schema()}});
    for seed in 1..5 {
        let mut body = chat("Who are you?", 120, seed);
        // Unconstrained, random weights do not write JSON.
        let (status, v) = post(&s, "/v1/chat/completions", &body);
        assert_eq!(status, 200, "{v}");
        let free = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(serde_json::from_str::<Value>(free).is_err(), "{free}");
        body["response_format"] = format.clone();
        let (status, v) = post(&s, "/v1/chat/completions", &body);
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        check_person(text).unwrap();
        // Streamed: the same text, in pieces.
        let chunks = stream(&s, &body);
        let streamed: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(streamed, text);
    }
    // Several constrained sequences in one batch: `n` choices, each its own grammar state,
    // beside an unconstrained request.
    let mut body = chat("Who are you?", 120, 9);
    body["response_format"] = format.clone();
    body["n"] = json!(4);
    let free = std::thread::spawn({
        let url = s.url("/v1/chat/completions");
        move || {
            let body = chat("Tell me more", 40, 1);
            client()
                .post(url)
                .json(&body)
                .send()
                .unwrap()
                .status()
                .as_u16()
        }
    });
    let (status, v) = post(&s, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(free.join().unwrap(), 200);
    for c in v["choices"].as_array().unwrap() {
        check_person(c["message"]["content"].as_str().unwrap()).unwrap();
    }
    // Any JSON object.
    let mut body = chat("Who are you?", 200, 7);
    body["response_format"] = json!({"type": "json_object"});
    let (status, v) = post(&s, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    if v["choices"][0]["finish_reason"] == "stop" {
        assert!(
            serde_json::from_str::<Value>(text).unwrap().is_object(),
            "{text}"
        );
    }
    assert!(text.starts_with('{'), "{text}");
    // The legacy completions route too.
    let body = json!({"model": "demo", "prompt": "Name:", "max_tokens": 120, "seed": 2,
                      "temperature": 0.8, "response_format": format});
    let (status, v) = post(&s, "/v1/completions", &body);
    assert_eq!(status, 200, "{v}");
    check_person(v["choices"][0]["text"].as_str().unwrap()).unwrap();
    // A schema the engine cannot use is a 400 naming the field.
    let mut body = chat("hi", 8, 1);
    body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "x",
        "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}});
    let (status, v) = post(&s, "/v1/chat/completions", &body);
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "response_format", "{v}");
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 10},
                "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time",
            "parameters": {"type": "object", "properties": {
                "zone": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["zone"], "additionalProperties": false}}},
    ])
}

/// Whether `args` are valid arguments of tool `name` of [`weather_tools`].
fn check_call(name: &str, args: &str) -> Result<(), String> {
    let v: Value = serde_json::from_str(args).map_err(|e| format!("{args:?}: {e}"))?;
    let o = v.as_object().ok_or("not an object")?;
    let ok = match name {
        "get_weather" => {
            o.len() == 2
                && o["city"].as_str().is_some_and(|c| c.chars().count() <= 10)
                && ["c", "f"].contains(&o["unit"].as_str().unwrap_or(""))
        }
        "get_time" => o.len() == 1 && o["zone"].as_i64().is_some_and(|z| (-12..=14).contains(&z)),
        _ => false,
    };
    ok.then_some(())
        .ok_or(format!("{name}({args}) breaks its schema"))
}

/// The calls of a streamed answer, gathered as a client does: (id, name, arguments) by index,
/// and the finish reason.
fn streamed_calls(chunks: &[Value]) -> (Vec<(String, String, String)>, String) {
    let mut calls: Vec<(String, String, String)> = Vec::new();
    let mut finish = String::new();
    for c in chunks {
        let choice = &c["choices"][0];
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = f.to_string();
        }
        for d in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = d["index"].as_u64().unwrap() as usize;
            if i == calls.len() {
                calls.push((
                    d["id"].as_str().unwrap().to_string(),
                    d["function"]["name"].as_str().unwrap().to_string(),
                    String::new(),
                ));
            }
            calls[i]
                .2
                .push_str(d["function"]["arguments"].as_str().unwrap_or(""));
        }
    }
    (calls, finish)
}

/// Forced calls on a server over `model` (None: the demo): each a valid call, whole and
/// streamed alike.
fn forced_calls_are_valid(s: &Server, model: &str) {
    for (seed, choice) in [
        (
            1,
            json!({"type": "function", "function": {"name": "get_weather"}}),
        ),
        (
            2,
            json!({"type": "function", "function": {"name": "get_time"}}),
        ),
        (3, json!("required")),
        (4, json!("required")),
    ] {
        let mut body = chat("What is the weather in Paris?", 160, seed);
        body["model"] = json!(model);
        body["tools"] = weather_tools();
        body["tool_choice"] = choice.clone();
        body["parallel_tool_calls"] = json!(false);
        let (status, v) = post(s, "/v1/chat/completions", &body);
        assert_eq!(status, 200, "{v}");
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{model} {choice}: {v}");
        let calls = c["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "{v}");
        let name = calls[0]["function"]["name"].as_str().unwrap();
        if let Some(want) = choice["function"]["name"].as_str() {
            assert_eq!(name, want);
        }
        let args = calls[0]["function"]["arguments"].as_str().unwrap();
        check_call(name, args).unwrap_or_else(|e| panic!("{model}: {e}: {v}"));
        assert_eq!(calls[0]["type"], "function");
        assert!(calls[0]["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("call_")));
        // Streamed: the same call, in OpenAI's delta form.
        let (streamed, finish) = streamed_calls(&stream(s, &body));
        assert_eq!(finish, "tool_calls");
        assert_eq!(streamed.len(), 1, "{streamed:?}");
        assert_eq!(
            (streamed[0].1.as_str(), streamed[0].2.as_str()),
            (name, args)
        );
    }
}

#[test]
fn forced_tool_calls_are_valid_calls_whole_and_streamed() {
    let s = Server::ready(&[], &[]);
    forced_calls_are_valid(&s, "demo");
    // More than one call when parallel calls are allowed and the model goes on: each valid.
    let mut body = chat("Weather and time?", 200, 5);
    body["tools"] = weather_tools();
    body["tool_choice"] = json!("required");
    let (status, v) = post(&s, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
    assert!(!calls.is_empty(), "{v}");
    for c in calls {
        let f = &c["function"];
        check_call(
            f["name"].as_str().unwrap(),
            f["arguments"].as_str().unwrap(),
        )
        .unwrap();
    }
    // `none` hides the tools: a plain answer, and a shorter prompt than with them.
    let mut body = chat("hi", 4, 1);
    body["tools"] = weather_tools();
    body["tool_choice"] = json!("none");
    let (status, none) = post(&s, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{none}");
    assert!(
        none["choices"][0]["message"]["tool_calls"].is_null(),
        "{none}"
    );
    body["tool_choice"] = json!("auto");
    let (status, auto) = post(&s, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{auto}");
    assert!(
        auto["usage"]["prompt_tokens"].as_u64() > none["usage"]["prompt_tokens"].as_u64(),
        "the tools are in the prompt: {auto} vs {none}"
    );
    // The legacy functions / function_call get the legacy reply: one `function_call`.
    let mut body = chat("hi", 160, 6);
    body["functions"] = json!([weather_tools()[0]["function"]]);
    body["function_call"] = json!({"name": "get_weather"});
    let (status, v) = post(&s, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "function_call", "{v}");
    assert!(c["message"]["tool_calls"].is_null(), "{v}");
    let call = &c["message"]["function_call"];
    assert_eq!(call["name"], "get_weather");
    let args = call["arguments"].as_str().unwrap();
    check_call("get_weather", args).unwrap();
    let chunks = stream(&s, &body);
    let (mut name, mut streamed, mut finish) = (String::new(), String::new(), String::new());
    for ch in &chunks {
        let choice = &ch["choices"][0];
        let f = &choice["delta"]["function_call"];
        name.push_str(f["name"].as_str().unwrap_or(""));
        streamed.push_str(f["arguments"].as_str().unwrap_or(""));
        assert!(choice["delta"]["tool_calls"].is_null(), "{ch}");
        if let Some(r) = choice["finish_reason"].as_str() {
            finish = r.to_string();
        }
    }
    assert_eq!(
        (name.as_str(), streamed.as_str(), finish.as_str()),
        ("get_weather", args, "function_call")
    );
}

#[test]
fn tool_turns_go_back_into_the_prompt_and_bad_ones_are_named() {
    let s = Server::ready(&[], &[]);
    let history = |extra: Vec<Value>| {
        let mut messages = vec![json!({"role": "user", "content": "Weather in Paris?"})];
        messages.extend(extra);
        let body = json!({"model": "demo", "messages": messages, "max_tokens": 2,
                          "tools": weather_tools(), "temperature": 0});
        post(&s, "/v1/chat/completions", &body)
    };
    let (status, plain) = history(vec![]);
    assert_eq!(status, 200, "{plain}");
    let call = json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
        "type": "function", "function": {"name": "get_weather",
        "arguments": "{\"city\": \"Paris\", \"unit\": \"c\"}"}}]});
    let result = json!({"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"});
    let (status, v) = history(vec![call.clone(), result.clone()]);
    assert_eq!(status, 200, "{v}");
    let tokens = |v: &Value| v["usage"]["prompt_tokens"].as_u64().unwrap();
    // `{"name": "get_weather", "arguments": {..}}` and `{"temp": 21}` are in the prompt.
    assert!(tokens(&v) > tokens(&plain) + 15, "{v} vs {plain}");
    // Bad tool fields, named.
    for (messages, body_extra, param) in [
        (
            vec![json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c"}]})],
            json!({}),
            "messages[1].tool_calls",
        ),
        (
            vec![],
            json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "nope",
        ),
        (vec![], json!({"tool_choice": "sometimes"}), "tool_choice"),
        (
            vec![],
            json!({"tools": [{"type": "function", "function": {"name": "bad name"}}]}),
            "name",
        ),
        (
            vec![],
            json!({"tools": [{"type": "code_interpreter"}]}),
            "function",
        ),
    ] {
        let mut all = vec![json!({"role": "user", "content": "hi"})];
        all.extend(messages);
        let mut body = json!({"model": "demo", "messages": all, "max_tokens": 2,
                              "tools": weather_tools()});
        for (k, v) in body_extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, v) = post(&s, "/v1/chat/completions", &body);
        assert_eq!(status, 400, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(param),
            "{param}: {v}"
        );
    }
}

/// A copy of the demo model whose chat template is `template`.
fn demo_with_template(template: &str) -> tempfile::TempDir {
    let dir = common::copy_model(&common::root().join("runtime/demo"));
    let cfg_path = dir.path().join("tokenizer_config.json");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["chat_template"] = json!(template);
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    dir
}

/// A ChatML template that lists the tools and teaches the call form `teach` (the text a
/// template of that family writes, which is what format detection reads).
fn template_teaching(teach: &str) -> String {
    format!(
        "{{%- if tools %}}<|im_start|>system\n{teach}\n{{{{ tools | tojson }}}}<|im_end|>\n{{%- endif %}}\
         {{%- for m in messages %}}<|im_start|>{{{{ m.role }}}}\n{{{{ m.content }}}}<|im_end|>\n{{%- endfor %}}\
         {{%- if add_generation_prompt %}}<|im_start|>assistant\n{{%- endif %}}"
    )
}

#[test]
fn every_tool_call_format_round_trips_through_grammar_and_parser() {
    for (format, teach) in [
        ("mistral", "Call tools as [TOOL_CALLS] [{\"name\": ..., \"arguments\": {...}}]"),
        (
            "deepseek_v3",
            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        ),
        (
            "deepseek_v31",
            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        ),
        ("glm45", "<tool_call>NAME\n<arg_key>k</arg_key>\n<arg_value>v</arg_value>\n</tool_call>"),
        ("harmony", "<|start|>assistant<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{}<|call|>"),
    ] {
        let dir = demo_with_template(&template_teaching(teach));
        let model = dir.path().to_str().unwrap().to_string();
        let s = Server::ready(&["--model", &model, "--model-name", format], &[]);
        forced_calls_are_valid(&s, format);
    }
    // A template that renders no tools: a request with tools is a 400 saying so.
    let dir = demo_with_template(
        &template_teaching("")
            .replace("{%- if tools %}", "{%- if false %}")
            .replace("tools | tojson", "1"),
    );
    let model = dir.path().to_str().unwrap().to_string();
    let s = Server::ready(&["--model", &model, "--model-name", "plain"], &[]);
    let mut body = chat("hi", 4, 1);
    body["model"] = json!("plain");
    body["tools"] = weather_tools();
    let (status, v) = post(&s, "/v1/chat/completions", &body);
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "tools", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("template"),
        "{v}"
    );
}
