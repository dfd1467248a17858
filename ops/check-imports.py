#!/usr/bin/env python3
"""Checks that imports point down: no two sibling modules of a crate use each other, directly
or through other siblings, and node's top-level layers only use the layers below them.

A module "uses" another when any file in its subtree names a path into the other's subtree:
`crate::a::b`, `super::x`, `self::x`, a child module's name, or a name that a parent module
imports or re-exports (`use` and `pub use` are followed to what they name, so a cycle cannot
hide behind a re-export). Parents and their own children are not compared: a parent module
re-exporting its children, and children using the types their parent defines, is ordinary
Rust. Test code (`#[cfg(test)]` items and the files of test-only modules) is left out: a
test may reach anywhere. Inline modules other than tests are refused, since paths inside
them would resolve differently.

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
IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def module_path(src, path):
    """The module path of a source file, e.g. ['stack', 'transport'] for stack/transport/mod.rs."""
    rel = os.path.relpath(path, src)[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib", "main"):
        rel = rel[:-1]
    return rel


def blank_literals(text):
    """The text with comments removed and string and char literals emptied, so that braces
    and paths inside them count for nothing."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            out.append(" ")
        elif c == "r" and re.match(r'r#*"', text[i:]) and not re.match(r"\w", text[i - 1 : i] or " "):
            hashes = re.match(r"r(#*)\"", text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            out.append('""')
            i = n if end < 0 else end + 1 + len(hashes)
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""')
            i = j + 1
        elif c == "'" and re.match(r"'(\\.[^']*|[^\\'])'", text[i:]):
            m = re.match(r"'(\\.[^']*|[^\\'])'", text[i:])
            out.append("' '")
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def item_end(text, i):
    """The end of the item that starts at `i`: after its `;`, or after the brace matching its
    first `{`, whichever comes first."""
    depth = 0
    while i < len(text):
        c = text[i]
        if c == ";" and depth == 0:
            return i + 1
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return i


def split_tests(text):
    """(the text without `#[cfg(test)]` items, names of the test-only modules it declares)."""
    out, test_mods, i = [], [], 0
    attr = re.compile(r"#\[cfg\(test\)\]")
    while True:
        m = attr.search(text, i)
        if not m:
            out.append(text[i:])
            break
        out.append(text[i : m.start()])
        j = m.end()
        # Further attributes of the same item.
        while True:
            a = re.match(r"\s*#\[", text[j:])
            if not a:
                break
            j = item_end(text.replace("]", "}").replace("[", "{"), j + a.end() - 1)
        decl = re.match(r"\s*(pub(\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*;", text[j:])
        if decl:
            test_mods.append(decl.group(3))
        i = item_end(text, j)
    return "".join(out), test_mods


INLINE = re.compile(r"(?<![\w])(pub(\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*\{")


def inline_modules(code, here):
    """[(module path, body)] of the inline modules in `code`, nested ones included; each
    body without the modules nested in it."""
    found, i = [], 0
    while True:
        m = INLINE.search(code, i)
        if not m:
            return found
        end = item_end(code, m.start())
        name = here + [m.group(3)]
        body = code[m.end() : end - 1]
        found.append((name, strip_inline(body)))
        found += inline_modules(body, name)
        i = end


def strip_inline(code):
    """`code` without the bodies of its inline modules."""
    out, i = [], 0
    while True:
        m = INLINE.search(code, i)
        if not m:
            out.append(code[i:])
            return "".join(out)
        out.append(code[i : m.start()])
        i = item_end(code, m.start())


def expand_use(tree):
    """`a::{b, c::{d@e}, self}` (`@` for ` as `) as [(path, name)]:
    [('a::b', 'b'), ('a::c::d', 'e'), ('a', 'a')]."""
    tree = re.sub(r"\s+", "", tree)
    g = re.match(r"^(.*?)::\{(.*)\}$", tree)
    if not g:
        path, name = tree.split("@") if "@" in tree else (tree, tree.split("::")[-1])
        if name == "self":
            path = path[: -len("::self")]
            name = path.split("::")[-1]
        return [(path, name)]
    prefix, inner = g.group(1), g.group(2)
    parts, depth, start = [], 0, 0
    for k, ch in enumerate(inner + ","):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            if inner[start:k]:
                parts.append(inner[start:k])
            start = k + 1
    out = []
    for p in parts:
        out += expand_use(prefix + "::" + p)
    return out


def uses(text):
    """Every `use` tree of the text as (path, name) pairs."""
    found = []
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        found += expand_use(re.sub(r"\s+as\s+", "@", m.group(1)))
    return found


def absolute(path, here, known):
    """A path as written in module `here` as a list from the crate root, or None if it
    leaves the crate."""
    parts = [p for p in path.split("::") if p]
    if not parts:
        return None
    if parts[0] == "crate":
        return parts[1:]
    if parts[0] in ("super", "self"):
        base = list(here)
        while parts and parts[0] in ("super", "self"):
            if parts[0] == "super":
                base = base[:-1]
            parts = parts[1:]
        return base + parts
    if tuple(here + parts[:1]) in known:
        return here + parts
    return None


def check(crate, src):
    src = os.path.join(ROOT, src)
    texts, modules = {}, {}
    test_only = set()
    for dirpath, _, files in os.walk(src):
        for f in files:
            if f.endswith(".rs"):
                path = os.path.join(dirpath, f)
                raw = open(path, encoding="utf-8").read()
                code, test_mods = split_tests(blank_literals(raw))
                here = module_path(src, path)
                # Inline modules become modules of their own, named like files below this one.
                for name, body in inline_modules(code, here):
                    key = path + "#" + "::".join(name)
                    modules[key], texts[key] = name, body
                code = strip_inline(code)
                modules[path], texts[path] = here, code
                for name in test_mods:
                    # `#[cfg(test)] #[path = "x_tests.rs"] mod tests;` or `mod sim;`
                    p = re.search(r'#\[path\s*=\s*"([^"]+)"\]\s*(pub(\([^)]*\))?\s+)?mod\s+' + name + r"\s*;", raw)
                    owns_dir = f in ("mod.rs", "lib.rs", "main.rs")
                    base = dirpath if owns_dir else os.path.join(dirpath, f[:-3])
                    if p:
                        test_only.add(os.path.normpath(os.path.join(dirpath, p.group(1))))
                    else:
                        test_only.add(os.path.normpath(os.path.join(base, name + ".rs")))
                        test_only.add(os.path.normpath(os.path.join(base, name, "mod.rs")))
    problems = []
    known = {tuple(m) for p, m in modules.items() if p not in test_only}
    # What each module's `use` lines bring in: name -> absolute path.
    aliases = defaultdict(dict)
    for path, here in modules.items():
        if path in test_only:
            continue
        for use_path, name in uses(texts[path]):
            target = absolute(use_path, here, known)
            if target is not None and name != "*":
                aliases[tuple(here)][name] = target

    def resolve(target, seen=()):
        """The module a path lands in: its longest known prefix, followed through the
        aliases of the module it names an item of."""
        mod = list(target)
        while mod and tuple(mod) not in known:
            mod = mod[:-1]
        rest = target[len(mod) :]
        if rest and rest[0] in aliases.get(tuple(mod), {}) and (tuple(mod), rest[0]) not in seen:
            return resolve(aliases[tuple(mod)][rest[0]] + rest[1:], seen + ((tuple(mod), rest[0]),))
        return mod

    # edges[parent][(a, b)] = files in a's subtree that use b's subtree, a and b siblings.
    edges = defaultdict(lambda: defaultdict(set))
    for path, here in modules.items():
        if here == ["main"] or path in test_only:
            continue
        text = texts[path]
        paths = [p for p, _ in uses(text)]
        paths += re.findall(r"\b(?:crate|super|self)(?:::" + IDENT + r")+", text)
        for p in paths:
            target = absolute(p, here, known)
            if target is None:
                continue
            target = resolve(target)
            common = 0
            while common < min(len(here), len(target)) and here[common] == target[common]:
                common += 1
            if common == len(here) or common == len(target):
                continue  # itself, an ancestor or a descendant
            a, b = here[common], target[common]
            edges[tuple(here[:common])][(a, b)].add(os.path.relpath(path, ROOT))
    for parent, pairs in edges.items():
        graph = defaultdict(set)
        for a, b in pairs:
            graph[a].add(b)
        for component in components(graph):
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


def components(graph):
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
