"""``rain build --device-map`` (issue 24, part 2): the LRM dispatched by accelerate with real CPU and
disk offload gives the plain build's adapter; bad maps are clear errors naming the module / device;
``--sequential`` with a device map is refused; ``rain build --dry-run`` prints ``rain plan``'s plan and
the resolved map without reading a weight.

Bit-identical, not a tolerance: on one CPU the dispatched forward runs the same kernels on the same
float32 tensors in the same order (accelerate only moves tensors between ``cpu`` and ``meta`` and
reads ``disk`` modules' weights from the same safetensors), so the features, and everything after
them, are the same bits.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rain_adapter.cli.main import main
from rain_adapter.format.store import read_tensors
from rain_adapter.merging.errors import BuildError
from rain_adapter.merging.pipeline import build_adapter
from rain_adapter.testing.fixtures import assert_same_adapter_tensors, make_instruction_records

#: the tiny triple has 2 decoder layers: layer 0 and the embedding in memory, layer 1, the final norm
#: and lm_head offloaded to disk (their weights stay on ``meta`` between forwards)
CPU_DISK = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
            "model.layers.1": "disk", "model.norm": "disk", "lm_head": "disk"}


def _build(triple, calib, out, **kw):
    kw.setdefault("verbose", False)
    return build_adapter(triple.lrm, triple.itm, triple.base, out, reasoning_calib=calib, min_samples=1,
                         progress=False, **kw)


@pytest.fixture(scope="module")
def plain(triple, calib, tmp_path_factory):
    return _build(triple, calib, tmp_path_factory.mktemp("plain") / "a", method="rain-stage1")


def test_cpu_disk_offload_equals_plain_build(triple, calib, plain, tmp_path):
    """Stage 1 features through accelerate's hooks (layer 1 read from disk at each forward)."""
    off = tmp_path / "offload"
    out = _build(triple, calib, tmp_path / "d", method="rain-stage1", device_map=json.dumps(CPU_DISK),
                 offload_folder=off)
    assert_same_adapter_tensors(plain, out)
    a, b = (json.loads((p / "adapter_config.json").read_text()) for p in (plain, out))
    assert a["fingerprint"] == b["fingerprint"]  # streamed from the shards for the offloaded modules
    # how the LRM was placed is not recorded (it cannot change the adapter)
    oa, ob = (dict(c["extra"]["build_options"], out=None) for c in (a, b))
    assert oa == ob
    assert "device_map" not in b["extra"]["build_options"]


def test_llama_cpu_disk_offload_equals_plain_build(calib, tmp_path):
    """The same on a tiny Llama triple, with layer 0 split: attention in memory, MLP on disk."""
    from rain_adapter.testing.fixtures import make_tiny_triple

    t = make_tiny_triple(tmp_path / "llama", arch="llama", seed=3)
    dm = {**CPU_DISK, "model.layers.0.self_attn": "cpu", "model.layers.0.input_layernorm": "cpu",
          "model.layers.0.mlp": "disk", "model.layers.0.post_attention_layernorm": "disk"}
    del dm["model.layers.0"]
    a = _build(t, calib, tmp_path / "a", method="rain-stage1")
    b = _build(t, calib, tmp_path / "b", method="rain-stage1", device_map=json.dumps(dm))
    assert_same_adapter_tensors(a, b)


def test_methods_without_a_forward_ignore_the_map(triple, calib, tmp_path, capsys):
    """task-arithmetic loads no LRM weights at all: the map is reported unused (and not resolved)."""
    out = _build(triple, calib, tmp_path / "ta", method="task-arithmetic", device_map="auto", verbose=True)
    cap = capsys.readouterr()
    assert "--device-map unused" in cap.out + cap.err
    assert (out / "adapter_config.json").is_file()


def test_auto_and_cpu_maps_equal_plain_build(triple, calib, plain, tmp_path):
    """``auto`` (accelerate's infer_auto_device_map: on this GPU-less machine, all on the CPU) and
    ``cpu`` ({"": "cpu"})."""
    for spec in ("auto", "cpu"):
        assert_same_adapter_tensors(plain, _build(triple, calib, tmp_path / spec, method="rain-stage1",
                                                  device_map=spec))


def test_auto_with_max_memory_offloads_to_disk(triple, calib, plain, tmp_path, capsys):
    """``auto`` with a CPU budget smaller than the model: accelerate sends the rest to disk."""
    out = _build(triple, calib, tmp_path / "m", method="rain-stage1", device_map="auto",
                 max_memory=json.dumps({"cpu": "400KiB"}), verbose=True)
    assert_same_adapter_tensors(plain, out)
    log = capsys.readouterr()
    log = log.out + log.err
    assert "device map (accelerate)" in log, log
    assert "→ cpu" in log and "→ disk" in log, log


#: every module in host memory, but through accelerate's hooks (a map split module by module)
ALL_CPU = {k: "cpu" for k in CPU_DISK}


@pytest.mark.parametrize("device_map", [
    ALL_CPU,
    CPU_DISK,
], ids=["cpu-hooks", "cpu-disk"])
def test_stage2_dispatched_equals_plain(triple, calib, tmp_path, device_map):
    """Stage 2's attention statistics (the probe, with the deltas attached at λ = 1) on the dispatched LRM."""
    kw = dict(instruction_calib=make_instruction_records(), stage2_max_seq_len=400)
    a = _build(triple, calib, tmp_path / "a", **kw)
    b = _build(triple, calib, tmp_path / "b", device_map=json.dumps(device_map), **kw)
    ta, tb = read_tensors(a), read_tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    ca, cb = (json.loads((p / "adapter_config.json").read_text())["stage2"] for p in (a, b))
    assert ca["alpha"] == cb["alpha"]


def test_feature_cache_with_the_whole_lrm_on_disk(triple, calib, plain, tmp_path, capsys):
    """The feature cache's key fingerprints the input embedding: on disk it is loaded for that (the
    hook's pre/post_forward), and the key is the plain build's, so the caches are interchangeable."""
    from rain_adapter.merging.dispatch import WHOLE_DISK_ACCELERATE, _accelerate_at_least

    fc = tmp_path / "fc"
    disk = json.dumps({"": "disk"})
    if not _accelerate_at_least(WHOLE_DISK_ACCELERATE):  # the floors' accelerate: a clear refusal instead
        with pytest.raises(BuildError, match=f"needs accelerate ≥ {WHOLE_DISK_ACCELERATE}") as e:
            _build(triple, calib, tmp_path / "x", method="rain-stage1", device_map=disk, feature_cache=fc)
        assert e.value.field == "device_map" and not (tmp_path / "x").exists()
        return
    for i, dm in enumerate([disk, disk, None]):
        out = _build(triple, calib, tmp_path / f"o{i}", method="rain-stage1", device_map=dm, feature_cache=fc,
                     verbose=True)
        assert_same_adapter_tensors(plain, out)
        log = capsys.readouterr()
        assert (i == 0) != ("all 2 layer(s) from the feature cache" in log.out + log.err), log.out + log.err


@pytest.mark.parametrize("bad, needle", [
    ({**CPU_DISK, "model.layers.9": "cpu"}, "'model.layers.9' is not a module of the LRM"),
    ({k: v for k, v in CPU_DISK.items() if k != "lm_head"}, "no device for 'lm_head.weight'"),
    ({**CPU_DISK, "model.layers.1": "gpu0"}, "'model.layers.1' → 'gpu0' is not a device"),
    ({**CPU_DISK, "model.layers.1": 3}, "'model.layers.1' → 3, but this machine has"),
])
def test_bad_device_map_file_is_named(triple, calib, tmp_path, bad, needle):
    if needle.endswith("this machine has") and torch.cuda.device_count() > 3:
        pytest.skip("this machine has a GPU 3")
    path = tmp_path / "map.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(BuildError, match="--device-map file") as e:
        _build(triple, calib, tmp_path / "x", method="rain-stage1", device_map=str(path))
    assert needle in str(e.value) and str(path) in str(e.value)  # the file, the module, the device
    assert e.value.field == "device_map"
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kw, needle", [
    (dict(device_map="auto", sequential=True), "--sequential and --device-map"),
    (dict(max_memory='{"cpu": "1GiB"}'), "--max-memory only applies with --device-map"),
    (dict(device_map=json.dumps(CPU_DISK), max_memory='{"cpu": "1GiB"}'), "an explicit map"),
    (dict(device_map="auto", max_memory='{"cpu": "lots"}'), "is not a size"),
    (dict(device_map="/no/such/map.json"), "no such file"),
    (dict(device_map="{not json"), "not valid JSON"),
])
def test_bad_combinations_fail_before_loading(triple, calib, tmp_path, kw, needle):
    with pytest.raises(BuildError) as e:
        _build(triple, calib, tmp_path / "x", **kw)
    assert needle in str(e.value)


def test_cli_generates_the_flags(triple, calib, plain, tmp_path):
    out = tmp_path / "cli"
    rc = main(["build", "--lrm", str(triple.lrm), "--itm", str(triple.itm), "--base", str(triple.base),
               "--out", str(out), "--reasoning-calib", str(calib), "--min-samples", "1", "--method", "rain-stage1",
               "--no-progress", "--no-verbose", "--device-map", json.dumps(CPU_DISK),
               "--offload-folder", str(tmp_path / "off")])
    assert rc == 0
    assert_same_adapter_tensors(plain, out)


# ---- --dry-run -------------------------------------------------------------------------------
def _garbage_lrm(triple, root, delete=False):
    """A copy of the LRM whose safetensors are garbage (or gone): a dry run must not read them."""
    lrm = root / "lrm"
    shutil.copytree(triple.lrm, lrm)
    for f in lrm.glob("*.safetensors"):
        if delete:
            f.unlink()
        else:
            f.write_bytes(b"not a safetensors file" * 10)
    return lrm


@pytest.mark.parametrize("delete", [False, True], ids=["garbage", "deleted"])
def test_dry_run_prints_the_plan_and_map_without_weights(triple, calib, tmp_path, capsys, delete):
    lrm = _garbage_lrm(triple, tmp_path, delete)
    out = tmp_path / "never"
    mp = tmp_path / "map.json"
    mp.write_text(json.dumps(CPU_DISK))
    common = ["--reasoning-calib", str(calib), "--dtype", "float32", "--max-seq-len", "4096"]
    rc = main(["build", "--lrm", str(lrm), "--itm", str(triple.itm), "--base", str(triple.base), "--out", str(out),
               "--dry-run", "--device-map", str(mp), "--plan-profile", "cpu", *common])
    assert rc == 0
    text = capsys.readouterr().out
    assert not out.exists() and not (tmp_path / "never.partial").exists()
    assert "model.layers.0 → cpu" in text and "model.layers.1 → disk" in text and "lm_head → disk" in text
    # the plan is rain plan's for the same options
    assert main(["plan", "--model", str(lrm), "--profile", "cpu", "--device-map", str(mp), *common]) == 0
    plan = capsys.readouterr().out
    assert plan.strip() and plan.strip() in text
    assert "disk" in plan  # the plan models the offload


def test_dry_run_without_device_map_equals_rain_plan(triple, calib, tmp_path, capsys):
    lrm = _garbage_lrm(triple, tmp_path)
    common = ["--reasoning-calib", str(calib), "--batch-size", "2", "--storage", "lowrank", "--rank", "4"]
    assert main(["build", "--lrm", str(lrm), "--itm", str(triple.itm), "--base", str(triple.base),
                 "--out", str(tmp_path / "o"), "--dry-run", *common]) == 0
    text = capsys.readouterr().out
    assert main(["plan", "--model", str(lrm), *common]) == 0
    assert capsys.readouterr().out.strip() in text
    assert not (tmp_path / "o").exists()


def test_dry_run_for_a_preset_offline(tmp_path, capsys, monkeypatch):
    """A preset's Hub ids cannot be fetched offline: the configs are not compared, and the plan comes
    from rain plan's offline table (exit 0, nothing written)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to find offline
    out = tmp_path / "o"
    assert main(["build", "--preset", "qwen7b", "--out", str(out), "--dtype", "bfloat16", "--plan-profile", "h200",
                 "--dry-run"]) == 0
    cap = capsys.readouterr()
    text = cap.out + cap.err
    assert "configs not compared" in text and "DeepSeek-R1-Distill-Qwen-7B" in text and "total / peak" in text
    assert not out.exists()


def test_dry_run_plans_stage2_only_when_the_build_runs_it(triple, tmp_path, capsys):
    """--instruction-calib with rain-stage1 (no Stage 2) plans no Stage 2; with rain it does, as rain plan
    --instruction-calib; a method without a forward says which rows apply."""
    from rain_adapter.format.paths import calibration_dir

    instr = str(calibration_dir() / "instruction_calibration_set.jsonl")
    models = ["--lrm", str(triple.lrm), "--itm", str(triple.itm), "--base", str(triple.base), "--out",
              str(tmp_path / "o"), "--dry-run", "--instruction-calib", instr]
    for method, on in (("rain-stage1", False), ("rain", True)):
        assert main(["build", *models, "--method", method]) == 0
        text = capsys.readouterr().out
        assert ("Stage 2 on" in text) == on and ("stage 2 set:" in text) == on
    assert main(["plan", "--model", str(triple.lrm), "--instruction-calib", instr]) == 0
    assert capsys.readouterr().out.strip() in text
    assert main(["build", *models, "--method", "task-arithmetic"]) == 0
    assert "runs no LRM forward" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()
