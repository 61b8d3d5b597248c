"""The layout keeps its promises (docs/DESIGN.md §11): imports flow one way between the packages,
the core never imports the demo world or the test scaffolding, no guarded imports of our own code,
functions and modules short enough to read, and scripts use public names only.

These read the source with ``ast``; nothing is imported or run.
"""

from __future__ import annotations

import ast
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
    "testing": {"format", "merging", "runtime", "export", "serve", "evaluation", "kernels"},
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


def _imports(dotted: str, path: Path) -> list[tuple[int, str]]:
    """Absolute names of the rain_adapter modules a file imports (relative imports resolved)."""
    is_pkg = path.name == "__init__.py"
    here = dotted.split(".") if is_pkg else dotted.split(".")[:-1]
    if is_pkg:
        here = here[:-1] if here[-1] == "__init__" else here
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith(tuple(ROOTS)):
                # `from . import x` names a submodule: count it
                names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
                out += [(node.lineno, n) for n in names]
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
    seen: dict[str, int] = {}

    def visit(p: str) -> None:
        if seen.get(p) == 1:
            raise AssertionError(f"cycle through {p}")
        if seen.get(p) == 2:
            return
        seen[p] = 1
        for q in ALLOWED[p]:
            visit(q)
        seen[p] = 2

    for p in ALLOWED:
        visit(p)


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
