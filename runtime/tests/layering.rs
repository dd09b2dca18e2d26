//! The layering of moe-runtime's modules, checked on every `cargo test`.
//!
//! Reads every `.rs` file under `runtime/src` (test code left out: `#[cfg(test)]` items and
//! `tests.rs` / `*_tests.rs` files), collects which top-level module refers to which (`use
//! crate::a::..`, `crate::a::b` paths in code, `crate::{a, b}` groups, and `super::` resolved to
//! the module it names), and fails on:
//! - a cycle between top-level modules, printing the cycle and the `file:line` of each edge in it;
//! - an upward import: a module referring to one in a higher layer of [`LAYERS`], naming the
//!   `file:line`;
//! - a top-level module missing from [`LAYERS`], or a name in [`LAYERS`] that is no module.
//!
//! A directory module's children count as that module (`store/pool.rs` is `store`). Modules in
//! one layer may use each other (the cycle check still applies). The scanner is textual: comments
//! and string and char literals are blanked first (line breaks kept, so line numbers hold), which
//! is enough for paths, the only thing it looks for.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The intended layering, lowest first: a module may refer to modules in its own layer or below.
/// To add a module, put it in the lowest layer above everything it uses.
const LAYERS: &[&[&str]] = &[
    // Leaves: file formats, memory, sampling, text.
    &["gguf", "mem", "sampler", "size", "tokenizer", "toolcall"],
    // The error type and the plumbing every module may use.
    &["error", "fsutil", "hub", "mapguard"],
    // Grammars over the tokenizer's tokens (constrained decoding).
    &["constrain"],
    // The model's description and its files.
    &["config", "weights"],
    // The compute backends over the weights, the bundled demo model's files.
    &["backend", "demo"],
    // Building blocks, then the decoder they make up.
    &["layers"],
    &["deltanet", "mla", "store"],
    &["moe"],
    &["model"],
    // The decoder on the backend chosen at run time.
    &["dispatch"],
    &["arch"],
    // What is done with a built model before it runs.
    &["quantize", "hotset"],
    &["cache", "plan"],
    &["calibrate"],
    // The run configuration (TOML) maps onto the types owned by the layers below.
    &["runconfig"],
    // Opening, and one sequence's decoding (driven by the engine and the batcher above).
    &["open", "sequence"],
    &["engine"],
    &["batch"],
    // Tools on top of the library: the random-model writer.
    &["synth"],
];

/// A reference from one top-level module to another.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Edge {
    from: String,
    to: String,
    /// The file of the reference, relative to `runtime/src`.
    file: String,
    line: usize,
}

impl Edge {
    /// `file:line`.
    fn at(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }
}

/// Blanks comments, string literals and char literals with spaces, keeping line breaks.
fn strip(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out: Vec<char> = c.clone();
    let blank = |out: &mut Vec<char>, from: usize, to: usize| {
        for ch in out.iter_mut().take(to.min(c.len())).skip(from) {
            if *ch != '\n' {
                *ch = ' ';
            }
        }
    };
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut i = 0;
    while i < c.len() {
        let next = c.get(i + 1).copied();
        if c[i] == '/' && next == Some('/') {
            let end = c[i..]
                .iter()
                .position(|&x| x == '\n')
                .map_or(c.len(), |p| i + p);
            blank(&mut out, i, end);
            i = end;
        } else if c[i] == '/' && next == Some('*') {
            // Block comments nest.
            let (mut depth, mut j) = (1, i + 2);
            while j < c.len() && depth > 0 {
                if c[j] == '/' && c.get(j + 1) == Some(&'*') {
                    depth += 1;
                    j += 2;
                } else if c[j] == '*' && c.get(j + 1) == Some(&'/') {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j);
            i = j;
        } else if c[i] == 'r'
            && (i == 0 || !ident(c[i - 1]) || (c[i - 1] == 'b' && (i < 2 || !ident(c[i - 2]))))
            && matches!(next, Some('"') | Some('#'))
        {
            // Raw string `r"..."`, `r#"..."#`, `br#"..."#`.
            let hashes = c[i + 1..].iter().take_while(|&&x| x == '#').count();
            if c.get(i + 1 + hashes) != Some(&'"') {
                i += 1;
                continue;
            }
            let mut j = i + 2 + hashes;
            while j < c.len() {
                if c[j] == '"'
                    && c[j + 1..]
                        .iter()
                        .take(hashes)
                        .filter(|&&x| x == '#')
                        .count()
                        == hashes
                {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            blank(&mut out, i, j);
            i = j;
        } else if c[i] == '"' {
            let mut j = i + 1;
            while j < c.len() && c[j] != '"' {
                j += if c[j] == '\\' { 2 } else { 1 };
            }
            blank(&mut out, i, j + 1);
            i = j + 1;
        } else if c[i] == '\'' {
            // A char literal (`'x'`, `'\n'`, `'\u{1F600}'`), else a lifetime or label.
            if next == Some('\\') {
                let mut j = i + 2;
                while j < c.len() && c[j] != '\'' {
                    j += 1;
                }
                blank(&mut out, i, j + 1);
                i = j + 1;
            } else if c.get(i + 2) == Some(&'\'') {
                blank(&mut out, i, i + 3);
                i += 3;
            } else {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    out.into_iter().collect()
}

/// Index of the `close` matching the `open` at `at` (or the end).
fn matching(c: &[char], at: usize, open: char, close: char) -> usize {
    let mut depth = 0usize;
    for (j, &ch) in c.iter().enumerate().skip(at) {
        if ch == open {
            depth += 1;
        } else if ch == close {
            depth -= 1;
            if depth == 0 {
                return j;
            }
        }
    }
    c.len()
}

/// Blanks every `#[cfg(test)]` item (a `mod tests { .. }`, a `mod tests;`, a `use`, a `fn`),
/// keeping line breaks. `code` is already stripped.
fn drop_test_items(code: &str) -> String {
    let mut c: Vec<char> = code.chars().collect();
    let attr: Vec<char> = "#[cfg(test)]".chars().collect();
    let mut i = 0;
    while i + attr.len() <= c.len() {
        if c[i..i + attr.len()] != attr[..] {
            i += 1;
            continue;
        }
        // The item ends at its body's closing brace or at a `;` outside brackets, whichever
        // comes first (further attributes in between are part of it).
        let mut depth = 0i32;
        let mut j = i + attr.len();
        let mut end = c.len();
        while j < c.len() {
            match c[j] {
                '(' | '[' => depth += 1,
                ')' | ']' => depth -= 1,
                ';' if depth == 0 => {
                    end = j + 1;
                    break;
                }
                '{' if depth == 0 => {
                    end = matching(&c, j, '{', '}') + 1;
                    break;
                }
                _ => {}
            }
            j += 1;
        }
        for ch in c.iter_mut().take(end).skip(i) {
            if *ch != '\n' {
                *ch = ' ';
            }
        }
        i = end;
    }
    c.into_iter().collect()
}

fn is_ident(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

/// The identifier starting at `at` after any whitespace, and where it ends.
fn ident_at(c: &[char], at: usize) -> (String, usize) {
    let mut j = at;
    while j < c.len() && c[j].is_whitespace() {
        j += 1;
    }
    let start = j;
    while j < c.len() && is_ident(c[j]) {
        j += 1;
    }
    (c[start..j].iter().collect(), j)
}

/// Whether the word `w` stands at `i` (not part of a longer identifier) followed by `::`.
fn path_word_at(c: &[char], i: usize, w: &[char]) -> Option<usize> {
    if i + w.len() > c.len() || c[i..i + w.len()] != w[..] {
        return None;
    }
    if i > 0 && is_ident(c[i - 1]) {
        return None;
    }
    let mut j = i + w.len();
    while j < c.len() && c[j].is_whitespace() {
        j += 1;
    }
    (c.get(j) == Some(&':') && c.get(j + 1) == Some(&':')).then_some(j + 2)
}

/// The first segments named after `at` (just past a `::`): one identifier, or the leading
/// identifier of each item of a `{ .. }` group.
fn first_segments(c: &[char], at: usize) -> Vec<String> {
    let mut j = at;
    while j < c.len() && c[j].is_whitespace() {
        j += 1;
    }
    if c.get(j) != Some(&'{') {
        let (id, _) = ident_at(c, j);
        return vec![id];
    }
    let end = matching(c, j, '{', '}');
    let mut names = Vec::new();
    let mut k = j + 1;
    let mut depth = 0;
    let mut item_start = true;
    while k < end {
        match c[k] {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => item_start = true,
            ch if item_start && is_ident(ch) => {
                let (id, e) = ident_at(c, k);
                names.push(id);
                item_start = false;
                k = e;
                continue;
            }
            _ => {}
        }
        k += 1;
    }
    names
}

/// The module path of a file relative to `src` (`store/pool.rs` -> `[store, pool]`,
/// `store/mod.rs` -> `[store]`, `lib.rs` -> `[]`).
fn module_path(rel: &str) -> Vec<String> {
    let mut parts: Vec<String> = rel.split('/').map(str::to_string).collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && !(parts.is_empty() && stem == "lib") {
        parts.push(stem.to_string());
    }
    parts
}

/// Test code, left out of the check.
fn is_test_file(rel: &str) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    name == "tests.rs" || name.ends_with("_tests.rs")
}

/// Names the crate root re-exports (`pub use engine::{Model, ..}` in lib.rs) -> their module.
fn root_reexports(lib: &str) -> BTreeMap<String, String> {
    let c: Vec<char> = lib.chars().collect();
    let w: Vec<char> = "use".chars().collect();
    let mut map = BTreeMap::new();
    for i in 0..c.len() {
        if i + 4 > c.len()
            || c[i..i + 3] != w[..]
            || !c[i + 3].is_whitespace()
            || (i > 0 && is_ident(c[i - 1]))
        {
            continue;
        }
        let (module, e) = ident_at(&c, i + 3);
        if module.is_empty() || module == "crate" || c.get(e) != Some(&':') {
            continue;
        }
        let mut j = e + 2;
        while j < c.len() && c[j].is_whitespace() {
            j += 1;
        }
        let end = if c.get(j) == Some(&'{') {
            matching(&c, j, '{', '}')
        } else {
            c[j..]
                .iter()
                .position(|&x| x == ';')
                .map_or(c.len(), |p| j + p)
        };
        let text: String = c[j..end].iter().collect();
        for name in text
            .split(|ch: char| !is_ident(ch))
            .filter(|s| !s.is_empty())
        {
            map.entry(name.to_string())
                .or_insert_with(|| module.clone());
        }
    }
    map
}

/// Every edge between top-level modules in `sources` (path relative to `src`, text).
fn edges(sources: &[(String, String)]) -> (BTreeSet<String>, Vec<Edge>) {
    let sources: Vec<&(String, String)> = sources
        .iter()
        .filter(|(rel, _)| !is_test_file(rel))
        .collect();
    let modules: BTreeSet<String> = sources
        .iter()
        .filter_map(|(rel, _)| module_path(rel).first().cloned())
        .collect();
    let reexports = sources
        .iter()
        .find(|(rel, _)| rel == "lib.rs")
        .map(|(_, text)| root_reexports(&drop_test_items(&strip(text))))
        .unwrap_or_default();
    let resolve = |name: &str| -> Option<String> {
        if modules.contains(name) {
            Some(name.to_string())
        } else {
            reexports.get(name).cloned()
        }
    };
    let crate_w: Vec<char> = "crate".chars().collect();
    let super_w: Vec<char> = "super".chars().collect();
    let mod_w: Vec<char> = "mod".chars().collect();
    let mut out = Vec::new();
    for (rel, text) in sources {
        let path = module_path(rel);
        let Some(from) = path.first().cloned() else {
            continue; // lib.rs: the root only declares modules and re-exports
        };
        let code = drop_test_items(&strip(text));
        let c: Vec<char> = code.chars().collect();
        let line_of = |at: usize| 1 + c[..at].iter().filter(|&&x| x == '\n').count();
        // Inline `mod name { .. }` blocks: `super::` inside one names the file's own module.
        let mut inline: Vec<(usize, usize)> = Vec::new();
        for i in 0..c.len() {
            if i + 3 <= c.len() && c[i..i + 3] == mod_w[..] && (i == 0 || !is_ident(c[i - 1])) {
                let (name, e) = ident_at(&c, i + 3);
                let mut j = e;
                while j < c.len() && c[j].is_whitespace() {
                    j += 1;
                }
                if !name.is_empty() && c.get(j) == Some(&'{') {
                    inline.push((j, matching(&c, j, '{', '}')));
                }
            }
        }
        let mut push = |to: String, at: usize| {
            if to != from {
                out.push(Edge {
                    from: from.clone(),
                    to,
                    file: rel.clone(),
                    line: line_of(at),
                });
            }
        };
        let mut i = 0;
        while i < c.len() {
            if let Some(after) = path_word_at(&c, i, &crate_w) {
                for name in first_segments(&c, after) {
                    if let Some(to) = resolve(&name) {
                        push(to, i);
                    }
                }
                i = after;
            } else if let Some(mut after) = path_word_at(&c, i, &super_w) {
                let mut ups = 1;
                while let Some(a) = path_word_at(&c, after, &super_w) {
                    ups += 1;
                    after = a;
                }
                let depth = path.len() + inline.iter().filter(|(s, e)| *s < i && i < *e).count();
                if ups >= depth {
                    // `super` reaches the crate root: the next segment names the module.
                    for name in first_segments(&c, after) {
                        if let Some(to) = resolve(&name) {
                            push(to, i);
                        }
                    }
                }
                i = after;
            } else {
                i += 1;
            }
        }
    }
    out.sort();
    out.dedup();
    (modules, out)
}

/// The import cycles: in each strongly connected component of more than one module (Tarjan's
/// algorithm), a shortest cycle through each of its modules.
fn cycles(modules: &BTreeSet<String>, edges: &[Edge]) -> Vec<Vec<String>> {
    let names: Vec<&String> = modules.iter().collect();
    let index: BTreeMap<&String, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let mut adj = vec![BTreeSet::new(); names.len()];
    for e in edges {
        if let (Some(&a), Some(&b)) = (index.get(&e.from), index.get(&e.to)) {
            adj[a].insert(b);
        }
    }
    struct Tarjan<'a> {
        adj: &'a [BTreeSet<usize>],
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    impl Tarjan<'_> {
        fn visit(&mut self, v: usize) {
            self.index[v] = Some(self.next);
            self.low[v] = self.next;
            self.next += 1;
            self.stack.push(v);
            self.on_stack[v] = true;
            for &w in &self.adj[v].clone() {
                match self.index[w] {
                    None => {
                        self.visit(w);
                        self.low[v] = self.low[v].min(self.low[w]);
                    }
                    Some(iw) if self.on_stack[w] => self.low[v] = self.low[v].min(iw),
                    Some(_) => {}
                }
            }
            if Some(self.low[v]) == self.index[v] {
                let mut scc = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack[w] = false;
                    scc.push(w);
                    if w == v {
                        break;
                    }
                }
                if scc.len() > 1 {
                    self.out.push(scc);
                }
            }
        }
    }
    let n = names.len();
    let mut t = Tarjan {
        adj: &adj,
        index: vec![None; n],
        low: vec![0; n],
        on_stack: vec![false; n],
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in 0..n {
        if t.index[v].is_none() {
            t.visit(v);
        }
    }
    // Per component, a shortest cycle through each of its modules, each cycle listed once
    // (starting from its first module by name).
    let mut found: BTreeSet<Vec<usize>> = BTreeSet::new();
    for scc in t.out {
        let inside: BTreeSet<usize> = scc.iter().copied().collect();
        for &start in &inside {
            let mut prev: BTreeMap<usize, usize> = BTreeMap::new();
            let mut queue = std::collections::VecDeque::from([start]);
            let mut last = None;
            'bfs: while let Some(v) = queue.pop_front() {
                for &w in &adj[v] {
                    if !inside.contains(&w) {
                        continue;
                    }
                    if w == start {
                        last = Some(v);
                        break 'bfs;
                    }
                    if let std::collections::btree_map::Entry::Vacant(e) = prev.entry(w) {
                        e.insert(v);
                        queue.push_back(w);
                    }
                }
            }
            let Some(last) = last else { continue };
            let mut cycle = vec![last];
            while let Some(&p) = prev.get(cycle.last().unwrap()) {
                cycle.push(p);
            }
            cycle.reverse();
            let first = (0..cycle.len()).min_by_key(|&k| cycle[k]).unwrap();
            cycle.rotate_left(first);
            found.insert(cycle);
        }
    }
    found
        .into_iter()
        .map(|mut cycle| {
            cycle.push(cycle[0]);
            cycle.into_iter().map(|i| names[i].clone()).collect()
        })
        .collect()
}

/// Every layering problem of `sources` under `layers`, one line each (empty: the layering holds).
fn problems(sources: &[(String, String)], layers: &[&[&str]]) -> Vec<String> {
    let (modules, edges) = edges(sources);
    let mut out = Vec::new();
    let layer_of: BTreeMap<&str, usize> = layers
        .iter()
        .enumerate()
        .flat_map(|(l, names)| names.iter().map(move |n| (*n, l)))
        .collect();
    for m in &modules {
        if !layer_of.contains_key(m.as_str()) {
            out.push(format!(
                "module `{m}` has no layer: add {m} to the layer table in \
                 runtime/tests/layering.rs (in the lowest layer above what it uses)"
            ));
        }
    }
    for name in layer_of.keys() {
        if !modules.contains(*name) {
            out.push(format!(
                "the layer table in runtime/tests/layering.rs names `{name}`, which is no \
                 module of runtime/src: remove it"
            ));
        }
    }
    for cycle in cycles(&modules, &edges) {
        let mut lines = vec![format!("import cycle: {}", cycle.join(" -> "))];
        for pair in cycle.windows(2) {
            let at: Vec<String> = edges
                .iter()
                .filter(|e| e.from == pair[0] && e.to == pair[1])
                .map(Edge::at)
                .collect();
            lines.push(format!(
                "    {} -> {} at {}",
                pair[0],
                pair[1],
                at.join(", ")
            ));
        }
        out.push(lines.join("\n"));
    }
    for e in &edges {
        if let (Some(&lf), Some(&lt)) = (layer_of.get(e.from.as_str()), layer_of.get(e.to.as_str()))
        {
            if lf < lt {
                out.push(format!(
                    "upward import at {}: `{}` (layer {lf}) uses `{}` (layer {lt}); move the \
                     shared item down or the user up",
                    e.at(),
                    e.from,
                    e.to
                ));
            }
        }
    }
    out
}

/// Every `.rs` file under `dir`, as (path relative to `root`, text), in path order.
fn read_sources(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            read_sources(root, &p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            let rel = p.strip_prefix(root).expect("under root");
            let rel = rel.to_string_lossy().replace('\\', "/");
            let text = std::fs::read_to_string(&p)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
            out.push((rel, text));
        }
    }
}

#[test]
fn runtime_modules_are_layered() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut sources = Vec::new();
    read_sources(&src, &src, &mut sources);
    if std::env::var_os("LAYERING_EDGES").is_some() {
        let (_, all) = edges(&sources);
        let pairs: BTreeSet<(String, String)> = all.into_iter().map(|e| (e.from, e.to)).collect();
        for (a, b) in pairs {
            println!("{a} -> {b}");
        }
    }
    let found = problems(&sources, LAYERS);
    assert!(
        found.is_empty(),
        "{} layering problem(s) in runtime/src:\n{}",
        found.len(),
        found.join("\n")
    );
}

/// The files that describe the model and must reach compute only through the backend.
const MODEL_CODE: &[&str] = &[
    "layers.rs",
    "model.rs",
    "moe.rs",
    "deltanet.rs",
    "mla.rs",
    "arch/",
];

/// Names model code must not use: kernels, a concrete backend, a device.
const DEVICE_NAMES: &[&str] = &["moe_kernels", "backend::cpu", "Cpu", "Cuda", "cudarc"];

/// `file:line: word` for every device name in model code (comments and strings ignored).
fn device_names_in_model_code(sources: &[(String, String)]) -> Vec<String> {
    let mut out = Vec::new();
    for (rel, text) in sources {
        if !MODEL_CODE
            .iter()
            .any(|m| rel == m || (m.ends_with('/') && rel.starts_with(m)))
        {
            continue;
        }
        let code = drop_test_items(&strip(text));
        for (n, line) in code.lines().enumerate() {
            for word in DEVICE_NAMES {
                let hit = line.match_indices(word).any(|(i, _)| {
                    let before = line[..i].chars().next_back();
                    let after = line[i + word.len()..].chars().next();
                    !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
                });
                if hit {
                    out.push(format!("{rel}:{}: {word}", n + 1));
                }
            }
        }
    }
    out
}

#[test]
fn model_code_names_no_kernel_and_no_device() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut sources = Vec::new();
    read_sources(&src, &src, &mut sources);
    let found = device_names_in_model_code(&sources);
    assert!(
        found.is_empty(),
        "model code must compute through `Backend` ops only (the host form is `Host`):\n{}",
        found.join("\n")
    );
    // The check itself finds what it looks for.
    let planted = vec![(
        "layers.rs".to_string(),
        "fn f() { moe_kernels::matmul(); } // Cpu\nlet s = \"Cuda\";\nuse crate::backend::Cpu;"
            .to_string(),
    )];
    assert_eq!(
        device_names_in_model_code(&planted),
        vec!["layers.rs:1: moe_kernels", "layers.rs:3: Cpu"]
    );
}

mod scanner {
    use super::*;

    fn src(files: &[(&str, &str)]) -> Vec<(String, String)> {
        files
            .iter()
            .map(|(p, t)| (p.to_string(), t.to_string()))
            .collect()
    }

    #[test]
    fn finds_a_cycle_and_an_upward_import() {
        let files = src(&[
            (
                "lib.rs",
                "pub mod low;\npub mod mid;\npub mod high;\npub use high::Thing;\n",
            ),
            ("low.rs", "use crate::mid::M;\n"),
            ("mid/mod.rs", "mod part;\n"),
            ("mid/part.rs", "\nfn f() { let _ = crate::low::L; }\n"),
            ("high.rs", "use crate::{low::L, mid};\n"),
        ]);
        let found = problems(&files, &[&["low"], &["mid"], &["high"]]);
        let text = found.join("\n");
        assert!(
            text.contains("import cycle: low -> mid -> low")
                && text.contains("low -> mid at low.rs:1")
                && text.contains("mid -> low at mid/part.rs:2"),
            "{text}"
        );
        assert!(
            text.contains("upward import at low.rs:1: `low` (layer 0) uses `mid` (layer 1)"),
            "{text}"
        );
        // high -> low and high -> mid go down: not problems.
        assert_eq!(found.len(), 2, "{text}");
    }

    #[test]
    fn comments_strings_and_test_code_are_not_imports() {
        let files = src(&[
            (
                "a.rs",
                concat!(
                    "// use crate::b::X;\n",
                    "/* crate::b /* nested */ crate::b */\n",
                    "const S: &str = \"crate::b::X\";\n",
                    "const R: &str = r#\"crate::b \"quoted\" \"#;\n",
                    "const Q: char = '\"'; fn f<'a>(x: &'a u8) {}\n",
                    "#[cfg(test)]\nmod tests { use crate::b::X; }\n",
                    "#[cfg(test)]\nuse crate::b::Y;\n",
                    "#[cfg(test)]\n#[path = \"a_tests.rs\"]\nmod more;\n",
                ),
            ),
            ("a_tests.rs", "use crate::b::X;\n"),
            ("b/mod.rs", "pub struct X;\n"),
            ("b/tests.rs", "use crate::a;\n"),
        ]);
        let (_, e) = edges(&files);
        assert!(e.is_empty(), "{e:?}");
    }

    #[test]
    fn super_resolves_to_the_module_it_names() {
        let files = src(&[
            ("lib.rs", "pub use b::Item;\n"),
            (
                "a.rs",
                "use super::b::X;\nmod inner { use super::c::Y; }\nfn f() { crate::Item; }\n",
            ),
            ("b/mod.rs", "mod c;\n"),
            ("b/c.rs", "use super::X;\nuse super::super::a::Z;\n"),
            // `super` inside `a`'s inline module names `a`, not this `c`.
            ("c.rs", "pub struct Y;\n"),
        ]);
        let (_, e) = edges(&files);
        let got: Vec<String> = e
            .iter()
            .map(|e| format!("{} -> {} at {}", e.from, e.to, e.at()))
            .collect();
        assert_eq!(
            got,
            ["a -> b at a.rs:1", "a -> b at a.rs:3", "b -> a at b/c.rs:2"]
        );
    }
}
