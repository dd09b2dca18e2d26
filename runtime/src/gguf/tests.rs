use std::fs;
use std::path::Path;

use super::*;

fn all_kinds() -> Vec<(String, Value)> {
    vec![
        ("general.architecture".into(), Value::String("test".into())),
        ("k.u8".into(), Value::U8(200)),
        ("k.i8".into(), Value::I8(-100)),
        ("k.u16".into(), Value::U16(60000)),
        ("k.i16".into(), Value::I16(-30000)),
        ("k.u32".into(), Value::U32(4_000_000_000)),
        ("k.i32".into(), Value::I32(-2_000_000_000)),
        ("k.f32".into(), Value::F32(1.5e-6)),
        ("k.bool".into(), Value::Bool(true)),
        ("k.string".into(), Value::String("héllo\nworld".into())),
        ("k.u64".into(), Value::U64(u64::MAX - 1)),
        ("k.i64".into(), Value::I64(i64::MIN + 1)),
        ("k.f64".into(), Value::F64(1_000_000.25)),
        (
            "k.arr_i32".into(),
            Value::Array(ValueType::I32, vec![Value::I32(1), Value::I32(-3)]),
        ),
        ("k.arr_str".into(), Value::strings(["a b", "", "ü"])),
        ("k.arr_empty".into(), Value::Array(ValueType::F32, vec![])),
        (
            "k.arr_bool".into(),
            Value::Array(ValueType::Bool, vec![Value::Bool(false), Value::Bool(true)]),
        ),
    ]
}

fn specs() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("a", vec![3], GgmlType::F32),
        TensorSpec::new("b", vec![5, 2], GgmlType::BF16),
        TensorSpec::new("c", vec![64, 2, 3], GgmlType::Q8_0),
        TensorSpec::new("d", vec![256, 1], GgmlType::Q4_K),
        TensorSpec::new("e", vec![7], GgmlType::F16),
    ]
}

fn data_for(t: &TensorSpec, salt: u8) -> Vec<u8> {
    let n = t.ty.tensor_bytes(&t.dims).unwrap();
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ salt).collect()
}

/// Writes `specs()` with data in chunks of `chunk` bytes spanning tensors.
fn write(path: &Path, alignment: u64, chunk: usize) -> Vec<Vec<u8>> {
    let specs = specs();
    let data: Vec<Vec<u8>> = specs
        .iter()
        .enumerate()
        .map(|(i, t)| data_for(t, i as u8))
        .collect();
    let mut w = GgufWriter::create(path, &all_kinds(), &specs, alignment).unwrap();
    let all: Vec<u8> = data.concat();
    for c in all.chunks(chunk) {
        w.write(c).unwrap();
    }
    let len = w.file_len();
    assert_eq!(w.finish().unwrap(), path);
    assert_eq!(fs::metadata(path).unwrap().len(), len);
    data
}

#[test]
fn write_then_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    for (alignment, chunk) in [(32, 1), (32, 7), (64, 1000), (4096, 3), (8, 1 << 20)] {
        let path = tmp.path().join(format!("m-{alignment}-{chunk}.gguf"));
        let data = write(&path, alignment, chunk);
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.alignment, alignment);
        let mut want = all_kinds();
        if alignment != DEFAULT_ALIGNMENT {
            want.push((ALIGNMENT_KEY.into(), Value::U32(alignment as u32)));
        }
        assert_eq!(f.metadata, want, "alignment {alignment}");
        assert_eq!(f.data_offset % alignment, 0);
        let specs = specs();
        assert_eq!(f.tensors.len(), specs.len());
        for ((t, s), d) in f.tensors.iter().zip(&specs).zip(&data) {
            assert_eq!((&t.name, &t.dims, t.ty), (&s.name, &s.dims, s.ty));
            assert_eq!(t.offset % alignment, 0, "{} aligned", t.name);
            assert_eq!(t.size, d.len() as u64);
            assert_eq!(&f.read_tensor(&t.name).unwrap(), d);
        }
        assert_eq!(f.file_len % alignment, 0, "trailing padding");
        // No temp file left behind.
        let names: Vec<_> = fs::read_dir(tmp.path()).unwrap().collect();
        assert!(names.iter().all(|e| !e
            .as_ref()
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".tmp-")));
    }
}

#[test]
fn type_table() {
    for (ty, id, block, bytes) in [
        (GgmlType::F32, 0, 1, 4),
        (GgmlType::F16, 1, 1, 2),
        (GgmlType::Q8_0, 8, 32, 34),
        (GgmlType::Q4_K, 12, 256, 144),
        (GgmlType::Q6_K, 14, 256, 210),
        (GgmlType::BF16, 30, 1, 2),
    ] {
        assert_eq!(ty.id(), id);
        assert_eq!(GgmlType::from_id(id), Some(ty));
        assert_eq!((ty.block_size(), ty.block_bytes()), (block, bytes));
    }
    assert_eq!(GgmlType::from_id(4), None);
    assert_eq!(GgmlType::Q8_0.tensor_bytes(&[64, 3]), Ok(2 * 3 * 34));
    assert!(GgmlType::Q8_0.tensor_bytes(&[48, 3]).is_err());
    assert!(GgmlType::F32.tensor_bytes(&[1, 1, 1, 1, 1]).is_err());
    assert!(GgmlType::F32.tensor_bytes(&[u64::MAX, 2]).is_err());
}

#[test]
fn writer_misuse_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("x.gguf");
    let specs = specs();
    let err = |r: Result<GgufWriter, GgufError>| r.err().expect("error").to_string();
    assert!(err(GgufWriter::create(&path, &[], &specs, 48)).contains("power of two"));
    let dup = vec![specs[0].clone(), specs[0].clone()];
    assert!(err(GgufWriter::create(&path, &[], &dup, 32)).contains("twice"));
    let bad_q = vec![TensorSpec::new("q", vec![33], GgmlType::Q8_0)];
    assert!(err(GgufWriter::create(&path, &[], &bad_q, 32)).contains("block size"));
    let mixed = vec![(
        "m".to_string(),
        Value::Array(ValueType::U8, vec![Value::U8(1), Value::I8(1)]),
    )];
    assert!(err(GgufWriter::create(&path, &mixed, &specs, 32)).contains("array of U8"));
    let wrong_align = vec![(ALIGNMENT_KEY.to_string(), Value::U32(64))];
    assert!(err(GgufWriter::create(&path, &wrong_align, &specs, 32)).contains("alignment"));

    // Too little data: finish refuses, nothing is left behind.
    let mut w = GgufWriter::create(&path, &[], &specs, 32).unwrap();
    w.write(&[0u8; 12]).unwrap();
    assert_eq!(w.current_tensor(), Some("b"));
    let e = w.finish().unwrap_err().to_string();
    assert!(e.contains("\"b\" incomplete: 0 of 20"), "{e}");
    // Too much data.
    let total: u64 = specs
        .iter()
        .map(|t| t.ty.tensor_bytes(&t.dims).unwrap())
        .sum();
    let mut w = GgufWriter::create(&path, &[], &specs, 32).unwrap();
    let e = w.write(&vec![0u8; total as usize + 1]).unwrap_err();
    assert!(e.to_string().contains("1 bytes more"), "{e}");
    drop(w);
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0, "temp removed");
}

#[test]
fn truncated_and_garbage_files_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.gguf");
    write(&good, 32, 4096);
    let bytes = fs::read(&good).unwrap();
    let f = GgufFile::open(&good).unwrap();
    let last = f.tensors.last().unwrap();
    let data_end = last.offset + last.size;
    let bad = tmp.path().join("bad.gguf");
    // Every truncation point up to the end of the last tensor's data is an error.
    for cut in 0..data_end as usize {
        fs::write(&bad, &bytes[..cut]).unwrap();
        let e = GgufFile::open(&bad).expect_err("truncated").to_string();
        assert!(e.contains("bad.gguf"), "error names the file: {e}");
    }
    // Single-byte corruption anywhere in the header never panics.
    for i in 0..f.data_offset as usize {
        for x in [0xFFu8, 0x01, 0x80] {
            let mut b = bytes.clone();
            b[i] ^= x;
            fs::write(&bad, &b).unwrap();
            let _ = GgufFile::open(&bad);
        }
    }
    // Pseudo-random garbage after a valid magic and version.
    let mut s = 0x1234_5678_9abc_def0u64;
    for n in [0usize, 3, 8, 24, 100, 5000] {
        let mut b = b"GGUF\x03\0\0\0".to_vec();
        for _ in 0..n {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            b.push(s as u8);
        }
        fs::write(&bad, &b).unwrap();
        assert!(GgufFile::open(&bad).is_err());
    }
    // Huge counts do not allocate.
    let mut b = b"GGUF\x03\0\0\0".to_vec();
    b.extend_from_slice(&u64::MAX.to_le_bytes());
    b.extend_from_slice(&u64::MAX.to_le_bytes());
    fs::write(&bad, &b).unwrap();
    let e = GgufFile::open(&bad).unwrap_err().to_string();
    assert!(e.contains("over the limits"), "{e}");
    fs::write(&bad, b"GGML\x03\0\0\0").unwrap();
    assert!(GgufFile::open(&bad)
        .unwrap_err()
        .to_string()
        .contains("magic"));
    fs::write(&bad, b"GGUF\x02\0\0\0").unwrap();
    assert!(GgufFile::open(&bad)
        .unwrap_err()
        .to_string()
        .contains("version 2"));
    let missing = tmp.path().join("missing.gguf");
    let e = GgufFile::open(&missing).unwrap_err().to_string();
    assert!(e.contains("missing.gguf"), "{e}");
}

/// A header of `n_tensors` tensors and the metadata `kvs` (already encoded: key, type, value).
fn raw_header(n_tensors: u64, n_kv: u64, kvs: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF\x03\0\0\0".to_vec();
    b.extend_from_slice(&n_tensors.to_le_bytes());
    b.extend_from_slice(&n_kv.to_le_bytes());
    b.extend_from_slice(kvs);
    b
}

fn raw_kv(key: &str, value_type: ValueType, value: &[u8]) -> Vec<u8> {
    let mut b = (key.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(key.as_bytes());
    b.extend_from_slice(&value_type.id().to_le_bytes());
    b.extend_from_slice(value);
    b
}

#[test]
fn names_arrays_and_counts_over_the_limits_are_refused_before_reading() {
    let path = Path::new("l.gguf");
    // A well-formed header of one KV parses.
    let ok = raw_header(0, 1, &raw_kv("k", ValueType::U8, &[7]));
    assert_eq!(
        GgufFile::parse(path, &ok).unwrap().get("k"),
        Some(&Value::U8(7))
    );
    // A key longer than any real one (the bytes are all there).
    let long = "k".repeat(5000);
    let e = GgufFile::parse(path, &raw_header(0, 1, &raw_kv(&long, ValueType::U8, &[7])))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("l.gguf") && e.contains("over the limit of 4096"),
        "{e}"
    );
    // A tensor name as long.
    let mut t = raw_header(1, 0, &[]);
    t.extend_from_slice(&5000u64.to_le_bytes());
    t.extend_from_slice(long.as_bytes());
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(&4u64.to_le_bytes());
    t.extend_from_slice(&0u32.to_le_bytes());
    t.extend_from_slice(&0u64.to_le_bytes());
    t.resize(t.len().next_multiple_of(32) + 16, 0);
    let e = GgufFile::parse(path, &t).unwrap_err().to_string();
    assert!(
        e.contains("tensor #0 name") && e.contains("over the limit"),
        "{e}"
    );
    // More metadata entries than any real file has, every one present.
    let n = (1u64 << 16) + 1;
    let mut kvs = Vec::new();
    for i in 0..n {
        kvs.extend_from_slice(&raw_kv(&format!("k{i}"), ValueType::U8, &[1]));
    }
    let e = GgufFile::parse(path, &raw_header(0, n, &kvs))
        .unwrap_err()
        .to_string();
    assert!(e.contains("65537 metadata entries"), "{e}");
    // An array longer than any real one, every item present.
    let items = (1u64 << 24) + 1;
    let mut arr = ValueType::U8.id().to_le_bytes().to_vec();
    arr.extend_from_slice(&items.to_le_bytes());
    arr.resize(arr.len() + items as usize, 0);
    let e = GgufFile::parse(
        path,
        &raw_header(0, 1, &raw_kv("a", ValueType::Array, &arr)),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("16777217 items is over the limit"), "{e}");
}
