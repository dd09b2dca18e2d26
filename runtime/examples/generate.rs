//! Embedding the runtime: load a model and stream a greedy completion.
//!
//! `cargo run -p moe-runtime --example generate -- [MODEL_DIR_OR_HUB_ID] [PROMPT]`
//! (no arguments: the bundled demo model).

use std::io::Write;

use moe_runtime::{CancelToken, GenerateParams, Model, Prompt, Settings};

fn main() -> Result<(), moe_runtime::Error> {
    let mut args = std::env::args().skip(1);
    let settings = Settings {
        model: args.next(),
        ..Settings::default()
    };
    let prompt = args
        .next()
        .unwrap_or_else(|| "The expert store".to_string());
    let model = Model::load(&settings)?;
    let params = GenerateParams {
        max_tokens: Some(32),
        temperature: Some(0.0),
        ..GenerateParams::default()
    };
    let cancel = CancelToken::new();
    let mut generation = model.generate(&Prompt::Text(prompt), &params, cancel)?;
    let mut stdout = std::io::stdout();
    for token in generation.by_ref() {
        let token = token?;
        let _ = stdout.write_all(token.text.as_bytes());
        let _ = stdout.flush();
    }
    println!("{}", generation.flush_text()?);
    eprintln!(
        "{} tokens, finish: {:?}",
        generation.generated().len(),
        generation.finish_reason()
    );
    Ok(())
}
