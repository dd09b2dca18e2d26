//! `moe-serve serve`: the OpenAI-compatible HTTP server (axum on tokio) over the batch scheduler.
//!
//! The listener opens first and answers `/health` with 503 while the model loads on a blocking
//! thread; then every route works. Compute never runs on the async runtime: prompts are
//! tokenized on blocking threads (at most two at a time, stopping once a prompt surely exceeds
//! the context), requests go to the [`Batcher`]'s thread and come back as events through an
//! unbounded channel per request. `/health` answers 503 naming the file once a model file
//! changed on disk under the process.
//!
//! Connections are ours ([`conn`]): an accept loop over hyper's HTTP/1 server with header, body
//! and idle timeouts, a connection cap that closes the oldest slow connection to make room, and
//! an up-front 413 for a declared body over `max_request_bytes`.
//!
//! Invariants: every route but `/health` needs the bearer key when one is set (the `Bearer`
//! scheme in any case, the key compared in constant time; every 401 says
//! `WWW-Authenticate: Bearer`); every error is OpenAI-shaped ([`errors::ApiError`]), including
//! body rejections, unknown routes and panics (caught per request); a client that goes away
//! drops its receiver, which the scheduler sees before its next step (running) or at its next
//! turn (queued; at once when the queue is full); SIGTERM/SIGINT start a drain: connections are
//! still accepted, `/health` and new API requests answer 503 (`shutting_down`), idle
//! connections close, running requests finish until `drain_timeout_s`, then they are cut short,
//! every connection (half-sent requests included) is closed, and the process exits.

pub mod conn;
pub mod errors;
pub mod metrics;
pub mod openai;
mod responses;
pub mod tools;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use moe_runtime::batch::{BatchConfig, Batcher, Event, RequestParams, Sink, Usage};
use moe_runtime::runconfig::ServerConfig;
use moe_runtime::toolcall::{ToolDelta, ToolFormat};
use moe_runtime::{FinishReason, Model, Prompt, Settings};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use errors::ApiError;
use metrics::Metrics;
use openai::{ChatRequest, CompletionRequest, LegacyLogprobs, PromptSpec};

/// Everything `serve` needs.
pub struct ServeOptions {
    pub settings: Settings,
    pub server: ServerConfig,
    /// Test hook (`MOE_SERVE_FAULT_PANIC_TOKEN`): a prompt holding this id panics in its step.
    pub fault_panic_token: Option<u32>,
    /// Test hook (`MOE_SERVE_FAULT_LOAD_DELAY_MS`): loading takes at least this long.
    pub load_delay: Duration,
}

/// The loaded model and its scheduler.
struct Engine {
    model: Arc<Model>,
    batcher: Batcher,
}

struct App {
    engine: OnceLock<Engine>,
    model_name: String,
    /// Other names requests may give the model (see [`model_aliases`]).
    aliases: Vec<String>,
    api_key: Option<String>,
    metrics: Metrics,
    draining: AtomicBool,
    created: u64,
    max_context: AtomicU64,
}

impl App {
    fn engine(&self) -> Result<&Engine, ApiError> {
        if self.draining.load(Relaxed) {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the server is shutting down",
            )
            .code("shutting_down"));
        }
        self.engine.get().ok_or_else(ApiError::loading)
    }

    fn check_model(&self, asked: &str) -> Result<(), ApiError> {
        if asked == self.model_name || self.aliases.iter().any(|a| a == asked) {
            Ok(())
        } else {
            Err(ApiError::unknown_model(asked, &self.model_name))
        }
    }
}

/// The name `/v1/models` reports: `[server] model_name`, else the Hub id the model was opened
/// by (`Qwen/Qwen3-30B-A3B`), else the model folder's name.
pub fn default_model_name(settings: &Settings) -> String {
    match &settings.model {
        None => "demo".to_string(),
        Some(spec) if is_hub_id(spec) => spec.clone(),
        Some(spec) => last_component(spec),
    }
}

/// Other names a request may give the model: for a Hub id its repository name
/// (`Qwen3-30B-A3B`), for a folder its full path as given; the served name itself excluded.
pub fn model_aliases(settings: &Settings, served: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(spec) = &settings.model {
        for name in [spec.clone(), last_component(spec)] {
            if name != served && !out.contains(&name) {
                out.push(name);
            }
        }
    }
    out
}

/// A model spec that names a Hub repository (`org/name`) rather than a folder here.
fn is_hub_id(spec: &str) -> bool {
    moe_runtime::hub::looks_like_hub_id(spec) && !std::path::Path::new(spec).exists()
}

fn last_component(spec: &str) -> String {
    std::path::Path::new(spec.trim_end_matches('/'))
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| spec.to_string())
}

/// Runs the server until SIGTERM or SIGINT (or a failed load).
pub fn serve(opts: ServeOptions) -> Result<(), Box<dyn std::error::Error>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(serve_async(opts))
}

async fn serve_async(opts: ServeOptions) -> Result<(), Box<dyn std::error::Error>> {
    let server = opts.server.clone();
    // `serve_cmd` has already put `--api-key` or `MOE_SERVE_API_KEY` there when given.
    let api_key = server.api_key.clone().filter(|k| !k.is_empty());
    let model_name = server
        .model_name
        .clone()
        .unwrap_or_else(|| default_model_name(&opts.settings));
    let app = Arc::new(App {
        engine: OnceLock::new(),
        aliases: model_aliases(&opts.settings, &model_name),
        model_name,
        api_key,
        metrics: Metrics::new(),
        draining: AtomicBool::new(false),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        max_context: AtomicU64::new(0),
    });
    // The expert series exist from the start: the layer list comes from config.json.
    {
        let settings = opts.settings.clone();
        if let Ok(Ok(report)) =
            tokio::task::spawn_blocking(move || moe_runtime::plan_model(&settings)).await
        {
            let layers: Vec<usize> = (0..report.config.num_layers)
                .filter(|&l| report.config.sparse_layers.get(l).copied().unwrap_or(false))
                .collect();
            app.metrics.register_layers(&layers);
        }
    }
    let addr = format!("{}:{}", server.host, server.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local: SocketAddr = listener.local_addr()?;
    eprintln!(
        "moe-serve: listening on http://{local} (model `{}`, loading)",
        app.model_name
    );

    let (fatal_tx, fatal_rx) = tokio::sync::oneshot::channel::<String>();
    {
        let app = app.clone();
        let settings = opts.settings.clone();
        let server = server.clone();
        let fault = opts.fault_panic_token;
        let delay = opts.load_delay;
        tokio::task::spawn_blocking(move || {
            let t0 = Instant::now();
            std::thread::sleep(delay);
            match Model::load(&settings) {
                Ok(model) => {
                    let model = Arc::new(model);
                    let batch = format!(
                        "{} sequence{} at once{}",
                        model.max_batch,
                        if model.max_batch == 1 { "" } else { "s" },
                        if model.plan.max_batch_auto {
                            " (max_batch chosen by the memory plan)"
                        } else {
                            ""
                        }
                    );
                    let mut cfg = BatchConfig::for_model(&model, server.max_queue);
                    cfg.prefill_chunk = server.prefill_chunk;
                    cfg.prefix_cache = server.prefix_cache;
                    cfg.fault_panic_token = fault;
                    app.max_context.store(model.max_context as u64, Relaxed);
                    let batcher = Batcher::start(model.clone(), cfg);
                    let _ = app.engine.set(Engine { model, batcher });
                    eprintln!(
                        "moe-serve: ready in {:.2} s, {batch}",
                        t0.elapsed().as_secs_f64()
                    );
                }
                Err(e) => {
                    let _ = fatal_tx.send(e.to_string());
                }
            }
        });
    }

    let router = router(app.clone(), server.max_request_bytes.0);
    let router = match cors(&server.cors_origins) {
        Some(layer) => router.layer(layer),
        None => router,
    };
    let fd_limit = conn::raise_fd_limit();
    let (max_connections, cut) = conn::connection_cap(server.max_connections, fd_limit);
    if cut {
        eprintln!(
            "moe-serve: server.max_connections is over what the open-file limit ({fd_limit}) \
             allows; using {max_connections} (raise the limit with `ulimit -n`)"
        );
    }
    let connections = conn::Connections::new(
        conn::Limits {
            header_timeout: Duration::from_secs(server.header_timeout_s),
            body_timeout: Duration::from_secs(server.body_timeout_s),
            idle_timeout: Duration::from_secs(server.idle_timeout_s),
            max_connections,
        },
        conn::ConnMetrics {
            open: app.metrics.connections.clone(),
            closed: app.metrics.connections_closed.clone(),
        },
    );
    let fatal: Arc<parking_lot::Mutex<Option<String>>> = Arc::default();
    let shutdown = {
        let app = app.clone();
        let fatal = fatal.clone();
        let drain = Duration::from_secs(server.drain_timeout_s);
        async move {
            tokio::select! {
                _ = termination() => {}
                msg = fatal_rx => {
                    if let Ok(msg) = msg {
                        *fatal.lock() = Some(msg);
                    } else {
                        // The loader finished without error: wait for a signal.
                        termination().await;
                    }
                }
            }
            app.draining.store(true, Relaxed);
            if app.engine.get().is_some() {
                eprintln!(
                    "moe-serve: draining (up to {} s for running requests)",
                    drain.as_secs()
                );
                let app = app.clone();
                // Running requests finish (or are cut at the deadline) while the connections
                // drain.
                tokio::task::spawn_blocking(move || {
                    if let Some(e) = app.engine.get() {
                        e.batcher.shutdown(drain);
                    }
                });
            }
        }
    };
    let accepting = tokio::spawn(connections.clone().run(listener, router));
    shutdown.await;
    connections
        .drain(Duration::from_secs(server.drain_timeout_s))
        .await;
    let _ = accepting.await;
    if let Some(e) = app.engine.get() {
        e.batcher.shutdown(Duration::ZERO);
        if let Err(err) = e.model.save_hot_set() {
            tracing::warn!("could not save the hot set: {err}");
        }
    }
    if let Some(msg) = fatal.lock().take() {
        return Err(msg.into());
    }
    eprintln!("moe-serve: stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn termination() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The CORS layer for `origins` (`[server] cors_origins`, checked when the config was read):
/// preflights answered before routing and authentication, the API's methods and the headers
/// its clients send; None when no origin is configured (no CORS headers at all).
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| header::HeaderValue::from_str(o).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .max_age(Duration::from_secs(600)),
    )
}

fn router(app: Arc<App>, max_body: u64) -> Router {
    // The OpenAI routes also without their `/v1` prefix (clients configured with a base URL
    // that lacks it).
    let api = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model_by_id))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/responses", post(responses::responses))
        .route("/models", get(models))
        .route("/models/{*id}", get(model_by_id))
        .route("/chat/completions", post(chat))
        .route("/completions", post(completions))
        .route("/responses", post(responses::responses))
        .route("/metrics", get(metrics_route))
        .route_layer(middleware::from_fn_with_state(app.clone(), auth));
    Router::new()
        .route("/health", get(health))
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(
            usize::try_from(max_body).unwrap_or(usize::MAX),
        ))
        .layer(middleware::from_fn_with_state(max_body, conn::guard_body))
        .layer(middleware::from_fn_with_state(app.clone(), observe))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                ApiError::internal("internal error while handling the request").into_response()
            },
        ))
        .with_state(app)
}

async fn auth(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(key) = &app.api_key {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .is_some_and(|given| constant_time_eq(given.as_bytes(), key.as_bytes()));
        if !ok {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// The token of an `Authorization: Bearer <token>` value; the scheme is case-insensitive
/// (RFC 7235) and may be followed by any run of spaces.
fn bearer_token(value: &str) -> Option<&str> {
    let value = value.trim();
    let (scheme, token) = value.split_once([' ', '\t'])?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Counts every response by route and status; times the non-streaming ones (streams are timed
/// when they end).
async fn observe(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let t0 = Instant::now();
    let method = req.method().clone();
    let resp = next.run(req).await;
    if resp.extensions().get::<LoggedAtEnd>().is_none() {
        tracing::info!(
            target: "request",
            method = %method,
            path = route.as_str(),
            status = resp.status().as_u16(),
            total_ms = log_ms(t0.elapsed()),
            "request"
        );
    }
    let m = &app.metrics;
    m.requests
        .with_label_values(&[route.as_str(), resp.status().as_str()])
        .inc();
    let streaming = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !streaming {
        m.request_seconds
            .with_label_values(&[route.as_str()])
            .observe(t0.elapsed().as_secs_f64());
    }
    resp
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(uri.path())
}

async fn method_not_allowed(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("method not allowed on {}", uri.path()),
    )
    .code("method_not_allowed")
}

async fn health(State(app): State<Arc<App>>) -> Response {
    match app.engine() {
        Ok(e) if !e.batcher.is_running() => ApiError::internal("the batch scheduler has stopped")
            .into_response_with(StatusCode::SERVICE_UNAVAILABLE),
        Ok(e) => match e.model.check_files() {
            // A model file changed on disk: nothing is served until a restart (a 503 naming the
            // file).
            Err(why) => ApiError::from(why).into_response(),
            Ok(()) => Json(json!({
                "status": "ok",
                "model": app.model_name,
                "running": e.batcher.counters().running.load(Relaxed),
                "queued": e.batcher.counters().queued.load(Relaxed),
            }))
            .into_response(),
        },
        Err(err) => err.into_response(),
    }
}

fn model_card(app: &App) -> Value {
    json!({
        "id": app.model_name,
        "object": "model",
        "created": app.created,
        "owned_by": "moe-offload",
        "max_model_len": app.max_context.load(Relaxed),
    })
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_card(&app)]}))
}

async fn model_by_id(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match app.check_model(&id) {
        Ok(()) => Json(model_card(&app)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn metrics_route(State(app): State<Arc<App>>) -> Response {
    let engine = app.engine.get();
    let stats = engine.map(|e| e.model.decoder.store().stats().per_layer);
    let vram = engine.and_then(|e| e.model.decoder.cuda().map(|d| d.backend.vram_usage()));
    let body = app
        .metrics
        .render(stats.as_deref(), engine.map(|e| e.batcher.counters()), vram);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        body,
    )
        .into_response()
}

/// Sends scheduler events into a request's channel; closed when the handler or stream is gone.
struct ChanSink(UnboundedSender<Event>);

impl Sink for ChanSink {
    fn send(&mut self, event: Event) -> bool {
        self.0.send(event).is_ok()
    }
    fn closed(&self) -> bool {
        self.0.is_closed()
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn new_id(prefix: &str) -> String {
    let n = NEXT_ID.fetch_add(1, Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!("{prefix}-{t:x}{n:04x}")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Prompts tokenized at once. Each holds up to a few tens of MiB while it is counted and
/// encoded (work bounded by the context, see `Model::encode_prompt`); two keep a small host's
/// cores busy while concurrent huge prompts cannot multiply that memory (the rest wait here).
const TOKENIZE_CONCURRENCY: usize = 2;

static TOKENIZE_PERMITS: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(TOKENIZE_CONCURRENCY);

/// Tokenizes a prompt on a blocking thread, at most [`TOKENIZE_CONCURRENCY`] at once, so the
/// async workers (`/health`, streams) never wait on it; one that leaves no room for a new
/// token is a 400 naming `param`.
async fn encode(engine: &Engine, prompt: Prompt, param: &str) -> Result<Vec<u32>, ApiError> {
    let permit = TOKENIZE_PERMITS
        .acquire()
        .await
        .map_err(|_| ApiError::internal("the tokenizer queue is closed"))?;
    let model = engine.model.clone();
    let encoded = tokio::task::spawn_blocking(move || {
        // The permit goes with the work: a client that leaves does not free it early.
        let _permit = permit;
        model.encode_prompt(&prompt)
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenizing the prompt failed: {e}")))?;
    encoded.map_err(|e| match e {
        moe_runtime::Error::ContextOverflow {
            needed_tokens,
            max_context_tokens,
        } => ApiError::bad_request(format!(
            "the prompt is at least {} tokens; this model's context is {max_context_tokens} \
             tokens and at least one new token must fit: shorten the prompt",
            needed_tokens - 1
        ))
        .code("context_length_exceeded")
        .param(param),
        other => other.into(),
    })
}

/// Validates and queues a request; its events arrive on the returned receiver.
fn submit(
    engine: &Engine,
    ids: Vec<u32>,
    params: RequestParams,
) -> Result<UnboundedReceiver<Event>, ApiError> {
    let max_context = engine.model.max_context;
    let new = params.generate.max_tokens.unwrap_or(1);
    if ids.len() + new > max_context {
        return Err(ApiError::bad_request(format!(
            "the prompt ({} tokens) plus max_tokens ({new}) is {} tokens, over this model's \
             context of {max_context} tokens: shorten the prompt or lower max_tokens",
            ids.len(),
            ids.len() + new
        ))
        .code("context_length_exceeded")
        .param("max_tokens"));
    }
    engine.batcher.validate(&ids, &params)?;
    let (tx, rx) = unbounded_channel();
    engine.batcher.submit(ids, params, Box::new(ChanSink(tx)))?;
    Ok(rx)
}

/// Submits `n` sequences of one prompt (choice `i` seeded `seed + i`, so choice 0 is what
/// `n` = 1 gives) and merges their events, tagged with the choice's index, into one channel.
/// Choice 0 goes first; the others are submitted at its first event, when its prompt's KV cache
/// is in the batcher's prefix cache, so they share it rather than each prefilling the prompt.
/// A choice that cannot be submitted then fails the request (a `Failed` event); choices stop
/// when their events find the merged channel gone.
fn submit_choices(
    app: &Arc<App>,
    engine: &Engine,
    ids: Vec<u32>,
    params: RequestParams,
    n: usize,
) -> Result<UnboundedReceiver<(usize, Event)>, ApiError> {
    let (tx, merged) = unbounded_channel();
    let mut first = submit(engine, ids.clone(), params.clone())?;
    let app = app.clone();
    tokio::spawn(async move {
        let mut rest = (n > 1).then_some((ids, params));
        // A client gone while choice 0 waits in the queue (no events yet) frees its place at
        // once: the scheduler sees choice 0's channel closed.
        while let Some(ev) = tokio::select! {
            ev = first.recv() => ev,
            () = tx.closed() => None,
        } {
            // A choice 0 that failed fails the request: the others are not started.
            if matches!(ev, Event::Failed(_)) {
                rest = None;
            }
            if let Some((ids, params)) = rest.take() {
                for i in 1..n {
                    let mut p = params.clone();
                    p.generate.seed = p.generate.seed.map(|s| s.wrapping_add(i as u64));
                    match app.engine().and_then(|e| submit(e, ids.clone(), p)) {
                        Ok(rx) => forward(i, rx, tx.clone()),
                        Err(e) => {
                            let why = e.body()["error"]["message"].to_string();
                            let failed = Event::Failed(moe_runtime::Error::Internal(format!(
                                "choice {i} of {n} could not be started: {why}"
                            )));
                            let _ = tx.send((i, failed));
                        }
                    }
                }
            }
            if tx.send((0, ev)).is_err() {
                break;
            }
        }
    });
    Ok(merged)
}

/// Forwards choice `i`'s events into the merged channel until either side ends.
fn forward(i: usize, mut rx: UnboundedReceiver<Event>, tx: UnboundedSender<(usize, Event)>) {
    tokio::spawn(async move {
        while let Some(ev) = tokio::select! {
            ev = rx.recv() => ev,
            () = tx.closed() => None,
        } {
            if tx.send((i, ev)).is_err() {
                break;
            }
        }
    });
}

/// The usage of several choices of one prompt: the prompt counted once, the completions summed.
fn add_usage(total: &mut Option<Usage>, u: &Usage) {
    match total {
        None => *total = Some(u.clone()),
        Some(t) => {
            t.completion_tokens += u.completion_tokens;
            t.decode_time = t.decode_time.max(u.decode_time);
        }
    }
}

/// Records a finished request's decode rate (token counts come from the scheduler).
/// Marks a generation response whose request is logged when its generation ends (the
/// middleware logs every other request).
#[derive(Clone, Copy)]
struct LoggedAtEnd;

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::Chat => "/v1/chat/completions",
            Kind::Completion => "/v1/completions",
        }
    }
}

/// Milliseconds with one decimal, as the request log shows them.
fn log_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// The one log line of a generation request, when it ends (target `request`).
fn log_generation(
    path: &str,
    stream: bool,
    usage: Option<&Usage>,
    ttft: Option<Duration>,
    t0: Instant,
    error: Option<&str>,
) {
    tracing::info!(
        target: "request",
        method = "POST",
        path,
        status = 200,
        stream,
        prompt_tokens = usage.map(|u| u.prompt_tokens),
        completion_tokens = usage.map(|u| u.completion_tokens),
        ttft_ms = ttft.map(log_ms),
        total_ms = log_ms(t0.elapsed()),
        error,
        "request"
    );
}

fn record_usage(app: &App, usage: &Usage) {
    let m = &app.metrics;
    let d = usage.decode_time.as_secs_f64();
    if usage.completion_tokens > 1 && d > 0.0 {
        m.decode_tokens_per_second
            .observe((usage.completion_tokens - 1) as f64 / d);
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

async fn chat(
    State(app): State<Arc<App>>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let t0 = Instant::now();
    let Json(req) = body?;
    let (engine, mut params) = admit(&app, &req.model, req.params())?;
    check_response_format(engine, &params)?;
    let messages = req.chat_messages()?;
    let tools = req.tools()?.filter(tools::Tools::shown);
    let template_format = engine
        .model
        .tokenizer
        .as_ref()
        .and_then(|t| t.chat_template_source())
        .and_then(ToolFormat::detect);
    let kwargs = req.chat_template_kwargs.clone().unwrap_or_default();
    let prompt = match (&tools, template_format) {
        (Some(_), None) => {
            return Err(ApiError::bad_request(
                "this model's chat template does not render tools in a tool-call format this                  server reads (Hermes `<tool_call>`, Mistral, DeepSeek, GLM-4.5, gpt-oss):                  leave out `tools`, or serve the model with a chat template that has them",
            )
            .param("tools"))
        }
        (Some(t), Some(_)) => Prompt::ChatTools(messages, kwargs, t.defs.clone()),
        (None, _) if !kwargs.is_empty() => Prompt::ChatWith(messages, kwargs),
        (None, _) => Prompt::Chat(messages),
    };
    // A forced tool choice: the call grammar, with the markers as the model's own tokens
    // where its vocabulary has them, else spelled out.
    if let (Some(t), Some(format)) = (&tools, template_format) {
        let tokenizer = engine.model.tokenizer.as_ref();
        let token_id = |m: &str| tokenizer.and_then(|tok| tok.token_to_id(m));
        if let Some(grammars) = t.grammars(format, &token_id) {
            let mut last = None;
            for g in grammars {
                match engine.model.constraint(&g) {
                    Ok(_) => {
                        params.generate.grammar = Some(g);
                        last = None;
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            if let Some(e) = last {
                return Err(ApiError::from(e).param("tools"));
            }
        }
    }
    let ids = encode(engine, prompt, "messages").await?;
    let reply = tools::ReplyKind {
        // Constrained text starts at once: no think block to split off.
        think: match params.generate.grammar {
            Some(_) => None,
            None => thinking(engine, &ids),
        },
        // Harmony's channels are read with or without tools (analysis = reasoning).
        format: match (&tools, template_format) {
            (Some(_), f) | (None, f @ Some(ToolFormat::Harmony)) => f,
            _ => None,
        },
        legacy: tools.as_ref().is_some_and(|t| t.legacy),
    };
    let rx = submit_choices(&app, engine, ids, params, req.sampling.choices())?;
    respond(app.clone(), Kind::Chat, rx, &req.sampling, t0, reply).await
}

async fn completions(
    State(app): State<Arc<App>>,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let t0 = Instant::now();
    let Json(req) = body?;
    let (engine, params) = admit(&app, &req.model, req.params())?;
    check_response_format(engine, &params)?;
    let ids = match req.prompt {
        PromptSpec::Ids(ids) => ids,
        PromptSpec::IdLists(mut v) if v.len() == 1 => v.remove(0),
        PromptSpec::Text(t) => encode(engine, Prompt::Text(t), "prompt").await?,
        PromptSpec::Texts(mut v) if v.len() == 1 => {
            encode(engine, Prompt::Text(v.remove(0)), "prompt").await?
        }
        _ => {
            return Err(
                ApiError::bad_request("exactly one prompt per request is supported")
                    .param("prompt"),
            )
        }
    };
    let rx = submit_choices(&app, engine, ids, params, req.sampling.choices())?;
    let reply = tools::ReplyKind::default();
    respond(app.clone(), Kind::Completion, rx, &req.sampling, t0, reply).await
}

/// What both endpoints check first: the model is loaded and is the one asked for, and the
/// request's settings are valid.
fn admit<'a>(
    app: &'a App,
    model: &str,
    params: Result<RequestParams, ApiError>,
) -> Result<(&'a Engine, RequestParams), ApiError> {
    let engine = app.engine()?;
    app.check_model(model)?;
    Ok((engine, params?))
}

/// A `response_format` whose schema the grammar engine cannot use is a 400 naming the field.
fn check_response_format(engine: &Engine, params: &RequestParams) -> Result<(), ApiError> {
    match &params.generate.grammar {
        Some(g) => match engine.model.constraint(g) {
            Ok(_) => Ok(()),
            Err(e) => Err(ApiError::from(e).param("response_format")),
        },
        None => Ok(()),
    }
}

/// For a thinking model (its chat template writes `<think>` blocks): whether the prompt already
/// opened the block, so the answer starts inside it. `None` for other models.
fn thinking(engine: &Engine, ids: &[u32]) -> Option<bool> {
    let tok = engine
        .model
        .tokenizer
        .as_ref()
        .filter(|t| t.template_thinks())?;
    // The last few tokens hold the generation prompt's end.
    let tail = tok.decode(&ids[ids.len().saturating_sub(8)..], false);
    Some(tail.is_ok_and(|t| t.trim_end().ends_with("<think>")))
}

async fn respond(
    app: Arc<App>,
    kind: Kind,
    rx: UnboundedReceiver<(usize, Event)>,
    sampling: &openai::Sampling,
    t0: Instant,
    reply: tools::ReplyKind,
) -> Result<Response, ApiError> {
    let n = sampling.choices();
    let (stream, include_usage) = (sampling.stream(), sampling.include_usage());
    let id = new_id(match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    });
    let created = unix_now();
    if stream {
        let s = sse_stream(app, kind, rx, n, reply, include_usage, t0, id, created);
        let mut r = Sse::new(s).keep_alive(KeepAlive::default()).into_response();
        // Proxies (nginx) must pass each event on as it comes.
        r.headers_mut()
            .insert("x-accel-buffering", HeaderValue::from_static("no"));
        r.extensions_mut().insert(LoggedAtEnd);
        return Ok(r);
    }
    let body = collect(&app, kind, rx, n, reply, t0, &id, created).await?;
    let mut r = Json(body).into_response();
    r.extensions_mut().insert(LoggedAtEnd);
    Ok(r)
}

/// One choice's text and logprobs as they arrive.
#[derive(Default)]
struct Choice {
    text: String,
    /// The output read for reasoning and tool calls as it arrives.
    split: tools::ReplySplit,
    reasoning: String,
    /// Tool calls: name and arguments.
    calls: Vec<(String, String)>,
    /// The legacy `functions` form: the first call as `function_call`.
    function_call: bool,
    chat_lp: Vec<Value>,
    legacy: LegacyLogprobs,
    any_lp: bool,
    finish: Option<&'static str>,
}

impl Choice {
    /// Text of the answer (`end`: the last of it).
    fn add(&mut self, text: &str, end: bool) {
        for d in self.split.push(text, end) {
            match d {
                ToolDelta::Content(c) => self.text.push_str(&c),
                ToolDelta::Reasoning(r) => self.reasoning.push_str(&r),
                ToolDelta::CallStart { name, .. } => self.calls.push((name, String::new())),
                ToolDelta::Arguments { index, text } => {
                    if let Some(c) = self.calls.get_mut(index) {
                        c.1.push_str(&text);
                    }
                }
            }
        }
    }

    /// The chat `message`: reasoning as `reasoning_content` (null when there was none) when
    /// the output is read for it, tool calls as `tool_calls` (content null when there is
    /// none beside them).
    fn message(&mut self) -> Value {
        let mut m = json!({"role": "assistant", "content": std::mem::take(&mut self.text)});
        if self.split.reads_reasoning() {
            let r = std::mem::take(&mut self.reasoning);
            m["reasoning_content"] = if r.is_empty() { Value::Null } else { json!(r) };
        }
        if !self.calls.is_empty() {
            if m["content"] == "" {
                m["content"] = Value::Null;
            }
            if self.function_call {
                // The legacy form carries the first call only.
                let (name, arguments) = self.calls.drain(..).next().unwrap_or_default();
                m["function_call"] = json!({"name": name, "arguments": arguments});
                return m;
            }
            m["tool_calls"] = self
                .calls
                .drain(..)
                .map(|(name, arguments)| {
                    json!({"id": call_id(), "type": "function",
                           "function": {"name": name, "arguments": arguments}})
                })
                .collect();
        }
        m
    }
}

/// The finish reason of a chat choice: `tool_calls` (legacy: `function_call`) when it stopped
/// after calling tools.
fn chat_finish(finish: FinishReason, calls: usize, legacy: bool) -> &'static str {
    match (finish, calls, legacy) {
        (FinishReason::Stop, 1.., false) => "tool_calls",
        (FinishReason::Stop, 1.., true) => "function_call",
        _ => openai::finish_str(finish),
    }
}

/// A tool call's id, in OpenAI's `call_...` form.
fn call_id() -> String {
    new_id("call").replacen("call-", "call_", 1)
}

/// Waits for every choice's whole generation and builds the response body.
#[allow(clippy::too_many_arguments)]
async fn collect(
    app: &App,
    kind: Kind,
    mut rx: UnboundedReceiver<(usize, Event)>,
    n: usize,
    reply: tools::ReplyKind,
    t0: Instant,
    id: &str,
    created: u64,
) -> Result<Value, ApiError> {
    let mut choices: Vec<Choice> = (0..n)
        .map(|_| Choice {
            split: tools::ReplySplit::new(reply),
            function_call: reply.legacy,
            ..Choice::default()
        })
        .collect();
    let (mut done, mut total) = (0, None);
    let mut ttft = None;
    while let Some((i, ev)) = rx.recv().await {
        let c = &mut choices[i];
        match ev {
            Event::Token(t) => {
                if ttft.is_none() {
                    app.metrics.ttft_seconds.observe(t0.elapsed().as_secs_f64());
                    ttft = Some(t0.elapsed());
                }
                if let Some((own, top)) = &t.logprob {
                    c.any_lp = true;
                    c.chat_lp.push(openai::chat_logprob(own, top));
                    c.legacy.push(own, top, c.text.len());
                }
                c.add(&t.text, false);
            }
            Event::Done {
                finish,
                text: rest,
                usage,
            } => {
                c.add(&rest, true);
                c.finish = Some(match kind {
                    Kind::Chat => chat_finish(finish, c.calls.len(), c.function_call),
                    Kind::Completion => openai::finish_str(finish),
                });
                record_usage(app, &usage);
                add_usage(&mut total, &usage);
                done += 1;
                if done < n {
                    continue;
                }
                let usage = total.take().expect("one choice at least");
                log_generation(kind.path(), false, Some(&usage), ttft, t0, None);
                let choices: Vec<Value> = choices
                    .iter_mut()
                    .enumerate()
                    .map(|(index, c)| match kind {
                        Kind::Chat => json!({
                            "index": index,
                            "message": c.message(),
                            "logprobs": if c.any_lp { json!({"content": c.chat_lp}) } else { Value::Null },
                            "finish_reason": c.finish,
                        }),
                        Kind::Completion => json!({
                            "index": index,
                            "text": std::mem::take(&mut c.text),
                            "logprobs": if c.any_lp { c.legacy.json() } else { Value::Null },
                            "finish_reason": c.finish,
                        }),
                    })
                    .collect();
                return Ok(json!({
                    "id": id,
                    "object": match kind { Kind::Chat => "chat.completion", Kind::Completion => "text_completion" },
                    "created": created,
                    "model": app.model_name,
                    "choices": choices,
                    "usage": openai::usage_json(&usage),
                }));
            }
            Event::Failed(e) => return Err(ApiError::from(e)),
        }
    }
    Err(ApiError::internal("the request ended without a result"))
}

/// What the stream still has to send.
struct StreamState {
    app: Arc<App>,
    kind: Kind,
    rx: UnboundedReceiver<(usize, Event)>,
    /// Choices in the stream (`n`).
    n: usize,
    include_usage: bool,
    t0: Instant,
    id: String,
    created: u64,
    /// The chat stream opens with a role chunk per choice.
    opened: bool,
    first_token: bool,
    ttft: Option<Duration>,
    /// Per choice: text bytes sent so far (legacy logprobs' offsets).
    text_len: Vec<usize>,
    /// Per choice: its output read for reasoning and tool calls.
    splits: Vec<tools::ReplySplit>,
    /// Calls go out in the legacy `function_call` form.
    legacy: bool,
    /// Choices finished, and their usage so far.
    done: usize,
    usage: Option<Usage>,
    /// Events ready to go out before reading more.
    out: std::collections::VecDeque<String>,
    finished: bool,
}

impl StreamState {
    fn chunk(&self, choices: Value, usage: Option<Value>) -> String {
        let mut v = json!({
            "id": self.id,
            "object": match self.kind { Kind::Chat => "chat.completion.chunk", Kind::Completion => "text_completion" },
            "created": self.created,
            "model": self.app.model_name,
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = u;
        } else if self.include_usage {
            v["usage"] = Value::Null;
        }
        v.to_string()
    }

    fn text_choice(&self, index: usize, text: &str, logprobs: Value, finish: Value) -> Value {
        match self.kind {
            Kind::Chat => {
                let delta = if text.is_empty() && !finish.is_null() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                self.delta_choice(index, delta, logprobs, finish)
            }
            Kind::Completion => json!([{
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish,
            }]),
        }
    }

    fn delta_choice(&self, index: usize, delta: Value, logprobs: Value, finish: Value) -> Value {
        json!([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])
    }

    /// Chat text of choice `i` as chunks: through its reply split (`reasoning_content`,
    /// `content` and `tool_calls` deltas). Logprobs ride on the first chunk; a piece the split
    /// holds back sends only its logprobs (if any).
    fn push_text(&mut self, i: usize, text: &str, lp: Value, end: bool) {
        let mut lp = lp;
        for d in self.splits[i].push(text, end) {
            let delta = match d {
                ToolDelta::Content(c) => json!({ "content": c }),
                ToolDelta::Reasoning(r) => json!({ "reasoning_content": r }),
                // The legacy form carries one call: later ones are not sent.
                ToolDelta::CallStart { index: 1.., .. }
                | ToolDelta::Arguments { index: 1.., .. }
                    if self.legacy =>
                {
                    continue
                }
                ToolDelta::CallStart { name, .. } if self.legacy => {
                    json!({"function_call": {"name": name, "arguments": ""}})
                }
                ToolDelta::Arguments { text, .. } if self.legacy => {
                    json!({"function_call": {"arguments": text}})
                }
                ToolDelta::CallStart { index, name } => json!({"tool_calls": [{
                    "index": index,
                    "id": call_id(),
                    "type": "function",
                    "function": {"name": name, "arguments": ""},
                }]}),
                ToolDelta::Arguments { index, text } => json!({"tool_calls": [{
                    "index": index,
                    "function": {"arguments": text},
                }]}),
            };
            let ch = self.delta_choice(i, delta, std::mem::take(&mut lp), Value::Null);
            let line = self.chunk(ch, None);
            self.out.push_back(line);
        }
        if !lp.is_null() {
            let ch = self.delta_choice(i, json!({"content": ""}), lp, Value::Null);
            let line = self.chunk(ch, None);
            self.out.push_back(line);
        }
    }

    /// Turns one scheduler event of choice `i` into SSE data lines.
    fn on_event(&mut self, i: usize, ev: Event) {
        match ev {
            Event::Token(t) => {
                if self.first_token {
                    self.app
                        .metrics
                        .ttft_seconds
                        .observe(self.t0.elapsed().as_secs_f64());
                    self.first_token = false;
                    self.ttft = Some(self.t0.elapsed());
                }
                let lp = match (&t.logprob, self.kind) {
                    (None, _) => Value::Null,
                    (Some((own, top)), Kind::Chat) => {
                        json!({"content": [openai::chat_logprob(own, top)]})
                    }
                    (Some((own, top)), Kind::Completion) => {
                        let mut l = LegacyLogprobs::default();
                        l.push(own, top, self.text_len[i]);
                        l.json()
                    }
                };
                if t.text.is_empty() && lp.is_null() {
                    return;
                }
                self.text_len[i] += t.text.len();
                if self.kind == Kind::Chat {
                    self.push_text(i, &t.text, lp, false);
                } else {
                    let c = self.chunk(self.text_choice(i, &t.text, lp, Value::Null), None);
                    self.out.push_back(c);
                }
            }
            Event::Done {
                finish,
                text,
                usage,
            } => {
                record_usage(&self.app, &usage);
                add_usage(&mut self.usage, &usage);
                if self.kind == Kind::Chat {
                    self.push_text(i, &text, Value::Null, true);
                } else if !text.is_empty() {
                    let c = self.chunk(self.text_choice(i, &text, Value::Null, Value::Null), None);
                    self.out.push_back(c);
                }
                let f = json!(match self.kind {
                    Kind::Chat => chat_finish(finish, self.splits[i].calls(), self.legacy),
                    Kind::Completion => openai::finish_str(finish),
                });
                let c = self.chunk(self.text_choice(i, "", Value::Null, f), None);
                self.out.push_back(c);
                self.done += 1;
                if self.done < self.n {
                    return;
                }
                let usage = self.usage.take().expect("one choice at least");
                log_generation(
                    self.kind.path(),
                    true,
                    Some(&usage),
                    self.ttft,
                    self.t0,
                    None,
                );
                if self.include_usage {
                    let c = self.chunk(json!([]), Some(openai::usage_json(&usage)));
                    self.out.push_back(c);
                }
                self.out.push_back("[DONE]".into());
                self.finished = true;
            }
            Event::Failed(e) => {
                let err = ApiError::from(e);
                let why = err.body().to_string();
                log_generation(self.kind.path(), true, None, self.ttft, self.t0, Some(&why));
                self.out.push_back(err.body().to_string());
                self.out.push_back("[DONE]".into());
                self.finished = true;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn sse_stream(
    app: Arc<App>,
    kind: Kind,
    rx: UnboundedReceiver<(usize, Event)>,
    n: usize,
    reply: tools::ReplyKind,
    include_usage: bool,
    t0: Instant,
    id: String,
    created: u64,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let st = StreamState {
        app,
        kind,
        rx,
        n,
        include_usage,
        t0,
        id,
        created,
        opened: kind != Kind::Chat,
        first_token: true,
        ttft: None,
        text_len: vec![0; n],
        splits: (0..n).map(|_| tools::ReplySplit::new(reply)).collect(),
        legacy: reply.legacy,
        done: 0,
        usage: None,
        out: Default::default(),
        finished: false,
    };
    stream::unfold(st, |mut st| async move {
        loop {
            if !st.opened {
                st.opened = true;
                for i in 0..st.n {
                    let c = st.chunk(
                        json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
                        None,
                    );
                    st.out.push_back(c);
                }
            }
            if let Some(line) = st.out.pop_front() {
                if st.out.is_empty() && st.finished {
                    st.app
                        .metrics
                        .request_seconds
                        .with_label_values(&[match st.kind {
                            Kind::Chat => "/v1/chat/completions",
                            Kind::Completion => "/v1/completions",
                        }])
                        .observe(st.t0.elapsed().as_secs_f64());
                }
                return Some((line, st));
            }
            if st.finished {
                return None;
            }
            match st.rx.recv().await {
                Some((i, ev)) => st.on_event(i, ev),
                None => {
                    st.on_event(
                        0,
                        Event::Failed(moe_runtime::Error::Internal(
                            "the request ended without a result".into(),
                        )),
                    );
                }
            }
        }
    })
    .map(|data| Ok(SseEvent::default().data(data)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(model: Option<&str>) -> Settings {
        Settings {
            model: model.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn the_served_name_is_the_hub_id_and_the_repository_name_is_an_alias() {
        let s = settings(Some("Qwen/Qwen3-30B-A3B"));
        let served = default_model_name(&s);
        assert_eq!(served, "Qwen/Qwen3-30B-A3B");
        assert_eq!(model_aliases(&s, &served), ["Qwen3-30B-A3B"]);
        // A folder: its name is served, the path as given is an alias.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("my-moe");
        std::fs::create_dir(&path).unwrap();
        let spec = path.to_string_lossy().into_owned();
        let s = settings(Some(&spec));
        assert_eq!(default_model_name(&s), "my-moe");
        assert_eq!(model_aliases(&s, "my-moe"), std::slice::from_ref(&spec));
        // A configured name keeps both as aliases.
        assert_eq!(model_aliases(&s, "local"), [spec, "my-moe".to_string()]);
        assert_eq!(default_model_name(&settings(None)), "demo");
        assert!(model_aliases(&settings(None), "demo").is_empty());
    }
}
