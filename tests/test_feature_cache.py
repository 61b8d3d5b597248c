"""The opt-in Stage 1 feature cache (``--feature-cache``, merging/feature_cache.py, docs/DESIGN.md §5.7):
a build that changes only projection settings reuses the features and runs no forward, with a
result bit-identical to an uncached build."""

from __future__ import annotations

import errno
import json
import shutil
import warnings

import pytest
import torch

from rain_adapter.merging import feature_cache as fcmod
from rain_adapter.merging import features
from rain_adapter.merging.feature_cache import FeatureCache, FeatureCacheWarning
from rain_adapter.merging.options import BuildError, BuildOptions
from rain_adapter.merging.pipeline import build_adapter
from rain_adapter.format.config import RainConfig
from rain_adapter.format.store import MARKER_NAME, has_marker
from rain_adapter.testing.fixtures import assert_same_adapter_tensors, make_tiny_triple, write_reasoning_calib


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fcache")
    return make_tiny_triple(root / "t", arch="qwen2", seed=3), write_reasoning_calib(root / "c.json", n=3)


def _build(setup, out, **kw):
    triple, calib = setup
    kw.setdefault("reasoning_calib", calib)
    kw.setdefault("verbose", False)
    return build_adapter(triple.lrm, triple.itm, triple.base, out, min_samples=1, progress=False, **kw)


@pytest.fixture(scope="module")
def cache_a(setup, tmp_path_factory):
    """Build A: every layer projected, protect_energy 0.9, features saved to a fresh cache."""
    root = tmp_path_factory.mktemp("fa")
    _build(setup, root / "a", protect_energy=0.9, feature_cache=root / "features")
    return root / "features"


def _key_dirs(cache):
    return sorted(p for p in cache.iterdir() if p.is_dir())


def _copy(cache, tmp_path):
    dst = tmp_path / "features"
    shutil.copytree(cache, dst)
    return dst


def _boom(*a, **k):
    raise AssertionError("the LRM forward ran although the features were cached")


_same_deltas = assert_same_adapter_tensors   # testing/fixtures.py


def test_cache_layout(cache_a):
    (d,) = _key_dirs(cache_a)
    assert has_marker(d) and json.loads((d / MARKER_NAME).read_text())["kind"] == "feature-cache"
    meta = json.loads((d / "meta.json").read_text())
    assert meta["key"] == d.name and meta["settings"]["calib_hash"] and "project_layers" not in meta["settings"]
    for l in (0, 1):
        assert (d / f"layer_{l}.safetensors").is_file() and (d / f"layer_{l}.sha256").is_file()
        with fcmod.safe_open(str(d / f"layer_{l}.safetensors"), framework="pt") as f:
            stored = list(f.keys())
            mods = json.loads(f.metadata()[fcmod.META_KEY])["modules"]
        assert len(mods) == 7 and len(stored) == 4  # q/k/v and gate/up share their input: stored once
        assert all(mods[n] in stored for n in mods)
    assert not list(d.glob(".*.tmp"))


def test_reuse_skips_forward_and_is_bit_identical(setup, cache_a, tmp_path, monkeypatch, capsys):
    c = _build(setup, tmp_path / "c", protect_energy=0.99)  # uncached
    monkeypatch.setattr(features, "iter_layer_features", _boom)
    b = _build(setup, tmp_path / "b", protect_energy=0.99, feature_cache=cache_a, verbose=True)
    (key,) = _key_dirs(cache_a)
    assert f"all 2 layer(s) from the feature cache {key} (key {key.name}); no forward" in capsys.readouterr().err
    _same_deltas(b, c)
    cb, cc = RainConfig.load(b), RainConfig.load(c)
    assert cb.stage1 == cc.stage1 and cb.fingerprint == cc.fingerprint
    assert cb.extra["build_options"]["feature_cache"] == str(cache_a)
    assert len(_key_dirs(cache_a)) == 1


def test_project_layers_reuses_an_all_layers_cache(setup, cache_a, tmp_path, monkeypatch):
    c = _build(setup, tmp_path / "c", project_layers=[0])
    monkeypatch.setattr(features, "iter_layer_features", _boom)
    b = _build(setup, tmp_path / "b", project_layers=[0], feature_cache=cache_a)
    _same_deltas(b, c)
    assert RainConfig.load(b).stage1 == RainConfig.load(c).stage1


def test_fewer_targets_reuse_an_all_modules_cache(setup, cache_a, tmp_path, monkeypatch):
    c = _build(setup, tmp_path / "c", targets=["q", "k"])
    monkeypatch.setattr(features, "iter_layer_features", _boom)
    b = _build(setup, tmp_path / "b", targets=["q", "k"], feature_cache=cache_a)
    _same_deltas(b, c)


def test_other_radius_is_another_key(setup, cache_a, tmp_path, forwards):
    cache = _copy(cache_a, tmp_path)
    _build(setup, tmp_path / "b", radius=2, feature_cache=cache)
    assert len(forwards) == 1 and len(_key_dirs(cache)) == 2
    _build(setup, tmp_path / "c", radius=2, protect_energy=0.5, feature_cache=cache)
    assert len(forwards) == 1  # the second radius-2 build is a hit on its own key


def test_other_calibration_is_another_key(setup, cache_a, tmp_path, forwards):
    cache = _copy(cache_a, tmp_path)
    other = write_reasoning_calib(tmp_path / "other.json", n=3, seed=7)
    _build(setup, tmp_path / "b", reasoning_calib=other, feature_cache=cache)
    assert len(forwards) == 1 and len(_key_dirs(cache)) == 2


def test_corrupt_layer_is_recomputed(setup, cache_a, tmp_path, forwards):
    cache = _copy(cache_a, tmp_path)
    (d,) = _key_dirs(cache)
    f = d / "layer_1.safetensors"
    raw = bytearray(f.read_bytes())
    for i in range(len(raw) - 64, len(raw) - 32):
        raw[i] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.warns(FeatureCacheWarning, match="layer_1.safetensors"):
        b = _build(setup, tmp_path / "b", feature_cache=cache)
    # only the corrupt layer's modules went through the forward
    assert len(forwards) == 1 and all(".layers.1." in n for n in forwards[0])
    c = _build(setup, tmp_path / "c")
    _same_deltas(b, c)
    assert len(forwards) == 2  # c: one full forward
    _build(setup, tmp_path / "d", feature_cache=cache)  # the layer was rewritten: a full hit
    assert len(forwards) == 2


def test_foreign_key_dir_is_left_alone(setup, cache_a, tmp_path, forwards):
    cache = _copy(cache_a, tmp_path)
    (d,) = _key_dirs(cache)
    (d / MARKER_NAME).unlink()
    mine = d / "notes.txt"
    mine.write_text("mine")
    with pytest.warns(FeatureCacheWarning, match="not created by rain build"):
        _build(setup, tmp_path / "b", feature_cache=cache)
    assert len(forwards) == 1 and mine.read_text() == "mine" and not has_marker(d)


# ---- FeatureCache on its own -----------------------------------------------------------------
NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"]


def _feats():
    x, y = torch.randn(5, 8), torch.randn(5, 16)
    return {NAMES[0]: x, NAMES[1]: x, NAMES[2]: y}


def test_save_load_shares_inputs_and_checks_fingerprints(tmp_path):
    fc = FeatureCache(tmp_path, {"a": 1})
    assert fc.open()
    fp = {n: {"sample": n} for n in NAMES}
    feats = _feats()
    fc.save(0, feats, NAMES, fp)
    assert fc.check_layer(0, NAMES, fp) and fc.check_layer(0, NAMES[:1], fp)
    got = fc.load(0, NAMES)
    assert got[NAMES[0]] is got[NAMES[1]] and all(torch.equal(got[n], feats[n]) for n in NAMES)
    assert not fc.check_layer(0, NAMES + ["model.layers.0.mlp.up_proj"], fp)  # fewer modules: a miss
    assert fc.layer_path(0).is_file()  # ... not a fault: kept
    with pytest.warns(FeatureCacheWarning, match="fingerprint differs"):
        assert not fc.check_layer(0, NAMES, {**fp, NAMES[2]: {"sample": "other"}})
    assert not fc.layer_path(0).exists()
    assert FeatureCache(tmp_path, {"a": 2}).key != fc.key


def test_failed_write_warns_once_and_leaves_nothing(tmp_path, monkeypatch):
    fc = FeatureCache(tmp_path, {"a": 1})
    assert fc.open()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(fcmod, "save_file", full)
    with pytest.warns(FeatureCacheWarning, match="No space left on device"):
        fc.save(0, _feats(), NAMES, {})
    assert not fc.writable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fc.save(1, _feats(), NAMES, {})  # saving is off now: no second warning, no write
    assert sorted(p.name for p in fc.dir.iterdir()) == [MARKER_NAME, "meta.json"]


# ---- the option ------------------------------------------------------------------------------
def test_cli_flag_and_validation(capsys, tmp_path):
    from rain_adapter.cli.main import main

    with pytest.raises(SystemExit):
        main(["build", "--help"])
    assert "--feature-cache" in capsys.readouterr().out
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(BuildError) as e:
        BuildOptions(lrm="l", itm="i", base="b", out="o", feature_cache=f).validate()
    assert e.value.field == "feature_cache"


def test_feature_cache_does_not_change_the_resume_key():
    from types import SimpleNamespace

    from rain_adapter.merging.methods import get_method
    from rain_adapter.merging.pipeline import cache_settings

    targets = SimpleNamespace(modules={"m": None}, proj_layers={0})
    opts = BuildOptions(lrm="l", itm="i", base="b", out="o")
    with_cache = BuildOptions(lrm="l", itm="i", base="b", out="o", feature_cache="/tmp/fc")
    method = get_method("rain")
    assert cache_settings(opts, method, targets, None) == cache_settings(with_cache, method, targets, None)
