"""`rain info`: delta norms relative to task arithmetic, Stage 1 warnings, α's spread (rain_adapter.cli.info)."""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil

import pytest
import torch

from rain_adapter.merging.pipeline import build_adapter
from rain_adapter.merging.taskvector import CheckpointReader, task_vector
from rain_adapter.cli import info
from rain_adapter.format.delta import ModuleDelta
from rain_adapter.format.store import load_adapter
from rain_adapter.testing.fixtures import make_instruction_records, make_tiny_triple, write_reasoning_calib

ALPHA_MAX = 1.004      # the tiny triple's α spreads ±0.7 %: this bound clips a few heads


_records = make_instruction_records   # the shared Stage 2 records (testing/fixtures.py)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny triple and three adapters: rain (Stage 2, α clipped), rain-stage1 dense and low rank."""
    root = tmp_path_factory.mktemp("info")
    t = make_tiny_triple(root / "t", arch="qwen2", seed=31)
    calib = write_reasoning_calib(root / "c.json", n=3, seed=5)
    kw = dict(reasoning_calib=calib, min_samples=1, progress=False)
    out = {
        "rain": build_adapter(t.lrm, t.itm, t.base, root / "rain", instruction_calib=_records(),
                              # ρ 0.5 (the paper's; the default is 0): on this random model the
                              # u term is what spreads α enough for clipping to happen
                              stage2_max_seq_len=400, alpha_max=ALPHA_MAX, rho=0.5, **kw),
        "stage1": build_adapter(t.lrm, t.itm, t.base, root / "s1", no_stage2=True, **kw),
        "low": build_adapter(t.lrm, t.itm, t.base, root / "low", no_stage2=True, storage="lowrank", rank=4, **kw),
    }
    itm, base = CheckpointReader(t.itm, "ITM"), CheckpointReader(t.base, "base")
    cfg, deltas = load_adapter(out["rain"])
    task = {n: float(task_vector(itm, base, n, dtype=torch.float64).delta.norm()) for n in deltas}
    return t, out, task, root


def _with_task_norms(src, dst, task: dict[str, float], **stage1_extra):
    """A copy of adapter ``src`` whose config holds ``task_norm`` per module (checked against ours
    when the build already records it) and ``stage1_extra``."""
    shutil.copytree(src, dst)
    path = dst / "adapter_config.json"
    cfg = json.loads(path.read_text())
    for n, m in cfg["stage1"]["modules"].items():
        if "task_norm" in m:
            assert m["task_norm"] == pytest.approx(task[n], rel=1e-5)
        m["task_norm"] = task[n]
    cfg["stage1"].update(stage1_extra)
    path.write_text(json.dumps(cfg))
    return dst


def _value(text: str, label: str) -> float:
    m = re.search(re.escape(label) + r"\s+([0-9.eE+-]+|nan)", text)
    assert m, f"{label!r} not in:\n{text}"
    v = float(m.group(1))
    assert not math.isnan(v), f"{label} is NaN"
    return v


def _expected(path, task: dict[str, float]) -> tuple[float, float]:
    """(stage 1, stored) relative norms in float64 from the config's kept norms and the dense deltas."""
    cfg, deltas = load_adapter(path)
    mods = cfg.stage1["modules"]
    ta = math.sqrt(sum(task[n] ** 2 for n in mods))
    s1 = math.sqrt(sum((mods[n]["kept_norm"] * task[n]) ** 2 for n in mods)) / ta
    stored = math.sqrt(sum(float(d.dense(torch.float64).norm()) ** 2 for d in deltas.values())) / ta
    return s1, stored


@pytest.mark.parametrize("which", ["rain", "stage1", "low"])
def test_info_norms_relative_to_task_arithmetic(built, which):
    _, out, task, root = built
    path = _with_task_norms(out[which], root / f"{which}-tn", task)
    text = info.describe(str(path))
    s1, stored = _expected(path, task)
    assert 0 < s1 < 1 and _value(text, "stage 1 ‖Δ⊥‖/‖Δ‖") == pytest.approx(s1, abs=6e-5)
    assert _value(text, "stored  ‖D‖/‖Δ‖") == pytest.approx(stored, abs=6e-5)
    assert "not recorded" not in text.split("stage 2")[0]
    recorded = json.loads((path / "adapter_config.json").read_text())["stage1"].get("kept_norm_total")
    if recorded is not None:  # the build's own total (when it records one) is the same quantity
        assert recorded == pytest.approx(s1, rel=1e-4)
        assert _value(text, "kept_norm_total (recorded by the build)") == pytest.approx(recorded, abs=6e-5)
    if which == "stage1":     # stored = Δ⊥: both ratios agree
        assert stored == pytest.approx(s1, rel=1e-5)
    if which == "rain":       # α folded in: the stored ratio moved, and the spread is shown
        assert "after Stage 2 α" in text and "α over 8 heads: mean 1.0000" in text
    if which == "low":
        assert "low rank 4" in text


def test_info_stripped_task_norms_fall_back(built):
    _, out, _, root = built
    dst = root / "stripped"
    shutil.copytree(out["rain"], dst)
    path = dst / "adapter_config.json"
    cfg = json.loads(path.read_text())
    for m in cfg["stage1"]["modules"].values():
        m.pop("task_norm", None)
    cfg["stage1"].pop("kept_norm_total", None)
    cfg["stage1"].pop("warnings", None)
    path.write_text(json.dumps(cfg))
    text = info.describe(str(dst))
    kept = sorted(m["kept_norm"] for m in cfg["stage1"]["modules"].values())
    assert "total not recorded" in text and "WARNING" not in text
    assert _value(text, "stage 1 median kept ‖Δ⊥‖/‖Δ‖ per module") == pytest.approx(kept[len(kept) // 2], abs=6e-4)


def test_info_shows_warnings_and_kept_norm_total(built):
    _, out, task, root = built
    path = _with_task_norms(out["stage1"], root / "warn", task, kept_norm_total=0.4321,
                            warnings=["kept norm 0.01 in model.layers.0.mlp.up_proj: Stage 1 removed almost all"])
    text = info.describe(str(path))
    lines = text.splitlines()
    assert lines[1] == "WARNING: kept norm 0.01 in model.layers.0.mlp.up_proj: Stage 1 removed almost all"
    assert _value(text, "kept_norm_total (recorded by the build)") == pytest.approx(0.4321)
    stage1_line = next(l for l in lines if l.startswith("stage 1 "))
    assert "warnings=" not in stage1_line and "kept_norm_total=" not in stage1_line


def test_info_stage2_alpha_spread_after_clipping(built):
    _, out, _, _ = built
    cfg, _ = load_adapter(out["rain"])
    st = cfg.stage2["alpha_stats"]
    alpha = torch.tensor([v for row in cfg.stage2["alpha"].values() for v in row], dtype=torch.float64)
    assert torch.isfinite(alpha).all() and st["frac_at_max"] > 0           # the build did clip
    assert abs(float(alpha.mean()) - 1.0) < 1e-6 and float(alpha.max()) <= ALPHA_MAX
    # only the top was clipped: clipping alone left the mean below 1, the scale c > 1 restores it
    assert st["mean"] == pytest.approx(1.0, abs=1e-6) and st["scale"] > 1.0 and st["mean_clip_only"] < 1.0
    assert cfg.stage2["alpha_clipped"]["high"] == round(st["frac_at_max"] * st["n"])
    text = info.describe(str(out["rain"]))
    assert f"at α_max={ALPHA_MAX:g}" in text and "scale c" in text


def test_stored_norm_lowrank_matches_dense():
    g = torch.Generator().manual_seed(2718)
    a = torch.randn(5, 40, generator=g, dtype=torch.float64)
    b = torch.randn(30, 5, generator=g, dtype=torch.float64)
    d = torch.randn(7, 9, generator=g, dtype=torch.float32)
    got = info.stored_norm({"x": ModuleDelta(lora_A=a.float(), lora_B=b.float()), "y": ModuleDelta(delta=d)})
    ref = math.sqrt(float((b.float().double() @ a.float().double()).norm()) ** 2 + float(d.double().norm()) ** 2)
    assert got == pytest.approx(ref, rel=1e-12)


def test_info_json_unchanged(built, capsys):
    _, out, _, _ = built
    info._run(argparse.Namespace(path=str(out["rain"]), json=True))
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"config", "modules"} and "alpha_stats" in data["config"]["stage2"]
