"""BuildOptions (the options as data), the generated ``rain build`` CLI, and the method registry."""

from __future__ import annotations

import dataclasses
import json

import pytest

from rain_adapter.merging.methods import REGISTRY, get_method, method_names
from rain_adapter.merging.options import BuildError, BuildOptions, flag, parse_int_list, parse_str_list
from rain_adapter.merging.pipeline import build_adapter, resolve_options
from rain_adapter.cli.build import options_from_args
from rain_adapter.cli.main import main, make_parser
from rain_adapter.testing.fixtures import make_tiny_triple, write_reasoning_calib

MODELS = dict(lrm="lrm", itm="itm", base="base", out="out")

#: every flag of `rain build --help` before the CLI was generated from BuildOptions
OLD_FLAGS = (
    "--lrm --itm --base --preset --out --overwrite --resume --method --targets --layers --skip-first-layers "
    "--merge-bias --reasoning-calib --radius --projection --project-layers --protect-energy --ridge --svd-dtype "
    "--max-samples --min-samples --max-seq-len --batch-size --sequential --density --drop --seed "
    "--instruction-calib --no-stage2 --rho --alpha-grad --alpha-norm --alpha-max --o-alpha --stage2-max-samples "
    "--stage2-max-seq-len --storage --rank --rank-energy --max-rank --dtype --device --no-progress --debug"
).split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("opts")
    return make_tiny_triple(root / "t", arch="qwen2", seed=1), write_reasoning_calib(root / "c.json", n=3)


# ---- validation ------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, field", [
    (dict(projection="bogus"), "projection"),
    (dict(protect_energy=1.5), "protect_energy"),
    (dict(protect_energy=-0.1), "protect_energy"),
    (dict(projection="ridge", ridge=0.0), "ridge"),
    (dict(storage="lowrank"), "rank"),
    (dict(rank=4), "rank"),
    (dict(rank_energy=0.9), "rank_energy"),
    (dict(storage="tiles"), "storage"),
    (dict(dtype="int8"), "dtype"),
    (dict(svd_dtype="float16"), "svd_dtype"),
    (dict(method="nope"), "method"),
    (dict(preset="nope"), "preset"),
    (dict(lrm=None), "lrm"),
    (dict(out=None), "out"),
    (dict(targets=["q", "qq"]), "targets"),
    (dict(alpha_grad="slope"), "alpha_grad"),
])
def test_validation_errors_name_the_field(kw, field):
    opts = BuildOptions(**{**MODELS, **kw})
    with pytest.raises(BuildError) as e:
        opts.validate()
    assert e.value.field == field and flag(field) in str(e.value), (str(e.value), e.value.field)
    assert isinstance(e.value, ValueError)  # callers that catch ValueError keep working


def test_valid_options_and_preset_resolution(tmp_path, monkeypatch):
    BuildOptions(**MODELS).validate()
    BuildOptions(**MODELS, storage="lowrank", rank_energy=0.9, projection="ridge", ridge=0.2).validate()
    monkeypatch.setenv("RAIN_ADAPTER_HOME", str(tmp_path))
    p = BuildOptions(preset="qwen1.5b")
    p.validate()  # the preset fills every model and the output
    r = p.resolved()
    assert r.lrm == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B" and r.out == tmp_path / "rain-qwen1.5b"
    assert BuildOptions(preset="qwen1.5b", itm="mine", out="o").resolved().itm == "mine"


def test_unknown_method_lists_the_valid_names():
    with pytest.raises(BuildError, match="dare-ties"):
        BuildOptions(**MODELS, method="foo").validate()
    with pytest.raises(ValueError, match=r"choose one of \['rain', 'rain-stage1', 'task-arithmetic'"):
        get_method("foo")


def test_bad_option_fails_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(BuildError, match="--protect-energy"):
        build_adapter("no-lrm", "no-itm", "no-base", out, protect_energy=2.0)
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    with pytest.raises(TypeError, match="bogus"):
        build_adapter("a", "b", "c", out, bogus=1)


def test_list_parsers_and_json_round_trip(tmp_path):
    assert parse_int_list("0-3,8") == [0, 1, 2, 3, 8] and parse_int_list(" 5 ,") == [5]
    assert parse_str_list("q, k,,v") == ["q", "k", "v"]
    o = BuildOptions(lrm=tmp_path / "l", itm="i", base="b", out=tmp_path / "o", targets=("q",), layers=range(2),
                     reasoning_calib=[{"prompt": "p", "reasoning": "r", "response": "a"}])
    d = o.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["lrm"] == str(tmp_path / "l") and d["targets"] == ["q"] and d["layers"] == [0, 1]
    assert d["reasoning_calib"] == "<1 in-memory records>"
    # every field but those that cannot change the adapter (threads; where accelerate puts the LRM
    # and the dry run's plan, issue 24)
    unrecorded = {"threads", "device_map", "max_memory", "offload_folder", "dry_run", "plan_profile"}
    assert list(d) == [f.name for f in dataclasses.fields(BuildOptions) if f.name not in unrecorded]
    plain = BuildOptions(**MODELS, layers=[1, 2])
    assert BuildOptions.from_dict(plain.to_dict()) == plain
    with pytest.raises(BuildError, match="unknown build option"):
        BuildOptions.from_dict({"lrm": "x", "nope": 1})


def test_options_and_keywords_compose():
    base_opts = BuildOptions(lrm="L", itm="I", base="B", out="O", density=0.3)
    got = resolve_options(None, None, None, "O2", base_opts, {"method": "ties"})
    assert (got.lrm, got.out, got.method, got.density) == ("L", "O2", "ties", 0.3)
    assert base_opts.out == "O" and base_opts.method == "rain"  # the caller's options are not changed


# ---- the generated CLI -----------------------------------------------------------------------
def _build_parser():
    sub = next(a for a in make_parser()._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    return sub.choices["build"]


def test_help_lists_every_field_and_every_old_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["build", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(BuildOptions):
        want = "--no-" + f.name.replace("_", "-") if f.default is True else flag(f.name)
        assert want in text, f"{f.name}: {want} missing from rain build --help"
        assert f.metadata["help"] and f.metadata["group"] + ":" in text
    for old in OLD_FLAGS:
        assert old in text, old


def test_cli_defaults_are_the_dataclass_defaults():
    ns = _build_parser().parse_args([])
    assert options_from_args(ns) == BuildOptions()


def test_cli_and_keywords_give_identical_options():
    argv = ["--lrm", "L", "--itm", "I", "--base", "B", "--out", "O", "--method", "dare-ties", "--targets", "q,down",
            "--layers", "0-2,5", "--project-layers", "0-1", "--skip-first-layers", "1", "--merge-bias",
            "--projection", "ridge", "--ridge", "0.2", "--svd-dtype", "float64", "--max-samples", "4",
            "--storage", "lowrank", "--rank-energy", "0.9", "--max-rank", "8", "--density", "0.3", "--drop", "0.4",
            "--seed", "7", "--rho", "0.25", "--alpha-grad", "gain", "--o-alpha", "head", "--no-progress",
            "--stage2-max-seq-len", "512", "--dtype", "bfloat16", "--sequential", "--resume", "--overwrite"]
    kw = dict(lrm="L", itm="I", base="B", out="O", method="dare-ties", targets=["q", "down"], layers=[0, 1, 2, 5],
              project_layers=[0, 1], skip_first_layers=1, merge_bias=True, projection="ridge", ridge=0.2,
              svd_dtype="float64", max_samples=4, storage="lowrank", rank_energy=0.9, max_rank=8, density=0.3,
              drop=0.4, seed=7, rho=0.25, alpha_grad="gain", o_alpha="head", progress=False,
              stage2_max_seq_len=512, dtype="bfloat16", sequential=True, resume=True, overwrite=True)
    cli = options_from_args(_build_parser().parse_args(argv))
    assert cli.to_dict() == BuildOptions(**kw).to_dict()
    cli.validate()


def test_cli_and_build_adapter_record_the_same_options(setup, tmp_path):
    triple, _ = setup
    common = ["--lrm", str(triple.lrm), "--itm", str(triple.itm), "--base", str(triple.base),
              "--method", "ties", "--density", "0.3", "--targets", "q,up", "--layers", "1", "--no-progress"]
    assert main(["build", *common, "--out", str(tmp_path / "cli")]) == 0
    build_adapter(triple.lrm, triple.itm, triple.base, tmp_path / "kw", method="ties", density=0.3,
                  targets=["q", "up"], layers=[1], progress=False)
    rec = {k: json.loads((tmp_path / k / "adapter_config.json").read_text())["extra"]["build_options"]
           for k in ("cli", "kw")}
    assert rec["cli"].pop("out") == str(tmp_path / "cli") and rec["kw"].pop("out") == str(tmp_path / "kw")
    assert rec["cli"] == rec["kw"]
    assert rec["kw"]["method"] == "ties" and rec["kw"]["layers"] == [1] and rec["kw"]["lrm"] == str(triple.lrm)


# ---- --threads (issue 25, 2) -----------------------------------------------------------------
def _demo_key(**kw):
    """The key rain_adapter.demo.run.build_methods names an adapter directory with."""
    import hashlib

    opts = BuildOptions(method="rain", **kw).to_dict()
    return hashlib.sha256(json.dumps(opts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def test_threads_option_is_a_flag_and_no_part_of_any_key(capsys):
    ns = _build_parser().parse_args(["--threads", "3"])
    assert options_from_args(ns).threads == 3 and BuildOptions().threads is None
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    text = capsys.readouterr().out
    assert "--threads THREADS" in text.split("storage and compute:")[1]
    with pytest.raises(BuildError, match="--threads must be ≥ 1") as e:
        BuildOptions(**MODELS, threads=0).validate()
    assert e.value.field == "threads"
    BuildOptions(**MODELS, threads=2).validate()
    # not recorded, so not in any key made from the recorded options
    assert BuildOptions(**MODELS, threads=3).to_dict() == BuildOptions(**MODELS).to_dict()
    assert "threads" not in BuildOptions(**MODELS, threads=3).to_dict()
    assert _demo_key(threads=3) == _demo_key() == _demo_key(threads=None)
    assert BuildOptions.from_dict(BuildOptions(**MODELS, threads=3).to_dict()) == BuildOptions(**MODELS)


def test_threads_runs_the_build_with_that_many_threads_and_changes_nothing_recorded(setup, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from rain_adapter.merging import pipeline

    triple, calib = setup
    seen = []
    real = pipeline.run_stage1

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "run_stage1", spy)
    before = torch.get_num_threads()
    want = 2 if before != 2 else 1
    outs = {}
    for name, threads in (("default", None), ("threads", want)):
        outs[name] = build_adapter(triple.lrm, triple.itm, triple.base, tmp_path / name, method="rain-stage1",
                                   reasoning_calib=calib, min_samples=1, layers=[0], threads=threads,
                                   progress=False, verbose=False)
        assert torch.get_num_threads() == before  # restored after the build
    assert seen == [before, want]
    cfgs = {k: json.loads((o / "adapter_config.json").read_text()) for k, o in outs.items()}
    for c in cfgs.values():
        c["extra"].pop("build_seconds")
        c["extra"]["build_options"].pop("out")
    assert cfgs["default"]["extra"]["build_options"] == cfgs["threads"]["extra"]["build_options"]
    assert "threads" not in cfgs["threads"]["extra"]["build_options"]
    a, b = (load_file(next(o.glob("*.safetensors"))) for o in outs.values())
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    # a failed build restores the setting too
    monkeypatch.setattr(pipeline, "run_stage1", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        build_adapter(triple.lrm, triple.itm, triple.base, tmp_path / "x", method="rain-stage1", reasoning_calib=calib,
                      min_samples=1, layers=[0], threads=want, progress=False, verbose=False)
    assert torch.get_num_threads() == before


# ---- the method registry ---------------------------------------------------------------------
def test_registry_lists_the_five_methods():
    assert method_names() == ["rain", "rain-stage1", "task-arithmetic", "ties", "dare-ties"]
    assert tuple(method_names()) == tuple(REGISTRY)
    names = {f.name for f in dataclasses.fields(BuildOptions)}
    for m in REGISTRY.values():
        assert get_method(m.name) is m and m.description
        assert set(m.params) <= names, (m.name, set(m.params) - names)
        assert (m.transform is None) == m.projects  # projecting methods transform with features
        with pytest.raises(dataclasses.FrozenInstanceError):
            m.name = "x"  # type: ignore[misc]
    assert REGISTRY["ties"].params == ("density",)
    assert REGISTRY["dare-ties"].params == ("density", "drop", "seed")
    assert [m.name for m in REGISTRY.values() if m.stage2] == ["rain"]


@pytest.mark.parametrize("name", method_names())
def test_declared_stages_match_what_the_build_did(setup, tmp_path, name):
    """A projecting method has projection stats for every module and a calibration record; a
    transform method has neither and records exactly its declared params; only a Stage 2 method
    has a Stage 2 record (here without an instruction set: not applied, recorded as rain-stage1)."""
    triple, calib = setup
    m = get_method(name)
    out = build_adapter(triple.lrm, triple.itm, triple.base, tmp_path / name, method=name, reasoning_calib=calib,
                        min_samples=1, layers=[0], progress=False, verbose=False)
    cfg = json.loads((out / "adapter_config.json").read_text())
    st1 = cfg["stage1"]
    assert cfg["method"] == (m.without_stage2 if m.stage2 else name)
    assert all(("residual" in s) == m.projects for s in st1["modules"].values())
    assert ("calib_hash" in st1) == m.projects and (st1["projection"] is not None) == m.projects
    if not m.projects:
        assert {p: st1[p] for p in m.params} == {p: cfg["extra"]["build_options"][p] for p in m.params}
        assert not ({"density", "drop", "seed"} - set(m.params)) & set(st1)  # nothing undeclared
    if m.stage2:
        assert cfg["stage2"] == {"applied": False, "reason": "no --instruction-calib given", "alpha": 1.0}
    else:
        assert cfg["stage2"] == {}


def test_stage2_default_rho_is_the_trial_choice():
    """ρ defaults to 0 (bench/RESULTS.md, the Stage 2 trial); the paper's 0.5 stays one flag away."""
    from rain_adapter.merging.coefficients import DEFAULT_RHO

    assert DEFAULT_RHO == 0.0 and BuildOptions().rho == DEFAULT_RHO
    assert BuildOptions(rho=0.5).rho == 0.5
