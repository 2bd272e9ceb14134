"""The import graph of parafuse and parafuse_kernels, read from the source (every import statement,
function-level ones included): no cycle, and the lower layers import nothing above them."""
import ast
import os

from support import ROOT  # noqa: E402
PACKAGES = {"parafuse": os.path.join(ROOT, "parafuse"), "parafuse_kernels": os.path.join(ROOT, "kernels", "parafuse_kernels")}
# what a layer must never import (the front doors and the layers above them)
FORBIDDEN = {"parafuse.parallel": ("parafuse.runtime", "parafuse.generate", "parafuse.diffusers"),
             # the kernels sit beside their references (solvers, codec, prologue), under every door
             "parafuse_kernels": ("parafuse.runtime", "parafuse.generate", "parafuse.diffusers",
                                  "parafuse.parallel.session", "parafuse.parallel.engine")}


def modules() -> dict[str, str]:
    """Module name -> source file, for every module of both packages."""
    out = {}
    for package, folder in PACKAGES.items():
        for dirpath, _, files in os.walk(folder):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), folder)[:-3].replace(os.sep, ".")
                    name = package if rel == "__init__" else f"{package}.{rel.removesuffix('.__init__')}"
                    out[name] = os.path.join(dirpath, f)
    return out


def imports(name: str, path: str, known: set[str]) -> set[str]:
    """The modules of `known` that module `name` imports anywhere in its source. `from P import X`
    imports P.X where that is a module, else P."""
    is_package = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
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

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_the_reader_sees_function_level_imports_and_cycles():
    """The test's own machinery can fail: a function-level import counts, and a cycle is found."""
    g = graph()
    assert "parafuse.diffusers" in g["parafuse"]              # parafuse.parallelize imports it inside a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_lower_layers_import_nothing_above_them():
    bad = [(m, d) for m, deps in graph().items() for layer, above in FORBIDDEN.items()
           if m == layer or m.startswith(layer + ".") for d in deps if any(d == a or d.startswith(a + ".") for a in above)]
    assert bad == []
