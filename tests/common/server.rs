//! A `moe-serve serve` child process on a free loopback port, for the HTTP tests.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct Server {
    pub child: Child,
    pub base: String,
    /// Stderr lines after the listening line, as they arrive.
    pub log: mpsc::Receiver<String>,
}

impl Server {
    /// Starts `moe-serve serve --port 0 ARGS` with `env` and waits until it listens (not until
    /// the model is ready: see [`Server::wait_ready`]).
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::start_with_fd_limit(args, env, None)
    }

    /// [`Server::start`] with the child's open-file limit (soft and hard) set to `nofile`.
    pub fn start_with_fd_limit(args: &[&str], env: &[(&str, &str)], nofile: Option<u64>) -> Server {
        let mut cmd = Command::new(crate::common::bin());
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: the closure runs in the forked child before exec and calls only
            // setrlimit(2), which is async-signal-safe, on a struct it owns.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n as libc::rlim_t,
                        rlim_max: n as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.arg("serve")
            .args(["--port", "0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env_remove("MOE_SERVE_API_KEY")
            .env("RUST_LOG", "warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start moe-serve serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the server did not print its address");
            };
            if let Some(rest) = line.split("listening on ").nth(1) {
                let base = rest.split_whitespace().next().unwrap().to_string();
                return Server {
                    child,
                    base,
                    log: rx,
                };
            }
        }
    }

    /// Starts the server and waits for `/health` to say 200.
    pub fn ready(args: &[&str], env: &[(&str, &str)]) -> Server {
        let s = Server::start(args, env);
        s.wait_ready();
        s
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `host:port` of the listener.
    pub fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }

    /// A raw TCP connection to the server.
    pub fn connect(&self) -> std::net::TcpStream {
        std::net::TcpStream::connect(self.addr()).expect("connect to the server")
    }

    pub fn wait_ready(&self) {
        let c = client();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(r) = c.get(self.url("/health")).send() {
                if r.status() == 200 {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the server never became ready");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit status (None: it did not exit within `limit`).
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: kill(2) on our own child's pid with a valid signal number.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// A metric's value from `/metrics` (the first series whose line starts with `series`).
    pub fn metric(&self, series: &str, key: Option<&str>) -> Option<f64> {
        let mut req = client().get(self.url("/metrics"));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let text = req.send().ok()?.text().ok()?;
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// A config file for the bundled demo model with extra lines (top level, then `[server]`).
pub fn demo_config(dir: &Path, top: &str, server: &str) -> std::path::PathBuf {
    let demo = crate::common::root().join("runtime/demo");
    let path = dir.join("serve.toml");
    std::fs::write(
        &path,
        format!(
            "model = {:?}\nthreads = 2\n{top}\n[server]\n{server}\n",
            demo.to_string_lossy()
        ),
    )
    .unwrap();
    path
}

/// The last `data: ` line of a stream's `lines` is `data: [DONE]`.
#[track_caller]
pub fn assert_ends_with_done(lines: &[String]) {
    assert_eq!(
        lines
            .iter()
            .rev()
            .find(|l| l.starts_with("data: "))
            .map(String::as_str),
        Some("data: [DONE]")
    );
}
