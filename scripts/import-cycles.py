#!/usr/bin/env python3
"""Find import circles between the files of each crate.

Every `crate::`, `super::` and `self::` path in a file (in `use` lines and in code) is
resolved to the file that defines the module it names (the longest prefix that is a
module file); the path `crate::Name` of an item defined in lib.rs is an edge to lib.rs.
`mod x;` declarations are not imports. A circle is a strongly connected component of more
than one file. Exit status 1 if any crate has one.

    scripts/import-cycles.py [crates/NAME ...]
"""
import os
import re
import sys

PATH = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+)(?![\w:])")
USE_GROUP = re.compile(r"\buse\s+(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{([^;]*)\};", re.S)


def modules(src):
    """module path (tuple) -> file, for one crate's src folder."""
    mods = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(root, f), src)[:-3].split(os.sep)
            if rel[0] == "bin":
                continue
            if rel[-1] == "mod":
                rel = rel[:-1]
            if rel in (["lib"], ["main"]):
                rel = []
            mods[tuple(rel)] = os.path.join(root, f)
    return mods


def strip(text):
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    # Test modules may import what they like from their parent: drop them (to their
    # closing brace).
    while True:
        cut = re.search(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text)
        if not cut:
            return text
        depth, i = 1, cut.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        text = text[: cut.start()] + text[i:]


def resolve(here, kind, parts, mods):
    if kind == "crate":
        base = []
    else:
        base = list(here)
        if kind == "super":
            while parts and parts[0] == "super":
                parts = parts[1:]
                base = base[:-1]
            base = base[:-1]
    full = base + parts
    for n in range(len(full), -1, -1):
        if tuple(full[:n]) in mods:
            return tuple(full[:n])
    return ()


def reexports(mods):
    """(module, name) -> the module a `pub use` there takes `name` from."""
    out = {}
    for m, path in mods.items():
        text = strip(open(path).read())
        for g in re.finditer(r"\bpub(?:\([a-z]+\))?\s+use\s+([^;]+);", text):
            body = re.sub(r"\s+", "", g.group(1))
            kind = "self"
            for k in ("crate::", "super::", "self::"):
                if body.startswith(k):
                    kind, body = k[:-2], body[len(k):]
            if "{" in body:
                prefix, items = body.split("{", 1)
                items = items.rstrip("}").split(",")
            else:
                prefix, items = "", [body]
            prefix = [x for x in prefix.split("::") if x]
            for item in items:
                item = item.split("as")[0] if "as" in item and "::" not in item else item
                parts = prefix + [x for x in item.split("::") if x]
                if not parts:
                    continue
                target = resolve(m, kind, parts[:-1] if len(parts) > 1 else parts, mods)
                if target != m:
                    out[(m, parts[-1])] = target
        # `#[macro_export]` macros live at the crate's root whatever file defines them.
        for g in re.finditer(r"#\[macro_export\]\s*macro_rules!\s*([A-Za-z_][A-Za-z0-9_]*)", text):
            if m != ():
                out[((), g.group(1))] = m
    return out


def resolve_full(here, kind, parts):
    if kind == "crate":
        return list(parts)
    base = list(here)
    if kind == "super":
        while parts and parts[0] == "super":
            parts = parts[1:]
            base = base[:-1]
        base = base[:-1]
    return base + list(parts)


def edges_of(mods):
    edges = {m: set() for m in mods}
    again = reexports(mods)
    for m, path in mods.items():
        text = strip(open(path).read())
        refs = []
        for g in USE_GROUP.finditer(text):
            prefix = [p for p in g.group(2).split("::") if p]
            for item in re.split(r",", g.group(3)):
                item = item.strip().split(" as ")[0].strip()
                if not item:
                    continue
                head = re.split(r"::|\{", item)[0].strip()
                if head and head != "self":
                    refs.append((g.group(1), prefix + [head]))
                else:
                    refs.append((g.group(1), prefix))
        for p in PATH.finditer(text):
            refs.append((p.group(1), [x for x in p.group(2).split("::") if x]))
        # Paths that start with a child module's name (`session::run`, `use session::X`).
        children = {c[-1] for c in mods if len(c) == len(m) + 1 and c[: len(m)] == m}
        for p in re.finditer(r"(?<![:\w])([a-z_][a-z0-9_]*)((?:::[A-Za-z_][A-Za-z0-9_]*)*)::", text):
            if p.group(1) in children:
                refs.append(("self", [p.group(1)] + [x for x in p.group(2).split("::") if x]))
        for kind, parts in refs:
            target = resolve(m, kind, parts, mods)
            # An item a module re-exports (`pub use`) comes from where it is defined.
            full = resolve_full(m, kind, parts)
            rest = full[len(target):]
            if rest and (target, rest[0]) in again:
                target = again[(target, rest[0])]
            if target != m:
                edges[m].add(target)
    return edges


def sccs(edges):
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(comp)

    sys.setrecursionlimit(10000)
    for v in list(edges):
        if v not in index:
            visit(v)
    return [c for c in out if len(c) > 1]


def main():
    crates = sys.argv[1:] or sorted(os.path.join("crates", c) for c in os.listdir("crates"))
    bad = 0
    for c in crates:
        src = os.path.join(c, "src")
        if not os.path.isdir(src):
            continue
        mods = modules(src)
        for comp in sccs(edges_of(mods)):
            bad += 1
            names = sorted(os.path.relpath(mods[m], c) for m in comp)
            print(f"{c}: import circle between {', '.join(names)}")
    if bad:
        sys.exit(1)
    print(f"no import circles between the files of {len(crates)} crates")


if __name__ == "__main__":
    main()
