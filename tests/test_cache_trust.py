"""Caches that cannot lie (issue 24, part 5): every feature-cache and layer-cache entry records the
key of the build that made it and is checked against the key of the build that reads it.

The hostile cases a tester found (each used to be reported "from the feature cache" and gave an
adapter different from a clean build), plus the ones that were already caught: an entry copied in
from another build's cache (another calibration set), entries reached through a symlink (a layer
file, its sidecar, the whole key directory, a Stage 2 file), a key directory renamed to the key of
the build that reads it, a truncated layer, two layers' files swapped within one cache. Each gives a
warning naming the entry and an adapter equal, bit for bit, to a clean build's. The same for the
``--resume`` layer cache (``<out>.partial``).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from rain_adapter.merging import pipeline
from rain_adapter.merging.cache import PartialCache, file_sha256
from rain_adapter.merging.feature_cache import FeatureCache, FeatureCacheWarning, Stage2StatsCache
from rain_adapter.merging.pipeline import build_adapter
from rain_adapter.format.delta import ModuleDelta
from rain_adapter.testing.fixtures import assert_same_adapter_tensors, make_tiny_triple, write_reasoning_calib


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    triple = make_tiny_triple(root / "t", arch="qwen2", seed=5)
    return triple, write_reasoning_calib(root / "c1.json", n=3, seed=1), write_reasoning_calib(root / "c2.json", n=3, seed=9)


def _build(setup, out, calib=1, **kw):
    triple, c1, c2 = setup
    kw.setdefault("verbose", False)
    return build_adapter(triple.lrm, triple.itm, triple.base, out, reasoning_calib=c1 if calib == 1 else c2,
                         min_samples=1, progress=False, **kw)


@pytest.fixture(scope="module")
def caches(setup, tmp_path_factory):
    """Build A (calibration 1) and build B (calibration 2), each with its own feature cache, and a
    clean (uncached) build with calibration 1: what every tampered build must equal."""
    root = tmp_path_factory.mktemp("caches")
    _build(setup, root / "a", calib=1, feature_cache=root / "fa")
    _build(setup, root / "b", calib=2, feature_cache=root / "fb")
    clean = _build(setup, root / "clean", calib=1)
    (a,), (b,) = _key_dirs(root / "fa"), _key_dirs(root / "fb")
    assert a.name != b.name
    return root / "fa", b, clean


def _key_dirs(cache):
    return sorted(p for p in cache.iterdir() if p.is_dir())


@pytest.fixture
def cache_a(caches, tmp_path):
    """A fresh copy of build A's cache and its key directory."""
    dst = tmp_path / "features"
    shutil.copytree(caches[0], dst)
    (d,) = _key_dirs(dst)
    return dst, d


def _rebuild_equals_clean(setup, caches, cache, tmp_path, match):
    """Build A again on the tampered ``cache``: one warning matching ``match``, the clean result."""
    with pytest.warns(FeatureCacheWarning, match=match):
        out = _build(setup, tmp_path / "rebuilt", calib=1, feature_cache=cache)
    assert_same_adapter_tensors(out, caches[2])
    return out


def _hits_fully(setup, cache, tmp_path, forwards):
    """After the repair, a third build is a full hit (no forward) and warns of nothing."""
    n = len(forwards)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FeatureCacheWarning)
        _build(setup, tmp_path / "third", calib=1, feature_cache=cache)
    assert len(forwards) == n


def test_the_key_is_recorded_in_every_entry(cache_a):
    cache, d = cache_a
    meta = json.loads((d / "meta.json").read_text())
    assert meta["key"] == d.name
    for l in (0, 1):
        side = json.loads((d / f"layer_{l}.sha256").read_text())
        assert side["key"] == d.name and side["file"] == f"layer_{l}.safetensors"
        from rain_adapter.merging.feature_cache import _layer_meta

        rec = _layer_meta(d / f"layer_{l}.safetensors")
        assert rec["key"] == d.name and rec["layer"] == l and rec["settings"] == meta["settings"]


def test_an_entry_from_another_builds_cache_is_recomputed(setup, caches, cache_a, tmp_path, forwards):
    cache, d = cache_a
    other = caches[1]   # build B's key directory: the same LRM, another calibration set
    for name in ("layer_1.safetensors", "layer_1.sha256"):
        shutil.copy2(other / name, d / name)
    _rebuild_equals_clean(setup, caches, cache, tmp_path, r"layer_1\.safetensors was made by another build .*calib_hash")
    assert len(forwards) == 1 and all(".layers.1." in n for n in forwards[0])  # only the foreign layer
    _hits_fully(setup, cache, tmp_path, forwards)


@pytest.mark.parametrize("which", ["layer_1.safetensors", "layer_1.sha256"])
def test_an_entry_reached_through_a_symlink_is_recomputed(setup, caches, cache_a, tmp_path, forwards, which):
    cache, d = cache_a
    other = caches[1]
    for name in ("layer_1.safetensors", "layer_1.sha256"):
        (d / name).unlink()
        if name == which:
            os.symlink(other / name, d / name)
        else:
            shutil.copy2(other / name, d / name)
    _rebuild_equals_clean(setup, caches, cache, tmp_path, rf"{which} is a symlink")
    assert not (d / which).is_symlink() and (other / which).is_file()  # the link went, not its target
    assert len(forwards) == 1
    _hits_fully(setup, cache, tmp_path, forwards)


def test_a_symlinked_key_directory_is_left_alone(setup, caches, cache_a, tmp_path, forwards):
    cache, d = cache_a
    other = caches[1]
    shutil.rmtree(d)
    os.symlink(other, d)   # build A's key, pointing at build B's entries
    before = sorted(p.name for p in other.iterdir())
    _rebuild_equals_clean(setup, caches, cache, tmp_path, rf"{d} is a symlink")
    assert len(forwards) == 1 and d.is_symlink() and sorted(p.name for p in other.iterdir()) == before


def test_a_renamed_key_directory_is_recomputed(setup, caches, cache_a, tmp_path, forwards):
    cache, d = cache_a
    shutil.rmtree(d)
    shutil.copytree(caches[1], d)   # build B's directory under build A's key
    _rebuild_equals_clean(setup, caches, cache, tmp_path, r"meta\.json names key .*renamed or copied from another build")
    assert len(forwards) == 1
    assert json.loads((d / "meta.json").read_text())["key"] == d.name   # rewritten for its own key
    _hits_fully(setup, cache, tmp_path, forwards)


def test_a_truncated_layer_is_recomputed(setup, caches, cache_a, tmp_path, forwards):
    cache, d = cache_a
    f = d / "layer_0.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    _rebuild_equals_clean(setup, caches, cache, tmp_path, r"layer_0\.safetensors does not match its checksum")
    assert len(forwards) == 1 and all(".layers.0." in n for n in forwards[0])


def test_layers_swapped_within_one_cache_are_recomputed(setup, caches, cache_a, tmp_path, forwards):
    cache, d = cache_a
    for ext in ("safetensors", "sha256"):
        a, b = d / f"layer_0.{ext}", d / f"layer_1.{ext}"
        tmp = d / f"swap.{ext}"
        a.rename(tmp)
        b.rename(a)
        tmp.rename(b)
    _rebuild_equals_clean(setup, caches, cache, tmp_path, r"swapped with another layer")
    assert len(forwards) == 1
    _hits_fully(setup, cache, tmp_path, forwards)


# ---- Stage 2 statistics ----------------------------------------------------------------------
def _stats():
    return {"a1": torch.rand(2, 4, dtype=torch.float64), "u1": torch.rand(2, 4, dtype=torch.float64),
            "n_a": 6, "n_u": 5, "n_a_positive": 6, "samples": {"records": 3}}


def test_stage2_entries_renamed_or_symlinked_are_not_used(tmp_path):
    fc = FeatureCache(tmp_path / "fc", {"f": 1})
    mine = Stage2StatsCache(fc, {"alpha_grad": "level", "instruction": "mine"})
    other = Stage2StatsCache(FeatureCache(tmp_path / "fc", {"f": 1}), {"alpha_grad": "level", "instruction": "other"})
    assert mine.load() is None and other.load() is None
    other.save(_stats())
    # another build's entry renamed to this build's key, its sidecar rewritten to the new names
    for src, dst in zip(other.files(), mine.files()):
        shutil.copy2(src, dst)
    t, j, side = mine.files()
    side.write_text(json.dumps({t.name: file_sha256(t), j.name: file_sha256(j)}))
    with pytest.warns(FeatureCacheWarning, match=r"another build's statistics .*instruction differ"):
        assert mine.load() is None
    assert not any(f.exists() for f in mine.files()) and all(f.exists() for f in other.files())
    # an entry that is a link to another build's
    for src, dst in zip(other.files(), mine.files()):
        os.symlink(src, dst)
    with pytest.warns(FeatureCacheWarning, match=r"\.json is a symlink|\.safetensors is a symlink|\.sha256 is a symlink"):
        assert mine.load() is None
    assert not any(f.is_symlink() for f in mine.files()) and all(f.is_file() for f in other.files())
    want = _stats()
    mine.save(want)
    got = Stage2StatsCache(FeatureCache(tmp_path / "fc", {"f": 1}), mine.settings).load()
    assert torch.equal(got["a1"], want["a1"])


# ---- the --resume layer cache (<out>.partial) -------------------------------------------------
def _layer(l):
    return {f"model.layers.{l}.mlp.down_proj": ModuleDelta(delta=torch.full((3, 2), float(l)), bias=None)}


def test_partial_cache_refuses_foreign_swapped_and_linked_layers(tmp_path):
    mine, other = PartialCache(tmp_path / "a"), PartialCache(tmp_path / "b")
    mine.open({"calib_hash": "one"}, resume=False, log=print)
    other.open({"calib_hash": "two"}, resume=False, log=print)
    for l in (0, 1, 2):
        mine.save_layer(l, _layer(l), {"m": {"l": l}})
        other.save_layer(l, _layer(l + 10), {"m": {"l": l + 10}})
    for ext in ("safetensors", "json", "sha256"):   # layer 0: copied from the other build's cache
        shutil.copy2(other.dir / f"layer_0.{ext}", mine.dir / f"layer_0.{ext}")
    for ext in ("safetensors", "json", "sha256"):   # layer 1: a link to the other build's
        (mine.dir / f"layer_1.{ext}").unlink()
        os.symlink(other.dir / f"layer_1.{ext}", mine.dir / f"layer_1.{ext}")
    logged: list[str] = []
    assert PartialCache(tmp_path / "a").open({"calib_hash": "one"}, resume=True, log=logged.append) == {2}
    text = "\n".join(logged)
    assert "layer_0.safetensors was made by another build" in text and "layer_1.safetensors is a symlink" in text
    assert all((other.dir / f"layer_1.{e}").is_file() for e in ("safetensors", "json", "sha256"))
    # layers 2 and 3 swapped (all three files each)
    mine.save_layer(3, _layer(3), {"m": {"l": 3}})
    for ext in ("safetensors", "json", "sha256"):
        a, b, t = mine.dir / f"layer_2.{ext}", mine.dir / f"layer_3.{ext}", mine.dir / f"swap.{ext}"
        a.rename(t)
        b.rename(a)
        t.rename(b)
    logged.clear()
    assert PartialCache(tmp_path / "a").open({"calib_hash": "one"}, resume=True, log=logged.append) == set()
    text = "\n".join(logged)   # the sidecars name their own files: caught by the checksums
    assert "layer_2.safetensors does not match" in text and "layer_3.safetensors does not match" in text


def test_partial_cache_meta_edited_or_linked(tmp_path):
    cache = PartialCache(tmp_path / "a")
    cache.open({"calib_hash": "one"}, resume=False, log=print)
    cache.save_layer(0, _layer(0), {})
    meta = cache.dir / "meta.json"
    m = json.loads(meta.read_text())
    meta.write_text(json.dumps({**m, "settings": {"calib_hash": "two"}}))   # key kept, settings edited
    logged: list[str] = []
    assert PartialCache(tmp_path / "a").open({"calib_hash": "one"}, resume=True, log=logged.append) == set()
    link = tmp_path / "b.partial"
    os.symlink(cache.dir, link)
    with pytest.raises(FileExistsError, match="is a symlink"):
        PartialCache(tmp_path / "b").open({"calib_hash": "one"}, resume=True, log=print)
    assert cache.dir.is_dir() and link.is_symlink()


def test_resume_with_a_layer_from_another_build_equals_a_clean_build(setup, caches, tmp_path, monkeypatch, capsys):
    """End to end: build B (calibration 2) is interrupted after layer 0; its layer 0 is copied into
    build A's interrupted cache; A resumed recomputes it and equals the clean build A, bit for bit."""
    real, calls = pipeline.project, {"n": 0, "stop_at": 8}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == calls["stop_at"]:  # first module of layer 1: layer 0 is cached
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "project", flaky)
    for name, calib in (("a", 1), ("b", 2)):
        calls["n"] = 0
        with pytest.raises(KeyboardInterrupt):
            _build(setup, tmp_path / name, calib=calib)
    pa, pb = tmp_path / "a.partial", tmp_path / "b.partial"
    for ext in ("safetensors", "json", "sha256"):
        shutil.copy2(pb / f"layer_0.{ext}", pa / f"layer_0.{ext}")
    calls.update(n=0, stop_at=None)
    capsys.readouterr()
    out = _build(setup, tmp_path / "a", calib=1, resume=True, verbose=True)
    err = capsys.readouterr().err
    assert f"{pa / 'layer_0.safetensors'} was made by another build" in err and "layer 0 will be recomputed" in err
    assert calls["n"] == 14   # both layers computed
    assert_same_adapter_tensors(out, caches[2])


# ---- the demo's cached toy world -------------------------------------------------------------
def _flip(path, at=-1):
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x01   # one bit of one weight
    path.write_bytes(bytes(raw))


TAMPER = {
    "flipped byte": ("lrm/model.safetensors", lambda p: _flip(p)),
    "truncated": ("itm/model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:-4])),
    "missing": ("base/config.json", lambda p: p.unlink()),
    "added": ("lrm/adapter_config.json", lambda p: p.write_text("{}")),
    "record missing": ("MANIFEST.json", lambda p: p.unlink()),
    "calibration edited": ("reasoning_calibration_set.json", lambda p: p.write_text(p.read_text().replace("1", "2", 1))),
}


@pytest.mark.parametrize("how", list(TAMPER))
def test_a_changed_cached_world_warns_naming_the_file_and_is_reinstalled(tmp_path, monkeypatch, how):
    import warnings

    import rain_adapter.demo.train as T
    from rain_adapter.demo import shipped
    from rain_adapter.demo.train import WorldConfig, ensure_world

    monkeypatch.setattr(T, "train_world", lambda *a, **k: pytest.fail("trained although a world ships"))
    root = tmp_path / "cache"
    paths = ensure_world(WorldConfig(), root)
    want = shipped.read_manifest(shipped.shipped_world(WorldConfig().key()))["weights_sha256"]
    rel, change = TAMPER[how]
    change(root / rel)
    assert shipped.record_problem(root) is not None
    with pytest.warns(shipped.WorldIntegrityWarning, match=rf"{root}: {rel}.*reinstalled from the world shipped"):
        again = ensure_world(WorldConfig(), root)
    assert again == paths and shipped.record_problem(root) is None
    assert shipped.weights_sha256(root) == want and not (root / "lrm" / "adapter_config.json").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ensure_world(WorldConfig(), root)   # verified: no warning, nothing rebuilt


# a world with no shipped copy (the CI world, trained here) is retrained when it changed:
# tests/test_world.py::test_world_training_is_deterministic (that retrain is its second training)


@pytest.mark.slow
def test_rain_demo_on_a_tampered_world_warns_and_gives_the_clean_result(monkeypatch, tmp_path, capsys):
    """``rain demo`` twice on the shipped world; between the runs one byte of the cached LRM and one of
    the cached adapter are flipped: the second run names both files, reinstalls / rebuilds, and its
    table equals the first run's."""
    import rain_adapter.demo.train as T
    from rain_adapter.demo import run as demo
    from rain_adapter.demo import shipped
    from rain_adapter.format.store import WEIGHTS_NAME

    monkeypatch.setenv("RAIN_WORLD_HOME", str(tmp_path / "worlds"))
    monkeypatch.setattr(T, "train_world", lambda *a, **k: pytest.fail("trained although a world ships"))
    kw = dict(methods=["rain-stage1"], lambdas=[0.0, 1.0], limit=8, progress=False, verbose=False)
    first = demo.run_demo(**kw)
    root = tmp_path / "worlds" / T.WorldConfig().key()
    (adapter,) = [p for p in (root / "adapters").glob("rain-stage1-*") if p.is_dir()]
    _flip(root / "lrm" / "model.safetensors")
    with pytest.warns(shipped.WorldIntegrityWarning, match=r"lrm/model\.safetensors"):
        second = demo.run_demo(**kw)   # reinstalled: the adapters went with the old copy, rebuilt
    assert second["records"] == first["records"] and second["summary"] == first["summary"]
    _flip(adapter / WEIGHTS_NAME, at=-3)
    with pytest.warns(shipped.WorldIntegrityWarning, match=rf"{adapter.name}/{WEIGHTS_NAME} differs"):
        third = demo.run_demo(**kw)
    assert third["records"] == first["records"]


def test_the_smollm2_world_record_names_the_changed_file(tmp_path):
    """The SmolLM2 world's per-model record (rain_world_model.json) covers every file of the model
    directory since issue 24 (sizes and SHA-256), not only the weights: a changed tokenizer or an
    added file is caught and named too; an older record (weights only) still verifies."""
    from safetensors.torch import save_file

    from rain_adapter.demo import real_train as T

    cfg = T.ci_config()
    d = tmp_path / "lrm"
    d.mkdir()
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(d / "model.safetensors"))
    (d / "tokenizer.json").write_text('{"vocab": 1}')
    T._record(d, cfg, "parent", {"role": "lrm"})
    assert T.model_problem(d, cfg, parent="parent") is None and T.model_ok(d, cfg, parent="parent")
    said: list[str] = []
    assert T._checked(d, cfg, "parent", said.append) and said == []
    _flip(d / "model.safetensors", at=-2)
    assert not T._checked(d, cfg, "parent", said.append)
    assert said and said[0].startswith("warning:") and str(d / "model.safetensors") in said[0]
    T._record(d, cfg, "parent", {})
    (d / "tokenizer.json").write_text('{"vocab": 2}')
    assert "tokenizer.json differs" in T.model_problem(d, cfg, parent="parent")
    T._record(d, cfg, "parent", {})
    (d / "chat_template.jinja").write_text("{{ messages }}")
    assert "chat_template.jinja is not in" in T.model_problem(d, cfg, parent="parent")
    (d / "chat_template.jinja").unlink()
    assert T.model_problem(d, cfg, parent="other") is not None   # another base: not this model
    rec = json.loads((d / T.MODEL_RECORD).read_text())
    del rec["files"]   # an older record: the weights' hash only
    (d / T.MODEL_RECORD).write_text(json.dumps(rec))
    assert T.model_problem(d, cfg, parent="parent") is None
    _flip(d / "model.safetensors", at=-2)
    assert str(d / "model.safetensors") in T.model_problem(d, cfg, parent="parent")


def test_rain_demo_prints_an_integrity_warning_as_one_line(capsys):
    import warnings

    from rain_adapter.cli.demo import integrity_warnings_as_lines
    from rain_adapter.demo.shipped import WorldIntegrityWarning

    with integrity_warnings_as_lines():
        for _ in range(2):
            warnings.warn("toy world /w: lrm/model.safetensors has SHA-256 …", WorldIntegrityWarning)
    err = capsys.readouterr().err
    assert err.count("rain demo: warning: toy world /w: lrm/model.safetensors") == 2 and "Warning:" not in err


def test_a_demo_adapter_is_reused_only_as_recorded(tmp_path):
    from rain_adapter.demo import run as demo

    target = tmp_path / "adapters" / "rain-0123abcd"
    target.mkdir(parents=True)
    (target / "adapter_config.json").write_text("{}")
    (target / "adapter_model.safetensors").write_bytes(bytes(range(64)))
    assert "record.json is missing" in demo.adapter_problem(target, "w1")
    rec = demo.adapter_record_path(target)
    rec.write_text(json.dumps({"world_weights_sha256": "w1", "files": demo._adapter_files(target)}))
    assert demo.adapter_problem(target, "w1") is None
    assert [p.name for p in (tmp_path / "adapters").glob("rain-*")] == [target.name]   # the record is hidden
    assert demo.adapter_problem(target, "w2") == "it was built on other world weights"
    _flip(target / "adapter_model.safetensors")
    assert "rain-0123abcd/adapter_model.safetensors differs" in demo.adapter_problem(target, "w1")
    _flip(target / "adapter_model.safetensors")
    (target / "extra.safetensors").write_bytes(b"x")
    assert "extra.safetensors is not part of its record" in demo.adapter_problem(target, "w1")
