"""The CLI's shared pieces: the one λ grammar, the one λ policy (runtime = export = CLI), and a
``rain`` that fails loudly on a broken subcommand but names the extra for a missing optional package."""

from __future__ import annotations

import importlib
import math
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
