"""``rain plan`` (rain_adapter.merging.plan + cli/plan.py): the cost formulas by hand on a tiny config,
the CLI's table and JSON for a preset and a local config dir, clear errors, and the fit advice."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from rain_adapter.merging.plan import (GiB, PROFILES, REFERENCE_CONFIGS, CalibShape, ModelShape, PlanError,
                                     PlanOptions, estimate_calib, forward_flops, make_plan, projection_flops,
                                     svd_flops)
from rain_adapter.merging.presets import PRESETS
from rain_adapter.cli.main import main

TINY = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=10, torch_dtype="float32")


def test_shapes_and_params_by_hand():
    m = ModelShape.from_config(TINY, "tiny")
    assert m.head_dim == 4
    # q 8x8, k 4x8, v 4x8, o 8x8, gate 16x8, up 16x8, down 8x16
    assert m.modules() == [("q", 8, 8), ("k", 4, 8), ("v", 4, 8), ("o", 8, 8), ("gate", 16, 8), ("up", 16, 8),
                           ("down", 8, 16)]
    assert m.layer_linear == 64 + 32 + 32 + 64 + 128 + 128 + 128 == 576
    # layers·(linear + 2 norms) + embed + lm_head (untied) + final norm
    assert m.params == 2 * (576 + 16) + 2 * 80 + 8
    assert m.feature_width == 8 + 8 + 8 + 16


def test_flop_formulas_by_hand():
    m = ModelShape.from_config(TINY)
    # one batch of 1 x 5 tokens: 2 layers · (2·576·5 + 4·(2·4)·25)
    assert forward_flops(m, [(1, 5)]) == 2 * (2 * 576 * 5 + 4 * 8 * 25)
    assert forward_flops(m, CalibShape((5, 3), 4).batches(2)) == 2 * (2 * 576 * 2 * 5 + 4 * 8 * 2 * 25)
    assert svd_flops(3, 8) == 6 * 8 * 9 + 20 * 27 == svd_flops(8, 3)
    assert projection_flops(16, 8, 3) == 4 * 16 * 8 * (3 + 3)


def test_memory_and_disk_by_hand():
    m = ModelShape.from_config(TINY)
    prof = PROFILES["cpu"]
    c = CalibShape((5, 7), 6)
    plan = make_plan(m, c, PlanOptions(dtype="float32", stage2=False), prof)
    delta = 2 * 576
    assert plan.adapter_bytes == 4 * delta
    assert plan.disk == {"downloads": 3 * m.params * 4, "partial_cache": 4 * delta, "adapter": 4 * delta,
                         "peak_during_build": 8 * delta}
    feat = next(s for s in plan.stages if s.name == "stage 1 features")
    # base + every layer's features (6 rows · 40 floats · 2 layers) + 1.5 × activations of the 7-token batch;
    # float32 checkpoint = float32 model: the LRM is file-backed (RSS, not anonymous)
    act = 1.5 * 7 * (4 * 8 + 3 * 16) * 4
    assert feat.host_anon == pytest.approx(prof.base_gib * GiB + 6 * 40 * 4 * 2 + act)
    assert feat.host_rss == pytest.approx(feat.host_anon + m.params * 4 + prof.lib_gib * GiB)
    seq = make_plan(m, c, PlanOptions(sequential=True, stage2=False), prof)
    f2 = next(s for s in seq.stages if s.name == "stage 1 features")
    assert f2.host_anon == pytest.approx(prof.base_gib * GiB + 6 * 40 * 4 + (5 + 7) * 8 * 4 + act)
    low = make_plan(m, c, PlanOptions(storage="lowrank", rank=2, stage2=False), prof)
    assert low.adapter_bytes == 4 * 2 * sum(min(2, o, i) * (o + i) for _, o, i in m.modules())


def test_fixed_cost_terms_by_hand():
    """Issue 14: start-up, per-forward / per-layer and per-module costs and the started-process
    baseline, with every throughput so large that only the fixed terms are left."""
    m = ModelShape.from_config(TINY)
    big = 1e12
    prof = replace(PROFILES["cpu"], tflops=big, fp32_tflops=big, mem_gbps=big, disk_gbps=big, link_gbps=big,
                   hash_gbps=big, startup_s=1.5, forward_latency_s=0.01, layer_latency_s=0.002,
                   module_latency_s=0.003, base_gib=0.25, lib_gib=0.125)
    c = CalibShape((5, 7), 6)  # batch 1: two forwards of the 2-layer model
    plan = make_plan(m, c, PlanOptions(dtype="float32", stage2=False), prof)
    st = {s.name: s for s in plan.stages}
    assert st["load LRM"].seconds == pytest.approx(1.5)
    assert st["stage 1 features"].seconds == pytest.approx(2 * (0.01 + 2 * 0.002))
    assert st["stage 1 project"].seconds == pytest.approx(7 * 2 * 0.003)
    assert plan.seconds == pytest.approx(1.5 + 0.028 + 0.042)
    # --sequential: one call per layer and batch
    seq = make_plan(m, c, PlanOptions(dtype="float32", sequential=True, stage2=False), prof)
    assert next(s for s in seq.stages if s.name == "stage 1 features").seconds == pytest.approx(2 * 2 * (0.01 + 0.002))
    # the baseline: anonymous in every stage, the file-backed part in RSS only
    for s in plan.stages:
        assert s.host_anon >= 0.25 * GiB and s.host_rss >= s.host_anon + 0.125 * GiB
    assert st["load LRM"].host_anon == 0.25 * GiB  # float32 checkpoint: the LRM is file-backed
    # causal attention at batch 1: 2·H·d·T² (padding mask at batch 2: 4·H·d·T²)
    assert st["stage 1 features"].flops == 2 * (2 * 576 * 5 + 2 * 8 * 25) + 2 * (2 * 576 * 7 + 2 * 8 * 49)
    b2 = make_plan(m, c, PlanOptions(dtype="float32", batch_size=2, stage2=False), prof)
    assert next(s for s in b2.stages if s.name == "stage 1 features").flops == forward_flops(m, [(2, 7)])


def test_estimated_calibration_skips_long_samples():
    s = [{"prompt": "a" * 10, "reasoning": "b" * 90}, {"prompt": "x", "reasoning": "y" * 9999}]
    c = estimate_calib(s, ("prompt", "reasoning"), radius=5, max_samples=None, max_seq_len=4096, tokens_per_char=0.5)
    assert c.lengths == (50 + 16,) and c.positions == 12


def test_presets_have_offline_configs():
    for name, p in PRESETS.items():
        assert p.lrm in REFERENCE_CONFIGS, name
    m = ModelShape.from_config(REFERENCE_CONFIGS["deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"])
    assert 7.5e9 < m.params < 7.7e9  # the 7B's published 7.62B


def test_cli_table_and_json_for_a_preset(capsys):
    assert main(["plan", "--preset", "qwen7b", "--profile", "h200", "--dtype", "bfloat16", "--stage2"]) == 0
    out = capsys.readouterr().out
    for word in ("DeepSeek-R1-Distill-Qwen-7B", "stage 1 features", "stage 1 project", "stage 2", "disk (GiB)",
                 "fits"):
        assert word in out
    assert main(["plan", "--preset", "qwen7b", "--profile", "h200", "--dtype", "bfloat16", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params"] > 7e9 and d["fits"] and d["calibration"]["samples"] > 0
    assert {s["name"] for s in d["stages"]} >= {"load LRM", "stage 1 features", "assemble + write"}


def test_cli_for_a_local_config_dir(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    assert main(["plan", "--model", str(tmp_path), "--samples", "4", "--tokens-per-sample", "100", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["calibration"] == {"samples": 4, "tokens": 400, "positions": 48, "max_len": 100, "source": "given numbers",
                                "exact": False}
    assert main(["plan", "--model", str(tmp_path / "config.json")]) == 0
    assert "total / peak" in capsys.readouterr().out


def test_bad_input_names_it(tmp_path, capsys):
    cfg = dict(TINY)
    del cfg["num_key_value_heads"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["plan", "--model", str(tmp_path)]) == 2
    assert "num_key_value_heads" in capsys.readouterr().err
    assert main(["plan", "--preset", "nosuch"]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert main(["plan", "--model", str(tmp_path / "missing")]) == 2
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(PlanError, match="--rank"):
        make_plan(ModelShape.from_config(TINY), CalibShape((5,), 2), PlanOptions(storage="lowrank"), PROFILES["cpu"])


def test_small_device_says_sequential(capsys):
    assert main(["plan", "--preset", "qwen32b", "--profile", "h200", "--dtype", "bfloat16",
                 "--device-memory", "40"]) == 0
    out = capsys.readouterr().out
    assert "use --sequential" in out
    assert main(["plan", "--preset", "qwen32b", "--profile", "h200", "--dtype", "bfloat16", "--device-memory", "40",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] is False
