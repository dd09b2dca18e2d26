//! A deterministic byte-level BPE tokenizer (GPT-2 / Qwen2 style) of an exact size.
//!
//! Ids: `0..256` are the 256 byte tokens (GPT-2 `bytes_to_unicode` order), then one
//! token per merge, then the 3 special tokens `<|endoftext|>`, `<|im_start|>`,
//! `<|im_end|>`. Merges come from (1) BPE training on a small built-in English word
//! list, (2) common suffixes appended to word tokens, (3) single letters appended to
//! existing tokens, until the vocabulary is full. Every merge joins two tokens with
//! smaller ids into a token that did not exist yet, so no token is duplicated.

use std::collections::{BTreeMap, HashMap};

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::{json, Value};

use super::preset::Preset;

/// Number of byte tokens at the start of the vocabulary.
pub const BYTE_TOKENS: usize = 256;

/// Special tokens, in id order, placed at the end of the vocabulary.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Qwen2's pre-tokenizer split pattern.
const SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// ChatML template: `<|im_start|>{role}\n{content}<|im_end|>\n` per message, then
/// `<|im_start|>assistant\n` when `add_generation_prompt` is set. With `tools`, a system turn
/// lists them as JSON inside `<tools>` tags and asks for calls as `<tool_call>` JSON (the Hermes
/// form of the Qwen family); assistant `tool_calls` are written back in that form and `tool`
/// results as `<tool_response>` blocks in a user turn.
pub(crate) const CHAT_TEMPLATE: &str = r#"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- '# Tools\n\nYou may call one or more functions to help with the request. Their signatures are within <tools></tools> tags:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + tool | tojson }}
    {%- endfor %}
    {{- '\n</tools>\n\nTo call a function, write its name and arguments as one JSON object within <tool_call></tool_call> tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and tools and loop.first %}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- elif message.role == 'assistant' and message.tool_calls %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for call in message.tool_calls %}
            {%- set f = call.function if call.function is defined else call %}
            {{- '\n<tool_call>\n{"name": "' + f.name + '", "arguments": ' }}
            {%- if f.arguments is string %}
                {{- f.arguments }}
            {%- else %}
                {{- f.arguments | tojson }}
            {%- endif %}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

/// Common English words, most frequent first; the BPE training corpus.
const WORDS: &str = "the of and to a in is that for it as was with be by on not he i this are \
or his from at which but have an they you were her she there one all we their been has would \
user assistant system hello please thanks question answer \
when who will more if no out so said what up its about into than them can only other new some \
could time these two may then do first any my now such like our over man me even most made \
after also did many before must through back years where much your way well down should \
because each just those people how too little state good very make world still own see men \
work long get here between both life being under never day same another know while last might \
us great old year off come since against go came right used take three states himself few \
house use during without again place american around however home small found thought went \
say part once general high upon school every don does got united left number course war until \
always away something fact though water less public put think almost hand enough far took head \
yet government system better set told nothing night end why called didn eyes find going look \
asked later knew point next program city business give group toward young days let room \
president side social given present several order national possible rather second face per \
among form important often things looked early white case john become large big need four \
within felt along children saw best church ever least power development light thing family \
seemed interest want members mind country area others done turned although open god service \
problem certain kind different thus began door help sense means whole matter perhaps itself \
york times law human line above name example action company hands local show whether five \
history gave today either act feet across taken past quite anything seen having death week \
experience body word half really field am car words already themselves information tell \
together college shall money period held keep sure free real probably seems political cannot \
behind miss question air office making brought whose special heard major problems ago became \
federal moment study available known result street economic boy position reason change south \
board individual job society areas west close turn love community true court force full \
model expert token layer router memory weight tensor compute stream offload cache batch \
attention hidden vector matrix sparse dense kernel thread buffer memory file disk read write \
value index shape float number string function return struct impl self match print error \
result option none let mut const static type trait enum loop running code data python \
rust chat message content role tool";

/// Suffixes appended to word tokens in phase 2 (only those that exist as tokens).
const SUFFIXES: [&str; 16] = [
    "s", "ed", "ing", "er", "ly", "es", "ers", "al", "ic", "ion", "ity", "ful", "less", "able",
    "ment", "ness",
];

/// Letters appended to tokens in phase 3, most frequent first.
const LETTERS: &str = "etaoinshrdlcumwfgypbvkjxqz";

/// Non-word pre-tokens of the corpus with their counts.
const PUNCT: [(&str, u64); 28] = [
    (",", 60_000),
    (".", 55_000),
    (".\n", 20_000),
    (".\n\n", 8_000),
    ("\n", 30_000),
    ("\n\n", 15_000),
    (" (", 6_000),
    (")", 6_000),
    (");\n", 3_000),
    ("?", 4_000),
    ("!", 3_000),
    (":", 5_000),
    (";", 3_000),
    (" \"", 5_000),
    ("\"", 5_000),
    ("'s", 6_000),
    ("'t", 4_000),
    ("'re", 1_500),
    ("'ll", 1_200),
    ("   ", 4_000),
    ("       ", 2_000),
    (" =", 3_000),
    (" ==", 1_000),
    (" {\n", 2_000),
    (" }", 1_500),
    (" ->", 800),
    (" //", 800),
    ("...", 700),
];

/// GPT-2's `bytes_to_unicode`: the printable character standing for each byte, and the
/// byte order used for the first 256 ids.
pub(crate) fn bytes_to_unicode() -> ([char; 256], Vec<u8>) {
    let mut order: Vec<u8> = (b'!'..=b'~')
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut map = ['\0'; 256];
    for &b in &order {
        map[b as usize] = char::from(b);
    }
    let mut n = 0u32;
    for b in 0..=255u8 {
        if !order.contains(&b) {
            map[b as usize] = char::from_u32(256 + n).expect("valid scalar");
            order.push(b);
            n += 1;
        }
    }
    (map, order)
}

/// The generated vocabulary: tokens by id (without special tokens) and merges as id pairs.
pub(crate) struct Bpe {
    pub tokens: Vec<String>,
    pub merges: Vec<(u32, u32)>,
}

struct Builder {
    tokens: Vec<String>,
    ids: HashMap<String, u32>,
    merges: Vec<(u32, u32)>,
    target: usize,
}

impl Builder {
    fn full(&self) -> bool {
        self.tokens.len() >= self.target
    }

    /// Adds merge (a, b) if the result is new; returns the new id.
    fn try_merge(&mut self, a: u32, b: u32) -> Option<u32> {
        if self.full() {
            return None;
        }
        let s = format!("{}{}", self.tokens[a as usize], self.tokens[b as usize]);
        if self.ids.contains_key(&s) {
            return None;
        }
        let id = self.tokens.len() as u32;
        self.ids.insert(s.clone(), id);
        self.tokens.push(s);
        self.merges.push((a, b));
        Some(id)
    }
}

/// Builds a vocabulary of exactly `model_tokens` tokens (bytes + merges).
pub(crate) fn build_bpe(model_tokens: usize) -> Bpe {
    assert!(
        model_tokens >= BYTE_TOKENS,
        "vocabulary smaller than the byte alphabet"
    );
    let (map, order) = bytes_to_unicode();
    let mut byte_id = [0u32; 256];
    let mut b = Builder {
        tokens: Vec::new(),
        ids: HashMap::new(),
        merges: Vec::new(),
        target: model_tokens,
    };
    for (id, &byte) in order.iter().enumerate() {
        byte_id[byte as usize] = id as u32;
        let s = map[byte as usize].to_string();
        b.ids.insert(s.clone(), id as u32);
        b.tokens.push(s);
    }

    // Phase 1: BPE training on the word list (Zipf counts; variants with/without a
    // leading space and capitalized).
    let mut corpus: Vec<(Vec<u32>, u64)> = Vec::new();
    let mut add = |text: &str, count: u64| {
        corpus.push((text.bytes().map(|c| byte_id[c as usize]).collect(), count));
    };
    for (rank, w) in WORDS.split_whitespace().enumerate() {
        let base = 1_000_000 / (rank as u64 + 10);
        let cap: String = w[..1].to_uppercase() + &w[1..];
        add(&format!(" {w}"), base);
        add(&format!(" {cap}"), base / 8 + 1);
        add(w, base / 16 + 1);
        add(&cap, base / 16 + 1);
    }
    for (p, count) in PUNCT {
        add(p, count);
    }
    while !b.full() {
        let mut counts: HashMap<(u32, u32), u64> = HashMap::new();
        for (syms, count) in &corpus {
            for w in syms.windows(2) {
                *counts.entry((w[0], w[1])).or_default() += count;
            }
        }
        // Highest count; ties by smallest ids, so the order of the HashMap never matters.
        let best = counts
            .into_iter()
            .max_by(|x, y| x.1.cmp(&y.1).then(y.0.cmp(&x.0)));
        let Some(((l, r), _)) = best else { break };
        let joined = format!("{}{}", b.tokens[l as usize], b.tokens[r as usize]);
        let new = match b.ids.get(&joined) {
            // The same string was already built from another pair: no second merge (it
            // would duplicate a token); the corpus just treats the pair as that token.
            Some(&existing) => existing,
            None => b.try_merge(l, r).expect("not full and new"),
        };
        for (syms, _) in &mut corpus {
            let mut out = Vec::with_capacity(syms.len());
            let mut i = 0;
            while i < syms.len() {
                if i + 1 < syms.len() && syms[i] == l && syms[i + 1] == r {
                    out.push(new);
                    i += 2;
                } else {
                    out.push(syms[i]);
                    i += 1;
                }
            }
            *syms = out;
        }
    }

    // Phase 2: word tokens + common suffixes.
    let suffix_ids: Vec<u32> = SUFFIXES
        .iter()
        .filter_map(|s| b.ids.get(*s).copied())
        .collect();
    let words_end = b.tokens.len();
    for w in BYTE_TOKENS..words_end {
        let t = &b.tokens[w];
        let is_word = t.starts_with('\u{120}')
            && t.chars().count() >= 4
            && t.chars().skip(1).all(|c| c.is_ascii_lowercase());
        if !is_word {
            continue;
        }
        for &s in &suffix_ids {
            b.try_merge(w as u32, s);
        }
    }

    // Phase 3: append single letters to existing tokens until full (the list grows as
    // it is walked, so it never runs dry).
    let letter_ids: Vec<u32> = LETTERS.bytes().map(|c| byte_id[c as usize]).collect();
    let mut t = BYTE_TOKENS;
    while !b.full() {
        for &l in &letter_ids {
            b.try_merge(t as u32, l);
        }
        t += 1;
    }
    Bpe {
        tokens: b.tokens,
        merges: b.merges,
    }
}

struct VocabMap<'a>(&'a [String]);

impl Serialize for VocabMap<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (id, tok) in self.0.iter().enumerate() {
            m.serialize_entry(tok, &id)?;
        }
        m.end()
    }
}

#[derive(Serialize)]
struct AddedToken<'a> {
    id: u32,
    content: &'a str,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
    normalized: bool,
    special: bool,
}

#[derive(Serialize)]
struct BpeModel<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    dropout: Option<f32>,
    unk_token: Option<&'a str>,
    continuing_subword_prefix: &'static str,
    end_of_word_suffix: &'static str,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
    vocab: VocabMap<'a>,
    merges: Vec<String>,
}

#[derive(Serialize)]
struct TokenizerJson<'a> {
    version: &'static str,
    truncation: Option<()>,
    padding: Option<()>,
    added_tokens: Vec<AddedToken<'a>>,
    normalizer: Value,
    pre_tokenizer: Value,
    post_processor: Value,
    decoder: Value,
    model: BpeModel<'a>,
}

fn byte_level() -> Value {
    // Keys in sorted order so the output is the same with or without `preserve_order`.
    json!({"add_prefix_space": false, "trim_offsets": false, "type": "ByteLevel", "use_regex": false})
}

/// `tokenizer.json` for a vocabulary of `p.vocab_size` ids.
pub(crate) fn tokenizer_json(p: &Preset) -> Vec<u8> {
    let bpe = build_bpe(p.vocab_size - SPECIAL_TOKENS.len());
    let merges = bpe
        .merges
        .iter()
        .map(|&(a, b)| format!("{} {}", bpe.tokens[a as usize], bpe.tokens[b as usize]))
        .collect();
    let first_special = bpe.tokens.len() as u32;
    let added_tokens = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, content)| AddedToken {
            id: first_special + i as u32,
            content,
            single_word: false,
            lstrip: false,
            rstrip: false,
            normalized: false,
            special: true,
        })
        .collect();
    let doc = TokenizerJson {
        version: "1.0",
        truncation: None,
        padding: None,
        added_tokens,
        normalizer: json!({"type": "NFC"}),
        pre_tokenizer: json!({
            "pretokenizers": [
                {"behavior": "Isolated", "invert": false, "pattern": {"Regex": SPLIT_REGEX}, "type": "Split"},
                byte_level(),
            ],
            "type": "Sequence",
        }),
        post_processor: byte_level(),
        decoder: byte_level(),
        model: BpeModel {
            kind: "BPE",
            dropout: None,
            unk_token: None,
            continuing_subword_prefix: "",
            end_of_word_suffix: "",
            fuse_unk: false,
            byte_fallback: false,
            ignore_merges: false,
            vocab: VocabMap(&bpe.tokens),
            merges,
        },
    };
    let mut s = serde_json::to_string_pretty(&doc).expect("tokenizer JSON cannot fail");
    s.push('\n');
    s.into_bytes()
}

/// `tokenizer_config.json` (Qwen2 style, ChatML template).
pub(crate) fn tokenizer_config_json(p: &Preset) -> Vec<u8> {
    let first_special = p.vocab_size - SPECIAL_TOKENS.len();
    let decoder: BTreeMap<String, Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, content)| {
            let v = json!({"content": content, "lstrip": false, "normalized": false,
                "rstrip": false, "single_word": false, "special": true});
            ((first_special + i).to_string(), v)
        })
        .collect();
    let mut m: BTreeMap<&str, Value> = BTreeMap::new();
    m.insert("add_bos_token", json!(false));
    m.insert("add_prefix_space", json!(false));
    m.insert(
        "added_tokens_decoder",
        serde_json::to_value(&decoder).expect("plain map"),
    );
    m.insert(
        "additional_special_tokens",
        json!(["<|im_start|>", "<|im_end|>"]),
    );
    m.insert("bos_token", Value::Null);
    m.insert("chat_template", json!(CHAT_TEMPLATE));
    m.insert("clean_up_tokenization_spaces", json!(false));
    m.insert("eos_token", json!("<|im_end|>"));
    m.insert("errors", json!("replace"));
    m.insert("model_max_length", json!(p.max_position_embeddings));
    m.insert("pad_token", json!("<|endoftext|>"));
    m.insert("split_special_tokens", json!(false));
    m.insert("tokenizer_class", json!("Qwen2Tokenizer"));
    m.insert("unk_token", Value::Null);
    let mut s = serde_json::to_string_pretty(&m).expect("plain map");
    s.push('\n');
    s.into_bytes()
}
