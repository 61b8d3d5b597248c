"""The layout keeps its promises (docs/DESIGN.md §11): imports flow one way between the packages, no
import cycles between modules (imports inside functions count), the core never imports the demo world
or the test scaffolding, no guarded imports of our own code,
functions and modules short enough to read, and scripts use public names only.

These read the source with ``ast``; nothing is imported or run.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "rain_adapter"

#: package -> the packages it may import (itself implied). The order of the pipeline: format is a
#: leaf; merging and runtime sit on it (Stage 2 runs the merged model, so merging uses runtime);
#: export / evaluation / serve consume adapters; demo drives merging + evaluation; cli drives all.
ALLOWED: dict[str, set[str]] = {
    "format": set(),
    "kernels": set(),
    "runtime": {"format", "kernels"},
    "merging": {"format", "runtime", "kernels"},
    "export": {"format", "merging", "runtime", "kernels"},
    "evaluation": {"format", "runtime", "kernels"},
    "serve": {"format", "runtime", "evaluation", "kernels"},
    "demo": {"format", "merging", "runtime", "export", "evaluation", "kernels"},
    "testing": {"format", "merging", "runtime", "export", "serve", "evaluation", "demo", "kernels"},
    "cli": {"format", "merging", "runtime", "export", "serve", "evaluation", "demo", "kernels"},
}
CORE = ("format", "merging", "runtime", "kernels", "export", "serve", "evaluation")
#: excluded from the length limits: the Triton kernels (one kernel body is one function), the toy
#: world and the test scaffolding (not product code)
LIMIT_EXEMPT = ("kernels", "demo", "testing")
MAX_FUNCTION_LINES = 100
MAX_MODULE_LINES = 450


#: the import packages the project installs, by source folder (pyproject.toml's package-dir)
ROOTS = {"rain_adapter": PKG, "rain_kernels": ROOT / "kernels" / "rain_kernels"}


def _source_files() -> list[tuple[str, Path]]:
    """(dotted module, path) for every module the project installs, kernels included."""
    out = []
    for top, folder in ROOTS.items():
        for p in sorted(folder.rglob("*.py")):
            rel = p.relative_to(folder).with_suffix("")
            out.append((".".join((top,) + rel.parts), p))
    return out


def _package_of(dotted: str) -> str | None:
    """The layering package of a module: ``rain_kernels.*`` is ``kernels``, ``rain_adapter.X.*`` is X."""
    parts = dotted.split(".")
    if parts[0] == "rain_kernels":
        return "kernels"
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else None


@functools.cache
def _module_names() -> frozenset[str]:
    """Every installed module and package by dotted name (a package without ``.__init__``)."""
    return frozenset(d.removesuffix(".__init__") for d, _ in _source_files())


def _imports(dotted: str, path: Path) -> list[tuple[int, str]]:
    """Absolute names of the project modules a file imports, anywhere in it (function-level imports
    too), relative imports resolved. ``from P import x`` names the submodule ``P.x`` when there is one,
    else ``P`` itself (a module, or a package: its ``__init__``)."""
    is_pkg = path.name == "__init__.py"
    here = dotted.split(".") if is_pkg else dotted.split(".")[:-1]
    if is_pkg:
        here = here[:-1] if here[-1] == "__init__" else here
    known = _module_names()
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith(tuple(ROOTS)):
                names = {f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names}
                out += [(node.lineno, n) for n in sorted(names)]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith(tuple(ROOTS))]
    return out


def test_imports_flow_one_way_and_core_never_imports_demo_or_testing():
    bad = []
    for dotted, path in _source_files():
        src_pkg = _package_of(dotted)
        if src_pkg is None:  # rain_adapter/__init__.py: the public API re-exports the core
            for line, mod in _imports(dotted, path):
                if _package_of(mod) in ("demo", "testing", "cli"):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
            continue
        for line, mod in _imports(dotted, path):
            dst = _package_of(mod)
            if dst is None:
                if mod.rstrip(".") == "rain_adapter" and src_pkg in CORE:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports the top-level package")
                continue
            if dst != src_pkg and dst not in ALLOWED[src_pkg]:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({src_pkg}) imports {mod} ({dst})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_the_layering_table_has_no_cycles():
    assert not _cycles({p: dict.fromkeys(allowed, "ALLOWED") for p, allowed in ALLOWED.items()})


def _node(mod: str, files: dict[str, Path]) -> str | None:
    """The graph node of an imported name: the module itself, or a package's ``__init__`` module."""
    return mod if mod in files else f"{mod}.__init__" if f"{mod}.__init__" in files else None


def _module_graph() -> dict[str, dict[str, str]]:
    """module -> {module it imports: where (``path:line``)}, over every module of rain_adapter and
    rain_kernels; a package is its ``__init__`` module (``rain_adapter.serve.__init__``). Imports inside
    functions count: deferring one hides a cycle from the interpreter, not from the design."""
    files = dict(_source_files())
    graph: dict[str, dict[str, str]] = {}
    for dotted, path in files.items():
        edges = graph.setdefault(dotted, {})
        for line, mod in _imports(dotted, path):
            dst = _node(mod, files)
            if dst is not None and dst != dotted:
                edges.setdefault(dst, f"{path.relative_to(ROOT)}:{line}")
    return graph


def _strongly_connected(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (each one holds a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _shortest_cycle(graph: dict[str, dict[str, str]], start: str, members: set[str]) -> list[str]:
    """The shortest path ``start -> ... -> start`` inside ``members`` (breadth first)."""
    prev: dict[str, str] = {}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v]):
            if w not in members or w in prev:
                continue
            prev[w] = v
            if w == start:
                path = [start]
                while path[-1] != start or len(path) == 1:
                    path.append(prev[path[-1]])
                return path[::-1]
            queue.append(w)
    raise AssertionError(f"{start} is on no cycle")  # pragma: no cover - a component member always is


def _cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """One shortest cycle through each module of each strongly connected component, deduplicated."""
    seen: set[tuple[str, ...]] = set()
    out = []
    for comp in _strongly_connected(graph):
        for v in comp:
            cyc = _shortest_cycle(graph, v, set(comp))[:-1]
            i = cyc.index(min(cyc))
            key = tuple(cyc[i:] + cyc[:i])
            if key not in seen:
                seen.add(key)
                out.append(list(key) + [key[0]])
    return sorted(out)


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:1"}, "c": {"a": "c.py:1", "d": "c.py:2"},
             "d": {"e": "d.py:1"}, "e": {"d": "e.py:1"}, "f": {"a": "f.py:1"}}
    assert _cycles(graph) == [["a", "b", "c", "a"], ["d", "e", "d"]]


def test_the_module_graph_resolves_relative_submodule_and_package_imports(tmp_path):
    fake = tmp_path / "fake.py"
    fake.write_text("from . import checks, not_a_module\nfrom .. import __version__\nfrom ..serve import app\n"
                    "from .registry import CheckRegistry\n\n\ndef f():\n    from .scoring import aggregate\n")
    got = set(_imports("rain_adapter.evaluation.fake", fake))
    assert got == {(1, "rain_adapter.evaluation"), (1, "rain_adapter.evaluation.checks"), (2, "rain_adapter"),
                   (3, "rain_adapter.serve.app"), (4, "rain_adapter.evaluation.registry"),
                   (8, "rain_adapter.evaluation.scoring")}
    files = dict(_source_files())
    assert _node("rain_adapter", files) == "rain_adapter.__init__"
    assert _node("rain_adapter.evaluation", files) == "rain_adapter.evaluation.__init__"
    assert _node("rain_adapter.serve.app", files) == "rain_adapter.serve.app"
    assert _node("rain_kernels", files) == "rain_kernels.__init__"
    graph = _module_graph()
    assert "rain_adapter.evaluation.checks" in graph["rain_adapter.evaluation.__init__"]
    assert "rain_adapter.evaluation.answers" in graph["rain_adapter.evaluation.checks"]  # from . import answers


def test_no_import_cycles_between_modules():
    """No module reaches itself through imports, counting those inside functions (docs/DESIGN.md §11)."""
    graph = _module_graph()
    bad = []
    for cyc in _cycles(graph):
        where = ", ".join(graph[a][b] for a, b in zip(cyc, cyc[1:]))
        bad.append(f"{' -> '.join(cyc)}   ({where})")
    assert not bad, "import cycles between modules:\n" + "\n".join(bad)


def _package_edges() -> set[tuple[str, str]]:
    """(importer, imported) packages of every import the code makes (top-level __init__ left out)."""
    edges = set()
    for dotted, path in _source_files():
        src = _package_of(dotted)
        for _, mod in _imports(dotted, path) if src is not None else ():
            dst = _package_of(mod)
            if dst is not None and dst != src:
                edges.add((src, dst))
    return edges


def test_the_design_diagram_shows_the_imports_the_code_makes():
    """docs/DESIGN.md §1: solid arrows are exactly the package imports made today; dotted arrows exactly
    the allowed, unused ones (``kernels`` aside: the text says every package but format may use it)."""
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    block = design.split("How the packages import each other", 1)[1].split("```mermaid", 1)[1].split("```", 1)[0]
    arrows: dict[str, set[tuple[str, str]]] = {"-->": set(), "-.->": set()}
    for line in block.splitlines():
        m = re.fullmatch(r"\s*(\w+) (-->|-\.->)(?:\|[^|]*\|)? (\w+)\s*", line)
        if m:
            arrows[m.group(2)].add((m.group(1), m.group(3)))
    used = _package_edges()
    unused = {(p, q) for p, allowed in ALLOWED.items() for q in allowed if q != "kernels"} - used
    problems = [f"{a} --> {b}: drawn solid, but no module of {a}/ imports {b}/" for a, b in arrows["-->"] - used]
    problems += [f"{a} --> {b}: imported, but not drawn solid" for a, b in used - arrows["-->"]]
    problems += [f"{a} -.-> {b}: drawn dotted, but {'imported' if (a, b) in used else 'not allowed'}"
                 for a, b in arrows["-.->"] - unused]
    problems += [f"{a} -.-> {b}: allowed and unused, but not drawn dotted" for a, b in unused - arrows["-.->"]]
    assert not problems, "docs/DESIGN.md §1's import diagram differs from the code:\n" + "\n".join(sorted(problems))


def _guarded_own_imports(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Try):
            continue
        catches = set()
        for h in node.handlers:
            for t in (h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]):
                if isinstance(t, ast.Name):
                    catches.add(t.id)
        if not catches & {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}:
            continue
        for stmt in node.body:
            for sub in ast.walk(stmt):
                own = (isinstance(sub, ast.ImportFrom) and (sub.level or (sub.module or "").startswith(tuple(ROOTS)))) \
                    or (isinstance(sub, ast.Import) and any(a.name.startswith(tuple(ROOTS)) for a in sub.names))
                if own:
                    lines.append(sub.lineno)
    return lines


def test_no_guarded_imports_of_the_package_itself():
    bad = [f"{p.relative_to(ROOT)}:{ln}" for _, p in _source_files() for ln in _guarded_own_imports(p)]
    assert not bad, "imports of rain_adapter's own modules inside try/except ImportError:\n" + "\n".join(bad)


def test_functions_and_modules_are_short_enough_to_read():
    bad = []
    for dotted, path in _source_files():
        if _package_of(dotted) in LIMIT_EXEMPT:
            continue
        src = path.read_text()
        n = len(src.splitlines())
        if n > MAX_MODULE_LINES:
            bad.append(f"{path.relative_to(ROOT)}: {n} lines (max {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines "
                               f"(max {MAX_FUNCTION_LINES})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("folder", ["bench", "examples"])
def test_scripts_use_public_names_only(folder):
    bad = []
    for path in sorted((ROOT / folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(tuple(ROOTS)):
                bad += [f"{path.name}:{node.lineno} {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_")]
                if any(part.startswith("_") for part in (node.module or "").split(".")):
                    bad.append(f"{path.name}:{node.lineno} {node.module}")
    assert not bad, "private names used by scripts:\n" + "\n".join(bad)


def test_every_package_is_named_in_the_readme_and_docs():
    readme = (ROOT / "README.md").read_text()
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    assert "../shared" not in readme, "the README must link nothing outside the repository"
    for pkg in ALLOWED:
        assert f"{pkg}/" in readme, f"README's 'where things are' table does not name {pkg}/"
        assert f"{pkg}/" in design, f"docs/DESIGN.md does not name {pkg}/"


#: folder names that common tools skip as generated output or environments (ruff's and black's
#: default excludes, the standard Python .gitignore template)
EXCLUDED_BY_TOOLS = {"build", "dist", "_build", "buck-out", "node_modules", "site-packages", "venv", "env",
                     "eggs", "sdist", "wheels", "downloads", "parts", "var", "lib", "lib64", "develop-eggs",
                     "htmlcov", "target", "__pypackages__", "out"}


def test_no_package_folder_is_named_like_build_output():
    bad = [str(d.relative_to(ROOT)) for root in ROOTS.values() for d in [root, *root.rglob("*")]
           if d.is_dir() and d.name in EXCLUDED_BY_TOOLS]
    assert not bad, f"folders that ruff / black / .gitignore templates skip as output: {bad}"
