//! Shared helpers for the integration tests: fixture discovery and reference reading.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}

/// One entry of tests/fixtures/index.json.
#[derive(Debug, Clone)]
pub struct Variant {
    pub name: String,
    pub moe_layers: Vec<usize>,
    pub dir: PathBuf,
}

/// A cache folder shared by one test binary's loads (removed when the process ends), so loads
/// that build a cache (quantized or pre-quantized fixtures) never write to the user's.
pub fn test_cache_dir() -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap())
        .path()
        .to_path_buf()
}

pub fn variants() -> Vec<Variant> {
    let idx = fixtures().join("index.json");
    let text = std::fs::read_to_string(&idx)
        .unwrap_or_else(|e| panic!("{}: {e} (run tests/fixtures/generate.py)", idx.display()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let list = v
        .as_array()
        .cloned()
        .or_else(|| v.get("variants").and_then(|x| x.as_array()).cloned())
        .expect("index.json: a list of variants");
    list.iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_string();
            Variant {
                moe_layers: e["moe_layers"]
                    .as_array()
                    .map(|a| a.iter().map(|x| x.as_u64().unwrap() as usize).collect())
                    .unwrap_or_default(),
                dir: fixtures().join(&name),
                name,
            }
        })
        .collect()
}

/// A reference file: named tensors as f32 or i64 vectors with shapes.
pub struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    pub fn open(path: &Path) -> Reference {
        Reference {
            bytes: std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }

    fn st(&self) -> safetensors::SafeTensors<'_> {
        safetensors::SafeTensors::deserialize(&self.bytes).expect("reference parses")
    }

    pub fn has(&self, name: &str) -> bool {
        self.st().names().iter().any(|n| *n == name)
    }

    pub fn shape(&self, name: &str) -> Vec<usize> {
        self.st().tensor(name).unwrap().shape().to_vec()
    }

    pub fn f32(&self, name: &str) -> Vec<f32> {
        let st = self.st();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("reference lacks {name}"));
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
        t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    pub fn i64(&self, name: &str) -> Vec<i64> {
        let st = self.st();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("reference lacks {name}"));
        assert_eq!(t.dtype(), safetensors::Dtype::I64, "{name}");
        t.data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

/// Copies a folder (flat) into a fresh temp dir.
pub fn copy_model(src: &Path) -> tempfile::TempDir {
    let dst = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), dst.path().join(e.file_name())).unwrap();
        }
    }
    dst
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_moe-serve"))
}

/// `n` greedy tokens through the public `generate()` path, EOS ignored.
/// Settings loading `model` with quantization `q`, its cache and state in `cache_dir`.
pub fn cache_settings(
    model: &Path,
    q: moe_runtime::runconfig::Quantization,
    cache_dir: &Path,
) -> moe_runtime::Settings {
    moe_runtime::Settings {
        model: Some(model.to_string_lossy().into_owned()),
        quantization: q,
        cache_dir: Some(cache_dir.to_path_buf()),
        state_dir: Some(cache_dir.join("state")),
        // Round trips are checked on the exact path.
        activations: moe_runtime::runconfig::Activations::F32,
        ..Default::default()
    }
}

/// The logits of every position of one prefill of `ids` from a fresh state.
pub fn prefill_logits(model: &moe_runtime::Model, ids: &[u32]) -> Vec<f32> {
    let mut st = model.new_state();
    model
        .forward(ids, &mut st, moe_runtime::Logits::All, None)
        .unwrap()
}

pub fn greedy_generate(model: &moe_runtime::Model, ids: &[u32], n: usize) -> Vec<u32> {
    let params = moe_runtime::GenerateParams {
        max_tokens: Some(n),
        temperature: Some(0.0),
        ignore_eos: true,
        ..Default::default()
    };
    model
        .generate(
            &moe_runtime::Prompt::Ids(ids.to_vec()),
            &params,
            moe_runtime::CancelToken::new(),
        )
        .unwrap()
        .map(|e| e.unwrap().id)
        .collect()
}

/// Writes a synthetic model with `moe-serve synth` (a child process) into `dir/name`.
pub fn synth_model(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
    let model = dir.join(name);
    let out = std::process::Command::new(bin())
        .arg("synth")
        .args(args)
        .arg("--out")
        .arg(&model)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    model
}

/// Runs `moe-serve ARGS` and parses its stdout as one JSON value (the run must succeed).
pub fn moe_json(args: &[&str]) -> serde_json::Value {
    json_of(std::process::Command::new(bin()).args(args))
}

/// `moe-serve plan ARGS --json` (arguments under `configs/` or `tests/` are taken relative to
/// the repository root).
pub fn plan_json(args: &[&str]) -> serde_json::Value {
    let abs: Vec<String> = args
        .iter()
        .map(|a| {
            if a.starts_with("configs/") || a.starts_with("tests/") {
                root().join(a).to_string_lossy().into_owned()
            } else {
                a.to_string()
            }
        })
        .collect();
    let mut all: Vec<&str> = vec!["plan"];
    all.extend(abs.iter().map(String::as_str));
    all.push("--json");
    moe_json(&all)
}

/// Runs `moe-serve ARGS` with its cache and state folders under `dir`, and parses its stdout as
/// one JSON value (the run must succeed).
pub fn moe_json_in<S: AsRef<std::ffi::OsStr>>(dir: &Path, args: &[S]) -> serde_json::Value {
    json_of(
        std::process::Command::new(bin())
            .args(args)
            .env("XDG_CACHE_HOME", dir.join("cache"))
            .env("XDG_STATE_HOME", dir.join("state"))
            .env("HF_HUB_CACHE", "/nonexistent-hub-cache"),
    )
}

/// Runs `cmd`, which must succeed, and parses its stdout as one JSON value.
#[track_caller]
pub fn json_of(cmd: &mut std::process::Command) -> serde_json::Value {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Scheduler request parameters for `n` greedy tokens, EOS ignored.
pub fn greedy_request(n: usize) -> moe_runtime::batch::RequestParams {
    moe_runtime::batch::RequestParams {
        generate: moe_runtime::GenerateParams {
            max_tokens: Some(n),
            temperature: Some(0.0),
            ignore_eos: true,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// One test's folder: models, the cache folder and the per-user folders, so nothing touches
/// the real ones.
pub struct Sandbox {
    tmp: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        Sandbox {
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.path().join("cache")
    }

    /// `moe-serve` with the per-user folders inside the sandbox and default logging.
    pub fn command(&self) -> std::process::Command {
        let mut c = std::process::Command::new(bin());
        c.env("XDG_CACHE_HOME", self.path().join("xdg-cache"))
            .env("XDG_STATE_HOME", self.path().join("xdg-state"))
            .env("HF_HUB_CACHE", "/nonexistent-hub-cache")
            .env_remove("RUST_LOG");
        c
    }

    /// `moe-serve synth --preset P --out <sandbox>/<name> ARGS`.
    pub fn synth(&self, name: &str, preset: &str, args: &[&str]) -> PathBuf {
        let out = self.path().join(name);
        let o = self
            .command()
            .args(["synth", "--preset", preset, "--out"])
            .arg(&out)
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "synth: {}", stderr(&o));
        out
    }

    /// `moe-serve <sub...> [--model M] --quantization Q --cache-dir <cache> <extra...>`.
    pub fn command_for(
        &self,
        sub: &[&str],
        model: Option<&Path>,
        q: &str,
        extra: &[&str],
    ) -> std::process::Command {
        let mut c = self.command();
        c.args(sub);
        if let Some(m) = model {
            c.arg("--model").arg(m);
        }
        c.args(["--quantization", q, "--cache-dir"])
            .arg(self.cache_dir())
            .args(extra);
        c
    }

    /// File names in the cache folder, sorted.
    pub fn listing(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.cache_dir())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Temporary files of builds (`*.tmp-<pid>`) in the cache folder.
    pub fn temp_files(&self) -> Vec<String> {
        self.listing()
            .into_iter()
            .filter(|n| n.contains(".tmp-"))
            .collect()
    }

    /// Runs the `cache build` child `build` makes and kills it (SIGKILL) once its temporary
    /// file has grown past 8 MiB, starting over (the cache folder cleared) where the build
    /// finished first, at most 3 attempts. Returns the temporary file's name and length, and
    /// the attempt that caught it.
    pub fn kill_build_midway(
        &self,
        build: impl Fn() -> std::process::Command,
    ) -> (String, u64, u32) {
        use std::os::unix::process::ExitStatusExt;
        use std::time::{Duration, Instant};
        let mut attempt = 0;
        let (temp, len) = loop {
            attempt += 1;
            let mut child = build()
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            // Wait for the temporary file to appear and grow past its header.
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut caught = None;
            while Instant::now() < deadline {
                if let Some(t) = self.temp_files().first() {
                    let len = std::fs::metadata(self.cache_dir().join(t)).map_or(0, |m| m.len());
                    if len >= 8 << 20 {
                        caught = Some((t.clone(), len));
                        break;
                    }
                }
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            child.kill().unwrap(); // SIGKILL
            let status = child.wait().unwrap();
            match caught {
                Some(seen) if status.signal() == Some(libc::SIGKILL) => break seen,
                _ => {
                    // It finished before the kill landed (a very fast machine): start over.
                    assert!(attempt < 3, "could not catch the build midway: {status:?}");
                    std::fs::remove_dir_all(self.cache_dir()).unwrap();
                }
            }
        };
        (temp, len, attempt)
    }
}

pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The `tokens` of a `run --json` line.
pub fn tokens(v: &serde_json::Value) -> Vec<u64> {
    v["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

/// The cache file a `run --json` line names.
pub fn cache_of(v: &serde_json::Value) -> PathBuf {
    PathBuf::from(v["cache"].as_str().expect("a cache is used"))
}
