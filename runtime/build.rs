//! Embeds the demo model folder (`demo/`) so the binary runs with no model on disk.
use std::fmt::Write as _;
use std::path::Path;

fn main() {
    // The manifest folder as cargo gives it to this run (not as it was when the script was
    // compiled: a build script binary can be reused for a checkout in another folder).
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let dir = Path::new(&manifest).join("demo");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    // A binary without its demo model would fail at `moe-serve run` with no model named: fail
    // the build instead, naming the folder.
    assert!(
        names.iter().any(|n| n == "config.json"),
        "{} holds no demo model (config.json missing): restore it from the repository",
        dir.display()
    );
    let mut src = String::new();
    for (i, n) in names.iter().enumerate() {
        let path = dir.join(n);
        println!("cargo:rerun-if-changed={}", path.display());
        let p = format!("{:?}", path.display().to_string());
        writeln!(
            src,
            "static FILE_{i}: Aligned<[u8; include_bytes!({p}).len()]> = Aligned(*include_bytes!({p}));"
        )
        .unwrap();
    }
    src.push_str("pub static DEMO_FILES: &[crate::weights::EmbeddedFile] = &[\n");
    for (i, n) in names.iter().enumerate() {
        writeln!(
            src,
            "    crate::weights::EmbeddedFile {{ name: {n:?}, bytes: &FILE_{i}.0 }},"
        )
        .unwrap();
    }
    src.push_str("];\n");
    let out = Path::new(&std::env::var("OUT_DIR").unwrap()).join("demo_files.rs");
    std::fs::write(out, src).unwrap();
}
