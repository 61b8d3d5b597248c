"""The shipped toy world and the demo's soundness gate (issue 16, point 1).

- the default world ships with the package, every file matches MANIFEST.json, and a tampered copy is
  refused naming the file;
- ``ensure_world`` installs it without training; ``rain demo`` on it reproduces the recorded
  evaluation (LRM accuracy ≥ 0.9) and prints the table;
- the gate stops a world like the one a fresh machine once trained (LRM accuracy 0.52), and a NaN
  metric never passes;
(The determinism test, the CI world trained twice, is in test_world.py next to the CI world.)
"""

from __future__ import annotations

import json
import shutil

import pytest

from rain_adapter.demo import run as demo
from rain_adapter.demo import shipped
from rain_adapter.demo.soundness import is_sound
from rain_adapter.demo.train import WorldConfig, ensure_world

SOUND = {"lrm": {"compliance": 0.0, "format_validity": 1.0, "thinking_rate": 1.0, "accuracy": 0.96, "n": 48},
         "itm": {"compliance": 1.0, "format_validity": float("nan"), "thinking_rate": 0.0, "accuracy": 0.92, "n": 48}}


def _metrics(**lrm):
    return {"lrm": {**SOUND["lrm"], **lrm}, "itm": dict(SOUND["itm"])}


@pytest.fixture(scope="module")
def default_src():
    src = shipped.shipped_world(WorldConfig().key())
    assert src is not None, f"no shipped world for the default config {WorldConfig().key()} in {shipped.SHIPPED_DIR}"
    return src


def test_the_default_world_ships_and_matches_its_manifest(default_src):
    manifest = shipped.verify(default_src)
    assert manifest["key"] == WorldConfig().key() == default_src.name
    files = set(manifest["files"])
    for ck in shipped.CHECKPOINTS:  # the three checkpoints, loadable as they are
        assert {f"{ck}/config.json", f"{ck}/model.safetensors", f"{ck}/tokenizer.json"} <= files
    assert {"world.json", "reasoning_calibration_set.json", "instruction_calibration_set.jsonl",
            "eval_reasoning.jsonl", "eval_direct.jsonl"} <= files
    assert shipped.weights_sha256(default_src) == manifest["weights_sha256"]
    rec = manifest["soundness"]["metrics"]
    assert rec["lrm"]["accuracy"] >= 0.9 and rec["lrm"]["format_validity"] == 1.0
    assert not is_sound(rec, **demo.DEMO_GATE)


def test_a_tampered_world_is_refused_naming_the_file(default_src, tmp_path):
    copy = tmp_path / "w"
    shutil.copytree(default_src, copy)
    p = copy / "lrm" / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    p.write_bytes(bytes(data))
    with pytest.raises(shipped.WorldIntegrityError, match="lrm/model.safetensors"):
        shipped.verify(copy)
    (copy / "itm" / "config.json").unlink()
    with pytest.raises(shipped.WorldIntegrityError, match="missing"):
        shipped.verify(copy)


def test_ensure_world_installs_the_shipped_world_without_training(monkeypatch, tmp_path, default_src):
    import rain_adapter.demo.train as T

    monkeypatch.setattr(T, "train_world", lambda *a, **k: pytest.fail("trained although a world ships"))
    paths = ensure_world(WorldConfig(), tmp_path / "cache")
    assert json.loads(paths.info.read_text())["config"] == json.loads((default_src / "world.json").read_text())["config"]
    assert "shipped world" in shipped.provenance(paths.root, WorldConfig().key())
    assert shipped.weights_sha256(paths.root) == shipped.read_manifest(default_src)["weights_sha256"]


@pytest.mark.parametrize("bad, field", [({"accuracy": 0.52}, "LRM accuracy"),
                                        ({"format_validity": 0.98}, "LRM format validity"),
                                        ({"accuracy": float("nan")}, "LRM accuracy"),
                                        ({"compliance": 0.9}, "LRM compliance")])
def test_the_gate_stops_an_unsound_world(bad, field):
    cfg = WorldConfig()
    assert demo.check_gate(_metrics(), cfg, None, say=lambda *a: None) == []
    with pytest.raises(demo.WorldNotSound, match=field):
        demo.check_gate(_metrics(**bad), cfg, None, say=lambda *a: None)
    said = []
    problems = demo.check_gate(_metrics(**bad), cfg, None, allow_unsound=True, say=said.append)
    assert problems and any("NOT sound" in s for s in said)


def test_the_gate_checks_the_itm_too():
    m = _metrics()
    m["itm"]["compliance"] = 0.8
    assert any("ITM compliance" in p for p in is_sound(m, **demo.DEMO_GATE))
    m["itm"]["compliance"] = float("nan")
    assert any("ITM compliance" in p for p in is_sound(m, **demo.DEMO_GATE))


@pytest.mark.slow
def test_rain_demo_on_the_shipped_world_reproduces_its_record(monkeypatch, tmp_path, capsys):
    """README command 1, small: the shipped world, one method, two λ; the evaluation equals the
    record made when it shipped and the table prints."""
    import rain_adapter.demo.train as T

    monkeypatch.setenv("RAIN_WORLD_HOME", str(tmp_path / "worlds"))
    monkeypatch.setattr(T, "train_world", lambda *a, **k: pytest.fail("trained although a world ships"))
    res = demo.run_demo(methods=["rain-stage1"], lambdas=[0.0, 1.0], progress=False)
    out = capsys.readouterr().out
    assert res["soundness"]["lrm"]["accuracy"] >= 0.9 and not res["sound_problems"]
    assert "source: the shipped world" in out and "sound: yes" in out
    assert "evaluation identical to the shipped world's record" in out, out
    assert "rain-stage1" in out and len(res["records"]) == 2
