"""rain tune: the λ* rule and search on synthetic curves, the statistics, what it writes, and (slow) the
CI world against a brute-force sweep."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest
import torch

from rain_adapter.evaluation.stats import n_to_separate, wilson
from rain_adapter.evaluation.tune import LambdaPoint, TuneError, TuneOptions, choose, search
from rain_adapter.evaluation.tune_write import apply_to_config, arms_around, write_arms
from rain_adapter.format.config import RainConfig

N = 200


def _curve(seed: int):
    """A random world: compliance rises from λ0 with slope s, accuracy falls off after a cliff at b."""
    rng = random.Random(seed)
    lam0, slope, cliff, fall = rng.uniform(0, 1), rng.uniform(0.2, 1.0), rng.uniform(0.4, 2.8), rng.uniform(1, 4)

    def point(lam: float) -> LambdaPoint:
        c = min(1.0, max(0.0, (lam - lam0) * slope))
        a = 0.95 if lam <= cliff else max(0.0, 0.95 - (lam - cliff) * fall)
        f = 1.0 if lam <= cliff + 0.3 else 0.9
        return LambdaPoint(lam, round(c * N), N, round(a * N), N, round(f * N), N)

    return point


def _brute(point, opts: TuneOptions, step: float) -> float:
    fine = [round(i * step, 9) for i in range(int(round(opts.lambdas()[-1] / step)) + 1)]
    pts = [point(x) for x in fine]
    floors = {"accuracy": opts.min_accuracy * pts[0].accuracy,
              "format_validity": opts.min_format * pts[0].format_validity}
    return choose(pts, floors)[0].lam


@pytest.mark.parametrize("seed", [random.randrange(10**6) for _ in range(12)])
def test_search_lands_within_one_grid_step_of_brute_force(seed):
    point = _curve(seed)
    calls: list[list[float]] = []

    def evaluate(lams):
        calls.append(list(lams))
        return [point(x) for x in lams]

    opts = TuneOptions(grid="0:3:0.5", refine_rounds=3)
    res = search(evaluate, opts)
    brute = _brute(point, opts, 0.5 / 8)
    assert abs(res.recommended_lambda - brute) <= 0.5 + 1e-9, (seed, res.recommended_lambda, brute)
    # λ* meets the floors, and the range ends at or after it
    assert res.feasible[res.recommended_lambda]
    assert res.lambda_range[0] == 0.0 and res.lambda_range[1] >= res.recommended_lambda
    # several λ per batch: the grid in one call, then at most three per refinement round
    assert len(calls[0]) == 7 and all(len(c) <= 3 for c in calls[1:]) and len(calls) <= 1 + 3
    evaluated = [x for c in calls for x in c]
    assert len(evaluated) == len(set(evaluated))  # no λ generated twice


def test_choose_prefers_compliance_then_the_smaller_lambda_and_stops_at_the_first_infeasible():
    P = LambdaPoint
    pts = [P(0.0, 0, 10, 10, 10, 10, 10), P(0.5, 5, 10, 10, 10, 10, 10), P(1.0, 5, 10, 10, 10, 10, 10),
           P(1.5, 6, 10, 5, 10, 10, 10),   # accuracy below the floor
           P(2.0, 9, 10, 10, 10, 10, 10)]  # feasible again: noise beyond the region, never chosen
    best, end, feasible = choose(pts, {"accuracy": 0.9, "format_validity": 0.98})
    assert best.lam == 0.5 and end == 1.0
    assert feasible == {0.0: True, 0.5: True, 1.0: True, 1.5: False, 2.0: True}


def test_refinement_bisects_the_boundary():
    """Accuracy falls off a cliff at 1.3: the search ends between the last feasible and the cliff."""
    def evaluate(lams):
        return [LambdaPoint(x, round(min(1, x / 3) * N), N, N if x <= 1.3 else 0, N, N, N) for x in lams]

    res = search(evaluate, TuneOptions(grid="0:3:0.5", refine_rounds=4))
    assert 1.3 - 0.5 / 16 <= res.recommended_lambda <= 1.3
    assert res.lambda_range == (0.0, res.recommended_lambda)


def test_floors_that_cannot_be_checked_are_errors():
    no_checks = lambda lams: [LambdaPoint(x, 0, 0, 5, 10, 10, 10) for x in lams]  # noqa: E731
    with pytest.raises(TuneError, match="no prompt of the dev set carries a check"):
        search(no_checks, TuneOptions())
    no_answers = lambda lams: [LambdaPoint(x, round(x * 33), 100, 0, 0, 10, 10) for x in lams]  # noqa: E731
    with pytest.raises(TuneError, match="has an 'answer'.*--min-accuracy 0"):
        search(no_answers, TuneOptions())
    res = search(no_answers, TuneOptions(min_accuracy=0.0))
    assert res.recommended_lambda == 3.0 and res.floors == {"format_validity": 0.98}
    with pytest.raises(TuneError, match="min_format"):
        TuneOptions(min_format=1.5).validate()


def test_wilson_and_sample_size_against_known_values():
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.27753, abs=1e-5)
    lo, hi = wilson(50, 100)
    assert (lo, hi) == (pytest.approx(0.40383, abs=1e-5), pytest.approx(0.59617, abs=1e-5))
    for _ in range(20):  # the interval holds the estimate and stays in [0, 1]
        n = random.randint(1, 500)
        k = random.randint(0, n)
        lo, hi = wilson(k, n)
        assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert all(math.isnan(v) for v in wilson(0, 0))
    assert n_to_separate(0.5, 0.6) == 388        # Fleiss' table: 388 per group at α 0.05, power 0.8
    assert n_to_separate(0.3, 0.3) == math.inf and n_to_separate(float("nan"), 0.3) == math.inf


# ----------------------------------------------------------------------------- what tune writes

def _tiny_adapter(tmp_path):
    from rain_adapter.format.store import save_adapter
    from rain_adapter.testing.tiny import random_deltas, tiny_model

    model = tiny_model(seed=1)
    cfg = RainConfig(base_model_name_or_path="tiny", layers=[0, 1], target_modules=["q"])
    deltas = random_deltas(model, targets=["q"], layers=[0, 1])
    return model, save_adapter(deltas, cfg, tmp_path / "ad")


def _result(star_cliff: float = 1.3):
    def evaluate(lams):
        return [LambdaPoint(x, round(min(1, x / 3) * N), N, N if x <= max(star_cliff, 0.0) else 0, N, N, N) for x in lams]

    return search(evaluate, TuneOptions(grid="0:2:0.5", refine_rounds=2))


def test_tune_writes_lambda_star_range_and_report_and_attach_uses_it(tmp_path):
    from rain_adapter import RainAdapter

    model, ad = _tiny_adapter(tmp_path)
    prompts = tmp_path / "dev.jsonl"
    prompts.write_text('{"prompt": "x"}\n')
    res = _result()
    cfg = apply_to_config(ad, res, opts=TuneOptions(grid="0:2:0.5", refine_rounds=2), prompts=prompts, n_rows=1)
    again = RainConfig.load(ad)
    assert again.recommended_lambda == again.default_lambda == res.recommended_lambda == cfg.default_lambda
    assert again.lambda_range == [0.0, res.lambda_range[1]]
    assert again.tune["previous"] == {"default_lambda": 1.0, "lambda_range": [0.0, 2.0]}
    assert again.tune["prompts"]["rows"] == 1 and len(again.tune["prompts"]["sha256"]) == 64
    assert [p["lambda"] for p in again.tune["points"]] == [p.lam for p in res.points]
    rm = RainAdapter.attach(model, ad)
    assert torch.equal(rm.get_lambda(), torch.tensor([res.recommended_lambda]))


def test_no_lambda_that_helps_leaves_the_config_alone(tmp_path):
    _, ad = _tiny_adapter(tmp_path)
    before = (ad / "adapter_config.json").read_bytes()
    res = _result(star_cliff=-1.0)   # every λ > 0 breaks accuracy
    assert res.recommended_lambda == 0.0
    with pytest.raises(TuneError, match="no λ > 0 raised compliance"):
        apply_to_config(ad, res, opts=TuneOptions(), prompts=tmp_path / "none.jsonl", n_rows=0)
    assert (ad / "adapter_config.json").read_bytes() == before


def test_arms_around_lambda_star_are_accepted_by_the_server(tmp_path):
    from rain_adapter.serve.arms import parse_arms

    res = _result()
    arms = parse_arms(json.loads(write_arms(tmp_path / "arms.json", res).read_text()), "arms.json")
    names = [a.name for a in arms]
    assert "tuned" in names and names[0] == "below"
    lo, hi = res.lambda_range
    assert all(lo <= a.lam <= hi for a in arms)
    tuned = next(a for a in arms if a.name == "tuned")
    assert tuned.lam == res.recommended_lambda
    assert arms_around(res)[0]["lambda"] < res.recommended_lambda


def test_recommended_lambda_outside_the_range_is_a_config_error():
    from rain_adapter.format.config import ConfigError

    with pytest.raises(ConfigError, match="recommended_lambda"):
        RainConfig(base_model_name_or_path="x", recommended_lambda=5.0)


# ----------------------------------------------------------------------------- the CI world (slow)

@pytest.mark.slow
def test_tune_on_the_ci_world_matches_a_brute_force_sweep(ci_world, tmp_path):
    from rain_adapter import RainAdapter
    from rain_adapter.merging.pipeline import build_adapter
    from rain_adapter.demo.soundness import max_new_tokens
    from rain_adapter.evaluation.sweep import load_model, load_prompts
    from rain_adapter.evaluation.tune import tune_attached

    ad = build_adapter(ci_world.lrm, ci_world.itm, ci_world.base, tmp_path / "rain",
                       reasoning_calib=str(ci_world.reasoning_calib),
                       instruction_calib=str(ci_world.instruction_calib), method="rain-stage1", progress=False,
                       verbose=False, protect_energy=0.95)
    mnt = max_new_tokens(2, True)
    # the CI world is small: compliance rises only where accuracy falls below 90 % of the LRM's, so
    # the test floors accuracy at 70 % (measured: λ* = 3.5 of grid 0:4:1 + 2 rounds, brute force 3.5)
    opts = TuneOptions(grid="0:4:1", refine_rounds=2, max_new_tokens=mnt, min_accuracy=0.7)
    out = tmp_path / "tune"
    cmd = [sys.executable, "-m", "rain_adapter.cli.main", "tune", "--model", str(ci_world.lrm), "--adapter", str(ad),
           "--prompts", str(ci_world.eval_reasoning), "--limit", "32", "--grid", opts.grid, "--refine-rounds", "2",
           "--min-accuracy", "0.7",
           "--max-new-tokens", str(mnt), "--out", str(out), "--arms", str(tmp_path / "arms.json"), "--quiet"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "tune.json").read_text())["adapters"]["rain-stage1"]
    star = report["recommended_lambda"]
    assert star > 0, run.stdout
    # the brute-force sweep: every λ of the fine grid (step 1/4) in one go, the same rule
    model, tok = load_model(ci_world.lrm)
    rows = load_prompts(ci_world.eval_reasoning, 32)
    rm = RainAdapter.attach(model, str(ad))
    fine = [i * 0.25 for i in range(17)]
    brute = tune_attached(rm, tok, rows, TuneOptions(grid="0:4:0.25", refine_rounds=0, max_new_tokens=mnt,
                                                     min_accuracy=0.7), progress=False)
    assert abs(star - brute.recommended_lambda) <= 1.0 + 1e-9, (star, brute.to_dict())
    assert [p.lam for p in brute.points] == fine
    # the same λ gives (nearly) the same counts in both runs: greedy decoding, only the batch mix differs
    by_lam = {p.lam: p for p in brute.points}
    for p in report["points"]:
        if p["lambda"] in by_lam:
            assert abs(p["comply_k"] - by_lam[p["lambda"]].comply_k) <= 2, p["lambda"]
    # written into the config: attach starts at λ*
    rm.detach()
    cfg = RainConfig.load(ad)
    assert cfg.recommended_lambda == cfg.default_lambda == star and cfg.lambda_range[1] >= star
    rm = RainAdapter.attach(model, str(ad))
    assert float(rm.get_lambda()[0]) == star
    assert (out / "responses-rain-stage1.jsonl").read_text().count("\n") == 32 * len(report["points"])


def test_rain_serve_starts_at_the_tuned_lambda_and_range(tmp_path):
    """A tuned adapter: the server's default arm is λ*, and a request λ beyond the measured range is refused."""
    from rain_adapter.serve.errors import APIError
    from rain_adapter.serve.requests import parse_completion
    from rain_adapter.testing.serve_tiny import build_tiny_serving, tiny_serve_state

    model_dir, ad = build_tiny_serving(tmp_path / "srv", lambda_range=(0.0, 3.0))
    res = _result()                              # λ* = 1.25 of grid 0:2:0.5, range [0, 1.25]
    apply_to_config(ad, res, opts=TuneOptions(), prompts=tmp_path / "dev.jsonl", n_rows=0)
    state = tiny_serve_state(model_dir, ad, model_name="m", db_path=tmp_path / "db.sqlite")
    assert [(a.name, a.lam) for a in state.arms] == [("default", res.recommended_lambda)]
    assert state.lambda_range == res.lambda_range
    with pytest.raises(APIError, match="outside the adapter's lambda_range"):
        parse_completion({"model": "m", "prompt": "x", "rain_lambda": res.lambda_range[1] + 0.5}, state.limits)


def test_several_adapters_get_unique_names_and_one_comparison_line_each():
    from rain_adapter.cli.tune import compare_table
    from rain_adapter.evaluation.sweep import unique_names

    assert unique_names(["rain", "rain-stage1", "rain", "rain"]) == ["rain", "rain-stage1", "rain-2", "rain-3"]
    assert unique_names(["rain", "rain-2", "rain"]) == ["rain", "rain-2", "rain-3"]   # never a second rain-2
    a, b = _result(), _result(star_cliff=0.75)
    lines = compare_table({"rain": a, "rain-2": b}).splitlines()
    assert len(lines) == 3 and lines[1].split()[:2] == ["rain", f"{a.recommended_lambda:g}"]
    assert lines[2].split()[:2] == ["rain-2", f"{b.recommended_lambda:g}"] and b.recommended_lambda < a.recommended_lambda


# ----------------------------------------------------------------------------- --search (build settings)

def test_parse_search_uses_each_options_parser_and_refuses_the_rest():
    from rain_adapter.cli.tune_search import parse_search

    got = parse_search(["protect_energy=0.9/0.99", "project_layers=all/0-1/0,2", "alpha_grad=level/gain"])
    assert got == {"protect_energy": [0.9, 0.99], "project_layers": [None, (0, 1), (0, 2)],
                   "alpha_grad": ["level", "gain"]}
    for bad, match in (("lrm=x", "cannot be searched"), ("protect_energy", "expected KEY=V1/V2"),
                       ("protect_energy=a", "value 'a'"), ("alpha_grad=steep", "not in")):
        with pytest.raises(ValueError, match=match):
            parse_search([bad])


def test_combinations_put_the_adapters_own_settings_first_once():
    from rain_adapter.cli.tune_search import combinations

    rec = {"protect_energy": 0.95, "project_layers": None}
    combos = combinations(rec, {"protect_energy": [0.9, 0.95], "project_layers": [None, (0, 1)]})
    assert combos[0] == {"protect_energy": 0.95, "project_layers": None}
    assert len(combos) == 4 and combos.count(combos[0]) == 1


@pytest.mark.slow
def test_tune_search_rebuilds_variants_and_picks_one(tmp_path, monkeypatch):
    """One adapter built by rain build, --search over protect_energy: every variant is built from the
    recorded options, tuned, reported with its settings, and the best is named."""
    from rain_adapter.merging.pipeline import build_adapter
    from rain_adapter.cli.main import main
    from rain_adapter.testing.fixtures import make_tiny_triple, write_reasoning_calib

    t = make_tiny_triple(tmp_path / "t", seed=5)
    calib = write_reasoning_calib(tmp_path / "c.json", n=3, seed=2)
    monkeypatch.chdir(tmp_path)
    ad = build_adapter(t.lrm, t.itm, t.base, tmp_path / "ad", reasoning_calib=calib, min_samples=1, progress=False,
                       verbose=False, method="rain-stage1")
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"prompt": f"Say {w}.", "instruction_id_list": ["spec:char_count"],
                                       "kwargs": [{"max": 2000}], "answer": "1"}) + "\n" for w in "abcd"))
    rc = main(["tune", "--model", str(t.lrm), "--adapter", str(ad), "--prompts", str(dev), "--search",
               "protect_energy=0.5/0.95", "--grid", "0:1:0.5", "--refine-rounds", "1", "--max-new-tokens", "8",
               "--min-accuracy", "0", "--no-write", "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 0
    report = json.loads((tmp_path / "out" / "tune.json").read_text())
    names = list(report["adapters"])
    assert names[0].endswith("(as built)") and report["adapters"][names[0]]["settings"] == {"protect_energy": 0.95}
    assert len(names) == 2 and report["adapters"][names[1]]["settings"] == {"protect_energy": 0.5}
    variant = tmp_path / "out" / "variants" / "protect_energy=0.5"
    cfg = RainConfig.load(variant)
    assert cfg.stage1["protect_energy"] == 0.5 and cfg.extra["build_options"]["protect_energy"] == 0.5
    assert report["best"] in names


@pytest.mark.parametrize("seed", [random.randrange(10**6) for _ in range(6)])
def test_floor_on_the_lower_bound_is_never_bolder(seed):
    """--floor-on lower judges the floors on the Wilson lower bound: λ* and the range never go further
    than with the point estimate; on a point that meets the floor only by its estimate it stops earlier."""
    point = _curve(seed)
    evaluate = lambda lams: [point(x) for x in lams]  # noqa: E731
    est = search(evaluate, TuneOptions(refine_rounds=0))
    low = search(evaluate, TuneOptions(refine_rounds=0, floor_on="lower"))
    assert low.lambda_range[1] <= est.lambda_range[1] and low.recommended_lambda <= est.recommended_lambda
    # 0.93 of 0.95 meets the 0.9·0.95 = 0.855 floor as an estimate, but not at n = 30 as a lower bound
    P = LambdaPoint
    pts = [P(0.0, 0, 30, 28, 30, 30, 30), P(1.0, 9, 30, 28, 30, 30, 30)]
    assert choose(pts, {"accuracy": 0.9 * 28 / 30})[0].lam == 1.0
    assert choose(pts, {"accuracy": 0.9 * 28 / 30}, lower=0.95)[0].lam == 0.0
    with pytest.raises(TuneError, match="floor_on"):
        TuneOptions(floor_on="upper").validate()


def test_a_dev_set_without_references_is_written_with_null_accuracy(tmp_path):
    """--min-accuracy 0 on prompts without answers: the config and report hold null, never NaN."""
    _, ad = _tiny_adapter(tmp_path)
    res = search(lambda lams: [LambdaPoint(x, round(x * 33), 100, 0, 0, 10, 10) for x in lams],
                 TuneOptions(min_accuracy=0.0, grid="0:2:0.5"))
    apply_to_config(ad, res, opts=TuneOptions(min_accuracy=0.0), prompts=tmp_path / "dev.jsonl", n_rows=0)
    text = (ad / "adapter_config.json").read_text()
    assert "NaN" not in text
    star = next(p for p in json.loads(text)["tune"]["points"] if p["lambda"] == res.recommended_lambda)
    assert star["accuracy"] is None and star["accuracy_ci"] is None and star["compliance"] > 0


def test_unscored_rows_are_counted_with_their_reasons():
    from rain_adapter.evaluation.tune import point_from_scores

    scores = [{"follow_all": True, "correct": True, "think_ok": True, "unscored": []},
              {"follow_all": None, "correct": None, "think_ok": True,
               "unscored": [{"check": "ifbench:x", "reason": "LookupError: punkt_tab"},
                            {"check": "answer:number", "reason": "ValueError: no number"}]}]
    p = point_from_scores(1.0, scores)
    assert (p.comply_k, p.comply_n, p.acc_n, p.fmt_n, p.unscored) == (1, 1, 1, 2, 1)
    assert p.unscored_reasons == {"ifbench:x: LookupError: punkt_tab": 1, "answer:number: ValueError: no number": 1}
    assert p.to_dict()["unscored_reasons"] == p.unscored_reasons
