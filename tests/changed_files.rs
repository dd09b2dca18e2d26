//! A model shard or cache file changed on disk under a running process never kills it
//! silently: a file truncated in place (a new model copied over the folder, `rsync --inplace`)
//! fails the request that reads it and every later one with a line naming the file, `/health`
//! turns 503 naming it, and the server stays up and shuts down cleanly; a file rewritten in
//! place is noticed by the watcher; a file replaced by a rename keeps being served as opened.

mod common;
#[path = "common/server.rs"]
#[allow(dead_code)]
mod server;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use moe_runtime::{CancelToken, GenerateParams, Logits, Model, Prompt, Settings};
use serde_json::{json, Value};
use server::{client, Server};

/// A fresh demo-sized model (two shards) in `dir/m`.
fn model_in(dir: &Path) -> PathBuf {
    common::synth_model(dir, "m", &[])
}

/// The model's first shard (resident weights of the early layers live there).
fn shard(model: &Path) -> PathBuf {
    model.join("model-00001-of-00002.safetensors")
}

/// Truncates `path` in place (same inode) to its first page.
fn truncate_in_place(path: &Path) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(4096)
        .unwrap();
}

fn complete(s: &Server) -> (u16, Value) {
    let body = json!({
        "model": "m",
        "prompt": "Hello there",
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": true,
    });
    let r = client()
        .post(s.url("/v1/completions"))
        .json(&body)
        .send()
        .expect("the server answers (it must not die)");
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn message(v: &Value) -> String {
    v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Truncates `victim` under a running `moe-serve serve ARGS` and checks what follows.
fn serve_then_truncate(args: &[&str], env: &[(&str, &str)], victim: impl Fn() -> PathBuf) {
    let mut s = Server::ready(args, env);
    let (st, ok) = complete(&s);
    assert_eq!(st, 200, "{ok}");
    let path = victim();
    truncate_in_place(&path);
    let name = path.display().to_string();

    // The next request reads the truncated pages (or the admission check sees the new size):
    // it fails naming the file instead of killing the server or answering from zeros.
    // Whether the scheduler or the admission check found it, the error keeps its kind: 503
    // `model_files_changed`, never a generic 500.
    let (st, v) = complete(&s);
    let msg = message(&v);
    assert_eq!(st, 503, "{v}");
    assert_eq!(v["error"]["code"], "model_files_changed", "{v}");
    assert!(
        msg.contains(&name) && msg.contains("changed on disk") && msg.contains("truncated"),
        "{v}"
    );
    // Every later request fails the same way; /health says why.
    let (st, v) = complete(&s);
    assert_eq!(st, 503, "{v}");
    assert!(message(&v).contains(&name), "{v}");
    let r = client().get(s.url("/health")).send().unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().unwrap();
    assert!(
        message(&v).contains(&name) && message(&v).contains("restart"),
        "{v}"
    );
    assert!(s.child.try_wait().unwrap().is_none(), "the server is alive");
    // The line was printed on stderr.
    let mut printed = false;
    while let Ok(line) = s.log.recv_timeout(Duration::from_millis(200)) {
        printed |= line.contains(&name) && line.contains("changed on disk");
    }
    assert!(printed, "no line naming {name} on stderr");
    let status = s.terminate(Duration::from_secs(60));
    assert!(status.is_some_and(|st| st.success()), "{status:?}");
}

#[test]
fn a_shard_truncated_under_the_server_fails_requests_and_health_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_in(dir.path());
    let m = model.to_str().unwrap().to_string();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    serve_then_truncate(
        &["--model", &m, "--no-cache", "--max-batch", "2"],
        &[("XDG_STATE_HOME", state), ("XDG_CACHE_HOME", state)],
        || shard(&model),
    );
}

#[test]
fn a_cache_file_truncated_under_the_server_fails_requests_and_health_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_in(dir.path());
    let m = model.to_str().unwrap().to_string();
    let cache = dir.path().join("cache");
    let cache_arg = cache.to_str().unwrap().to_string();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    serve_then_truncate(
        &[
            "--model",
            &m,
            "--quantization",
            "q8_0",
            "--cache-dir",
            &cache_arg,
        ],
        &[("XDG_STATE_HOME", state)],
        || {
            let files: Vec<PathBuf> = std::fs::read_dir(&cache)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
                .collect();
            assert_eq!(files.len(), 1, "{files:?}");
            files[0].clone()
        },
    );
}

fn load(model: &Path, cache_dir: &Path) -> Model {
    Model::load(&Settings {
        model: Some(model.to_string_lossy().into_owned()),
        cache: false,
        cache_dir: Some(cache_dir.to_path_buf()),
        state_dir: Some(cache_dir.join("state")),
        threads: Some(2),
        ..Default::default()
    })
    .unwrap()
}

fn greedy(model: &Model, n: usize) -> moe_runtime::Result<Vec<u32>> {
    let params = GenerateParams {
        max_tokens: Some(n),
        temperature: Some(0.0),
        ignore_eos: true,
        ..Default::default()
    };
    model
        .generate(&Prompt::Ids(vec![1, 2, 3]), &params, CancelToken::new())?
        .map(|t| t.map(|t| t.id))
        .collect()
}

#[test]
fn generation_after_a_shard_is_truncated_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = model_in(dir.path());
    let model = load(&model_dir, &dir.path().join("cache"));
    let before = greedy(&model, 4).unwrap();
    assert_eq!(before.len(), 4);
    let path = shard(&model_dir);
    truncate_in_place(&path);

    // A forward pass reads the mapping directly: past the new end it reads zeros (instead of
    // SIGBUS ending the process), and the pass fails naming the file.
    let mut st = model.new_state();
    let err = model
        .forward(&[1, 2, 3], &mut st, Logits::Last, None)
        .unwrap_err()
        .to_string();
    let name = path.display().to_string();
    assert!(
        err.contains(&name) && err.contains("truncated") && err.contains("restart"),
        "{err}"
    );
    // From then on the model is unusable, with the same message.
    let err = greedy(&model, 4).unwrap_err().to_string();
    assert!(err.contains(&name) && err.contains("truncated"), "{err}");
    assert!(model.check_files().is_err());
}

#[test]
fn a_shard_rewritten_in_place_is_noticed_and_a_replaced_one_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let a_dir = dir.path().join("a");
    let b_dir = dir.path().join("b");
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::create_dir_all(&b_dir).unwrap();
    let a = model_in(&a_dir);
    let b = model_in(&b_dir);
    let model_a = load(&a, &dir.path().join("cache"));
    let model_b = load(&b, &dir.path().join("cache"));
    let reference = greedy(&model_b, 4).unwrap();

    // Replaced by a rename: the open file stays mapped and intact; serving goes on.
    let other = b_dir.join("other.safetensors");
    std::fs::copy(shard(&a), &other).unwrap();
    std::fs::rename(&other, shard(&b)).unwrap();

    // Rewritten in place, same size (as `rsync --inplace` does): bytes may be mixed.
    let path = shard(&a);
    let len = std::fs::metadata(&path).unwrap().len();
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.seek(SeekFrom::Start(len / 2)).unwrap();
        f.write_all(&[0x55; 64]).unwrap();
        f.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        match model_a.check_files() {
            Err(e) => break e.to_string(),
            Ok(()) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Ok(()) => panic!("a file modified in place was not noticed"),
        }
    };
    assert!(
        err.contains(&path.display().to_string()) && err.contains("modified in place"),
        "{err}"
    );
    assert!(greedy(&model_a, 2).is_err());

    model_b.check_files().unwrap();
    assert_eq!(greedy(&model_b, 4).unwrap(), reference);
}
