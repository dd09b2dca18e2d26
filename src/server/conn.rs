//! The connection layer of `moe-serve serve`: our own accept loop over hyper's HTTP/1 server,
//! serving the axum router, with the limits that keep slow or departed clients from holding the
//! server.
//!
//! It owns: accepting (TCP_NODELAY, accept errors such as EMFILE handled without spinning), the
//! open-file limit (raised to its hard limit at start), the connection cap, the per-connection
//! timeouts, the up-front `Content-Length` check, and the connection side of drain.
//!
//! What must always hold:
//! - every connection is in exactly one [`Phase`] and, unless a complete request is being
//!   answered, has a deadline: a request head must arrive within `header_timeout_s` (counted
//!   from the connection's start, or from the head's first byte on a kept-alive connection), a
//!   body within `body_timeout_s` of its head (the request then gets 408), and a kept-alive
//!   connection may idle `idle_timeout_s`; a sweep closes connections past their deadline; a
//!   client that stops reading its response (our writes blocked) for `idle_timeout_s` is closed
//!   too, whatever the phase;
//! - at most `max_connections` connections are open: at the cap a new connection closes the
//!   oldest one that has not delivered a complete request (so slow clients can never lock real
//!   ones out); only when every open connection is answering a request is the new one refused,
//!   with a 503;
//! - a body whose `Content-Length` is over `max_request_bytes` is refused with 413 before any of
//!   it is read (so `Expect: 100-continue` gets no `100 Continue`);
//! - drain (see [`Connections::drain`]) keeps accepting, so `/health` and new requests get their
//!   503; kept-alive idle connections close at once, running requests get until the deadline,
//!   and at the deadline every connection, half-sent requests included, is closed.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use prometheus::{IntCounterVec, IntGauge};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tower_service::Service;

use super::errors::ApiError;

/// How often the sweep looks for connections past their deadline: timeouts are whole seconds,
/// so a tenth of a second is precise enough and costs nothing.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// Time past the body deadline before a connection whose handler never read its body is closed
/// outright (a handler that reads it answers 408 at the deadline itself).
const BODY_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// After the drain deadline, time the requests cut short by the scheduler get to send their
/// last event (`finish_reason` and `[DONE]`) before their connections are closed too.
const DRAIN_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Largest request head (request line and headers) and read buffer per connection: four times
/// nginx's default header buffers, and it bounds what a slow client can make us hold.
const MAX_HEAD_BYTES: usize = 64 << 10;

/// Open files kept out of the connection cap for the model's shards, the cache file, the state
/// folder and the runtime, at most a quarter of the limit.
const FD_RESERVE: u64 = 256;

/// Default connection cap when the open-file limit allows more: far above what one machine
/// answers at once (running plus queued requests), and it bounds the buffers slow clients can
/// pin to 64 MiB (1024 x [`MAX_HEAD_BYTES`]).
const DEFAULT_MAX_CONNECTIONS: u64 = 1024;

/// Pause after an accept error that a retry cannot fix at once (out of file descriptors or
/// memory): the loop neither spins nor stalls, and a slot freed meanwhile is used.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(10);

/// The connection limits, from `[server]`.
#[derive(Clone, Debug)]
pub struct Limits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// Raises the soft open-file limit to the hard limit; returns the soft limit now in effect.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes into the rlimit struct we own and pass by pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    // An unlimited hard limit cannot be the soft one on Linux (nr_open caps it): 2^20 is the
    // kernel's default nr_open.
    let target = if lim.rlim_max == libc::RLIM_INFINITY {
        1 << 20
    } else {
        lim.rlim_max
    };
    if lim.rlim_cur != libc::RLIM_INFINITY && lim.rlim_cur < target {
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit(2) reads the rlimit struct we own; raising the soft limit up to the
        // hard limit needs no privilege and changes nothing else.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = target;
        }
    }
    if lim.rlim_cur == libc::RLIM_INFINITY {
        1 << 20
    } else {
        // `rlim_t` is u64 on Linux but not on every platform.
        #[allow(clippy::unnecessary_cast)]
        let soft = lim.rlim_cur as u64;
        soft
    }
}

/// The connection cap: `configured` (else the default) within what `fd_limit` allows after
/// the reserve for model and cache files. The second value is true when `configured` was cut.
pub fn connection_cap(configured: Option<usize>, fd_limit: u64) -> (usize, bool) {
    let reserve = FD_RESERVE.min(fd_limit / 4);
    let allowed = fd_limit.saturating_sub(reserve).max(1);
    match configured {
        Some(n) if n as u64 > allowed => (allowed as usize, true),
        Some(n) => (n, false),
        None => (DEFAULT_MAX_CONNECTIONS.min(allowed) as usize, false),
    }
}

/// The counters the connection layer keeps (registered by `metrics`).
#[derive(Clone)]
pub struct ConnMetrics {
    /// Open connections.
    pub open: IntGauge,
    /// Connections closed by the server, by reason.
    pub closed: IntCounterVec,
}

/// Why the server closed a connection (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    HeaderTimeout,
    BodyTimeout,
    IdleTimeout,
    /// Closed at the cap to make room for a new connection.
    Evicted,
    /// Refused at the cap: every open connection was answering a request.
    Refused,
    /// The client stopped reading its response for `idle_timeout_s`.
    WriteTimeout,
    /// Closed by drain (idle at its start, or still open at its deadline).
    Drain,
}

impl CloseReason {
    pub const ALL: [CloseReason; 7] = [
        CloseReason::HeaderTimeout,
        CloseReason::BodyTimeout,
        CloseReason::IdleTimeout,
        CloseReason::WriteTimeout,
        CloseReason::Evicted,
        CloseReason::Refused,
        CloseReason::Drain,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CloseReason::HeaderTimeout => "header_timeout",
            CloseReason::BodyTimeout => "body_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::WriteTimeout => "write_timeout",
            CloseReason::Evicted => "evicted",
            CloseReason::Refused => "refused",
            CloseReason::Drain => "drain",
        }
    }
}

/// Where a connection is in its request cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    /// Just accepted, no byte yet (deadline: `header_timeout` from the accept).
    Fresh = 0,
    /// Kept alive after a response, no byte of the next request yet (deadline: `idle_timeout`).
    Idle = 1,
    /// Part of a request head has arrived (deadline: `header_timeout`).
    Head = 2,
    /// The head arrived, the body has not all arrived (deadline: `body_timeout` + grace).
    Body = 3,
    /// A complete request is being answered (no deadline).
    Busy = 4,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Fresh,
            1 => Phase::Idle,
            2 => Phase::Head,
            3 => Phase::Body,
            _ => Phase::Busy,
        }
    }

    /// How long a connection may stay in this phase (from its start), and why it is closed
    /// past that.
    fn timeout(self, l: &Limits) -> Option<(Duration, CloseReason)> {
        match self {
            Phase::Fresh | Phase::Head => Some((l.header_timeout, CloseReason::HeaderTimeout)),
            Phase::Idle => Some((l.idle_timeout, CloseReason::IdleTimeout)),
            Phase::Body => Some((l.body_timeout + BODY_CLOSE_GRACE, CloseReason::BodyTimeout)),
            Phase::Busy => None,
        }
    }
}

/// What the connection's task is asked to do.
const CTL_NONE: u8 = 0;
/// Finish the request in progress, then close (hyper's graceful shutdown).
const CTL_GRACEFUL: u8 = 1;
/// Close now, dropping whatever is in progress.
const CTL_CLOSE: u8 = 2;

/// A deadline of "none".
const NO_DEADLINE: u64 = u64::MAX;

/// Low bits of [`Conn::state`] that hold the [`Phase`].
const PHASE_BITS: u32 = 3;
const PHASE_MASK: u64 = (1 << PHASE_BITS) - 1;

/// One open connection, shared by its task, its IO, its request bodies and the sweep.
struct Conn {
    /// The [`Phase`] and, above [`PHASE_BITS`], when it began in ms since [`Shared::epoch`]
    /// (eviction picks the oldest); one word, so the sweep never sees one without the other.
    /// Its deadline is the start plus [`Phase::timeout`].
    state: AtomicU64,
    /// Since when a write to the client has been blocked (its receive window full), in ms since
    /// the epoch; [`NO_DEADLINE`] while writes go through.
    write_blocked_ms: AtomicU64,
    ctl: AtomicU8,
    wake: Notify,
    shared: Arc<Shared>,
}

impl Conn {
    /// A connection accepted now.
    fn new(shared: Arc<Shared>) -> Conn {
        Conn {
            state: AtomicU64::new(shared.now_ms() << PHASE_BITS | Phase::Fresh as u64),
            write_blocked_ms: AtomicU64::new(NO_DEADLINE),
            ctl: AtomicU8::new(CTL_NONE),
            wake: Notify::new(),
            shared,
        }
    }

    /// The phase and when it began (ms since the epoch).
    fn state(&self) -> (Phase, u64) {
        let s = self.state.load(Relaxed);
        (Phase::from_u8((s & PHASE_MASK) as u8), s >> PHASE_BITS)
    }

    fn phase(&self) -> Phase {
        self.state().0
    }

    /// Enters `phase` now.
    fn set(&self, phase: Phase) {
        let s = self.shared.now_ms() << PHASE_BITS | phase as u64;
        self.state.store(s, Relaxed);
    }

    /// Why the connection is closed if it has not moved on by `now_ms` (ms since the epoch).
    fn expired(&self, now_ms: u64) -> Option<CloseReason> {
        let (phase, since) = self.state();
        let (t, why) = phase.timeout(&self.shared.limits)?;
        (since.saturating_add(t.as_millis() as u64) <= now_ms).then_some(why)
    }

    /// Bytes arrived: a waiting connection starts receiving a request head.
    fn on_bytes(&self) {
        let s = self.state.load(Relaxed);
        match Phase::from_u8((s & PHASE_MASK) as u8) {
            // The first head's deadline counts from the accept: the start is kept.
            Phase::Fresh => {
                let head = (s & !PHASE_MASK) | Phase::Head as u64;
                let _ = self.state.compare_exchange(s, head, Relaxed, Relaxed);
            }
            Phase::Idle => self.set(Phase::Head),
            _ => {}
        }
    }

    /// hyper parsed a request head; `ended`: it has no body to wait for.
    fn on_head(&self, ended: bool) {
        self.set(if ended { Phase::Busy } else { Phase::Body });
    }

    /// The request body has all arrived.
    fn on_body_end(&self) {
        if self.phase() == Phase::Body {
            self.set(Phase::Busy);
        }
    }

    /// The response has been written (or abandoned): wait for the next request.
    fn on_response_end(&self) {
        self.set(Phase::Idle);
    }

    /// A write returned `Pending` (the client is not reading) or went through.
    fn on_write(&self, blocked: bool) {
        if blocked {
            if self.write_blocked_ms.load(Relaxed) == NO_DEADLINE {
                self.write_blocked_ms.store(self.shared.now_ms(), Relaxed);
            }
        } else if self.write_blocked_ms.load(Relaxed) != NO_DEADLINE {
            self.write_blocked_ms.store(NO_DEADLINE, Relaxed);
        }
    }

    /// Asks the connection's task to close (or finish and close); counts why once.
    fn order(&self, ctl: u8, reason: CloseReason) {
        let was = self.ctl.fetch_max(ctl, Relaxed);
        if was < ctl {
            if ctl == CTL_CLOSE {
                self.shared
                    .metrics
                    .closed
                    .with_label_values(&[reason.label()])
                    .inc();
            }
            self.wake.notify_one();
        }
    }
}

/// State shared by the accept loop, every connection and the sweep.
struct Shared {
    limits: Limits,
    epoch: Instant,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    /// Set when drain starts: new connections are served without keep-alive.
    draining: AtomicBool,
    /// Ends the accept loop and the sweep.
    stop: Notify,
    stopped: AtomicBool,
    metrics: ConnMetrics,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Closes the oldest connection that is not answering a complete request; false if every
    /// connection is.
    fn evict_one(&self) -> bool {
        let victim = self
            .conns
            .lock()
            .values()
            .filter(|c| c.phase() != Phase::Busy && c.ctl.load(Relaxed) != CTL_CLOSE)
            .min_by_key(|c| c.state().1)
            .cloned();
        match victim {
            Some(c) => {
                c.order(CTL_CLOSE, CloseReason::Evicted);
                true
            }
            None => false,
        }
    }

    /// Open connections not already told to close.
    fn live(&self) -> usize {
        self.conns
            .lock()
            .values()
            .filter(|c| c.ctl.load(Relaxed) != CTL_CLOSE)
            .count()
    }

    /// Closes the connections past their deadline.
    fn sweep(&self) {
        let now = self.now_ms();
        let write_limit_ms = self.limits.idle_timeout.as_millis() as u64;
        let expired: Vec<(Arc<Conn>, CloseReason)> = self
            .conns
            .lock()
            .values()
            .filter_map(|c| {
                let blocked = c.write_blocked_ms.load(Relaxed);
                if blocked != NO_DEADLINE && now.saturating_sub(blocked) >= write_limit_ms {
                    Some((c.clone(), CloseReason::WriteTimeout))
                } else {
                    c.expired(now).map(|why| (c.clone(), why))
                }
            })
            .collect();
        for (c, why) in expired {
            c.order(CTL_CLOSE, why);
        }
    }
}

/// The server's connections: the accept loop, the sweep and drain.
#[derive(Clone)]
pub struct Connections {
    shared: Arc<Shared>,
}

impl Connections {
    pub fn new(limits: Limits, metrics: ConnMetrics) -> Connections {
        for r in CloseReason::ALL {
            metrics.closed.with_label_values(&[r.label()]);
        }
        Connections {
            shared: Arc::new(Shared {
                limits,
                epoch: Instant::now(),
                conns: Mutex::new(HashMap::new()),
                draining: AtomicBool::new(false),
                stop: Notify::new(),
                stopped: AtomicBool::new(false),
                metrics,
            }),
        }
    }

    /// Open connections.
    pub fn open(&self) -> usize {
        self.shared.conns.lock().len()
    }

    /// Accepts and serves connections until [`Connections::drain`] ends; runs the sweep.
    pub async fn run(self, listener: TcpListener, router: Router) {
        let sweep = {
            let shared = self.shared.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(SWEEP_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while !shared.stopped.load(Relaxed) {
                    tick.tick().await;
                    shared.sweep();
                }
            })
        };
        let mut next_id = 0u64;
        let mut last_warning: Option<Instant> = None;
        loop {
            if self.shared.stopped.load(Relaxed) {
                break;
            }
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = self.shared.stop.notified() => break,
            };
            let tcp = match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    if accept_error_is_transient(&e) {
                        // The peer gave up before we accepted: nothing to wait for.
                        continue;
                    }
                    // Out of file descriptors or memory: free a slot held by a slow client,
                    // and pause briefly rather than spin on the same error.
                    if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        eprintln!(
                            "moe-serve: cannot accept a connection: {e} (closing a slow one; \
                             raise the open-file limit or lower server.max_connections)"
                        );
                        last_warning = Some(Instant::now());
                    }
                    self.shared.evict_one();
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            // Each streamed token is a small write: without TCP_NODELAY, Nagle's algorithm can
            // hold one back until the peer's delayed ACK (~40 ms).
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!("cannot set TCP_NODELAY: {e}");
            }
            if self.shared.live() >= self.shared.limits.max_connections && !self.shared.evict_one()
            {
                self.shared
                    .metrics
                    .closed
                    .with_label_values(&[CloseReason::Refused.label()])
                    .inc();
                tokio::spawn(refuse(tcp));
                continue;
            }
            next_id += 1;
            let conn = Arc::new(Conn::new(self.shared.clone()));
            self.shared.conns.lock().insert(next_id, conn.clone());
            self.shared.metrics.open.inc();
            tokio::spawn(serve_conn(next_id, tcp, conn, router.clone()));
        }
        drop(listener);
        self.shared.stopped.store(true, Relaxed);
        let _ = sweep.await;
    }

    /// Drains: keeps accepting (new connections are answered, then closed), closes idle
    /// connections now, lets requests being answered finish until `timeout`, then closes every
    /// connection (after [`DRAIN_CLOSE_GRACE`] for requests cut short at the deadline) and
    /// ends the accept loop. Returns when every connection is closed.
    pub async fn drain(&self, timeout: Duration) {
        let s = &self.shared;
        s.draining.store(true, Relaxed);
        let deadline = Instant::now() + timeout;
        let all: Vec<Arc<Conn>> = s.conns.lock().values().cloned().collect();
        for c in all {
            match c.phase() {
                Phase::Fresh | Phase::Idle => c.order(CTL_CLOSE, CloseReason::Drain),
                _ => c.order(CTL_GRACEFUL, CloseReason::Drain),
            }
        }
        let busy = || {
            s.conns
                .lock()
                .values()
                .filter(|c| c.phase() == Phase::Busy && c.ctl.load(Relaxed) != CTL_CLOSE)
                .count()
        };
        while busy() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // No request is being answered (or the deadline passed): what is left are half-sent
        // requests and connections opened during drain; stop accepting and close them.
        s.stopped.store(true, Relaxed);
        s.stop.notify_one();
        let close = |only_not_busy: bool| {
            let all: Vec<Arc<Conn>> = s.conns.lock().values().cloned().collect();
            for c in all {
                if !only_not_busy || c.phase() != Phase::Busy {
                    c.order(CTL_CLOSE, CloseReason::Drain);
                }
            }
        };
        close(true);
        let grace_end = Instant::now() + DRAIN_CLOSE_GRACE;
        while busy() > 0 && Instant::now() < grace_end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        close(false);
        // Their tasks drop the connections at once; wait (briefly) until they have.
        let gone_by = Instant::now() + Duration::from_secs(1);
        while self.open() > 0 && Instant::now() < gone_by {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Whether an accept error concerns only the connection being accepted (retry at once).
fn accept_error_is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Answers a connection over the cap with a 503 and closes it.
async fn refuse(mut tcp: TcpStream) {
    use tokio::io::AsyncWriteExt;
    let mut e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "the server has too many open connections, all answering requests; retry later \
         (server.max_connections)",
    )
    .code("too_many_connections");
    e.retry_after = Some(1);
    let body = e.body().to_string();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let write = async {
        tcp.write_all(head.as_bytes()).await?;
        tcp.write_all(body.as_bytes()).await?;
        tcp.shutdown().await
    };
    // A client that does not read does not hold the refusal either.
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

/// Serves one connection until it ends or is told to close.
async fn serve_conn(id: u64, tcp: TcpStream, conn: Arc<Conn>, router: Router) {
    let shared = conn.shared.clone();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        // During drain a connection is answered once, then closed.
        .keep_alive(!shared.draining.load(Relaxed))
        .max_buf_size(MAX_HEAD_BYTES)
        // Our own deadlines (the sweep) replace hyper's header timer.
        .header_read_timeout(None);
    let io = TokioIo::new(Tracked {
        inner: tcp,
        conn: conn.clone(),
    });
    let svc = ConnService {
        router,
        conn: conn.clone(),
    };
    let mut http = Box::pin(builder.serve_connection(io, svc));
    let mut graceful = false;
    loop {
        let ctl = conn.ctl.load(Relaxed);
        if ctl == CTL_CLOSE {
            break;
        }
        if ctl == CTL_GRACEFUL && !graceful {
            graceful = true;
            http.as_mut().graceful_shutdown();
        }
        tokio::select! {
            r = http.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!("connection ended: {e}");
                }
                break;
            }
            _ = conn.wake.notified() => {}
        }
    }
    // Dropping the connection closes the socket and drops any request still being answered
    // (its scheduler sink then reports the client gone).
    drop(http);
    shared.conns.lock().remove(&id);
    shared.metrics.open.dec();
}

/// The TCP stream, reporting to its connection when bytes arrive.
struct Tracked {
    inner: TcpStream,
    conn: Arc<Conn>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.conn.on_bytes();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.conn.on_write(r.is_pending());
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.conn.on_write(r.is_pending());
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Set on a request whose body did not arrive within `body_timeout_s`; [`guard_body`] then
/// answers 408.
#[derive(Clone)]
struct BodyTimedOut(Arc<AtomicBool>);

/// The axum router as hyper's service on one connection: marks the request's phases and puts
/// the body deadline on its body.
#[derive(Clone)]
struct ConnService {
    router: Router,
    conn: Arc<Conn>,
}

type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl hyper::service::Service<hyper::Request<Incoming>> for ConnService {
    type Response = Response;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        let (parts, body) = req.into_parts();
        let ended = http_body::Body::is_end_stream(&body);
        self.conn.on_head(ended);
        let timed_out = Arc::new(AtomicBool::new(false));
        let body = Timed {
            inner: body,
            deadline: (!ended)
                .then(|| Box::pin(tokio::time::sleep(self.conn.shared.limits.body_timeout))),
            timed_out: timed_out.clone(),
            conn: self.conn.clone(),
            done: ended,
        };
        let mut req = Request::from_parts(parts, Body::new(body));
        req.extensions_mut().insert(BodyTimedOut(timed_out));
        let conn = self.conn.clone();
        // A Router is always ready (its `poll_ready` returns `Ready` at once), so it is called
        // without polling readiness, as axum's own server does.
        let fut = self.router.clone().call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let ended = ResponseEnd(conn);
            Ok(resp.map(|b| {
                Body::new(Finishing {
                    inner: b,
                    _end: ended,
                })
            }))
        })
    }
}

/// A request body with a deadline: at it, the body fails (the handler's extractor gets an error)
/// and the request is marked for a 408.
struct Timed {
    inner: Incoming,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    timed_out: Arc<AtomicBool>,
    conn: Arc<Conn>,
    done: bool,
}

/// A request body that did not arrive in time.
#[derive(Debug)]
struct BodyTimeout;

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body did not arrive in time (server.body_timeout_s)")
    }
}

impl std::error::Error for BodyTimeout {}

impl http_body::Body for Timed {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.done = true;
                this.conn.on_body_end();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if this.inner.is_end_stream() {
                    this.conn.on_body_end();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.done = true;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => {
                if let Some(d) = this.deadline.as_mut() {
                    if d.as_mut().poll(cx).is_ready() {
                        this.done = true;
                        this.timed_out.store(true, Relaxed);
                        return Poll::Ready(Some(Err(BodyTimeout.into())));
                    }
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Marks the connection idle when its response has been written or abandoned.
struct ResponseEnd(Arc<Conn>);

impl Drop for ResponseEnd {
    fn drop(&mut self) {
        self.0.on_response_end();
    }
}

/// A response body that reports its end (when hyper drops it, written or not).
struct Finishing {
    inner: Body,
    _end: ResponseEnd,
}

impl http_body::Body for Finishing {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Middleware: a `Content-Length` over `max_request_bytes` is refused with 413 before the body
/// is read; a body that missed its deadline turns the response into 408. Both close the
/// connection (the rest of the body is never read).
pub async fn guard_body(State(max_bytes): State<u64>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_bytes) {
        return closing(ApiError::too_large().into_response());
    }
    let timed_out = req.extensions().get::<BodyTimedOut>().cloned();
    let resp = next.run(req).await;
    if timed_out.is_some_and(|t| t.0.load(Relaxed)) {
        return closing(ApiError::body_timeout().into_response());
    }
    resp
}

fn closing(mut r: Response) -> Response {
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_keeps_a_reserve_of_file_descriptors() {
        assert_eq!(connection_cap(None, 1 << 20), (1024, false));
        assert_eq!(connection_cap(None, 1024), (768, false));
        assert_eq!(connection_cap(None, 256), (192, false));
        assert_eq!(connection_cap(Some(100), 1024), (100, false));
        assert_eq!(connection_cap(Some(5000), 1024), (768, true));
        assert_eq!(connection_cap(None, 0), (1, false));
    }
}
