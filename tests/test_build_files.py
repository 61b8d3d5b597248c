"""`rain build` and its files (issue 16, point 4): only our own temporary directories are ever
deleted (they carry the marker), `--overwrite` replaces adapters only, the layer cache carries
checksums and `--resume` recomputes a corrupt layer, a full disk or a refused write is one line."""

from __future__ import annotations

import errno
import os
import re

import pytest
import torch
from safetensors import SafetensorError

import rain_adapter.merging.cache as layer_cache
import rain_adapter.merging.pipeline as pipeline
import rain_adapter.format.store as store
from rain_adapter.merging.cache import CacheError, PartialCache, load_layer
from rain_adapter.merging.pipeline import build_adapter
from rain_adapter.cli.main import main
from rain_adapter.format.delta import ModuleDelta

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


# `triple` and `calib`: the shared session fixtures of conftest.py


def _build(triple, calib, out, **kw):
    return build_adapter(triple.lrm, triple.itm, triple.base, out, reasoning_calib=calib, progress=False,
                         min_samples=1, protect_energy=1.0, **kw)


def _args(triple, calib, out, *extra):
    return ["build", "--lrm", str(triple.lrm), "--itm", str(triple.itm), "--base", str(triple.base),
            "--reasoning-calib", str(calib), "--out", str(out), "--min-samples", "1", "--no-stage2",
            "--no-progress", "--no-verbose", "--protect-energy", "1.0", *extra]


@pytest.fixture(scope="module")
def fresh(triple, calib, tmp_path_factory):
    """An uninterrupted build: what every resumed build must equal bit for bit."""
    return _build(triple, calib, tmp_path_factory.mktemp("fresh") / "fresh")


def _weights(out):
    return (out / store.WEIGHTS_NAME).read_bytes()


def _error_line(capsys):
    """The one ``rain build:`` line on stderr (transformers' own "Loading weights" bar aside)."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("rain ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _no_temp_left(root):
    return not [p for p in root.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the build gets as far as loading the LRM."""
    def boom(*a, **k):
        raise AssertionError("the LRM was loaded before the output was vetted")
    monkeypatch.setattr(pipeline, "load_lrm", boom)


# ---- 1. only what we created is ever deleted ---------------------------------------------------
@pytest.mark.parametrize("resume", [False, True])
def test_foreign_partial_dir_is_left_alone(triple, calib, tmp_path, no_load, capsys, resume):
    out, part = tmp_path / "out", tmp_path / "out.partial"
    part.mkdir()
    (part / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"out\.partial.*move it away"):
        _build(triple, calib, out, resume=resume)
    assert main(_args(triple, calib, out, *(["--resume"] if resume else []))) == 2
    assert str(part) in _error_line(capsys)
    assert (part / "notes.txt").read_text() == "mine" and not out.exists()


def test_overwrite_replaces_adapters_only(triple, calib, tmp_path, no_load, capsys):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="not an adapter directory"):
        _build(triple, calib, home, overwrite=True)
    assert main(_args(triple, calib, home, "--overwrite")) == 2
    assert "not an adapter directory" in _error_line(capsys)
    afile = tmp_path / "a-file"
    afile.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        _build(triple, calib, afile, overwrite=True)
    assert (home / "thesis.tex").read_text() == "years of work" and afile.read_text() == "x"
    with pytest.raises(FileExistsError, match="not an adapter directory"):   # the last line of defence
        with store.atomic_dir(home, overwrite=True, replace_check=store.check_replaceable):
            pass
    assert (home / "thesis.tex").exists() and _no_temp_left(tmp_path)


def test_save_adapter_refuses_to_replace_a_non_adapter_dir(tmp_path):
    from rain_adapter.format.config import RainConfig

    deltas = {"model.layers.0.mlp.up_proj": ModuleDelta(delta=torch.ones(4, 3))}
    cfg = RainConfig(base_model_name_or_path="tiny", target_modules=["up"], layers=[0])
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an adapter directory"):
        store.save_adapter(deltas, cfg, other, overwrite=True)
    assert (other / "keep.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    store.save_adapter(deltas, cfg, empty, overwrite=True)      # empty: fine
    store.save_adapter(deltas, cfg, empty, overwrite=True)      # an adapter: fine
    assert not (empty / store.MARKER_NAME).exists() and _no_temp_left(tmp_path)


def test_atomic_dir_marks_its_temp_dir_and_cleans_only_ours(tmp_path):
    foreign = tmp_path / ".ad.tmp-foreign"
    foreign.mkdir()
    (foreign / "f").write_text("x")
    with store.atomic_dir(tmp_path / "ad") as tmp:
        assert store.has_marker(tmp)
        (tmp / "a").write_text("a")
    assert (tmp_path / "ad" / "a").exists() and not store.has_marker(tmp_path / "ad")
    with pytest.raises(RuntimeError):
        with store.atomic_dir(tmp_path / "ad2") as tmp:
            raise RuntimeError
    assert not tmp.exists() and not (tmp_path / "ad2").exists()
    assert store.remove_ours(foreign) is False and (foreign / "f").exists()


# ---- 2. layer cache checksums -------------------------------------------------------------------
def _layer(seed):
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{seed}.mlp.up_proj": ModuleDelta(delta=torch.randn(6, 4, generator=g),
                                                            bias=torch.randn(6, generator=g))}


def _flip(path):
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0xFF
    path.write_bytes(bytes(b))


CORRUPTIONS = {
    "flipped": lambda p: _flip(p),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:-7]),
    "no sidecar": lambda p: p.with_suffix(".sha256").unlink(),
    "bad sidecar": lambda p: p.with_suffix(".sha256").write_text("{oops"),
    "stats edited": lambda p: p.with_suffix(".json").write_text("{}"),
    "weights gone": lambda p: p.unlink(),
}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_corrupt_cached_layer_is_reported_and_dropped(tmp_path, how):
    cache, settings = PartialCache(tmp_path / "out"), {"a": 1}
    assert cache.open(settings, resume=False, log=print) == set()
    assert store.has_marker(cache.dir)
    for l in (0, 1):
        cache.save_layer(l, _layer(l), {"m": {"l": l}})
    d, s = load_layer(cache.layer_path(1))
    assert torch.equal(next(iter(d.values())).delta, next(iter(_layer(1).values())).delta) and s == {"m": {"l": 1}}
    CORRUPTIONS[how](cache.layer_path(0))
    with pytest.raises(CacheError, match=rf"layer_0\..*rm -r {re.escape(str(cache.dir))}"):
        load_layer(cache.layer_path(0))
    logged: list[str] = []
    assert PartialCache(tmp_path / "out").open(settings, resume=True, log=logged.append) == {1}
    bad = [m for m in logged if "layer_0." in m]
    assert len(bad) == 1 and "layer 0 will be recomputed" in bad[0] and f"rm -r {cache.dir}" in bad[0]
    assert not list(cache.dir.glob("layer_0.*"))   # dropped: the next save writes it afresh


def test_cache_of_other_settings_or_foreign_dir(tmp_path):
    cache = PartialCache(tmp_path / "out")
    cache.open({"a": 1}, resume=False, log=print)
    cache.save_layer(0, _layer(0), {})
    (cache.dir / "layer_1.tmp").write_text("half")   # an interrupted write
    assert PartialCache(tmp_path / "out").open({"a": 1}, resume=True, log=print) == {0}
    assert not (cache.dir / "layer_1.tmp").exists()
    assert PartialCache(tmp_path / "out").open({"a": 2}, resume=True, log=print) == set()
    (cache.dir / store.MARKER_NAME).unlink()          # now it looks like someone else's
    with pytest.raises(FileExistsError, match="move it away"):
        PartialCache(tmp_path / "out").open({"a": 2}, resume=False, log=print)
    assert (cache.dir / "meta.json").exists()
    PartialCache(tmp_path / "out").remove()           # no marker: kept
    assert cache.dir.exists()


def test_resume_recomputes_a_corrupt_layer_bit_for_bit(triple, calib, tmp_path, monkeypatch, capsys, fresh):
    real, calls = pipeline.project, {"n": 0, "stop_at": 8}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == calls["stop_at"]:  # first module of layer 1: layer 0 is cached
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "project", flaky)
    out, part = tmp_path / "res", tmp_path / "res.partial"
    with pytest.raises(KeyboardInterrupt):
        _build(triple, calib, out)
    assert (part / "layer_0.sha256").exists() and not (part / "layer_1.safetensors").exists()
    _flip(part / "layer_0.safetensors")
    calls.update(n=0, stop_at=None)  # no more interrupts; count the modules computed
    capsys.readouterr()
    _build(triple, calib, out, resume=True)
    assert calls["n"] == 14                             # both layers: the corrupt one was recomputed
    err = capsys.readouterr().err
    assert f"{part / 'layer_0.safetensors'} does not match its checksum" in err
    assert "layer 0 will be recomputed" in err and f"rm -r {part}" in err
    assert not part.exists() and _weights(out) == _weights(fresh)


def test_corrupt_layer_at_assembly_is_a_clear_error(triple, calib, tmp_path, monkeypatch, capsys):
    real = layer_cache.load_layer

    def corrupt_then_load(path):
        _flip(path)
        return real(path)

    monkeypatch.setattr(layer_cache, "load_layer", corrupt_then_load)
    out = tmp_path / "asm"
    assert main(_args(triple, calib, out)) == 2
    line = _error_line(capsys)
    assert "layer_0.safetensors" in line and f"rm -r {tmp_path / 'asm.partial'}" in line
    assert not out.exists() and _no_temp_left(tmp_path)


# ---- 3. a full disk, a refused write: one line, nothing half-written ----------------------------
def _raise(exc):
    def f(*a, **k):
        raise exc
    return f


def test_full_disk_in_the_final_write(triple, calib, tmp_path, monkeypatch, capsys, fresh):
    monkeypatch.setattr(store, "save_file", _raise(ENOSPC))
    out = tmp_path / "full"
    assert main(_args(triple, calib, out)) == 2
    line = _error_line(capsys)
    assert line.startswith("rain build: error: no space left on device while writing ") and str(tmp_path) in line
    assert "--out elsewhere" in line
    assert not out.exists() and _no_temp_left(tmp_path)
    # the finished layers stay in the (marked) cache: once there is space, --resume only writes
    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "project", _raise(AssertionError("recomputed a cached layer")))
    assert main(_args(triple, calib, out, "--resume")) == 0
    assert _weights(out) == _weights(fresh) and not (tmp_path / "full.partial").exists()


def test_full_disk_in_the_layer_cache(triple, calib, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(layer_cache, "save_file", _raise(OSError(errno.EDQUOT, "Disk quota exceeded")))
    out = tmp_path / "quota"
    assert main(_args(triple, calib, out)) == 2
    line = _error_line(capsys)
    assert "disk quota exceeded while writing" in line and "layer_0" in line
    assert not out.exists() and not (tmp_path / "quota.partial").exists() and _no_temp_left(tmp_path)


def test_debug_shows_the_traceback(triple, calib, tmp_path, monkeypatch):
    monkeypatch.setattr(layer_cache, "save_file", _raise(ENOSPC))
    with pytest.raises(OSError, match="No space left"):
        main(_args(triple, calib, tmp_path / "dbg", "--debug"))


@pytest.mark.parametrize("code, words", [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only file system")])
def test_refused_write_is_one_line(triple, calib, tmp_path, monkeypatch, capsys, code, words):
    monkeypatch.setattr(layer_cache, "save_file", _raise(OSError(code, os.strerror(code))))
    out = tmp_path / "ro"
    assert main(_args(triple, calib, out)) == 2
    line = _error_line(capsys)
    assert f"error: {words}: " in line and "layer_0" in line
    assert not out.exists() and not (tmp_path / "ro.partial").exists()


def test_unwritable_parent_is_refused_before_loading(triple, calib, tmp_path, monkeypatch, capsys, no_load):
    parent = tmp_path / "locked"
    parent.mkdir()
    if os.geteuid() == 0:  # root ignores permissions: make the check see what a user would see
        real = os.access
        monkeypatch.setattr(store.os, "access", lambda p, m, **k: False if str(p) == str(parent) else real(p, m, **k))
    else:
        parent.chmod(0o555)
    try:
        assert main(_args(triple, calib, parent / "sub" / "out")) == 2
    finally:
        parent.chmod(0o755)
    line = _error_line(capsys)
    assert line == (f"rain build: error: permission denied: {parent} "
                    f"(check its permissions; for the output, pass --out elsewhere)")


def test_safetensors_io_errors_read_as_os_errors(tmp_path):
    msg = 'Error while serializing: I/O error: No space left on device (os error 28) at path "/d/.tmpX"'
    with pytest.raises(OSError) as e:
        with store.disk_errors(tmp_path / "w.safetensors"):
            raise SafetensorError(msg)
    assert e.value.errno == errno.ENOSPC and e.value.filename == "/d/.tmpX"
    with pytest.raises(OSError) as e:
        with store.disk_errors(tmp_path / "w.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.filename == str(tmp_path / "w.safetensors")
    with pytest.raises(SafetensorError):   # not an I/O error: unchanged
        with store.disk_errors(tmp_path / "w.safetensors"):
            raise SafetensorError("invalid header")
