use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::preset::Init;
use super::*;

fn opts(preset: &str, out: &Path) -> SynthOptions {
    SynthOptions {
        arch: "qwen3_moe".into(),
        preset: preset.into(),
        layers: None,
        seed: 0,
        out: out.to_path_buf(),
        shard_bytes: None,
        overwrite: false,
    }
}

fn run(o: &SynthOptions) -> SynthReport {
    let mut last = (0, 0);
    let report = synth(o, &mut |done, total| {
        assert!(done >= last.0 && done <= total);
        last = (done, total);
    })
    .expect("synth");
    assert_eq!(
        last,
        (report.weight_bytes, report.weight_bytes),
        "progress ends at total"
    );
    report
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

/// Tensor name -> (shape, data_offsets).
type Header = BTreeMap<String, (Vec<u64>, [u64; 2])>;

/// Parsed safetensors header and the data region length.
fn parse_shard(path: &Path) -> (Header, u64) {
    let bytes = fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!((8 + n) % 8, 0, "data must start 8-byte aligned");
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let obj = header.as_object().unwrap();
    assert_eq!(obj["__metadata__"], serde_json::json!({"format": "pt"}));
    let mut out = BTreeMap::new();
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        assert_eq!(info["dtype"], "BF16");
        let shape = info["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        let off = info["data_offsets"].as_array().unwrap();
        out.insert(
            name.clone(),
            (shape, [off[0].as_u64().unwrap(), off[1].as_u64().unwrap()]),
        );
    }
    (out, (bytes.len() - 8 - n) as u64)
}

/// Expected shapes computed from config.json alone (independent of the preset code).
fn expected_shapes(cfg: &Value) -> BTreeMap<String, Vec<u64>> {
    let g = |k: &str| cfg[k].as_u64().unwrap_or_else(|| panic!("config.{k}"));
    let (h, v, hd, nh, nkv) = (
        g("hidden_size"),
        g("vocab_size"),
        g("head_dim"),
        g("num_attention_heads"),
        g("num_key_value_heads"),
    );
    let (e, i, layers) = (
        g("num_experts"),
        g("moe_intermediate_size"),
        g("num_hidden_layers"),
    );
    let mut m = BTreeMap::new();
    m.insert("model.embed_tokens.weight".to_string(), vec![v, h]);
    m.insert("model.norm.weight".to_string(), vec![h]);
    m.insert("lm_head.weight".to_string(), vec![v, h]);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        m.insert(format!("{p}.input_layernorm.weight"), vec![h]);
        m.insert(format!("{p}.post_attention_layernorm.weight"), vec![h]);
        m.insert(format!("{p}.self_attn.q_proj.weight"), vec![nh * hd, h]);
        m.insert(format!("{p}.self_attn.k_proj.weight"), vec![nkv * hd, h]);
        m.insert(format!("{p}.self_attn.v_proj.weight"), vec![nkv * hd, h]);
        m.insert(format!("{p}.self_attn.o_proj.weight"), vec![h, nh * hd]);
        m.insert(format!("{p}.self_attn.q_norm.weight"), vec![hd]);
        m.insert(format!("{p}.self_attn.k_norm.weight"), vec![hd]);
        m.insert(format!("{p}.mlp.gate.weight"), vec![e, h]);
        for x in 0..e {
            m.insert(format!("{p}.mlp.experts.{x}.gate_proj.weight"), vec![i, h]);
            m.insert(format!("{p}.mlp.experts.{x}.up_proj.weight"), vec![i, h]);
            m.insert(format!("{p}.mlp.experts.{x}.down_proj.weight"), vec![h, i]);
        }
    }
    m
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn all_bytes(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    file_names(dir)
        .into_iter()
        .map(|n| (n.clone(), fs::read(dir.join(&n)).unwrap()))
        .collect()
}

#[test]
fn demo_layout_is_hub_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let report = run(&opts("demo", &dir));
    let p = preset("demo").unwrap();
    assert_eq!(report.params, p.param_count());
    assert_eq!(report.weight_bytes, 2 * report.params);

    let names = file_names(&dir);
    let shards: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    assert!(shards.len() >= 2, "demo has at least two shards: {names:?}");
    for (i, s) in shards.iter().enumerate() {
        assert_eq!(
            **s,
            format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len())
        );
    }
    let mut expected_files: Vec<String> = shards.iter().map(|s| s.to_string()).collect();
    expected_files.extend(
        [
            "config.json",
            "generation_config.json",
            "model.safetensors.index.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
        .map(String::from),
    );
    expected_files.sort();
    assert_eq!(names, expected_files);
    assert_eq!(report.files.len(), names.len());

    let cfg = read_json(&dir.join("config.json"));
    assert_eq!(
        cfg["architectures"],
        serde_json::json!(["Qwen3MoeForCausalLM"])
    );
    assert_eq!(cfg["model_type"], "qwen3_moe");
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    assert_eq!(cfg["tie_word_embeddings"], false);
    assert_eq!(cfg["norm_topk_prob"], true);
    assert_eq!(cfg["rope_scaling"], Value::Null);
    assert_eq!(cfg["eos_token_id"], p.vocab_size as u64 - 1);
    let want = expected_shapes(&cfg);
    assert_eq!(report.tensors, want.len());

    let index = read_json(&dir.join("model.safetensors.index.json"));
    let weight_map = index["weight_map"].as_object().unwrap();
    assert_eq!(
        index["metadata"]["total_size"].as_u64().unwrap(),
        report.weight_bytes
    );
    assert_eq!(weight_map.len(), want.len());

    let mut seen = BTreeMap::new();
    let mut total = 0u64;
    for s in &shards {
        let (tensors, data_len) = parse_shard(&dir.join(s));
        // data_offsets tile [0, data_len) exactly.
        let mut ranges: Vec<[u64; 2]> = tensors.values().map(|t| t.1).collect();
        ranges.sort();
        let mut at = 0;
        for r in &ranges {
            assert_eq!(r[0], at, "{s}: gap or overlap");
            assert!(r[1] > r[0]);
            at = r[1];
        }
        assert_eq!(at, data_len, "{s}: data region fully used");
        total += data_len;
        for (name, (shape, off)) in tensors {
            assert_eq!(
                off[1] - off[0],
                2 * shape.iter().product::<u64>(),
                "{name}: bf16 size"
            );
            assert_eq!(weight_map[&name], **s, "{name}: index points to its shard");
            assert!(seen.insert(name, shape).is_none(), "tensor in two shards");
        }
    }
    assert_eq!(total, report.weight_bytes);
    assert_eq!(seen, want, "names and shapes as the Hub's Qwen3-MoE");

    let gen = read_json(&dir.join("generation_config.json"));
    let ids = p.special_ids();
    assert_eq!(
        gen["eos_token_id"],
        serde_json::json!([ids.im_end, ids.endoftext])
    );
    assert_eq!(gen["do_sample"], true);
    assert_eq!(gen["top_k"], 40);

    let tc = read_json(&dir.join("tokenizer_config.json"));
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(tc["bos_token"], Value::Null);
    assert_eq!(tc["pad_token"], "<|endoftext|>");
    assert_eq!(
        tc["added_tokens_decoder"][ids.im_end.to_string()]["content"],
        "<|im_end|>"
    );
    assert!(tc["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>assistant\\n"));
}

#[test]
fn weights_have_intended_statistics() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    run(&opts("demo", &dir));
    let index = read_json(&dir.join("model.safetensors.index.json"));
    let load = |name: &str| -> Vec<f32> {
        let file = index["weight_map"][name].as_str().unwrap();
        let (tensors, _) = parse_shard(&dir.join(file));
        let bytes = fs::read(dir.join(file)).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let [a, b] = tensors[name].1;
        bytes[8 + n + a as usize..8 + n + b as usize]
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()
    };
    let stats = |v: &[f32]| {
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    };
    assert!(load("model.layers.0.input_layernorm.weight")
        .iter()
        .all(|&x| x == 1.0));
    assert!(load("model.layers.3.self_attn.k_norm.weight")
        .iter()
        .all(|&x| x == 1.0));
    let h = 64f64;
    for (name, std) in [
        (
            "model.layers.1.mlp.experts.5.up_proj.weight",
            1.0 / h.sqrt(),
        ),
        ("model.layers.2.self_attn.q_proj.weight", 1.0 / h.sqrt()),
        ("model.layers.0.mlp.gate.weight", 3.0 / h.sqrt()),
        ("model.embed_tokens.weight", 0.04),
        ("lm_head.weight", 2.0 / h.sqrt()),
    ] {
        let v = load(name);
        let (m, s) = stats(&v);
        assert!(m.abs() < 0.1 * std, "{name}: mean {m}");
        assert!((s / std - 1.0).abs() < 0.1, "{name}: std {s} want {std}");
        let distinct: HashSet<u32> = v.iter().map(|x| x.to_bits()).collect();
        assert!(distinct.len() > 50, "{name}: values vary");
    }
    // Tensors differ from each other.
    assert_ne!(
        load("model.layers.0.mlp.experts.0.gate_proj.weight"),
        load("model.layers.0.mlp.experts.1.gate_proj.weight")
    );
}

#[test]
fn bf16_rounding_matches_half() {
    let mut one = [0u8; 2];
    super::writer::fill(0, Init::Ones, 0, &mut one);
    assert_eq!(one, half::bf16::from_f32(1.0).to_le_bytes());
    for x in [
        0.0f32,
        1.0,
        -1.0,
        0.02,
        -0.012_345_6,
        2.5,
        1e-5,
        65504.0,
        0.333_333_34,
        1.003_906_2,
    ] {
        assert_eq!(
            super::writer::bf16_bits(x),
            half::bf16::from_f32(x).to_bits(),
            "{x}"
        );
    }
    // Chunk boundaries do not change values: a fill from offset k equals the tail of a fill from 0.
    let mut whole = vec![0u8; 2 * 1000];
    super::writer::fill(7, Init::Normal { std: 1.0 }, 0, &mut whole);
    let mut tail = vec![0u8; 2 * 400];
    super::writer::fill(7, Init::Normal { std: 1.0 }, 600, &mut tail);
    assert_eq!(&whole[1200..], &tail[..]);
}

#[test]
fn same_seed_same_bytes_and_thread_count_does_not_matter() {
    let tmp = tempfile::tempdir().unwrap();
    let mut outs = Vec::new();
    for (threads, seed, tag) in [(1, 5, "a"), (2, 5, "b"), (2, 5, "c"), (2, 6, "d")] {
        let mut o = opts("demo", &tmp.path().join(tag));
        o.seed = seed;
        // Small shards and a 2-layer model: several shards and many chunks per batch.
        o.layers = Some(2);
        o.shard_bytes = Some(200_000);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| run(&o));
        outs.push(all_bytes(&o.out));
    }
    assert!(outs[0].len() > 6, "several shards");
    assert_eq!(outs[0], outs[1], "1 vs 2 threads");
    assert_eq!(outs[1], outs[2], "same seed twice");
    assert_ne!(outs[2], outs[3], "different seed differs");
    // Non-weight files do not depend on the seed.
    assert_eq!(outs[2]["tokenizer.json"], outs[3]["tokenizer.json"]);
    assert_eq!(outs[2]["config.json"], outs[3]["config.json"]);
}

#[test]
fn large_tensors_span_many_chunks_deterministically() {
    // One tensor larger than a chunk, generated by pools of 1 and 2 threads.
    let spec = super::preset::TensorSpec {
        name: "x".into(),
        shape: vec![3, super::writer::CHUNK_ELEMS + 17],
        init: Init::Normal { std: 0.02 },
        dtype: super::preset::Dtype::BF16,
    };
    let specs = vec![spec];
    let keys = vec![super::writer::tensor_key(1, "x")];
    let layout = super::writer::shard_layout(&specs, &[0]);
    let tmp = tempfile::tempdir().unwrap();
    let mut got = Vec::new();
    for threads in [1, 2] {
        let dir = tmp.path().join(threads.to_string());
        fs::create_dir(&dir).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut seen = 0;
        let path = pool
            .install(|| {
                super::writer::write_shard(
                    &dir,
                    "t.safetensors",
                    &specs,
                    &keys,
                    &layout,
                    &mut |n| seen += n,
                )
            })
            .unwrap();
        assert_eq!(seen, layout.data_bytes);
        let bytes = fs::read(path).unwrap();
        assert_eq!(
            bytes.len() as u64,
            layout.header.len() as u64 + layout.data_bytes
        );
        got.push(bytes);
    }
    assert_eq!(got[0], got[1]);
    let mut direct = vec![0u8; layout.data_bytes as usize];
    super::writer::fill(keys[0], specs[0].init, 0, &mut direct);
    assert_eq!(&got[0][layout.header.len()..], &direct[..]);
}

#[test]
fn tokenizer_is_exact_size_with_valid_merges() {
    for name in ["demo", "mini"] {
        let p = preset(name).unwrap();
        let tok: Value = serde_json::from_slice(&super::tokenizer::tokenizer_json(&p)).unwrap();
        let vocab = tok["model"]["vocab"].as_object().unwrap();
        let added = tok["added_tokens"].as_array().unwrap();
        assert_eq!(vocab.len() + added.len(), p.vocab_size, "{name}");
        let mut by_id: Vec<Option<&str>> = vec![None; p.vocab_size];
        for (t, id) in vocab {
            let id = id.as_u64().unwrap() as usize;
            assert!(by_id[id].replace(t).is_none(), "duplicate id {id}");
        }
        for (i, a) in added.iter().enumerate() {
            let id = a["id"].as_u64().unwrap() as usize;
            assert_eq!(id, p.vocab_size - 3 + i);
            assert_eq!(a["content"], super::tokenizer::SPECIAL_TOKENS[i]);
            assert_eq!(a["special"], true);
            assert!(by_id[id].replace(a["content"].as_str().unwrap()).is_none());
        }
        assert!(
            by_id.iter().all(Option::is_some),
            "ids 0..vocab_size all used"
        );
        // Byte tokens: GPT-2 bytes_to_unicode, one per byte.
        let (map, order) = super::tokenizer::bytes_to_unicode();
        for (id, b) in order.iter().enumerate() {
            assert_eq!(by_id[id].unwrap(), map[*b as usize].to_string());
        }
        let merges = tok["model"]["merges"].as_array().unwrap();
        assert_eq!(merges.len(), p.vocab_size - 3 - 256);
        let ids: HashMap<&str, u64> = vocab
            .iter()
            .map(|(t, i)| (t.as_str(), i.as_u64().unwrap()))
            .collect();
        for (k, m) in merges.iter().enumerate() {
            let (a, b) = m.as_str().unwrap().split_once(' ').unwrap();
            let joined = format!("{a}{b}");
            let (ia, ib, ij) = (ids[a], ids[b], ids[joined.as_str()]);
            assert_eq!(ij, 256 + k as u64, "merge {k} creates the next id");
            assert!(ia < ij && ib < ij, "merge parts exist earlier");
        }
        assert_eq!(tok["model"]["type"], "BPE");
        assert_eq!(tok["model"]["unk_token"], Value::Null);
        assert_eq!(tok["decoder"]["type"], "ByteLevel");
    }
}

#[test]
fn preset_sizes() {
    let b = preset("bench-m").unwrap();
    assert_eq!(b.param_count(), 7_835_066_368);
    assert_eq!(b.weight_bytes(), 15_670_132_736);
    let sum: u64 = b.tensors().iter().map(|t| t.numel()).sum();
    assert_eq!(sum, b.param_count());
    let mut b4 = b.clone();
    b4.num_hidden_layers = 4;
    assert!((2_700_000_000..2_900_000_000).contains(&b4.weight_bytes()));
    let mini = preset("mini").unwrap();
    assert!((250_000_000..350_000_000).contains(&mini.weight_bytes()));
    assert!(preset("demo").unwrap().weight_bytes() < 2_000_000);
    for n in preset_names() {
        preset(n).unwrap().validate().unwrap();
    }
    // Hub sharding of bench-m at 5 GB: 4 shards, none over the limit.
    let specs = b.tensors();
    let shards = super::writer::plan_shards(&specs, HUB_SHARD_BYTES);
    assert_eq!(shards.len(), 4);
    for s in &shards {
        assert!(s.iter().map(|&i| specs[i].size_bytes()).sum::<u64>() <= HUB_SHARD_BYTES);
    }
}

#[test]
fn errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = opts("demo", &tmp.path().join("x"));
    o.arch = "llama".into();
    let e = synth(&o, &mut |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("llama") && e.contains("qwen3_moe"), "{e}");
    let mut o = opts("huge", &tmp.path().join("x"));
    let e = synth(&o, &mut |_, _| {}).unwrap_err().to_string();
    assert!(
        e.contains("huge") && e.contains("demo") && e.contains("bench-m") && e.contains("mini"),
        "{e}"
    );
    o.preset = "demo".into();
    o.layers = Some(0);
    assert!(matches!(
        synth(&o, &mut |_, _| {}),
        Err(SynthError::Invalid(_))
    ));
    o.layers = None;
    o.shard_bytes = Some(0);
    assert!(matches!(
        synth(&o, &mut |_, _| {}),
        Err(SynthError::Invalid(_))
    ));
}

#[test]
fn refuses_non_empty_folder_unless_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("notes.txt"), b"keep me").unwrap();
    // Stale weights from an earlier model with another shard count.
    fs::write(dir.join("model-00001-of-00009.safetensors"), b"old").unwrap();
    fs::write(dir.join("model.safetensors"), b"old").unwrap();
    fs::write(dir.join("config.json.tmp-999999"), b"interrupted").unwrap();
    fs::write(
        dir.join("model-00002-of-00009.safetensors.tmp-999999"),
        b"interrupted",
    )
    .unwrap();
    fs::write(dir.join("mine.tmp-1"), b"not ours").unwrap();
    let mut o = opts("demo", &dir);
    let e = synth(&o, &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, SynthError::NotEmpty(_)), "{e}");
    assert!(e.to_string().contains("overwrite"));
    o.overwrite = true;
    o.layers = Some(1);
    let r = run(&o);
    let names = file_names(&dir);
    assert!(names.contains(&"notes.txt".to_string()), "other files kept");
    assert!(
        names.contains(&"mine.tmp-1".to_string()),
        "other files kept"
    );
    assert!(
        !names
            .iter()
            .any(|n| n.contains("of-00009") || n == "model.safetensors" || n.contains(".tmp-9")),
        "{names:?}"
    );
    assert_eq!(names.len(), r.files.len() + 2);
    let written: Vec<PathBuf> = r
        .files
        .iter()
        .map(|f| f.file_name().unwrap().into())
        .collect();
    assert!(written
        .iter()
        .all(|f| names.contains(&f.to_string_lossy().into_owned())));
}

/// Generation speed of one thread (run with `--release -- --ignored --nocapture`).
#[test]
#[ignore]
fn fill_throughput() {
    let mut buf = vec![0u8; 64 << 20];
    let t0 = std::time::Instant::now();
    for i in 0..8 {
        super::writer::fill(
            i,
            Init::Normal { std: 0.02 },
            i * 1000,
            std::hint::black_box(&mut buf),
        );
        std::hint::black_box(&buf);
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "fill: {:.0} MB/s on one thread",
        8.0 * buf.len() as f64 / 1e6 / secs
    );
}

/// HF tensor bytes by name, read from the shards through the index.
fn hf_tensor_bytes(dir: &Path) -> BTreeMap<String, (Vec<u64>, Vec<u8>)> {
    let index = read_json(&dir.join("model.safetensors.index.json"));
    let mut out = BTreeMap::new();
    let shards: HashSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    for shard in shards {
        let path = dir.join(shard);
        let (header, data_len) = parse_shard(&path);
        let bytes = fs::read(&path).unwrap();
        let data = &bytes[bytes.len() - data_len as usize..];
        for (name, (shape, [a, b])) in header {
            out.insert(name, (shape, data[a as usize..b as usize].to_vec()));
        }
    }
    out
}

fn widen_bf16(b: &[u8]) -> Vec<u8> {
    b.chunks_exact(2)
        .flat_map(|c| {
            half::bf16::from_le_bytes([c[0], c[1]])
                .to_f32()
                .to_le_bytes()
        })
        .collect()
}

#[test]
fn gguf_twin_matches_hf_files() {
    use crate::gguf::{GgmlType, GgufFile, Value as GV};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let o = SynthOptions {
        seed: 7,
        ..opts("demo", &dir)
    };
    run(&o);
    let path = tmp.path().join("twin").join("demo.gguf");
    let mut last = (0, 0);
    let report = synth_gguf(&o, &path, &mut |d, t| {
        assert!(d >= last.0 && d <= t);
        last = (d, t);
    })
    .unwrap();
    assert_eq!(last, (report.weight_bytes, report.weight_bytes));
    assert_eq!(report.files, vec![path.clone()]);
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.alignment, 32);

    // Metadata, checked against the HF side files.
    let cfg = read_json(&dir.join("config.json"));
    let tok = read_json(&dir.join("tokenizer.json"));
    let tok_cfg = read_json(&dir.join("tokenizer_config.json"));
    let c = |k: &str| cfg[k].as_u64().unwrap();
    let u = |k: &str| {
        f.get(k)
            .unwrap_or_else(|| panic!("{k}"))
            .as_u64()
            .unwrap_or_else(|| panic!("{k} integer"))
    };
    let s = |k: &str| {
        f.get(k)
            .and_then(GV::as_str)
            .unwrap_or_else(|| panic!("{k}"))
    };
    assert_eq!(s("general.architecture"), "qwen3moe");
    assert_eq!(s("general.name"), "synth-demo");
    for (gk, hk) in [
        ("block_count", "num_hidden_layers"),
        ("context_length", "max_position_embeddings"),
        ("embedding_length", "hidden_size"),
        ("feed_forward_length", "intermediate_size"),
        ("attention.head_count", "num_attention_heads"),
        ("attention.head_count_kv", "num_key_value_heads"),
        ("attention.key_length", "head_dim"),
        ("attention.value_length", "head_dim"),
        ("expert_count", "num_experts"),
        ("expert_used_count", "num_experts_per_tok"),
        ("expert_feed_forward_length", "moe_intermediate_size"),
    ] {
        let key = format!("qwen3moe.{gk}");
        assert!(matches!(f.get(&key), Some(GV::U32(_))), "{key} is u32");
        assert_eq!(u(&key), c(hk), "{key}");
    }
    assert_eq!(
        f.get("qwen3moe.rope.freq_base"),
        Some(&GV::F32(cfg["rope_theta"].as_f64().unwrap() as f32))
    );
    assert_eq!(
        f.get("qwen3moe.attention.layer_norm_rms_epsilon"),
        Some(&GV::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32))
    );
    assert_eq!(s("tokenizer.ggml.model"), "gpt2");
    assert_eq!(s("tokenizer.ggml.pre"), "qwen2");
    assert_eq!(
        s("tokenizer.chat_template"),
        tok_cfg["chat_template"].as_str().unwrap()
    );
    assert_eq!(
        f.get("tokenizer.ggml.add_bos_token"),
        Some(&GV::Bool(false))
    );
    let vocab = tok["model"]["vocab"].as_object().unwrap();
    let added = tok["added_tokens"].as_array().unwrap();
    let mut want_tokens = vec![String::new(); vocab.len() + added.len()];
    for (t, id) in vocab {
        want_tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    for a in added {
        want_tokens[a["id"].as_u64().unwrap() as usize] = a["content"].as_str().unwrap().into();
    }
    assert_eq!(want_tokens.len() as u64, c("vocab_size"));
    let tokens: Vec<&str> = f
        .get("tokenizer.ggml.tokens")
        .and_then(GV::as_array)
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(tokens, want_tokens);
    let types = f
        .get("tokenizer.ggml.token_type")
        .unwrap()
        .as_array()
        .unwrap();
    let id_of = |t: &str| want_tokens.iter().position(|x| x == t).unwrap() as u64;
    for (i, t) in types.iter().enumerate() {
        let special = added.iter().any(|a| a["id"].as_u64() == Some(i as u64));
        assert_eq!(*t, GV::I32(if special { 3 } else { 1 }), "token {i}");
    }
    let merges: Vec<&str> = f
        .get("tokenizer.ggml.merges")
        .and_then(GV::as_array)
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let want_merges: Vec<&str> = tok["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert_eq!(merges, want_merges);
    assert_eq!(u("tokenizer.ggml.eos_token_id"), id_of("<|im_end|>"));
    assert_eq!(u("tokenizer.ggml.eos_token_id"), c("eos_token_id"));
    assert_eq!(u("tokenizer.ggml.bos_token_id"), c("bos_token_id"));
    assert_eq!(u("tokenizer.ggml.padding_token_id"), id_of("<|endoftext|>"));

    // Tensors: names, dims (torch shape reversed, experts stacked outermost), types,
    // and every byte against the HF files.
    let hf = hf_tensor_bytes(&dir);
    let layers = c("num_hidden_layers");
    let experts = c("num_experts");
    let mut want: Vec<(String, Vec<String>, bool)> = vec![(
        "token_embd.weight".into(),
        vec!["model.embed_tokens.weight".into()],
        false,
    )];
    for l in 0..layers {
        let m = |s: &str| vec![format!("model.layers.{l}.{s}.weight")];
        for (g, h, f32) in [
            ("attn_norm", "input_layernorm", true),
            ("attn_q", "self_attn.q_proj", false),
            ("attn_k", "self_attn.k_proj", false),
            ("attn_v", "self_attn.v_proj", false),
            ("attn_output", "self_attn.o_proj", false),
            ("attn_q_norm", "self_attn.q_norm", true),
            ("attn_k_norm", "self_attn.k_norm", true),
            ("ffn_norm", "post_attention_layernorm", true),
            ("ffn_gate_inp", "mlp.gate", true),
        ] {
            want.push((format!("blk.{l}.{g}.weight"), m(h), f32));
        }
        for (g, h) in [
            ("ffn_gate_exps", "gate_proj"),
            ("ffn_up_exps", "up_proj"),
            ("ffn_down_exps", "down_proj"),
        ] {
            let srcs = (0..experts)
                .map(|e| format!("model.layers.{l}.mlp.experts.{e}.{h}.weight"))
                .collect();
            want.push((format!("blk.{l}.{g}.weight"), srcs, false));
        }
    }
    want.push((
        "output_norm.weight".into(),
        vec!["model.norm.weight".into()],
        true,
    ));
    want.push(("output.weight".into(), vec!["lm_head.weight".into()], false));
    assert_eq!(f.tensors.len(), want.len());
    let covered: HashSet<&String> = want.iter().flat_map(|w| &w.1).collect();
    assert_eq!(covered.len(), hf.len(), "every HF tensor appears once");
    let mut data_bytes = 0;
    for (name, srcs, f32) in &want {
        let t = f.tensor(name).unwrap_or_else(|| panic!("tensor {name}"));
        let mut dims: Vec<u64> = hf[&srcs[0]].0.iter().rev().copied().collect();
        if srcs.len() > 1 {
            dims.push(srcs.len() as u64);
        }
        assert_eq!(t.dims, dims, "{name}");
        assert_eq!(
            t.ty,
            if *f32 { GgmlType::F32 } else { GgmlType::BF16 },
            "{name}"
        );
        assert_eq!(t.offset % 32, 0);
        let got = f.read_tensor(name).unwrap();
        let mut expect = Vec::new();
        for s in srcs {
            let b = &hf[s].1;
            expect.extend_from_slice(&if *f32 { widen_bf16(b) } else { b.clone() });
        }
        assert!(got == expect, "{name}: bytes differ from the HF twin");
        data_bytes += t.size;
    }
    assert_eq!(report.weight_bytes, data_bytes);
    // Spot checks of the layout by hand: dims of a stacked tensor, expert 5's slice.
    let up = f.tensor("blk.1.ffn_up_exps.weight").unwrap();
    assert_eq!(
        up.dims,
        vec![c("hidden_size"), c("moe_intermediate_size"), experts]
    );
    let slice = c("hidden_size") * c("moe_intermediate_size") * 2;
    let e5 = f
        .read_tensor_range("blk.1.ffn_up_exps.weight", 5 * slice, slice)
        .unwrap();
    assert_eq!(e5, hf["model.layers.1.mlp.experts.5.up_proj.weight"].1);
    let norm = f.read_tensor("output_norm.weight").unwrap();
    assert!(norm.chunks_exact(4).all(|x| x == 1.0f32.to_le_bytes()));

    // Refuses to replace the file unless asked; replaces it when asked.
    let e = synth_gguf(&o, &path, &mut |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("exists"), "{e}");
    let o2 = SynthOptions {
        overwrite: true,
        ..o.clone()
    };
    synth_gguf(&o2, &path, &mut |_, _| {}).unwrap();
    assert_eq!(
        names_in(path.parent().unwrap()),
        vec!["demo.gguf".to_string()]
    );
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn fill_f32_is_fill_widened() {
    let key = writer::tensor_key(3, "x");
    for (start, n) in [(0u64, 1usize), (777, 5000), (1 << 17, 1024), (5, 2049)] {
        let init = Init::Normal { std: 0.5 };
        let mut bf = vec![0u8; 2 * n];
        writer::fill(key, init, start, &mut bf);
        let mut f = vec![0u8; 4 * n];
        writer::fill_f32(key, init, start, &mut f);
        assert_eq!(f, widen_bf16(&bf), "start {start} n {n}");
    }
}

// ---- qwen3_next ----

fn next_opts(preset: &str, out: &Path) -> SynthOptions {
    SynthOptions {
        arch: QWEN3_NEXT.into(),
        ..opts(preset, out)
    }
}

/// Expected Qwen3-Next tensor names and shapes, computed from config.json alone (the
/// Hub release's layout), with `mtp_layers` multi-token-prediction layers.
fn expected_next_shapes(cfg: &Value, mtp_layers: u64) -> BTreeMap<String, Vec<u64>> {
    let g = |k: &str| cfg[k].as_u64().unwrap_or_else(|| panic!("config.{k}"));
    let (h, v, hd, nh, nkv) = (
        g("hidden_size"),
        g("vocab_size"),
        g("head_dim"),
        g("num_attention_heads"),
        g("num_key_value_heads"),
    );
    let (e, i, s, layers, interval) = (
        g("num_experts"),
        g("moe_intermediate_size"),
        g("shared_expert_intermediate_size"),
        g("num_hidden_layers"),
        g("full_attention_interval"),
    );
    let (nk, nv, dk, dv, kernel) = (
        g("linear_num_key_heads"),
        g("linear_num_value_heads"),
        g("linear_key_head_dim"),
        g("linear_value_head_dim"),
        g("linear_conv_kernel_dim"),
    );
    let mut m = BTreeMap::new();
    let layer = |m: &mut BTreeMap<String, Vec<u64>>, p: &str, full: bool| {
        let mut t = |name: &str, shape: Vec<u64>| {
            assert!(m.insert(format!("{p}.{name}"), shape).is_none());
        };
        if full {
            t("self_attn.q_proj.weight", vec![2 * nh * hd, h]);
            t("self_attn.k_proj.weight", vec![nkv * hd, h]);
            t("self_attn.v_proj.weight", vec![nkv * hd, h]);
            t("self_attn.o_proj.weight", vec![h, nh * hd]);
            t("self_attn.q_norm.weight", vec![hd]);
            t("self_attn.k_norm.weight", vec![hd]);
        } else {
            let conv_dim = 2 * nk * dk + nv * dv;
            t("linear_attn.A_log", vec![nv]);
            t("linear_attn.conv1d.weight", vec![conv_dim, 1, kernel]);
            t("linear_attn.dt_bias", vec![nv]);
            t("linear_attn.in_proj_ba.weight", vec![2 * nv, h]);
            t(
                "linear_attn.in_proj_qkvz.weight",
                vec![2 * nk * dk + 2 * nv * dv, h],
            );
            t("linear_attn.norm.weight", vec![dv]);
            t("linear_attn.out_proj.weight", vec![h, nv * dv]);
        }
        t("mlp.gate.weight", vec![e, h]);
        for x in 0..e {
            t(&format!("mlp.experts.{x}.gate_proj.weight"), vec![i, h]);
            t(&format!("mlp.experts.{x}.up_proj.weight"), vec![i, h]);
            t(&format!("mlp.experts.{x}.down_proj.weight"), vec![h, i]);
        }
        t("mlp.shared_expert.gate_proj.weight", vec![s, h]);
        t("mlp.shared_expert.up_proj.weight", vec![s, h]);
        t("mlp.shared_expert.down_proj.weight", vec![h, s]);
        t("mlp.shared_expert_gate.weight", vec![1, h]);
        t("input_layernorm.weight", vec![h]);
        t("post_attention_layernorm.weight", vec![h]);
    };
    m.insert("model.embed_tokens.weight".to_string(), vec![v, h]);
    for l in 0..layers {
        layer(
            &mut m,
            &format!("model.layers.{l}"),
            (l + 1) % interval == 0,
        );
    }
    m.insert("model.norm.weight".to_string(), vec![h]);
    m.insert("lm_head.weight".to_string(), vec![v, h]);
    if mtp_layers > 0 {
        m.insert("mtp.fc.weight".to_string(), vec![h, 2 * h]);
        for k in 0..mtp_layers {
            layer(&mut m, &format!("mtp.layers.{k}"), true);
        }
        for n in ["norm", "pre_fc_norm_embedding", "pre_fc_norm_hidden"] {
            m.insert(format!("mtp.{n}.weight"), vec![h]);
        }
    }
    m
}

/// Checks a written folder's shards and index against each other (names, shard file
/// names, offsets tiling each data region, total_size) and returns name -> shape.
fn check_hub_folder(dir: &Path, report: &SynthReport) -> BTreeMap<String, Vec<u64>> {
    let names = file_names(dir);
    let shards: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    for (i, s) in shards.iter().enumerate() {
        assert_eq!(
            **s,
            format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len())
        );
    }
    assert_eq!(names.len(), shards.len() + 5, "{names:?}");
    assert_eq!(report.files.len(), names.len());
    assert_eq!(
        report.files.last().unwrap().file_name().unwrap(),
        "config.json",
        "config.json written last"
    );
    let index = read_json(&dir.join("model.safetensors.index.json"));
    let weight_map = index["weight_map"].as_object().unwrap();
    assert_eq!(
        index["metadata"]["total_size"].as_u64().unwrap(),
        report.weight_bytes
    );
    let mut seen = BTreeMap::new();
    let mut total = 0;
    for s in &shards {
        let (tensors, data_len) = parse_shard(&dir.join(s));
        let mut ranges: Vec<[u64; 2]> = tensors.values().map(|t| t.1).collect();
        ranges.sort();
        let mut at = 0;
        for r in &ranges {
            assert_eq!(r[0], at, "{s}: gap or overlap");
            assert!(r[1] > r[0]);
            at = r[1];
        }
        assert_eq!(at, data_len, "{s}: data region fully used");
        total += data_len;
        for (name, (shape, off)) in tensors {
            assert_eq!(off[1] - off[0], 2 * shape.iter().product::<u64>(), "{name}");
            assert_eq!(weight_map[&name], **s, "{name}: index points to its shard");
            assert!(seen.insert(name, shape).is_none(), "tensor in two shards");
        }
    }
    assert_eq!(total, report.weight_bytes);
    assert_eq!(weight_map.len(), seen.len(), "index maps every tensor");
    assert_eq!(report.tensors, seen.len());
    seen
}

#[test]
fn next_shape_tensor_list_is_the_releases() {
    let p = preset("next-shape").unwrap();
    assert_eq!(p.arch, QWEN3_NEXT);
    let specs = p.tensors();
    assert_eq!(specs.len(), 75_944);
    assert_eq!(p.tensor_count(), specs.len());
    let names: HashSet<&str> = specs.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names.len(), specs.len(), "names unique");

    // Layers: 48, 36 linear + 12 full by the interval rule, 512 * 3 expert tensors each.
    let mut per_layer: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    for t in &specs {
        if let Some(rest) = t.name.strip_prefix("model.layers.") {
            let (l, name) = rest.split_once('.').unwrap();
            per_layer.entry(l.parse().unwrap()).or_default().push(name);
        }
    }
    assert_eq!(per_layer.len(), 48);
    assert_eq!(*per_layer.keys().last().unwrap(), 47);
    let (mut linear, mut full) = (0, 0);
    for (&l, names) in &per_layer {
        let is_linear = names.iter().any(|n| n.starts_with("linear_attn."));
        let is_full = names.iter().any(|n| n.starts_with("self_attn."));
        assert!(is_linear != is_full, "layer {l}: exactly one token mixer");
        assert_eq!(is_full, (l + 1) % 4 == 0, "layer {l}");
        assert_eq!(is_full, p.is_full_attention(l));
        linear += usize::from(is_linear);
        full += usize::from(is_full);
        let experts = names
            .iter()
            .filter(|n| n.starts_with("mlp.experts."))
            .count();
        assert_eq!(experts, 512 * 3, "layer {l}");
        assert_eq!(names.len(), 1543 + if is_full { 6 } else { 7 }, "layer {l}");
    }
    assert_eq!((linear, full), (36, 12));
    assert_eq!(
        (p.linear_attention_layers(), p.full_attention_layers()),
        (36, 12)
    );

    // MTP tensors: fc, one full-attention layer, three norms; last in the list.
    let mtp: Vec<&str> = specs
        .iter()
        .map(|t| t.name.as_str())
        .filter(|n| n.starts_with("mtp."))
        .collect();
    assert_eq!(mtp.len(), 1 + 1549 + 3);
    for n in [
        "mtp.fc.weight",
        "mtp.norm.weight",
        "mtp.pre_fc_norm_embedding.weight",
        "mtp.pre_fc_norm_hidden.weight",
        "mtp.layers.0.self_attn.q_proj.weight",
        "mtp.layers.0.mlp.experts.511.down_proj.weight",
        "mtp.layers.0.mlp.shared_expert_gate.weight",
        "mtp.layers.0.post_attention_layernorm.weight",
    ] {
        assert!(names.contains(n), "{n}");
    }
    assert!(specs[specs.len() - mtp.len()..]
        .iter()
        .all(|t| t.name.starts_with("mtp.")));
    // state_dict order: a layer's tensors are contiguous, layers in order.
    let layer_of = |n: &str| {
        n.strip_prefix("model.layers.")
            .map(|r| r.split_once('.').unwrap().0.parse::<usize>().unwrap())
    };
    let order: Vec<usize> = specs.iter().filter_map(|t| layer_of(&t.name)).collect();
    assert!(order.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(specs[0].name, "model.embed_tokens.weight");

    // Names and shapes exactly the release's, derived from config.json alone.
    let cfg: Value = serde_json::from_slice(&super::hub::config_json(&p)).unwrap();
    let got: BTreeMap<String, Vec<u64>> = specs
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone()))
        .collect();
    assert_eq!(got, expected_next_shapes(&cfg, 1));

    // The release's scales: zero-centred norms (zeros), the gated norm and dt_bias ones.
    let init = |n: &str| specs.iter().find(|t| t.name == n).unwrap().init;
    for n in [
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.3.self_attn.q_norm.weight",
        "model.layers.3.self_attn.k_norm.weight",
        "model.norm.weight",
        "mtp.norm.weight",
        "mtp.pre_fc_norm_embedding.weight",
        "mtp.pre_fc_norm_hidden.weight",
        "mtp.layers.0.input_layernorm.weight",
    ] {
        assert_eq!(init(n), Init::Zeros, "{n}");
    }
    for n in [
        "model.layers.0.linear_attn.norm.weight",
        "model.layers.0.linear_attn.dt_bias",
    ] {
        assert_eq!(init(n), Init::Ones, "{n}");
    }
    assert_eq!(
        init("model.layers.0.linear_attn.A_log"),
        Init::Normal { std: 0.5 }
    );
    assert_eq!(
        init("model.layers.0.linear_attn.conv1d.weight"),
        Init::Normal { std: 0.5 }
    );
    assert_eq!(
        init("model.layers.0.mlp.shared_expert_gate.weight"),
        Init::Normal { std: 0.125 }
    );
    assert_eq!(
        init("model.layers.0.mlp.gate.weight"),
        Init::Normal { std: 0.375 }
    );
}

#[test]
fn param_count_matches_tensor_list_for_every_preset() {
    for name in preset_names() {
        let base = preset(name).unwrap();
        for layers in [None, Some(1), Some(3), Some(4), Some(5)] {
            let mut p = base.clone();
            if let Some(l) = layers {
                p.num_hidden_layers = l;
            }
            p.validate().unwrap();
            let specs = p.tensors();
            let sum: u64 = specs.iter().map(|t| t.params()).sum();
            assert_eq!(sum, p.param_count(), "{name} {layers:?}");
            assert_eq!(specs.len(), p.tensor_count(), "{name} {layers:?}");
            let bytes: u64 = specs.iter().map(|t| t.size_bytes()).sum();
            assert_eq!(p.weight_bytes(), bytes);
            if p.arch == QWEN3_MOE || p.arch == QWEN3_NEXT {
                assert_eq!(bytes, 2 * sum);
            }
        }
    }
    assert_eq!(preset_names_for(QWEN3_MOE), vec!["demo", "mini", "bench-m"]);
    assert_eq!(
        preset_names_for(QWEN3_NEXT),
        vec!["next-demo", "next-shape", "next-bench"]
    );
    assert_eq!(
        preset_names_for(GLM4_MOE),
        vec!["glm45-demo", "glm45-air-shape"]
    );
    assert_eq!(
        preset_names_for(GPT_OSS),
        vec!["gpt-oss-demo", "gpt-oss-20b-shape", "gpt-oss-120b-shape"]
    );
    assert_eq!(
        preset_names_for(DEEPSEEK_V3),
        vec!["deepseek-v3-demo", "deepseek-v3-shape"]
    );
    assert_eq!(preset_names().len(), 13);
}

#[test]
fn next_preset_sizes() {
    let shape = preset("next-shape").unwrap();
    assert_eq!(shape.param_count(), 80_938_368);
    assert_eq!(shape.weight_bytes(), 161_876_736);
    // ~40 shards at the default limit, like the release's 41.
    let specs = shape.tensors();
    let shards = super::writer::plan_shards(&specs, shape.default_shard_bytes);
    assert_eq!(shards.len(), 41);
    for s in &shards {
        assert!(s.iter().map(|&i| specs[i].size_bytes()).sum::<u64>() <= 4_000_000);
    }

    let bench = preset("next-bench").unwrap();
    assert_eq!(bench.tensor_count(), 75_944);
    assert_eq!(bench.param_count(), 6_312_429_120);
    assert_eq!(bench.weight_bytes(), 12_624_858_240);
    assert!(bench.weight_bytes() <= 16_000_000_000);
    let specs = bench.tensors();
    assert_eq!(specs.len(), 75_944);
    let shards = super::writer::plan_shards(&specs, HUB_SHARD_BYTES);
    assert_eq!(shards.len(), 3);

    let demo = preset("next-demo").unwrap();
    assert_eq!(
        (demo.linear_attention_layers(), demo.full_attention_layers()),
        (3, 1)
    );
    assert_eq!(demo.weight_bytes(), 1_829_520);
    assert_eq!(demo.tensor_count(), 315);
}

#[test]
fn next_demo_folder_is_hub_exact_and_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let mut outs = Vec::new();
    for (threads, tag) in [(1, "a"), (2, "b")] {
        let o = next_opts("next-demo", &tmp.path().join(tag));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let report = pool.install(|| run(&o));
        let p = preset("next-demo").unwrap();
        assert_eq!(report.params, p.param_count());
        assert_eq!(report.tensors, p.tensor_count());
        let seen = check_hub_folder(&o.out, &report);
        let cfg = read_json(&o.out.join("config.json"));
        assert_eq!(seen, expected_next_shapes(&cfg, 1));
        outs.push(all_bytes(&o.out));
    }
    assert!(outs[0].len() >= 7, "at least two shards");
    assert_eq!(
        outs[0], outs[1],
        "byte-identical across runs and thread counts"
    );

    let dir = tmp.path().join("a");
    let cfg = read_json(&dir.join("config.json"));
    let keys: Vec<&str> = cfg
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut want_keys = vec![
        "architectures",
        "attention_bias",
        "attention_dropout",
        "bos_token_id",
        "decoder_sparse_step",
        "eos_token_id",
        "full_attention_interval",
        "head_dim",
        "hidden_act",
        "hidden_size",
        "initializer_range",
        "intermediate_size",
        "linear_conv_kernel_dim",
        "linear_key_head_dim",
        "linear_num_key_heads",
        "linear_num_value_heads",
        "linear_value_head_dim",
        "max_position_embeddings",
        "mlp_only_layers",
        "model_type",
        "moe_intermediate_size",
        "norm_topk_prob",
        "num_attention_heads",
        "num_experts",
        "num_experts_per_tok",
        "num_hidden_layers",
        "num_key_value_heads",
        "output_router_logits",
        "partial_rotary_factor",
        "rms_norm_eps",
        "rope_scaling",
        "rope_theta",
        "router_aux_loss_coef",
        "shared_expert_intermediate_size",
        "tie_word_embeddings",
        "torch_dtype",
        "transformers_version",
        "use_cache",
        "use_sliding_window",
        "vocab_size",
    ];
    want_keys.sort();
    let mut sorted_keys = keys.clone();
    sorted_keys.sort();
    assert_eq!(sorted_keys, want_keys);
    // Written with sorted keys, whatever serde_json's features.
    let text = String::from_utf8(fs::read(dir.join("config.json")).unwrap()).unwrap();
    let pos: Vec<usize> = want_keys
        .iter()
        .map(|k| text.find(&format!("\"{k}\":")).unwrap())
        .collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "keys sorted");
    let p = preset("next-demo").unwrap();
    assert_eq!(
        cfg["architectures"],
        serde_json::json!(["Qwen3NextForCausalLM"])
    );
    assert_eq!(cfg["model_type"], "qwen3_next");
    assert_eq!(cfg["full_attention_interval"], 4);
    assert_eq!(cfg["partial_rotary_factor"], 0.25);
    assert_eq!(cfg["rope_theta"], 1e7);
    assert_eq!(cfg["decoder_sparse_step"], 1);
    assert_eq!(cfg["mlp_only_layers"], serde_json::json!([]));
    assert_eq!(cfg["norm_topk_prob"], true);
    assert_eq!(cfg["tie_word_embeddings"], false);
    assert_eq!(cfg["use_sliding_window"], false);
    assert_eq!(cfg["rope_scaling"], Value::Null);
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    assert_eq!(cfg["transformers_version"], "4.57.0.dev0");
    assert_eq!(cfg["rms_norm_eps"], 1e-6);
    assert_eq!(cfg["router_aux_loss_coef"], 0.001);
    let ids = p.special_ids();
    assert_eq!(cfg["bos_token_id"], ids.endoftext);
    assert_eq!(cfg["eos_token_id"], ids.im_end);
    assert_eq!(cfg["num_experts"], 16);
    assert_eq!(cfg["num_experts_per_tok"], 4);
    assert_eq!(cfg["num_hidden_layers"], 4);
    let gen = read_json(&dir.join("generation_config.json"));
    assert_eq!(
        gen["eos_token_id"],
        serde_json::json!([ids.im_end, ids.endoftext])
    );
    let tc = read_json(&dir.join("tokenizer_config.json"));
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(
        fs::read(dir.join("tokenizer.json")).unwrap(),
        super::tokenizer::tokenizer_json(&p)
    );

    // Values: finite everywhere; norms and biases as intended; spreads as intended.
    let hf = hf_tensor_bytes(&dir);
    let values = |name: &str| -> Vec<f32> {
        hf[name]
            .1
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()
    };
    for name in hf.keys() {
        assert!(values(name).iter().all(|x| x.is_finite()), "{name}");
    }
    for name in [
        "model.layers.0.input_layernorm.weight",
        "model.layers.3.self_attn.q_norm.weight",
        "model.norm.weight",
        "mtp.pre_fc_norm_hidden.weight",
    ] {
        assert!(values(name).iter().all(|&x| x == 0.0), "{name}");
    }
    for name in [
        "model.layers.1.linear_attn.norm.weight",
        "model.layers.1.linear_attn.dt_bias",
    ] {
        assert!(values(name).iter().all(|&x| x == 1.0), "{name}");
    }
    let a_log = values("model.layers.2.linear_attn.A_log");
    assert!(a_log.iter().all(|x| x.abs() < 3.0), "{a_log:?}");
    let std = |v: &[f32]| {
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt()
    };
    for (name, want) in [
        ("model.layers.0.linear_attn.conv1d.weight", 0.5),
        ("model.layers.0.linear_attn.in_proj_qkvz.weight", 0.125),
        ("model.layers.3.self_attn.q_proj.weight", 0.125),
        ("mtp.fc.weight", 1.0 / 128f64.sqrt()),
    ] {
        let s = std(&values(name));
        assert!((s / want - 1.0).abs() < 0.1, "{name}: std {s} want {want}");
    }
}

#[test]
fn next_shape_shards_many_small_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let o = SynthOptions {
        layers: Some(4),
        ..next_opts("next-shape", &tmp.path().join("s"))
    };
    let report = run(&o);
    assert_eq!(report.tensors, 7_755);
    assert_eq!(report.weight_bytes, 17_001_280);
    let seen = check_hub_folder(&o.out, &report);
    let cfg = read_json(&o.out.join("config.json"));
    assert_eq!(cfg["num_hidden_layers"], 4);
    assert_eq!(seen, expected_next_shapes(&cfg, 1));
    let shards: Vec<String> = file_names(&o.out)
        .into_iter()
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    assert_eq!(shards.len(), 5);
    for s in &shards {
        let (_, data_len) = parse_shard(&o.out.join(s));
        assert!(data_len <= 4_000_000, "{s}: {data_len}");
    }
}

#[test]
fn preset_of_another_arch_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("x");
    let e = synth(&next_opts("demo", &dir), &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, SynthError::WrongArch { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("preset demo is a qwen3_moe preset; pass --arch qwen3_moe"),
        "{msg}"
    );
    assert!(
        msg.contains("next-demo"),
        "names the qwen3_next presets: {msg}"
    );
    let e = synth(&opts("next-shape", &dir), &mut |_, _| {}).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("preset next-shape is a qwen3_next preset; pass --arch qwen3_next"),
        "{msg}"
    );
    assert!(!dir.exists(), "nothing written");
    let e = synth_gguf(
        &opts("next-demo", &dir),
        &dir.join("m.gguf"),
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(matches!(e, SynthError::WrongArch { .. }), "{e}");
    // An unknown arch still names every supported one.
    let mut o = next_opts("next-demo", &dir);
    o.arch = "qwen3next".into();
    let msg = synth(&o, &mut |_, _| {}).unwrap_err().to_string();
    assert!(msg.contains("qwen3_moe, qwen3_next"), "{msg}");
    assert!(!dir.exists(), "nothing written");
}

#[test]
fn gguf_twin_refuses_qwen3_next() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("twin").join("next.gguf");
    let o = next_opts("next-demo", &tmp.path().join("hf"));
    let e = synth_gguf(&o, &path, &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, SynthError::Invalid(_)), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("the GGUF twin is written for qwen3_moe, glm4_moe, gpt_oss, deepseek_v3 only")
            && msg.contains("convert a qwen3_next folder with llama.cpp's convert_hf_to_gguf.py"),
        "{msg}"
    );
    assert!(!path.parent().unwrap().exists(), "nothing written");
}

/// FNV-1a over (file name, length, bytes) of every file in `dir`, in name order.
fn folder_fingerprint(dir: &Path) -> u64 {
    let mut h = 0xCBF2_9CE4_8422_2325u64;
    for (name, bytes) in all_bytes(dir) {
        let len = (bytes.len() as u64).to_le_bytes();
        for &b in name.as_bytes().iter().chain(&len).chain(&bytes) {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3);
        }
    }
    h
}

/// Adding qwen3_next left the qwen3_moe output unchanged: the fingerprint of `demo`
/// (seed 0) is the one the writer gave before (checked against the previous code).
#[test]
fn qwen3_moe_demo_output_is_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let o = opts("demo", &tmp.path().join("demo"));
    run(&o);
    assert_eq!(folder_fingerprint(&o.out), 0xBB31_91AF_0E87_8EA3);
}

/// Writes the whole next-shape model (~162 MB, 75,944 tensors) at its default shard
/// limit: 41 shards, like the release (run with `-- --ignored`).
#[test]
#[ignore]
fn next_shape_full_write() {
    let tmp = tempfile::tempdir().unwrap();
    let o = next_opts("next-shape", &tmp.path().join("s"));
    let t0 = std::time::Instant::now();
    let report = run(&o);
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(report.tensors, 75_944);
    assert_eq!(report.weight_bytes, 161_876_736);
    let seen = check_hub_folder(&o.out, &report);
    let cfg = read_json(&o.out.join("config.json"));
    assert_eq!(seen, expected_next_shapes(&cfg, 1));
    let shards = report
        .files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "safetensors"))
        .count();
    assert_eq!(shards, 41);
    println!("next-shape: {shards} shards, {:.1} s", secs);
}

// ---- glm4_moe, gpt_oss, deepseek_v3 ----

fn arch_opts(arch: &str, preset: &str, out: &Path) -> SynthOptions {
    SynthOptions {
        arch: arch.into(),
        ..opts(preset, out)
    }
}

/// The repository's `tests/fixtures/NAME`.
fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// Tensor name -> (dtype, shape, data bytes) of a written folder, any dtype.
fn hf_tensors_any(dir: &Path) -> BTreeMap<String, (String, Vec<u64>, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let bytes = fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let data = &bytes[8 + n..];
        let mut end = 0;
        for (name, info) in header.as_object().unwrap() {
            if name == "__metadata__" {
                continue;
            }
            let off = info["data_offsets"].as_array().unwrap();
            let (a, b) = (off[0].as_u64().unwrap(), off[1].as_u64().unwrap());
            end = end.max(b);
            let shape = info["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect();
            let dtype = info["dtype"].as_str().unwrap().to_string();
            let elem = match dtype.as_str() {
                "BF16" => 2,
                "F32" => 4,
                "U8" => 1,
                d => panic!("{name}: dtype {d}"),
            };
            let numel: u64 = info["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .product();
            assert_eq!(b - a, numel * elem, "{name}: extent");
            out.insert(
                name.clone(),
                (dtype, shape, data[a as usize..b as usize].to_vec()),
            );
        }
        assert_eq!(end as usize, data.len(), "{}: data tiled", path.display());
    }
    out
}

/// Names with every number replaced by `N` (layer and expert indices).
fn name_patterns<'a>(names: impl Iterator<Item = &'a String>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for n in names {
        let mut p = String::new();
        let mut in_num = false;
        for ch in n.chars() {
            if ch.is_ascii_digit() {
                if !in_num {
                    p.push('N');
                }
                in_num = true;
            } else {
                p.push(ch);
                in_num = false;
            }
        }
        *out.entry(p).or_default() += 1;
    }
    out
}

/// The released configs (transcribed under `tests/fixtures/`) and the config the shape
/// presets write agree on every key, but for the token ids (ours are the synthetic
/// tokenizer's), the multi-token-prediction layer (not written), and DeepSeek-V3's FP8
/// `quantization_config` and remote-code `auto_map` (the synthetic weights are bf16,
/// read by the native class); the parameter counts are the releases'.
#[test]
fn shape_presets_are_the_released_configs() {
    for (preset_name, fixture_name, params_b) in [
        ("glm45-air-shape", "glm45_air", 106.85),
        ("gpt-oss-20b-shape", "gpt_oss_20b", 20.91),
        ("gpt-oss-120b-shape", "gpt_oss_120b", 116.83),
        ("deepseek-v3-shape", "deepseek_v3_671b", 671.03),
    ] {
        let p = preset(preset_name).unwrap();
        p.validate().unwrap();
        let ours: Value = serde_json::from_slice(&super::hub::config_json(&p)).unwrap();
        let release = read_json(&fixture(fixture_name).join("config.json"));
        let skip = [
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "num_nextn_predict_layers",
            "quantization_config",
            "auto_map",
            "transformers_version",
        ];
        for (k, v) in release.as_object().unwrap() {
            if skip.contains(&k.as_str()) && !(k == "quantization_config" && p.arch == GPT_OSS) {
                continue;
            }
            let got = &ours[k];
            let same = match (got.as_f64(), v.as_f64()) {
                (Some(a), Some(b)) => a == b,
                _ => got == v,
            };
            assert!(same, "{preset_name}: {k} is {got}, the release has {v}");
        }
        for k in ours.as_object().unwrap().keys() {
            assert!(
                release.get(k).is_some() || k == "pad_token_id" || k == "bos_token_id",
                "{preset_name}: key {k} is not the release's"
            );
        }
        let billions = p.param_count() as f64 / 1e9;
        println!(
            "{preset_name}: {billions:.2} B parameters, {} tensors, {:.1} GB",
            p.tensor_count(),
            p.weight_bytes() as f64 / 1e9
        );
        assert!(
            (billions - params_b).abs() < 0.01 * params_b,
            "{preset_name}: {billions:.2} B parameters, the release has ~{params_b} B"
        );
    }
}

/// Each demo preset writes the tensor names `transformers` writes for its class (the
/// fixtures under `tests/fixtures/` were saved by it), in the releases' dtypes.
#[test]
fn new_arch_demo_tensors_are_the_classes() {
    let tmp = tempfile::tempdir().unwrap();
    for (arch, name, fix) in [
        (GLM4_MOE, "glm45-demo", "glm4_moe"),
        (GPT_OSS, "gpt-oss-demo", "gpt_oss"),
        (DEEPSEEK_V3, "deepseek-v3-demo", "deepseek_v3"),
    ] {
        let o = arch_opts(arch, name, &tmp.path().join(name));
        let report = run(&o);
        let got = hf_tensors_any(&o.out);
        assert_eq!(got.len(), report.tensors, "{name}");
        let index = read_json(&o.out.join("model.safetensors.index.json"));
        assert_eq!(index["weight_map"].as_object().unwrap().len(), got.len());
        assert_eq!(
            index["metadata"]["total_size"].as_u64().unwrap(),
            report.weight_bytes
        );
        let p = resolve_preset(&o).unwrap();
        assert_eq!(report.weight_bytes, p.weight_bytes());
        // The fixture's set of name patterns (its layer 0 is dense like ours; the
        // multi-token-prediction layer, if any, is not in it).
        let fixture_names: Vec<String> = hf_tensors_any(&fixture(fix).join("model"))
            .into_keys()
            .collect();
        let ours_p: Vec<String> = name_patterns(got.keys()).into_keys().collect();
        let theirs_p: Vec<String> = name_patterns(fixture_names.iter()).into_keys().collect();
        assert_eq!(ours_p, theirs_p, "{name}: tensor names");
        for (t, (dtype, shape, data)) in &got {
            let want = if t.ends_with("_blocks") || t.ends_with("_scales") {
                "U8"
            } else if t.ends_with("e_score_correction_bias") {
                "F32"
            } else {
                "BF16"
            };
            assert_eq!(dtype, want, "{name}: {t}");
            if t.ends_with("_scales") {
                // Exponents near 2^-7 .. 2^-3: weights of std ~1/sqrt(fan_in).
                assert!(data.iter().all(|&b| (118..=125).contains(&b)), "{t}");
                assert_eq!(shape.len(), 3);
            }
            if t.ends_with("_blocks") {
                assert_eq!(shape[3], 16, "{t}");
                let distinct: HashSet<u8> = data.iter().copied().collect();
                assert!(distinct.len() > 200, "{t}: codes cover the range");
            }
        }
    }
}

/// With `layers`, a cut model keeps a sparse layer: DeepSeek-V3's three dense layers
/// shrink to `layers - 1`.
#[test]
fn cut_models_keep_a_sparse_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = arch_opts(DEEPSEEK_V3, "deepseek-v3-shape", tmp.path());
    o.layers = Some(2);
    let p = resolve_preset(&o).unwrap();
    assert_eq!(p.first_k_dense_replace, 1);
    assert!(p.is_sparse(1) && !p.is_sparse(0));
    o.layers = Some(10);
    assert_eq!(resolve_preset(&o).unwrap().first_k_dense_replace, 3);
    let cfg: Value =
        serde_json::from_slice(&super::hub::config_json(&resolve_preset(&o).unwrap())).unwrap();
    assert_eq!(cfg["first_k_dense_replace"], 3);
    assert_eq!(cfg["num_hidden_layers"], 10);
}

/// llama.cpp's converter (`GptOssModel.transform_nibble_layout`) step by step, on one
/// block of 16 code bytes.
fn converter_nibbles(t: &[u8]) -> Vec<u8> {
    let swapped: Vec<u8> = t
        .iter()
        .map(|&b| ((b & 0x0F) << 4) | ((b & 0xF0) >> 4))
        .collect();
    let (a, b) = swapped.split_at(8);
    let mut blk_a = Vec::new();
    for &x in a {
        blk_a.push(x & 0xF0);
        blk_a.push(x << 4);
    }
    let mut blk_b = Vec::new();
    for &x in b {
        blk_b.push(x >> 4);
        blk_b.push(x & 0x0F);
    }
    blk_a
        .iter()
        .zip(&blk_b)
        .map(|(&x, &y)| {
            let out = x | y;
            ((out & 0xF0) >> 4) | ((out & 0x0F) << 4)
        })
        .collect()
}

#[test]
fn mxfp4_nibble_order_is_the_converters() {
    let mut codes = [0u8; 16];
    for seed in 0..200u64 {
        for (i, c) in codes.iter_mut().enumerate() {
            *c = (super::writer::tensor_key(seed, &i.to_string()) >> 7) as u8;
        }
        assert_eq!(
            super::writer::mxfp4_ggml_qs(&codes).to_vec(),
            converter_nibbles(&codes)
        );
    }
}

fn gguf_u(f: &crate::gguf::GgufFile, k: &str) -> u64 {
    f.get(k)
        .unwrap_or_else(|| panic!("{k}"))
        .as_u64()
        .unwrap_or_else(|| panic!("{k} integer"))
}

/// The twins of the demo presets: every tensor llama.cpp's loader asks for (names, dims
/// in its order, types), the metadata keys it reads, and the converter's reshapes
/// checked byte for byte against the HF files.
#[test]
fn new_arch_twins_match_hf_files() {
    use crate::gguf::{GgmlType, GgufFile, Value as GV};
    let tmp = tempfile::tempdir().unwrap();
    for (arch, name, gg) in [
        (GLM4_MOE, "glm45-demo", "glm4moe"),
        (GPT_OSS, "gpt-oss-demo", "gpt-oss"),
        (DEEPSEEK_V3, "deepseek-v3-demo", "deepseek2"),
    ] {
        let o = SynthOptions {
            seed: 11,
            ..arch_opts(arch, name, &tmp.path().join(name))
        };
        run(&o);
        let path = tmp.path().join(format!("{name}.gguf"));
        let report = synth_gguf(&o, &path, &mut |_, _| {}).unwrap();
        let p = resolve_preset(&o).unwrap();
        let hf = hf_tensors_any(&o.out);
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.get("general.architecture").and_then(GV::as_str), Some(gg));
        let k = |s: &str| format!("{gg}.{s}");
        let (h, e, l) = (
            p.hidden_size as u64,
            p.num_experts as u64,
            p.num_hidden_layers,
        );
        let (heads, i, v) = (
            p.num_attention_heads as u64,
            p.moe_intermediate_size as u64,
            p.vocab_size as u64,
        );
        assert_eq!(gguf_u(&f, &k("block_count")), l as u64);
        assert_eq!(gguf_u(&f, &k("embedding_length")), h);
        assert_eq!(gguf_u(&f, &k("expert_count")), e);
        assert_eq!(
            gguf_u(&f, &k("expert_used_count")),
            p.num_experts_per_tok as u64
        );
        assert_eq!(gguf_u(&f, &k("expert_feed_forward_length")), i);
        assert_eq!(
            f.get(&k("attention.layer_norm_rms_epsilon")),
            Some(&GV::F32(p.rms_norm_eps as f32))
        );
        // Every element once: the twin's element count is the HF parameter count.
        let elems: u64 = f
            .tensors
            .iter()
            .map(|t| t.dims.iter().product::<u64>())
            .sum();
        assert_eq!(elems, p.param_count(), "{name}");
        let bytes: u64 = f.tensors.iter().map(|t| t.size).sum();
        assert_eq!(bytes, report.weight_bytes);
        // dims (GGML order) and type of a tensor.
        let dims = |n: &str| {
            f.tensor(n)
                .unwrap_or_else(|| panic!("{name}: {n}"))
                .dims
                .clone()
        };
        let ty = |n: &str| f.tensor(n).unwrap().ty;
        assert_eq!(dims("token_embd.weight"), vec![h, v]);
        assert_eq!(dims("output.weight"), vec![h, v]);
        assert_eq!(ty("output_norm.weight"), GgmlType::F32);
        let raw = |n: &str| hf[n].2.clone();
        assert_eq!(
            f.read_tensor("token_embd.weight").unwrap(),
            raw("model.embed_tokens.weight")
        );
        let last = l - 1;
        match arch {
            GLM4_MOE => {
                let hd = p.head_dim as u64;
                let kv = p.num_key_value_heads as u64 * hd;
                assert_eq!(gguf_u(&f, &k("leading_dense_block_count")), 1);
                assert_eq!(gguf_u(&f, &k("expert_shared_count")), 1);
                assert_eq!(gguf_u(&f, &k("expert_gating_func")), 2);
                assert_eq!(gguf_u(&f, &k("rope.dimension_count")), hd / 2);
                assert_eq!(gguf_u(&f, &k("expert_group_count")), p.n_group as u64);
                assert_eq!(
                    dims("blk.0.ffn_gate.weight"),
                    vec![h, p.intermediate_size as u64]
                );
                assert_eq!(dims("blk.0.attn_q.weight"), vec![h, heads * hd]);
                assert_eq!(dims("blk.0.attn_k.bias"), vec![kv]);
                assert_eq!(ty("blk.0.attn_k.bias"), GgmlType::F32);
                assert_eq!(dims("blk.0.post_attention_norm.weight"), vec![h]);
                assert_eq!(
                    dims(&format!("blk.{last}.ffn_gate_exps.weight")),
                    vec![h, i, e]
                );
                assert_eq!(
                    dims(&format!("blk.{last}.ffn_down_exps.weight")),
                    vec![i, h, e]
                );
                assert_eq!(dims(&format!("blk.{last}.ffn_up_shexp.weight")), vec![h, i]);
                assert_eq!(dims(&format!("blk.{last}.exp_probs_b.bias")), vec![e]);
                assert_eq!(
                    ty(&format!("blk.{last}.ffn_gate_inp.weight")),
                    GgmlType::F32
                );
                // f32 in both files: identical bytes.
                assert_eq!(
                    f.read_tensor(&format!("blk.{last}.exp_probs_b.bias"))
                        .unwrap(),
                    raw(&format!(
                        "model.layers.{last}.mlp.gate.e_score_correction_bias"
                    ))
                );
                assert_eq!(
                    f.read_tensor("blk.0.attn_q.bias").unwrap(),
                    widen_bf16(&raw("model.layers.0.self_attn.q_proj.bias"))
                );
                let slice = h * i * 2;
                assert_eq!(
                    f.read_tensor_range(
                        &format!("blk.{last}.ffn_up_exps.weight"),
                        3 * slice,
                        slice
                    )
                    .unwrap(),
                    raw(&format!("model.layers.{last}.mlp.experts.3.up_proj.weight"))
                );
                assert!(f.tensor("blk.0.ffn_gate_inp.weight").is_none());
            }
            GPT_OSS => {
                let hd = p.head_dim as u64;
                assert_eq!(
                    gguf_u(&f, &k("attention.sliding_window")),
                    p.sliding_window as u64
                );
                assert_eq!(gguf_u(&f, &k("attention.key_length")), hd);
                assert_eq!(
                    f.get(&k("rope.scaling.type")).and_then(GV::as_str),
                    Some("yarn")
                );
                assert_eq!(dims("blk.0.attn_sinks.weight"), vec![heads]);
                assert_eq!(ty("blk.0.attn_sinks.weight"), GgmlType::F32);
                assert_eq!(dims("blk.0.attn_output.bias"), vec![h]);
                assert_eq!(dims("blk.0.ffn_gate_inp.bias"), vec![e]);
                for n in ["ffn_gate_exps", "ffn_up_exps"] {
                    assert_eq!(dims(&format!("blk.1.{n}.weight")), vec![h, i, e]);
                    assert_eq!(ty(&format!("blk.1.{n}.weight")), GgmlType::Mxfp4);
                    assert_eq!(dims(&format!("blk.1.{n}.bias")), vec![i, e]);
                    assert_eq!(ty(&format!("blk.1.{n}.bias")), GgmlType::F32);
                }
                assert_eq!(dims("blk.1.ffn_down_exps.weight"), vec![i, h, e]);
                assert_eq!(dims("blk.1.ffn_down_exps.bias"), vec![h, e]);
                // The converter's repack, from the HF blocks and scales.
                let x = "model.layers.1.mlp.experts";
                let blocks = raw(&format!("{x}.gate_up_proj_blocks"));
                let scales = raw(&format!("{x}.gate_up_proj_scales"));
                let bias = widen_bf16(&raw(&format!("{x}.gate_up_proj_bias")));
                let nb = h / 32;
                for (n, half) in [("ffn_gate_exps", 0u64), ("ffn_up_exps", 1)] {
                    let mut want = Vec::new();
                    let mut want_bias = Vec::new();
                    for ex in 0..e {
                        for r in 0..i {
                            let row = ex * 2 * i + 2 * r + half;
                            for b in 0..nb {
                                let blk = (row * nb + b) as usize;
                                want.push(scales[blk]);
                                want.extend(converter_nibbles(&blocks[16 * blk..16 * blk + 16]));
                            }
                            want_bias
                                .extend_from_slice(&bias[4 * row as usize..4 * row as usize + 4]);
                        }
                    }
                    assert!(
                        f.read_tensor(&format!("blk.1.{n}.weight")).unwrap() == want,
                        "{n}"
                    );
                    assert_eq!(
                        f.read_tensor(&format!("blk.1.{n}.bias")).unwrap(),
                        want_bias
                    );
                }
                let blocks = raw(&format!("{x}.down_proj_blocks"));
                let scales = raw(&format!("{x}.down_proj_scales"));
                let mut want = Vec::new();
                for (blk, s) in scales.iter().enumerate() {
                    want.push(*s);
                    want.extend(converter_nibbles(&blocks[16 * blk..16 * blk + 16]));
                }
                assert!(f.read_tensor("blk.1.ffn_down_exps.weight").unwrap() == want);
            }
            DEEPSEEK_V3 => {
                let (nope, rope, vd, kvl, ql) = (
                    p.qk_nope_head_dim as u64,
                    p.qk_rope_head_dim as u64,
                    p.v_head_dim as u64,
                    p.kv_lora_rank as u64,
                    p.q_lora_rank as u64,
                );
                assert_eq!(gguf_u(&f, &k("attention.head_count_kv")), 1);
                assert_eq!(gguf_u(&f, &k("attention.key_length")), kvl + rope);
                assert_eq!(gguf_u(&f, &k("attention.value_length")), kvl);
                assert_eq!(gguf_u(&f, &k("attention.key_length_mla")), nope + rope);
                assert_eq!(gguf_u(&f, &k("attention.value_length_mla")), vd);
                assert_eq!(gguf_u(&f, &k("attention.q_lora_rank")), ql);
                assert_eq!(gguf_u(&f, &k("attention.kv_lora_rank")), kvl);
                assert_eq!(gguf_u(&f, &k("rope.dimension_count")), rope);
                assert_eq!(gguf_u(&f, &k("leading_dense_block_count")), 3);
                assert_eq!(gguf_u(&f, &k("expert_gating_func")), 2);
                assert_eq!(
                    gguf_u(&f, &k("expert_group_used_count")),
                    p.topk_group as u64
                );
                assert_eq!(
                    f.get(&k("expert_weights_scale")),
                    Some(&GV::F32(p.routed_scaling_factor as f32))
                );
                assert_eq!(dims("blk.0.attn_q_a.weight"), vec![h, ql]);
                assert_eq!(dims("blk.0.attn_q_a_norm.weight"), vec![ql]);
                assert_eq!(
                    dims("blk.0.attn_q_b.weight"),
                    vec![ql, heads * (nope + rope)]
                );
                assert_eq!(dims("blk.0.attn_kv_a_mqa.weight"), vec![h, kvl + rope]);
                assert_eq!(dims("blk.0.attn_k_b.weight"), vec![nope, kvl, heads]);
                assert_eq!(dims("blk.0.attn_v_b.weight"), vec![kvl, vd, heads]);
                assert_eq!(dims("blk.0.attn_output.weight"), vec![heads * vd, h]);
                assert_eq!(dims("blk.0.ffn_norm.weight"), vec![h]);
                assert!(f.tensor("blk.0.attn_kv_b.weight").is_none());
                assert_eq!(
                    dims(&format!("blk.{last}.ffn_gate_shexp.weight")),
                    vec![h, i]
                );
                assert_eq!(dims(&format!("blk.{last}.exp_probs_b.bias")), vec![e]);
                // kv_b [heads * (nope + v), kvl] as [heads, nope + v, kvl]: k_b is the
                // nope rows transposed ([heads, kvl, nope]), v_b the v rows.
                let kv_b = raw("model.layers.2.self_attn.kv_b_proj.weight");
                let at = |hh: u64, row: u64, col: u64| {
                    let idx = 2 * ((hh * (nope + vd) + row) * kvl + col) as usize;
                    [kv_b[idx], kv_b[idx + 1]]
                };
                let mut want_k = Vec::new();
                let mut want_v = Vec::new();
                for hh in 0..heads {
                    for r in 0..kvl {
                        for c in 0..nope {
                            want_k.extend(at(hh, c, r));
                        }
                    }
                    for r in 0..vd {
                        for c in 0..kvl {
                            want_v.extend(at(hh, nope + r, c));
                        }
                    }
                }
                assert!(f.read_tensor("blk.2.attn_k_b.weight").unwrap() == want_k);
                assert!(f.read_tensor("blk.2.attn_v_b.weight").unwrap() == want_v);
            }
            _ => unreachable!(),
        }
    }
}

/// The written chat template, as a model's tokenizer renders it: plain turns as ChatML, and with
/// `tools` the Hermes form the Qwen family uses (tool list in a system turn, assistant calls as
/// `<tool_call>` JSON, tool results as `<tool_response>` blocks in one user turn), which is the
/// form `toolcall::ToolFormat::detect` recognises.
#[test]
fn the_chat_template_renders_tools_calls_and_results() {
    use crate::tokenizer::{ChatMessage, TemplateKwargs, Tokenizer};
    let tmp = tempfile::tempdir().unwrap();
    let o = opts("demo", &tmp.path().join("demo"));
    run(&o);
    let tok = Tokenizer::from_dir(&o.out).unwrap();
    let plain = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "hi"),
    ];
    assert_eq!(
        tok.apply_chat_template(&plain, true).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let tools = vec![
        serde_json::json!({"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}),
    ];
    let call = serde_json::json!([{"id": "c1", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]);
    let messages = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Weather in Paris and Rome?"),
        ChatMessage::new("assistant", "").with("tool_calls", call),
        ChatMessage::new("tool", "{\"temp\": 21}").with("tool_call_id", "c1".into()),
        ChatMessage::new("tool", "{\"temp\": 25}").with("tool_call_id", "c2".into()),
    ];
    let ids = tok
        .encode_chat_tools(&messages, true, &TemplateKwargs::new(), Some(&tools), 4096)
        .unwrap();
    let text = tok.decode(&ids, false).unwrap();
    let want = "<|im_start|>system\nBe brief.\n\n# Tools\n\n";
    assert!(text.starts_with(want), "{text}");
    assert!(
        text.contains("<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\""),
        "{text}"
    );
    assert!(
        text.contains(
            "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n<|im_start|>assistant\n\
             <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n\
             </tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n\
             </tool_response>\n<tool_response>\n{\"temp\": 25}\n</tool_response><|im_end|>\n\
             <|im_start|>assistant\n"
        ),
        "{text}"
    );
    // The system turn is written once (inside the tools turn).
    assert_eq!(text.matches("Be brief.").count(), 1, "{text}");
    assert_eq!(
        crate::toolcall::ToolFormat::detect(tok.chat_template_source().unwrap()),
        Some(crate::toolcall::ToolFormat::Hermes)
    );
}
