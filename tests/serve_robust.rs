//! `moe-serve serve` under slow, hostile and departing clients: header, body and idle
//! timeouts, the connection cap at a low open-file limit, the up-front 413, drain with a
//! half-sent request, queued clients that hang up, and a bounded fuzz of request bodies.

mod common;
#[path = "common/server.rs"]
#[allow(dead_code)]
mod server;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use server::{assert_ends_with_done, client, demo_config, Server};

/// Reads until the server closes the connection (EOF or reset), at most `limit`. Returns the
/// bytes read and how long it took to close, or `None` for the time if it was still open.
fn read_until_closed(conn: &mut TcpStream, limit: Duration) -> (Vec<u8>, Option<Duration>) {
    let t0 = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(t0.elapsed());
        if left.is_zero() {
            return (out, None);
        }
        conn.set_read_timeout(Some(left.min(Duration::from_millis(200))))
            .unwrap();
        match conn.read(&mut buf) {
            Ok(0) => return (out, Some(t0.elapsed())),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (out, Some(t0.elapsed())),
        }
    }
}

/// Reads one HTTP/1.1 response with a `Content-Length` body: (status line, headers, body).
fn read_response(conn: &mut TcpStream) -> (String, String, Vec<u8>) {
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut r = BufReader::new(conn);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    let mut headers = String::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        headers.push_str(&line.to_ascii_lowercase());
    }
    let len: usize = headers
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).unwrap();
    (status.trim_end().to_string(), headers, body)
}

fn assert_error_shape(v: &Value) {
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("code").is_some(), "{v}");
    assert!(e.get("param").is_some(), "{v}");
}

fn chat_body(content: &str, max_tokens: usize, stream: bool) -> Value {
    json!({
        "model": "demo",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": stream,
    })
}

#[test]
fn half_sent_heads_and_silent_connections_are_closed_at_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = demo_config(dir.path(), "", "header_timeout_s = 1");
    let s = Server::ready(&["--config", cfg.to_str().unwrap()], &[]);
    let mut silent = s.connect();
    let mut dripping = s.connect();
    dripping
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // A byte every 200 ms does not extend the deadline: it counts from the connection's start.
    let drip = std::thread::spawn(move || {
        let t0 = Instant::now();
        for b in b"X-Slow: 1234567890abcdefghij\r\n".iter().cycle() {
            if dripping.write_all(&[*b]).is_err() || t0.elapsed() > Duration::from_secs(6) {
                return t0.elapsed();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        unreachable!()
    });
    let (_, closed) = read_until_closed(&mut silent, Duration::from_secs(5));
    let closed = closed.expect("a silent connection stayed open past the header timeout");
    assert!(closed < Duration::from_millis(3000), "{closed:?}");
    let dripped_for = drip.join().unwrap();
    assert!(
        dripped_for < Duration::from_secs(4),
        "a dripping head kept its connection for {dripped_for:?}"
    );
    // Real clients are unaffected.
    assert_eq!(client().get(s.url("/health")).send().unwrap().status(), 200);
    assert!(
        s.metric(
            "moe_http_connections_closed_total{reason=\"header_timeout\"}",
            None
        )
        .unwrap()
            >= 2.0
    );
}

#[test]
fn a_body_that_does_not_arrive_in_time_gets_408_and_the_connection_closes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = demo_config(dir.path(), "", "body_timeout_s = 1");
    let s = Server::ready(&["--config", cfg.to_str().unwrap()], &[]);
    let mut conn = s.connect();
    conn.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 200\r\n\r\n{\"model\": \"demo\",",
    )
    .unwrap();
    let (bytes, closed) = read_until_closed(&mut conn, Duration::from_secs(6));
    let closed = closed.expect("the connection stayed open past the body timeout");
    assert!(closed < Duration::from_secs(4), "{closed:?}");
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let v: Value = serde_json::from_str(body).unwrap();
    assert_error_shape(&v);
    assert_eq!(v["error"]["code"], "request_timeout");
    assert_eq!(
        s.metric(
            "moe_requests_total{route=\"/v1/chat/completions\",status=\"408\"}",
            None
        ),
        Some(1.0)
    );
}

#[test]
fn a_kept_alive_connection_serves_requests_then_closes_when_idle() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = demo_config(dir.path(), "", "idle_timeout_s = 1");
    let s = Server::ready(&["--config", cfg.to_str().unwrap()], &[]);
    let mut conn = s.connect();
    for _ in 0..2 {
        conn.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let (status, _, body) = read_response(&mut conn);
        assert_eq!(
            status,
            "HTTP/1.1 200 OK",
            "{}",
            String::from_utf8_lossy(&body)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let (_, closed) = read_until_closed(&mut conn, Duration::from_secs(5));
    let closed = closed.expect("an idle kept-alive connection was never closed");
    assert!(closed < Duration::from_secs(3), "{closed:?}");
}

#[test]
fn a_client_that_stops_reading_its_stream_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = demo_config(dir.path(), "", "idle_timeout_s = 1");
    let s = Server::ready(&["--config", cfg.to_str().unwrap()], &[]);
    // Large events (20 alternatives per token) fill the socket buffers quickly.
    let mut body = chat_body("flood", 3500, true);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(20);
    let body = body.to_string();
    let mut conn = s.connect();
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Never read: once the server's writes block for idle_timeout_s, it closes the connection
    // and the abandoned request stops (or has already finished into the socket buffers).
    let deadline = Instant::now() + Duration::from_secs(60);
    let series = "moe_http_connections_closed_total{reason=\"write_timeout\"}";
    while s.metric(series, None) != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "a stalled reader was never closed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    while s.metric("moe_running_requests", None) != Some(0.0) {
        assert!(
            Instant::now() < deadline,
            "the abandoned request kept running"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // (How many tokens were generated before the stall was seen depends on the kernel's socket
    // buffers and the machine's speed: the closed connection and the stopped request are what
    // must hold.)
    drop(conn);
}

#[test]
fn slow_connections_never_lock_real_clients_out() {
    // Like 1,100 slow clients against a limit of 1024, at a quarter of the scale.
    let dir = tempfile::tempdir().unwrap();
    let cfg = demo_config(dir.path(), "", "header_timeout_s = 60");
    let s = Server::start_with_fd_limit(&["--config", cfg.to_str().unwrap()], &[], Some(256));
    s.wait_ready();
    let mut slow = Vec::new();
    for _ in 0..320 {
        let mut c = s.connect();
        let _ = c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n");
        slow.push(c);
    }
    // A real client still gets through, at once.
    let t0 = Instant::now();
    let c = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let r = c.get(s.url("/health")).send();
    assert!(
        r.as_ref().is_ok_and(|r| r.status() == 200),
        "{r:?} after {:?}",
        t0.elapsed()
    );
    let evicted = s
        .metric(
            "moe_http_connections_closed_total{reason=\"evicted\"}",
            None,
        )
        .unwrap();
    assert!(evicted >= 100.0, "{evicted}");
    // The cap (256 less the reserve of 64), plus at most the scrape itself.
    let open = s.metric("moe_http_connections", None).unwrap();
    assert!(open <= 193.0, "{open}");
    drop(slow);
}

#[test]
fn a_declared_body_over_the_limit_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = demo_config(dir.path(), "", "max_request_bytes = \"64KiB\"");
    let s = Server::ready(&["--config", cfg.to_str().unwrap()], &[]);
    let mut conn = s.connect();
    conn.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100000000\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    // No `100 Continue`: the answer is the 413 itself, without a byte of the body sent.
    let (status, headers, body) = read_response(&mut conn);
    assert_eq!(status, "HTTP/1.1 413 Payload Too Large");
    assert!(headers.contains("connection: close"), "{headers}");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_error_shape(&v);
    assert_eq!(v["error"]["code"], "request_too_large");
    // Chunked bodies keep the limit as they arrive.
    let mut conn = s.connect();
    let body = format!(
        "{{\"model\": \"demo\", \"messages\": [{{\"role\": \"user\", \"content\": \"{}\"}}]}}",
        "x".repeat(70 << 10)
    );
    conn.write_all(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    let (status, _, body) = read_response(&mut conn);
    assert_eq!(status, "HTTP/1.1 413 Payload Too Large");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "request_too_large");
}

#[test]
fn drain_answers_503_and_a_half_sent_request_does_not_hold_the_exit() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = demo_config(
        dir.path(),
        "",
        "drain_timeout_s = 2\nheader_timeout_s = 60\nbody_timeout_s = 60",
    );
    let mut s = Server::ready(&["--config", cfg.to_str().unwrap()], &[]);
    // A long stream, and a request whose body never finishes.
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .json(&chat_body("drain", 3500, true))
        .send()
        .unwrap();
    let mut stream = BufReader::new(r);
    let mut first = String::new();
    stream.read_line(&mut first).unwrap();
    assert!(first.starts_with("data: "), "{first}");
    let mut half = s.connect();
    half.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 500\r\n\r\n{\"model\"",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    // SAFETY: kill(2) on our own child's pid with a valid signal number.
    unsafe {
        libc::kill(s.pid() as i32, libc::SIGTERM);
    }
    std::thread::sleep(Duration::from_millis(300));
    // Still accepting: /health and new requests say 503.
    let r = client().get(s.url("/health")).send().unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().unwrap();
    assert_error_shape(&v);
    assert_eq!(v["error"]["code"], "shutting_down");
    let r = client()
        .post(s.url("/v1/chat/completions"))
        .json(&chat_body("late", 2, false))
        .send()
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.json::<Value>().unwrap()["error"]["code"], "shutting_down");
    // The stream is cut at the deadline and still ends properly.
    let rest: Vec<String> = stream.lines().map_while(Result::ok).collect();
    assert_ends_with_done(&rest);
    // The half-sent request does not keep the process alive past the deadline.
    let status = loop {
        if let Ok(Some(st)) = s.child.try_wait() {
            break Some(st);
        }
        if t0.elapsed() > Duration::from_secs(2 + 4) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = t0.elapsed();
    assert!(
        status.is_some_and(|st| st.success()),
        "{status:?} after {took:?}"
    );
    let (_, closed) = read_until_closed(&mut half, Duration::from_secs(1));
    assert!(closed.is_some());
}

#[test]
fn queued_clients_that_hang_up_leave_the_queue_at_once() {
    let s = Server::ready(&["--max-batch", "1", "--max-queue", "2"], &[]);
    let c = client();
    let stream_req = || {
        c.post(s.url("/v1/chat/completions"))
            .json(&chat_body("queue", 3500, true))
            .send()
            .unwrap()
    };
    let running = stream_req();
    assert_eq!(running.status(), 200);
    let mut running = BufReader::new(running);
    let mut first = String::new();
    running.read_line(&mut first).unwrap();
    // Two more wait in the queue; a third is refused.
    let queued: Vec<_> = (0..2).map(|_| stream_req()).collect();
    assert!(queued.iter().all(|r| r.status() == 200));
    assert_eq!(stream_req().status(), 429);
    drop(queued);
    // Their places are free again while the first request still runs.
    let t0 = Instant::now();
    loop {
        let r = stream_req();
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 429);
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "clients that hung up kept their queue places"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(s.metric("moe_running_requests", None), Some(1.0));
}

/// The sampler's SplitMix64: a fixed seed gives the same cases on every run.
struct Rng(moe_runtime::sampler::Rng);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(moe_runtime::sampler::Rng::new(seed))
    }

    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

/// A value of a random type, sized from harmless to hostile.
fn random_value(rng: &mut Rng) -> Value {
    match rng.below(22) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(-1),
        3 => json!(0),
        4 => json!(1e308),
        5 => json!(-1e308),
        6 => json!(u64::MAX),
        7 => json!(i64::MIN),
        8 => json!(0.5),
        9 => json!(""),
        10 => json!("x".repeat(rng.below(20_000))),
        11 => json!("\u{0}\u{FFFD}🦀 é \" \\ \n"),
        12 => json!([]),
        13 => json!({}),
        14 => json!([1, 2, 3]),
        15 => json!((0..rng.below(2000)).collect::<Vec<usize>>()),
        16 => json!([{"role": "user", "content": "hi"}]),
        17 => json!([{"type": "text", "text": "hi"}]),
        18 => json!({"include_usage": true}),
        19 => json!(rng.below(5000)),
        20 => json!(["a", "b", "c", "d", "e"]),
        _ => {
            let mut v = json!(1);
            for _ in 0..rng.below(300) {
                v = json!([v]);
            }
            v
        }
    }
}

/// Replaces, removes or adds one node somewhere in `v`.
fn mutate_tree(v: &mut Value, rng: &mut Rng) {
    let descend = rng.below(3) != 0;
    match v {
        Value::Object(map) if !map.is_empty() && descend => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let k = rng.pick(&keys).clone();
            mutate_tree(map.get_mut(&k).unwrap(), rng);
        }
        Value::Array(items) if !items.is_empty() && descend => {
            let i = rng.below(items.len());
            mutate_tree(&mut items[i], rng);
        }
        Value::Object(map) if rng.below(3) == 0 => {
            let keys: Vec<String> = map.keys().cloned().collect();
            if !keys.is_empty() && rng.below(2) == 0 {
                let k = rng.pick(&keys).clone();
                map.remove(&k);
            } else {
                let names = [
                    "stream",
                    "n",
                    "logprobs",
                    "top_logprobs",
                    "stop",
                    "seed",
                    "tools",
                    "x",
                    "max_completion_tokens",
                    "stream_options",
                    "top_k",
                    "min_p",
                    "top_p",
                    "temperature",
                    "presence_penalty",
                    "frequency_penalty",
                    "ignore_eos",
                ];
                map.insert(rng.pick(&names).to_string(), random_value(rng));
            }
        }
        _ => *v = random_value(rng),
    }
}

/// Sets one sampling field to a value near (and past) its valid range.
fn mutate_mildly(v: &mut Value, rng: &mut Rng) {
    let f = (rng.next() % 10_000) as f64 / 1000.0; // 0.0 ..= 9.999
    let (key, value) = match rng.below(12) {
        0 => ("temperature", json!(f / 3.0)),
        1 => ("top_p", json!(f / 5.0 - 0.5)),
        2 => ("top_k", json!(rng.below(120) as i64 - 5)),
        3 => ("max_tokens", json!(rng.below(120))),
        4 => ("seed", json!(rng.next())),
        5 => ("stop", json!([format!("{}", rng.below(10)), "\n"])),
        6 => ("presence_penalty", json!(f - 5.0)),
        7 => ("frequency_penalty", json!(f / 2.0 - 2.5)),
        8 => ("top_logprobs", json!(rng.below(25))),
        9 => ("stream", json!(rng.below(2) == 0)),
        10 => ("min_p", json!(f / 8.0)),
        _ => ("n", json!(rng.below(3))),
    };
    v[key] = value;
}

/// Byte-level damage: a cut, a flipped byte, inserted noise, or a duplicated key.
fn mutate_bytes(mut b: Vec<u8>, rng: &mut Rng) -> Vec<u8> {
    match rng.below(5) {
        0 if !b.is_empty() => b.truncate(rng.below(b.len())),
        1 if !b.is_empty() => {
            let i = rng.below(b.len());
            b[i] ^= 1 << rng.below(8);
        }
        2 => {
            let i = rng.below(b.len() + 1);
            let noise: Vec<u8> = (0..rng.below(16) + 1).map(|_| rng.next() as u8).collect();
            b.splice(i..i, noise);
        }
        3 if b.len() > 1 => {
            b.pop();
            b.extend_from_slice(br#","model":"demo","max_tokens":3}"#);
        }
        _ => b.extend_from_slice(b"\x00\xff"),
    }
    b
}

#[test]
fn fuzzed_request_bodies_always_get_openai_shaped_answers() {
    let dir = tempfile::tempdir().unwrap();
    // A short context bounds every generation the fuzz may ask for.
    let cfg = demo_config(dir.path(), "max_context = 96\nmax_batch = 4", "");
    let s = Server::ready(&["--config", cfg.to_str().unwrap()], &[]);
    let c = client();
    let seeds = [
        (
            "/v1/chat/completions",
            json!({
                "model": "demo",
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
                "max_tokens": 4, "temperature": 0.7, "top_p": 0.9, "seed": 1,
                "stop": ["\n"], "logprobs": true, "top_logprobs": 2,
                "stream": false, "stream_options": {"include_usage": true},
            }),
        ),
        (
            "/v1/completions",
            json!({"model": "demo", "prompt": "Once upon", "max_tokens": 4, "temperature": 0, "logprobs": 1, "echo": false}),
        ),
        (
            "/v1/completions",
            json!({"model": "demo", "prompt": [5, 6, 7], "max_tokens": 3, "stream": true}),
        ),
    ];
    // CI runs a fixed 600 cases; longer or other runs: MOE_SERVE_FUZZ_CASES, MOE_SERVE_FUZZ_SEED.
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let mut rng = Rng::new(env("MOE_SERVE_FUZZ_SEED").unwrap_or(0x6d6f_652d_6675_7a7a));
    let types = [
        Some("application/json"),
        Some("application/json; charset=utf-8"),
        Some("text/plain"),
        None,
    ];
    let cases = env("MOE_SERVE_FUZZ_CASES").unwrap_or(600);
    let mut by_status = std::collections::BTreeMap::<u16, usize>::new();
    for case in 0..cases {
        let (path, seed) = rng.pick(&seeds).clone();
        let body: Vec<u8> = match rng.below(10) {
            // Random bytes.
            0 => (0..rng.below(300)).map(|_| rng.next() as u8).collect(),
            // Sampling settings in and out of range.
            1..=3 => {
                let mut v = seed.clone();
                for _ in 0..rng.below(3) + 1 {
                    mutate_mildly(&mut v, &mut rng);
                }
                serde_json::to_vec(&v).unwrap()
            }
            // Structural damage, sometimes several times.
            4..=6 => {
                let mut v = seed.clone();
                for _ in 0..rng.below(3) + 1 {
                    mutate_tree(&mut v, &mut rng);
                }
                serde_json::to_vec(&v).unwrap()
            }
            // Byte damage of a valid body.
            _ => mutate_bytes(serde_json::to_vec(&seed).unwrap(), &mut rng),
        };
        let ctype = if rng.below(8) == 0 {
            *rng.pick(&types)
        } else {
            Some("application/json")
        };
        let mut req = c.post(s.url(path)).body(body.clone());
        if let Some(t) = ctype {
            req = req.header("content-type", t);
        }
        let r = req
            .send()
            .unwrap_or_else(|e| panic!("case {case}: no answer: {e}"));
        let status = r.status().as_u16();
        *by_status.entry(status).or_default() += 1;
        let is_stream = r
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let text = r.text().unwrap();
        let shown = String::from_utf8_lossy(&body[..body.len().min(300)]).to_string();
        assert!(
            status < 500,
            "case {case}: {status} for {path} {shown}: {text}"
        );
        if status >= 400 {
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("case {case}: {status} body is not JSON ({e}): {text}"));
            assert_error_shape(&v);
        } else if is_stream {
            let data: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            assert_eq!(data.last(), Some(&"[DONE]"), "case {case}: {text}");
            assert!(
                !data.iter().any(|d| d.starts_with("{\"error\"")),
                "case {case}: {shown}: {text}"
            );
        } else {
            let v: Value = serde_json::from_str(&text).unwrap();
            assert!(v["choices"].is_array(), "case {case}: {text}");
        }
    }
    eprintln!("{cases} fuzzed bodies, answers by status: {by_status:?}");
    // The fuzz reached the handlers, not only the JSON parser.
    assert!(
        by_status.get(&200).is_some_and(|&n| n >= 50),
        "{by_status:?}"
    );
    assert!(
        by_status.get(&400).is_some_and(|&n| n >= 100),
        "{by_status:?}"
    );
    assert_eq!(client().get(s.url("/health")).send().unwrap().status(), 200);
    let panics: Vec<String> = s
        .log
        .try_iter()
        .filter(|l| l.contains("panicked"))
        .collect();
    assert!(panics.is_empty(), "{panics:?}");
}
