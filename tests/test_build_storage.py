"""`rain build` with --storage lowrank (lowrank.compress) and with Stage 2 (coefficients.run_stage2)."""

from __future__ import annotations

import json

import pytest
import torch

from rain_adapter.merging.pipeline import build_adapter
from rain_adapter.testing.fixtures import make_tiny_triple, write_reasoning_calib


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("storage")
    return make_tiny_triple(root / "t", arch="llama", seed=2), write_reasoning_calib(root / "c.json", n=3)


def test_lowrank_keeps_constraint(setup, tmp_path):
    from rain_adapter.format.store import load_adapter

    triple, calib = setup
    dense = build_adapter(triple.lrm, triple.itm, triple.base, tmp_path / "d", reasoning_calib=calib,
                          min_samples=1, protect_energy=1.0, progress=False)
    low = build_adapter(triple.lrm, triple.itm, triple.base, tmp_path / "l", reasoning_calib=calib,
                        min_samples=1, protect_energy=1.0, storage="lowrank", rank=8, progress=False)
    cfg_l, dl = load_adapter(low)
    cfg_d, dd = load_adapter(dense)
    assert cfg_l.storage == "lowrank" and cfg_l.fidelity and all(d.rank <= 8 for d in dl.values())
    # the truncated SVD of Δ⊥ stays in Δ⊥'s row space, orthogonal to the protected directions
    from rain_adapter.format.arch import target_linears
    from rain_adapter.merging.calibration import prepare_reasoning_calibration
    from rain_adapter.merging.features import collect_features
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(triple.lrm, dtype=torch.float32).eval()
    cs = prepare_reasoning_calibration(AutoTokenizer.from_pretrained(triple.lrm), calib, min_samples=1)
    X = collect_features(m, target_linears(m), cs, progress=False)
    for n in dl:
        r = float((dl[n].dense() @ X[n].T).norm() / ((dd[n].dense() @ X[n].T).norm() + 1e-30))
        assert r < 1e-3 or float((dd[n].dense() @ X[n].T).norm()) < 1e-6


def test_stage2_runs_when_instruction_calib_given(setup, tmp_path):
    triple, calib = setup
    from rain_adapter.format.paths import calibration_dir

    inst = calibration_dir() / "instruction_calibration_set.jsonl"  # packaged (tests/test_packaged_data.py)
    out = build_adapter(triple.lrm, triple.itm, triple.base, tmp_path / "s2", reasoning_calib=calib,
                        instruction_calib=inst, min_samples=1, max_samples=2, max_seq_len=100_000, progress=False)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["method"] == "rain" and cfg["stage2"]
