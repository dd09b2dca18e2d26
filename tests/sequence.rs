//! One request, three front ends: the library's `Model::generate`, the batcher (the server's
//! scheduler) with `moe-serve serve` over HTTP, and `moe-serve run --json` give the same tokens
//! and the same text, stop strings and penalties included (they share `moe_runtime::sequence`).

mod common;
#[path = "common/server.rs"]
#[allow(dead_code)]
mod server;

use std::sync::Arc;
use std::time::Duration;

use moe_runtime::batch::{BatchConfig, Batcher, Event, RequestParams};
use moe_runtime::{CancelToken, FinishReason, GenerateParams, Model, Prompt, Settings};
use serde_json::{json, Value};

/// Tokens, text and finish reason of one finished request.
#[derive(Debug, PartialEq)]
struct Outcome {
    tokens: Vec<u32>,
    text: String,
    finish: String,
}

fn library(model: &Model, prompt: &[u32], params: &GenerateParams) -> Outcome {
    let mut g = model
        .generate(&Prompt::Ids(prompt.to_vec()), params, CancelToken::new())
        .unwrap();
    let mut text = String::new();
    for ev in g.by_ref() {
        text.push_str(&ev.unwrap().text);
    }
    text.push_str(&g.flush_text().unwrap());
    Outcome {
        tokens: g.generated().to_vec(),
        text,
        finish: g.finish_reason().unwrap().as_str().to_string(),
    }
}

fn batcher(b: &Batcher, prompt: &[u32], params: &GenerateParams) -> Outcome {
    let (tx, rx) = crossbeam_channel::unbounded();
    let request = RequestParams {
        generate: params.clone(),
        ..Default::default()
    };
    b.validate(prompt, &request).unwrap();
    b.submit(prompt.to_vec(), request, Box::new(tx)).unwrap();
    let (mut tokens, mut text) = (Vec::new(), String::new());
    loop {
        match rx.recv_timeout(Duration::from_secs(120)).unwrap() {
            Event::Token(t) => {
                tokens.push(t.id);
                text.push_str(&t.text);
            }
            Event::Done {
                finish,
                text: rest,
                usage,
            } => {
                text.push_str(&rest);
                assert_eq!(usage.completion_tokens, tokens.len());
                let finish = finish.as_str().to_string();
                return Outcome {
                    tokens,
                    text,
                    finish,
                };
            }
            Event::Failed(why) => panic!("{why}"),
        }
    }
}

/// `moe-serve run --json` flags for `params` (greedy, as every request here is).
fn run_flags(prompt: &[u32], params: &GenerateParams) -> Vec<String> {
    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let mut args = vec![
        "run".to_string(),
        "--json".into(),
        "--prompt-ids".into(),
        ids.join(","),
        "--temperature".into(),
        "0".into(),
        "--max-tokens".into(),
        params.max_tokens.unwrap().to_string(),
        "--presence-penalty".into(),
        params.presence_penalty.to_string(),
        "--frequency-penalty".into(),
        params.frequency_penalty.to_string(),
    ];
    for s in &params.stop {
        args.push("--stop".into());
        args.push(s.clone());
    }
    args
}

fn cli(prompt: &[u32], params: &GenerateParams) -> Outcome {
    let state = tempfile::tempdir().unwrap();
    let v = common::moe_json_in(state.path(), &run_flags(prompt, params));
    assert_eq!(
        v["completion_tokens"],
        v["tokens"].as_array().unwrap().len()
    );
    Outcome {
        tokens: common::tokens(&v).into_iter().map(|t| t as u32).collect(),
        text: v["text"].as_str().unwrap().to_string(),
        finish: v["finish_reason"].as_str().unwrap().to_string(),
    }
}

#[test]
fn one_request_gives_the_same_tokens_and_text_through_every_front_end() {
    let model = Arc::new(Model::load(&Settings::default()).unwrap());
    let prompt = model
        .encode_prompt(&Prompt::Text("Hello there".into()))
        .unwrap();
    let mut params = GenerateParams {
        max_tokens: Some(24),
        temperature: Some(0.0),
        presence_penalty: 0.4,
        frequency_penalty: 0.6,
        ..Default::default()
    };
    let plain = library(&model, &prompt, &params);
    assert!(plain.text.chars().count() > 6, "{plain:?}");
    // The penalties take effect.
    let unpenalised = GenerateParams {
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        ..params.clone()
    };
    assert_ne!(library(&model, &prompt, &unpenalised).tokens, plain.tokens);

    // Stop on a piece of the middle of the penalised text.
    let chars: Vec<char> = plain.text.chars().collect();
    let stop: String = chars[3..5].iter().collect();
    let at = plain.text.find(&stop).unwrap();
    params.stop = vec![stop.clone(), "never appears".into()];

    let want = library(&model, &prompt, &params);
    assert_eq!(want.text, plain.text[..at], "stop {stop:?}");
    assert_eq!(want.finish, FinishReason::Stop.as_str());
    assert!(plain.tokens.starts_with(&want.tokens));

    let b = Batcher::start(model.clone(), BatchConfig::for_model(&model, 4));
    assert_eq!(batcher(&b, &prompt, &params), want, "batcher");
    assert_eq!(
        batcher(&b, &prompt, &unpenalised),
        library(&model, &prompt, &unpenalised)
    );
    b.shutdown(Duration::from_secs(5));

    assert_eq!(cli(&prompt, &params), want, "moe-serve run --json");
    assert_eq!(
        cli(&prompt, &unpenalised),
        library(&model, &prompt, &unpenalised)
    );

    // The server: the same text and token count over HTTP.
    let s = server::Server::ready(&["--max-batch", "2"], &[]);
    let body = json!({
        "model": "demo", "prompt": prompt, "max_tokens": 24, "temperature": 0,
        "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty,
        "stop": params.stop,
    });
    let (text, finish, completion_tokens) = served(&s, &body);
    assert_eq!(text, want.text);
    assert_eq!(finish, "stop");
    assert_eq!(completion_tokens, want.tokens.len() as u64);
}

/// A `/v1/completions` request's text, finish reason and completion token count.
fn served(s: &server::Server, body: &Value) -> (String, String, u64) {
    let r = server::client()
        .post(s.url("/v1/completions"))
        .json(body)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().unwrap();
    let choice = &v["choices"][0];
    (
        choice["text"].as_str().unwrap().to_string(),
        choice["finish_reason"].as_str().unwrap().to_string(),
        v["usage"]["completion_tokens"].as_u64().unwrap(),
    )
}

#[test]
fn an_eos_token_ends_run_and_the_server_alike_without_its_text() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth_model(dir.path(), "eos", &["--preset", "demo"]);
    let model_arg = model.to_str().unwrap();
    let run = |max_tokens: usize, extra: &[&str]| -> Value {
        let max_tokens = max_tokens.to_string();
        let mut args = vec![
            "run",
            "--model",
            model_arg,
            "--no-cache",
            "--prompt-ids",
            "5,6,7,8",
            "--temperature",
            "0",
            "--max-tokens",
            &max_tokens,
            "--json",
        ];
        args.extend_from_slice(extra);
        common::moe_json_in(dir.path(), &args)
    };
    // Make a token the greedy continuation reaches (not its first) an EOS token.
    let free = common::tokens(&run(12, &["--ignore-eos"]));
    let at = (1..free.len())
        .find(|&i| !free[..i].contains(&free[i]))
        .expect("a new token");
    let path = model.join("generation_config.json");
    let mut gen: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    gen["eos_token_id"] = json!([free[at]]);
    std::fs::write(&path, gen.to_string()).unwrap();

    let v = run(12, &[]);
    // The EOS token is generated and counted, its text is not shown.
    assert_eq!(common::tokens(&v), free[..=at].to_vec());
    assert_eq!(v["completion_tokens"], at + 1);
    assert_eq!(v["finish_reason"], "stop");
    let shown = run(at, &["--ignore-eos"]);
    assert_eq!(
        v["text"], shown["text"],
        "only the tokens before EOS show text"
    );

    let s = server::Server::ready(&["--model", model_arg, "--no-cache"], &[]);
    let body = json!({"model": "eos", "prompt": [5, 6, 7, 8], "max_tokens": 12, "temperature": 0});
    let (text, finish, completion_tokens) = served(&s, &body);
    assert_eq!(text, v["text"].as_str().unwrap());
    assert_eq!(finish, "stop");
    assert_eq!(completion_tokens, at as u64 + 1);
}
