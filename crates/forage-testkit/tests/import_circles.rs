//! No file of a workspace crate imports a file that imports it back.
//!
//! Every crate's `src/` is parsed (syn); each path a file names that starts with `crate`,
//! `super`, `self` or one of its child modules (in `use` trees, expressions, types and
//! macro calls) is resolved to the file that defines the module it reaches (the longest
//! prefix that is a module file). An item a module re-exports (`pub use`, `pub(crate) use`,
//! `#[macro_export]`) counts as the file that defines it. `mod x;` declarations are not
//! imports, and `#[cfg(test)]` modules may use what they like. A circle is a strongly
//! connected component of more than one file. `FORAGE_IMPORT_EDGES=forage-cloudlet cargo test
//! -p forage-testkit --test import_circles` prints the edges of the crates whose path
//! contains that text.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

type Module = Vec<String>;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).expect("crates/forage-testkit").to_path_buf()
}

/// Module path -> file, for one crate's `src/`.
fn modules(src: &Path) -> BTreeMap<Module, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name() != Some("bin".as_ref()) || dir != src {
                    stack.push(p);
                }
                continue;
            }
            if p.extension() != Some("rs".as_ref()) {
                continue;
            }
            let rel = p.strip_prefix(src).unwrap().with_extension("");
            let mut m: Module = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
            if m.last().is_some_and(|l| l == "mod") {
                m.pop();
            }
            if m == ["lib"] || m == ["main"] {
                m.clear();
            }
            out.insert(m, p);
        }
    }
    out
}

fn is_test_cfg(attrs: &[syn::Attribute]) -> bool {
    attrs
        .iter()
        .any(|a| a.path().is_ident("cfg") && a.meta.require_list().is_ok_and(|l| l.tokens.to_string() == "test"))
}

/// The paths a file names (relative ones as written), and what it re-exports.
#[derive(Default)]
struct Names {
    /// Inline modules (`mod x { .. }`) around what is being visited.
    inline: Vec<String>,
    /// (inline modules around it, the path)
    paths: Vec<(Vec<String>, Vec<String>)>,
    /// (name, path it comes from)
    reexports: Vec<(String, Vec<String>)>,
    macros: Vec<String>,
}

fn use_paths(tree: &syn::UseTree, prefix: &mut Vec<String>, out: &mut Vec<(String, Vec<String>)>) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            use_paths(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => {
            let mut full = prefix.clone();
            if n.ident != "self" {
                full.push(n.ident.to_string());
            }
            out.push((full.last().cloned().unwrap_or_default(), full));
        }
        syn::UseTree::Rename(r) => {
            let mut full = prefix.clone();
            full.push(r.ident.to_string());
            out.push((r.rename.to_string(), full));
        }
        syn::UseTree::Glob(_) => out.push(("*".into(), prefix.clone())),
        syn::UseTree::Group(g) => {
            for t in &g.items {
                use_paths(t, prefix, out);
            }
        }
    }
}

impl<'ast> Visit<'ast> for Names {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if !is_test_cfg(&m.attrs) {
            self.inline.push(m.ident.to_string());
            syn::visit::visit_item_mod(self, m);
            self.inline.pop();
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        let mut found = Vec::new();
        use_paths(&u.tree, &mut Vec::new(), &mut found);
        let public = !matches!(u.vis, syn::Visibility::Inherited);
        for (name, path) in found {
            if public && name != "*" && self.inline.is_empty() {
                self.reexports.push((name, path.clone()));
            }
            self.paths.push((self.inline.clone(), path));
        }
    }

    fn visit_item_macro(&mut self, m: &'ast syn::ItemMacro) {
        if m.attrs.iter().any(|a| a.path().is_ident("macro_export")) {
            if let Some(name) = &m.ident {
                self.macros.push(name.to_string());
            }
        }
        syn::visit::visit_item_macro(self, m);
    }

    /// `pub(crate)` names no item.
    fn visit_visibility(&mut self, _: &'ast syn::Visibility) {}

    fn visit_path(&mut self, p: &'ast syn::Path) {
        if p.leading_colon.is_none() {
            self.paths.push((self.inline.clone(), p.segments.iter().map(|s| s.ident.to_string()).collect()));
        }
        syn::visit::visit_path(self, p);
    }
}

/// `parts` as written in module `here`, made absolute (None: not a path into this crate).
fn absolute(here: &Module, parts: &[String], children: &BTreeSet<String>) -> Option<Module> {
    let first = parts.first()?;
    match first.as_str() {
        "crate" => Some(parts[1..].to_vec()),
        "self" => Some(here.iter().cloned().chain(parts[1..].iter().cloned()).collect()),
        "super" => {
            let mut base = here.clone();
            let mut rest = parts;
            while rest.first().is_some_and(|p| p == "super") {
                base.pop();
                rest = &rest[1..];
            }
            Some(base.into_iter().chain(rest.iter().cloned()).collect())
        }
        name if children.contains(name) => Some(here.iter().cloned().chain(parts.iter().cloned()).collect()),
        _ => None,
    }
}

/// The file (module) an absolute path reaches, following re-exports.
fn target(full: &[String], mods: &BTreeMap<Module, PathBuf>, again: &HashMap<(Module, String), Module>) -> Module {
    let mut n = full.len();
    while n > 0 && !mods.contains_key(&full[..n]) {
        n -= 1;
    }
    let module = full[..n].to_vec();
    match full.get(n) {
        Some(next) => again.get(&(module.clone(), next.clone())).cloned().unwrap_or(module),
        None => module,
    }
}

fn circles(src: &Path) -> Vec<Vec<PathBuf>> {
    let mods = modules(src);
    let names: BTreeMap<Module, Names> = mods
        .iter()
        .map(|(m, p)| {
            let text = std::fs::read_to_string(p).unwrap();
            let file = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let mut n = Names::default();
            n.visit_file(&file);
            (m.clone(), n)
        })
        .collect();
    let children = |m: &Module| -> BTreeSet<String> {
        mods.keys().filter(|c| c.len() == m.len() + 1 && c.starts_with(m)).map(|c| c.last().unwrap().clone()).collect()
    };
    let mut again = HashMap::new();
    for (m, n) in &names {
        let kids = children(m);
        for (name, path) in &n.reexports {
            if let Some(full) = absolute(m, path, &kids) {
                let t = target(&full, &mods, &HashMap::new());
                if &t != m {
                    again.insert((m.clone(), name.clone()), t);
                }
            }
        }
        if !m.is_empty() {
            for mac in &n.macros {
                again.insert((Vec::new(), mac.clone()), m.clone());
            }
        }
    }
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (m, n) in &names {
        let kids = children(m);
        let e = edges.entry(m.clone()).or_default();
        for (inline, p) in &n.paths {
            let here: Module = m.iter().chain(inline).cloned().collect();
            let kids = if inline.is_empty() { kids.clone() } else { BTreeSet::new() };
            if let Some(full) = absolute(&here, p, &kids) {
                let t = target(&full, &mods, &again);
                if &t != m {
                    e.insert(t);
                }
            }
        }
    }
    if std::env::var_os("FORAGE_IMPORT_EDGES").is_some_and(|v| src.to_string_lossy().contains(&*v.to_string_lossy())) {
        for (m, ts) in &edges {
            eprintln!("{m:?} -> {ts:?}");
        }
    }
    strongly_connected(&edges)
        .into_iter()
        .filter(|c| c.len() > 1)
        .map(|c| c.iter().map(|m| mods[m].clone()).collect())
        .collect()
}

/// Tarjan's algorithm.
fn strongly_connected(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct State<'a> {
        edges: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: HashMap<&'a Module, usize>,
        low: HashMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on: BTreeSet<&'a Module>,
        out: Vec<Vec<Module>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a Module) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on.insert(v);
        for w in s.edges.get(v).into_iter().flatten() {
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on.remove(w);
                comp.push(w.clone());
                if w == v {
                    break;
                }
            }
            s.out.push(comp);
        }
    }
    let mut s = State {
        edges,
        index: HashMap::new(),
        low: HashMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.out
}

#[test]
fn no_file_imports_a_file_that_imports_it_back() {
    let root = workspace();
    let mut found = Vec::new();
    let mut crates: Vec<PathBuf> =
        std::fs::read_dir(root.join("crates")).unwrap().flatten().map(|e| e.path()).collect();
    crates.push(root.join("apps").join("hashsearch"));
    crates.sort();
    for c in &crates {
        let src = c.join("src");
        if !src.is_dir() {
            continue;
        }
        for circle in circles(&src) {
            let files: Vec<String> =
                circle.iter().map(|p| p.strip_prefix(&root).unwrap().display().to_string()).collect();
            found.push(files.join(" <-> "));
        }
    }
    assert!(found.is_empty(), "import circles between files:\n{}", found.join("\n"));
}

/// The check finds a circle when there is one.
#[test]
fn a_circle_is_found() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("lib.rs"), "mod a;\nmod b;\npub use a::A;\n").unwrap();
    std::fs::write(src.join("a.rs"), "pub struct A(crate::b::B);\n").unwrap();
    std::fs::write(src.join("b.rs"), "pub struct B;\nfn f(_: super::A) {}\n").unwrap();
    let found = circles(&src);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].len(), 2);
    // Without b's use of A (a re-export of a), there is none.
    std::fs::write(src.join("b.rs"), "pub struct B;\n").unwrap();
    assert!(circles(&src).is_empty());
}
