#!/usr/bin/env python3
"""Checks that imports point down: no two sibling modules of a crate use each other, directly
or through other siblings, and node's top-level layers only use the layers below them.

A module "uses" another when any file in its subtree names a path into the other's subtree
(`crate::a::b`, `super::x`, or `use` groups of those). Parents and their own children are
not compared: a parent module re-exporting its children, and children using the types their
parent defines, is ordinary Rust. Tests (`#[cfg(test)]` modules and `*_tests.rs` files) are
left out: a test may reach anywhere.

Run by ops/test.sh. Prints each cycle or layer violation with the files behind it, and
exits 1 if there is one.
"""
import os
import re
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRATES = {"node": "node/src", "raft-store": "raft-store/src", "sip": "sip/src"}
# node's layers, lowest first: a module may use its own layer and those before it.
NODE_LAYERS = [
    {"config", "clock", "hex", "error", "telemetry"},
    {"stack"},
    {"cluster"},
    {"agents"},
    {"operator"},
    {"server"},
]


def module_path(src, path):
    """The module path of a source file, e.g. ['stack', 'transport'] for stack/transport/mod.rs."""
    rel = os.path.relpath(path, src)[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib", "main"):
        rel = rel[:-1]
    return rel


def strip_tests(text):
    """The text without `#[cfg(test)] mod x { ... }` blocks and comments."""
    text = re.sub(r"//[^\n]*", "", text)
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*(pub(\([^)]*\))?\s+)?mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i : m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def expand_groups(text):
    """`use a::{b, c::{d}}` paths as a::b, a::c::d (enough for module resolution)."""
    paths = []
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        stack = [m.group(1)]
        while stack:
            p = re.sub(r"\s+", "", stack.pop())
            g = re.match(r"^(.*?)::\{(.*)\}$", p)
            if not g:
                paths.append(p)
                continue
            prefix, inner = g.group(1), g.group(2)
            depth, start = 0, 0
            for k, ch in enumerate(inner + ","):
                if ch == "{":
                    depth += 1
                elif ch == "}":
                    depth -= 1
                elif ch == "," and depth == 0:
                    part = inner[start:k]
                    if part:
                        stack.append(prefix + "::" + part)
                    start = k + 1
    return paths


def references(text, here):
    """Module paths (as lists) that `text`, in module `here`, points into."""
    found = []
    candidates = expand_groups(text) + re.findall(r"\b(?:crate|super)(?:::\w+)+", text)
    for p in candidates:
        parts = p.split("::")
        if parts[0] == "crate":
            found.append(parts[1:])
        elif parts[0] == "super":
            base = list(here)
            while parts and parts[0] == "super":
                base = base[:-1]
                parts = parts[1:]
            found.append(base + parts)
    return found


def check(crate, src):
    src = os.path.join(ROOT, src)
    modules = {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            if f.endswith(".rs") and not f.endswith("_tests.rs"):
                path = os.path.join(dirpath, f)
                modules[path] = module_path(src, path)
    known = {tuple(m) for m in modules.values()}
    # edges[parent][(a, b)] = files in a's subtree that use b's subtree, a and b siblings.
    edges = defaultdict(lambda: defaultdict(set))
    for path, here in modules.items():
        if here == ["main"]:
            continue
        text = strip_tests(open(path, encoding="utf-8").read())
        for target in references(text, here):
            # The longest known module prefix of the target path.
            while target and tuple(target) not in known:
                target = target[:-1]
            common = 0
            while common < min(len(here), len(target)) and here[common] == target[common]:
                common += 1
            if common == len(here) or common == len(target):
                continue  # itself, an ancestor or a descendant
            a, b = here[common], target[common]
            edges[tuple(here[:common])][(a, b)].add(os.path.relpath(path, ROOT))
    problems = []
    for parent, pairs in edges.items():
        graph = defaultdict(set)
        for a, b in pairs:
            graph[a].add(b)
        for component in cycles(graph):
            where = "::".join((crate,) + parent)
            steps = [
                f"    {a} -> {b}: {', '.join(sorted(files))}"
                for (a, b), files in sorted(pairs.items())
                if a in component and b in component
            ]
            problems.append(f"{where}: {', '.join(component)} use each other\n" + "\n".join(steps))
        if crate == "node" and parent == ():
            rank = {m: i for i, layer in enumerate(NODE_LAYERS) for m in layer}
            for (a, b), files in sorted(pairs.items()):
                if a not in rank or b not in rank:
                    problems.append(f"node: module {a if a not in rank else b} has no layer in ops/check-imports.py")
                elif rank[b] > rank[a]:
                    problems.append(f"node: {a} uses {b}, a layer above it: {', '.join(sorted(files))}")
    return problems


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def main():
    problems = []
    for crate, src in CRATES.items():
        problems += check(crate, src)
    if problems:
        print("check-imports: imports that do not point down:", file=sys.stderr)
        for p in problems:
            print(p, file=sys.stderr)
        return 1
    print(f"check-imports: no import cycles in {', '.join(CRATES)}; node's layers point down", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
