"""Nothing in the repository shadows an installed package (issue 21).

Python puts the folder of the script it runs (or the cwd, for ``python -c``, ``python -m``, a
notebook, ``python -m pytest``) first on ``sys.path``. A module or regular package in such a folder
wins over an installed distribution of the same name: the repo's old ``kernels/__init__.py`` was
imported by transformers ≥ 5.25 in place of the ``kernels`` distribution and broke every Qwen2 /
Llama modeling import. These tests pin that it cannot happen again.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: folders whose scripts run with the folder first on sys.path (the repo root: ``python -c`` /
#: ``-m`` / notebooks there; the others: ``python bench/x.py``, pytest's rootdir insertion)
SCRIPT_FOLDERS = (".", "bench", "examples", "tests", "kernels")
#: our own import packages (pyproject.toml's package-dir), by name and source folder
OURS = {"rain_adapter": ROOT / "rain_adapter", "rain_kernels": ROOT / "kernels" / "rain_kernels"}
#: names of distributions the environments we run in install, beyond the ones installed here
#: (the lent GPU image has pypa's ``build``; transformers ≥ 5.25 depends on ``kernels``)
KNOWN_ELSEWHERE = {"build", "kernels", "triton", "torch", "transformers", "vllm", "lm_eval", "peft"}


def _importable_names(folder: Path) -> dict[str, Path]:
    """Top-level names a ``sys.path`` entry ``folder`` makes importable, to where they lead.

    A ``.py`` module or a folder with ``__init__.py`` (a regular package) counts. A folder without
    one is at most a namespace portion, which never wins over a regular package elsewhere.
    """
    out = {}
    for p in folder.iterdir():
        if p.suffix == ".py" and p.is_file():
            out[p.stem] = p
        elif p.is_dir() and (p / "__init__.py").is_file():
            out[p.name] = p
    return out


def test_no_script_folder_holds_a_module_named_like_an_installed_package_or_the_stdlib():
    owners = metadata.packages_distributions()
    bad = []
    for rel in SCRIPT_FOLDERS:
        for name, path in sorted(_importable_names(ROOT / rel).items()):
            if OURS.get(name) == path:
                continue
            if name in OURS or name in owners or name in KNOWN_ELSEWHERE or name in sys.stdlib_module_names:
                who = owners.get(name) or ("the standard library" if name in sys.stdlib_module_names else "a known distribution")
                bad.append(f"{path.relative_to(ROOT)} shadows `import {name}` ({who})")
    assert not bad, "modules that shadow an installed name when their folder is on sys.path:\n" + "\n".join(bad)


def test_only_our_packages_are_importable_from_the_repo_root():
    assert set(_importable_names(ROOT)) == {"rain_adapter"}, (
        "the repo root must hold no importable module but rain_adapter (kernels live in kernels/rain_kernels/)"
    )
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_transformers_modeling_imports_work_from_the_repo_root_with_the_kernels_distribution():
    """``python -c`` in the repo root: the Qwen2 and Llama modeling modules, rain_adapter and the
    ``kernels`` distribution all import, and ``kernels`` is the installed one, not a repo folder."""
    try:
        metadata.version("kernels")
    except metadata.PackageNotFoundError:  # the [dev] extra installs it: a missing one is a broken env
        pytest.fail("the `kernels` distribution is not installed: `pip install -e \".[dev]\"` installs it "
                    "(this test exists to import transformers with it present)")
    code = (
        "import kernels, transformers.models.qwen2.modeling_qwen2, transformers.models.llama.modeling_llama\n"
        "import rain_adapter, rain_kernels\n"
        "from rain_adapter import RainAdapter\n"
        "print(kernels.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels_file = Path(proc.stdout.strip().splitlines()[-1]).resolve()
    installed = Path(metadata.distribution("kernels").locate_file("kernels/__init__.py")).resolve()
    assert kernels_file == installed, f"`import kernels` found {kernels_file}, not the distribution's {installed}"
