//! Bounded fuzzing of every file parser, run by `cargo test` with a fixed case count each and a
//! fixed random seed (so a run is repeatable): safetensors headers and the shard index,
//! `config.json` through the architecture registry, `generation_config.json`, GGUF headers
//! (and the quantized cache file opened on top of one), and the TOML run configuration.
//!
//! Every target starts from valid inputs (the test fixtures, the demo model, `synth` output, a
//! cache file the cache writer built, the shipped run configurations) and mutates them: bit
//! flips, byte overwrites, truncation, insertion, deletion, copied chunks, 64-bit fields set to
//! extremes, numbers in text set to extremes (0, -1, 1e9, 1e300, NaN, huge integers) and JSON
//! values replaced or removed. What must always hold, per case:
//! - the parser returns `Ok` or `Err`, never panics;
//! - it finishes well within [`CASE_LIMIT`], and a target that stops making progress fails
//!   after [`TARGET_DEADLINE`] naming the input instead of hanging the test run;
//! - no single allocation is larger than [`ALLOC_SLACK_BYTES`] plus [`ALLOC_PER_INPUT_BYTE`]
//!   times the input's size (a lying count or length is refused before it is allocated);
//! - an accepted safetensors file satisfies the format's invariants (every tensor inside the
//!   file, in order, no gap or overlap, sizes matching shapes), and the verdict agrees with the
//!   official `safetensors` library's.
//!
//! `MOE_FUZZ_CASES_X=<n>` multiplies every case count for a longer run by hand.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moe_runtime::config::{GenerationConfig, RawConfig};
use moe_runtime::gguf::{GgmlType, GgufFile, GgufWriter, TensorSpec, Value, ValueType};
use moe_runtime::weights::{safetensors_bytes, Dtype, ModelFiles, SafetensorsFile, WeightSet};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

/// Longest one parse may take (debug build, loaded 2-core CI machine): the real ones take
/// microseconds to milliseconds, so this only catches work that grows out of proportion.
const CASE_LIMIT: Duration = Duration::from_secs(2);
/// Longest a whole target may run before it is declared hung (its case count times the
/// ordinary cost is a few seconds).
const TARGET_DEADLINE: Duration = Duration::from_secs(120);
/// Allocation allowed whatever the input (buffered readers, error strings, small tables).
const ALLOC_SLACK_BYTES: usize = 4 << 20;
/// Largest allocation allowed while planning from a config alone: the plan builds per-layer
/// descriptors and small tables (RoPE frequencies, norms of size-only weights) whose size the
/// config's bounded fields set, a few MB for real models; no weight-sized buffer, ever.
const PLAN_ALLOC_BYTES: usize = 256 << 20;
/// Allocation allowed per input byte: parsed values (JSON values, GGUF arrays of 32-byte
/// values for 1-byte items) take a small multiple of their encoding.
const ALLOC_PER_INPUT_BYTE: usize = 64;

// ---------------------------------------------------------------------------------------------
// The allocation guard: the largest single allocation made by the current thread.

struct Counting;

thread_local! {
    static LARGEST_ALLOC: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    // `try_with`: never touch the slot while the thread is being torn down.
    let _ = LARGEST_ALLOC.try_with(|c| {
        if size > c.get() {
            c.set(size)
        }
    });
}

// SAFETY: every call forwards to the system allocator with the caller's arguments unchanged;
// the bookkeeping only reads sizes and writes a thread-local cell without allocating.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: forwarded with the caller's layout (GlobalAlloc's contract is the caller's).
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_alloc(new_size);
        // SAFETY: `ptr` and `layout` come from this allocator, which is the system one.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by the system allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs one parse of an input of `input_bytes` bytes, checking its time and largest allocation.
fn bounded<T>(input_bytes: usize, parse: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    bounded_by(
        ALLOC_SLACK_BYTES + ALLOC_PER_INPUT_BYTE * input_bytes,
        input_bytes,
        parse,
    )
}

/// [`bounded`] with the largest allocation allowed given.
fn bounded_by<T>(
    allowed: usize,
    input_bytes: usize,
    parse: impl FnOnce() -> T,
) -> Result<T, TestCaseError> {
    LARGEST_ALLOC.with(|c| c.set(0));
    let t0 = Instant::now();
    let out = parse();
    let took = t0.elapsed();
    let largest = LARGEST_ALLOC.with(Cell::get);
    if took > CASE_LIMIT {
        return Err(TestCaseError::fail(format!(
            "parse took {took:?} on a {input_bytes}-byte input"
        )));
    }
    if largest > allowed {
        return Err(TestCaseError::fail(format!(
            "parse allocated {largest} bytes at once on a {input_bytes}-byte input (allowed {allowed})"
        )));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Mutations.

/// Values 64-bit fields are set to: zero, one, the extremes of every width, sizes just past 4
/// and 2^53, and a count far past any file.
const EXTREME_U64: [u64; 10] = [
    0,
    1,
    u64::MAX,
    u64::MAX - 7,
    i64::MAX as u64,
    u32::MAX as u64,
    1 << 32,
    1 << 53,
    1 << 40,
    100_000_000,
];

/// Number tokens that replace numbers in JSON and TOML text.
const EXTREME_NUMBERS: [&str; 16] = [
    "0",
    "-1",
    "1e9",
    "1e300",
    "-1e300",
    "NaN",
    "nan",
    "inf",
    "Infinity",
    "-0.0",
    "1e-320",
    "100000",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775809",
];

/// JSON values that replace a node of a JSON document.
fn extreme_json(i: usize) -> serde_json::Value {
    use serde_json::json;
    let all = [
        json!(null),
        json!(0),
        json!(-1),
        json!(1_000_000_000u64),
        json!(1e300),
        json!(-1e300),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(0.5),
        json!(1e-300),
        json!(true),
        json!(""),
        json!("x"),
        json!([]),
        json!({}),
        json!([1_000_000_000u64]),
        json!([0, 0]),
        json!({"type": "linear", "factor": 0}),
        json!("../../etc/passwd"),
        json!("a".repeat(5000)),
    ];
    all[i % all.len()].clone()
}

/// Bytes inserted into inputs: JSON/TOML structure, quotes, NUL, invalid UTF-8.
const INSERTS: [&[u8]; 12] = [
    b"{",
    b"}",
    b"[",
    b"\"",
    b",",
    b"\0",
    b"\xff\xfe",
    b"NaN",
    b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    b"\n[x]\n",
    b" = ",
    b"\\u0000",
];

#[derive(Clone, Debug)]
enum Mutation {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    Truncate(Index),
    Insert(Index, u8),
    Delete(Index, u8),
    /// Copies `len` bytes from the first position to the second (inserted).
    CopyChunk(Index, Index, u8),
    /// Overwrites 8 bytes with a little-endian extreme.
    PutU64(Index, u8),
    /// Replaces one number token of the text with an extreme one.
    Number(Index, u8),
    /// Replaces a JSON node with an extreme value (JSON inputs only).
    JsonValue(Index, u8),
    /// Removes a JSON node (JSON inputs only).
    JsonDelete(Index),
}

fn byte_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => (any::<Index>(), any::<Index>(), any::<u8>())
            .prop_map(|(a, b, n)| Mutation::CopyChunk(a, b, n)),
        3 => (any::<Index>(), any::<u8>()).prop_map(|(i, v)| Mutation::PutU64(i, v)),
    ]
}

fn text_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => byte_mutation(),
        4 => (any::<Index>(), any::<u8>()).prop_map(|(i, v)| Mutation::Number(i, v)),
    ]
}

fn json_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => text_mutation(),
        4 => (any::<Index>(), any::<u8>()).prop_map(|(i, v)| Mutation::JsonValue(i, v)),
        1 => any::<Index>().prop_map(Mutation::JsonDelete),
    ]
}

/// Byte ranges of the number tokens of JSON or TOML text (outside strings).
fn number_spans(b: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let (mut i, mut in_str) = (0, false);
    while i < b.len() {
        let c = b[i];
        if in_str {
            if c == b'\\' {
                i += 1;
            } else if c == b'"' {
                in_str = false;
            }
            i += 1;
            continue;
        }
        if c == b'"' {
            in_str = true;
            i += 1;
            continue;
        }
        let prev_ok = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
        if prev_ok && (c.is_ascii_digit() || c == b'-') {
            let s = i;
            while i < b.len()
                && matches!(b[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E' | b'_')
            {
                i += 1;
            }
            if b[s..i].iter().any(u8::is_ascii_digit) {
                out.push((s, i));
            }
            continue;
        }
        i += 1;
    }
    out
}

/// JSON pointers of every node below the root.
fn json_pointers(v: &serde_json::Value, at: &str, out: &mut Vec<String>) {
    let esc = |k: &str| k.replace('~', "~0").replace('/', "~1");
    match v {
        serde_json::Value::Object(m) => {
            for (k, c) in m {
                let p = format!("{at}/{}", esc(k));
                out.push(p.clone());
                json_pointers(c, &p, out);
            }
        }
        serde_json::Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                let p = format!("{at}/{i}");
                out.push(p.clone());
                json_pointers(c, &p, out);
            }
        }
        _ => {}
    }
}

fn json_edit(b: &mut Vec<u8>, node: &Index, edit: impl FnOnce(&mut serde_json::Value, &str)) {
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(b) else {
        return;
    };
    let mut ptrs = Vec::new();
    json_pointers(&v, "", &mut ptrs);
    if ptrs.is_empty() {
        return;
    }
    let p = ptrs[node.index(ptrs.len())].clone();
    edit(&mut v, &p);
    *b = serde_json::to_vec(&v).expect("a Value serialises");
}

/// `seed` with `muts` applied in order; positions of byte edits fall in the first `focus`
/// bytes (the part of a file its parser reads: a safetensors header, say).
fn mutate(seed: &[u8], muts: &[Mutation], focus: usize) -> Vec<u8> {
    let mut b = seed.to_vec();
    for m in muts {
        let span = focus.min(b.len()).max(1);
        let at = |i: &Index| i.index(span).min(b.len());
        match m {
            Mutation::FlipBit(i, bit) if !b.is_empty() => {
                let p = at(i).min(b.len() - 1);
                b[p] ^= 1 << bit;
            }
            Mutation::SetByte(i, v) if !b.is_empty() => {
                let p = at(i).min(b.len() - 1);
                b[p] = *v;
            }
            Mutation::Truncate(i) => {
                let n = i.index(b.len() + 1);
                b.truncate(n);
            }
            Mutation::Insert(i, v) => {
                let p = at(i);
                let ins = INSERTS[*v as usize % INSERTS.len()];
                let ins: Vec<u8> = if *v as usize >= INSERTS.len() * 16 {
                    vec![*v; 1 + *v as usize % 7]
                } else {
                    ins.to_vec()
                };
                b.splice(p..p, ins);
            }
            Mutation::Delete(i, n) => {
                let p = at(i);
                let e = (p + 1 + *n as usize % 64).min(b.len());
                b.drain(p..e);
            }
            Mutation::CopyChunk(from, to, n) if !b.is_empty() => {
                let s = at(from).min(b.len() - 1);
                let e = (s + 1 + *n as usize).min(b.len());
                let chunk = b[s..e].to_vec();
                let t = at(to);
                b.splice(t..t, chunk);
            }
            Mutation::PutU64(i, v) if b.len() >= 8 => {
                let p = at(i).min(b.len() - 8);
                let x = EXTREME_U64[*v as usize % EXTREME_U64.len()];
                b[p..p + 8].copy_from_slice(&x.to_le_bytes());
            }
            Mutation::Number(i, v) => {
                let spans = number_spans(&b[..focus.min(b.len())]);
                if !spans.is_empty() {
                    let (s, e) = spans[i.index(spans.len())];
                    let tok = EXTREME_NUMBERS[*v as usize % EXTREME_NUMBERS.len()];
                    b.splice(s..e, tok.bytes());
                }
            }
            Mutation::JsonValue(i, v) => json_edit(&mut b, i, |doc, p| {
                if let Some(node) = doc.pointer_mut(p) {
                    *node = extreme_json(*v as usize);
                }
            }),
            Mutation::JsonDelete(i) => json_edit(&mut b, i, |doc, p| {
                let (parent, last) = p.rsplit_once('/').expect("pointers start with /");
                match doc.pointer_mut(parent) {
                    Some(serde_json::Value::Object(m)) => {
                        let key = last.replace("~1", "/").replace("~0", "~");
                        m.remove(&key);
                    }
                    Some(serde_json::Value::Array(a)) => {
                        if let Ok(k) = last.parse::<usize>() {
                            if k < a.len() {
                                a.remove(k);
                            }
                        }
                    }
                    _ => {}
                }
            }),
            _ => {}
        }
    }
    b
}

// ---------------------------------------------------------------------------------------------
// Running a target.

fn cases(n: u32) -> u32 {
    let x = std::env::var("MOE_FUZZ_CASES_X")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    n * x
}

/// Runs `cases` cases of `strategy` through `check` on a worker thread with a fixed seed; fails
/// naming the input being parsed if the target does not finish within [`TARGET_DEADLINE`].
fn run_target<S>(
    name: &'static str,
    n: u32,
    strategy: S,
    check: impl Fn(&S::Value, &Mutex<Vec<u8>>) -> Result<(), TestCaseError> + Send + 'static,
) where
    S: Strategy + Send + 'static,
    S::Value: std::fmt::Debug,
{
    let current = Arc::new(Mutex::new(Vec::new()));
    let cur = current.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("fuzz-{name}"))
        .spawn(move || {
            let config = Config {
                cases: cases(n),
                failure_persistence: None,
                max_shrink_iters: 256,
                ..Config::default()
            };
            let rng = TestRng::deterministic_rng(RngAlgorithm::ChaCha);
            let mut runner = TestRunner::new_with_rng(config, rng);
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                runner.run(&strategy, |v| check(&v, &cur))
            }));
            let msg = match res {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("{e}")),
                Err(_) => Some("panicked outside a case".to_string()),
            };
            let _ = tx.send(msg);
        })
        .expect("spawn");
    match rx.recv_timeout(TARGET_DEADLINE) {
        Ok(None) => {}
        Ok(Some(msg)) => panic!("fuzz target {name}: {msg}"),
        Err(_) => {
            let input = current.lock().map(|b| b.clone()).unwrap_or_default();
            let saved =
                Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz-{name}-hang.bin"));
            let _ = std::fs::write(&saved, &input);
            panic!(
                "fuzz target {name}: no progress within {TARGET_DEADLINE:?}; the input being parsed ({} bytes) is in {}",
                input.len(),
                saved.display()
            );
        }
    }
}

fn record(current: &Mutex<Vec<u8>>, bytes: &[u8]) {
    if let Ok(mut c) = current.lock() {
        c.clear();
        c.extend_from_slice(bytes);
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn files_named(dir: &Path, pred: &dyn Fn(&str) -> bool, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files_named(&p, pred, out);
        } else if p.file_name().and_then(|n| n.to_str()).is_some_and(pred) {
            out.push(p);
        }
    }
}

/// Model folders' files called `name` (fixtures and the demo), read, smallest first.
fn seeds_named(name: &str) -> Vec<Vec<u8>> {
    let mut paths = Vec::new();
    files_named(&repo().join("tests/fixtures"), &|n| n == name, &mut paths);
    files_named(&repo().join("runtime/demo"), &|n| n == name, &mut paths);
    let mut out: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
    out.sort_by_key(Vec::len);
    out.dedup();
    assert!(!out.is_empty(), "no seed files named {name}");
    out
}

fn seed_and_mutations<M: Strategy<Value = Mutation>>(
    seeds: usize,
    mutation: M,
) -> impl Strategy<Value = (Index, Vec<Mutation>)> {
    assert!(seeds > 0);
    (any::<Index>(), prop::collection::vec(mutation, 1..5))
}

/// Runs `n` cases of target `name` over `seeds`, each with edits of `mutation` anywhere in it:
/// `check` gets each input, recorded first as the one being parsed.
fn run_seeded<M>(
    name: &'static str,
    n: u32,
    seeds: Vec<Vec<u8>>,
    mutation: M,
    check: impl Fn(&[u8]) -> Result<(), TestCaseError> + Send + 'static,
) where
    M: Strategy<Value = Mutation> + Send + 'static,
{
    let strategy = seed_and_mutations(seeds.len(), mutation);
    run_target(name, n, strategy, move |(seed, muts), current| {
        let seed = &seeds[seed.index(seeds.len())];
        let bytes = mutate(seed, muts, usize::MAX);
        record(current, &bytes);
        check(&bytes)
    });
}

/// The message of a refused input, which must be one line.
fn one_line(e: &impl std::fmt::Display) -> Result<String, TestCaseError> {
    let msg = e.to_string();
    prop_assert!(!msg.contains('\n'), "one line: {}", msg);
    Ok(msg)
}

// ---------------------------------------------------------------------------------------------
// safetensors

/// Checks an accepted file's tensors: inside the file, tiling the data region in offset order,
/// byte lengths matching shapes.
fn check_safetensors_invariants(bytes: &[u8], f: &SafetensorsFile) -> Result<(), TestCaseError> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let data_start = 8 + n;
    let mut ranges: Vec<(usize, usize, &str)> = f
        .tensors
        .iter()
        .map(|(k, t)| (t.start, t.end, k.as_str()))
        .collect();
    ranges.sort();
    let mut at = data_start;
    for (name, t) in &f.tensors {
        prop_assert_eq!(
            t.size_bytes(),
            t.numel() * t.dtype.size_bytes(),
            "tensor {} size",
            name
        );
    }
    for (s, e, name) in ranges {
        prop_assert!(
            s == at && e >= s && e <= bytes.len(),
            "tensor {} at [{}, {})",
            name,
            s,
            e
        );
        at = e;
    }
    prop_assert_eq!(at, bytes.len(), "data region fully covered");
    Ok(())
}

#[test]
fn fuzz_safetensors_header() {
    let mut seeds = Vec::new();
    let mut paths = Vec::new();
    files_named(
        &repo().join("tests/fixtures"),
        &|n| n.ends_with(".safetensors"),
        &mut paths,
    );
    files_named(
        &repo().join("runtime/demo"),
        &|n| n.ends_with(".safetensors"),
        &mut paths,
    );
    for p in &paths {
        let b = std::fs::read(p).unwrap();
        // Files up to 512 KiB keep the cases cheap; larger ones add nothing a header mutation
        // of a smaller one does not.
        if b.len() <= 512 << 10 {
            seeds.push(b);
        }
    }
    let vals: Vec<u8> = (0..64u8).collect();
    seeds.push(safetensors_bytes(&[
        ("a", Dtype::F32, &[2, 2], &vals[..16]),
        ("b", Dtype::Bf16, &[3], &vals[16..22]),
        ("e", Dtype::I64, &[0], &[]),
        ("c", Dtype::U8, &[10], &vals[22..32]),
        ("f8", Dtype::F8E4M3, &[4], &vals[32..36]),
    ]));
    seeds.push(safetensors_bytes(&[]));
    assert!(seeds.len() >= 10, "{} seeds", seeds.len());
    let seeds = Arc::new(seeds);
    let dir = tempfile::tempdir().unwrap();
    let files = ModelFiles::Dir(dir.path().to_path_buf());
    let s2 = seeds.clone();
    let counts = Arc::new(Mutex::new((0u32, 0u32)));
    let counts2 = counts.clone();
    run_target(
        "safetensors",
        800,
        (
            seed_and_mutations(seeds.len(), text_mutation()),
            any::<bool>(),
        ),
        move |((seed, muts), whole), current| {
            let seed = &s2[seed.index(s2.len())];
            let n = u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
            // Edits land in the length, the header and the first bytes of data, or (half the
            // cases) anywhere, so that many files stay valid and the invariants of accepted
            // ones are checked too.
            let focus = if *whole { usize::MAX } else { 8 + n + 16 };
            let bytes = mutate(seed, muts, focus);
            record(current, &bytes);
            std::fs::write(dir.path().join("model.safetensors"), &bytes).unwrap();
            let ours = bounded(bytes.len(), || {
                SafetensorsFile::open(&files, "model.safetensors")
            })?;
            let reference = safetensors::SafeTensors::read_metadata(&bytes);
            let mut c = counts2.lock().unwrap();
            match &ours {
                Ok(f) => {
                    c.0 += 1;
                    check_safetensors_invariants(&bytes, f)?;
                    prop_assert!(
                        reference.is_ok(),
                        "accepted a file the official library refuses: {:?}",
                        reference.err()
                    );
                }
                Err(e) => {
                    c.1 += 1;
                    let msg = one_line(e)?;
                    prop_assert!(msg.contains("model.safetensors"), "names the file: {}", msg);
                    // The official library keeps the last of two entries of one name; we
                    // refuse the file instead.
                    prop_assert!(
                        reference.is_err() || msg.contains("appears twice"),
                        "refused a file the official library opens: {}",
                        msg
                    );
                }
            }
            Ok(())
        },
    );
    let (accepted, refused) = *counts.lock().unwrap();
    // Both verdicts occur: the mutations are neither all harmless nor all fatal.
    assert!(
        accepted > 10 && refused > 10,
        "{accepted} accepted, {refused} refused"
    );
}

#[test]
fn fuzz_shard_index() {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(repo().join("runtime/demo"))
        .unwrap()
        .flatten()
    {
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    let index_path = dir.path().join("model.safetensors.index.json");
    let seed = std::fs::read(&index_path).unwrap();
    let files = ModelFiles::Dir(dir.path().to_path_buf());
    run_target(
        "index",
        200,
        prop::collection::vec(json_mutation(), 1..4),
        move |muts, current| {
            let bytes = mutate(&seed, muts, usize::MAX);
            record(current, &bytes);
            std::fs::write(&index_path, &bytes).unwrap();
            let res = bounded(bytes.len(), || WeightSet::open(&files))?;
            match res {
                Ok(ws) => {
                    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                    for name in v["weight_map"].as_object().unwrap().keys() {
                        prop_assert!(
                            ws.contains(name),
                            "index maps {} but the set lacks it",
                            name
                        );
                    }
                }
                Err(e) => {
                    one_line(&e)?;
                }
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// config.json and generation_config.json

#[test]
fn fuzz_config_json() {
    run_seeded(
        "config",
        800,
        seeds_named("config.json"),
        json_mutation(),
        |bytes| {
            let res = bounded(bytes.len(), || -> moe_runtime::Result<()> {
                let raw = RawConfig::parse(PathBuf::from("config.json"), bytes)?;
                let arch = moe_runtime::arch::lookup(&raw)?;
                let config = (arch.parse_config)(&raw)?;
                moe_runtime::prequant::PrequantConfig::parse(&raw)?;
                config.validate(&raw)?;
                Ok(())
            })?;
            if let Err(e) = res {
                one_line(&e)?;
            }
            Ok(())
        },
    );
}

/// `config.json` further: planning from the config alone builds the decoder over size-only
/// tensors and sizes every budget, so every size field must be bounded before it is used.
#[test]
fn fuzz_config_plan() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    let settings = moe_runtime::Settings {
        model: Some(cfg.to_string_lossy().into_owned()),
        state_dir: Some(dir.path().join("state")),
        ..Default::default()
    };
    run_seeded(
        "config_plan",
        300,
        seeds_named("config.json"),
        json_mutation(),
        move |bytes| {
            std::fs::write(&cfg, bytes).unwrap();
            let res = bounded_by(PLAN_ALLOC_BYTES, bytes.len(), || {
                moe_runtime::plan_model(&settings).map(|_| ())
            })?;
            if let Err(e) = res {
                one_line(&e)?;
            }
            Ok(())
        },
    );
}

#[test]
fn fuzz_generation_config_json() {
    run_seeded(
        "generation_config",
        400,
        seeds_named("generation_config.json"),
        json_mutation(),
        |bytes| {
            let res = bounded(bytes.len(), || -> moe_runtime::Result<GenerationConfig> {
                let raw = RawConfig::parse(PathBuf::from("generation_config.json"), bytes)?;
                GenerationConfig::parse(&raw)
            })?;
            if let Err(e) = res {
                one_line(&e)?;
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// GGUF headers and the quantized cache file

/// A small GGUF of every metadata kind and a few tensor types.
fn small_gguf(dir: &Path) -> Vec<u8> {
    let path = dir.join("small.gguf");
    let meta = vec![
        (
            "general.architecture".to_string(),
            Value::String("test".into()),
        ),
        ("k.u8".into(), Value::U8(7)),
        ("k.i32".into(), Value::I32(-3)),
        ("k.f32".into(), Value::F32(1.5)),
        ("k.bool".into(), Value::Bool(true)),
        ("k.u64".into(), Value::U64(1 << 40)),
        ("k.f64".into(), Value::F64(0.25)),
        ("k.strs".into(), Value::strings(["a", "", "ü"])),
        (
            "k.arr".into(),
            Value::Array(ValueType::I16, vec![Value::I16(1), Value::I16(-2)]),
        ),
    ];
    let specs = vec![
        TensorSpec::new("a", vec![3], GgmlType::F32),
        TensorSpec::new("b", vec![64, 2], GgmlType::Q8_0),
        TensorSpec::new("c", vec![256], GgmlType::Q4_K),
    ];
    let mut w = GgufWriter::create(&path, &meta, &specs, 32).unwrap();
    for t in &specs {
        let n = t.ty.tensor_bytes(&t.dims).unwrap();
        w.write(&vec![0x3c; n as usize]).unwrap();
    }
    w.finish().unwrap();
    std::fs::read(&path).unwrap()
}

/// A quantized cache file of the demo model, as the cache writer builds it.
fn demo_cache_file(dir: &Path) -> PathBuf {
    let settings = moe_runtime::Settings {
        model: None,
        quantization: moe_runtime::runconfig::Quantization::Q8_0,
        cache_dir: Some(dir.to_path_buf()),
        state_dir: Some(dir.join("state")),
        ..Default::default()
    };
    moe_runtime::open::cache_cmd::build(&settings, false)
        .expect("demo cache builds")
        .path
}

/// The header's length (up to the data section) of a GGUF file we wrote.
fn gguf_header_len(path: &Path) -> usize {
    GgufFile::open(path).unwrap().data_offset as usize
}

#[test]
fn fuzz_gguf_header() {
    let dir = tempfile::tempdir().unwrap();
    let cache = demo_cache_file(dir.path());
    let cache_bytes = std::fs::read(&cache).unwrap();
    let small = small_gguf(dir.path());
    let cache_focus = gguf_header_len(&cache);
    let seeds = Arc::new(vec![
        (small.clone(), small.len()),
        (cache_bytes.clone(), cache_focus + 64),
    ]);
    let s2 = seeds.clone();
    run_target(
        "gguf",
        800,
        seed_and_mutations(seeds.len(), byte_mutation()),
        move |(seed, muts), current| {
            let (seed, focus) = &s2[seed.index(s2.len())];
            let bytes = mutate(seed, muts, *focus);
            record(current, &bytes);
            let path = Path::new("m.gguf");
            let res = bounded(bytes.len(), || GgufFile::parse(path, &bytes))?;
            match res {
                Ok(f) => {
                    for t in &f.tensors {
                        prop_assert!(
                            t.offset >= f.data_offset && t.offset + t.size <= bytes.len() as u64,
                            "tensor {} outside the file",
                            t.name
                        );
                        prop_assert_eq!(t.ty.tensor_bytes(&t.dims), Ok(t.size));
                    }
                }
                Err(e) => {
                    let msg = one_line(&e)?;
                    prop_assert!(msg.contains("m.gguf"), "names the file: {}", msg);
                }
            }
            Ok(())
        },
    );
}

#[test]
fn fuzz_cache_file_header() {
    let dir = tempfile::tempdir().unwrap();
    let cache = demo_cache_file(dir.path());
    let seed = std::fs::read(&cache).unwrap();
    let focus = gguf_header_len(&cache) + 64;
    let probe = dir.path().join("probe.gguf");
    run_target(
        "cache",
        200,
        prop::collection::vec(byte_mutation(), 1..4),
        move |muts, current| {
            let bytes = mutate(&seed, muts, focus);
            record(current, &bytes);
            std::fs::write(&probe, &bytes).unwrap();
            let res = bounded(bytes.len(), || moe_runtime::cache::api::info(&probe))?;
            if let Err(e) = res {
                one_line(&e)?;
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// The TOML run configuration

#[test]
fn fuzz_run_config_toml() {
    let mut paths = Vec::new();
    files_named(
        &repo().join("configs"),
        &|n| n.ends_with(".toml"),
        &mut paths,
    );
    let mut seeds: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
    seeds.push(
        br#"model = "x"
ram_budget = "1GiB"
vram_budget = 0
max_context = 4096
max_batch = 4
threads = 2
quantization = "q8_0"
[experts]
[sim]
[server]
"#
        .to_vec(),
    );
    let base = repo().join("configs");
    run_seeded("runconfig", 500, seeds, text_mutation(), move |bytes| {
        let Ok(text) = std::str::from_utf8(bytes) else {
            // `from_file` refuses non-UTF-8 before parsing.
            return Ok(());
        };
        let res = bounded(bytes.len(), || {
            moe_runtime::RunConfig::from_toml_str(text, &base, Path::new("run.toml"))
        })?;
        if let Err(e) = res {
            let msg = e.to_string();
            prop_assert!(msg.contains("run.toml"), "names the file: {}", msg);
        }
        Ok(())
    });
}
