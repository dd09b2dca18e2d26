//! Real clients against `moe-serve serve`: the official `openai` Python package
//! (`tests/clients/openai_suite.py`: every route, streaming, errors, a 16-client load test with
//! memory and batching checks), the official Node package (`tests/clients/openai_suite.mjs`),
//! and nginx with `configs/nginx/moe-serve.conf` in front of two replicas
//! (`tests/clients/nginx_check.py`: requests spread, streams pass unbuffered).
//!
//! The Python comes from `MOE_TEST_PYTHON` (`.ci/run` makes a venv with `openai`), the Node
//! package from `MOE_TEST_NODE_MODULES` (`.ci/run` installs it); nginx from `PATH` or /usr/sbin.
//! Without them the tests say so and skip, except under CI, where they fail.

mod common;
#[path = "common/server.rs"]
#[allow(dead_code)]
mod server;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use server::Server;

/// A Python with `openai`, or None (skipping, outside CI).
fn python(test: &str) -> Option<String> {
    let python = std::env::var("MOE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    let msg = format!(
        "`{python} -c 'import openai'` failed: set MOE_TEST_PYTHON to a Python with `pip install openai` (.ci/run does)"
    );
    assert!(std::env::var_os("CI").is_none(), "{msg}");
    eprintln!("\n!!!!!!!! SKIPPED {test}: {msg} !!!!!!!!\n");
    None
}

fn script(name: &str) -> PathBuf {
    common::root().join("tests/clients").join(name)
}

fn run_script(python: &str, name: &str, args: &[String]) {
    let out = Command::new(python)
        .arg(script(name))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(out.status.success(), "{name} failed:\n{stdout}\n{stderr}");
}

#[test]
fn the_official_openai_client_works_and_a_16_client_load_test_passes() {
    let Some(python) = python("the_official_openai_client_works_and_a_16_client_load_test_passes")
    else {
        return;
    };
    let budget: u64 = 256 << 20;
    let s = Server::ready(
        &[
            "--max-batch",
            "8",
            "--max-queue",
            "64",
            "--ram-budget",
            "256MiB",
            "--threads",
            "2",
        ],
        &[
            ("MOE_SERVE_API_KEY", "sk-test"),
            ("MOE_SERVE_FAULT_PANIC_TOKEN", "250"),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let summary = dir.path().join("suite.json");
    run_script(
        &python,
        "openai_suite.py",
        &[
            "--base-url".into(),
            s.base.clone(),
            "--model".into(),
            "demo".into(),
            "--api-key".into(),
            "sk-test".into(),
            "--fault-token".into(),
            "250".into(),
            "--expect-batching".into(),
            "--server-pid".into(),
            s.pid().to_string(),
            "--ram-budget-bytes".into(),
            budget.to_string(),
            "--json-out".into(),
            summary.to_string_lossy().into_owned(),
        ],
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    eprintln!("load test: {v}");
}

/// The official Node `openai` package (`MOE_TEST_NODE_MODULES`, which `.ci/run` fills) against
/// the server: chat whole and streamed, completions, `n`, the Responses API, and the errors
/// agent frameworks meet (`tools`, `response_format`, `runTools()`), named.
#[test]
fn the_official_node_client_works() {
    let modules = std::env::var("MOE_TEST_NODE_MODULES").unwrap_or_default();
    let found = !modules.is_empty()
        && Path::new(&modules).join("openai/package.json").is_file()
        && Command::new("node")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !found {
        let msg = "node and the `openai` npm package are needed: set MOE_TEST_NODE_MODULES to a \
                   node_modules folder holding it (.ci/run does)";
        assert!(std::env::var_os("CI").is_none(), "{msg}");
        eprintln!("skipped the_official_node_client_works: {msg}");
        return;
    }
    let s = Server::ready(&["--max-batch", "4"], &[("MOE_SERVE_API_KEY", "sk-test")]);
    let out = Command::new("node")
        .arg(script("openai_suite.mjs"))
        .args([s.base.as_str(), "demo", "sk-test"])
        .env("NODE_PATH", &modules)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("pass"),
        "openai_suite.mjs failed:\n{stdout}\n{stderr}"
    );
}

/// nginx from PATH or the distribution's path.
fn nginx() -> Option<PathBuf> {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join("nginx"))
        .collect::<Vec<_>>();
    candidates.into_iter().find(|c| c.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn port_of(base: &str) -> u16 {
    base.rsplit(':').next().unwrap().parse().unwrap()
}

struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers and exits (SIGKILL would orphan the workers).
        // SAFETY: kill(2) on our own child's pid with a valid signal number.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The shipped config with its listen and replica ports replaced.
fn nginx_config(prefix: &Path, listen: u16, a: u16, b: u16) -> PathBuf {
    let text =
        std::fs::read_to_string(common::root().join("configs/nginx/moe-serve.conf")).unwrap();
    // Streaming safety is a property of the file, whatever the timing below shows.
    for needed in [
        "proxy_buffering off;",
        "proxy_http_version 1.1;",
        "proxy_set_header Connection \"\";",
    ] {
        assert!(
            text.contains(needed),
            "configs/nginx/moe-serve.conf lacks `{needed}`"
        );
    }
    for port in ["127.0.0.1:8080;", "127.0.0.1:8081 ", "127.0.0.1:8082 "] {
        assert_eq!(text.matches(port).count(), 1, "{port}");
    }
    let text = text
        .replace("127.0.0.1:8080;", &format!("127.0.0.1:{listen};"))
        .replace("127.0.0.1:8081 ", &format!("127.0.0.1:{a} "))
        .replace("127.0.0.1:8082 ", &format!("127.0.0.1:{b} "));
    let path = prefix.join("nginx.conf");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn nginx_spreads_requests_over_two_replicas_and_streams() {
    let test = "nginx_spreads_requests_over_two_replicas_and_streams";
    let Some(python) = python(test) else {
        return;
    };
    let Some(nginx) = nginx() else {
        let msg = "no nginx binary (apt-get install nginx; .ci/run does)";
        assert!(std::env::var_os("CI").is_none(), "{msg}");
        eprintln!("\n!!!!!!!! SKIPPED {test}: {msg} !!!!!!!!\n");
        return;
    };
    let env = [("MOE_SERVE_API_KEY", "sk-test")];
    let a = Server::ready(&["--max-batch", "4", "--threads", "1"], &env);
    let b = Server::ready(&["--max-batch", "4", "--threads", "1"], &env);
    let prefix = tempfile::tempdir().unwrap();
    let listen = free_port();
    let conf = nginx_config(prefix.path(), listen, port_of(&a.base), port_of(&b.base));
    let mut prefix_arg = prefix.path().to_string_lossy().into_owned();
    prefix_arg.push('/');
    let check = Command::new(&nginx)
        .args(["-t", "-p", &prefix_arg, "-c"])
        .arg(&conf)
        .args(["-e", "stderr"])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "nginx -t: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let _nginx = Nginx(
        Command::new(&nginx)
            .args(["-p", &prefix_arg, "-c"])
            .arg(&conf)
            .args(["-e", "stderr", "-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{listen}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while server::client()
        .get(format!("{base}/health"))
        .send()
        .map(|r| r.status())
        .ok()
        != Some(reqwest::StatusCode::OK)
    {
        assert!(Instant::now() < deadline, "nginx did not come up on {base}");
        std::thread::sleep(Duration::from_millis(50));
    }
    run_script(
        &python,
        "nginx_check.py",
        &[
            "--base-url".into(),
            base,
            "--replicas".into(),
            format!("{},{}", a.base, b.base),
            "--model".into(),
            "demo".into(),
            "--api-key".into(),
            "sk-test".into(),
        ],
    );
}
