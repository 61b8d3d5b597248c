"""End-to-end `rain build` (Stage 1, --no-stage2) on the tiny sharded triple."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rain_adapter.merging.pipeline import build_adapter
from rain_adapter.testing.fixtures import PLAIN_CHAT_TEMPLATE

N_SAMPLES = 3  # 3 × 12 = 36 thinking positions < hidden 64


# `triple` and `calib`: the shared session fixtures of conftest.py


def _build(triple, calib, out, **kw):
    kw.setdefault("min_samples", 1)
    return build_adapter(triple.lrm, triple.itm, triple.base, out, reasoning_calib=calib, progress=False, **kw)


def _features(model, calib_path):
    """Independent capture: full-sequence forward hooks, rows picked afterwards."""
    from transformers import AutoTokenizer

    from rain_adapter.format.arch import target_linears
    from rain_adapter.merging.calibration import prepare_reasoning_calibration

    tok = AutoTokenizer.from_pretrained(model.name_or_path)
    cs = prepare_reasoning_calibration(tok, calib_path, min_samples=1)
    mods = target_linears(model)
    store = {n: [] for n in mods}
    hs = [m.register_forward_pre_hook(lambda m, a, n=n: store[n].append(a[0][0].detach().clone()))
          for n, m in mods.items()]
    with torch.no_grad():
        for it in cs.items:
            model(torch.tensor([it.input_ids]))
    for h in hs:
        h.remove()
    return {n: torch.cat([x[it.positions] for x, it in zip(v, cs.items)]) for n, v in store.items()}


def _residuals(triple, calib, adapter):
    """Per module ‖(RainLinear(λ=1) − RainLinear(λ=0)) X‖ / ‖Δ_I X‖ through the real attach path."""
    from transformers import AutoModelForCausalLM

    from rain_adapter import RainAdapter
    from rain_adapter.merging.taskvector import CheckpointReader, task_vector

    lrm = AutoModelForCausalLM.from_pretrained(triple.lrm, dtype=torch.float32).eval()
    X = _features(lrm, calib)
    rm = RainAdapter.attach(lrm, adapter)
    mods = dict(rm.model.named_modules())
    itm, base = CheckpointReader(triple.itm), CheckpointReader(triple.base)
    res, kept = {}, {}
    with torch.no_grad():
        for n, x in X.items():
            rm.set_lambda(1.0)
            y1 = mods[n](x[None])[0]
            rm.set_lambda(0.0)
            y0 = mods[n](x[None])[0]
            d = task_vector(itm, base, n).delta
            res[n] = float((y1 - y0).norm() / (x @ d.T).norm())
            kept[n] = float(mods[n].delta.norm() / d.norm()) if getattr(mods[n], "delta", None) is not None else None
    return res, kept


def test_hard_exact_keeps_thinking_outputs(triple, calib, tmp_path):
    out = _build(triple, calib, tmp_path / "hard", projection="hard", protect_energy=1.0)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["method"] == "rain-stage1" and cfg["stage2"]["applied"] is False
    st = cfg["stage1"]["modules"]
    assert len(st) == 14 and cfg["stage1"]["n_positions"] == 12 * N_SAMPLES
    assert all(s["rows"] == 12 * N_SAMPLES and s["residual"] <= 1e-4 for s in st.values())
    assert cfg["stage1"]["calib_hash"] and cfg["stage1"]["radius"] == 5
    assert set(cfg["fingerprint"]) == set(st)
    res, _ = _residuals(triple, calib, out)
    assert max(res.values()) <= 1e-4, res
    kept = [s["kept_norm"] for s in st.values()]
    assert sum(kept) / len(kept) > 0.5 and min(kept) > 0.2  # most of Δ survives outside the constraint
    assert not (tmp_path / "hard.partial").exists()


def test_no_projection_breaks_constraint(triple, calib, tmp_path):
    out = _build(triple, calib, tmp_path / "none", projection="none")
    res, _ = _residuals(triple, calib, out)
    assert min(res.values()) > 0.5  # Δ_I itself moves the thinking-position outputs: the test can fail
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert all(abs(s["kept_norm"] - 1) < 1e-6 for s in cfg["stage1"]["modules"].values())


def test_project_layers_projects_only_those(triple, calib, tmp_path):
    """--project-layers 0: layer 0 keeps the thinking outputs (residual ≤ 1e-4 through attach),
    layer 1 carries the plain task vector (residual 1, kept norm 1); bad layer ids are refused."""
    from rain_adapter.format.arch import module_layer

    out = _build(triple, calib, tmp_path / "pl", projection="hard", protect_energy=1.0, project_layers=[0])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["stage1"]["project_layers"] == [0]
    st = cfg["stage1"]["modules"]
    res, _ = _residuals(triple, calib, out)
    for n, r in res.items():
        if module_layer(n) == 0:
            assert r <= 1e-4 and st[n]["residual"] <= 1e-4, (n, r)
        else:
            assert abs(r - 1) < 1e-4 and st[n] == {"projected": False, "kept_norm": 1.0,
                                                   "task_norm": pytest.approx(st[n]["task_norm"])}, (n, r, st[n])
            assert st[n]["task_norm"] > 0
    with pytest.raises(Exception, match="project-layers"):
        _build(triple, calib, tmp_path / "bad", project_layers=[0, 7])
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


def test_energy_and_ridge_tradeoff(triple, calib, tmp_path):
    a = json.loads((_build(triple, calib, tmp_path / "e90", protect_energy=0.9) / "adapter_config.json").read_text())
    b = json.loads((_build(triple, calib, tmp_path / "r", projection="ridge", ridge=0.1) / "adapter_config.json").read_text())
    for c in (a, b):
        for s in c["stage1"]["modules"].values():
            assert 0 < s["residual"] < 0.6 and s["kept_norm"] > 0.3


def test_baselines_and_cli(triple, calib, tmp_path):
    from rain_adapter.merging.methods import dare, module_generator, ties_trim
    from rain_adapter.cli.main import main
    from rain_adapter.format.store import load_adapter
    from rain_adapter.merging.taskvector import CheckpointReader, task_vector

    itm, base = CheckpointReader(triple.itm), CheckpointReader(triple.base)
    n = "model.layers.1.mlp.up_proj"
    d = task_vector(itm, base, n).delta
    for method in ("task-arithmetic", "ties", "dare-ties"):
        out = tmp_path / method
        rc = main(["build", "--lrm", str(triple.lrm), "--itm", str(triple.itm), "--base", str(triple.base),
                   "--out", str(out), "--method", method, "--no-progress", "--seed", "3"])
        assert rc == 0
        cfg, deltas = load_adapter(out)
        assert cfg.method == method and len(deltas) == 14
        want = {"task-arithmetic": d, "ties": ties_trim(d, 0.2),
                "dare-ties": ties_trim(dare(d, 0.5, module_generator(3, n)), 0.2)}[method]
        torch.testing.assert_close(deltas[n].dense(), want)
    assert float((want != 0).float().mean()) == pytest.approx(0.2, abs=0.01)
    # CLI, Stage 1, subset of targets/layers, resume of a finished-looking cache, overwrite guard
    out = tmp_path / "cli"
    args = ["build", "--lrm", str(triple.lrm), "--itm", str(triple.itm), "--base", str(triple.base),
            "--reasoning-calib", str(calib), "--out", str(out), "--targets", "q,down", "--skip-first-layers", "1",
            "--min-samples", "1", "--no-stage2", "--no-progress", "--protect-energy", "1.0"]
    assert main(args) == 0
    cfg, deltas = load_adapter(out)
    assert sorted(deltas) == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    assert cfg.layers == [1] and set(cfg.target_modules) == {"q", "down"}
    assert main(args) == 2  # exists, no --overwrite
    assert main(args + ["--overwrite"]) == 0


def test_resume_after_interruption(triple, calib, tmp_path, monkeypatch):
    import rain_adapter.merging.pipeline as b

    real = b.project
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 8:  # first module of layer 1
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(b, "project", flaky)
    out = tmp_path / "res"
    with pytest.raises(KeyboardInterrupt):
        _build(triple, calib, out, protect_energy=1.0)
    part = tmp_path / "res.partial"
    assert not out.exists() and (part / "layer_0.safetensors").exists() and not (part / "layer_1.safetensors").exists()
    monkeypatch.setattr(b, "project", real)
    calls["n"] = 0

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(b, "project", counting)
    _build(triple, calib, out, protect_energy=1.0, resume=True)
    assert calls["n"] == 7 and not part.exists()
    fresh = _build(triple, calib, tmp_path / "fresh", protect_energy=1.0)
    from rain_adapter.format.store import load_adapter
    _, d1 = load_adapter(out)
    _, d2 = load_adapter(fresh)
    for n in d1:
        torch.testing.assert_close(d1[n].delta, d2[n].delta)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_bad_inputs_leave_no_output(triple, calib, tmp_path):
    from rain_adapter.merging.calibration import CalibrationError
    from rain_adapter.merging.taskvector import CheckpointError

    out = tmp_path / "out"

    def nothing_written():
        return not out.exists() and not (tmp_path / "out.partial").exists()

    # template without thinking markers
    lrm = _copy(triple.lrm, tmp_path / "lrm_plain")
    tc = json.loads((lrm / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (lrm / "tokenizer_config.json").write_text(json.dumps(tc))
    (lrm / "chat_template.jinja").write_text(PLAIN_CHAT_TEMPLATE)
    with pytest.raises(CalibrationError, match="no thinking markers"):
        build_adapter(lrm, triple.itm, triple.base, out, reasoning_calib=calib, min_samples=1, progress=False)
    assert nothing_written()
    # calibration with wrong fields
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q", "reasoning": "r", "response": "x"}]))
    with pytest.raises(CalibrationError, match="bad.json.*'prompt'"):
        _build(triple, bad, out)
    assert nothing_written()
    # ITM with a missing tensor
    itm = _copy(triple.itm, tmp_path / "itm_missing")
    idx = json.loads((itm / "model.safetensors.index.json").read_text())
    del idx["weight_map"]["model.layers.0.self_attn.o_proj.weight"]
    (itm / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="o_proj"):
        build_adapter(triple.lrm, itm, triple.base, out, reasoning_calib=calib, min_samples=1, progress=False)
    assert nothing_written()
    # mis-shaped tensor in base
    from safetensors.torch import load_file, save_file
    base = _copy(triple.base, tmp_path / "base_shape")
    idx = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.gate_proj.weight"
    f = base / idx[name]
    ts = load_file(str(f))
    ts[name] = ts[name][:, :10].contiguous()
    save_file(ts, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"gate_proj.*\[128, 10\]"):
        build_adapter(triple.lrm, triple.itm, base, out, reasoning_calib=calib, min_samples=1, progress=False)
    assert nothing_written()
    # unreadable shard
    base = _copy(triple.base, tmp_path / "base_broken")
    idx = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    shard = base / idx["model.layers.1.self_attn.v_proj.weight"]
    shard.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=shard.name):
        build_adapter(triple.lrm, triple.itm, base, out, reasoning_calib=calib, min_samples=1, progress=False)
    assert nothing_written()
    # too few usable samples
    with pytest.raises(CalibrationError, match="usable"):
        build_adapter(triple.lrm, triple.itm, triple.base, out, reasoning_calib=calib, min_samples=5, progress=False)
    assert nothing_written()


def test_stage2_keeps_the_thinking_outputs(triple, calib, tmp_path):
    """Stage 1 + Stage 2: α folding must not undo the null-space constraint (o_proj included)."""
    from rain_adapter.format.paths import calibration_dir

    inst = calibration_dir() / "instruction_calibration_set.jsonl"  # packaged (tests/test_packaged_data.py)
    kw = dict(projection="hard", protect_energy=1.0, instruction_calib=inst, max_samples=3, max_seq_len=100_000)
    out = _build(triple, calib, tmp_path / "s2", **kw)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["method"] == "rain" and cfg["stage2"]["o_alpha"] == "mean"
    alpha = torch.tensor([cfg["stage2"]["alpha"][k] for k in sorted(cfg["stage2"]["alpha"])])
    assert alpha.std() > 0  # heads really get different α, so the check below means something
    res, _ = _residuals(triple, calib, out)
    assert max(res.values()) <= 1e-4, res
    # DESIGN's first rule (o_proj input columns × α_h) breaks it: the regression this guards against
    head = _build(triple, calib, tmp_path / "s2head", o_alpha="head", **kw)
    res_head, _ = _residuals(triple, calib, head)
    o_names = [n for n in res if n.endswith("o_proj")]
    assert all(res_head[n] > 10 * res[n] for n in o_names), (res, res_head)
