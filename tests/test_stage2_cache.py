"""Stage 2's attention statistics in the feature cache (``--feature-cache``, merging/feature_cache.py:
Stage2StatsCache, docs/DESIGN.md §5.7): a rebuild that changes only ρ / α_max / alpha_norm / o_alpha
runs no attention pass and gives the deltas of an uncached build, bit for bit."""

from __future__ import annotations

import errno
import json
import shutil
import warnings

import pytest
import torch

from rain_adapter.merging import coefficients
from rain_adapter.merging import feature_cache as fcmod
from rain_adapter.merging.cache import file_sha256
from rain_adapter.merging.feature_cache import FeatureCache, FeatureCacheWarning, Stage2StatsCache
from rain_adapter.merging.pipeline import build_adapter
from rain_adapter.format.config import RainConfig
from rain_adapter.testing.fixtures import (
    assert_same_adapter_tensors, make_instruction_records, make_tiny_triple, write_reasoning_calib,
)

TIMING = ("seconds", "stats_from_cache")


_records = make_instruction_records   # the shared Stage 2 records (testing/fixtures.py)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2cache")
    return make_tiny_triple(root / "t", arch="qwen2", seed=31), write_reasoning_calib(root / "c.json", n=3, seed=5)


def _build(setup, out, **kw):
    triple, calib = setup
    kw.setdefault("instruction_calib", _records())
    kw.setdefault("verbose", False)
    return build_adapter(triple.lrm, triple.itm, triple.base, out, reasoning_calib=calib, min_samples=1,
                         stage2_max_seq_len=kw.pop("stage2_max_seq_len", 400), progress=False, **kw)


@pytest.fixture(scope="module")
def cache_a(setup, tmp_path_factory):
    """Build A (ρ 0.5): features and Stage 2 statistics saved to a fresh cache."""
    root = tmp_path_factory.mktemp("a")
    out = _build(setup, root / "a", rho=0.5, feature_cache=root / "features")
    return root / "features", out


@pytest.fixture(scope="module")
def plain_c(setup, tmp_path_factory):
    """Build C (ρ 0, α_max 3): no cache."""
    return _build(setup, tmp_path_factory.mktemp("c") / "c", rho=0.0, alpha_max=3.0)


@pytest.fixture
def passes(monkeypatch):
    """Count the attention passes (calls of collect_attention_stats)."""
    calls = []
    real = coefficients.collect_attention_stats

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(coefficients, "collect_attention_stats", counting)
    return calls


def _copy(cache, tmp_path):
    dst = tmp_path / "features"
    shutil.copytree(cache, dst)
    return dst


def _stats_files(cache):
    return sorted(cache.glob("*/stage2/*"))


_same_deltas = assert_same_adapter_tensors   # testing/fixtures.py


def _stage2(out):
    return RainConfig.load(out).stage2


def _untimed(s2):
    return {k: v for k, v in s2.items() if k not in TIMING}


def test_only_alpha_settings_changed_runs_no_pass(setup, cache_a, plain_c, tmp_path, monkeypatch, capsys):
    cache, a = cache_a
    assert [p.suffix for p in _stats_files(cache)] == [".json", ".safetensors", ".sha256"]
    assert _stage2(a)["stats_from_cache"] is False

    def boom(*a, **k):
        raise AssertionError("an attention pass ran although the statistics were cached")
    monkeypatch.setattr(coefficients, "collect_attention_stats", boom)
    b = _build(setup, tmp_path / "b", rho=0.0, alpha_max=3.0, feature_cache=cache, verbose=True)
    assert "attention statistics from the feature cache" in capsys.readouterr().err
    _same_deltas(b, plain_c)
    s2b, s2c = _stage2(b), _stage2(plain_c)
    assert s2b["stats_from_cache"] is True and s2c["stats_from_cache"] is False
    assert s2b["alpha"] == s2c["alpha"] and s2b["rho"] == 0.0 and s2b["alpha_max"] == 3.0
    assert _untimed(s2b) == _untimed(s2c)
    assert len(_stats_files(cache)) == 3  # nothing new written


@pytest.mark.parametrize("change", [{"instruction_calib": _records()[:2]}, {"stage2_max_seq_len": 300}])
def test_changed_instruction_inputs_rerun_the_passes(setup, cache_a, tmp_path, passes, change):
    cache = _copy(cache_a[0], tmp_path)
    out = _build(setup, tmp_path / "b", rho=0.5, feature_cache=cache, **change)
    assert passes and _stage2(out)["stats_from_cache"] is False
    assert len(_stats_files(cache)) == 6  # a second entry, next to the first


def test_corrupt_stats_warn_and_are_recomputed(setup, cache_a, tmp_path, passes):
    cache, a = cache_a
    cache = _copy(cache, tmp_path)
    st = next(p for p in _stats_files(cache) if p.suffix == ".safetensors")
    raw = bytearray(st.read_bytes())
    raw[-8:] = b"\xff" * 8
    st.write_bytes(bytes(raw))
    with pytest.warns(FeatureCacheWarning, match="Stage 2 statistics .* unusable"):
        b = _build(setup, tmp_path / "b", rho=0.5, feature_cache=cache)
    assert len(passes) == 1
    _same_deltas(b, a)
    assert _untimed(_stage2(b)) == _untimed(_stage2(a))
    assert len(_stats_files(cache)) == 3  # rewritten: the next build hits
    side = next(p for p in _stats_files(cache) if p.suffix == ".sha256")
    assert json.loads(side.read_text())[st.name] == file_sha256(st)


def _stats():
    return {"a1": torch.rand(2, 4, dtype=torch.float64), "u1": torch.rand(2, 4, dtype=torch.float64),
            "n_a": 6, "n_u": 5, "n_a_positive": 6, "samples": {"records": 3, "spans_found": {"prompt": 6}}}


def test_round_trip_and_failed_write(tmp_path, monkeypatch):
    sc = Stage2StatsCache(FeatureCache(tmp_path, {"f": 1}), {"alpha_grad": "level"})
    assert sc.load() is None
    want = _stats()
    sc.save(want)
    got = Stage2StatsCache(FeatureCache(tmp_path, {"f": 1}), {"alpha_grad": "level"}).load()
    assert {k: v for k, v in got.items() if k not in ("a1", "u1")} == {k: v for k, v in want.items()
                                                                    if k not in ("a1", "u1")}
    assert torch.equal(got["a1"], want["a1"]) and torch.equal(got["u1"], want["u1"])
    # a gain build needs a0 / u0: another key, so a miss
    assert Stage2StatsCache(FeatureCache(tmp_path, {"f": 1}), {"alpha_grad": "gain"}).load() is None

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(fcmod, "save_file", full)
    other = Stage2StatsCache(FeatureCache(tmp_path, {"f": 1}), {"alpha_grad": "level", "x": 2})
    assert other.load() is None
    with pytest.warns(FeatureCacheWarning, match="without saving its Stage 2 statistics"):
        other.save(want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other.save(want)  # saving is off now: no second warning
    assert len(list(other.dir.iterdir())) == 3 and not list(other.dir.glob(".*.tmp"))
