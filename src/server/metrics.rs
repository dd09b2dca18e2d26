//! Prometheus metrics (through the `prometheus` crate's registry and text encoder): requests,
//! latencies, time to first token, tokens/s, queue and batch, HTTP connections (open, and closed
//! by the server by reason), and the expert store's per-layer counters as `moe_expert_*`.
//!
//! Invariants: every metric family is registered before the server answers its first request;
//! the expert families get one series per MoE layer (and tier), at 0, as soon as the layer list
//! is known (from config.json, before the weights load); the store's own counters are the truth
//! and are copied into the registry on each scrape (counters only ever grow).

use std::sync::atomic::Ordering::Relaxed;

use moe_runtime::backend::cuda::VramUsage;
use moe_runtime::batch::BatchCounters;
use moe_runtime::store::LayerStats;
use parking_lot::Mutex;
use prometheus::{
    CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

const LATENCY_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
const RATE_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0,
];

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub ttft_seconds: Histogram,
    pub decode_tokens_per_second: Histogram,
    prompt_tokens: IntCounter,
    cached_prompt_tokens: IntCounter,
    generated_tokens: IntCounter,
    queue_depth: IntGauge,
    running: IntGauge,
    batch_size: IntGauge,
    batch_tokens: IntGauge,
    steps: IntCounter,
    prefix_cache_bytes: IntGauge,
    scheduler_failures: IntCounter,
    /// Open HTTP connections (kept by the connection layer).
    pub connections: IntGauge,
    /// HTTP connections the server closed, by reason (kept by the connection layer).
    pub connections_closed: IntCounterVec,
    expert_hits: IntCounterVec,
    expert_misses: IntCounterVec,
    expert_prefetch_hits: IntCounterVec,
    expert_prefetch_wasted: IntCounterVec,
    expert_stall_seconds: CounterVec,
    expert_bytes: IntCounterVec,
    vram_bytes: IntGaugeVec,
    /// Store counters already copied into the registry, per layer.
    seen: Mutex<Vec<LayerStats>>,
    /// Scheduler counters already copied: steps, failures, prompt, cached and generated tokens.
    seen_sched: Mutex<[u64; 5]>,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &r,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid"),
            )
        };
        let counter = |name: &str, help: &str| {
            reg(
                &r,
                IntCounter::with_opts(Opts::new(name, help)).expect("valid"),
            )
        };
        let gauge = |name: &str, help: &str| {
            reg(
                &r,
                IntGauge::with_opts(Opts::new(name, help)).expect("valid"),
            )
        };
        let hist = |name: &str, help: &str, b: &[f64]| {
            reg(
                &r,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(b.to_vec()))
                    .expect("valid"),
            )
        };
        Metrics {
            requests: counter_vec(
                "moe_requests_total",
                "HTTP requests answered, by route and status code",
                &["route", "status"],
            ),
            request_seconds: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "moe_request_duration_seconds",
                        "Time from request arrival to the last byte of the response, by route",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                    &["route"],
                )
                .expect("valid"),
            ),
            ttft_seconds: hist(
                "moe_time_to_first_token_seconds",
                "Time from request arrival to its first generated token",
                LATENCY_BUCKETS,
            ),
            decode_tokens_per_second: hist(
                "moe_decode_tokens_per_second",
                "Per request: generated tokens after the first, per second",
                RATE_BUCKETS,
            ),
            prompt_tokens: counter(
                "moe_prompt_tokens_total",
                "Prompt tokens of requests admitted into the batch",
            ),
            cached_prompt_tokens: counter(
                "moe_cached_prompt_tokens_total",
                "Prompt tokens whose KV cache was reused from an earlier sequence",
            ),
            generated_tokens: counter(
                "moe_generated_tokens_total",
                "Tokens generated, for finished, running and abandoned requests alike",
            ),
            queue_depth: gauge("moe_queue_depth", "Requests waiting for a batch slot"),
            running: gauge("moe_running_requests", "Requests in the running batch"),
            batch_size: gauge("moe_batch_size", "Sequences in the last batched step"),
            batch_tokens: gauge("moe_batch_tokens", "Tokens (rows) in the last batched step"),
            steps: counter("moe_batch_steps_total", "Batched forward steps run"),
            prefix_cache_bytes: gauge(
                "moe_prefix_cache_bytes",
                "KV cache bytes held for reuse by later prompts with the same prefix",
            ),
            scheduler_failures: counter(
                "moe_scheduler_failures_total",
                "Requests failed by a panic or an error inside a batched step",
            ),
            connections: gauge("moe_http_connections", "Open HTTP connections"),
            connections_closed: counter_vec(
                "moe_http_connections_closed_total",
                "HTTP connections the server closed, by reason: header_timeout, body_timeout, \
                 idle_timeout, write_timeout, evicted or refused (at server.max_connections), \
                 drain",
                &["reason"],
            ),
            vram_bytes: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "moe_vram_bytes",
                        "Device memory on cuda, by kind: budget (the planned cap), held \
                         (allocated from the device, kept buffers included), live (in use now), \
                         peak_live (the most in use so far)",
                    ),
                    &["kind"],
                )
                .expect("valid"),
            ),
            expert_hits: counter_vec(
                "moe_expert_hits_total",
                "Expert uses served from the fastest tier holding compute for it, per layer",
                &["layer"],
            ),
            expert_misses: counter_vec(
                "moe_expert_misses_total",
                "Expert uses that had to read, copy or compute in place, per layer",
                &["layer"],
            ),
            expert_prefetch_hits: counter_vec(
                "moe_expert_prefetch_hits_total",
                "Hits on experts brought in by prefetch, per layer",
                &["layer"],
            ),
            expert_prefetch_wasted: counter_vec(
                "moe_expert_prefetch_wasted_total",
                "Prefetched experts evicted before any use, per layer",
                &["layer"],
            ),
            expert_stall_seconds: reg(
                &r,
                CounterVec::new(
                    Opts::new(
                        "moe_expert_stall_seconds_total",
                        "Time compute waited for experts to arrive, per layer",
                    ),
                    &["layer"],
                )
                .expect("valid"),
            ),
            expert_bytes: counter_vec(
                "moe_expert_bytes_moved_total",
                "Expert bytes moved, per layer and tier (file_to_ram, ram_to_device)",
                &["layer", "tier"],
            ),
            seen: Mutex::new(Vec::new()),
            seen_sched: Mutex::new([0; 5]),
            registry: r,
        }
    }

    /// Creates every expert series, at 0, for these MoE layers.
    pub fn register_layers(&self, layers: &[usize]) {
        let mut seen = self.seen.lock();
        for &l in layers {
            let l_s = l.to_string();
            let l_s = l_s.as_str();
            self.expert_hits.with_label_values(&[l_s]);
            self.expert_misses.with_label_values(&[l_s]);
            self.expert_prefetch_hits.with_label_values(&[l_s]);
            self.expert_prefetch_wasted.with_label_values(&[l_s]);
            self.expert_stall_seconds.with_label_values(&[l_s]);
            for tier in ["file_to_ram", "ram_to_device"] {
                self.expert_bytes.with_label_values(&[l_s, tier]);
            }
            if !seen.iter().any(|s| s.layer == l) {
                seen.push(LayerStats {
                    layer: l,
                    ..Default::default()
                });
            }
        }
    }

    /// Copies the store's and the scheduler's counters in, then renders the text format.
    pub fn render(
        &self,
        store: Option<&[LayerStats]>,
        sched: Option<&BatchCounters>,
        vram: Option<VramUsage>,
    ) -> String {
        if let Some(v) = vram {
            for (kind, bytes) in [
                ("budget", v.cap_bytes),
                ("held", v.held_bytes),
                ("live", v.live_bytes),
                ("peak_live", v.peak_live_bytes),
            ] {
                self.vram_bytes
                    .with_label_values(&[kind])
                    .set(i64::try_from(bytes).unwrap_or(i64::MAX));
            }
        }
        if let Some(layers) = store {
            let mut seen = self.seen.lock();
            for now in layers {
                let i = match seen.iter().position(|s| s.layer == now.layer) {
                    Some(i) => i,
                    None => {
                        seen.push(LayerStats {
                            layer: now.layer,
                            ..Default::default()
                        });
                        seen.len() - 1
                    }
                };
                let was = &seen[i];
                let l_s = now.layer.to_string();
                let l = [l_s.as_str()];
                let d = |a: u64, b: u64| a.saturating_sub(b);
                self.expert_hits
                    .with_label_values(&l)
                    .inc_by(d(now.hits, was.hits));
                self.expert_misses
                    .with_label_values(&l)
                    .inc_by(d(now.misses, was.misses));
                self.expert_prefetch_hits
                    .with_label_values(&l)
                    .inc_by(d(now.prefetch_hits, was.prefetch_hits));
                self.expert_prefetch_wasted
                    .with_label_values(&l)
                    .inc_by(d(now.prefetch_wasted, was.prefetch_wasted));
                let stall = (now.stall_ms - was.stall_ms).max(0.0) / 1e3;
                self.expert_stall_seconds
                    .with_label_values(&l)
                    .inc_by(stall);
                self.expert_bytes
                    .with_label_values(&[l[0], "file_to_ram"])
                    .inc_by(d(now.bytes_file_to_ram, was.bytes_file_to_ram));
                self.expert_bytes
                    .with_label_values(&[l[0], "ram_to_device"])
                    .inc_by(d(now.bytes_to_device, was.bytes_to_device));
                seen[i] = now.clone();
            }
        }
        if let Some(c) = sched {
            self.queue_depth.set(c.queued.load(Relaxed) as i64);
            self.running.set(c.running.load(Relaxed) as i64);
            self.batch_size
                .set(c.last_step_sequences.load(Relaxed) as i64);
            self.batch_tokens
                .set(c.last_step_tokens.load(Relaxed) as i64);
            self.prefix_cache_bytes
                .set(c.prefix_cache_bytes.load(Relaxed) as i64);
            let mut seen = self.seen_sched.lock();
            let now = [
                c.steps.load(Relaxed),
                c.failed.load(Relaxed),
                c.prompt_tokens.load(Relaxed),
                c.cached_prompt_tokens.load(Relaxed),
                c.generated_tokens.load(Relaxed),
            ];
            let targets = [
                &self.steps,
                &self.scheduler_failures,
                &self.prompt_tokens,
                &self.cached_prompt_tokens,
                &self.generated_tokens,
            ];
            for ((t, n), s) in targets.iter().zip(now).zip(seen.iter()) {
                t.inc_by(n.saturating_sub(*s));
            }
            *seen = now;
        }
        let mut out = Vec::new();
        // Encoding gathered families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_memory_is_exported_only_on_cuda() {
        let m = Metrics::new();
        let text = m.render(None, None, None);
        assert!(!text.contains("moe_vram_bytes{"), "{text}");
        let usage = VramUsage {
            cap_bytes: 7 << 30,
            held_bytes: 5 << 30,
            live_bytes: 3 << 30,
            peak_live_bytes: 4 << 30,
        };
        let text = m.render(None, None, Some(usage));
        for (kind, bytes) in [
            ("budget", 7u64 << 30),
            ("held", 5 << 30),
            ("live", 3 << 30),
            ("peak_live", 4 << 30),
        ] {
            let line = format!("moe_vram_bytes{{kind=\"{kind}\"}} {bytes}");
            assert!(text.contains(&line), "{line} missing from:\n{text}");
        }
    }
}
