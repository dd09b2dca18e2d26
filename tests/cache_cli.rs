//! The persisted quantized weight cache through the real `moe-serve` binary: a second start maps
//! the file the first one built; a damaged, truncated, half-written or unwritable cache never
//! changes a result silently and never leaves a file that a later start would trust; the cache
//! commands (`cache build|verify|info|clear`) report what is on disk; the file reads with the
//! `gguf` Python package.
//!
//! Every test has its own temporary folder holding the model, the cache folder (`--cache-dir`)
//! and the per-user folders (`XDG_CACHE_HOME`, `XDG_STATE_HOME`), so nothing touches the real
//! ones. Each fault a test injects is shown to have fired (a checksum warning naming the
//! tensor, the kill signal, "File too large", the lock being waited for) before its outcome is
//! checked.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

mod common;
use common::{stderr, stdout, tokens, Sandbox};

/// Prompt of the generation runs: long enough, with enough new tokens, that most experts of
/// the demo model are routed at least once.
const PROMPT_IDS: &str = "1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16";

/// The arguments of a greedy `run --json` of `n` tokens past end-of-sequence.
fn generate_args(n: &str) -> [&str; 8] {
    [
        "--prompt-ids",
        PROMPT_IDS,
        "--max-tokens",
        n,
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ]
}

impl Sandbox {
    fn serve(&self, sub: &[&str], model: Option<&Path>, extra: &[&str]) -> Output {
        self.command_for(sub, model, "q8_0", extra)
            .output()
            .unwrap()
    }

    /// Greedy `run --json` of `max_tokens` tokens past end-of-sequence.
    fn generate(&self, model: Option<&Path>, max_tokens: usize, extra: &[&str]) -> Output {
        let n = max_tokens.to_string();
        let mut args = generate_args(&n).to_vec();
        args.extend_from_slice(extra);
        self.serve(&["run"], model, &args)
    }

    /// Exactly one cache file, no temporary file, and `cache verify` finds it intact.
    fn assert_one_intact_cache(&self, model: &Path) {
        assert_eq!(self.cache_files().len(), 1, "{:?}", self.listing());
        assert!(self.temp_files().is_empty(), "{:?}", self.listing());
        let (ok, report) = self.verify(Some(model));
        assert!(ok, "{report}");
    }

    /// The cache files (`*.gguf`) in the cache folder.
    fn cache_files(&self) -> Vec<PathBuf> {
        self.listing()
            .into_iter()
            .filter(|n| n.ends_with(".gguf"))
            .map(|n| self.cache_dir().join(n))
            .collect()
    }

    /// `cache verify`: whether it said ok, and its stdout.
    fn verify(&self, model: Option<&Path>) -> (bool, String) {
        let o = self.serve(&["cache", "verify"], model, &[]);
        let ok = o.status.success();
        let out = stdout(&o);
        assert_eq!(
            ok,
            out.contains(": ok ("),
            "exit status and report disagree: {out} / {}",
            stderr(&o)
        );
        (ok, out)
    }

    /// `cache info --json` of the model's cache file.
    fn info(&self, model: Option<&Path>) -> Value {
        json_line(&self.serve(&["cache", "info"], model, &["--json"]))
    }
}

/// The one JSON line a successful command printed on stdout.
fn json_line(o: &Output) -> Value {
    assert!(o.status.success(), "exit {:?}: {}", o.status, stderr(o));
    let out = stdout(o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "stdout must be one JSON line: {out:?}");
    serde_json::from_str(lines[0]).unwrap()
}

/// A failed command: a plain non-zero exit (no signal), exactly one `error:` line on stderr
/// containing every needle, no panic. Returns the error line.
fn assert_clean_failure(o: &Output, needles: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected exit code 1, got {:?}; stderr: {err}",
        o.status
    );
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "a panic reached the user: {err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
    for n in needles {
        assert!(lines[0].contains(n), "error line lacks {n:?}: {}", lines[0]);
    }
    lines[0].to_string()
}

/// Absolute (offset, size) of every tensor of a cache file, from `cache info --json`: the
/// tensors follow the header in order, each 256-byte aligned, then the checksum table (one
/// u64 per tensor plus one), then padding to 256 bytes. Checked against `cache verify` by the
/// tests that use it (the damaged tensor it names is the one flipped).
fn tensor_extents(info: &Value) -> BTreeMap<String, (u64, u64)> {
    const ALIGN: u64 = 256;
    let up = |x: u64| x.div_ceil(ALIGN) * ALIGN;
    let rows = info["tensors"].as_array().unwrap();
    let mut rel = Vec::with_capacity(rows.len());
    let mut end = 0u64;
    for r in rows {
        let start = up(end);
        let bytes = r["bytes"].as_u64().unwrap();
        rel.push((r["name"].as_str().unwrap().to_string(), start, bytes));
        end = start + bytes;
    }
    let data_bytes = up(up(end) + (rows.len() as u64 + 1) * 8);
    let file_bytes = info["file_bytes"].as_u64().unwrap();
    let data_start = file_bytes - data_bytes;
    assert!(
        data_start > 0 && data_start.is_multiple_of(ALIGN),
        "data section start {data_start} of a {file_bytes}-byte file"
    );
    rel.into_iter()
        .map(|(name, start, bytes)| (name, (data_start + start, bytes)))
        .collect()
}

/// Flips every bit of the byte in the middle of `tensor` in the cache file; returns its offset.
fn flip_middle_byte(file: &Path, info: &Value, tensor: &str) -> u64 {
    let (start, bytes) = tensor_extents(info)[tensor];
    let at = start + bytes / 2;
    let mut data = std::fs::read(file).unwrap();
    data[at as usize] ^= 0xff;
    std::fs::write(file, data).unwrap();
    at
}

/// The bytes of every file in a folder, by name.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// The cache file a `run --json` used.
fn cache_of(v: &Value) -> PathBuf {
    PathBuf::from(
        v["cache"]
            .as_str()
            .unwrap_or_else(|| panic!("no cache: {v}")),
    )
}

#[test]
fn second_start_maps_the_cache_the_first_built() {
    let sb = Sandbox::new();
    let model = sb.synth("demo", "demo", &[]);
    let first_out = sb.generate(Some(&model), 8, &[]);
    let first = json_line(&first_out);
    let file = cache_of(&first);
    assert_eq!(file.parent(), Some(sb.cache_dir().as_path()));
    assert!(file.is_file(), "{} not written", file.display());
    assert_eq!(sb.cache_files(), vec![file.clone()]);
    assert!(sb.temp_files().is_empty(), "{:?}", sb.listing());
    let err = stderr(&first_out);
    assert!(
        err.lines()
            .any(|l| l.starts_with("built ") && l.contains(&*file.to_string_lossy())),
        "the first start reports its build on stderr: {err}"
    );
    let before = std::fs::metadata(&file).unwrap();

    let second_out = sb.generate(Some(&model), 8, &[]);
    let second = json_line(&second_out);
    assert_eq!(cache_of(&second), file);
    let after = std::fs::metadata(&file).unwrap();
    assert_eq!(after.ino(), before.ino(), "the file was replaced");
    assert_eq!(
        (after.mtime(), after.mtime_nsec()),
        (before.mtime(), before.mtime_nsec()),
        "the file was rewritten"
    );
    assert!(
        !stderr(&second_out).contains("built "),
        "the second start built again: {}",
        stderr(&second_out)
    );
    assert_eq!(tokens(&first).len(), 8);
    assert_eq!(tokens(&first), tokens(&second));

    // The same quantization made at load, with no cache, computes the same tokens.
    let uncached = json_line(&sb.generate(Some(&model), 8, &["--no-cache"]));
    assert!(uncached["cache"].is_null(), "{}", uncached["cache"]);
    assert_eq!(tokens(&uncached), tokens(&first));
    assert_eq!(sb.cache_files(), vec![file]);
}

/// Flips one byte in the middle of `tensor`, checks `cache verify` names exactly that tensor
/// (so the offset is right), then runs with default settings: same tokens as the clean run, a
/// checksum warning naming the file and the tensor, and afterwards a repaired file equal to the
/// clean one.
fn damaged_tensor_is_detected_and_repaired(
    sb: &Sandbox,
    model: &Path,
    info: &Value,
    clean_bytes: &[u8],
    clean_tokens: &[u64],
    tensor: &str,
) {
    let file = PathBuf::from(info["path"].as_str().unwrap());
    flip_middle_byte(&file, info, tensor);
    let (ok, report) = sb.verify(Some(model));
    assert!(!ok);
    assert!(
        report.contains("1 of") && report.contains(tensor),
        "verify names the flipped tensor {tensor}: {report}"
    );

    let out = sb.generate(Some(model), 24, &[]);
    let v = json_line(&out);
    let err = stderr(&out);
    assert!(
        err.contains("checksum") && err.contains(&*file.to_string_lossy()) && err.contains(tensor),
        "no checksum warning naming {} and {tensor}: {err}",
        file.display()
    );
    assert_eq!(tokens(&v), clean_tokens, "damage changed the output");
    let (ok, report) = sb.verify(Some(model));
    assert!(ok, "not repaired: {report}");
    assert!(
        std::fs::read(&file).unwrap() == clean_bytes,
        "the repaired file differs from the clean one"
    );
}

#[test]
fn flipped_bytes_never_change_the_output() {
    let sb = Sandbox::new();
    let model = sb.synth("demo", "demo", &[]);
    let trace = sb.path().join("trace.jsonl");
    let clean = json_line(&sb.generate(Some(&model), 24, &["--trace", trace.to_str().unwrap()]));
    let clean_tokens = tokens(&clean);
    let file = cache_of(&clean);
    let clean_bytes = std::fs::read(&file).unwrap();
    let info = sb.info(Some(&model));
    assert_eq!(info["path"].as_str().unwrap(), file.to_str().unwrap());

    // An expert the clean run routed (so the damaged run reads it): its down projection.
    let first_route: Value = serde_json::from_str(
        std::fs::read_to_string(&trace)
            .unwrap()
            .lines()
            .nth(5)
            .unwrap(),
    )
    .unwrap();
    let layer = first_route["layer"].as_u64().unwrap();
    let expert = first_route["experts"][0].as_u64().unwrap();
    let expert_tensor = format!("moe.layers.{layer}.experts.{expert}.down.q8_0");
    assert!(tensor_extents(&info).contains_key(&expert_tensor));
    damaged_tensor_is_detected_and_repaired(
        &sb,
        &model,
        &info,
        &clean_bytes,
        &clean_tokens,
        &expert_tensor,
    );
    // A resident weight (checked at load whatever is routed).
    let resident = "model.layers.1.self_attn.q_proj.weight";
    damaged_tensor_is_detected_and_repaired(
        &sb,
        &model,
        &info,
        &clean_bytes,
        &clean_tokens,
        resident,
    );

    // With --no-cache-rebuild, the same damage fails the run, naming the file, and the file is
    // left as it is.
    for tensor in [expert_tensor.as_str(), resident] {
        flip_middle_byte(&file, &info, tensor);
        let damaged = std::fs::read(&file).unwrap();
        let out = sb.generate(Some(&model), 24, &["--no-cache-rebuild"]);
        assert_clean_failure(
            &out,
            &[
                &*file.to_string_lossy(),
                tensor,
                "checksum",
                "cache_rebuild",
            ],
        );
        assert!(std::fs::read(&file).unwrap() == damaged);
        flip_middle_byte(&file, &info, tensor); // undo
        assert!(std::fs::read(&file).unwrap() == clean_bytes);
    }
}

#[test]
fn truncated_cache_is_rebuilt_or_refused() {
    let sb = Sandbox::new();
    let model = sb.synth("demo", "demo", &[]);
    // A weight file changed in the last 2 s has its stat recorded as unknown: let them settle,
    // so that both builds record the same stats and the rebuild is byte for byte the first.
    std::thread::sleep(Duration::from_millis(2_200));
    let clean = json_line(&sb.generate(Some(&model), 16, &[]));
    let file = cache_of(&clean);
    let clean_bytes = std::fs::read(&file).unwrap();
    let half = clean_bytes.len() as u64 / 2;
    let truncate = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(half)
            .unwrap()
    };

    truncate();
    let out = sb.generate(Some(&model), 16, &[]);
    let v = json_line(&out);
    let err = stderr(&out);
    let path = file.to_string_lossy();
    // Cut in the middle of the tensors, the header is found pointing past the end.
    let says_short = |s: &str| s.contains("passes the end of the file") || s.contains("truncated");
    assert!(
        says_short(&err) && err.contains("rebuilding") && err.contains(&*path),
        "no warning that the truncated file is rebuilt: {err}"
    );
    assert!(
        err.lines().any(|l| l.starts_with("built ")),
        "no build line: {err}"
    );
    assert_eq!(tokens(&v), tokens(&clean));
    assert!(std::fs::read(&file).unwrap() == clean_bytes);

    truncate();
    let out = sb.generate(Some(&model), 16, &["--no-cache-rebuild"]);
    let line = assert_clean_failure(&out, &[&*path, "cache_rebuild = false"]);
    assert!(says_short(&line), "{line}");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), half, "touched");
}

#[test]
fn build_killed_midway_leaves_only_a_temp_file() {
    let sb = Sandbox::new();
    // ~300 MB of bf16 weights: the q8_0 build takes about a second, long enough to be caught
    // half-written.
    let model = sb.synth("mini", "mini", &[]);
    let (temp, len, attempt) =
        sb.kill_build_midway(|| sb.command_for(&["cache", "build"], Some(&model), "q8_0", &[]));
    eprintln!("killed the build at attempt {attempt} with {len} bytes in {temp}");
    assert!(sb.cache_files().is_empty(), "{:?}", sb.listing());
    assert_eq!(sb.temp_files(), vec![temp.clone()], "{len} bytes seen");

    let out = sb.serve(&["cache", "build"], Some(&model), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("built "), "{}", stdout(&out));
    sb.assert_one_intact_cache(&model);
}

#[test]
fn file_size_limit_is_a_clean_error_that_leaves_nothing() {
    let sb = Sandbox::new();
    let model = sb.synth("demo", "demo", &[]);
    let model_before = snapshot(&model);
    // Where the file would go: `cache verify` names it, and says how to build it.
    let absent = sb.serve(&["cache", "verify"], Some(&model), &[]);
    assert_clean_failure(&absent, &["moe-serve cache build"]);
    let report = stdout(&absent);
    let path = report
        .split_once(": absent")
        .unwrap_or_else(|| panic!("{report}"))
        .0
        .to_string();
    assert!(path.ends_with(".gguf"), "{report}");

    const LIMIT_BYTES: libc::rlim_t = 64 << 10;
    let mut cmd = sb.command_for(&["cache", "build"], Some(&model), "q8_0", &[]);
    // SAFETY: the closure runs in the child between fork and exec and only calls setrlimit,
    // which is async-signal-safe, on a value on its own stack.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: LIMIT_BYTES,
                rlim_max: LIMIT_BYTES,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    // Exit code 1, not death by SIGXFSZ; the error is EFBIG's, so the limit really fired.
    assert_eq!(out.status.signal(), None, "killed: {:?}", out.status);
    assert_clean_failure(&out, &[&path, "File too large"]);
    assert!(sb.cache_files().is_empty(), "{:?}", sb.listing());
    assert!(sb.temp_files().is_empty(), "{:?}", sb.listing());
    assert!(snapshot(&model) == model_before, "the model folder changed");

    // Without the limit, the same command succeeds and writes that file.
    let out = sb.serve(&["cache", "build"], Some(&model), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(sb.cache_files(), vec![PathBuf::from(&path)]);
}

#[test]
fn cache_dir_that_cannot_be_created_is_a_clean_error() {
    let sb = Sandbox::new();
    let model = sb.synth("demo", "demo", &[]);
    let blocker = sb.path().join("a-file");
    std::fs::write(&blocker, b"not a folder").unwrap();
    let cache_dir = blocker.join("cache");
    let dir = cache_dir.to_str().unwrap();
    let run = ["run", "--prompt-ids", "1,2", "--max-tokens", "2"];
    for args in [&run[..], &["cache", "build"][..]] {
        let out = sb
            .command()
            .args(args)
            .arg("--model")
            .arg(&model)
            .args(["--quantization", "q8_0", "--cache-dir", dir])
            .output()
            .unwrap();
        assert_clean_failure(&out, &[dir, "Not a directory"]);
    }
    assert_eq!(std::fs::read(&blocker).unwrap(), b"not a folder");
}

/// Reads a child's stderr line by line on a thread; reports on `waiting` the first line
/// saying it waits for another builder; returns all of it.
fn watch_stderr(
    mut child_err: std::process::ChildStderr,
    waiting: std::sync::mpsc::Sender<()>,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut all = String::new();
        let mut told = false;
        for line in BufReader::new(&mut child_err).lines() {
            let line = line.unwrap();
            if !told && line.contains("waiting for another process building") {
                told = true;
                let _ = waiting.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    })
}

#[test]
fn two_processes_building_the_same_cache_share_one_file() {
    let sb = Sandbox::new();
    let model = sb.synth("demo", "demo", &[]);
    let absent = sb.serve(&["cache", "verify"], Some(&model), &[]);
    let report = stdout(&absent);
    let path = report.split_once(": absent").expect("absent").0.to_string();

    // Hold the build lock, so both processes are certainly building at the same time: both
    // must get to waiting for it before it is released.
    std::fs::create_dir_all(sb.cache_dir()).unwrap();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(format!("{path}.lock"))
        .unwrap();
    moe_runtime::fsutil::lock_exclusive(&lock).unwrap();

    let (tx, rx) = std::sync::mpsc::channel();
    let mut children = Vec::new();
    for _ in 0..2 {
        let n = "16".to_string();
        let mut child = sb
            .command_for(&["run"], Some(&model), "q8_0", &generate_args(&n))
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = watch_stderr(child.stderr.take().unwrap(), tx.clone());
        let mut out = child.stdout.take().unwrap();
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            out.read_to_string(&mut s).unwrap();
            s
        });
        children.push((child, out, err));
    }
    for _ in 0..2 {
        rx.recv_timeout(Duration::from_secs(60))
            .expect("both processes wait for the build lock");
    }
    drop(lock);

    let mut results: Vec<(ExitStatus, Value, String)> = Vec::new();
    for (mut child, out, err) in children {
        let status = child.wait().unwrap();
        let (out, err) = (out.join().unwrap(), err.join().unwrap());
        assert!(status.success(), "{err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1, "{out}");
        results.push((status, serde_json::from_str(lines[0]).unwrap(), err));
    }
    assert_eq!(tokens(&results[0].1), tokens(&results[1].1));
    assert_eq!(cache_of(&results[0].1), PathBuf::from(&path));
    assert_eq!(cache_of(&results[1].1), PathBuf::from(&path));
    let builders = results
        .iter()
        .filter(|r| r.2.lines().any(|l| l.starts_with("built ")))
        .count();
    assert_eq!(builders, 1, "exactly one of them builds");
    assert_eq!(sb.cache_files(), vec![PathBuf::from(&path)]);
    sb.assert_one_intact_cache(&model);
}

#[test]
fn info_lists_types_and_kept_tensors_and_clear_removes_the_file() {
    // The embedded demo model (no --model).
    let sb = Sandbox::new();
    let built = sb.serve(&["cache", "build"], None, &[]);
    assert!(built.status.success(), "{}", stderr(&built));
    let line = stdout(&built);
    assert!(
        line.starts_with("built ") && line.contains("GB/s"),
        "{line}"
    );
    let again = sb.serve(&["cache", "build"], None, &[]);
    assert!(
        stdout(&again).contains("already built"),
        "{}",
        stdout(&again)
    );
    let files = sb.cache_files();
    assert_eq!(files.len(), 1);
    let file = &files[0];

    let info = sb.info(None);
    assert_eq!(info["path"].as_str().unwrap(), file.to_str().unwrap());
    assert_eq!(
        info["file_bytes"].as_u64().unwrap(),
        std::fs::metadata(file).unwrap().len()
    );
    assert_eq!(info["version"], 2);
    assert_eq!(info["expert_types"], serde_json::json!(["q8_0"]));
    assert_eq!(info["resident_type"], "q8_0");
    let rows = info["tensors"].as_array().unwrap();
    let by_name: BTreeMap<&str, &Value> = rows
        .iter()
        .map(|r| (r["name"].as_str().unwrap(), r))
        .collect();
    let kept = |r: &Value| r["kept"].as_bool().unwrap();
    let embed = by_name["model.embed_tokens.weight"];
    assert!(kept(embed) && embed["dtype"] == "BF16", "{embed}");
    let routers: Vec<&&Value> = by_name
        .iter()
        .filter(|(n, _)| n.ends_with(".mlp.gate.weight"))
        .map(|(_, r)| r)
        .collect();
    assert_eq!(routers.len(), 4, "one router per layer");
    assert!(routers.iter().all(|r| kept(r) && r["dtype"] == "BF16"));
    let q = by_name["model.layers.0.self_attn.q_proj.weight"];
    assert!(
        !kept(q) && q["dtype"] == "Q8_0" && q["source_dtype"] == "BF16",
        "{q}"
    );
    let experts: Vec<&Value> = rows
        .iter()
        .filter(|r| r["name"].as_str().unwrap().starts_with("moe.layers."))
        .collect();
    assert_eq!(
        experts.len(),
        4 * 8 * 3,
        "gate, up and down of 8 experts in 4 layers"
    );
    assert!(experts.iter().all(|r| r["dtype"] == "Q8_0" && !kept(r)));

    // The same, for people: one line per tensor with its type, and kept ones marked.
    let human = sb.serve(&["cache", "info"], None, &[]);
    assert!(human.status.success(), "{}", stderr(&human));
    let text = stdout(&human);
    assert!(
        text.contains(&format!("path: {}", file.display())),
        "{text}"
    );
    let line_of = |name: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no line for {name}: {text}"))
            .to_string()
    };
    assert!(line_of("model.embed_tokens.weight").contains("(kept BF16)"));
    let ql = line_of("model.layers.0.self_attn.q_proj.weight");
    assert!(ql.contains("Q8_0") && !ql.contains("kept"), "{ql}");
    assert_eq!(
        text.lines().filter(|l| l.starts_with("  ")).count(),
        rows.len()
    );
    let by_file = sb
        .command()
        .args(["cache", "info", "--file"])
        .arg(file)
        .output()
        .unwrap();
    assert_eq!(stdout(&by_file), text, "--file describes the same file");

    let cleared = sb.serve(&["cache", "clear"], None, &[]);
    assert!(cleared.status.success(), "{}", stderr(&cleared));
    assert!(
        stdout(&cleared).contains(&format!("removed {}", file.display())),
        "{}",
        stdout(&cleared)
    );
    assert!(!file.exists());
    let nothing = sb.serve(&["cache", "clear"], None, &[]);
    assert!(stdout(&nothing).contains("nothing to remove"));
    let gone = sb.serve(&["cache", "info"], None, &[]);
    assert_clean_failure(&gone, &[file.to_str().unwrap(), "not built yet"]);

    // --all removes every cache file in the folder, whatever its quantization.
    for q in ["q8_0", "bf16"] {
        let o = sb
            .command()
            .args(["cache", "build", "--quantization", q, "--cache-dir"])
            .arg(sb.cache_dir())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    }
    assert_eq!(sb.cache_files().len(), 2, "{:?}", sb.listing());
    let all = sb.serve(&["cache", "clear"], None, &["--all"]);
    assert!(all.status.success(), "{}", stderr(&all));
    assert_eq!(
        stdout(&all)
            .lines()
            .filter(|l| l.starts_with("removed "))
            .count(),
        2,
        "{}",
        stdout(&all)
    );
    assert!(sb.cache_files().is_empty(), "{:?}", sb.listing());
}

#[test]
fn cache_file_reads_with_the_gguf_python_package() {
    let python = std::env::var("MOE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_gguf = Command::new(&python)
        .args(["-c", "import gguf"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_gguf {
        let msg = format!(
            "`{python} -c 'import gguf'` failed: set MOE_TEST_PYTHON to a Python with `pip install gguf` (.ci/run does)"
        );
        assert!(std::env::var_os("CI").is_none(), "{msg}");
        eprintln!(
            "\n!!!!!!!! SKIPPED cache_file_reads_with_the_gguf_python_package: {msg} !!!!!!!!\n"
        );
        return;
    }
    let sb = Sandbox::new();
    let model = sb.synth("demo", "demo", &[]);
    let built = sb.serve(&["cache", "build"], Some(&model), &[]);
    assert!(built.status.success(), "{}", stderr(&built));
    let info = sb.serve(&["cache", "info"], Some(&model), &["--json"]);
    let v = json_line(&info);
    let info_file = sb.path().join("info.json");
    std::fs::write(&info_file, &info.stdout).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/check_gguf_cache.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(v["path"].as_str().unwrap())
        .arg(&info_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let summary = stdout(&out);
    let n = v["tensors"].as_array().unwrap().len();
    assert!(
        summary.contains(&format!("{n} tensors"))
            && summary.contains("Q8_0")
            && summary.contains(": ok"),
        "{summary}"
    );
    eprintln!("{summary}");

    // The check has teeth: a listing that disagrees with the file fails it.
    let wrong = serde_json::to_string(&{
        let mut w = v.clone();
        w["tensors"][0]["dtype"] = "F32".into();
        w
    })
    .unwrap();
    std::fs::write(&info_file, wrong).unwrap();
    let out = Command::new(&python)
        .arg(&script)
        .arg(v["path"].as_str().unwrap())
        .arg(&info_file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
}
