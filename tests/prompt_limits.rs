//! Prompts that cannot fit the context, and chat templates that do not end: a multi-MiB prompt
//! is refused with 400 `context_length_exceeded` while the server's peak RSS stays inside its
//! RAM budget and `/health` keeps answering; a chat template that loops without end fails
//! quickly, naming the chat template, in the server and in `moe-serve run`.

mod common;
#[path = "common/server.rs"]
#[allow(dead_code)]
mod server;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use server::{client, Server};

/// About `bytes` of ASCII words (several million tokens for the demo's tokenizer).
fn words(bytes: usize) -> String {
    const WORDS: [&str; 10] = [
        "hello", "world", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog",
    ];
    let mut text = String::with_capacity(bytes + 8);
    let mut i = 0usize;
    while text.len() < bytes {
        text.push_str(WORDS[(i * 7 + i / 10) % WORDS.len()]);
        text.push(' ');
        i += 1;
    }
    text
}

/// The largest resident set the process has had (VmHWM), in bytes.
fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/<pid>/status");
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// A body of just under the default 8 MiB request limit.
const HUGE_PROMPT_BYTES: usize = 7 << 20;

fn huge_requests() -> Vec<(&'static str, Value)> {
    let text = words(HUGE_PROMPT_BYTES);
    vec![
        (
            "/v1/completions",
            json!({"model": "demo", "prompt": text, "max_tokens": 1}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "demo", "messages": [{"role": "user", "content": text}], "max_tokens": 1}),
        ),
    ]
}

fn assert_context_exceeded(status: u16, body: &Value, param: &str) {
    assert_eq!(status, 400, "{body}");
    let e = &body["error"];
    assert_eq!(e["code"], "context_length_exceeded", "{body}");
    assert_eq!(e["param"], param, "{body}");
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("at least") && message.contains("4096"),
        "{message}"
    );
}

/// Two multi-MiB prompts at once to a server at `--ram-budget 512MiB`: both are refused, and the
/// process never holds more than the budget (tokenizing them whole took over 2 GiB).
#[test]
fn huge_prompts_are_refused_inside_the_ram_budget() {
    let s = Server::ready(&["--ram-budget", "512MiB", "--threads", "2"], &[]);
    let requests = huge_requests();
    let base = s.base.clone();
    let t0 = Instant::now();
    let handles: Vec<_> = requests
        .into_iter()
        .map(|(path, body)| {
            let url = format!("{base}{path}");
            std::thread::spawn(move || {
                let r = client().post(url).json(&body).send().unwrap();
                let status = r.status().as_u16();
                (path, status, r.json::<Value>().unwrap())
            })
        })
        .collect();
    for h in handles {
        let (path, status, body) = h.join().unwrap();
        let param = if path.contains("chat") {
            "messages"
        } else {
            "prompt"
        };
        assert_context_exceeded(status, &body, param);
    }
    let took = t0.elapsed();
    let peak = peak_rss_bytes(s.pid());
    assert!(
        peak < 512 << 20,
        "peak RSS {} MiB over the 512 MiB budget",
        peak >> 20
    );
    // Refused after work bounded by the context (tokenizing them whole took seconds each).
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // The server still serves.
    let r = client()
        .post(s.url("/v1/completions"))
        .json(&json!({"model": "demo", "prompt": "hello world", "max_tokens": 2}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// `/health` answers promptly while huge prompts are in flight: tokenization runs on blocking
/// threads, never on the async workers.
#[test]
fn health_answers_while_huge_prompts_are_tokenized() {
    let s = Server::ready(&["--threads", "2"], &[]);
    let requests = huge_requests();
    let base = s.base.clone();
    let handles: Vec<_> = requests
        .iter()
        .chain(requests.iter())
        .cloned()
        .map(|(path, body)| {
            let url = format!("{base}{path}");
            std::thread::spawn(move || {
                let r = client().post(url).json(&body).send().unwrap();
                r.status().as_u16()
            })
        })
        .collect();
    // Let the bodies arrive (loopback: milliseconds), then ask.
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let r = client().get(s.url("/health")).send().unwrap();
    let took = t0.elapsed();
    assert_eq!(r.status(), 200);
    assert!(took < Duration::from_secs(2), "/health took {took:?}");
    for h in handles {
        assert_eq!(h.join().unwrap(), 400);
    }
}

/// A copy of the demo whose chat template loops over 10^10 iterations.
fn runaway_template_model() -> tempfile::TempDir {
    let dir = common::copy_model(&common::root().join("runtime/demo"));
    let path = dir.path().join("tokenizer_config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config["chat_template"] = json!(
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ messages[0]['content'] }}{% endfor %}{% endfor %}"
    );
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    dir
}

#[test]
fn runaway_chat_template_fails_quickly_in_the_server() {
    let model = runaway_template_model();
    let s = Server::ready(
        &["--model", model.path().to_str().unwrap(), "--no-cache"],
        &[],
    );
    let c = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    for content in ["hi", ""] {
        let t0 = Instant::now();
        let r = c
            .post(s.url("/v1/chat/completions"))
            .json(&json!({"model": model_name(&model),
                          "messages": [{"role": "user", "content": content}], "max_tokens": 1}))
            .send()
            .expect("an answer within 30 s");
        let took = t0.elapsed();
        let status = r.status().as_u16();
        let body: Value = r.json().unwrap();
        assert_eq!(status, 400, "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("chat template"), "{message}");
        assert!(took < Duration::from_secs(5), "took {took:?}");
    }
    // Completions (no template) still work, and so does /health.
    let r = c
        .post(s.url("/v1/completions"))
        .json(&json!({"model": model_name(&model), "prompt": "hello", "max_tokens": 1}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

fn model_name(dir: &tempfile::TempDir) -> String {
    dir.path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// Runs `moe-serve ARGS` and returns (exit status, stderr), failing if it takes over `limit`.
fn run_cli(args: &[&str], limit: Duration) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(common::bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut text).ok();
        text
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("moe-serve {args:?} ran over {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, reader.join().unwrap())
}

#[test]
fn runaway_chat_template_fails_quickly_in_run() {
    let model = runaway_template_model();
    let (status, stderr) = run_cli(
        &[
            "run",
            "--model",
            model.path().to_str().unwrap(),
            "--no-cache",
            "--chat",
            "--prompt",
            "hi",
            "--max-tokens",
            "1",
        ],
        Duration::from_secs(30),
    );
    assert!(!status.success());
    assert!(stderr.contains("chat template"), "{stderr}");
}

/// `moe-serve run` takes the same bounded path: a prompt over the context is refused with a
/// lower bound on its length.
#[test]
fn run_refuses_a_prompt_over_the_context() {
    // argv holds at most 128 KiB per argument.
    let prompt = words(120 << 10);
    let (status, stderr) = run_cli(
        &["run", "--prompt", &prompt, "--max-tokens", "1"],
        Duration::from_secs(60),
    );
    assert!(!status.success());
    assert!(
        stderr.contains("context overflow: at least"),
        "{}",
        &stderr[..stderr.len().min(2000)]
    );
}
