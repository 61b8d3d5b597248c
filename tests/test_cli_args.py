"""The CLI's shared pieces: the one λ grammar, the one λ policy (runtime = export = CLI), a
``rain`` that fails loudly on a broken subcommand but names the extra for a missing optional package,
plain-text help for every subcommand, one ``--dtype``, and input errors (one line) vs bugs (traceback)."""

from __future__ import annotations

import importlib
import math
import re
import warnings

import pytest

from rain_adapter.format.lambdas import MAX_LAMBDAS, LambdaRangeWarning, check_lambda, parse_lambdas


# ----------------------------------------------------------------------------------- λ grammar
@pytest.mark.parametrize("spec, want", [
    ("0:1.5:0.25", [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]),
    ("0:1:0.3", [0.0, 0.3, 0.6, 0.9]),                 # stop included only when on the grid
    ("0.1:0.3:0.1", [0.1, 0.2, 0.3]),                   # rounding error does not drop stop
    ("0, 0.5,1", [0.0, 0.5, 1.0]),
    ("0.5,1,", [0.5, 1.0]),                             # empty items skipped
    ("1.5", [1.5]),
    ("0:1:0.5,2", [0.0, 0.5, 1.0, 2.0]),                # ranges and numbers mix
    ("-1:-0.5:0.25", [-1.0, -0.75, -0.5]),
    ("0.25:0.25:1", [0.25]),
])
def test_lambda_grammar_ranges_and_lists(spec, want):
    assert parse_lambdas(spec) == pytest.approx(want)


@pytest.mark.parametrize("spec, match", [
    ("", "no values"),
    (" , ", "no values"),
    ("a,b", "'a' is not a number"),
    ("0:1", "start:stop:step"),
    ("0:1:0.5:2", "start:stop:step"),
    ("0:x:0.5", "'x' is not a number"),
    ("1:0:0.5", "step > 0 and stop >= start"),
    ("0:1:0", "step > 0 and stop >= start"),
    ("0:1:-0.5", "step > 0 and stop >= start"),
    ("0:inf:1", "finite"),
    ("nan", "finite"),
    ("0.5,inf", "finite"),
    ("0.5,1,0.5", "duplicate values 0.5"),
    ("0:1:0.5,1", "duplicate values 1"),
    (f"0:{MAX_LAMBDAS}:1", "at most"),
])
def test_lambda_grammar_errors_name_the_option(spec, match):
    with pytest.raises(ValueError, match=match) as ei:
        parse_lambdas(spec)
    assert "--lambdas" in str(ei.value)


def test_cli_lambdas_error_is_a_clean_exit(tmp_path, capsys):
    from rain_adapter.cli.main import main

    rc = main(["export", "peft", str(tmp_path / "missing"), str(tmp_path / "o"), "--lambdas", "0:1"])
    assert rc == 2 and "rain export: error: --lambdas '0:1': a range is start:stop:step" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ λ policy
def test_check_lambda_policy():
    check_lambda([0.0, 2.0], (0.0, 2.0))                 # endpoints are inside
    check_lambda(5.0)                                     # no range known: only finiteness
    for bad in (math.nan, [0.5, math.inf], -math.inf):
        with pytest.raises(ValueError, match="finite"):
            check_lambda(bad, (0.0, 2.0))

    class MyError(ValueError):
        pass

    with pytest.raises(MyError, match="what: λ must be finite"):
        check_lambda([math.nan], error=MyError, what="what")
    with pytest.warns(LambdaRangeWarning, match=r"λ \[-1.0, 3.0\] outside the adapter's lambda_range \[0, 2\]"):
        check_lambda([-1.0, 0.5, 3.0], (0.0, 2.0))
    assert issubclass(LambdaRangeWarning, UserWarning)


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
    """A tiny low-rank adapter with lambda_range [0, 2], in memory and on disk, and its model."""
    from rain_adapter import RainConfig, compute_fingerprint, save_adapter
    from rain_adapter.testing.tiny import random_deltas, tiny_model

    model = tiny_model("qwen2", seed=0)
    deltas = random_deltas(model, rank=2, scale=0.3, seed=1)
    cfg = RainConfig(base_model_name_or_path="tiny-qwen2", layers=[0, 1], storage="lowrank", rank=2,
                     lambda_range=[0.0, 2.0], fingerprint=compute_fingerprint(model, list(deltas)))
    path = save_adapter(deltas, cfg, tmp_path_factory.mktemp("cli_args") / "adapter")
    return model, (cfg, deltas), path


def _runtime(model, adapter, lam):
    from rain_adapter import RainAdapter

    rm = RainAdapter.attach(model, adapter)
    try:
        rm.set_lambda(lam)
    finally:
        rm.detach()


def _export(adapter, out, lam):
    from rain_adapter.export.peft import export_peft

    export_peft(adapter, out, lam=lam, progress=False)


def _cli(path, out, lam) -> int:
    from rain_adapter.cli.main import main

    return main(["export", "peft", str(path), str(out), "--lambda", repr(lam), "--quiet"])


@pytest.mark.parametrize("lam, verdict", [(0.5, "ok"), (2.0, "ok"), (5.0, "warn"), (-0.5, "warn"),
                                          (math.nan, "reject"), (math.inf, "reject")])
def test_one_lambda_policy_for_runtime_export_and_cli(tiny_adapter, tmp_path, capsys, lam, verdict):
    from rain_adapter.export.errors import ExportError

    model, adapter, path = tiny_adapter
    if verdict == "reject":
        with pytest.raises(ValueError, match="finite"):
            _runtime(model, adapter, lam)
        with pytest.raises(ExportError, match="finite"):
            _export(adapter, tmp_path / "e", lam)
        assert _cli(path, tmp_path / "c", lam) == 2
        assert "finite" in capsys.readouterr().err
        with pytest.raises(ValueError, match="finite"):
            parse_lambdas(f"0.5,{lam}")
        assert not (tmp_path / "e").exists() and not (tmp_path / "c").exists()
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _runtime(model, adapter, lam)
        _export(adapter, tmp_path / "e", lam)
    ranges = [w for w in caught if issubclass(w.category, LambdaRangeWarning)]
    assert len(ranges) == (2 if verdict == "warn" else 0), [str(w.message) for w in caught]
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert _cli(path, tmp_path / "c", lam) == 0
    err = capsys.readouterr().err
    assert ("rain export: warning: λ" in err and "outside the adapter's lambda_range [0, 2]" in err) \
        == (verdict == "warn"), err
    assert parse_lambdas(repr(lam)) == [lam]              # no range at parse time: accepted


def test_sweep_applies_the_policy_once_per_method(tiny_adapter):
    from rain_adapter import RainAdapter
    from rain_adapter.evaluation.sweep import sweep_attached

    model, adapter, _ = tiny_adapter
    rm = RainAdapter.attach(model, adapter)
    try:
        with pytest.raises(ValueError, match="finite"):   # refused before any generation
            sweep_attached(rm, None, [{"prompt": "x"}], [0.5, math.nan], method="m")
    finally:
        rm.detach()


# ------------------------------------------------------------------------- subcommand imports
def _failing_import(monkeypatch, target: str, exc: BaseException) -> None:
    import rain_adapter.cli.main as M

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == target:
            raise exc
        return real(name, *a, **k)

    monkeypatch.setattr(M.importlib, "import_module", fake)


@pytest.mark.parametrize("exc", [
    ImportError("cannot import name 'export_peft' from 'rain_adapter.export.peft'"),
    ModuleNotFoundError("No module named 'rain_adapter.cli.export'", name="rain_adapter.cli.export"),
])
def test_a_subcommand_that_cannot_import_fails_rain_help_loudly(monkeypatch, exc):
    from rain_adapter.cli.main import main

    _failing_import(monkeypatch, "rain_adapter.cli.export", exc)
    with pytest.raises(ImportError) as ei:
        main(["--help"])
    assert ei.value is exc


def test_a_missing_optional_package_names_the_extra_when_the_command_runs(monkeypatch, tmp_path, capsys):
    import rain_adapter.cli.info as info
    from rain_adapter.cli.main import main

    def needs_uvicorn(args):
        raise ModuleNotFoundError("No module named 'uvicorn'", name="uvicorn")

    monkeypatch.setattr(info, "_run", needs_uvicorn)
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "rain info: error: uvicorn is not installed" in err and 'pip install -e ".[serve]"' in err

    def needs_our_own(args):
        raise ModuleNotFoundError("No module named 'rain_adapter.nowhere'", name="rain_adapter.nowhere")

    monkeypatch.setattr(info, "_run", needs_our_own)
    with pytest.raises(ModuleNotFoundError):              # our own code: a traceback, not a hint
        main(["info", str(tmp_path)])


# --------------------------------------------------------------------------- help, --dtype, errors
def _subcommands():
    """(words, parser) for every ``rain`` subcommand, nested ones (``export peft``, ``ab report``) too."""
    import argparse

    from rain_adapter.cli.main import make_parser

    out = []

    def walk(words, parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    out.append((words + [name], sub))
                    walk(words + [name], sub)

    walk([], make_parser())
    return out


def test_every_subcommand_is_found():
    names = {" ".join(w) for w, _ in _subcommands()}
    assert {"info", "build", "export", "export peft", "export merged", "fidelity", "sweep", "tune", "demo",
            "serve", "ab", "ab report", "plan"} <= names, names


#: reST that must not reach a terminal: roles (:mod:`x`), double-backtick literals, **bold**, `x`_ links
REST = re.compile(r":[a-z]+:`|``|\*\*\w[^*\n]*\*\*|`_")


@pytest.mark.parametrize("words", [w for w, _ in _subcommands()], ids=lambda w: " ".join(w))
def test_help_is_plain_text(words, capsys):
    from rain_adapter.cli.main import main

    with pytest.raises(SystemExit) as ei:
        main([*words, "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert f"rain {' '.join(words)}" in out                       # the usage line names the command
    usage_end = out.index("\n\n") if "\n\n" in out else len(out)
    assert out[usage_end:].strip(), "no description / options after the usage line"
    bad = REST.findall(out)
    assert not bad, f"reST markup in `rain {' '.join(words)} --help`: {bad}\n{out}"


def _dtype_commands():
    return [(w, p) for w, p in _subcommands() if "--dtype" in p._option_string_actions]


def _argv_with_required(words, parser, *extra):
    """``words`` plus a dummy value for every required argument of ``parser``, then ``extra``."""
    argv = list(words)
    for a in parser._actions:
        if a.required and a.option_strings:
            argv += [a.option_strings[0], "1" if a.type in (int, float) else "x"]
        elif not a.option_strings and a.dest != "help" and a.nargs is None:
            argv.append("x")
    return argv + list(extra)


def test_dtype_is_one_option_everywhere():
    from rain_adapter.cli.args import DTYPE_CHOICES
    from rain_adapter.cli.main import make_parser
    from rain_adapter.format.dtypes import DTYPES

    cmds = _dtype_commands()
    assert {" ".join(w) for w, _ in cmds} == {"build", "plan", "export peft", "fidelity", "sweep", "tune", "serve"}
    parser = make_parser()
    for words, sub in cmds:
        action = sub._option_string_actions["--dtype"]
        assert tuple(action.choices) == DTYPE_CHOICES == tuple(sorted(DTYPES)) and action.type is None, words
        for name in DTYPE_CHOICES:                                # every table name parses to itself
            args = parser.parse_args(_argv_with_required(words, sub, "--dtype", name))
            assert args.dtype == name, (words, name)


@pytest.mark.parametrize("bad", ["bf16", "auto", "torch.float32", "Float32"])
def test_a_bad_dtype_is_the_same_argparse_error_everywhere(bad, capsys):
    from rain_adapter.cli.main import make_parser

    parser = make_parser()
    errors = set()
    for words, sub in _dtype_commands():
        with pytest.raises(SystemExit) as ei:
            parser.parse_args(_argv_with_required(words, sub, "--dtype", bad))
        assert ei.value.code == 2
        err = capsys.readouterr().err
        assert f"rain {' '.join(words)}: error: argument --dtype: invalid choice: '{bad}'" in err, err
        errors.add(err.strip().splitlines()[-1].split(": error: ", 1)[1])
    assert len(errors) == 1, errors                               # word for word the same message


def test_a_type_error_is_a_bug_with_a_traceback_a_value_error_one_line(monkeypatch, tmp_path, capsys):
    import rain_adapter.cli.info as info
    from rain_adapter.cli.main import USER_ERRORS, main

    assert not any(issubclass(e, (KeyError, TypeError)) for e in USER_ERRORS)

    def bug(args):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(info, "_run", bug)
    with pytest.raises(TypeError, match="unsupported operand"):   # propagates: Python prints the traceback
        main(["info", str(tmp_path)])

    def key_bug(args):
        return {}["missing"]

    monkeypatch.setattr(info, "_run", key_bug)
    with pytest.raises(KeyError):
        main(["info", str(tmp_path)])
    assert "rain info: error" not in capsys.readouterr().err

    def bad_input(args):
        raise ValueError(f"{tmp_path}/adapter_config.json: field 'storage' is 'sparse'")

    monkeypatch.setattr(info, "_run", bad_input)
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"rain info: error: {tmp_path}/adapter_config.json: field 'storage' is 'sparse'\n"


def test_a_traceback_reaches_the_terminal_through_the_entry_point(tmp_path):
    """``python -m rain_adapter.cli.main`` with a handler that raises TypeError: a traceback on
    stderr, exit status 1 (Python's), not the one-line ``rain CMD: error:`` form."""
    import subprocess
    import sys

    code = ("import sys, rain_adapter.cli.info as info, rain_adapter.cli.main as m\n"
            "def bug(args): raise TypeError('a bug')\n"
            "info._run = bug\n"
            "sys.exit(m.main(['info', sys.argv[1]]))\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr and "TypeError: a bug" in r.stderr
    assert "rain info: error" not in r.stderr


def test_a_model_without_the_expected_linears_is_an_input_error():
    import torch

    from rain_adapter.format.arch import target_linears
    from rain_adapter.testing.tiny import tiny_model

    model = tiny_model("qwen2", seed=0)
    model.model.layers[0].self_attn.q_proj = torch.nn.Identity()
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj' is Identity, expected nn.Linear"):
        target_linears(model, ["q"], [0])
    del model.model.layers[1].mlp.down_proj
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.down_proj' not found"):
        target_linears(model, ["down"], [1])
