//! moe-runtime: run Mixture-of-Experts language models larger than the machine.
//!
//! Opens a Hugging Face checkpoint folder as downloaded (safetensors by mmap, no conversion),
//! computes exactly what transformers computes, and reaches experts only through an expert store
//! that later grows tiers, device slots and prefetch.
//!
//! ```
//! use moe_runtime::{CancelToken, GenerateParams, Model, Prompt, Settings};
//!
//! // `model: None` loads the bundled demo model.
//! let model = Model::load(&Settings::default())?;
//! let params = GenerateParams { max_tokens: Some(8), temperature: Some(0.0), ..Default::default() };
//! let mut text = String::new();
//! for token in model.generate(&Prompt::Text("Hello".into()), &params, CancelToken::new())? {
//!     text.push_str(&token?.text);
//! }
//! # Ok::<(), moe_runtime::Error>(())
//! ```
//!
//! Module map (dependencies point downwards):
//! - [`engine`]: the public API (load, generate, cancellation).
//! - [`open`]: settings and the one opening pipeline (files, config, weights, quantization
//!   plan) that load, plan and the cache commands share.
//! - [`batch`]: continuous batching of many requests over one model (the server's scheduler).
//! - [`model`]: the decoder stack and forward pass; [`arch`]: one file per architecture.
//! - [`layers`], [`moe`], [`deltanet`]: building blocks; [`store`]: the expert store interface.
//! - [`weights`]: the only reader of model files; [`config`]: config.json; [`hub`]: model lookup.
//! - [`tokenizer`]: tokenizer.json and chat templates; [`sampler`]: next-token choice;
//!   [`sequence`]: one sequence's per-token state machine (sampling, stops, EOS, text).
//! - [`synth`]: random-weight model writer; [`demo`]: the embedded demo model.
//! - [`gguf`]: GGUF v3 container: streaming writer and header reader.
//! - [`cache`]: the persisted quantized weight cache (a GGUF file per model and quantization).
//! - [`mapguard`]: files changed under their mappings (SIGBUS guard, watcher, per-model check).

// Every unsafe operation sits in its own `unsafe` block with its SAFETY comment, even inside an
// `unsafe fn`.
#![warn(unsafe_op_in_unsafe_fn)]

pub mod arch;
pub mod backend;
pub mod batch;
pub mod cache;
pub mod calibrate;
pub mod config;
pub mod constrain;
pub mod deltanet;
pub mod demo;
pub mod dispatch;
pub mod engine;
pub mod error;
pub mod fsutil;
pub mod gguf;
pub mod hotset;
pub mod hub;
pub mod layers;
pub mod mapguard;
pub mod mem;
pub mod mla;
pub mod model;
pub mod moe;
pub mod open;
pub mod plan;
pub mod quantize;
pub mod runconfig;
pub mod sampler;
pub mod sequence;
pub mod size;
pub mod store;
pub mod synth;
pub mod tokenizer;
pub mod toolcall;
pub mod weights;

pub use dispatch::SeqState;
pub use engine::{
    plan_model, CancelToken, FinishReason, GenerateParams, Generation, Model, PlanReport, Prompt,
    Settings, TokenEvent,
};
pub use error::{Error, Result};
pub use model::{Logits, Trace};
pub use runconfig::RunConfig;
pub use tokenizer::ChatMessage;
/// Pre-quantized checkpoints (FP8, bitsandbytes): a part of the weights reader.
pub use weights::prequant;
