//! `moe-serve serve` over real HTTP: routes and their shapes, streaming, errors and their
//! statuses, authentication, the queue limit, disconnects, fault isolation, metrics, loading
//! and draining.

mod common;
#[path = "common/server.rs"]
#[allow(dead_code)]
mod server;

use std::io::{BufRead, BufReader, Read};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use server::{assert_ends_with_done, client, demo_config, Server};

fn post(s: &Server, path: &str, body: &Value) -> (u16, Value) {
    let r = send(s, path, body);
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

/// Sends a request and returns the response unread (streams, headers).
fn send(s: &Server, path: &str, body: &Value) -> reqwest::blocking::Response {
    client().post(s.url(path)).json(body).send().unwrap()
}

fn chat_body(content: &str, max_tokens: usize) -> Value {
    json!({
        "model": "demo",
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
    })
}

/// Reads an SSE body: the `data:` payloads in order.
fn sse_data(body: impl Read) -> Vec<String> {
    BufReader::new(body)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

fn assert_error_shape(v: &Value, code_hint: &str) {
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("code").is_some(), "{v}");
    if !code_hint.is_empty() {
        assert!(
            e["message"].as_str().unwrap().contains(code_hint)
                || e["code"].as_str() == Some(code_hint),
            "{code_hint} in {v}"
        );
    }
}

#[test]
fn routes_answer_in_openai_shape_and_streams_match() {
    let s = Server::ready(&["--max-batch", "4"], &[]);
    let c = client();
    let health: Value = c.get(s.url("/health")).send().unwrap().json().unwrap();
    assert_eq!(health["status"], "ok");
    let models: Value = c.get(s.url("/v1/models")).send().unwrap().json().unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "demo");

    let (st, full) = post(&s, "/v1/chat/completions", &chat_body("Hello", 12));
    assert_eq!(st, 200, "{full}");
    assert_eq!(full["object"], "chat.completion");
    let text = full["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(full["choices"][0]["message"]["role"], "assistant");
    assert_eq!(full["choices"][0]["finish_reason"], "length");
    let u = &full["usage"];
    assert_eq!(u["completion_tokens"], 12);
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + 12)
    );

    // The same request streamed: the deltas add up to the same text.
    let mut body = chat_body("Hello", 12);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = send(&s, "/v1/chat/completions", &body);
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let data = sse_data(r);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, vec![&json!("length")]);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 12);
    assert!(chunks.last().unwrap()["choices"]
        .as_array()
        .unwrap()
        .is_empty());

    // Completions: token-id prompt, legacy logprobs.
    let (st, v) = post(
        &s,
        "/v1/completions",
        &json!({"model": "demo", "prompt": [1, 2, 3, 4], "max_tokens": 5, "temperature": 0,
                "logprobs": 2, "ignore_eos": true}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 5);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    assert_eq!(v["usage"]["prompt_tokens"], 4);
}

#[test]
fn errors_have_the_right_status_and_shape() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = demo_config(dir.path(), "", "max_request_bytes = \"2KiB\"");
    let s = Server::ready(&["--config", cfg.to_str().unwrap()], &[]);
    let c = client();
    let raw = |body: &str, ctype: Option<&str>| {
        let mut r = c.post(s.url("/v1/chat/completions")).body(body.to_string());
        if let Some(t) = ctype {
            r = r.header("content-type", t);
        }
        let r = r.send().unwrap();
        (
            r.status().as_u16(),
            r.json::<Value>().unwrap_or(Value::Null),
        )
    };
    let json_ct = Some("application/json");
    let cases: Vec<(u16, (u16, Value), &str)> = vec![
        (400, raw("{\"model\": \"demo\",", json_ct), "invalid_json"),
        (400, raw("{\"model\": \"demo\"}", json_ct), "messages"),
        (
            400,
            raw("{\"model\": \"demo\", \"messages\": 3}", json_ct),
            "invalid_json",
        ),
        (
            415,
            raw("{\"model\": \"demo\", \"messages\": []}", None),
            "Content-Type",
        ),
        (
            413,
            raw(&format!("{{\"pad\": \"{}\"}}", "x".repeat(4096)), json_ct),
            "request_too_large",
        ),
        (
            404,
            post(
                &s,
                "/v1/chat/completions",
                &json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}),
            ),
            "model_not_found",
        ),
        (
            400,
            post(&s, "/v1/chat/completions", &{
                let mut b = chat_body("hi", 100_000);
                b["model"] = json!("demo");
                b
            }),
            "100000",
        ),
        (
            400,
            post(&s, "/v1/chat/completions", &{
                let mut b = chat_body("hi", 4);
                b["n"] = json!(17);
                b
            }),
            "`n`",
        ),
        (
            400,
            post(&s, "/v1/chat/completions", &{
                let mut b = chat_body("hi", 4);
                b["temperature"] = json!(-1);
                b
            }),
            "temperature",
        ),
        (
            400,
            post(
                &s,
                "/v1/completions",
                &json!({"model": "demo", "prompt": [999999], "max_tokens": 2}),
            ),
            "vocabulary",
        ),
        (
            404,
            {
                let r = c.get(s.url("/v2/nothing")).send().unwrap();
                (r.status().as_u16(), r.json().unwrap())
            },
            "not_found",
        ),
        (
            405,
            {
                let r = c.delete(s.url("/v1/models")).send().unwrap();
                (r.status().as_u16(), r.json().unwrap())
            },
            "method_not_allowed",
        ),
    ];
    for (want, (got, body), hint) in cases {
        assert_eq!(got, want, "{hint}: {body}");
        assert_error_shape(&body, hint);
    }
    // The context error names the prompt, max_tokens and the context.
    let (_, v) = post(&s, "/v1/chat/completions", &chat_body("hi", 100_000));
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("100000") && msg.contains("4096"), "{msg}");
    // Still healthy after all of that.
    assert_eq!(post(&s, "/v1/chat/completions", &chat_body("hi", 2)).0, 200);
}

#[test]
fn the_api_key_guards_every_route_but_health() {
    let s = Server::ready(&[], &[("MOE_SERVE_API_KEY", "sekrit")]);
    let c = client();
    assert_eq!(c.get(s.url("/health")).send().unwrap().status(), 200);
    for path in ["/v1/models", "/metrics"] {
        let r = c.get(s.url(path)).send().unwrap();
        assert_eq!(r.status(), 401, "{path}");
        // RFC 7235: a 401 names the scheme it wants.
        let challenge = r
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_string());
        assert!(
            challenge
                .as_deref()
                .is_some_and(|v| v.starts_with("Bearer")),
            "{challenge:?}"
        );
        assert_error_shape(&r.json().unwrap(), "invalid_api_key");
        let r = c.get(s.url(path)).bearer_auth("wrong").send().unwrap();
        assert_eq!(r.status(), 401, "{path}");
        assert!(r.headers().contains_key("www-authenticate"));
        let r = c.get(s.url(path)).bearer_auth("sekrit").send().unwrap();
        assert_eq!(r.status(), 200, "{path}");
        // The scheme is case-insensitive; the key is not.
        for value in ["bearer sekrit", "BEARER  sekrit", "Bearer\tsekrit"] {
            let r = c
                .get(s.url(path))
                .header("authorization", value)
                .send()
                .unwrap();
            assert_eq!(r.status(), 200, "{path} {value:?}");
        }
        for value in ["bearer SEKRIT", "Basic sekrit", "Bearersekrit", "Bearer"] {
            let r = c
                .get(s.url(path))
                .header("authorization", value)
                .send()
                .unwrap();
            assert_eq!(r.status(), 401, "{path} {value:?}");
        }
    }
    let r = send(&s, "/v1/chat/completions", &chat_body("hi", 2));
    assert_eq!(r.status(), 401);
    let r = c
        .post(s.url("/v1/chat/completions"))
        .bearer_auth("sekrit")
        .json(&chat_body("hi", 2))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let s = Server::ready(&["--max-batch", "1", "--max-queue", "1"], &[]);
    // Long streams hold the one slot and the one queue place.
    let mut body = chat_body("hold", 3000);
    body["stream"] = json!(true);
    let mut holders = Vec::new();
    let mut saw_429 = false;
    for _ in 0..6 {
        let r = send(&s, "/v1/chat/completions", &body);
        match r.status().as_u16() {
            200 => holders.push(r),
            429 => {
                let retry = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_string());
                assert!(retry.is_some_and(|v| v.parse::<u64>().is_ok()));
                assert_error_shape(&r.json().unwrap(), "rate_limit_exceeded");
                saw_429 = true;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(saw_429);
    assert!(
        holders.len() <= 2,
        "1 running + 1 queued: {}",
        holders.len()
    );
}

#[test]
fn a_client_that_disconnects_frees_its_slot() {
    let s = Server::ready(&["--max-batch", "1", "--max-queue", "4"], &[]);
    let mut body = chat_body("long", 3500);
    body["stream"] = json!(true);
    let r = send(&s, "/v1/chat/completions", &body);
    let mut lines = BufReader::new(r).lines();
    // Wait until it streams, then hang up.
    let first = lines.find(|l| l.as_ref().is_ok_and(|l| l.contains("content")));
    assert!(first.is_some());
    drop(lines);
    let t0 = Instant::now();
    let (st, v) = post(&s, "/v1/chat/completions", &chat_body("next", 4));
    assert_eq!(st, 200, "{v}");
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "the slot was freed, not held until the 3500 tokens were generated"
    );
    let running = s.metric("moe_running_requests", None).unwrap();
    assert_eq!(running, 0.0);
    // Generation of the abandoned stream stopped far short of its 3500 tokens.
    let generated = s.metric("moe_generated_tokens_total", None).unwrap();
    assert!(generated < 1000.0, "{generated}");
}

#[test]
fn a_non_streaming_client_that_disconnects_frees_its_slot_too() {
    use std::io::Write;
    let s = Server::ready(&["--max-batch", "1", "--max-queue", "4"], &[]);
    let body = chat_body("long", 3500).to_string();
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Hang up once generation is under way.
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.metric("moe_generated_tokens_total", None).unwrap_or(0.0) < 2.0 {
        assert!(Instant::now() < deadline, "generation never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(conn);
    let (st, v) = post(&s, "/v1/chat/completions", &chat_body("next", 4));
    assert_eq!(st, 200, "{v}");
    let generated = s.metric("moe_generated_tokens_total", None).unwrap();
    assert!(
        generated < 1000.0,
        "the abandoned request kept generating: {generated}"
    );
}

#[test]
fn a_panic_inside_a_request_fails_it_alone() {
    let s = Server::ready(
        &["--max-batch", "4"],
        &[("MOE_SERVE_FAULT_PANIC_TOKEN", "250")],
    );
    let bad = json!({"model": "demo", "prompt": [5, 250, 6], "max_tokens": 4});
    let (st, v) = post(&s, "/v1/completions", &bad);
    assert_eq!(st, 500, "{v}");
    assert_error_shape(&v, "internal_error");
    let mut stream = bad.clone();
    stream["stream"] = json!(true);
    let r = send(&s, "/v1/completions", &stream);
    let data = sse_data(r);
    assert!(data.iter().any(|d| d.contains("\"error\"")), "{data:?}");
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let (st, v) = post(&s, "/v1/chat/completions", &chat_body("still here?", 3));
    assert_eq!(st, 200, "{v}");
    assert_eq!(s.metric("moe_scheduler_failures_total", None), Some(2.0));
}

#[test]
fn metrics_list_expert_series_from_the_start_and_count() {
    let s = Server::ready(&[], &[]);
    assert_eq!(
        s.metric("moe_expert_hits_total{layer=\"0\"}", None),
        Some(0.0)
    );
    assert_eq!(
        s.metric(
            "moe_expert_bytes_moved_total{layer=\"3\",tier=\"file_to_ram\"}",
            None
        ),
        Some(0.0)
    );
    assert_eq!(
        s.metric("moe_expert_stall_seconds_total{layer=\"1\"}", None),
        Some(0.0)
    );
    assert_eq!(
        post(&s, "/v1/chat/completions", &chat_body("count", 6)).0,
        200
    );
    assert!(
        s.metric("moe_expert_hits_total{layer=\"0\"}", None)
            .unwrap()
            > 0.0
    );
    assert_eq!(s.metric("moe_generated_tokens_total", None), Some(6.0));
    assert_eq!(
        s.metric(
            "moe_requests_total{route=\"/v1/chat/completions\",status=\"200\"}",
            None
        ),
        Some(1.0)
    );
    assert_eq!(
        s.metric("moe_time_to_first_token_seconds_count", None),
        Some(1.0)
    );
    assert!(s.metric("moe_queue_depth", None).is_some());
    assert!(s.metric("moe_batch_size", None).is_some());
}

#[test]
fn health_is_503_while_loading_and_sigterm_drains() {
    let mut s = Server::start(&[], &[("MOE_SERVE_FAULT_LOAD_DELAY_MS", "1500")]);
    let r = client().get(s.url("/health")).send().unwrap();
    assert_eq!(r.status(), 503);
    assert_error_shape(&r.json().unwrap(), "model_loading");
    let (st, _) = post(&s, "/v1/chat/completions", &chat_body("early", 2));
    assert_eq!(st, 503);
    s.wait_ready();
    // A stream in flight when SIGTERM arrives still finishes with [DONE].
    let mut body = chat_body("drain", 300);
    body["stream"] = json!(true);
    let r = send(&s, "/v1/chat/completions", &body);
    let mut reader = BufReader::new(r);
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    assert!(first.starts_with("data: "), "{first}");
    let status = s.terminate(Duration::from_secs(60));
    let rest: Vec<String> = reader.lines().map_while(Result::ok).collect();
    assert_ends_with_done(&rest);
    assert!(rest
        .iter()
        .any(|l| l.contains("\"finish_reason\":\"length\"")));
    assert!(status.is_some_and(|st| st.success()), "{status:?}");
    assert!(client().get(s.url("/health")).send().is_err());
}

#[test]
fn an_expert_that_fails_to_load_answers_500_naming_it_never_400() {
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("cache");
    let top = format!(
        "quantization = \"q8_0\"\ncache_dir = {:?}\ncache_rebuild = false",
        cache_dir.to_string_lossy()
    );
    let cfg = demo_config(dir.path(), &top, "");
    let args = ["--config", cfg.to_str().unwrap()];
    // The first start writes the quantized weight cache.
    let mut s = Server::ready(&args, &[]);
    assert!(s.terminate(Duration::from_secs(60)).is_some());
    let file = std::fs::read_dir(&cache_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .expect("a cache file");
    // Damage every expert (as a disk error would), replacing the file before the next start.
    let h = moe_runtime::gguf::GgufFile::open(&file).unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    let mut damaged = 0;
    for t in h.tensors.iter().filter(|t| t.name.contains(".experts.")) {
        bytes[(t.offset + t.size / 2) as usize] ^= 0x55;
        damaged += 1;
    }
    assert!(damaged > 0, "no expert tensors in {}", file.display());
    let tmp = file.with_extension("damaged");
    std::fs::write(&tmp, &bytes).unwrap();
    std::fs::rename(&tmp, &file).unwrap();

    // The model loads (experts are checked on first use); the request that needs one fails as
    // the server's fault, naming the expert and the cache file.
    let s = Server::ready(&args, &[]);
    let (st, v) = post(&s, "/v1/chat/completions", &chat_body("hello", 2));
    assert_eq!(st, 500, "{v}");
    assert_error_shape(&v, "");
    assert_eq!(v["error"]["type"], "server_error", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("could not be loaded")
            && msg.contains(&*file.to_string_lossy())
            && !msg.contains("invalid request"),
        "{v}"
    );
}

#[test]
fn routes_without_v1_more_stop_strings_and_the_api_key_flag() {
    // The flag wins over the variable.
    let s = Server::ready(
        &["--api-key", "flag-key"],
        &[("MOE_SERVE_API_KEY", "env-key")],
    );
    let c = client();
    for (path, key, want) in [
        ("/models", "flag-key", 200),
        ("/v1/models", "flag-key", 200),
        ("/models", "env-key", 401),
        ("/models/demo", "flag-key", 200),
    ] {
        let r = c.get(s.url(path)).bearer_auth(key).send().unwrap();
        assert_eq!(r.status(), want, "{path} with {key}");
    }
    // Chat and completions answer under both prefixes, the same way.
    let mut body = chat_body("hi", 3);
    // More stop strings than OpenAI's four are honoured.
    body["stop"] = json!(["zz1", "zz2", "zz3", "zz4", "zz5", "zz6"]);
    let mut texts = Vec::new();
    for path in ["/chat/completions", "/v1/chat/completions"] {
        let r = c
            .post(s.url(path))
            .bearer_auth("flag-key")
            .json(&body)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let v: Value = r.json().unwrap();
        texts.push(v["choices"][0]["message"]["content"].clone());
    }
    assert_eq!(texts[0], texts[1]);
    let completion = json!({"model": "demo", "prompt": "hi", "max_tokens": 2, "temperature": 0});
    let r = c
        .post(s.url("/completions"))
        .bearer_auth("flag-key")
        .json(&completion)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    // Past the limit, a 400 naming the field.
    body["stop"] = json!((0..65).map(|i| format!("s{i}")).collect::<Vec<_>>());
    let r = c
        .post(s.url("/chat/completions"))
        .bearer_auth("flag-key")
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().unwrap();
    assert_eq!(v["error"]["param"], "stop", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 64"),
        "{v}"
    );
}

#[test]
fn cors_is_off_by_default_and_answers_only_the_configured_origins() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = demo_config(
        dir.path(),
        "",
        "cors_origins = [\"http://localhost:3000\"]\napi_key = \"k\"",
    );
    let s = Server::ready(&["--config", cfg.to_str().unwrap()], &[]);
    let c = client();
    let acao = |r: &reqwest::blocking::Response| {
        r.headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap().to_string())
    };
    // A browser's preflight: answered before authentication (it carries no key).
    let r = c
        .request(reqwest::Method::OPTIONS, s.url("/v1/chat/completions"))
        .header("origin", "http://localhost:3000")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(acao(&r).as_deref(), Some("http://localhost:3000"));
    let allowed = r
        .headers()
        .get("access-control-allow-headers")
        .map(|v| v.to_str().unwrap().to_lowercase())
        .unwrap_or_default();
    assert!(allowed.contains("authorization"), "{allowed}");
    // The call itself carries the header for that origin, not for another.
    let r = c
        .get(s.url("/v1/models"))
        .bearer_auth("k")
        .header("origin", "http://localhost:3000")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(acao(&r).as_deref(), Some("http://localhost:3000"));
    let r = c
        .get(s.url("/v1/models"))
        .bearer_auth("k")
        .header("origin", "http://evil.example")
        .send()
        .unwrap();
    assert_eq!(acao(&r), None);
    drop(s);
    // Not configured: no CORS headers at all.
    let s = Server::ready(&[], &[]);
    let r = c
        .get(s.url("/v1/models"))
        .header("origin", "http://localhost:3000")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(acao(&r), None);
}

#[test]
fn logit_bias_is_honoured_and_checked() {
    let s = Server::ready(&[], &[]);
    // Forcing one token: the completion is that token's text, repeated.
    let body = |bias: Value| {
        json!({"model": "demo", "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0,
               "ignore_eos": true, "logit_bias": bias})
    };
    let (status, v) = post(&s, "/v1/completions", &body(json!({"42": 100})));
    assert_eq!(status, 200, "{v}");
    let forced = v["choices"][0]["text"].as_str().unwrap().to_string();
    let (_, v) = post(&s, "/v1/completions", &body(json!({"43": 100})));
    let other = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert_ne!(forced, other, "the bias decides the tokens");
    assert_eq!(v["usage"]["completion_tokens"], 4);
    // Keys must be token ids, inside the vocabulary; biases within -100..=100.
    for (bias, needle) in [
        (json!({"abc": 1}), "token ids"),
        (json!({"999999": 1}), "past the vocabulary"),
        (json!({"5": 101}), "between -100 and 100"),
    ] {
        let (status, v) = post(&s, "/v1/completions", &body(bias.clone()));
        assert_eq!(status, 400, "{bias}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle) && msg.contains("logit_bias"), "{msg}");
    }
}

/// Log lines the server printed so far (waiting up to `wait` for the first).
fn log_lines(s: &Server, wait: Duration) -> Vec<String> {
    let mut out = Vec::new();
    let deadline = Instant::now() + wait;
    while let Ok(line) = s
        .log
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
    {
        out.push(line);
    }
    out
}

#[test]
fn every_request_gets_one_log_line_in_text_or_json() {
    let s = Server::ready(&[], &[("RUST_LOG", "warn,request=info")]);
    assert_eq!(post(&s, "/v1/chat/completions", &chat_body("hi", 3)).0, 200);
    let mut streamed = chat_body("hi", 3);
    streamed["stream"] = json!(true);
    let _ = send(&s, "/v1/chat/completions", &streamed).text().unwrap();
    assert_eq!(client().get(s.url("/nope")).send().unwrap().status(), 404);
    let lines = log_lines(&s, Duration::from_secs(2));
    let requests: Vec<&String> = lines.iter().filter(|l| l.contains("request")).collect();
    let gen: Vec<&&String> = requests
        .iter()
        .filter(|l| l.contains("path=\"/v1/chat/completions\""))
        .collect();
    assert_eq!(gen.len(), 2, "one line per generation request: {lines:#?}");
    for l in &gen {
        for field in [
            "method=\"POST\"",
            "status=200",
            "prompt_tokens=",
            "completion_tokens=3",
            "ttft_ms=",
            "total_ms=",
        ] {
            assert!(l.contains(field), "{field} missing: {l}");
        }
    }
    assert!(gen.iter().any(|l| l.contains("stream=true")), "{gen:?}");
    assert!(
        requests
            .iter()
            .any(|l| l.contains("status=404") && l.contains("method=GET")),
        "{lines:#?}"
    );
    drop(s);
    // JSON: one object per line, the same fields.
    let s = Server::ready(&["--log-json"], &[("RUST_LOG", "warn,request=info")]);
    assert_eq!(post(&s, "/v1/chat/completions", &chat_body("hi", 2)).0, 200);
    let lines = log_lines(&s, Duration::from_secs(2));
    let v: Value = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["fields"]["path"] == "/v1/chat/completions")
        .unwrap_or_else(|| panic!("no JSON request line: {lines:#?}"));
    assert_eq!(v["fields"]["status"], 200);
    assert_eq!(v["fields"]["completion_tokens"], 2);
    assert!(v["fields"]["total_ms"].as_f64().unwrap() >= 0.0);
    assert!(v["timestamp"].is_string(), "{v}");
}

#[test]
fn chat_template_kwargs_reach_the_template() {
    // The demo model with a template that reads `enable_thinking`.
    let dir = common::copy_model(&common::root().join("runtime/demo"));
    let cfg_path = dir.path().join("tokenizer_config.json");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["chat_template"] = json!(
        "{%- for m in messages %}{{ m.content }}{% endfor %}\
         {%- if enable_thinking is defined and not enable_thinking %} no thinking please{% endif %}"
    );
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let model = dir.path().to_str().unwrap().to_string();
    let s = Server::ready(&["--model", &model, "--model-name", "demo"], &[]);
    let prompt_tokens = |kwargs: Value| {
        let mut body = chat_body("hi", 1);
        body["messages"] = json!([{"role": "user", "content": "hi"}]);
        body["chat_template_kwargs"] = kwargs;
        let (status, v) = post(&s, "/v1/chat/completions", &body);
        assert_eq!(status, 200, "{v}");
        v["usage"]["prompt_tokens"].as_u64().unwrap()
    };
    let plain = prompt_tokens(json!({}));
    assert!(prompt_tokens(json!({"enable_thinking": false})) > plain);
    assert_eq!(prompt_tokens(json!({"enable_thinking": true})), plain);
    // The request's own fields cannot be replaced through it.
    let mut body = chat_body("hi", 1);
    body["chat_template_kwargs"] = json!({"messages": []});
    let (status, v) = post(&s, "/v1/chat/completions", &body);
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("messages"),
        "{v}"
    );
}

#[test]
fn a_cache_built_on_the_first_start_is_reported_as_it_goes() {
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().to_str().unwrap().to_string();
    let s = Server::ready(
        &["--quantization", "q8_0", "--cache-dir", &dir],
        &[("RUST_LOG", "warn,progress=info")],
    );
    let lines = log_lines(&s, Duration::from_secs(1));
    let progress: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("building the expert cache"))
        .collect();
    assert!(
        progress
            .iter()
            .any(|l| l.contains("100%") && l.contains("GB/s")),
        "{lines:#?}"
    );
    drop(s);
    // The next start maps the cache: nothing to report.
    let s = Server::ready(
        &["--quantization", "q8_0", "--cache-dir", &dir],
        &[("RUST_LOG", "warn,progress=info")],
    );
    let lines = log_lines(&s, Duration::from_secs(1));
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("building the expert cache")),
        "{lines:#?}"
    );
}

/// Every field of OpenAI's chat/completions request body (the API reference's list, kept here
/// by hand) with a value a client would send: a field the server honours or OpenAI marks as
/// metadata answers 200, any other is a 400 that names it. Nothing is dropped silently.
#[test]
fn every_openai_request_field_is_honoured_or_refused_by_name() {
    let s = Server::ready(&[], &[]);
    let tool = json!([{"type": "function",
                       "function": {"name": "f", "parameters": {"type": "object"}}}]);
    // (field, value, accepted)
    let chat: Vec<(&str, Value, bool)> = vec![
        ("audio", json!({"voice": "alloy", "format": "wav"}), false),
        ("frequency_penalty", json!(0.5), true),
        // Naming a function without offering any.
        ("function_call", json!({"name": "f"}), false),
        (
            "functions",
            json!([{"name": "f", "parameters": {"type": "object"}}]),
            true,
        ),
        ("logit_bias", json!({"5": 1}), true),
        ("logprobs", json!(true), true),
        ("max_completion_tokens", json!(3), true),
        ("max_tokens", json!(3), true),
        ("metadata", json!({"k": "v"}), true),
        ("modalities", json!(["text", "audio"]), false),
        ("n", json!(2), true),
        ("n", json!(0), false),
        ("n", json!(17), false),
        ("parallel_tool_calls", json!(false), true),
        (
            "prediction",
            json!({"type": "content", "content": "x"}),
            false,
        ),
        ("presence_penalty", json!(0.5), true),
        ("prompt_cache_key", json!("k"), true),
        ("reasoning_effort", json!("low"), false),
        ("response_format", json!({"type": "json_object"}), true),
        (
            "response_format",
            json!({"type": "regex", "regex": "a+"}),
            false,
        ),
        ("safety_identifier", json!("u1"), true),
        ("seed", json!(1), true),
        ("service_tier", json!("auto"), true),
        ("stop", json!(["\n"]), true),
        ("store", json!(false), true),
        ("stream", json!(false), true),
        ("stream_options", json!({"include_usage": true}), true),
        ("temperature", json!(0.5), true),
        // Requiring a tool without offering any.
        ("tool_choice", json!("required"), false),
        ("tools", tool.clone(), true),
        ("top_logprobs", json!(0), true),
        ("top_p", json!(0.9), true),
        ("user", json!("u1"), true),
        ("verbosity", json!("low"), false),
        ("web_search_options", json!({}), false),
        // Neutral values change nothing and are accepted.
        ("response_format", json!({"type": "text"}), true),
        ("modalities", json!(["text"]), true),
        ("tools", json!([]), true),
        ("tool_choice", json!("none"), true),
        // A field no API defines.
        ("no_such_field", json!(1), false),
    ];
    let completion: Vec<(&str, Value, bool)> = vec![
        ("best_of", json!(2), false),
        ("echo", json!(true), false),
        ("frequency_penalty", json!(0.5), true),
        ("logit_bias", json!({"5": 1}), true),
        ("logprobs", json!(2), true),
        ("max_tokens", json!(3), true),
        ("n", json!(2), true),
        ("n", json!(0), false),
        ("presence_penalty", json!(0.5), true),
        ("response_format", json!({"type": "json_object"}), true),
        ("seed", json!(1), true),
        ("stop", json!("\n"), true),
        ("stream", json!(false), true),
        ("suffix", json!("x"), false),
        ("temperature", json!(0.5), true),
        ("top_p", json!(0.9), true),
        ("user", json!("u1"), true),
        ("no_such_field", json!(1), false),
    ];
    let check = |path: &str, base: Value, field: &str, value: &Value, accepted: bool| {
        let mut body = base;
        body[field] = value.clone();
        let (status, v) = post(&s, path, &body);
        if accepted {
            assert_eq!(status, 200, "{path} {field} = {value}: {v}");
        } else {
            assert_eq!(status, 400, "{path} {field} = {value}: {v}");
            let msg = v["error"]["message"].as_str().unwrap_or("");
            assert!(
                msg.contains(&format!("`{field}`")) || v["error"]["param"] == field,
                "{path} {field}: the error names it: {v}"
            );
        }
    };
    for (field, value, accepted) in &chat {
        check(
            "/v1/chat/completions",
            chat_body("hi", 3),
            field,
            value,
            *accepted,
        );
    }
    let prompt = json!({"model": "demo", "prompt": "hi", "max_tokens": 3});
    for (field, value, accepted) in &completion {
        check("/v1/completions", prompt.clone(), field, value, *accepted);
    }
    // Message fields: a participant's name and tool calls in the history reach the template;
    // a malformed tool call is named.
    let mut body = chat_body("hi", 3);
    body["messages"][1]["name"] = json!("alice");
    assert_eq!(post(&s, "/v1/chat/completions", &body).0, 200);
    body["messages"][1]["tool_calls"] = json!([{"id": "c1", "type": "function",
        "function": {"name": "f", "arguments": "{}"}}]);
    assert_eq!(post(&s, "/v1/chat/completions", &body).0, 200);
    body["messages"][1]["tool_calls"] = json!([{"id": "c1", "type": "function"}]);
    body["messages"][1]["audio"] = json!({"id": "a"});
    let (status, v) = post(&s, "/v1/chat/completions", &body);
    assert_eq!(status, 400, "{v}");
    body["messages"][1].as_object_mut().unwrap().remove("audio");
    let (status, v) = post(&s, "/v1/chat/completions", &body);
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("messages[1].tool_calls"),
        "{v}"
    );
}

/// `n` choices: one sequence each in the batch, choice `i` seeded `seed + i` (choice 0 is what
/// `n` = 1 gives), the prompt counted once in `usage` and prefilled once (the other choices
/// reuse its KV cache); streamed, each choice's chunks carry its index and the texts are the
/// same as without streaming.
#[test]
fn n_choices_share_the_prompt_and_stream_by_index() {
    let s = Server::ready(&[], &[]);
    let body = |n: usize, stream: bool| {
        json!({"model": "demo", "messages": [{"role": "user", "content": "Tell me a story"}],
               "max_tokens": 6, "temperature": 1.0, "seed": 7, "ignore_eos": true,
               "n": n, "stream": stream})
    };
    let (status, one) = post(&s, "/v1/chat/completions", &body(1, false));
    assert_eq!(status, 200, "{one}");
    let cached_before = s.metric("moe_cached_prompt_tokens_total", None).unwrap();
    let (status, v) = post(&s, "/v1/chat/completions", &body(3, false));
    assert_eq!(status, 200, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3, "{v}");
    let texts: Vec<&str> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            assert_eq!(c["index"], i, "{v}");
            assert_eq!(c["finish_reason"], "length", "{v}");
            c["message"]["content"].as_str().unwrap()
        })
        .collect();
    assert_eq!(
        texts[0],
        one["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert!(
        texts[1] != texts[0] || texts[2] != texts[0],
        "seeds differ: {texts:?}"
    );
    let prompt = one["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], prompt);
    assert_eq!(v["usage"]["completion_tokens"], 18);
    assert_eq!(v["usage"]["total_tokens"], prompt + 18);
    // The two later choices found the prompt (all but its last token) in the prefix cache.
    let cached = s.metric("moe_cached_prompt_tokens_total", None).unwrap() - cached_before;
    assert!(
        cached >= 2.0 * (prompt - 1) as f64,
        "{cached} cached tokens"
    );

    // Streamed: per index a role chunk, content, a finish; the same texts.
    let r = send(&s, "/v1/chat/completions", &body(3, true));
    assert_eq!(r.status().as_u16(), 200);
    let data = sse_data(r);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let mut streamed = vec![String::new(); 3];
    let mut finished = [0usize; 3];
    for d in &data[..data.len() - 1] {
        let chunk: Value = serde_json::from_str(d).unwrap();
        for c in chunk["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            if let Some(t) = c["delta"]["content"].as_str() {
                streamed[i].push_str(t);
            }
            if !c["finish_reason"].is_null() {
                finished[i] += 1;
            }
        }
    }
    assert_eq!(finished, [1, 1, 1], "{data:?}");
    assert_eq!(streamed, texts, "{data:?}");
}

/// A thinking model (its template writes `<think>` blocks): the answer's reasoning comes back as
/// `reasoning_content` and the reply as `content`, streamed as deltas of each. A template that
/// opens the block in the prompt makes the whole answer reasoning until `</think>` (these
/// random weights never write it); with `enable_thinking: false` the block is closed in the
/// prompt and the answer is the reply. A model without think blocks has no such field.
#[test]
fn a_thinking_models_reasoning_is_split_from_its_reply() {
    let dir = common::copy_model(&common::root().join("runtime/demo"));
    let cfg_path = dir.path().join("tokenizer_config.json");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["chat_template"] = json!(
        "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
         {%- if add_generation_prompt %}<|im_start|>assistant\n\
         {%- if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n\
         {%- else %}<think>\n{%- endif %}{%- endif %}"
    );
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let model = dir.path().to_str().unwrap().to_string();
    let s = Server::ready(&["--model", &model, "--model-name", "demo"], &[]);
    let body = |kwargs: Value, stream: bool| {
        let mut b = chat_body("hi", 8);
        b["chat_template_kwargs"] = kwargs;
        b["stream"] = json!(stream);
        b
    };
    let (status, v) = post(&s, "/v1/chat/completions", &body(json!({}), false));
    assert_eq!(status, 200, "{v}");
    let m = &v["choices"][0]["message"];
    let reasoning = m["reasoning_content"]
        .as_str()
        .expect("reasoning")
        .to_string();
    assert!(!reasoning.is_empty(), "{v}");
    assert_eq!(m["content"], "", "{v}");
    // Streamed: the same reasoning, in reasoning_content deltas, and no content.
    let r = send(&s, "/v1/chat/completions", &body(json!({}), true));
    let (mut streamed, mut content) = (String::new(), String::new());
    for d in sse_data(r) {
        if d == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(&d).unwrap();
        let delta = &chunk["choices"][0]["delta"];
        streamed.push_str(delta["reasoning_content"].as_str().unwrap_or(""));
        content.push_str(delta["content"].as_str().unwrap_or(""));
    }
    assert_eq!(streamed, reasoning);
    assert_eq!(content, "");
    // Thinking off: the block is closed in the prompt; the answer is the reply.
    let (status, v) = post(
        &s,
        "/v1/chat/completions",
        &body(json!({"enable_thinking": false}), false),
    );
    assert_eq!(status, 200, "{v}");
    let m = &v["choices"][0]["message"];
    assert!(m["reasoning_content"].is_null(), "{v}");
    assert!(!m["content"].as_str().unwrap().is_empty(), "{v}");
    // A model without think blocks: no reasoning_content at all.
    let plain = Server::ready(&[], &[]);
    let (_, v) = post(&plain, "/v1/chat/completions", &chat_body("hi", 4));
    assert!(
        v["choices"][0]["message"]
            .get("reasoning_content")
            .is_none(),
        "{v}"
    );
}

/// `/v1/responses`: text in (a string, or message items after `instructions`), one output
/// message out, `incomplete` when cut by `max_output_tokens`; streamed as named events whose
/// deltas make the same text; fields it cannot honour are refused naming them. (The official
/// Python client's `responses.create` runs in tests/serve_clients.rs.)
#[test]
fn the_responses_route_answers_text_and_refuses_what_it_cannot_honour() {
    let s = Server::ready(&[], &[]);
    let body = |extra: Value| {
        let mut b = json!({"model": "demo", "input": [{"role": "user",
            "content": [{"type": "input_text", "text": "Tell me a story"}]}],
            "instructions": "Be brief", "max_output_tokens": 5, "temperature": 0});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let (status, v) = post(&s, "/v1/responses", &body(json!({})));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "response");
    let text = v["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!text.is_empty(), "{v}");
    assert_eq!(v["usage"]["output_tokens"], 5, "{v}");
    assert_eq!(v["status"], "incomplete", "{v}");
    assert_eq!(
        v["incomplete_details"]["reason"], "max_output_tokens",
        "{v}"
    );
    // Streamed: named events, ascending sequence numbers, the same text in the deltas.
    let r = send(&s, "/v1/responses", &body(json!({"stream": true})));
    let raw = r.text().unwrap();
    let (mut deltas, mut seqs, mut last) = (String::new(), Vec::new(), String::new());
    for line in raw.lines() {
        if let Some(d) = line.strip_prefix("data: ") {
            let e: Value = serde_json::from_str(d).unwrap();
            seqs.push(e["sequence_number"].as_u64().unwrap());
            if e["type"] == "response.output_text.delta" {
                deltas.push_str(e["delta"].as_str().unwrap());
            }
            last = e["type"].as_str().unwrap().to_string();
        }
    }
    assert!(raw.contains("event: response.created"), "{raw}");
    assert_eq!(deltas, text);
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(last, "response.incomplete");
    // What it cannot honour, named.
    for (extra, field) in [
        (
            json!({"tools": [{"type": "function", "name": "f"}]}),
            "tools",
        ),
        (
            json!({"previous_response_id": "resp_1"}),
            "previous_response_id",
        ),
        (json!({"text": {"format": {"type": "regex"}}}), "text"),
        (json!({"no_such_field": 1}), "no_such_field"),
        (
            json!({"input": [{"type": "function_call_output", "output": "x"}]}),
            "input",
        ),
    ] {
        let (status, v) = post(&s, "/v1/responses", &body(extra.clone()));
        assert_eq!(status, 400, "{extra}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(field),
            "{extra}: {v}"
        );
    }
    // Metadata is accepted.
    let (status, v) = post(
        &s,
        "/v1/responses",
        &body(json!({"user": "u1", "store": false})),
    );
    assert_eq!(status, 200, "{v}");
}
