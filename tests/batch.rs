//! Batched forward passes and the continuous-batching scheduler: batched results equal solo
//! results, chunked prefill and prefix reuse change nothing, and the scheduler's limits, stop
//! strings, penalties, logprobs, disconnects and fault isolation behave.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{greedy_generate, greedy_request, max_abs_diff, variants};
use crossbeam_channel::Receiver;
use moe_runtime::batch::{BatchConfig, Batcher, Event, Refused, RequestParams, Sink, Usage};
use moe_runtime::dispatch::Segment;
use moe_runtime::{FinishReason, GenerateParams, Logits, Model, Settings};

fn load(dir: &std::path::Path, max_batch: usize) -> Model {
    Model::load(&Settings {
        model: Some(dir.to_string_lossy().into_owned()),
        max_batch: Some(max_batch),
        cache_dir: Some(common::test_cache_dir()),
        // Batching is checked on the exact path (lower-precision activations round rows that
        // differ in their last bits apart).
        activations: moe_runtime::runconfig::Activations::F32,
        ..Settings::default()
    })
    .unwrap()
}

fn demo(max_batch: usize) -> Arc<Model> {
    Arc::new(
        Model::load(&Settings {
            max_batch: Some(max_batch),
            ..Settings::default()
        })
        .unwrap(),
    )
}

/// Everything a request produced: token ids, the text, and how it ended.
#[derive(Debug)]
struct Outcome {
    ids: Vec<u32>,
    text: String,
    end: Result<(FinishReason, Usage), String>,
}

fn collect(rx: Receiver<Event>) -> Outcome {
    let mut o = Outcome {
        ids: Vec::new(),
        text: String::new(),
        end: Err("no end event".into()),
    };
    while let Ok(ev) = rx.recv_timeout(Duration::from_secs(60)) {
        match ev {
            Event::Token(t) => {
                o.ids.push(t.id);
                o.text.push_str(&t.text);
            }
            Event::Done {
                finish,
                text,
                usage,
            } => {
                o.text.push_str(&text);
                o.end = Ok((finish, usage));
                break;
            }
            Event::Failed(m) => {
                o.end = Err(m.to_string());
                break;
            }
        }
    }
    o
}

fn submit(b: &Batcher, prompt: Vec<u32>, params: RequestParams) -> Receiver<Event> {
    b.validate(&prompt, &params).unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    b.submit(prompt, params, Box::new(tx)).unwrap();
    rx
}

#[test]
fn batched_forward_equals_solo_on_every_fixture() {
    for v in variants() {
        let model = load(&v.dir.join("model"), 3);
        let prompts: [Vec<u32>; 3] = [vec![1, 5, 9, 2], vec![7, 3], vec![4, 4, 8, 1, 6, 2, 3]];
        // Solo: prefill each prompt, then one decode step.
        let mut solo_states = Vec::new();
        let mut solo = Vec::new();
        for p in &prompts {
            let mut st = model.new_state();
            let l = model.forward(p, &mut st, Logits::All, None).unwrap();
            let d = model.forward(&[11], &mut st, Logits::Last, None).unwrap();
            solo.push((l, d));
            solo_states.push(st);
        }
        // Batched: all prefills in one pass, then all decode steps in one pass.
        let mut states: Vec<_> = prompts.iter().map(|_| model.new_state()).collect();
        let mut segs: Vec<Segment<'_>> = states
            .iter_mut()
            .zip(&prompts)
            .map(|(state, p)| Segment {
                tokens: p,
                state,
                logits: Some(Logits::All),
            })
            .collect();
        let prefill = model.forward_batch(&mut segs).unwrap();
        let next = [11u32];
        let mut segs: Vec<Segment<'_>> = states
            .iter_mut()
            .map(|state| Segment {
                tokens: &next,
                state,
                logits: Some(Logits::Last),
            })
            .collect();
        let decode = model.forward_batch(&mut segs).unwrap();
        for (i, (l, d)) in solo.iter().enumerate() {
            let pl = prefill[i].as_ref().unwrap();
            let dl = decode[i].as_ref().unwrap();
            assert_eq!(pl.len(), l.len(), "{} prompt {i}", v.name);
            let e = max_abs_diff(pl, l).max(max_abs_diff(dl, d));
            // Rounding differs with the number of rows a matmul sees: relative to the logits'
            // size (Qwen3-Next's gated norms magnify it most).
            let scale = l.iter().chain(d).fold(1.0f32, |m, x| m.max(x.abs()));
            assert!(
                e <= 1e-5 * scale,
                "{} prompt {i}: batched vs solo {e} (logits up to {scale})",
                v.name
            );
            assert_eq!(states[i].len(), solo_states[i].len());
        }
    }
}

#[test]
fn a_batched_step_fetches_each_routed_expert_once_per_layer() {
    let model = demo(4);
    let mut states: Vec<_> = (0..4).map(|_| model.new_state()).collect();
    let prompts: [[u32; 1]; 4] = [[3], [17], [42], [99]];
    let uses = |m: &Model| {
        let s = m.decoder.store().stats();
        s.hits + s.misses
    };
    let before = uses(&model);
    let mut segs: Vec<Segment<'_>> = states
        .iter_mut()
        .zip(&prompts)
        .map(|(state, p)| Segment {
            tokens: p,
            state,
            logits: Some(Logits::Last),
        })
        .collect();
    let mut trace = moe_runtime::Trace::default();
    model
        .decoder
        .forward_batch(&mut segs, Some(&mut trace))
        .unwrap();
    let fetched = uses(&model) - before;
    let (mut distinct, mut routed) = (0u64, 0u64);
    for r in trace.routing.iter().flatten() {
        let mut e = r.indices.clone();
        routed += e.len() as u64;
        e.sort_unstable();
        e.dedup();
        distinct += e.len() as u64;
    }
    assert!(
        distinct < routed,
        "some sequences share experts: {distinct} of {routed}"
    );
    assert_eq!(fetched, distinct, "one fetch per (layer, expert) per step");
}

#[test]
fn segments_without_logits_return_none_and_advance() {
    let model = demo(2);
    let mut a = model.new_state();
    let mut b = model.new_state();
    let (pa, pb) = ([1u32, 2, 3], [4u32, 5]);
    let mut segs = vec![
        Segment {
            tokens: &pa,
            state: &mut a,
            logits: None,
        },
        Segment {
            tokens: &pb,
            state: &mut b,
            logits: Some(Logits::Last),
        },
    ];
    let out = model.forward_batch(&mut segs).unwrap();
    assert!(out[0].is_none());
    assert_eq!(out[1].as_ref().unwrap().len(), model.config.vocab_size);
    assert_eq!((a.len(), b.len()), (3, 2));
}

#[test]
fn scheduler_matches_solo_generation_with_chunked_prefill_and_prefix_reuse() {
    let model = demo(4);
    let system: Vec<u32> = (1..40).map(|i| (i * 7 % 200 + 3) as u32).collect();
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|k| {
            let mut p = system.clone();
            p.extend((0..(3 + k)).map(|j| ((k * 31 + j * 13) % 250 + 2) as u32));
            p
        })
        .collect();
    let expected: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| greedy_generate(&model, p, 12))
        .collect();
    let mut cfg = BatchConfig::for_model(&model, 16);
    cfg.prefill_chunk = 7;
    let b = Batcher::start(model.clone(), cfg);
    // The first request alone, so its prefix is cached before the rest arrive.
    let first = collect(submit(&b, prompts[0].clone(), greedy_request(12)));
    assert_eq!(first.ids, expected[0]);
    let rxs: Vec<_> = prompts[1..]
        .iter()
        .map(|p| submit(&b, p.clone(), greedy_request(12)))
        .collect();
    let mut cached = 0;
    for (i, rx) in rxs.into_iter().enumerate() {
        let o = collect(rx);
        assert_eq!(o.ids, expected[i + 1], "request {}", i + 1);
        let (finish, usage) = o.end.unwrap();
        assert_eq!(finish, FinishReason::Length);
        assert_eq!(usage.completion_tokens, 12);
        assert_eq!(usage.prompt_tokens, prompts[i + 1].len());
        cached += usage.cached_tokens;
    }
    assert!(
        cached >= system.len(),
        "shared system prompt reused: {cached}"
    );
    let c = b.counters();
    assert!(
        c.cached_prompt_tokens
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    // Several sequences shared steps.
    assert!(c.steps.load(std::sync::atomic::Ordering::Relaxed) < 6 * 12 + 6 * 7);
}

#[test]
fn queue_limit_refuses_and_validation_names_the_numbers() {
    let model = demo(1);
    let mut cfg = BatchConfig::for_model(&model, 2);
    cfg.max_batch = 1;
    let b = Batcher::start(model.clone(), cfg);
    let long = greedy_request(400);
    let mut rxs = Vec::new();
    let mut refused = 0;
    for _ in 0..6 {
        let (tx, rx) = crossbeam_channel::unbounded();
        match b.submit(vec![1, 2, 3], long.clone(), Box::new(tx)) {
            Ok(()) => rxs.push(rx),
            Err(Refused::QueueFull { max_queue, .. }) => {
                assert_eq!(max_queue, 2);
                refused += 1
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused >= 3, "at most 1 running + 2 queued: {refused}");
    drop(rxs);
    let too_long = RequestParams {
        generate: GenerateParams {
            max_tokens: Some(model.max_context),
            ..Default::default()
        },
        ..Default::default()
    };
    let e = b.validate(&[1, 2, 3], &too_long).unwrap_err().to_string();
    assert!(e.contains(&format!("{}", model.max_context + 3)), "{e}");
    assert!(e.contains(&format!("{}", model.max_context)), "{e}");
    let bad = RequestParams {
        generate: GenerateParams {
            presence_penalty: 3.0,
            ..Default::default()
        },
        ..Default::default()
    };
    assert!(b.validate(&[1], &bad).is_err());
}

/// A sink that reports itself closed after `n` tokens, like a client that hung up.
struct HangUp {
    left: usize,
    tx: crossbeam_channel::Sender<Event>,
}

impl Sink for HangUp {
    fn send(&mut self, ev: Event) -> bool {
        self.left = self.left.saturating_sub(1);
        let _ = self.tx.send(ev);
        true
    }
    fn closed(&self) -> bool {
        self.left == 0
    }
}

#[test]
fn a_client_that_leaves_frees_its_slot_at_once() {
    let model = demo(1);
    let mut cfg = BatchConfig::for_model(&model, 4);
    cfg.max_batch = 1;
    let b = Batcher::start(model.clone(), cfg);
    let (tx, rx) = crossbeam_channel::unbounded();
    b.submit(
        vec![1, 2, 3],
        greedy_request(1000.min(model.max_context - 4)),
        Box::new(HangUp { left: 3, tx }),
    )
    .unwrap();
    // The next request gets the only slot and completes.
    let o = collect(submit(&b, vec![4, 5, 6], greedy_request(5)));
    assert_eq!(o.ids.len(), 5);
    let tokens = rx.try_iter().count();
    assert!(tokens <= 4, "the first request stopped early: {tokens}");
}

#[test]
fn stop_strings_cut_text_and_penalties_and_logprobs_follow_the_logits() {
    let model = demo(2);
    let prompt = model
        .encode_prompt(&moe_runtime::Prompt::Text("Hello there".into()))
        .unwrap();
    let b = Batcher::start(model.clone(), BatchConfig::for_model(&model, 4));
    let plain = collect(submit(&b, prompt.clone(), greedy_request(24)));
    assert!(plain.text.chars().count() > 6, "{:?}", plain.text);
    // Stop on a piece of the middle of the greedy text.
    let chars: Vec<char> = plain.text.chars().collect();
    let stop: String = chars[3..5].iter().collect();
    let at = plain.text.find(&stop).unwrap();
    let mut p = greedy_request(24);
    p.generate.stop = vec![stop.clone()];
    let cut = collect(submit(&b, prompt.clone(), p));
    assert_eq!(cut.text, plain.text[..at], "stop {stop:?}");
    let (finish, usage) = cut.end.unwrap();
    assert_eq!(finish, FinishReason::Stop);
    assert_eq!(usage.completion_tokens, cut.ids.len());

    // Penalties: greedy over logits minus the penalties, computed here step by step.
    let (pres, freq) = (0.7f32, 1.3f32);
    let mut st = model.new_state();
    let mut logits = model.forward(&prompt, &mut st, Logits::Last, None).unwrap();
    let mut want = Vec::new();
    let mut counts = std::collections::HashMap::new();
    for _ in 0..10 {
        let mut l = logits.clone();
        for (&t, &c) in &counts {
            l[t as usize] -= pres + freq * c as f32;
        }
        let id = moe_runtime::sampler::argmax(&l);
        want.push(id);
        *counts.entry(id).or_insert(0u32) += 1;
        logits = model.forward(&[id], &mut st, Logits::Last, None).unwrap();
    }
    let mut p = greedy_request(10);
    p.generate.presence_penalty = pres;
    p.generate.frequency_penalty = freq;
    p.logprobs = Some(3);
    let (tx, rx) = crossbeam_channel::unbounded();
    b.submit(prompt.clone(), p, Box::new(tx)).unwrap();
    let mut got = Vec::new();
    let mut first_lp = None;
    while let Ok(ev) = rx.recv_timeout(Duration::from_secs(60)) {
        match ev {
            Event::Token(t) => {
                got.push(t.id);
                if first_lp.is_none() {
                    first_lp = t.logprob;
                }
            }
            _ => break,
        }
    }
    assert_eq!(got, want);
    // Logprobs of the first token: log-softmax of the prefill logits.
    let mut st = model.new_state();
    let l = model.forward(&prompt, &mut st, Logits::Last, None).unwrap();
    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + l.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
    let (own, top) = first_lp.expect("logprobs asked for");
    assert_eq!(own.id, want[0]);
    assert!((own.logprob - (l[own.id as usize] - lse)).abs() < 1e-4);
    assert_eq!(top.len(), 3);
    assert_eq!(top[0].id, moe_runtime::sampler::argmax(&l));
    assert!(top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
}

#[test]
fn a_panicking_request_fails_alone_and_the_scheduler_keeps_serving() {
    let model = demo(4);
    let mut cfg = BatchConfig::for_model(&model, 8);
    cfg.fault_panic_token = Some(250);
    let b = Batcher::start(model.clone(), cfg);
    let good: Vec<Vec<u32>> = vec![vec![1, 2, 3, 4], vec![9, 8, 7]];
    let expected: Vec<_> = good.iter().map(|p| greedy_generate(&model, p, 8)).collect();
    let rx_bad = submit(&b, vec![5, 250, 6], greedy_request(8));
    let rxs: Vec<_> = good
        .iter()
        .map(|p| submit(&b, p.clone(), greedy_request(8)))
        .collect();
    let bad = collect(rx_bad);
    let msg = bad.end.unwrap_err();
    assert!(msg.contains("internal error"), "{msg}");
    for (rx, want) in rxs.into_iter().zip(&expected) {
        let o = collect(rx);
        assert_eq!(&o.ids, want);
        assert!(o.end.is_ok());
    }
    // Still serving afterwards.
    let again = collect(submit(&b, good[0].clone(), greedy_request(8)));
    assert_eq!(again.ids, expected[0]);
    assert_eq!(
        b.counters()
            .failed
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn shutdown_cancels_what_is_left() {
    let model = demo(1);
    let b = Batcher::start(model.clone(), BatchConfig::for_model(&model, 4));
    assert!(b.is_running());
    let rx = submit(&b, vec![1, 2, 3], greedy_request(model.max_context - 8));
    b.shutdown(Duration::from_millis(50));
    let o = collect(rx);
    assert_eq!(o.end.unwrap().0, FinishReason::Cancelled);
    let (tx, _rx) = crossbeam_channel::unbounded();
    assert_eq!(
        b.submit(vec![1], greedy_request(1), Box::new(tx)),
        Err(Refused::ShuttingDown)
    );
    assert!(!b.is_running());
}
