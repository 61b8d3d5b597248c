"""`rain sweep`: λ parsing, prompt loading, mixed-λ batches equal single-λ runs, CSV/PNG output."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from rain_adapter.evaluation import sweep as S


def test_parse_lambdas():
    from rain_adapter.format.lambdas import parse_lambdas  # the one λ grammar (rain sweep's --lambdas)

    assert parse_lambdas("0:1.5:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    assert parse_lambdas("0:1:0.3") == [0.0, 0.3, 0.6, 0.9]
    assert parse_lambdas("0, 0.5,1") == [0.0, 0.5, 1.0]
    for bad in ("0:1", "1:0:0.5", "0:1:0", "a,b"):
        with pytest.raises(ValueError):
            parse_lambdas(bad)


def test_load_prompts(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "hi", "instruction_id_list": ["punctuation:no_comma"]}) + "\n\n"
                 + json.dumps({"prompt": "yo"}) + "\n")
    rows = S.load_prompts(p)
    assert rows[0]["kwargs"] == [{}] and rows[1]["instruction_id_list"] == []
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match="prompt"):
        S.load_prompts(tmp_path / "bad.jsonl")


def test_unknown_instruction_ids_are_an_error_or_counted(tmp_path):
    """An id no check can score used to give compliance NaN without a word (issue 15)."""
    p = tmp_path / "ifbench.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"p{i}", "instruction_id_list": ids}) + "\n" for i, ids in
                         enumerate([["ifbench:count:conjunctions"], ["punctuation:no_comma", "ifbench:count:conjunctions"],
                                    ["punctuation:no_comma"]])))
    with pytest.raises(ValueError, match=r"ifbench\.jsonl: 2 row\(s\).*ifbench:count:conjunctions ×2.*--skip-unknown"):
        S.load_prompts(p)
    with pytest.warns(UserWarning, match="2 row"):
        rows = S.load_prompts(p, skip_unknown=True)
    assert len(rows) == 3
    assert S.evaluate_rows(rows, ["a b", "a b", "a b"])["n"] == 3


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny random LRM (fixture tokenizer, R1-style template) and a dense random adapter."""
    from rain_adapter.format.config import RainConfig
    from rain_adapter.testing.fixtures import make_tiny_triple
    from rain_adapter.format.fingerprint import compute_fingerprint
    from rain_adapter.format.store import save_adapter
    from rain_adapter.testing.tiny import random_deltas
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("sweep")
    paths = make_tiny_triple(root / "triple", seed=3)
    model = AutoModelForCausalLM.from_pretrained(paths.lrm, dtype=torch.float32).eval()
    deltas = random_deltas(model, scale=0.5, seed=1)
    cfg = RainConfig(target_modules=["q", "k", "v", "o", "gate", "up", "down"],
                     layers=sorted({int(n.split(".")[2]) for n in deltas}), method="task-arithmetic",
                     fingerprint=compute_fingerprint(model, list(deltas)))
    ad = save_adapter(deltas, cfg, root / "adapter")
    prompts = root / "prompts.jsonl"
    rows = [{"prompt": f"Say {w}.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}], "answer": "1"}
            for w in ("a", "bb", "ccc")]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths, ad, prompts, rows


def test_mixed_lambda_batch_matches_single_lambda(tiny_setup):
    from rain_adapter.testing.fixtures import make_tokenizer
    from rain_adapter.runtime.model import RainAdapter
    from transformers import AutoModelForCausalLM

    paths, ad, _, rows = tiny_setup
    model = AutoModelForCausalLM.from_pretrained(paths.lrm, dtype=torch.float32).eval()
    tok = make_tokenizer()
    prompts = [r["prompt"] for r in rows]
    bare = S.generate_responses(model, tok, prompts, max_new_tokens=6, progress=False)
    rm = RainAdapter.attach(model, str(ad))
    lams = [0.0, 1.0, 1.5]
    mixed = S.generate_responses(rm, tok, prompts * 3, lambdas=[x for x in lams for _ in prompts],
                                 max_new_tokens=6, batch_size=9, progress=False)
    for j, lam in enumerate(lams):
        single = S.generate_responses(rm, tok, prompts, lambdas=[lam] * len(prompts), max_new_tokens=6,
                                      batch_size=2, progress=False)
        assert mixed[j * 3:(j + 1) * 3] == single
    assert mixed[:3] == bare                     # λ = 0 is the bare LRM
    assert mixed[3:6] != bare                     # the (large) delta changes something
    rm.detach()


def test_decoding_keeps_think_markers_even_if_special():
    from rain_adapter.testing.fixtures import make_tokenizer

    tok = make_tokenizer()
    skip = S._skip_ids(tok)
    assert tok.convert_tokens_to_ids("</think>") not in skip and tok.eos_token_id in skip


def test_sweep_cli_writes_csv_and_png(tiny_setup, tmp_path, capsys):
    from rain_adapter.cli.main import main

    paths, ad, prompts, _ = tiny_setup
    out = tmp_path / "out"
    rc = main(["sweep", "--model", str(paths.lrm), "--adapter", str(ad), "--adapter", str(ad), "--lambdas",
               "0:1:0.5", "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "4", "--quiet"])
    assert rc == 0
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [r["method"] for r in rows] == ["task-arithmetic"] * 3 + ["task-arithmetic-2"] * 3
    assert [float(r["lambda"]) for r in rows[:3]] == [0.0, 0.5, 1.0]
    for r in rows:
        for k in ("compliance", "format_validity", "accuracy"):
            v = float(r[k])
            assert 0.0 <= v <= 1.0
    assert (out / "sweep.png").stat().st_size > 1000
    assert len((out / "responses.jsonl").read_text().splitlines()) == 2 * 3 * 3
    assert "task-arithmetic" in capsys.readouterr().out


@pytest.fixture(scope="module")
def second_adapter(tiny_setup, tmp_path_factory):
    """Another dense random adapter for the tiny LRM (other deltas than tiny_setup's)."""
    from rain_adapter.format.config import RainConfig
    from rain_adapter.format.fingerprint import compute_fingerprint
    from rain_adapter.format.store import save_adapter
    from rain_adapter.testing.tiny import random_deltas
    from transformers import AutoModelForCausalLM

    paths = tiny_setup[0]
    model = AutoModelForCausalLM.from_pretrained(paths.lrm, dtype=torch.float32).eval()
    deltas = random_deltas(model, scale=0.3, seed=7)
    cfg = RainConfig(target_modules=["q", "k", "v", "o", "gate", "up", "down"],
                     layers=sorted({int(n.split(".")[2]) for n in deltas}), method="ties",
                     fingerprint=compute_fingerprint(model, list(deltas)))
    return save_adapter(deltas, cfg, tmp_path_factory.mktemp("second") / "adapter")


def _counting_generate(monkeypatch):
    """Wrap the real generate_responses; returns the list of (prompt, λ) pairs it generated."""
    real = S.generate_responses
    seen: list[tuple[str, float]] = []

    def counting(model, tok, prompts, *, lambdas=None, **kw):
        seen.extend(zip(prompts, lambdas))
        return real(model, tok, prompts, lambdas=lambdas, **kw)

    monkeypatch.setattr(S, "generate_responses", counting)
    return seen


def test_lambda_zero_is_generated_once_for_every_adapter(tiny_setup, second_adapter, monkeypatch):
    """λ = 0 is the bare LRM whatever the adapter (issue 25, 4): one generation, reused by every
    adapter, which still gets its λ = 0 record and responses, equal to a sweep that generates it
    per adapter."""
    from rain_adapter.testing.fixtures import make_tokenizer
    from transformers import AutoModelForCausalLM

    paths, ad, _, rows = tiny_setup
    model = AutoModelForCausalLM.from_pretrained(paths.lrm, dtype=torch.float32).eval()
    tok = make_tokenizer()
    lams = [0.0, 0.5, 1.0]
    seen = _counting_generate(monkeypatch)
    resp: list = []
    recs = S.sweep_adapters(model, tok, [ad, second_adapter], rows, lams, names=["a", "b"], max_new_tokens=5,
                            progress=False, responses_out=resp)
    assert sum(1 for _, lam in seen if lam == 0.0) == len(rows)  # once, not once per adapter
    assert len(seen) == len(rows) * (1 + 2 * 2)
    assert [(r["method"], r["lambda"]) for r in recs] == [(m, lam) for m in "ab" for lam in lams]
    assert len(resp) == 2 * 3 * len(rows)
    at0 = {m: sorted((x["index"], x["response"]) for x in resp if x["method"] == m and x["lambda"] == 0.0)
           for m in "ab"}
    assert at0["a"] == at0["b"] and len(at0["a"]) == len(rows)

    seen.clear()
    resp_each: list = []
    each = S.sweep_adapters(model, tok, [ad, second_adapter], rows, lams, names=["a", "b"], max_new_tokens=5,
                            progress=False, responses_out=resp_each, share_zero=False)
    assert len(seen) == len(rows) * 3 * 2
    assert each == recs  # same records, λ = 0 metrics included
    key = lambda x: (x["method"], x["lambda"], x["index"])  # noqa: E731
    assert sorted(resp_each, key=key) == sorted(resp, key=key)
    assert recs[0] == {**recs[3], "method": "a"}  # the two λ = 0 records: same metrics
