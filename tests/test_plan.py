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


# ---- the dispatched LRM (issue 24): --device-map / --max-memory ----------------------------
def _stage(plan, name):
    return next(s for s in plan.stages if s.name == name)


def test_placement_by_hand_for_an_explicit_map():
    """TINY in float32: embed 10·8·4 = 320 B, a layer (576 + 2·8)·4 = 2368 B, norm 32 B, lm_head 320 B."""
    from rain_adapter.merging.plan_dispatch import place

    m = ModelShape.from_config(TINY)
    pl = place(m, 4, {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1.self_attn": "cpu",
                      "model.layers.1": "disk", "model.norm": "disk", "lm_head": "cpu"})
    # layer 1's attention (q 64 + k 32 + v 32 + o 64 weights) on the cpu, the rest of it on disk
    attn = (64 + 32 + 32 + 64) * 4
    assert pl.bytes_by_device == {"0": 320 + 2368, "cpu": attn + 320, "disk": 2368 - attn + 32}
    assert pl.gpus == ["0"] and pl.offloaded == attn + 320 + 2368 - attn + 32
    # per forward: disk bytes read from disk, then everything offloaded over the host link
    assert pl.streamed_seconds(link_gbps=2.0, disk_gbps=1.0) == pytest.approx(
        (2368 - attn + 32) / 1e9 + (attn + 320 + 2368 - attn + 32) / 2e9)


@pytest.mark.parametrize("bad, needle", [
    ({"model.layers.7": 0, "": "cpu"}, "'model.layers.7' is not a module"),
    ({"model.embed_tokens": 0, "model.layers": 0, "model.norm": 0}, "no device for 'lm_head'"),
])
def test_placement_errors_name_the_module(bad, needle):
    m = ModelShape.from_config(TINY)
    with pytest.raises(PlanError, match=needle):
        make_plan(m, CalibShape((5,), 2), PlanOptions(stage2=False, device_map=bad), PROFILES["h200"])


def test_auto_fills_gpus_in_order_then_cpu_then_disk():
    from rain_adapter.merging.plan_dispatch import place

    m = ModelShape.from_config(TINY)
    # GPU 0 holds the embedding and layer 0 (2688 B), GPU 1 layer 1, the cpu the norm, disk lm_head
    pl = place(m, 4, "auto", {"0": 2700, "1": 2390, "cpu": 40})
    assert pl.device_map == {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.norm": "cpu",
                             "lm_head": "disk"}
    assert pl.bytes_by_device == {"0": 2688, "1": 2368, "cpu": 32, "disk": 320}
    # no --max-memory: one GPU of the profile's memory holds it all
    assert place(m, 4, "auto", None, gpu_memory_gib=1.0).bytes_by_device == {"0": m.params * 4}


def test_dispatched_plan_by_hand():
    """Offloaded bytes are brought in once per forward call; each GPU holds its share."""
    m = ModelShape.from_config(TINY)
    big = 1e12
    prof = replace(PROFILES["h200"], tflops=big, fp32_tflops=big, mem_gbps=big, hash_gbps=big, startup_s=0.0,
                   forward_latency_s=0.0, layer_latency_s=0.0, module_latency_s=0.0, link_gbps=1e-6, disk_gbps=1e-6)
    c = CalibShape((5, 7), 6)  # two forwards at batch 1
    dm = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.norm": 0, "lm_head": 1}
    one = make_plan(m, c, PlanOptions(stage2=False), prof)
    plan = make_plan(m, c, PlanOptions(stage2=False, device_map=dm), prof)
    per = 2368 / 1e3  # the cpu layer over a 1e-6 GB/s link: 2368 B / 1000 B/s
    assert _stage(plan, "stage 1 features").seconds == pytest.approx(_stage(one, "stage 1 features").seconds + 2 * per)
    lrm = m.params * 4
    f1, f = _stage(one, "stage 1 features"), _stage(plan, "stage 1 features")
    # GPU 0: embed + layer 0 + norm, plus the offloaded layer while it runs, plus the same working set
    assert f.device == pytest.approx(f1.device - lrm + (320 + 2368 + 32) + 2368)
    assert f.host_anon == pytest.approx(f1.host_anon + 2368)  # the cpu share lives on the host
    # GPU 1 (lm_head) at its peak stage: its share and the largest working set of any stage
    assert plan.placement.need["1"] == pytest.approx(320 + max(s.device - lrm for s in one.stages if s.device > 0))
    assert plan.to_dict()["placement"]["bytes_by_device"] == {"0": 320 + 2368 + 32, "1": 320, "cpu": 2368}
    with pytest.raises(PlanError, match="--sequential and --device-map"):
        make_plan(m, c, PlanOptions(stage2=False, sequential=True, device_map=dm), prof)


def test_cli_device_map_for_a_70b_over_gpus(tmp_path, capsys):
    args = ["plan", "--model", "deepseek-ai/DeepSeek-R1-Distill-Llama-70B", "--profile", "h200", "--dtype",
            "bfloat16", "--device-memory", "80", "--device-map", "auto"]
    assert main(args + ["--max-memory", '{"0": "60GiB", "1": "60GiB", "cpu": "200GiB"}', "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    by = d["placement"]["bytes_by_device"]
    assert set(by) == {"0", "1", "cpu"} and by["cpu"] > 0 and d["placement"]["offloaded_bytes_per_forward"] == by["cpu"]
    assert main(args + ["--max-memory", '{"0": "70GiB", "1": "70GiB", "2": "70GiB"}']) == 0
    out = capsys.readouterr().out
    assert "GPU 2" in out and "nothing offloaded" in out and "fits" in out
    (tmp_path / "map.json").write_text('{"model.layers.0": "gpu"}')
    assert main(args[:-1] + [str(tmp_path / "map.json")]) == 2
    err = capsys.readouterr().err
    assert "map.json" in err and "'gpu' is not a device" in err
