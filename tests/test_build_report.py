"""What `rain build` prints and measures (issue 25): no Stage 1 table of `-` ending in `nan` for a
method that does not project, no LRM weights loaded by such a build, and a clock that covers the
whole build."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from rain_adapter.cli.main import main
from rain_adapter.merging import pipeline, targets
from rain_adapter.merging.methods import get_method, method_names
from rain_adapter.merging.report import format_stats_table

NO_STAGE1 = [m for m in method_names() if not get_method(m).projects and not get_method(m).stage2]


def _tensors(out):
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(f))
    return got


def _config(out):
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["extra"].pop("build_seconds")
    cfg["extra"]["build_options"].pop("out")
    return cfg


def _argv(triple, out, *more):
    return ["build", "--lrm", str(triple.lrm), "--itm", str(triple.itm), "--base", str(triple.base),
            "--out", str(out), "--no-progress", *more]


def test_no_stage1_methods_are_the_transform_methods():
    assert NO_STAGE1 == ["task-arithmetic", "ties", "dare-ties"]


@pytest.mark.parametrize("method", NO_STAGE1)
def test_method_without_stage1_prints_one_line_and_loads_no_lrm_weights(triple, tmp_path, monkeypatch, capsys,
                                                                        method):
    # the reference: the same build through the LRM load it used to do
    with monkeypatch.context() as m:
        m.setattr(targets, "needs_lrm_weights", lambda opts, method: True)
        assert main(_argv(triple, tmp_path / "loaded", "--method", method, "--seed", "3")) == 0
    loaded_out = capsys.readouterr()
    assert "LRM: module names and shapes from its config" not in loaded_out.err

    from transformers import AutoModelForCausalLM

    def no_load(*a, **k):
        raise AssertionError("the LRM's weights were loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_load)
    assert main(_argv(triple, tmp_path / "light", "--method", method, "--seed", "3")) == 0
    out, err = capsys.readouterr()
    assert "nan" not in out + err
    assert "prot.rank" not in out and "overall" not in out  # no per-module table
    skipped = [line for line in err.splitlines() if "Stage 1: skipped" in line]
    assert len(skipped) == 1 and f"(method {method} does not project" in skipped[0], err
    assert "weights are not loaded" in err

    # byte-identical adapter, same config (fingerprint included) but for the output path and timings
    a, b = _tensors(tmp_path / "loaded"), _tensors(tmp_path / "light")
    assert a.keys() == b.keys() and len(a) == 14
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].numpy().tobytes() == b[k].numpy().tobytes(), k
    assert _config(tmp_path / "loaded") == _config(tmp_path / "light")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_streamed_fingerprint_is_the_loaded_models(triple, dtype):
    """The fingerprint read from the sampled rows of the safetensors equals compute_fingerprint of
    the LRM loaded in that dtype (the record the adapter config stores)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rain_adapter.format.fingerprint import compute_fingerprint
    from rain_adapter.merging import preflight
    from rain_adapter.merging.options import BuildOptions
    from rain_adapter.merging.taskvector import CheckpointReader

    opts = BuildOptions(lrm=triple.lrm, itm=triple.itm, base=triple.base, out="x", method="ties", dtype=dtype)
    sk = preflight.skeleton(AutoConfig.from_pretrained(triple.lrm))
    modules, *_ = preflight.select_targets(opts, get_method("ties"), sk)
    model = AutoModelForCausalLM.from_pretrained(triple.lrm, dtype=opts.model_dtype)
    reader = CheckpointReader(triple.lrm, "LRM")
    assert targets.streamed_fingerprint(reader, modules, opts.model_dtype) == compute_fingerprint(model, list(modules))
    assert reader.loaded == 0  # no whole tensor read


def test_a_method_that_projects_still_loads_the_lrm(triple, calib, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    calls = []
    real = AutoModelForCausalLM.from_pretrained

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counting)
    pipeline.build_adapter(triple.lrm, triple.itm, triple.base, tmp_path / "r", method="rain-stage1",
                           reasoning_calib=calib, min_samples=1, layers=[0], progress=False, verbose=False)
    assert len(calls) == 1


def test_stats_table_never_prints_nan():
    stats = {"a": {"rows": 3, "protected_rank": 2, "residual": 1e-3, "kept_norm": 0.5, "task_norm": 1.0},
             "b": {"projected": False, "kept_norm": 1.0, "task_norm": 1.0}, "c": {}}
    text = format_stats_table(stats)
    assert "nan" not in text and "1.000e-03" in text
    assert "nan" not in format_stats_table({"b": stats["b"]})


# ---- the clock (issue 25, 3) ------------------------------------------------------------------
def test_printed_total_covers_preflight_and_loading(triple, tmp_path, monkeypatch, capsys):
    """The clock starts on entry to build_adapter: a slow step before the configs are read (here
    the output directory check, made slow) and the loading are inside the printed total, and the
    phases (preflight, load, ...) add up to it."""
    import re
    import time

    slow = 1.0
    real = pipeline.output_dir

    def slow_output_dir(opts):
        time.sleep(slow)
        return real(opts)

    monkeypatch.setattr(pipeline, "output_dir", slow_output_dir)
    t0 = time.perf_counter()
    assert main(_argv(triple, tmp_path / "ta", "--method", "task-arithmetic")) == 0
    wall = time.perf_counter() - t0
    err = capsys.readouterr().err
    m = re.search(r"\] wrote .* in ([\d.]+) s total wall time \(preflight ([\d.]+) s, load ([\d.]+) s, "
                  r"stage 1 ([\d.]+) s, stage 2 ([\d.]+) s, write ([\d.]+) s\)$", err, re.M)
    assert m, err
    total, *phases = map(float, m.groups())
    assert slow <= total <= wall + 0.05
    assert wall - total < 0.5 * slow  # only argument parsing lies outside the build
    assert phases[0] >= slow  # the slow step is in the preflight phase
    assert abs(sum(phases) - total) <= 0.1 * len(phases)  # rounding of each printed phase
    recorded = json.loads((tmp_path / "ta" / "adapter_config.json").read_text())["extra"]["build_seconds"]
    assert list(recorded) == ["preflight", "load", "stage1", "stage2", "total"] and recorded["preflight"] >= slow
